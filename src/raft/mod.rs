//! The Raft glue: every openraft type is behind this module.
//!
//! The rest of the runtime sees a [`RaftNode`] that writes batches of commands, confirms
//! leadership, reports who leads, and serves inbound Raft messages.

mod network;
pub(crate) mod store;
mod transfer;

use crate::config::Timing;
use highlander_core::wire::{RaftMessage, Request, Response};
use highlander_core::{Batch, Command, NodeId, Outcome, Payload, Transport, codec};
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{Config, EmptyNode, ServerState, SnapshotPolicy};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use store::{AppliedState, Storage};

openraft::declare_raft_types!(
    /// highlander's openraft type configuration: entries carry a [`Batch`] of commands and
    /// produce one [`Outcome`] per command.
    pub TypeConfig:
        D = Batch,
        R = Vec<Outcome>,
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
);

pub(crate) type LogId = openraft::LogId<u64>;
type Raft = openraft::Raft<TypeConfig>;

/// Why a write on this node's Raft did not produce outcomes.
#[derive(Debug)]
pub(crate) enum LocalWriteError {
    /// This node does not lead; the hint names who might.
    NotLeader(Option<NodeId>),
    /// No answer within the timeout: the entry may still commit.
    Timeout,
    /// Raft has stopped on this node.
    Stopped(String),
}

/// Why leadership could not be confirmed.
#[derive(Debug)]
pub(crate) enum ConfirmError {
    NotLeader(Option<NodeId>),
    Unconfirmed,
}

/// One node's Raft instance and what the runtime needs of it.
#[derive(Clone)]
pub(crate) struct RaftNode {
    raft: Raft,
    id: NodeId,
    heard: Arc<Heard>,
    snapshots: Arc<transfer::Receiver>,
}

/// When this node last heard from any peer: a Raft request from one, or a response to one
/// of its own.
pub(crate) struct Heard {
    origin: tokio::time::Instant,
    at_ms: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard { origin: tokio::time::Instant::now(), at_ms: std::sync::atomic::AtomicU64::new(0) }
    }

    pub(crate) fn now(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.at_ms.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = self.at_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.origin.elapsed().saturating_sub(Duration::from_millis(last))
    }
}

/// The openraft configuration derived from a node's timing.
fn raft_config(timing: &Timing) -> Result<Arc<Config>, String> {
    let ms = |d: Duration| d.as_millis() as u64;
    let config = Config {
        cluster_name: "highlander".into(),
        heartbeat_interval: ms(timing.heartbeat),
        election_timeout_min: ms(timing.election_min),
        election_timeout_max: ms(timing.election_max),
        install_snapshot_timeout: 10_000,
        // Keeps one AppendEntries well under a frame even with large messages.
        max_payload_entries: 64,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(2_000),
        max_in_snapshot_log_to_keep: 500,
        purge_batch_size: 64,
        ..Config::default()
    };
    config.validate().map(Arc::new).map_err(|e| e.to_string())
}

impl RaftNode {
    /// Starts Raft over `storage`, talking through `transport`.
    /// Starts Raft over `storage`, talking through `transport`. For a data directory, also
    /// returns a watch that tells when Raft has let go of it.
    pub(crate) async fn start(
        id: NodeId,
        timing: &Timing,
        transport: Arc<dyn Transport>,
        storage: Storage,
        applied: Arc<AppliedState>,
    ) -> Result<(RaftNode, Option<highlander_wal::LockWatch>), String> {
        let config = raft_config(timing)?;
        let heard = Arc::new(Heard::new());
        let network = network::Network::new(transport, timing.heartbeat, heard.clone());
        let (log, sm, lock) = store::open(storage, applied)?;
        let snapshots = Arc::new(transfer::Receiver::new(sm.inbox()));
        let raft = Raft::new(id.0, config, network, log, sm).await.map_err(|e| e.to_string())?;
        Ok((RaftNode { raft, id, heard, snapshots }, lock))
    }

