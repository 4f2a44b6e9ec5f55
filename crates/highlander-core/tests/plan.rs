//! The leader's policy: `plan` over a `ClusterState` and a `LeaseTable`.

use highlander_core::state::ClusterState;
use highlander_core::{
    ClientId, Command, Key, KeySpec, LeaseTable, LeaseTerms, Limits, MAX_ASSIGNS_PER_PLAN,
    MAX_MOVES_PER_PLAN, Millis, NodeId, Outcome, Rejection, SessionId, Token, plan, plan_with,
    rendezvous,
};

const TERM: u64 = 3;
const TTL: u64 = 2000;
const MARGIN: u64 = 100;
const LEASE: LeaseTerms = LeaseTerms { ttl_ms: TTL, margin_ms: MARGIN };

fn key(name: &str) -> Key {
    Key::new(name).unwrap()
}

/// A state whose entries are all appended in `TERM`, so the plan's expiries apply.
fn new_state() -> ClusterState {
    let mut st = ClusterState::new();
    st.apply_entry(TERM, &[]);
    st
}

fn open_with(st: &mut ClusterState, node: u64, lease: LeaseTerms) -> SessionId {
    let incarnation = st.nodes.get(&NodeId(node)).map_or(1, |r| r.incarnation + 1);
    let cmd = Command::OpenSession {
        client: ClientId { node: NodeId(node), incarnation },
        attempt: 0,
        lease,
        limits: Limits::default(),
        storage: node,
    };
    match st.apply(&cmd) {
        Outcome::SessionOpened { session } => session,
        other => panic!("open refused: {other}"),
    }
}

fn open(st: &mut ClusterState, node: u64) -> SessionId {
    open_with(st, node, LEASE)
}

fn register(st: &mut ClusterState, session: SessionId, k: &str, spec: KeySpec) {
    let cmd = Command::Register { session, key: key(k), spec, epoch: 1 };
    assert_eq!(st.apply(&cmd), Outcome::Registered);
}

fn assign(st: &mut ClusterState, k: &str, slot: u32, session: SessionId) -> Token {
    match st.apply(&Command::Assign { key: key(k), slot, session }) {
        Outcome::Assigned { token } => token,
        other => panic!("assign refused: {other}"),
    }
}

fn release(st: &mut ClusterState, k: &str, token: Token, hand_over: bool) {
    let cmd = Command::Release { key: key(k), slot: 0, token, hand_over };
    assert_eq!(st.apply(&cmd), Outcome::Released);
}

/// A table of a leadership of `TERM` that began at `now` and has seen the state.
fn table(st: &ClusterState, now: u64) -> LeaseTable {
    let mut t = LeaseTable::new(TERM, Millis(now));
    t.observe(st, Millis(now));
    t
}

fn expiries(commands: &[Command]) -> Vec<SessionId> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::ExpireSession { session, term } => {
                assert_eq!(*term, TERM, "an expiry bound to another term");
                Some(*session)
            }
            _ => None,
        })
        .collect()
}

fn assigns(commands: &[Command]) -> Vec<(String, u32, SessionId)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Assign { key, slot, session } => Some((key.to_string(), *slot, *session)),
            _ => None,
        })
        .collect()
}

fn one_assign(k: &str, session: SessionId) -> Vec<(String, u32, SessionId)> {
    vec![(k.to_string(), 0, session)]
}

/// Applies a plan in one entry of `TERM`; every command in it must be accepted.
fn apply_plan(st: &mut ClusterState, commands: &[Command]) {
    for (cmd, outcome) in commands.iter().zip(st.apply_entry(TERM, commands)) {
        assert!(
            !matches!(outcome, Outcome::Rejected(_)),
            "the plan's {cmd:?} was refused: {outcome}"
        );
    }
    st.check_consistency().unwrap();
}

// ---- Expiry ------------------------------------------------------------------------------

