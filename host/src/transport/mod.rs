//! The transport boundary: where messages are stored, claimed and settled.
//!
//! Two kinds of transport fit one shape:
//! - SQL ones ("DBAL": SQLite now; PostgreSQL and MySQL next) *pull*: a
//!   [`Receiver`] claims a batch of rows (`FOR UPDATE SKIP LOCKED` on PostgreSQL and
//!   MySQL) and each [`Delivery`] settles its row by id.
//! - RabbitMQ *pushes*: its [`Receiver`] wraps `basic.consume` with a prefetch window
//!   equal to the consumer's concurrency, `next_batch` yields what the broker pushed,
//!   and each delivery settles by delivery tag after publishing (with confirms) what
//!   the processor sent.
//!
//! Either way the consumer sees a stream of deliveries, each carrying its own settle
//! handle, and a settlement that resolves only once it is durable.

pub mod dbal;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;

use crate::message::{Envelope, Message, Priority};

/// A parsed `[transport] dsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dsn {
    /// An SQLite file; relative paths are resolved against the config file's folder.
    Sqlite(PathBuf),
    /// A PostgreSQL server (`postgres://user:password@host:port/database`).
    Postgres(ServerUrl),
    /// A MariaDB (10.6 or later) or MySQL (8 or later) server
    /// (`mysql://user:password@host:port/database`).
    Mysql(ServerUrl),
}

/// A database server's URL. Its password never reaches a log line, an error or a
/// terminal: `Display` and `Debug` show it as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl(url::Url);

impl ServerUrl {
    /// The URL with its password, for connecting only.
    pub fn secret(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            let _ = shown.set_password(Some("***"));
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl Dsn {
    pub fn parse(dsn: &str) -> Result<Dsn, String> {
        if let Some(path) = dsn.strip_prefix("sqlite://") {
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(format!(
                    "{dsn:?} names no file: write sqlite://var/wasmq.sqlite (relative to the config file) or sqlite:///absolute/path"
                ));
            }
            return Ok(Dsn::Sqlite(PathBuf::from(path)));
        }
        let scheme = dsn.split("://").next().unwrap_or(dsn);
        match scheme {
            "postgres" | "postgresql" => {
                server_url(dsn, "postgres://user@127.0.0.1:5432/wasmq").map(Dsn::Postgres)
            }
            "mysql" | "mariadb" => {
                // sqlx speaks to MariaDB through the mysql scheme.
                let dsn = dsn.replacen("mariadb://", "mysql://", 1);
                server_url(&dsn, "mysql://user@127.0.0.1:3306/wasmq").map(Dsn::Mysql)
            }
            "amqp" | "amqps" => Err(format!(
                "{scheme}://…: the RabbitMQ transport is not available in this version yet; use sqlite://, postgres:// or mysql://"
            )),
            _ => Err(format!(
                "{:?} is not a DSN wasmq understands: use sqlite://PATH (e.g. sqlite://var/wasmq.sqlite), postgres://USER@HOST/DATABASE or mysql://USER@HOST/DATABASE",
                redact(dsn)
            )),
        }
    }
}

/// A server URL that names a database; errors show it without its password.
fn server_url(dsn: &str, example: &str) -> Result<ServerUrl, String> {
    let url = url::Url::parse(dsn).map_err(|e| {
        format!(
            "{:?} is not a valid URL ({e}): write it like {example}",
            redact(dsn)
        )
    })?;
    let url = ServerUrl(url);
    if url.0.host_str().unwrap_or_default().is_empty() {
        return Err(format!("{url:?} names no host: write it like {example}"));
    }
    if url.0.path().trim_matches('/').is_empty() {
        return Err(format!(
            "{url:?} names no database: write it like {example}"
        ));
    }
    Ok(url)
}

/// `text` with anything between `://user:` and `@` replaced, for DSNs too broken to
/// parse as URLs.
fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => text.to_string(),
        },
        None => text.to_string(),
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dsn::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Dsn::Postgres(url) | Dsn::Mysql(url) => url.fmt(f),
        }
    }
}

/// A database or broker error, whatever the backend.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// What a transport failure means for the caller; retrying is decided by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Another session holds a lock (busy, lock wait timeout, deadlock, serialization
    /// failure): the same statement may succeed in a moment.
    Busy,
    /// The connection broke or could not be made (the server restarted, the network
    /// dropped): reconnect and try again.
    ConnectionLost,
    /// The store's schema is not one this wasmq can use.
    Schema,
    /// Anything else: a mistake that will repeat (bad config, a constraint, a bug).
    Query,
}

