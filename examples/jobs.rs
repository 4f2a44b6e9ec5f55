//! A durable work queue on three highlander nodes in one process, over QUIC with mutual TLS
//! on 127.0.0.1.
//!
//! ```text
//! cargo run --release --example jobs
//! ```
//!
//! Every node runs a worker of the queue `"mail"` (8 jobs at a time, each taking 200 ms;
//! one attempt in five fails and is retried after a short backoff) and a producer that
//! enqueues 100 jobs. Half-way through, one node is killed with jobs running on it: no
//! hand-over, like a SIGKILL. After its session TTL its jobs run again on the survivors,
//! under larger claim tokens.
//!
//! The "mail server" is a table keyed by job id that accepts a delivery only from a claim
//! token above the last one it saw for that job (the token as fencing token and idempotency
//! key). At the end the example checks, from that table, that every job was delivered
//! exactly once, and prints how long the dead node's jobs took to run again.

use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{
    EnqueueOptions, JobContext, JobFailure, JobId, JobState, Node, NodeId, Timing, Token,
    WorkerOptions,
};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What the downstream system saw: per job, the deliveries it accepted (node, token) and
/// the highest token it has seen, plus when each job's attempts started.
#[derive(Default)]
struct MailServer {
    accepted: BTreeMap<JobId, Vec<(NodeId, Token)>>,
    fence: BTreeMap<JobId, Token>,
    starts: BTreeMap<JobId, Vec<(NodeId, Instant)>>,
}

impl MailServer {
    /// Accepts a delivery only under a token above every earlier one for the job.
    fn deliver(&mut self, ctx: &JobContext) -> Result<(), String> {
        let fence = self.fence.entry(ctx.id()).or_insert(Token(0));
        if ctx.token() <= *fence {
            return Err(format!("stale token {} (seen {})", ctx.token(), fence));
        }
        *fence = ctx.token();
        self.accepted.entry(ctx.id()).or_default().push((ctx.node_id(), ctx.token()));
        Ok(())
    }
}

async fn work(ctx: JobContext, server: Arc<Mutex<MailServer>>) -> Result<(), JobFailure> {
    server
        .lock()
        .unwrap()
        .starts
        .entry(ctx.id())
        .or_default()
        .push((ctx.node_id(), Instant::now()));
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        _ = ctx.cancelled() => return Err(JobFailure::retry("stopped")),
    }
    // One attempt in five fails before sending (a flaky mail server), deterministically.
    if (ctx.id().0 * 7 + u64::from(ctx.attempt())).is_multiple_of(5) {
        return Err(JobFailure::retry("smtp: 451 try again later"));
    }
    if !ctx.still_owner() {
        return Err(JobFailure::retry("lease lost before sending"));
    }
    server.lock().unwrap().deliver(&ctx).map_err(JobFailure::retry)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = ClusterSecret::generate()?;
    let timing = Timing::default();
    println!(
        "highlander jobs: three nodes over QUIC on 127.0.0.1, session TTL {} ms",
        timing.session_ttl.as_millis()
    );
    let sockets: Vec<UdpSocket> =
        (0..3).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let peers: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((NodeId(i as u64 + 1), s.local_addr()?)))
        .collect::<Result<_, std::io::Error>>()?;
    let server = Arc::new(Mutex::new(MailServer::default()));
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
        let server = server.clone();
        let options = WorkerOptions::default()
            .concurrency(8)
            .backoff(|attempt| Duration::from_millis(100 * u64::from(attempt)));
        node.worker("mail", options, move |ctx| work(ctx, server.clone())).await?;
    }
    println!("cluster up; a worker of \"mail\" on every node, 8 jobs at a time\n");

    // Producers on every node.
    let mut producers = Vec::new();
    for node in nodes.values() {
        let node = node.clone();
        producers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100 {
                let to = format!("user{i}@example.com from {}", node.id());
                match node.enqueue_with("mail", to, EnqueueOptions::new().max_attempts(10)).await {
                    Ok(id) => ids.push(id),
                    Err(e) => eprintln!("enqueue on {} failed: {e}", node.id()),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        }));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Kill a node while it runs jobs.
    let victim = NodeId(2);
    let running: Vec<JobId> = nodes[&NodeId(1)]
        .jobs(None, Some(JobState::Running), 1000)
        .into_iter()
        .filter(|j| j.node == Some(victim))
        .map(|j| j.id)
        .collect();
    let killed = Instant::now();
    nodes.remove(&victim).ok_or("no node 2")?.kill().await;
    println!("killed {victim} while it ran {} jobs: {running:?}", running.len());

    let mut jobs = Vec::new();
    for p in producers {
        jobs.extend(p.await?);
    }
    let any = nodes.values().next().ok_or("no node")?.clone();
    for job in &jobs {
        let report = any.wait(*job, Duration::from_secs(60)).await?;
        if report.state != JobState::Completed {
            return Err(format!("{job} ended {}", report.state.name()).into());
        }
    }

    let server = std::mem::take(&mut *server.lock().unwrap());
    let mut once = 0;
    for job in &jobs {
        match server.accepted.get(job).map(Vec::len) {
            Some(1) => once += 1,
            n => return Err(format!("{job} was delivered {n:?} times").into()),
        }
    }
    println!(
        "\n{} jobs enqueued, {once} delivered exactly once (by the mail server's own table)",
        jobs.len()
    );
    let retried = jobs.iter().filter(|j| server.starts.get(j).is_some_and(|s| s.len() > 1)).count();
    println!("{retried} jobs needed more than one attempt (failures and the kill)");
    let mut resumed: Vec<Duration> = running
        .iter()
        .filter_map(|j| server.starts.get(j)?.iter().find(|(n, at)| *n != victim && *at > killed))
        .map(|(_, at)| *at - killed)
        .collect();
    resumed.sort_unstable();
    if let (Some(first), Some(last)) = (resumed.first(), resumed.last()) {
        println!(
            "the dead node's {} running jobs ran again elsewhere {}–{} ms after the kill \
             (session TTL {} ms; River rescues after 1 h, BullMQ after 30 s)",
            resumed.len(),
            first.as_millis(),
            last.as_millis(),
            timing.session_ttl.as_millis()
        );
    }
    println!(
        "queues: {:?}",
        any.queues().iter().map(|q| (q.queue.to_string(), q.completed)).collect::<Vec<_>>()
    );
    for node in nodes.values() {
        node.shutdown().await;
    }
    Ok(())
}
