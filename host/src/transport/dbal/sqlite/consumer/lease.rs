//! Leases: a consumer's claims are its own while its row in `wasmq_consumers` is
//! current. Its heartbeat renews that row at a third of `heartbeat_timeout`, one
//! write for all its claims however many or long they are, and records which
//! processors it has. It also releases the claims of consumers whose lease ran out
//! (they died, or are frozen): those messages run alone next, and a frozen consumer
//! that wakes up finds its row gone, knows its claims are lost, and registers again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, params};

use super::orphans::Orphans;
use super::settle::RELEASED;
use super::{Shared, lock};
use crate::message::now_ms;
use crate::transport::dbal::query_error;
use crate::transport::{ReceiverOptions, Subscription, TransportError};

/// Pause before renewing again after another process held the write lock: short, so
/// the lease is renewed as soon as the lock is free.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How often a consumer records the processors it has, at most.
const SEEN_EVERY: Duration = Duration::from_secs(60);

/// How often a consumer looks for claims whose consumer has no row at all (one
/// that crashed between losing its row and registering again): a full read of the
/// queue table, so rarely.
const STRAYS_EVERY: Duration = Duration::from_secs(600);

/// Registers the consumer: its claims are leased from now on.
pub(super) fn register(
    conn: &Connection,
    consumer: &str,
    lease_ms: i64,
) -> Result<(), TransportError> {
    let now = now_ms();
    conn.execute(
        "INSERT OR REPLACE INTO wasmq_consumers (id, lease_until, started_at) VALUES (?, ?, ?)",
        params![consumer, now + lease_ms, now],
    )
    .map(drop)
    .map_err(query_error("registering the consumer"))
}

/// Removes the consumer's row at a graceful stop.
pub(super) fn unregister(conn: &Connection, consumer: &str) -> Result<(), TransportError> {
    conn.execute("DELETE FROM wasmq_consumers WHERE id = ?", [consumer])
        .map(drop)
        .map_err(query_error("unregistering the consumer"))
}

