//! The Raft glue: every openraft type is behind this module.
//!
//! The rest of the runtime sees a [`RaftNode`] that writes batches of commands, confirms
//! leadership, reports who leads, serves inbound Raft messages and changes the membership.
//!
//! **Members are storages, not nodes.** A Raft member id names one incarnation of a node's
//! storage: the node id itself for the storages that formed the cluster, a fresh random
//! number for storage that joined later (a wiped disk, a replaced machine). The membership
//! maps each member to its node ([`Member`]), so messages are routed by node and delivered
//! only to the storage they are for. A node that lost its storage therefore never speaks as
//! the member it was: that member may have voted and acknowledged entries the new storage
//! does not hold, and letting it vote again could elect a leader without committed entries.
//!
//! A node on empty storage learns its member id from its peers before Raft can start (see
//! `membership`), so a [`RaftNode`] is created unstarted and started once the id is known.

mod network;
mod prevote;
pub(crate) mod store;
mod transfer;

use crate::config::Timing;
use highlander_core::wire::{
    MemberReport, MembershipRefusal, MembershipReport, RaftMessage, Request, Response,
};
use highlander_core::{Batch, Command, NodeId, Outcome, Payload, Transport, codec};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, InitializeError, RaftError,
};
use openraft::metrics::RaftServerMetrics;
use openraft::raft::VoteRequest;
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use store::{Log, StateMachine};
use tokio::sync::watch;
use tokio::time::Instant;

pub(crate) use network::response_kind;

/// What the membership records of a Raft member: the node of the static peer list whose
/// storage it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node id.
    pub node: u64,
}

openraft::declare_raft_types!(
    /// highlander's openraft type configuration: entries carry a [`Batch`] of commands and
    /// produce one [`Outcome`] per command; members are storages ([`Member`]).
    pub TypeConfig:
        D = Batch,
        R = Vec<Outcome>,
        NodeId = u64,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
);

pub(crate) type LogId = openraft::LogId<u64>;
type Raft = openraft::Raft<TypeConfig>;
pub(crate) type ServerMetrics = RaftServerMetrics<u64, Member>;

/// What becomes of the voters a voter change leaves out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leavers {
    /// They leave the membership (their storage is gone, or the node is being removed).
    Removed,
    /// They stay as learners (a demotion).
    Learners,
}

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

/// One node's Raft instance (once started) and what the runtime needs of it.
#[derive(Clone)]
pub(crate) struct RaftNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    timing: Timing,
    started: OnceLock<Started>,
    /// openraft's server metrics, forwarded once Raft runs; default until then.
    server: watch::Sender<ServerMetrics>,
    peers: Arc<PeerHealth>,
    /// Whether this node leads or heard its leader within the lease: a follower whose leader
    /// is gone keeps naming it in openraft's metrics until an election, which pre-vote may
    /// rightly never allow (a minority), so the hint is dropped instead.
    leader_heard: Arc<AtomicBool>,
}

struct Started {
    raft: Raft,
    member: u64,
    tail: store::Tail,
    snapshots: Arc<transfer::Receiver>,
}

/// What this node saw of its peers' answers: when each member last answered a Raft request,
/// and the round trips (Raft, keepalive, probes) of the last [`RTT_WINDOW`].
pub(crate) struct PeerHealth {
    answered: Mutex<BTreeMap<u64, Instant>>,
    samples: Mutex<VecDeque<(Instant, Duration)>>,
    timeouts: Mutex<VecDeque<Instant>>,
}

/// How far back round trips and timeouts count for the network report.
pub(crate) const RTT_WINDOW: Duration = Duration::from_secs(10);

