//! One consumer's side of the SQLite transport: claims, settlements, leases.
//!
//! - [`claim`]: what a consumer may claim, and looking before locking.
//! - [`settle`]: settlements, conditioned on the claim still being ours.
//! - [`lease`]: the consumer's lease on its claims, its heartbeat, and releasing
//!   the claims of consumers that died.
//! - [`orphans`]: dead-lettering messages that no consumer can run.
//!
//! Group commit without a writer thread: a settling task queues its settlement and
//! yields. The consumer's next claim commits everything queued in the same
//! transaction as the claim, so a busy consumer writes once per batch rather than once
//! per message. A settlement still queued when its task runs again is committed by
//! that task itself, together with whatever else is queued; whoever holds the
//! connection commits the queue before letting go, so nothing queued is stranded.
//!
//! Lock waits: the consumer's connection waits only briefly for another process's
//! write lock ([`CONSUMER_BUSY_TIMEOUT`]), since the wait blocks its thread. A claim
//! that cannot get the lock is tried again by the consumer; a settlement stays queued
//! and is tried again until it commits. A long lock (a `VACUUM`, an open `sqlite3`
//! shell) delays a consumer, never stops it.
//!
//! Waking up: another process's `wasmq send` cannot signal us, so an idle receiver
//! polls `PRAGMA data_version` on a second connection (it changes when any other
//! connection commits, and reads shared memory, not the file) every 1 ms, backing off
//! to 5 ms, and also wakes when the earliest delayed message or another consumer's
//! lease is due. On waking it first looks, with a read that takes no lock, whether
//! anything is claimable, so idle consumers do not queue for the write lock after
//! every commit anywhere.

mod claim;
mod lease;
mod orphans;
mod settle;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::task::JoinHandle;

use crate::message::now_ms;
use crate::transport::dbal::query_error;
use crate::transport::{Batch, Delivery, Receiver, ReceiverOptions, TransportError};
use claim::{ClaimSql, ClaimedRow, promote_due};
use settle::{Pending, SqliteSettle};

/// How long a consumer's statement waits for another process's write lock before it
/// gives up and tries again later: the wait blocks the consumer's thread (its plugin
/// calls, its signal handling), so it is short.
pub(crate) const CONSUMER_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// First idle poll interval: a send from another process is seen within about this.
const MIN_IDLE_POLL: Duration = Duration::from_millis(1);
/// Longest idle poll interval: bounds wake-up latency when idle for long.
const MAX_IDLE_POLL: Duration = Duration::from_millis(5);
/// An idle consumer looks for claimable rows at least this often even when nothing
/// changed: a row a foreign client inserted with a future `available_at` wakes no one.
const LOOK_ANYWAY: Duration = Duration::from_secs(1);
/// A busy consumer moves due delayed rows and looks for released ones at most this
/// often: each costs a statement per claim, and both can wait a few milliseconds.
const CHORES_EVERY: Duration = Duration::from_millis(10);

/// The claimed rows of one consumer and the connection that writes them.
struct Shared {
    conn: Mutex<Connection>,
    /// Settlements waiting for the next holder of `conn` to commit them.
    pending: Mutex<Vec<Pending>>,
    /// Claimed and not yet settled, as (`seq`, message id), both since SQLite hands a
    /// deleted row's `seq` to a new row: the claims lost if this consumer's lease is.
    in_flight: Mutex<HashSet<Claim>>,
    /// When a claim last moved due delayed rows and looked for released ones.
    chores_at: Mutex<Option<Instant>>,
    /// Whether this consumer's row in `wasmq_consumers` exists (the first claim, or
    /// the heartbeat, whichever runs first, writes it).
    registered: AtomicBool,
    /// Claims known to be lost, so each loss is logged once.
    lost: Mutex<HashSet<Claim>>,
    /// Until when settlement receipts leave the lock alone after finding it held by
    /// another process: each try blocks the thread for the busy timeout.
    busy_until: Mutex<Option<Instant>>,
    /// False when every processor of this consumer is held back: it claims nothing.
    claims: bool,
    /// Marks this consumer's claims; random, so a restarted consumer never mistakes a
    /// dead predecessor's claims for its own.
    consumer_id: String,
    /// How far each renewal pushes this consumer's lease.
    lease_ms: i64,
    sql: ClaimSql,
}