impl ErrorKind {
    /// True for failures that pass by themselves.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Busy | ErrorKind::ConnectionLost)
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    // The causes are printed in the text and not chained as `source`, so `{:#}` says
    // each once.
    #[error(
        "cannot open the message store {what}: {cause}; check [transport] dsn, and that the store is reachable and writable"
    )]
    Open {
        what: String,
        kind: ErrorKind,
        cause: Cause,
    },
    #[error("message store query failed while {doing}: {cause}")]
    Query {
        doing: &'static str,
        kind: ErrorKind,
        cause: Cause,
    },
    #[error(
        "the message store schema is version {found}, newer than this wasmq knows ({known}): upgrade wasmq"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("no dead-lettered message has id {0:?}: `wasmq dead-letter list` shows the ids")]
    DeadLetterNotFound(String),
    #[error("settling failed: {0}")]
    Settle(String),
    #[error("the message store connection is closed (the consumer is shutting down)")]
    Closed,
    #[error(
        "one consumer cannot claim for {0} (queue, processor) pairs, at most {max}: run several consumers, each with some of the queues (`wasmq consume --queue`)",
        max = crate::transport::MAX_SUBSCRIPTIONS
    )]
    TooManySubscriptions(usize),
}

impl TransportError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Open { kind, .. } | TransportError::Query { kind, .. } => *kind,
            TransportError::SchemaTooNew { .. } => ErrorKind::Schema,
            _ => ErrorKind::Query,
        }
    }

    /// True for failures that may pass (another process holds the lock, the
    /// connection dropped): the caller may try again; false for mistakes that will
    /// repeat.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// What becomes of a delivery once its processor is done with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Remove the delivery and store what the processor sent, atomically where the
    /// transport allows (SQL: one transaction).
    Ack { sends: Vec<Envelope> },
    /// Make it visible again after `delay`, recording why.
    Retry { delay: Duration, error: String },
    /// Offer it again after `delay` without counting this delivery as an attempt: the
    /// consumer could not run it at all (its plugin cannot be loaded).
    Defer { delay: Duration, reason: String },
    /// Move it to the dead-letter store with the reason.
    DeadLetter { error: String },
    /// Remove it without a trace (REJECT with `dead_letter = false`).
    Drop,
    /// Give it back as if its consumer had died: the delivery ended without an
    /// answer (its task panicked or was dropped). It is offered again at once, its
    /// attempt counted, and runs alone.
    Release { error: String },
}

/// Resolves once a settlement is durable.
pub type SettleReceipt = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send>>;

/// Settles one delivery. Consumed by use: a delivery is settled once.
#[async_trait]
pub trait SettleHandle: Send {
    /// Hands the settlement to the transport. Returns once it is accepted (so the
    /// processing slot may be reused); the receipt resolves once it is durable.
    async fn settle(
        self: Box<Self>,
        settlement: Settlement,
    ) -> Result<SettleReceipt, TransportError>;
}

/// A message claimed for one processor, with the handle that settles it.
pub struct Delivery {
    pub message: Message,
    /// The processor the delivery is addressed to.
    pub processor: String,
    pub queue: String,
    pub handle: Box<dyn SettleHandle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("processor", &self.processor)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// What a claim brought.
#[derive(Debug)]
pub enum Batch {
    /// Deliveries to run side by side.
    Shared(Vec<Delivery>),
    /// A delivery whose previous delivery ended without a settlement (its consumer
    /// died, perhaps because of it): the consumer runs it with nothing else in
    /// flight, once what is in flight has finished, so a crash is charged to the
    /// message that caused it. Claimed (reserved) at once, so other consumers go on.
    Alone(Delivery),
}

/// One consumer's view of its queues.
#[async_trait]
pub trait Receiver: Send {
    /// Waits until something can be claimed, and claims at most `max` deliveries,
    /// or one that must run alone. Cancel-safe: dropping the future claims nothing.
    async fn next_batch(&mut self, max: usize) -> Result<Batch, TransportError>;

    /// Waits until every settlement handed out is durable, then releases the consumer's
    /// registration.
    async fn close(self: Box<Self>) -> Result<(), TransportError>;
}

/// A message in the dead-letter store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    pub queue: String,
    pub processor: String,
    pub topic: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub priority: Priority,
    pub attempts: u32,
    pub published_at_ms: i64,
    pub dead_at_ms: i64,
    pub error: String,
}

/// Processors one consumer may claim for: SQLite merges one index read per
/// processor in a single statement, and allows at most 500 in a compound SELECT.
pub const MAX_SUBSCRIPTIONS: usize = 500;

/// One processor a consumer can run, and the queue its deliveries wait in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subscription {
    pub queue: String,
    pub processor: String,
}

