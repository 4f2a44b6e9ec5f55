//! What several benches share: a three-node cluster in this process over real QUIC with a
//! cluster secret on 127.0.0.1, its Raft logs on disk.

// Each bench uses a part of this.
#![allow(dead_code)]

use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{Node, NodeId, Timing};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Starts three nodes with data directories under `dir` and waits until each has a session.
pub async fn start_three(dir: &std::path::Path) -> Result<BTreeMap<NodeId, Node>> {
    let secret = ClusterSecret::generate()?;
    let sockets: Vec<UdpSocket> =
        (0..3).map(|_| UdpSocket::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    let peers: BTreeMap<NodeId, SocketAddr> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((NodeId(i as u64 + 1), s.local_addr()?)))
        .collect::<std::io::Result<_>>()?;
    let mut nodes = BTreeMap::new();
    for (id, socket) in peers.keys().copied().zip(sockets) {
        let config =
            QuicConfig::new(id, peers[&id], peers.clone(), Identity::ClusterSecret(secret.clone()));
        let node = Node::builder()
            .id(id)
            .peers(peers.keys().copied())
            .transport(QuicTransport::from_socket(config, socket)?)
            .timing(Timing::default())
            .data_dir(dir.join(format!("n{}", id.0)))
            .start()
            .await?;
        nodes.insert(id, node);
    }
    for node in nodes.values() {
        node.ready(Duration::from_secs(20)).await?;
    }
    Ok(nodes)
}

/// The highest index any of the nodes has applied.
pub fn applied(nodes: &BTreeMap<NodeId, Node>) -> u64 {
    nodes
        .values()
        .map(|n| n.status_with(&highlander::KeyQuery::summary()).applied_index)
        .max()
        .unwrap_or(0)
}

/// A number from the environment, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The `p` quantile of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
