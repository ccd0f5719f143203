//! Throughput benchmark: the raw transport loop against wasmq with a no-op plugin, side
//! by side in one run, plus the isolated per-message cost of a Wasm call.
//!
//! `cargo bench -p wasmq --bench throughput [-- MESSAGES ROUNDS]`
//!
//! (a) the SQLite claim → ack loop with no Wasm, through the same transport code and
//!     batching as the consumer (claims of up to `concurrency`, group-committed acks);
//! (b) `consumer::run` with the `noop` plugin, fresh instance per message, then with
//!     `instance_reuse`;
//! (c) instantiate + `process` of a 200-byte message, on one thread, fresh and reused,
//!     with the fresh call broken into its phases.
//! (d) wake-up latency: an idle receiver against a send committed by another
//!     connection, as `wasmq send` from another process would.
//! (e) claim latency with a million delayed rows waiting, against none.
//! (f) the raw loop alone, and with idle consumers on another queue beside it (they
//!     wake at each of its commits and must look, not lock).
//!
//! Prints medians over ROUNDS rounds, and the ratios b/a.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmq::config::Config;
use wasmq::consumer::{self, ConsumeOptions};
use wasmq::message::{Envelope, Message, Priority, SendOptions};
use wasmq::runtime::Runtime;
use wasmq::runtime::processor::LoadedProcessor;
use wasmq::runtime::registry::{Registry, Slot};
use wasmq::transport::dbal::sqlite::SqliteTransport;
use wasmq::transport::{
    Batch, Delivery, Receiver, ReceiverOptions, Settlement, Subscription, Transport,
};

/// The concurrency the targets are set for, and a wider one for comparison.
const CONCURRENCIES: [usize; 2] = [2, 16];
const BODY: [u8; 200] = [b'x'; 200];
/// Delayed rows waiting while (e) measures claims.
const DELAYED_ROWS: u64 = 1_000_000;
/// Idle consumers beside the busy one in (f).
const IDLE_NEIGHBOURS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn build_plugins(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-examples/build.sh");
    let status = Command::new("bash")
        .arg(script)
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("bash");
    assert!(status.success(), "guest-examples/build.sh failed");
}

fn config(dir: &Path, instance_reuse: u32) -> Config {
    let text = format!(
        "[plugins]\ndir = \"plugins\"\ncache_dir = \"cache\"\n\
         [[processor]]\nname = \"noop\"\nplugin = \"noop.wasm\"\ninstance_reuse = {instance_reuse}\n"
    );
    let config = Config::parse(&text, &dir.join("wasmq.toml"), dir).expect("bench config");
    config.validate().expect("bench config is valid");
    config
}

async fn seed(transport: &SqliteTransport, n: usize) {
    let envelopes: Vec<Envelope> = (0..n).map(|_| envelope("default")).collect();
    transport.send(envelopes).await.expect("seeding messages");
}

/// A 200-byte message for the noop processor in `queue`.
fn envelope(queue: &str) -> Envelope {
    Envelope {
        queue: queue.into(),
        processor: "noop".into(),
        topic: "bench.noop".into(),
        body: BODY.to_vec(),
        options: SendOptions::default(),
    }
}

async fn receiver_on(transport: &SqliteTransport, queue: &str) -> Box<dyn Receiver> {
    transport
        .receiver(ReceiverOptions {
            subscriptions: vec![Subscription {
                queue: queue.into(),
                processor: "noop".into(),
            }],
            held_back: Vec::new(),
            heartbeat_timeout: Duration::from_secs(30),
            orphan_timeout: Duration::from_secs(24 * 3600),
        })
        .await
        .unwrap()
}

/// Claims up to `max`.
async fn claim(receiver: &mut Box<dyn Receiver>, max: usize) -> Vec<Delivery> {
    match receiver.next_batch(max).await.unwrap() {
        Batch::Shared(deliveries) => deliveries,
        Batch::Alone(delivery) => vec![delivery],
    }
}

