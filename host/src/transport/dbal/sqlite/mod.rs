//! The SQLite transport: the embedded default, one file in WAL mode.
//!
//! Statements run inline on the calling task, through rusqlite, each in a few
//! microseconds. On this project's 2-core VMs a hand-off to another thread costs ~40 µs
//! (a `SELECT 1` through sqlx's per-connection worker thread measured 56–73 µs), which
//! would bound a consumer near 6,000 messages/s; inline calls leave the Wasm call as
//! the main cost. A write waits at most `BUSY_TIMEOUT` for another process's lock.
//!
//! Durability: `wasmq send` and dead-letter commands commit with `synchronous=FULL`,
//! so a send that returned an id survives power loss. Consumers claim and settle with
//! `synchronous=NORMAL` (WAL fsyncs at checkpoints only): power loss may roll back the
//! last settlements, and rolling one back returns its input message to the queue
//! together with what its processor sent, which is a redelivery, never a loss.

mod consumer;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::message::{Envelope, Priority, now_ms};
use crate::transport::dbal::{decode_headers, encode_headers, new_message_id, query_error};
use crate::transport::{
    DeadLetter, ErrorKind, Receiver, ReceiverOptions, Transport, TransportError,
};

/// How long a write waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Page size of a new database file. Every commit writes each page it touched to the
/// WAL: queue rows are small, and smaller pages mean fewer bytes per commit.
const PAGE_SIZE: i64 = 1024;

/// Prepared statements kept per connection: the claim's, settle's and send's.
const STATEMENT_CACHE: usize = 64;

/// `synchronous` levels used here (see the module comment for why each).
#[derive(Clone, Copy)]
pub(crate) enum Sync {
    Full,
    Normal,
}

pub struct SqliteTransport {
    path: PathBuf,
    /// For sends and dead-letter commands (`synchronous=FULL`).
    conn: Mutex<Connection>,
}

impl SqliteTransport {
    /// Opens the file, creating it and its folder on first use, and migrates the schema.
    pub async fn open(path: &Path) -> Result<SqliteTransport, TransportError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TransportError::Open {
                what: format!("{path:?}"),
                kind: ErrorKind::Query,
                cause: Box::new(e),
            })?;
        }
        let mut conn = connect(path, Sync::Full)?;
        schema::migrate(&mut conn)?;
        Ok(SqliteTransport {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (an open
        // transaction rolls back when its guard drops), so a poisoned lock is usable.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Busy and locked are SQLite's lock waits; every other error repeats.
pub(crate) fn error_kind(error: &rusqlite::Error) -> ErrorKind {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            ErrorKind::Busy
        }
        _ => ErrorKind::Query,
    }
}

pub(crate) fn connect(path: &Path, sync: Sync) -> Result<Connection, TransportError> {
    let open_error = |cause: rusqlite::Error| TransportError::Open {
        what: format!("{path:?}"),
        kind: error_kind(&cause),
        cause: Box::new(cause),
    };
    let conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    // Only takes effect while the file is new and empty (before WAL mode is set).
    conn.pragma_update(None, "page_size", PAGE_SIZE)
        .map_err(open_error)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_error)?;
    let level = match sync {
        Sync::Full => "FULL",
        Sync::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)
        .map_err(open_error)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Inserts envelopes (those with a delay into `wasmq_delayed`, due `delay` after
/// `now`) and returns their new message ids in the order given. Runs inside the
/// caller's transaction.
pub(crate) fn insert_envelopes(
    conn: &Connection,
    envelopes: &[Envelope],
    now: i64,
) -> Result<Vec<String>, TransportError> {
    envelopes
        .iter()
        .map(|e| {
            let id = new_message_id();
            let delay = i64::try_from(e.options.delay.as_millis()).unwrap_or(i64::MAX / 4);
            let table = if delay > 0 {
                "wasmq_delayed"
            } else {
                "wasmq_messages"
            };
            conn.prepare_cached(&format!(
                "INSERT INTO {table} (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
            ))
            .and_then(|mut insert| {
                insert.execute(params![
                    id,
                    e.queue,
                    e.processor,
                    e.topic,
                    e.body,
                    encode_headers(&e.options.headers),
                    i64::from(e.options.priority.level()),
                    now,
                    now.saturating_add(delay),
                ])
            })
            .map_err(query_error("storing messages"))?;
            Ok(id)
        })
        .collect()
}

fn dead_letter_from_row(row: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.get("id")?,
        queue: row.get("queue")?,
        processor: row.get("processor")?,
        topic: row.get("topic")?,
        body: row.get("body")?,
        headers: decode_headers(&row.get::<_, String>("headers")?),
        priority: Priority::from_level(row.get("priority")?),
        attempts: row
            .get::<_, i64>("attempts")?
            .try_into()
            .unwrap_or(u32::MAX),
        published_at_ms: row.get("published_at")?,
        dead_at_ms: row.get("dead_at")?,
        error: row.get("error")?,
    })
}

