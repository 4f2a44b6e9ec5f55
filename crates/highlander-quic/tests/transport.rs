//! The QUIC transport on loopback, through its public API only.

mod common;

use common::*;
use highlander_core::wire::{KeyQuery, RaftMessage, Request, Response};
use highlander_core::{NodeId, Payload, Transport, TransportError};
use highlander_quic::{
    ClusterSecret, ConfigError, Identity, QuicConfig, QuicError, QuicTransport, SecretError,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "highlander_quic=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_round_trip() {
    init_tracing();
    let ca = ca();
    let (nodes, _) = cluster(&ca, 3);
    for from in &nodes {
        for to in 1..=3u64 {
            let body = format!("{} to {to}", from.t.local_id());
            let resp = from.t.request(NodeId(to), append(body.as_bytes()), T).await.unwrap();
            assert_eq!(resp, Response::Raft(Payload::from(body.as_bytes())));
        }
    }
    // Each handler saw one request from every node, under the id its certificate names.
    for node in &nodes {
        let mut from: Vec<u64> = node.echo.seen().iter().map(|(f, _)| f.0).collect();
        from.sort();
        assert_eq!(from, vec![1, 2, 3]);
    }
    // Many concurrent requests share one connection (one dial).
    let t = nodes[0].t.clone();
    let calls = (0..200u32).map(|i| {
        let t = t.clone();
        tokio::spawn(async move {
            let req = Request::Raft {
                to: 1,
                message: RaftMessage::Vote(Payload::from(i.to_be_bytes().to_vec())),
            };
            (i, t.request(NodeId(2), req, T).await)
        })
    });
    for call in calls {
        let (i, resp) = call.await.unwrap();
        assert_eq!(resp.unwrap(), Response::Raft(Payload::from(i.to_be_bytes().to_vec())));
    }
    assert!(matches!(
        nodes[1].t.request(NodeId(3), Request::Status(KeyQuery::default()), T).await.unwrap(),
        Response::Status(r) if r.node == Some(NodeId(3))
    ));
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_peer_closed_and_serve_twice() {
    init_tracing();
    let ca = ca();
    let (nodes, _) = cluster(&ca, 2);
    let t = &nodes[0].t;
    assert_eq!(
        t.request(NodeId(99), append(b"x"), T).await,
        Err(TransportError::UnknownPeer(NodeId(99)))
    );
    assert!(matches!(t.serve(Echo::new(NodeId(1))), Err(TransportError::Unreachable { .. })));
    t.shutdown().await;
    assert_eq!(t.request(NodeId(2), append(b"x"), T).await, Err(TransportError::Closed));
    assert_eq!(t.serve(Echo::new(NodeId(1))), Err(TransportError::Closed));
    t.shutdown().await; // idempotent
    // The other node now finds node 1 gone: refused or unreachable, never a hang.
    let r = nodes[1].t.request(NodeId(1), append(b"x"), Duration::from_secs(3)).await;
    assert!(
        matches!(r, Err(TransportError::Unreachable { .. } | TransportError::Timeout)),
        "{r:?}"
    );
    nodes[1].stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_fire() {
    init_tracing();
    let ca = ca();
    let mut socks = sockets(3);
    // Node 3's socket stays bound but nothing serves on it: a peer that is down.
    let (silent, silent_addr) = socks.pop().unwrap();
    let peers: BTreeMap<_, _> =
        [(NodeId(1), socks[0].1), (NodeId(2), socks[1].1), (NodeId(3), silent_addr)].into();
    let mut it = socks.into_iter();
    let (s1, a1) = it.next().unwrap();
    let (s2, a2) = it.next().unwrap();
    let n1 = Node::start(config(1, a1, &peers, pem_identity(&ca, 1)), s1);
    let n2 = Node::start(config(2, a2, &peers, pem_identity(&ca, 2)), s2);

    // A slow handler: the caller's timeout fires, the connection stays usable.
    let started = Instant::now();
    let r = n1.t.request(NodeId(2), slow(2_000), Duration::from_millis(200)).await;
    assert_eq!(r, Err(TransportError::Timeout));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(1_500), "{took:?}");
    assert!(n1.t.request(NodeId(2), slow(10), T).await.is_ok());

    // A silent peer: the dial outlives a short request timeout...
    let r = n1.t.request(NodeId(3), append(b"x"), Duration::from_millis(200)).await;
    assert_eq!(r, Err(TransportError::Timeout));
    // ...then fails after `timeouts.connect` (1 s); after that callers fail fast while the
    // transport backs off, instead of each waiting for a handshake.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let started = Instant::now();
    let r = n1.t.request(NodeId(3), append(b"x"), T).await;
    assert!(
        matches!(&r, Err(TransportError::Unreachable { peer, .. }) if *peer == NodeId(3)),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1_500), "{:?}", started.elapsed());
    drop(silent);
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_a_peer_is_rebound_at_the_same_address() {
    init_tracing();
    let ca = ca();
    let (mut nodes, peers) = cluster(&ca, 2);
    let n1 = nodes.remove(0);
    let n2 = nodes.remove(0);
    assert!(n1.t.request(NodeId(2), append(b"before"), T).await.is_ok());

    // Node 2 goes away (its transport dropped, as in a crash of the process) ...
    let addr2 = n2.t.local_addr();
    drop(n2);
    let r = n1.t.request(NodeId(2), append(b"during"), Duration::from_millis(500)).await;
    assert!(r.is_err(), "{r:?}");

    // ... and comes back on the same address, with the same identity.
    let deadline = Instant::now() + Duration::from_secs(5);
    let socket = loop {
        match std::net::UdpSocket::bind(addr2) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebind {addr2}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot rebind {addr2}: {e}"),
        }
    };
    let back = Node::start(config(2, addr2, &peers, pem_identity(&ca, 2)), socket);
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match n1.t.request(NodeId(2), append(b"after"), Duration::from_millis(500)).await {
            Ok(r) => {
                assert_eq!(r, Response::Raft(Payload::from(&b"after"[..])));
                break;
            }
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(5), "no reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    eprintln!("reconnected after {:?} and {attempts} attempts", started.elapsed());
    // And the restarted node reaches node 1 too.
    assert!(back.t.request(NodeId(1), append(b"hello"), T).await.is_ok());
    n1.stop().await;
    back.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_sized_payloads_arrive_intact() {
    init_tracing();
    let ca = ca();
    let (nodes, _) = cluster(&ca, 2);
    let data: Vec<u8> =
        (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let expected = digest(&data);
    let snapshot = Request::Raft { to: 7, message: RaftMessage::Snapshot(Payload::from(data)) };
    let t = nodes[0].t.clone();
    let started = Instant::now();
    let big =
        tokio::spawn(async move { t.request(NodeId(2), snapshot, Duration::from_secs(60)).await });
    // Small requests keep flowing beside the snapshot.
    for i in 0..20u32 {
        let r = nodes[0].t.request(NodeId(2), append(&i.to_be_bytes()), T).await.unwrap();
        assert_eq!(r, Response::Raft(Payload::from(i.to_be_bytes().to_vec())));
    }
    let r = big.await.unwrap().unwrap();
    eprintln!("20 MiB snapshot took {:?}", started.elapsed());
    assert_eq!(r, Response::Raft(Payload::from(expected)));
    assert!(nodes[1].echo.seen().contains(&(NodeId(1), "snapshot")));

    // A request frame over the limit is refused locally, before anything is sent.
    let huge = append(&vec![0u8; highlander_core::codec::MAX_FRAME_BYTES]);
    let r = nodes[0].t.request(NodeId(2), huge, T).await;
    assert!(matches!(r, Err(TransportError::Codec(_))), "{r:?}");
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_impostors_and_wrong_addresses_are_refused() {
    init_tracing();
    let ca = ca();
    let (good, peers) = cluster(&ca, 3);

    // A node whose certificate comes from another CA, claiming to be node 3.
    let other_ca = highlander_quic::generate_ca(1).unwrap();
    let (s, a) = sockets(1).pop().unwrap();
    let mut their = peers.clone();
    their.insert(NodeId(3), a);
    let stranger = Node::start(config(3, a, &their, pem_identity(&other_ca, 3)), s);

    // A node with a valid certificate whose id is not in the good nodes' peer list.
    let (s, a) = sockets(1).pop().unwrap();
    let mut their = peers.clone();
    their.insert(NodeId(9), a);
    let outsider = Node::start(config(9, a, &their, pem_identity(&ca, 9)), s);

    // A second node-3 process whose peer list swaps the addresses of nodes 1 and 2.
    let (s, a) = sockets(1).pop().unwrap();
    let swapped: BTreeMap<_, _> =
        [(NodeId(1), peers[&NodeId(2)]), (NodeId(2), peers[&NodeId(1)]), (NodeId(3), a)].into();
    let confused = Node::start(config(3, a, &swapped, pem_identity(&ca, 3)), s);

    let short = Duration::from_secs(2);
    for (who, node, to) in [
        ("stranger", &stranger, 1),
        ("stranger", &stranger, 2),
        ("outsider", &outsider, 1),
        ("outsider", &outsider, 2),
        ("confused", &confused, 1),
        ("confused", &confused, 2),
    ] {
        let r = node.t.request(NodeId(to), append(b"let me in"), short).await;
        eprintln!("{who} -> {to}: {r:?}");
        assert!(matches!(r, Err(TransportError::Unreachable { .. })), "{who} -> {to}: {r:?}");
    }
    // The good nodes never served any of it, and refuse to dial outsiders.
    for n in &good {
        assert!(n.echo.seen().is_empty(), "{:?}", n.echo.seen());
    }
    assert_eq!(
        good[0].t.request(NodeId(9), append(b"x"), T).await,
        Err(TransportError::UnknownPeer(NodeId(9)))
    );
    // The real node 3 is unaffected by its impostors.
    let r = good[0].t.request(NodeId(3), append(b"x"), T).await;
    assert!(r.is_ok(), "{r:?}");
    // The good nodes keep working with each other.
    for from in &good {
        for to in 1..=3 {
            assert!(from.t.request(NodeId(to), append(b"ok"), T).await.is_ok());
        }
    }
    for n in good.iter().chain([&stranger, &outsider, &confused]) {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_secret_mode() {
    init_tracing();
    let secret = ClusterSecret::generate().unwrap();
    let other = ClusterSecret::generate().unwrap();
    let socks = sockets(3);
    let peers: BTreeMap<_, _> =
        socks.iter().enumerate().map(|(i, (_, a))| (NodeId(i as u64 + 1), *a)).collect();
    let mut nodes = Vec::new();
    for (i, (s, a)) in socks.into_iter().enumerate() {
        let id = i as u64 + 1;
        // Node 3 got the wrong secret.
        let s_for =
            if id == 3 { other.clone() } else { ClusterSecret::new(secret.expose()).unwrap() };
        nodes.push(Node::start(config(id, a, &peers, Identity::ClusterSecret(s_for)), s));
    }
    let r = nodes[0].t.request(NodeId(2), append(b"same secret"), T).await;
    assert_eq!(r, Ok(Response::Raft(Payload::from(&b"same secret"[..]))));
    assert!(nodes[1].t.request(NodeId(1), append(b"back"), T).await.is_ok());
    for (from, to) in [(0, 3), (2, 1), (2, 2)] {
        let r = nodes[from].t.request(NodeId(to), append(b"x"), Duration::from_secs(2)).await;
        assert!(matches!(r, Err(TransportError::Unreachable { .. })), "{from}->{to}: {r:?}");
    }
    assert!(nodes[2].echo.seen().is_empty());
    assert!(nodes[0].echo.seen().iter().all(|(f, _)| *f == NodeId(2)));

    // A short secret is refused when the configuration is made, saying why.
    let err = ClusterSecret::new("correct horse battery staple").unwrap_err();
    assert!(matches!(err, SecretError::TooShort { len: 28, min: 43 }));
    assert!(err.to_string().contains("at least 43"), "{err}");
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_name_the_field() {
    init_tracing();
    let ca = ca();
    let a: std::net::SocketAddr = "127.0.0.1:7001".parse().unwrap();
    let b: std::net::SocketAddr = "127.0.0.1:7002".parse().unwrap();
    let peers: BTreeMap<_, _> = [(NodeId(1), a), (NodeId(2), b)].into();
    let check = |c: QuicConfig| match QuicTransport::bind(c) {
        Err(QuicError::Config(e)) => e,
        other => panic!("expected a config error, got {other:?}"),
    };

    let mut c = config(3, a, &peers, pem_identity(&ca, 3));
    assert!(matches!(check(c.clone()), ConfigError::OwnIdMissing(NodeId(3))));
    c.peers.insert(NodeId(3), a);
    let e = check(c);
    assert!(e.to_string().starts_with("peers.n3:"), "{e}");

    let mut c = config(1, a, &peers, pem_identity(&ca, 1));
    c.timeouts.keep_alive = c.timeouts.idle;
    assert!(check(c).to_string().starts_with("timeouts.keep_alive:"));

    // A certificate for another node.
    let c = config(1, "127.0.0.1:0".parse().unwrap(), &peers, pem_identity(&ca, 2));
    let e = check(c).to_string();
    assert!(e.starts_with("identity.node_cert:") && e.contains("for node n2"), "{e}");

    // A certificate from another CA than the one configured.
    let Identity::Pem { node_cert, node_key, .. } =
        pem_identity(&highlander_quic::generate_ca(1).unwrap(), 1)
    else {
        unreachable!()
    };
    let id = Identity::Pem { ca_cert: ca.cert_pem.clone(), node_cert, node_key };
    let e = check(config(1, "127.0.0.1:0".parse().unwrap(), &peers, id)).to_string();
    assert!(e.starts_with("identity.node_cert:") && e.contains("not accepted by the CA"), "{e}");

    // A key that does not belong to the certificate.
    let Identity::Pem { node_cert, .. } = pem_identity(&ca, 1) else { unreachable!() };
    let Identity::Pem { node_key, .. } = pem_identity(&ca, 1) else { unreachable!() };
    let id = Identity::Pem { ca_cert: ca.cert_pem.clone(), node_cert, node_key };
    let e = check(config(1, "127.0.0.1:0".parse().unwrap(), &peers, id)).to_string();
    assert!(e.starts_with("identity.node_key:"), "{e}");

    // Files that do not exist.
    let id = Identity::PemFiles {
        ca_cert: "/nonexistent/ca.pem".into(),
        node_cert: "/nonexistent/node.pem".into(),
        node_key: "/nonexistent/node.key".into(),
    };
    let e = check(config(1, "127.0.0.1:0".parse().unwrap(), &peers, id)).to_string();
    assert!(e.starts_with("identity.ca_cert: /nonexistent/ca.pem: cannot read"), "{e}");

    // PEM files written by the `certs` functions work.
    let dir = std::env::temp_dir().join(format!("highlander-quic-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let node =
        highlander_quic::issue_node_cert(&ca.cert_pem, &ca.key_pem, NodeId(1), &[], 1).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("node.pem"), &node.cert_pem).unwrap();
    std::fs::write(dir.join("node.key"), &node.key_pem).unwrap();
    let id = Identity::PemFiles {
        ca_cert: dir.join("ca.pem"),
        node_cert: dir.join("node.pem"),
        node_key: dir.join("node.key"),
    };
    let t = QuicTransport::bind(config(1, "127.0.0.1:0".parse().unwrap(), &peers, id)).unwrap();
    t.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();

    // Outside a runtime: an error, not a panic.
    let c = config(1, "127.0.0.1:0".parse().unwrap(), &peers, pem_identity(&ca, 1));
    let r = std::thread::spawn(move || QuicTransport::bind(c).map(|_| ())).join().unwrap();
    assert!(matches!(r, Err(QuicError::NoRuntime)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_requests_in_flight_then_refuses() {
    init_tracing();
    let ca = ca();
    let (nodes, _) = cluster(&ca, 2);
    let t1 = nodes[0].t.clone();
    // Node 2 is busy with a 600 ms request when it is told to shut down.
    let slow_call = tokio::spawn(async move { t1.request(NodeId(2), slow(600), T).await });
    while !nodes[1].echo.seen().contains(&(NodeId(1), "keepalive")) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let t2 = nodes[1].t.clone();
    let stopping = tokio::spawn(async move { t2.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // New work is refused while it drains ...
    let r = nodes[0].t.request(NodeId(2), append(b"late"), Duration::from_secs(2)).await;
    assert!(matches!(r, Err(TransportError::Unreachable { .. })), "{r:?}");
    assert_eq!(nodes[1].t.request(NodeId(1), append(b"x"), T).await, Err(TransportError::Closed));
    // ... but the request it had accepted is answered.
    let answer = slow_call.await.unwrap();
    assert!(matches!(answer, Ok(Response::KeepAlive(_))), "{answer:?}");
    stopping.await.unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400) && took < Duration::from_secs(3), "{took:?}");
    nodes[0].stop().await;
}
