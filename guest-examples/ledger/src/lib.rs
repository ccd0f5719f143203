//! `ledger`: the chaos suite's witness on `chaos.in`. Every call prints
//! `ledger start id=<id> body=<body> attempt=<n>` to stdout, so the consumer's log
//! shows each processing; then it sleeps for the `x-sleep-ms: N` header, if any, sends
//! ONE JSON entry `{"id","body","attempt"}` to the topic named by the `ledger_topic`
//! config value (default `ledger.entry`) and ACKs. The entries committed in the store
//! are then exactly the effects that survived: one per message means exactly-once
//! effects, two means a settlement committed twice. A failed send requeues.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use std::time::Duration;

use exports::wasmq::plugin::handler::{Guest, Message, Status};
use serde_json::json;
use wasmq::plugin::types::SendOptions;
use wasmq::plugin::{config, producer};

struct Ledger;

impl Guest for Ledger {
    fn subscribed_topics() -> Vec<String> {
        vec!["chaos.in".to_string()]
    }

    fn process(message: Message) -> Status {
        let body = String::from_utf8_lossy(&message.body);
        let (id, attempt) = (&message.id, message.attempt);
        println!("ledger start id={id} body={body} attempt={attempt}");
        let sleep = message
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-sleep-ms"));
        if let Some(ms) = sleep.and_then(|(_, v)| v.trim().parse::<u64>().ok()) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let topic = config::get("ledger_topic").unwrap_or_else(|| "ledger.entry".to_string());
        let entry = json!({ "id": id, "body": body, "attempt": attempt }).to_string();
        let options = SendOptions {
            priority: None,
            delay_ms: None,
            headers: Vec::new(),
        };
        match producer::send(&topic, entry.as_bytes(), &options) {
            Ok(()) => Status::Ack,
            Err(err) => {
                eprintln!("ledger: send to {topic} failed: {err:?}");
                Status::Requeue
            }
        }
    }
}

export!(Ledger);
