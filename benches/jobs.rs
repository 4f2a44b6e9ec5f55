//! The job queue end to end: three nodes in this process, over real QUIC with mutual TLS on
//! 127.0.0.1, the Raft log on disk (fdatasync per entry, as in production). Figures go in
//! `benches/README.md`.
//!
//! ```text
//! cargo bench --bench jobs                                  # 60,000 jobs, 256 producers
//! HIGHLANDER_BENCH_JOBS=10000 cargo bench --bench jobs
//! ```
//!
//! What it prints:
//!
//! - **throughput**: producers on every node (256 in all) enqueue the jobs as fast as the
//!   cluster acknowledges them, while workers on every node (64 at a time each) run no-op
//!   handlers: jobs per second from the first enqueue to the last completion applied, the
//!   enqueue latency p50/p99 as producers see it, and Raft entries per job (every entry the
//!   cluster applied meanwhile, keepalives and stamps included, over the jobs);
//! - **enqueue → start**, idle workers: one job at a time from node 1, the time from the
//!   call to `enqueue` to its handler's first poll (on whichever node claimed it), p50/p99;
//! - **kill**: long jobs run on every node; one node that is not the Raft leader is killed (in this process: its sockets
//!   close at once, like a SIGKILL's, and nothing is handed over); for each job it ran, the
//!   time from the kill to the job's handler starting on another node, against the session
//!   TTL + 100 ms.

mod common;

use common::{Result, applied, env_number, ms, percentile, start_three};
use highlander::{EnqueueOptions, JobContext, JobId, Node, NodeId, Timing, WorkerOptions};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When each job's handler first started, and where.
#[derive(Default)]
struct Starts(Mutex<BTreeMap<JobId, (Instant, NodeId, u32)>>, tokio::sync::Notify);

