//! One consumer's side of the SQLite transport: claims, settlements, claim renewal.
//!
//! Group commit without a writer thread: a settling task queues its settlement and
//! yields. The consumer's next claim commits everything queued in the same
//! transaction as the claim, so a busy consumer writes once per batch rather than once
//! per message. A settlement still queued when its task runs again (the consumer is
//! stopping, or busy on another thread) is committed by that task itself, together
//! with whatever else is queued. Whoever holds the connection commits the queue before
//! letting go, so nothing queued is ever stranded.
//!
//! Waking up: another process's `wasmq send` cannot signal us, so an idle receiver
//! polls `PRAGMA data_version` on a second connection (it changes when any other
//! connection commits, and reads shared memory, not the file) every 1 ms, backing off
//! to 5 ms, and also wakes when the earliest delayed message or expiring claim is due.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value;
use rusqlite::{Connection, Transaction, TransactionBehavior, params_from_iter};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::message::{Envelope, Message, Priority, now_ms};
use crate::transport::dbal::sqlite::insert_envelopes;
use crate::transport::dbal::{decode_headers, query_error};
use crate::transport::{
    Delivery, Receiver, ReceiverOptions, SettleHandle, SettleReceipt, Settlement, TransportError,
};

/// First idle poll interval: a send from another process is seen within about this.
const MIN_IDLE_POLL: Duration = Duration::from_millis(1);
/// Longest idle poll interval: bounds wake-up latency when idle for long.
const MAX_IDLE_POLL: Duration = Duration::from_millis(5);

type Pending = (i64, Settlement, oneshot::Sender<Result<(), TransportError>>);

/// The claimed rows of one consumer and the connection that writes them.
struct Shared {
    conn: Mutex<Connection>,
    /// Settlements waiting for the next holder of `conn` to commit them.
    pending: Mutex<Vec<Pending>>,
    /// Ids claimed and not yet settled: the claims the heartbeat renews.
    in_flight: Mutex<HashSet<i64>>,
    /// Marks this consumer's claims; random, so a restarted consumer never mistakes a
    /// dead predecessor's claims for its own.
    consumer_id: String,
    queues: Vec<Value>,
    /// How far each claim or renewal pushes the lease end.
    lease_ms: i64,
    claim_sql: String,
    next_due_sql: String,
}

