//! Hostile peers: garbage datagrams, oversized and undecodable frames, stream floods and a
//! wrong protocol version. These need a raw QUIC client with a member's certificate, so they
//! live inside the crate. Each runs on one thread so the log capture sees every line.

use crate::frame::{KIND_FRAME, KIND_SNAPSHOT, code};
use crate::{
    Identity, QuicConfig, QuicTransport, Timeouts, generate_ca, issue_node_cert, pki, tls,
};
use highlander_core::codec;
use highlander_core::wire::{Request, Response};
use highlander_core::{BoxFuture, NodeId, RequestHandler, Transport};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::fmt::MakeWriter;

/// Collects the log output of the current thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

impl Capture {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Warning lines that contain `needle`.
    fn warnings(&self, needle: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        text.lines().filter(|l| l.contains(" WARN ") && l.contains(needle)).count()
    }

    fn dump(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

struct Echo;

impl RequestHandler for Echo {
    fn handle(&self, _from: NodeId, request: Request) -> BoxFuture<'static, Response> {
        Box::pin(async move {
            match request {
                Request::Raft {
                    message: highlander_core::wire::RaftMessage::AppendEntries(p),
                    ..
                } => Response::Raft(p),
                _ => Response::Refused("echo answers appends only".into()),
            }
        })
    }
}

struct Cluster {
    configs: BTreeMap<NodeId, QuicConfig>,
    nodes: Vec<QuicTransport>,
}

/// Nodes 1 and 2 run; node 3 is a member whose identity the raw client borrows.
fn cluster(adjust: impl Fn(&mut QuicConfig)) -> Cluster {
    let ca = generate_ca(1).unwrap();
    let socks: Vec<(UdpSocket, SocketAddr)> = (0..3)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let a = s.local_addr().unwrap();
            (s, a)
        })
        .collect();
    let peers: BTreeMap<NodeId, SocketAddr> =
        socks.iter().enumerate().map(|(i, (_, a))| (NodeId(i as u64 + 1), *a)).collect();
    let mut configs = BTreeMap::new();
    let mut nodes = Vec::new();
    for (i, (socket, addr)) in socks.into_iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let cert = issue_node_cert(&ca.cert_pem, &ca.key_pem, id, &[], 1).unwrap();
        let identity = Identity::Pem {
            ca_cert: ca.cert_pem.clone(),
            node_cert: cert.cert_pem,
            node_key: cert.key_pem,
        };
        let mut config = QuicConfig::new(id, addr, peers.clone(), identity);
        config.timeouts = Timeouts {
            connect: Duration::from_secs(1),
            stream_idle: Duration::from_millis(500),
            ..Timeouts::default()
        };
        adjust(&mut config);
        configs.insert(id, config.clone());
        if id.0 <= 2 {
            let t = QuicTransport::from_socket(config, socket).unwrap();
            t.serve(Arc::new(Echo)).unwrap();
            nodes.push(t);
        }
    }
    Cluster { configs, nodes }
}

impl Cluster {
    fn addr(&self, id: u64) -> SocketAddr {
        self.configs[&NodeId(id)].peers[&NodeId(id)]
    }

    /// A raw QUIC client holding node 3's certificate, speaking `alpn`.
    fn raw_client(&self, alpn: Option<&[u8]>) -> (quinn::Endpoint, quinn::ClientConfig) {
        let identity = pki::load(&self.configs[&NodeId(3)]).unwrap();
        let crypto = match alpn {
            None => tls::client_crypto(&identity, identity.chain.clone(), identity.key.clone_key())
                .unwrap(),
            Some(alpn) => {
                let mut tls = rustls::ClientConfig::builder_with_provider(tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(identity.roots.clone())
                    .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                    .unwrap();
                tls.alpn_protocols = vec![alpn.to_vec()];
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()
            }
        };
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
    }

    async fn raw_connection(&self) -> (quinn::Endpoint, quinn::Connection) {
        let (endpoint, config) = self.raw_client(None);
        let conn = endpoint
            .connect_with(config, self.addr(1), &crate::node_name(NodeId(1)))
            .unwrap()
            .await
            .unwrap();
        (endpoint, conn)
    }

    async fn still_serving(&self) {
        let r = self.nodes[1].request(NodeId(1), append(b"still there?"), T).await;
        assert_eq!(r, Ok(Response::Raft(b"still there?"[..].into())));
    }

    async fn stop(self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}

const T: Duration = Duration::from_secs(5);

fn append(bytes: &[u8]) -> Request {
    Request::Raft {
        to: 1,
        message: highlander_core::wire::RaftMessage::AppendEntries(bytes.into()),
    }
}

/// Sends raw stream bytes and returns the stream error code the node answered with.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<quinn::VarInt> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match recv.read_to_end(1 << 20).await {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Some(code),
        _ => None,
    }
}

