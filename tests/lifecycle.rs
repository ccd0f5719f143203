//! Stopping: signals, kills, and the consumer's limits.

mod common;

use std::time::Duration;

use common::{Env, scripted_with_sink};

/// Waits until the consumer has claimed a message (the queue row is marked).
fn wait_until_claimed(env: &Env, consumer: &common::Running) {
    common::wait_until(
        "the consumer claimed the message",
        Duration::from_secs(30),
        || consumer.stderr(),
        || env.claimed() > 0,
    );
}

/// True once the process catches SIGTERM (its handler is installed): bit 15 of
/// `SigCgt` in /proc/PID/status.
fn catches_sigterm(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

#[test]
fn a_sigterm_during_start_up_stops_the_consumer_before_any_claim() {
    let env = Env::new(&scripted_with_sink(""));
    env.send("test.scripted", "waiting", &[], &[]);
    // Another process holds the store's lock: the consumer's start-up waits on it.
    let lock = rusqlite::Connection::open(env.db_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let consumer = env.spawn(&["consume", "--queue", "default", "-v"]);
    common::wait_until(
        "the starting consumer catches SIGTERM (its handler must be installed before start-up work)",
        Duration::from_secs(5),
        || consumer.stderr(),
        || catches_sigterm(consumer.pid()),
    );
    consumer.signal(libc::SIGTERM);
    lock.execute_batch("COMMIT").unwrap();
    drop(lock);
    let out = consumer.wait();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let attempt: i64 = env.sql(|conn| {
        conn.query_row(
            "SELECT attempt FROM wasmq_messages WHERE queue = 'default'",
            [],
            |r| r.get(0),
        )
    });
    assert_eq!(attempt, 0, "nothing was claimed:\n{}", out.stderr);
}

#[test]
fn sigterm_lets_the_message_in_flight_finish_and_exits_zero() {
    let env = Env::new(&scripted_with_sink(""));
    env.send(
        "test.scripted",
        "slow",
        &[("x-sleep-ms", "1500"), ("x-send", "test.out")],
        &[],
    );
    let consumer = env.spawn(&["consume", "--queue", "default", "-v"]);
    wait_until_claimed(&env, &consumer);
    consumer.signal(libc::SIGTERM);
    let out = consumer.wait();
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(
        env.queue_bodies("default").is_empty(),
        "the slow message was settled:\n{}",
        out.stderr
    );
    assert_eq!(env.sink().len(), 1, "and what it sent was committed");
}

#[test]
fn sigkill_mid_message_redelivers_it_to_the_next_consumer() {
    let env = Env::new(&format!(
        "[consumer]\nheartbeat_timeout = \"1s\"\n\n{}",
        scripted_with_sink("")
    ));
    env.send(
        "test.scripted",
        "killed",
        &[("x-sleep-ms", "1500"), ("x-send", "test.out")],
        &[],
    );
    let first = env.spawn(&["consume", "--queue", "default"]);
    wait_until_claimed(&env, &first);
    first.signal(libc::SIGKILL);
    let out = first.wait();
    assert!(!out.status.success());
    assert!(
        env.sink().is_empty(),
        "the killed attempt committed nothing"
    );

    env.run(&["consume", "--queue", "default", "--message-limit", "1"])
        .assert_success();
    let sink = env.sink();
    assert_eq!(sink.len(), 1);
    assert_eq!(sink[0]["attempt"], 2);
    assert_eq!(sink[0]["redelivered"], true);
}

#[test]
fn time_limit_stops_an_idle_consumer_in_both_forms() {
    let env = Env::new(&scripted_with_sink(""));
    for limit in ["1s", "now+1s"] {
        let out = env.run(&["consume", "--time-limit", limit]);
        out.assert_success();
        assert!(
            out.elapsed >= Duration::from_millis(900) && out.elapsed < Duration::from_secs(10),
            "{limit}: {:?}",
            out.elapsed
        );
    }
    let bad = env.run(&["consume", "--time-limit", "soonish"]);
    bad.assert_failure();
    assert!(bad.stderr.contains("\"soonish\""), "{}", bad.stderr);
}

#[test]
fn memory_limit_stops_the_consumer_without_losing_messages() {
    let env = Env::new(&scripted_with_sink(""));
    env.send("test.scripted", "waiting", &[], &[]);
    let out = env.run(&["consume", "--memory-limit", "1", "-v"]);
    out.assert_success();
    assert!(
        out.stderr.contains("memory limit reached"),
        "{}",
        out.stderr
    );
    assert_eq!(
        env.queue_bodies("default"),
        ["waiting"],
        "nothing was claimed past the limit"
    );
}

#[test]
fn an_idle_consumer_picks_up_a_message_sent_by_another_process() {
    let env = Env::new(&scripted_with_sink(""));
    let consumer = env.spawn(&["consume", "--queue", "default", "--message-limit", "1"]);
    // Let it go idle first: it must notice the send from this other process by itself.
    std::thread::sleep(Duration::from_millis(500));
    env.send("test.scripted", "late", &[("x-send", "test.out")], &[]);
    let out = consumer.wait();
    out.assert_success();
    assert_eq!(env.sink().len(), 1, "{}", out.stderr);
}
