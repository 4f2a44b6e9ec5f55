//! The node configuration file (`node.toml`), shared by the library and the `highlander`
//! command: one node's id, where it listens, every peer's address, how it proves who it is,
//! and its timing.
//!
//! ```toml
//! id = 1
//! listen = "127.0.0.1:7001"
//!
//! [peers]            # every node, this one included; the same list on every node
//! 1 = "127.0.0.1:7001"
//! 2 = "127.0.0.1:7002"
//! 3 = "127.0.0.1:7003"
//!
//! # voters = 3       # optional: the first 3 ids vote, the others are learners
//! #                  # (default: every peer up to 5, then the first 5)
//!
//! [tls]              # either a shared cluster secret ...
//! cluster_secret_file = "cluster.secret"
//! # cluster_secret_env = "HIGHLANDER_SECRET"
//! # ... or PEM files made by `highlander certs`:
//! # ca_cert = "ca.pem"
//! # node_cert = "node-1.pem"
//! # node_key = "node-1.key"
//!
//! [timing]           # optional
//! preset = "standard"    # or "fast" (a LAN), or "wan" (round trips up to 150 ms)
//! # rtt_ms = 120         # or: timing derived from the slowest round trip between nodes
//! # any field of `Timing` can be overridden in ms:
//! # session_ttl_ms = 2000
//! ```
//!
//! Relative paths are resolved against the file's directory. Every error names the field to
//! change (and, for syntax errors, the line).

use crate::config::Timing;
use crate::error::ConfigError;
use highlander_core::NodeId;
use highlander_quic::{ClusterSecret, Identity, QuicConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    id: u64,
    listen: SocketAddr,
    peers: BTreeMap<String, SocketAddr>,
    tls: FileTls,
    #[serde(default)]
    timing: FileTiming,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    voters: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cluster_secret: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    cluster_secret_env: Option<String>,
    ca_cert: Option<PathBuf>,
    node_cert: Option<PathBuf>,
    node_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileTiming {
    preset: Option<String>,
    rtt_ms: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_min_ms: Option<u64>,
    election_max_ms: Option<u64>,
    session_ttl_ms: Option<u64>,
    keepalive_interval_ms: Option<u64>,
    lease_margin_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
}

/// A node's configuration, read from a `node.toml` file and checked.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub id: NodeId,
    /// The UDP address this node listens on.
    pub listen: SocketAddr,
    /// Every node's address, this one included.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// How the node proves its identity and checks its peers'.
    pub identity: Identity,
    /// Raft and lease timing.
    pub timing: Timing,
    /// Where the node keeps its durable state, if configured.
    pub data_dir: Option<PathBuf>,
    /// How many peers vote when the cluster forms (see
    /// [`NodeBuilder::voters`](crate::NodeBuilder::voters)); `None` for the default.
    pub voters: Option<usize>,
}

fn field(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field { field: field.to_string(), reason: reason.into() }
}

