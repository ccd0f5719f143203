//! The consumer's heartbeat: renews its claims at a third of the lease, notices
//! claims it lost, records which processors it has, and dead-letters messages whose
//! processor no consumer has had for `orphan_timeout`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::settle::Pending;
use super::{Shared, lock};
use crate::message::now_ms;
use crate::transport::dbal::query_error;
use crate::transport::{ReceiverOptions, Subscription, TransportError};

/// Pause before renewing again after another process held the write lock: short, so
/// the claims are renewed as soon as the lock is free.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How often a consumer records the processors it has, at most.
const SEEN_EVERY: Duration = Duration::from_secs(60);

pub(super) async fn heartbeat(shared: Arc<Shared>, options: ReceiverOptions) {
    let every = options.heartbeat_timeout / 3;
    let seen_every = (options.orphan_timeout / 4).min(SEEN_EVERY);
    let orphan_ms = i64::try_from(options.orphan_timeout.as_millis()).unwrap_or(i64::MAX / 4);
    let mut last_seen: Option<Instant> = None;
    let mut failing = false;
    loop {
        let record_seen = last_seen.is_none_or(|at| at.elapsed() >= seen_every);
        let renewed = if record_seen || !lock(&shared.in_flight).is_empty() {
            shared.transact("renewing claims", |tx, settling| {
                let lost = shared.renew(tx, settling)?;
                if record_seen {
                    record_processors(tx, &options.subscriptions)?;
                }
                Ok(lost)
            })
        } else {
            Ok(Vec::new())
        };
        match renewed {
            Ok(lost) => {
                for (seq, message_id) in lost {
                    lock(&shared.in_flight).remove(&seq);
                    shared.claim_lost(seq, &message_id, false);
                }
                if record_seen {
                    last_seen = Some(Instant::now());
                }
                if failing {
                    tracing::info!("claims renewed again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot renew message claims; retrying (if this lasts past heartbeat_timeout, other consumers may take them over)");
                    failing = true;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        }
        if let Err(e) = dead_letter_orphans(&shared, orphan_ms) {
            tracing::warn!(error = %e, "cannot look for messages no consumer can run; trying again later");
        }
        tokio::time::sleep(every).await;
    }
}

impl Shared {
    /// Pushes the lease end of every claim in flight, except those settled in this
    /// very transaction; returns the claims found lost (another consumer holds them).
    fn renew(
        &self,
        tx: &Transaction<'_>,
        settling: &[Pending],
    ) -> Result<Vec<(i64, String)>, TransportError> {
        let claims: Vec<(i64, String)> = lock(&self.in_flight)
            .iter()
            .filter(|(seq, _)| !settling.iter().any(|p| p.seq == **seq))
            .map(|(seq, id)| (*seq, id.clone()))
            .collect();
        let mut renew = tx
            .prepare_cached(
                "UPDATE wasmq_messages SET available_at = ? WHERE seq = ? AND claimed_by = ?",
            )
            .map_err(query_error("renewing claims"))?;
        let lease_end = now_ms() + self.lease_ms;
        let mut lost = Vec::new();
        for (seq, message_id) in claims {
            let renewed = renew
                .execute(params![lease_end, seq, self.consumer_id])
                .map_err(query_error("renewing claims"))?;
            if renewed == 0 {
                lost.push((seq, message_id));
            }
        }
        Ok(lost)
    }
}

/// Records that a consumer has these processors now.
fn record_processors(
    tx: &Transaction<'_>,
    subscriptions: &[Subscription],
) -> Result<(), TransportError> {
    let mut upsert = tx
        .prepare_cached(
            "INSERT INTO wasmq_processors (queue, processor, seen_at) VALUES (?, ?, ?)
             ON CONFLICT (queue, processor) DO UPDATE SET seen_at = excluded.seen_at",
        )
        .map_err(query_error("recording the consumer's processors"))?;
    let now = now_ms();
    for s in subscriptions {
        upsert
            .execute(params![s.queue, s.processor, now])
            .map_err(query_error("recording the consumer's processors"))?;
    }
    Ok(())
}

/// Dead-letters the messages that have waited `orphan_ms` for a processor that no
/// consumer has had for as long. Looks first with reads, which take no write lock.
fn dead_letter_orphans(shared: &Shared, orphan_ms: i64) -> Result<(), TransportError> {
    let cutoff = now_ms().saturating_sub(orphan_ms);
    let orphaned = orphaned_subscriptions(&lock(&shared.conn), cutoff)?;
    for s in orphaned {
        let reason = format!(
            "no consumer has processor {:?} (queue {:?}): nothing claimed its messages for orphan_timeout ({}s); deploy a consumer with that processor and replay",
            s.processor,
            s.queue,
            orphan_ms / 1000
        );
        let moved = shared.transact("dead-lettering messages no consumer can run", |tx, _| {
            let now = now_ms();
            let rows = "FROM wasmq_messages WHERE queue = ?1 AND processor = ?2 AND claimed_by IS NULL AND available_at <= ?3";
            tx.execute(
                &format!(
                    "INSERT OR REPLACE INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                     SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?4, ?5 {rows}"
                ),
                params![s.queue, s.processor, cutoff, reason, now],
            )
            .and_then(|_| tx.execute(&format!("DELETE {rows}"), params![s.queue, s.processor, cutoff]))
            .map_err(query_error("dead-lettering messages no consumer can run"))
        })?;
        if moved > 0 {
            tracing::error!(processor = %s.processor, queue = %s.queue, count = moved, "dead-lettered messages that no consumer can run");
        }
    }
    Ok(())
}

/// The (queue, processor) pairs with messages waiting since before `cutoff` and no
/// consumer seen since then. Walks the distinct pairs through the claim index, one
/// lookup each, so it costs the same with a million messages waiting.
fn orphaned_subscriptions(
    conn: &Connection,
    cutoff: i64,
) -> Result<Vec<Subscription>, TransportError> {
    let failed = query_error("looking for messages no consumer can run");
    let mut next_pair = conn
        .prepare_cached(
            "SELECT queue, processor FROM wasmq_messages WHERE (queue, processor) > (?, ?)
             ORDER BY queue, processor LIMIT 1",
        )
        .map_err(failed)?;
    let mut orphaned = Vec::new();
    let mut at = (String::new(), String::new());
    while let Some(pair) = next_pair
        .query_row(params![at.0, at.1], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(query_error("looking for messages no consumer can run"))?
    {
        at = pair;
        let seen: Option<i64> = conn
            .query_row(
                "SELECT seen_at FROM wasmq_processors WHERE queue = ? AND processor = ?",
                params![at.0, at.1],
                |row| row.get(0),
            )
            .optional()
            .map_err(query_error("looking for messages no consumer can run"))?;
        if seen.is_some_and(|seen| seen > cutoff) {
            continue;
        }
        let waiting: bool = conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM wasmq_messages WHERE queue = ? AND processor = ?
                                 AND claimed_by IS NULL AND available_at <= ?)",
                params![at.0, at.1, cutoff],
                |row| row.get(0),
            )
            .map_err(query_error("looking for messages no consumer can run"))?;
        if waiting {
            orphaned.push(Subscription {
                queue: at.0.clone(),
                processor: at.1.clone(),
            });
        }
    }
    Ok(orphaned)
}