impl PeerHealth {
    fn new() -> PeerHealth {
        PeerHealth {
            answered: Mutex::default(),
            samples: Mutex::default(),
            timeouts: Mutex::default(),
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Member `member` answered a Raft request.
    pub(crate) fn answered(&self, member: u64) {
        Self::lock(&self.answered).insert(member, Instant::now());
    }

    /// How long ago member `member` last answered, if it ever did.
    pub(crate) fn answered_ago(&self, member: u64) -> Option<Duration> {
        Self::lock(&self.answered).get(&member).map(|t| t.elapsed())
    }

    /// A round trip to a peer took `rtt`.
    pub(crate) fn round_trip(&self, rtt: Duration) {
        let now = Instant::now();
        let mut s = Self::lock(&self.samples);
        s.push_back((now, rtt));
        while s.front().is_some_and(|(t, _)| now.duration_since(*t) > RTT_WINDOW) || s.len() > 4096
        {
            s.pop_front();
        }
    }

    /// A request to a peer got no answer in time.
    pub(crate) fn timed_out(&self) {
        let now = Instant::now();
        let mut t = Self::lock(&self.timeouts);
        t.push_back(now);
        while t.front().is_some_and(|t| now.duration_since(*t) > RTT_WINDOW) || t.len() > 4096 {
            t.pop_front();
        }
    }

    /// The slowest round trip of the window, and the timeouts in it.
    pub(crate) fn recent(&self) -> (Option<Duration>, u64) {
        let now = Instant::now();
        let slowest = Self::lock(&self.samples)
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= RTT_WINDOW)
            .map(|(_, d)| *d)
            .max();
        let timeouts = Self::lock(&self.timeouts)
            .iter()
            .filter(|t| now.duration_since(**t) <= RTT_WINDOW)
            .count() as u64;
        (slowest, timeouts)
    }
}

/// The openraft configuration derived from a node's timing.
///
/// openraft 0.9 uses `heartbeat_interval` as the timeout of every AppendEntries and of every
/// heartbeat of a leadership confirmation (and ticks every 1.5 heartbeats), so the heartbeat
/// is also the longest round trip plus follower fsync the cluster tolerates:
/// [`Timing::supported_rtt`] and [`Timing::validate`] are built on that.
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
        // Elections are called by `prevote` instead: openraft 0.9 has no pre-vote.
        enable_elect: false,
        ..Config::default()
    };
    config.validate().map(Arc::new).map_err(|e| e.to_string())
}

impl RaftNode {
    /// A node whose Raft has not started yet: until [`start`](Self::start), it leads nothing,
    /// knows no leader, refuses writes with "not leader" and Raft messages as for another
    /// member.
    pub(crate) fn new(id: NodeId, timing: Timing) -> RaftNode {
        RaftNode {
            inner: Arc::new(Inner {
                id,
                timing,
                started: OnceLock::new(),
                server: watch::channel(ServerMetrics::default()).0,
                peers: Arc::new(PeerHealth::new()),
                leader_heard: Arc::new(AtomicBool::new(true)),
            }),
        }
    }

    /// Starts Raft as member `member` over the opened storage, talking through `transport`.
    /// Then forwards openraft's server metrics until Raft stops; run it as a task.
    pub(crate) async fn start(
        &self,
        member: u64,
        log: Log,
        sm: StateMachine,
        transport: Arc<dyn Transport>,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let config = raft_config(&inner.timing)?;
        let network = network::Network::new(transport, &inner.timing, inner.peers.clone());
        let snapshots = Arc::new(transfer::Receiver::new(sm.inbox()));
        let tail = log.tail();
        let raft = Raft::new(member, config, network, log, sm).await.map_err(|e| e.to_string())?;
        inner
            .started
            .set(Started { raft, member, tail, snapshots })
            .map_err(|_| "raft started twice".to_string())?;
        Ok(())
    }

