//! SQL transports ("DBAL", after Oro's DBAL transport): messages are rows, a claim marks
//! rows as taken by one consumer until a lease ends, and a settlement deletes or
//! updates them in a transaction together with what the processor sent.
//!
//! SQLite is the embedded default; PostgreSQL and MySQL will share the row layout and
//! the header encoding here.

pub mod server;
pub mod sqlite;

use crate::transport::TransportError;

/// A new message id: a UUIDv7, which never repeats and sorts by creation time.
pub(crate) fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Headers are stored as a JSON array of `[name, value]` pairs: order and duplicates
/// survive, and any SQL client can read them.
pub fn encode_headers(headers: &[(String, String)]) -> String {
    serde_json::to_string(headers).unwrap_or_else(|_| "[]".into())
}

/// A row written by a foreign client with malformed headers still gets delivered; its
/// headers are dropped rather than stopping the consumer.
pub fn decode_headers(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_else(|e| {
        tracing::warn!(headers = text, error = %e, "ignoring malformed stored headers");
        Vec::new()
    })
}

/// Wraps an SQLite error with what we were doing.
pub(crate) fn query_error(doing: &'static str) -> impl FnOnce(rusqlite::Error) -> TransportError {
    move |cause| TransportError::Query {
        doing,
        kind: sqlite::error_kind(&cause),
        cause: Box::new(cause),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_survive_garbage() {
        let h = vec![
            ("a".to_string(), "1".to_string()),
            ("a".into(), "\"2\"".into()),
        ];
        assert_eq!(decode_headers(&encode_headers(&h)), h);
        assert!(decode_headers("{not json").is_empty());
    }
}
