//! The QUIC transport under network faults in virtual time: quinn runs over turmoil's
//! simulated UDP (no real sockets), each host on its own paused tokio runtime, so seconds of
//! partitions and idle timeouts cost milliseconds of wall time.

mod common;

use common::{Echo, append};
use highlander_core::wire::Response;
use highlander_core::{NodeId, Payload, Transport, TransportError};
use highlander_quic::{CaPem, Identity, QuicConfig, QuicTransport, Timeouts};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

const PORT: u16 = 7000;

/// quinn's socket trait over a turmoil UDP socket (turmoil has only async and `try_` calls,
/// so the pending `readable()` future is kept between polls).
struct TurmoilUdp {
    sock: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<Readable>>,
}

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

impl std::fmt::Debug for TurmoilUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TurmoilUdp")
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for TurmoilUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.sock.try_send_to(transmit.contents, transmit.destination).map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut readable = self.readable.lock().unwrap();
        loop {
            let sock = self.sock.clone();
            let fut =
                readable.get_or_insert_with(|| Box::pin(async move { sock.readable().await }));
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    *readable = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => *readable = None,
            }
            match self.sock.try_recv_from(&mut bufs[0]) {
                Ok((len, addr)) => {
                    meta[0] = RecvMeta { addr, len, stride: len, ecn: None, dst_ip: None };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(1),
        idle: Duration::from_secs(2),
        keep_alive: Duration::from_millis(500),
        stream_idle: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        drain: Duration::from_secs(1),
    }
}

/// Binds node `id` (host `n<id>`) inside the simulation.
async fn start_node(
    id: u64,
    identity: Identity,
) -> Result<QuicTransport, Box<dyn std::error::Error>> {
    let peers: BTreeMap<NodeId, SocketAddr> = (1..=3)
        .map(|n| (NodeId(n), SocketAddr::new(turmoil::lookup(format!("n{n}")), PORT)))
        .collect();
    let listen = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT);
    let sock = turmoil::net::UdpSocket::bind(listen).await?;
    let sock = Arc::new(TurmoilUdp { sock: Arc::new(sock), readable: Mutex::new(None) });
    let mut config = QuicConfig::new(NodeId(id), listen, peers, identity);
    config.timeouts = timeouts();
    // A fixed seed per node makes quinn's choices repeat from run to run.
    let t = QuicTransport::with_socket(config, sock, Some([id as u8; 32]))?;
    t.serve(Echo::new(NodeId(id)))?;
    Ok(t)
}

/// Asks the test loop outside the simulation to inject fault `k`, and waits until it has.
struct Faults {
    want: Arc<AtomicU32>,
    done: Arc<AtomicU32>,
}

