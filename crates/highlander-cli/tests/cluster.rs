//! The commands that read a cluster: `status` against nodes running in this test process over
//! QUIC on loopback, `wal verify` and `wal dump` on a data directory one of them wrote.
//!
//! The nodes live in the test's tokio runtime, so a failing test drops them with it.

mod common;

use common::{highlander_async, s};
use highlander::quic::{ClusterSecret, QuicTransport};
use highlander::{Node, NodeConfig, NodeId, OwnerReport, StatusReport};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;

struct Cluster {
    dir: TempDir,
    addrs: BTreeMap<NodeId, SocketAddr>,
    configs: BTreeMap<NodeId, PathBuf>,
    nodes: BTreeMap<NodeId, Node>,
}

/// Starts `n` nodes from node.toml files that share a cluster secret file, as an operator
/// would set them up; with `data_dir`, each keeps its log in `data-<id>`.
async fn cluster(n: u64, data_dir: bool) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let secret = ClusterSecret::generate().unwrap();
    std::fs::write(dir.path().join("cluster.secret"), format!("{}\n", secret.expose())).unwrap();
    // Bound first so the ports are known when the files are written.
    let sockets: BTreeMap<NodeId, UdpSocket> =
        (1..=n).map(|i| (NodeId(i), UdpSocket::bind("127.0.0.1:0").unwrap())).collect();
    let addrs: BTreeMap<NodeId, SocketAddr> =
        sockets.iter().map(|(id, s)| (*id, s.local_addr().unwrap())).collect();
    let mut peers = String::from("[peers]\n");
    for (id, addr) in &addrs {
        writeln!(peers, "{} = \"{addr}\"", id.0).unwrap();
    }
    let mut configs = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    for (id, socket) in sockets {
        let data = if data_dir { format!("data_dir = \"data-{}\"\n", id.0) } else { String::new() };
        let text = format!(
            "id = {}\nlisten = \"{}\"\n{data}\n{peers}\n[tls]\ncluster_secret_file = \"cluster.secret\"\n",
            id.0, addrs[&id]
        );
        let path = dir.path().join(format!("node-{}.toml", id.0));
        std::fs::write(&path, text).unwrap();
        let config = NodeConfig::from_file(&path).unwrap();
        let transport = QuicTransport::from_socket(config.quic_config(), socket).unwrap();
        let mut builder = Node::builder()
            .id(id)
            .peers(config.peers.keys().copied())
            .transport(transport)
            .timing(config.timing);
        if let Some(d) = &config.data_dir {
            builder = builder.data_dir(d);
        }
        nodes.insert(id, builder.start().await.unwrap());
        configs.insert(id, path);
    }
    for node in nodes.values() {
        node.ready(Duration::from_secs(20)).await.expect("the node joins its cluster");
    }
    Cluster { dir, addrs, configs, nodes }
}

