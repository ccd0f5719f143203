//! Settling on a server: one task commits the settlements of concurrent messages
//! together, in one transaction (group commit), and an ACK's sends go in the same
//! transaction as its delete.
//!
//! Every statement is conditioned on the row still holding this message (`seq`,
//! `id`) and on `claimed_by` naming the consumer id the claim was made under. When it
//! does not, the claim was lost (the consumer stalled past its lease and another one
//! took the message over): the settlement commits nothing, its sends included. That
//! is also what makes retrying a settlement cut off by a dropped connection safe: if
//! the first try did commit, the second finds the claim gone and writes nothing.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Any, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::{ServerTransport, sqlx_error};
use crate::transport::{SettleHandle, SettleReceipt, Settlement, TransportError};

/// `claimed_by` of a released row: no consumer's id, so any consumer may take it
/// over (alone).
pub(super) const RELEASED: &str = "released";

/// Settlements committed in one transaction at most.
const GROUP_MAX: usize = 512;

/// Pause before committing a group again after a lock wait or a dropped connection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A settlement waiting to be committed.
pub(super) struct Pending {
    pub seq: i64,
    pub message_id: String,
    /// The consumer id the claim was made under.
    pub claimed_as: Arc<str>,
    pub settlement: Settlement,
    /// Told once the settlement is durable; none for a dropped handle's release.
    pub reply: Option<oneshot::Sender<Result<(), TransportError>>>,
}

/// Commits what arrives on `pending` until every sender is gone.
pub(super) async fn settler(
    store: Arc<ServerTransport>,
    mut pending: mpsc::UnboundedReceiver<Pending>,
) {
    let mut group = Vec::new();
    while pending.recv_many(&mut group, GROUP_MAX).await > 0 {
        let mut failing = false;
        loop {
            match store.apply(&group).await {
                Ok(owned) => {
                    for (p, owned) in group.iter().zip(owned) {
                        if !owned {
                            tracing::warn!(
                                message_id = %p.message_id,
                                "lost the claim on a message: this consumer stalled past its lease and another one took the message over; its settlement and sends are discarded, the new holder produces them"
                            );
                        }
                    }
                    if failing {
                        tracing::info!("settlements commit again");
                    }
                    for p in group.drain(..) {
                        if let Some(reply) = p.reply {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    break;
                }
                Err(e) if e.is_retryable() => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot commit settlements yet; retrying until the database answers");
                        failing = true;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "settlements failed; their messages are redelivered when the lease ends");
                    let text = e.to_string();
                    for p in group.drain(..) {
                        if let Some(reply) = p.reply {
                            let _ = reply.send(Err(TransportError::Settle(text.clone())));
                        }
                    }
                    break;
                }
            }
        }
    }
}

impl ServerTransport {
    /// Applies a group in one transaction; for each settlement, whether its claim
    /// was still held (false: nothing of it was written).
    async fn apply(&self, group: &[Pending]) -> Result<Vec<bool>, TransportError> {
        let mut tx = self.begin("starting to settle").await?;
        let mut owned = Vec::with_capacity(group.len());
        let mut sent = false;
        for p in group {
            let kept = self.apply_one(&mut tx, p).await?;
            sent |= kept && matches!(&p.settlement, Settlement::Ack { sends } if !sends.is_empty());
            owned.push(kept);
        }
        if sent {
            self.notify(&mut tx).await?;
        }
        tx.commit()
            .await
            .map_err(sqlx_error("committing settlements"))?;
        Ok(owned)
    }

