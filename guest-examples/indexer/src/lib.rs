//! `indexer`: an example plugin. It takes search-indexing requests on
//! `search.index-entities`, with a JSON body such as
//! `{"entity":"product","ids":[1,2,3]}`, and for each id sends a
//! `{"entity":"product","id":1,"index":"<index>"}` message to `search.indexed`,
//! where `<index>` is the `index` config value (`"default"` when unset).
//!
//! A body that is not valid JSON is rejected; a failed send requeues the message.

wit_bindgen::generate!({ path: "../../wit", world: "processor" });

use exports::wasmq::plugin::handler::{Guest, Message, Status};
use serde::{Deserialize, Serialize};
use wasmq::plugin::types::{Level, SendOptions};
use wasmq::plugin::{config, log, producer};

/// An entity id: JSON integers and strings are both accepted and sent back as given.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum Id {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
struct Request {
    entity: String,
    ids: Vec<Id>,
}

#[derive(Serialize)]
struct Indexed<'a> {
    entity: &'a str,
    id: &'a Id,
    index: &'a str,
}

struct Indexer;

impl Guest for Indexer {
    fn subscribed_topics() -> Vec<String> {
        vec!["search.index-entities".to_string()]
    }

    fn process(message: Message) -> Status {
        let request: Request = match serde_json::from_slice(&message.body) {
            Ok(request) => request,
            Err(err) => {
                log::log(
                    Level::Warn,
                    &format!("rejecting invalid request body: {err}"),
                );
                return Status::Reject;
            }
        };
        let index = config::get("index").unwrap_or_else(|| "default".to_string());
        log::log(
            Level::Info,
            &format!("indexing {} {} entities", request.ids.len(), request.entity),
        );
        for id in &request.ids {
            let body = serde_json::to_vec(&Indexed {
                entity: &request.entity,
                id,
                index: &index,
            })
            .expect("serialising to a Vec cannot fail");
            let options = SendOptions {
                priority: None,
                delay_ms: None,
                headers: vec![("entity".to_string(), request.entity.clone())],
            };
            if let Err(err) = producer::send("search.indexed", &body, &options) {
                log::log(
                    Level::Error,
                    &format!("send to search.indexed failed: {err:?}"),
                );
                return Status::Requeue;
            }
        }
        Status::Ack
    }
}

export!(Indexer);