pub(super) async fn heartbeat(shared: Arc<Shared>, options: ReceiverOptions) {
    let every = options.heartbeat_timeout / 3;
    let seen_every = (options.orphan_timeout / 4).min(SEEN_EVERY);
    let present: Vec<Subscription> = options
        .subscriptions
        .iter()
        .chain(&options.held_back)
        .cloned()
        .collect();
    let mut orphans = Orphans::new(options.orphan_timeout);
    let mut last_seen: Option<Instant> = None;
    let mut last_strays: Option<Instant> = None;
    let mut failing = false;
    loop {
        let record_seen = last_seen.is_none_or(|at| at.elapsed() >= seen_every);
        let renewed = shared.transact("renewing the consumer's lease", |tx, _| {
            let kept = renew(tx, &shared.consumer_id, shared.lease_ms)?;
            if record_seen {
                record_processors(tx, &present)?;
            }
            Ok(kept)
        });
        match renewed {
            Ok(kept) => {
                let first = !shared
                    .registered
                    .swap(true, std::sync::atomic::Ordering::AcqRel);
                if !kept && !first {
                    // Another consumer found our lease run out (we were frozen) and
                    // released our claims: they are lost; the row is ours again now.
                    let lost: Vec<_> = lock(&shared.in_flight).drain().collect();
                    for (seq, message_id) in lost {
                        shared.claim_lost(seq, &message_id, false);
                    }
                }
                if record_seen {
                    last_seen = Some(Instant::now());
                }
                if failing {
                    tracing::info!("consumer lease renewed again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot renew the consumer's lease; retrying (if this lasts past heartbeat_timeout, other consumers may take its messages over)");
                    failing = true;
                }
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        }
        if let Err(e) = release_dead(&shared) {
            tracing::warn!(error = %e, "cannot release the claims of consumers that stopped; trying again later");
        }
        if last_strays.is_none_or(|at| at.elapsed() >= STRAYS_EVERY) {
            match release_strays(&shared) {
                Ok(()) => last_strays = Some(Instant::now()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot release claims of unknown consumers; trying again later")
                }
            }
        }
        if let Err(e) = orphans.dead_letter(&shared).await {
            tracing::warn!(error = %e, "cannot look for messages no consumer can run; trying again later");
        }
        tokio::time::sleep(every).await;
    }
}

/// Pushes the consumer's lease; false when its row was gone (another consumer
/// released its claims), and then registers it again.
fn renew(tx: &Transaction<'_>, consumer: &str, lease_ms: i64) -> Result<bool, TransportError> {
    let renewed = tx
        .prepare_cached("UPDATE wasmq_consumers SET lease_until = ? WHERE id = ?")
        .and_then(|mut stmt| stmt.execute(params![now_ms() + lease_ms, consumer]))
        .map_err(query_error("renewing the consumer's lease"))?;
    if renewed == 0 {
        register(tx, consumer, lease_ms)?;
    }
    Ok(renewed == 1)
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

/// Releases the claims of every consumer whose lease ran out, and removes its row.
/// Its claimed rows are found with a read first (no index holds `claimed_by`, and a
/// read takes no lock); the write then releases those still held.
fn release_dead(shared: &Shared) -> Result<(), TransportError> {
    let failed = || query_error("releasing the claims of consumers that stopped");
    let dead: Vec<String> = {
        let conn = lock(&shared.conn);
        let mut stmt = conn
            .prepare_cached("SELECT id FROM wasmq_consumers WHERE lease_until < ? AND id <> ?")
            .map_err(failed())?;
        stmt.query_map(params![now_ms(), shared.consumer_id], |row| row.get(0))
            .and_then(Iterator::collect)
            .map_err(failed())?
    };
    for consumer in dead {
        let held = claims_of(&lock(&shared.conn), "claimed_by = ?1", &consumer)?;
        let released = shared.transact(
            "releasing the claims of a consumer that stopped",
            |tx, _| {
                let gone = tx
                    .execute(
                        "DELETE FROM wasmq_consumers WHERE id = ? AND lease_until < ?",
                        params![consumer, now_ms()],
                    )
                    .map_err(failed())?;
                if gone == 0 {
                    return Ok(0); // renewed meanwhile, or released by another consumer
                }
                release(tx, &held, "claimed_by = ?3", &consumer)
            },
        )?;
        if released > 0 {
            tracing::warn!(consumer = %consumer, count = released,
                "a consumer stopped renewing its lease; its messages are redelivered, one at a time");
        }
    }
    Ok(())
}

/// Releases claims whose consumer has no row at all.
fn release_strays(shared: &Shared) -> Result<(), TransportError> {
    let stray = "claimed_by <> ?3 AND claimed_by NOT IN (SELECT id FROM wasmq_consumers)";
    let held = claims_of(
        &lock(&shared.conn),
        "claimed_by IS NOT NULL AND claimed_by <> ?1 AND claimed_by NOT IN (SELECT id FROM wasmq_consumers)",
        RELEASED,
    )?;
    if held.is_empty() {
        return Ok(());
    }
    let released = shared.transact("releasing claims of unknown consumers", |tx, _| {
        release(tx, &held, stray, RELEASED)
    })?;
    if released > 0 {
        tracing::warn!(
            count = released,
            "released claims of consumers that no longer exist"
        );
    }
    Ok(())
}

/// The `seq` of the rows matching `condition` (with `?1` bound to `value`).
fn claims_of(conn: &Connection, condition: &str, value: &str) -> Result<Vec<i64>, TransportError> {
    let failed = || query_error("reading the claims of consumers that stopped");
    let mut stmt = conn
        .prepare_cached(&format!("SELECT seq FROM wasmq_messages WHERE {condition}"))
        .map_err(failed())?;
    stmt.query_map([value], |row| row.get(0))
        .and_then(Iterator::collect)
        .map_err(failed())
}

/// Marks these rows released, where `condition` (with `?3` bound to `value`) still
/// holds; returns how many.
fn release(
    tx: &Transaction<'_>,
    rows: &[i64],
    condition: &str,
    value: &str,
) -> Result<usize, TransportError> {
    let mut stmt = tx
        .prepare_cached(&format!(
            "UPDATE wasmq_messages SET claimed_by = '{RELEASED}', available_at = ?1
             WHERE seq = ?2 AND {condition}"
        ))
        .map_err(query_error("releasing claims"))?;
    let now = now_ms();
    let mut released = 0;
    for seq in rows {
        released += stmt
            .execute(params![now, seq, value])
            .map_err(query_error("releasing claims"))?;
    }
    Ok(released)
}
