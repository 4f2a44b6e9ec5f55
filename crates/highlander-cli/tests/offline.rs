//! The commands that need no running cluster: usage, `secret`, `certs`, `check-config`.

mod common;

use common::{highlander, s};
use highlander::core::wire::{KeyQuery, Request, Response, StatusReport};
use highlander::core::{BoxFuture, RequestHandler};
use highlander::quic::{ClusterSecret, Identity, QuicConfig, QuicTransport};
use highlander::{NodeId, Transport};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn usage_errors_exit_2_and_name_the_argument() {
    let r = highlander(&[]).expect(2);
    assert!(r.stderr.contains("Usage: highlander <command>"), "{r:?}");
    let r = highlander(&["--help"]).expect(0);
    for command in ["secret", "certs init", "certs issue", "status", "wal verify", "check-config"] {
        assert!(r.stdout.contains(command), "{command} in {r:?}");
    }
    assert!(highlander(&["frobnicate"]).expect(2).stderr.contains("\"frobnicate\""));
    assert!(highlander(&["certs"]).expect(2).stderr.contains("init or issue"));
    assert!(highlander(&["certs", "sign"]).expect(2).stderr.contains("\"sign\""));
    assert!(highlander(&["certs", "--help"]).expect(0).stdout.contains("certs issue --dir DIR"));
    assert!(highlander(&["status", "--help"]).expect(0).stdout.contains("--timeout-ms"));
    assert!(highlander(&["help", "wal", "dump"]).expect(0).stdout.contains("--limit"));
    let cases: &[(&[&str], &str)] = &[
        (&["certs", "init"], "--dir is required"),
        (&["certs", "init", "--dir", "x", "--days", "zero"], "--days: \"zero\""),
        (&["certs", "init", "--dir", "x", "--days", "0"], "--days: 0 is out of range"),
        (&["certs", "issue", "--dir", "x"], "--node-id is required"),
        (&["certs", "issue", "--dir", "x", "--node-id", "-1"], "--node-id"),
        (&["status", "--config", "x", "--bogus"], "\"--bogus\""),
        (&["status", "--config"], "--config needs a value"),
        (&["status", "--config", "x", "--timeout-ms", "0"], "--timeout-ms"),
        (&["wal", "dump", "--dir", "x", "--limit", "0"], "--limit"),
        (&["wal", "verify", "--dir", "a", "--dir", "b"], "--dir is given more than once"),
        (&["check-config", "node.toml"], "unexpected argument \"node.toml\""),
    ];
    for (args, needle) in cases {
        let r = highlander(args).expect(2);
        assert!(r.stderr.contains(needle), "{args:?} should say {needle:?}: {r:?}");
        assert!(r.stderr.contains("Usage: highlander"), "{r:?}");
    }
}

#[test]
fn secret_prints_a_secret_the_library_accepts() {
    let a = highlander(&["secret"]).expect(0).stdout;
    let b = highlander(&["secret"]).expect(0).stdout;
    let secret = ClusterSecret::new(a.trim()).expect("a valid cluster secret");
    assert_eq!(secret.expose(), a.trim());
    assert_ne!(a, b, "every secret is new");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.secret");
    highlander(&["secret", "--out", s(&file)]).expect(0);
    assert_eq!(mode(&file), 0o600);
    let written = std::fs::read_to_string(&file).unwrap();
    ClusterSecret::new(written.trim()).unwrap();
    let r = highlander(&["secret", "--out", s(&file)]).expect(1);
    assert!(r.stderr.contains("refusing to overwrite"), "{r:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), written);
    highlander(&["secret", "--out", s(&file), "--force"]).expect(0);
    assert_ne!(std::fs::read_to_string(&file).unwrap(), written);
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn certs_init_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let r = highlander(&["certs", "init", "--dir", s(&ca), "--days", "30"]).expect(0);
    assert!(r.stdout.contains("ca.key"), "{r:?}");
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let before = std::fs::read(ca.join("ca.key")).unwrap();

    let r = highlander(&["certs", "init", "--dir", s(&ca)]).expect(1);
    assert!(r.stderr.contains("refusing to overwrite") && r.stderr.contains("--force"), "{r:?}");
    assert!(r.stderr.contains("ca.pem") && r.stderr.contains("ca.key"), "{r:?}");
    assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before, "left as it was");

    // Only one of the two present still refuses, and writes nothing.
    std::fs::remove_file(ca.join("ca.pem")).unwrap();
    highlander(&["certs", "init", "--dir", s(&ca)]).expect(1);
    assert!(!ca.join("ca.pem").exists());

    highlander(&["certs", "init", "--dir", s(&ca), "--force"]).expect(0);
    assert_ne!(std::fs::read(ca.join("ca.key")).unwrap(), before, "replaced");
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    // A node certificate is not overwritten either.
    highlander(&["certs", "issue", "--dir", s(&ca), "--node-id", "4"]).expect(0);
    let r = highlander(&["certs", "issue", "--dir", s(&ca), "--node-id", "4"]).expect(1);
    assert!(r.stderr.contains("node-4.pem"), "{r:?}");
    highlander(&["certs", "issue", "--dir", s(&ca), "--node-id", "4", "--force"]).expect(0);
}