impl NodeConfig {
    /// Reads and checks a configuration file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        NodeConfig::from_toml(&text, base).map_err(|e| match e {
            ConfigError::File { reason, .. } => {
                ConfigError::File { path: path.display().to_string(), reason }
            }
            other => other,
        })
    }

    /// Parses and checks configuration text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let root: FileRoot = toml::from_str(text)
            .map_err(|e| ConfigError::File { path: "<text>".into(), reason: e.to_string() })?;
        let id = NodeId(root.id);
        let mut peers = BTreeMap::new();
        for (name, addr) in &root.peers {
            let peer: u64 = name.parse().map_err(|_| {
                field(&format!("peers.{name}"), "a peer's key must be its numeric node id")
            })?;
            peers.insert(NodeId(peer), *addr);
        }
        match peers.get(&id) {
            None => {
                return Err(field(
                    "peers",
                    format!("node {} (this node's id) is not listed", root.id),
                ));
            }
            Some(addr) if addr.port() != root.listen.port() => {
                return Err(field(
                    &format!("peers.{}", root.id),
                    format!(
                        "this node's own entry {addr} does not match `listen` {}: peers would dial the wrong port",
                        root.listen
                    ),
                ));
            }
            Some(_) => {}
        }
        let identity = identity(&root.tls, base)?;
        let timing = timing(&root.timing)?;
        let data_dir = root.data_dir.map(|d| resolve(base, &d));
        let ids = peers.keys().copied().collect();
        crate::config::initial_voters(&ids, root.voters)
            .map_err(|e| field("voters", e.to_string()))?;
        Ok(NodeConfig {
            id,
            listen: root.listen,
            peers,
            identity,
            timing,
            data_dir,
            voters: root.voters,
        })
    }

    /// What this configuration costs that the user may not expect (an even or tiny voter
    /// set), one sentence each; empty when nothing is worth saying.
    pub fn warnings(&self) -> Vec<String> {
        crate::config::voters_warning(self.initial_voters().len()).into_iter().collect()
    }

    /// The peers that vote when the cluster forms (the others join as learners).
    pub fn initial_voters(&self) -> Vec<NodeId> {
        let ids = self.peers.keys().copied().collect();
        // Checked when the file was read; a hand-built config out of range gets none.
        crate::config::initial_voters(&ids, self.voters).map(Vec::from_iter).unwrap_or_default()
    }

    /// The QUIC transport's configuration.
    pub fn quic_config(&self) -> QuicConfig {
        QuicConfig::new(self.id, self.listen, self.peers.clone(), self.identity.clone())
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}

fn identity(tls: &FileTls, base: &Path) -> Result<Identity, ConfigError> {
    let secret_sources = [
        tls.cluster_secret.is_some(),
        tls.cluster_secret_file.is_some(),
        tls.cluster_secret_env.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    let pem = [&tls.ca_cert, &tls.node_cert, &tls.node_key];
    let pem_given = pem.iter().filter(|p| p.is_some()).count();
    match (secret_sources, pem_given) {
        (0, 0) => Err(field(
            "tls",
            "no identity: set cluster_secret_file (or cluster_secret_env), or ca_cert, node_cert and node_key",
        )),
        (n, m) if n > 0 && m > 0 => Err(field(
            "tls",
            "both a cluster secret and PEM files are set; choose one way to prove identity",
        )),
        (n, _) if n > 1 => Err(field(
            "tls",
            "set only one of cluster_secret, cluster_secret_file and cluster_secret_env",
        )),
        (1, _) => {
            let (name, text) = if let Some(s) = &tls.cluster_secret {
                ("tls.cluster_secret", s.clone())
            } else if let Some(f) = &tls.cluster_secret_file {
                let path = resolve(base, f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    field("tls.cluster_secret_file", format!("{}: {e}", path.display()))
                })?;
                ("tls.cluster_secret_file", text)
            } else {
                let var = tls.cluster_secret_env.clone().unwrap_or_default();
                let text = std::env::var(&var).map_err(|_| {
                    field(
                        "tls.cluster_secret_env",
                        format!("environment variable {var} is not set"),
                    )
                })?;
                ("tls.cluster_secret_env", text)
            };
            let secret = ClusterSecret::new(text.trim()).map_err(|e| field(name, e.to_string()))?;
            Ok(Identity::ClusterSecret(secret))
        }
        (_, 3) => Ok(Identity::PemFiles {
            ca_cert: resolve(base, tls.ca_cert.as_deref().unwrap_or(Path::new(""))),
            node_cert: resolve(base, tls.node_cert.as_deref().unwrap_or(Path::new(""))),
            node_key: resolve(base, tls.node_key.as_deref().unwrap_or(Path::new(""))),
        }),
        _ => {
            let missing: Vec<&str> = ["ca_cert", "node_cert", "node_key"]
                .iter()
                .zip(pem)
                .filter(|(_, p)| p.is_none())
                .map(|(n, _)| *n)
                .collect();
            Err(field(
                "tls",
                format!("PEM identity needs all three files; missing {}", missing.join(", ")),
            ))
        }
    }
}

