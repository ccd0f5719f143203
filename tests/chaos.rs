//! Chaos: consumers killed, frozen, locked out, outlived by a long message and crashed
//! by a poison message, judged by the ledger.
//!
//! The `ledger` plugin (guest-examples/ledger) ACKs every `chaos.in` message with one
//! send to `ledger.entry`, whose deliveries wait in queue `ledger`, which no case
//! consumes. So the ledger rows are exactly the effects that were committed: one per
//! message is exactly-once effects, none is a loss, two is an ACK committed twice. The
//! consumers' `-v` logs show every processing (`ledger start …`), which is how a case
//! counts duplicate work, as opposed to duplicate effects.

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Backend, Env, Output, Running, backend::backends};

/// The lease of most cases: short, so that leases run out within a case's seconds.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Longest a case waits for its queue to drain before failing with the logs: a
/// hang detector, generous for a machine busy with other work.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// Longest a consumer may take to exit after SIGTERM with nothing slow in flight.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// CPU time a resumed consumer may use in `CALM_WINDOW`: a consumer that spins uses
/// the whole window.
const CALM_CPU: Duration = Duration::from_millis(500);
const CALM_WINDOW: Duration = Duration::from_secs(2);

/// Messages in flight per consumer where a case runs several.
const CONCURRENCY: usize = 8;

/// `max_attempts` when a processor does not set it (README, config reference).
const DEFAULT_MAX_ATTEMPTS: usize = 5;

/// Cases on a server hold this for reading; the restart case holds it for writing,
/// so no other case's server goes away under it.
static SERVERS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The read side of [`SERVERS`], for a case on `backend`.
fn sharing_server(backend: Backend) -> Option<std::sync::RwLockReadGuard<'static, ()>> {
    (backend != Backend::Sqlite).then(|| SERVERS.read().unwrap_or_else(|p| p.into_inner()))
}

/// A store with the `ledger` processor on `chaos.in` (queue `default`) and its
/// `entries` (noop, queue `ledger`), leases of `heartbeat`, and `extra` config.
fn chaos_env(heartbeat: Duration, extra: &str) -> Env {
    chaos_env_on(Backend::Sqlite, heartbeat, extra)
}

/// [`chaos_env`] on `backend`.
fn chaos_env_on(backend: Backend, heartbeat: Duration, extra: &str) -> Env {
    let env = Env::on(
        backend,
        &format!(
            "[consumer]\nheartbeat_timeout = \"{}ms\"\n\n\
         [[processor]]\nname = \"ledger\"\nplugin = \"ledger.wasm\"\ntopics = [\"chaos.in\"]\nqueue = \"default\"\n\n\
         [[processor]]\nname = \"entries\"\nplugin = \"noop.wasm\"\ntopics = [\"ledger.entry\"]\nqueue = \"ledger\"\n\n{extra}",
            heartbeat.as_millis()
        ),
    );
    // Opening the store creates the schema the seeding SQL writes into.
    env.run(&["dead-letter", "list"]).assert_success();
    env
}

/// Writes `ledger` messages with these bodies the way a foreign SQL producer would,
/// in one transaction; `headers` go on every one of them.
fn seed(env: &Env, bodies: &[String], headers: &[(&str, &str)]) {
    let headers = serde_json::to_string(headers).expect("headers as JSON");
    if let Some(db) = &env.server {
        let mut script = String::from("BEGIN;\n");
        for chunk in bodies.chunks(1000) {
            let rows: Vec<String> = chunk
                .iter()
                .map(|body| {
                    format!(
                        "('default', 'ledger', 'chaos.in', {}, {}, 0, 0)",
                        db.body_literal(body),
                        db.quote(&headers)
                    )
                })
                .collect();
            script.push_str(&format!(
                "INSERT INTO wasmq_messages (queue, processor, topic, body, headers, published_at, available_at) VALUES {};\n",
                rows.join(", ")
            ));
        }
        script.push_str("COMMIT;\n");
        db.run(&script);
        return;
    }
    env.sql(|conn| {
        conn.execute_batch("BEGIN")?;
        let mut insert = conn.prepare(
            "INSERT INTO wasmq_messages (queue, processor, topic, body, headers, published_at, available_at)
             VALUES ('default', 'ledger', 'chaos.in', ?, ?, 0, 0)",
        )?;
        for body in bodies {
            insert.execute(rusqlite::params![body.as_bytes(), headers])?;
        }
        conn.execute_batch("COMMIT")
    });
}