#[test]
fn a_session_expires_only_once_silent_longer_than_ttl_plus_margin() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    // Each session is judged by the terms it was opened with.
    let fast = open_with(&mut st, 3, LeaseTerms { ttl_ms: 500, margin_ms: 50 });
    let mut t = table(&st, 0);
    t.heard(a, Millis(1000));
    t.heard(b, Millis(3000));
    t.heard(fast, Millis(1000));

    assert_eq!(expiries(&plan(&st, &t, Millis(1550))), vec![]);
    assert_eq!(expiries(&plan(&st, &t, Millis(1551))), vec![fast]);
    assert_eq!(expiries(&plan(&st, &t, Millis(1000 + TTL + MARGIN))), vec![fast]);
    assert_eq!(expiries(&plan(&st, &t, Millis(1000 + TTL + MARGIN + 1))), vec![a, fast]);

    // An earlier keepalive arriving late does not move the time back.
    t.heard(b, Millis(10));
    assert_eq!(t.last_seen(b), Some(Millis(3000)));
    let commands = plan(&st, &t, Millis(3101));
    apply_plan(&mut st, &commands);
    assert_eq!(st.sessions.keys().copied().collect::<Vec<_>>(), vec![b]);
}

#[test]
fn a_session_marked_for_expiry_is_not_renewed_and_is_expired() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    register(&mut st, b, "other", KeySpec::singleton());
    assign(&mut st, "other", 0, b);
    let mut t = table(&st, 0);
    t.heard(a, Millis(10));
    t.mark_expiring(a);
    t.heard(a, Millis(20));
    assert_eq!(t.last_seen(a), Some(Millis(10)));
    assert!(!t.may_renew(a) && t.is_expiring(a));
    assert!(t.may_renew(b) && !t.is_expiring(b));

    // Still marked after observing a state in which it lives.
    t.observe(&st, Millis(20));
    assert!(t.is_expiring(a));

    // Expired although just heard from, and not given "k" although less loaded than b.
    let commands = plan(&st, &t, Millis(20));
    assert_eq!(expiries(&commands), vec![a]);
    assert_eq!(assigns(&commands), one_assign("k", b));
    apply_plan(&mut st, &commands);

    // Once ended, the table forgets it.
    t.observe(&st, Millis(30));
    assert!(!t.is_expiring(a));
    assert_eq!(t.last_seen(a), None);
}

#[test]
fn a_new_table_gives_every_session_a_full_grace_from_its_start() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    let mut t = LeaseTable::new(TERM, Millis(5000));
    assert_eq!(t.term(), TERM);
    // A keepalive that arrives before the first observe counts.
    t.heard(b, Millis(5500));
    // Observed with a clock reading from before the start: the start still counts.
    t.observe(&st, Millis(4000));
    assert_eq!(t.last_seen(a), Some(Millis(5000)));
    assert_eq!(t.last_seen(b), Some(Millis(5500)));

    assert_eq!(expiries(&plan(&st, &t, Millis(5000 + TTL + MARGIN))), vec![]);
    assert_eq!(expiries(&plan(&st, &t, Millis(5000 + TTL + MARGIN + 1))), vec![a]);
    assert_eq!(expiries(&plan(&st, &t, Millis(5500 + TTL + MARGIN + 1))), vec![a, b]);

    // A session opened later gets its grace from when the table first saw it.
    let c = open(&mut st, 3);
    t.observe(&st, Millis(6000));
    assert_eq!(t.last_seen(c), Some(Millis(6000)));
}

#[test]
fn a_session_the_table_does_not_know_is_never_expired() {
    let mut st = new_state();
    open(&mut st, 1);
    let t = LeaseTable::new(TERM, Millis(0));
    assert_eq!(expiries(&plan(&st, &t, Millis(1 << 40))), vec![]);
}

#[test]
fn huge_lease_terms_do_not_overflow() {
    let mut st = new_state();
    let a = open_with(&mut st, 1, LeaseTerms { ttl_ms: u64::MAX, margin_ms: u64::MAX - 1 });
    register(&mut st, a, "k", KeySpec::singleton());
    let t = table(&st, 0);
    let commands = plan(&st, &t, Millis(u64::MAX / 2));
    assert_eq!(expiries(&commands), vec![]);
    assert_eq!(assigns(&commands), one_assign("k", a));
}

// ---- Assignment --------------------------------------------------------------------------

