//! Schedules at scale: many interval schedules on three nodes in this process, over real QUIC
//! with mutual TLS on 127.0.0.1, the Raft log on disk. Figures go in `benches/README.md`.
//!
//! ```text
//! cargo bench --bench schedules                          # 1,000 schedules every 1 s, 30 s
//! HIGHLANDER_BENCH_SCHEDULES=200 HIGHLANDER_BENCH_SECS=10 cargo bench --bench schedules
//! ```
//!
//! What it measures, after every schedule has an owner and a warm-up of 5 s:
//!
//! - **lateness**: the handler's start minus the tick's nominal time (both wall clock of this
//!   one machine), p50, p99 and max over every run in the window;
//! - **entries per tick**: Raft log entries applied per run (fire, start and done of a tick,
//!   keepalives and stamps included);
//! - **CPU**: user + system time of the process (all three nodes) per second of wall time;
//! - **once per tick**: ticks that ran more than once (must be 0) and ticks that never ran;
//! - **kill**: one node is killed (no hand-over; in this process, so its sockets close at
//!   once like a SIGKILL's); for each schedule it owned, the time from the first tick due
//!   after the kill to the first run on another node (the session TTL, as ticks missed
//!   meanwhile follow the catch-up policy), and whether every one of them moved.

mod common;

use common::{Result, applied, env_number, start_three};
use highlander::{Node, NodeId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One run: schedule index, tick, start (ms since the epoch), node.
type Run = (usize, u64, u64, NodeId);

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// User + system CPU time of this process, from /proc (Linux); `None` elsewhere.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let count = env_number("HIGHLANDER_BENCH_SCHEDULES", 1000) as usize;
    let window = Duration::from_secs(env_number("HIGHLANDER_BENCH_SECS", 30));
    let dir = tempfile::tempdir()?;
    let mut nodes = start_three(dir.path()).await?;
    let runs = Arc::new(Mutex::new(Vec::<Run>::new()));
    for node in nodes.values() {
        for i in 0..count {
            let runs = runs.clone();
            node.every(format!("s{i}"), Duration::from_secs(1), move |t| {
                runs.lock().unwrap().push((i, t.tick_ms(), wall_ms(), t.node_id()));
                async {}
            })
            .await?;
        }
    }
    let owned = |nodes: &BTreeMap<NodeId, Node>| {
        let status = nodes.values().next().map(|n| n.status());
        status.map_or(0, |s| s.keys.iter().filter(|k| k.owners.iter().any(|o| o.is_some())).count())
    };
    let began = std::time::Instant::now();
    while owned(&nodes) < count {
        if began.elapsed() > Duration::from_secs(120) {
            return Err(format!("only {} of {count} schedules have an owner", owned(&nodes)).into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{count} schedules every 1 s on 3 nodes (disk); all owned after {:?}",
        began.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The steady window.
    let (from_ms, from_index, from_cpu) = (wall_ms(), applied(&nodes), cpu_time());
    tokio::time::sleep(window).await;
    let (to_ms, to_index, to_cpu) = (wall_ms(), applied(&nodes), cpu_time());
    let all = runs.lock().unwrap().clone();
    let steady: Vec<&Run> = all.iter().filter(|r| r.1 > from_ms && r.1 + 1000 <= to_ms).collect();
    let mut lateness: Vec<u64> = steady.iter().map(|r| r.2.saturating_sub(r.1)).collect();
    lateness.sort_unstable();
    let mut per_tick: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    for r in &steady {
        *per_tick.entry((r.0, r.1)).or_default() += 1;
    }
    let twice = per_tick.values().filter(|n| **n > 1).count();
    let expected = count as u64 * ((to_ms - 1000) / 1000 - from_ms / 1000);
    let entries = to_index - from_index;
    println!("| figure | value |\n|---|---|");
    println!("| runs in {window:?} | {} (expected {expected}) |", steady.len());
    println!(
        "| lateness p50 / p99 / max | {} / {} / {} ms |",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        lateness.last().copied().unwrap_or(0)
    );
    println!("| Raft entries per run | {:.2} |", entries as f64 / steady.len().max(1) as f64);
    if let (Some(a), Some(b)) = (from_cpu, to_cpu) {
        let secs = (to_ms - from_ms) as f64 / 1000.0;
        println!("| CPU (3 nodes) | {:.0} % of one core |", (b - a).as_secs_f64() / secs * 100.0);
    }
    println!("| ticks run twice | {twice} |");
    println!("| ticks never run | {} |", expected.saturating_sub(per_tick.len() as u64));

    // Kill one node; how late do its schedules' next ticks run elsewhere?
    let victim = NodeId(2);
    let theirs: BTreeSet<usize> = {
        let from = wall_ms() - 3000;
        all.iter().filter(|r| r.3 == victim && r.1 > from).map(|r| r.0).collect()
    };
    let killed_ms = wall_ms();
    nodes.remove(&victim).ok_or("no node 2")?.kill().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = runs.lock().unwrap().clone();
    // From the first tick due after the kill to the first run of the schedule elsewhere:
    // the failover as the schedule's users see it.
    let first_due = (killed_ms / 1000 + 1) * 1000;
    let (mut first_late, mut since_kill) = (Vec::new(), Vec::new());
    for i in &theirs {
        if let Some(r) = after.iter().find(|r| r.0 == *i && r.1 > killed_ms && r.3 != victim) {
            first_late.push(r.2.saturating_sub(first_due));
            since_kill.push(r.2.saturating_sub(killed_ms));
        }
    }
    first_late.sort_unstable();
    since_kill.sort_unstable();
    println!(
        "| kill: schedules of the killed node | {} (moved and ran: {}) |",
        theirs.len(),
        first_late.len()
    );
    println!(
        "| kill: first tick due → first run elsewhere, p50 / max | {} / {} ms |",
        percentile(&first_late, 0.5),
        first_late.last().copied().unwrap_or(0)
    );
    println!(
        "| kill: the kill → first run elsewhere, min / p50 / max | {} / {} / {} ms |",
        since_kill.first().copied().unwrap_or(0),
        percentile(&since_kill, 0.5),
        since_kill.last().copied().unwrap_or(0)
    );
    for node in nodes.values() {
        node.shutdown().await;
    }
    Ok(())
}
