//! Cluster benchmarks on 127.0.0.1 over real QUIC with mutual TLS; figures and the machine
//! they were taken on are kept in `benches/README.md`.
//!
//! ```text
//! cargo build --release --example node      # the crash-failover part runs it as processes
//! cargo bench --bench cluster               # about 6–7 minutes on 2 cores
//! HIGHLANDER_BENCH_QUICK=1 cargo bench --bench cluster   # about 2 minutes
//! ```
//!
//! What it measures:
//!
//! - **Replicated sends**, three nodes in this process (like the quickstart): `send`
//!   throughput, `send` latency (until committed on a quorum) and send→delivery latency (until
//!   the owner's handler has the message), with 1 sender and with 64 concurrent senders of
//!   100-byte payloads, each for a few seconds after a warm-up; with the Raft log in memory
//!   and on disk (`data_dir`, one fdatasync per batch).
//! - **Graceful hand-over**: the owner's `shutdown()` → the first run of the handler on
//!   another node; the node is then restarted on its storage, and again.
//! - **Crash failover**: SIGKILL of the owner *process* (three `node` example processes) →
//!   the first `started` line of the new owner, with the standard timing (TTL 2 s) and with
//!   `Timing::fast()` (TTL 500 ms); the killed node is restarted on its data directory after
//!   every repetition.
//! - **Learners**: nine `node` processes, the first 3 voting and 6 learners (`--voters 3`),
//!   standard timing: SIGKILL of the owner (every process registers the key, so it may be a
//!   learner or a voter) → the first `started` line of another; the figures are split by
//!   whether the killed owner was a learner. The killed process restarts on its data
//!   directory every time.
//!
//! Environment: `HIGHLANDER_BENCH_QUICK=1` (1 s windows, 5 repetitions),
//! `HIGHLANDER_BENCH_SECS` (measurement window, default 3), `HIGHLANDER_BENCH_REPS`
//! (hand-over and crash repetitions, default 20), `HIGHLANDER_BENCH_ONLY` (a comma-separated
//! subset of `throughput,handover,crash,learners`), `HIGHLANDER_BENCH_STORAGE`
//! (`memory,disk`).
//!
//! The output is a table for people and, last, one JSON line for scripts.

use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{MemStorage, Node, NodeId, TaskContext, Timing};
use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const KEY: &str = "bench";
const PAYLOAD_BYTES: usize = 100;

// ----------------------------------------------------------------------------------------
// Settings and statistics