#[test]
fn a_vacant_slot_goes_to_the_least_loaded_eligible_candidate() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    let c = open(&mut st, 3);
    for (s, k) in [(a, "a1"), (a, "a2"), (b, "b1")] {
        register(&mut st, s, k, KeySpec::singleton());
        assign(&mut st, k, 0, s);
    }
    for s in [a, b, c] {
        register(&mut st, s, "k", KeySpec::singleton());
    }
    let mut t = table(&st, 0);
    assert_eq!(assigns(&plan(&st, &t, Millis(0))), one_assign("k", c));
    // With c silent, the next least loaded.
    t.heard(a, Millis(1001));
    t.heard(b, Millis(1001));
    assert_eq!(assigns(&plan(&st, &t, Millis(1001))), one_assign("k", b));
}

#[test]
fn load_counts_the_slots_planned_in_the_same_plan() {
    let mut st = new_state();
    let sessions = [open(&mut st, 1), open(&mut st, 2), open(&mut st, 3)];
    let keys: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    for k in &keys {
        for s in sessions {
            register(&mut st, s, k, KeySpec::singleton());
        }
    }
    let commands = plan(&st, &table(&st, 0), Millis(0));
    let planned = assigns(&commands);
    assert_eq!(planned.len(), 6);
    for s in sessions {
        assert_eq!(planned.iter().filter(|(_, _, o)| *o == s).count(), 2, "{planned:?}");
    }
    apply_plan(&mut st, &commands);
}

/// The node a lone vacant key goes to among equally loaded nodes: the highest rendezvous score.
fn favourite(k: &str, nodes: &[u64]) -> u64 {
    *nodes.iter().max_by_key(|n| rendezvous(&key(k), NodeId(**n))).unwrap()
}

#[test]
fn ties_are_broken_by_rendezvous_and_survive_a_restart() {
    let nodes = [1, 2, 3];
    let mut wins = [0; 3];
    for i in 0..40 {
        let k = format!("key-{i}");
        let want = favourite(&k, &nodes);
        // Open the nodes in both orders, so session ids cannot be what decides.
        for order in [[1, 2, 3], [3, 2, 1]] {
            let mut st = new_state();
            for node in order {
                let s = open(&mut st, node);
                register(&mut st, s, &k, KeySpec::singleton());
            }
            let mut commands = plan(&st, &table(&st, 0), Millis(0));
            let got = assigns(&commands);
            assert_eq!(got.len(), 1);
            assert_eq!(st.sessions[&got[0].2].node(), NodeId(want), "{k}");

            // The favourite restarts: its new session gets the key back.
            apply_plan(&mut st, &commands);
            let s = open(&mut st, want);
            register(&mut st, s, &k, KeySpec::singleton());
            assert_eq!(st.keys[&key(&k)].slots[0], None, "the restart did not vacate the key");
            commands = plan(&st, &table(&st, 0), Millis(0));
            assert_eq!(assigns(&commands), one_assign(&k, s));
        }
        wins[want as usize - 1] += 1;
    }
    // The hash spreads keys: every node is somebody's favourite.
    assert!(wins.iter().all(|w| *w > 0), "{wins:?}");
}

#[test]
fn rendezvous_is_the_documented_hash() {
    // Computed independently (FNV-1a 64 of the key, xor node * golden gamma, SplitMix64 mix).
    assert_eq!(rendezvous(&key("irc:#chan"), NodeId(1)), 0x9d65_f05c_f1e8_9d9a);
    assert_eq!(rendezvous(&key("irc:#chan"), NodeId(2)), 0x14fc_f16d_a80b_f05e);
    assert_eq!(rendezvous(&key("sampler"), NodeId(3)), 0xd1f0_44b4_1746_70c9);
    assert_eq!(rendezvous(&key("k"), NodeId(0)), 0x8b51_faab_f145_2e60);
}

