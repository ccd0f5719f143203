//! Shared harness for the end-to-end suites: a temporary folder with its own
//! `wasmq.toml` and SQLite file, the real `wasmq` binary, and the real plugins built
//! from guest-examples/ by build.rs.

#![allow(dead_code, reason = "each suite uses a different part of the harness")]

pub mod backend;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::Connection;

pub use backend::Backend;
use rusqlite::types::Value;

/// Debian's libfaketime (package faketime), for a process whose clock is wrong; the
/// multi-threaded variant, since wasmq runs threads.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

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

/// A running wasmq process whose output is collected line by line in the background.
/// Dropping it kills the process, so a failing test leaves nothing running.
pub struct Running {
    child: Child,
    started: Instant,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
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

    /// What the process has written to stderr so far (its log).
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting for wasmq")
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for exit, killing the process and failing the test past `COMMAND_TIMEOUT`.
    pub fn wait(mut self) -> Output {
        match self.wait_timeout(COMMAND_TIMEOUT.saturating_sub(self.started.elapsed())) {
            Some(status) => self.output(status),
            None => panic!(
                "wasmq did not finish within {COMMAND_TIMEOUT:?}; stderr:\n{}",
                self.kill().stderr
            ),
        }
    }

    /// SIGKILL, as a crash or the OOM killer would: returns what it printed.
    pub fn kill(mut self) -> Output {
        let _ = self.child.kill();
        let status = self.child.wait().expect("waiting for the killed wasmq");
        self.output(status)
    }

    /// The output of an exited process, once its pipes are read to the end.
    fn output(&mut self, status: ExitStatus) -> Output {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let take = |text: &Mutex<String>| {
            std::mem::take(&mut *text.lock().unwrap_or_else(|p| p.into_inner()))
        };
        Output {
            status,
            stdout: take(&self.stdout),
            stderr: take(&self.stderr),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A no-op for a process already waited for: std never signals a reaped pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `pipe` line by line into `text`, handing each line (without its newline) to
/// `on_line` first.
fn collect(
    pipe: impl Read + Send + 'static,
    text: Arc<Mutex<String>>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let decoded = String::from_utf8_lossy(&line);
            on_line(decoded.trim_end_matches('\n'));
            text.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_str(&decoded);
            line.clear();
        }
    })
}

