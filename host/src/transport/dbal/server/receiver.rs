//! One consumer's receiver on a server: its lease, its claims, and how it waits.
//!
//! - **Lease.** The consumer registers a row in `wasmq_consumers` and its heartbeat
//!   renews it every third of `heartbeat_timeout`, on the database's clock. The
//!   heartbeat also releases the claims of consumers whose lease ran out; those
//!   messages run alone next. A consumer that finds its own row gone (it stalled, or
//!   lost its connection, past its lease) registers again under a new id, so nothing
//!   it settles under the old one can touch a message that moved on.
//! - **Claim.** In one transaction: the consumer's row is read with a shared lock
//!   (so it cannot be released while the claim is made), rows are chosen `FOR
//!   UPDATE SKIP LOCKED` per (queue, processor) it can run, marked as its own, and
//!   read back.
//! - **Waiting.** PostgreSQL consumers LISTEN and are notified by every send; MySQL
//!   consumers poll, backing off to [`MYSQL_IDLE_POLL`]. Either way an idle consumer
//!   wakes for the next delayed message falling due.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::PgListener;
use sqlx::{Any, Row, Transaction};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::dialect::Dialect;
use super::settle::{Pending, RELEASED, ServerSettle, settler};
use super::{MESSAGE_COLUMNS, ServerTransport, sqlx_error, text};
use crate::message::{Message, Priority};
use crate::transport::dbal::decode_headers;
use crate::transport::{
    Batch, Delivery, Receiver, ReceiverOptions, ServerUrl, Subscription, TransportError,
};

/// Longest an idle PostgreSQL consumer sleeps between looks, should a notification
/// be lost (its listening connection dropped, say).
const POSTGRES_IDLE_POLL: Duration = Duration::from_secs(1);

/// Longest an idle MySQL consumer sleeps between looks: the wake-up latency of an
/// idle consumer.
const MYSQL_IDLE_POLL: Duration = Duration::from_millis(50);

/// First sleep of an idle consumer after it last found work.
const FIRST_IDLE_POLL: Duration = Duration::from_millis(2);

/// How often a consumer looks for released rows (to run alone) while it finds none;
/// once it finds one it looks at every claim until there are no more.
const RELEASED_EVERY: Duration = Duration::from_secs(1);

/// Rows moved from `wasmq_delayed` per claim at most.
const PROMOTE_BATCH: i64 = 1000;

/// Pause after a failed claim before the next, while the database is away.
const CLAIM_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The consumer's identity and lease, shared with its heartbeat.
pub(super) struct Lease {
    /// The id its claims are made under now; replaced when the lease was lost.
    id: Mutex<Arc<str>>,
    lease_ms: i64,
}

impl Lease {
    fn current(&self) -> Arc<str> {
        self.id.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn renew_id(&self) -> Arc<str> {
        let fresh: Arc<str> = new_consumer_id().into();
        *self.id.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        fresh
    }
}

fn new_consumer_id() -> String {
    format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple())
}

