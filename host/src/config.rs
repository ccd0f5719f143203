//! `wasmq.toml`: parsed into typed structs, then validated as a whole so that every
//! mistake is reported at once, naming the key or file and what to do.
//!
//! Relative paths (the SQLite file, the plugins folder, the cache) are taken from the
//! folder that holds the config file, so `wasmq --config /etc/wasmq/wasmq.toml` works
//! from any working directory.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::message::{MAX_TOPICS_PER_PROCESSOR, check_topic};

/// The default config path, overridden by `--config` or `WASMQ_CONFIG`.
pub const DEFAULT_CONFIG_PATH: &str = "wasmq.toml";

/// Wasmtime's pooling allocator reserves address space per slot for the largest
/// memory any processor may have; a cap keeps a typo (`64GiB`) from reserving terabytes.
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;

/// The smallest memory cap that a Rust guest can start in (its stack plus data).
pub const MIN_MEMORY_LIMIT: u64 = 1 << 20;

/// Largest `max_send_bytes`: a call's sends are held in memory until its message
/// settles, once per message in flight.
pub const MAX_SEND_BYTES_LIMIT: u64 = 1 << 30;

/// Causes are written into the message (`{error}`) rather than chained as a source, so
/// that `{e}` and `{e:#}` each print them once (STYLE.md: never both).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path:?}: {error}; pass --config PATH or set WASMQ_CONFIG")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {path:?} is not valid: {error}")]
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
    #[error("config file {path:?} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole `wasmq.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where messages are stored.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Where plugin files live and where their compiled form is cached.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// What `send` does with a topic nobody subscribes to.
    #[serde(default)]
    pub producer: ProducerConfig,
    /// How consumers announce they are alive.
    #[serde(default)]
    pub consumer: ConsumerConfig,
    /// The processors: one `[[processor]]` table each.
    #[serde(default, rename = "processor")]
    pub processors: Vec<ProcessorConfig>,
    /// The folder relative paths are resolved against (the config file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from, for error messages.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `sqlite://var/wasmq.sqlite` (relative to the config file), `sqlite:///abs/path`,
    /// `postgres://user:password@host:5432/database` or
    /// `mysql://user:password@host:3306/database` (MariaDB too).
    #[serde(default = "default_dsn")]
    pub dsn: String,
    /// PostgreSQL and MySQL: the start of every table's name, so two deployments can
    /// share a database. Letters, digits and `_`, at most 32.
    #[serde(default = "default_table_prefix")]
    pub table_prefix: String,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            dsn: default_dsn(),
            table_prefix: default_table_prefix(),
        }
    }
}

fn default_dsn() -> String {
    "sqlite://var/wasmq.sqlite".into()
}

fn default_table_prefix() -> String {
    "wasmq_".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// The folder that holds the `.wasm` files named by `[[processor]] plugin`.
    #[serde(default = "default_plugins_dir")]
    pub dir: PathBuf,
    /// Compiled plugins, keyed by content hash and engine, so a restart does not recompile.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
    /// Plugin files larger than this are refused before they are read or compiled:
    /// compiling costs memory and CPU in the host, outside any sandbox limit.
    #[serde(default = "default_max_plugin_size", deserialize_with = "byte_size")]
    pub max_plugin_size: u64,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: default_plugins_dir(),
            cache_dir: default_cache_dir(),
            max_plugin_size: default_max_plugin_size(),
        }
    }
}

fn default_plugins_dir() -> PathBuf {
    "plugins".into()
}

/// 64 MiB: a Python or JavaScript component is 10-40 MiB.
pub fn default_max_plugin_size() -> u64 {
    64 << 20
}

fn default_cache_dir() -> PathBuf {
    "var/cache".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerConfig {
    /// `error` (default): sending to a topic with no subscriber fails and names the
    /// known topics, like AMQP's `mandatory` flag. `drop`: the message is discarded.
    #[serde(default)]
    pub on_unroutable: OnUnroutable,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnroutable {
    #[default]
    Error,
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// A message claimed by a consumer that has not renewed its claim for this long is
    /// delivered again (the consumer died). Consumers renew at a third of it.
    #[serde(default = "default_heartbeat_timeout", deserialize_with = "duration")]
    pub heartbeat_timeout: Duration,
    /// A message whose processor no consumer has had for this long, and that has
    /// waited this long, is dead-lettered ("no consumer has processor X"), rather than
    /// waiting forever for a processor that was renamed or removed.
    #[serde(default = "default_orphan_timeout", deserialize_with = "duration")]
    pub orphan_timeout: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            heartbeat_timeout: default_heartbeat_timeout(),
            orphan_timeout: default_orphan_timeout(),
        }
    }
}