struct Settings {
    quick: bool,
    window: Duration,
    warmup: Duration,
    reps: usize,
    only: BTreeSet<String>,
    storages: Vec<StorageKind>,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let quick =
            std::env::var("HIGHLANDER_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
        let number = |name: &str, default: f64| -> Result<f64> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map_err(|_| format!("{name}={v:?}: not a number").into()),
                Err(_) => Ok(default),
            }
        };
        let window = Duration::from_secs_f64(number(
            "HIGHLANDER_BENCH_SECS",
            if quick { 1.0 } else { 3.0 },
        )?);
        let reps =
            number("HIGHLANDER_BENCH_REPS", if quick { 5.0 } else { 20.0 })?.max(1.0) as usize;
        let list = |name: &str, all: &str| -> BTreeSet<String> {
            std::env::var(name)
                .unwrap_or_else(|_| all.to_string())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let only = list("HIGHLANDER_BENCH_ONLY", "throughput,handover,crash,learners");
        for s in &only {
            if !["throughput", "handover", "crash", "learners"].contains(&s.as_str()) {
                return Err(format!("HIGHLANDER_BENCH_ONLY: unknown part {s:?}").into());
            }
        }
        let mut storages = Vec::new();
        for s in list("HIGHLANDER_BENCH_STORAGE", "memory,disk") {
            storages.push(match s.as_str() {
                "memory" => StorageKind::Memory,
                "disk" => StorageKind::Disk,
                other => return Err(format!("HIGHLANDER_BENCH_STORAGE: unknown {other:?}").into()),
            });
        }
        // Memory first: the cheaper one reports sooner.
        storages.sort();
        Ok(Settings {
            quick,
            window,
            warmup: Duration::from_millis(if quick { 300 } else { 700 }),
            reps,
            only,
            storages,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum StorageKind {
    Memory,
    Disk,
}

impl StorageKind {
    fn name(self) -> &'static str {
        match self {
            StorageKind::Memory => "memory",
            StorageKind::Disk => "disk",
        }
    }
}

/// Order statistics of a sample (nearest rank).
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    n: usize,
    min: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Summary {
            n: samples.len(),
            min: samples[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        }
    }

    fn json(&self) -> String {
        format!(
            "{{\"n\":{},\"min_ms\":{:.3},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
            self.n,
            ms(self.min),
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A target from issue 3, and whether a figure meets it.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

// ----------------------------------------------------------------------------------------
// Three nodes in this process

/// Nanoseconds since the benchmark began: what a payload carries as its send time.
fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What the handlers saw, shared by every node of the in-process cluster.
#[derive(Default)]
struct Recorder {
    inner: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    /// Every start of the handler: which node, when.
    starts: Vec<(NodeId, Instant)>,
    /// The run whose deliveries are being measured (0: none).
    run: u64,
    /// Send→delivery latencies of that run's messages.
    latencies: Vec<Duration>,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn started(&self, node: NodeId) {
        self.lock().starts.push((node, Instant::now()));
    }

    fn delivered(&self, payload: &[u8]) {
        let now = now_ns();
        let (Some(run), Some(sent)) = (word(payload, 0), word(payload, 1)) else { return };
        let mut r = self.lock();
        if run == r.run && run != 0 {
            r.latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
        }
    }

    /// The first start on another node than `not` at or after `since`.
    fn start_after(&self, since: Instant, not: NodeId) -> Option<(NodeId, Instant)> {
        self.lock().starts.iter().copied().find(|(n, at)| *n != not && *at >= since)
    }
}

fn word(payload: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(i * 8..i * 8 + 8)?.try_into().ok()?))
}

async fn handler(mut ctx: TaskContext, rec: Arc<Recorder>) {
    rec.started(ctx.node_id());
    while let Some(m) = ctx.recv().await {
        rec.delivered(m.payload.as_bytes());
    }
}

struct InProc {
    secret: ClusterSecret,
    timing: Timing,
    peers: BTreeMap<NodeId, SocketAddr>,
    kind: StorageKind,
    dir: tempfile::TempDir,
    memory: BTreeMap<NodeId, MemStorage>,
    nodes: BTreeMap<NodeId, Node>,
    rec: Arc<Recorder>,
}

impl InProc {
    async fn start(kind: StorageKind, timing: Timing) -> Result<InProc> {
        let ports = free_udp_ports(3)?;
        let peers: BTreeMap<NodeId, SocketAddr> = (1..=3u64)
            .zip(ports)
            .map(|(id, port)| (NodeId(id), SocketAddr::from(([127, 0, 0, 1], port))))
            .collect();
        let mut c = InProc {
            secret: ClusterSecret::generate()?,
            timing,
            memory: peers.keys().map(|id| (*id, MemStorage::new())).collect(),
            peers,
            kind,
            dir: tempfile::tempdir()?,
            nodes: BTreeMap::new(),
            rec: Arc::default(),
        };
        for id in c.peers.keys().copied().collect::<Vec<_>>() {
            c.launch(id).await?;
        }
        for id in c.peers.keys().copied().collect::<Vec<_>>() {
            c.join(id).await?;
        }
        c.settle().await?;
        Ok(c)
    }

    /// Starts node `id` on its address and its storage (kept across restarts).
    async fn launch(&mut self, id: NodeId) -> Result<()> {
        let addr = self.peers[&id];
        // A node shut down a moment ago may still hold the port while its endpoint drains.
        let deadline = Instant::now() + Duration::from_secs(10);
        let socket = loop {
            match std::net::UdpSocket::bind(addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("bind {addr}: {e}").into());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let config = QuicConfig::new(
            id,
            addr,
            self.peers.clone(),
            Identity::ClusterSecret(self.secret.clone()),
        );
        let transport = QuicTransport::from_socket(config, socket)?;
        let builder = Node::builder()
            .id(id)
            .peers(self.peers.keys().copied())
            .transport(transport)
            .timing(self.timing);
        let builder = match self.kind {
            StorageKind::Memory => builder.storage(self.memory[&id].clone()),
            StorageKind::Disk => builder.data_dir(self.dir.path().join(format!("n{}", id.0))),
        };
        self.nodes.insert(id, builder.start().await?);
        Ok(())
    }

    /// Waits for node `id`'s session and registers the singleton there.
    async fn join(&self, id: NodeId) -> Result<()> {
        let node = &self.nodes[&id];
        node.ready(Duration::from_secs(20)).await?;
        let rec = self.rec.clone();
        node.singleton(KEY, move |ctx| handler(ctx, rec.clone())).await?;
        Ok(())
    }

    /// Waits until every node names the same leader in the same term, unchanged for
    /// `window`. A node restarted a moment ago can set off elections (its peers' connections
    /// to its previous incarnation take a while to be replaced), and a hand-over measured
    /// during one measures the election instead.
    async fn stable_leader(&self, window: Duration) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut since: Option<((Option<NodeId>, u64), Instant)> = None;
        loop {
            let views: BTreeSet<(Option<NodeId>, u64)> =
                self.nodes.values().map(|n| n.status()).map(|s| (s.leader, s.term)).collect();
            let agreed = (views.len() == 1).then(|| views.into_iter().next()).flatten();
            match (agreed, since) {
                (Some(v), Some((w, at))) if v == w && v.0.is_some() => {
                    if at.elapsed() >= window {
                        return Ok(());
                    }
                }
                (Some(v), _) => since = Some((v, Instant::now())),
                (None, _) => since = None,
            }
            if Instant::now() > deadline {
                return Err("the leader did not settle within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every node has a session and is a candidate, and the key has an owner
    /// whose handler runs.
    async fn settle(&self) -> Result<NodeId> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(owner) = self.owner() {
                let status = self.nodes[&owner].status();
                let key = status.keys.iter().find(|k| k.key.as_str() == KEY);
                let candidates = key.map_or(0, |k| k.candidates.len());
                let running = self.rec.lock().starts.last().is_some_and(|(n, _)| *n == owner);
                if status.sessions.len() == self.peers.len()
                    && candidates == self.peers.len()
                    && running
                {
                    return Ok(owner);
                }
            }
            if Instant::now() > deadline {
                return Err("the in-process cluster did not settle within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The owner as the leader knows it.
    fn owner(&self) -> Option<NodeId> {
        let leader = self.leader()?;
        let status = self.nodes.get(&leader)?.status();
        let key = status.keys.into_iter().find(|k| k.key.as_str() == KEY)?;
        key.owners.first().copied().flatten().map(|o| o.node)
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes.values().find_map(|n| n.status().leader).filter(|l| self.nodes.contains_key(l))
    }

    async fn stop(self) {
        for node in self.nodes.values() {
            node.shutdown().await;
        }
    }
}

fn free_udp_ports(n: usize) -> Result<Vec<u16>> {
    // Held together while chosen, so they differ.
    let sockets = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(sockets.iter().map(|s| s.local_addr().map(|a| a.port())).collect::<std::io::Result<_>>()?)
}

// ----------------------------------------------------------------------------------------
// Replicated sends

struct SendFigures {
    label: String,
    storage: StorageKind,
    senders: usize,
    acked: u64,
    errors: u64,
    window: Duration,
    send: Summary,
    delivery: Summary,
    delivered: usize,
}

impl SendFigures {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.window.as_secs_f64()
    }
}

const WARM: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Runs `from.len()` concurrent senders (sender i sends through node `from[i]`), each
/// sending one message at a time, for a warm-up and then the measurement window.
async fn sends(
    c: &InProc,
    label: &str,
    from: &[NodeId],
    s: &Settings,
    run: u64,
) -> Result<SendFigures> {
    c.settle().await?;
    {
        let mut r = c.rec.lock();
        r.run = run;
        r.latencies.clear();
    }
    let phase = Arc::new(AtomicU8::new(WARM));
    let mut tasks = tokio::task::JoinSet::new();
    for id in from {
        let node = c.nodes[id].clone();
        let phase = phase.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut payload = vec![0u8; PAYLOAD_BYTES];
            loop {
                let p = phase.load(Ordering::Acquire);
                if p == STOP {
                    break;
                }
                // Warm-up messages carry run 0 and are not measured.
                let tag = if p == MEASURE { run } else { 0 };
                payload[..8].copy_from_slice(&tag.to_le_bytes());
                payload[8..16].copy_from_slice(&now_ns().to_le_bytes());
                let began = Instant::now();
                let result = node.send(KEY, payload.clone()).await;
                if p == MEASURE {
                    match result {
                        Ok(_) => latencies.push(began.elapsed()),
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    tokio::time::sleep(s.warmup).await;
    phase.store(MEASURE, Ordering::Release);
    let began = Instant::now();
    tokio::time::sleep(s.window).await;
    phase.store(STOP, Ordering::Release);
    let window = began.elapsed();
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let (l, e, first) = joined?;
        first_error = first_error.or(first);
        latencies.extend(l);
        errors += e;
    }
    if let Some(e) = first_error {
        eprintln!("  {label}: {errors} sends failed, the first with: {e}");
    }
    let acked = latencies.len() as u64;
    // Every acknowledged message of the run reaches the handler; wait (bounded) for the tail.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (c.rec.lock().latencies.len() as u64) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let delivery = std::mem::take(&mut c.rec.lock().latencies);
    c.rec.lock().run = 0;
    Ok(SendFigures {
        label: label.to_string(),
        storage: c.kind,
        senders: from.len(),
        acked,
        errors,
        window,
        send: Summary::of(latencies),
        delivered: delivery.len(),
        delivery: Summary::of(delivery),
    })
}

async fn throughput(s: &Settings, out: &mut Vec<SendFigures>) -> Result<()> {
    let mut run = 0;
    for &kind in &s.storages {
        let c = InProc::start(kind, Timing::default()).await?;
        let leader = c.leader().ok_or("no leader")?;
        let owner = c.owner().ok_or("no owner")?;
        let follower = c.peers.keys().copied().find(|n| *n != leader).ok_or("no follower")?;
        let all: Vec<NodeId> = c.peers.keys().copied().collect();
        eprintln!(
            "[sends, log in {}] leader {leader}, owner {owner}{}",
            kind.name(),
            if owner == leader { " (the leader)" } else { "" }
        );
        let configs: Vec<(String, Vec<NodeId>)> = vec![
            ("1 sender on the leader".into(), vec![leader]),
            ("1 sender on a follower".into(), vec![follower]),
            ("64 senders on the leader".into(), vec![leader; 64]),
            ("64 senders over 3 nodes".into(), (0..64).map(|i| all[i % all.len()]).collect()),
        ];
        for (label, from) in configs {
            run += 1;
            let f = sends(&c, &label, &from, s, run).await?;
            eprintln!(
                "  {label}: {:.0} msg/s, send p50 {:.2} ms p99 {:.2} ms, delivery p50 {:.2} ms p99 {:.2} ms{}",
                f.rate(),
                ms(f.send.p50),
                ms(f.send.p99),
                ms(f.delivery.p50),
                ms(f.delivery.p99),
                if f.errors > 0 { format!(", {} errors", f.errors) } else { String::new() }
            );
            out.push(f);
        }
        c.stop().await;
    }
    Ok(())
}

/// The disk's own commit latency, for context: a 100-byte write and `fdatasync` on a
/// zero-filled file in the temp directory (no file-size change to journal), as the
/// write-ahead log does once per batch.
fn fsync_baseline(samples: usize) -> Result<Summary> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir()?;
    let file = std::fs::File::create(dir.path().join("probe"))?;
    file.write_all_at(&vec![0u8; samples * PAYLOAD_BYTES + (1 << 20)], 0)?;
    file.sync_all()?;
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        file.write_all_at(&[7u8; PAYLOAD_BYTES], (i * PAYLOAD_BYTES) as u64)?;
        let began = Instant::now();
        file.sync_data()?;
        latencies.push(began.elapsed());
    }
    Ok(Summary::of(latencies))
}

// ----------------------------------------------------------------------------------------
// Graceful hand-over

/// How long the leader must stay the same after a restart before the next hand-over: longer
/// than a QUIC handshake timeout (2 s) plus an election.
const STABLE: Duration = Duration::from_secs(3);

struct HandOver {
    storage: StorageKind,
    handover: Summary,
    shutdown: Summary,
    owner_was_leader: usize,
}

async fn handovers(s: &Settings, out: &mut Vec<HandOver>) -> Result<()> {
    for &kind in &s.storages {
        let mut c = InProc::start(kind, Timing::default()).await?;
        let (mut times, mut shutdowns, mut was_leader) = (Vec::new(), Vec::new(), 0);
        for rep in 0..s.reps {
            let owner = c.settle().await?;
            let leader = c.leader();
            if leader == Some(owner) {
                was_leader += 1;
            }
            let node = c.nodes.remove(&owner).ok_or("owner not running")?;
            let began = Instant::now();
            let leaving = tokio::spawn(async move {
                node.shutdown().await;
                Instant::now()
            });
            let deadline = began + Duration::from_secs(10);
            let (new_owner, at) = loop {
                if let Some(found) = c.rec.start_after(began, owner) {
                    break found;
                }
                if Instant::now() > deadline {
                    return Err("no hand-over within 10 s".into());
                }
                // The handler stamps its own start; this poll only decides when to look.
                tokio::time::sleep(Duration::from_micros(500)).await;
            };
            times.push(at - began);
            shutdowns.push(leaving.await? - began);
            eprintln!(
                "  hand-over #{rep}: {owner}{} -> {new_owner} in {:.2} ms (shutdown() took {:.0} ms)",
                if leader == Some(owner) { " (the leader)" } else { "" },
                ms(at - began),
                ms(shutdowns[shutdowns.len() - 1])
            );
            c.launch(owner).await?;
            c.join(owner).await?;
            c.stable_leader(STABLE).await?;
        }
        let h = HandOver {
            storage: kind,
            handover: Summary::of(times),
            shutdown: Summary::of(shutdowns),
            owner_was_leader: was_leader,
        };
        eprintln!(
            "[hand-over, log in {}] p50 {:.2} ms p99 {:.2} ms over {} (owner was the leader {} times)",
            kind.name(),
            ms(h.handover.p50),
            ms(h.handover.p99),
            h.handover.n,
            was_leader
        );
        out.push(h);
        c.stop().await;
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------
// Crash failover: the `node` example as processes

/// One line a node process printed, stamped when this process read it.
#[derive(Clone, Debug)]
struct Event {
    at: Instant,
    node: u64,
    life: u32,
    name: String,
    fields: BTreeMap<String, String>,
}

/// Splits `name k=v k="quoted"` (the node example's output) into its name and fields.
fn parse_event(line: &str) -> (String, BTreeMap<String, String>) {
    let (name, mut rest) = line.split_once(' ').unwrap_or((line, ""));
    let mut fields = BTreeMap::new();
    while let Some((key, after)) = rest.trim_start().split_once('=') {
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            // Values this benchmark reads are never quoted; skip to the closing quote.
            let mut end = quoted.len();
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            (quoted[..end.saturating_sub(1)].to_string(), &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        fields.insert(key.to_string(), value);
        rest = tail;
    }
    (name.to_string(), fields)
}

#[derive(Default)]
struct Events {
    list: Mutex<Vec<Event>>,
    changed: Condvar,
}

impl Events {
    fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut found: impl FnMut(&[Event]) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = found(&list) {
                return Ok(t);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("gave up waiting for {what} after {limit:?}").into());
            }
            list = self
                .changed
                .wait_timeout(list, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn len(&self) -> usize {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
}

/// Three `node` processes; dropping it kills and reaps them all.
struct Procs {
    exe: PathBuf,
    dir: tempfile::TempDir,
    fast: bool,
    /// `--voters` for every process, if set.
    voters: Option<usize>,
    ports: BTreeMap<u64, u16>,
    procs: BTreeMap<u64, Proc>,
    lives: BTreeMap<u64, u32>,
    events: Arc<Events>,
}

const PROC_WAIT: Duration = Duration::from_secs(30);

fn node_exe() -> Result<PathBuf> {
    let bench = std::env::current_exe()?;
    // target/release/deps/cluster-<hash> -> target/release/examples/node
    let profile_dir = bench.parent().and_then(Path::parent).ok_or("no target directory")?;
    let exe = profile_dir.join("examples").join(format!("node{}", std::env::consts::EXE_SUFFIX));
    if !exe.is_file() {
        return Err(format!(
            "{} does not exist: run `cargo build --release --example node` first \
             (or HIGHLANDER_BENCH_ONLY=throughput,handover to skip the crash failover)",
            exe.display()
        )
        .into());
    }
    Ok(exe)
}

impl Procs {
    /// Starts `count` node processes, ids 1..=count.
    fn start(fast: bool, count: u64, voters: Option<usize>) -> Result<Procs> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("cluster.secret"), ClusterSecret::generate()?.expose())?;
        let ports = (1..=count).zip(free_udp_ports(count as usize)?).collect();
        let mut p = Procs {
            exe: node_exe()?,
            dir,
            fast,
            voters,
            ports,
            procs: BTreeMap::new(),
            lives: BTreeMap::new(),
            events: Arc::default(),
        };
        for id in 1..=count {
            p.spawn(id)?;
        }
        Ok(p)
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let life = self.lives.get(&id).copied().unwrap_or(0) + 1;
        self.lives.insert(id, life);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--id").arg(id.to_string()).arg("--key").arg(KEY);
        for (peer, port) in &self.ports {
            cmd.arg("--peer").arg(format!("{peer}=127.0.0.1:{port}"));
        }
        if self.fast {
            cmd.arg("--fast");
        }
        if let Some(n) = self.voters {
            cmd.arg("--voters").arg(n.to_string());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))?;
        cmd.arg("--secret-file")
            .arg(self.dir.path().join("cluster.secret"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{id}")))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let events = self.events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let at = Instant::now();
                let (name, fields) = parse_event(&line);
                events.list.lock().unwrap_or_else(|e| e.into_inner()).push(Event {
                    at,
                    node: id,
                    life,
                    name,
                    fields,
                });
                events.changed.notify_all();
            }
        });
        self.procs.insert(id, Proc { child, stdin });
        Ok(())
    }

    fn wait_ready(&self, id: u64) -> Result<()> {
        let life = self.lives[&id];
        self.events.wait(&format!("node {id} to be ready"), PROC_WAIT, |events| {
            events.iter().any(|e| e.name == "ready" && e.node == id && e.life == life).then_some(())
        })
    }

    /// The node whose handler runs now: the last `started` from a live process that has not
    /// printed `stopped` since.
    fn owner(&self) -> Option<u64> {
        let list = self.events.list.lock().unwrap_or_else(|e| e.into_inner());
        let mut owner = None;
        for e in list.iter() {
            match e.name.as_str() {
                "started" => owner = Some((e.node, e.life)),
                "stopped" if owner == Some((e.node, e.life)) => owner = None,
                _ => {}
            }
        }
        owner.filter(|(n, l)| self.procs.contains_key(n) && self.lives[n] == *l).map(|(n, _)| n)
    }

    /// Asks node `via` for its status: the leader it names and its term.
    fn view(&mut self, via: u64) -> Result<(Option<u64>, u64)> {
        let from = self.events.len();
        let p = self.procs.get_mut(&via).ok_or("not running")?;
        writeln!(p.stdin, "status")?;
        p.stdin.flush()?;
        self.events.wait("a status line", PROC_WAIT, |events| {
            events[from..].iter().find(|e| e.name == "status" && e.node == via).map(|e| {
                let leader = e.fields.get("leader").and_then(|l| l.parse().ok());
                (leader, e.fields.get("term").and_then(|t| t.parse().ok()).unwrap_or(0))
            })
        })
    }

    /// Waits until every node names the same leader in the same term for `window` (see
    /// `InProc::stable_leader`).
    fn stable_leader(&mut self, window: Duration) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut since: Option<((Option<u64>, u64), Instant)> = None;
        loop {
            let ids: Vec<u64> = self.procs.keys().copied().collect();
            let views = ids.iter().map(|id| self.view(*id)).collect::<Result<BTreeSet<_>>>()?;
            let agreed = (views.len() == 1).then(|| views.into_iter().next()).flatten();
            match (agreed, since) {
                (Some(v), Some((w, at))) if v == w && v.0.is_some() => {
                    if at.elapsed() >= window {
                        return Ok(());
                    }
                }
                (Some(v), _) => since = Some((v, Instant::now())),
                (None, _) => since = None,
            }
            if Instant::now() > deadline {
                return Err("the leader did not settle within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, id: u64) -> Result<()> {
        let mut p = self.procs.remove(&id).ok_or("not running")?;
        p.child.kill()?;
        p.child.wait()?;
        Ok(())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, mut p) in std::mem::take(&mut self.procs) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

struct Crash {
    timing: &'static str,
    ttl: Duration,
    failover: Summary,
    owner_was_leader: usize,
    /// p50 of the repetitions where the owner was not the leader, and where it was.
    split: (Summary, Summary),
}

fn crashes(s: &Settings, out: &mut Vec<Crash>) -> Result<()> {
    for (name, timing, fast) in
        [("standard", Timing::standard(), false), ("fast", Timing::fast(), true)]
    {
        let mut p = Procs::start(fast, 3, None)?;
        for id in 1..=3 {
            p.wait_ready(id)?;
        }
        p.stable_leader(STABLE)?;
        let (mut all, mut follower_owner, mut leader_owner) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..s.reps {
            let owner = wait_owner(&p)?;
            let witness = (1..=3).find(|n| *n != owner).ok_or("no witness")?;
            let (leader, _) = p.view(witness)?;
            let from = p.events.len();
            let killed = Instant::now();
            p.kill(owner)?;
            let at = p.events.wait("the new owner", PROC_WAIT, |events| {
                events[from..].iter().find(|e| e.name == "started" && e.node != owner).map(|e| e.at)
            })?;
            let took = at - killed;
            all.push(took);
            if leader == Some(owner) {
                leader_owner.push(took);
            } else {
                follower_owner.push(took);
            }
            eprintln!(
                "  crash {name} #{rep}: n{owner}{} killed, new owner after {:.0} ms",
                if leader == Some(owner) { " (the leader)" } else { "" },
                ms(took)
            );
            p.spawn(owner)?;
            p.wait_ready(owner)?;
            p.stable_leader(STABLE)?;
        }
        out.push(Crash {
            timing: name,
            ttl: timing.session_ttl,
            owner_was_leader: leader_owner.len(),
            split: (Summary::of(follower_owner), Summary::of(leader_owner)),
            failover: Summary::of(all),
        });
    }
    Ok(())
}

/// Crash failover with 9 processes, 3 voters and 6 learners, standard timing: SIGKILL of the
/// owner, whichever it is, split by whether it was a learner.
struct LearnerCrash {
    ttl: Duration,
    learner_owner: Summary,
    voter_owner: Summary,
}

const NINE: u64 = 9;
const NINE_VOTERS: u64 = 3;

fn learner_crashes(s: &Settings) -> Result<LearnerCrash> {
    let mut p = Procs::start(false, NINE, Some(NINE_VOTERS as usize))?;
    for id in 1..=NINE {
        p.wait_ready(id)?;
    }
    p.stable_leader(STABLE)?;
    let (mut learner, mut voter) = (Vec::new(), Vec::new());
    for rep in 0..s.reps {
        let owner = wait_owner(&p)?;
        let from = p.events.len();
        let killed = Instant::now();
        p.kill(owner)?;
        let at = p.events.wait("the new owner", PROC_WAIT, |events| {
            events[from..].iter().find(|e| e.name == "started" && e.node != owner).map(|e| e.at)
        })?;
        let took = at - killed;
        let is_learner = owner > NINE_VOTERS;
        if is_learner {
            learner.push(took)
        } else {
            voter.push(took)
        }
        eprintln!(
            "  crash, 9 processes #{rep}: n{owner} ({}) killed, new owner after {:.0} ms",
            if is_learner { "learner" } else { "voter" },
            ms(took)
        );
        p.spawn(owner)?;
        p.wait_ready(owner)?;
        p.stable_leader(STABLE)?;
    }
    Ok(LearnerCrash {
        ttl: Timing::standard().session_ttl,
        learner_owner: Summary::of(learner),
        voter_owner: Summary::of(voter),
    })
}

fn wait_owner(p: &Procs) -> Result<u64> {
    let deadline = Instant::now() + PROC_WAIT;
    loop {
        if let Some(owner) = p.owner() {
            return Ok(owner);
        }
        if Instant::now() > deadline {
            return Err("no owner among the node processes".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ----------------------------------------------------------------------------------------
// The report

fn machine() -> (usize, String, String) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    (cores, cpu, kernel)
}

/// Today's date (UTC) without a date crate: days since the epoch to a civil date.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prints a Markdown table with aligned columns (so it reads in a terminal and pastes into
/// `benches/README.md` as it is).
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([headers[i].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..headers.len()).map(width).collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for r in rows {
        line(r.clone());
    }
}

fn fmt_ms(d: Duration) -> String {
    let v = ms(d);
    if v >= 100.0 { format!("{v:.0} ms") } else { format!("{v:.2} ms") }
}

fn report(
    s: &Settings,
    fsync: Option<Summary>,
    sends: &[SendFigures],
    hands: &[HandOver],
    crashes: &[Crash],
) {
    let (cores, cpu, kernel) = machine();
    println!();
    println!(
        "highlander cluster benchmark, {} ({cores} cores, {cpu}, Linux {kernel}){}",
        today(),
        if s.quick { ", quick mode" } else { "" }
    );
    println!(
        "3 nodes on 127.0.0.1, QUIC + mutual TLS (cluster secret), standard timing unless noted"
    );
    if let Some(f) = &fsync {
        println!(
            "this disk's fdatasync of a 100-byte write (the floor of a send with the log on disk): \
             p50 {}, p99 {}",
            fmt_ms(f.p50),
            fmt_ms(f.p99)
        );
    }
    if !sends.is_empty() {
        println!();
        println!(
            "replicated sends, {PAYLOAD_BYTES}-byte payloads, {:.1} s windows; delivery = send call -> owner's handler has it",
            s.window.as_secs_f64()
        );
        let rows: Vec<Vec<String>> = sends
            .iter()
            .map(|f| {
                let target = match f.senders {
                    1 => format!(
                        "≥ 2,000/s, p50 ≤ 0.6 ms: {}",
                        verdict(f.rate() >= 2000.0 && ms(f.delivery.p50) <= 0.6)
                    ),
                    64 => format!(
                        "≥ 64,000/s, p99 ≤ 10 ms: {}",
                        verdict(f.rate() >= 64_000.0 && ms(f.delivery.p99) <= 10.0)
                    ),
                    _ => String::new(),
                };
                vec![
                    f.label.clone(),
                    f.storage.name().to_string(),
                    format!("{:.0}", f.rate()),
                    fmt_ms(f.send.p50),
                    fmt_ms(f.send.p99),
                    fmt_ms(f.delivery.p50),
                    fmt_ms(f.delivery.p99),
                    f.errors.to_string(),
                    target,
                ]
            })
            .collect();
        table(
            &[
                "senders",
                "log",
                "msg/s",
                "send p50",
                "send p99",
                "delivery p50",
                "delivery p99",
                "errors",
                "target",
            ],
            &rows,
        );
    }
    if !hands.is_empty() {
        println!();
        println!("graceful hand-over: the owner's shutdown() -> first run on another node");
        let rows: Vec<Vec<String>> = hands
            .iter()
            .map(|h| {
                let x = &h.handover;
                vec![
                    h.storage.name().to_string(),
                    x.n.to_string(),
                    fmt_ms(x.min),
                    fmt_ms(x.p50),
                    fmt_ms(x.p99),
                    fmt_ms(x.max),
                    h.owner_was_leader.to_string(),
                    fmt_ms(h.shutdown.p50),
                    format!(
                        "p50 ≤ 3 ms, p99 ≤ 10 ms: {}",
                        verdict(ms(x.p50) <= 3.0 && ms(x.p99) <= 10.0)
                    ),
                ]
            })
            .collect();
        table(
            &[
                "log",
                "n",
                "min",
                "p50",
                "p99",
                "max",
                "owner was leader",
                "shutdown() p50",
                "target",
            ],
            &rows,
        );
    }
    if !crashes.is_empty() {
        println!();
        println!(
            "crash failover: SIGKILL of the owner process -> first `started` line of the new owner (log on disk)"
        );
        let split = |x: &Summary| {
            if x.n == 0 { "-".to_string() } else { format!("{} (n={})", fmt_ms(x.p50), x.n) }
        };
        let rows: Vec<Vec<String>> = crashes
            .iter()
            .map(|c| {
                let x = &c.failover;
                let limit = if c.timing == "fast" { 650.0 } else { 2100.0 };
                vec![
                    c.timing.to_string(),
                    format!("{} ms", c.ttl.as_millis()),
                    x.n.to_string(),
                    fmt_ms(x.min),
                    fmt_ms(x.p50),
                    fmt_ms(x.p99),
                    fmt_ms(x.max),
                    split(&c.split.0),
                    split(&c.split.1),
                    format!("p99 ≤ {limit:.0} ms: {}", verdict(ms(x.p99) <= limit)),
                ]
            })
            .collect();
        table(
            &[
                "timing",
                "TTL",
                "n",
                "min",
                "p50",
                "p99",
                "max",
                "p50, owner a follower",
                "p50, owner the leader",
                "target",
            ],
            &rows,
        );
    }

    // One line for scripts.
    let mut j = String::new();
    let _ = write!(
        j,
        "{{\"bench\":\"cluster\",\"date\":{},\"cores\":{cores},\"cpu\":{},\"kernel\":{},\"quick\":{},\"window_s\":{:.3}",
        json_str(&today()),
        json_str(&cpu),
        json_str(&kernel),
        s.quick,
        s.window.as_secs_f64()
    );
    if let Some(f) = &fsync {
        let _ = write!(j, ",\"fdatasync\":{}", f.json());
    }
    let sends_json: Vec<String> = sends
        .iter()
        .map(|f| {
            format!(
                "{{\"label\":{},\"log\":\"{}\",\"senders\":{},\"msgs_per_s\":{:.1},\"acked\":{},\"errors\":{},\"delivered\":{},\"send\":{},\"delivery\":{}}}",
                json_str(&f.label),
                f.storage.name(),
                f.senders,
                f.rate(),
                f.acked,
                f.errors,
                f.delivered,
                f.send.json(),
                f.delivery.json()
            )
        })
        .collect();
    let hands_json: Vec<String> = hands
        .iter()
        .map(|h| {
            format!(
                "{{\"log\":\"{}\",\"owner_was_leader\":{},\"handover\":{},\"shutdown_call\":{}}}",
                h.storage.name(),
                h.owner_was_leader,
                h.handover.json(),
                h.shutdown.json()
            )
        })
        .collect();
    let crash_json: Vec<String> = crashes
        .iter()
        .map(|c| {
            format!(
                "{{\"timing\":\"{}\",\"ttl_ms\":{},\"owner_was_leader\":{},\"failover\":{},\"owner_follower\":{},\"owner_leader\":{}}}",
                c.timing,
                c.ttl.as_millis(),
                c.owner_was_leader,
                c.failover.json(),
                c.split.0.json(),
                c.split.1.json()
            )
        })
        .collect();
    let _ = write!(
        j,
        ",\"sends\":[{}],\"handover\":[{}],\"crash\":[{}]}}",
        sends_json.join(","),
        hands_json.join(","),
        crash_json.join(",")
    );
    println!();
    println!("{j}");
}

/// The 9-process table and its JSON line (printed after the main report's).
fn report_learners(l: &LearnerCrash) {
    println!();
    println!(
        "crash failover, 9 processes (3 voters, 6 learners), standard timing: SIGKILL of the owner -> first `started` of another"
    );
    let limit = l.ttl.as_millis() as f64 + 150.0;
    let row = |who: &str, x: &Summary| {
        vec![
            who.to_string(),
            x.n.to_string(),
            fmt_ms(x.min),
            fmt_ms(x.p50),
            fmt_ms(x.p99),
            fmt_ms(x.max),
            if x.n == 0 {
                "-".to_string()
            } else {
                format!(
                    "p99 ≤ {limit:.0} ms (TTL + margin + 100 ms): {}",
                    verdict(ms(x.p99) <= limit)
                )
            },
        ]
    };
    table(
        &["owner", "n", "min", "p50", "p99", "max", "target"],
        &[row("a learner", &l.learner_owner), row("a voter", &l.voter_owner)],
    );
    println!();
    println!(
        "{{\"learners\":{{\"ttl_ms\":{},\"learner_owner\":{},\"voter_owner\":{}}}}}",
        l.ttl.as_millis(),
        l.learner_owner.json(),
        l.voter_owner.json()
    );
}

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    // Logs only on request: they cost time the figures should not include.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let (mut sends_out, mut hands_out, mut crash_out) = (Vec::new(), Vec::new(), Vec::new());
    let fsync = if settings.storages.contains(&StorageKind::Disk) {
        let f = fsync_baseline(if settings.quick { 100 } else { 300 })?;
        eprintln!("[fdatasync baseline] p50 {:.3} ms p99 {:.3} ms", ms(f.p50), ms(f.p99));
        Some(f)
    } else {
        None
    };
    if settings.only.contains("throughput") || settings.only.contains("handover") {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(async {
            if settings.only.contains("throughput") {
                throughput(&settings, &mut sends_out).await?;
            }
            if settings.only.contains("handover") {
                handovers(&settings, &mut hands_out).await?;
            }
            Ok::<(), Box<dyn Error>>(())
        })?;
    }
    if settings.only.contains("crash") {
        crashes(&settings, &mut crash_out)?;
    }
    let learners =
        if settings.only.contains("learners") { Some(learner_crashes(&settings)?) } else { None };
    report(&settings, fsync, &sends_out, &hands_out, &crash_out);
    if let Some(l) = learners {
        report_learners(&l);
    }
    Ok(())
}