pub(super) struct ServerReceiver {
    store: Arc<ServerTransport>,
    lease: Arc<Lease>,
    subscriptions: Vec<Subscription>,
    /// The subscription the next claim starts with, so none is starved.
    next_subscription: usize,
    listener: Option<PgListener>,
    idle_poll: Duration,
    released_looked: Option<Instant>,
    pending: mpsc::UnboundedSender<Pending>,
    settler: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl ServerReceiver {
    pub async fn start(
        store: Arc<ServerTransport>,
        url: &ServerUrl,
        options: ReceiverOptions,
    ) -> Result<ServerReceiver, TransportError> {
        let lease = Arc::new(Lease {
            id: Mutex::new(new_consumer_id().into()),
            lease_ms: i64::try_from(options.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX / 4),
        });
        store.register(&lease.current(), lease.lease_ms).await?;
        let listener = match store.dialect {
            Dialect::Postgres => match listen(url, &store.channel()).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for new messages; polling every second instead");
                    None
                }
            },
            Dialect::Mysql => None,
        };
        let (pending, queued) = mpsc::unbounded_channel();
        let settler = tokio::spawn(settler(store.clone(), queued));
        let heartbeat = tokio::spawn(heartbeat(
            store.clone(),
            lease.clone(),
            options.heartbeat_timeout / 3,
        ));
        Ok(ServerReceiver {
            store,
            lease,
            subscriptions: options.subscriptions,
            next_subscription: 0,
            listener,
            idle_poll: FIRST_IDLE_POLL,
            released_looked: None,
            pending,
            settler,
            heartbeat,
        })
    }

    /// Claims what it can now: one released row to run alone, or up to `max` rows.
    async fn claim(&mut self, max: usize) -> Result<Option<Batch>, TransportError> {
        let store = self.store.clone();
        let look_released = self
            .released_looked
            .is_none_or(|at| at.elapsed() >= RELEASED_EVERY);
        let mut tx = store.begin("starting a claim").await?;
        let me = self.lease.current();
        if !store.lease_held(&mut tx, &me).await? {
            drop(tx);
            let fresh = self.lease.renew_id();
            tracing::warn!(consumer = %fresh, "this consumer's lease ran out (it stalled or lost the database); registering again, its earlier claims are lost");
            store.register(&fresh, self.lease.lease_ms).await?;
            return Ok(None);
        }
        if look_released {
            self.released_looked = Some(Instant::now());
            for s in &self.subscriptions {
                let seqs = store.choose(&mut tx, s, true, 1).await?;
                if !seqs.is_empty() {
                    // There may be more: look again at the next claim.
                    self.released_looked = None;
                    let rows = store.take(&mut tx, &me, &seqs).await?;
                    tx.commit()
                        .await
                        .map_err(sqlx_error("committing a claim"))?;
                    return Ok(rows
                        .into_iter()
                        .next()
                        .map(|row| Batch::Alone(self.deliver(row, &me))));
                }
            }
        }
        let mut seqs = Vec::new();
        let n = self.subscriptions.len();
        for i in 0..n {
            if seqs.len() >= max {
                break;
            }
            let s = &self.subscriptions[(self.next_subscription + i) % n];
            seqs.extend(store.choose(&mut tx, s, false, max - seqs.len()).await?);
        }
        self.next_subscription = (self.next_subscription + 1) % n.max(1);
        if seqs.is_empty() {
            tx.commit().await.map_err(sqlx_error("ending a claim"))?;
            return Ok(None);
        }
        let rows = store.take(&mut tx, &me, &seqs).await?;
        tx.commit()
            .await
            .map_err(sqlx_error("committing a claim"))?;
        let deliveries = rows.into_iter().map(|row| self.deliver(row, &me)).collect();
        Ok(Some(Batch::Shared(deliveries)))
    }

    fn deliver(&self, row: ClaimedRow, me: &Arc<str>) -> Delivery {
        Delivery {
            handle: Box::new(ServerSettle {
                seq: row.seq,
                message_id: row.message.id.clone(),
                claimed_as: me.clone(),
                pending: Some(self.pending.clone()),
            }),
            message: row.message,
            processor: row.processor,
            queue: row.queue,
        }
    }

    /// Sleeps until something may be claimable: a notification, the next delayed
    /// row falling due, or the poll interval.
    async fn wait(&mut self) -> Result<(), TransportError> {
        let due_in = self.store.next_due_in().await?;
        let poll = match self.store.dialect {
            Dialect::Postgres => POSTGRES_IDLE_POLL,
            Dialect::Mysql => {
                let poll = self.idle_poll;
                self.idle_poll = (self.idle_poll * 2).min(MYSQL_IDLE_POLL);
                poll
            }
        };
        let sleep = due_in.map_or(poll, |due| due.min(poll));
        match &mut self.listener {
            Some(listener) => {
                let _ = tokio::time::timeout(sleep, listener.recv()).await;
            }
            None => tokio::time::sleep(sleep).await,
        }
        Ok(())
    }
}

