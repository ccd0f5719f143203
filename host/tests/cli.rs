//! The binary's own surface. (This file also makes `cargo test --workspace` build the
//! `wasmq` binary that the end-to-end suites in the root package drive.)

use std::process::Command;

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for command in ["send", "consume", "topics", "check", "dead-letter"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn a_bad_header_flag_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_wasmq"))
        .args(["send", "t", "x", "--header", "novalue"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"novalue\"") && stderr.contains("name=value"),
        "{stderr}"
    );
}
