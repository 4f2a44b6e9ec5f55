//! The node's session keeper: opens a session through the leader, registers the node's
//! handlers under it, and keeps it alive.
//!
//! The lease is measured from when a keepalive was *sent*: a renewed keepalive sent at
//! `t_send` lets the node act until `t_send + ttl − margin`, while the leader, which heard it
//! later, expires the session no earlier than `ttl + margin` after hearing it.

use crate::leader;
use crate::node::Shared;
use crate::proposer::WriteError;
use crate::task::Lease;
use highlander_core::wire::{KeepAliveReply, Request, Response};
use highlander_core::{
    ClientId, Command, KeySpec, LeaseTerms, NodeId, Outcome, Rejection, SessionId,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Runs until the node stops: open, register, keep alive; open again when the session ends.
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut attempt: u32 = 0;
    loop {
        let Some(session) = open(&shared, &mut attempt).await else { return };
        shared.set_lease(Lease { session: Some(session), deadline: None });
        register_all(&shared, session).await;
        keep_alive(&shared, session).await;
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

/// The lease terms this node asks for.
pub(crate) fn lease_terms(shared: &Shared) -> LeaseTerms {
    LeaseTerms {
        ttl_ms: shared.timing.session_ttl.as_millis() as u64,
        margin_ms: shared.timing.lease_margin.as_millis() as u64,
    }
}

async fn open(shared: &Arc<Shared>, attempt: &mut u32) -> Option<SessionId> {
    let pause = shared.timing.heartbeat * 2;
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
        };
        match shared.proposer.write_one(command).await {
            Ok(Outcome::SessionOpened { session }) => {
                info!(node = %shared.id, %session, incarnation = client.incarnation, attempt = *attempt, "session opened");
                return Some(session);
            }
            Ok(Outcome::Rejected(Rejection::StaleIncarnation { current, attempt: known })) => {
                if current >= client.incarnation {
                    // The cluster knows a newer start of this node id than ours (a clock that
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
        tokio::time::sleep(pause).await;
    }
}

/// Registers every local handler under the new session.
async fn register_all(shared: &Arc<Shared>, session: SessionId) {
    let keys: Vec<(highlander_core::Key, KeySpec)> =
        shared.handlers().iter().map(|(k, h)| (k.clone(), h.spec)).collect();
    if keys.is_empty() {
        return;
    }
    let commands = keys
        .iter()
        .map(|(key, spec)| Command::Register { session, key: key.clone(), spec: *spec })
        .collect();
    match shared.proposer.write(commands).await {
        Ok(outcomes) => {
            for ((key, _), o) in keys.iter().zip(outcomes) {
                if o != Outcome::Registered {
                    warn!(node = %shared.id, %key, outcome = %o, "registration refused");
                }
            }
        }
        Err(e) => {
            warn!(node = %shared.id, error = ?e, "re-registration failed; the supervisor will retry")
        }
    }
}

/// Sends keepalives until the session ends or the node stops.
async fn keep_alive(shared: &Arc<Shared>, session: SessionId) {
    let timing = shared.timing;
    let ttl = timing.session_ttl;
    let rpc_timeout = (timing.keepalive_interval / 2).max(timing.heartbeat * 3);
    let retry = timing.heartbeat;
    let mut redirect: Option<NodeId> = None;
    let mut next = Instant::now();
    // With no leader known, ask the peers in turn: a node that hears nobody (a one-way cut)
    // may still reach the leader, which must learn how long this node's lease has lapsed.
    let peers: Vec<NodeId> =
        shared.raft.members().into_iter().filter(|p| *p != shared.id).collect();
    let mut turn = 0usize;
    loop {
        tokio::select! {
            biased;
            _ = shared.stopping() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let t_send = Instant::now();
        let deadline = shared.lease().deadline;
        let lapsed_ms = match deadline {
            Some(d) if d <= t_send => (t_send - d).as_millis() as u64,
            _ => 0,
        };
        let target = redirect.take().or_else(|| shared.raft.leader_hint()).or_else(|| {
            turn = turn.wrapping_add(1);
            peers.get(turn % peers.len().max(1)).copied()
        });
        let reply = match target {
            None => KeepAliveReply::Unconfirmed,
            Some(t) if t == shared.id => leader::keepalive(shared, session, lapsed_ms).await,
            Some(t) => {
                let request = Request::KeepAlive { session, lapsed_ms };
                match shared.transport.request(t, request, rpc_timeout).await {
                    Ok(Response::KeepAlive(r)) => r,
                    Ok(_) | Err(_) => KeepAliveReply::Unconfirmed,
                }
            }
        };
        match reply {
            KeepAliveReply::Renewed => {
                let until = t_send + ttl - timing.lease_margin;
                let lease = shared.lease();
                if lease.session == Some(session) && lease.deadline.is_none_or(|d| d < until) {
                    shared.set_lease(Lease { session: Some(session), deadline: Some(until) });
                }
                next = t_send + timing.keepalive_interval;
            }
            KeepAliveReply::SessionEnded => {
                warn!(node = %shared.id, %session, "session ended by the cluster; stopping its tasks");
                return;
            }
            KeepAliveReply::NotLeader { leader: Some(l) } if Some(l) != target => {
                redirect = Some(l);
                next = Instant::now();
            }
            KeepAliveReply::NotLeader { .. } | KeepAliveReply::Unconfirmed => {
                next = Instant::now() + retry;
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