    /// Forms the cluster from the static peer list if this node's storage is new. Every node
    /// does this with the same list, which openraft documents as safe; on a node that has
    /// been initialized before it is a no-op.
    pub(crate) async fn initialize(&self, peers: &BTreeSet<NodeId>) -> Result<(), String> {
        let members: BTreeSet<u64> = peers.iter().map(|p| p.0).collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes `commands` as one entry through this node's Raft, if it leads.
    pub(crate) async fn write(
        &self,
        commands: Vec<Command>,
        timeout: Duration,
    ) -> Result<Vec<Outcome>, LocalWriteError> {
        match tokio::time::timeout(timeout, self.raft.client_write(Batch(commands))).await {
            Err(_) => Err(LocalWriteError::Timeout),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(LocalWriteError::NotLeader(f.leader_id.map(NodeId)))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(LocalWriteError::Stopped(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(LocalWriteError::Stopped(f.to_string())),
        }
    }

    /// Confirms, with a heartbeat round begun now, that this node still leads, and waits until
    /// everything committed before that moment is applied here.
    pub(crate) async fn confirm_leadership(&self, timeout: Duration) -> Result<(), ConfirmError> {
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ConfirmError::Unconfirmed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ConfirmError::NotLeader(f.leader_id.map(NodeId)))
            }
            Ok(Err(_)) => Err(ConfirmError::Unconfirmed),
        }
    }

    /// The leader this node knows of: a routing hint, never authority.
    pub(crate) fn leader_hint(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader.map(NodeId)
    }