/// Consumer-side settings a receiver needs.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    /// What this consumer claims: only deliveries for processors it can run.
    pub subscriptions: Vec<Subscription>,
    /// Processors this consumer has but cannot run now (their plugin does not load):
    /// not claimed, so their messages wait untouched, but recorded as present, so
    /// they are not dead-lettered as orphans.
    pub held_back: Vec<Subscription>,
    /// Claims not renewed for this long are taken over by other consumers.
    pub heartbeat_timeout: Duration,
    /// A message no consumer has had its processor for this long is dead-lettered.
    pub orphan_timeout: Duration,
}

/// A message store.
#[async_trait]
pub trait Transport: Send + Sync {
    /// What the store is, for `wasmq check`: the backend, its version, where it is,
    /// and the schema version.
    async fn describe(&self) -> Result<String, TransportError>;

    /// Stores the envelopes durably, all or none, and returns their ids in order.
    async fn send(&self, envelopes: Vec<Envelope>) -> Result<Vec<String>, TransportError>;

    /// Opens a receiver for one consumer.
    async fn receiver(&self, options: ReceiverOptions)
    -> Result<Box<dyn Receiver>, TransportError>;

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, TransportError>;

    async fn dead_letter(&self, id: &str) -> Result<DeadLetter, TransportError>;

    /// Puts a dead-lettered message back in its queue with its id and a fresh attempt count.
    async fn replay_dead_letter(&self, id: &str) -> Result<(), TransportError>;

    /// Deletes every dead-lettered message; returns how many.
    async fn purge_dead_letters(&self) -> Result<u64, TransportError>;

    /// Records the topics a plugin build (by file hash) declared for a processor.
    async fn record_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
        topics: &[String],
    ) -> Result<(), TransportError>;

    /// Records where each topic goes for this config's processors: `(topic, queue,
    /// processor)`, replacing what was recorded for those processors. What the
    /// servers' `wasmq_send` routes by; nothing to do where there is none (SQLite).
    async fn record_routes(
        &self,
        _routes: &[(String, String, String)],
    ) -> Result<(), TransportError> {
        Ok(())
    }

    /// The topics recorded for this processor and plugin build, if any.
    async fn recorded_topics(
        &self,
        processor: &str,
        plugin_hash: &str,
    ) -> Result<Option<Vec<String>>, TransportError>;
}

/// Opens the transport a DSN names.
pub async fn open(
    dsn: &Dsn,
    base_dir: &std::path::Path,
    table_prefix: &str,
) -> Result<Box<dyn Transport>, TransportError> {
    use dbal::server::{ServerTransport, dialect::Dialect};
    match dsn {
        Dsn::Sqlite(path) => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            };
            Ok(Box::new(dbal::sqlite::SqliteTransport::open(&path).await?))
        }
        Dsn::Postgres(url) => Ok(Box::new(
            ServerTransport::open(url, Dialect::Postgres, table_prefix).await?,
        )),
        Dsn::Mysql(url) => Ok(Box::new(
            ServerTransport::open(url, Dialect::Mysql, table_prefix).await?,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let dsn = Dsn::parse("postgres://app:hunter2@127.0.0.1:5432/q").unwrap();
        for shown in [dsn.to_string(), format!("{dsn:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("app:***@127.0.0.1"), "{shown}");
        }
        let broken = Dsn::parse("postgres://app:hunter2@[::1/q").unwrap_err();
        assert!(!broken.contains("hunter2"), "{broken}");
        let unknown = Dsn::parse("oracle://app:hunter2@db/q").unwrap_err();
        assert!(!unknown.contains("hunter2"), "{unknown}");
    }

    #[test]
    fn dsn_parsing_names_the_problem() {
        assert_eq!(
            Dsn::parse("sqlite://var/q.sqlite").unwrap(),
            Dsn::Sqlite("var/q.sqlite".into())
        );
        assert_eq!(
            Dsn::parse("sqlite:///tmp/q.sqlite").unwrap(),
            Dsn::Sqlite("/tmp/q.sqlite".into())
        );
        assert!(
            Dsn::parse("sqlite://")
                .unwrap_err()
                .contains("names no file")
        );
        assert!(matches!(
            Dsn::parse("postgres://localhost/x").unwrap(),
            Dsn::Postgres(_)
        ));
        assert!(matches!(
            Dsn::parse("mariadb://root@127.0.0.1/test").unwrap(),
            Dsn::Mysql(_)
        ));
        assert!(
            Dsn::parse("postgres://localhost")
                .unwrap_err()
                .contains("names no database")
        );
        assert!(
            Dsn::parse("amqp://localhost")
                .unwrap_err()
                .contains("not available")
        );
        assert!(
            Dsn::parse("var/q.sqlite")
                .unwrap_err()
                .contains("sqlite://")
        );
    }
}
