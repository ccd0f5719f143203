//! The server schema and its migrations: the same tables as SQLite's schema 3,
//! created on first use under a lock that serialises migrations across processes, so
//! two consumers starting at once cannot race. The version is a row in
//! `wasmq_schema`; an older wasmq refuses a newer schema.

use sqlx::{Any, Executor, pool::PoolConnection};

use super::dialect::Dialect;
use super::{ServerTransport, sqlx_error};
use crate::transport::TransportError;

/// The schema version this wasmq writes and reads.
pub const VERSION: i64 = 1;

/// Version 1. Times are milliseconds since the Unix epoch, taken from the
/// database's clock. The tables and their roles are SQLite's (see its schema.rs):
/// - `wasmq_messages` holds what can be claimed now and what is in flight;
///   `claimed_by` names the consumer holding a row, or `released` (its consumer died:
///   it runs alone);
/// - `wasmq_delayed` holds rows not yet due, moved over when they are;
/// - `wasmq_consumers` holds one lease per consumer, renewed by its heartbeat.
const TABLES: &[&str] = &[
    "CREATE TABLE wasmq_messages (
        seq          {seq},
        id           {id}      NOT NULL DEFAULT {random_id},
        queue        {id}      NOT NULL,
        processor    {id}      NOT NULL,
        priority     BIGINT    NOT NULL DEFAULT 2,
        available_at BIGINT    NOT NULL DEFAULT 0,
        claimed_by   {consumer},
        attempt      BIGINT    NOT NULL DEFAULT 0,
        published_at BIGINT    NOT NULL DEFAULT 0,
        topic        {id}      NOT NULL,
        headers      {text}    NOT NULL,
        last_error   {text},
        body         {blob}    NOT NULL
    ) {table}",
    "CREATE TABLE wasmq_delayed (
        seq          {seq},
        id           {id}      NOT NULL DEFAULT {random_id},
        queue        {id}      NOT NULL,
        processor    {id}      NOT NULL,
        priority     BIGINT    NOT NULL DEFAULT 2,
        available_at BIGINT    NOT NULL,
        attempt      BIGINT    NOT NULL DEFAULT 0,
        published_at BIGINT    NOT NULL DEFAULT 0,
        topic        {id}      NOT NULL,
        headers      {text}    NOT NULL,
        last_error   {text},
        body         {blob}    NOT NULL
    ) {table}",
    "CREATE TABLE wasmq_consumers (
        id          {consumer} NOT NULL PRIMARY KEY,
        lease_until BIGINT     NOT NULL,
        started_at  BIGINT     NOT NULL
    ) {table}",
    "CREATE TABLE wasmq_dead_letters (
        id           {id}      NOT NULL PRIMARY KEY,
        queue        {id}      NOT NULL,
        processor    {id}      NOT NULL,
        topic        {id}      NOT NULL,
        headers      {text}    NOT NULL,
        priority     BIGINT    NOT NULL,
        published_at BIGINT    NOT NULL,
        attempts     BIGINT    NOT NULL,
        error        {text}    NOT NULL,
        dead_at      BIGINT    NOT NULL,
        body         {blob}    NOT NULL
    ) {table}",
    // Where each topic goes, as the consumers' configs and plugins say: what
    // `wasmq_send` routes by. Each consumer rewrites its processors' rows at start.
    "CREATE TABLE wasmq_routes (
        topic       {id}      NOT NULL,
        processor   {id}      NOT NULL,
        queue       {id}      NOT NULL,
        recorded_at BIGINT    NOT NULL,
        PRIMARY KEY (topic, processor)
    ) {table}",
    "CREATE TABLE wasmq_declared_topics (
        processor   {id}      NOT NULL,
        plugin_hash {consumer} NOT NULL,
        topics      {text}    NOT NULL,
        recorded_at BIGINT    NOT NULL,
        PRIMARY KEY (processor, plugin_hash)
    ) {table}",
];

impl ServerTransport {
    /// Brings the schema to [`VERSION`], under the migration lock.
    pub(super) async fn migrate(&self) -> Result<(), TransportError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(sqlx_error("connecting to migrate"))?;
        let d = self.dialect;
        conn.execute(d.migration_lock(&self.prefix).as_str())
            .await
            .map_err(sqlx_error("taking the migration lock"))?;
        let result = self.migrate_locked(&mut conn).await;
        // A dropped connection releases the lock too.
        let _ = conn
            .execute(d.migration_unlock(&self.prefix).as_str())
            .await;
        result
    }

    async fn migrate_locked(&self, conn: &mut PoolConnection<Any>) -> Result<(), TransportError> {
        let d = self.dialect;
        let create = d.ddl(
            &self.prefix,
            "CREATE TABLE IF NOT EXISTS wasmq_schema (version BIGINT NOT NULL) {table}",
        );
        conn.execute(create.as_str())
            .await
            .map_err(sqlx_error("creating the schema version table"))?;
        let found: Option<i64> =
            sqlx::query_scalar(&*d.sql(&self.prefix, "SELECT MAX(version) FROM wasmq_schema"))
                .fetch_one(&mut **conn)
                .await
                .map_err(sqlx_error("reading the schema version"))?;
        let found = found.unwrap_or(0);
        if found > VERSION {
            return Err(TransportError::SchemaTooNew {
                found,
                known: VERSION,
            });
        }
        if found == VERSION {
            return Ok(());
        }
        // PostgreSQL creates everything in one transaction. MySQL commits each DDL
        // statement as it goes: a crash half-way leaves tables without a version row,
        // and the next start fails on "already exists" (README says how to repair).
        let transactional = d == Dialect::Postgres;
        if transactional {
            conn.execute("BEGIN")
                .await
                .map_err(sqlx_error("starting the migration"))?;
        }
        for statement in TABLES {
            conn.execute(d.ddl(&self.prefix, statement).as_str())
                .await
                .map_err(sqlx_error("creating the tables"))?;
        }
        for statement in d.indexes() {
            conn.execute(d.sql(&self.prefix, statement).as_str())
                .await
                .map_err(sqlx_error("creating the indexes"))?;
        }
        for statement in d.producer_routines() {
            conn.execute(d.sql(&self.prefix, statement).as_str())
                .await
                .map_err(sqlx_error("creating wasmq_send"))?;
        }
        conn.execute(d.sql(&self.prefix, "DELETE FROM wasmq_schema").as_str())
            .await
            .map_err(sqlx_error("recording the schema version"))?;
        sqlx::query(&d.sql(
            &self.prefix,
            "INSERT INTO wasmq_schema (version) VALUES (?)",
        ))
        .bind(VERSION)
        .execute(&mut **conn)
        .await
        .map_err(sqlx_error("recording the schema version"))?;
        if transactional {
            conn.execute("COMMIT")
                .await
                .map_err(sqlx_error("committing the migration"))?;
        }
        tracing::info!(
            server = d.name(),
            version = VERSION,
            "created the wasmq tables"
        );
        Ok(())
    }
}
