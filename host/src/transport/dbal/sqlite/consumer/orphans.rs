//! Messages whose processor no consumer has (renamed, removed, never deployed):
//! dead-lettered after `orphan_timeout`, so they do not wait forever.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Shared, lock};
use crate::message::now_ms;
use crate::transport::dbal::query_error;
use crate::transport::{Subscription, TransportError};

/// Orphaned messages dead-lettered per transaction, so a large backlog never holds
/// the write lock (and this consumer's thread) for long.
const ORPHAN_BATCH: usize = 1000;

/// Messages whose processor no consumer has: found by the heartbeat, dead-lettered
/// once this consumer has itself seen the processor missing for `orphan_timeout`, so
/// that neither an upgrade (no record yet) nor a fleet that was stopped for a weekend
/// dead-letters the backlog of a processor whose consumer is about to start.
pub(super) struct Orphans {
    timeout: Duration,
    /// Pairs with messages and no recent consumer, and since when this consumer has
    /// seen them so.
    missing_since: HashMap<Subscription, Instant>,
    last_look: Option<Instant>,
}

impl Orphans {
    pub(super) fn new(timeout: Duration) -> Orphans {
        Orphans {
            timeout,
            missing_since: HashMap::new(),
            last_look: None,
        }
    }

    /// How often to look: often enough to act within a tenth of the timeout, never
    /// more than once a minute (a look at a missing processor reads its backlog).
    fn every(&self) -> Duration {
        (self.timeout / 10).min(Duration::from_secs(60))
    }

    /// Dead-letters the messages of processors missing for long enough, a batch per
    /// transaction, yielding between batches. Looks first with reads, which take no
    /// write lock.
    pub(super) async fn dead_letter(&mut self, shared: &Shared) -> Result<(), TransportError> {
        if self.last_look.is_some_and(|at| at.elapsed() < self.every()) {
            return Ok(());
        }
        self.last_look = Some(Instant::now());
        let orphan_ms = i64::try_from(self.timeout.as_millis()).unwrap_or(i64::MAX / 4);
        let cutoff = now_ms().saturating_sub(orphan_ms);
        let missing = missing_subscriptions(&lock(&shared.conn), cutoff)?;
        self.missing_since.retain(|s, _| missing.contains(s));
        for s in missing {
            let since = *self
                .missing_since
                .entry(s.clone())
                .or_insert_with(Instant::now);
            if since.elapsed() < self.timeout {
                continue;
            }
            let reason = format!(
                "no consumer has processor {:?} (queue {:?}): nothing claimed its messages for orphan_timeout ({}s); deploy a consumer with that processor and replay",
                s.processor,
                s.queue,
                self.timeout.as_secs()
            );
            let mut moved = 0;
            loop {
                let batch = shared
                    .transact("dead-lettering messages no consumer can run", |tx, _| {
                        dead_letter_orphans(tx, &s, cutoff, &reason)
                    })?;
                moved += batch;
                if batch < ORPHAN_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
            }
            if moved > 0 {
                tracing::error!(processor = %s.processor, queue = %s.queue, count = moved, "dead-lettered messages that no consumer can run");
            }
        }
        Ok(())
    }
}

/// Messages of `s` that waited since before `cutoff`, unclaimed or released by a
/// consumer that died, while no consumer had `s`.
const ORPHANED: &str = "FROM wasmq_messages WHERE seq IN (
        SELECT seq FROM wasmq_messages
        WHERE queue = ?1 AND processor = ?2 AND available_at <= ?3
          AND (claimed_by IS NULL OR claimed_by = 'released')
          AND NOT EXISTS (SELECT 1 FROM wasmq_processors
                          WHERE queue = ?1 AND processor = ?2 AND seen_at > ?3)
        LIMIT ?4)";

/// Moves one batch of `s`'s orphaned messages to the dead letters; returns how many.
fn dead_letter_orphans(
    tx: &Transaction<'_>,
    s: &Subscription,
    cutoff: i64,
    reason: &str,
) -> Result<usize, TransportError> {
    let failed = query_error("dead-lettering messages no consumer can run");
    let batch = i64::try_from(ORPHAN_BATCH).unwrap_or(i64::MAX);
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
             SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?5, ?6 {ORPHANED}"
        ),
        params![s.queue, s.processor, cutoff, batch, reason, now_ms()],
    )
    .map_err(failed)?;
    tx.execute(
        &format!("DELETE {ORPHANED}"),
        params![s.queue, s.processor, cutoff, batch],
    )
    .map_err(query_error("dead-lettering messages no consumer can run"))
}

/// The (queue, processor) pairs with messages and no consumer seen since `cutoff`.
/// Walks the distinct pairs through the claim index, one lookup each, so it costs
/// the same with a million messages waiting.
fn missing_subscriptions(
    conn: &Connection,
    cutoff: i64,
) -> Result<HashSet<Subscription>, TransportError> {
    let failed = || query_error("looking for messages no consumer can run");
    let mut next_pair = conn
        .prepare_cached(
            "SELECT queue, processor FROM wasmq_messages WHERE (queue, processor) > (?, ?)
             ORDER BY queue, processor LIMIT 1",
        )
        .map_err(failed())?;
    let mut missing = HashSet::new();
    let mut at = (String::new(), String::new());
    while let Some(pair) = next_pair
        .query_row(params![at.0, at.1], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(failed())?
    {
        at = pair;
        let seen: Option<i64> = conn
            .query_row(
                "SELECT seen_at FROM wasmq_processors WHERE queue = ? AND processor = ?",
                params![at.0, at.1],
                |row| row.get(0),
            )
            .optional()
            .map_err(failed())?;
        if !seen.is_some_and(|seen| seen > cutoff) {
            missing.insert(Subscription {
                queue: at.0.clone(),
                processor: at.1.clone(),
            });
        }
    }
    Ok(missing)
}
