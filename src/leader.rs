//! The leader's duties: the liveness table, keepalive confirmation, and the planning loop that
//! expires silent sessions and fills vacant slots.
//!
//! Every node runs these loops; they act only while the node believes it leads, and nothing
//! they do relies on that belief being true: a renewal is answered only after a leadership
//! confirmation begun after the keepalive arrived, and an expiry is applied only from an
//! entry of the term whose liveness table decided it.

use crate::node::Shared;
use crate::raft::ConfirmError;
use highlander_core::wire::KeepAliveReply;
use highlander_core::{
    Command, LeaseTable, Millis, NodeId, Outcome, SessionId, plan_with, spread_settled,
};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Keepalives waiting for a confirmation.
const KEEPALIVE_QUEUE: usize = 4096;

/// The leader-side state shared by the keepalive path and the planning loop.
pub(crate) struct LeaderState {
    /// The liveness table of this node's current leadership, if it leads.
    table: Mutex<Option<LeaseTable>>,
    keepalives: mpsc::Sender<PendingKeepAlive>,
}

pub(crate) struct PendingKeepAlive {
    session: SessionId,
    reply: oneshot::Sender<KeepAliveReply>,
}

impl LeaderState {
    pub(crate) fn new() -> (LeaderState, mpsc::Receiver<PendingKeepAlive>) {
        let (keepalives, rx) = mpsc::channel(KEEPALIVE_QUEUE);
        (LeaderState { table: Mutex::new(None), keepalives }, rx)
    }

    fn table(&self) -> MutexGuard<'_, Option<LeaseTable>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handles one keepalive that arrived now from `from` (a peer, or this node itself).
///
/// `lapsed_ms` is how long the sender's lease has been lapsed. A lapse is final on the node
/// (see `session`): it takes no renewal for that session again, so its tasks are stopped for
/// good, and once the lapse reaches the lease margin the session is expired at once. That
/// bounds failover by about the TTL even when a node's keepalives reach the leader but the
/// answers do not reach the node.
///
/// A session superseded by a newer process of its node is not renewed (and not counted as
/// heard): its lease runs out and it expires after its TTL and margin.
pub(crate) async fn keepalive(
    shared: &Arc<Shared>,
    from: NodeId,
    session: SessionId,
    lapsed_ms: u64,
    wall_ms: u64,
) -> KeepAliveReply {
    let now = shared.now_millis();
    {
        let mut guard = shared.leader.table();
        let Some(table) = guard.as_mut() else {
            return match shared.raft.leader_hint() {
                Some(l) if l != shared.id => KeepAliveReply::NotLeader { leader: Some(l) },
                _ => KeepAliveReply::Unconfirmed,
            };
        };
        if !table.may_renew(session) {
            return KeepAliveReply::SessionEnded;
        }
        let (node, superseded, lease) = {
            let applied = shared.applied.read();
            match applied.state.sessions.get(&session) {
                None => return KeepAliveReply::SessionEnded,
                Some(s) => (s.node(), applied.state.is_superseded(session), s.lease),
            }
        };
        if node != from {
            warn!(node = %shared.id, %from, %session, owner = %node, "keepalive for another node's session ignored");
            return KeepAliveReply::Unconfirmed;
        }
        if from != shared.id {
            shared.cluster_clock.heard(from, wall_ms);
        }
        // A lapse is acted on once the node has been past its deadline for a margin on its
        // own clock, the clock its supervisor aborted the tasks by: another node starts the
        // keys at least a margin after they stopped, as when a silent session expires.
        if lapsed_ms >= lease.margin_ms {
            table.mark_expiring(session);
            info!(node = %shared.id, %session, lapsed_ms, "expiring a session whose node reports its lease lapsed");
            return KeepAliveReply::SessionEnded;
        }
        if lapsed_ms > 0 {
            return KeepAliveReply::Unconfirmed;
        }
        if superseded {
            return KeepAliveReply::SessionEnded;
        }
        table.heard(session, now);
    }
    let (reply, rx) = oneshot::channel();
    if shared.leader.keepalives.try_send(PendingKeepAlive { session, reply }).is_err() {
        return KeepAliveReply::Unconfirmed;
    }
    rx.await.unwrap_or(KeepAliveReply::Unconfirmed)
}

/// Answers queued keepalives in batches, each batch behind one leadership confirmation that
/// begins after every keepalive in it arrived.
pub(crate) async fn confirm_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<PendingKeepAlive>) {
    let timeout = shared.timing.heartbeat * 4;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            batch.push(p);
        }
        let term_before = shared.leader.table().as_ref().map(LeaseTable::term);
        let confirmed = shared.raft.confirm_leadership(timeout).await;
        let replies: Vec<KeepAliveReply> = match confirmed {
            Err(ConfirmError::NotLeader(leader)) => {
                batch.iter().map(|_| KeepAliveReply::NotLeader { leader }).collect()
            }
            Err(ConfirmError::Unconfirmed) => {
                batch.iter().map(|_| KeepAliveReply::Unconfirmed).collect()
            }
            Ok(()) => {
                // The table lock is held while the applied state is read, so no expiry can
                // be marked between this check and the answer.
                let guard = shared.leader.table();
                match guard.as_ref() {
                    Some(table) if Some(table.term()) == term_before => {
                        let applied = shared.applied.read();
                        // The committed membership: a change still on its way (that may yet
                        // be lost with this leadership) decides nothing.
                        let members = applied.membership.membership();
                        let nodes: std::collections::BTreeSet<NodeId> =
                            applied.state.sessions.values().map(|s| s.node()).collect();
                        let cluster_ms =
                            shared.cluster_clock.cluster_ms(shared.id, nodes.len() / 2 + 1);
                        batch
                            .iter()
                            .map(|p| match applied.state.sessions.get(&p.session) {
                                // Its storage is not a member: it does not get the log.
                                Some(s) if members.get_node(&s.storage).is_none() => {
                                    KeepAliveReply::Removed
                                }
                                Some(_)
                                    if table.may_renew(p.session)
                                        && !applied.state.is_superseded(p.session) =>
                                {
                                    KeepAliveReply::Renewed { cluster_ms }
                                }
                                _ => KeepAliveReply::SessionEnded,
                            })
                            .collect()
                    }
                    // Leadership changed while confirming: the check belongs to no table.
                    _ => batch.iter().map(|_| KeepAliveReply::Unconfirmed).collect(),
                }
            }
        };
        for (p, r) in batch.into_iter().zip(replies) {
            let _ = p.reply.send(r);
        }
    }
}

