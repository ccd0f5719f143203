//! Shared harness for the end-to-end suites: a temporary folder with its own
//! `wasmq.toml` and SQLite file, the real `wasmq` binary, and the real plugins built
//! from guest-examples/ by build.rs.

#![allow(dead_code, reason = "each suite uses a different part of the harness")]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// Longest any single wasmq command may take in a test before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Milliseconds since the Unix epoch, as stored in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn plugins_dir() -> PathBuf {
    PathBuf::from(env!("WASMQ_TEST_PLUGINS"))
}

/// The `wasmq` binary next to this test's folder in the target directory.
pub fn wasmq_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps")
        .join("wasmq");
    assert!(
        bin.is_file(),
        "{bin:?} is missing: run the tests with `cargo test --workspace`, which builds the wasmq binary too"
    );
    bin
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn assert_success(&self) -> &Output {
        assert!(
            self.status.success(),
            "wasmq failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The first line of stderr (the log) that contains `needle`; fails the test
    /// with the whole log when there is none.
    pub fn log_line(&self, needle: &str) -> &str {
        self.stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line contains {needle:?}:\n{}", self.stderr))
    }

    pub fn assert_failure(&self) -> &Output {
        assert!(
            !self.status.success(),
            "wasmq should have failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running wasmq process whose output is collected in the background.
pub struct Running {
    child: Child,
    started: Instant,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Waits for exit, killing the process and failing the test past `COMMAND_TIMEOUT`.
    pub fn wait(mut self) -> Output {
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for wasmq") {
                return Output {
                    status,
                    stdout: self.stdout.join().unwrap_or_default(),
                    stderr: self.stderr.join().unwrap_or_default(),
                    elapsed: self.started.elapsed(),
                };
            }
            if self.started.elapsed() > COMMAND_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "wasmq did not finish within {COMMAND_TIMEOUT:?}; stderr:\n{}",
                    self.stderr.join().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// One test's world: a folder with `wasmq.toml` and `var/wasmq.sqlite`.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    /// A config with the shared test plugins folder and the given `[[processor]]` tables.
    pub fn new(processors: &str) -> Env {
        Env::with_config(&format!(
            "[transport]\ndsn = \"sqlite://var/wasmq.sqlite\"\n\n[plugins]\ndir = {:?}\ncache_dir = {:?}\n\n{processors}",
            plugins_dir(),
            plugins_dir().with_file_name("plugin-cache"),
        ))
    }

    /// A config file with exactly this text.
    pub fn with_config(text: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("wasmq.toml"), text).expect("writing wasmq.toml");
        Env { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_path(&self) -> PathBuf {
        self.path().join("var/wasmq.sqlite")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(wasmq_bin());
        command
            .current_dir(self.path())
            .arg("--config")
            .arg(self.path().join("wasmq.toml"))
            .args(args)
            .env_remove("WASMQ_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    pub fn spawn_command(&self, mut command: Command) -> Running {
        let started = Instant::now();
        let mut child = command.spawn().expect("starting wasmq");
        let stdout = collect(child.stdout.take().expect("piped stdout"));
        let stderr = collect(child.stderr.take().expect("piped stderr"));
        Running {
            child,
            started,
            stdout,
            stderr,
        }
    }

    pub fn spawn(&self, args: &[&str]) -> Running {
        self.spawn_command(self.command(args))
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.spawn(args).wait()
    }

    /// `wasmq send` with headers; returns the printed delivery ids.
    pub fn send(
        &self,
        topic: &str,
        body: &str,
        headers: &[(&str, &str)],
        extra: &[&str],
    ) -> Vec<String> {
        let mut args = vec!["send".to_string(), topic.to_string(), body.to_string()];
        for (name, value) in headers {
            args.push("--header".into());
            args.push(format!("{name}={value}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        out.assert_success();
        out.stdout.lines().map(str::to_string).collect()
    }

    /// `wasmq consume -v` of `limit` messages from `queue`, plus `extra` arguments;
    /// -v logs a `processed` line per message.
    pub fn consume(&self, queue: &str, limit: u32, extra: &[&str]) -> Output {
        let limit = limit.to_string();
        let mut args = vec!["consume", "--queue", queue, "--message-limit", &limit, "-v"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Runs SQL against the test's database (as any SQL client could).
    pub fn sql<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> T {
        let conn = Connection::open(self.db_path()).expect("opening the test database");
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        f(&conn).expect("test SQL")
    }

    /// Bodies waiting in a queue, oldest first.
    pub fn queue_bodies(&self, queue: &str) -> Vec<String> {
        self.sql(|conn| {
            conn.prepare("SELECT body FROM wasmq_messages WHERE queue = ? ORDER BY id")?
                .query_map([queue], |r| {
                    Ok(String::from_utf8_lossy(&r.get::<_, Vec<u8>>(0)?).into_owned())
                })?
                .collect()
        })
    }

    /// The JSON echoes the `scripted` plugin sent to the `sink` queue, in commit order.
    pub fn sink(&self) -> Vec<serde_json::Value> {
        self.queue_bodies("sink")
            .iter()
            .map(|b| {
                serde_json::from_str(b)
                    .unwrap_or_else(|e| panic!("sink body {b:?} is not JSON: {e}"))
            })
            .collect()
    }

    /// (id, attempts, error) of every dead letter.
    pub fn dead_letters(&self) -> Vec<(String, i64, String)> {
        self.sql(|conn| {
            conn.prepare("SELECT id, attempts, error FROM wasmq_dead_letters ORDER BY id")?
                .query_map([], |r| {
                    Ok((r.get::<_, i64>(0)?.to_string(), r.get(1)?, r.get(2)?))
                })?
                .collect()
        })
    }
}

/// The `duration_ms` of a consumer's `processed` log line (printed with -v).
pub fn duration_ms(line: &str) -> f64 {
    line.split("duration_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| {
            n.trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no duration in {line:?}"))
}

/// `[[processor]]` tables used by many tests: `scripted` on `test.scripted` in queue
/// `default`, and a `sink` (noop, in queue `sink`, which tests never consume) that
/// collects what `scripted` sends to `test.out`.
pub fn scripted_with_sink(extra: &str) -> String {
    format!(
        "[[processor]]\nname = \"scripted\"\nplugin = \"scripted.wasm\"\ntopics = [\"test.scripted\"]\n{extra}\n\n\
         [[processor]]\nname = \"sink\"\nplugin = \"noop.wasm\"\ntopics = [\"test.out\"]\nqueue = \"sink\"\n"
    )
}