/// (a): claim up to `concurrency`, ack each, await durability: the consumer's pattern
/// without the Wasm call.
async fn raw_loop(transport: &SqliteTransport, n: usize, concurrency: usize) -> f64 {
    seed(transport, n).await;
    let mut receiver = receiver_on(transport, "default").await;
    let start = Instant::now();
    let mut done = 0;
    let mut receipts = Vec::new();
    while done < n {
        for delivery in claim(&mut receiver, concurrency.min(n - done)).await {
            receipts.push(
                delivery
                    .handle
                    .settle(Settlement::Ack { sends: Vec::new() })
                    .await
                    .unwrap(),
            );
            done += 1;
        }
        // Like the consumer, keep a bounded number of settlements awaiting durability.
        if receipts.len() >= 256 {
            for r in receipts.drain(..) {
                r.await.unwrap();
            }
        }
    }
    for r in receipts {
        r.await.unwrap();
    }
    receiver.close().await.unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

/// (e): rows that will not fall due for years, written straight into the delayed
/// table (as a million `wasmq send --delay` would), to show that claims ignore them.
fn seed_delayed(path: &Path, rows: u64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute(
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?1)
         INSERT INTO wasmq_delayed (id, queue, processor, topic, body, headers, priority, published_at, available_at)
         SELECT lower(hex(randomblob(16))), 'default', 'noop', 'bench.noop', zeroblob(200), '[]', 2, 0, 9000000000000000 FROM n",
        [rows],
    )
    .unwrap();
}

/// Acknowledges one delivery and waits until that is durable.
async fn ack_durably(delivery: Delivery) {
    delivery
        .handle
        .settle(Settlement::Ack { sends: Vec::new() })
        .await
        .unwrap()
        .await
        .unwrap();
}