#[test]
fn an_exclusive_key_never_gets_two_slots_on_one_session() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "x", KeySpec::exclusive(3));
    register(&mut st, b, "x", KeySpec::exclusive(3));
    let commands = plan(&st, &table(&st, 0), Millis(0));
    let mut owners: Vec<SessionId> = assigns(&commands).into_iter().map(|(_, _, s)| s).collect();
    owners.sort();
    assert_eq!(owners, vec![a, b]);
    apply_plan(&mut st, &commands);
    assert_eq!(assigns(&plan(&st, &table(&st, 0), Millis(0))), vec![]);

    // A third candidate takes the last slot, and only it.
    let c = open(&mut st, 3);
    register(&mut st, c, "x", KeySpec::exclusive(3));
    let vacant = st.keys[&key("x")].slots.iter().position(Option::is_none).unwrap() as u32;
    let commands = plan(&st, &table(&st, 0), Millis(0));
    assert_eq!(assigns(&commands), vec![("x".to_string(), vacant, c)]);
    apply_plan(&mut st, &commands);
}

#[test]
fn an_existing_owner_is_not_given_a_second_slot() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "x", KeySpec::exclusive(3));
    register(&mut st, b, "x", KeySpec::exclusive(3));
    assign(&mut st, "x", 1, a);
    let commands = plan(&st, &table(&st, 0), Millis(0));
    let got = assigns(&commands);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, b);
    apply_plan(&mut st, &commands);
}

#[test]
fn a_handed_over_slot_avoids_the_session_that_handed_it_over() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    // b is busier, so only the hand-over can make the planner pick it.
    register(&mut st, b, "busy", KeySpec::singleton());
    assign(&mut st, "busy", 0, b);

    let t = assign(&mut st, "k", 0, a);
    release(&mut st, "k", t, false);
    assert_eq!(assigns(&plan(&st, &table(&st, 0), Millis(0))), one_assign("k", a));

    let t = assign(&mut st, "k", 0, a);
    release(&mut st, "k", t, true);
    assert_eq!(assigns(&plan(&st, &table(&st, 0), Millis(0))), one_assign("k", b));

    // Nobody else eligible: back to the one that handed it over rather than leave it vacant.
    let mut tb = table(&st, 0);
    tb.heard(a, Millis(1500));
    assert_eq!(assigns(&plan(&st, &tb, Millis(1500))), one_assign("k", a));
    st.apply(&Command::Unregister { session: b, key: key("k"), epoch: 1 });
    assert_eq!(assigns(&plan(&st, &table(&st, 0), Millis(0))), one_assign("k", a));
}

#[test]
fn a_candidate_silent_beyond_half_its_ttl_is_not_chosen() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    register(&mut st, b, "busy", KeySpec::singleton());
    assign(&mut st, "busy", 0, b);
    let mut t = table(&st, 0);
    t.heard(b, Millis(TTL));

    assert_eq!(assigns(&plan(&st, &t, Millis(TTL / 2))), one_assign("k", a));
    assert_eq!(assigns(&plan(&st, &t, Millis(TTL / 2 + 1))), one_assign("k", b));
    // Not chosen, not yet expired either.
    st.apply(&Command::Unregister { session: b, key: key("k"), epoch: 1 });
    let commands = plan(&st, &t, Millis(TTL / 2 + 1));
    assert_eq!(commands, vec![]);
}

/// A session whose node runs a newer process (on other storage) is on its way out: it gets
/// no slot, and it expires by silence like any other.
#[test]
fn a_superseded_session_is_given_nothing() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    register(&mut st, b, "busy", KeySpec::singleton());
    assign(&mut st, "busy", 0, b);
    // Node 1 is started again on another disk while its first process lives.
    let successor = Command::OpenSession {
        client: ClientId { node: NodeId(1), incarnation: 99 },
        attempt: 0,
        lease: LEASE,
        limits: Limits::default(),
        storage: 1001,
    };
    assert_eq!(st.apply(&successor), Outcome::WaitingForPrevious { session: a });
    assert!(st.is_superseded(a));
    let t = table(&st, 0);
    // a is less loaded, but superseded: b gets the key.
    assert_eq!(assigns(&plan(&st, &t, Millis(0))), one_assign("k", b));
    // It expires after its TTL and margin of silence, not before.
    let silent = LEASE.ttl_ms + LEASE.margin_ms;
    let expiries = |now| {
        plan(&st, &t, Millis(now))
            .into_iter()
            .filter(|c| matches!(c, Command::ExpireSession { .. }))
            .count()
    };
    assert_eq!(expiries(silent), 0);
    assert_eq!(expiries(silent + 1), 2, "both silent sessions expire after TTL + margin");
}

