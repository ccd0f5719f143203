//! The Wasm runtime: one engine per process, plugins compiled once (and cached on
//! disk), and a fresh sandboxed instance per message.
//!
//! - [`engine`]: engine settings and the epoch ticker behind timeouts.
//! - [`call_clock`]: the time a call has used of its `timeout`.
//! - [`cache`]: compiled components on disk, by content and engine hash.
//! - [`bindings`]: the WIT bindings (the only place `bindgen!` runs).
//! - [`state`], [`output`], `host`: what a store holds and the host imports.
//! - [`processor`]: one loaded processor and the per-message call.
//! - [`registry`]: every configured processor, and the router built from their topics.

pub mod bindings;
pub mod cache;
pub mod call_clock;
pub mod engine;
mod host;
pub mod output;
pub mod processor;
pub mod registry;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::config::ProcessorConfig;
use crate::runtime::processor::LoadedProcessor;
use crate::runtime::state::PluginState;

/// Causes are written into the message, never chained as a `source` as well, so each
/// is printed once however the error is formatted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error("cannot read plugin file {path:?}: {error}")]
    ReadPlugin {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "plugin {plugin:?} is not a WebAssembly file: {found}; build it with `cargo build --target wasm32-wasip2` and copy the .wasm it makes"
    )]
    NotWasm { plugin: PathBuf, found: String },
    #[error(
        "plugin {plugin:?} is not a valid WebAssembly component: {reason}; build it with `cargo build --target wasm32-wasip2`"
    )]
    Compile { plugin: PathBuf, reason: String },
    #[error(
        "plugin {plugin:?} needs more than one plugin instance may hold: {reason}. A plugin may have at most {instances} core instances, {memories} linear memories and {tables} tables (README: Security model)",
        instances = engine::MAX_CORE_INSTANCES_PER_COMPONENT,
        memories = engine::MAX_MEMORIES_PER_COMPONENT,
        tables = engine::MAX_TABLES_PER_COMPONENT
    )]
    OverInstanceLimits { plugin: PathBuf, reason: String },
    #[error(
        "plugin {plugin:?} does not implement world wasmq:plugin/processor@0.1.0: {reason}; build it against wit/plugin.wit"
    )]
    WrongWorld { plugin: PathBuf, reason: String },
    #[error("processor {processor:?}: plugin {plugin:?} failed in subscribed-topics: {reason}")]
    SubscribedTopics {
        processor: String,
        plugin: PathBuf,
        reason: String,
    },
    #[error(
        "processor {processor:?} has no topics: plugin {plugin:?} subscribes to none; list them in its `topics` key"
    )]
    NoTopics { processor: String, plugin: PathBuf },
    #[error("cannot set up the WebAssembly engine: {0}")]
    Engine(String),
    #[error(
        "plugin {plugin:?} is {size} bytes, over [plugins] max_plugin_size ({limit} bytes): check it is the plugin you meant, or raise max_plugin_size"
    )]
    TooLarge {
        plugin: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error(
        "processor {processor:?}: its plugin subscribes itself to topic {topic:?}, which the config gives to processor {owner:?}; it does not receive it. List the processor's `topics` in its [[processor]] table if it should"
    )]
    TopicClaimed {
        processor: String,
        topic: String,
        owner: String,
    },
}

impl From<registry::TopicClaimed> for RuntimeError {
    fn from(c: registry::TopicClaimed) -> RuntimeError {
        RuntimeError::TopicClaimed {
            processor: c.processor,
            topic: c.topic,
            owner: c.owner,
        }
    }
}

/// The engine, the linker with every host import, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: PathBuf,
    /// `[plugins] max_plugin_size`: larger files are refused before they are read.
    max_plugin_size: u64,
    _ticker: engine::EpochTicker,
}

/// Longest a plugin may take to compile: cranelift is fast (a second or so for a
/// large component); a file that takes longer is treated as hostile. The compile
/// runs on a blocking thread, so the consumer's own thread never waits on it.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(60);