/// A claimed row: its `seq` and the id of the message in it.
type Claim = (i64, String);

/// What one claim transaction found.
enum Claimed {
    Shared(Vec<ClaimedRow>),
    Alone(ClaimedRow),
    Nothing,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave SQLite inconsistent (an open
    // transaction rolls back when its guard drops), so a poisoned lock is usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn take_pending(&self) -> Vec<Pending> {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Puts settlements that could not be committed back at the front of the queue.
    fn requeue(&self, batch: Vec<Pending>) {
        let mut pending = lock(&self.pending);
        let later = std::mem::replace(&mut *pending, batch);
        pending.extend(later);
    }

    /// Runs `work` in one transaction together with every queued settlement, answers
    /// the settlements, then commits what was queued meanwhile. On failure the
    /// settlements stay queued for the next try.
    fn transact<R>(
        &self,
        doing: &'static str,
        work: impl FnOnce(&Transaction<'_>, &[Pending]) -> Result<R, TransportError>,
    ) -> Result<R, TransportError> {
        let mut conn = lock(&self.conn);
        let batch = self.take_pending();
        let result = (|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(query_error(doing))?;
            self.apply(&tx, &batch)?;
            let result = work(&tx, &batch)?;
            tx.commit().map_err(query_error(doing))?;
            Ok(result)
        })();
        match &result {
            Ok(_) => {
                self.settled(batch);
                let _ = self.drain_with(conn);
            }
            // Retrying at once would block the thread for another busy timeout.
            Err(_) => self.requeue(batch),
        }
        result
    }

    /// Commits every queued settlement, waiting for the connection.
    fn drain(&self) -> Result<(), TransportError> {
        self.drain_with(lock(&self.conn))
    }

    /// Commits queued settlements while holding the connection; after letting go,
    /// looks again, so that a settlement queued while the lock was held (by a task
    /// that then found the lock busy) is never stranded. A lock held by another
    /// process leaves them queued and returns the (retryable) error; any other error
    /// is answered to each settlement.
    fn drain_with<'a>(
        &'a self,
        mut conn: MutexGuard<'a, Connection>,
    ) -> Result<(), TransportError> {
        loop {
            let batch = self.take_pending();
            if !batch.is_empty() {
                let result = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(query_error("starting a settlement"))
                    .and_then(|tx| {
                        self.apply(&tx, &batch)?;
                        tx.commit().map_err(query_error("committing settlements"))
                    });
                match result {
                    Ok(()) => self.settled(batch),
                    Err(e) if e.is_retryable() => {
                        self.requeue(batch);
                        return Err(e);
                    }
                    Err(e) => {
                        for pending in batch {
                            match pending.reply {
                                Some(reply) => {
                                    let _ = reply.send(Err(TransportError::Settle(e.to_string())));
                                }
                                // A release nobody waits for: stop renewing the claim,
                                // so it lapses and the message is redelivered.
                                None => {
                                    lock(&self.in_flight)
                                        .remove(&(pending.seq, pending.message_id));
                                }
                            }
                        }
                        return Err(e);
                    }
                }
            }
            drop(conn);
            if lock(&self.pending).is_empty() {
                return Ok(());
            }
            conn = match self.conn.try_lock() {
                Ok(conn) => conn,
                // Its holder drains on release.
                Err(_) => return Ok(()),
            };
        }
    }

    /// After a commit: the settled rows need no more renewal; tell their tasks.
    fn settled(&self, batch: Vec<Pending>) {
        let mut in_flight = lock(&self.in_flight);
        for pending in batch {
            in_flight.remove(&(pending.seq, pending.message_id));
            if let Some(reply) = pending.reply {
                let _ = reply.send(Ok(()));
            }
        }
    }

