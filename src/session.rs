//! The node's session keeper: opens a session through the leader, registers the node's
//! handlers under it, and keeps it alive.
//!
//! The lease is measured on the node's own clock from when a keepalive was *sent*: a renewed
//! keepalive sent at `t_send` lets the node act until `t_send + ttl − margin`, while the
//! leader, which heard it later, expires the session no earlier than `ttl + margin` after
//! hearing it.
//!
//! **A lapse is final.** Once the deadline has passed, the node takes no renewal for that
//! session any more — not even a late answer to a keepalive sent before the lapse — and says
//! in every later keepalive how long it has been lapsed. So a lapsed node can never act for
//! that session again, and a leader that hears such a report may expire the session at once
//! instead of waiting out its TTL: failover stays bounded by about the TTL even when the
//! node's keepalives reach the leader but the answers never come back.

use crate::error::Error;
use crate::leader;
use crate::node::Shared;
use crate::proposer::WriteError;
use crate::task::Lease;
use highlander_core::wire::{KeepAliveReply, Request, Response};
use highlander_core::{ClientId, Command, LeaseTerms, NodeId, Outcome, Rejection, SessionId};
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Runs until the node stops: open, register, keep alive; open again when the session ends.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(storage) = wait_for_member(&shared).await else { return };
    let mut attempt: u32 = 0;
    loop {
        let Some(session) = open(&shared, &mut attempt, storage).await else { return };
        shared.set_lease(Lease { session: Some(session), deadline: None });
        // Keepalives start at once, beside the registrations: a schedule's registration
        // waits for the leader to hear a majority of wall clocks, which keepalives carry.
        let registering = register_all(&shared, session);
        let keeping = keep_alive(&shared, session);
        tokio::pin!(registering, keeping);
        let mut registered = false;
        loop {
            tokio::select! {
                _ = &mut registering, if !registered => registered = true,
                _ = &mut keeping => break,
            }
        }
        if shared.is_stopping() {
            // A graceful stop: the lease stays as it is, so its deadline still bounds how long
            // the supervisor lets tasks finish; it is never renewed again.
            return;
        }
        // The session ended: nothing it owned may run any more.
        shared.set_lease(Lease::default());
        attempt = attempt.wrapping_add(1);
    }
}

/// Waits until Raft runs, and returns the storage's member id (what sessions name as their
/// storage). `None` if the node stops first.
async fn wait_for_member(shared: &Shared) -> Option<u64> {
    let mut metrics = shared.raft.leadership();
    loop {
        if let Some(member) = shared.raft.member() {
            return Some(member);
        }
        tokio::select! {
            _ = shared.stopping() => return None,
            changed = metrics.changed() => if changed.is_err() { return None },
        }
    }
}

/// The lease terms this node asks for.
pub(crate) fn lease_terms(shared: &Shared) -> LeaseTerms {
    LeaseTerms {
        ttl_ms: shared.timing.session_ttl.as_millis() as u64,
        margin_ms: shared.timing.lease_margin.as_millis() as u64,
    }
}

