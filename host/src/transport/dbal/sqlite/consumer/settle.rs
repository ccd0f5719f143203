//! Settling: what each settlement does to its row, and the handle a delivery settles
//! through.
//!
//! Every statement is conditioned on the row still holding this message (`seq` and
//! `id`: SQLite hands out a deleted row's `seq` again) and `claimed_by` still naming
//! this consumer. When it does not, the claim was lost (this consumer stalled past
//! its lease and another one took the message over): the settlement commits nothing
//! of its own, its sends included, since the consumer that now holds the message
//! will produce them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Transaction, params};
use tokio::sync::oneshot;

use super::Shared;
use crate::message::now_ms;
use crate::transport::dbal::query_error;
use crate::transport::dbal::sqlite::insert_envelopes;
use crate::transport::{SettleHandle, SettleReceipt, Settlement, TransportError};

/// Pause before committing a settlement again after another process held the lock.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// `claimed_by` of a released row: no consumer's id, so the row looks like the claim
/// of a consumer that died, which every consumer may take over (alone).
pub(super) const RELEASED: &str = "released";

/// A settlement waiting to be committed.
pub(super) struct Pending {
    pub seq: i64,
    pub message_id: String,
    pub settlement: Settlement,
    /// Told once the settlement is durable; none for a dropped handle's release.
    pub reply: Option<oneshot::Sender<Result<(), TransportError>>>,
}

impl Shared {
    /// Applies a group of settlements inside the caller's transaction.
    pub(super) fn apply(
        &self,
        tx: &Transaction<'_>,
        batch: &[Pending],
    ) -> Result<(), TransportError> {
        let now = now_ms();
        for pending in batch {
            if !self.apply_one(tx, pending, now)? {
                self.claim_lost(pending.seq, &pending.message_id, true);
            }
        }
        Ok(())
    }

    /// Applies one settlement; false when the claim was lost and nothing was written.
    fn apply_one(
        &self,
        tx: &Transaction<'_>,
        p: &Pending,
        now: i64,
    ) -> Result<bool, TransportError> {
        let mine = "seq = ? AND id = ? AND claimed_by = ?";
        let (seq, id, me) = (p.seq, &p.message_id, &self.consumer_id);
        let (delay, error, uncount) = match &p.settlement {
            Settlement::Ack { sends } => {
                let owned = self.remove(tx, p)?;
                if owned {
                    insert_envelopes(tx, sends, now)?;
                }
                return Ok(owned);
            }
            Settlement::Drop => return self.remove(tx, p),
            Settlement::DeadLetter { error } => {
                tx.prepare_cached(&format!(
                    "INSERT OR REPLACE INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                     SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?, ?
                     FROM wasmq_messages WHERE {mine}"
                ))
                .and_then(|mut stmt| stmt.execute(params![error, now, seq, id, me]))
                .map_err(query_error("dead-lettering a message"))?;
                return self.remove(tx, p);
            }
            Settlement::Release { error } => {
                // Marked as a claim that expired now: it runs alone, attempt counted.
                return tx
                    .prepare_cached(&format!(
                        "UPDATE wasmq_messages SET claimed_by = '{RELEASED}', available_at = ?, last_error = ?
                         WHERE {mine}"
                    ))
                    .and_then(|mut stmt| stmt.execute(params![now, error, seq, id, me]))
                    .map(|n| n == 1)
                    .map_err(query_error("releasing a claim"));
            }
            Settlement::Retry { delay, error } => (*delay, error, 0),
            // A deferred delivery was never run: it gives its attempt back.
            Settlement::Defer { delay, reason } => (*delay, reason, 1),
        };
        let due = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4));
        if due <= now {
            return tx
                .prepare_cached(&format!(
                    "UPDATE wasmq_messages SET claimed_by = NULL, available_at = ?, last_error = ?, attempt = attempt - ?
                     WHERE {mine}"
                ))
                .and_then(|mut stmt| stmt.execute(params![due, error, uncount, seq, id, me]))
                .map(|n| n == 1)
                .map_err(query_error("scheduling a retry"));
        }
        tx.prepare_cached(&format!(
            "INSERT INTO wasmq_delayed (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt, last_error)
             SELECT id, queue, processor, topic, body, headers, priority, published_at, ?, attempt - ?, ?
             FROM wasmq_messages WHERE {mine}"
        ))
        .and_then(|mut stmt| stmt.execute(params![due, uncount, error, seq, id, me]))
        .map_err(query_error("scheduling a retry"))?;
        self.remove(tx, p)
    }

    /// Deletes the row if this consumer still holds this message in it.
    fn remove(&self, tx: &Transaction<'_>, p: &Pending) -> Result<bool, TransportError> {
        tx.prepare_cached("DELETE FROM wasmq_messages WHERE seq = ? AND id = ? AND claimed_by = ?")
            .and_then(|mut stmt| stmt.execute(params![p.seq, p.message_id, self.consumer_id]))
            .map(|n| n == 1)
            .map_err(query_error("removing a settled message"))
    }

    pub(super) fn queue(&self, pending: Pending) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pending);
    }
}