    /// False while a settlement receipt recently found another process holding the
    /// lock: the next try waits for the pause to pass.
    fn may_try_now(&self) -> bool {
        lock(&self.busy_until).is_none_or(|until| Instant::now() >= until)
    }

    fn busy_for(&self, pause: Duration) {
        *lock(&self.busy_until) = Some(Instant::now() + pause);
    }

    /// The claim transaction: due delayed rows move to their queues, then a row that
    /// must run alone is taken if there is one, else up to `max` rows. A busy
    /// consumer does the first two at most every [`CHORES_EVERY`]; `thorough` (an idle
    /// consumer that looked and found something) does them now.
    fn claim(
        &self,
        tx: &Transaction<'_>,
        max: usize,
        thorough: bool,
    ) -> Result<Claimed, TransportError> {
        if !self.registered.load(Ordering::Acquire) {
            lease::register(tx, &self.consumer_id, self.lease_ms)?;
        }
        let now = now_ms();
        let chores = {
            let mut last = lock(&self.chores_at);
            let due = thorough || last.is_none_or(|at| at.elapsed() >= CHORES_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if chores {
            promote_due(tx, now)?;
            if let Some(row) = self.sql.claim_alone(tx, &self.consumer_id, now)? {
                return Ok(Claimed::Alone(row));
            }
        }
        let rows = self.sql.claim_shared(tx, &self.consumer_id, now, max)?;
        Ok(if rows.is_empty() {
            Claimed::Nothing
        } else {
            Claimed::Shared(rows)
        })
    }

    /// After the claim committed: the heartbeat renews these rows from now on.
    fn track<'a>(&self, rows: impl IntoIterator<Item = &'a ClaimedRow>) {
        lock(&self.in_flight).extend(rows.into_iter().map(|r| (r.seq, r.message.id.clone())));
    }

    /// Logs a lost claim once per message: from the heartbeat that found it, or from
    /// the settlement it voids.
    fn claim_lost(&self, seq: i64, message_id: &str, settling: bool) {
        let claim = (seq, message_id.to_string());
        let first = {
            let mut lost = lock(&self.lost);
            if settling {
                !lost.remove(&claim)
            } else {
                lost.insert(claim)
            }
        };
        if first {
            tracing::warn!(
                message_id,
                "lost the claim on a message: this consumer stalled past its lease and another one took the message over; its settlement and sends are discarded, the new holder produces them"
            );
        }
    }
}

pub struct SqliteReceiver {
    shared: Arc<Shared>,
    watcher: Connection,
    data_version: i64,
    heartbeat: JoinHandle<()>,
}

impl SqliteReceiver {
    pub fn start(
        writer: Connection,
        watcher: Connection,
        options: ReceiverOptions,
    ) -> Result<SqliteReceiver, TransportError> {
        let data_version = data_version(&watcher)?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(writer),
            pending: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashSet::new()),
            lost: Mutex::new(HashSet::new()),
            busy_until: Mutex::new(None),
            chores_at: Mutex::new(None),
            registered: AtomicBool::new(false),
            claims: !options.subscriptions.is_empty(),
            consumer_id: uuid::Uuid::new_v4().to_string(),
            lease_ms: i64::try_from(options.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX / 4),
            sql: ClaimSql::new(&options.subscriptions)?,
        });
        let heartbeat = tokio::spawn(lease::heartbeat(shared.clone(), options));
        Ok(SqliteReceiver {
            shared,
            watcher,
            data_version,
            heartbeat,
        })
    }

    /// Sleeps until something may have become claimable: another connection
    /// committed, a delayed row or a lease falls due, or [`LOOK_ANYWAY`] passed. Always
    /// sleeps a little, so no path of `next_batch` can loop without yielding.
    async fn wait_for_change(&mut self, next_due_ms: Option<i64>) -> Result<(), TransportError> {
        let mut interval = MIN_IDLE_POLL;
        let give_up = tokio::time::Instant::now() + LOOK_ANYWAY;
        loop {
            let until_due =
                next_due_ms.map(|due| Duration::from_millis((due - now_ms()).max(0) as u64));
            let nap = until_due
                .map_or(interval, |d| d.min(interval))
                .max(MIN_IDLE_POLL);
            tokio::time::sleep(nap).await;
            if until_due.is_some_and(|d| d <= nap) || tokio::time::Instant::now() >= give_up {
                return Ok(());
            }
            let version = data_version(&self.watcher)?;
            if version != self.data_version {
                self.data_version = version;
                return Ok(());
            }
            interval = (interval * 2).min(MAX_IDLE_POLL);
        }
    }

    fn delivery(&self, row: ClaimedRow) -> Delivery {
        Delivery {
            handle: Box::new(SqliteSettle {
                seq: row.seq,
                message_id: row.message.id.clone(),
                shared: Some(self.shared.clone()),
            }),
            message: row.message,
            processor: row.processor,
            queue: row.queue,
        }
    }
}

