//! Schedules on three highlander nodes in one process, over QUIC with mutual TLS on 127.0.0.1.
//!
//! ```text
//! cargo run --release --example cron
//! ```
//!
//! Every node registers the same three schedules: a cron expression with seconds, an
//! interval, and a cron in a time zone. Each tick runs on one node of the cluster; the
//! example prints which. Then the owner of `"every-2s"` is killed: after the session TTL
//! the schedule moves to another node with a larger fencing token, and a tick that fell due
//! meanwhile runs once there (the default catch-up policy), late but not lost or doubled.
//! Beside them, 64 quiet interval schedules show how schedules spread over the nodes (no
//! node above ⌈64/3⌉ + 2) and over the two survivors after the kill.

use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{Node, NodeId, ScheduleOptions, TickContext, TickOrigin, Timing, Token};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// One run as the example saw it: schedule, tick (ms since the epoch), node, token, origin.
type Run = (&'static str, u64, NodeId, Token, TickOrigin);

fn log_run(runs: &Arc<Mutex<Vec<Run>>>, key: &'static str, t: &TickContext) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    println!(
        "  {key:<14} tick {} ran on {} (token {}, attempt {}, {:?}, {} ms after the tick)",
        highlander::core::schedule::format_utc(t.tick_ms()),
        t.node_id(),
        t.token(),
        t.attempt(),
        t.origin(),
        now.saturating_sub(t.tick_ms() as u128)
    );
    runs.lock().unwrap().push((key, t.tick_ms(), t.node_id(), t.token(), t.origin()));
}

/// How many of the 64 `batch-*` schedules each node owns.
fn spread(node: &Node) -> BTreeMap<NodeId, usize> {
    let mut per = BTreeMap::new();
    for key in node.status().keys.iter().filter(|k| k.key.as_str().starts_with("batch-")) {
        if let Some(Some(owner)) = key.owners.first() {
            *per.entry(owner.node).or_insert(0) += 1;
        }
    }
    per
}

async fn register(node: &Node, runs: Arc<Mutex<Vec<Run>>>) -> Result<(), highlander::Error> {
    for i in 0..64 {
        node.every(format!("batch-{i}"), Duration::from_secs(10), |_t| async {}).await?;
    }
    let r = runs.clone();
    node.cron("cron-3s", "*/3 * * * * *", move |t| {
        log_run(&r, "cron-3s", &t);
        async {}
    })
    .await?;
    let r = runs.clone();
    node.every("every-2s", Duration::from_secs(2), move |t| {
        log_run(&r, "every-2s", &t);
        async {}
    })
    .await?;
    let r = runs;
    let berlin = ScheduleOptions::default().zone("Europe/Berlin");
    node.cron_with("berlin-5s", "*/5 * * * * *", berlin, move |t| {
        log_run(&r, "berlin-5s", &t);
        async {}
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = ClusterSecret::generate()?;
    let timing = Timing::default();
    println!(
        "highlander cron: three nodes over QUIC on 127.0.0.1, session TTL {} ms",
        timing.session_ttl.as_millis()
    );
    let sockets: Vec<UdpSocket> =
        (0..3).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let peers: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((NodeId(i as u64 + 1), s.local_addr()?)))
        .collect::<Result<_, std::io::Error>>()?;
    let runs = Arc::new(Mutex::new(Vec::<Run>::new()));
    let mut nodes = BTreeMap::new();
    for (id, socket) in peers.keys().copied().zip(sockets) {
        let config =
            QuicConfig::new(id, peers[&id], peers.clone(), Identity::ClusterSecret(secret.clone()));
        let node = Node::builder()
            .id(id)
            .peers(peers.keys().copied())
            .transport(QuicTransport::from_socket(config, socket)?)
            .timing(timing)
            .start()
            .await?;
        nodes.insert(id, node);
    }
    for node in nodes.values() {
        node.ready(Duration::from_secs(10)).await?;
        register(node, runs.clone()).await?;
    }
    println!("cluster up; every node registered the same three schedules (and 64 quiet ones)\n");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let any = nodes.values().next().ok_or("no node")?;
    println!("\nthe 64 batch schedules per node: {:?}", spread(any));

    let last = |key: &str| runs.lock().unwrap().iter().rev().find(|r| r.0 == key).copied();
    let Some((_, tick, owner, token, _)) = last("every-2s") else {
        return Err("every-2s never ran".into());
    };
    println!(
        "\nkilling {owner}, the owner of every-2s (last tick {})",
        highlander::core::schedule::format_utc(tick)
    );
    let killed = Instant::now();
    nodes.remove(&owner).ok_or("no such node")?.kill().await;
    let moved = loop {
        if let Some(r) = last("every-2s").filter(|r| r.2 != owner) {
            break r;
        }
        if killed.elapsed() > Duration::from_secs(15) {
            return Err("every-2s did not move".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!(
        "every-2s moved to {} with token {} > {token} after {} ms\n",
        moved.2,
        moved.3,
        killed.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let any = nodes.values().next().ok_or("no node")?;
    println!("the 64 batch schedules per node after the kill: {:?}", spread(any));

    // Once per tick across the cluster: no tick of a schedule ran twice.
    let all = runs.lock().unwrap().clone();
    let mut per_tick: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for r in &all {
        *per_tick.entry((r.0, r.1)).or_default() += 1;
    }
    let twice: Vec<_> = per_tick.iter().filter(|(_, n)| **n > 1).collect();
    for node in nodes.values() {
        if let Some(report) = node.describe_schedule("every-2s") {
            println!("every-2s as {} sees it: {:?}", node.id(), report.counts);
            break;
        }
    }
    for node in nodes.values() {
        node.shutdown().await;
    }
    if !twice.is_empty() {
        return Err(format!("ticks that ran twice: {twice:?}").into());
    }
    println!("done: {} runs of {} ticks, each tick once", all.len(), per_tick.len());
    Ok(())
}