struct Claimed {
    deliveries: Vec<(i64, String, String, Message)>,
    /// When the next message becomes claimable (a delay or a lease ending), if any.
    next_due_ms: Option<i64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_pending(&self) -> Vec<Pending> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `work` in one transaction together with every queued settlement, answers
    /// the settlements, then drains what was queued meanwhile.
    fn transact<R>(
        &self,
        doing: &'static str,
        work: impl FnOnce(&Transaction<'_>) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let mut conn = self.lock();
        let batch = self.take_pending();
        let result: Result<R, TransportError> = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(query_error(doing))?;
            let items: Vec<(i64, &Settlement)> = batch.iter().map(|(id, s, _)| (*id, s)).collect();
            self.settle(&tx, &items)?;
            let result = work(&tx)?;
            tx.commit().map_err(query_error(doing))?;
            Ok(result)
        })();
        if result.is_ok() {
            for (_, _, reply) in batch {
                let _ = reply.send(Ok(()));
            }
        } else {
            // The claim failed (say, another process held the lock past the busy
            // timeout): the settlements are fine, so queue them again rather than fail
            // them; they are committed by the next holder, or by their own tasks.
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let later = std::mem::replace(&mut *pending, batch);
            pending.extend(later);
        }
        self.drain(conn);
        result
    }

    /// Commits queued settlements while holding the connection; after letting go,
    /// checks again, so that a settlement queued while the lock was held (by a task
    /// that then found the lock busy) is never stranded.
    fn drain<'a>(&'a self, mut conn: MutexGuard<'a, Connection>) {
        loop {
            let batch = self.take_pending();
            if !batch.is_empty() {
                let items: Vec<(i64, &Settlement)> =
                    batch.iter().map(|(id, s, _)| (*id, s)).collect();
                let result = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(query_error("starting a settlement"))
                    .and_then(|tx| {
                        self.settle(&tx, &items)?;
                        tx.commit().map_err(query_error("committing settlements"))
                    });
                for (_, _, reply) in batch {
                    let _ = reply.send(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| TransportError::Settle(e.to_string())),
                    );
                }
            }
            drop(conn);
            if self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return;
            }
            conn = match self.conn.try_lock() {
                Ok(conn) => conn,
                // Its holder drains on release.
                Err(_) => return,
            };
        }
    }

    fn claim(&self, conn: &Transaction<'_>, max: usize) -> Result<Claimed, TransportError> {
        let now = now_ms();
        let mut args: Vec<Value> = vec![
            self.consumer_id.clone().into(),
            (now + self.lease_ms).into(),
        ];
        args.extend(self.queues.iter().cloned());
        args.push(now.into());
        args.push(i64::try_from(max).unwrap_or(i64::MAX).into());
        let mut stmt = conn
            .prepare_cached(&self.claim_sql)
            .map_err(query_error("preparing the claim"))?;
        let mut deliveries = stmt
            .query_map(params_from_iter(args), |row| {
                let id: i64 = row.get("id")?;
                let message = Message {
                    id: id.to_string(),
                    topic: row.get("topic")?,
                    body: row.get("body")?,
                    headers: decode_headers(&row.get::<_, String>("headers")?),
                    priority: Priority::from_level(row.get("priority")?),
                    attempt: row.get::<_, i64>("attempt")?.clamp(1, i64::from(u32::MAX)) as u32,
                    published_at_ms: row.get::<_, i64>("published_at")?.max(0) as u64,
                };
                Ok((id, row.get("processor")?, row.get("queue")?, message))
            })
            .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
            .map_err(query_error("claiming messages"))?;
        // RETURNING's order is unspecified: restore priority, then age.
        deliveries.sort_by_key(|d: &(i64, String, String, Message)| {
            (std::cmp::Reverse(d.3.priority), d.0)
        });
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(deliveries.iter().map(|d| d.0));
        let next_due_ms = if deliveries.is_empty() {
            conn.prepare_cached(&self.next_due_sql)
                .and_then(|mut stmt| {
                    stmt.query_row(params_from_iter(self.queues.iter()), |row| row.get(0))
                })
                .map_err(query_error("finding the next due message"))?
        } else {
            None
        };
        Ok(Claimed {
            deliveries,
            next_due_ms,
        })
    }

    fn renew_claims(&self, conn: &Transaction<'_>) -> Result<(), TransportError> {
        let ids: Vec<i64> = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut renew = conn
            .prepare_cached(
                "UPDATE wasmq_messages SET available_at = ? WHERE id = ? AND claimed_by = ?",
            )
            .map_err(query_error("renewing claims"))?;
        let lease_end = now_ms() + self.lease_ms;
        for id in ids {
            renew
                .execute(rusqlite::params![lease_end, id, self.consumer_id])
                .map_err(query_error("renewing claims"))?;
        }
        Ok(())
    }

    /// Applies a group of settlements inside the caller's transaction.
    fn settle(
        &self,
        tx: &Transaction<'_>,
        items: &[(i64, &Settlement)],
    ) -> Result<(), TransportError> {
        if items.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for (id, _) in items {
                in_flight.remove(id);
            }
        }
        let mut lost = 0;
        let mut sends: Vec<&Envelope> = Vec::new();
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM wasmq_messages WHERE id = ? AND claimed_by = ?")
                .map_err(query_error("preparing a settlement"))?;
            for &(id, settlement) in items {
                match settlement {
                    Settlement::Ack { sends: s } => {
                        sends.extend(s);
                    }
                    Settlement::Drop => {}
                    Settlement::Retry { delay, error }
                    | Settlement::Defer {
                        delay,
                        reason: error,
                    } => {
                        let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
                        // A deferred delivery was never run: it gives its attempt back.
                        let uncount = i64::from(matches!(settlement, Settlement::Defer { .. }));
                        tx.prepare_cached(
                            "UPDATE wasmq_messages SET claimed_by = NULL, available_at = ?, last_error = ?,
                                 attempt = attempt - ?
                             WHERE id = ? AND claimed_by = ?",
                        )
                        .and_then(|mut stmt| {
                            stmt.execute(rusqlite::params![
                                now.saturating_add(delay),
                                error,
                                uncount,
                                id,
                                self.consumer_id
                            ])
                        })
                        .map_err(query_error("scheduling a retry"))?;
                        continue;
                    }
                    Settlement::DeadLetter { error } => {
                        tx.prepare_cached(
                            "INSERT INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                             SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?, ?
                             FROM wasmq_messages WHERE id = ? AND claimed_by = ?",
                        )
                        .and_then(|mut stmt| stmt.execute(rusqlite::params![error, now, id, self.consumer_id]))
                        .map_err(query_error("dead-lettering a message"))?;
                    }
                }
                let removed = delete
                    .execute(rusqlite::params![id, self.consumer_id])
                    .map_err(query_error("removing a settled message"))?;
                lost += 1 - removed.min(1);
            }
        }
        if lost > 0 {
            // Our lease ran out (a stalled host) and another consumer took the message
            // over: it is processed twice, which at-least-once allows; keep our sends.
            tracing::warn!(
                count = lost,
                "settled messages whose claim had expired and moved to another consumer"
            );
        }
        let sends: Vec<Envelope> = sends.into_iter().cloned().collect();
        insert_envelopes(tx, &sends, now).map(drop)
    }
}