impl Drop for SqliteReceiver {
    /// A receiver dropped without `close` (an error path) stops renewing its claims, so
    /// they expire and are redelivered.
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn data_version(conn: &Connection) -> Result<i64, TransportError> {
    conn.query_row("PRAGMA data_version", [], |row| row.get(0))
        .map_err(query_error("watching for new messages"))
}

#[async_trait]
impl Receiver for SqliteReceiver {
    async fn next_batch(&mut self, max: usize) -> Result<Batch, TransportError> {
        if !self.shared.claims {
            // Every processor is held back: nothing to claim, ever (the heartbeat
            // still records them).
            return std::future::pending().await;
        }
        let mut look_first = false;
        loop {
            let now = now_ms();
            // Idle and nothing to commit: a read decides whether the write lock is
            // worth taking.
            let worth_it = !look_first
                || !lock(&self.shared.pending).is_empty()
                || self
                    .shared
                    .sql
                    .look(&self.watcher, &self.shared.consumer_id, now)?;
            if worth_it {
                // Claiming runs to completion before the next await: dropping this
                // future can never leave rows claimed and undelivered.
                let claimed = self.shared.transact("claiming messages", |tx, _| {
                    self.shared.claim(tx, max, look_first)
                })?;
                self.shared.registered.store(true, Ordering::Release);
                match claimed {
                    Claimed::Shared(rows) => {
                        self.shared.track(&rows);
                        return Ok(Batch::Shared(
                            rows.into_iter().map(|row| self.delivery(row)).collect(),
                        ));
                    }
                    Claimed::Alone(row) => {
                        self.shared.track([&row]);
                        return Ok(Batch::Alone(self.delivery(row)));
                    }
                    Claimed::Nothing => {}
                }
            }
            look_first = true;
            let next_due = claim::next_due(&self.watcher)?;
            self.wait_for_change(next_due).await?;
        }
    }

