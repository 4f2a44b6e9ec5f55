//! Many keys: what one costs, how long thousands take to be owned, and whether a busy key
//! slows down when 100,000 others sit idle. Figures go in `benches/README.md`.
//!
//! ```text
//! cargo bench --bench keys                               # 10,000 and 100,000 keys
//! HIGHLANDER_BENCH_KEYS=10000 cargo bench --bench keys   # one size only
//! ```
//!
//! What it prints, per key count N:
//!
//! - **state**: a `ClusterState` with N singleton keys registered by 3 sessions and every key
//!   owned, built by applying the commands a cluster would apply. *snapshot B/key* is its
//!   encoded size (what a snapshot writes and a new node receives) over N; *heap B/key* is
//!   what the state holds on the heap (a counting allocator, live bytes after minus before)
//!   over N; *plan* is the leader's planning pass over that settled state (nothing to do),
//!   median of 50.
//! - **cluster**: three nodes in this process over real QUIC with mutual TLS on 127.0.0.1,
//!   the Raft log on disk (fdatasync per entry). Every node registers all N keys (256
//!   registrations in flight per node); *registered* is the time until every registration
//!   returned, *owned* the time from the first registration until a node's status counts
//!   every slot owned and every task started, *spread* until the three nodes own a third
//!   each (within two slots: the first registrant gets every key at first, then the leader
//!   moves them in rounds once its leadership is older than a session's expiry, 2.1 s).
//!   *RSS/key* is the process's resident memory
//!   growth over N (three nodes, their tasks and handlers included).
//! - **a busy key beside idle ones**: one sender sends 2,000 messages one at a time to one
//!   key through the leader, first before the N keys exist and then after; p50 and p99 of
//!   `send`. Equal figures mean that an entry costs what it touches, not the number of keys.

use highlander::core::codec;
use highlander::core::state::ClusterState;
use highlander::core::{
    ClientId, Command, Key, KeySpec, LeaseTable, LeaseTerms, Limits, Millis, Outcome, SessionId,
    plan,
};
mod common;

use common::{Result, ms, percentile, start_three};
use highlander::{KeyQuery, Node, NodeId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes, so the state's footprint is measured, not estimated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn key_name(i: usize) -> String {
    format!("tenant:{i:06}")
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The state part: bytes per key and the planning pass over a settled state.
fn state_figures(n: usize) -> Result<(f64, f64, Duration)> {
    let before = LIVE.load(Ordering::Relaxed);
    let mut st = ClusterState::new();
    let lease = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
    let mut sessions = Vec::new();
    for node in 1..=3u64 {
        let open = Command::OpenSession {
            client: ClientId { node: NodeId(node), incarnation: 1 },
            attempt: 0,
            lease,
            limits: Limits::STANDARD,
            storage: node,
        };
        match st.apply(&open) {
            Outcome::SessionOpened { session } => sessions.push(session),
            other => return Err(format!("open refused: {other}").into()),
        }
    }
    for i in 0..n {
        let key = Key::new(key_name(i))?;
        for (e, s) in sessions.iter().enumerate() {
            let c = Command::Register {
                session: *s,
                key: key.clone(),
                spec: KeySpec::singleton(),
                epoch: e as u64 + 1,
            };
            st.apply(&c);
        }
        let owner: SessionId = sessions[i % 3];
        st.apply(&Command::Assign { key, slot: 0, session: owner });
    }
    let heap = LIVE.load(Ordering::Relaxed).saturating_sub(before) as f64 / n as f64;
    let snapshot = codec::encode(&st)?.len() as f64 / n as f64;
    if st.key_summary().owned != n as u64 {
        return Err("not every key was owned".into());
    }
    // Planning over the settled state: every session heard just now, nothing to do.
    let mut table = LeaseTable::new(1, Millis(0));
    table.observe(&st, Millis(0));
    for s in &sessions {
        table.heard(*s, Millis(100_000));
    }
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let commands = plan(&st, &table, Millis(100_000));
        times.push(t.elapsed());
        if !commands.is_empty() {
            return Err(format!("a settled state planned {} commands", commands.len()).into());
        }
    }
    times.sort();
    Ok((snapshot, heap, percentile(&times, 0.5)))
}

