//! The WIT bindings, generated once for the whole crate, and the conversions between
//! the generated types and wasmq's own message model.

mod gen_ {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "processor",
        exports: { default: async },
    });
}

pub use gen_::wasmq::plugin::{config, log, producer, types};
pub use gen_::{Processor, ProcessorPre};

use crate::message::{Message, Priority, Status};

impl From<types::Priority> for Priority {
    fn from(p: types::Priority) -> Priority {
        match p {
            types::Priority::VeryLow => Priority::VeryLow,
            types::Priority::Low => Priority::Low,
            types::Priority::Normal => Priority::Normal,
            types::Priority::High => Priority::High,
            types::Priority::VeryHigh => Priority::VeryHigh,
        }
    }
}

impl From<Priority> for types::Priority {
    fn from(p: Priority) -> types::Priority {
        match p {
            Priority::VeryLow => types::Priority::VeryLow,
            Priority::Low => types::Priority::Low,
            Priority::Normal => types::Priority::Normal,
            Priority::High => types::Priority::High,
            Priority::VeryHigh => types::Priority::VeryHigh,
        }
    }
}

impl From<types::Status> for Status {
    fn from(s: types::Status) -> Status {
        match s {
            types::Status::Ack => Status::Ack,
            types::Status::Reject => Status::Reject,
            types::Status::Requeue => Status::Requeue,
        }
    }
}

impl From<&Message> for types::Message {
    fn from(m: &Message) -> types::Message {
        types::Message {
            id: m.id.clone(),
            topic: m.topic.clone(),
            body: m.body.clone(),
            headers: m.headers.clone(),
            priority: m.priority.into(),
            redelivered: m.redelivered(),
            attempt: m.attempt,
            published_at_ms: m.published_at_ms,
        }
    }
}
