//! `sandbox`: a test plugin that probes which WASI capabilities the host grants.
//! For each message on `sandbox.probe` it tries to read and create files, list a
//! directory, read the environment and open a TCP connection, and sends a JSON
//! report of the outcomes to `sandbox.report`. Against a correctly sandboxed
//! host every probe says `denied` and the environment is empty.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};
use serde_json::{Value, json};
use wasmq::plugin::producer;
use wasmq::plugin::types::SendOptions;

struct Sandbox;

/// `"allowed[: detail]"` or `"denied: <error>"`.
fn outcome<T, E: std::fmt::Display>(
    result: Result<T, E>,
    detail: impl FnOnce(T) -> Option<String>,
) -> String {
    match result {
        Ok(value) => match detail(value) {
            Some(detail) => format!("allowed: {detail}"),
            None => "allowed".to_string(),
        },
        Err(err) => format!("denied: {err}"),
    }
}

impl Guest for Sandbox {
    fn subscribed_topics() -> Vec<String> {
        vec!["sandbox.probe".to_string()]
    }

    fn process(_message: Message) -> Status {
        let read_file = outcome(std::fs::read_to_string("/etc/hostname"), Some);
        let read_dir = outcome(std::fs::read_dir("."), |entries| {
            Some(format!("{} entries", entries.count()))
        });
        let create_file = outcome(std::fs::File::create("escape.txt"), |_| None);
        let env_secret = std::env::var("WASMQ_SECRET")
            .ok()
            .map_or(Value::Null, Value::String);
        let env_count = std::env::vars_os().count();
        let tcp = outcome(std::net::TcpStream::connect("127.0.0.1:5432"), |_| None);

        let report = json!({
            "read_file": read_file,
            "create_file": create_file,
            "read_dir": read_dir,
            "env_secret": env_secret,
            "env_count": env_count,
            "tcp": tcp,
        });
        let body = serde_json::to_vec(&report).expect("serialising to a Vec cannot fail");
        let options = SendOptions {
            priority: None,
            delay_ms: None,
            headers: Vec::new(),
        };
        match producer::send("sandbox.report", &body, &options) {
            Ok(()) => Status::Ack,
            Err(err) => {
                eprintln!("sandbox: sending the report failed: {err:?}");
                Status::Requeue
            }
        }
    }
}

export!(Sandbox);
