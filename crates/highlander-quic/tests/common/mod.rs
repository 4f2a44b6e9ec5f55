//! Shared by the integration tests: an echo handler, a test PKI and loopback nodes.

#![allow(dead_code)]

use highlander_core::wire::{KeepAliveReply, RaftMessage, Request, Response, StatusReport};
use highlander_core::{BoxFuture, NodeId, Payload, RequestHandler, SessionId, Transport};
use highlander_quic::{CaPem, Identity, QuicConfig, QuicTransport, Timeouts};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Answers every request in a way the sender can check, and records who asked what.
pub struct Echo {
    pub id: NodeId,
    pub seen: Mutex<Vec<(NodeId, &'static str)>>,
}

impl Echo {
    pub fn new(id: NodeId) -> Arc<Echo> {
        Arc::new(Echo { id, seen: Mutex::new(Vec::new()) })
    }

    pub fn seen(&self) -> Vec<(NodeId, &'static str)> {
        self.seen.lock().unwrap().clone()
    }
}

impl RequestHandler for Echo {
    fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response> {
        let kind = match &request {
            Request::Raft { message: RaftMessage::AppendEntries(_), .. } => "append",
            Request::Raft { message: RaftMessage::Vote(_), .. } => "vote",
            Request::Raft { message: RaftMessage::PreVote(_), .. } => "prevote",
            Request::Raft { message: RaftMessage::Snapshot(_), .. } => "snapshot",
            Request::Write(_) => "write",
            Request::KeepAlive { .. } => "keepalive",
            Request::Status(_) => "status",
            Request::Ping => "ping",
            Request::Hello => "hello",
            Request::Membership(_) => "membership",
            Request::Schedule { .. } => "schedule",
            Request::Jobs(_) => "jobs",
        };
        self.seen.lock().unwrap().push((from, kind));
        let id = self.id;
        Box::pin(async move {
            match request {
                Request::Raft {
                    message:
                        RaftMessage::AppendEntries(p) | RaftMessage::Vote(p) | RaftMessage::PreVote(p),
                    ..
                } => Response::Raft(p),
                Request::Raft { message: RaftMessage::Snapshot(p), .. } => {
                    Response::Raft(Payload::from(digest(p.as_bytes())))
                }
                // `lapsed_ms` doubles as "take this long to answer".
                Request::KeepAlive { lapsed_ms, .. } => {
                    tokio::time::sleep(Duration::from_millis(lapsed_ms)).await;
                    Response::KeepAlive(KeepAliveReply::Renewed { cluster_ms: None })
                }
                Request::Ping => Response::Pong,
                Request::Status(_) => Response::Status(Box::new(StatusReport {
                    node: Some(id),
                    ..Default::default()
                })),
                Request::Write(_)
                | Request::Hello
                | Request::Membership(_)
                | Request::Schedule { .. }
                | Request::Jobs(_) => Response::Refused("not served here".into()),
            }
        })
    }
}

/// Length and FNV-1a hash of `bytes`.
pub fn digest(bytes: &[u8]) -> Vec<u8> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut out = (bytes.len() as u64).to_be_bytes().to_vec();
    out.extend_from_slice(&h.to_be_bytes());
    out
}

pub fn append(bytes: &[u8]) -> Request {
    Request::Raft { to: 1, message: RaftMessage::AppendEntries(Payload::from(bytes)) }
}

pub fn slow(ms: u64) -> Request {
    Request::KeepAlive { session: SessionId(1), lapsed_ms: ms, wall_ms: 0 }
}

pub fn pem_identity(ca: &CaPem, id: u64) -> Identity {
    let node = highlander_quic::issue_node_cert(
        &ca.cert_pem,
        &ca.key_pem,
        NodeId(id),
        &["127.0.0.1".into()],
        1,
    )
    .unwrap();
    Identity::Pem { ca_cert: ca.cert_pem.clone(), node_cert: node.cert_pem, node_key: node.key_pem }
}

/// Loopback sockets on ports the OS picks.
pub fn sockets(n: usize) -> Vec<(UdpSocket, SocketAddr)> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let a = s.local_addr().unwrap();
            (s, a)
        })
        .collect()
}

pub fn fast_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        idle: Duration::from_secs(3),
        keep_alive: Duration::from_millis(500),
        stream_idle: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        drain: Duration::from_secs(1),
    }
}

pub fn config(
    id: u64,
    listen: SocketAddr,
    peers: &BTreeMap<NodeId, SocketAddr>,
    identity: Identity,
) -> QuicConfig {
    let mut c = QuicConfig::new(NodeId(id), listen, peers.clone(), identity);
    c.timeouts = fast_timeouts();
    c
}

pub struct Node {
    pub t: Arc<QuicTransport>,
    pub echo: Arc<Echo>,
}

impl Node {
    pub fn start(config: QuicConfig, socket: UdpSocket) -> Node {
        let id = config.node_id;
        let t = Arc::new(QuicTransport::from_socket(config, socket).unwrap());
        let echo = Echo::new(id);
        t.serve(echo.clone()).unwrap();
        Node { t, echo }
    }

    pub async fn stop(&self) {
        self.t.shutdown().await;
    }
}

/// `n` nodes with ids 1..=n, certificates from one CA, all listing each other.
pub fn cluster(ca: &CaPem, n: usize) -> (Vec<Node>, BTreeMap<NodeId, SocketAddr>) {
    let socks = sockets(n);
    let peers: BTreeMap<NodeId, SocketAddr> =
        socks.iter().enumerate().map(|(i, (_, a))| (NodeId(i as u64 + 1), *a)).collect();
    let nodes = socks
        .into_iter()
        .enumerate()
        .map(|(i, (s, a))| {
            let id = i as u64 + 1;
            Node::start(config(id, a, &peers, pem_identity(ca, id)), s)
        })
        .collect();
    (nodes, peers)
}

pub fn ca() -> CaPem {
    highlander_quic::generate_ca(1).unwrap()
}

pub const T: Duration = Duration::from_secs(5);
