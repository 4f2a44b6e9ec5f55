//! The leader's assignment policy, as a pure function of the applied state and the liveness
//! table.

use crate::command::Command;
use crate::lease::LeaseTable;
use crate::state::ClusterState;
use crate::{Key, Millis, NodeId, SessionId};
use std::collections::{BTreeMap, BTreeSet};

/// The most `Assign` commands one plan proposes, so one entry stays small.
pub const MAX_ASSIGNS_PER_PLAN: usize = 512;

/// Computes the commands the leader should propose now:
///
/// 1. `ExpireSession` for every session silent longer than its lease terms allow
///    (`ttl + margin` since it was last heard from), bound to the table's term;
/// 2. `Assign` for vacant slots, to a live candidate that was heard from within half its TTL,
///    is not superseded by a newer process of its node, does not already own a slot of the key, and did not just hand the slot over (unless no
///    one else can take it); among those, the least loaded (the leader's own node counting
///    one slot more), ties broken by a rendezvous hash of key and node so that keys spread
///    and a restarted node is preferred for the same keys;
///
/// 3. when there is nothing else to do, `RequestMove`s that even out the load (see `spread`):
///    an owned slot moves only through its owner's own release.
///
/// The result is idempotent: proposing it twice is harmless, because the state machine
/// refuses what has become stale.
///
/// Steps 1 and 2 cost the sessions and the vacant slots, not the keys; step 3 may look at
/// every owned slot when the load is uneven, so a leader runs it less often
/// ([`plan_with`]).
pub fn plan(state: &ClusterState, table: &LeaseTable, now: Millis) -> Vec<Command> {
    plan_with(state, table, now, true)
}

/// [`plan`], with step 3 (spreading the load) only if `spread` is set.
pub fn plan_with(
    state: &ClusterState,
    table: &LeaseTable,
    now: Millis,
    spread: bool,
) -> Vec<Command> {
    let term = table.term();
    let mut commands = Vec::new();
    let mut gone = BTreeSet::new();
    for (id, session) in &state.sessions {
        let seen = table.last_seen(*id).unwrap_or(now);
        if table.is_expiring(*id) || now.since(seen) > session.lease.expiry_after_ms() {
            gone.insert(*id);
            commands.push(Command::ExpireSession { session: *id, term });
        }
    }

    let eligible = |id: &SessionId| -> bool {
        // A superseded session is on its way out: its node runs another process now.
        if gone.contains(id) || state.is_superseded(*id) {
            return false;
        }
        let Some(session) = state.sessions.get(id) else { return false };
        let seen = table.last_seen(*id).unwrap_or(now);
        now.since(seen) <= session.lease.ttl_ms / 2
    };

    let mut load: BTreeMap<SessionId, usize> =
        state.sessions.keys().map(|id| (*id, weighted_load(state, table, *id))).collect();
    let mut planned: BTreeSet<(Key, SessionId)> = BTreeSet::new();
    let mut assigns = 0;
    // The slots of sessions expired in this plan are vacant once their expiry applies, which
    // comes first in the same entry: they are filled at once rather than one entry later.
    let vacant: std::borrow::Cow<BTreeSet<(Key, u32)>> = if gone.is_empty() {
        std::borrow::Cow::Borrowed(&state.vacant)
    } else {
        let mut vacant = state.vacant.clone();
        for id in &gone {
            vacant.extend(state.sessions[id].owned.iter().cloned());
        }
        std::borrow::Cow::Owned(vacant)
    };
    for (key, slot) in vacant.iter() {
        if assigns >= MAX_ASSIGNS_PER_PLAN {
            break;
        }
        let Some(k) = state.keys.get(key) else { continue };
        let owners: BTreeSet<SessionId> =
            k.slots.iter().flatten().map(|o| o.session).filter(|s| !gone.contains(s)).collect();
        let avoid = k.handed_over_by.get(*slot as usize).copied().flatten();
        let free: Vec<SessionId> = k
            .candidates
            .iter()
            .filter(|id| eligible(id))
            .filter(|id| !owners.contains(id) && !planned.contains(&(key.clone(), **id)))
            .copied()
            .collect();
        let preferred: Vec<SessionId> =
            free.iter().filter(|id| Some(**id) != avoid).copied().collect();
        let pool = if preferred.is_empty() { &free } else { &preferred };
        let best = pool.iter().copied().min_by(|a, b| {
            let la = load.get(a).copied().unwrap_or(0);
            let lb = load.get(b).copied().unwrap_or(0);
            let ha = rendezvous(key, state.sessions[a].node());
            let hb = rendezvous(key, state.sessions[b].node());
            la.cmp(&lb).then(hb.cmp(&ha)).then(a.cmp(b))
        });
        if let Some(session) = best {
            *load.entry(session).or_default() += 1;
            planned.insert((key.clone(), session));
            commands.push(Command::Assign { key: key.clone(), slot: *slot, session });
            assigns += 1;
        }
    }
    if commands.is_empty() && spread {
        commands.extend(spread_load(state, table, now, &eligible));
    }
    commands
}

