//! Builds the plugins in guest-examples/ for the end-to-end tests, with the same script
//! the quick start uses, and tells the tests where they are (`WASMQ_TEST_PLUGINS`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let plugins = out_dir.join("plugins");
    // target/<profile>/build/<pkg>/out → target/: one guest build shared by every
    // profile and every clone that uses the same CARGO_TARGET_DIR.
    let guest_target = out_dir
        .ancestors()
        .nth(4)
        .map_or_else(|| out_dir.join("guests"), |t| t.join("wasm-guests"));

    let guests = root.join("guest-examples");
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    for file in ["build.sh", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guests.join(file).display());
    }
    for crate_dir in crates(&guests) {
        println!("cargo:rerun-if-changed={}", crate_dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            crate_dir.join("Cargo.toml").display()
        );
    }

    let status = Command::new("bash")
        .arg(guests.join("build.sh"))
        .arg(&plugins)
        .env("WASMQ_GUEST_TARGET_DIR", &guest_target)
        .status()
        .expect("running guest-examples/build.sh: is bash installed?");
    assert!(
        status.success(),
        "guest-examples/build.sh failed ({status}); run it by hand to see why (it needs `rustup target add wasm32-wasip2`)"
    );
    println!("cargo:rustc-env=WASMQ_TEST_PLUGINS={}", plugins.display());
}

fn crates(guests: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(guests) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect()
}
