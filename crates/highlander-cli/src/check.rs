//! `highlander check-config`: parse and validate a `node.toml` and say what it means.

use crate::args::{CliError, Command, Parsed, value};
use highlander::quic::{Identity, QuicError, QuicTransport};
use highlander::{ConfigError, NodeConfig};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

pub static CHECK_CONFIG: Command = Command {
    name: "check-config",
    usage: "highlander check-config --config node.toml",
    help: "\
Reads a node.toml as a node would, checks it (fields, peer list, timing, and the identity:
the secret or PEM files are loaded and the certificate must name this node and chain to the
CA), and prints what it means. On an error, the message names the field to change.

It does not bind the listen port (only a throwaway loopback one), so it can run beside the
node.

Options:
  --config FILE   the node.toml to check",
    flags: &[value("--config")],
};

pub fn check_config(args: &Parsed) -> Result<(), CliError> {
    let path = args.required("--config")?;
    let config = read_config(path)?;
    let quic = config.quic_config();
    quic.validate()
        .map_err(|e| CliError::failed(format!("{path}: {}", in_file_terms(e.to_string()))))?;
    check_identity(&config).map_err(|e| CliError::failed(format!("{path}: {e}")))?;

    let mut out = format!("{path}: valid\n");
    let mut line = |name: &str, value: String| out.push_str(&format!("  {name:<10}  {value}\n"));
    line("node", format!("{}, listens on {}", config.id, config.listen));
    for (i, (id, addr)) in config.peers.iter().enumerate() {
        let own = if *id == config.id { " (this node)" } else { "" };
        line(if i == 0 { "peers" } else { "" }, format!("{id} at {addr}{own}"));
    }
    let voters: Vec<String> = config.initial_voters().iter().map(|id| id.to_string()).collect();
    let n = voters.len();
    let learners = config.peers.len() - n;
    line(
        "voters",
        format!(
            "{} (when the cluster forms; then changed only by `members`), {learners} learner(s)",
            voters.join(", ")
        ),
    );
    let quorum = n / 2 + 1;
    line(
        "quorum",
        format!("{quorum} of {n} voters; the cluster works with {} voter(s) down", n - quorum),
    );
    for w in config.warnings() {
        line("warning", w);
    }
    match &config.identity {
        Identity::ClusterSecret(_) => line(
            "identity",
            "a cluster secret: every node derives the cluster CA from it and issues itself a \
             certificate"
                .into(),
        ),
        Identity::PemFiles { ca_cert, node_cert, node_key } => {
            line(
                "identity",
                format!("PEM files, certificate for {} checked against the CA", config.id),
            );
            line("", format!("ca_cert    {}", ca_cert.display()));
            line("", format!("node_cert  {}", node_cert.display()));
            line("", format!("node_key   {}", node_key.display()));
        }
        Identity::Pem { .. } => line("identity", "PEM documents".into()),
    }
    let t = config.timing;
    let ms = |d: std::time::Duration| d.as_millis();
    line(
        "timing",
        format!(
            "heartbeat {} ms, election {}-{} ms, session TTL {} ms, keepalive every {} ms, \
             lease margin {} ms, write timeout {} ms",
            ms(t.heartbeat),
            ms(t.election_min),
            ms(t.election_max),
            ms(t.session_ttl),
            ms(t.keepalive_interval),
            ms(t.lease_margin),
            ms(t.write_timeout)
        ),
    );
    line(
        "failover",
        format!(
            "a crashed owner's tasks move after about {} ms",
            ms(t.session_ttl + t.lease_margin)
        ),
    );
    match &config.data_dir {
        Some(dir) => line("data_dir", dir.display().to_string()),
        None => line(
            "data_dir",
            "not set: Raft's log is kept in memory, so this node must never be restarted \
             under the same id (set data_dir for a production node)"
                .into(),
        ),
    }
    print!("{out}");
    Ok(())
}

/// Reads a node.toml; every error says which file and which field.
pub fn read_config(path: &str) -> Result<NodeConfig, CliError> {
    NodeConfig::from_file(path).map_err(|e| match e {
        // Already "path: reason".
        ConfigError::File { .. } => CliError::failed(e.to_string()),
        other => CliError::failed(format!("{path}: {other}")),
    })
}

/// Loads the identity the way the node will, by starting a transport on a throwaway port:
/// a bad PEM file, a certificate for another node or from another CA shows now, not at start.
fn check_identity(config: &NodeConfig) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let ip: IpAddr = if config.listen.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };
        let local = SocketAddr::new(ip, 0);
        let socket = UdpSocket::bind(local).map_err(|e| format!("cannot bind a UDP port: {e}"))?;
        let transport = QuicTransport::from_socket(config.quic_config(), socket)
            .map_err(|e| transport_error(&e))?;
        drop(transport);
        Ok(())
    })
}

/// A transport error in the words of node.toml.
pub fn transport_error(e: &QuicError) -> String {
    in_file_terms(e.to_string())
}

/// The transport names fields as its own config does (`identity.node_cert`, `peers.n3`);
/// node.toml calls them `tls.node_cert` and `peers.3`.
fn in_file_terms(text: String) -> String {
    if let Some(rest) = text.strip_prefix("identity.") {
        return format!("tls.{rest}");
    }
    if let Some(rest) = text.strip_prefix("peers.n") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest[digits..].starts_with(':') {
            return format!("peers.{rest}");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::in_file_terms;

    #[test]
    fn transport_fields_become_file_fields() {
        let t = |s: &str| in_file_terms(s.to_string());
        assert_eq!(t("identity.node_cert: bad"), "tls.node_cert: bad");
        assert_eq!(t("peers.n3: the address is taken"), "peers.3: the address is taken");
        assert_eq!(t("peers.nx: odd"), "peers.nx: odd");
        assert_eq!(t("listen: in use"), "listen: in use");
    }
}
