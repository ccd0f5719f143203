//! Per-processor limits seen from outside: what a send may carry and how much a
//! processor may send and print.

mod common;

use common::{Env, duration_ms, scripted_with_sink};

/// `scripted` next to `small`, a processor on `big.topic` with the smallest memory.
fn env_with_small_receiver(scripted_extra: &str) -> Env {
    Env::new(&format!(
        "{}\n[[processor]]\nname = \"small\"\nplugin = \"noop.wasm\"\ntopics = [\"big.topic\"]\nqueue = \"small\"\nmemory_limit = \"1MiB\"\n\n\
         [[processor]]\nname = \"roomy\"\nplugin = \"noop.wasm\"\ntopics = [\"big.topic\"]\nqueue = \"small\"\n",
        scripted_with_sink(scripted_extra)
    ))
}

/// Writes `len` bytes of body into the test's folder; returns the path argument.
fn body_file(env: &Env, len: usize) -> String {
    let path = env.path().join("body.bin");
    std::fs::write(&path, vec![b'x'; len]).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn wasmq_send_refuses_a_body_larger_than_a_receivers_memory_limit() {
    let env = env_with_small_receiver("");
    let file = body_file(&env, (1 << 20) + 1);
    let out = env.run(&["send", "big.topic", "--body-file", &file]);
    out.assert_failure();
    assert!(
        out.stderr.contains("body of 1048577 bytes")
            && out.stderr.contains("processor \"small\"")
            && out.stderr.contains("(1048576 bytes)")
            && out.stderr.contains("memory_limit"),
        "{}",
        out.stderr
    );
    assert!(
        env.queue_bodies("small").is_empty(),
        "no delivery is stored, not even for the roomy subscriber"
    );

    // At the limit it fits, and both subscribers get it.
    let file = body_file(&env, 1 << 20);
    let out = env.run(&["send", "big.topic", "--body-file", &file]);
    out.assert_success();
    assert_eq!(env.queue_bodies("small").len(), 2);
}

#[test]
fn a_plugin_send_too_large_for_its_receiver_is_invalid() {
    let env = env_with_small_receiver("max_attempts = 1");
    // The echo `scripted` sends carries this body, plus a little JSON.
    let file = body_file(&env, 1 << 20);
    let out = env.run(&[
        "send",
        "test.scripted",
        "--body-file",
        &file,
        "--header",
        "x-send=big.topic",
    ]);
    out.assert_success();
    let out = env.consume("default", 1, &[]);
    out.assert_success();
    let refusal = out.log_line("send to big.topic failed");
    assert!(
        refusal.contains("Invalid")
            && refusal.contains("processor \\\"small\\\"")
            && refusal.contains("(1048576 bytes)"),
        "{refusal}"
    );
    assert!(env.queue_bodies("small").is_empty());
}

#[test]
fn the_sends_of_one_call_are_capped_at_max_send_bytes() {
    let env = Env::new(&scripted_with_sink(
        "max_send_bytes = \"16KiB\"\nmax_attempts = 1",
    ));
    // Each echo carries the 6000-byte body plus ~150 bytes of JSON: two fit in
    // 16 KiB, three do not.
    let body = "x".repeat(6000);
    env.send(
        "test.scripted",
        &body,
        &[("x-send", "test.out"), ("x-send-count", "2")],
        &[],
    );
    let over = env.send(
        "test.scripted",
        &body,
        &[("x-send", "test.out"), ("x-send-count", "3")],
        &[],
    );
    let out = env.consume("default", 2, &[]);
    out.assert_success();
    assert_eq!(
        env.sink().len(),
        2,
        "the first message's two sends are stored, none of the second's:\n{}",
        out.stderr
    );
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1, "{}", out.stderr);
    assert_eq!(dead[0].0, over[0]);
    let refusal = out.log_line("send to test.out failed");
    assert!(
        refusal.contains("Invalid")
            && refusal.contains("max_send_bytes = 16384 of processor \\\"scripted\\\""),
        "{refusal}"
    );
}

#[test]
fn a_plugin_printing_megabytes_logs_up_to_max_output_bytes_and_one_warning() {
    let env = Env::new(&scripted_with_sink("max_output_bytes = \"16KiB\""));
    let printed = 8_000_000;
    env.send(
        "test.scripted",
        "loud",
        &[
            ("x-print-bytes", &printed.to_string()),
            ("x-send", "test.out"),
        ],
        &[],
    );
    let out = env.consume("default", 1, &[]);
    out.assert_success();
    assert_eq!(env.sink().len(), 1, "the message is acknowledged");
    // 16 KiB of plugin text, plus each line's timestamp and fields, plus the
    // consumer's own few lines.
    assert!(
        out.stderr.len() < (16 << 10) + (8 << 10),
        "the log holds {} bytes",
        out.stderr.len()
    );
    let warning = out.log_line("dropped_bytes=");
    assert_eq!(
        out.stderr.matches("dropped_bytes=").count(),
        1,
        "one warning"
    );
    assert!(
        warning.contains("WARN") && warning.contains("`max_output_bytes`"),
        "{warning}"
    );
    let dropped: u64 = warning
        .split("dropped_bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no dropped byte count in {warning:?}"));
    assert!(
        (printed - (16 << 10)..=printed).contains(&dropped),
        "dropped {dropped} of {printed} bytes"
    );
}

/// `x-work` rounds that take about `target_ms` of one call's own time, measured on
/// a message processed alone (the figure depends on the machine and the build).
fn calibrate_work(env: &Env, target_ms: f64) -> u64 {
    let mut rounds: u64 = 10_000_000;
    loop {
        env.send(
            "test.scripted",
            "calibrate",
            &[("x-work", &rounds.to_string())],
            &[],
        );
        let out = env.consume("default", 1, &[]);
        out.assert_success();
        let took = duration_ms(out.log_line("processed processor=scripted"));
        // Long enough that instantiation and logging are noise next to the work.
        if took >= 100.0 {
            return (rounds as f64 * target_ms / took) as u64;
        }
        rounds *= 4;
    }
}