#[test]
fn applying_a_plan_leaves_nothing_more_to_plan() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    let c = open(&mut st, 3);
    let specs = [
        ("s1", KeySpec::singleton()),
        ("s2", KeySpec::singleton()),
        ("e2", KeySpec::exclusive(2)),
        ("e3", KeySpec::exclusive(3)),
        // More slots than candidates: some stay vacant for good.
        ("e5", KeySpec::exclusive(5)),
    ];
    for (k, spec) in specs {
        for s in [a, b, c] {
            register(&mut st, s, k, spec);
        }
    }
    register(&mut st, a, "only-a", KeySpec::singleton());
    let t = assign(&mut st, "s2", 0, b);
    release(&mut st, "s2", t, true);

    let mut lt = table(&st, 0);
    let first = plan(&st, &lt, Millis(0));
    assert!(expiries(&first).is_empty());
    apply_plan(&mut st, &first);
    assert_eq!(plan(&st, &lt, Millis(0)), vec![], "planning again proposed more");
    assert_eq!(st.vacant.len(), 2, "{:?}", st.vacant);

    // Proposing the same plan twice is harmless: every copy is refused, nothing changes.
    let before = st.clone();
    for outcome in st.apply_entry(TERM, &first) {
        assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome}");
    }
    assert_eq!(st, before);

    // An expiry and the reassignment it causes settle within two rounds.
    lt.heard(b, Millis(3000));
    lt.heard(c, Millis(3000));
    let expire = plan(&st, &lt, Millis(3000));
    assert_eq!(expiries(&expire), vec![a]);
    assert!(assigns(&expire).iter().all(|(_, _, s)| *s != a));
    apply_plan(&mut st, &expire);
    lt.observe(&st, Millis(3000));
    let refill = plan(&st, &lt, Millis(3000));
    assert!(expiries(&refill).is_empty());
    apply_plan(&mut st, &refill);
    assert_eq!(plan(&st, &lt, Millis(3000)), vec![]);
    // Two candidates are left for every key (and "only-a" is gone with a).
    assert_eq!(st.sessions.values().map(|s| s.owned.len()).sum::<usize>(), 1 + 1 + 2 + 2 + 2);
}

#[test]
fn one_plan_proposes_at_most_max_assigns() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let n = MAX_ASSIGNS_PER_PLAN + 10;
    for i in 0..n {
        register(&mut st, a, &format!("k{i:04}"), KeySpec::singleton());
    }
    let t = table(&st, 0);
    let first = plan(&st, &t, Millis(0));
    assert_eq!(assigns(&first).len(), MAX_ASSIGNS_PER_PLAN);
    apply_plan(&mut st, &first);
    let second = plan(&st, &t, Millis(0));
    assert_eq!(assigns(&second).len(), 10);
    apply_plan(&mut st, &second);
    assert!(st.vacant.is_empty());
}

// ---- Spreading ---------------------------------------------------------------------------

/// Three sessions heard from at `now`, under a leadership begun at 0; the first owns `n` keys
/// every session registered.
fn piled_up(n: usize) -> (ClusterState, [SessionId; 3]) {
    let mut st = new_state();
    let s = [open(&mut st, 1), open(&mut st, 2), open(&mut st, 3)];
    for i in 0..n {
        let k = format!("k{i}");
        register(&mut st, s[0], &k, KeySpec::singleton());
        assign(&mut st, &k, 0, s[0]);
        register(&mut st, s[1], &k, KeySpec::singleton());
        register(&mut st, s[2], &k, KeySpec::singleton());
    }
    (st, s)
}

fn settled_table(st: &ClusterState, now: u64) -> LeaseTable {
    let mut t = LeaseTable::new(TERM, Millis(0));
    t.observe(st, Millis(0));
    for id in st.sessions.keys() {
        t.heard(*id, Millis(now));
    }
    t
}

