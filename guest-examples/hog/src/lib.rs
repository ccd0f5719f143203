//! `hog`: a hostile plugin for tests. Every message on `hostile.hog` makes it
//! allocate memory without bound, 1 MiB at a time, each block filled so its
//! pages are really touched. It never returns normally: the host's memory
//! limit must make the allocation fail, which traps.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};

struct Hog;

const BLOCK: usize = 1 << 20;

impl Guest for Hog {
    fn subscribed_topics() -> Vec<String> {
        vec!["hostile.hog".to_string()]
    }

    fn process(_message: Message) -> Status {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        loop {
            blocks.push(vec![0xA5; BLOCK]);
            std::hint::black_box(&mut blocks);
        }
    }
}

export!(Hog);