#[async_trait]
impl Transport for SqliteTransport {
    async fn describe(&self) -> Result<String, TransportError> {
        let schema: i64 = self
            .conn()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(query_error("reading the schema version"))?;
        Ok(format!(
            "SQLite {} at {}, schema version {schema}",
            rusqlite::version(),
            self.path.display()
        ))
    }

    async fn send(&self, envelopes: Vec<Envelope>) -> Result<Vec<String>, TransportError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(query_error("starting a send"))?;
        let ids = insert_envelopes(&tx, &envelopes, now_ms())?;
        tx.commit().map_err(query_error("committing a send"))?;
        Ok(ids)
    }

    async fn receiver(
        &self,
        options: ReceiverOptions,
    ) -> Result<Box<dyn Receiver>, TransportError> {
        let writer = connect(&self.path, Sync::Normal)?;
        // A wait for another process's lock blocks the consumer's thread: keep it
        // short and let the consumer try again (see consumer::CONSUMER_BUSY_TIMEOUT).
        writer
            .busy_timeout(consumer::CONSUMER_BUSY_TIMEOUT.min(options.heartbeat_timeout / 4))
            .map_err(query_error("setting the consumer's busy timeout"))?;
        let watcher = connect(&self.path, Sync::Normal)?;
        watcher
            .busy_timeout(consumer::CONSUMER_BUSY_TIMEOUT)
            .map_err(query_error("setting the consumer's busy timeout"))?;
        Ok(Box::new(consumer::SqliteReceiver::start(
            writer, watcher, options,
        )?))
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, TransportError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT * FROM wasmq_dead_letters ORDER BY dead_at, id")
            .map_err(query_error("listing dead letters"))?;
        stmt.query_map([], dead_letter_from_row)
            .and_then(Iterator::collect)
            .map_err(query_error("listing dead letters"))
    }

    async fn dead_letter(&self, id: &str) -> Result<DeadLetter, TransportError> {
        self.conn()
            .query_row(
                "SELECT * FROM wasmq_dead_letters WHERE id = ?",
                [id.trim()],
                dead_letter_from_row,
            )
            .optional()
            .map_err(query_error("reading a dead letter"))?
            .ok_or_else(|| TransportError::DeadLetterNotFound(id.to_string()))
    }

    async fn replay_dead_letter(&self, id: &str) -> Result<(), TransportError> {
        let id = id.trim();
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(query_error("starting a replay"))?;
        // The message keeps its id; it goes to the back of its priority (a new `seq`).
        let moved = tx
            .execute(
                "INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt)
                 SELECT id, queue, processor, topic, body, headers, priority, published_at, ?, 0
                 FROM wasmq_dead_letters WHERE id = ?",
                params![now_ms(), id],
            )
            .map_err(query_error("replaying a dead letter"))?;
        if moved == 0 {
            return Err(TransportError::DeadLetterNotFound(id.to_string()));
        }
        tx.execute("DELETE FROM wasmq_dead_letters WHERE id = ?", [id])
            .map_err(query_error("removing a replayed dead letter"))?;
        tx.commit().map_err(query_error("committing a replay"))
    }

    async fn purge_dead_letters(&self) -> Result<u64, TransportError> {
        self.conn()
            .execute("DELETE FROM wasmq_dead_letters", [])
            .map(|n| n as u64)
            .map_err(query_error("purging dead letters"))
    }

    async fn record_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
        topics: &[String],
    ) -> Result<(), TransportError> {
        let topics = serde_json::to_string(topics).unwrap_or_else(|_| "[]".into());
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO wasmq_declared_topics (processor, plugin_hash, topics, recorded_at)
                 VALUES (?, ?, ?, ?)",
                params![processor, plugin_hash, topics, now_ms()],
            )
            .map(drop)
            .map_err(query_error("recording a plugin's topics"))
    }

    async fn recorded_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
    ) -> Result<Option<Vec<String>>, TransportError> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT topics FROM wasmq_declared_topics WHERE processor = ? AND plugin_hash = ?",
                params![processor, plugin_hash],
                |row| row.get(0),
            )
            .optional()
            .map_err(query_error("reading a plugin's recorded topics"))?;
        // A record that does not parse is as good as none: the plugin is asked again.
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}
