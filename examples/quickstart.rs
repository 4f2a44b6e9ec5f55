//! Three highlander nodes in one process, talking real QUIC with mutual TLS on 127.0.0.1.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```
//!
//! The nodes share a freshly generated cluster secret, from which each derives the cluster's
//! CA and issues itself a certificate. A singleton runs on one of them; every node sends it
//! messages; the owner is killed; another node takes over within the session TTL with a larger
//! fencing token, and every acknowledged message is delivered. Then the new owner leaves
//! gracefully and hands over in milliseconds.

use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{Node, NodeId, TaskContext, Timing, Token};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const KEY: &str = "quickstart";

#[derive(Default)]
struct Seen {
    runs: Vec<(NodeId, Token, Instant)>,
    delivered: BTreeSet<String>,
}

async fn singleton(mut ctx: TaskContext, seen: Arc<Mutex<Seen>>) {
    println!("  {} runs {KEY:?} with fencing token {}", ctx.node_id(), ctx.token());
    seen.lock().unwrap().runs.push((ctx.node_id(), ctx.token(), Instant::now()));
    while let Some(m) = ctx.recv().await {
        let text = String::from_utf8_lossy(m.payload.as_bytes()).into_owned();
        seen.lock().unwrap().delivered.insert(text);
    }
}

async fn send_from(nodes: &BTreeMap<NodeId, Node>, round: &str, count: usize) -> Vec<String> {
    let mut acknowledged = Vec::new();
    for (id, node) in nodes {
        for i in 0..count {
            let text = format!("{round} #{i} from {id}");
            match node.send(KEY, text.clone()).await {
                Ok(_) => acknowledged.push(text),
                Err(e) => println!("  {id} could not send {text:?}: {e}"),
            }
        }
    }
    acknowledged
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            eprintln!("gave up waiting for {what} after {limit:?}");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = ClusterSecret::generate()?;
    let timing = Timing::default();
    println!(
        "highlander quickstart: three nodes over QUIC on 127.0.0.1, session TTL {} ms",
        timing.session_ttl.as_millis()
    );

    // Bind first to learn the ports, then give every node the same peer list.
    let sockets: Vec<UdpSocket> =
        (0..3).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    let peers: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((NodeId(i as u64 + 1), s.local_addr()?)))
        .collect::<Result<_, std::io::Error>>()?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut nodes = BTreeMap::new();
    for (id, socket) in peers.keys().copied().zip(sockets) {
        let config =
            QuicConfig::new(id, peers[&id], peers.clone(), Identity::ClusterSecret(secret.clone()));
        let transport = QuicTransport::from_socket(config, socket)?;
        let node = Node::builder()
            .id(id)
            .peers(peers.keys().copied())
            .transport(transport)
            .timing(timing)
            .start()
            .await?;
        nodes.insert(id, node);
    }
    for node in nodes.values() {
        node.ready(Duration::from_secs(10)).await?;
        let s = seen.clone();
        node.singleton(KEY, move |ctx| singleton(ctx, s.clone())).await?;
    }
    println!("cluster up: {:?}, leader {:?}", peers, nodes[&NodeId(1)].status().leader);
    wait_for("an owner", Duration::from_secs(10), || !seen.lock().unwrap().runs.is_empty()).await;

    let mut acknowledged = send_from(&nodes, "before", 10).await;
    println!("sent 10 messages from each node: {} acknowledged", acknowledged.len());

    let (owner, token, _) = seen.lock().unwrap().runs[0];
    println!("\nkilling {owner}, the owner (no hand-over: its session must expire)");
    let killed = Instant::now();
    nodes.remove(&owner).unwrap().kill().await;
    acknowledged.extend(send_from(&nodes, "during", 10).await);
    wait_for("a new owner", Duration::from_secs(10), || {
        seen.lock().unwrap().runs.iter().any(|(n, _, at)| *n != owner && *at > killed)
    })
    .await;
    let (new_owner, new_token, started) =
        *seen.lock().unwrap().runs.iter().find(|(n, _, at)| *n != owner && *at > killed).unwrap();
    println!(
        "crash failover: {} ms, {owner}/{token} -> {new_owner}/{new_token}",
        (started - killed).as_millis()
    );

    acknowledged.extend(send_from(&nodes, "after", 10).await);
    let want: BTreeSet<String> = acknowledged.iter().cloned().collect();
    wait_for("every message", Duration::from_secs(10), || {
        want.is_subset(&seen.lock().unwrap().delivered)
    })
    .await;
    println!("all {} acknowledged messages delivered, none lost", want.len());

    println!("\nshutting {new_owner} down gracefully");
    let began = Instant::now();
    let leaving = nodes.remove(&new_owner).unwrap();
    let handover = tokio::spawn(async move { leaving.shutdown().await });
    wait_for("the hand-over", Duration::from_secs(5), || {
        seen.lock().unwrap().runs.iter().any(|(_, _, at)| *at > began)
    })
    .await;
    let (last, last_token, at) =
        *seen.lock().unwrap().runs.iter().find(|(_, _, at)| *at > began).unwrap();
    println!(
        "graceful hand-over: {:.2} ms, {new_owner}/{new_token} -> {last}/{last_token}",
        (at - began).as_secs_f64() * 1000.0
    );
    handover.await?;
    for node in nodes.values() {
        node.shutdown().await;
    }
    println!("\ndone: tokens only grew ({token} < {new_token} < {last_token}), nothing lost");
    Ok(())
}
