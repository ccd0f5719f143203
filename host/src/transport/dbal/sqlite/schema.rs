//! The SQLite schema and its migrations.
//!
//! Migrations are numbered by `PRAGMA user_version` and applied inside
//! `BEGIN IMMEDIATE`, so two processes opening a new file at once cannot race: the
//! second waits for the write lock and then finds nothing left to do.

use rusqlite::{Connection, TransactionBehavior};

use crate::transport::TransportError;
use crate::transport::dbal::query_error;

/// Each entry moves the schema one version forward. Never edit a released entry: add one.
const MIGRATIONS: &[&str] = &[
    // 1: messages, claimed by lease, and the dead-letter table. There is deliberately no
    // index on claimed_by: it would be rewritten by every claim and settlement, and a
    // consumer renews its claims by id.
    "CREATE TABLE wasmq_messages (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        queue        TEXT    NOT NULL,
        processor    TEXT    NOT NULL,
        topic        TEXT    NOT NULL,
        body         BLOB    NOT NULL,
        headers      TEXT    NOT NULL DEFAULT '[]',
        priority     INTEGER NOT NULL DEFAULT 2,
        published_at INTEGER NOT NULL,
        -- when the row may be claimed: its delay, its retry backoff, or the end of
        -- the current claim's lease (renewed by the claiming consumer's heartbeat)
        available_at INTEGER NOT NULL,
        attempt      INTEGER NOT NULL DEFAULT 0,
        claimed_by   TEXT,
        last_error   TEXT
    );
    CREATE INDEX wasmq_messages_claim ON wasmq_messages (queue, priority DESC, id);
    CREATE TABLE wasmq_dead_letters (
        id           INTEGER PRIMARY KEY,
        queue        TEXT    NOT NULL,
        processor    TEXT    NOT NULL,
        topic        TEXT    NOT NULL,
        body         BLOB    NOT NULL,
        headers      TEXT    NOT NULL,
        priority     INTEGER NOT NULL,
        published_at INTEGER NOT NULL,
        attempts     INTEGER NOT NULL,
        error        TEXT    NOT NULL,
        dead_at      INTEGER NOT NULL
    );",
];

/// Brings the schema up to date.
pub fn migrate(conn: &mut Connection) -> Result<(), TransportError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(query_error("locking the database to migrate its schema"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(query_error("reading the schema version"))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        // A newer wasmq wrote this file; running old code against it could corrupt it.
        return Err(TransportError::SchemaTooNew {
            found: version,
            known,
        });
    }
    for sql in &MIGRATIONS[version.max(0) as usize..] {
        tx.execute_batch(sql)
            .map_err(query_error("migrating the schema"))?;
    }
    if version < known {
        tx.execute_batch(&format!("PRAGMA user_version = {known}"))
            .map_err(query_error("recording the schema version"))?;
    }
    tx.commit()
        .map_err(query_error("committing the schema migration"))
}
