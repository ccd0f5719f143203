#!/usr/bin/env bash
# The quick-start demo: sets everything up on a fresh machine (the wasm32-wasip2
# target, the wasmq binary, the example plugins) and runs a few messages through
# the example plugins on the embedded SQLite default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "==> installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi

# The dev profile, which the tests use too (its dependencies are optimised, see
# Cargo.toml): `cargo test --workspace` afterwards reuses this build of wasmtime
# instead of compiling it a second time. Same for the guests' target folder.
target="${CARGO_TARGET_DIR:-$root/target}"
echo "==> building wasmq (the first build compiles wasmtime: several minutes)"
cargo build -p wasmq
wasmq="$target/debug/wasmq"

echo "==> building the example plugins into demo/plugins"
WASMQ_GUEST_TARGET_DIR="$target/wasm-guests" guest-examples/build.sh "$root/demo/plugins" >/dev/null

cd "$root/demo"
rm -rf var   # a fresh message store for every demo run
step() { printf '\n==> %s\n' "$*"; }

# WASMQ_DEMO_DSN=postgres://… or mysql://… runs the demo on that (empty) database
# instead, through a copy of the config beside the original.
if [ -n "${WASMQ_DEMO_DSN:-}" ]; then
    sed "s|^dsn = .*|dsn = \"$WASMQ_DEMO_DSN\"|" wasmq.toml > var.server.toml
    wasmq_bin="$wasmq"
    wasmq() { "$wasmq_bin" --config var.server.toml "$@"; }
    wasmq=wasmq
fi

step "wasmq check"
"$wasmq" check

step "wasmq topics"
"$wasmq" topics

step "sending three messages (one is not JSON: the indexer will reject it)"
"$wasmq" send search.index-entities '{"entity":"product","ids":[1,2,3]}'
"$wasmq" send search.index-entities '{"entity":"category","ids":[7]}' --priority high
"$wasmq" send search.index-entities 'this is not json'

step "consuming them (-v prints one line per message; the high-priority one goes first)"
"$wasmq" consume --queue default --message-limit 3 -v

step "consuming the four search.indexed messages the indexer sent on ACK"
"$wasmq" consume --queue indexed --message-limit 4 -v

step "wasmq dead-letter list (the rejected message, with its reason)"
"$wasmq" dead-letter list

step "done: edit demo/wasmq.toml, or write a processor (README.md, 'Writing a processor')"
