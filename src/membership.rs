//! Which storage of each node votes: deciding a new storage's Raft member id, forming the
//! cluster, joining it, and the membership changes the leader makes.
//!
//! A node's storage is a Raft member (see `raft`); a node that comes back on empty storage is
//! a *new* member, because the one it was may have voted and acknowledged entries it no
//! longer holds. The rules, all decided from what the peers say ([`Request::Hello`]):
//!
//! - **Restart** (the storage has an identity, or a log from before identities existed): the
//!   storage is the member it was. Nothing to ask.
//! - **First start** (empty storage, *every* peer answers, none is a member): the cluster
//!   does not exist yet. The node records that it bootstraps as member `node id` and, once
//!   every peer has recorded the same, forms the cluster with the static peer list — every
//!   node with the same list, as before. Because a storage records this before it takes
//!   part in Raft, and no storage re-takes its node's first member id once any peer is a
//!   member, a node that lost its disk can never come back as the member it was.
//! - **Rejoin** (empty storage, some peer is a member): the cluster exists. The node takes a
//!   fresh member id, asks the leader to add it as a learner (it replicates the log and
//!   votes nowhere), and the leader makes it a voter in place of the node's lost storage once
//!   it has caught up and the lost one has been silent for a session TTL — a logged, joint-
//!   consensus membership change. `highlander members replace` does the same at once.
//! - Otherwise (empty storage, some peer silent, none a member) it waits and asks again:
//!   forming a cluster on partial knowledge could re-form one that exists.

use crate::error::Error;
use crate::node::Shared;
use crate::raft::Leavers;
use crate::raft::store::{IdentityKeeper, Log, StateMachine};
use highlander_core::NodeId;
use highlander_core::wire::{
    HelloReply, MemberReport, MembershipRefusal, MembershipReport, MembershipRequest, Phase,
    Request, Response,
};
use highlander_wal::Identity;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// Member ids of storage that joined an existing cluster are at least this; the members
/// that formed it are their node ids, which must stay below it.
pub const JOINED_MEMBER_BASE: u64 = 1 << 63;

/// Log entries a learner may still lack and be made a voter.
const CAUGHT_UP_SLACK: u64 = 64;

/// Where this node's storage stands, for [`Request::Hello`] and `status`.
pub(crate) struct BootState {
    phase: watch::Sender<Phase>,
}