impl Starts {
    fn record(&self, ctx: &JobContext) {
        self.1.notify_waiters();
        let mut m = self.0.lock().unwrap();
        let e = m.entry(ctx.id()).or_insert((Instant::now(), ctx.node_id(), 0));
        if e.1 != ctx.node_id() && e.2 == 0 {
            // A run on another node: keep the first one elsewhere.
            *e = (Instant::now(), ctx.node_id(), 1);
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let total = env_number("HIGHLANDER_BENCH_JOBS", 60_000);
    let producers = env_number("HIGHLANDER_BENCH_PRODUCERS", 256);
    let dir = tempfile::tempdir()?;
    let mut nodes = start_three(dir.path()).await?;
    let done = Arc::new(AtomicU64::new(0));
    let starts = Arc::new(Starts::default());
    for node in nodes.values() {
        let done = done.clone();
        node.worker("noop", WorkerOptions::default().concurrency(64), move |_ctx| {
            done.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, String>(()) }
        })
        .await?;
        let probe = starts.clone();
        node.worker("probe", WorkerOptions::default(), move |ctx: JobContext| {
            probe.record(&ctx);
            async { Ok::<_, String>(()) }
        })
        .await?;
        let long = starts.clone();
        node.worker("long", WorkerOptions::default().concurrency(12), move |ctx: JobContext| {
            long.record(&ctx);
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                    _ = ctx.cancelled() => {}
                }
                Ok::<_, String>(())
            }
        })
        .await?;
    }
    println!("3 nodes (QUIC on loopback, Raft log on disk), workers on every node");

    // Throughput.
    let first_index = applied(&nodes);
    let began = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let node_list: Vec<Node> = nodes.values().cloned().collect();
    for p in 0..producers {
        let node = node_list[(p % 3) as usize].clone();
        let (latencies, next) = (latencies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let t = Instant::now();
                match node.enqueue("noop", &b"x"[..]).await {
                    Ok(_) => mine.push(t.elapsed()),
                    Err(e) => eprintln!("enqueue failed: {e}"),
                }
            }
            latencies.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let enqueued_in = began.elapsed();
    while done.load(Ordering::Relaxed) < total {
        if began.elapsed() > Duration::from_secs(600) {
            return Err(format!("only {} of {total} jobs ran", done.load(Ordering::Relaxed)).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Until every completion is applied (the job table empty of unfinished jobs).
    loop {
        let open = nodes.values().next().map(|n| n.queues()).unwrap_or_default();
        let open: u64 =
            open.iter().map(|q| q.scheduled + q.available + q.running + q.retryable).sum();
        if open == 0 || began.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = began.elapsed();
    let entries = applied(&nodes) - first_index;
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "\nthroughput: {total} no-op jobs, {producers} producers over 3 nodes, 64 running per node"
    );
    println!(
        "  end to end (first enqueue to last completion applied): {:.0} jobs/s in {:.2} s (target >= 20,000: {})",
        rate,
        elapsed.as_secs_f64(),
        if rate >= 20_000.0 { "met" } else { "NOT met" }
    );
    println!(
        "  enqueues acknowledged in {:.2} s: {:.0} enqueues/s",
        enqueued_in.as_secs_f64(),
        total as f64 / enqueued_in.as_secs_f64()
    );
    println!(
        "  enqueue latency: p50 {}, p99 {}",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    println!("  Raft entries applied: {entries}, {:.3} per job", entries as f64 / total as f64);

    // Enqueue -> start, idle workers (after the burst's snapshots and compaction settle).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let samples = env_number("HIGHLANDER_BENCH_PROBES", 500);
    let node1 = nodes[&NodeId(1)].clone();
    let mut to_start = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let job = node1.enqueue("probe", &b"p"[..]).await?;
        let started = loop {
            let notified = starts.1.notified();
            if let Some((at, _, _)) = starts.0.lock().unwrap().get(&job).copied() {
                break at;
            }
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{job} did not start").into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        };
        to_start.push(started.saturating_duration_since(t));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    to_start.sort_unstable();
    let p50 = percentile(&to_start, 0.5);
    println!(
        "\nenqueue -> handler start, idle workers, one job at a time from n1 ({samples} jobs):"
    );
    println!(
        "  p50 {}, p99 {} (target p50 <= 5 ms: {})",
        ms(p50),
        ms(percentile(&to_start, 0.99)),
        if p50 <= Duration::from_millis(5) { "met" } else { "NOT met" }
    );

    // Kill a worker node while it runs jobs.
    let mut long = Vec::new();
    for i in 0..24u64 {
        let node = &node_list[(i % 3) as usize];
        long.push(node.enqueue_with("long", &b"l"[..], EnqueueOptions::new()).await?);
    }
    let waited = Instant::now();
    while starts.0.lock().unwrap().iter().filter(|(j, _)| long.contains(j)).count() < long.len() {
        if waited.elapsed() > Duration::from_secs(20) {
            return Err("the long jobs did not all start".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A worker that is not the Raft leader: a leader's death adds an election (and the new
    // leader counts every session's silence from its own start), see benches/README.md.
    let leader = node_list[0].status().leader;
    let victim = [NodeId(2), NodeId(3), NodeId(1)]
        .into_iter()
        .find(|n| Some(*n) != leader)
        .ok_or("no follower")?;
    let theirs: Vec<JobId> = {
        let m = starts.0.lock().unwrap();
        long.iter().copied().filter(|j| m.get(j).is_some_and(|s| s.1 == victim)).collect()
    };
    let killed = Instant::now();
    nodes.remove(&victim).ok_or("no such node")?.kill().await;
    let mut moved = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while moved.len() < theirs.len() && Instant::now() < deadline {
        moved = {
            let m = starts.0.lock().unwrap();
            theirs
                .iter()
                .filter_map(|j| m.get(j).filter(|s| s.2 == 1).map(|s| s.0 - killed))
                .collect()
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    moved.sort_unstable();
    let ttl = Timing::default().session_ttl;
    let worst = moved.last().copied().unwrap_or_default();
    println!(
        "\nkill: {victim} (not the leader, {leader:?}) killed while running {} of 24 long jobs",
        theirs.len()
    );
    println!(
        "  its jobs running again elsewhere: {} of {}, after p50 {}, max {} (target <= TTL {} + 100 ms: {})",
        moved.len(),
        theirs.len(),
        ms(percentile(&moved, 0.5)),
        ms(worst),
        ms(ttl),
        if moved.len() == theirs.len() && worst <= ttl + Duration::from_millis(100) {
            "met"
        } else {
            "NOT met"
        }
    );
    for node in nodes.values() {
        node.kill().await;
    }
    Ok(())
}