#[test]
fn timeout_counts_a_calls_own_time_not_its_neighbours_turns() {
    let env = Env::new(&scripted_with_sink("timeout = \"1s\"\nmax_attempts = 1"));
    let rounds = calibrate_work(&env, 400.0).to_string();
    for n in 0..4 {
        env.send(
            "test.scripted",
            &format!("heavy {n}"),
            &[("x-work", &rounds), ("x-send", "test.out")],
            &[],
        );
    }
    // One thread: the four calls take turns, each yielding at every epoch tick.
    let out = env.consume("default", 4, &["--concurrency", "4", "--threads", "1"]);
    out.assert_success();
    assert!(env.dead_letters().is_empty(), "{}", out.stderr);
    assert_eq!(
        env.sink().len(),
        4,
        "all four acknowledged:\n{}",
        out.stderr
    );
    let durations: Vec<f64> = out
        .stderr
        .lines()
        .filter(|l| l.contains("processed processor=scripted"))
        .map(duration_ms)
        .collect();
    assert!(
        durations.iter().any(|&ms| ms > 1000.0),
        "the calls interleaved past 1 s of wall time, which wall-time accounting would have failed: {durations:?} ms"
    );
}

#[test]
fn a_plugin_sleeping_in_a_host_call_past_its_timeout_times_out() {
    let env = Env::new(&scripted_with_sink("timeout = \"1s\"\nmax_attempts = 1"));
    env.send("test.scripted", "sleepy", &[("x-sleep-ms", "5000")], &[]);
    let out = env.consume("default", 1, &[]);
    out.assert_success();
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1, "{}", out.stderr);
    assert!(dead[0].2.starts_with("timeout:"), "{}", dead[0].2);
    let took = duration_ms(out.log_line("processed processor=scripted"));
    assert!(
        (1000.0..2000.0).contains(&took),
        "a 5 s sleep under a 1 s timeout ended after {took} ms"
    );
}

#[test]
fn topic_names_and_headers_outside_their_limits_are_refused_by_name() {
    let env = Env::new(&scripted_with_sink(""));
    let out = env.run(&["send", "no spaces!", "x"]);
    out.assert_failure();
    assert!(
        out.stderr.contains("\"no spaces!\" contains ' '") && out.stderr.contains("A-Z, a-z, 0-9"),
        "{}",
        out.stderr
    );
    let big = format!("big={}", "v".repeat(8193));
    let out = env.run(&["send", "test.scripted", "x", "--header", &big]);
    out.assert_failure();
    assert!(
        out.stderr
            .contains("header \"big\" has a value of 8193 bytes"),
        "{}",
        out.stderr
    );
    assert!(env.queue_bodies("default").is_empty(), "nothing was stored");

    let bad_config = Env::new(
        "[[processor]]\nname = \"p\"\nplugin = \"noop.wasm\"\ntopics = [\"ok.topic\", \"not ok\"]\n",
    );
    let check = bad_config.run(&["check"]);
    check.assert_failure();
    assert!(
        check.stderr.contains("[[processor]] \"p\"")
            && check.stderr.contains("\"not ok\" contains ' '"),
        "{}",
        check.stderr
    );
}

#[test]
fn a_plugin_sends_only_within_send_topics_and_cannot_forge_its_sender() {
    let env = Env::new(&format!(
        "{}\n[[processor]]\nname = \"other\"\nplugin = \"noop.wasm\"\ntopics = [\"test.other\"]\nqueue = \"sink\"\n",
        scripted_with_sink("send_topics = [\"test.o*t\"]\nmax_attempts = 1")
    ));
    // Inside the list, and pretending to be someone else.
    env.send(
        "test.scripted",
        "allowed",
        &[
            ("x-send", "test.out"),
            ("x-send-header", "X-Wasmq-Sender=admin"),
        ],
        &[],
    );
    // Outside it.
    env.send("test.scripted", "refused", &[("x-send", "test.other")], &[]);
    let out = env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "2",
        "-v",
    ]);
    out.assert_success();
    assert!(
        out.stderr.contains("not in send_topics") && out.stderr.contains("test.other"),
        "{}",
        out.stderr
    );
    let headers: Vec<String> = env.sql(|conn| {
        conn.prepare("SELECT headers FROM wasmq_messages WHERE queue = 'sink'")?
            .query_map([], |r| r.get(0))?
            .collect()
    });
    assert_eq!(
        headers,
        [r#"[["x-wasmq-sender","scripted"]]"#],
        "one send stored, stamped by the host with the real sender"
    );
}

#[test]
fn a_plugin_cannot_subscribe_itself_to_a_topic_the_config_gives_another() {
    // `scripted` declares test.scripted itself; the config gives it to `owner`.
    let env = Env::new(
        "[[processor]]\nname = \"scripted\"\nplugin = \"scripted.wasm\"\n\n\
         [[processor]]\nname = \"owner\"\nplugin = \"noop.wasm\"\ntopics = [\"test.scripted\"]\nqueue = \"owner\"\n",
    );
    let check = env.run(&["check"]);
    check.assert_failure();
    assert!(
        check
            .stderr
            .contains("subscribes itself to topic \"test.scripted\"")
            && check.stderr.contains("processor \"owner\""),
        "{}",
        check.stderr
    );
    let ids = env.send("test.scripted", "x", &[], &[]);
    assert_eq!(ids.len(), 1, "only the owner gets a delivery");
    assert_eq!(env.queue_bodies("owner"), ["x"]);
}
