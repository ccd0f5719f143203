//! The SQLite transport: the embedded default, one file in WAL mode.
//!
//! Durability: `wasmq send` and dead-letter commands commit with `synchronous=FULL`,
//! so a send that returned an id survives power loss. Consumers claim and settle with
//! `synchronous=NORMAL` (WAL fsyncs at checkpoints only): power loss may roll back the
//! last settlements, and rolling one back returns its input message to the queue
//! together with what its processor sent, which is a redelivery, never a loss.

mod consumer;
mod schema;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Row, SqliteConnection};

use crate::message::{Envelope, Priority, now_ms};
use crate::transport::dbal::{decode_headers, encode_headers, query_error};
use crate::transport::{DeadLetter, Receiver, ReceiverOptions, Transport, TransportError};

/// How long a write waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows per multi-row INSERT: 9 bound values each stays far below SQLite's 32,766.
const INSERT_CHUNK: usize = 1000;

pub struct SqliteTransport {
    path: PathBuf,
    /// Connections for sends and dead-letter commands (`synchronous=FULL`).
    pool: SqlitePool,
}

impl SqliteTransport {
    /// Opens the file, creating it and its folder on first use, and migrates the schema.
    pub async fn open(path: &Path) -> Result<SqliteTransport, TransportError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TransportError::Open {
                what: format!("{path:?}"),
                source: sqlx::Error::Io(e),
            })?;
        }
        let mut conn = connect(path, SqliteSynchronous::Full).await?;
        schema::migrate(&mut conn).await?;
        conn.close().await.ok();
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(connect_options(path, SqliteSynchronous::Full))
            .await
            .map_err(|source| TransportError::Open {
                what: format!("{path:?}"),
                source,
            })?;
        Ok(SqliteTransport {
            path: path.to_path_buf(),
            pool,
        })
    }
}

fn connect_options(path: &Path, synchronous: SqliteSynchronous) -> SqliteConnectOptions {
    SqliteConnectOptions::from_str("sqlite://")
        .expect("static sqlite options")
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(BUSY_TIMEOUT)
}

async fn connect(
    path: &Path,
    synchronous: SqliteSynchronous,
) -> Result<SqliteConnection, TransportError> {
    SqliteConnection::connect_with(&connect_options(path, synchronous))
        .await
        .map_err(|source| TransportError::Open {
            what: format!("{path:?}"),
            source,
        })
}

/// Inserts envelopes (visible after their delay, counted from `now`) and returns
/// their ids in the order given.
pub(crate) async fn insert_envelopes(
    conn: &mut SqliteConnection,
    envelopes: &[Envelope],
    now: i64,
) -> Result<Vec<i64>, TransportError> {
    let mut ids = Vec::with_capacity(envelopes.len());
    for chunk in envelopes.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO wasmq_messages (queue, processor, topic, body, headers, priority, published_at, available_at, attempt) VALUES ",
        );
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?,?,?,?,0)"
            } else {
                ",(?,?,?,?,?,?,?,?,0)"
            });
        }
        sql.push_str(" RETURNING id");
        let mut query = sqlx::query_scalar::<_, i64>(&sql);
        for e in chunk {
            let delay = i64::try_from(e.options.delay.as_millis()).unwrap_or(i64::MAX / 2);
            query = query
                .bind(&e.queue)
                .bind(&e.processor)
                .bind(&e.topic)
                .bind(&e.body)
                .bind(encode_headers(&e.options.headers))
                .bind(i64::from(e.options.priority.level()))
                .bind(now)
                .bind(now.saturating_add(delay));
        }
        let mut chunk_ids = query
            .fetch_all(&mut *conn)
            .await
            .map_err(query_error("storing messages"))?;
        // AUTOINCREMENT ids grow in insertion order; RETURNING's order is unspecified.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

