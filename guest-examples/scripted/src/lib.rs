//! `scripted`: a test helper on `test.scripted` whose behaviour is steered by
//! message headers (names matched case-insensitively):
//!
//! - it always prints `processing <id> attempt <attempt>` to stdout;
//! - `x-sleep-ms: N` sleeps N milliseconds first;
//! - `x-work: N` computes for N rounds of arithmetic the optimizer cannot skip (CPU
//!   only, no host calls), for tests of how time is counted;
//! - `x-print-bytes: N` writes N bytes to stderr, in lines of 1 KiB;
//! - `x-say: TEXT` writes TEXT to stderr and logs it through `log.log`, as it is
//!   (control characters included: a test of how the host shows them);
//! - `x-send: TOPIC` sends a JSON echo of the message (`id`, `body`, `attempt`,
//!   `redelivered`, `priority`) to TOPIC; without that header, the `forward_to`
//!   config value, when set, names the topic instead. A failed send requeues;
//! - `x-send-count: N` sends that echo N times (default 1);
//! - `x-send-header: NAME=VALUE` puts that header on the echo;
//! - `x-answer: ack|reject|requeue` picks the returned status (default `ack`);
//! - `x-trap: yes` panics after sending (so the send must be discarded);
//! - with the config key `announce_topics` set, `subscribed-topics` says on stderr
//!   that it ran;
//! - the echo's `instance_calls` counts the calls this instance has served, which
//!   shows whether the host gave the message a fresh instance or a reused one.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Calls served by this instance: instance state that must not outlive the instance.
static CALLS: AtomicU32 = AtomicU32::new(0);

use exports::wasmq::plugin::handler::{Guest, Message, Status};
use serde_json::json;
use wasmq::plugin::types::{Level, Priority, SendOptions};
use wasmq::plugin::{config, log, producer};

struct Scripted;

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim())
}

fn priority_name(priority: Priority) -> &'static str {
    match priority {
        Priority::VeryLow => "very-low",
        Priority::Low => "low",
        Priority::Normal => "normal",
        Priority::High => "high",
        Priority::VeryHigh => "very-high",
    }
}

/// Burns CPU: `rounds` steps of a hash that `black_box` keeps the optimizer from
/// folding away.
fn work(rounds: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..rounds {
        hash = std::hint::black_box((hash ^ round).wrapping_mul(0x0100_0000_01b3));
    }
    hash
}

/// Writes `bytes` bytes of `x` lines to stderr.
fn print_to_stderr(mut bytes: usize) {
    let mut line = vec![b'x'; 1 << 10];
    line[(1 << 10) - 1] = b'\n';
    let mut stderr = std::io::stderr().lock();
    while bytes > 0 {
        let chunk = bytes.min(line.len());
        stderr
            .write_all(&line[..chunk])
            .expect("stderr is the host's log");
        bytes -= chunk;
    }
}

impl Guest for Scripted {
    fn subscribed_topics() -> Vec<String> {
        // Lets a test see whether the host ran this code.
        if config::get("announce_topics").is_some() {
            eprintln!("scripted: subscribed-topics ran");
        }
        vec!["test.scripted".to_string()]
    }

    fn process(message: Message) -> Status {
        let instance_calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        println!("processing {} attempt {}", message.id, message.attempt);

        if let Some(ms) = header(&message, "x-sleep-ms") {
            match ms.parse::<u64>() {
                Ok(ms) => std::thread::sleep(Duration::from_millis(ms)),
                Err(err) => eprintln!("scripted: ignoring x-sleep-ms {ms:?}: {err}"),
            }
        }

        if let Some(rounds) = header(&message, "x-work") {
            match rounds.parse::<u64>() {
                Ok(rounds) => {
                    std::hint::black_box(work(rounds));
                }
                Err(err) => eprintln!("scripted: ignoring x-work {rounds:?}: {err}"),
            }
        }

        if let Some(text) = header(&message, "x-say") {
            eprintln!("{text}");
            log::log(Level::Warn, text);
        }

        if let Some(bytes) = header(&message, "x-print-bytes") {
            match bytes.parse::<usize>() {
                Ok(bytes) => print_to_stderr(bytes),
                Err(err) => eprintln!("scripted: ignoring x-print-bytes {bytes:?}: {err}"),
            }
        }

        let target = match header(&message, "x-send") {
            Some(topic) => Some(topic.to_string()),
            None => config::get("forward_to"),
        };
        if let Some(topic) = target {
            let echo = json!({
                "id": message.id,
                "body": String::from_utf8_lossy(&message.body),
                "attempt": message.attempt,
                "redelivered": message.redelivered,
                "priority": priority_name(message.priority),
                "instance_calls": instance_calls,
            });
            let body = serde_json::to_vec(&echo).expect("serialising to a Vec cannot fail");
            let options = SendOptions {
                priority: None,
                delay_ms: None,
                headers: header(&message, "x-send-header")
                    .and_then(|h| h.split_once('='))
                    .map(|(name, value)| vec![(name.to_string(), value.to_string())])
                    .unwrap_or_default(),
            };
            let count = header(&message, "x-send-count").map_or(1, |n| n.parse().unwrap_or(1));
            for _ in 0..count {
                if let Err(err) = producer::send(&topic, &body, &options) {
                    eprintln!("scripted: send to {topic} failed: {err:?}");
                    return Status::Requeue;
                }
            }
        }

        if header(&message, "x-trap").is_some() {
            panic!("scripted: x-trap asked for a trap");
        }

        match header(&message, "x-answer") {
            None => Status::Ack,
            Some(answer) if answer.eq_ignore_ascii_case("ack") => Status::Ack,
            Some(answer) if answer.eq_ignore_ascii_case("reject") => Status::Reject,
            Some(answer) if answer.eq_ignore_ascii_case("requeue") => Status::Requeue,
            Some(answer) => {
                eprintln!("scripted: unknown x-answer {answer:?}, acknowledging");
                Status::Ack
            }
        }
    }
}

export!(Scripted);