#[tokio::test]
async fn garbage_datagrams_are_dropped_and_logged_once() {
    let logs = Capture::default();
    let _guard = logs.install();
    let c = cluster(|_| {});
    c.still_serving().await;
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut long = vec![0xffu8; 1200];
    long[1..5].copy_from_slice(&0x1a2a_3a4au32.to_be_bytes());
    for i in 0..300u32 {
        let datagram: Vec<u8> = match i % 4 {
            0 => vec![0u8; 100],
            1 => b"hello, is this a QUIC endpoint?".to_vec(),
            2 => long.clone(),
            _ => vec![],
        };
        junk.send_to(&datagram, c.addr(1)).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.still_serving().await;
    assert_eq!(logs.warnings("not QUIC"), 1, "{}", logs.dump());
    eprintln!("{}", logs.dump());
    c.stop().await;
}

#[tokio::test]
async fn oversized_and_undecodable_frames_are_refused_and_logged_once() {
    let logs = Capture::default();
    let _guard = logs.install();
    let c = cluster(|_| {});
    let (endpoint, conn) = c.raw_connection().await;

    let mut undecodable = vec![KIND_FRAME, 0, 0, 0, 7];
    undecodable.extend_from_slice(&[0xff; 7]);
    let mut trailing = codec::encode(&append(b"x")).unwrap();
    trailing.push(0);
    let mut with_trailing = vec![KIND_FRAME];
    with_trailing.extend_from_slice(&(trailing.len() as u32).to_be_bytes());
    with_trailing.extend_from_slice(&trailing);
    for _ in 0..5 {
        // A frame claiming 4 GiB, and a snapshot claiming more than the snapshot cap.
        assert_eq!(
            send_raw(&conn, &[KIND_FRAME, 0xff, 0xff, 0xff, 0xff]).await,
            Some(code::TOO_LARGE)
        );
        assert_eq!(
            send_raw(&conn, &[KIND_SNAPSHOT, 0xff, 0xff, 0xff, 0xff]).await,
            Some(code::TOO_LARGE)
        );
        assert_eq!(send_raw(&conn, &undecodable).await, Some(code::PROTOCOL));
        assert_eq!(send_raw(&conn, &with_trailing).await, Some(code::PROTOCOL));
        assert_eq!(send_raw(&conn, &[0x7f, 0, 0, 0, 1, 0]).await, Some(code::PROTOCOL));
        // A frame cut short: the stream ends before its length.
        assert_eq!(send_raw(&conn, &[KIND_FRAME, 0, 0, 0, 9, 1, 2]).await, Some(code::PROTOCOL));
    }
    // The same connection still carries a good request.
    let body = codec::encode(&append(b"good")).unwrap();
    let mut frame = vec![KIND_FRAME];
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    let response: Response = codec::decode(&reply[4..]).unwrap();
    assert_eq!(response, Response::Raft(b"good"[..].into()));
    c.still_serving().await;

    assert_eq!(logs.warnings("longer than its limit"), 1, "{}", logs.dump());
    assert_eq!(logs.warnings("does not decode"), 1, "{}", logs.dump());
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    eprintln!("{}", logs.dump());
    c.stop().await;
}

#[tokio::test]
async fn a_stream_flood_is_bounded_and_the_node_keeps_serving() {
    let logs = Capture::default();
    let _guard = logs.install();
    let c = cluster(|config| {
        config.limits.max_streams_per_connection = 32;
        config.limits.max_requests_per_connection = 8;
    });
    let (endpoint, conn) = c.raw_connection().await;
    let mut held = Vec::new();
    let started = tokio::time::Instant::now();
    // Open streams without end, each with one byte of a request that never completes.
    while started.elapsed() < Duration::from_millis(300) {
        match tokio::time::timeout(Duration::from_millis(50), conn.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                let _ = send.write_all(&[KIND_FRAME]).await;
                held.push((send, recv));
            }
            Ok(Err(e)) => panic!("{e}"),
            // QUIC's stream limit makes the flooder wait.
            Err(_) => {}
        }
        // The node answers others meanwhile, and never serves more than its bound at once.
        assert!(c.nodes[0].inflight() <= 8);
    }
    assert!(held.len() <= 32 + 8, "opened {} streams", held.len());
    c.still_serving().await;
    // The stalled requests are dropped after `stream_idle`; the flooder gets its slots back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    c.still_serving().await;
    assert_eq!(logs.warnings("request slot"), 1, "{}", logs.dump());
    assert_eq!(logs.warnings("stalled"), 1, "{}", logs.dump());
    drop(held);
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    eprintln!("{}", logs.dump());
    c.stop().await;
}

