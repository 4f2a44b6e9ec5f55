//! A singleton on a simulated three-node cluster, through a crash, a partition and a graceful
//! hand-over, printed as a timeline in simulated time.
//!
//! ```text
//! cargo run --example sim_failover
//! ```
//!
//! Everything runs in this one process on tokio's paused clock: the two seconds a session takes
//! to expire cost nothing, and the invariant checker watches every task start, stop and
//! message delivery.

use highlander::{Node, TaskContext, Token};
use highlander_sim::SimCluster;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

const KEY: &str = "irc:#rust";

static START: OnceLock<Instant> = OnceLock::new();

fn at() -> String {
    let t = START.get().map(|s| s.elapsed()).unwrap_or_default();
    format!("[{:>7.3}s]", t.as_secs_f64())
}

/// What the handlers saw, for the summary.
#[derive(Default)]
struct Seen {
    owners: Vec<(highlander::NodeId, Token)>,
    handled: Vec<u64>,
}

/// The singleton: announce ownership, handle messages in order until asked to stop.
async fn run(mut ctx: TaskContext, seen: Arc<Mutex<Seen>>) {
    println!("{} {} runs {KEY:?} with fencing token {}", at(), ctx.node_id(), ctx.token());
    seen.lock().unwrap().owners.push((ctx.node_id(), ctx.token()));
    while let Some(m) = ctx.recv().await {
        let text = String::from_utf8_lossy(m.payload.as_bytes()).into_owned();
        println!("{}   {} ({}) handles {} {text:?}", at(), ctx.node_id(), ctx.token(), m.seq);
        seen.lock().unwrap().handled.push(m.seq.0);
    }
    println!("{} {} stops {KEY:?} ({}): asked to stop", at(), ctx.node_id(), ctx.token());
}

async fn send_some(sim: &SimCluster, from: &[u64], what: &str) -> usize {
    let mut acknowledged = 0;
    for n in from {
        let text = format!("{what} from n{n}");
        match sim.send(*n, KEY, text.clone()).await {
            Ok(seq) => {
                println!("{} n{n} sent {text:?}: committed as {seq}", at());
                acknowledged += 1;
            }
            Err(e) => println!("{} n{n} could not send {text:?}: {e}", at()),
        }
    }
    acknowledged
}

async fn owner(sim: &SimCluster) -> (highlander::NodeId, Token) {
    sim.wait_until(Duration::from_secs(30), |s| s.owners(KEY).first().copied().flatten().is_some())
        .await
        .expect("the key gets an owner");
    sim.owners(KEY)[0].unwrap()
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    START.get_or_init(Instant::now);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    println!("highlander: one singleton, three nodes, simulated network and time\n");
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(2026)
        .setup(move |node: Node| {
            let s = s.clone();
            async move { node.singleton(KEY, move |ctx| run(ctx, s.clone())).await }
        })
        .build()
        .await
        .expect("cluster starts");
    let leader = sim.status().and_then(|s| s.leader).unwrap();
    println!("{} cluster up: n1 n2 n3, Raft leader {leader}", at());
    let (first, _) = owner(&sim).await;
    let mut sent = send_some(&sim, &[1, 2, 3], "hello").await;
    sim.run_for(Duration::from_millis(500)).await;

    println!("\n--- crash: kill {first}, the owner ---");
    let t = Instant::now();
    sim.kill(first).await;
    println!("{} {first} killed; its session expires after the 2 s TTL", at());
    let others: Vec<u64> = sim.running().iter().map(|n| n.0).collect();
    sent += send_some(&sim, &others, "during the crash").await;
    sim.wait_until(Duration::from_secs(10), |s| s.owners(KEY)[0].is_some_and(|(n, _)| n != first))
        .await;
    let (second, _) = owner(&sim).await;
    sim.wait_until(Duration::from_secs(1), |_| seen.lock().unwrap().owners.len() >= 2).await;
    println!("{} crash failover took {} ms", at(), (Instant::now() - t).as_millis());
    sim.restart(first).await.expect("restart");
    println!("{} {first} restarted: its old session closed, it is a candidate again", at());
    sim.run_for(Duration::from_millis(500)).await;

    println!("\n--- partition: cut {second}, the owner, off from the others ---");
    let rest: Vec<u64> = sim.ids().into_iter().filter(|n| *n != second).map(|n| n.0).collect();
    let t = Instant::now();
    sim.partition(&[second.0], &rest);
    sim.wait_until(Duration::from_secs(10), |_| seen.lock().unwrap().owners.len() >= 3).await;
    let (third, _) = owner(&sim).await;
    println!(
        "{} the majority side took over after {} ms; {second} stopped first (its lease lapsed)",
        at(),
        (Instant::now() - t).as_millis()
    );
    sent += send_some(&sim, &rest, "after the partition").await;
    sim.heal();
    println!("{} partition healed; the key stays with {third}", at());
    sim.run_for(Duration::from_secs(3)).await;

    println!("\n--- graceful hand-over: shut {third} down ---");
    let t = Instant::now();
    sim.shutdown(third).await;
    sim.wait_until(Duration::from_secs(5), |_| seen.lock().unwrap().owners.len() >= 4).await;
    println!("{} hand-over took {} ms", at(), (Instant::now() - t).as_millis());
    let living: Vec<u64> = sim.running().iter().map(|n| n.0).collect();
    sent += send_some(&sim, &living, "after the hand-over").await;
    sim.run_for(Duration::from_millis(500)).await;
    let all_delivered = sim.checker().check_all_delivered().is_ok();
    let violations = sim.violations();
    println!("\n--- stop the cluster ---");
    sim.shutdown_all().await;

    let seen = seen.lock().unwrap();
    let tokens: Vec<String> = seen.owners.iter().map(|(n, t)| format!("{n}/{t}")).collect();
    let mut distinct = seen.handled.clone();
    distinct.sort_unstable();
    distinct.dedup();
    println!("\nsummary:");
    println!("  owners in order:  {}", tokens.join(" -> "));
    println!(
        "  messages:         {sent} acknowledged, {} distinct delivered ({} deliveries, redeliveries included)",
        distinct.len(),
        seen.handled.len()
    );
    println!("  every acknowledged message delivered: {all_delivered}");
    if violations.is_empty() {
        println!(
            "  invariant checker: no violations (never two owners, tokens only grew, nothing lost or reordered)"
        );
    } else {
        for v in &violations {
            println!("  VIOLATION: {v}");
        }
        std::process::exit(1);
    }
}