async fn listen(url: &ServerUrl, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(url.secret()).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

#[async_trait]
impl Receiver for ServerReceiver {
    async fn next_batch(&mut self, max: usize) -> Result<Batch, TransportError> {
        loop {
            self.store.promote_due().await?;
            match self.claim(max.max(1)).await {
                Ok(Some(batch)) => {
                    self.idle_poll = FIRST_IDLE_POLL;
                    return Ok(batch);
                }
                Ok(None) => self.wait().await?,
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(CLAIM_RETRY_PAUSE).await;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn close(self: Box<Self>) -> Result<(), TransportError> {
        let ServerReceiver {
            store,
            lease,
            pending,
            settler,
            heartbeat,
            ..
        } = *self;
        // The settler ends once every handle has settled (or released) and dropped
        // its sender.
        drop(pending);
        let _ = settler.await;
        heartbeat.abort();
        store.unregister(&lease.current()).await
    }
}

/// Renews the lease every `every`, and releases the claims of consumers whose lease
/// ran out.
async fn heartbeat(store: Arc<ServerTransport>, lease: Arc<Lease>, every: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let me = lease.current();
        let result = async {
            if !store.renew(&me, lease.lease_ms).await? {
                let fresh = lease.renew_id();
                tracing::warn!(consumer = %fresh, "this consumer's lease ran out (it stalled or lost the database); registering again, its earlier claims are lost");
                store.register(&fresh, lease.lease_ms).await?;
            }
            store.release_expired().await
        }
        .await;
        match result {
            Ok(released) => {
                if failing {
                    tracing::info!("the consumer's lease is renewed again");
                    failing = false;
                }
                if released > 0 {
                    tracing::warn!(
                        released,
                        "released the claims of consumers whose lease ran out; each runs alone next"
                    );
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot renew the consumer's lease yet; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// Binds the `seq`s of an `IN (?, …)` list.
fn with_seqs<'q>(
    query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    seqs: &[i64],
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    seqs.iter().fold(query, |query, seq| query.bind(*seq))
}

/// One claimed row.
struct ClaimedRow {
    seq: i64,
    processor: String,
    queue: String,
    message: Message,
}

impl ServerTransport {
    async fn register(&self, consumer: &str, lease_ms: i64) -> Result<(), TransportError> {
        sqlx::query(&self.sql(
            "INSERT INTO wasmq_consumers (id, lease_until, started_at) VALUES (?, {now} + ?, {now})",
        ))
        .bind(consumer)
        .bind(lease_ms)
        .execute(&self.pool)
        .await
        .map(drop)
        .map_err(sqlx_error("registering the consumer"))
    }

    /// False when the consumer's row is gone: its claims were released.
    async fn renew(&self, consumer: &str, lease_ms: i64) -> Result<bool, TransportError> {
        sqlx::query(&self.sql("UPDATE wasmq_consumers SET lease_until = {now} + ? WHERE id = ?"))
            .bind(lease_ms)
            .bind(consumer)
            .execute(&self.pool)
            .await
            .map(|done| done.rows_affected() == 1)
            .map_err(sqlx_error("renewing the consumer's lease"))
    }

    /// At a graceful stop, once everything is settled: gives back any claim left
    /// (one whose claim committed as the consumer stopped waiting for it), uncounted,
    /// and removes the consumer's row.
    async fn unregister(&self, consumer: &str) -> Result<(), TransportError> {
        let mut tx = self.begin("unregistering the consumer").await?;
        sqlx::query(&self.sql(
            "UPDATE wasmq_messages SET claimed_by = NULL, attempt = attempt - 1 WHERE claimed_by = ?",
        ))
        .bind(consumer)
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("giving back unsettled claims"))?;
        sqlx::query(&self.sql("DELETE FROM wasmq_consumers WHERE id = ?"))
            .bind(consumer)
            .execute(&mut *tx)
            .await
            .map_err(sqlx_error("unregistering the consumer"))?;
        tx.commit()
            .await
            .map_err(sqlx_error("unregistering the consumer"))
    }

    /// Whether `consumer`'s lease is current; holds its row against release until the
    /// transaction ends.
    async fn lease_held(
        &self,
        tx: &mut Transaction<'static, Any>,
        consumer: &str,
    ) -> Result<bool, TransportError> {
        sqlx::query(
            &self.sql(
                "SELECT id FROM wasmq_consumers WHERE id = ? AND lease_until >= {now} {share}",
            ),
        )
        .bind(consumer)
        .fetch_optional(&mut **tx)
        .await
        .map(|row| row.is_some())
        .map_err(sqlx_error("checking the consumer's lease"))
    }

    /// Up to `max` seqs of `s`'s rows, best first, locked: unclaimed ones, or the
    /// released ones.
    async fn choose(
        &self,
        tx: &mut Transaction<'static, Any>,
        s: &Subscription,
        released: bool,
        max: usize,
    ) -> Result<Vec<i64>, TransportError> {
        let claimed = if released {
            format!("claimed_by = '{RELEASED}'")
        } else {
            "claimed_by IS NULL".to_string()
        };
        let sql = self.sql(&format!(
            "SELECT seq FROM wasmq_messages WHERE queue = ? AND processor = ? AND {claimed}
             ORDER BY priority DESC, seq LIMIT ? FOR UPDATE SKIP LOCKED"
        ));
        sqlx::query_scalar(&sql)
            .bind(&s.queue)
            .bind(&s.processor)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut **tx)
            .await
            .map_err(sqlx_error("choosing messages to claim"))
    }

    /// Marks the chosen rows as `consumer`'s and reads them, best first.
    async fn take(
        &self,
        tx: &mut Transaction<'static, Any>,
        consumer: &str,
        seqs: &[i64],
    ) -> Result<Vec<ClaimedRow>, TransportError> {
        let list = vec!["?"; seqs.len()].join(", ");
        let update = self.sql(&format!(
            "UPDATE wasmq_messages SET claimed_by = ?, attempt = attempt + 1 WHERE seq IN ({list})"
        ));
        with_seqs(sqlx::query(&update).bind(consumer), seqs)
            .execute(&mut **tx)
            .await
            .map_err(sqlx_error("claiming messages"))?;
        let select = self.sql(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM wasmq_messages WHERE seq IN ({list}) ORDER BY priority DESC, seq"
        ));
        let rows = with_seqs(sqlx::query(&select), seqs)
            .fetch_all(&mut **tx)
            .await
            .map_err(sqlx_error("reading claimed messages"))?;
        rows.iter()
            .map(|row| {
                Ok(ClaimedRow {
                    seq: row.try_get("seq")?,
                    processor: row.try_get("processor")?,
                    queue: row.try_get("queue")?,
                    message: Message {
                        id: row.try_get("id")?,
                        topic: row.try_get("topic")?,
                        body: row.try_get("body")?,
                        headers: decode_headers(&text(row, "headers")?),
                        priority: Priority::from_level(row.try_get("priority")?),
                        attempt: row
                            .try_get::<i64, _>("attempt")?
                            .clamp(1, i64::from(u32::MAX)) as u32,
                        published_at_ms: row.try_get::<i64, _>("published_at")?.max(0) as u64,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(sqlx_error("reading claimed messages"))
    }

    /// Moves delayed rows that are due into the queue table, oldest first.
    async fn promote_due(&self) -> Result<(), TransportError> {
        let mut tx = self.begin("moving due messages").await?;
        let seqs: Vec<i64> = sqlx::query_scalar(&self.sql(
            "SELECT seq FROM wasmq_delayed WHERE available_at <= {now}
             ORDER BY available_at, seq LIMIT ? FOR UPDATE SKIP LOCKED",
        ))
        .bind(PROMOTE_BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(sqlx_error("finding due messages"))?;
        if seqs.is_empty() {
            return tx.commit().await.map_err(sqlx_error("moving due messages"));
        }
        let list = vec!["?"; seqs.len()].join(", ");
        let insert = self.sql(&format!(
            "INSERT INTO wasmq_messages (id, queue, processor, priority, available_at, attempt, published_at, topic, headers, last_error, body)
             SELECT id, queue, processor, priority, available_at, attempt, published_at, topic, headers, last_error, body
             FROM wasmq_delayed WHERE seq IN ({list}) ORDER BY available_at, seq"
        ));
        let delete = self.sql(&format!("DELETE FROM wasmq_delayed WHERE seq IN ({list})"));
        for sql in [&insert, &delete] {
            with_seqs(sqlx::query(sql), &seqs)
                .execute(&mut *tx)
                .await
                .map_err(sqlx_error("moving due messages"))?;
        }
        tx.commit().await.map_err(sqlx_error("moving due messages"))
    }

    /// How long until the next delayed row falls due, if there is one.
    async fn next_due_in(&self) -> Result<Option<Duration>, TransportError> {
        let due: Option<i64> =
            sqlx::query_scalar(&self.sql("SELECT MIN(available_at) - {now} FROM wasmq_delayed"))
                .fetch_one(&self.pool)
                .await
                .map_err(sqlx_error("finding the next due message"))?;
        Ok(due.map(|ms| Duration::from_millis(ms.max(0) as u64)))
    }

    /// Releases the claims of every consumer whose lease ran out, and removes its
    /// row; returns how many claims were released.
    async fn release_expired(&self) -> Result<u64, TransportError> {
        let mut tx = self.begin("releasing expired claims").await?;
        let expired: Vec<String> = sqlx::query_scalar(&self.sql(
            "SELECT id FROM wasmq_consumers WHERE lease_until < {now} FOR UPDATE SKIP LOCKED",
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(sqlx_error("finding expired consumers"))?;
        let mut released = 0;
        for consumer in &expired {
            let done = sqlx::query(&self.sql(&format!(
                "UPDATE wasmq_messages SET claimed_by = '{RELEASED}', last_error = ?
                 WHERE claimed_by = ?"
            )))
            .bind(format!(
                "released: consumer {consumer} stopped renewing its lease"
            ))
            .bind(consumer.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sqlx_error("releasing expired claims"))?;
            released += done.rows_affected();
            sqlx::query(&self.sql("DELETE FROM wasmq_consumers WHERE id = ?"))
                .bind(consumer.as_str())
                .execute(&mut *tx)
                .await
                .map_err(sqlx_error("removing an expired consumer"))?;
        }
        tx.commit()
            .await
            .map_err(sqlx_error("releasing expired claims"))?;
        Ok(released)
    }
}
