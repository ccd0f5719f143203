//! A loaded processor: its compiled component, its `InstancePre`, and how one
//! message is run through it.
//!
//! By default every message gets a fresh `Store` and instance, so no guest state leaks
//! from one message to the next (what Oro's "clearer" extensions do by hand). With
//! `instance_reuse = N` an instance that answered normally serves up to N messages;
//! any trap, timeout or memory overrun drops it, since its state may be corrupt.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;

use crate::config::ProcessorConfig;
use crate::message::{Envelope, MAX_TOPICS_PER_PROCESSOR, Message, Status, check_topic};
use crate::router::Router;
use crate::runtime::RuntimeError;
use crate::runtime::bindings::{Processor, ProcessorPre, types};
use crate::runtime::call_clock::{CallClock, OverBudget};
use crate::runtime::output::{LogStream, PluginOutput, Stream};
use crate::runtime::state::{PluginInfo, PluginState};

/// Warm instances kept per processor at most (with `instance_reuse`); each holds a
/// pool slot, so this stays small next to the pool's size.
const MAX_WARM_INSTANCES: usize = 16;

/// Why a call produced no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The guest trapped (a Rust panic, an out-of-bounds access, ...).
    Trap(String),
    /// The call used up the processor's `timeout`: time running and waiting on the
    /// host, a fresh instance's start included, not time queued behind other messages.
    Timeout(Duration),
    /// The guest tried to grow its memory past `memory_limit`.
    Memory(u64),
    /// The plugin could not be instantiated for this message.
    Instantiate(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Trap(why) => write!(f, "trap: {why}"),
            Failure::Timeout(limit) => {
                write!(
                    f,
                    "timeout: the call ran past its timeout of {limit:?} (running or waiting on the host)"
                )
            }
            Failure::Memory(limit) => write!(
                f,
                "memory: the plugin tried to grow past its memory_limit of {limit} bytes"
            ),
            Failure::Instantiate(why) => write!(f, "instantiate: {why}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Answered(Status),
    Failed(Failure),
}

/// The result of one call: the answer and the sends it made (held until settlement).
#[derive(Debug)]
pub struct Processed {
    pub outcome: Outcome,
    pub sends: Vec<Envelope>,
}

struct WarmInstance {
    store: Store<PluginState>,
    bindings: Processor,
    used: u32,
}

pub struct LoadedProcessor {
    pub config: ProcessorConfig,
    pub path: PathBuf,
    /// Hex SHA-256 of the plugin file.
    pub hash: String,
    /// The topics it handles: from the config, or from the plugin's `subscribed-topics`.
    pub topics: Vec<String>,
    info: Arc<PluginInfo>,
    engine: Engine,
    pre: ProcessorPre<PluginState>,
    warm: Mutex<Vec<WarmInstance>>,
}

impl LoadedProcessor {
    pub(crate) async fn new(
        engine: &Engine,
        linker: &wasmtime::component::Linker<PluginState>,
        config: &ProcessorConfig,
        path: PathBuf,
        component: Component,
        hash: String,
    ) -> Result<LoadedProcessor, RuntimeError> {
        let wrong_world = |e: wasmtime::Error| RuntimeError::WrongWorld {
            plugin: path.clone(),
            reason: format!("{e:#}"),
        };
        let instance_pre = linker.instantiate_pre(&component).map_err(wrong_world)?;
        let pre = ProcessorPre::new(instance_pre).map_err(wrong_world)?;
        let mut processor = LoadedProcessor {
            config: config.clone(),
            info: Arc::new(PluginInfo {
                name: config.name.as_str().into(),
                config: config.config.clone(),
                max_send_bytes: config.max_send_bytes,
                send_topics: config.send_topics.clone(),
            }),
            engine: engine.clone(),
            pre,
            warm: Mutex::new(Vec::new()),
            topics: Vec::new(),
            path,
            hash,
        };
        processor.topics = match &config.topics {
            Some(topics) => topics.clone(),
            None => processor.subscribed_topics().await?,
        };
        Ok(processor)
    }

    fn new_store(&self, router: Arc<Router>) -> Store<PluginState> {
        let output = PluginOutput::new(self.info.name.clone(), self.config.max_output_bytes);
        let wasi = WasiCtxBuilder::new()
            .stdout(LogStream::new(Stream::Stdout, output.clone()))
            .stderr(LogStream::new(Stream::Stderr, output.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = PluginState::new(
            self.info.clone(),
            self.config.memory_limit,
            router,
            output,
            wasi,
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut ctx| {
            let call = &mut ctx.data_mut().call;
            if call.clock.exhausted() {
                call.timed_out = true;
                return Err(wasmtime::format_err!("timeout"));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store
    }

    /// Readies the store for one call and returns the call's clock: a single budget
    /// of `timeout` for all the call runs, a fresh instance's start functions included.
    fn arm(
        &self,
        store: &mut Store<PluginState>,
        router: Arc<Router>,
        message_id: &str,
    ) -> Arc<CallClock> {
        let clock = CallClock::new(self.config.timeout);
        let state = store.data_mut();
        state.call.router = router;
        state.call.sends.clear();
        state.call.send_bytes = 0;
        state.call.clock = clock.clone();
        state.call.timed_out = false;
        state.limiter.exceeded = false;
        if let Ok(mut output) = state.output.lock() {
            output.begin_call(message_id);
        }
        store.set_epoch_deadline(1);
        clock
    }

    /// What a metered guest call came to: its value, or why there is none.
    fn result_of<T>(
        &self,
        store: &Store<PluginState>,
        result: Result<wasmtime::Result<T>, OverBudget>,
    ) -> Result<T, Failure> {
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.classify(store, &e)),
            Err(OverBudget) => Err(Failure::Timeout(self.config.timeout)),
        }
    }

    fn classify(&self, store: &Store<PluginState>, error: &wasmtime::Error) -> Failure {
        let state = store.data();
        if state.call.timed_out {
            return Failure::Timeout(self.config.timeout);
        }
        if state.limiter.exceeded {
            return Failure::Memory(state.limiter.limit);
        }
        let mut why = error.root_cause().to_string();
        let lines = state
            .output
            .lock()
            .map(|o| o.last_stderr())
            .unwrap_or_default();
        if !lines.is_empty() {
            why.push_str(&format!(" (stderr: {lines})"));
        }
        Failure::Trap(why)
    }

    /// Instantiates on `clock`: start functions run guest code, so they spend the
    /// call's budget like `process` does.
    async fn instantiate(
        &self,
        store: &mut Store<PluginState>,
        clock: &Arc<CallClock>,
    ) -> Result<Processor, Failure> {
        let result = clock.meter(self.pre.instantiate_async(&mut *store)).await;
        self.result_of(store, result)
            .map_err(|failure| match failure {
                Failure::Trap(why) => Failure::Instantiate(why),
                other => other,
            })
    }

    /// Calls `subscribed-topics` on a fresh instance.
    async fn subscribed_topics(&self) -> Result<Vec<String>, RuntimeError> {
        let refused = |reason: String| RuntimeError::SubscribedTopics {
            processor: self.config.name.clone(),
            plugin: self.path.clone(),
            reason,
        };
        let failed = |f: Failure| refused(f.to_string());
        let router = Arc::new(Router::default());
        let mut store = self.new_store(router.clone());
        let clock = self.arm(&mut store, router, "subscribed-topics");
        let bindings = self.instantiate(&mut store, &clock).await.map_err(failed)?;
        let call = bindings
            .wasmq_plugin_handler()
            .call_subscribed_topics(&mut store);
        let result = clock.meter(call).await;
        let topics = self.result_of(&store, result).map_err(failed)?;
        if topics.is_empty() {
            return Err(RuntimeError::NoTopics {
                processor: self.config.name.clone(),
                plugin: self.path.clone(),
            });
        }
        if topics.len() > MAX_TOPICS_PER_PROCESSOR {
            return Err(refused(format!(
                "it declares {} topics, and a processor handles at most {MAX_TOPICS_PER_PROCESSOR}",
                topics.len()
            )));
        }
        for topic in &topics {
            check_topic(topic).map_err(refused)?;
        }
        Ok(topics)
    }

    /// Instantiates the plugin once, as `wasmq check` does, to prove it links and starts.
    pub async fn probe(&self) -> Result<(), RuntimeError> {
        let router = Arc::new(Router::default());
        let mut store = self.new_store(router.clone());
        let clock = self.arm(&mut store, router, "check");
        self.instantiate(&mut store, &clock)
            .await
            .map(drop)
            .map_err(|f| RuntimeError::WrongWorld {
                plugin: self.path.clone(),
                reason: f.to_string(),
            })
    }

    /// Times the phases of one fresh-instance call (store and WASI context, instantiate,
    /// `process`, drop): the benchmark's breakdown of the per-message cost.
    #[doc(hidden)]
    pub async fn time_phases(&self, message: &Message, router: Arc<Router>) -> [Duration; 4] {
        let start = Instant::now();
        let mut store = self.new_store(router.clone());
        let clock = self.arm(&mut store, router, &message.id);
        let stored = Instant::now();
        let bindings = self
            .instantiate(&mut store, &clock)
            .await
            .expect("the benchmark plugin instantiates");
        let instantiated = Instant::now();
        let wit_message = types::Message::from(message);
        let call = bindings
            .wasmq_plugin_handler()
            .call_process(&mut store, &wit_message);
        let status = clock.meter(call).await;
        assert!(matches!(status, Ok(Ok(_))), "the benchmark plugin answers");
        let called = Instant::now();
        drop(store);
        let dropped = Instant::now();
        [
            stored - start,
            instantiated - stored,
            called - instantiated,
            dropped - called,
        ]
    }

    /// Runs one message through the plugin: on a warm instance when `instance_reuse`
    /// kept one, else on a fresh one, whose start shares the message's `timeout`.
    pub async fn process(&self, message: &Message, router: Arc<Router>) -> Processed {
        let warm = self.warm.lock().ok().and_then(|mut w| w.pop());
        let (mut store, warm_bindings, used) = match warm {
            Some(w) => (w.store, Some(w.bindings), w.used),
            None => (self.new_store(router.clone()), None, 0),
        };
        let clock = self.arm(&mut store, router, &message.id);
        let bindings = match warm_bindings {
            Some(bindings) => bindings,
            None => match self.instantiate(&mut store, &clock).await {
                Ok(bindings) => bindings,
                Err(failure) => {
                    finish_output(&store);
                    return Processed {
                        outcome: Outcome::Failed(failure),
                        sends: Vec::new(),
                    };
                }
            },
        };
        let wit_message = types::Message::from(message);
        let call = bindings
            .wasmq_plugin_handler()
            .call_process(&mut store, &wit_message);
        let result = clock.meter(call).await;
        let outcome = match self.result_of(&store, result) {
            Ok(status) => Outcome::Answered(status.into()),
            Err(failure) => Outcome::Failed(failure),
        };
        finish_output(&store);
        let sends = std::mem::take(&mut store.data_mut().call.sends);
        let used = used + 1;
        if matches!(outcome, Outcome::Answered(_)) && used < self.config.instance_reuse {
            let mut warm = self
                .warm
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if warm.len() < MAX_WARM_INSTANCES {
                warm.push(WarmInstance {
                    store,
                    bindings,
                    used,
                });
            }
        }
        Processed { outcome, sends }
    }
}

/// Ends a call's output: its partial lines, and the warning if the cap dropped any.
fn finish_output(store: &Store<PluginState>) {
    if let Ok(mut output) = store.data().output.lock() {
        output.finish_call();
    }
}
