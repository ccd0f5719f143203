//! `trap`: a hostile plugin for tests. Every message on `hostile.trap` makes it
//! panic, which on `wasm32-wasip2` becomes a Wasm trap the host must survive.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};

struct Trap;

impl Guest for Trap {
    fn subscribed_topics() -> Vec<String> {
        vec!["hostile.trap".to_string()]
    }

    fn process(_message: Message) -> Status {
        panic!("trap plugin panics on purpose");
    }
}

export!(Trap);
