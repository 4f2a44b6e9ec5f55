//! `highlander status`: ask a node for its report over QUIC, as a member of the cluster.

use crate::args::{CliError, Command, Parsed, switch, value};
use highlander::core::wire::{KeyQuery, Request, Response};
use highlander::quic::QuicTransport;
use highlander::{Key, KeyKind, NodeConfig, NodeId, StatusReport, Transport, TransportError};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

const DEFAULT_TIMEOUT_MS: u64 = 3000;

/// How many keys `status` lists unless told otherwise.
const DEFAULT_KEYS: u32 = 50;

pub static STATUS: Command = Command {
    name: "status",
    usage: "highlander status --config node.toml [--node N] [--prefix P] [--after KEY] \
[--limit N] [--json] [--timeout-ms T]",
    help: "\
Asks a node what it knows of the cluster: the leader, the term, the members, the live
sessions, counts over every key (slots owned, vacant and moving, messages queued), the first
keys with their owners (node, fencing token) and queue depth, and every job queue with its
depths by state, running jobs per node and the age of its oldest job.

With many keys, list them a page at a time: --limit sets the page size, --after the last key
of the previous page (the report names it), --prefix keeps the keys that start with it.
--limit 0 prints the counts only.

It connects over QUIC with the credentials of the node.toml it is given (the identity that
node uses, so it is trusted like that node) from an ephemeral local UDP port. The report is
the asked node's view as it has applied it; the leader field is that node's best guess.

Options:
  --config FILE    a node.toml of the cluster
  --node N         the node to ask (default: the config's own node)
  --prefix P       list only keys that start with P
  --after KEY      list only keys after KEY (the next page)
  --limit N        list at most N keys (default 50; 0: counts only)
  --json           print the report as JSON, for scripts
  --timeout-ms T   how long to wait for the answer (default 3000)",
    flags: &[
        value("--config"),
        value("--node"),
        value("--prefix"),
        value("--after"),
        value("--limit"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub fn status(args: &Parsed) -> Result<(), CliError> {
    let (config, target, addr, timeout) = target(args, DEFAULT_TIMEOUT_MS)?;
    let mut query =
        KeyQuery::summary().limit(args.number("--limit", 0, u32::MAX)?.unwrap_or(DEFAULT_KEYS));
    if let Some(prefix) = args.get("--prefix") {
        query = query.with_prefix(prefix);
    }
    if let Some(after) = args.get("--after") {
        let key = Key::new(after).map_err(|e| args.error(format!("--after: {e}")))?;
        query = query.after(key);
    }
    let report = runtime()?.block_on(ask(&config, target, addr, timeout, query))?;
    if args.switch("--json") {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::failed(format!("cannot encode the report as JSON: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", render(&report, addr));
    }
    Ok(())
}

/// Asks node `target` for its status report.
pub(crate) async fn ask(
    config: &NodeConfig,
    target: NodeId,
    addr: SocketAddr,
    timeout: Duration,
    query: KeyQuery,
) -> Result<StatusReport, CliError> {
    match request(config, target, addr, timeout, Request::Status(query)).await? {
        Response::Status(report) => Ok(*report),
        other => Err(CliError::failed(format!(
            "node {} at {addr} sent an unexpected answer: {other:?}",
            target.0
        ))),
    }
}

/// Sends one request to node `target` at `addr`, as a member of the cluster (the
/// credentials of `config`), from an ephemeral local port; a refusal is an error.
pub(crate) async fn request(
    config: &NodeConfig,
    target: NodeId,
    addr: SocketAddr,
    timeout: Duration,
    request: Request,
) -> Result<Response, CliError> {
    // Our own endpoint on an ephemeral port of the target's address family; the node's
    // `listen` port is the node's, and it may be running right beside us.
    let local: SocketAddr =
        if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local)
        .map_err(|e| CliError::failed(format!("cannot bind a local UDP port: {e}")))?;
    let mut quic = config.quic_config();
    // One attempt that may use the whole timeout, not the transport's shorter dial default.
    quic.timeouts.connect = timeout;
    let transport = QuicTransport::from_socket(quic, socket)
        .map_err(|e| CliError::failed(crate::check::transport_error(&e)))?;
    let answer = transport.request(target, request, timeout).await;
    if answer.is_ok() {
        // Close politely so the node frees its side at once, not after an idle timeout.
        // After a failure there is nobody to be polite to: dropping closes at once, where
        // shutdown would wait a second for a handshake that never finished.
        transport.shutdown().await;
    }
    let unreachable =
        |why: String| CliError::failed(format!("cannot reach node {} at {addr}: {why}", target.0));
    match answer {
        Ok(Response::Refused(why)) => {
            Err(CliError::failed(format!("node {} at {addr} refused: {why}", target.0)))
        }
        Ok(other) => Ok(other),
        Err(TransportError::Timeout) => Err(unreachable(format!(
            "no answer within {} ms (is it running, and is the address right?)",
            timeout.as_millis()
        ))),
        Err(TransportError::Unreachable { reason, .. }) => Err(unreachable(reason)),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// The node to ask (`--node`, or the config's own), its address, the config and the
/// timeout: what every command that talks to a running node needs.
pub(crate) fn target(
    args: &Parsed,
    default_timeout_ms: u64,
) -> Result<(NodeConfig, NodeId, SocketAddr, Duration), CliError> {
    let path = args.required("--config")?;
    let node = args.number("--node", 0, u64::MAX)?.map(NodeId);
    let timeout = Duration::from_millis(
        args.number("--timeout-ms", 1, 3_600_000)?.unwrap_or(default_timeout_ms),
    );
    let config = crate::check::read_config(path)?;
    let target = node.unwrap_or(config.id);
    let Some(&addr) = config.peers.get(&target) else {
        let known: Vec<String> = config.peers.keys().map(|n| n.0.to_string()).collect();
        return Err(args.error(format!(
            "--node {}: not in the peer list of {path} ({})",
            target.0,
            known.join(", ")
        )));
    };
    Ok((config, target, addr, timeout))
}

/// A current-thread runtime for one command.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))
}

/// The report as tables for people.
pub fn render(report: &StatusReport, addr: SocketAddr) -> String {
    let node = |n: Option<NodeId>| n.map(|n| n.to_string()).unwrap_or_else(|| "unknown".into());
    let mut out = String::new();
    let members: Vec<String> = report.members.iter().map(NodeId::to_string).collect();
    let mut overview = vec![
        vec!["node".into(), format!("{} ({addr})", node(report.node))],
        vec!["leader".into(), node(report.leader)],
        vec!["term".into(), report.term.to_string()],
        vec!["applied".into(), format!("index {}", report.applied_index)],
        vec!["members".into(), members.join(" ")],
    ];
    if !report.learners.is_empty() {
        let learners: Vec<String> = report.learners.iter().map(NodeId::to_string).collect();
        overview.push(vec!["learners".into(), learners.join(" ")]);
    }
    if let Some(member) = report.member {
        overview.push(vec!["storage".into(), format!("member {member:#x}")]);
    }
    if let Some(left) = report.lease_left_ms {
        let lease =
            if left >= 0 { format!("{left} ms left") } else { format!("lapsed {} ms ago", -left) };
        overview.push(vec!["lease".into(), lease]);
    }
    if let Some(n) = &report.network {
        let observed = n.observed_rtt_ms.map_or("none yet".into(), |ms| format!("{ms} ms"));
        overview.push(vec![
            "round trips".into(),
            format!("slowest {observed}, supported {} ms", n.supported_rtt_ms),
        ]);
    }
    if report.overruns_total > 0 {
        overview.push(vec![
            "overruns".into(),
            format!("{} now, {} ever", report.overruns.len(), report.overruns_total),
        ]);
    }
    out.push_str(&table(None, &overview));
    for w in &report.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }

    out.push_str(&format!("\nsessions: {}\n", report.sessions.len()));
    if !report.sessions.is_empty() {
        let rows: Vec<Vec<String>> = report
            .sessions
            .iter()
            .map(|s| {
                vec![
                    s.session.to_string(),
                    s.node.to_string(),
                    format!("{} ms", s.ttl_ms),
                    s.owned.to_string(),
                ]
            })
            .collect();
        out.push_str(&table(Some(&["SESSION", "NODE", "TTL", "OWNS"]), &rows));
    }

    let sum = &report.key_summary;
    out.push_str(&format!(
        "\nkeys: {} ({} slots: {} owned, {} vacant, {} moving; {} messages queued, {} bytes)\n",
        sum.keys, sum.slots, sum.owned, sum.vacant, sum.moving, sum.queued, sum.queued_bytes
    ));
    if !report.keys.is_empty() {
        let mut rows = Vec::new();
        for key in &report.keys {
            let kind = match key.spec.kind {
                KeyKind::Singleton => "singleton".to_string(),
                KeyKind::Exclusive => format!("exclusive/{}", key.spec.slots),
                KeyKind::Schedule => "schedule".to_string(),
            };
            let candidates: Vec<String> = key.candidates.iter().map(NodeId::to_string).collect();
            let candidates = if candidates.is_empty() { "-".into() } else { candidates.join(",") };
            // A key with no slots (not registered, messages only) still gets its row.
            let owners = if key.owners.is_empty() { vec![None] } else { key.owners.clone() };
            for (slot, owner) in owners.iter().enumerate() {
                let first = slot == 0;
                let (who, token, session) = match owner {
                    Some(o) => (o.node.to_string(), o.token.to_string(), o.session.to_string()),
                    None => ("-".into(), "-".into(), "-".into()),
                };
                let blank = String::new;
                rows.push(vec![
                    if first { display_key(key.key.as_str()) } else { blank() },
                    if first { kind.clone() } else { blank() },
                    slot.to_string(),
                    who,
                    token,
                    session,
                    if first { key.queued.to_string() } else { blank() },
                    if first { key.queued_bytes.to_string() } else { blank() },
                    if first { candidates.clone() } else { blank() },
                ]);
            }
        }
        let headers =
            ["KEY", "KIND", "SLOT", "OWNER", "TOKEN", "SESSION", "QUEUED", "BYTES", "CANDIDATES"];
        out.push_str(&table(Some(&headers), &rows));
    }
    if let Some(after) = &report.next_after {
        out.push_str(&format!(
            "  more keys follow: --after {} for the next page, --prefix to narrow\n",
            display_key(after.as_str())
        ));
    }
    let schedules = report.keys.iter().filter(|k| k.schedule.is_some()).count();
    if schedules > 0 {
        out.push_str(&format!("\nschedules: {schedules}\n"));
        out.push_str(&crate::schedules::render_list(report));
    }
    if !report.queues.is_empty() {
        out.push_str(&format!("\njob queues: {}\n", report.queues.len()));
        out.push_str(&crate::jobs::render_queues(&report.queues));
    }
    out
}

/// Keys are any UTF-8; quote the ones that would break the table's columns or the terminal.
fn display_key(key: &str) -> String {
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        format!("{key:?}")
    } else {
        key.to_string()
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
/// Rows as aligned columns under optional headers (shared by the commands that print tables).
pub(crate) fn table(headers: Option<&[&str]>, rows: &[Vec<String>]) -> String {
    let mut all: Vec<Vec<String>> = Vec::new();
    if let Some(h) = headers {
        all.push(h.iter().map(|s| s.to_string()).collect());
    }
    all.extend(rows.iter().cloned());
    let columns = all.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| all.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &all {
        let mut line = String::from(" ");
        for (c, cell) in row.iter().enumerate() {
            line.push(' ');
            line.push_str(cell);
            if c + 1 < row.len() {
                line.push_str(&" ".repeat(widths[c] - cell.chars().count() + 1));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander::core::wire::{KeyReport, OwnerReport, SessionReport};
    use highlander::{Key, KeySpec, SessionId, Token};

    #[test]
    fn renders_owners_tokens_and_queues() {
        let report = StatusReport {
            node: Some(NodeId(2)),
            leader: Some(NodeId(1)),
            term: 3,
            applied_index: 42,
            members: vec![NodeId(1), NodeId(2), NodeId(3)],
            sessions: vec![SessionReport {
                session: SessionId(5),
                node: NodeId(3),
                ttl_ms: 2000,
                owned: 1,
                superseded: false,
            }],
            keys: vec![
                KeyReport {
                    key: Key::new("irc:#rust").unwrap(),
                    spec: KeySpec::singleton(),
                    owners: vec![Some(OwnerReport {
                        node: NodeId(3),
                        session: SessionId(5),
                        token: Token(7),
                    })],
                    candidates: vec![NodeId(1), NodeId(3)],
                    queued: 4,
                    queued_bytes: 120,
                    schedule: None,
                },
                KeyReport {
                    key: Key::new("two words").unwrap(),
                    spec: KeySpec::exclusive(2),
                    owners: vec![None, None],
                    candidates: vec![],
                    queued: 0,
                    queued_bytes: 0,
                    schedule: None,
                },
            ],
            warnings: vec!["this node's lease lapsed 5 ms ago".into()],
            ..StatusReport::default()
        };
        let text = render(&report, "127.0.0.1:7002".parse().unwrap());
        assert!(text.contains("warning: this node's lease lapsed 5 ms ago"), "{text}");
        let row = |name: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or("");
            line.split_whitespace().map(str::to_string).collect()
        };
        assert_eq!(row("node "), ["node", "n2", "(127.0.0.1:7002)"], "{text}");
        assert_eq!(row("members "), ["members", "n1", "n2", "n3"], "{text}");
        let line = text.lines().find(|l| l.contains("irc:#rust")).unwrap();
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells, ["irc:#rust", "singleton", "0", "n3", "t7", "s5", "4", "120", "n1,n3"]);
        assert!(text.contains("\"two words\"  exclusive/2"), "{text}");
        assert_eq!(text.lines().filter(|l| l.contains(" - ")).count(), 2, "{text}");
    }
}
