//! `highlander members list | add | demote | remove | replace`: the Raft membership, changed through
//! the leader.
//!
//! Each change is a logged, joint-consensus membership change the leader makes; it is safe
//! with any minority of nodes down. The command asks the node of its `node.toml` (or
//! `--via`), follows the answer to the leader, and prints the membership afterwards.

use crate::args::{CliError, Command, Parsed, switch, value};
use highlander::core::wire::{MembershipRefusal, MembershipRequest, Request, Response};
use highlander::quic::QuicTransport;
use highlander::{MembershipReport, NodeConfig, NodeId, Transport};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// The options every `members` command takes.
macro_rules! options {
    () => {
        "

Options:
  --config FILE    a node.toml of the cluster (its credentials and peer list are used)
  --node N         the node to change (add, demote, remove, replace)
  --via N          the node to ask first (default: the config's own node); the command
                   follows it to the leader
  --json           print the membership afterwards as JSON
  --timeout-ms T   how long to wait for the leader's answer (default 10000)"
    };
}

pub static LIST: Command = Command {
    name: "members list",
    usage: "highlander members list --config node.toml [--via N] [--json] [--timeout-ms T]",
    help: concat!(
        "\
Lists the Raft members: for every node, the storage that votes and any storage that only
replicates the log (a learner: a node started on a new disk joins as one), each with its
member id, how far it has caught up and when it last answered the leader.",
        options!()
    ),
    flags: &[value("--config"), value("--via"), switch("--json"), value("--timeout-ms")],
};

pub static ADD: Command = Command {
    name: "members add",
    usage: "highlander members add --config node.toml --node N [--via N] [--json]",
    help: concat!(
        "\
Makes node N a voter. N must be running and have joined as a learner (a node started on an
empty data directory does so by itself). Use it to grow the voter set, or to bring back a
node that was removed.",
        options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--via"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static DEMOTE: Command = Command {
    name: "members demote",
    usage: "highlander members demote --config node.toml --node N [--via N] [--json]",
    help: concat!(
        "\
Takes node N's vote away and keeps it as a learner: it still replicates the log, holds its
session, owns keys and runs jobs, but no longer counts towards a quorum. Use it to shrink the
voter set (3 or 5 voters serve any number of nodes); `members add` gives the vote back.
Refused if N holds the last vote.",
        options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--via"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static REMOVE: Command = Command {
    name: "members remove",
    usage: "highlander members remove --config node.toml --node N [--via N] [--json]",
    help: concat!(
        "\
Removes every storage of node N from the membership, voter or learner. Safe with N down. A
process of N that still runs is told at its next keepalive and stops; to bring N back,
start it on an empty data directory and run `members add`. Refused if N holds the last vote.",
        options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--via"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static REPLACE: Command = Command {
    name: "members replace",
    usage: "highlander members replace --config node.toml --node N [--via N] [--json]",
    help: concat!(
        "\
Makes node N's new storage (a replaced machine or disk, started with the same id and an
empty data directory, joined as a learner) the voter in place of its old one, now. The
leader does this by itself once the old storage has been silent for a session TTL and the
new one has caught up; use this when you know the old one is gone for good.",
        options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--via"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub fn list(args: &Parsed) -> Result<(), CliError> {
    run(args, MembershipRequest::List)
}

pub fn add(args: &Parsed) -> Result<(), CliError> {
    let node = target(args)?;
    run(args, MembershipRequest::Add { node })
}

pub fn demote(args: &Parsed) -> Result<(), CliError> {
    let node = target(args)?;
    run(args, MembershipRequest::Demote { node })
}

pub fn remove(args: &Parsed) -> Result<(), CliError> {
    let node = target(args)?;
    run(args, MembershipRequest::Remove { node })
}

pub fn replace(args: &Parsed) -> Result<(), CliError> {
    let node = target(args)?;
    run(args, MembershipRequest::Replace { node })
}

fn target(args: &Parsed) -> Result<NodeId, CliError> {
    args.number("--node", 0, u64::MAX)?
        .map(NodeId)
        .ok_or_else(|| args.error("--node N is required: the node to change"))
}

fn run(args: &Parsed, request: MembershipRequest) -> Result<(), CliError> {
    let path = args.required("--config")?;
    let config = crate::check::read_config(path)?;
    let via = args.number("--via", 0, u64::MAX)?.map(NodeId).unwrap_or(config.id);
    if !config.peers.contains_key(&via) {
        return Err(args.error(format!("--via {}: not in the peer list of {path}", via.0)));
    }
    if let MembershipRequest::Add { node }
    | MembershipRequest::Remove { node }
    | MembershipRequest::Demote { node }
    | MembershipRequest::Replace { node } = &request
        && !config.peers.contains_key(node)
    {
        return Err(args.error(format!("--node {}: not in the peer list of {path}", node.0)));
    }
    let timeout = Duration::from_millis(
        args.number("--timeout-ms", 1, 3_600_000)?.unwrap_or(DEFAULT_TIMEOUT_MS),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))?;
    let report = runtime.block_on(ask(&config, via, request, timeout))?;
    if args.switch("--json") {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::failed(format!("cannot encode the membership: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// Sends `request` to `via` and on to the leader it names, until answered or `timeout`.
async fn ask(
    config: &NodeConfig,
    via: NodeId,
    request: MembershipRequest,
    timeout: Duration,
) -> Result<MembershipReport, CliError> {
    let addr = config.peers[&via];
    let local: SocketAddr =
        if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local)
        .map_err(|e| CliError::failed(format!("cannot bind a local UDP port: {e}")))?;
    let mut quic = config.quic_config();
    quic.timeouts.connect = timeout.min(Duration::from_secs(3));
    let transport = QuicTransport::from_socket(quic, socket)
        .map_err(|e| CliError::failed(crate::check::transport_error(&e)))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut target = via;
    let mut hops = 0;
    let result = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break Err(CliError::failed(format!(
                "no answer from the leader within {} ms",
                timeout.as_millis()
            )));
        }
        match transport.request(target, Request::Membership(request.clone()), left).await {
            Ok(Response::Membership(Ok(report))) => break Ok(report),
            Ok(Response::Membership(Err(MembershipRefusal::NotLeader { leader }))) => {
                hops += 1;
                match leader {
                    Some(l) if l != target && hops < 8 && config.peers.contains_key(&l) => {
                        target = l;
                    }
                    _ => {
                        // No leader known yet (an election), or nodes naming each other:
                        // ask again shortly, from the start and with a fresh redirect budget
                        // (a budget never refilled would leave us asking `via` alone).
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        hops = 0;
                        target = via;
                    }
                }
            }
            Ok(Response::Membership(Err(MembershipRefusal::Invalid(why)))) => {
                break Err(CliError::failed(format!("refused: {why}")));
            }
            Ok(Response::Membership(Err(MembershipRefusal::Unavailable(why)))) => {
                break Err(CliError::failed(format!("the change did not complete: {why}")));
            }
            Ok(Response::Refused(why)) => {
                break Err(CliError::failed(format!("node {} refused: {why}", target.0)));
            }
            Ok(other) => {
                break Err(CliError::failed(format!(
                    "node {} sent an unexpected answer: {other:?}",
                    target.0
                )));
            }
            Err(e) => {
                break Err(CliError::failed(format!("cannot reach node {}: {e}", target.0)));
            }
        }
    };
    if result.is_ok() {
        transport.shutdown().await;
    }
    result
}

/// The membership as a table for people.
pub fn render(report: &MembershipReport) -> String {
    let mut out = String::new();
    let leader = report.leader.map(|l| l.to_string()).unwrap_or_else(|| "unknown".into());
    out.push_str(&format!("leader {leader}"));
    if report.changing {
        out.push_str(" (a membership change is under way)");
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = report
        .members
        .iter()
        .map(|m| {
            vec![
                m.node.to_string(),
                if m.voter { "voter".into() } else { "learner".into() },
                format!("{:#x}", m.member),
                m.matched.map_or("-".into(), |i| i.to_string()),
                m.answered_ms_ago.map_or("never".into(), |ms| format!("{ms} ms ago")),
            ]
        })
        .collect();
    let headers = ["NODE", "ROLE", "MEMBER", "MATCHED", "ANSWERED"];
    out.push_str(&crate::status::table(Some(&headers), &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander::MemberReport;

    #[test]
    fn renders_voters_and_learners() {
        let report = MembershipReport {
            leader: Some(NodeId(1)),
            changing: false,
            members: vec![
                MemberReport {
                    node: NodeId(1),
                    member: 1,
                    voter: true,
                    matched: Some(40),
                    answered_ms_ago: Some(0),
                },
                MemberReport {
                    node: NodeId(3),
                    member: 0x8000_0000_0000_00ab,
                    voter: false,
                    matched: None,
                    answered_ms_ago: None,
                },
            ],
        };
        let text = render(&report);
        assert!(text.starts_with("leader n1\n"), "{text}");
        let rows: Vec<Vec<&str>> =
            text.lines().skip(2).map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["n1", "voter", "0x1", "40", "0", "ms", "ago"]);
        assert_eq!(rows[1], ["n3", "learner", "0x80000000000000ab", "-", "never"]);
    }
}