    /// This node's current term.
    pub(crate) fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The members of the cluster as this node knows them.
    pub(crate) fn members(&self) -> Vec<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .map(NodeId)
            .collect()
    }

    /// Watches leadership: yields `Some(term)` while this node believes it leads.
    pub(crate) fn leadership(
        &self,
    ) -> tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<u64, EmptyNode>> {
        self.raft.server_metrics()
    }

    /// Whether this node believes it leads, and in which term.
    pub(crate) fn leading_term(
        id: NodeId,
        m: &openraft::metrics::RaftServerMetrics<u64, EmptyNode>,
    ) -> Option<u64> {
        (m.state == ServerState::Leader && m.current_leader == Some(id.0))
            .then_some(m.vote.leader_id().term)
    }

    /// Sends a heartbeat to every follower now; it carries the commit index, so followers
    /// apply what was just committed without waiting for the next tick.
    pub(crate) async fn heartbeat(&self) {
        let _ = self.raft.trigger().heartbeat().await;
    }

    /// This node's id.
    pub(crate) fn id(&self) -> NodeId {
        self.id
    }

    /// Whether Raft has stopped (shut down or failed).
    pub(crate) fn is_stopped(&self) -> bool {
        self.raft.metrics().borrow().running_state.is_err()
    }

    /// Keeps a node whose messages get no answers from calling elections, until they do.
    ///
    /// openraft 0.9 has no pre-vote: a node cut off one way (it reaches the others, nothing
    /// reaches it) campaigns with ever higher terms, the others grant its votes (their leader
    /// lease has run out, and granting resets their own election timers) and no leader is
    /// ever elected while the cut lasts. Such a node could never win anyway, since no vote
    /// reaches it; and whether elections happen never affects Raft's safety, only liveness.
    ///
    /// Silence alone does not tell a cut-off node from a quiet cluster (after a heal, say,
    /// every node may have gone quiet), so a node that has heard nothing for a while pings
    /// its peers: an answer means it can be heard, and it calls elections again.
    pub(crate) async fn quiet_when_unheard(self, timing: Timing, transport: Arc<dyn Transport>) {
        let peers: Vec<NodeId> = self.members().into_iter().filter(|m| *m != self.id).collect();
        if peers.is_empty() {
            return;
        }
        let limit = timing.election_max * 3;
        let mut electing = true;
        let mut tick = tokio::time::interval(timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probes = tokio::task::JoinSet::new();
        loop {
            tick.tick().await;
            while probes.try_join_next().is_some() {}
            let silent = self.heard.silent_for();
            if silent > limit / 2 && probes.is_empty() {
                for peer in &peers {
                    let (transport, heard, peer) = (transport.clone(), self.heard.clone(), *peer);
                    let timeout = timing.heartbeat * 2;
                    probes.spawn(async move {
                        if let Ok(Response::Pong) =
                            transport.request(peer, Request::Ping, timeout).await
                        {
                            heard.now();
                        }
                    });
                }
            }
            let silent = self.heard.silent_for();
            if electing && silent > limit {
                tracing::warn!(node = %self.id, silent_ms = silent.as_millis() as u64, "no peer heard from: not calling elections until one is");
                self.raft.runtime_config().elect(false);
                electing = false;
            } else if !electing && silent <= limit {
                tracing::info!(node = %self.id, "a peer is heard again: calling elections when needed");
                self.raft.runtime_config().elect(true);
                electing = true;
            }
        }
    }

    /// Serves one inbound Raft message. Never panics on bad bytes: they get a refusal.
    pub(crate) async fn serve(&self, message: RaftMessage) -> Response {
        self.heard.now();
        fn reply<T: serde::Serialize>(value: &T) -> Response {
            match codec::encode(value) {
                Ok(bytes) => Response::Raft(Payload::from(bytes)),
                Err(e) => Response::Refused(format!("cannot encode response: {e}")),
            }
        }
        match message {
            RaftMessage::AppendEntries(body) => match codec::decode(body.as_bytes()) {
                Ok(rpc) => reply(&self.raft.append_entries(rpc).await),
                Err(e) => Response::Refused(format!("bad AppendEntries: {e}")),
            },
            RaftMessage::Vote(body) => match codec::decode(body.as_bytes()) {
                Ok(rpc) => reply(&self.raft.vote(rpc).await),
                Err(e) => Response::Refused(format!("bad Vote: {e}")),
            },
            RaftMessage::Snapshot(body) => match codec::decode(body.as_bytes()) {
                Ok(chunk) => self.receive_snapshot_chunk(chunk).await,
                Err(e) => Response::Refused(format!("bad snapshot chunk: {e}")),
            },
        }
    }

    /// Takes one chunk of a snapshot from the leader; the last one installs it.
    async fn receive_snapshot_chunk(&self, chunk: transfer::Chunk) -> Response {
        let current = self.raft.metrics().borrow().vote;
        let step = self.snapshots.accept(chunk, current).await;
        let reply = |r: &Result<transfer::ChunkReply, openraft::error::Fatal<u64>>| {
            match codec::encode(r) {
                Ok(bytes) => Response::Raft(Payload::from(bytes)),
                Err(e) => Response::Refused(format!("cannot encode response: {e}")),
            }
        };
        match step {
            Ok(transfer::Step::Reply(r)) => reply(&Ok(r)),
            Ok(transfer::Step::Install { vote, meta, data }) => {
                let id = meta.snapshot_id.clone();
                let snapshot = openraft::Snapshot { meta, snapshot: Box::new(data) };
                let result = self.raft.install_full_snapshot(vote, snapshot).await;
                self.snapshots.installed().await;
                tracing::info!(node = %self.id, snapshot = %id, ok = result.is_ok(), "snapshot received");
                reply(&result.map(transfer::ChunkReply::Done))
            }
            Err(why) => {
                tracing::warn!(node = %self.id, reason = %why, "snapshot chunk refused");
                Response::Refused(why)
            }
        }
    }

    /// Stops Raft.
    pub(crate) async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        self.snapshots.close().await;
    }
}

pub(crate) use network::response_kind;

#[cfg(test)]
mod tests {
    use super::TypeConfig;
    use super::store::{AppliedState, MemLog, MemStorage, StateMachine};
    use openraft::StorageError;
    use openraft::testing::{StoreBuilder, Suite};

    struct MemBuilder;

    impl StoreBuilder<TypeConfig, MemLog, StateMachine, ()> for MemBuilder {
        async fn build(&self) -> Result<((), MemLog, StateMachine), StorageError<u64>> {
            let storage = MemStorage::new();
            let sm = StateMachine::in_memory(storage.clone(), AppliedState::new())?;
            Ok(((), MemLog::new(storage), sm))
        }
    }

    /// openraft's own storage suite, run against the in-memory store.
    #[test]
    fn openraft_storage_suite() {
        Suite::test_all(MemBuilder).unwrap();
    }
}