/// Polls `done` until it holds; past `limit`, fails saying what was awaited, followed
/// by `logs()` (the output of the processes involved).
pub fn wait_until(
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A message id as text, whatever SQL type the store gives it (integers until ids
/// became strings such as UUIDv7).
pub fn id_string(id: Value) -> String {
    match id {
        Value::Integer(i) => i.to_string(),
        Value::Text(text) => text,
        Value::Blob(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Value::Real(r) => r.to_string(),
        Value::Null => panic!("a message id is NULL"),
    }
}

/// One test's world: a folder with `wasmq.toml`, and its message store: the file
/// `var/wasmq.sqlite`, or a database of its own on a server.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub server: Option<backend::ServerDb>,
}

impl Env {
    /// A config with the shared test plugins folder and the given `[[processor]]`
    /// tables, on SQLite.
    pub fn new(processors: &str) -> Env {
        Env::on(Backend::Sqlite, processors)
    }

    /// [`Env::new`] on `backend`.
    pub fn on(backend: Backend, processors: &str) -> Env {
        let server = (backend != Backend::Sqlite).then(|| backend::ServerDb::create(backend));
        let dsn = server
            .as_ref()
            .map_or_else(|| "sqlite://var/wasmq.sqlite".to_string(), |db| db.dsn());
        let mut env = Env::with_config(&format!(
            "[transport]\ndsn = \"{dsn}\"\n\n[plugins]\ndir = {:?}\ncache_dir = {:?}\n\n{processors}",
            plugins_dir(),
            plugins_dir().with_file_name("plugin-cache"),
        ));
        env.server = server;
        env
    }

    /// A config file with exactly this text.
    pub fn with_config(text: &str) -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("wasmq.toml"), text).expect("writing wasmq.toml");
        Env { dir, server: None }
    }

    /// Runs SQL on a server store (see [`backend::ServerDb::run`]).
    pub fn server_sql(&self, script: &str) -> Vec<Vec<String>> {
        self.server.as_ref().expect("a server store").run(script)
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

    /// `command` with libfaketime preloaded, its wall clock moved by `offset` (like
    /// "+1h") while its monotonic clock, which timers use, stays true: a host whose
    /// clock is wrong. Preloaded rather than run under the `faketime` wrapper, so the
    /// pid is wasmq's own and signals reach it.
    pub fn skewed_command(&self, offset: &str, args: &[&str]) -> Command {
        assert!(
            Path::new(LIBFAKETIME).is_file(),
            "{LIBFAKETIME} is missing: `apt-get install faketime` (.ci/run installs it)"
        );
        let mut command = self.command(args);
        command
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        command
    }

    pub fn spawn_command(&self, command: Command) -> Running {
        self.spawn_command_watching(command, |_| {})
    }

    /// Starts `command`, calling `on_stderr_line` with each line of its log as it is
    /// written (from another thread), so a test can react to what the process does.
    pub fn spawn_command_watching(
        &self,
        mut command: Command,
        on_stderr_line: impl FnMut(&str) + Send + 'static,
    ) -> Running {
        let started = Instant::now();
        let mut child = command.spawn().expect("starting wasmq");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(
                child.stdout.take().expect("piped stdout"),
                Arc::clone(&stdout),
                |_| {},
            ),
            collect(
                child.stderr.take().expect("piped stderr"),
                Arc::clone(&stderr),
                on_stderr_line,
            ),
        ];
        Running {
            child,
            started,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn spawn(&self, args: &[&str]) -> Running {
        self.spawn_command(self.command(args))
    }

    /// `spawn`, calling `on_stderr_line` with each log line as it is written.
    pub fn spawn_watching(
        &self,
        args: &[&str],
        on_stderr_line: impl FnMut(&str) + Send + 'static,
    ) -> Running {
        self.spawn_command_watching(self.command(args), on_stderr_line)
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
        if let Some(db) = &self.server {
            let sql = format!(
                "SELECT {} FROM wasmq_messages WHERE queue = {} ORDER BY seq;",
                db.body_text(),
                db.quote(queue)
            );
            return db.run(&sql).into_iter().map(|row| row.join("\t")).collect();
        }
        self.sql(|conn| {
            conn.prepare("SELECT body FROM wasmq_messages WHERE queue = ? ORDER BY seq")?
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
        if let Some(db) = &self.server {
            return db
                .run("SELECT id, attempts, REPLACE(error, CHR(10), ' ') FROM wasmq_dead_letters ORDER BY dead_at, id;"
                    .replace("CHR(10)", if db.backend == Backend::Mysql { "CHAR(10)" } else { "CHR(10)" })
                    .as_str())
                .into_iter()
                .map(|row| (row[0].clone(), row[1].parse().expect("attempts"), row[2..].join("\t")))
                .collect();
        }
        self.sql(|conn| {
            conn.prepare("SELECT id, attempts, error FROM wasmq_dead_letters ORDER BY dead_at, id")?
                .query_map([], |r| Ok((id_string(r.get(0)?), r.get(1)?, r.get(2)?)))?
                .collect()
        })
    }

    /// The one integer `sql` selects, on any backend.
    pub fn scalar(&self, sql: &str) -> i64 {
        let text = match &self.server {
            Some(db) => db.run(&format!("{sql};"))[0][0].clone(),
            None => self
                .sql(|conn| conn.query_row(sql, [], |r| r.get::<_, i64>(0)))
                .to_string(),
        };
        text.parse()
            .unwrap_or_else(|e| panic!("{sql} gave {text:?}, not an integer: {e}"))
    }

    /// Messages claimed by a consumer right now.
    pub fn claimed(&self) -> i64 {
        if let Some(db) = &self.server {
            return db.run("SELECT COUNT(*) FROM wasmq_messages WHERE claimed_by IS NOT NULL;")[0]
                [0]
            .parse()
            .expect("a count");
        }
        self.sql(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM wasmq_messages WHERE claimed_by IS NOT NULL",
                [],
                |r| r.get(0),
            )
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