fn moves(commands: &[Command]) -> Vec<(String, u32, Token)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::RequestMove { key, slot, token } => Some((key.to_string(), *slot, *token)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_settled_leader_asks_the_most_loaded_owner_to_hand_over_what_evens_the_load() {
    let (st, s) = piled_up(4);
    let now = TTL + MARGIN + 1;
    let commands = plan(&st, &settled_table(&st, now), Millis(now));
    let m = moves(&commands);
    // 4, 0, 0 → 2, 1, 1: a third move would leave the first owner lighter than the others.
    assert_eq!(m.len(), 2, "{commands:?}");
    for (k, slot, token) in m {
        assert_eq!(st.owner(&key(&k), slot).map(|o| (o.session, o.token)), Some((s[0], token)));
    }
    // Without the spreading step, a settled state plans nothing.
    assert_eq!(plan_with(&st, &settled_table(&st, now), Millis(now), false), vec![]);
}

#[test]
fn moves_per_plan_are_bounded_and_a_skewed_load_evens_out_in_rounds() {
    let n = MAX_MOVES_PER_PLAN * 3;
    let (mut st, s) = piled_up(n);
    let now = TTL + MARGIN + 1;
    let mut rounds = 0;
    loop {
        let commands = plan(&st, &settled_table(&st, now), Millis(now));
        if commands.is_empty() {
            break;
        }
        rounds += 1;
        assert!(moves(&commands).len() <= MAX_MOVES_PER_PLAN, "{} moves", commands.len());
        apply_plan(&mut st, &commands);
        release_moving(&mut st);
    }
    let loads: Vec<usize> = s.iter().map(|id| st.sessions[id].owned.len()).collect();
    assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "{loads:?}");
    // Each round moves up to the bound, and the vacated slots are filled in the next plan.
    assert!(rounds <= 2 * (2 * n / 3).div_ceil(MAX_MOVES_PER_PLAN) + 2, "{rounds} rounds");
    st.check_consistency().unwrap();
}

/// The owners stop their tasks, then release what they were asked to hand over.
fn release_moving(st: &mut ClusterState) {
    let asked: Vec<(Key, u32, Token)> = st
        .keys
        .iter()
        .flat_map(|(k, ks)| {
            ks.slots.iter().enumerate().filter_map(move |(i, o)| {
                o.filter(|o| o.moving).map(|o| (k.clone(), i as u32, o.token))
            })
        })
        .collect();
    for (key, slot, token) in asked {
        assert_eq!(
            st.apply(&Command::Release { key, slot, token, hand_over: true }),
            Outcome::Released
        );
    }
}

#[test]
fn spreading_converges_through_the_owners_releases_and_then_stops() {
    let (mut st, s) = piled_up(6);
    let now = TTL + MARGIN + 1;
    for _ in 0..20 {
        let commands = plan(&st, &settled_table(&st, now), Millis(now));
        if commands.is_empty() {
            break;
        }
        apply_plan(&mut st, &commands);
        release_moving(&mut st);
    }
    let loads: Vec<usize> = s.iter().map(|id| st.sessions[id].owned.len()).collect();
    assert_eq!(loads, vec![2, 2, 2], "spread evenly");
    st.check_consistency().unwrap();
}

#[test]
fn no_move_for_an_even_load_a_young_leadership_a_silent_session_or_a_move_under_way() {
    // A difference of one is not worth a move.
    let (st, _) = piled_up(1);
    let now = TTL + MARGIN + 1;
    assert_eq!(plan(&st, &settled_table(&st, now), Millis(now)), vec![]);

    let (mut st, s) = piled_up(4);
    // A leadership younger than a session's expiry may count a dead session as live.
    assert_eq!(plan(&st, &settled_table(&st, TTL), Millis(TTL)), vec![]);
    // A session not heard from lately might be dying: no moves.
    let mut t = LeaseTable::new(TERM, Millis(0));
    t.observe(&st, Millis(0));
    t.heard(s[0], Millis(now));
    t.heard(s[1], Millis(now));
    assert!(moves(&plan(&st, &t, Millis(now))).is_empty());
    // One move at a time.
    let first = plan(&st, &settled_table(&st, now), Millis(now));
    apply_plan(&mut st, &first);
    assert_eq!(plan(&st, &settled_table(&st, now), Millis(now)), vec![]);
}

