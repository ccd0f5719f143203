//! Every config mistake is an error that names the key or file and says what to do.

mod common;

use common::{Env, plugins_dir};

fn check_fails_with(config: &str, expected: &[&str]) {
    let env = Env::with_config(config);
    let out = env.run(&["check"]);
    out.assert_failure();
    for needle in expected {
        assert!(
            out.stderr.contains(needle),
            "expected {needle:?} in:\n{}",
            out.stderr
        );
    }
}

fn plugins() -> String {
    format!("[plugins]\ndir = {:?}\n", plugins_dir())
}

#[test]
fn an_unknown_key_is_named() {
    check_fails_with(
        &format!(
            "{}[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\nmax_attempt = 3\n",
            plugins()
        ),
        &["max_attempt", "max_attempts"],
    );
}

#[test]
fn a_missing_plugin_file_is_named() {
    check_fails_with(
        &format!(
            "{}[[processor]]\nname = \"a\"\nplugin = \"nope.wasm\"\n",
            plugins()
        ),
        &["nope.wasm", "does not exist", "wasm32-wasip2"],
    );
}

#[test]
fn a_bad_duration_is_named() {
    check_fails_with(
        &format!(
            "{}[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\ntimeout = \"ten seconds\"\n",
            plugins()
        ),
        &["timeout", "\"ten seconds\"", "30s"],
    );
}

#[test]
fn a_bad_size_is_named() {
    check_fails_with(
        &format!(
            "{}[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\nmemory_limit = \"big\"\n",
            plugins()
        ),
        &["memory_limit", "\"big\"", "64MiB"],
    );
}

#[test]
fn a_dsn_that_does_not_parse_is_named() {
    check_fails_with(
        &format!(
            "[transport]\ndsn = \"sqlite:/oops\"\n{}[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\n",
            plugins()
        ),
        &["[transport] dsn", "\"sqlite:/oops\"", "sqlite://"],
    );
}

#[test]
fn duplicate_processor_names_are_named() {
    check_fails_with(
        &format!(
            "{}[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\n[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\n",
            plugins()
        ),
        &["two processors are named \"a\""],
    );
}