pub struct SqliteReceiver {
    shared: Arc<Shared>,
    watcher: Connection,
    data_version: i64,
    renewer: JoinHandle<()>,
}

impl SqliteReceiver {
    pub fn start(
        writer: Connection,
        watcher: Connection,
        options: ReceiverOptions,
    ) -> Result<SqliteReceiver, TransportError> {
        let data_version = data_version(&watcher)?;
        let placeholders = vec!["?"; options.queues.len()].join(",");
        let shared = Arc::new(Shared {
            conn: Mutex::new(writer),
            pending: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashSet::new()),
            consumer_id: uuid::Uuid::new_v4().to_string(),
            queues: options.queues.iter().map(|q| Value::from(q.clone())).collect(),
            lease_ms: i64::try_from(options.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX / 4),
            claim_sql: format!(
                "UPDATE wasmq_messages SET claimed_by = ?1, available_at = ?2, attempt = attempt + 1
                 WHERE id IN (SELECT id FROM wasmq_messages
                              WHERE queue IN ({placeholders}) AND available_at <= ?
                                AND (claimed_by IS NULL OR claimed_by <> ?1)
                              ORDER BY priority DESC, id LIMIT ?)
                 RETURNING id, queue, processor, topic, body, headers, priority, published_at, attempt"
            ),
            next_due_sql: format!("SELECT MIN(available_at) FROM wasmq_messages WHERE queue IN ({placeholders})"),
        });
        let renewer = tokio::spawn(renew_claims(shared.clone(), options.heartbeat_timeout / 3));
        Ok(SqliteReceiver {
            shared,
            watcher,
            data_version,
            renewer,
        })
    }

    /// Sleeps until something may have become claimable.
    async fn wait_for_change(&mut self, next_due_ms: Option<i64>) -> Result<(), TransportError> {
        let mut interval = MIN_IDLE_POLL;
        loop {
            let until_due =
                next_due_ms.map(|due| Duration::from_millis((due - now_ms()).max(0) as u64));
            if until_due.is_some_and(|d| d.is_zero()) {
                return Ok(());
            }
            tokio::time::sleep(until_due.map_or(interval, |d| d.min(interval))).await;
            let version = data_version(&self.watcher)?;
            if version != self.data_version {
                self.data_version = version;
                return Ok(());
            }
            interval = (interval * 2).min(MAX_IDLE_POLL);
        }
    }
}

impl Drop for SqliteReceiver {
    /// A receiver dropped without `close` (an error path) stops renewing its claims, so
    /// they expire and are redelivered.
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

async fn renew_claims(shared: Arc<Shared>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(e) = shared.transact("renewing claims", |tx| shared.renew_claims(tx)) {
            tracing::error!(error = %e, "cannot renew message claims; other consumers may take them over");
        }
    }
}

fn data_version(conn: &Connection) -> Result<i64, TransportError> {
    conn.query_row("PRAGMA data_version", [], |row| row.get(0))
        .map_err(query_error("watching for new messages"))
}

#[async_trait]
impl Receiver for SqliteReceiver {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        loop {
            // Claiming runs to completion before the next await: dropping this future
            // can never leave rows claimed and undelivered.
            let claimed = self
                .shared
                .transact("claiming messages", |tx| self.shared.claim(tx, max))?;
            if !claimed.deliveries.is_empty() {
                return Ok(claimed
                    .deliveries
                    .into_iter()
                    .map(|(id, processor, queue, message)| Delivery {
                        message,
                        processor,
                        queue,
                        handle: Box::new(SqliteSettle {
                            id,
                            shared: self.shared.clone(),
                        }),
                    })
                    .collect());
            }
            self.wait_for_change(claimed.next_due_ms).await?;
        }
    }

    async fn close(self: Box<Self>) -> Result<(), TransportError> {
        self.renewer.abort();
        // Every settling task has committed or seen its settlement committed; a last
        // drain catches any stragglers.
        self.shared.drain(self.shared.lock());
        Ok(())
    }
}

struct SqliteSettle {
    id: i64,
    shared: Arc<Shared>,
}

#[async_trait]
impl SettleHandle for SqliteSettle {
    async fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> Result<SettleReceipt, TransportError> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((self.id, settlement, reply));
        let shared = self.shared;
        Ok(Box::pin(async move {
            let mut answer = answer;
            // Let the consumer's next claim commit this together with its batch.
            tokio::task::yield_now().await;
            match answer.try_recv() {
                Ok(result) => result,
                Err(oneshot::error::TryRecvError::Closed) => Err(TransportError::Closed),
                Err(oneshot::error::TryRecvError::Empty) => {
                    shared.drain(shared.lock());
                    answer.await.map_err(|_| TransportError::Closed)?
                }
            }
        }))
    }
}
