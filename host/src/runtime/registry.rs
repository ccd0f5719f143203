//! Every configured processor, loaded, and the router their topics make.
//!
//! A plugin that cannot be loaded (not a component, wrong world, trapping in
//! `subscribed-topics`) does not stop the others: it is kept as broken, its messages
//! fail with the load error (and so retry, then dead-letter), and `wasmq check`
//! reports it.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Config, ProcessorConfig};
use crate::router::{Route, Router};
use crate::runtime::processor::LoadedProcessor;
use crate::runtime::{Runtime, RuntimeError};
use crate::transport::{Transport, TransportError};

pub enum Slot {
    Ready(Arc<LoadedProcessor>),
    Broken {
        config: Box<ProcessorConfig>,
        error: String,
    },
}

impl Slot {
    /// The processor's config, loaded or not.
    pub fn config(&self) -> &ProcessorConfig {
        match self {
            Slot::Ready(p) => &p.config,
            Slot::Broken { config, .. } => config,
        }
    }
}

/// A topic a plugin declared for itself that another processor's config claims.
#[derive(Debug, Clone)]
pub struct TopicClaimed {
    pub processor: String,
    pub topic: String,
    pub owner: String,
}

/// The topics of `declared` (what `processor`'s plugin subscribed itself to, when its
/// config names none) that another processor's config lists. A plugin's own
/// declaration never joins a topic its operator gave to someone else: it would
/// receive copies of their messages.
pub fn claimed_elsewhere(
    config: &Config,
    processor: &ProcessorConfig,
    declared: &[String],
) -> Vec<TopicClaimed> {
    if processor.topics.is_some() {
        return Vec::new(); // the operator chose these topics
    }
    declared
        .iter()
        .filter_map(|topic| {
            let owner = config.processors.iter().find(|other| {
                other.name != processor.name && other.topics.iter().flatten().any(|t| t == topic)
            })?;
            Some(TopicClaimed {
                processor: processor.name.clone(),
                topic: topic.clone(),
                owner: owner.name.clone(),
            })
        })
        .collect()
}

pub struct Registry {
    pub processors: BTreeMap<String, Slot>,
    pub router: Arc<Router>,
}

impl Registry {
    /// Loads every processor; returns the registry and what failed to load.
    pub async fn load(runtime: &Runtime, config: &Config) -> (Registry, Vec<RuntimeError>) {
        let mut processors = BTreeMap::new();
        let mut errors = Vec::new();
        let mut router = Router::new(config.producer.on_unroutable);
        for p in &config.processors {
            let slot = match runtime.load(p, &config.plugin_path(p)).await {
                Ok(loaded) => {
                    let taken = claimed_elsewhere(config, p, &loaded.topics);
                    for topic in &loaded.topics {
                        if !taken.iter().any(|e| &e.topic == topic) {
                            router.subscribe(topic, Route::to(p));
                        }
                    }
                    errors.extend(taken.into_iter().map(RuntimeError::from));
                    Slot::Ready(Arc::new(loaded))
                }
                Err(e) => {
                    // Configured topics still route, so senders are not refused while
                    // the plugin is being fixed; its messages wait in the queue.
                    for topic in p.topics.iter().flatten() {
                        router.subscribe(topic, Route::to(p));
                    }
                    let slot = Slot::Broken {
                        config: Box::new(p.clone()),
                        error: e.to_string(),
                    };
                    errors.push(e);
                    slot
                }
            };
            processors.insert(p.name.clone(), slot);
        }
        let registry = Registry {
            processors,
            router: Arc::new(router),
        };
        (registry, errors)
    }

    /// Records the topics each loaded plugin declared for itself, by plugin build, so
    /// that `wasmq send` can route without running plugin code.
    pub async fn record_topics(&self, transport: &dyn Transport) -> Result<(), TransportError> {
        for (name, slot) in &self.processors {
            if let Slot::Ready(p) = slot
                && p.config.topics.is_none()
            {
                transport.record_topics(name, &p.hash, &p.topics).await?;
            }
        }
        Ok(())
    }
}
