//! `wasmq consume`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::cli::App;
use crate::config::parse_duration;
use crate::consumer::{self, ConsumeOptions};

/// Messages in flight by default: enough that a commit carries many settlements
/// (BENCHMARKS.md: fresh instances went from 26,000 msg/s at 2 to 47,000 at 16), and
/// safe for long messages, since `timeout` counts each call's own time, not the time
/// it waits for its neighbours.
pub const DEFAULT_CONCURRENCY: u32 = 16;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Consume only this queue; repeat for more. Default: every queue in the config.
    #[arg(long = "queue")]
    pub queues: Vec<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub message_limit: Option<u64>,
    /// Stop after this long: 60s, 5m, or now+60s.
    #[arg(long, value_parser = parse_time_limit)]
    pub time_limit: Option<Duration>,
    /// Stop once the process uses more than this many megabytes of memory.
    #[arg(long, value_name = "MB")]
    pub memory_limit: Option<u64>,
    /// Messages in flight at once; their plugin calls interleave (every 10 ms of
    /// guest code, and whenever one waits). Their settlements commit together, which
    /// is what makes short messages fast; a message whose last delivery crashed its
    /// consumer runs alone. At most 256: each message in flight holds one of the
    /// engine's 1,000 instance slots.
    #[arg(long, default_value_t = DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,
    /// Worker threads that run plugins. 1 (default) is fastest for short messages; use
    /// up to one per CPU, with --concurrency at least as high, for CPU-heavy processors.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
}

/// Accepts `60s` and Oro/Symfony's relative form `now+60s`.
fn parse_time_limit(text: &str) -> Result<Duration, String> {
    let relative = text
        .trim()
        .strip_prefix("now")
        .map_or(text, |rest| rest.trim_start().trim_start_matches('+'));
    parse_duration(relative).map_err(|e| format!("{e}; `now+60s` is accepted too"))
}

pub async fn run(config: &Path, args: ConsumeArgs) -> anyhow::Result<ExitCode> {
    // Before anything is claimed (before the plugins even load): a SIGTERM at start
    // must stop the consumer gracefully, not kill it with a claim held.
    let shutdown = CancellationToken::new();
    let signals = StopSignals::install()?;
    tokio::spawn(stop_on_signal(signals, shutdown.clone()));
    let app = App::load(config).await?;
    // A signal that arrived while the plugins loaded is only noted by the OS handler
    // so far; a moment's sleep lets the runtime hand it to `stop_on_signal` before
    // anything is claimed.
    tokio::time::sleep(SIGNAL_GRACE).await;
    let known: Vec<String> = {
        let mut queues: Vec<String> = app
            .config
            .processors
            .iter()
            .map(|p| p.queue.clone())
            .collect();
        queues.sort();
        queues.dedup();
        queues
    };
    if known.is_empty() {
        bail!(
            "no processors are configured in {:?}: add a [[processor]] table",
            app.config.path
        );
    }
    let queues = if args.queues.is_empty() {
        known.clone()
    } else {
        args.queues.clone()
    };
    if let Some(unknown) = queues.iter().find(|q| !known.contains(q)) {
        bail!(
            "--queue {unknown:?} is not the queue of any processor; configured queues: {}",
            known.join(", ")
        );
    }
    let options = ConsumeOptions {
        queues,
        message_limit: args.message_limit,
        time_limit: args.time_limit,
        memory_limit: args.memory_limit.map(|mb| mb.saturating_mul(1024 * 1024)),
        concurrency: args.concurrency as usize,
        heartbeat_timeout: app.config.consumer.heartbeat_timeout,
        orphan_timeout: app.config.consumer.orphan_timeout,
    };
    consumer::run(
        app.transport.as_ref(),
        app.registry.clone(),
        options,
        shutdown,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// See `run`: how long the consumer gives a signal that arrived during start-up to
/// reach `stop_on_signal`.
const SIGNAL_GRACE: Duration = Duration::from_millis(1);

/// SIGTERM and SIGINT, registered with the OS from the moment this is created.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! { _ = self.term.recv() => {}, _ = self.int.recv() => {} }
    }
}

/// The first SIGTERM or SIGINT stops claiming and lets in-flight messages settle; a
/// second one exits at once (unsettled messages are redelivered later).
async fn stop_on_signal(mut signals: StopSignals, shutdown: CancellationToken) {
    signals.recv().await;
    tracing::info!("stop requested: finishing in-flight messages (signal again to exit at once)");
    shutdown.cancel();
    signals.recv().await;
    tracing::warn!("second stop signal: exiting now; unsettled messages will be redelivered");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_accept_both_forms() {
        assert_eq!(parse_time_limit("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(
            parse_time_limit("now+60s").unwrap(),
            Duration::from_secs(60)
        );
        assert!(parse_time_limit("soon").unwrap_err().contains("now+60s"));
    }
}
