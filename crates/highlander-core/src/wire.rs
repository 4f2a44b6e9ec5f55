//! What nodes say to each other. Every frame on every transport is one [`Request`] or one
//! [`Response`], encoded by [`codec`](crate::codec).

use crate::command::{Command, KeySpec, Outcome};
use crate::{Key, NodeId, Payload, SessionId, Token};
use serde::{Deserialize, Serialize};

/// The protocol version, carried in the transport handshake (ALPN for QUIC).
pub const PROTOCOL_VERSION: u32 = 1;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A Raft message, encoded by the Raft glue; core does not look inside.
    Raft(RaftMessage),
    /// Commands forwarded to the leader, to be written as one entry.
    Write(Vec<Command>),
    /// A session keepalive, answered by the leader once it has confirmed its leadership.
    KeepAlive {
        /// The session to renew.
        session: SessionId,
        /// How long the sender's lease has been lapsed, in milliseconds (0 while valid).
        lapsed_ms: u64,
    },
    /// A report of what the receiving node knows.
    Status,
    /// Are you there? Answered with [`Response::Pong`]; a node that hears no peer probes
    /// with it whether its own messages get answers.
    Ping,
}

/// The kinds of Raft message, each carrying the encoded openraft request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftMessage {
    /// AppendEntries (also the heartbeat).
    AppendEntries(Payload),
    /// RequestVote.
    Vote(Payload),
    /// One chunk of a snapshot the leader is sending (the runtime defines its contents).
    Snapshot(Payload),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The encoded openraft response (or openraft error) to a [`Request::Raft`].
    Raft(Payload),
    /// The result of a [`Request::Write`].
    Write(Result<Vec<Outcome>, WriteRefusal>),
    /// The answer to a keepalive.
    KeepAlive(KeepAliveReply),
    /// The receiving node's report.
    Status(Box<StatusReport>),
    /// The node cannot serve the request (shutting down, or the request was malformed).
    Refused(String),
    /// The answer to a [`Request::Ping`].
    Pong,
}

/// Why a forwarded write was not written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteRefusal {
    /// The receiver is not the leader; `leader` is its best guess.
    #[error("not the leader (leader is {leader:?})")]
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The receiver could not complete the write; the outcome is unknown.
    #[error("write did not complete: {0}")]
    Unavailable(String),
}

/// The leader's answer to a keepalive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepAliveReply {
    /// Renewed: the lease runs from when the keepalive was sent.
    Renewed,
    /// The receiver is not the leader; `leader` is its best guess.
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The session has ended or is being expired: the node must stop its tasks and open a
    /// new session.
    SessionEnded,
    /// The leader could not confirm its leadership in time; try again.
    Unconfirmed,
}

/// A node's report of the cluster as it has applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The reporting node.
    pub node: Option<NodeId>,
    /// The leader it knows of (a hint, not authority).
    pub leader: Option<NodeId>,
    /// Its current Raft term.
    pub term: u64,
    /// The index of the last entry it applied.
    pub applied_index: u64,
    /// The members of the cluster.
    pub members: Vec<NodeId>,
    /// Live sessions.
    pub sessions: Vec<SessionReport>,
    /// Keys, their owners and queue depths.
    pub keys: Vec<KeyReport>,
}

/// One live session in a [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// The session.
    pub session: SessionId,
    /// Its node.
    pub node: NodeId,
    /// Session TTL in milliseconds.
    pub ttl_ms: u64,
    /// Slots it owns.
    pub owned: usize,
}

/// One key in a [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The key.
    pub key: Key,
    /// How it runs.
    pub spec: KeySpec,
    /// Per slot, the owner if any.
    pub owners: Vec<Option<OwnerReport>>,
    /// Nodes that registered the key.
    pub candidates: Vec<NodeId>,
    /// Messages queued and not yet acknowledged.
    pub queued: u64,
    /// Their payload bytes.
    pub queued_bytes: u64,
}

/// The owner of one slot in a [`StatusReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReport {
    /// The owner's node.
    pub node: NodeId,
    /// Its session.
    pub session: SessionId,
    /// Its fencing token.
    pub token: Token,
}

impl crate::state::ClusterState {
    /// Describes the state for a [`StatusReport`] (sessions and keys).
    pub fn report(&self) -> (Vec<SessionReport>, Vec<KeyReport>) {
        let sessions = self
            .sessions
            .values()
            .map(|s| SessionReport {
                session: s.id,
                node: s.node(),
                ttl_ms: s.lease.ttl_ms,
                owned: s.owned.len(),
            })
            .collect();
        let node_of = |id: &SessionId| self.sessions.get(id).map(|s| s.node());
        let keys = self
            .keys
            .iter()
            .map(|(key, k)| KeyReport {
                key: key.clone(),
                spec: k.spec,
                owners: k
                    .slots
                    .iter()
                    .map(|o| {
                        o.and_then(|o| {
                            node_of(&o.session).map(|node| OwnerReport {
                                node,
                                session: o.session,
                                token: o.token,
                            })
                        })
                    })
                    .collect(),
                candidates: k.candidates.iter().filter_map(node_of).collect(),
                queued: k.queue.messages.len() as u64,
                queued_bytes: k.queue.bytes,
            })
            .collect();
        (sessions, keys)
    }
}
