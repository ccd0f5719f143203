//! Delivery semantics end to end: volume, priority, delay, retry, dead letters,
//! send-on-ACK, unroutable topics.

mod common;

use std::time::Duration;

use common::backend::backends;
use common::{Backend, Env, scripted_with_sink};

#[test]
fn a_thousand_messages_are_consumed_and_every_plugin_send_is_stored() {
    let env = Env::new(
        "[[processor]]\nname = \"indexer\"\nplugin = \"indexer.wasm\"\n[processor.config]\nindex = \"products\"\n\n\
         [[processor]]\nname = \"indexed\"\nplugin = \"noop.wasm\"\ntopics = [\"search.indexed\"]\nqueue = \"indexed\"\n",
    );
    // One send through the CLI proves the path; the other 999 are written the way a
    // foreign SQL producer would, so the test does not spend its time starting processes.
    env.send(
        "search.index-entities",
        r#"{"entity":"product","ids":[0]}"#,
        &[],
        &[],
    );
    env.sql(|conn| {
        conn.execute_batch("BEGIN")?;
        for i in 1..1000 {
            conn.execute(
                "INSERT INTO wasmq_messages (queue, processor, topic, body, published_at, available_at)
                 VALUES ('default', 'indexer', 'search.index-entities', ?, 0, 0)",
                [format!(r#"{{"entity":"product","ids":[{i}]}}"#).into_bytes()],
            )?;
        }
        conn.execute_batch("COMMIT")
    });
    env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "1000",
        "--concurrency",
        "2",
    ])
    .assert_success();

    assert!(
        env.queue_bodies("default").is_empty(),
        "every input message is settled"
    );
    let mut ids: Vec<u64> = env
        .queue_bodies("indexed")
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            assert_eq!(v["index"], "products", "the plugin read its config value");
            v["id"].as_u64().unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..1000).collect::<Vec<_>>(),
        "one send per input, none lost or doubled"
    );
}

#[test]
fn higher_priorities_are_delivered_first_then_oldest() {
    for backend in backends() {
        priorities(backend);
    }
}

fn priorities(backend: Backend) {
    let env = Env::on(backend, &scripted_with_sink(""));
    for (body, priority) in [
        ("low", "low"),
        ("vh", "very-high"),
        ("n1", "normal"),
        ("h", "high"),
        ("vl", "very-low"),
        ("n2", "normal"),
    ] {
        env.send(
            "test.scripted",
            body,
            &[("x-send", "test.out")],
            &["--priority", priority],
        );
    }
    // One at a time: with several in flight, commit order is completion order.
    env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "6",
        "--concurrency",
        "1",
    ])
    .assert_success();
    let order: Vec<String> = env
        .sink()
        .iter()
        .map(|v| v["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["vh", "h", "n1", "n2", "low", "vl"], "{backend:?}");
}

#[test]
fn a_delayed_message_is_not_delivered_early() {
    for backend in backends() {
        delayed(backend);
    }
}

fn delayed(backend: Backend) {
    let env = Env::on(backend, &scripted_with_sink(""));
    let sent_at = common::now_ms();
    env.send(
        "test.scripted",
        "later",
        &[("x-send", "test.out")],
        &["--delay", "2s"],
    );
    env.run(&["consume", "--queue", "default", "--time-limit", "1s"])
        .assert_success();
    assert!(env.sink().is_empty(), "delivered before its delay");
    let waiting = env.scalar("SELECT COUNT(*) FROM wasmq_delayed");
    assert_eq!(waiting, 1, "{backend:?}: it waits in wasmq_delayed");

    env.run(&["consume", "--queue", "default", "--message-limit", "1"])
        .assert_success();
    assert_eq!(env.sink().len(), 1);
    // The echo is stored when the delayed message is acknowledged.
    let echoed_at = env.scalar("SELECT published_at FROM wasmq_messages WHERE queue = 'sink'");
    assert!(
        echoed_at - sent_at >= 2000,
        "processed {} ms after the send",
        echoed_at - sent_at
    );
}

#[test]
fn requeue_backs_off_then_dead_letters_and_discards_its_sends() {
    for backend in backends() {
        requeue(backend);
    }
}

fn requeue(backend: Backend) {
    let env = Env::on(
        backend,
        &scripted_with_sink("max_attempts = 3\nretry_backoff = \"300ms\""),
    );
    env.send(
        "test.scripted",
        "again",
        &[("x-answer", "requeue"), ("x-send", "test.out")],
        &[],
    );
    let out = env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "3",
        "-v",
    ]);
    out.assert_success();

    assert!(
        env.sink().is_empty(),
        "sends of a requeued message must not be published"
    );
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1, "{}", out.stderr);
    assert_eq!(dead[0].1, 3, "dead-lettered on its third attempt");
    assert!(
        dead[0].2.contains("requeued by the processor"),
        "{}",
        dead[0].2
    );
    // Backoff: 300 ms before attempt 2, 600 ms before attempt 3.
    assert!(
        out.elapsed >= Duration::from_millis(900),
        "retried too early: {:?}",
        out.elapsed
    );
    for attempt in 1..=3 {
        assert!(
            out.stderr.contains(&format!("attempt {attempt}")),
            "attempt {attempt} missing:\n{}",
            out.stderr
        );
    }
}