    async fn apply_one(
        &self,
        tx: &mut Transaction<'static, Any>,
        p: &Pending,
    ) -> Result<bool, TransportError> {
        const MINE: &str = "seq = ? AND id = ? AND claimed_by = ?";
        let (delay, error, uncount) = match &p.settlement {
            Settlement::Ack { sends } => {
                let owned = self.remove(tx, p).await?;
                if owned {
                    self.insert_envelopes(tx, sends).await?;
                }
                return Ok(owned);
            }
            Settlement::Drop => return self.remove(tx, p).await,
            Settlement::DeadLetter { error } => {
                // A replayed message that dies again replaces its old dead letter.
                let sql = self.sql(&format!(
                    "DELETE FROM wasmq_dead_letters WHERE id = (SELECT id FROM wasmq_messages WHERE {MINE})"
                ));
                self.mine(sqlx::query(&sql), p)
                    .execute(&mut **tx)
                    .await
                    .map_err(sqlx_error("dead-lettering a message"))?;
                let sql = self.sql(&format!(
                    "INSERT INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                     SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?, {{now}}
                     FROM wasmq_messages WHERE {MINE}"
                ));
                self.mine(sqlx::query(&sql).bind(error.as_str()), p)
                    .execute(&mut **tx)
                    .await
                    .map_err(sqlx_error("dead-lettering a message"))?;
                return self.remove(tx, p).await;
            }
            Settlement::Release { error } => {
                // Marked as a claim whose consumer died: it runs alone, attempt counted.
                let sql = self.sql(&format!(
                    "UPDATE wasmq_messages SET claimed_by = '{RELEASED}', available_at = {{now}}, last_error = ?
                     WHERE {MINE}"
                ));
                return self
                    .mine(sqlx::query(&sql).bind(error.as_str()), p)
                    .execute(&mut **tx)
                    .await
                    .map(|done| done.rows_affected() == 1)
                    .map_err(sqlx_error("releasing a claim"));
            }
            Settlement::Retry { delay, error } => (*delay, error, 0_i64),
            // A deferred delivery was never run: it gives its attempt back.
            Settlement::Defer { delay, reason } => (*delay, reason, 1),
        };
        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
        if delay == 0 {
            let sql = self.sql(&format!(
                "UPDATE wasmq_messages SET claimed_by = NULL, available_at = {{now}}, last_error = ?, attempt = attempt - ?
                 WHERE {MINE}"
            ));
            return self
                .mine(sqlx::query(&sql).bind(error.as_str()).bind(uncount), p)
                .execute(&mut **tx)
                .await
                .map(|done| done.rows_affected() == 1)
                .map_err(sqlx_error("scheduling a retry"));
        }
        let sql = self.sql(&format!(
            "INSERT INTO wasmq_delayed (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt, last_error)
             SELECT id, queue, processor, topic, body, headers, priority, published_at, {{now}} + ?, attempt - ?, ?
             FROM wasmq_messages WHERE {MINE}"
        ));
        self.mine(
            sqlx::query(&sql)
                .bind(delay)
                .bind(uncount)
                .bind(error.as_str()),
            p,
        )
        .execute(&mut **tx)
        .await
        .map_err(sqlx_error("scheduling a retry"))?;
        self.remove(tx, p).await
    }

    /// Binds the claim condition's parameters (`seq`, `id`, `claimed_by`).
    fn mine<'q>(
        &self,
        query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
        p: &Pending,
    ) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
        query
            .bind(p.seq)
            .bind(p.message_id.clone())
            .bind(p.claimed_as.to_string())
    }

    /// Deletes the row if its claim is still this one.
    async fn remove(
        &self,
        tx: &mut Transaction<'static, Any>,
        p: &Pending,
    ) -> Result<bool, TransportError> {
        let sql =
            self.sql("DELETE FROM wasmq_messages WHERE seq = ? AND id = ? AND claimed_by = ?");
        self.mine(sqlx::query(&sql), p)
            .execute(&mut **tx)
            .await
            .map(|done| done.rows_affected() == 1)
            .map_err(sqlx_error("removing a settled message"))
    }
}

/// Settles one claimed row through the settler task.
pub(super) struct ServerSettle {
    pub seq: i64,
    pub message_id: String,
    pub claimed_as: Arc<str>,
    /// Taken by `settle`; still here on drop means the delivery was never settled.
    pub pending: Option<mpsc::UnboundedSender<Pending>>,
}

#[async_trait]
impl SettleHandle for ServerSettle {
    async fn settle(
        mut self: Box<Self>,
        settlement: Settlement,
    ) -> Result<SettleReceipt, TransportError> {
        let pending = self.pending.take().ok_or(TransportError::Closed)?;
        let (reply, answer) = oneshot::channel();
        pending
            .send(Pending {
                seq: self.seq,
                message_id: std::mem::take(&mut self.message_id),
                claimed_as: self.claimed_as.clone(),
                settlement,
                reply: Some(reply),
            })
            .map_err(|_| TransportError::Closed)?;
        Ok(Box::pin(async move {
            answer.await.map_err(|_| TransportError::Closed)?
        }))
    }
}

impl Drop for ServerSettle {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        tracing::warn!(message_id = %self.message_id, "a delivery was dropped without a settlement; releasing its claim");
        let _ = pending.send(Pending {
            seq: self.seq,
            message_id: std::mem::take(&mut self.message_id),
            claimed_as: self.claimed_as.clone(),
            settlement: Settlement::Release {
                error: "released: the delivery ended without a settlement".into(),
            },
            reply: None,
        });
    }
}
