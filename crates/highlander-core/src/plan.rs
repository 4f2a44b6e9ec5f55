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
///    does not already own a slot of the key, and did not just hand the slot over (unless no
///    one else can take it); among those, the least loaded, ties broken by a rendezvous hash
///    of key and node so that keys spread and a restarted node is preferred for the same keys.
///
/// Owned slots are never moved. The result is idempotent: proposing it twice is harmless,
/// because the state machine refuses what has become stale.
pub fn plan(state: &ClusterState, table: &LeaseTable, now: Millis) -> Vec<Command> {
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
        if gone.contains(id) {
            return false;
        }
        let Some(session) = state.sessions.get(id) else { return false };
        let seen = table.last_seen(*id).unwrap_or(now);
        now.since(seen) <= session.lease.ttl_ms / 2
    };

    let mut load: BTreeMap<SessionId, usize> =
        state.sessions.iter().map(|(id, s)| (*id, s.owned.len())).collect();
    let mut planned: BTreeSet<(Key, SessionId)> = BTreeSet::new();
    let mut assigns = 0;
    for (key, slot) in &state.vacant {
        if assigns >= MAX_ASSIGNS_PER_PLAN {
            break;
        }
        let Some(k) = state.keys.get(key) else { continue };
        let owners: BTreeSet<SessionId> = k.slots.iter().flatten().map(|o| o.session).collect();
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
    commands
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
