//! `noop`: the benchmark plugin. It acknowledges every message on `bench.noop`
//! and does nothing else, so it measures the host's per-message overhead.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};

struct Noop;

impl Guest for Noop {
    fn subscribed_topics() -> Vec<String> {
        vec!["bench.noop".to_string()]
    }

    fn process(_message: Message) -> Status {
        Status::Ack
    }
}

export!(Noop);
