//! The command line: argument parsing and one file per command.

mod check;
pub mod consume;
mod dead_letter;
mod send;
mod topics;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::runtime::registry::Registry;
use crate::runtime::{Runtime, RuntimeError};
use crate::transport::{self, Dsn, Transport};

/// A message-queue consumer whose processors are sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "wasmq", version, about, propagate_version = true)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, env = "WASMQ_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// More log output: -v one line per message, -vv debug, -vvv trace. RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a message to a topic: one delivery per subscribed processor; prints their ids.
    Send(send::SendArgs),
    /// Consume messages and run them through their processors.
    Consume(consume::ConsumeArgs),
    /// List topic → processor, queue, plugin file and plugin hash.
    Topics,
    /// Validate the config and instantiate every plugin; exit 1 with the reasons.
    Check,
    /// Inspect, replay or purge dead-lettered messages.
    #[command(subcommand, name = "dead-letter")]
    DeadLetter(dead_letter::DeadLetterCommand),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Send(args) => send::run(&cli.config, args).await,
        Command::Consume(args) => consume::run(&cli.config, args).await,
        Command::Topics => topics::run(&cli.config).await,
        Command::Check => check::run(&cli.config).await,
        Command::DeadLetter(command) => dead_letter::run(&cli.config, command).await,
    }
}

/// The async runtime: `threads` worker threads, where 1 means the calling thread
/// alone. On the 2-core VMs this project is measured on, a wake-up across threads
/// costs ~40 µs, more than a whole no-op message, so one thread is the default and
/// `wasmq consume --threads` adds more for processors that are CPU-bound.
pub fn runtime_for(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// The pieces most commands need: config, runtime with every plugin, transport.
pub(crate) struct App {
    pub config: Config,
    /// Held for the epoch ticker and the engine; the registry's processors use it.
    pub _runtime: Runtime,
    pub registry: std::sync::Arc<Registry>,
    pub transport: Box<dyn Transport>,
}

impl App {
    pub async fn load(config_path: &Path) -> anyhow::Result<App> {
        let config = Config::load(config_path)?;
        let runtime = Runtime::for_config(&config)?;
        let (registry, errors) = Registry::load(&runtime, &config).await;
        for e in errors {
            match e {
                RuntimeError::TopicClaimed { .. } => {
                    tracing::warn!(error = %e, "a plugin's own topic is not routed to it");
                }
                e => {
                    tracing::error!(error = %e, "plugin cannot be loaded; its messages wait in their queue until it is fixed (`wasmq check` lists every problem)");
                }
            }
        }
        let transport = open_transport(&config).await?;
        if let Err(e) = registry.record_topics(transport.as_ref()).await {
            tracing::warn!(error = %e, "cannot record the plugins' topics; `wasmq send` will load the plugins to ask them");
        }
        let routes: Vec<(String, String, String)> = registry
            .router
            .routes()
            .flat_map(|(topic, routes)| {
                routes
                    .iter()
                    .map(move |r| (topic.to_string(), r.queue.clone(), r.processor.clone()))
            })
            .collect();
        if let Err(e) = transport.record_routes(&routes).await {
            tracing::warn!(error = %e, "cannot record the routes; the wasmq_send SQL routine routes by the last ones recorded");
        }
        Ok(App {
            config,
            _runtime: runtime,
            registry: std::sync::Arc::new(registry),
            transport,
        })
    }
}

pub(crate) async fn open_transport(config: &Config) -> anyhow::Result<Box<dyn Transport>> {
    let dsn = Dsn::parse(&config.transport.dsn).map_err(anyhow::Error::msg)?;
    transport::open(&dsn, &config.base_dir, &config.transport.table_prefix)
        .await
        .with_context(|| format!("opening [transport] dsn \"{dsn}\""))
}
