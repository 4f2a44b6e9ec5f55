//! A node on a real data directory remembers across restarts; operators can check and dump
//! the directory, but not while a node holds it.

use highlander::{Error, Node, NodeId};
use highlander_sim::SimNetwork;
use std::time::Duration;

async fn start(dir: &std::path::Path, net: &SimNetwork) -> Node {
    let node = Node::builder()
        .id(1)
        .peers([1])
        .transport(net.transport(NodeId(1)))
        .data_dir(dir)
        .start()
        .await
        .expect("node starts");
    node.ready(Duration::from_secs(10)).await.expect("a one-node cluster is its own quorum");
    // Registered but never consuming: messages stay queued.
    node.singleton("inbox", |ctx| async move { ctx.cancelled().await }).await.unwrap();
    node
}

fn owner_token(node: &Node) -> Option<highlander::Token> {
    let key = node.status().keys.into_iter().find(|k| k.key.as_str() == "inbox")?;
    key.owners[0].map(|o| o.token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_data_dir_remembers_and_operators_can_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let net = SimNetwork::new(9);
    let node = start(dir.path(), &net).await;
    for i in 0..25 {
        node.send("inbox", format!("message {i}")).await.unwrap();
    }
    let wait_owned = |node: Node| async move {
        for _ in 0..500 {
            if let Some(t) = owner_token(&node) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never owned");
    };
    let first = wait_owned(node.clone()).await;

    // The directory is locked while the node runs.
    match highlander::verify_data_dir(dir.path()) {
        Err(Error::Storage(e)) => assert!(e.contains("lock"), "{e}"),
        other => panic!("expected a lock error, got {other:?}"),
    }
    node.shutdown().await;

    let report = highlander::verify_data_dir(dir.path()).unwrap();
    assert!(report.healthy, "{report:?}");
    assert!(report.records > 0 && report.last.is_some(), "{report:?}");
    let entries = highlander::dump_data_dir(dir.path(), 0, 10_000).unwrap();
    let text: Vec<String> = entries.iter().flat_map(|e| e.content.clone()).collect();
    assert!(text.iter().any(|c| c.contains("Send") && c.contains("inbox")), "{text:?}");
    assert!(text.iter().any(|c| c.contains("membership")), "{text:?}");

    // Started again on the same directory: the queue is still there, the token is larger.
    let node = start(dir.path(), &SimNetwork::new(10)).await;
    let second = wait_owned(node.clone()).await;
    assert!(second > first, "{second} > {first}");
    let queued = node.status().keys.iter().find(|k| k.key.as_str() == "inbox").unwrap().queued;
    assert_eq!(queued, 25, "every acknowledged message survived the restart");
    node.shutdown().await;
}