fn dead_letter_from_row(row: &sqlx::sqlite::SqliteRow) -> DeadLetter {
    DeadLetter {
        id: row.get::<i64, _>("id").to_string(),
        queue: row.get("queue"),
        processor: row.get("processor"),
        topic: row.get("topic"),
        body: row.get("body"),
        headers: decode_headers(row.get::<&str, _>("headers")),
        priority: Priority::from_level(row.get("priority")),
        attempts: row.get::<i64, _>("attempts").try_into().unwrap_or(u32::MAX),
        published_at_ms: row.get("published_at"),
        dead_at_ms: row.get("dead_at"),
        error: row.get("error"),
    }
}

fn parse_id(id: &str) -> Result<i64, TransportError> {
    id.trim()
        .parse()
        .map_err(|_| TransportError::DeadLetterNotFound(id.to_string()))
}

#[async_trait]
impl Transport for SqliteTransport {
    async fn send(&self, envelopes: Vec<Envelope>) -> Result<Vec<String>, TransportError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(query_error("connecting to send"))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_error("starting a send"))?;
        let ids = insert_envelopes(&mut tx, &envelopes, now_ms()).await?;
        tx.commit()
            .await
            .map_err(query_error("committing a send"))?;
        Ok(ids.into_iter().map(|id| id.to_string()).collect())
    }

    async fn receiver(
        &self,
        options: ReceiverOptions,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        let writer = connect(&self.path, SqliteSynchronous::Normal).await?;
        let watcher = connect(&self.path, SqliteSynchronous::Normal).await?;
        Ok(Box::new(
            consumer::SqliteReceiver::start(writer, watcher, options).await?,
        ))
    }

    async fn queue_depths(&self) -> Result<Vec<(String, u64)>, TransportError> {
        let rows = sqlx::query(
            "SELECT queue, COUNT(*) AS n FROM wasmq_messages GROUP BY queue ORDER BY queue",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("counting queued messages"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get("queue"), r.get::<i64, _>("n").max(0) as u64))
            .collect())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, TransportError> {
        let rows = sqlx::query("SELECT * FROM wasmq_dead_letters ORDER BY dead_at, id")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("listing dead letters"))?;
        Ok(rows.iter().map(dead_letter_from_row).collect())
    }

    async fn dead_letter(&self, id: &str) -> Result<DeadLetter, TransportError> {
        let row = sqlx::query("SELECT * FROM wasmq_dead_letters WHERE id = ?")
            .bind(parse_id(id)?)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("reading a dead letter"))?;
        row.as_ref()
            .map(dead_letter_from_row)
            .ok_or_else(|| TransportError::DeadLetterNotFound(id.to_string()))
    }

    async fn replay_dead_letter(&self, id: &str) -> Result<(), TransportError> {
        let numeric = parse_id(id)?;
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(query_error("connecting to replay"))?;
        let mut tx = conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(query_error("starting a replay"))?;
        // The original id is free: AUTOINCREMENT never hands out an id twice.
        let moved = sqlx::query(
            "INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt)
             SELECT id, queue, processor, topic, body, headers, priority, published_at, ?, 0
             FROM wasmq_dead_letters WHERE id = ?",
        )
        .bind(now_ms())
        .bind(numeric)
        .execute(&mut *tx)
        .await
        .map_err(query_error("replaying a dead letter"))?;
        if moved.rows_affected() == 0 {
            return Err(TransportError::DeadLetterNotFound(id.to_string()));
        }
        sqlx::query("DELETE FROM wasmq_dead_letters WHERE id = ?")
            .bind(numeric)
            .execute(&mut *tx)
            .await
            .map_err(query_error("removing a replayed dead letter"))?;
        tx.commit()
            .await
            .map_err(query_error("committing a replay"))
    }

    async fn purge_dead_letters(&self) -> Result<u64, TransportError> {
        let done = sqlx::query("DELETE FROM wasmq_dead_letters")
            .execute(&self.pool)
            .await
            .map_err(query_error("purging dead letters"))?;
        Ok(done.rows_affected())
    }
}