#[test]
fn certs_issue_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let r = highlander(&["certs", "issue", "--dir", s(dir.path()), "--node-id", "1"]).expect(1);
    assert!(r.stderr.contains("ca.pem") && r.stderr.contains("certs init"), "{r:?}");
    highlander(&["certs", "init", "--dir", s(dir.path())]).expect(0);
    let args = ["certs", "issue", "--dir", s(dir.path()), "--node-id", "1", "--addr"];
    let r = highlander(&[&args[..], &["bad name!"]].concat()).expect(2);
    assert!(r.stderr.contains("--addr") && r.stderr.contains("bad name!"), "{r:?}");
    let r = highlander(&[&args[..], &["node-2.highlander.invalid"]].concat()).expect(2);
    assert!(r.stderr.contains("reserved"), "{r:?}");
    std::fs::write(dir.path().join("ca.key"), "not a key").unwrap();
    let r = highlander(&["certs", "issue", "--dir", s(dir.path()), "--node-id", "1"]).expect(1);
    assert!(r.stderr.contains("ca_key"), "{r:?}");
}

/// Answers `Status` with its own id.
struct Reporter(NodeId);

impl RequestHandler for Reporter {
    fn handle(&self, _from: NodeId, request: Request) -> BoxFuture<'static, Response> {
        let id = self.0;
        Box::pin(async move {
            match request {
                Request::Status(_) => Response::Status(Box::new(StatusReport {
                    node: Some(id),
                    ..StatusReport::default()
                })),
                _ => Response::Refused("status only".into()),
            }
        })
    }
}

fn pem(dir: &Path, node: u64) -> Identity {
    Identity::PemFiles {
        ca_cert: dir.join("ca.pem"),
        node_cert: dir.join(format!("node-{node}.pem")),
        node_key: dir.join(format!("node-{node}.key")),
    }
}

fn loopback() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