impl Faults {
    async fn inject(&self, k: u32) {
        self.want.store(k, Ordering::SeqCst);
        while self.done.load(Ordering::SeqCst) < k {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The scenario, as seen from node 1. Returns a trace of virtual timings.
async fn scenario(
    identity: Identity,
    faults: Faults,
) -> Result<Vec<(String, u64)>, Box<dyn std::error::Error>> {
    let t = start_node(1, identity).await?;
    let mut trace = Vec::new();
    let n2 = NodeId(2);
    let n3 = NodeId(3);
    let long = Duration::from_secs(5);

    // Healthy: both peers answer.
    let start = Instant::now();
    for to in [n2, n3] {
        let r = t.request(to, append(b"hello"), long).await?;
        assert_eq!(r, Response::Raft(Payload::from(&b"hello"[..])));
    }
    trace.push(("connect both".into(), ms(start.elapsed())));

    // Partition n1 | n2: the request's own timeout fires, on time; n3 is unaffected.
    faults.inject(1).await;
    let start = Instant::now();
    let r = t.request(n2, append(b"lost"), Duration::from_millis(300)).await;
    assert_eq!(r, Err(TransportError::Timeout));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(310), "{took:?}");
    assert!(t.request(n3, append(b"fine"), long).await.is_ok());
    // Once the idle timeout has declared the connection dead, callers fail fast instead of
    // each waiting out its timeout.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let start = Instant::now();
    let mut fast_failures = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let asked = Instant::now();
        match t.request(n2, append(b"lost"), Duration::from_millis(300)).await {
            Err(TransportError::Unreachable { .. })
                if asked.elapsed() < Duration::from_millis(5) =>
            {
                fast_failures += 1;
            }
            Err(_) => {}
            Ok(r) => panic!("answered through a partition: {r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(fast_failures > 10, "only {fast_failures} fast failures");
    trace.push(("fast failures".into(), fast_failures));

    // Heal: a new connection within the back-off bound plus a handshake.
    faults.inject(2).await;
    let start = Instant::now();
    loop {
        match t.request(n2, append(b"back"), Duration::from_millis(300)).await {
            Ok(_) => break,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(2), "no reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let healed = start.elapsed();
    // At worst a dial begun during the partition runs out its connect timeout (1 s), then
    // one back-off (at most 500 ms) and a handshake.
    assert!(healed < Duration::from_millis(1_600), "{healed:?}");
    trace.push(("reconnect after heal".into(), ms(healed)));

    // A lossy link to n3: QUIC retransmits, every request gets through.
    faults.inject(3).await;
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..30u32 {
        let asked = Instant::now();
        let r = t.request(n3, append(&i.to_be_bytes()), long).await?;
        assert_eq!(r, Response::Raft(Payload::from(i.to_be_bytes().to_vec())));
        slowest = slowest.max(asked.elapsed());
    }
    trace.push(("30 requests over a lossy link".into(), ms(start.elapsed())));
    trace.push(("slowest of them".into(), ms(slowest)));
    faults.inject(4).await;

    // n2 crashes and restarts on the same address: its stateless reset (same keys) ends our
    // old connection at once, not after the idle timeout, and the next request redials.
    assert!(t.request(n2, append(b"before"), long).await.is_ok());
    faults.inject(5).await;
    let start = Instant::now();
    let r = t.request(n2, append(b"after crash"), long).await;
    let noticed = start.elapsed();
    match &r {
        Err(TransportError::Unreachable { reason, .. }) if reason.contains("reset") => {}
        other => panic!("expected a stateless reset, got {other:?}"),
    }
    assert!(noticed < Duration::from_millis(200), "noticed after {noticed:?}");
    trace.push(("restart noticed".into(), ms(noticed)));
    let start = Instant::now();
    let r = t.request(n2, append(b"again"), long).await?;
    assert_eq!(r, Response::Raft(Payload::from(&b"again"[..])));
    trace.push(("reconnect after restart".into(), ms(start.elapsed())));

    t.shutdown().await;
    Ok(trace)
}

fn run_once(ca: &CaPem, seed: u64) -> Vec<(String, u64)> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        // Links broken at random (the lossy phase) heal this often per tick.
        .repair_rate(0.3)
        .build();
    let identity = |id: u64| {
        let node = highlander_quic::issue_node_cert(&ca.cert_pem, &ca.key_pem, NodeId(id), &[], 1)
            .unwrap();
        Identity::Pem {
            ca_cert: ca.cert_pem.clone(),
            node_cert: node.cert_pem,
            node_key: node.key_pem,
        }
    };
    for id in [2u64, 3] {
        let identity = identity(id);
        sim.host(format!("n{id}"), move || {
            let identity = identity.clone();
            async move {
                let _t = start_node(id, identity).await?;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let want = Arc::new(AtomicU32::new(0));
    let done = Arc::new(AtomicU32::new(0));
    let trace = Arc::new(Mutex::new(Vec::new()));
    {
        let faults = Faults { want: want.clone(), done: done.clone() };
        let identity = identity(1);
        let trace = trace.clone();
        sim.client("n1", async move {
            *trace.lock().unwrap() = scenario(identity, faults).await?;
            Ok(())
        });
    }
    loop {
        let finished = sim.step().unwrap();
        let k = want.load(Ordering::SeqCst);
        if k > done.load(Ordering::SeqCst) {
            match k {
                1 => sim.partition("n1", "n2"),
                2 => sim.repair("n1", "n2"),
                3 => sim.set_link_fail_rate("n1", "n3", 0.1),
                4 => {
                    sim.set_link_fail_rate("n1", "n3", 0.0);
                    sim.repair("n1", "n3");
                }
                5 => {
                    sim.crash("n2");
                    sim.bounce("n2");
                }
                _ => unreachable!(),
            }
            done.store(k, Ordering::SeqCst);
        }
        if finished {
            break;
        }
    }
    trace.lock().unwrap().clone()
}

#[test]
fn partitions_loss_and_restarts_in_virtual_time() {
    let ca = highlander_quic::generate_ca(1).unwrap();
    let wall = std::time::Instant::now();
    let first = run_once(&ca, 7);
    eprintln!("trace: {first:?} ({:?} wall)", wall.elapsed());
    assert_eq!(first.len(), 7, "{first:?}");
    // Same seeds, same virtual timings.
    let second = run_once(&ca, 7);
    assert_eq!(first, second);
    eprintln!("two runs in {:?} wall", wall.elapsed());
}
