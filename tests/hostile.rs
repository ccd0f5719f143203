//! Plugins that trap, spin, hog memory, implement the wrong world or probe the
//! sandbox: the consumer survives, moves on, and records why.

mod common;

use common::{Env, scripted_with_sink};

/// A hostile processor on `hostile` with one attempt, next to `scripted` + `sink`.
fn env_with_hostile(plugin: &str, extra: &str) -> Env {
    Env::new(&format!(
        "[[processor]]\nname = \"hostile\"\nplugin = \"{plugin}\"\ntopics = [\"hostile\"]\nmax_attempts = 1\n{extra}\n\n{}",
        scripted_with_sink("")
    ))
}

/// Sends one hostile message, then one good one, consumes until `limit` (e.g.
/// `["--message-limit", "2"]`), and checks the good one was processed; returns the
/// hostile message's id and the consumer's output.
fn hostile_then_good(env: &Env, limit: [&str; 2]) -> (String, common::Output) {
    let bad = env.send("hostile", "bad", &[], &[]);
    env.send("test.scripted", "good", &[("x-send", "test.out")], &[]);
    let out = env.run(&["consume", "--queue", "default", limit[0], limit[1], "-v"]);
    out.assert_success();
    let sink = env.sink();
    assert_eq!(
        sink.len(),
        1,
        "the good message after the hostile one was processed:\n{}",
        out.stderr
    );
    assert_eq!(sink[0]["body"], "good");
    (bad[0].clone(), out)
}

/// [`hostile_then_good`], and the hostile message was dead-lettered: returns the
/// reason and the consumer's output.
fn survive(env: &Env) -> (String, common::Output) {
    let (bad, out) = hostile_then_good(env, ["--message-limit", "2"]);
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1, "{}", out.stderr);
    assert_eq!(dead[0].0, bad);
    assert!(
        out.stderr.contains("plugin=hostile") || out.stderr.contains("plugin=\"hostile\""),
        "{}",
        out.stderr
    );
    (dead[0].2.clone(), out)
}

#[test]
fn a_trapping_plugin_is_dead_lettered_with_its_panic_message() {
    let env = env_with_hostile("trap.wasm", "");
    let (reason, _) = survive(&env);
    assert!(reason.starts_with("trap:"), "{reason}");
    assert!(
        reason.contains("trap plugin panics on purpose"),
        "the panic message is quoted: {reason}"
    );
}

#[test]
fn a_spinning_plugin_times_out_within_twice_its_timeout() {
    let env = env_with_hostile("spin.wasm", "timeout = \"1s\"");
    let (reason, out) = survive(&env);
    assert!(reason.starts_with("timeout:"), "{reason}");
    let duration_ms = common::duration_ms(out.log_line("processed processor=hostile"));
    assert!(
        (1000.0..2000.0).contains(&duration_ms),
        "timeout fired after {duration_ms} ms for a 1 s limit"
    );
}

#[test]
fn a_memory_hog_hits_its_memory_limit() {
    let env = env_with_hostile("hog.wasm", "memory_limit = \"16MiB\"");
    let (reason, _) = survive(&env);
    assert!(reason.starts_with("memory:"), "{reason}");
    assert!(reason.contains(&(16u64 << 20).to_string()), "{reason}");
}