/// Waits until `node` has applied an owner for every slot of `key`.
async fn owners(node: &Node, key: &str) -> Vec<OwnerReport> {
    for _ in 0..2000 {
        let owners =
            node.status().keys.into_iter().find(|k| k.key.as_str() == key).map(|k| k.owners);
        if let Some(owners) = owners
            && owners.iter().all(Option::is_some)
        {
            return owners.into_iter().flatten().collect();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} got no owner on {}", node.id());
}

/// Waits until `node` has applied `queued` messages for `key`.
async fn queued(node: &Node, key: &str, queued: u64) {
    for _ in 0..2000 {
        if node.status().keys.iter().any(|k| k.key.as_str() == key && k.queued == queued) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{key} never had {queued} queued on {}", node.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_owners_tokens_and_queues_and_names_a_stopped_node() {
    let c = cluster(3, false).await;
    for node in c.nodes.values() {
        // Registered but never consuming: sent messages stay queued.
        node.singleton("report", |ctx| async move { ctx.cancelled().await }).await.unwrap();
        node.exclusive("pair", 2, |ctx| async move { ctx.cancelled().await }).await.unwrap();
    }
    for i in 0..3 {
        c.nodes[&NodeId(1)].send("report", format!("message {i}")).await.unwrap();
    }
    let node1 = &c.nodes[&NodeId(1)];
    let owner = owners(node1, "report").await[0];
    owners(node1, "pair").await;
    for node in c.nodes.values() {
        queued(node, "report", 3).await;
        owners(node, "report").await;
    }

    // The table, from node 1 (the config's own node).
    let config1 = s(&c.configs[&NodeId(1)]);
    let started = std::time::Instant::now();
    let r = highlander_async(&["status", "--config", config1]).await.expect(0);
    // Shown with --nocapture.
    println!("highlander status ({:?}):\n{}", started.elapsed(), r.stdout);
    let line = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("report "))
        .unwrap_or_else(|| panic!("no row for the key: {r:?}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    let want = format!("report singleton 0 {} {} {} 3", owner.node, owner.token, owner.session);
    assert_eq!(cells[..7].join(" "), want, "{r:?}");
    for needle in ["leader", "term", "sessions: 3", "keys: 2", "exclusive/2"] {
        assert!(r.stdout.contains(needle), "{needle:?} in {r:?}");
    }
    let members = r.stdout.lines().find(|l| l.trim_start().starts_with("members "));
    let members: Vec<&str> = members.map(|l| l.split_whitespace().collect()).unwrap_or_default();
    assert_eq!(members, ["members", "n1", "n2", "n3"], "{r:?}");
    assert!(r.stdout.contains(&format!("n1 ({})", c.addrs[&NodeId(1)])), "{r:?}");

    // JSON for scripts, from node 2.
    let r =
        highlander_async(&["status", "--config", config1, "--node", "2", "--json"]).await.expect(0);
    println!("highlander status --json:\n{}", r.stdout);
    let report: StatusReport = serde_json::from_str(&r.stdout).expect("the report as JSON");
    assert_eq!(report.node, Some(NodeId(2)));
    assert_eq!(report.members, [NodeId(1), NodeId(2), NodeId(3)]);
    assert_eq!(report.sessions.len(), 3);
    let key = report.keys.iter().find(|k| k.key.as_str() == "report").unwrap();
    assert_eq!(key.owners, [Some(owner)]);
    assert_eq!(key.queued, 3);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(json["keys"].as_array().is_some_and(|k| k.len() == 2), "{json}");

    // Pages and prefixes: the counts cover every key, the listing what was asked.
    let r = highlander_async(&["status", "--config", config1, "--limit", "1"]).await.expect(0);
    assert!(r.stdout.contains("keys: 2 (3 slots: 3 owned, 0 vacant"), "{r:?}");
    assert!(r.stdout.contains("more keys follow: --after pair"), "{r:?}");
    assert!(!r.stdout.lines().any(|l| l.trim_start().starts_with("report ")), "{r:?}");
    let r = highlander_async(&["status", "--config", config1, "--after", "pair", "--json"])
        .await
        .expect(0);
    let page: StatusReport = serde_json::from_str(&r.stdout).expect("the page as JSON");
    let names: Vec<&str> = page.keys.iter().map(|k| k.key.as_str()).collect();
    assert_eq!((names, page.next_after), (vec!["report"], None));
    let r = highlander_async(&["status", "--config", config1, "--prefix", "pa", "--json"])
        .await
        .expect(0);
    let page: StatusReport = serde_json::from_str(&r.stdout).expect("the page as JSON");
    assert_eq!(page.keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>(), ["pair"]);
    assert_eq!(page.key_summary.keys, 2);
    let r = highlander_async(&["status", "--config", config1, "--limit", "x"]).await.expect(2);
    assert!(r.stderr.contains("--limit"), "{r:?}");

    // A node that is not there: one clear line, exit 1.
    c.nodes[&NodeId(3)].shutdown().await;
    let r =
        highlander_async(&["status", "--config", config1, "--node", "3", "--timeout-ms", "1500"])
            .await
            .expect(1);
    println!("highlander status of a stopped node:\n{}", r.stderr);
    let addr3 = c.addrs[&NodeId(3)].to_string();
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("cannot reach node 3") && r.stderr.contains(&addr3), "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");

    // A node outside the peer list is a usage error.
    let r = highlander_async(&["status", "--config", config1, "--node", "9"]).await.expect(2);
    assert!(r.stderr.contains("--node 9"), "{r:?}");

    // Killed, not shut down: a graceful leave of the last nodes waits out timeouts.
    for node in c.nodes.values() {
        node.kill().await;
    }
    drop(c.dir);
}

/// The first segment file of a data directory's log.
fn segment(data: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    segments.into_iter().next().expect("the log has a segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_verify_and_dump_read_a_data_dir_and_find_a_flipped_byte() {
    let c = cluster(1, true).await;
    let node = &c.nodes[&NodeId(1)];
    node.singleton("inbox", |ctx| async move { ctx.cancelled().await }).await.unwrap();
    for i in 0..20 {
        node.send("inbox", format!("message {i}")).await.unwrap();
    }
    owners(node, "inbox").await;
    let data = c.dir.path().join("data-1");
    let dir = s(&data);

    // Not while the node holds the directory.
    let r = highlander_async(&["wal", "verify", "--dir", dir]).await.expect(1);
    assert!(r.stderr.contains("in use by a running node"), "{r:?}");
    node.shutdown().await;

    let r = highlander_async(&["wal", "verify", "--dir", dir]).await.expect(0);
    println!("highlander wal verify:\n{}", r.stdout);
    for needle in
        ["healthy", "vote", "committed", "last entry", "checked", "torn tail", "snapshots"]
    {
        assert!(r.stdout.contains(needle), "{needle:?} in {r:?}");
    }

    let r = highlander_async(&["wal", "dump", "--dir", dir]).await.expect(0);
    assert!(r.stdout.contains("membership"), "{r:?}");
    let sends = r.stdout.lines().filter(|l| l.contains("Send") && l.contains("inbox")).count();
    assert!(sends > 0, "{r:?}");
    let first: Vec<&str> = r.stdout.lines().next().unwrap().split_whitespace().collect();
    assert!(first[0].parse::<u64>().is_ok() && first[1].starts_with('t'), "{r:?}");

    println!("highlander wal dump:\n{}", r.stdout);
    let r = highlander_async(&["wal", "dump", "--dir", dir, "--from", "2", "--limit", "2"])
        .await
        .expect(0);
    let indexes: Vec<&str> =
        r.stdout.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(indexes, ["2", "3"], "{r:?}");
    assert!(r.stderr.contains("--from 4"), "{r:?}");

    // Flip a byte in the middle of the written part of the log: damage, not a torn tail.
    let seg = segment(&data);
    let mut bytes = std::fs::read(&seg).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).unwrap();
    let at = (end / 2..end).find(|&i| i > 64 && bytes[i] != 0).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&seg, &bytes).unwrap();
    let name = seg.file_name().unwrap().to_str().unwrap();
    let r = highlander_async(&["wal", "verify", "--dir", dir]).await.expect(1);
    println!("highlander wal verify, damaged:\n{}", r.stderr);
    assert!(r.stderr.contains(name) && r.stderr.contains("corrupt"), "{r:?}");
    let r = highlander_async(&["wal", "dump", "--dir", dir]).await.expect(1);
    assert!(r.stderr.contains(name), "{r:?}");

    // A directory that is not a data directory is refused without being touched.
    let empty = c.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let r = highlander_async(&["wal", "verify", "--dir", s(&empty)]).await.expect(1);
    assert!(r.stderr.contains("not a highlander data directory"), "{r:?}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
}

/// Starts node `id` of the cluster again from its node.toml (on whatever its data
/// directory now holds), on its old address.
async fn start_again(c: &Cluster, id: NodeId) -> Node {
    let config = NodeConfig::from_file(&c.configs[&id]).unwrap();
    // The old process's socket closes with its shutdown; retry the bind briefly.
    // Free once every handle of the old process is dropped; allow its tasks a moment.
    let mut socket = None;
    for _ in 0..500 {
        if let Ok(s) = UdpSocket::bind(c.addrs[&id]) {
            socket = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let transport = QuicTransport::from_socket(config.quic_config(), socket.unwrap()).unwrap();
    let mut builder = Node::builder()
        .id(id)
        .peers(config.peers.keys().copied())
        .transport(transport)
        .timing(config.timing);
    if let Some(d) = &config.data_dir {
        builder = builder.data_dir(d);
    }
    builder.start().await.unwrap()
}

/// The member rows of `highlander members list --json`: (node, member id, voter).
async fn members(config: &str) -> Vec<(u64, u64, bool)> {
    let r = highlander_async(&["members", "list", "--config", config, "--json"]).await.expect(0);
    let report: highlander::MembershipReport = serde_json::from_str(&r.stdout).expect("JSON");
    report.members.iter().map(|m| (m.node.0, m.member, m.voter)).collect()
}

/// A machine replaced under the same id (an empty data directory), then a node removed and
/// added back, all through `highlander members`, on a real cluster over QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replace_remove_and_add_a_node_through_the_leader() {
    let mut c = cluster(3, true).await;
    let config1 = c.configs[&NodeId(1)].to_str().unwrap().to_string();
    let config1 = config1.as_str();
    assert_eq!(members(config1).await, [(1, 1, true), (2, 2, true), (3, 3, true)]);
    let r = highlander_async(&["members", "list", "--config", config1]).await.expect(0);
    println!("highlander members list:\n{}", r.stdout);
    assert!(r.stdout.starts_with("leader n"), "{r:?}");

    // Node 3's machine is replaced: same id, an empty data directory. It joins as a learner.
    c.nodes.remove(&NodeId(3)).unwrap().shutdown().await;
    std::fs::remove_dir_all(c.dir.path().join("data-3")).unwrap();
    let n3 = start_again(&c, NodeId(3)).await;
    let mut joined = None;
    for _ in 0..2000 {
        let m = members(config1).await;
        if let Some(&(_, member, false)) = m.iter().find(|(n, member, _)| *n == 3 && *member != 3) {
            joined = Some(member);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let new3 = joined.expect("node 3's new storage joins as a learner");
    assert!(new3 >= 1 << 63, "a fresh member id: {new3:#x}");
    // The operator knows the old machine is gone: replace now rather than after a TTL.
    let r = highlander_async(&["members", "replace", "--config", config1, "--node", "3"])
        .await
        .expect(0);
    println!("highlander members replace --node 3:\n{}", r.stdout);
    assert_eq!(members(config1).await, [(1, 1, true), (2, 2, true), (3, new3, true)]);
    n3.ready(Duration::from_secs(20)).await.expect("the new node 3 opens a session");
    c.nodes.insert(NodeId(3), n3);

    // Removed while it runs: it is told, and stops.
    let r = highlander_async(&["members", "remove", "--config", config1, "--node", "3"])
        .await
        .expect(0);
    println!("highlander members remove --node 3:\n{}", r.stdout);
    assert_eq!(members(config1).await, [(1, 1, true), (2, 2, true)]);
    let n3 = c.nodes.remove(&NodeId(3)).unwrap();
    let mut stopped = None;
    for _ in 0..2000 {
        if let Err(e) = n3.send("anything", "x").await
            && matches!(e, highlander::Error::Removed(_))
        {
            stopped = Some(e);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("the removed node says: {}", stopped.expect("the removed node stops"));
    n3.kill().await;
    drop(n3);

    // Added back: on an empty data directory it joins as a learner, then `add` makes it vote.
    std::fs::remove_dir_all(c.dir.path().join("data-3")).unwrap();
    let n3 = start_again(&c, NodeId(3)).await;
    let r = loop {
        let r = highlander_async(&["members", "add", "--config", config1, "--node", "3"]).await;
        if r.code == 0 || !r.stderr.contains("no storage in the cluster") {
            break r.expect(0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("highlander members add --node 3:\n{}", r.stdout);
    let m = members(config1).await;
    assert_eq!(m.len(), 3, "{m:?}");
    assert!(m.iter().all(|(_, _, voter)| *voter), "{m:?}");
    n3.ready(Duration::from_secs(20)).await.expect("node 3 is back");

    // Usage errors: no --node, a node outside the peer list.
    let r = highlander_async(&["members", "add", "--config", config1]).await.expect(2);
    assert!(r.stderr.contains("--node"), "{r:?}");
    let r = highlander_async(&["members", "remove", "--config", config1, "--node", "9"])
        .await
        .expect(2);
    assert!(r.stderr.contains("--node 9"), "{r:?}");
    n3.kill().await;
    for node in c.nodes.values() {
        node.kill().await;
    }
}

/// The dead-letter path from the command line: a job enqueued with `highlander enqueue`
/// (once: a retry with its unique key is refused) that fails every attempt is listed
/// with `jobs list --state dead`, shown with its errors, retried with `jobs retry` (and
/// completes once the failure is gone), and purged; `status` shows the queue's depths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_dead_letters_are_listed_shown_retried_and_purged_from_the_cli() {
    use highlander::{JobFailure, JobState, WorkerOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = cluster(3, false).await;
    let failing = Arc::new(AtomicBool::new(true));
    for node in c.nodes.values() {
        let failing = failing.clone();
        let options = WorkerOptions::default().backoff(|_| Duration::from_millis(10));
        node.worker("mail", options, move |ctx| {
            let failing = failing.clone();
            async move {
                if failing.load(Ordering::SeqCst) {
                    Err(JobFailure::retry(format!("smtp refused attempt {}", ctx.attempt())))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    }
    let node1 = &c.nodes[&NodeId(1)];
    let config1 = s(&c.configs[&NodeId(1)]);
    // Enqueued from the command line, through node 2.
    let enqueue = [
        "enqueue",
        "--config",
        config1,
        "--node",
        "2",
        "--queue",
        "mail",
        "--payload",
        "to ada",
        "--max-attempts",
        "2",
    ];
    let r = highlander_async(&enqueue).await.expect(0);
    let job = r
        .stdout
        .trim()
        .strip_prefix('j')
        .and_then(|n| n.parse().ok())
        .map(highlander::JobId)
        .unwrap_or_else(|| panic!("a job id: {r:?}"));
    // A queue nobody works on: the unique key stays held, and a retry is refused.
    let unique = ["enqueue", "--config", config1, "--queue", "outbox", "--payload", "x"];
    let unique = [&unique[..], &["--unique", "order:42"]].concat();
    let first = highlander_async(&unique).await.expect(0);
    let r = highlander_async(&unique).await.expect(1);
    let held = format!("({}) holds the unique key", first.stdout.trim());
    assert!(r.stderr.contains(&held), "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node1.job(job).is_none() {
        assert!(std::time::Instant::now() < deadline, "node 1 never applied {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = node1.wait(job, Duration::from_secs(20)).await.unwrap();
    assert_eq!(dead.state, JobState::Dead);

    let r =
        highlander_async(&["jobs", "list", "--config", config1, "--state", "dead"]).await.expect(0);
    println!("highlander jobs list --state dead:\n{}", r.stdout);
    let row = r.stdout.lines().find(|l| l.trim_start().starts_with(&job.to_string()));
    let cells: Vec<&str> = row.map(|l| l.split_whitespace().collect()).unwrap_or_default();
    assert_eq!(cells.get(..4), Some(&[&*job.to_string(), "mail", "dead", "2/2"][..]), "{r:?}");
    let r = highlander_async(&["jobs", "show", "--config", config1, "--job", &job.to_string()])
        .await
        .expect(0);
    println!("highlander jobs show:\n{}", r.stdout);
    assert!(r.stdout.contains("smtp refused attempt 2"), "{r:?}");
    let r = highlander_async(&["status", "--config", config1]).await.expect(0);
    let queue = r.stdout.lines().find(|l| l.trim_start().starts_with("mail "));
    let cells: Vec<&str> = queue.map(|l| l.split_whitespace().collect()).unwrap_or_default();
    // QUEUE SCHEDULED AVAILABLE RUNNING RETRYABLE COMPLETED DEAD
    assert_eq!(cells.get(..7), Some(&["mail", "0", "0", "0", "0", "0", "1"][..]), "{r:?}");

    failing.store(false, Ordering::SeqCst);
    let r = highlander_async(&[
        "jobs",
        "retry",
        "--config",
        config1,
        "--node",
        "2",
        "--job",
        &job.to_string(),
    ])
    .await
    .expect(0);
    assert!(r.stdout.contains("retried: available"), "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node1.job(job).is_none_or(|r| r.state != JobState::Completed) {
        assert!(std::time::Instant::now() < deadline, "the retried job did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = highlander_async(&["jobs", "purge", "--config", config1, "--state", "completed"])
        .await
        .expect(0);
    assert!(r.stdout.contains("1 jobs purged"), "{r:?}");
    let r = highlander_async(&["jobs", "show", "--config", config1, "--job", &job.to_string()])
        .await
        .expect(1);
    assert!(r.stderr.contains("no such job"), "{r:?}");
    // A bad state is a usage error naming the flag.
    let r =
        highlander_async(&["jobs", "list", "--config", config1, "--state", "lost"]).await.expect(2);
    assert!(r.stderr.contains("--state"), "{r:?}");
    for node in c.nodes.values() {
        node.kill().await;
    }
    drop(c.dir);
}