#[test]
fn dead_letter_replay_delivers_the_message_again() {
    for backend in backends() {
        replay(backend);
    }
}

fn replay(backend: Backend) {
    let env = Env::on(backend, &scripted_with_sink(""));
    let ids = env.send("test.scripted", "rejected", &[("x-answer", "reject")], &[]);
    env.run(&["consume", "--queue", "default", "--message-limit", "1"])
        .assert_success();
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, ids[0]);
    assert!(dead[0].2.contains("rejected"), "{}", dead[0].2);

    let list = env.run(&["dead-letter", "list"]);
    list.assert_success();
    assert!(
        list.stdout.contains(&ids[0]) && list.stdout.contains("rejected by the processor"),
        "{}",
        list.stdout
    );
    let show = env.run(&["dead-letter", "show", &ids[0]]);
    assert!(
        show.stdout.contains("x-answer=reject") && show.stdout.contains("rejected"),
        "{}",
        show.stdout
    );

    env.run(&["dead-letter", "replay", &ids[0]])
        .assert_success();
    assert!(env.dead_letters().is_empty());
    let again = env.run(&[
        "consume",
        "--queue",
        "default",
        "--message-limit",
        "1",
        "-v",
    ]);
    again.assert_success();
    assert!(
        again
            .stderr
            .contains(&format!("processing {} attempt 1", ids[0])),
        "the replayed message keeps its id and starts again at attempt 1:\n{}",
        again.stderr
    );

    let missing = env.run(&["dead-letter", "replay", "999999"]);
    missing.assert_failure();
    assert!(
        missing.stderr.contains("\"999999\"") && missing.stderr.contains("dead-letter list"),
        "{}",
        missing.stderr
    );
    env.run(&["dead-letter", "purge"]).assert_success();
}

#[test]
fn sending_to_an_unrouted_topic_fails_with_a_named_error() {
    let env = Env::new(&scripted_with_sink(""));
    let out = env.run(&["send", "no.such.topic", "x"]);
    out.assert_failure();
    assert!(out.stderr.contains("\"no.such.topic\""), "{}", out.stderr);
    assert!(
        out.stderr.contains("known topics: test.out, test.scripted"),
        "{}",
        out.stderr
    );

    let dropping = Env::new(&format!(
        "[producer]\non_unroutable = \"drop\"\n\n{}",
        scripted_with_sink("")
    ));
    let out = dropping.run(&["send", "no.such.topic", "x"]);
    out.assert_success();
    assert!(
        out.stdout.is_empty() && out.stderr.contains("dropped"),
        "{out:?}"
    );
}