/// Watches leadership and the applied state; while leading, proposes what `plan` says.
pub(crate) async fn duties_loop(shared: Arc<Shared>) {
    let mut leadership = shared.raft.leadership();
    let mut applied = shared.applied.subscribe();
    let mut tick = tokio::time::interval(shared.timing.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last plan proposed and when: an identical plan is not proposed again within a
    // heartbeat, so a refused command cannot make this loop spin on its own applies.
    let mut last: Option<(Vec<Command>, tokio::time::Instant)> = None;
    // The earliest instant a session could expire: woken then, not on the next tick, so a
    // crashed owner's keys move as soon as its session may safely be expired.
    let mut next_expiry: Option<tokio::time::Instant> = None;
    // Spreading the load may look at every owned slot, so it runs at most once a heartbeat,
    // not on every applied entry, and backs off (to 1 s) while it finds nothing to move; a
    // new or ended session starts it again at once.
    let mut spread = SpreadPacing::new(shared.timing.heartbeat);
    loop {
        let expiry = async {
            match next_expiry {
                Some(at) => shared.clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            changed = leadership.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = expiry => {}
            _ = tick.tick() => {}
        }
        let commands = {
            let term = shared.raft.leading_term(&leadership.borrow_and_update());
            let mut guard = shared.leader.table();
            match (term, guard.as_ref().map(LeaseTable::term)) {
                (None, Some(old)) => {
                    info!(node = %shared.id, term = old, "no longer leading");
                    *guard = None;
                }
                (Some(t), current) if current != Some(t) => {
                    // A new leadership: forget what was known, give every session a full grace.
                    info!(node = %shared.id, term = t, "leading; every session gets a full grace");
                    if let Some(o) = &shared.observer {
                        o.leader_elected(shared.id, t);
                    }
                    *guard = Some(LeaseTable::new(t, shared.now_millis()).led_by(shared.id));
                }
                _ => {}
            }
            let Some(table) = guard.as_mut() else {
                next_expiry = None;
                continue;
            };
            let now = shared.now_millis();
            let state = shared.applied.read();
            table.observe(&state.state, now);
            let instant = tokio::time::Instant::now();
            // A young leadership moves nothing; that is not a fruitless try.
            let try_spread = spread.due(instant, state.state.sessions.len())
                && spread_settled(&state.state, table, now);
            let commands = plan_with(&state.state, table, now, try_spread);
            if try_spread {
                let moved = commands.iter().any(|c| matches!(c, Command::RequestMove { .. }));
                spread.tried(instant, moved || !commands.is_empty());
            }
            next_expiry = table
                .next_expiry(&state.state)
                .map(|at| shared.origin() + std::time::Duration::from_millis(at.0));
            for c in &commands {
                if let Command::ExpireSession { session, .. } = c {
                    // Marked before it is proposed: no renewal can overtake it.
                    table.mark_expiring(*session);
                    let silent = table.last_seen(*session).map(|s| now.since(s));
                    info!(node = %shared.id, %session, silent_ms = ?silent, "expiring silent session");
                }
            }
            commands
        };
        if commands.is_empty() {
            last = None;
            continue;
        }
        let now = tokio::time::Instant::now();
        if let Some((previous, at)) = &last
            && *previous == commands
            && now < *at + shared.timing.heartbeat
        {
            continue;
        }
        last = Some((commands.clone(), now));
        debug!(node = %shared.id, commands = commands.len(), "proposing plan");
        // Written directly (no forwarding): a plan is only meaningful from this leadership.
        match shared.raft.write(commands.clone(), shared.timing.write_timeout).await {
            Ok(outcomes) => {
                for (c, o) in commands.iter().zip(outcomes) {
                    match (c, o) {
                        (Command::Assign { key, slot, session }, Outcome::Assigned { token }) => {
                            info!(node = %shared.id, %key, slot, %session, %token, "assigned");
                        }
                        (Command::ExpireSession { session, .. }, Outcome::SessionEnded) => {
                            info!(node = %shared.id, %session, "session expired");
                        }
                        (_, Outcome::Rejected(r)) => {
                            debug!(node = %shared.id, command = ?c, reason = %r, "plan command refused");
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => warn!(node = %shared.id, error = ?e, "plan write failed"),
        }
    }
}

/// When the leader next tries to spread the load.
struct SpreadPacing {
    heartbeat: std::time::Duration,
    next: tokio::time::Instant,
    backoff: std::time::Duration,
    sessions: usize,
}

impl SpreadPacing {
    const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

    fn new(heartbeat: std::time::Duration) -> SpreadPacing {
        SpreadPacing {
            heartbeat,
            next: tokio::time::Instant::now(),
            backoff: heartbeat,
            sessions: 0,
        }
    }

    /// Whether to try now, with `sessions` live sessions.
    fn due(&mut self, now: tokio::time::Instant, sessions: usize) -> bool {
        if sessions != self.sessions {
            self.sessions = sessions;
            self.backoff = self.heartbeat;
            self.next = now;
        }
        now >= self.next
    }

    /// A try happened; `busy` if the plan had something to do (moves, or other commands
    /// that kept it from looking).
    fn tried(&mut self, now: tokio::time::Instant, busy: bool) {
        self.backoff =
            if busy { self.heartbeat } else { (self.backoff * 2).min(Self::MAX_BACKOFF) };
        self.next = now + self.backoff;
    }
}

/// Milliseconds from `origin` to `now`, as the liveness table counts them.
pub(crate) fn millis_between(origin: tokio::time::Instant, now: tokio::time::Instant) -> Millis {
    Millis(now.saturating_duration_since(origin).as_millis() as u64)
}
