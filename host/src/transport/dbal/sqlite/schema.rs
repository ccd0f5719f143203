//! The SQLite schema and its migrations.
//!
//! Migrations are numbered by `PRAGMA user_version` and applied inside
//! `BEGIN IMMEDIATE`, so two processes opening a new file at once cannot race: the
//! second waits for the write lock and then finds nothing left to do.

use sqlx::{Connection, SqliteConnection};

use crate::transport::TransportError;
use crate::transport::dbal::query_error;

/// Each entry moves the schema one version forward. Never edit a released entry: add one.
const MIGRATIONS: &[&str] = &[
    // 1: messages, claimed by lease, and the dead-letter table.
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
    CREATE INDEX wasmq_messages_claimed_by ON wasmq_messages (claimed_by)
        WHERE claimed_by IS NOT NULL;
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
pub async fn migrate(conn: &mut SqliteConnection) -> Result<(), TransportError> {
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(query_error("locking the database to migrate its schema"))?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(query_error("reading the schema version"))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        // A newer wasmq wrote this file; running old code against it could corrupt it.
        return Err(TransportError::Query {
            doing: "checking the schema version",
            source: sqlx::Error::Protocol(format!(
                "the database schema is version {version}, newer than this wasmq knows ({}): upgrade wasmq",
                MIGRATIONS.len()
            )),
        });
    }
    for sql in &MIGRATIONS[version..] {
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(query_error("migrating the schema"))?;
    }
    if version < MIGRATIONS.len() {
        sqlx::raw_sql(&format!("PRAGMA user_version = {}", MIGRATIONS.len()))
            .execute(&mut *tx)
            .await
            .map_err(query_error("recording the schema version"))?;
    }
    tx.commit()
        .await
        .map_err(query_error("committing the schema migration"))
}