    /// Forwards openraft's server metrics into this node's view until Raft stops.
    pub(crate) async fn forward_metrics(self) {
        let Some(s) = self.inner.started.get() else { return };
        let mut rx = s.raft.server_metrics();
        loop {
            let m = rx.borrow_and_update().clone();
            self.inner.server.send_replace(m);
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn raft(&self) -> Option<&Raft> {
        self.inner.started.get().map(|s| &s.raft)
    }

    /// This node's Raft member id, once started.
    pub(crate) fn member(&self) -> Option<u64> {
        self.inner.started.get().map(|s| s.member)
    }

    /// Forms the cluster from the static peer list: every peer's first storage is the member
    /// named by its node id. Every node that bootstraps does this with the same list, which
    /// openraft documents as safe; on a node that has been initialized before it is a no-op.
    pub(crate) async fn initialize(&self, peers: &BTreeSet<NodeId>) -> Result<(), String> {
        let Some(raft) = self.raft() else { return Err("raft has not started".into()) };
        let members: BTreeMap<u64, Member> =
            peers.iter().map(|p| (p.0, Member { node: p.0 })).collect();
        match raft.initialize(members).await {
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
        let Some(raft) = self.raft() else { return Err(LocalWriteError::NotLeader(None)) };
        match tokio::time::timeout(timeout, raft.client_write(Batch(commands))).await {
            Err(_) => Err(LocalWriteError::Timeout),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(LocalWriteError::NotLeader(f.leader_node.map(|m| NodeId(m.node))))
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
        let Some(raft) = self.raft() else { return Err(ConfirmError::NotLeader(None)) };
        match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
            Err(_) => Err(ConfirmError::Unconfirmed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(ConfirmError::NotLeader(f.leader_node.map(|m| NodeId(m.node))))
            }
            Ok(Err(_)) => Err(ConfirmError::Unconfirmed),
        }
    }

    /// The node of the leader this node knows of: a routing hint, never authority.
    pub(crate) fn leader_hint(&self) -> Option<NodeId> {
        if !self.inner.leader_heard.load(Ordering::Relaxed) {
            return None;
        }
        let m = self.inner.server.borrow();
        let leader = m.current_leader?;
        m.membership_config.membership().get_node(&leader).map(|n| NodeId(n.node))
    }

    /// This node's current term.
    pub(crate) fn term(&self) -> u64 {
        self.inner.server.borrow().vote.leader_id().term
    }

    /// The nodes whose storage votes, as this node knows them.
    pub(crate) fn members(&self) -> Vec<NodeId> {
        let m = self.inner.server.borrow();
        let membership = m.membership_config.membership();
        let nodes: BTreeSet<NodeId> = membership
            .voter_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| NodeId(n.node)))
            .collect();
        nodes.into_iter().collect()
    }

    /// The nodes whose storage replicates the log without voting.
    pub(crate) fn learners(&self) -> Vec<NodeId> {
        let m = self.inner.server.borrow();
        let membership = m.membership_config.membership();
        let nodes: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter_map(|id| membership.get_node(&id).map(|n| NodeId(n.node)))
            .collect();
        nodes.into_iter().collect()
    }

    /// Whether this node's storage votes in a membership that is not half-way through a
    /// change (in a joint configuration a storage may vote in only one of its halves).
    pub(crate) fn is_voter(&self) -> bool {
        let Some(me) = self.member() else { return false };
        let m = self.inner.server.borrow();
        let joint = m.membership_config.membership().get_joint_config();
        joint.len() == 1 && joint[0].contains(&me)
    }

    /// Whether this node knows any membership: its storage has been part of a cluster.
    pub(crate) fn knows_a_cluster(&self) -> bool {
        self.member().is_some()
            && self.inner.server.borrow().membership_config.membership().nodes().next().is_some()
    }

    /// Watches leadership: see [`leading_term`](Self::leading_term).
    pub(crate) fn leadership(&self) -> watch::Receiver<ServerMetrics> {
        self.inner.server.subscribe()
    }

    /// Whether this node believes it leads, and in which term.
    pub(crate) fn leading_term(&self, m: &ServerMetrics) -> Option<u64> {
        let me = self.member()?;
        (m.state == ServerState::Leader && m.current_leader == Some(me))
            .then_some(m.vote.leader_id().term)
    }

    /// Sends a heartbeat to every follower now; it carries the commit index, so followers
    /// apply what was just committed without waiting for the next tick.
    pub(crate) async fn heartbeat(&self) {
        if let Some(raft) = self.raft() {
            let _ = raft.trigger().heartbeat().await;
        }
    }

    /// This node's id.
    pub(crate) fn id(&self) -> NodeId {
        self.inner.id
    }

    /// What this node saw of its peers' answers and round trips.
    pub(crate) fn peer_health(&self) -> &PeerHealth {
        &self.inner.peers
    }

    /// Why Raft stopped on this node (a storage failure, a panic in openraft), if it did
    /// other than by [`shutdown`](Self::shutdown).
    pub(crate) fn fatal(&self) -> Option<String> {
        let raft = self.raft()?;
        match &raft.metrics().borrow().running_state {
            Ok(()) => None,
            Err(f) => Some(f.to_string()),
        }
    }

    /// Whether Raft has stopped (shut down or failed).
    pub(crate) fn is_stopped(&self) -> bool {
        self.fatal().is_some()
    }

    /// Resolves when Raft stops on this node, with the reason.
    pub(crate) async fn stopped(&self) -> String {
        let Some(raft) = self.raft() else { return std::future::pending().await };
        let mut rx = raft.metrics();
        loop {
            if let Err(f) = &rx.borrow_and_update().running_state {
                return f.to_string();
            }
            if rx.changed().await.is_err() {
                return "raft stopped".into();
            }
        }
    }

    /// Calls elections on this node when a quorum of voters has lost the leader, with
    /// pre-vote (see `prevote`); runs until Raft stops.
    pub(crate) async fn campaign_when_leaderless(self, transport: Arc<dyn Transport>) {
        let Some(s) = self.inner.started.get() else { return };
        prevote::campaign_when_leaderless(
            s.raft.clone(),
            s.member,
            s.tail.clone(),
            self.inner.timing,
            transport,
            self.inner.leader_heard.clone(),
        )
        .await
    }

    /// Measures the round trip to every peer once per keepalive interval, with a generous
    /// timeout (openraft's own requests time out after one heartbeat, so a slow network shows
    /// only as timeouts there), and says in the log when the slowest recent round trip passes
    /// what the timing supports, and when it is back within it.
    pub(crate) async fn watch_round_trips(self, peers: Vec<NodeId>, transport: Arc<dyn Transport>) {
        let timing = self.inner.timing;
        let peers: Vec<NodeId> = peers.into_iter().filter(|m| *m != self.inner.id).collect();
        if peers.is_empty() {
            return;
        }
        let timeout = (timing.election_max * 4).max(Duration::from_secs(1));
        let mut tick = tokio::time::interval(timing.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            let mut probes = tokio::task::JoinSet::new();
            for peer in &peers {
                let (transport, health, peer) =
                    (transport.clone(), self.inner.peers.clone(), *peer);
                probes.spawn(async move {
                    let sent = Instant::now();
                    if let Ok(Response::Pong) =
                        transport.request(peer, Request::Ping, timeout).await
                    {
                        health.round_trip(sent.elapsed());
                    }
                });
            }
            while probes.join_next().await.is_some() {}
            match (self.timing_warning(), warned) {
                (Some(w), false) => {
                    tracing::warn!(node = %self.inner.id, "{w}");
                    warned = true;
                }
                (None, true) => {
                    tracing::info!(node = %self.inner.id, "round trips to peers are within what the timing supports again");
                    warned = false;
                }
                _ => {}
            }
        }
    }

    /// What the recent round trips say about the timing, if it does not fit the network.
    pub(crate) fn timing_warning(&self) -> Option<String> {
        let (slowest, _) = self.inner.peers.recent();
        let supported = self.inner.timing.supported_rtt();
        let slowest = slowest.filter(|s| *s > supported)?;
        Some(format!(
            "round trips to peers take up to {} ms, more than the {} ms this node's timing \
             supports (openraft 0.9 gives every AppendEntries and leadership confirmation one \
             heartbeat, {} ms): entries may not commit and leases lapse. Use a timing built \
             for the network: Timing::for_rtt, or [timing] rtt_ms / preset = \"wan\"",
            slowest.as_millis(),
            supported.as_millis(),
            self.inner.timing.heartbeat.as_millis()
        ))
    }

    /// Serves one inbound Raft message for member `to`. Never panics on bad bytes: they get
    /// a refusal. A message for another member than this node's storage is not delivered:
    /// it was meant for storage this node no longer has.
    pub(crate) async fn serve(&self, to: u64, message: RaftMessage) -> Response {
        let Some(started) = self.inner.started.get().filter(|s| s.member == to) else {
            return Response::WrongMember { current: self.member() };
        };
        let raft = &started.raft;
        fn reply<T: serde::Serialize>(value: &T) -> Response {
            match codec::encode(value) {
                Ok(bytes) => Response::Raft(Payload::from(bytes)),
                Err(e) => Response::Refused(format!("cannot encode response: {e}")),
            }
        }
        match message {
            RaftMessage::AppendEntries(body) => match codec::decode(body.as_bytes()) {
                Ok(rpc) => reply(&raft.append_entries(rpc).await),
                Err(e) => Response::Refused(format!("bad AppendEntries: {e}")),
            },
            // Votes are granted on term and log alone, as Raft says: a voter whose view of the
            // membership lags must still be able to elect a candidate that a newer
            // configuration made a voter, or no leader could bring it up to date.
            RaftMessage::Vote(body) => match codec::decode::<VoteRequest<u64>>(body.as_bytes()) {
                Ok(rpc) => reply(&raft.vote(rpc).await),
                Err(e) => Response::Refused(format!("bad Vote: {e}")),
            },
            RaftMessage::Snapshot(body) => match codec::decode(body.as_bytes()) {
                Ok(chunk) => self.receive_snapshot_chunk(started, chunk).await,
                Err(e) => Response::Refused(format!("bad snapshot chunk: {e}")),
            },
            RaftMessage::PreVote(body) => {
                match codec::decode::<VoteRequest<u64>>(body.as_bytes()) {
                    Ok(rpc) => prevote::answer(raft, &started.tail, &self.inner.timing, &rpc).await,
                    Err(e) => Response::Refused(format!("bad PreVote: {e}")),
                }
            }
        }
    }

    /// Takes one chunk of a snapshot from the leader; the last one installs it.
    async fn receive_snapshot_chunk(&self, started: &Started, chunk: transfer::Chunk) -> Response {
        let raft = &started.raft;
        let current = raft.metrics().borrow().vote;
        let step = started.snapshots.accept(chunk, current).await;
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
                let result = raft.install_full_snapshot(vote, snapshot).await;
                started.snapshots.installed().await;
                tracing::info!(node = %self.inner.id, snapshot = %id, ok = result.is_ok(), "snapshot received");
                reply(&result.map(transfer::ChunkReply::Done))
            }
            Err(why) => {
                tracing::warn!(node = %self.inner.id, reason = %why, "snapshot chunk refused");
                Response::Refused(why)
            }
        }
    }

    /// The membership as this node (the leader, for an authoritative answer) knows it.
    pub(crate) fn membership_report(&self) -> MembershipReport {
        let Some(raft) = self.raft() else { return MembershipReport::default() };
        let m = raft.metrics().borrow().clone();
        let config = m.membership_config.membership();
        let changing = config.get_joint_config().len() > 1;
        let voters: BTreeSet<u64> = config.voter_ids().collect();
        let mut members: Vec<MemberReport> = config
            .nodes()
            .map(|(id, node)| {
                let me = Some(*id) == self.member();
                MemberReport {
                    node: NodeId(node.node),
                    member: *id,
                    voter: voters.contains(id),
                    matched: match (&m.replication, me) {
                        (_, true) => m.last_log_index,
                        (Some(r), false) => r.get(id).cloned().flatten().map(|l| l.index),
                        (None, false) => None,
                    },
                    answered_ms_ago: if me {
                        Some(0)
                    } else {
                        self.inner.peers.answered_ago(*id).map(|d| d.as_millis() as u64)
                    },
                }
            })
            .collect();
        members.sort_by_key(|r| (!r.voter, r.node, r.member));
        MembershipReport { leader: self.leader_hint(), changing, members }
    }

    /// Adds `member`, storage of `node`, as a learner (the leader then replicates the log or
    /// a snapshot to it), and removes older learner storages of the same node.
    pub(crate) async fn add_learner(
        &self,
        node: NodeId,
        member: u64,
        timeout: Duration,
    ) -> Result<(), MembershipRefusal> {
        let raft = self.leading_raft()?;
        let config = raft.metrics().borrow().membership_config.membership().clone();
        if let Some(other) = config.get_node(&member).filter(|m| m.node != node.0) {
            return Err(MembershipRefusal::Invalid(format!(
                "member id {member:#x} is storage of node {}; start node {} on an empty data \
                 directory again to draw another",
                other.node, node.0
            )));
        }
        if config.get_node(&member).is_none() {
            changing(timeout, || raft.add_learner(member, Member { node: node.0 }, false)).await?;
        }
        let stale: BTreeSet<u64> = config
            .learner_ids()
            .filter(|id| *id != member)
            .filter(|id| config.get_node(id).is_some_and(|n| n.node == node.0))
            .collect();
        if !stale.is_empty() {
            changing(timeout, || {
                raft.change_membership(ChangeMembers::RemoveNodes(stale.clone()), false)
            })
            .await?;
        }
        Ok(())
    }

    /// Makes the voters exactly `voters` (members already in the membership); the voters
    /// that leave are removed or stay as learners, as `leavers` says. Joint consensus: safe
    /// with any minority of nodes down.
    pub(crate) async fn set_voters(
        &self,
        voters: BTreeSet<u64>,
        leavers: Leavers,
        timeout: Duration,
    ) -> Result<(), MembershipRefusal> {
        let raft = self.leading_raft()?;
        if voters.is_empty() {
            return Err(MembershipRefusal::Invalid("a cluster needs at least one voter".into()));
        }
        let retain = leavers == Leavers::Learners;
        changing(timeout, || {
            raft.change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), retain)
        })
        .await
    }

    /// Completes a joint configuration that no change is completing any more: openraft 0.9
    /// leaves the cluster joint when the leader that began a change loses leadership before
    /// its second step, and refuses further changes meanwhile. Returns whether there was one.
    pub(crate) async fn finish_joint_change(
        &self,
        timeout: Duration,
    ) -> Result<bool, MembershipRefusal> {
        let raft = self.leading_raft()?;
        let last = {
            let metrics = raft.metrics().borrow().membership_config.clone();
            let joint = metrics.membership().get_joint_config();
            if joint.len() <= 1 {
                return Ok(false);
            }
            joint.last().cloned().unwrap_or_default()
        };
        tracing::info!(node = %self.inner.id, voters = ?last, "completing an interrupted membership change");
        changing(timeout, || {
            raft.change_membership(ChangeMembers::ReplaceAllVoters(last.clone()), false)
        })
        .await
        .map(|()| true)
    }

    /// Removes `members` from the membership altogether (voters must have left the voter set
    /// first: see [`set_voters`](Self::set_voters)).
    pub(crate) async fn remove_members(
        &self,
        members: BTreeSet<u64>,
        timeout: Duration,
    ) -> Result<(), MembershipRefusal> {
        let raft = self.leading_raft()?;
        changing(timeout, || {
            raft.change_membership(ChangeMembers::RemoveNodes(members.clone()), false)
        })
        .await
    }

    fn leading_raft(&self) -> Result<&Raft, MembershipRefusal> {
        let raft = self.raft().ok_or(MembershipRefusal::NotLeader { leader: None })?;
        let m = self.inner.server.borrow().clone();
        if self.leading_term(&m).is_none() {
            return Err(MembershipRefusal::NotLeader { leader: self.leader_hint() });
        }
        Ok(raft)
    }

    /// Stops Raft.
    pub(crate) async fn shutdown(&self) {
        if let Some(s) = self.inner.started.get() {
            if let Err(e) = s.raft.shutdown().await {
                tracing::warn!(error = %e, "raft shutdown");
            }
            s.snapshots.close().await;
        }
    }
}