/// (e): µs per claim of one message and its acknowledgement, one at a time.
async fn claim_latency(transport: &SqliteTransport, n: usize) -> f64 {
    seed(transport, n).await;
    let mut receiver = receiver_on(transport, "default").await;
    let start = Instant::now();
    for _ in 0..n {
        for delivery in claim(&mut receiver, 1).await {
            ack_durably(delivery).await;
        }
    }
    receiver.close().await.unwrap();
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// (f): (a) while `idle` other consumers wait on a queue that stays empty: each
/// commit of the busy one wakes them, and they must not queue for the write lock.
async fn raw_loop_with_idle_neighbours(
    transport: &SqliteTransport,
    n: usize,
    concurrency: usize,
    idle: usize,
) -> f64 {
    let mut neighbours = Vec::new();
    for _ in 0..idle {
        let mut receiver = receiver_on(transport, "idle").await;
        neighbours.push(tokio::spawn(async move {
            claim(&mut receiver, 1).await;
        }));
    }
    let rate = raw_loop(transport, n, concurrency).await;
    for neighbour in neighbours {
        neighbour.abort();
    }
    rate
}

/// (b): the real consumer with the noop plugin.
async fn wasmq_loop(
    transport: &SqliteTransport,
    registry: Arc<Registry>,
    n: usize,
    concurrency: usize,
) -> f64 {
    seed(transport, n).await;
    let options = ConsumeOptions {
        queues: vec!["default".into()],
        message_limit: Some(n as u64),
        time_limit: None,
        memory_limit: None,
        concurrency,
        heartbeat_timeout: Duration::from_secs(30),
        orphan_timeout: Duration::from_secs(24 * 3600),
    };
    let start = Instant::now();
    consumer::run(transport, registry, options, CancellationToken::new())
        .await
        .unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

fn message() -> Message {
    Message {
        id: "1".into(),
        topic: "bench.noop".into(),
        body: BODY.to_vec(),
        headers: Vec::new(),
        priority: Priority::Normal,
        attempt: 1,
        published_at_ms: 0,
    }
}

/// (c): µs per instantiate + process on one thread.
async fn isolated(
    processor: &LoadedProcessor,
    router: Arc<wasmq::router::Router>,
    n: usize,
) -> f64 {
    let m = message();
    for _ in 0..200 {
        processor.process(&m, router.clone()).await;
    }
    let start = Instant::now();
    for _ in 0..n {
        processor.process(&m, router.clone()).await;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// (d): how long an idle receiver takes to see a message that another connection
/// (as another process would) commits: one sample per call, in milliseconds.
async fn wake_up(path: &Path, idle: Duration) -> f64 {
    let producer = SqliteTransport::open(path).await.unwrap();
    let consumer = SqliteTransport::open(path).await.unwrap();
    let mut receiver = receiver_on(&consumer, "wake").await;
    let send = async {
        tokio::time::sleep(idle).await;
        let envelope = envelope("wake");
        producer.send(vec![envelope]).await.unwrap();
        Instant::now()
    };
    let (sent_at, batch) = tokio::join!(send, claim(&mut receiver, 1));
    let seen_at = Instant::now();
    for delivery in batch {
        ack_durably(delivery).await;
    }
    receiver.close().await.unwrap();
    (seen_at - sent_at).as_secs_f64() * 1e3
}

fn ready(registry: &Registry) -> &LoadedProcessor {
    match registry.processors.get("noop") {
        Some(Slot::Ready(p)) => p,
        _ => panic!("the noop plugin did not load"),
    }
}

async fn load(dir: &Path, reuse: u32) -> (Runtime, Arc<Registry>) {
    let config = config(dir, reuse);
    let runtime = Runtime::for_config(&config).unwrap();
    let (registry, errors) = Registry::load(&runtime, &config).await;
    assert!(errors.is_empty(), "{errors:?}");
    (runtime, Arc::new(registry))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let rounds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    build_plugins(&dir.path().join("plugins"));

    // The same runtime shape `wasmq consume` picks for this concurrency.
    let threads: usize = std::env::var("WASMQ_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    eprintln!("worker threads: {threads} (WASMQ_BENCH_THREADS; wasmq consume --threads)");
    let rt = wasmq::cli::runtime_for(threads).expect("tokio runtime");
    rt.block_on(async {
        let (_fresh_rt, fresh) = load(dir.path(), 1).await;
        let (_reuse_rt, reused) = load(dir.path(), 1000).await;
        let transport = SqliteTransport::open(&dir.path().join("bench.sqlite")).await.unwrap();

        let delayed_path = dir.path().join("delayed.sqlite");
        let delayed = SqliteTransport::open(&delayed_path).await.unwrap();
        seed_delayed(&delayed_path, DELAYED_ROWS);
        let (mut e_empty, mut e_delayed, mut e_delayed_16) = (vec![], vec![], vec![]);
        let (mut f_alone, mut f_idle) = (vec![], vec![]);

        // Per concurrency: (a) raw, (b) fresh, (b) reused; each a list of rounds.
        let mut loops = vec![[vec![], vec![], vec![]]; CONCURRENCIES.len()];
        let (mut c, mut c_reuse) = (vec![], vec![]);
        let mut phases = [vec![], vec![], vec![], vec![]];
        for round in 1..=rounds {
            for (k, &concurrency) in CONCURRENCIES.iter().enumerate() {
                let [a, b, b_reuse] = &mut loops[k];
                a.push(raw_loop(&transport, n, concurrency).await);
                b.push(wasmq_loop(&transport, fresh.clone(), n, concurrency).await);
                b_reuse.push(wasmq_loop(&transport, reused.clone(), n, concurrency).await);
                eprintln!(
                    "round {round}, concurrency {concurrency}: a {:.0}/s  b {:.0}/s  b-reuse {:.0}/s",
                    a[round - 1],
                    b[round - 1],
                    b_reuse[round - 1]
                );
            }
            e_empty.push(claim_latency(&transport, n / 10).await);
            // Few: the old schema scans every delayed row on each claim.
            e_delayed.push(claim_latency(&delayed, n / 100).await);
            e_delayed_16.push(raw_loop(&delayed, n / 10, 16).await);
            f_alone.push(raw_loop(&transport, n, 2).await);
            f_idle.push(raw_loop_with_idle_neighbours(&transport, n, 2, IDLE_NEIGHBOURS).await);
            eprintln!(
                "round {round}: e {:.1} µs/claim (empty), {:.1} µs/claim and {:.0}/s (1M delayed); f {:.0}/s alone, {:.0}/s with idle neighbours",
                e_empty[round - 1], e_delayed[round - 1], e_delayed_16[round - 1], f_alone[round - 1], f_idle[round - 1]
            );
            c.push(isolated(ready(&fresh), fresh.router.clone(), n).await);
            c_reuse.push(isolated(ready(&reused), reused.router.clone(), n).await);
            let m = message();
            let mut sums = [Duration::ZERO; 4];
            for _ in 0..n / 4 {
                let t = ready(&fresh).time_phases(&m, fresh.router.clone()).await;
                for (sum, t) in sums.iter_mut().zip(t) {
                    *sum += t;
                }
            }
            for (p, sum) in phases.iter_mut().zip(sums) {
                p.push(sum.as_secs_f64() * 1e6 / (n / 4) as f64);
            }
            eprintln!("round {round}: c {:.2} µs  c-reuse {:.2} µs", c[round - 1], c_reuse[round - 1]);
        }
        println!("messages per round: {n}, rounds: {rounds}, worker threads: {threads} (medians)");
        for (k, concurrency) in CONCURRENCIES.iter().enumerate() {
            let [a, b, b_reuse] = loops[k].clone().map(median);
            println!("--concurrency {concurrency}:");
            println!("  (a) raw SQLite claim/ack loop:            {a:>9.0} msg/s");
            println!("  (b) wasmq + noop, fresh instance:         {b:>9.0} msg/s   b/a = {:.2}", b / a);
            println!("  (b) wasmq + noop, instance_reuse = 1000:  {b_reuse:>9.0} msg/s   b/a = {:.2}", b_reuse / a);
        }
        println!("(e) claim + ack of one message, nothing delayed:        {:>9.1} µs", median(e_empty));
        println!("(e) claim + ack of one message, {DELAYED_ROWS} delayed rows: {:>9.1} µs", median(e_delayed));
        println!("(e) raw loop at --concurrency 16, {DELAYED_ROWS} delayed rows: {:>9.0} msg/s", median(e_delayed_16));
        println!("(f) raw loop at --concurrency 2, alone:                 {:>9.0} msg/s", median(f_alone));
        println!("(f) raw loop at --concurrency 2, {IDLE_NEIGHBOURS} idle consumers beside: {:>9.0} msg/s", median(f_idle));
        println!("(c) instantiate + process, fresh:         {:>9.2} µs/msg", median(c));
        println!("(c) process, instance_reuse = 1000:       {:>9.2} µs/msg", median(c_reuse));
        // Idle for 10 ms to 300 ms, so both the first (1 ms) and the backed-off (5 ms)
        // polling intervals are sampled.
        let mut wake = Vec::new();
        for i in 0..60u64 {
            wake.push(wake_up(&dir.path().join("bench.sqlite"), Duration::from_millis(10 + i * 5)).await);
        }
        let p90 = {
            let mut w = wake.clone();
            w.sort_by(f64::total_cmp);
            w[w.len() * 9 / 10]
        };
        println!("(d) idle consumer sees another connection's send: median {:.2} ms, p90 {p90:.2} ms", median(wake));
        let names = ["store + WASI context", "instantiate", "process call", "drop (slot reset)"];
        for (name, p) in names.iter().zip(phases) {
            println!("    fresh phase {name:<22} {:>6.2} µs", median(p));
        }
    });
}
