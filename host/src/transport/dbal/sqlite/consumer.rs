//! One consumer's side of the SQLite transport.
//!
//! All of a consumer's writes (claims, settlements, claim renewals) go through one
//! connection owned by a writer task. SQLite allows one writer at a time, so a single
//! queue in front of it beats several connections fighting over the lock, and it
//! gives group commit for free: every settlement waiting when the writer comes round
//! is committed in one transaction.
//!
//! Waking up: another process's `wasmq send` cannot signal us, so an idle receiver
//! polls `PRAGMA data_version` (which changes when any other connection commits; it
//! reads shared memory, not the file) every 1 ms, backing off to 5 ms, and also wakes
//! when the earliest delayed message or expiring claim becomes due.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Connection, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
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
/// Settlements committed in one transaction at most; bounds transaction size.
const MAX_GROUP_COMMIT: usize = 1024;
/// Settlements waiting for the writer at most; a full queue slows processing down.
const COMMAND_QUEUE: usize = 4096;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 500;

enum Command {
    Claim {
        max: usize,
        reply: oneshot::Sender<Result<Claimed, TransportError>>,
    },
    Settle {
        id: i64,
        settlement: Settlement,
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
}

struct Claimed {
    deliveries: Vec<(i64, String, String, Message)>,
    /// When the next message becomes claimable (a delay or a lease ending), if any.
    next_due_ms: Option<i64>,
}

pub struct SqliteReceiver {
    commands: mpsc::Sender<Command>,
    watcher: SqliteConnection,
    data_version: i64,
    writer: JoinHandle<()>,
}

impl SqliteReceiver {
    pub async fn start(
        writer: SqliteConnection,
        mut watcher: SqliteConnection,
        options: ReceiverOptions,
    ) -> Result<SqliteReceiver, TransportError> {
        let data_version = data_version(&mut watcher).await?;
        let (commands, queue) = mpsc::channel(COMMAND_QUEUE);
        let writer = Writer {
            conn: writer,
            consumer_id: uuid::Uuid::new_v4().to_string(),
            queues: options.queues,
            lease_ms: i64::try_from(options.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX / 4),
        };
        let renew_every = options.heartbeat_timeout / 3;
        Ok(SqliteReceiver {
            commands,
            watcher,
            data_version,
            writer: tokio::spawn(writer.run(queue, renew_every)),
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
            let version = data_version(&mut self.watcher).await?;
            if version != self.data_version {
                self.data_version = version;
                return Ok(());
            }
            interval = (interval * 2).min(MAX_IDLE_POLL);
        }
    }
}

async fn data_version(conn: &mut SqliteConnection) -> Result<i64, TransportError> {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
        .map_err(query_error("watching for new messages"))
}

#[async_trait]
impl Receiver for SqliteReceiver {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>, TransportError> {
        loop {
            let (reply, answer) = oneshot::channel();
            self.commands
                .send(Command::Claim { max, reply })
                .await
                .map_err(|_| TransportError::Closed)?;
            let claimed = answer.await.map_err(|_| TransportError::Closed)??;
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
                            commands: self.commands.clone(),
                        }),
                    })
                    .collect());
            }
            self.wait_for_change(claimed.next_due_ms).await?;
        }
    }

    async fn close(self: Box<Self>) -> Result<(), TransportError> {
        let SqliteReceiver {
            commands,
            watcher,
            writer,
            ..
        } = *self;
        drop(commands);
        watcher.close().await.ok();
        // The writer ends once every settle handle is used or dropped.
        writer.await.map_err(|_| TransportError::Closed)
    }
}

struct SqliteSettle {
    id: i64,
    commands: mpsc::Sender<Command>,
}

#[async_trait]
impl SettleHandle for SqliteSettle {
    async fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> Result<SettleReceipt, TransportError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Settle {
                id: self.id,
                settlement,
                reply,
            })
            .await
            .map_err(|_| TransportError::Closed)?;
        Ok(Box::pin(async move {
            answer.await.map_err(|_| TransportError::Closed)?
        }))
    }
}