/// How many sends the "with the keys" figure takes (`HIGHLANDER_BENCH_SENDS`, default 2,000;
/// more to profile that phase).
fn sends_after() -> usize {
    std::env::var("HIGHLANDER_BENCH_SENDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

/// `send` latencies of one sender through `node`, sorted.
async fn sends(node: &Node, count: usize) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        node.send("busy", format!("m{i}").into_bytes()).await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times)
}

struct ClusterFigures {
    registered: Duration,
    owned: Duration,
    spread: Duration,
    rss_per_key: f64,
    before: Vec<Duration>,
    after: Vec<Duration>,
}

async fn cluster_figures(n: usize) -> Result<ClusterFigures> {
    let dir = tempfile::tempdir()?;
    let nodes = start_three(dir.path()).await?;
    let started = Arc::new(AtomicU64::new(0));
    for node in nodes.values() {
        node.singleton("busy", |mut ctx| async move {
            while ctx.recv().await.is_some() {
                ctx.ack();
            }
        })
        .await?;
    }
    let leader_id =
        nodes[&NodeId(1)].status_with(&KeyQuery::summary()).leader.ok_or("no leader")?;
    let leader = nodes[&leader_id].clone();
    sends(&leader, 200).await?; // warm-up
    let before = sends(&leader, 2000).await?;

    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut registering = tokio::task::JoinSet::new();
    for node in nodes.values() {
        let node = node.clone();
        let started = started.clone();
        registering.spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            let mut lanes = tokio::task::JoinSet::new();
            for _ in 0..256 {
                let (node, next, started) = (node.clone(), next.clone(), started.clone());
                lanes.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok::<_, highlander::Error>(());
                        }
                        let started = started.clone();
                        node.singleton(key_name(i), move |ctx| {
                            started.fetch_add(1, Ordering::Relaxed);
                            async move { ctx.cancelled().await }
                        })
                        .await?;
                    }
                });
            }
            while let Some(r) = lanes.join_next().await {
                r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(r) = registering.join_next().await {
        r??;
    }
    let registered = t0.elapsed();
    let all = n as u64 + 1;
    let owned = loop {
        let sum = nodes[&leader_id].status_with(&KeyQuery::summary()).key_summary;
        if sum.owned >= all && started.load(Ordering::Relaxed) >= n as u64 {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(format!("after 600 s only {} of {all} slots owned", sum.owned).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Spread: every node owns a third, within a slot (the leader counts one more).
    let spread = loop {
        let sessions = nodes[&leader_id].status_with(&KeyQuery::summary()).sessions;
        let owned: Vec<usize> = sessions.iter().map(|s| s.owned).collect();
        let (lo, hi) =
            (owned.iter().min().copied().unwrap_or(0), owned.iter().max().copied().unwrap_or(0));
        if owned.len() == 3 && hi <= lo + 2 {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(format!("after 600 s the load is still {owned:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rss_per_key = rss_bytes().saturating_sub(rss_before) as f64 / n as f64;
    let after = sends(&leader, sends_after()).await?;
    for node in nodes.values() {
        node.shutdown().await;
    }
    Ok(ClusterFigures { registered, owned, spread, rss_per_key, before, after })
}

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> = match std::env::var("HIGHLANDER_BENCH_KEYS") {
        Ok(v) => v.split(',').map(|s| s.trim().parse()).collect::<std::result::Result<_, _>>()?,
        Err(_) => vec![10_000, 100_000],
    };
    println!(
        "| keys | snapshot B/key | heap B/key | plan pass | registered | owned | spread | RSS/key \
         | send p50 / p99 before | send p50 / p99 with the keys |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for n in sizes {
        let (snapshot, heap, plan_pass) = state_figures(n)?;
        let c = cluster_figures(n).await?;
        println!(
            "| {n} | {snapshot:.0} | {heap:.0} | {} | {} | {} | {} | {:.0} B | {} / {} | {} / {} |",
            ms(plan_pass),
            ms(c.registered),
            ms(c.owned),
            ms(c.spread),
            c.rss_per_key,
            ms(percentile(&c.before, 0.5)),
            ms(percentile(&c.before, 0.99)),
            ms(percentile(&c.after, 0.5)),
            ms(percentile(&c.after, 0.99)),
        );
    }
    Ok(())
}
