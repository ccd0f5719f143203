//! The PostgreSQL and MySQL/MariaDB transports: many consumers on many hosts share
//! one database.
//!
//! Both run the same statements (written once, adapted by [`dialect::Dialect`])
//! through one sqlx `Any` pool, with the SQLite transport's rules: a claim takes
//! rows `FOR UPDATE SKIP LOCKED`, so consumers never wait for each other's rows and
//! never take the same one; a claim is leased by its consumer's row in
//! `wasmq_consumers`, renewed by a heartbeat; every settlement is conditioned on
//! the claim, so a consumer that lost its claim commits nothing; and leases, delays
//! and backoff are measured on the database's clock, never a host's.
//!
//! PostgreSQL wakes idle consumers with LISTEN/NOTIFY; MySQL has no such thing, so
//! its consumers poll (BENCHMARKS.md has the latency).

pub mod dialect;
mod receiver;
mod schema;
mod settle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use self::dialect::Dialect;
use crate::message::{Envelope, Priority};
use crate::transport::dbal::{decode_headers, encode_headers};
use crate::transport::{
    DeadLetter, ErrorKind, Receiver, ReceiverOptions, ServerUrl, Transport, TransportError,
};

/// Connections in one process's pool: a consumer claims on one, settles on one and
/// renews its lease on one, with one to spare; `wasmq send` uses one. PostgreSQL's
/// LISTEN takes one more, outside the pool.
const POOL_SIZE: u32 = 4;

/// How long opening the store, and `wasmq send`, keep trying while the server is
/// unreachable (restarting, say) before they give up.
const RETRY_FOR: Duration = Duration::from_secs(15);

/// First pause between tries; it doubles up to [`MAX_RETRY_PAUSE`].
const RETRY_PAUSE: Duration = Duration::from_millis(50);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Columns of a message row, in the order [`message_from_row`] reads them.
const MESSAGE_COLUMNS: &str =
    "seq, id, queue, processor, topic, body, headers, priority, published_at, attempt";

#[derive(Clone)]
pub struct ServerTransport {
    pool: AnyPool,
    dialect: Dialect,
    /// The server's version string, as it gave it.
    version: String,
    /// `[transport] table_prefix`: every table's name starts with it.
    prefix: String,
    url: ServerUrl,
}

impl ServerTransport {
    /// Connects (retrying for a while if the server is not up yet), checks the
    /// server's version and brings the schema up to date.
    pub async fn open(
        url: &ServerUrl,
        dialect: Dialect,
        prefix: &str,
    ) -> Result<ServerTransport, TransportError> {
        sqlx::any::install_default_drivers();
        let pool = connect(url, None).await?;
        let query = match dialect {
            Dialect::Postgres => "SELECT current_setting('server_version')",
            Dialect::Mysql => "SELECT VERSION()",
        };
        let version: String = sqlx::query_scalar(query)
            .fetch_one(&pool)
            .await
            .map_err(sqlx_error("reading the server version"))?;
        dialect::check_version(dialect, &version).map_err(|why| TransportError::Open {
            what: url.to_string(),
            kind: ErrorKind::Schema,
            cause: why.into(),
        })?;
        let transport = ServerTransport {
            pool,
            dialect,
            version,
            prefix: prefix.to_string(),
            url: url.clone(),
        };
        transport.migrate().await?;
        Ok(transport)
    }

    /// The same store on a pool of the consumer's own, whose sessions the server ends
    /// when they sit in a transaction for half a lease: a consumer frozen inside a
    /// claim (SIGSTOP, a VM pause) would otherwise hold its row locks, and so its
    /// lease, for as long as it stays frozen.
    async fn for_consumer(&self, lease: Duration) -> Result<ServerTransport, TransportError> {
        let half = lease / 2;
        let setting = match self.dialect {
            Dialect::Postgres => format!(
                "SET idle_in_transaction_session_timeout = {}",
                half.as_millis().max(1)
            ),
            // Whole seconds only. MySQL has no idle-transaction timeout: its idle
            // timeout ends the pool's idle sessions too, which reconnect.
            Dialect::Mysql if self.version.to_ascii_lowercase().contains("mariadb") => format!(
                "SET SESSION idle_transaction_timeout = {}",
                half.as_secs().max(1)
            ),
            Dialect::Mysql => format!("SET SESSION wait_timeout = {}", half.as_secs().max(1)),
        };
        Ok(ServerTransport {
            pool: connect(&self.url, Some(setting)).await?,
            ..self.clone()
        })
    }