/// `count` unique bodies starting with `prefix`: a body is a message's key into the
/// ledger and into the logs, so it holds no spaces.
fn bodies(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// The id the store gave the message with this body.
fn message_id(env: &Env, body: &str) -> String {
    if let Some(db) = &env.server {
        let sql = format!(
            "SELECT id FROM wasmq_messages WHERE {} = {};",
            db.body_text(),
            db.quote(body)
        );
        return db.run(&sql)[0][0].clone();
    }
    common::id_string(env.sql(|conn| {
        conn.query_row(
            "SELECT id FROM wasmq_messages WHERE body = ?",
            [body.as_bytes()],
            |r| r.get(0),
        )
    }))
}

/// Messages still waiting in queue `default`, claimed or not.
fn waiting(env: &Env) -> i64 {
    if let Some(db) = &env.server {
        return db.run("SELECT COUNT(*) FROM wasmq_messages WHERE queue = 'default';")[0][0]
            .parse()
            .expect("a count");
    }
    env.sql(|conn| {
        conn.query_row(
            "SELECT COUNT(*) FROM wasmq_messages WHERE queue = 'default'",
            [],
            |r| r.get(0),
        )
    })
}

/// Committed ledger entries per input body.
fn ledger(env: &Env) -> BTreeMap<String, usize> {
    let mut entries = BTreeMap::new();
    for entry in env.queue_bodies("ledger") {
        let entry: serde_json::Value = serde_json::from_str(&entry)
            .unwrap_or_else(|e| panic!("ledger entry {entry:?} is not JSON: {e}"));
        let body = entry["body"]
            .as_str()
            .expect("a ledger entry names its body");
        *entries.entry(body.to_string()).or_default() += 1;
    }
    entries
}

/// The fields of /proc/PID/stat from field 3 (the state) on, after the command name.
fn proc_stat(pid: i32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    let after_name = stat.rfind(')').expect("a stat line") + 1;
    stat[after_name..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// CPU time (user + system) the process has used so far.
fn cpu_time(pid: i32) -> Duration {
    // utime and stime are fields 14 and 15, in clock ticks.
    let stat = proc_stat(pid);
    let ticks: u64 = stat[11].parse::<u64>().unwrap() + stat[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The body in a `ledger start id=… body=… attempt=…` log line, if it is one.
fn started_body(line: &str) -> Option<&str> {
    let rest = &line[line.find("ledger start id=")?..];
    rest.split_whitespace()
        .find_map(|field| field.strip_prefix("body="))
}

/// Every consumer process a case started, and the output of those that ended: the
/// ledger says what was committed, these logs say what was processed and why.
/// Dropping it (a failing case) kills whatever still runs.
struct Fleet<'a> {
    env: &'a Env,
    /// The arguments of each consumer slot, kept for restarts.
    args: Vec<Vec<String>>,
    live: Vec<Option<Running>>,
    ended: Vec<(usize, Output)>,
}

impl<'a> Fleet<'a> {
    fn new(env: &'a Env) -> Fleet<'a> {
        Fleet {
            env,
            args: Vec::new(),
            live: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// Two consumers side by side, each at `--concurrency CONCURRENCY`.
    fn pair(env: &'a Env) -> Fleet<'a> {
        Fleet::of(env, 2)
    }

    /// `n` consumers side by side, each at `--concurrency CONCURRENCY`.
    fn of(env: &'a Env, n: usize) -> Fleet<'a> {
        let mut fleet = Fleet::new(env);
        let concurrency = CONCURRENCY.to_string();
        for _ in 0..n {
            fleet.start(&["--concurrency", &concurrency]);
        }
        fleet
    }

    /// Starts a `consume -v` on queue `default` with `args`; returns its slot.
    fn start(&mut self, args: &[&str]) -> usize {
        self.start_watching(args, |_| {})
    }

    /// `start` on a host whose wall clock is off by `offset` (see
    /// `Env::skewed_command`). Such a slot is not restarted.
    fn start_skewed(&mut self, offset: &str, args: &[&str]) -> usize {
        let mut full = vec!["consume", "--queue", "default", "-v"];
        full.extend_from_slice(args);
        self.args
            .push(full.iter().map(|arg| arg.to_string()).collect());
        let command = self.env.skewed_command(offset, &full);
        self.live.push(Some(self.env.spawn_command(command)));
        self.live.len() - 1
    }

    /// `start`, calling `on_line` with each of its log lines as they are written.
    fn start_watching(
        &mut self,
        args: &[&str],
        on_line: impl FnMut(&str) + Send + 'static,
    ) -> usize {
        let mut full = vec!["consume", "--queue", "default", "-v"];
        full.extend_from_slice(args);
        self.args
            .push(full.iter().map(|arg| arg.to_string()).collect());
        self.live.push(None);
        let slot = self.live.len() - 1;
        self.respawn(slot, on_line);
        slot
    }

    fn respawn(&mut self, slot: usize, on_line: impl FnMut(&str) + Send + 'static) {
        let args: Vec<&str> = self.args[slot].iter().map(String::as_str).collect();
        self.live[slot] = Some(self.env.spawn_watching(&args, on_line));
    }

    fn running(&mut self, slot: usize) -> &mut Running {
        self.live[slot]
            .as_mut()
            .unwrap_or_else(|| panic!("consumer #{slot} is not running"))
    }

    /// SIGKILLs the consumer in `slot`, keeping its log.
    fn kill(&mut self, slot: usize) {
        let running = self.live[slot].take().expect("a running consumer to kill");
        self.ended.push((slot, running.kill()));
    }

    /// SIGKILLs the consumer in `slot` and starts it again with the same arguments.
    fn restart(&mut self, slot: usize, on_line: impl FnMut(&str) + Send + 'static) {
        self.kill(slot);
        self.respawn(slot, on_line);
    }

    /// Fails the case if a consumer exited without being told to.
    fn assert_all_running(&mut self, when: &str) {
        for slot in 0..self.live.len() {
            if let Some(status) = self.running(slot).exited() {
                let output = self.live[slot].take().expect("running").kill();
                self.ended.push((slot, output));
                panic!(
                    "consumer #{slot} exited by itself ({status}) {when}\n{}",
                    self.logs()
                );
            }
        }
    }

    /// SIGTERMs the consumer in `slot` and waits up to `STOP_LIMIT` for it to exit;
    /// the error says how it failed to exit cleanly.
    fn try_stop(&mut self, slot: usize) -> Result<(), String> {
        self.running(slot).signal(libc::SIGTERM);
        let status = self
            .running(slot)
            .wait_timeout(STOP_LIMIT)
            .ok_or_else(|| format!("ignored SIGTERM for {STOP_LIMIT:?}"))?;
        let output = self.live[slot].take().expect("running").kill();
        self.ended.push((slot, output));
        match status.code() {
            Some(0) => Ok(()),
            _ => Err(format!("exited with {status} on SIGTERM")),
        }
    }

    /// SIGTERMs the consumer in `slot` and requires a clean exit within `STOP_LIMIT`.
    fn stop(&mut self, slot: usize) {
        if let Err(e) = self.try_stop(slot) {
            panic!("consumer #{slot} {e}\n{}", self.logs());
        }
    }

    /// Lets the consumers drain queue `default`, then stops them.
    fn finish(&mut self) {
        self.drain(|_| {});
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for slot in 0..self.live.len() {
            if self.live[slot].is_some() {
                self.stop(slot);
            }
        }
    }

    /// Every run's full log, ended runs first, with its slot.
    fn all_logs(&self) -> Vec<(usize, String)> {
        let ended = self
            .ended
            .iter()
            .map(|(slot, out)| (*slot, out.stderr.clone()));
        let live = self
            .live
            .iter()
            .enumerate()
            .filter_map(|(slot, run)| Some((slot, run.as_ref()?.stderr())));
        ended.chain(live).collect()
    }

    /// The end of every run's log, for a failure message.
    fn logs(&self) -> String {
        const TAIL: usize = 40;
        let mut text = String::new();
        for (slot, log) in self.all_logs() {
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(TAIL);
            text.push_str(&format!(
                "--- consumer #{slot}: last {} of {} log lines ---\n",
                lines.len() - from,
                lines.len()
            ));
            for line in &lines[from..] {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Claims lost by the consumers in `slot` (all with `None`): each is logged once.
    fn lost_claims_of(&self, slot: Option<usize>) -> usize {
        self.all_logs()
            .iter()
            .filter(|(s, _)| slot.is_none_or(|slot| *s == slot))
            .map(|(_, log)| log.lines().filter(|l| l.contains("lost the claim")).count())
            .sum()
    }

    fn lost_claims(&self) -> usize {
        self.lost_claims_of(None)
    }

    /// How often each body was started, over every run's log.
    fn starts(&self) -> BTreeMap<String, usize> {
        let mut starts = BTreeMap::new();
        for (_, log) in self.all_logs() {
            for body in log.lines().filter_map(started_body) {
                *starts.entry(body.to_string()).or_default() += 1;
            }
        }
        starts
    }

    /// Waits until queue `default` is empty, calling `supervise` every 20 ms (to kill
    /// and restart consumers). Fails with the logs past `DRAIN_LIMIT`, or at once when
    /// a consumer exits by itself. Returns how long it took.
    fn drain(&mut self, mut supervise: impl FnMut(&mut Fleet<'a>)) -> Duration {
        let started = Instant::now();
        loop {
            let left = waiting(self.env);
            if left == 0 {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < DRAIN_LIMIT,
                "{left} messages still waiting in queue default after {DRAIN_LIMIT:?}\n{}",
                self.logs()
            );
            supervise(self);
            self.assert_all_running("while the queue drained");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every body in `expected` has exactly one ledger entry and nothing else has any;
/// queue `default` is empty.
fn assert_ledger(env: &Env, fleet: &Fleet<'_>, expected: &[String]) {
    let mut entries = ledger(env);
    let mut wrong: Vec<String> = Vec::new();
    for body in expected {
        match entries.remove(body).unwrap_or(0) {
            1 => {}
            n => wrong.push(format!("{body}: {n} entries")),
        }
    }
    wrong.extend(
        entries
            .iter()
            .map(|(body, n)| format!("{body}: {n} entries, unexpected")),
    );
    assert!(
        wrong.is_empty(),
        "{} of {} messages do not have exactly one ledger entry; the first: {:?}\n{}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(10)],
        fleet.logs()
    );
    assert_eq!(waiting(env), 0, "messages left in queue default");
}

fn assert_no_dead_letters(env: &Env, fleet: &Fleet<'_>) {
    let dead = env.dead_letters();
    assert!(
        dead.is_empty(),
        "{} dead letters, the first: {:?}\n{}",
        dead.len(),
        &dead[..dead.len().min(5)],
        fleet.logs()
    );
}

#[test]
fn killing_a_consumer_every_two_seconds_commits_every_message_once() {
    for backend in backends() {
        kill_loop(backend);
    }
}

fn kill_loop(backend: Backend) {
    let _server = sharing_server(backend);
    const KILL_EVERY: Duration = Duration::from_secs(2);
    // Enough for several kills with messages in flight; a server's round trips make
    // each message slower, so fewer do.
    let messages = match backend {
        Backend::Sqlite => 20_000,
        Backend::Postgres | Backend::Mysql => 10_000,
    };
    let env = chaos_env_on(backend, HEARTBEAT, "");
    let expected = bodies("k", messages);
    // 10 ms each: 20,000 messages over 16 slots take at least 12.5 s, 10,000 at
    // least 6 s; enough for several kills, each finding messages in flight.
    seed(&env, &expected, &[("x-sleep-ms", "10")]);
    let mut fleet = Fleet::pair(&env);

    let mut last_kill = Instant::now();
    let mut kills = 0;
    let drained_in = fleet.drain(|fleet| {
        if last_kill.elapsed() >= KILL_EVERY {
            // Alternate, so both consumers die mid-stream and inherit each other's claims.
            fleet.restart(kills % 2, |_| {});
            kills += 1;
            last_kill = Instant::now();
        }
    });
    fleet.stop_all();

    let duplicates: usize = fleet.starts().values().map(|n| n - 1).sum();
    // A kill finds at most CONCURRENCY messages in flight; a live consumer starved
    // past its lease on this busy machine loses claims, and logs each. On a server a
    // settlement is a round trip to commit: a slot is reused once its settlement is
    // handed to the settler, so a kill can also catch up to CONCURRENCY settlements
    // handed over but not yet committed, whose messages run again.
    let per_kill = match backend {
        Backend::Sqlite => CONCURRENCY,
        Backend::Postgres | Backend::Mysql => 2 * CONCURRENCY,
    };
    let explained = per_kill * kills + fleet.lost_claims();
    println!(
        "{backend:?}: {messages} messages drained in {drained_in:?} with {kills} kills; \
         {duplicates} duplicate processings (at most {explained} explained)"
    );
    assert_ledger(&env, &fleet, &expected);
    assert_no_dead_letters(&env, &fleet);
    assert!(
        kills >= 3,
        "the queue drained in {drained_in:?}, after only {kills} kills: make the messages slower"
    );
    assert!(
        duplicates <= explained,
        "{backend:?}: {duplicates} duplicate processings, more than the {per_kill} in flight × {kills} kills and the lost claims explain; the first: {:?}\n{}",
        fleet
            .starts()
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .take(20)
            .collect::<Vec<_>>(),
        fleet.logs()
    );
}

#[test]
fn two_consumers_side_by_side_never_process_a_message_twice() {
    for backend in backends() {
        side_by_side(backend);
    }
}

fn side_by_side(backend: Backend) {
    let _server = sharing_server(backend);
    // SQLite: two consumers of one file. A server: the scale-out case, four consumer
    // processes sharing the database.
    let (consumers, messages) = match backend {
        Backend::Sqlite => (2, 5_000),
        Backend::Postgres | Backend::Mysql => (4, 20_000),
    };
    // A long lease: with nothing killed, no lease should run out even on a loaded
    // machine, so any second processing is a claim handed out twice.
    let env = chaos_env_on(backend, Duration::from_secs(10), "");
    let expected = bodies("p", messages);
    seed(&env, &expected, &[]);
    let mut fleet = Fleet::of(&env, consumers);
    fleet.finish();

    let starts = fleet.starts();
    let processings: usize = starts.values().sum();
    let twice: Vec<_> = starts.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(
        processings == messages && twice.is_empty(),
        "{backend:?}: {processings} processings of {messages} messages by {consumers} consumers; processed more than once: {twice:?}\n{}",
        fleet.logs()
    );
    assert_ledger(&env, &fleet, &expected);
    assert_no_dead_letters(&env, &fleet);
}

/// Seeds one message that sleeps 1.5 leases and starts consumer A on it with a free
/// slot (`--concurrency 2`); returns A's slot and the message's body and id, once A
/// has started it.
fn start_frozen_candidate(env: &Env, fleet: &mut Fleet<'_>) -> (usize, String, String) {
    let body = "frozen".to_string();
    let sleep_ms = (HEARTBEAT * 3 / 2).as_millis().to_string();
    seed(
        env,
        std::slice::from_ref(&body),
        &[("x-sleep-ms", &sleep_ms)],
    );
    let id = message_id(env, &body);
    let a = fleet.start(&["--concurrency", "2"]);
    common::wait_until(
        "consumer A started the message",
        Duration::from_secs(30),
        || fleet.logs(),
        || fleet.starts().contains_key(&body),
    );
    (a, body, id)
}

/// Whether another process could take the write lock now.
fn write_lock_is_free(env: &Env) -> bool {
    // A server's row locks do not stop the others.
    if env.server.is_some() {
        return true;
    }
    let conn = rusqlite::Connection::open(env.db_path()).expect("opening the store");
    conn.busy_timeout(Duration::from_millis(200)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK").is_ok()
}

/// Freezes consumer `slot` (SIGSTOP: a VM pause, swap) for three leases and until
/// `until` holds, running `meanwhile` once it is frozen.
fn freeze(
    fleet: &mut Fleet<'_>,
    slot: usize,
    meanwhile: impl FnOnce(&mut Fleet<'_>),
    until: impl Fn(&Fleet<'_>) -> bool,
) {
    // A process frozen inside a write transaction keeps the SQLite lock and stops
    // everyone, which no consumer can help; freeze it again until it holds none.
    let env = fleet.env;
    let mut tries = 0;
    loop {
        fleet.running(slot).signal(libc::SIGSTOP);
        let pid = fleet.running(slot).pid();
        common::wait_until(
            "the consumer is stopped",
            Duration::from_secs(5),
            || fleet.logs(),
            || proc_stat(pid)[0] == "T",
        );
        if write_lock_is_free(env) {
            break;
        }
        tries += 1;
        assert!(
            tries < 20,
            "consumer #{slot} held the write lock each of {tries} times it was frozen\n{}",
            fleet.logs()
        );
        fleet.running(slot).signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(50));
    }
    let frozen_at = Instant::now();
    meanwhile(fleet);
    common::wait_until(
        "the freeze is over",
        Duration::from_secs(30),
        || fleet.logs(),
        || frozen_at.elapsed() >= 3 * HEARTBEAT && until(fleet),
    );
}

/// Resumes frozen consumer `slot` and stops it: it must not spin (CPU time over
/// `CALM_WINDOW`) and must obey SIGTERM.
fn resume_and_stop(fleet: &mut Fleet<'_>, slot: usize) {
    fleet.running(slot).signal(libc::SIGCONT);
    let pid = fleet.running(slot).pid();
    let before = cpu_time(pid);
    std::thread::sleep(CALM_WINDOW);
    let cpu = cpu_time(pid) - before;
    println!("consumer #{slot} used {cpu:?} of CPU in the {CALM_WINDOW:?} after it was resumed");
    let stopped = fleet.try_stop(slot);
    assert!(
        cpu < CALM_CPU && stopped.is_ok(),
        "consumer #{slot} after resuming: {cpu:?} of CPU in {CALM_WINDOW:?} (a spinning consumer uses it all); on SIGTERM: {}\n{}",
        stopped.err().unwrap_or_else(|| "exited cleanly".into()),
        fleet.logs()
    );
}

#[test]
fn a_consumer_frozen_past_its_lease_resumes_without_spinning() {
    // Nobody takes the message over: on resuming, A finds its own claim expired.
    let env = chaos_env(HEARTBEAT, "");
    let mut fleet = Fleet::new(&env);
    let (a, body, _) = start_frozen_candidate(&env, &mut fleet);
    freeze(&mut fleet, a, |_| {}, |_| true);
    resume_and_stop(&mut fleet, a);
    assert_ledger(&env, &fleet, &[body]);
    assert_no_dead_letters(&env, &fleet);
}

#[test]
fn a_consumer_frozen_while_another_takes_its_message_over_commits_nothing_late() {
    for backend in backends() {
        frozen_holder(backend);
    }
}

fn frozen_holder(backend: Backend) {
    let _server = sharing_server(backend);
    let env = chaos_env_on(backend, HEARTBEAT, "");
    let mut fleet = Fleet::new(&env);
    let (a, body, id) = start_frozen_candidate(&env, &mut fleet);
    // B takes the message over once A's lease has run out, and commits it.
    freeze(
        &mut fleet,
        a,
        |fleet| {
            fleet.start(&["--concurrency", "1"]);
        },
        |_| ledger(&env).contains_key(&body),
    );
    resume_and_stop(&mut fleet, a);
    fleet.stop_all();

    assert_ledger(&env, &fleet, &[body]);
    assert_no_dead_letters(&env, &fleet);
    let log_a = fleet
        .all_logs()
        .into_iter()
        .find(|(slot, _)| *slot == a)
        .expect("A's log")
        .1;
    assert!(
        log_a
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&id) && l.contains("claim")),
        "{backend:?}: consumer A's late ACK of {id} should log a WARN naming the message and its lost claim\n{}",
        fleet.logs()
    );
}

#[test]
fn a_consumer_whose_clock_runs_an_hour_ahead_duplicates_work_but_no_effect() {
    for backend in backends() {
        clock_ahead(backend);
    }
}

fn clock_ahead(backend: Backend) {
    let _server = sharing_server(backend);
    const MESSAGES: usize = 400;
    let env = chaos_env_on(backend, HEARTBEAT, "");
    let expected = bodies("s", MESSAGES);
    seed(&env, &expected, &[("x-sleep-ms", "20")]);
    // Leases are stamped with each consumer's own clock. To B, an hour ahead, every
    // lease of A's has long expired: B takes A's messages over (alone, as crashed
    // ones), and A's claims are lost. What A then finishes must commit nothing.
    let concurrency = CONCURRENCY.to_string();
    let mut fleet = Fleet::new(&env);
    let a = fleet.start(&["--concurrency", &concurrency]);
    fleet.start_skewed("+1h", &["--concurrency", &concurrency]);
    fleet.finish();

    assert_ledger(&env, &fleet, &expected);
    assert_no_dead_letters(&env, &fleet);
    let duplicates: usize = fleet.starts().values().map(|n| n - 1).sum();
    let lost_by_a = fleet.lost_claims_of(Some(a));
    println!(
        "{backend:?}: {MESSAGES} messages with one consumer an hour ahead: {duplicates} processed twice, {lost_by_a} claims A lost"
    );
    // A server's leases are on the database's clock: a skewed host changes nothing.
    if backend != Backend::Sqlite {
        assert_eq!(
            (duplicates, lost_by_a),
            (0, 0),
            "{backend:?}: a host's clock moved leases\n{}",
            fleet.logs()
        );
    }
    assert!(
        duplicates <= lost_by_a,
        "{duplicates} duplicate processings, but A lost only {lost_by_a} claims to explain them\n{}",
        fleet.logs()
    );
}

#[test]
fn an_exclusive_lock_held_for_longer_than_a_lease_stops_no_consumer() {
    const MESSAGES: usize = 4_000;
    let env = chaos_env(HEARTBEAT, "");
    let expected = bodies("l", MESSAGES);
    seed(&env, &expected, &[]);
    let mut fleet = Fleet::pair(&env);
    common::wait_until(
        "the consumers are mid-stream",
        Duration::from_secs(60),
        || fleet.logs(),
        || env.queue_bodies("ledger").len() >= MESSAGES / 10,
    );

    // Another process (an sqlite3 shell, a long purge, VACUUM) holds the write lock.
    let conn = rusqlite::Connection::open(env.db_path()).expect("opening the store");
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch("BEGIN EXCLUSIVE")
        .expect("taking the lock");
    let left: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM wasmq_messages WHERE queue = 'default'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    std::thread::sleep(HEARTBEAT * 3 / 2);
    conn.execute_batch("COMMIT").expect("releasing the lock");
    drop(conn);
    assert!(
        left > 0,
        "the queue drained before the lock was taken: seed more messages"
    );
    fleet.assert_all_running("after the lock was released");

    fleet.finish();
    assert_ledger(&env, &fleet, &expected);
    assert_no_dead_letters(&env, &fleet);
}

#[test]
fn a_message_running_for_three_leases_is_not_redelivered_while_its_consumer_lives() {
    let env = chaos_env(HEARTBEAT, "");
    let body = "long".to_string();
    let sleep_ms = (3 * HEARTBEAT).as_millis().to_string();
    seed(
        &env,
        std::slice::from_ref(&body),
        &[("x-sleep-ms", &sleep_ms)],
    );
    // The second consumer would take the message over if its lease were not renewed.
    let mut fleet = Fleet::pair(&env);
    fleet.finish();

    let starts = fleet.starts();
    assert_eq!(
        starts.get(&body),
        Some(&1),
        "the long message was started more than once: its lease was not renewed\n{}",
        fleet.logs()
    );
    assert_ledger(&env, &fleet, &[body]);
    assert_no_dead_letters(&env, &fleet);
}

#[test]
fn a_poison_message_that_kills_its_consumer_is_the_only_one_dead_lettered() {
    const INNOCENTS: usize = 50;
    let env = chaos_env(HEARTBEAT, "");
    let innocents = bodies("i", INNOCENTS);
    let poison = "poison".to_string();
    // Among the first claimed, with innocents in flight beside it; the innocents take a
    // moment each, so a crash finds some of them in flight.
    seed(&env, &innocents[..5], &[("x-sleep-ms", "200")]);
    seed(
        &env,
        std::slice::from_ref(&poison),
        &[("x-sleep-ms", "10000")],
    );
    seed(&env, &innocents[5..], &[("x-sleep-ms", "200")]);

    // The supervisor: the consumer "crashes" (SIGKILL) as soon as its log shows the
    // poison message starting, and is restarted whenever it is down.
    let (crash, crashes) = mpsc::channel::<()>();
    let watch = move |crash: mpsc::Sender<()>| {
        move |line: &str| {
            if started_body(line) == Some("poison") {
                let _ = crash.send(());
            }
        }
    };
    let mut fleet = Fleet::new(&env);
    let concurrency = CONCURRENCY.to_string();
    let consumer = fleet.start_watching(&["--concurrency", &concurrency], watch(crash.clone()));
    let mut kills = 0;
    fleet.drain(|fleet| {
        if crashes.try_recv().is_ok() {
            fleet.restart(consumer, watch(crash.clone()));
            kills += 1;
        } else if fleet.running(consumer).exited().is_some() {
            fleet.restart(consumer, watch(crash.clone()));
        }
    });
    fleet.stop_all();

    println!("the poison message was killed {kills} times");
    let dead = env.dead_letters();
    let poison_id_in_log = |id: &str| {
        fleet
            .all_logs()
            .iter()
            .any(|(_, log)| log.contains(&format!("ledger start id={id} body=poison")))
    };
    assert!(
        dead.len() == 1 && poison_id_in_log(&dead[0].0),
        "only the poison message should be dead-lettered, not {} messages: {dead:?}\n{}",
        dead.len(),
        fleet.logs()
    );
    assert!(
        dead[0].2.contains("without settling"),
        "the reason says it was claimed without settling: {:?}",
        dead[0].2
    );
    assert_eq!(
        kills, DEFAULT_MAX_ATTEMPTS,
        "the poison message is tried max_attempts times, then dead-lettered without a try"
    );
    assert_ledger(&env, &fleet, &innocents);
}

#[test]
fn a_body_larger_than_the_receivers_memory_limit_is_refused_at_send() {
    let env = chaos_env(
        HEARTBEAT,
        "[[processor]]\nname = \"small\"\nplugin = \"noop.wasm\"\ntopics = [\"chaos.big\"]\nmemory_limit = \"1MiB\"\n",
    );
    let file = env.path().join("big.bin");
    let size = 2 << 20;
    std::fs::write(&file, vec![b'x'; size]).expect("writing the body file");
    let out = env.run(&["send", "chaos.big", "--body-file", file.to_str().unwrap()]);
    out.assert_failure();
    let named = |options: &[&str]| options.iter().any(|o| out.stderr.contains(o));
    assert!(
        named(&["memory_limit"]) && named(&["small"]),
        "the error names the limit and the processor: {}",
        out.stderr
    );
    assert!(
        named(&[&size.to_string(), "2 MiB", "2MiB", "2.0 MiB"]),
        "the error names the body size: {}",
        out.stderr
    );
    assert!(
        named(&["1048576", "1 MiB", "1MiB", "1.0 MiB"]),
        "the error names the limit's value: {}",
        out.stderr
    );
    assert_eq!(waiting(&env), 0, "nothing was stored");

    // A body within the limit still goes through.
    std::fs::write(&file, vec![b'x'; 64 << 10]).expect("writing the body file");
    env.run(&["send", "chaos.big", "--body-file", file.to_str().unwrap()])
        .assert_success();
}

#[test]
fn a_database_server_restarted_under_running_consumers_loses_nothing() {
    for backend in backends() {
        if backend != Backend::Sqlite {
            restarted_server(backend);
        }
    }
}

/// Restarts the local server of `backend` and waits until it answers again.
fn restart_server(backend: Backend) {
    let sh = |script: &str| {
        let status = std::process::Command::new("bash")
            .args(["-c", script])
            .status()
            .expect("running bash");
        assert!(status.success(), "{script} failed: {status}");
    };
    match backend {
        Backend::Postgres => {
            sh("pg_ctlcluster --skip-systemctl-redirect -m fast $(ls /etc/postgresql) main restart")
        }
        // Until the old process has exited, start-stop-daemon would find it running.
        Backend::Mysql => sh("mysqladmin -h 127.0.0.1 -u root shutdown && \
             while pgrep -x mariadbd >/dev/null; do sleep 0.1; done && \
             start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd && \
             for i in $(seq 1 300); do mysql -h 127.0.0.1 -u root -e 'SELECT 1' >/dev/null 2>&1 && exit 0; sleep 0.1; done; exit 1"),
        Backend::Sqlite => unreachable!("SQLite has no server"),
    }
}

fn restarted_server(backend: Backend) {
    let _alone = SERVERS.write().unwrap_or_else(|p| p.into_inner());
    const MESSAGES: usize = 10_000;
    let env = chaos_env_on(backend, Duration::from_secs(5), "");
    let expected = bodies("r", MESSAGES);
    seed(&env, &expected, &[("x-sleep-ms", "10")]);
    let mut fleet = Fleet::pair(&env);
    common::wait_until(
        "a fifth of the messages were processed",
        Duration::from_secs(60),
        || fleet.logs(),
        || ledger(&env).len() >= MESSAGES / 5,
    );
    let before = ledger(&env).len();
    restart_server(backend);
    // The consumers carry on by themselves: none may exit, and the queue drains.
    let drained_in = fleet.drain(|_| {});
    fleet.stop_all();
    println!(
        "{backend:?}: restarted with {before} of {MESSAGES} committed; drained {drained_in:?} later; {} lost claims",
        fleet.lost_claims()
    );
    assert!(
        before < MESSAGES,
        "{backend:?}: the queue drained before the restart"
    );
    assert_ledger(&env, &fleet, &expected);
    assert_no_dead_letters(&env, &fleet);
}