/// The most `RequestMove` commands one plan proposes.
pub const MAX_MOVES_PER_PLAN: usize = 256;

/// Asks owners to hand slots over while the load is uneven by two or more slots between two
/// live candidates of the same key, so keys spread over nodes (a node that registered first
/// would otherwise keep every key).
///
/// Conservative on purpose: only when nothing else is to be done, no move is already under
/// way, every session was heard from recently, and this leadership has lasted longer than any
/// session's expiry time, so that a session it counts as live is not one that died before it
/// took over. The moves of one plan are chosen against the loads they will leave (each moved
/// slot counted at its lightest candidate), at most [`MAX_MOVES_PER_PLAN`]; the next round
/// waits until they are done. Each owner stops its task before it releases the slot.
fn spread_load(
    state: &ClusterState,
    table: &LeaseTable,
    now: Millis,
    eligible: &dyn Fn(&SessionId) -> bool,
) -> Vec<Command> {
    if !spread_settled(state, table, now) {
        return Vec::new();
    }
    if !state.sessions.keys().all(eligible) {
        return Vec::new();
    }
    let mut load: BTreeMap<SessionId, usize> =
        state.sessions.keys().map(|id| (*id, weighted_load(state, table, *id))).collect();
    // Balanced within one slot: no move can help. Checked first, over the sessions only, so
    // a settled cluster's pass does not look at its keys.
    let low = load.values().copied().min().unwrap_or(0);
    let high = load.values().copied().max().unwrap_or(0);
    if high < low + 2 {
        return Vec::new();
    }
    let moving = state.keys.values().any(|k| k.slots.iter().flatten().any(|o| o.moving));
    if moving {
        return Vec::new();
    }
    // The most loaded sessions first; within each, its slots in key order.
    let mut sessions: Vec<SessionId> = state.sessions.keys().copied().collect();
    sessions.sort_by(|a, b| load[b].cmp(&load[a]).then(a.cmp(b)));
    let mut moves = Vec::new();
    for from in sessions {
        for (key, slot) in &state.sessions[&from].owned {
            if moves.len() >= MAX_MOVES_PER_PLAN {
                return moves;
            }
            let from_load = load[&from];
            if from_load < low + 2 {
                break;
            }
            let Some(k) = state.keys.get(key) else { continue };
            let Some(owner) = k.slots.get(*slot as usize).copied().flatten() else { continue };
            let owners: BTreeSet<SessionId> = k.slots.iter().flatten().map(|o| o.session).collect();
            let target = k
                .candidates
                .iter()
                .filter(|c| **c != from && !owners.contains(c) && eligible(c))
                .min_by_key(|c| (load[*c], **c))
                .copied();
            if let Some(to) = target
                && load[&to] + 2 <= from_load
            {
                *load.entry(from).or_default() -= 1;
                *load.entry(to).or_default() += 1;
                moves.push(Command::RequestMove {
                    key: key.clone(),
                    slot: *slot,
                    token: owner.token,
                });
            }
        }
    }
    moves
}

/// Whether this leadership is old enough to move load: it has lasted longer than any
/// session's expiry time, so a session it counts as live is not one that died before it took
/// over. Cheap (the sessions only), for a leader that paces its spreading passes.
pub fn spread_settled(state: &ClusterState, table: &LeaseTable, now: Millis) -> bool {
    let settle = state.sessions.values().map(|s| s.lease.expiry_after_ms()).max().unwrap_or(0);
    now.since(table.started()) > settle
}

/// A session's load for placement: the slots it owns, plus one if it runs on the leader's
/// node, so that a key goes to the leader only when it is no busier than the others by more
/// than that.
fn weighted_load(state: &ClusterState, table: &LeaseTable, id: SessionId) -> usize {
    let Some(s) = state.sessions.get(&id) else { return 0 };
    s.owned.len() + usize::from(table.leader() == Some(s.node()))
}

/// A stable score of how much `node` "wants" `key`: FNV-1a over the key, mixed with the node
/// id by a SplitMix64 finalizer. The same on every platform and every run.
pub fn rendezvous(key: &Key, node: NodeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_str().as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = h ^ node.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
