#!/usr/bin/env bash
# Build every plugin in guest-examples/ as a wasm32-wasip2 component and copy
# them to OUT_DIR (default guest-examples/out) as <crate-name>.wasm.
#
# Usage: guest-examples/build.sh [OUT_DIR]
#
# Works from any directory, and from a cargo build script: cargo's environment
# for build scripts is scrubbed first so it cannot leak into this nested build.
# WASMQ_GUEST_TARGET_DIR overrides the cargo target directory
# (default guest-examples/target). Files in OUT_DIR are only rewritten when
# their content changed, so their mtimes stay stable. The last line printed on
# stdout is the absolute OUT_DIR.
set -euo pipefail

target=wasm32-wasip2
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

absolute() {
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

out_dir="$(absolute "${1:-$here/out}")"
target_dir="$(absolute "${WASMQ_GUEST_TARGET_DIR:-$here/target}")"

# Drop whatever an enclosing cargo invocation (or the user's shell) set that
# would change how this workspace is built: flags meant for the host target,
# the host's target dir, jobserver handles, wrappers, build-script variables.
# Registry, network and terminal settings are kept.
for var in $(compgen -e); do
    case "$var" in
        CARGO_HOME | CARGO_NET_* | CARGO_HTTP_* | CARGO_REGISTRY_* | CARGO_REGISTRIES_* | CARGO_TERM_*) ;;
        CARGO_* | __CARGO_*) unset "$var" ;;
    esac
done
unset RUSTFLAGS RUSTDOCFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER RUSTC_LINKER \
    MAKEFLAGS MFLAGS TARGET HOST OUT_DIR PROFILE OPT_LEVEL DEBUG NUM_JOBS

cd "$here"

if command -v rustup >/dev/null 2>&1; then
    rustup target list --installed | grep -qx "$target" || rustup target add "$target"
fi

CARGO_TARGET_DIR="$target_dir" cargo build --release --target "$target" --workspace

mkdir -p "$out_dir"
for manifest in */Cargo.toml; do
    grep -q 'crate-type *= *\["cdylib"\]' "$manifest" || continue
    crate="$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n 1)"
    built="$target_dir/$target/release/${crate//-/_}.wasm"
    dest="$out_dir/$crate.wasm"
    if [[ ! -f "$built" ]]; then
        echo "build.sh: $built is missing after the build" >&2
        exit 1
    fi
    if ! cmp -s "$built" "$dest"; then
        cp "$built" "$dest.tmp.$$"
        mv -f "$dest.tmp.$$" "$dest"
        echo "build.sh: updated $dest" >&2
    fi
done

printf '%s\n' "$out_dir"
