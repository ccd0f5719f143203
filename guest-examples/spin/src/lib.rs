//! `spin`: a hostile plugin for tests. Every message on `hostile.spin` makes it
//! loop forever without calling the host, so only fuel or epoch interruption
//! can stop it.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};

struct Spin;

impl Guest for Spin {
    fn subscribed_topics() -> Vec<String> {
        vec!["hostile.spin".to_string()]
    }

    fn process(_message: Message) -> Status {
        let mut counter: u64 = 0;
        loop {
            // `black_box` keeps the optimizer from proving the loop useless.
            std::hint::black_box(&mut counter);
            counter = counter.wrapping_add(1);
        }
    }
}

export!(Spin);