fn default_heartbeat_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_orphan_timeout() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// One `[[processor]]`: a plugin, the topics it handles and how its failures are treated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// Unique; stored with every delivery so the consumer knows whom it is for.
    pub name: String,
    /// The `.wasm` file, relative to `[plugins] dir`.
    pub plugin: PathBuf,
    /// Topics routed to this processor; when absent, the plugin's `subscribed-topics`.
    #[serde(default)]
    pub topics: Option<Vec<String>>,
    /// The queue its deliveries wait in; `wasmq consume --queue` selects queues.
    #[serde(default = "default_queue")]
    pub queue: String,
    /// The most time one message's call may use; past it the call is a failure. It
    /// counts the plugin's running time (a fresh instance's start functions included)
    /// and its waits in host calls, not its waits for a turn while other messages run.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Largest linear memory the plugin may grow to, e.g. `64MiB`. Also the largest
    /// body a send to it may carry: a larger one could not be copied into the plugin.
    #[serde(default = "default_memory_limit", deserialize_with = "byte_size")]
    pub memory_limit: u64,
    /// Deliveries (first one included) before a requeued or failing message is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles with each further attempt.
    #[serde(default = "default_retry_backoff", deserialize_with = "duration")]
    pub retry_backoff: Duration,
    /// Upper bound of the doubling backoff.
    #[serde(default = "default_retry_backoff_max", deserialize_with = "duration")]
    pub retry_backoff_max: Duration,
    /// Keep rejected and exhausted messages in the dead-letter table (true) or drop
    /// rejected ones (false). Exhausted retries are always kept: nothing is lost silently.
    #[serde(default = "default_true")]
    pub dead_letter: bool,
    /// Messages one instance may handle before it is dropped. 1 (default): a fresh
    /// instance per message, no state leaks. More is faster but shares guest state.
    #[serde(default = "default_instance_reuse")]
    pub instance_reuse: u32,
    /// Total bytes the sends of one call may store (each delivery's body and headers);
    /// past it `producer.send` answers `invalid`. A runaway plugin otherwise makes the
    /// host hold up to 10,000 × 16 MiB until the message settles.
    #[serde(default = "default_max_send_bytes", deserialize_with = "byte_size")]
    pub max_send_bytes: u64,
    /// Topics the plugin may send to, as patterns where `*` matches any run of
    /// characters (`"search.*"`); absent, any topic. A send outside them answers
    /// `invalid`: a plugin cannot inject messages where its operator did not mean it to.
    #[serde(default)]
    pub send_topics: Option<Vec<String>>,
    /// Log text one call may write (stdout, stderr and `log.log` together); the rest
    /// is dropped and one warning says how much, so a plugin cannot flood the log.
    /// `0` keeps a plugin silent.
    #[serde(default = "default_max_output_bytes", deserialize_with = "byte_size")]
    pub max_output_bytes: u64,
    /// Key/values the plugin reads through the `config` import.
    #[serde(default, deserialize_with = "plugin_config")]
    pub config: BTreeMap<String, String>,
}

fn default_queue() -> String {
    "default".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_memory_limit() -> u64 {
    64 << 20
}
fn default_max_attempts() -> u32 {
    5
}
fn default_retry_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_backoff_max() -> Duration {
    Duration::from_secs(3600)
}
fn default_true() -> bool {
    true
}
fn default_instance_reuse() -> u32 {
    1
}
fn default_max_send_bytes() -> u64 {
    64 << 20
}
fn default_max_output_bytes() -> u64 {
    64 << 10
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Parses `30s`, `1m 30s`, `250ms`; the error names the value and the accepted form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration {text:?} ({e}): write a number and a unit, like \"500ms\", \"30s\" or \"5m\"")
    })
}

fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let text = String::deserialize(d)?;
    parse_size::parse_size(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid size {text:?} ({e}): write a number and a unit, like \"64MiB\" or \"512KiB\""
        ))
    })
}

/// Accepts any scalar (`batch_size = 100` as well as `"100"`): plugins read strings.
fn plugin_config<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, toml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Datetime(dt) => dt.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "processor config key {key:?} is a {}: plugins read strings, so write a string, number or boolean",
                        other.type_str()
                    )));
                }
            };
            Ok((key, text))
        })
        .collect()
}

