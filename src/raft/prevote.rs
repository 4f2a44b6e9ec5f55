//! Pre-vote: a voter calls an election only when a quorum of voters would vote for it.
//!
//! openraft 0.9 has no pre-vote, so its own election timer is off (`enable_elect: false`)
//! and [`campaign_when_leaderless`] takes its place. A node that starts, restarts or
//! reconnects into a cluster whose leader is alive would otherwise time out before the
//! leader's first heartbeat reaches it, raise its term, and depose the leader when that
//! heartbeat is answered with the higher term: an election and a hand-over tail for nothing.
//! A node cut off one way, or in a minority, would raise its term again and again and depose
//! the leader on heal.
//!
//! With pre-vote a voter first asks the others "would you vote for me in the next term?"
//! without changing any term. A voter says yes only when it would grant the real vote too:
//! it does not lead, its leader lease has run out (openraft's own lease: no accepted
//! AppendEntries for `election_max`), the candidate's term is not behind its own and the
//! candidate's log is at least as up to date as its own. Only on a yes from a quorum of every
//! voter configuration (both halves of a joint one) does the node start openraft's election.
//! So a term rises only when a quorum has really lost its leader.
//!
//! Pre-vote changes when elections happen, never what an election decides: openraft still
//! runs the vote itself, so Raft's safety does not depend on anything here.

use super::store::Tail;
use super::{LogId, Member, Raft};
use crate::config::Timing;
use highlander_core::wire::{RaftMessage, Request, Response};
use highlander_core::{NodeId, Payload, Transport, codec};
use openraft::raft::VoteRequest;
use openraft::{Membership, ServerState, Vote};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The answer to a pre-vote request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PreVoteReply {
    /// Whether the asked voter would vote for the candidate now.
    pub(crate) granted: bool,
}

/// What a voter knows of itself when asked for a pre-vote or deciding to ask for them.
#[derive(Clone, Debug)]
pub(crate) struct Standing {
    leads: bool,
    /// Whether it accepted AppendEntries from a leader within the lease.
    lease_fresh: bool,
    term: u64,
    last_log: Option<LogId>,
}

impl Standing {
    /// Whether this voter would vote for a candidate asking with `request`.
    pub(crate) fn grants(&self, request: &VoteRequest<u64>) -> bool {
        !self.leads
            && !self.lease_fresh
            && request.vote.leader_id().term >= self.term
            && request.last_log_id >= self.last_log
    }
}

/// Whether `granted` (member ids) holds a majority of every voter configuration.
pub(crate) fn is_quorum(configs: &[BTreeSet<u64>], granted: &BTreeSet<u64>) -> bool {
    !configs.is_empty()
        && configs.iter().all(|c| c.iter().filter(|m| granted.contains(m)).count() * 2 > c.len())
}

/// What a node reads of its Raft state to decide whether to campaign.
struct View {
    standing: Standing,
    voter: bool,
    /// Whether its vote is for a leader it knows of (committed), and when it last changed or
    /// was refreshed by a leader.
    committed: bool,
    since: Option<Instant>,
    membership: Membership<u64, Member>,
}

/// This node's standing, read from openraft's own state (so the lease is openraft's lease).
pub(crate) async fn standing(raft: &Raft, lease: Duration, tail: &Tail) -> Option<Standing> {
    let last_log = tail.get();
    raft.with_raft_state(move |st| standing_of(st, lease, last_log)).await.ok()
}

fn standing_of(
    st: &openraft::RaftState<u64, Member, Instant>,
    lease: Duration,
    last_log: Option<LogId>,
) -> Standing {
    let now = Instant::now();
    let vote = st.vote_ref();
    // Fresh within a lease of the vote's last change or refresh: after hearing the leader,
    // and also after voting for a candidate, whose first heartbeat may still be on its way
    // (granting a vote resets the election timer, as in Raft).
    let lease_fresh = st.vote_last_modified().is_some_and(|t| now <= t + lease)
        && st.server_state != ServerState::Leader;
    Standing {
        leads: st.server_state == ServerState::Leader,
        lease_fresh,
        term: vote.leader_id().term,
        last_log,
    }
}