impl Runtime {
    /// `max_memory` is the largest `memory_limit` of any processor.
    pub fn new(max_memory: u64, cache_dir: &Path) -> Result<Runtime, RuntimeError> {
        let engine = engine::build(max_memory)?;
        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker)?;
        Ok(Runtime {
            _ticker: engine::EpochTicker::start(&engine),
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
            max_plugin_size: crate::config::default_max_plugin_size(),
        })
    }

    /// The runtime a config asks for: its memory limits, cache and plugin size cap.
    pub fn for_config(config: &crate::config::Config) -> Result<Runtime, RuntimeError> {
        let mut runtime = Runtime::new(config.max_memory_limit(), &config.cache_dir())?;
        runtime.max_plugin_size = config.plugins.max_plugin_size;
        Ok(runtime)
    }

    /// Reads, compiles (or loads from cache) and checks one processor's plugin.
    pub async fn load(
        &self,
        config: &ProcessorConfig,
        path: &Path,
    ) -> Result<LoadedProcessor, RuntimeError> {
        let read_error = |error| RuntimeError::ReadPlugin {
            path: path.to_path_buf(),
            error,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > self.max_plugin_size {
            return Err(RuntimeError::TooLarge {
                plugin: path.to_path_buf(),
                size,
                limit: self.max_plugin_size,
            });
        }
        let bytes = std::fs::read(path).map_err(read_error)?;
        if let Some(found) = not_wasm(&bytes) {
            return Err(RuntimeError::NotWasm {
                plugin: path.to_path_buf(),
                found,
            });
        }
        let hash = cache::content_hash(&bytes);
        let component = {
            let (engine, cache_dir, plugin, hash) = (
                self.engine.clone(),
                self.cache_dir.clone(),
                path.to_path_buf(),
                hash.clone(),
            );
            // Compiling takes a CPU for up to a second: keep it off the async workers.
            let compile = tokio::task::spawn_blocking(move || {
                cache::load(&engine, &cache_dir, &plugin, &bytes, &hash)
            });
            tokio::time::timeout(COMPILE_TIMEOUT, compile)
                .await
                .map_err(|_| RuntimeError::Compile {
                    plugin: path.to_path_buf(),
                    reason: format!("compiling took longer than {COMPILE_TIMEOUT:?}"),
                })?
                .map_err(|e| RuntimeError::Engine(format!("compiler task failed: {e}")))??
        };
        LoadedProcessor::new(
            &self.engine,
            &self.linker,
            config,
            path.to_path_buf(),
            component,
            hash,
        )
        .await
    }
}

/// Every WebAssembly file, module or component, starts with these four bytes.
const WASM_MAGIC: &[u8; 4] = b"\0asm";

/// What a file that is not WebAssembly starts with, in one line; `None` for Wasm.
/// Checked before compiling, whose error for such a file is a multi-line dump.
fn not_wasm(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(WASM_MAGIC) {
        return None;
    }
    if bytes.is_empty() {
        return Some("the file is empty".into());
    }
    let start: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
    Some(format!("it starts with {}, not \\0asm", start.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_wasm_is_described_in_one_line() {
        assert_eq!(not_wasm(b"\0asm\x0d\0\x01\0"), None);
        assert_eq!(
            not_wasm(&[0x9a, 0x4b, 0x24, 0x92, 0x00]).as_deref(),
            Some("it starts with 9a 4b 24 92, not \\0asm")
        );
        assert_eq!(
            not_wasm(b"#!").as_deref(),
            Some("it starts with 23 21, not \\0asm")
        );
        assert_eq!(not_wasm(b"").as_deref(), Some("the file is empty"));
    }

    #[test]
    fn a_read_error_prints_its_cause_once() {
        let error = RuntimeError::ReadPlugin {
            path: "p.wasm".into(),
            error: std::io::Error::other("disk on fire"),
        };
        let text = format!("{:#}", anyhow::Error::from(error));
        assert_eq!(text.matches("disk on fire").count(), 1, "{text}");
    }
}
