//! The leader's liveness table: when it last heard from each session, and which sessions it
//! has decided to expire.
//!
//! A table belongs to one leadership. A node that becomes leader starts a new table in which
//! every session counts as heard from at that moment (a full grace), because it cannot know
//! what the previous leader heard. Once a session is marked for expiry, no keepalive for it
//! is answered again by this leadership, so an `ExpireSession` on its way to the log can never
//! be overtaken by a renewal.

use crate::state::ClusterState;
use crate::{Millis, NodeId, SessionId};
use std::collections::{BTreeMap, BTreeSet};

/// The leader's view of session liveness during one leadership.
#[derive(Clone, Debug)]
pub struct LeaseTable {
    term: u64,
    leader: Option<NodeId>,
    started: Millis,
    last_seen: BTreeMap<SessionId, Millis>,
    expiring: BTreeSet<SessionId>,
}

impl LeaseTable {
    /// A table for the leadership of Raft term `term`, which this node noticed at `now`.
    /// A node leads at most once per term, so the term names the leadership.
    pub fn new(term: u64, now: Millis) -> LeaseTable {
        LeaseTable {
            term,
            leader: None,
            started: now,
            last_seen: BTreeMap::new(),
            expiring: BTreeSet::new(),
        }
    }

    /// Names the node that leads (the one this table belongs to), so that the planner keeps
    /// keys off it where it can: an owner on the leader's node fails over slowest, because
    /// its crash also costs an election and a full grace for every session.
    pub fn led_by(mut self, node: NodeId) -> LeaseTable {
        self.leader = Some(node);
        self
    }

    /// The leading node, if named.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// When this leadership began (as this node noticed it).
    pub fn started(&self) -> Millis {
        self.started
    }

    /// The term of the leadership this table belongs to.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Records a keepalive that arrived at `at`. Ignored for a session marked for expiry.
    pub fn heard(&mut self, session: SessionId, at: Millis) {
        if self.expiring.contains(&session) {
            return;
        }
        let seen = self.last_seen.entry(session).or_insert(at);
        if at > *seen {
            *seen = at;
        }
    }

    /// Brings the table in step with the applied state: sessions it has not seen yet count as
    /// heard from `now` (they were opened or this leadership began after their last keepalive
    /// could have been counted), ended sessions are dropped.
    pub fn observe(&mut self, state: &ClusterState, now: Millis) {
        let at = now.max(self.started);
        for id in state.sessions.keys() {
            self.last_seen.entry(*id).or_insert(at);
        }
        self.last_seen.retain(|id, _| state.sessions.contains_key(id));
        self.expiring.retain(|id| state.sessions.contains_key(id));
    }

    /// When the session was last heard from, if the table knows it.
    pub fn last_seen(&self, session: SessionId) -> Option<Millis> {
        self.last_seen.get(&session).copied()
    }

    /// Marks a session for expiry: from now on this leadership renews it no more.
    pub fn mark_expiring(&mut self, session: SessionId) {
        self.expiring.insert(session);
    }

    /// The earliest instant at which a session not yet marked would be silent long enough to
    /// expire (its last keepalive plus TTL plus margin, plus one millisecond), so the leader
    /// can wake then instead of on its next tick.
    pub fn next_expiry(&self, state: &ClusterState) -> Option<Millis> {
        state
            .sessions
            .iter()
            .filter(|(id, _)| !self.expiring.contains(id))
            .filter_map(|(id, s)| {
                let seen = self.last_seen.get(id)?;
                Some(Millis(seen.0.saturating_add(s.lease.expiry_after_ms()).saturating_add(1)))
            })
            .min()
    }

    /// Whether a keepalive for the session may still be answered.
    pub fn may_renew(&self, session: SessionId) -> bool {
        !self.expiring.contains(&session)
    }

    /// Whether the session is marked for expiry.
    pub fn is_expiring(&self, session: SessionId) -> bool {
        self.expiring.contains(&session)
    }
}