/// SplitMix64, for the election jitter: seeded by the member id, so each voter waits its own
/// time and a simulated run repeats exactly.
struct Jitter(u64);

impl Jitter {
    fn next(&mut self, timing: &Timing) -> Duration {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let span = timing.election_max.saturating_sub(timing.election_min).as_millis() as u64;
        timing.election_min + Duration::from_millis(z % span.max(1))
    }
}

/// Calls an election on this node when its leader has been silent for a lease and an election
/// timeout (as openraft's own timer would) *and* a quorum of voters grants a pre-vote. Keeps
/// `leader_heard` telling whether this node leads or heard its leader within the lease. Runs
/// until Raft stops.
pub(crate) async fn campaign_when_leaderless(
    raft: Raft,
    member: u64,
    tail: Tail,
    timing: Timing,
    transport: Arc<dyn Transport>,
    leader_heard: Arc<AtomicBool>,
) {
    let lease = timing.election_max;
    let mut jitter = Jitter(member ^ 0x5eed_0f70_7e00);
    let mut patience = jitter.next(&timing);
    let mut last_attempt: Option<Instant> = None;
    let mut tick = tokio::time::interval(timing.heartbeat / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    loop {
        tick.tick().await;
        let last_log = tail.get();
        let view = raft
            .with_raft_state(move |st| View {
                standing: standing_of(st, lease, last_log),
                voter: st.membership_state.effective().voter_ids().any(|v| v == member),
                committed: st.vote_ref().is_committed(),
                since: st.vote_last_modified(),
                membership: st.membership_state.effective().membership().clone(),
            })
            .await;
        let Ok(view) = view else { return };
        leader_heard.store(view.standing.leads || view.standing.lease_fresh, Ordering::Relaxed);
        if view.standing.leads || !view.voter {
            continue;
        }
        let configs: Vec<BTreeSet<u64>> = view.membership.get_joint_config().clone();
        let alone = configs.iter().all(|c| c.len() == 1 && c.contains(&member));
        // A leader known and heard waits a lease more than a candidate does, as in openraft.
        let since = view.since.unwrap_or(started);
        let due = match last_attempt {
            Some(at) if at >= since => at + patience,
            _ if view.committed => since + lease + patience,
            _ => since + patience,
        };
        if !alone && Instant::now() < due {
            continue;
        }
        last_attempt = Some(Instant::now());
        patience = jitter.next(&timing);
        let request =
            VoteRequest::new(Vote::new(view.standing.term + 1, member), view.standing.last_log);
        let granted = ask(&transport, &view.membership, member, &request, timing).await;
        if is_quorum(&configs, &granted) {
            // While the answers came, this node may have voted in that very term, or heard a
            // new leader: campaigning now would raise the term past a winner.
            let Some(now) = standing(&raft, lease, &tail).await else { return };
            if now.leads || now.lease_fresh || now.term != view.standing.term {
                continue;
            }
            tracing::info!(
                member,
                term = view.standing.term + 1,
                "pre-vote granted by a quorum: calling an election"
            );
            if raft.trigger().elect().await.is_err() {
                return;
            }
        } else {
            tracing::debug!(member, granted = ?granted, "pre-vote not granted by a quorum");
        }
    }
}

/// Asks every other voter for a pre-vote; returns the members that granted it, this one
/// included.
async fn ask(
    transport: &Arc<dyn Transport>,
    membership: &Membership<u64, Member>,
    me: u64,
    request: &VoteRequest<u64>,
    timing: Timing,
) -> BTreeSet<u64> {
    let mut granted = BTreeSet::from([me]);
    let Ok(body) = codec::encode(request) else { return granted };
    let body = Payload::from(body);
    let voters: BTreeSet<u64> = membership.voter_ids().filter(|m| *m != me).collect();
    let mut asks = tokio::task::JoinSet::new();
    for voter in voters {
        let Some(node) = membership.get_node(&voter).map(|n| NodeId(n.node)) else { continue };
        let (transport, body) = (transport.clone(), body.clone());
        asks.spawn(async move {
            let message = RaftMessage::PreVote(body);
            let reply =
                transport.request(node, Request::Raft { to: voter, message }, timing.election_min);
            match reply.await {
                Ok(Response::Raft(bytes)) => codec::decode::<PreVoteReply>(bytes.as_bytes())
                    .ok()
                    .filter(|r| r.granted)
                    .map(|_| voter),
                _ => None,
            }
        });
    }
    while let Some(answer) = asks.join_next().await {
        if let Ok(Some(voter)) = answer {
            granted.insert(voter);
        }
    }
    granted
}

/// The answer to a pre-vote `request` on this node.
pub(crate) async fn answer(
    raft: &Raft,
    tail: &Tail,
    timing: &Timing,
    request: &VoteRequest<u64>,
) -> Response {
    let granted = match standing(raft, timing.election_max, tail).await {
        Some(s) => s.grants(request),
        None => false,
    };
    match codec::encode(&PreVoteReply { granted }) {
        Ok(bytes) => Response::Raft(Payload::from(bytes)),
        Err(e) => Response::Refused(format!("cannot encode response: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 0), index))
    }

    fn follower(term: u64, last: Option<LogId>, lease_fresh: bool) -> Standing {
        Standing { leads: false, lease_fresh, term, last_log: last }
    }

    fn asking(term: u64, last: Option<LogId>) -> VoteRequest<u64> {
        VoteRequest::new(Vote::new(term, 9), last)
    }

    #[test]
    fn a_voter_that_hears_its_leader_refuses() {
        let me = follower(3, log(3, 10), true);
        assert!(!me.grants(&asking(4, log(3, 10))));
        let leader = Standing { leads: true, lease_fresh: false, term: 3, last_log: log(3, 10) };
        assert!(!leader.grants(&asking(4, log(3, 20))));
    }

    #[test]
    fn a_leaderless_voter_grants_an_up_to_date_candidate_only() {
        let me = follower(3, log(3, 10), false);
        assert!(me.grants(&asking(4, log(3, 10))));
        assert!(me.grants(&asking(4, log(3, 11))));
        assert!(me.grants(&asking(4, log(4, 2))));
        assert!(!me.grants(&asking(4, log(3, 9))), "shorter log");
        assert!(!me.grants(&asking(4, log(2, 50))), "older last term");
        assert!(!me.grants(&asking(4, None)), "empty log");
        assert!(!me.grants(&asking(2, log(3, 10))), "term behind");
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_configuration() {
        let c = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        assert!(is_quorum(&[c(&[1, 2, 3])], &c(&[1, 2])));
        assert!(!is_quorum(&[c(&[1, 2, 3])], &c(&[1])));
        assert!(!is_quorum(&[c(&[1, 2, 3, 4])], &c(&[1, 2])));
        assert!(is_quorum(&[c(&[1])], &c(&[1])));
        // Joint: {1,2,3} then {3,4,5}: a majority of each.
        let joint = [c(&[1, 2, 3]), c(&[3, 4, 5])];
        assert!(!is_quorum(&joint, &c(&[1, 2, 3])));
        assert!(is_quorum(&joint, &c(&[1, 3, 4])));
        assert!(!is_quorum(&[], &c(&[1])));
        // Grants from non-voters do not count.
        assert!(!is_quorum(&[c(&[1, 2, 3])], &c(&[1, 7, 8])));
    }

    #[test]
    fn jitter_stays_within_the_election_timeout() {
        let timing = Timing::default();
        let mut j = Jitter(42);
        for _ in 0..1000 {
            let d = j.next(&timing);
            assert!(d >= timing.election_min && d < timing.election_max, "{d:?}");
        }
    }
}