#[test]
fn a_missing_config_file_says_how_to_point_at_one() {
    let env = Env::with_config("");
    std::fs::remove_file(env.path().join("wasmq.toml")).unwrap();
    let out = env.run(&["topics"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("wasmq.toml") && out.stderr.contains("WASMQ_CONFIG"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "the cause is printed once:\n{}",
        out.stderr
    );
}

#[test]
fn a_plugin_that_is_not_wasm_is_named_in_one_line() {
    let env = Env::with_config(
        "[plugins]\ndir = \"plugins\"\n[[processor]]\nname = \"a\"\nplugin = \"garbage.wasm\"\ntopics = [\"t\"]\n",
    );
    std::fs::create_dir(env.path().join("plugins")).unwrap();
    std::fs::write(
        env.path().join("plugins/garbage.wasm"),
        [0x9a, 0x4b, 0x24, 0x92, 0x11, 0x00, 0xff],
    )
    .unwrap();
    let out = env.run(&["check"]);
    out.assert_failure();
    let problems: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(problems.len(), 1, "{}", out.stderr);
    assert!(
        problems[0].contains("garbage.wasm")
            && problems[0]
                .contains("is not a WebAssembly file: it starts with 9a 4b 24 92, not \\0asm")
            && problems[0].contains("wasm32-wasip2"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "one line, no dump:\n{}",
        out.stderr
    );
}

#[test]
fn a_valid_config_checks_clean_and_lists_its_topics() {
    let env = Env::new("[[processor]]\nname = \"indexer\"\nplugin = \"indexer.wasm\"\n");
    let out = env.run(&["check"]);
    out.assert_success();
    assert!(
        out.stdout.contains("search.index-entities"),
        "{}",
        out.stdout
    );
    let topics = env.run(&["topics"]);
    topics.assert_success();
    let line = topics
        .stdout
        .lines()
        .find(|l| l.starts_with("search.index-entities"))
        .expect("topic row");
    assert!(
        line.contains("indexer") && line.contains("indexer.wasm") && line.contains("default"),
        "{line}"
    );
}

#[test]
fn wasmq_config_names_the_config_file_when_no_flag_does() {
    let env = Env::new("[[processor]]\nname = \"indexer\"\nplugin = \"indexer.wasm\"\n");
    let elsewhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::wasmq_bin())
        .current_dir(elsewhere.path())
        .arg("topics")
        .env("WASMQ_CONFIG", env.path().join("wasmq.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("search.index-entities"));
}

#[test]
fn compiled_plugins_are_cached_and_a_corrupt_cache_file_is_recompiled() {
    let env = Env::with_config(&format!(
        "[plugins]\ndir = {:?}\ncache_dir = \"cache\"\n[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\n",
        plugins_dir()
    ));
    env.run(&["check"]).assert_success();
    let cached: Vec<_> = std::fs::read_dir(env.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        cached.len(),
        1,
        "one compiled artifact for one plugin: {cached:?}"
    );
    assert_eq!(cached[0].extension().unwrap(), "cwasm");
    let modified = std::fs::metadata(&cached[0]).unwrap().modified().unwrap();

    // A restart loads the artifact instead of compiling again: the file is untouched.
    env.run(&["check"]).assert_success();
    assert_eq!(
        std::fs::metadata(&cached[0]).unwrap().modified().unwrap(),
        modified
    );

    std::fs::write(&cached[0], b"not a compiled component").unwrap();
    let out = env.run(&["check", "-v"]);
    out.assert_success();
    assert!(out.stderr.contains("recompiling"), "{}", out.stderr);
}

#[test]
fn a_cache_anyone_else_could_write_is_refused_and_the_plugin_recompiled() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::with_config(&format!(
        "[plugins]\ndir = {:?}\ncache_dir = \"cache\"\n[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\n",
        plugins_dir()
    ));
    env.run(&["check"]).assert_success();
    let dir = env.path().join("cache");
    let mode =
        |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the cache folder is private");
    let cached = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(mode(&cached), 0o600);
    let name = cached.file_name().unwrap().to_string_lossy().into_owned();

    // A world-writable artifact: someone else could have put native code there.
    std::fs::set_permissions(&cached, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = env.run(&["check"]);
    out.assert_success();
    assert!(
        out.stderr.contains("not trusting")
            && out.stderr.contains(&name)
            && out.stderr.contains("writable"),
        "{}",
        out.stderr
    );
    assert_eq!(mode(&cached), 0o600, "recompiled and written afresh");

    // A symlink planted in its place is refused, not followed, and replaced.
    let elsewhere = env.path().join("elsewhere.cwasm");
    std::fs::copy(&cached, &elsewhere).unwrap();
    std::fs::remove_file(&cached).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &cached).unwrap();
    let out = env.run(&["check"]);
    out.assert_success();
    assert!(
        out.stderr.contains("not trusting") && out.stderr.contains(&name),
        "{}",
        out.stderr
    );
    assert!(
        std::fs::symlink_metadata(&cached).unwrap().is_file(),
        "the link was replaced"
    );

    // A cache folder others can write is not used at all; the plugins still load.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = env.run(&["check"]);
    out.assert_success();
    assert!(
        out.stderr.contains("cache folder is writable"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_plugin_file_over_max_plugin_size_is_refused_before_it_is_compiled() {
    let env = Env::with_config(&format!(
        "[plugins]\ndir = {:?}\ncache_dir = \"cache\"\nmax_plugin_size = \"10KiB\"\n[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\ntopics = [\"t\"]\n",
        plugins_dir()
    ));
    let out = env.run(&["check"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("noop.wasm")
            && out
                .stderr
                .contains("over [plugins] max_plugin_size (10240 bytes)"),
        "{}",
        out.stderr
    );
    assert!(!env.path().join("cache").exists(), "nothing was compiled");
}