impl BootState {
    /// Where storage with this identity and contents stands, known before the node serves
    /// anything: a peer asking must never hear "blank" from storage that holds a log, or a
    /// node that lost its disk could take its first member id again while the cluster's
    /// other nodes restart (a power loss across the cluster).
    pub(crate) fn new(node: u64, identity: Option<Identity>, blank: bool) -> BootState {
        BootState { phase: watch::channel(initial_phase(node, identity, blank)).0 }
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn set(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }
}

/// The phase of storage with this identity and contents, before anything has run.
fn initial_phase(node: u64, identity: Option<Identity>, blank: bool) -> Phase {
    match (blank, identity) {
        (false, _) => Phase::Member,
        (true, None) => Phase::Blank,
        (true, Some(id)) if id.member == node => Phase::Bootstrapping,
        (true, Some(_)) => Phase::Joining,
    }
}

/// Answers a peer's [`Request::Hello`].
pub(crate) fn hello(shared: &Shared) -> HelloReply {
    let phase = if shared.raft.knows_a_cluster() { Phase::Member } else { shared.boot.phase() };
    HelloReply {
        phase,
        member: shared.raft.member(),
        voters: shared.voters.iter().copied().collect(),
    }
}

/// Decides the storage's member id, starts Raft as that member, forms or joins the cluster,
/// and then keeps Raft's metrics flowing and quiets a node nobody hears. Stops the node
/// (fail-stop) if its storage cannot be used or Raft fails.
pub(crate) async fn run(
    shared: Arc<Shared>,
    log: Log,
    sm: StateMachine,
    identity: Option<Identity>,
    blank: bool,
    keeper: IdentityKeeper,
    peers: BTreeSet<NodeId>,
) {
    let member = match decide(&shared, identity, blank, &keeper, &peers).await {
        Ok(Some(member)) => member,
        Ok(None) => return,
        Err(e) => {
            warn!(node = %shared.id, error = %e, "cannot start");
            shared.set_fatal(e);
            return;
        }
    };
    if let Err(e) = shared.raft.start(member, log, sm, shared.transport.clone()).await {
        warn!(node = %shared.id, error = %e, "raft did not start");
        shared.set_fatal(Error::Stopped(e));
        return;
    }
    info!(node = %shared.id, member, phase = ?shared.boot.phase(), "raft started");
    let settle = async {
        match shared.boot.phase() {
            // A learner by configuration asks the leader for its place, as a joining one does.
            Phase::Bootstrapping if !shared.voters.contains(&shared.id) => {
                join(&shared, member, &peers).await
            }
            Phase::Bootstrapping => bootstrap(&shared, &peers).await,
            Phase::Joining => join(&shared, member, &peers).await,
            Phase::Blank | Phase::Member => {}
        }
    };
    let fail_stop = async {
        tokio::select! {
            why = shared.raft.stopped() => {
                if !shared.is_stopping() {
                    warn!(node = %shared.id, reason = %why, "raft stopped: the node stops");
                    shared.set_fatal(Error::Stopped(format!("raft stopped: {why}")));
                }
            }
            // A node that cannot go on (removed, superseded, storage lost) stops its Raft
            // too: a storage that left the membership would otherwise keep calling elections
            // with ever higher terms.
            () = shared.fatal_stop() => shared.raft.shutdown().await,
        }
    };
    let peer_list: Vec<NodeId> = peers.iter().copied().collect();
    tokio::join!(
        shared.raft.clone().forward_metrics(),
        shared.raft.clone().campaign_when_leaderless(shared.transport.clone()),
        shared.raft.clone().watch_round_trips(peer_list, shared.transport.clone()),
        settle,
        fail_stop,
        promote_replacements(&shared),
    );
}

/// The storage's member id: recorded, or decided with the peers and then recorded. `None`
/// if the node stopped while deciding.
async fn decide(
    shared: &Shared,
    identity: Option<Identity>,
    blank: bool,
    keeper: &IdentityKeeper,
    peers: &BTreeSet<NodeId>,
) -> Result<Option<u64>, Error> {
    let node = shared.id.0;
    match identity {
        Some(id) if id.node != node => Err(Error::Storage(format!(
            "the storage belongs to node {}, not to node {node}: give each node its own data \
             directory",
            id.node
        ))),
        Some(id) => {
            if blank {
                // Recorded before a restart that came before Raft did anything.
                shared.boot.set(if id.member == node {
                    Phase::Bootstrapping
                } else {
                    Phase::Joining
                });
            }
            Ok(Some(id.member))
        }
        None if !blank => {
            // A log from before storages had identities: the member was the node id then.
            let id = Identity { node, member: node };
            keeper.write(id).await.map_err(Error::Storage)?;
            Ok(Some(node))
        }
        None => {
            let Some(phase) = ask_until_decided(shared, peers).await else { return Ok(None) };
            let member = match phase {
                Phase::Bootstrapping => node,
                _ => fresh_member_id(shared),
            };
            keeper.write(Identity { node, member }).await.map_err(Error::Storage)?;
            info!(node = %shared.id, member, ?phase, "new storage: identity recorded");
            shared.boot.set(phase);
            Ok(Some(member))
        }
    }
}

/// Asks every peer where its storage stands until the answers decide: `Joining` if one is a
/// member, `Bootstrapping` if all answered and none is. `None` if the node stops first.
async fn ask_until_decided(shared: &Shared, peers: &BTreeSet<NodeId>) -> Option<Phase> {
    let mut logged = false;
    loop {
        if shared.is_stopping() {
            return None;
        }
        let answers = ask_all(shared, peers).await;
        if answers.values().flatten().any(|a| a.phase == Phase::Member) {
            return Some(Phase::Joining);
        }
        if answers.values().all(Option::is_some) {
            return Some(Phase::Bootstrapping);
        }
        if !logged {
            let silent: Vec<u64> =
                answers.iter().filter(|(_, a)| a.is_none()).map(|(p, _)| p.0).collect();
            info!(node = %shared.id, ?silent, "empty storage: waiting for every peer to answer before forming a cluster");
            logged = true;
        }
        pause(shared, shared.timing.heartbeat * 4).await;
    }
}

/// Every other peer's answer to [`Request::Hello`], `None` for those that gave none.
async fn ask_all(
    shared: &Shared,
    peers: &BTreeSet<NodeId>,
) -> BTreeMap<NodeId, Option<HelloReply>> {
    let timeout = shared.timing.heartbeat * 4;
    let mut asks = tokio::task::JoinSet::new();
    for peer in peers.iter().copied().filter(|p| *p != shared.id) {
        let transport = shared.transport.clone();
        asks.spawn(async move {
            let reply = match transport.request(peer, Request::Hello, timeout).await {
                Ok(Response::Hello(h)) => Some(h),
                _ => None,
            };
            (peer, reply)
        });
    }
    let mut answers: BTreeMap<NodeId, Option<HelloReply>> =
        peers.iter().filter(|p| **p != shared.id).map(|p| (*p, None)).collect();
    while let Some(done) = asks.join_next().await {
        if let Ok((peer, reply)) = done {
            answers.insert(peer, reply);
        }
    }
    answers
}

/// A member id for storage that joins an existing cluster: above every node id, and
/// different for every start (a function of the node and its incarnation, so that a
/// simulated run stays reproducible).
fn fresh_member_id(shared: &Shared) -> u64 {
    let mut z = shared.id.0 ^ shared.client().incarnation.rotate_left(17);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | JOINED_MEMBER_BASE
}

async fn pause(shared: &Shared, d: Duration) {
    tokio::select! {
        _ = shared.stopping() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

/// Forms the cluster, its voters being the configured ones, once every peer has recorded
/// that it bootstraps (or is a member already), unless a leader has reached this node first.
/// The other peers join as learners (see `join`). Waiting for every peer, not a
/// quorum, keeps a slower peer from finding the cluster formed before it decided: it would
/// join as new storage and leave its first member id a voter that nobody runs.
async fn bootstrap(shared: &Shared, peers: &BTreeSet<NodeId>) {
    let mut warned = false;
    loop {
        if shared.is_stopping() || shared.raft.knows_a_cluster() {
            break;
        }
        let answers = ask_all(shared, peers).await;
        if let Some(why) = voters_disagree(&shared.voters, &answers) {
            if !warned {
                warn!(node = %shared.id, "not forming the cluster: {why}");
                warned = true;
            }
            pause(shared, shared.timing.heartbeat * 4).await;
            continue;
        }
        let ready = 1 + answers
            .values()
            .flatten()
            .filter(|a| matches!(a.phase, Phase::Bootstrapping | Phase::Member))
            .count();
        if ready == peers.len() {
            match shared.raft.initialize(&shared.voters).await {
                Ok(()) => {
                    info!(node = %shared.id, voters = ?shared.voters, "cluster formed from the static peer list")
                }
                Err(e) => warn!(node = %shared.id, error = %e, "initialize failed"),
            }
            break;
        }
        pause(shared, shared.timing.heartbeat * 4).await;
    }
    shared.boot.set(Phase::Member);
}

/// Why the peers that answered and this node must not form a cluster together: one of them
/// is configured with other voters (a different `voters` or peer list), so each would
/// initialize a different membership at the same log position.
fn voters_disagree(
    ours: &BTreeSet<NodeId>,
    answers: &BTreeMap<NodeId, Option<HelloReply>>,
) -> Option<String> {
    let ours: Vec<NodeId> = ours.iter().copied().collect();
    answers.iter().find_map(|(peer, answer)| {
        let theirs = &answer.as_ref()?.voters;
        (*theirs != ours).then(|| {
            format!(
                "node {} is configured with voters {theirs:?}, this node with {ours:?}; give \
                 every node the same peer list and `voters`",
                peer.0
            )
        })
    })
}

/// Asks the leader to add this storage as a learner until the membership this node has
/// applied holds it: a change the leader appended but lost with its leadership before it
/// committed does not count, however it looks in this node's own log.
async fn join(shared: &Shared, member: u64, peers: &BTreeSet<NodeId>) {
    let others: Vec<NodeId> = peers.iter().copied().filter(|p| *p != shared.id).collect();
    let mut turn = 0usize;
    let mut next: Option<NodeId> = None;
    let mut logged = false;
    while !shared.is_stopping() && !shared.member_in_applied_config() {
        let target = next.take().or_else(|| shared.raft.leader_hint()).or_else(|| {
            turn = turn.wrapping_add(1);
            others.get(turn % others.len().max(1)).copied()
        });
        if let Some(target) = target.filter(|t| *t != shared.id) {
            let request = Request::Membership(MembershipRequest::Join { member });
            match shared.transport.request(target, request, shared.timing.write_timeout).await {
                Ok(Response::Membership(Ok(_))) if !logged => {
                    info!(node = %shared.id, member, "added as a learner; catching up");
                    logged = true;
                }
                Ok(Response::Membership(Err(MembershipRefusal::NotLeader { leader }))) => {
                    next = leader;
                    continue;
                }
                Ok(Response::Membership(Err(e))) => {
                    warn!(node = %shared.id, error = %e, "join refused; asking again")
                }
                _ => {}
            }
        }
        pause(shared, shared.timing.heartbeat * 4).await;
    }
    shared.boot.set(Phase::Member);
}

/// The leader's duty: a node whose voting storage is gone and whose new storage has joined
/// and caught up gets the new one as its voter, through a joint-consensus change. The old
/// one must have been silent to this leadership for a session TTL, so a node that merely
/// has two processes (an id configured twice) is not switched back and forth.
async fn promote_replacements(shared: &Shared) {
    let mut leadership = shared.raft.leadership();
    let mut tick = tokio::time::interval(shared.timing.keepalive_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading_since: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stopping() => return,
        }
        let term = shared.raft.leading_term(&leadership.borrow_and_update());
        leading_since = match (term, leading_since) {
            (Some(t), Some((lt, at))) if t == lt => Some((lt, at)),
            (Some(t), _) => Some((t, Instant::now())),
            (None, _) => None,
        };
        let Some((_, since)) = leading_since else { continue };
        let report = shared.raft.membership_report();
        if report.changing {
            // Left joint by a leader that lost its leadership half-way through a change.
            if since.elapsed() >= shared.timing.election_max
                && let Err(e) = shared.raft.finish_joint_change(shared.timing.write_timeout).await
            {
                warn!(node = %shared.id, error = %e, "completing a membership change failed");
            }
            continue;
        }
        let ttl = shared.timing.session_ttl;
        let silent = |m: &MemberReport| match m.answered_ms_ago {
            Some(ago) => Duration::from_millis(ago) >= ttl,
            None => since.elapsed() >= ttl,
        };
        if let Some((node, _, _)) = replacement(&report, |old| old.iter().all(|m| silent(m))) {
            match replace(shared, node).await {
                Ok(()) => {
                    info!(node = %shared.id, replaced = %node, "a node's new storage votes in place of its lost one")
                }
                Err(e) => {
                    warn!(node = %shared.id, replaced = %node, error = %e, "replacing a node's storage failed")
                }
            }
        }
    }
}

/// A node with a voting storage and a caught-up learner storage whose voting storages pass
/// `old_ok`: the node, its learner member, and its voting members.
fn replacement(
    report: &MembershipReport,
    old_ok: impl Fn(&[&MemberReport]) -> bool,
) -> Option<(NodeId, u64, Vec<u64>)> {
    let last = report.members.iter().filter_map(|m| m.matched).max().unwrap_or(0);
    let nodes: BTreeSet<NodeId> = report.members.iter().map(|m| m.node).collect();
    for node in nodes {
        let voters: Vec<&MemberReport> =
            report.members.iter().filter(|m| m.node == node && m.voter).collect();
        let learner = report
            .members
            .iter()
            .filter(|m| m.node == node && !m.voter)
            .filter(|m| m.matched.is_some_and(|i| i + CAUGHT_UP_SLACK >= last))
            .max_by_key(|m| m.matched);
        if let Some(learner) = learner
            && !voters.is_empty()
            && old_ok(&voters)
        {
            return Some((node, learner.member, voters.iter().map(|m| m.member).collect()));
        }
    }
    None
}

/// Makes `node`'s learner storage its voter in place of its voting storage(s).
async fn replace(shared: &Shared, node: NodeId) -> Result<(), MembershipRefusal> {
    let report = shared.raft.membership_report();
    let learner = report
        .members
        .iter()
        .filter(|m| m.node == node && !m.voter)
        .max_by_key(|m| m.matched)
        .ok_or_else(|| {
            MembershipRefusal::Invalid(format!(
                "node {} has no new storage in the cluster: start it on its new disk first \
                 (on empty storage it joins as a learner by itself)",
                node.0
            ))
        })?;
    let mut voters: BTreeSet<u64> =
        report.members.iter().filter(|m| m.voter && m.node != node).map(|m| m.member).collect();
    voters.insert(learner.member);
    shared.raft.set_voters(voters, Leavers::Removed, shared.timing.write_timeout).await
}

/// Serves a membership request from `from`: on the leader only.
pub(crate) async fn serve(
    shared: &Shared,
    from: NodeId,
    request: MembershipRequest,
) -> Result<MembershipReport, MembershipRefusal> {
    if let MembershipRequest::List = request {
        if shared.raft.leader_hint() != Some(shared.id) {
            return Err(MembershipRefusal::NotLeader { leader: shared.raft.leader_hint() });
        }
        return Ok(shared.raft.membership_report());
    }
    let timeout = shared.timing.write_timeout;
    // A change left half-way by an earlier leader is completed before the next one.
    shared.raft.finish_joint_change(timeout).await?;
    match request {
        MembershipRequest::List => unreachable!("answered above"),
        MembershipRequest::Join { member } => {
            if member < JOINED_MEMBER_BASE && member != from.0 {
                return Err(MembershipRefusal::Invalid(format!(
                    "member {member} cannot be storage of node {}",
                    from.0
                )));
            }
            shared.raft.add_learner(from, member, timeout).await?;
        }
        MembershipRequest::Add { node } => {
            let report = shared.raft.membership_report();
            let of_node: Vec<&MemberReport> =
                report.members.iter().filter(|m| m.node == node).collect();
            if of_node.iter().any(|m| m.voter) {
                return Err(MembershipRefusal::Invalid(format!(
                    "node {} already votes; to swap its storage use replace",
                    node.0
                )));
            }
            let Some(learner) = of_node.iter().max_by_key(|m| m.matched) else {
                return Err(MembershipRefusal::Invalid(format!(
                    "node {} has no storage in the cluster: start it first (on empty storage \
                     it joins as a learner by itself), then add it",
                    node.0
                )));
            };
            let mut voters: BTreeSet<u64> =
                report.members.iter().filter(|m| m.voter).map(|m| m.member).collect();
            voters.insert(learner.member);
            shared.raft.set_voters(voters, Leavers::Removed, timeout).await?;
        }
        MembershipRequest::Remove { node } => {
            let report = shared.raft.membership_report();
            let of_node: BTreeSet<u64> =
                report.members.iter().filter(|m| m.node == node).map(|m| m.member).collect();
            if of_node.is_empty() {
                return Err(MembershipRefusal::Invalid(format!("node {} is not a member", node.0)));
            }
            let voters = voters_without(&report, node)?;
            if report.members.iter().any(|m| m.voter && of_node.contains(&m.member)) {
                shared.raft.set_voters(voters, Leavers::Removed, timeout).await?;
            }
            let left: BTreeSet<u64> = shared
                .raft
                .membership_report()
                .members
                .iter()
                .filter(|m| m.node == node)
                .map(|m| m.member)
                .collect();
            if !left.is_empty() {
                shared.raft.remove_members(left, timeout).await?;
            }
        }
        MembershipRequest::Demote { node } => {
            let report = shared.raft.membership_report();
            if !report.members.iter().any(|m| m.node == node && m.voter) {
                return Err(MembershipRefusal::Invalid(format!(
                    "node {} does not vote; nothing to demote",
                    node.0
                )));
            }
            let voters = voters_without(&report, node)?;
            shared.raft.set_voters(voters, Leavers::Learners, timeout).await?;
        }
        MembershipRequest::Replace { node } => replace(shared, node).await?,
    }
    Ok(shared.raft.membership_report())
}

/// The voters once every storage of `node` has left the voter set; refused if none is left.
fn voters_without(
    report: &MembershipReport,
    node: NodeId,
) -> Result<BTreeSet<u64>, MembershipRefusal> {
    let voters: BTreeSet<u64> =
        report.members.iter().filter(|m| m.voter && m.node != node).map(|m| m.member).collect();
    if voters.is_empty() {
        return Err(MembershipRefusal::Invalid(format!(
            "node {} holds the last vote; add another voter first",
            node.0
        )));
    }
    Ok(voters)
}

/// Redirects followed in a row before pausing and asking afresh.
const MAX_REDIRECTS: u32 = 8;

/// Sends a membership request to the leader (this node, or the one it redirects to) until
/// it is served or the write timeout passes.
pub(crate) async fn ask_leader(
    shared: &Shared,
    request: MembershipRequest,
) -> Result<MembershipReport, Error> {
    let deadline = Instant::now() + shared.timing.write_timeout;
    let mut target = shared.raft.leader_hint();
    let mut last;
    // Redirects followed since the last pause: two nodes naming each other during an
    // election must not be bounced between without rest.
    let mut hops = 0;
    loop {
        let answer = match target {
            Some(t) if t == shared.id => serve(shared, shared.id, request.clone()).await,
            Some(t) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match shared.transport.request(t, Request::Membership(request.clone()), left).await
                {
                    Ok(Response::Membership(answer)) => answer,
                    Ok(other) => Err(MembershipRefusal::Unavailable(format!(
                        "unexpected answer: {}",
                        crate::raft::response_kind(&other)
                    ))),
                    Err(e) => Err(MembershipRefusal::Unavailable(e.to_string())),
                }
            }
            None => Err(MembershipRefusal::NotLeader { leader: None }),
        };
        match answer {
            Ok(report) => return Ok(report),
            Err(MembershipRefusal::Invalid(why)) => return Err(Error::Membership(why)),
            Err(MembershipRefusal::NotLeader { leader: Some(l) })
                if Some(l) != target && hops < MAX_REDIRECTS =>
            {
                hops += 1;
                target = Some(l);
                continue;
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline || shared.is_stopping() {
            return Err(Error::Unavailable(format!("membership request not served: {last}")));
        }
        pause(shared, shared.timing.heartbeat * 2).await;
        hops = 0;
        target = shared.raft.leader_hint();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage that holds anything answers "member" from the first instant, whatever its
    /// identity says; only empty storage may answer "blank".
    #[test]
    fn storage_with_a_log_never_reports_blank() {
        let id = |member| Some(Identity { node: 2, member });
        for identity in [None, id(2), id(JOINED_MEMBER_BASE + 5)] {
            assert_eq!(initial_phase(2, identity, false), Phase::Member, "{identity:?}");
        }
        assert_eq!(initial_phase(2, None, true), Phase::Blank);
        assert_eq!(initial_phase(2, id(2), true), Phase::Bootstrapping);
        assert_eq!(initial_phase(2, id(JOINED_MEMBER_BASE + 5), true), Phase::Joining);
    }

    fn m(node: u64, member: u64, voter: bool, matched: u64, ago: Option<u64>) -> MemberReport {
        MemberReport {
            node: NodeId(node),
            member,
            voter,
            matched: Some(matched),
            answered_ms_ago: ago,
        }
    }

    #[test]
    fn nodes_configured_with_other_voters_do_not_form_a_cluster() {
        let ours: BTreeSet<NodeId> = [1, 2, 3].map(NodeId).into();
        let reply = |voters: &[u64]| {
            Some(HelloReply {
                phase: Phase::Bootstrapping,
                member: None,
                voters: voters.iter().copied().map(NodeId).collect(),
            })
        };
        let mut answers = BTreeMap::from([(NodeId(2), reply(&[1, 2, 3])), (NodeId(3), None)]);
        assert_eq!(voters_disagree(&ours, &answers), None);
        answers.insert(NodeId(4), reply(&[1, 2, 3, 4, 5]));
        let why = voters_disagree(&ours, &answers).expect("a disagreement");
        assert!(why.contains("node 4") && why.contains("voters"), "{why}");
    }

    #[test]
    fn a_caught_up_learner_replaces_its_nodes_silent_voter() {
        let silent = |old: &[&MemberReport]| old.iter().all(|m| m.answered_ms_ago.is_none());
        let mut report = MembershipReport {
            leader: Some(NodeId(1)),
            changing: false,
            members: vec![
                m(1, 1, true, 500, Some(0)),
                m(2, 2, true, 500, Some(10)),
                m(3, 3, true, 100, None),
                m(3, JOINED_MEMBER_BASE + 7, false, 480, Some(5)),
            ],
        };
        assert_eq!(
            replacement(&report, silent),
            Some((NodeId(3), JOINED_MEMBER_BASE + 7, vec![3]))
        );
        // Not caught up: not yet.
        report.members[3].matched = Some(100);
        assert_eq!(replacement(&report, silent), None);
        report.members[3].matched = Some(499);
        // The old storage still answers: not without an operator.
        report.members[2].answered_ms_ago = Some(5);
        assert_eq!(replacement(&report, silent), None);
        // A learner of a node that does not vote is left alone (members add does that).
        let report = MembershipReport {
            leader: None,
            changing: false,
            members: vec![m(1, 1, true, 5, Some(0)), m(4, JOINED_MEMBER_BASE, false, 5, Some(0))],
        };
        assert_eq!(replacement(&report, |_| true), None);
    }
}