/// Settles one claimed row.
pub(super) struct SqliteSettle {
    pub seq: i64,
    pub message_id: String,
    /// Taken by `settle`; still here on drop means the delivery was never settled.
    pub shared: Option<Arc<Shared>>,
}

#[async_trait]
impl SettleHandle for SqliteSettle {
    async fn settle(
        mut self: Box<Self>,
        settlement: Settlement,
    ) -> Result<SettleReceipt, TransportError> {
        let shared = self.shared.take().ok_or(TransportError::Closed)?;
        let (reply, mut answer) = oneshot::channel();
        shared.queue(Pending {
            seq: self.seq,
            message_id: std::mem::take(&mut self.message_id),
            settlement,
            reply: Some(reply),
        });
        Ok(Box::pin(async move {
            let mut warned = false;
            loop {
                // Let the consumer's next claim commit this together with its batch.
                tokio::task::yield_now().await;
                match answer.try_recv() {
                    Ok(result) => return result,
                    Err(oneshot::error::TryRecvError::Closed) => {
                        return Err(TransportError::Closed);
                    }
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
                // Another process holding the write lock makes every attempt wait
                // (blocking the thread): one attempt per pause for all receipts.
                if shared.may_try_now() {
                    match shared.drain() {
                        Ok(()) => {}
                        // The settlement stays queued and is tried again, for as long
                        // as it takes.
                        Err(e) if e.is_retryable() => {
                            shared.busy_for(RETRY_PAUSE);
                            if !warned {
                                tracing::warn!(error = %e, "cannot store settlements yet; retrying until the lock is free");
                                warned = true;
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                // Committed by us, or in a transaction of another thread's: wait for
                // the answer, and look again in case that transaction failed.
                tokio::select! {
                    result = &mut answer => return result.map_err(|_| TransportError::Closed)?,
                    _ = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
        }))
    }
}

impl Drop for SqliteSettle {
    /// A delivery dropped unsettled (its task panicked or was cancelled) gives its
    /// claim back at once, its attempt counted and marked to run alone, rather than
    /// holding it while the heartbeat renews it forever.
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        tracing::warn!(message_id = %self.message_id, "a delivery was dropped without a settlement; releasing its claim");
        shared.queue(Pending {
            seq: self.seq,
            message_id: std::mem::take(&mut self.message_id),
            settlement: Settlement::Release {
                error: "released: the delivery ended without a settlement".into(),
            },
            reply: None,
        });
        // Committed now if the connection is free; otherwise its holder commits it
        // before letting go, or the next claim or heartbeat does.
        if let Ok(conn) = shared.conn.try_lock() {
            let _ = shared.drain_with(conn);
        }
    }
}