#[test]
fn a_send_prints_one_id_per_subscribed_processor_and_reads_stdin() {
    let env = Env::new(
        "[[processor]]\nname = \"a\"\nplugin = \"noop.wasm\"\ntopics = [\"t\"]\n\n\
         [[processor]]\nname = \"b\"\nplugin = \"noop.wasm\"\ntopics = [\"t\"]\nqueue = \"other\"\n",
    );
    let mut command = env.command(&["send", "t"]);
    command.stdin(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert_eq!(env.queue_bodies("default"), ["from stdin"]);
    assert_eq!(env.queue_bodies("other"), ["from stdin"]);
}

#[test]
fn each_message_gets_a_fresh_instance_unless_reuse_is_configured() {
    let calls = |env: &Env| -> Vec<u64> {
        env.sink()
            .iter()
            .map(|v| v["instance_calls"].as_u64().unwrap())
            .collect()
    };

    let fresh = Env::new(&scripted_with_sink(""));
    for i in 0..3 {
        fresh.send(
            "test.scripted",
            &i.to_string(),
            &[("x-send", "test.out")],
            &[],
        );
    }
    fresh
        .run(&["consume", "--queue", "default", "--message-limit", "3"])
        .assert_success();
    assert_eq!(
        calls(&fresh),
        [1, 1, 1],
        "no guest state survives from one message to the next"
    );

    let reused = Env::new(&scripted_with_sink("instance_reuse = 2\nmax_attempts = 1"));
    for i in 0..3 {
        reused.send(
            "test.scripted",
            &i.to_string(),
            &[("x-send", "test.out")],
            &[],
        );
    }
    // A trap throws its instance away: the next message starts on a new one.
    reused.send(
        "test.scripted",
        "trap",
        &[("x-send", "test.out"), ("x-trap", "yes")],
        &[],
    );
    reused.send("test.scripted", "after", &[("x-send", "test.out")], &[]);
    reused
        .run(&["consume", "--queue", "default", "--message-limit", "5"])
        .assert_success();
    assert_eq!(
        calls(&reused),
        [1, 2, 1, 1],
        "an instance serves at most 2 messages; the trap's send is discarded"
    );
    assert_eq!(reused.dead_letters().len(), 1);
}

#[test]
fn a_consumer_claims_only_its_processors_and_orphans_are_dead_lettered() {
    let env = Env::new(&format!(
        "[consumer]\nheartbeat_timeout = \"1s\"\norphan_timeout = \"2s\"\n\n{}",
        scripted_with_sink("")
    ));
    env.send("test.scripted", "known", &[], &[]);
    // As if written by a producer with a newer config, for a processor no consumer has.
    let now = common::now_ms();
    env.sql(|conn| {
        conn.execute(
            "INSERT INTO wasmq_messages (queue, processor, topic, body, published_at, available_at)
             VALUES ('default', 'ghost', 'test.ghost', X'00', ?1, ?1)",
            [now],
        )
    });
    env.run(&["consume", "--queue", "default", "--time-limit", "1s"])
        .assert_success();
    let (attempt, claimed): (i64, Option<String>) = env.sql(|conn| {
        conn.query_row(
            "SELECT attempt, claimed_by FROM wasmq_messages WHERE processor = 'ghost'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    });
    assert_eq!(
        (attempt, claimed),
        (0, None),
        "a consumer never claims a message for a processor it does not have"
    );
    assert_eq!(
        env.queue_bodies("default").len(),
        1,
        "the known message was processed, the other waits"
    );
    assert!(env.dead_letters().is_empty());

    // Once a consumer has seen `ghost` missing for orphan_timeout, it dead-letters it.
    let out = env.run(&["consume", "--queue", "default", "--time-limit", "4s"]);
    out.assert_success();
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1, "{}", out.stderr);
    assert!(
        dead[0].2.contains("no consumer has processor \"ghost\""),
        "{}",
        dead[0].2
    );
    assert!(env.queue_bodies("default").is_empty());
}

#[test]
fn wasmq_send_routes_by_recorded_topics_without_running_plugin_code() {
    let env = Env::new(
        "[[processor]]\nname = \"scripted\"\nplugin = \"scripted.wasm\"\n[processor.config]\nannounce_topics = \"yes\"\n",
    );
    let ran = "subscribed-topics ran";
    // This plugin build was never loaded: the first send asks it, and records.
    let first = env.run(&["send", "test.scripted", "one"]);
    first.assert_success();
    assert!(first.stderr.contains(ran), "{}", first.stderr);
    // From then on no plugin code runs for a send (a hostile plugin cannot slow it).
    let second = env.run(&["send", "test.scripted", "two"]);
    second.assert_success();
    assert!(!second.stderr.contains(ran), "{}", second.stderr);
    assert_eq!(
        second.stdout.lines().count(),
        1,
        "routed to the plugin's topic"
    );
    assert_eq!(env.queue_bodies("default"), ["one", "two"]);

    // A plugin that cannot be loaded does not stop sends to the others' topics.
    let broken = Env::new(&format!(
        "[[processor]]\nname = \"broken\"\nplugin = \"wrong-world.wasm\"\n\n{}",
        scripted_with_sink("")
    ));
    let out = broken.run(&["send", "test.scripted", "x"]);
    out.assert_success();
    assert!(out.stderr.contains("wrong-world.wasm"), "{}", out.stderr);
}

#[test]
fn a_message_an_application_inserts_is_delivered_only_if_its_transaction_commits() {
    for backend in backends() {
        outbox(backend);
    }
}

/// The producer contract of README ("Producing from your application"): a plain
/// INSERT inside the application's own transaction.
fn outbox(backend: Backend) {
    let env = Env::on(backend, &scripted_with_sink(""));
    // Opening the store creates the tables.
    env.run(&["dead-letter", "list"]).assert_success();
    let insert = |body: &str| {
        let body = match &env.server {
            Some(db) => db.body_literal(body),
            // A text body, as a careless application would write it, is read as bytes.
            None => format!("'{body}'"),
        };
        format!(
            "INSERT INTO wasmq_messages (queue, processor, topic, body, headers, priority, published_at, available_at)
             VALUES ('default', 'scripted', 'test.scripted', {body}, '[[\"x-send\",\"test.out\"]]', 2, 0, 0);"
        )
    };
    let script = format!(
        "BEGIN; {} ROLLBACK; BEGIN; {} COMMIT;",
        insert("rolled back"),
        insert("committed")
    );
    match &env.server {
        Some(db) => {
            db.run(&script);
        }
        None => env.sql(|conn| conn.execute_batch(&script)),
    }
    assert_only_committed_is_delivered(&env, backend);
}

#[test]
fn the_wasmq_send_routine_routes_inside_the_applications_transaction() {
    for backend in backends() {
        if backend != Backend::Sqlite {
            send_routine(backend);
        }
    }
}

/// README's `wasmq_send` (a PostgreSQL function, a MySQL procedure): it routes by
/// the routes the consumers recorded, in the caller's transaction.
fn send_routine(backend: Backend) {
    let env = Env::on(backend, &scripted_with_sink(""));
    // A consumer records its routes as it starts.
    env.run(&["consume", "--queue", "default", "--time-limit", "100ms"])
        .assert_success();
    let db = env.server.as_ref().expect("a server");
    let call = |topic: &str, body: &str| {
        let verb = match backend {
            Backend::Postgres => "SELECT",
            _ => "CALL",
        };
        format!(
            "{verb} wasmq_send('{topic}', {}, '[[\"x-send\",\"test.out\"]]', 2, 0);",
            db.body_literal(body)
        )
    };
    db.run(&format!(
        "BEGIN; {} ROLLBACK; BEGIN; {} COMMIT;",
        call("test.scripted", "rolled back"),
        call("test.scripted", "committed")
    ));
    let unroutable = db
        .try_run(&call("no.such.topic", "lost"))
        .expect_err("a topic nothing subscribes to is refused");
    assert!(
        unroutable.contains("no processor subscribes"),
        "{backend:?}: {unroutable}"
    );
    assert_only_committed_is_delivered(&env, backend);
}

/// Consumes for 2 s; the only message delivered was the one sent as "committed".
fn assert_only_committed_is_delivered(env: &Env, backend: Backend) {
    let out = env.run(&["consume", "--queue", "default", "--time-limit", "2s", "-v"]);
    out.assert_success();
    let delivered: Vec<String> = env
        .sink()
        .iter()
        .map(|v| v["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(delivered, ["committed"], "{backend:?}:\n{}", out.stderr);
}