fn timing(t: &FileTiming) -> Result<Timing, ConfigError> {
    let ms = Duration::from_millis;
    let mut timing = match (t.preset.as_deref(), t.rtt_ms) {
        (Some(_), Some(_)) => {
            return Err(field(
                "timing.rtt_ms",
                "give either a preset or rtt_ms (the timing derived from it), not both",
            ));
        }
        (None, Some(rtt)) => Timing::for_rtt(ms(rtt)),
        (None | Some("standard"), None) => Timing::standard(),
        (Some("fast"), None) => Timing::fast(),
        (Some("wan"), None) => Timing::wan(),
        (Some(other), None) => {
            return Err(field(
                "timing.preset",
                format!("unknown preset {other:?}; use \"standard\", \"fast\" or \"wan\""),
            ));
        }
    };
    if let Some(v) = t.heartbeat_ms {
        timing.heartbeat = ms(v);
    }
    if let Some(v) = t.election_min_ms {
        timing.election_min = ms(v);
    }
    if let Some(v) = t.election_max_ms {
        timing.election_max = ms(v);
    }
    if let Some(v) = t.session_ttl_ms {
        timing.session_ttl = ms(v);
    }
    if let Some(v) = t.keepalive_interval_ms {
        timing.keepalive_interval = ms(v);
    }
    if let Some(v) = t.lease_margin_ms {
        timing.lease_margin = ms(v);
    }
    if let Some(v) = t.write_timeout_ms {
        timing.write_timeout = ms(v);
    }
    timing.validate().map_err(|e| field("timing", e.0))?;
    Ok(timing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Vq3xX8bLr2M9pT7sK4dW1nF6hJ0cY5gZaBeCuDiEoGk";

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_toml(text, Path::new("/etc/highlander"))
    }

    fn base(tls: &str, extra: &str) -> String {
        format!(
            "id = 1\nlisten = \"127.0.0.1:7001\"\n{extra}\n[peers]\n1 = \"127.0.0.1:7001\"\n2 = \"127.0.0.1:7002\"\n\n[tls]\n{tls}\n"
        )
    }

    #[test]
    fn a_good_file_parses() {
        let c = parse(&base(&format!("cluster_secret = \"{SECRET}\""), "")).unwrap();
        assert_eq!(c.id, NodeId(1));
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.timing, Timing::standard());
        let c = parse(&base(
            "ca_cert = \"ca.pem\"\nnode_cert = \"n1.pem\"\nnode_key = \"/k/n1.key\"",
            "",
        ))
        .unwrap();
        match c.identity {
            Identity::PemFiles { ca_cert, node_key, .. } => {
                assert_eq!(ca_cert, PathBuf::from("/etc/highlander/ca.pem"));
                assert_eq!(node_key, PathBuf::from("/k/n1.key"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let s = format!("cluster_secret = \"{SECRET}\"");
        let cases = [
            (base(&s, "").replace("2 = ", "two = "), "peers.two"),
            (base(&s, "").replace("1 = \"127.0.0.1:7001\"\n", ""), "peers"),
            (base(&s, "").replace("1 = \"127.0.0.1:7001\"", "1 = \"127.0.0.1:7009\""), "peers.1"),
            (base("cluster_secret = \"short\"", ""), "tls.cluster_secret"),
            (base("", ""), "tls"),
            (base(&format!("{s}\nca_cert = \"x\""), ""), "tls"),
            (base("ca_cert = \"x\"", ""), "missing node_cert, node_key"),
            (base(&s, "").replace("[tls]", "[timing]\npreset = \"turbo\"\n[tls]"), "timing.preset"),
            (base(&s, "").replace("[tls]", "[timing]\nsession_ttl_ms = 600\n[tls]"), "timing"),
            (
                base("cluster_secret_env = \"HIGHLANDER_TEST_UNSET_VAR\"", ""),
                "HIGHLANDER_TEST_UNSET_VAR",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).expect_err(&text).to_string();
            assert!(e.contains(needle), "{e:?} should name {needle:?}");
        }
        // Syntax errors and unknown fields point at the line.
        let e = parse(&base(&s, "colour = \"red\"")).unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("line"), "{e}");
        let e = parse("id = 1\nlisten = \n[peers]").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
