//! The consumer: claim → process → settle, with a cap on messages in flight, limits,
//! and a graceful stop that settles everything in flight before returning.
//!
//! A semaphore permit is taken before a message is claimed, so a consumer never holds
//! a claimed message it has no slot for. The permit is given back once the settlement
//! is handed to the transport; the settlement's durability is awaited afterwards, so
//! settlements of concurrent messages commit together.
//!
//! A message whose last delivery ended without a settlement (its consumer died) runs
//! alone: once claimed, it waits until every slot is free, and holds them all until
//! it settles. If it kills this consumer too, the attempt is charged to it and to no
//! innocent neighbour, and a message that keeps killing consumers is dead-lettered at
//! `max_attempts`.

pub mod policy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::runtime::processor::Outcome;
use crate::runtime::registry::{Registry, Slot};
use crate::transport::{
    Batch, Delivery, ReceiverOptions, Settlement, Subscription, Transport, TransportError,
};

/// Pause after a transient store error (another process holds the lock) before
/// claiming again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// How long a delivery this consumer cannot run (its plugin does not load) waits
/// before it is offered again: long enough not to churn, short enough that a fixed
/// plugin soon catches up.
const CANNOT_RUN_RETRY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    pub queues: Vec<String>,
    pub message_limit: Option<u64>,
    pub time_limit: Option<Duration>,
    /// Resident memory of the process, in bytes, above which the consumer stops.
    pub memory_limit: Option<u64>,
    pub concurrency: usize,
    pub heartbeat_timeout: Duration,
    pub orphan_timeout: Duration,
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
    // A processor whose plugin does not load is held back: its messages wait,
    // unclaimed and with their attempts intact, until a consumer can run them.
    let (mut subscriptions, mut held_back) = (Vec::new(), Vec::new());
    for (name, slot) in &registry.processors {
        let subscription = Subscription {
            queue: slot.config().queue.clone(),
            processor: name.clone(),
        };
        if !options.queues.contains(&subscription.queue) {
            continue;
        }
        match slot {
            Slot::Ready(_) => subscriptions.push(subscription),
            Slot::Broken { .. } => held_back.push(subscription),
        }
    }
    let mut receiver = transport
        .receiver(ReceiverOptions {
            subscriptions,
            held_back,
            heartbeat_timeout: options.heartbeat_timeout,
            orphan_timeout: options.orphan_timeout,
        })
        .await?;
    let stop = shutdown.child_token();
    let deadline = options
        .time_limit
        .map(|limit| tokio::time::Instant::now() + limit);
    let concurrency = options.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let tasks = TaskTracker::new();
    let settle_failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut claimed: u64 = 0;
    let mut claim_failing = false;
    tracing::info!(queues = ?options.queues, concurrency, "consumer started");

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
        let mut held = tokio::select! {
            biased;
            _ = stop.cancelled() => break StopReason::Signal,
            _ = until(deadline) => break StopReason::TimeLimit,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        while held.num_permits() < concurrency {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => held.merge(permit),
                Err(_) => break,
            }
        }
        let room = options.message_limit.map_or(usize::MAX, |limit| {
            usize::try_from(limit - claimed).unwrap_or(usize::MAX)
        });
        let batch = tokio::select! {
            biased;
            _ = stop.cancelled() => break StopReason::Signal,
            _ = until(deadline) => break StopReason::TimeLimit,
            batch = receiver.next_batch(held.num_permits().min(room)) => batch,
        };
        let deliveries = match batch {
            Ok(Batch::Shared(deliveries)) => {
                claim_failing = false;
                deliveries
                    .into_iter()
                    .map(|d| {
                        let permit = held.split(1).expect("one permit was taken per delivery");
                        (d, permit)
                    })
                    .collect()
            }
            Ok(Batch::Alone(delivery)) => {
                claim_failing = false;
                tracing::info!(processor = %delivery.processor, message_id = %delivery.message.id,
                    attempt = delivery.message.attempt,
                    "running a message alone: its last delivery ended without a settlement");
                // Every slot, once what is in flight has finished. Stopping first
                // drops the delivery, which releases it to run alone elsewhere.
                drop(held);
                let all = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break StopReason::Signal,
                    _ = until(deadline) => break StopReason::TimeLimit,
                    all = slots.clone().acquire_many_owned(concurrency as u32) => all.expect("the semaphore is never closed"),
                };
                vec![(delivery, all)]
            }
            Err(e) if e.is_retryable() => {
                // Another process holds the lock: say so once, not at every try.
                if !claim_failing {
                    tracing::warn!(error = %e, "cannot claim messages yet; trying again until the lock is free");
                    claim_failing = true;
                }
                drop(held);
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
        claimed += deliveries.len() as u64;
        for (delivery, permit) in deliveries {
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
        // Claims are made by processor, so only a config change in flight gets here.
        None => cannot_run(
            &name,
            &queue,
            &message.id,
            "this consumer has no such processor",
        ),
        // The plugin is the host's problem, not the message's: it waits, attempt unused.
        Some(Slot::Broken { error, .. }) => cannot_run(&name, &queue, &message.id, error),
        Some(Slot::Ready(processor)) => {
            let config = &processor.config;
            match policy::exhausted_by_crashes(config, message.attempt) {
                Some(settlement) => (settlement, "crash-looped".to_string()),
                None => {
                    let processed = processor.process(&message, registry.router.clone()).await;
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

/// A delivery this consumer cannot run is offered again later without using up an
/// attempt.
fn cannot_run(processor: &str, queue: &str, message_id: &str, why: &str) -> (Settlement, String) {
    tracing::warn!(
        processor,
        queue,
        message_id,
        reason = why,
        "cannot run a message's processor; it is offered again later without using an attempt"
    );
    let settlement = Settlement::Defer {
        delay: CANNOT_RUN_RETRY,
        reason: format!("processor {processor:?} cannot run: {why}"),
    };
    (settlement, "deferred".to_string())
}