#[test]
fn a_plugin_of_the_wrong_world_leaves_its_messages_waiting_and_check_names_it() {
    let env = env_with_hostile("wrong-world.wasm", "");
    // Its message is never claimed, so the consumer runs until a time limit.
    let (_, out) = hostile_then_good(&env, ["--time-limit", "2s"]);
    assert!(
        out.stderr
            .contains("does not implement world wasmq:plugin/processor"),
        "{}",
        out.stderr
    );
    // The plugin is the host's problem, not the message's: it waits, unclaimed,
    // its attempts intact, until a consumer can run it.
    assert!(env.dead_letters().is_empty(), "{}", out.stderr);
    let (attempt, claimed): (i64, Option<String>) = env.sql(|conn| {
        conn.query_row(
            "SELECT attempt, claimed_by FROM wasmq_messages WHERE processor = 'hostile'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    });
    assert_eq!((attempt, claimed), (0, None), "{}", out.stderr);

    let check = env.run(&["check"]);
    check.assert_failure();
    assert!(
        check.stderr.contains("wrong-world.wasm")
            && check.stderr.contains("does not implement world"),
        "{}",
        check.stderr
    );
}

#[test]
fn a_plugin_cannot_open_files_read_the_environment_or_connect() {
    let env = Env::new(
        "[[processor]]\nname = \"sandbox\"\nplugin = \"sandbox.wasm\"\n\n\
         [[processor]]\nname = \"report\"\nplugin = \"noop.wasm\"\ntopics = [\"sandbox.report\"]\nqueue = \"sink\"\n",
    );
    env.send("sandbox.probe", "", &[], &[]);
    let mut command = env.command(&["consume", "--queue", "default", "--message-limit", "1"]);
    command.env("WASMQ_SECRET", "hunter2");
    env.spawn_command(command).wait().assert_success();
    let reports = env.sink();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    for probe in ["read_file", "create_file", "read_dir", "tcp"] {
        let result = r[probe].as_str().unwrap_or_default();
        assert!(
            result.starts_with("denied"),
            "{probe}: {result} (report {r})"
        );
    }
    assert!(r["env_secret"].is_null(), "{r}");
    assert_eq!(r["env_count"], 0, "{r}");
}

#[test]
fn producer_and_plugin_text_reaches_logs_and_terminals_escaped() {
    let env = Env::new(&scripted_with_sink("max_attempts = 1"));
    // A producer's header and body, and what the plugin writes and logs, carry a
    // terminal escape and line breaks that would forge a log line.
    let forged = "\x1b[2J\nFAKE ERROR forged line";
    let ids = env.send(
        "test.scripted",
        "body\x1b[31m\nsecond line",
        &[("evil", forged), ("x-say", forged), ("x-trap", "yes")],
        &[],
    );
    let out = env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "1",
        "-v",
    ]);
    out.assert_success();
    let log = &out.stderr;
    assert!(!log.contains('\x1b'), "a raw ESC in the log:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FAKE")),
        "a forged log line:\n{log}"
    );
    assert!(log.contains("\\x1b[2J\\nFAKE ERROR"), "{log}");
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].2.contains("FAKE ERROR") && !dead[0].2.contains(['\x1b', '\n', '\r']),
        "the trap's reason quotes stderr on one line, escaped: {:?}",
        dead[0].2
    );

    let show = env.run(&["dead-letter", "show", &ids[0]]);
    show.assert_success();
    assert!(!show.stdout.contains('\x1b'), "{}", show.stdout);
    assert!(
        show.stdout
            .contains("header:       evil=\\x1b[2J\\nFAKE ERROR forged line")
            && show.stdout.contains("body\\x1b[31m\\nsecond line"),
        "{}",
        show.stdout
    );
    let list = env.run(&["dead-letter", "list"]);
    assert!(!list.stdout.contains('\x1b'), "{}", list.stdout);
    // --raw keeps the body byte for byte, for those who need it.
    let raw = env.run(&["dead-letter", "show", &ids[0], "--raw"]);
    raw.assert_success();
    assert_eq!(raw.stdout, "body\x1b[31m\nsecond line");
}

/// A processor component written by hand, so a test can give it a shape no Rust
/// guest has: `extra` is spliced in at component level (more core modules and
/// instances), its start function spins `start_spins` rounds and `process` spins
/// `process_spins` rounds before answering ACK. Its `subscribed-topics` declares
/// nothing, so the config names its topics.
fn shaped_processor(extra: &str, start_spins: u64, process_spins: u64) -> Vec<u8> {
    let text = shaped_text(extra, start_spins, process_spins);
    wat::parse_str(&text).unwrap_or_else(|e| panic!("the fixture does not parse: {e}"))
}

/// How [`shaped_processor`] answers `subscribed-topics`: an empty list.
const TOPICS_ANSWER: &str = r#"(func (export "subscribed-topics") (result i32) (i32.const 8))"#;

