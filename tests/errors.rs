//! Bad input gets a typed error and loses nothing.

mod common;

use common::init_tracing;
use highlander::{ConfigError, Error, KeyError, Limits, MemStorage, Node, NodeId, Timing};
use highlander_sim::{SimCluster, SimNetwork};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

fn tight_limits() -> Limits {
    Limits {
        max_payload_bytes: 1024,
        max_messages_per_key: 5,
        max_bytes_per_key: 4096,
        max_total_bytes: 16 * 1024,
        ..Limits::STANDARD
    }
}

#[tokio::test(start_paused = true)]
async fn full_queue_and_oversized_payload_are_refused_and_nothing_is_lost() {
    init_tracing();
    // The consumer waits for a go signal, so messages pile up.
    let go = Arc::new(Notify::new());
    let started = Arc::new(AtomicBool::new(false));
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (g, r, st) = (go.clone(), received.clone(), started.clone());
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(31)
        .limits(tight_limits())
        .setup(move |node| {
            let (g, r, st) = (g.clone(), r.clone(), st.clone());
            async move {
                node.singleton("q", move |mut ctx| {
                    let (g, r, st) = (g.clone(), r.clone(), st.clone());
                    async move {
                        st.store(true, Ordering::SeqCst);
                        g.notified().await;
                        while let Some(m) = ctx.recv().await {
                            r.lock().unwrap().push(m.payload.as_bytes().to_vec());
                        }
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |_| started.load(Ordering::SeqCst)).await.unwrap();

    for i in 0..5 {
        sim.send(1, "q", format!("m{i}")).await.unwrap();
    }
    match sim.send(2, "q", "one too many").await {
        Err(Error::QueueFull { key }) => assert_eq!(key.as_str(), "q"),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    match sim.node(3).send("q", vec![0u8; 1025]).await {
        Err(Error::PayloadTooLarge { size: 1025, max: 1024 }) => {}
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let queued = sim.status().unwrap().keys.iter().find(|k| k.key.as_str() == "q").unwrap().queued;
    assert_eq!(queued, 5, "the refused sends queued nothing");

    go.notify_one();
    sim.wait_until(Duration::from_secs(2), |_| received.lock().unwrap().len() == 5).await.unwrap();
    let got: Vec<String> =
        received.lock().unwrap().iter().map(|p| String::from_utf8(p.clone()).unwrap()).collect();
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"]);
    // Space again once acknowledged.
    sim.run_for(Duration::from_millis(100)).await;
    sim.send(2, "q", "now it fits").await.unwrap();
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn the_store_wide_byte_limit_is_enforced() {
    init_tracing();
    let limits = Limits {
        max_payload_bytes: 1000,
        max_messages_per_key: 100,
        max_bytes_per_key: 3000,
        max_total_bytes: 5000,
        ..Limits::STANDARD
    };
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(32)
        .limits(limits)
        .setup(|node| async move {
            for k in ["a", "b"] {
                node.singleton(k, |ctx| async move { ctx.cancelled().await }).await?;
            }
            Ok(())
        })
        .build()
        .await
        .unwrap();
    for _ in 0..3 {
        sim.send(1, "a", vec![1u8; 1000]).await.unwrap();
    }
    sim.send(1, "b", vec![1u8; 1000]).await.unwrap();
    sim.send(1, "b", vec![1u8; 1000]).await.unwrap();
    assert_eq!(sim.send(1, "b", vec![1u8; 1]).await, Err(Error::StoreFull));
    assert_eq!(
        sim.send(1, "a", vec![1u8; 1]).await,
        Err(Error::QueueFull { key: "a".try_into().unwrap() })
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_and_unknown_keys_are_typed_errors() {
    init_tracing();
    let sim = SimCluster::builder().nodes(3).seed(33).build().await.unwrap();
    let node = sim.node(1);
    assert_eq!(node.send("", "x").await, Err(Error::InvalidKey(KeyError::Empty)));
    assert_eq!(
        node.send("k".repeat(257), "x").await,
        Err(Error::InvalidKey(KeyError::TooLong(257)))
    );
    assert_eq!(node.singleton("", |_ctx| async {}).await, Err(Error::InvalidKey(KeyError::Empty)));
    match node.send("nobody-runs-this", "x").await {
        Err(Error::NoSuchKey { key }) => assert_eq!(key.as_str(), "nobody-runs-this"),
        other => panic!("expected NoSuchKey, got {other:?}"),
    }
    node.singleton("dup", |ctx| async move { ctx.cancelled().await }).await.unwrap();
    assert!(matches!(
        node.singleton("dup", |ctx| async move { ctx.cancelled().await }).await,
        Err(Error::AlreadyRegistered { .. })
    ));
    assert!(matches!(
        sim.node(2).exclusive("dup", 2, |ctx| async move { ctx.cancelled().await }).await,
        Err(Error::SpecConflict { .. })
    ));
    assert!(matches!(
        node.exclusive("zero", 0, |ctx| async move { ctx.cancelled().await }).await,
        Err(Error::Rejected(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn bad_configuration_is_refused_with_a_reason() {
    init_tracing();
    let net = SimNetwork::new(1);
    let start = |b: highlander::NodeBuilder| async move { b.start().await.map(|_| ()) };

    let missing_id = Node::builder().peers([1, 2, 3]).transport(net.transport(NodeId(1)));
    assert_eq!(start(missing_id).await, Err(Error::Config(ConfigError::MissingId)));

    let unknown_id = Node::builder().id(7).peers([1, 2, 3]).transport(net.transport(NodeId(7)));
    assert_eq!(start(unknown_id).await, Err(Error::Config(ConfigError::OwnIdMissing(NodeId(7)))));

    let dup = Node::builder().id(1).peers([1, 2, 2]).transport(net.transport(NodeId(1)));
    assert_eq!(start(dup).await, Err(Error::Config(ConfigError::DuplicatePeer(NodeId(2)))));

    let none = Node::builder().id(1).peers(Vec::<u64>::new()).transport(net.transport(NodeId(1)));
    assert_eq!(start(none).await, Err(Error::Config(ConfigError::NoPeers)));

    let no_transport = Node::builder().id(1).peers([1]);
    assert_eq!(start(no_transport).await, Err(Error::Config(ConfigError::MissingTransport)));

    let mismatch = Node::builder().id(1).peers([1, 2]).transport(net.transport(NodeId(2)));
    assert_eq!(
        start(mismatch).await,
        Err(Error::Config(ConfigError::TransportMismatch {
            transport: NodeId(2),
            node: NodeId(1)
        }))
    );

    let unsafe_ttl = Timing {
        session_ttl: Duration::from_millis(900),
        keepalive_interval: Duration::from_millis(300),
        ..Timing::default()
    };
    match start(
        Node::builder().id(1).peers([1]).transport(net.transport(NodeId(1))).timing(unsafe_ttl),
    )
    .await
    {
        Err(Error::Config(ConfigError::Timing(e))) => {
            let text = e.to_string();
            assert!(text.contains("session_ttl (900 ms) is too short"), "{text}");
        }
        other => panic!("expected a timing error, got {other:?}"),
    }

    let bad_limits = Limits { max_payload_bytes: 0, ..Limits::default() };
    match start(
        Node::builder().id(1).peers([1]).transport(net.transport(NodeId(1))).limits(bad_limits),
    )
    .await
    {
        Err(Error::Config(ConfigError::Limits(_))) => {}
        other => panic!("expected a limits error, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_with_different_limits_cannot_join() {
    init_tracing();
    let net = SimNetwork::new(2);
    let peers = [1u64, 2, 3];
    let disks: Vec<MemStorage> = (0..3).map(|_| MemStorage::new()).collect();
    let start = |id: u64, limits: Limits| {
        let net = net.clone();
        let disk = disks[id as usize - 1].clone();
        async move {
            Node::builder()
                .id(id)
                .peers(peers)
                .transport(net.transport(NodeId(id)))
                .limits(limits)
                .storage(disk)
                .start()
                .await
                .unwrap()
        }
    };
    // The first session adopts the cluster's limits: form the cluster with agreeing nodes.
    let mut nodes = Vec::new();
    for id in peers {
        nodes.push(start(id, Limits::default()).await);
    }
    for n in &nodes {
        n.ready(Duration::from_secs(30)).await.unwrap();
    }
    // Node 3 comes back (same storage) configured with other limits.
    nodes.pop().unwrap().shutdown().await;
    nodes.push(start(3, tight_limits()).await);
    match nodes[2].ready(Duration::from_secs(30)).await {
        Err(Error::Config(ConfigError::LimitsMismatch { cluster })) => {
            assert_eq!(cluster, Limits::default())
        }
        other => panic!("expected LimitsMismatch, got {other:?}"),
    }
    assert!(matches!(
        nodes[2].send("k", "x").await,
        Err(Error::Config(ConfigError::LimitsMismatch { .. }))
    ));
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_node_without_a_quorum_says_so_instead_of_sending() {
    init_tracing();
    let net = SimNetwork::new(3);
    // Only one of three nodes is up: it can never open a session.
    let node = Node::builder()
        .id(1)
        .peers([1, 2, 3])
        .transport(net.transport(NodeId(1)))
        .start()
        .await
        .unwrap();
    match node.send("k", "x").await {
        Err(Error::Unavailable(reason)) => assert!(reason.contains("quorum"), "{reason}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    node.shutdown().await;
}