    /// `text` for this server and prefix (see [`Dialect::sql`]).
    fn sql(&self, text: &str) -> String {
        self.dialect.sql(&self.prefix, text)
    }

    /// The PostgreSQL channel that `send` notifies and idle consumers listen on.
    fn channel(&self) -> String {
        format!("{}messages", self.prefix)
    }

    async fn begin(
        &self,
        doing: &'static str,
    ) -> Result<Transaction<'static, Any>, TransportError> {
        self.pool.begin().await.map_err(sqlx_error(doing))
    }

    /// Wakes listening consumers once the transaction commits (PostgreSQL only).
    async fn notify(&self, tx: &mut Transaction<'static, Any>) -> Result<(), TransportError> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(self.channel())
                .execute(&mut **tx)
                .await
                .map_err(sqlx_error("notifying consumers"))?;
        }
        Ok(())
    }

    /// Inserts envelopes inside the caller's transaction (those with a delay into
    /// `wasmq_delayed`); returns their new ids in order.
    async fn insert_envelopes(
        &self,
        tx: &mut Transaction<'static, Any>,
        envelopes: &[Envelope],
    ) -> Result<Vec<String>, TransportError> {
        let mut ids = Vec::with_capacity(envelopes.len());
        for e in envelopes {
            let id = crate::transport::dbal::new_message_id();
            let delay = i64::try_from(e.options.delay.as_millis()).unwrap_or(i64::MAX / 4);
            let table = if delay > 0 {
                "wasmq_delayed"
            } else {
                "wasmq_messages"
            };
            let sql = self.sql(&format!(
                "INSERT INTO {table} (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt)
                 VALUES (?, ?, ?, ?, ?, ?, ?, {{now}}, {{now}} + ?, 0)"
            ));
            sqlx::query(&sql)
                .bind(&id)
                .bind(&e.queue)
                .bind(&e.processor)
                .bind(&e.topic)
                .bind(e.body.clone())
                .bind(encode_headers(&e.options.headers))
                .bind(i64::from(e.options.priority.level()))
                .bind(delay)
                .execute(&mut **tx)
                .await
                .map_err(sqlx_error("storing a message"))?;
            ids.push(id);
        }
        Ok(ids)
    }

    async fn send_once(&self, envelopes: &[Envelope]) -> Result<Vec<String>, TransportError> {
        let mut tx = self.begin("starting a send").await?;
        let ids = self.insert_envelopes(&mut tx, envelopes).await?;
        self.notify(&mut tx).await?;
        tx.commit().await.map_err(sqlx_error("committing a send"))?;
        Ok(ids)
    }
}

/// A pool on `url`, each session starting with `setting`; retried while the server
/// is unreachable.
async fn connect(url: &ServerUrl, setting: Option<String>) -> Result<AnyPool, TransportError> {
    let opened = retrying("connecting", || {
        let setting = setting.clone();
        async move {
            AnyPoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(RETRY_FOR)
                .after_connect(move |conn, _| {
                    let setting = setting.clone();
                    Box::pin(async move {
                        if let Some(setting) = setting {
                            sqlx::Executor::execute(conn, setting.as_str()).await?;
                        }
                        Ok(())
                    })
                })
                .connect(url.secret())
                .await
                .map_err(sqlx_error("connecting"))
        }
    })
    .await;
    opened.map_err(|e| TransportError::Open {
        what: url.to_string(),
        kind: e.kind(),
        cause: e.to_string().into(),
    })
}

