//! Topic → processors routing: one delivery per subscribed processor, in its queue.

use std::collections::BTreeMap;

use crate::config::OnUnroutable;
use crate::message::{Envelope, SendOptions};

/// One processor subscribed to a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub processor: String,
    pub queue: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no processor subscribes to topic {topic:?}; known topics: {}; map the topic in a [[processor]] `topics` list, or set [producer] on_unroutable = \"drop\"", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
pub struct Unroutable {
    pub topic: String,
    pub known: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: BTreeMap<String, Vec<Route>>,
    on_unroutable: OnUnroutable,
}

impl Router {
    pub fn new(on_unroutable: OnUnroutable) -> Router {
        Router {
            routes: BTreeMap::new(),
            on_unroutable,
        }
    }

    pub fn subscribe(&mut self, topic: &str, processor: &str, queue: &str) {
        let routes = self.routes.entry(topic.to_string()).or_default();
        let route = Route {
            processor: processor.to_string(),
            queue: queue.to_string(),
        };
        if !routes.contains(&route) {
            routes.push(route);
        }
    }

    /// Every topic with its processors, sorted by topic.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &[Route])> {
        self.routes.iter().map(|(t, r)| (t.as_str(), r.as_slice()))
    }

    /// The deliveries a send makes: one per subscribed processor. An unrouted topic is
    /// an error, or nothing when configured to drop.
    pub fn route(
        &self,
        topic: &str,
        body: &[u8],
        options: &SendOptions,
    ) -> Result<Vec<Envelope>, Unroutable> {
        match self.routes.get(topic) {
            Some(routes) => Ok(routes
                .iter()
                .map(|r| Envelope {
                    queue: r.queue.clone(),
                    processor: r.processor.clone(),
                    topic: topic.to_string(),
                    body: body.to_vec(),
                    options: options.clone(),
                })
                .collect()),
            None if self.on_unroutable == OnUnroutable::Drop => {
                tracing::debug!(
                    topic,
                    "dropping a message nobody subscribes to (on_unroutable = \"drop\")"
                );
                Ok(Vec::new())
            }
            None => Err(Unroutable {
                topic: topic.to_string(),
                known: self.routes.keys().cloned().collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_delivery_per_subscriber_and_named_errors() {
        let mut r = Router::new(OnUnroutable::Error);
        r.subscribe("a", "p1", "q1");
        r.subscribe("a", "p2", "q2");
        r.subscribe("a", "p2", "q2");
        let e = r.route("a", b"x", &SendOptions::default()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[1].processor.as_str(), e[1].queue.as_str()), ("p2", "q2"));
        let err = r
            .route("b", b"x", &SendOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"b\"") && err.contains("known topics: a"),
            "{err}"
        );

        let drop = Router::new(OnUnroutable::Drop);
        assert!(
            drop.route("b", b"x", &SendOptions::default())
                .unwrap()
                .is_empty()
        );
    }
}