type ChangeResult = Result<
    openraft::raft::ClientWriteResponse<TypeConfig>,
    RaftError<u64, ClientWriteError<u64, Member>>,
>;

/// Runs a membership change until `timeout`, again while another one is under way: the
/// leader's own work (a learner joining, a joint change completing) must not fail an
/// operator's change that would succeed a moment later.
async fn changing<F, Fut>(timeout: Duration, mut change: F) -> Result<(), MembershipRefusal>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ChangeResult>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let pause = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let result = tokio::time::timeout(left, change()).await;
        let in_progress = matches!(
            &result,
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_)
            ))))
        );
        if in_progress && tokio::time::Instant::now() + pause < deadline {
            tokio::time::sleep(pause).await;
            continue;
        }
        return membership_result(result);
    }
}

fn membership_result(
    result: Result<ChangeResult, tokio::time::error::Elapsed>,
) -> Result<(), MembershipRefusal> {
    match result {
        Err(_) => Err(MembershipRefusal::Unavailable("timed out; it may still complete".into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(MembershipRefusal::NotLeader { leader: f.leader_node.map(|m| NodeId(m.node)) })
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => match e {
            ChangeMembershipError::InProgress(_) => Err(MembershipRefusal::Unavailable(
                "another membership change is under way; try again".into(),
            )),
            other => Err(MembershipRefusal::Invalid(other.to_string())),
        },
        Ok(Err(RaftError::Fatal(f))) => Err(MembershipRefusal::Unavailable(f.to_string())),
    }
}

/// Decodes `bytes` as each payload a node accepts from peers inside Raft messages (requests,
/// responses, snapshot chunks and their replies, snapshot data), and re-encodes and decodes
/// again whatever decodes. Never panics on any input; for the fuzzer.
pub(crate) fn decode_raft_payloads(bytes: &[u8]) {
    use openraft::error::Fatal;
    use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteResponse};
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(value: T) {
        let encoded = codec::encode(&value).expect("a decoded value encodes");
        codec::decode::<T>(&encoded).expect("an encoded value decodes");
    }
    if let Ok(v) = codec::decode::<AppendEntriesRequest<TypeConfig>>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<VoteRequest<u64>>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<Result<AppendEntriesResponse<u64>, RaftError<u64>>>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<Result<VoteResponse<u64>, RaftError<u64>>>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<prevote::PreVoteReply>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<transfer::Chunk>(bytes) {
        again(v);
    }
    if let Ok(v) = codec::decode::<Result<transfer::ChunkReply, Fatal<u64>>>(bytes) {
        again(v);
    }
    store::decode_snapshot_data(bytes);
}

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