    async fn close(self: Box<Self>) -> Result<(), TransportError> {
        self.heartbeat.abort();
        // Every settling task has committed or seen its settlement committed; a last
        // drain catches any stragglers, waiting out another process's lock. Then the
        // consumer's row goes: it holds no claims.
        loop {
            let result = self.shared.drain().and_then(|()| {
                lease::unregister(&lock(&self.shared.conn), &self.shared.consumer_id)
            });
            match result {
                Err(e) if e.is_retryable() => tokio::time::sleep(MAX_IDLE_POLL * 10).await,
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::message::{Envelope, SendOptions};
    use crate::transport::dbal::sqlite::SqliteTransport;
    use crate::transport::{
        Batch, Delivery, Receiver, ReceiverOptions, Settlement, Subscription, Transport,
    };

    fn envelope(topic: &str, body: &str) -> Envelope {
        Envelope {
            queue: "q".into(),
            processor: "p".into(),
            topic: topic.into(),
            body: body.into(),
            options: SendOptions::default(),
        }
    }

    async fn receiver(transport: &SqliteTransport) -> Box<dyn Receiver> {
        receiver_leased(transport, Duration::from_secs(30)).await
    }

    async fn receiver_leased(transport: &SqliteTransport, lease: Duration) -> Box<dyn Receiver> {
        transport
            .receiver(ReceiverOptions {
                subscriptions: vec![Subscription {
                    queue: "q".into(),
                    processor: "p".into(),
                }],
                held_back: Vec::new(),
                heartbeat_timeout: lease,
                orphan_timeout: Duration::from_secs(3600),
            })
            .await
            .unwrap()
    }

    /// The next delivery, and whether it must run alone.
    async fn one(receiver: &mut Box<dyn Receiver>) -> (Delivery, bool) {
        match tokio::time::timeout(Duration::from_secs(5), receiver.next_batch(1))
            .await
            .expect("a delivery within 5 s")
            .unwrap()
        {
            Batch::Shared(mut d) => (d.remove(0), false),
            Batch::Alone(d) => (d, true),
        }
    }

    async fn settle(delivery: Delivery, settlement: Settlement) {
        delivery
            .handle
            .settle(settlement)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// What another consumer's heartbeat does to a consumer whose lease ran out:
    /// its row goes and its claims are released.
    fn release_all_claims(path: &std::path::Path) {
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(
                "UPDATE wasmq_messages SET claimed_by = 'released' WHERE claimed_by IS NOT NULL;
                 DELETE FROM wasmq_consumers;",
            )
            .unwrap();
    }

    #[tokio::test]
    async fn migration_2_keeps_every_row_and_id_and_moves_waiting_rows_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(super::super::schema::MIGRATIONS[0])
                .unwrap();
            conn.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO wasmq_messages (id, queue, processor, topic, body, published_at, available_at)
                 VALUES (7, 'q', 'p', 't', X'01', 0, 0), (8, 'q', 'p', 't', X'02', 0, 9000000000000000);
                 INSERT INTO wasmq_dead_letters (id, queue, processor, topic, body, headers, priority, published_at, attempts, error, dead_at)
                 VALUES (3, 'q', 'p', 't', X'03', '[]', 2, 0, 5, 'boom', 0);",
            )
            .unwrap();
        }
        let transport = SqliteTransport::open(&path).await.unwrap();
        let ids = |sql: &str| -> Vec<String> {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let mut stmt = conn.prepare(sql).unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        assert_eq!(ids("SELECT id FROM wasmq_messages"), ["7"]);
        assert_eq!(ids("SELECT id FROM wasmq_delayed"), ["8"]);
        assert_eq!(transport.dead_letter("3").await.unwrap().error, "boom");
    }

    fn count(path: &std::path::Path, sql: &str) -> i64 {
        rusqlite::Connection::open(path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_releases_its_claim_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let transport = SqliteTransport::open(&path).await.unwrap();
        let ids = transport.send(vec![envelope("t", "x")]).await.unwrap();
        let mut receiver = receiver(&transport).await;
        let (delivery, _) = one(&mut receiver).await;
        assert_eq!(delivery.message.id, ids[0]);
        let task = tokio::spawn(async move {
            let _held = delivery;
            panic!("a delivery task panics");
        });
        assert!(task.await.unwrap_err().is_panic());
        // Redelivered at once (no lease to wait out), the crashed attempt counted,
        // and alone: the delivery ended without a settlement.
        let (again, alone) = one(&mut receiver).await;
        assert_eq!(again.message.id, ids[0]);
        assert_eq!(again.message.attempt, 2);
        assert!(alone);
        settle(again, Settlement::Drop).await;
        assert_eq!(count(&path, "SELECT COUNT(*) FROM wasmq_messages"), 0);
    }

    #[tokio::test]
    async fn a_consumer_that_lost_its_claim_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let transport = SqliteTransport::open(&path).await.unwrap();
        transport.send(vec![envelope("t", "x")]).await.unwrap();
        let mut a = receiver(&transport).await;
        let mut b = receiver(&transport).await;
        let (stalled, _) = one(&mut a).await;
        // A stalls past its lease, and another consumer's heartbeat releases its claims.
        release_all_claims(&path);
        let (taken_over, alone) = one(&mut b).await;
        assert!(alone, "a message whose claim expired runs alone");
        assert_eq!(taken_over.message.id, stalled.message.id);
        assert_eq!(taken_over.message.attempt, 2);
        let ack = |body: &str| Settlement::Ack {
            sends: vec![envelope("out", body)],
        };
        settle(taken_over, ack("from b")).await;
        settle(stalled, ack("from a")).await;
        let sends = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT group_concat(CAST(body AS TEXT)) FROM wasmq_messages WHERE topic = 'out'",
                [],
                |r| r.get::<_, String>(0),
            )
            .unwrap();
        assert_eq!(
            sends, "from b",
            "the stalled consumer's sends are discarded"
        );
    }

    #[tokio::test]
    async fn a_stale_settlement_never_touches_a_new_message_in_a_reused_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let transport = SqliteTransport::open(&path).await.unwrap();
        let x = transport.send(vec![envelope("t", "x")]).await.unwrap();
        let mut a = receiver(&transport).await;
        let mut b = receiver(&transport).await;
        let (stale, _) = one(&mut a).await;
        release_all_claims(&path);
        let (taken_over, _) = one(&mut b).await;
        settle(taken_over, Settlement::Drop).await;
        // The table is empty again: SQLite gives the next row the same `seq`, and A,
        // resumed, claims the new message in it.
        let y = transport.send(vec![envelope("t", "y")]).await.unwrap();
        let (fresh, _) = one(&mut a).await;
        assert_eq!(fresh.message.id, y[0]);
        let stale_ack = Settlement::Ack {
            sends: vec![envelope("out", "from the stale x")],
        };
        assert_eq!(stale.message.id, x[0]);
        settle(stale, stale_ack).await;
        assert_eq!(
            count(
                &path,
                "SELECT COUNT(*) FROM wasmq_messages WHERE topic = 't'"
            ),
            1,
            "y is still there"
        );
        assert_eq!(
            count(
                &path,
                "SELECT COUNT(*) FROM wasmq_messages WHERE topic = 'out'"
            ),
            0,
            "x's stale sends are discarded"
        );
        settle(fresh, Settlement::Drop).await;
        assert_eq!(count(&path, "SELECT COUNT(*) FROM wasmq_messages"), 0);
    }