/// Runs `attempt` until it succeeds, fails for good, or [`RETRY_FOR`] has passed.
async fn retrying<T, F, Fut>(doing: &str, mut attempt: F) -> Result<T, TransportError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
{
    let started = Instant::now();
    let mut pause = RETRY_PAUSE;
    loop {
        match attempt().await {
            Err(e) if e.is_retryable() && started.elapsed() < RETRY_FOR => {
                tracing::debug!(error = %e, "{doing}: trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// Wraps an sqlx error with what we were doing, and its kind.
pub(crate) fn sqlx_error(doing: &'static str) -> impl FnOnce(sqlx::Error) -> TransportError {
    move |cause| TransportError::Query {
        doing,
        kind: error_kind(&cause),
        cause: Box::new(cause),
    }
}

/// Lock waits, deadlocks and serialization failures are worth retrying, and so is
/// a connection that broke or could not be made; anything else repeats.
fn error_kind(error: &sqlx::Error) -> ErrorKind {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => ErrorKind::ConnectionLost,
        sqlx::Error::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return match my.number() {
                    // lock wait timeout, deadlock
                    1205 | 1213 => ErrorKind::Busy,
                    // server shutdown, connection killed, server gone, lost
                    1053 | 1927 | 2006 | 2013 => ErrorKind::ConnectionLost,
                    _ => ErrorKind::Query,
                };
            }
            match db.code().as_deref() {
                // serialization failure, deadlock, lock not available
                Some("40001" | "40P01" | "55P03") => ErrorKind::Busy,
                // admin shutdown, crash shutdown, cannot connect now, connection errors
                Some(code) if code.starts_with("57P") || code.starts_with("08") => {
                    ErrorKind::ConnectionLost
                }
                _ => ErrorKind::Query,
            }
        }
        _ => ErrorKind::Query,
    }
}

/// A long text column. MySQL reports LONGTEXT as a BLOB type with a character set,
/// which sqlx's Any driver reads only as bytes.
pub(super) fn text(row: &AnyRow, column: &str) -> Result<String, sqlx::Error> {
    match row.try_get::<String, _>(column) {
        Ok(text) => Ok(text),
        Err(_) => row
            .try_get::<Vec<u8>, _>(column)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    }
}

fn dead_letter_from_row(row: &AnyRow) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        processor: row.try_get("processor")?,
        topic: row.try_get("topic")?,
        body: row.try_get("body")?,
        headers: decode_headers(&text(row, "headers")?),
        priority: Priority::from_level(row.try_get("priority")?),
        attempts: row
            .try_get::<i64, _>("attempts")?
            .try_into()
            .unwrap_or(u32::MAX),
        published_at_ms: row.try_get("published_at")?,
        dead_at_ms: row.try_get("dead_at")?,
        error: text(row, "error")?,
    })
}

#[async_trait]
impl Transport for ServerTransport {
    async fn describe(&self) -> Result<String, TransportError> {
        Ok(format!(
            "{} {} at {}, schema version {}, tables {}*",
            self.dialect.name(),
            self.version,
            self.url,
            schema::VERSION,
            self.prefix
        ))
    }

    async fn send(&self, envelopes: Vec<Envelope>) -> Result<Vec<String>, TransportError> {
        // A send cut off by a dropped connection did not commit: trying again stores
        // it once.
        retrying("sending", || self.send_once(&envelopes))
            .await
            .map_err(|e| TransportError::Open {
                what: self.url.to_string(),
                kind: e.kind(),
                cause: e.to_string().into(),
            })
    }