async fn open(shared: &Arc<Shared>, attempt: &mut u32, storage: u64) -> Option<SessionId> {
    let pause = shared.timing.heartbeat * 2;
    let mut waiting_logged = false;
    loop {
        if shared.is_stopping() {
            return None;
        }
        let client = shared.client();
        let command = Command::OpenSession {
            client,
            attempt: *attempt,
            lease: lease_terms(shared),
            limits: shared.limits,
            storage,
        };
        match shared.proposer.write_one(command).await {
            Ok(Outcome::SessionOpened { session }) => {
                info!(node = %shared.id, %session, incarnation = client.incarnation, attempt = *attempt, "session opened");
                return Some(session);
            }
            Ok(Outcome::WaitingForPrevious { session }) => {
                if !waiting_logged {
                    warn!(node = %shared.id, previous = %session, "an earlier process of this node, on other storage, still has a live session: waiting until it expires (at most its TTL and margin once it is silent)");
                    waiting_logged = true;
                }
            }
            Ok(Outcome::Rejected(Rejection::StaleIncarnation {
                current,
                attempt: known,
                storage: theirs,
            })) => {
                if theirs != storage {
                    // Another process runs as this node, on other storage, and is newer.
                    let e = Error::Superseded(format!(
                        "node {} was started again on other storage (member {theirs:#x}); this \
                         process (member {storage:#x}) stops",
                        shared.id.0
                    ));
                    warn!(node = %shared.id, error = %e, "stopping");
                    shared.set_fatal(e);
                    return None;
                }
                if current >= client.incarnation {
                    // The cluster knows a newer start of this storage than ours (a clock that
                    // went back, or the same instant): start above it.
                    let next = current.saturating_add(1).max(client.incarnation.saturating_add(1));
                    warn!(node = %shared.id, ours = client.incarnation, cluster = current, "incarnation behind the cluster's; moving to {next}");
                    shared.set_client(ClientId { node: shared.id, incarnation: next });
                    *attempt = 0;
                } else {
                    *attempt = known.saturating_add(1);
                }
            }
            Ok(Outcome::Rejected(Rejection::LimitsMismatch { cluster })) => {
                let e = crate::error::ConfigError::LimitsMismatch { cluster };
                warn!(node = %shared.id, error = %e, "cannot open a session");
                shared.set_fatal(e.into());
                return None;
            }
            Ok(other) => {
                warn!(node = %shared.id, outcome = %other, "unexpected answer to OpenSession")
            }
            Err(WriteError::Stopped(_)) => return None,
            Err(WriteError::Timeout) => {
                debug!(node = %shared.id, "no quorum yet to open a session")
            }
        }
        tokio::select! {
            _ = shared.stopping() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Registers every local handler under the new session.
async fn register_all(shared: &Arc<Shared>, session: SessionId) {
    let (keys, commands): (Vec<highlander_core::Key>, Vec<Command>) = {
        let handlers = shared.handlers();
        handlers
            .iter()
            .map(|(k, h)| (k.clone(), h.registration(session, k, shared.next_epoch())))
            .unzip()
    };
    // Keys that need no time stamp first: they never wait for the cluster's clock.
    let (stamped, plain): (Vec<_>, Vec<_>) =
        keys.into_iter().zip(commands).partition(|(_, c)| c.needs_stamp());
    for batch in [plain, stamped] {
        if batch.is_empty() {
            continue;
        }
        let (keys, commands): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        // Until written: the write is idempotent, and this future is dropped when the
        // session ends.
        loop {
            match shared.proposer.write(commands.clone()).await {
                Ok(outcomes) => {
                    for (key, o) in keys.iter().zip(outcomes) {
                        if o != Outcome::Registered {
                            warn!(node = %shared.id, %key, outcome = %o, "registration refused");
                        }
                    }
                    break;
                }
                Err(e) if !shared.is_stopping() => {
                    warn!(node = %shared.id, error = ?e, "registering the handlers failed; trying again");
                    tokio::time::sleep(shared.timing.heartbeat * 2).await;
                }
                Err(_) => return,
            }
        }
    }
}

/// Sends keepalives until the session ends or the node stops.
async fn keep_alive(shared: &Arc<Shared>, session: SessionId) {
    let timing = shared.timing;
    let clock = shared.clock;
    let ttl = timing.session_ttl;
    let rpc_timeout = timing.keepalive_rpc_timeout();
    let retry = timing.heartbeat;
    let mut redirect: Option<NodeId> = None;
    let mut next = clock.now();
    // With no leader known, ask the peers in turn: a node that hears nobody (a one-way cut)
    // may still reach the leader, which must learn how long this node's lease has lapsed.
    let peers: Vec<NodeId> = shared.peers.iter().copied().filter(|p| *p != shared.id).collect();
    let mut turn = 0usize;
    let mut lapse_logged = false;
    loop {
        tokio::select! {
            biased;
            _ = shared.stopping() => return,
            _ = clock.sleep_until(next) => {}
        }
        let t_send = clock.now();
        let deadline = shared.lease().deadline;
        let lapsed_ms = match deadline {
            Some(d) if d <= t_send => ((t_send - d).as_millis() as u64).max(1),
            _ => 0,
        };
        if lapsed_ms > 0 && !lapse_logged {
            warn!(node = %shared.id, %session, "lease lapsed: this session's tasks are stopped for good; the leader will expire it");
            lapse_logged = true;
        }
        let target = redirect.take().or_else(|| shared.raft.leader_hint()).or_else(|| {
            turn = turn.wrapping_add(1);
            peers.get(turn % peers.len().max(1)).copied()
        });
        let sent = tokio::time::Instant::now();
        let wall_ms = shared.cluster_clock.wall_ms();
        let reply = match target {
            None => KeepAliveReply::Unconfirmed,
            Some(t) if t == shared.id => {
                leader::keepalive(shared, shared.id, session, lapsed_ms, wall_ms).await
            }
            Some(t) => {
                let request = Request::KeepAlive { session, lapsed_ms, wall_ms };
                match shared.transport.request(t, request, rpc_timeout).await {
                    Ok(Response::KeepAlive(r)) => {
                        shared.raft.peer_health().round_trip(sent.elapsed());
                        r
                    }
                    Err(highlander_core::TransportError::Timeout) => {
                        shared.raft.peer_health().timed_out();
                        KeepAliveReply::Unconfirmed
                    }
                    Ok(_) | Err(_) => KeepAliveReply::Unconfirmed,
                }
            }
        };
        match reply {
            KeepAliveReply::Renewed { cluster_ms } => {
                if let Some(c) = cluster_ms {
                    shared.cluster_clock.learn(c);
                }
                let until = t_send + ttl - timing.lease_margin;
                let lease = shared.lease();
                // Never after a lapse (final), never backwards.
                let lapsed = lease.deadline.is_some_and(|d| d <= clock.now());
                if lease.session == Some(session)
                    && !lapsed
                    && lease.deadline.is_none_or(|d| d < until)
                {
                    shared.set_lease(Lease { session: Some(session), deadline: Some(until) });
                }
                next = t_send + timing.keepalive_interval;
            }
            KeepAliveReply::SessionEnded => {
                warn!(node = %shared.id, %session, "session ended by the cluster; stopping its tasks");
                return;
            }
            KeepAliveReply::Removed if !shared.member_in_applied_config() => {
                // Not a member yet (its join was lost with a leader): it gets no log, so it
                // acts for nothing until it has joined.
                warn!(node = %shared.id, %session, "not a member of the cluster yet: ending the session until the storage has joined");
                return;
            }
            KeepAliveReply::Removed => {
                let e = Error::Removed(format!(
                    "the storage of node {} is no longer a member of the cluster (removed, or \
                     replaced by newer storage of the node); start it on an empty data \
                     directory to join again",
                    shared.id.0
                ));
                warn!(node = %shared.id, %session, error = %e, "stopping");
                shared.set_fatal(e);
                return;
            }
            KeepAliveReply::NotLeader { leader: Some(l) } if Some(l) != target => {
                redirect = Some(l);
                next = clock.now();
            }
            KeepAliveReply::NotLeader { .. } | KeepAliveReply::Unconfirmed => {
                next = clock.now() + retry;
            }
        }
        // The leader answered on a session that is no longer ours (a newer one was opened).
        if shared.lease().session != Some(session) {
            return;
        }
    }
}

/// How long a node waits for a session before a call that needs one fails.
/// Gives up early when the node stops.
pub(crate) async fn wait_for_session(shared: &Shared, timeout: Duration) -> Option<SessionId> {
    let mut rx = shared.lease_watch();
    let wait = async {
        tokio::select! {
            biased;
            _ = shared.stopping() => None,
            lease = rx.wait_for(|l| l.session.is_some()) => lease.ok().and_then(|l| l.session),
        }
    };
    tokio::time::timeout(timeout, wait).await.ok().flatten()
}