    #[tokio::test]
    async fn a_busy_consumer_still_takes_a_message_that_must_run_alone_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let transport = SqliteTransport::open(&path).await.unwrap();
        transport
            .send(vec![envelope("t", "crashed"), envelope("t", "fresh")])
            .await
            .unwrap();
        let mut dead = receiver_leased(&transport, Duration::from_millis(300)).await;
        let (crashed, _) = one(&mut dead).await;
        drop(dead); // its heartbeat stops: its lease runs out in 300 ms
        std::mem::forget(crashed); // its consumer died: no settlement, no release
        // The next consumer's heartbeat finds the lease run out and releases the claim.
        let mut next = receiver_leased(&transport, Duration::from_millis(300)).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let Batch::Alone(alone) = next.next_batch(4).await.unwrap() else {
            panic!("the crashed message comes first, alone");
        };
        assert_eq!(String::from_utf8_lossy(&alone.message.body), "crashed");
        assert_eq!(alone.message.attempt, 2);
    }

    #[tokio::test]
    async fn delayed_messages_wait_in_their_own_table_until_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let transport = SqliteTransport::open(&path).await.unwrap();
        let mut later = envelope("t", "later");
        later.options.delay = Duration::from_millis(300);
        transport.send(vec![later]).await.unwrap();
        assert_eq!(count(&path, "SELECT COUNT(*) FROM wasmq_delayed"), 1);
        let mut r = receiver(&transport).await;
        let started = std::time::Instant::now();
        let (d, _) = one(&mut r).await;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(d.message.attempt, 1);
        assert_eq!(count(&path, "SELECT COUNT(*) FROM wasmq_delayed"), 0);
    }
}