/// The text of [`shaped_processor`].
fn shaped_text(extra: &str, start_spins: u64, process_spins: u64) -> String {
    format!(
        r#"(component
  (core module $main
    (memory (export "memory") 1)
    (data (i32.const 8) "\00\00\00\00\00\00\00\00")
    (func $spin (param $n i64)
      (block $done (loop $again
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $again))))
    (func $start (call $spin (i64.const {start_spins})))
    (start $start)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    {TOPICS_ANSWER}
    (func (export "process")
      (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i64) (result i32)
      (call $spin (i64.const {process_spins}))
      (i32.const 0)))
  (core instance $main (instantiate $main))
  {extra}
  (type $priority' (enum "very-low" "low" "normal" "high" "very-high"))
  (type $status' (enum "ack" "reject" "requeue"))
  (export $priority "priority" (type $priority'))
  (export $status "status" (type $status'))
  (type $message' (record (field "id" string) (field "topic" string)
    (field "body" (list u8)) (field "headers" (list (tuple string string)))
    (field "priority" $priority) (field "redelivered" bool) (field "attempt" u32)
    (field "published-at-ms" u64)))
  (export $message "message" (type $message'))
  (func $topics (result (list string))
    (canon lift (core func $main "subscribed-topics")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))
  (func $process (param "msg" $message) (result $status)
    (canon lift (core func $main "process")
      (memory (core memory $main "memory")) (realloc (core func $main "realloc"))))
  (instance $handler
    (export "message" (type $message))
    (export "status" (type $status))
    (export "subscribed-topics" (func $topics))
    (export "process" (func $process)))
  (export "wasmq:plugin/handler@0.1.0" (instance $handler)))"#
    )
}

/// `count` core instances of a module with one memory of `pages` 64 KiB pages.
fn memories(count: usize, pages: u32) -> String {
    format!("(core module $mem (memory {pages}))")
        + &"(core instance (instantiate $mem))".repeat(count)
}

/// `env_with_hostile` for a [`shaped_processor`] written into the test's folder.
fn env_with_shaped(wasm: &[u8], extra: &str) -> Env {
    let env = env_with_hostile("SHAPED", extra);
    place_shaped(&env, wasm);
    env
}

/// Writes `wasm` into the test's folder as the plugin the config calls "SHAPED".
fn place_shaped(env: &Env, wasm: &[u8]) {
    let plugin = env.path().join("shaped.wasm");
    std::fs::write(&plugin, wasm).expect("writing the fixture");
    let config_path = env.path().join("wasmq.toml");
    let config = std::fs::read_to_string(&config_path).expect("reading wasmq.toml");
    let config = config.replace("\"SHAPED\"", &format!("{plugin:?}"));
    std::fs::write(&config_path, config).expect("writing wasmq.toml");
}

/// A plugin refused at load: its message waits, unclaimed; the good one is processed;
/// `check` names the plugin and `needle`.
fn refused_at_load(env: &Env, needle: &str) {
    let (_, out) = hostile_then_good(env, ["--time-limit", "2s"]);
    assert!(
        out.stderr
            .contains("needs more than one plugin instance may hold")
            && out.stderr.contains(needle),
        "{}",
        out.stderr
    );
    assert!(env.dead_letters().is_empty(), "{}", out.stderr);
    assert_eq!(env.queue_bodies("default"), ["bad"], "{}", out.stderr);
    let check = env.run(&["check"]);
    check.assert_failure();
    assert!(
        check.stderr.contains("shaped.wasm") && check.stderr.contains(needle),
        "{}",
        check.stderr
    );
}

#[test]
fn a_component_with_many_memories_is_refused_and_the_others_keep_working() {
    let env = env_with_shaped(&shaped_processor(&memories(12, 1), 0, 0), "");
    refused_at_load(&env, "8 linear memories");
}

#[test]
fn a_component_with_many_core_instances_is_refused_and_the_others_keep_working() {
    let empty =
        "(core module $empty)".to_string() + &"(core instance (instantiate $empty))".repeat(200);
    let env = env_with_shaped(&shaped_processor(&empty, 0, 0), "");
    refused_at_load(&env, "64 core instances");
}

#[test]
fn memory_limit_caps_the_sum_of_a_components_memories() {
    // Three memories of 3 MiB: each fits 8 MiB, together they do not.
    let env = env_with_shaped(
        &shaped_processor(&memories(3, 48), 0, 0),
        "memory_limit = \"8MiB\"",
    );
    let (reason, _) = survive(&env);
    assert!(reason.starts_with("memory:"), "{reason}");
    assert!(reason.contains(&(8u64 << 20).to_string()), "{reason}");
}

#[test]
fn a_slow_start_function_and_process_share_one_deadline() {
    // Calibrate: spins that take about 800 ms in a start function, under a long
    // timeout, measured on one message.
    let mut spins: u64 = 20_000_000;
    let per_ms = loop {
        let env = env_with_shaped(&shaped_processor("", spins, 0), "timeout = \"60s\"");
        env.send("hostile", "calibrate", &[], &[]);
        let out = env.consume("default", 1, &[]);
        out.assert_success();
        let took = common::duration_ms(out.log_line("processed processor=hostile"));
        if took >= 200.0 {
            break spins as f64 / took;
        }
        spins *= 4;
    };
    let spins = (per_ms * 800.0) as u64;
    // 800 ms starting, then 800 ms processing: each fits a 1 s timeout on its own.
    let env = env_with_shaped(&shaped_processor("", spins, spins), "timeout = \"1s\"");
    let (reason, out) = survive(&env);
    assert!(reason.starts_with("timeout:"), "{reason}");
    let took = common::duration_ms(out.log_line("processed processor=hostile"));
    assert!(
        (1000.0..1800.0).contains(&took),
        "one 1 s deadline for start and process ended after {took} ms"
    );
}

#[test]
fn wasmq_send_waits_for_a_spinning_subscribed_topics_at_most_once_per_build() {
    let spinning = shaped_text("", 0, 0).replace(
        TOPICS_ANSWER,
        r#"(func (export "subscribed-topics") (result i32) (loop $forever (br $forever)) (i32.const 8))"#,
    );
    let env = Env::new(&format!(
        "[[processor]]\nname = \"spinner\"\nplugin = \"SHAPED\"\ntimeout = \"3s\"\n\n{}",
        scripted_with_sink("")
    ));
    place_shaped(
        &env,
        &wat::parse_str(&spinning).expect("the fixture parses"),
    );
    // No consumer has loaded this build: the first send asks it, within its timeout.
    let first = env.run(&["send", "test.scripted", "one"]);
    first.assert_success();
    assert!(
        first.stderr.contains("spinner") && first.stderr.contains("timeout"),
        "{}",
        first.stderr
    );
    // The failure is recorded: later sends route without running its code.
    let second = env.run(&["send", "test.scripted", "two"]);
    second.assert_success();
    assert!(!second.stderr.contains("timeout"), "{}", second.stderr);
    assert!(
        second.elapsed < std::time::Duration::from_secs(3),
        "the second send waited {:?} for the spinning plugin",
        second.elapsed
    );
    assert_eq!(env.queue_bodies("default"), ["one", "two"]);
}
