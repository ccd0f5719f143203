//! Claiming: which rows a consumer may take, in what order, and how it finds out,
//! without the write lock, whether there is anything to take.
//!
//! A consumer claims only rows for the (queue, processor) pairs it can run. Each
//! pair's rows are read from the claim index in priority order, at most `max` each,
//! and merged, so a claim costs the same with one row waiting or a million. A claim
//! writes only `claimed_by` and `attempt`, which no index holds: its lease is its
//! consumer's row. Rows released by a consumer that died are found through a partial
//! index that holds only them, and are handed out one at a time, to run alone.

use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use crate::message::{Message, Priority};
use crate::transport::dbal::{decode_headers, query_error};

use super::settle::RELEASED;
use crate::transport::{MAX_SUBSCRIPTIONS, Subscription, TransportError};

/// Rows moved from `wasmq_delayed` per claim at most, so a million messages falling
/// due at once never hold the write lock for long.
const PROMOTE_BATCH: i64 = 1000;

/// One claimed row.
pub(super) struct ClaimedRow {
    pub seq: i64,
    pub processor: String,
    pub queue: String,
    pub message: Message,
}

const RETURNING: &str =
    "RETURNING seq, id, queue, processor, topic, body, headers, priority, published_at, attempt";

/// The consumer's statements, built once for its subscriptions. Parameters: ?1 the
/// consumer id, ?2 unused, ?3 now, ?4 how many to claim, then each subscription's
/// queue and processor. Every statement names the last parameter, so SQLite counts
/// them all and one argument list fits every statement.
pub(super) struct ClaimSql {
    shared: String,
    alone: String,
    look: String,
    subscriptions: Vec<Value>,
}

impl ClaimSql {
    pub fn new(subscriptions: &[Subscription]) -> Result<ClaimSql, TransportError> {
        if subscriptions.len() > MAX_SUBSCRIPTIONS {
            return Err(TransportError::TooManySubscriptions(subscriptions.len()));
        }
        // `columns` of the ready rows of subscription `i`, best first.
        let ready = |i: usize, columns: &str, limit: &str| {
            let (q, p) = (5 + 2 * i, 6 + 2 * i);
            format!(
                "SELECT {columns} FROM wasmq_messages
                 WHERE queue = ?{q} AND processor = ?{p} AND claimed_by IS NULL AND available_at <= ?3
                 ORDER BY priority DESC, seq LIMIT {limit}"
            )
        };
        // One processor reads the index in order; several are merged.
        let ready_rows = |limit: &str| match subscriptions.len() {
            1 => ready(0, "seq", limit),
            n => {
                let union = (0..n)
                    .map(|i| format!("SELECT * FROM ({})", ready(i, "seq, priority", limit)))
                    .collect::<Vec<_>>()
                    .join(" UNION ALL ");
                format!("SELECT seq FROM ({union}) ORDER BY priority DESC, seq LIMIT {limit}")
            }
        };
        let pairs = (0..subscriptions.len())
            .map(|i| format!("(?{}, ?{})", 5 + 2 * i, 6 + 2 * i))
            .collect::<Vec<_>>()
            .join(", ");
        let released = format!(
            "FROM wasmq_messages WHERE claimed_by = '{RELEASED}' AND (queue, processor) IN (VALUES {pairs})"
        );
        let claim = "UPDATE wasmq_messages SET claimed_by = ?1, attempt = attempt + 1";
        Ok(ClaimSql {
            shared: format!("{claim} WHERE seq IN ({}) {RETURNING}", ready_rows("?4")),
            alone: format!(
                "{claim} WHERE seq = (SELECT seq {released} ORDER BY priority DESC, seq LIMIT 1) {RETURNING}"
            ),
            look: format!(
                "SELECT EXISTS (SELECT 1 FROM wasmq_delayed WHERE available_at <= ?3)
                     OR EXISTS (SELECT 1 {released})
                     OR EXISTS ({})",
                ready_rows("1")
            ),
            subscriptions: subscriptions
                .iter()
                .flat_map(|s| {
                    [
                        Value::from(s.queue.clone()),
                        Value::from(s.processor.clone()),
                    ]
                })
                .collect(),
        })
    }

    fn args(&self, consumer: &str, now: i64, max: usize) -> Vec<Value> {
        let mut args: Vec<Value> = vec![
            consumer.to_string().into(),
            Value::Null,
            now.into(),
            i64::try_from(max).unwrap_or(i64::MAX).into(),
        ];
        args.extend(self.subscriptions.iter().cloned());
        args
    }

