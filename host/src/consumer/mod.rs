//! The consumer: claim → process → settle, with a cap on messages in flight, limits,
//! and a graceful stop that settles everything in flight before returning.
//!
//! A semaphore permit is taken before a message is claimed, so a consumer never holds
//! a claimed message it has no slot for. The permit is given back once the settlement
//! is handed to the transport; the settlement's durability is awaited afterwards, so
//! settlements of concurrent messages commit together.

pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runtime::processor::{Failure, Outcome, Processed};
use crate::runtime::registry::{Registry, Slot};
use crate::transport::{Delivery, ReceiverOptions, Settlement, Transport, TransportError};

/// Pause after a transient store error before claiming again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How long a delivery for a processor this consumer does not know waits before it is
/// offered again (another consumer, or this one after a config change, may know it).
const UNKNOWN_PROCESSOR_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    pub queues: Vec<String>,
    pub message_limit: Option<u64>,
    pub time_limit: Option<Duration>,
    /// Resident memory of the process, in bytes, above which the consumer stops.
    pub memory_limit: Option<u64>,
    pub concurrency: usize,
    pub heartbeat_timeout: Duration,
}

/// Why the consumer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Signal,
    MessageLimit,
    TimeLimit,
    MemoryLimit,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(
        "a settlement could not be stored ({0}); stopped so the message is redelivered rather than lost"
    )]
    Settle(String),
}

/// Runs until a limit is reached or `shutdown` is cancelled; in-flight messages are
/// always finished and settled first.
pub async fn run(
    transport: &dyn Transport,
    registry: Arc<Registry>,
    options: ConsumeOptions,
    shutdown: CancellationToken,
) -> Result<StopReason, ConsumeError> {
    let mut receiver = transport
        .receiver(ReceiverOptions {
            queues: options.queues.clone(),
            heartbeat_timeout: options.heartbeat_timeout,
        })
        .await?;
    let stop = shutdown.child_token();
    let deadline = options
        .time_limit
        .map(|limit| tokio::time::Instant::now() + limit);
    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let tasks = TaskTracker::new();
    let settle_failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut claimed: u64 = 0;
    tracing::info!(queues = ?options.queues, concurrency = options.concurrency, "consumer started");

    let reason = loop {
        if options.message_limit.is_some_and(|limit| claimed >= limit) {
            break StopReason::MessageLimit;
        }
        if let Some(limit) = options.memory_limit {
            let used = memory_stats::memory_stats().map_or(0, |m| m.physical_mem as u64);
            if used > limit {
                tracing::info!(
                    used_bytes = used,
                    limit_bytes = limit,
                    "memory limit reached"
                );
                break StopReason::MemoryLimit;
            }
        }
        let first = tokio::select! {
            _ = stop.cancelled() => break StopReason::Signal,
            _ = until(deadline) => break StopReason::TimeLimit,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let room = options.message_limit.map_or(usize::MAX, |limit| {
            usize::try_from(limit - claimed).unwrap_or(usize::MAX)
        });
        let mut permits = vec![first];
        while permits.len() < room {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        let batch = tokio::select! {
            _ = stop.cancelled() => break StopReason::Signal,
            _ = until(deadline) => break StopReason::TimeLimit,
            batch = receiver.next_batch(permits.len()) => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "cannot claim messages; trying again");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
            Err(e) => {
                stop.cancel();
                tasks.close();
                tasks.wait().await;
                return Err(e.into());
            }
        };
        claimed += batch.len() as u64;
        for (delivery, permit) in batch.into_iter().zip(permits) {
            let registry = registry.clone();
            let stop = stop.clone();
            let settle_failure = settle_failure.clone();
            tasks.spawn(async move {
                if let Err(e) = handle(delivery, permit, &registry).await {
                    tracing::error!(error = %e, "cannot store a settlement; stopping the consumer");
                    settle_failure
                        .lock()
                        .map(|mut f| f.get_or_insert(e.to_string()).clone())
                        .ok();
                    stop.cancel();
                }
            });
        }
    };
    if !tasks.is_empty() {
        tracing::info!(
            in_flight = tasks.len(),
            ?reason,
            "stopping: finishing the messages in flight"
        );
    }
    tasks.close();
    tasks.wait().await;
    receiver.close().await?;
    if let Some(failure) = settle_failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(ConsumeError::Settle(failure));
    }
    tracing::info!(?reason, claimed, "consumer stopped");
    Ok(reason)
}

/// Completes at the deadline, or never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Processes one delivery and settles it.
async fn handle(
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
    registry: &Registry,
) -> Result<(), TransportError> {
    let Delivery {
        message,
        processor: name,
        queue,
        handle,
    } = delivery;
    let started = Instant::now();
    let (settlement, status) = match registry.processors.get(&name) {
        None => {
            tracing::warn!(processor = %name, queue = %queue, message_id = %message.id,
                "a message is addressed to a processor this consumer does not have; it will be offered again");
            let settlement = Settlement::Defer {
                delay: UNKNOWN_PROCESSOR_RETRY,
                reason: format!("no processor named {name:?} in the consumer's config"),
            };
            (settlement, "unknown-processor".to_string())
        }
        Some(slot) => {
            let config = match slot {
                Slot::Ready(p) => &p.config,
                Slot::Broken { config, .. } => config,
            };
            match policy::exhausted_by_crashes(config, message.attempt) {
                Some(settlement) => (settlement, "crash-looped".to_string()),
                None => {
                    let processed = match slot {
                        Slot::Ready(p) => p.process(&message, registry.router.clone()).await,
                        Slot::Broken { error, .. } => Processed {
                            outcome: Outcome::Failed(Failure::Instantiate(error.clone())),
                            sends: Vec::new(),
                        },
                    };
                    let status = match &processed.outcome {
                        Outcome::Answered(status) => status.to_string(),
                        Outcome::Failed(failure) => {
                            tracing::warn!(plugin = %name, topic = %message.topic, message_id = %message.id,
                                attempt = message.attempt, reason = %failure, "plugin failed on a message");
                            "failed".to_string()
                        }
                    };
                    (policy::settle(config, message.attempt, processed), status)
                }
            }
        }
    };
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(processor = %name, topic = %message.topic, queue = %queue, message_id = %message.id,
        attempt = message.attempt, status, duration_ms, "processed");
    if let Settlement::DeadLetter { error } = &settlement {
        tracing::error!(processor = %name, topic = %message.topic, message_id = %message.id,
            attempt = message.attempt, reason = %error, "message dead-lettered");
    }
    let receipt = handle.settle(settlement).await?;
    drop(permit);
    receipt.await
}