impl Config {
    /// Reads, parses and validates the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let config = Config::parse(&text, path, &base_dir)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses without validating: for tests and for tools that only need the shape.
    pub fn parse(text: &str, path: &Path, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            error,
        })?;
        config.base_dir = base_dir.to_path_buf();
        config.path = path.to_path_buf();
        Ok(config)
    }

    /// Cross-checks that serde cannot: names, files, ranges. Reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        match crate::transport::Dsn::parse(&self.transport.dsn) {
            Err(e) => problems.push(format!("[transport] dsn: {e}")),
            Ok(crate::transport::Dsn::Sqlite(_)) if self.transport.table_prefix != default_table_prefix() => {
                problems.push(format!(
                    "[transport] table_prefix = {:?} applies to PostgreSQL and MySQL only: an SQLite deployment has a file of its own; remove the key",
                    self.transport.table_prefix
                ))
            }
            Ok(_) => {}
        }
        let prefix = &self.transport.table_prefix;
        if prefix.is_empty()
            || prefix.len() > 32
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            problems.push(format!(
                "[transport] table_prefix = {prefix:?} must be 1 to 32 letters, digits or underscores, e.g. \"wasmq_\""
            ));
        }
        if self.consumer.heartbeat_timeout < Duration::from_millis(300) {
            problems.push(format!(
                "[consumer] heartbeat_timeout = {:?} is too short to renew claims in time: use at least \"300ms\"",
                self.consumer.heartbeat_timeout
            ));
        }
        if self.consumer.orphan_timeout < self.consumer.heartbeat_timeout {
            problems.push(format!(
                "[consumer] orphan_timeout = {:?} is shorter than heartbeat_timeout: a message would be dead-lettered before a consumer could record that it has the processor; use at least heartbeat_timeout (default \"24h\")",
                self.consumer.orphan_timeout
            ));
        }
        let plugins_dir = self.plugins_dir();
        if !plugins_dir.is_dir() {
            problems.push(format!(
                "[plugins] dir: {plugins_dir:?} is not a folder: create it or point `dir` at the folder that holds your .wasm files"
            ));
        }
        let mut names = HashSet::new();
        for (index, p) in self.processors.iter().enumerate() {
            let at = if p.name.is_empty() {
                format!("[[processor]] #{}", index + 1)
            } else {
                format!("[[processor]] {:?}", p.name)
            };
            if p.name.trim().is_empty() {
                problems.push(format!(
                    "{at}: `name` is empty: give every processor a unique name"
                ));
            } else if !names.insert(p.name.as_str()) {
                problems.push(format!(
                    "{at}: two processors are named {:?}: names must be unique, rename one",
                    p.name
                ));
            }
            if p.queue.trim().is_empty() {
                problems.push(format!(
                    "{at}: `queue` is empty: name a queue or leave the key out for \"default\""
                ));
            }
            let file = plugins_dir.join(&p.plugin);
            if !file.is_file() {
                problems.push(format!(
                    "{at}: plugin file {file:?} does not exist: build the plugin for wasm32-wasip2 and copy the .wasm into {plugins_dir:?}"
                ));
            }
            if let Some(topics) = &p.topics {
                if topics.is_empty() {
                    problems.push(format!(
                        "{at}: `topics` is an empty list: name topics, or leave the key out to use the plugin's subscribed-topics"
                    ));
                }
                if topics.len() > MAX_TOPICS_PER_PROCESSOR {
                    problems.push(format!(
                        "{at}: {} topics: a processor handles at most {MAX_TOPICS_PER_PROCESSOR}; split it into several processors",
                        topics.len()
                    ));
                }
                for topic in topics {
                    if let Err(e) = check_topic(topic) {
                        problems.push(format!("{at}: {e}"));
                    }
                }
            }
            if p.timeout.is_zero() {
                problems.push(format!(
                    "{at}: `timeout` is zero: give the plugin time to run, e.g. \"30s\""
                ));
            }
            if !(MIN_MEMORY_LIMIT..=MAX_MEMORY_LIMIT).contains(&p.memory_limit) {
                problems.push(format!(
                    "{at}: `memory_limit` = {} bytes is out of range: use between 1MiB and 4GiB",
                    p.memory_limit
                ));
            }
            if p.max_attempts == 0 {
                problems.push(format!(
                    "{at}: `max_attempts` = 0: use 1 or more (1 means no retries)"
                ));
            }
            if p.instance_reuse == 0 {
                problems.push(format!(
                    "{at}: `instance_reuse` = 0: use 1 for a fresh instance per message, or N to reuse one for N messages"
                ));
            }
            for pattern in p.send_topics.iter().flatten() {
                // A pattern is a topic with `*` in it: check it with a letter instead.
                if let Err(e) = check_topic(&pattern.replace('*', "x")) {
                    problems.push(format!(
                        "{at}: `send_topics` pattern {pattern:?} is not a topic pattern ({e}); `*` matches any run of characters"
                    ));
                }
            }
            if !(1..=MAX_SEND_BYTES_LIMIT).contains(&p.max_send_bytes) {
                problems.push(format!(
                    "{at}: `max_send_bytes` = {} bytes is out of range: use between 1 byte and 1GiB (a call's sends are held in memory until its message settles)",
                    p.max_send_bytes
                ));
            }
            if p.retry_backoff_max < p.retry_backoff {
                problems.push(format!(
                    "{at}: `retry_backoff_max` is smaller than `retry_backoff`"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: self.path.clone(),
                problems,
            })
        }
    }

    /// Resolves a path from the config against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.resolve(&self.plugins.dir)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.resolve(&self.plugins.cache_dir)
    }

    pub fn plugin_path(&self, processor: &ProcessorConfig) -> PathBuf {
        self.plugins_dir().join(&processor.plugin)
    }

    /// The largest memory any processor may grow to: sizes the pooling allocator.
    pub fn max_memory_limit(&self) -> u64 {
        self.processors
            .iter()
            .map(|p| p.memory_limit)
            .max()
            .unwrap_or_else(default_memory_limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("wasmq.toml"), Path::new("."))
    }

    #[test]
    fn defaults_fill_an_almost_empty_processor() {
        let c = parse("[[processor]]\nname = \"a\"\nplugin = \"a.wasm\"\n").unwrap();
        let p = &c.processors[0];
        assert_eq!(c.transport.dsn, "sqlite://var/wasmq.sqlite");
        assert_eq!(p.queue, "default");
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert_eq!(p.memory_limit, 64 << 20);
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.instance_reuse, 1);
        assert_eq!(p.max_send_bytes, 64 << 20);
        assert_eq!(p.max_output_bytes, 64 << 10);
        assert!(p.dead_letter);
        assert!(p.topics.is_none());
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let c = parse(include_str!("../../demo/wasmq.toml")).unwrap();
        assert_eq!(c.processors.len(), 2);
        let indexer = &c.processors[0];
        assert_eq!(indexer.name, "indexer");
        assert!(
            indexer.topics.is_none(),
            "the demo relies on subscribed-topics"
        );
        assert_eq!(indexer.config["index"], "products");
        assert_eq!(indexer.max_send_bytes, default_max_send_bytes());
        assert_eq!(indexer.max_output_bytes, default_max_output_bytes());
        assert_eq!(
            c.processors[1].topics.as_deref(),
            Some(&["search.indexed".to_string()][..])
        );
        assert_eq!(c.consumer.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.consumer.orphan_timeout, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = parse("[[processor]]\nname = \"a\"\nplugin = \"a.wasm\"\ntimeuot = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeuot"), "{err}");
    }

    #[test]
    fn bad_durations_and_sizes_name_the_value() {
        let err =
            parse("[[processor]]\nname = \"a\"\nplugin = \"a.wasm\"\ntimeout = \"3 fortnights\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("\"3 fortnights\"") && err.contains("30s"),
            "{err}"
        );
        let err =
            parse("[[processor]]\nname = \"a\"\nplugin = \"a.wasm\"\nmemory_limit = \"lots\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("\"lots\"") && err.contains("64MiB"), "{err}");
    }

    #[test]
    fn read_and_parse_errors_print_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wasmq.toml");
        let cause = std::fs::read(&path).unwrap_err().to_string();
        let text = format!(
            "{:#}",
            anyhow::Error::from(Config::load(&path).unwrap_err())
        );
        assert_eq!(text.matches(&cause).count(), 1, "{text}");

        let bad = parse("[transport\n").unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(bad));
        assert_eq!(text.matches("unclosed table").count(), 1, "{text}");
    }

    #[test]
    fn plugin_config_accepts_scalars_as_strings() {
        let c = parse("[[processor]]\nname = \"a\"\nplugin = \"a.wasm\"\n[processor.config]\nbatch = 100\nx = true\ny = \"s\"\n").unwrap();
        let cfg = &c.processors[0].config;
        assert_eq!(cfg["batch"], "100");
        assert_eq!(cfg["x"], "true");
        assert_eq!(cfg["y"], "s");
    }

    #[test]
    fn validation_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        let text = "[transport]\ndsn = \"redis://x\"\n\
            [[processor]]\nname = \"a\"\nplugin = \"missing.wasm\"\nmax_attempts = 0\nmax_send_bytes = \"2GiB\"\n\
            [[processor]]\nname = \"a\"\nplugin = \"missing.wasm\"\n";
        let c = Config::parse(text, &dir.path().join("wasmq.toml"), dir.path()).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("redis://x"), "{err}");
        assert!(
            err.contains("missing.wasm") && err.contains("does not exist"),
            "{err}"
        );
        assert!(err.contains("two processors are named \"a\""), "{err}");
        assert!(err.contains("max_attempts"), "{err}");
        assert!(
            err.contains("`max_send_bytes` = 2147483648 bytes is out of range"),
            "{err}"
        );
    }
}
