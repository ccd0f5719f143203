//! The message model shared by the router, the transports, the runtime and the CLI.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Delivery priority: five levels, as in Oro's MessagePriority. Higher goes first
/// within a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    VeryLow,
    Low,
    #[default]
    Normal,
    High,
    VeryHigh,
}

impl Priority {
    pub const ALL: [Priority; 5] = [
        Priority::VeryLow,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::VeryHigh,
    ];

    /// The value stored in SQL columns and AMQP `priority`: 0 (very-low) to 4 (very-high).
    pub fn level(self) -> u8 {
        self as u8
    }

    /// The inverse of [`Priority::level`]; out-of-range values clamp, so a row written
    /// by a foreign client never stops a consumer.
    pub fn from_level(level: i64) -> Priority {
        Priority::ALL[level.clamp(0, 4) as usize]
    }

    pub fn name(self) -> &'static str {
        match self {
            Priority::VeryLow => "very-low",
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::VeryHigh => "very-high",
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Priority::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!("unknown priority {s:?}: use very-low, low, normal, high or very-high")
            })
    }
}

/// What a processor made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ack,
    Reject,
    Requeue,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ack => "ack",
            Status::Reject => "reject",
            Status::Requeue => "requeue",
        })
    }
}

/// A message as one processor receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transport-assigned, stable across redeliveries and dead-letter replays.
    pub id: String,
    pub topic: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub priority: Priority,
    /// 1 on the first delivery; counts every claim, including those of dead consumers.
    pub attempt: u32,
    pub published_at_ms: u64,
}

impl Message {
    /// True when an earlier attempt did not settle.
    pub fn redelivered(&self) -> bool {
        self.attempt > 1
    }
}

/// How a message is to be sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    pub priority: Priority,
    /// Visible to consumers only this long after the send is committed.
    pub delay: Duration,
    pub headers: Vec<(String, String)>,
}

/// One delivery to be stored: a message addressed to one processor's queue.
/// The router makes one per subscribed processor; transports store them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub queue: String,
    pub processor: String,
    pub topic: String,
    pub body: Vec<u8>,
    pub options: SendOptions,
}

impl Envelope {
    /// What storing it takes, as far as its sender controls: body plus headers.
    pub fn stored_bytes(&self) -> u64 {
        let headers: usize = self
            .options
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum();
        (self.body.len() + headers) as u64
    }
}

/// Longest topic name, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;
/// Most topics one processor may handle (configured or declared by its plugin).
pub const MAX_TOPICS_PER_PROCESSOR: usize = 64;
/// Most headers on one message.
pub const MAX_HEADERS: usize = 64;
/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_BYTES: usize = 255;
/// Longest header value, in bytes.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 << 10;

/// A topic name is 1 to 255 bytes of `A-Z a-z 0-9 . _ -`: printable anywhere, and
/// the same on every transport (an AMQP routing key, a SQL column). The error says
/// what is wrong, for the caller to name where the topic came from.
pub fn check_topic(topic: &str) -> Result<(), String> {
    // `{:?}` shows control characters escaped.
    let shown = topic;
    if topic.is_empty() || topic.len() > MAX_TOPIC_BYTES {
        return Err(format!(
            "topic {shown:?} is {} bytes long: a topic has 1 to {MAX_TOPIC_BYTES} bytes",
            topic.len()
        ));
    }
    match topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(bad) => Err(format!(
            "topic {shown:?} contains {bad:?}: a topic is made of A-Z, a-z, 0-9, '.', '_' and '-'"
        )),
        None => Ok(()),
    }
}

/// Whether `topic` matches `pattern`, where `*` matches any run of characters
/// (`search.*` matches `search.index`; `*` matches everything).
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = topic.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*`: the whole topic
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// At most 64 headers, names of at most 255 bytes, values of at most 8 KiB.
pub fn check_headers(headers: &[(String, String)]) -> Result<(), String> {
    if headers.len() > MAX_HEADERS {
        return Err(format!(
            "{} headers: a message carries at most {MAX_HEADERS}",
            headers.len()
        ));
    }
    for (name, value) in headers {
        let shown = name;
        if name.is_empty() || name.len() > MAX_HEADER_NAME_BYTES {
            return Err(format!(
                "header name {shown:?} is {} bytes long: a name has 1 to {MAX_HEADER_NAME_BYTES} bytes",
                name.len()
            ));
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            return Err(format!(
                "header {shown:?} has a value of {} bytes: a value has at most {MAX_HEADER_VALUE_BYTES} bytes (8 KiB); put large data in the body",
                value.len()
            ));
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch, the time unit of every stored timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_with_stars() {
        for (pattern, topic, matches) in [
            ("search.*", "search.index", true),
            ("search.*", "search.", true),
            ("search.*", "mail.send", false),
            ("*", "anything", true),
            ("a*b*c", "a-x-b-y-c", true),
            ("a*b*c", "a-c-b", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*.done", "job.done", true),
        ] {
            assert_eq!(
                topic_matches(pattern, topic),
                matches,
                "{pattern} ~ {topic}"
            );
        }
    }

    #[test]
    fn topics_and_headers_have_named_limits() {
        assert!(check_topic("search.index-entities_v2").is_ok());
        for (bad, why) in [
            ("", "1 to 255 bytes"),
            ("a b", "contains ' '"),
            ("a\nb", "contains '\\n'"),
        ] {
            let err = check_topic(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(
            check_topic(&"t".repeat(256))
                .unwrap_err()
                .contains("256 bytes")
        );
        let header = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert!(check_headers(&[header("tenant", "acme")]).is_ok());
        assert!(
            check_headers(&vec![header("h", ""); 65])
                .unwrap_err()
                .contains("at most 64")
        );
        assert!(
            check_headers(&[header("big", &"x".repeat(8193))])
                .unwrap_err()
                .contains("\"big\" has a value of 8193 bytes")
        );
        assert!(
            check_headers(&[header(&"n".repeat(256), "")])
                .unwrap_err()
                .contains("256 bytes long")
        );
    }

    #[test]
    fn priorities_round_trip_through_names_and_levels() {
        for p in Priority::ALL {
            assert_eq!(p.name().parse::<Priority>().unwrap(), p);
            assert_eq!(Priority::from_level(p.level() as i64), p);
        }
        assert!(Priority::VeryHigh > Priority::Normal);
        assert_eq!(Priority::from_level(99), Priority::VeryHigh);
        let err = "urgent".parse::<Priority>().unwrap_err();
        assert!(
            err.contains("\"urgent\"") && err.contains("very-high"),
            "{err}"
        );
    }

    #[test]
    fn stored_bytes_count_body_and_headers() {
        let envelope = Envelope {
            queue: "q".into(),
            processor: "p".into(),
            topic: "t".into(),
            body: vec![0; 10],
            options: SendOptions {
                headers: vec![("ab".into(), "cde".into())],
                ..SendOptions::default()
            },
        };
        assert_eq!(envelope.stored_bytes(), 15);
    }
}
