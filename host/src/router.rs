//! Topic → processors routing: one delivery per subscribed processor, in its queue.
//!
//! The router also refuses what no subscriber could receive: a body larger than a
//! subscriber's `memory_limit` cannot even be copied into its plugin, so storing it
//! would only make a message that fails on every attempt.

use std::collections::BTreeMap;

use crate::config::{OnUnroutable, ProcessorConfig};
use crate::message::{Envelope, SendOptions, check_headers, check_topic};

/// One processor subscribed to a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub processor: String,
    pub queue: String,
    /// The processor's `memory_limit`: no body larger than this can reach its plugin.
    pub memory_limit: u64,
}

impl Route {
    /// The route to a configured processor.
    pub fn to(processor: &ProcessorConfig) -> Route {
        Route {
            processor: processor.name.clone(),
            queue: processor.queue.clone(),
            memory_limit: processor.memory_limit,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no processor subscribes to topic {topic:?}; known topics: {}; map the topic in a [[processor]] `topics` list, or set [producer] on_unroutable = \"drop\"", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
pub struct Unroutable {
    pub topic: String,
    pub known: Vec<String>,
}

/// Why a send cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    #[error(transparent)]
    Unroutable(#[from] Unroutable),
    /// A topic name or headers outside the limits in `message`.
    #[error("{0}")]
    Invalid(String),
    #[error(
        "body of {body_bytes} bytes is larger than the memory_limit of processor {processor:?} ({memory_limit} bytes), which receives topic {topic:?}: send a smaller body (store large payloads elsewhere and send a reference) or raise that processor's `memory_limit`"
    )]
    TooLarge {
        topic: String,
        body_bytes: usize,
        processor: String,
        memory_limit: u64,
    },
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

    /// Routes `topic` to one more processor; subscribing a processor twice is a no-op.
    pub fn subscribe(&mut self, topic: &str, route: Route) {
        let routes = self.routes.entry(topic.to_string()).or_default();
        if !routes.iter().any(|r| r.processor == route.processor) {
            routes.push(route);
        }
    }

    /// Every topic with its processors, sorted by topic.
    pub fn routes(&self) -> impl Iterator<Item = (&str, &[Route])> {
        self.routes.iter().map(|(t, r)| (t.as_str(), r.as_slice()))
    }

    /// The deliveries a send makes: one per subscribed processor. An unrouted topic is
    /// an error, or nothing when configured to drop; a body that a subscriber's memory
    /// cannot hold is an error.
    pub fn route(
        &self,
        topic: &str,
        body: &[u8],
        options: &SendOptions,
    ) -> Result<Vec<Envelope>, RouteError> {
        check_topic(topic).map_err(RouteError::Invalid)?;
        check_headers(&options.headers).map_err(RouteError::Invalid)?;
        let Some(routes) = self.routes.get(topic) else {
            if self.on_unroutable == OnUnroutable::Drop {
                tracing::debug!(
                    topic,
                    "dropping a message nobody subscribes to (on_unroutable = \"drop\")"
                );
                return Ok(Vec::new());
            }
            return Err(RouteError::Unroutable(Unroutable {
                topic: topic.to_string(),
                known: self.routes.keys().cloned().collect(),
            }));
        };
        if let Some(small) = routes.iter().find(|r| body.len() as u64 > r.memory_limit) {
            return Err(RouteError::TooLarge {
                topic: topic.to_string(),
                body_bytes: body.len(),
                processor: small.processor.clone(),
                memory_limit: small.memory_limit,
            });
        }
        Ok(routes
            .iter()
            .map(|r| Envelope {
                queue: r.queue.clone(),
                processor: r.processor.clone(),
                topic: topic.to_string(),
                body: body.to_vec(),
                options: options.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(processor: &str, queue: &str, memory_limit: u64) -> Route {
        Route {
            processor: processor.into(),
            queue: queue.into(),
            memory_limit,
        }
    }

    #[test]
    fn one_delivery_per_subscriber_and_named_errors() {
        let mut r = Router::new(OnUnroutable::Error);
        r.subscribe("a", route("p1", "q1", 1 << 20));
        r.subscribe("a", route("p2", "q2", 1 << 20));
        r.subscribe("a", route("p2", "q2", 1 << 20));
        let e = r.route("a", b"x", &SendOptions::default()).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[1].processor.as_str(), e[1].queue.as_str()), ("p2", "q2"));
        let err = r.route("b", b"x", &SendOptions::default()).unwrap_err();
        assert!(matches!(err, RouteError::Unroutable(_)), "{err:?}");
        let err = err.to_string();
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

    #[test]
    fn a_body_larger_than_a_subscribers_memory_is_refused_naming_it() {
        let mut r = Router::new(OnUnroutable::Error);
        r.subscribe("a", route("big", "q", 1 << 20));
        r.subscribe("a", route("small", "q", 1000));
        let fits = r.route("a", &[0; 1000], &SendOptions::default()).unwrap();
        assert_eq!(fits.len(), 2);
        let err = r
            .route("a", &[0; 1001], &SendOptions::default())
            .unwrap_err();
        assert_eq!(
            err,
            RouteError::TooLarge {
                topic: "a".into(),
                body_bytes: 1001,
                processor: "small".into(),
                memory_limit: 1000,
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("1001 bytes")
                && text.contains("\"small\"")
                && text.contains("1000 bytes")
                && text.contains("memory_limit"),
            "{text}"
        );
    }
}