fn transport(
    id: u64,
    socket: UdpSocket,
    peers: &BTreeMap<NodeId, SocketAddr>,
    identity: Identity,
) -> QuicTransport {
    let mut config = QuicConfig::new(NodeId(id), peers[&NodeId(id)], peers.clone(), identity);
    config.timeouts.connect = Duration::from_secs(3);
    let t = QuicTransport::from_socket(config, socket).expect("the transport accepts the files");
    t.serve(Arc::new(Reporter(NodeId(id)))).unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_made_by_the_command_secure_quic_and_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (dir.path().join("ca"), dir.path().join("other"));
    let nodes = dir.path().join("nodes");
    for (ca_dir, out) in [(&ca, &nodes), (&other, &other)] {
        highlander(&["certs", "init", "--dir", s(ca_dir)]).expect(0);
        for id in ["1", "2"] {
            let r = highlander(&[
                "certs",
                "issue",
                "--dir",
                s(ca_dir),
                "--node-id",
                id,
                "--addr",
                "127.0.0.1:7000",
                "--addr",
                "::1,node.example.com",
                "--out",
                s(out),
                "--days",
                "2",
            ])
            .expect(0);
            assert!(r.stdout.contains(&format!("node-{id}.highlander.invalid")), "{r:?}");
            assert_eq!(mode(&out.join(format!("node-{id}.key"))), 0o600);
        }
    }
    std::fs::copy(ca.join("ca.pem"), nodes.join("ca.pem")).unwrap();

    // Two nodes with certificates from the same CA talk.
    let ((s1, a1), (s2, a2)) = (loopback(), loopback());
    let peers = BTreeMap::from([(NodeId(1), a1), (NodeId(2), a2)]);
    let t1 = transport(1, s1, &peers, pem(&nodes, 1));
    let t2 = transport(2, s2, &peers, pem(&nodes, 2));
    match t1.request(NodeId(2), Request::Status(KeyQuery::default()), Duration::from_secs(5)).await
    {
        Ok(Response::Status(r)) => assert_eq!(r.node, Some(NodeId(2))),
        other => panic!("node 1 could not ask node 2: {other:?}"),
    }
    match t2.request(NodeId(1), Request::Status(KeyQuery::default()), Duration::from_secs(5)).await
    {
        Ok(Response::Status(r)) => assert_eq!(r.node, Some(NodeId(1))),
        other => panic!("node 2 could not ask node 1: {other:?}"),
    }

    // A node 2 whose certificate comes from another CA is refused by node 1 ...
    let ((s3, a3), (s4, a4)) = (loopback(), loopback());
    let stranger_peers = BTreeMap::from([(NodeId(1), a4), (NodeId(2), a3)]);
    let stranger = transport(2, s3, &stranger_peers, pem(&other, 2));
    let honest = transport(1, s4, &stranger_peers, pem(&nodes, 1));
    let refused = honest
        .request(NodeId(2), Request::Status(KeyQuery::default()), Duration::from_secs(5))
        .await;
    assert!(refused.is_err(), "a server from another CA answered: {refused:?}");
    // ... and a node 1 from another CA is refused by the honest node 2.
    let (s5, a5) = loopback();
    let client_peers = BTreeMap::from([(NodeId(1), a5), (NodeId(2), a2)]);
    let impostor = transport(1, s5, &client_peers, pem(&other, 1));
    let refused = impostor
        .request(NodeId(2), Request::Status(KeyQuery::default()), Duration::from_secs(5))
        .await;
    assert!(refused.is_err(), "a client from another CA was served: {refused:?}");

    for t in [t1, t2, stranger, honest, impostor] {
        t.shutdown().await;
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const PEERS: &str =
    "[peers]\n1 = \"127.0.0.1:7101\"\n2 = \"127.0.0.1:7102\"\n3 = \"127.0.0.1:7103\"\n";

#[test]
fn check_config_explains_a_good_file_and_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    highlander(&["secret", "--out", s(&d.join("cluster.secret"))]).expect(0);
    let good = format!(
        "id = 1\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"data-1\"\n{PEERS}\n[tls]\n\
         cluster_secret_file = \"cluster.secret\"\n\n[timing]\npreset = \"fast\"\n"
    );
    let path = write_config(d, "good.toml", &good);
    let r = highlander(&["check-config", "--config", s(&path)]).expect(0);
    for needle in [
        "valid",
        "n1, listens on 127.0.0.1:7101",
        "n2 at 127.0.0.1:7102",
        "2 of 3 voters",
        "voters      n1, n2, n3",
        "cluster secret",
        "session TTL 500 ms",
        "data-1",
    ] {
        assert!(r.stdout.contains(needle), "{needle:?} in {r:?}");
    }

    // PEM files made by the command, checked as the node would check them.
    highlander(&["certs", "init", "--dir", s(d)]).expect(0);
    highlander(&["certs", "issue", "--dir", s(d), "--node-id", "1"]).expect(0);
    highlander(&["certs", "issue", "--dir", s(d), "--node-id", "2"]).expect(0);
    let pem = |cert: &str| {
        format!(
            "id = 1\nlisten = \"127.0.0.1:7101\"\n{PEERS}\n[tls]\nca_cert = \"ca.pem\"\n\
             node_cert = \"{cert}.pem\"\nnode_key = \"{cert}.key\"\n"
        )
    };
    let path = write_config(d, "pem.toml", &pem("node-1"));
    let r = highlander(&["check-config", "--config", s(&path)]).expect(0);
    assert!(r.stdout.contains("PEM files") && r.stdout.contains("node-1.pem"), "{r:?}");
    assert!(r.stdout.contains("must never be restarted"), "no data_dir is flagged: {r:?}");

    // Two voters: allowed, with what it costs.
    let path = write_config(d, "two.toml", &good.replace("id = 1\n", "id = 1\nvoters = 2\n"));
    let r = highlander(&["check-config", "--config", s(&path)]).expect(0);
    assert!(r.stdout.contains("voters      n1, n2 ") && r.stdout.contains("1 learner"), "{r:?}");
    assert!(r.stdout.contains("warning") && r.stdout.contains("2 voters"), "{r:?}");

    let secret = good.replace("data_dir = \"data-1\"\n", "");
    let bad: &[(&str, String, &str)] = &[
        ("peer key", secret.replace("2 = ", "two = "), "peers.two"),
        ("unknown field", secret.replace("id = 1\n", "id = 1\ncolour = \"red\"\n"), "colour"),
        ("syntax", secret.replace("id = 1", "id = "), "line 1"),
        ("preset", secret.replace("\"fast\"", "\"turbo\""), "timing.preset"),
        ("voters", secret.replace("id = 1\n", "id = 1\nvoters = 4\n"), "voters"),
        (
            "secret file",
            secret.replace("cluster.secret", "missing.secret"),
            "tls.cluster_secret_file",
        ),
        (
            "own entry",
            secret.replace("1 = \"127.0.0.1:7101\"", "1 = \"127.0.0.1:7109\""),
            "peers.1",
        ),
        ("shared address", secret.replace("7103", "7102"), "peers.3"),
        ("wrong cert", pem("node-2"), "tls.node_cert"),
        ("missing key", pem("node-1").replace("node_key = \"node-1.key\"\n", ""), "node_key"),
    ];
    for (what, text, needle) in bad {
        let path = write_config(d, "bad.toml", text);
        let r = highlander(&["check-config", "--config", s(&path)]).expect(1);
        assert!(r.stderr.contains(needle), "{what}: {needle:?} in {r:?}");
        assert!(r.stderr.contains("bad.toml"), "{what}: the file is named: {r:?}");
    }
    let r = highlander(&["check-config", "--config", s(&d.join("absent.toml"))]).expect(1);
    assert!(r.stderr.contains("absent.toml"), "{r:?}");
}