struct Writer {
    conn: SqliteConnection,
    /// Marks this consumer's claims; a random id, so a restarted consumer never
    /// mistakes a dead predecessor's claims for its own.
    consumer_id: String,
    queues: Vec<String>,
    /// How far each claim or renewal pushes the lease end.
    lease_ms: i64,
}

impl Writer {
    async fn run(mut self, mut queue: mpsc::Receiver<Command>, renew_every: Duration) {
        let mut renew = tokio::time::interval(renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                command = queue.recv() => match command {
                    Some(command) => command,
                    None => break,
                },
                _ = renew.tick() => {
                    if let Err(e) = self.renew_claims().await {
                        tracing::error!(error = %e, "cannot renew message claims; other consumers may take them over");
                    }
                    continue;
                }
            };
            let mut settles = Vec::new();
            let mut claims = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Settle {
                        id,
                        settlement,
                        reply,
                    } => settles.push((id, settlement, reply)),
                    Command::Claim { max, reply } => claims.push((max, reply)),
                }
                if settles.len() < MAX_GROUP_COMMIT {
                    next = queue.try_recv().ok();
                }
            }
            if !settles.is_empty() {
                let items: Vec<(i64, Settlement)> = settles
                    .iter_mut()
                    .map(|(id, s, _)| (*id, std::mem::replace(s, Settlement::Drop)))
                    .collect();
                let result = self.settle(&items).await;
                for (_, _, reply) in settles {
                    let _ = reply.send(match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(TransportError::Query {
                            doing: "settling messages",
                            source: sqlx::Error::Protocol(e.to_string()),
                        }),
                    });
                }
            }
            for (max, reply) in claims {
                let claimed = self.claim(max).await;
                if let Err(Ok(claimed)) = reply.send(claimed) {
                    // The receiver stopped waiting (shutdown): hand the rows back at once.
                    let ids: Vec<i64> = claimed.deliveries.iter().map(|d| d.0).collect();
                    if let Err(e) = self.unclaim(&ids).await {
                        tracing::warn!(error = %e, "cannot release unused claims; they are redelivered when the lease ends");
                    }
                }
            }
        }
    }

    fn queue_placeholders(&self) -> String {
        vec!["?"; self.queues.len()].join(",")
    }

    async fn claim(&mut self, max: usize) -> Result<Claimed, TransportError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE wasmq_messages SET claimed_by = ?, available_at = ?, attempt = attempt + 1
             WHERE id IN (SELECT id FROM wasmq_messages
                          WHERE queue IN ({}) AND available_at <= ?
                          ORDER BY priority DESC, id LIMIT ?)
             RETURNING id, queue, processor, topic, body, headers, priority, published_at, attempt",
            self.queue_placeholders()
        );
        let mut query = sqlx::query(&sql)
            .bind(&self.consumer_id)
            .bind(now + self.lease_ms);
        for q in &self.queues {
            query = query.bind(q);
        }
        let rows = query
            .bind(now)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&mut self.conn)
            .await
            .map_err(query_error("claiming messages"))?;
        let mut deliveries: Vec<_> = rows
            .iter()
            .map(|row| {
                let id: i64 = row.get("id");
                let message = Message {
                    id: id.to_string(),
                    topic: row.get("topic"),
                    body: row.get("body"),
                    headers: decode_headers(row.get::<&str, _>("headers")),
                    priority: Priority::from_level(row.get("priority")),
                    attempt: row.get::<i64, _>("attempt").clamp(1, i64::from(u32::MAX)) as u32,
                    published_at_ms: row.get::<i64, _>("published_at").max(0) as u64,
                };
                (id, row.get("processor"), row.get("queue"), message)
            })
            .collect();
        // RETURNING's order is unspecified: restore priority, then age.
        deliveries.sort_by_key(|(id, _, _, m): &(i64, String, String, Message)| {
            (std::cmp::Reverse(m.priority), *id)
        });
        let next_due_ms = if deliveries.is_empty() {
            let sql = format!(
                "SELECT MIN(available_at) FROM wasmq_messages WHERE queue IN ({})",
                self.queue_placeholders()
            );
            let mut query = sqlx::query_scalar::<_, Option<i64>>(&sql);
            for q in &self.queues {
                query = query.bind(q);
            }
            query
                .fetch_one(&mut self.conn)
                .await
                .map_err(query_error("finding the next due message"))?
        } else {
            None
        };
        Ok(Claimed {
            deliveries,
            next_due_ms,
        })
    }

    async fn unclaim(&mut self, ids: &[i64]) -> Result<(), TransportError> {
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE wasmq_messages SET claimed_by = NULL, available_at = ?, attempt = attempt - 1
                 WHERE claimed_by = ? AND id IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&sql).bind(now_ms()).bind(&self.consumer_id);
            for id in chunk {
                query = query.bind(id);
            }
            query
                .execute(&mut self.conn)
                .await
                .map_err(query_error("releasing claims"))?;
        }
        Ok(())
    }

    async fn renew_claims(&mut self) -> Result<(), TransportError> {
        sqlx::query("UPDATE wasmq_messages SET available_at = ? WHERE claimed_by = ?")
            .bind(now_ms() + self.lease_ms)
            .bind(&self.consumer_id)
            .execute(&mut self.conn)
            .await
            .map_err(query_error("renewing claims"))?;
        Ok(())
    }

    /// Commits a group of settlements in one transaction.
    async fn settle(&mut self, items: &[(i64, Settlement)]) -> Result<(), TransportError> {
        let now = now_ms();
        let mut tx = self
            .conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_error("starting a settlement"))?;
        let mut removed = Vec::new();
        let mut sends: Vec<Envelope> = Vec::new();
        for (id, settlement) in items {
            match settlement {
                Settlement::Ack { sends: s } => {
                    removed.push(*id);
                    sends.extend(s.iter().cloned());
                }
                Settlement::Drop => removed.push(*id),
                Settlement::Retry { delay, error } => {
                    let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4);
                    sqlx::query(
                        "UPDATE wasmq_messages SET claimed_by = NULL, available_at = ?, last_error = ?
                         WHERE id = ? AND claimed_by = ?",
                    )
                    .bind(now.saturating_add(delay))
                    .bind(error)
                    .bind(id)
                    .bind(&self.consumer_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("scheduling a retry"))?;
                }
                Settlement::DeadLetter { error } => {
                    sqlx::query(
                        "INSERT INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                         SELECT id, queue, processor, topic, body, headers, priority, published_at, attempt, ?, ?
                         FROM wasmq_messages WHERE id = ? AND claimed_by = ?",
                    )
                    .bind(error)
                    .bind(now)
                    .bind(id)
                    .bind(&self.consumer_id)
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("dead-lettering a message"))?;
                    removed.push(*id);
                }
            }
        }
        let mut lost = 0;
        for chunk in removed.chunks(ID_CHUNK) {
            let sql = format!(
                "DELETE FROM wasmq_messages WHERE claimed_by = ? AND id IN ({})",
                vec!["?"; chunk.len()].join(",")
            );
            let mut query = sqlx::query(&sql).bind(&self.consumer_id);
            for id in chunk {
                query = query.bind(id);
            }
            let done = query
                .execute(&mut *tx)
                .await
                .map_err(query_error("removing settled messages"))?;
            lost += chunk.len() as u64 - done.rows_affected();
        }
        if lost > 0 {
            // Our lease ran out (a stalled host) and another consumer took the message
            // over: it is processed twice, which at-least-once allows; keep our sends.
            tracing::warn!(
                count = lost,
                "settled messages whose claim had expired and moved to another consumer"
            );
        }
        insert_envelopes(&mut tx, &sends, now).await?;
        tx.commit()
            .await
            .map_err(query_error("committing settlements"))
    }
}