#[tokio::test]
async fn another_protocol_version_is_refused_with_a_clear_line() {
    let logs = Capture::default();
    let _guard = logs.install();
    let c = cluster(|_| {});
    let (endpoint, config) = c.raw_client(Some(b"highlander/999"));
    for _ in 0..3 {
        let r = endpoint.connect_with(config.clone(), c.addr(1), &crate::node_name(NodeId(1)));
        let err = r.unwrap().await.unwrap_err();
        assert!(err.to_string().contains("error 120"), "{err}");
    }
    c.still_serving().await;
    assert_eq!(logs.warnings("another protocol version"), 1, "{}", logs.dump());
    let ours = format!("highlander/{}", highlander_core::wire::PROTOCOL_VERSION);
    assert_eq!(logs.warnings(&ours), 1, "{}", logs.dump());
    // Not `wait_idle`: after failed handshakes it waits out a 3 s drain.
    drop(endpoint);
    eprintln!("{}", logs.dump());
    c.stop().await;
}

#[tokio::test]
async fn a_renewed_cluster_secret_certificate_serves_new_connections() {
    let secret = crate::ClusterSecret::generate().unwrap();
    let c = cluster(|config| config.identity = Identity::ClusterSecret(secret.clone()));
    c.nodes[0].renew_now().unwrap();
    // Node 2 dials node 1 for the first time: node 1's renewed certificate is presented.
    c.still_serving().await;
    // Node 1 dials node 2 with its renewed client certificate.
    let r = c.nodes[0].request(NodeId(2), append(b"renewed"), T).await;
    assert_eq!(r, Ok(Response::Raft(b"renewed"[..].into())));
    assert!(
        QuicTransport::from_socket(
            c.configs[&NodeId(3)].clone(),
            UdpSocket::bind("127.0.0.1:0").unwrap()
        )
        .unwrap()
        .renew_now()
        .is_ok()
    );
    c.stop().await;
}

#[tokio::test]
async fn concurrent_requests_share_one_dial() {
    let c = cluster(|_| {});
    let t = &c.nodes[1];
    let calls = (0..100u32).map(|i| t.request(NodeId(1), append(&i.to_be_bytes()), T));
    for (i, r) in futures_join(calls).await.into_iter().enumerate() {
        assert_eq!(r, Ok(Response::Raft((i as u32).to_be_bytes()[..].into())));
    }
    assert_eq!(t.dials(), 1);
    c.stop().await;
}

/// Polls all futures to completion on this task (no extra dependency for `join_all`).
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.map(Box::pin).map(Some).collect();
    let mut out: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, result) in pending.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *result = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}
