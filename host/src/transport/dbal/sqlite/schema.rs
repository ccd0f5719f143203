//! The SQLite schema and its migrations.
//!
//! Migrations are numbered by `PRAGMA user_version` and applied inside
//! `BEGIN IMMEDIATE`, so two processes opening a new file at once cannot race: the
//! second waits for the write lock and then finds nothing left to do.

use rusqlite::{Connection, TransactionBehavior};

use crate::transport::TransportError;
use crate::transport::dbal::query_error;

/// Each entry moves the schema one version forward. Never edit a released entry: add one.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 2: string message ids, delayed rows apart, claims by queue and processor.
    // - `id` is the message id (a UUIDv7 from wasmq; a random hex string for rows a
    //   foreign SQL client inserts without one); `seq` only orders rows. Existing rows
    //   keep their id, as text.
    // - Rows not yet due (a delay or a retry backoff) wait in `wasmq_delayed`, and a
    //   claim moves those that are due. The queue table then holds only what can be
    //   claimed now and what is in flight, so a claim never walks past a million
    //   delayed rows. Version 1's waiting rows move there now.
    // - A claim is leased by its consumer's row in `wasmq_consumers`, renewed once per
    //   heartbeat for all its claims. When a consumer's lease runs out, another one
    //   marks its claims `released`; a small partial index finds those, to run alone.
    //   Version 1's claims in flight (their consumers are older versions, stopped for
    //   the upgrade) are released too.
    // - The columns a claim reads come before the body: reading a column after a
    //   large body would read the body's overflow pages too.
    // - `wasmq_processors` records when a consumer last had each processor, so a
    //   message nobody can run is dead-lettered after `orphan_timeout`.
    "CREATE TABLE wasmq_messages_v2 (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL DEFAULT (lower(hex(randomblob(16)))),
        queue        TEXT    NOT NULL,
        processor    TEXT    NOT NULL,
        priority     INTEGER NOT NULL DEFAULT 2,
        -- when the row became claimable
        available_at INTEGER NOT NULL,
        -- the consumer holding it, or 'released' (its consumer died: it runs alone)
        claimed_by   TEXT,
        attempt      INTEGER NOT NULL DEFAULT 0,
        published_at INTEGER NOT NULL,
        topic        TEXT    NOT NULL,
        headers      TEXT    NOT NULL DEFAULT '[]',
        last_error   TEXT,
        body         BLOB    NOT NULL
    );
    CREATE TABLE wasmq_delayed (
        seq          INTEGER PRIMARY KEY,
        id           TEXT    NOT NULL DEFAULT (lower(hex(randomblob(16)))),
        queue        TEXT    NOT NULL,
        processor    TEXT    NOT NULL,
        priority     INTEGER NOT NULL DEFAULT 2,
        -- when the row moves to wasmq_messages
        available_at INTEGER NOT NULL,
        attempt      INTEGER NOT NULL DEFAULT 0,
        published_at INTEGER NOT NULL,
        topic        TEXT    NOT NULL,
        headers      TEXT    NOT NULL DEFAULT '[]',
        last_error   TEXT,
        body         BLOB    NOT NULL
    );
    INSERT INTO wasmq_delayed (id, queue, processor, priority, available_at, attempt,
                               published_at, topic, headers, last_error, body)
        SELECT CAST(id AS TEXT), queue, processor, priority, available_at, attempt,
               published_at, topic, headers, last_error, body
        FROM wasmq_messages
        WHERE claimed_by IS NULL AND available_at > CAST(unixepoch('subsec') * 1000 AS INTEGER)
        ORDER BY available_at, id;
    INSERT INTO wasmq_messages_v2 (seq, id, queue, processor, priority, available_at, claimed_by,
                                   attempt, published_at, topic, headers, last_error, body)
        SELECT id, CAST(id AS TEXT), queue, processor, priority, available_at,
               CASE WHEN claimed_by IS NULL THEN NULL ELSE 'released' END,
               attempt, published_at, topic, headers, last_error, body
        FROM wasmq_messages
        WHERE CAST(id AS TEXT) NOT IN (SELECT id FROM wasmq_delayed);
    DROP TABLE wasmq_messages;
    ALTER TABLE wasmq_messages_v2 RENAME TO wasmq_messages;
    CREATE INDEX wasmq_messages_claim ON wasmq_messages (queue, processor, priority DESC, seq);
    CREATE INDEX wasmq_messages_released ON wasmq_messages (queue, processor, priority DESC, seq)
        WHERE claimed_by = 'released';
    CREATE TABLE wasmq_consumers (
        id          TEXT    PRIMARY KEY,
        -- its claims are its own until then; renewed by its heartbeat
        lease_until INTEGER NOT NULL,
        started_at  INTEGER NOT NULL
    );
    CREATE INDEX wasmq_delayed_due ON wasmq_delayed (available_at);
    CREATE TABLE wasmq_dead_letters_v2 (
        id           TEXT    PRIMARY KEY,
        queue        TEXT    NOT NULL,
        processor    TEXT    NOT NULL,
        topic        TEXT    NOT NULL,
        headers      TEXT    NOT NULL,
        priority     INTEGER NOT NULL,
        published_at INTEGER NOT NULL,
        attempts     INTEGER NOT NULL,
        error        TEXT    NOT NULL,
        dead_at      INTEGER NOT NULL,
        body         BLOB    NOT NULL
    );
    INSERT INTO wasmq_dead_letters_v2 (id, queue, processor, topic, headers, priority,
                                       published_at, attempts, error, dead_at, body)
        SELECT CAST(id AS TEXT), queue, processor, topic, headers, priority,
               published_at, attempts, error, dead_at, body
        FROM wasmq_dead_letters;
    DROP TABLE wasmq_dead_letters;
    ALTER TABLE wasmq_dead_letters_v2 RENAME TO wasmq_dead_letters;
    CREATE INDEX wasmq_dead_letters_age ON wasmq_dead_letters (dead_at);
    CREATE TABLE wasmq_processors (
        queue     TEXT    NOT NULL,
        processor TEXT    NOT NULL,
        seen_at   INTEGER NOT NULL,
        PRIMARY KEY (queue, processor)
    );",
    // 3: the topics each plugin build declared (subscribed-topics), recorded when a
    // consumer or `wasmq check` loaded it, so `wasmq send` routes without running
    // plugin code. Keyed by the plugin file's hash: a new build is asked again.
    "CREATE TABLE wasmq_declared_topics (
        processor   TEXT    NOT NULL,
        plugin_hash TEXT    NOT NULL,
        topics      TEXT    NOT NULL,
        recorded_at INTEGER NOT NULL,
        PRIMARY KEY (processor, plugin_hash)
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