    async fn receiver(
        &self,
        options: ReceiverOptions,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        let store = self.for_consumer(options.heartbeat_timeout).await?;
        let receiver = receiver::ServerReceiver::start(Arc::new(store), &self.url, options).await?;
        Ok(Box::new(receiver))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, TransportError> {
        let sql = self.sql("SELECT * FROM wasmq_dead_letters ORDER BY dead_at, id");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(sqlx_error("listing dead letters"))?;
        rows.iter()
            .map(dead_letter_from_row)
            .collect::<Result<_, _>>()
            .map_err(sqlx_error("reading dead letters"))
    }

    async fn dead_letter(&self, id: &str) -> Result<DeadLetter, TransportError> {
        let sql = self.sql("SELECT * FROM wasmq_dead_letters WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.trim())
            .fetch_optional(&self.pool)
            .await
            .map_err(sqlx_error("reading a dead letter"))?
            .ok_or_else(|| TransportError::DeadLetterNotFound(id.to_string()))?;
        dead_letter_from_row(&row).map_err(sqlx_error("reading a dead letter"))
    }

    async fn replay_dead_letter(&self, id: &str) -> Result<(), TransportError> {
        let id = id.trim();
        let mut tx = self.begin("starting a replay").await?;
        // The message keeps its id; it goes to the back of its priority (a new `seq`).
        let moved = sqlx::query(&self.sql(
            "INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt)
             SELECT id, queue, processor, topic, body, headers, priority, published_at, {now}, 0
             FROM wasmq_dead_letters WHERE id = ?",
        ))
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("replaying a dead letter"))?;
        if moved.rows_affected() == 0 {
            return Err(TransportError::DeadLetterNotFound(id.to_string()));
        }
        sqlx::query(&self.sql("DELETE FROM wasmq_dead_letters WHERE id = ?"))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(sqlx_error("replaying a dead letter"))?;
        self.notify(&mut tx).await?;
        tx.commit().await.map_err(sqlx_error("committing a replay"))
    }

    async fn purge_dead_letters(&self) -> Result<u64, TransportError> {
        sqlx::query(&self.sql("DELETE FROM wasmq_dead_letters"))
            .execute(&self.pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(sqlx_error("purging dead letters"))
    }

    async fn record_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
        topics: &[String],
    ) -> Result<(), TransportError> {
        let topics = serde_json::to_string(topics).unwrap_or_else(|_| "[]".into());
        let mut tx = self.begin("recording a plugin's topics").await?;
        sqlx::query(
            &self.sql("DELETE FROM wasmq_declared_topics WHERE processor = ? AND plugin_hash = ?"),
        )
        .bind(processor)
        .bind(plugin_hash)
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("recording a plugin's topics"))?;
        sqlx::query(&self.sql(
            "INSERT INTO wasmq_declared_topics (processor, plugin_hash, topics, recorded_at)
             VALUES (?, ?, ?, {now})",
        ))
        .bind(processor)
        .bind(plugin_hash)
        .bind(topics)
        .execute(&mut *tx)
        .await
        .map_err(sqlx_error("recording a plugin's topics"))?;
        tx.commit()
            .await
            .map_err(sqlx_error("recording a plugin's topics"))
    }

    async fn record_routes(
        &self,
        routes: &[(String, String, String)],
    ) -> Result<(), TransportError> {
        let mut tx = self.begin("recording routes").await?;
        let mut processors: Vec<&str> = routes.iter().map(|(_, _, p)| p.as_str()).collect();
        processors.sort_unstable();
        processors.dedup();
        for processor in processors {
            sqlx::query(&self.sql("DELETE FROM wasmq_routes WHERE processor = ?"))
                .bind(processor)
                .execute(&mut *tx)
                .await
                .map_err(sqlx_error("recording routes"))?;
        }
        for (topic, queue, processor) in routes {
            sqlx::query(&self.sql(
                "INSERT INTO wasmq_routes (topic, processor, queue, recorded_at) VALUES (?, ?, ?, {now})",
            ))
            .bind(topic.as_str())
            .bind(processor.as_str())
            .bind(queue.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sqlx_error("recording routes"))?;
        }
        tx.commit().await.map_err(sqlx_error("recording routes"))
    }

    async fn recorded_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
    ) -> Result<Option<Vec<String>>, TransportError> {
        let row = sqlx::query(&self.sql(
            "SELECT topics FROM wasmq_declared_topics WHERE processor = ? AND plugin_hash = ?",
        ))
        .bind(processor)
        .bind(plugin_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(sqlx_error("reading a plugin's recorded topics"))?;
        let topics = row
            .map(|row| text(&row, "topics"))
            .transpose()
            .map_err(sqlx_error("reading a plugin's recorded topics"))?;
        // A record that does not parse is as good as none: the plugin is asked again.
        Ok(topics.and_then(|t| serde_json::from_str(&t).ok()))
    }
}