#[test]
fn a_move_request_with_a_stale_token_is_refused() {
    let (mut st, s) = piled_up(1);
    let token = st.owner(&key("k0"), 0).unwrap().token;
    let stale = Token(token.0 + 100);
    assert_eq!(
        st.apply(&Command::RequestMove { key: key("k0"), slot: 0, token: stale }),
        Outcome::Rejected(Rejection::StaleToken)
    );
    assert!(!st.owner(&key("k0"), 0).unwrap().moving);
    assert_eq!(
        st.apply(&Command::RequestMove { key: key("k0"), slot: 0, token }),
        Outcome::MoveRequested
    );
    assert_eq!(st.owner(&key("k0"), 0).map(|o| (o.session, o.moving)), Some((s[0], true)));
    st.check_consistency().unwrap();
}

// ---- Keeping keys off the leader ---------------------------------------------------------

#[test]
fn a_key_goes_to_a_follower_when_one_can_take_it() {
    let mut st = new_state();
    let s = [open(&mut st, 1), open(&mut st, 2), open(&mut st, 3)];
    for id in s {
        register(&mut st, id, "solo", KeySpec::singleton());
    }
    for leader in 1..=3u64 {
        let t = table(&st, 0).led_by(NodeId(leader));
        let a = assigns(&plan(&st, &t, Millis(0)));
        assert_eq!(a.len(), 1);
        assert_ne!(st.sessions[&a[0].2].node(), NodeId(leader), "not on the leader's node");
    }
}

#[test]
fn the_leader_still_runs_a_key_nobody_else_can_and_its_share_when_balanced() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    register(&mut st, a, "only-here", KeySpec::singleton());
    let t = table(&st, 0).led_by(NodeId(1));
    assert_eq!(assigns(&plan(&st, &t, Millis(0))), one_assign("only-here", a));

    // One key each: the leader's counts two, the others one; not worth a move.
    let (mut st, s) = piled_up(0);
    for (i, id) in s.iter().enumerate() {
        let k = format!("own{i}");
        for other in s {
            register(&mut st, other, &k, KeySpec::singleton());
        }
        assign(&mut st, &k, 0, *id);
    }
    let now = TTL + MARGIN + 1;
    let t = settled_table(&st, now).led_by(NodeId(1));
    assert_eq!(plan(&st, &t, Millis(now)), vec![]);
}

#[test]
fn a_lone_key_on_the_leader_is_moved_to_a_follower() {
    let (st, s) = piled_up(1);
    let now = TTL + MARGIN + 1;
    // n1 owns the key and leads: it counts two, the others nothing.
    let t = settled_table(&st, now).led_by(NodeId(1));
    let m = moves(&plan(&st, &t, Millis(now)));
    assert_eq!(m.len(), 1);
    assert_eq!(st.owner(&key(&m[0].0), 0).unwrap().session, s[0]);
    // Led by another node, the same placement is fine.
    let t = settled_table(&st, now).led_by(NodeId(2));
    assert!(moves(&plan(&st, &t, Millis(now))).is_empty());
}

#[test]
fn an_expired_owners_slot_is_reassigned_in_the_same_entry() {
    let mut st = new_state();
    let a = open(&mut st, 1);
    let b = open(&mut st, 2);
    for s in [a, b] {
        register(&mut st, s, "k", KeySpec::singleton());
    }
    assign(&mut st, "k", 0, a);
    let mut t = table(&st, 0);
    t.heard(b, Millis(TTL + MARGIN));
    let now = TTL + MARGIN + 1;
    // The next expiry is due exactly then.
    assert_eq!(table(&st, 0).next_expiry(&st), Some(Millis(now)));
    let commands = plan(&st, &t, Millis(now));
    assert_eq!(expiries(&commands), vec![a]);
    assert_eq!(assigns(&commands), one_assign("k", b));
    apply_plan(&mut st, &commands);
    assert_eq!(st.owner(&key("k"), 0).map(|o| o.session), Some(b));
}