    /// Claims up to `max` rows that may run side by side, highest priority first.
    pub fn claim_shared(
        &self,
        conn: &Connection,
        consumer: &str,
        now: i64,
        max: usize,
    ) -> Result<Vec<ClaimedRow>, TransportError> {
        let mut rows = claim(conn, &self.shared, self.args(consumer, now, max))?;
        // RETURNING's order is unspecified: restore priority, then age.
        rows.sort_by_key(|r| (std::cmp::Reverse(r.message.priority), r.seq));
        Ok(rows)
    }

    /// Claims one row released by a consumer that died, if any.
    pub fn claim_alone(
        &self,
        conn: &Connection,
        consumer: &str,
        now: i64,
    ) -> Result<Option<ClaimedRow>, TransportError> {
        Ok(claim(conn, &self.alone, self.args(consumer, now, 1))?.pop())
    }

    /// A read that takes no write lock: is there anything to claim or to move from
    /// `wasmq_delayed`?
    pub fn look(
        &self,
        conn: &Connection,
        consumer: &str,
        now: i64,
    ) -> Result<bool, TransportError> {
        query_bool(conn, &self.look, self.args(consumer, now, 0))
    }
}

/// When the next delayed row falls due, if ever.
pub(super) fn next_due(conn: &Connection) -> Result<Option<i64>, TransportError> {
    conn.prepare_cached("SELECT MIN(available_at) FROM wasmq_delayed")
        .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
        .map_err(query_error("finding the next due message"))
}

fn query_bool(conn: &Connection, sql: &str, args: Vec<Value>) -> Result<bool, TransportError> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.query_row(params_from_iter(args), |row| row.get(0)))
        .map_err(query_error("looking for messages to claim"))
}

/// The body as bytes: a BLOB, or the text a foreign SQL producer wrote instead.
fn body_bytes(row: &rusqlite::Row<'_>) -> rusqlite::Result<Vec<u8>> {
    match row.get_ref("body")? {
        rusqlite::types::ValueRef::Text(text) => Ok(text.to_vec()),
        other => other.as_blob().map(<[u8]>::to_vec).map_err(Into::into),
    }
}

fn claim(
    conn: &Connection,
    sql: &str,
    args: Vec<Value>,
) -> Result<Vec<ClaimedRow>, TransportError> {
    let mut stmt = conn
        .prepare_cached(sql)
        .map_err(query_error("preparing the claim"))?;
    stmt.query_map(params_from_iter(args), |row| {
        let message = Message {
            id: row.get("id")?,
            topic: row.get("topic")?,
            body: body_bytes(row)?,
            headers: decode_headers(&row.get::<_, String>("headers")?),
            priority: Priority::from_level(row.get("priority")?),
            attempt: row.get::<_, i64>("attempt")?.clamp(1, i64::from(u32::MAX)) as u32,
            published_at_ms: row.get::<_, i64>("published_at")?.max(0) as u64,
        };
        Ok(ClaimedRow {
            seq: row.get("seq")?,
            processor: row.get("processor")?,
            queue: row.get("queue")?,
            message,
        })
    })
    .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
    .map_err(query_error("claiming messages"))
}

/// Moves delayed rows that are due into the queue table, oldest due first.
pub(super) fn promote_due(conn: &Connection, now: i64) -> Result<(), TransportError> {
    let due = "SELECT seq FROM wasmq_delayed WHERE available_at <= ?1 ORDER BY available_at, seq LIMIT ?2";
    conn.prepare_cached(&format!(
        "INSERT INTO wasmq_messages (id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt, last_error)
         SELECT id, queue, processor, topic, body, headers, priority, published_at, available_at, attempt, last_error
         FROM wasmq_delayed WHERE seq IN ({due}) ORDER BY available_at, seq"
    ))
    .and_then(|mut stmt| stmt.execute(rusqlite::params![now, PROMOTE_BATCH]))
    .and_then(|moved| {
        if moved == 0 {
            return Ok(0);
        }
        conn.prepare_cached(&format!("DELETE FROM wasmq_delayed WHERE seq IN ({due})"))
            .and_then(|mut stmt| stmt.execute(rusqlite::params![now, PROMOTE_BATCH]))
    })
    .map(drop)
    .map_err(query_error("moving due delayed messages to their queues"))
}
