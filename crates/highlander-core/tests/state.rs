//! `ClusterState::apply`, command by command, edge by edge.
//!
//! Every refusal is checked to leave the state unchanged (a `Send` may only touch its
//! client's de-duplication window), and every test ends with `check_consistency`.

use highlander_core::state::ClusterState;
use highlander_core::{
    ClientId, Command, Key, KeyKind, KeySpec, LeaseTerms, Limits, MAX_SLOTS, NodeId, Outcome,
    Payload, Rejection, RequestId, Seq, SessionId, Token,
};

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };

/// Small limits so that every bound is reached with a few bytes.
const LIMITS: Limits = Limits {
    max_payload_bytes: 8,
    max_messages_per_key: 3,
    max_bytes_per_key: 16,
    max_total_bytes: 24,
    ..Limits::STANDARD
};

fn key(name: &str) -> Key {
    Key::new(name).unwrap()
}

fn client(node: u64, incarnation: u64) -> ClientId {
    ClientId { node: NodeId(node), incarnation }
}

/// The storage of a node's first data directory; a wiped or replaced one gets another.
fn disk(node: u64) -> u64 {
    node
}

fn open_cmd(node: u64, incarnation: u64, attempt: u32) -> Command {
    open_on(node, incarnation, attempt, disk(node))
}

fn open_on(node: u64, incarnation: u64, attempt: u32, storage: u64) -> Command {
    Command::OpenSession {
        client: client(node, incarnation),
        attempt,
        lease: LEASE,
        limits: LIMITS,
        storage,
    }
}

fn open(st: &mut ClusterState, node: u64, incarnation: u64, attempt: u32) -> SessionId {
    match st.apply(&open_cmd(node, incarnation, attempt)) {
        Outcome::SessionOpened { session } => session,
        other => panic!("open of n{node} ({incarnation}, {attempt}) refused: {other}"),
    }
}

/// The registration epoch the helpers use; tests of epochs pick their own.
const EPOCH: u64 = 10;

fn register_cmd(session: SessionId, k: &str, spec: KeySpec) -> Command {
    Command::Register { session, key: key(k), spec, epoch: EPOCH }
}

fn register(st: &mut ClusterState, session: SessionId, k: &str, spec: KeySpec) {
    let cmd = register_cmd(session, k, spec);
    assert_eq!(st.apply(&cmd), Outcome::Registered, "{cmd:?}");
}

fn unregister_cmd(session: SessionId, k: &str) -> Command {
    Command::Unregister { session, key: key(k), epoch: EPOCH }
}

fn unregister(st: &mut ClusterState, session: SessionId, k: &str) {
    let cmd = unregister_cmd(session, k);
    assert_eq!(st.apply(&cmd), Outcome::Unregistered, "{cmd:?}");
}

fn assign_cmd(k: &str, slot: u32, session: SessionId) -> Command {
    Command::Assign { key: key(k), slot, session }
}

fn assign(st: &mut ClusterState, k: &str, slot: u32, session: SessionId) -> Token {
    match st.apply(&assign_cmd(k, slot, session)) {
        Outcome::Assigned { token } => token,
        other => panic!("assign of {k}/{slot} to {session} refused: {other}"),
    }
}

fn release_cmd(k: &str, slot: u32, token: Token, hand_over: bool) -> Command {
    Command::Release { key: key(k), slot, token, hand_over }
}

fn release(st: &mut ClusterState, k: &str, slot: u32, token: Token, hand_over: bool) {
    assert_eq!(st.apply(&release_cmd(k, slot, token, hand_over)), Outcome::Released);
}

fn send_cmd(k: &str, payload: &[u8], from: ClientId, serial: u64, floor: u64) -> Command {
    Command::Send {
        key: key(k),
        payload: Payload::from(payload),
        request: RequestId { client: from, serial },
        floor,
    }
}

fn send(st: &mut ClusterState, k: &str, payload: &[u8], from: ClientId, serial: u64) -> Outcome {
    st.apply(&send_cmd(k, payload, from, serial, 0))
}

fn sent(seq: u64) -> Outcome {
    Outcome::Sent { seq: Seq(seq) }
}

fn ack_cmd(k: &str, token: Token, upto: u64) -> Command {
    Command::Ack { key: key(k), token, upto: Seq(upto) }
}

/// Applies a command that must be refused with `why` and must change nothing.
fn refused(st: &mut ClusterState, cmd: Command, why: Rejection) {
    let before = st.clone();
    assert_eq!(st.apply(&cmd), Outcome::Rejected(why), "{cmd:?}");
    assert_eq!(*st, before, "the refused {cmd:?} changed the state");
}

/// Like [`refused`] for a `Send`, which records its outcome in the client's window.
fn refused_send(st: &mut ClusterState, cmd: Command, why: Rejection) {
    let before = st.clone();
    assert_eq!(st.apply(&cmd), Outcome::Rejected(why), "{cmd:?}");
    let mut without_windows = st.clone();
    without_windows.clients = before.clients.clone();
    assert_eq!(without_windows, before, "the refused {cmd:?} changed more than its window");
}

fn consistent(st: &ClusterState) {
    if let Err(e) = st.check_consistency() {
        panic!("inconsistent state: {e}\n{st:#?}");
    }
}

fn queued(st: &ClusterState, k: &str) -> Vec<(u64, Vec<u8>)> {
    st.keys[&key(k)]
        .queue
        .messages
        .iter()
        .map(|m| (m.seq.0, m.payload.as_bytes().to_vec()))
        .collect()
}

// ---- OpenSession -------------------------------------------------------------------------

#[test]
fn the_first_session_adopts_limits_and_a_mismatched_node_is_refused() {
    let mut st = ClusterState::new();
    assert_eq!(st.limits, None);
    let a = open(&mut st, 1, 1, 0);
    assert_eq!(st.limits, Some(LIMITS));
    let b = open(&mut st, 2, 1, 0);
    assert_ne!(a, b);

    let other = Limits { max_messages_per_key: 4, ..LIMITS };
    let mismatch = Rejection::LimitsMismatch { cluster: LIMITS };
    let open_other = |node, incarnation| Command::OpenSession {
        client: client(node, incarnation),
        attempt: 0,
        lease: LEASE,
        limits: other,
        storage: disk(node),
    };
    refused(&mut st, open_other(3, 1), mismatch.clone());
    assert!(st.session_of(NodeId(3)).is_none());
    // A known node restarting with other limits keeps its old session, too.
    refused(&mut st, open_other(1, 2), mismatch.clone());
    assert_eq!(st.session_of(NodeId(1)).map(|s| s.id), Some(a));

    // The adopted limits outlive every session.
    st.apply(&Command::CloseSession { session: a });
    st.apply(&Command::CloseSession { session: b });
    assert!(st.sessions.is_empty());
    refused(&mut st, open_other(3, 1), mismatch);
    consistent(&st);
}

#[test]
fn reopening_with_the_same_incarnation_and_attempt_returns_the_same_session() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 7, 2);
    register(&mut st, a, "k", KeySpec::singleton());
    // Another session opened since, so "the newest session" would be the wrong answer.
    open(&mut st, 2, 1, 0);
    let before = st.clone();
    assert_eq!(open(&mut st, 1, 7, 2), a);
    assert_eq!(st, before);
    consistent(&st);
}

#[test]
fn an_older_incarnation_or_attempt_is_stale() {
    let mut st = ClusterState::new();
    open(&mut st, 1, 5, 2);
    for (incarnation, attempt) in [(4, 9), (5, 1), (5, 0), (0, 0)] {
        refused(
            &mut st,
            open_cmd(1, incarnation, attempt),
            Rejection::StaleIncarnation { current: 5, attempt: 2, storage: disk(1) },
        );
    }
    consistent(&st);
}

#[test]
fn a_retried_open_after_its_session_ended_is_stale() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    assert_eq!(st.apply(&Command::ExpireSession { session: a, term: 0 }), Outcome::SessionEnded);
    // Handing back the ended session would let the node run on a dead session.
    refused(
        &mut st,
        open_cmd(1, 1, 0),
        Rejection::StaleIncarnation { current: 1, attempt: 0, storage: disk(1) },
    );
    let again = open(&mut st, 1, 1, 1);
    assert_ne!(again, a);
    consistent(&st);
}

/// A restart on the same storage: the new process holds the storage's lock, so the old one
/// is gone and its keys move at once.
#[test]
fn a_newer_incarnation_or_attempt_on_the_same_storage_closes_the_previous_session_at_once() {
    for (incarnation, attempt) in [(2, 0), (1, 1)] {
        let mut st = ClusterState::new();
        let a = open(&mut st, 1, 1, 0);
        let b = open(&mut st, 2, 1, 0);
        register(&mut st, a, "solo", KeySpec::singleton());
        register(&mut st, a, "pair", KeySpec::exclusive(2));
        register(&mut st, a, "mine", KeySpec::singleton());
        register(&mut st, b, "solo", KeySpec::singleton());
        register(&mut st, b, "pair", KeySpec::exclusive(2));
        let solo = assign(&mut st, "solo", 0, a);
        assign(&mut st, "pair", 0, a);
        let pair_b = assign(&mut st, "pair", 1, b);
        assign(&mut st, "mine", 0, a);

        let a2 = open(&mut st, 1, incarnation, attempt);
        assert_ne!(a2, a);
        assert!(!st.sessions.contains_key(&a));
        assert_eq!(st.session_of(NodeId(1)).map(|s| s.id), Some(a2));

        let k = &st.keys[&key("solo")];
        assert_eq!(k.slots, vec![None]);
        assert!(st.vacant.contains(&(key("solo"), 0)));
        assert_eq!(k.candidates.iter().copied().collect::<Vec<_>>(), vec![b]);
        let k = &st.keys[&key("pair")];
        assert_eq!(k.slots[0], None);
        assert_eq!(k.slots[1].map(|o| (o.session, o.token)), Some((b, pair_b)));
        assert!(!k.candidates.contains(&a));
        // Nobody else can run it and nobody sent to it: forgotten.
        assert!(!st.keys.contains_key(&key("mine")));
        assert!(!st.vacant.contains(&(key("mine"), 0)));
        // The old owner's token is worthless now.
        refused(&mut st, release_cmd("solo", 0, solo, false), Rejection::StaleToken);
        consistent(&st);
    }
}

#[test]
fn a_newer_incarnation_drops_the_older_de_duplication_windows() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    assert_eq!(send(&mut st, "k", b"a", client(1, 1), 1), sent(1));
    assert_eq!(send(&mut st, "k", b"b", client(2, 1), 1), sent(2));

    // A re-open by the same process keeps its window: its retries are still recognised.
    open(&mut st, 1, 1, 1);
    assert!(st.clients.contains_key(&client(1, 1)));
    assert_eq!(send(&mut st, "k", b"a", client(1, 1), 1), sent(1));
    assert_eq!(st.keys[&key("k")].queue.messages.len(), 2);

    open(&mut st, 1, 2, 0);
    assert!(!st.clients.contains_key(&client(1, 1)));
    assert!(st.clients.contains_key(&client(2, 1)), "another node's window was dropped");
    refused_send(&mut st, send_cmd("k", b"a", client(1, 1), 1, 0), Rejection::StaleRequest);
    assert_eq!(send(&mut st, "k", b"c", client(1, 2), 1), sent(3));
    consistent(&st);
}

// ---- CloseSession / ExpireSession --------------------------------------------------------

#[test]
fn expire_ends_a_session_and_vacates_its_slots() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    register(&mut st, b, "k", KeySpec::exclusive(2));
    register(&mut st, a, "q", KeySpec::singleton());
    register(&mut st, a, "idle", KeySpec::singleton());
    let ka = assign(&mut st, "k", 0, a);
    let kb = assign(&mut st, "k", 1, b);
    assign(&mut st, "q", 0, a);
    assert_eq!(send(&mut st, "q", b"m", client(2, 1), 1), sent(1));

    assert_eq!(st.apply(&Command::ExpireSession { session: a, term: 0 }), Outcome::SessionEnded);
    assert!(!st.sessions.contains_key(&a));
    assert_eq!(st.nodes[&NodeId(1)].session, None);
    let k = &st.keys[&key("k")];
    assert_eq!(k.slots[0], None);
    assert_eq!(k.slots[1].map(|o| o.token), Some(kb));
    assert_eq!(k.candidates.iter().copied().collect::<Vec<_>>(), vec![b]);
    // A key with queued messages outlives its last candidate.
    let q = &st.keys[&key("q")];
    assert!(q.candidates.is_empty());
    assert_eq!(q.slots, vec![None]);
    assert_eq!(queued(&st, "q"), vec![(1, b"m".to_vec())]);
    assert!(!st.keys.contains_key(&key("idle")));

    refused(&mut st, release_cmd("k", 0, ka, false), Rejection::StaleToken);
    refused(&mut st, Command::ExpireSession { session: a, term: 0 }, Rejection::NoSuchSession);
    refused(&mut st, Command::CloseSession { session: a }, Rejection::NoSuchSession);
    consistent(&st);
}

/// A graceful close never ends an ownership: the node releases each slot with its token
/// first (in the same entry), so a close that lands late cannot cut a running task loose.
#[test]
fn close_is_refused_while_the_session_owns_a_slot() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    register(&mut st, b, "k", KeySpec::exclusive(2));
    register(&mut st, a, "idle", KeySpec::singleton());
    let ka = assign(&mut st, "k", 0, a);
    let kb = assign(&mut st, "k", 1, b);

    refused(&mut st, Command::CloseSession { session: a }, Rejection::StillOwner);
    // Released with its token, then closed, in one entry as a shutdown writes them.
    let out =
        st.apply_batch(&[release_cmd("k", 0, ka, true), Command::CloseSession { session: a }]);
    assert_eq!(out, vec![Outcome::Released, Outcome::SessionEnded]);
    assert!(!st.sessions.contains_key(&a));
    let k = &st.keys[&key("k")];
    assert_eq!(k.slots[0], None);
    assert_eq!(k.slots[1].map(|o| o.token), Some(kb));
    assert!(!st.keys.contains_key(&key("idle")));
    refused(&mut st, Command::CloseSession { session: a }, Rejection::NoSuchSession);
    refused(&mut st, Command::CloseSession { session: SessionId(99) }, Rejection::NoSuchSession);
    consistent(&st);
}

/// Finding 3 of the safety audit: a process on other storage (another machine, a wiped disk,
/// an id configured twice) used to end the live session of the node's earlier process at
/// once, and its keys moved while that process, cut off but alive, still ran them.
#[test]
fn a_new_process_on_other_storage_waits_out_the_live_session_it_replaces() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    let token = assign(&mut st, "k", 0, a);
    assert_eq!(send(&mut st, "k", b"m", client(1, 1), 1), sent(1));

    // The replacement asks: refused, and recorded as the node's successor.
    let replacement = open_on(1, 5, 0, 77);
    assert_eq!(st.apply(&replacement), Outcome::WaitingForPrevious { session: a });
    assert!(st.sessions.contains_key(&a), "the live session of the old process was ended");
    assert_eq!(st.owner(&key("k"), 0).map(|o| (o.session, o.token)), Some((a, token)));
    assert!(st.is_superseded(a));
    assert!(!st.is_superseded(b));
    let rec = &st.nodes[&NodeId(1)];
    assert_eq!((rec.incarnation, rec.storage, rec.opened, rec.session), (5, 77, false, Some(a)));
    // Asking again changes nothing.
    let before = st.clone();
    assert_eq!(st.apply(&replacement), Outcome::WaitingForPrevious { session: a });
    assert_eq!(st, before);
    // The old process's requests are stale now: it cannot re-open or send as the node.
    refused(
        &mut st,
        open_cmd(1, 1, 1),
        Rejection::StaleIncarnation { current: 5, attempt: 0, storage: 77 },
    );
    refused_send(&mut st, send_cmd("k", b"x", client(1, 1), 2, 0), Rejection::StaleRequest);
    // Its ownership still ends only by its token or by expiry.
    assert_eq!(st.apply(&Command::ExpireSession { session: a, term: 0 }), Outcome::SessionEnded);
    assert_eq!(st.owner(&key("k"), 0), None);
    let a2 = match st.apply(&replacement) {
        Outcome::SessionOpened { session } => session,
        other => panic!("the successor could not open once the old session ended: {other}"),
    };
    assert!(!st.is_superseded(a2));
    assert_eq!(st.nodes[&NodeId(1)].session, Some(a2));
    assert!(st.nodes[&NodeId(1)].opened);
    // A retry of that open returns the same session.
    assert_eq!(st.apply(&replacement), Outcome::SessionOpened { session: a2 });
    consistent(&st);
}

/// A node that restarts on the storage of a process that was itself waiting for an older
/// one takes the fast path only against a session of the same storage.
#[test]
fn the_fast_path_needs_the_storage_of_the_session_it_ends() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    assign(&mut st, "k", 0, a);
    assert_eq!(st.apply(&open_on(1, 2, 0, 77)), Outcome::WaitingForPrevious { session: a });
    // Another process on the old storage (the old process restarted): it holds that lock,
    // so the old session's process is gone; the waiting successor is stale from now on.
    let a3 = open_on(1, 3, 0, disk(1));
    let a3 = match st.apply(&a3) {
        Outcome::SessionOpened { session } => session,
        other => panic!("{other}"),
    };
    assert!(!st.sessions.contains_key(&a));
    refused(
        &mut st,
        open_on(1, 2, 0, 77),
        Rejection::StaleIncarnation { current: 3, attempt: 0, storage: disk(1) },
    );
    assert_eq!(st.nodes[&NodeId(1)].session, Some(a3));
    consistent(&st);
}

#[test]
fn an_expiry_applies_only_in_the_term_that_decided_it() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    assign(&mut st, "k", 0, a);
    // An expiry decided by the leader of term 3, appended by a later leadership.
    let late = Command::ExpireSession { session: a, term: 3 };
    assert_eq!(
        st.apply_entry(4, std::slice::from_ref(&late)),
        vec![Outcome::Rejected(Rejection::WrongTerm { decided: 3, appended: 4 })]
    );
    assert!(st.sessions.contains_key(&a));
    refused(&mut st, late, Rejection::WrongTerm { decided: 3, appended: 4 });
    // Other commands do not care about the term.
    assert_eq!(
        st.apply_entry(2, &[open_cmd(2, 1, 0)]),
        vec![Outcome::SessionOpened { session: SessionId(2) }]
    );
    let ended = st.apply_entry(4, &[Command::ExpireSession { session: a, term: 4 }]);
    assert_eq!(ended, vec![Outcome::SessionEnded]);
    assert!(!st.sessions.contains_key(&a) && st.owner(&key("k"), 0).is_none());
    consistent(&st);
}

// ---- Register / Unregister ---------------------------------------------------------------

#[test]
fn register_refuses_invalid_specs_and_unknown_sessions() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let bad = [
        KeySpec { kind: KeyKind::Singleton, slots: 0 },
        KeySpec { kind: KeyKind::Singleton, slots: 2 },
        KeySpec::exclusive(0),
        KeySpec::exclusive(MAX_SLOTS + 1),
    ];
    for spec in bad {
        refused(
            &mut st,
            Command::Register { session: a, key: key("k"), spec, epoch: EPOCH },
            Rejection::InvalidSpec,
        );
    }
    let cmd = register_cmd(SessionId(99), "k", KeySpec::singleton());
    refused(&mut st, cmd, Rejection::NoSuchSession);

    register(&mut st, a, "k", KeySpec::exclusive(MAX_SLOTS));
    assert_eq!(st.keys[&key("k")].slots.len(), MAX_SLOTS as usize);
    assert_eq!(st.vacant.len(), MAX_SLOTS as usize);
    consistent(&st);
}

#[test]
fn a_conflicting_spec_is_refused_while_candidates_exist() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    let conflict = Rejection::SpecConflict { existing: KeySpec::singleton() };
    for session in [a, b] {
        let cmd = register_cmd(session, "k", KeySpec::exclusive(2));
        refused(&mut st, cmd, conflict.clone());
    }
    // The same spec again is harmless.
    register(&mut st, b, "k", KeySpec::singleton());
    let before = st.clone();
    register(&mut st, b, "k", KeySpec::singleton());
    assert_eq!(st, before);
    consistent(&st);
}

#[test]
fn a_key_with_only_queued_messages_takes_a_new_spec() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(3));
    assert_eq!(send(&mut st, "k", b"one", client(1, 1), 1), sent(1));
    assert_eq!(send(&mut st, "k", b"two", client(1, 1), 2), sent(2));
    unregister(&mut st, a, "k");
    assert_eq!(st.keys[&key("k")].slots.len(), 3);

    let b = open(&mut st, 2, 1, 0);
    register(&mut st, b, "k", KeySpec::singleton());
    let k = &st.keys[&key("k")];
    assert_eq!(k.spec, KeySpec::singleton());
    assert_eq!(k.slots, vec![None]);
    assert_eq!(k.handed_over_by, vec![None]);
    assert!(st.vacant.contains(&(key("k"), 0)));
    assert!(!st.vacant.contains(&(key("k"), 1)) && !st.vacant.contains(&(key("k"), 2)));
    assert_eq!(queued(&st, "k"), vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
    assert_eq!(send(&mut st, "k", b"3", client(1, 1), 3), sent(3));
    consistent(&st);
}

/// Finding 2 of the safety audit: `Unregister` used to vacate the session's slot outright,
/// so one that landed late (its caller gone, the proposer still retrying) handed a slot on
/// while the task of a newer registration ran in it.
#[test]
fn unregister_never_vacates_a_slot() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    register(&mut st, b, "k", KeySpec::exclusive(2));
    register(&mut st, a, "other", KeySpec::singleton());
    let ka = assign(&mut st, "k", 0, a);
    let kb = assign(&mut st, "k", 1, b);
    let other = assign(&mut st, "other", 0, a);

    refused(&mut st, unregister_cmd(a, "k"), Rejection::StillOwner);
    // Released with its token, then withdrawn.
    release(&mut st, "k", 0, ka, true);
    unregister(&mut st, a, "k");
    let k = &st.keys[&key("k")];
    assert_eq!(k.slots[0], None);
    assert_eq!(k.handed_over_by[0], Some(a));
    assert!(st.vacant.contains(&(key("k"), 0)));
    assert_eq!(k.slots[1].map(|o| (o.session, o.token)), Some((b, kb)));
    assert_eq!(k.candidates.iter().copied().collect::<Vec<_>>(), vec![b]);
    assert_eq!(st.owner(&key("other"), 0).map(|o| o.token), Some(other));
    let sa = &st.sessions[&a];
    assert_eq!(sa.keys.keys().cloned().collect::<Vec<_>>(), vec![key("other")]);
    assert_eq!(sa.owned.iter().cloned().collect::<Vec<_>>(), vec![(key("other"), 0)]);

    // Withdrawing what is not registered is a harmless no-op.
    let before = st.clone();
    unregister(&mut st, a, "k");
    unregister(&mut st, a, "never");
    assert_eq!(st, before);
    refused(&mut st, unregister_cmd(SessionId(99), "k"), Rejection::NoSuchSession);

    // The last candidate leaves a key without messages: it is forgotten.
    release(&mut st, "k", 1, kb, true);
    unregister(&mut st, b, "k");
    assert!(!st.keys.contains_key(&key("k")));
    assert!(st.vacant.iter().all(|(k, _)| k != &key("k")));
    consistent(&st);
}

/// The exact sequence of finding 2: withdraw (epoch 2) is submitted, its caller gives up,
/// the node registers again (epoch 3) and is given the slot; the withdrawal lands late. It
/// must neither vacate the slot nor undo the newer registration.
#[test]
fn a_withdrawal_landing_after_a_newer_registration_changes_nothing() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    let reg = |session, epoch| Command::Register {
        session,
        key: key("k"),
        spec: KeySpec::singleton(),
        epoch,
    };
    assert_eq!(st.apply(&reg(a, 1)), Outcome::Registered);
    assert_eq!(st.apply(&reg(b, 1)), Outcome::Registered);
    let t1 = assign(&mut st, "k", 0, a);
    release(&mut st, "k", 0, t1, true);
    let late = Command::Unregister { session: a, key: key("k"), epoch: 2 };
    assert_eq!(st.apply(&reg(a, 3)), Outcome::Registered);
    // Occupied by b meanwhile, then handed back to a: a runs it under a new token.
    let tb = assign(&mut st, "k", 0, b);
    release(&mut st, "k", 0, tb, true);
    let t3 = assign(&mut st, "k", 0, a);
    let before = st.clone();
    refused(&mut st, late.clone(), Rejection::StaleRegistration);
    assert_eq!(st, before);
    assert_eq!(st.owner(&key("k"), 0).map(|o| (o.session, o.token)), Some((a, t3)));
    // Even if a had not been given the slot, the late withdrawal would not undo epoch 3.
    release(&mut st, "k", 0, t3, false);
    refused(&mut st, late, Rejection::StaleRegistration);
    assert!(st.keys[&key("k")].candidates.contains(&a));
    // A late registration never lowers the epoch in force.
    assert_eq!(st.apply(&reg(a, 2)), Outcome::Registered);
    assert_eq!(st.sessions[&a].keys[&key("k")], 3);
    // A withdrawal covering epoch 3 goes through.
    assert_eq!(
        st.apply(&Command::Unregister { session: a, key: key("k"), epoch: 3 }),
        Outcome::Unregistered
    );
    consistent(&st);
}

// ---- Assign ------------------------------------------------------------------------------

#[test]
fn assign_takes_only_a_vacant_slot_for_a_live_candidate() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    let c = open(&mut st, 3, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    register(&mut st, b, "k", KeySpec::exclusive(2));

    refused(&mut st, assign_cmd("nokey", 0, a), Rejection::NoSuchKey);
    refused(&mut st, assign_cmd("k", 2, a), Rejection::NoSuchSlot);
    refused(&mut st, assign_cmd("k", 0, c), Rejection::NotCandidate);
    refused(&mut st, assign_cmd("k", 0, SessionId(99)), Rejection::NoSuchSession);

    assign(&mut st, "k", 0, a);
    refused(&mut st, assign_cmd("k", 0, b), Rejection::SlotOccupied);
    refused(&mut st, assign_cmd("k", 1, a), Rejection::AlreadyOwnsSlot);

    st.apply(&Command::CloseSession { session: b });
    refused(&mut st, assign_cmd("k", 1, b), Rejection::NoSuchSession);
    consistent(&st);
}

#[test]
fn tokens_come_from_one_counter_and_strictly_increase() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "x", KeySpec::singleton());
    register(&mut st, b, "x", KeySpec::singleton());
    register(&mut st, a, "y", KeySpec::exclusive(2));
    register(&mut st, b, "y", KeySpec::exclusive(2));

    let t1 = assign(&mut st, "x", 0, a);
    // Refused assigns use up no token.
    refused(&mut st, assign_cmd("x", 0, b), Rejection::SlotOccupied);
    let t2 = assign(&mut st, "y", 0, a);
    let t3 = assign(&mut st, "y", 1, b);
    assert_eq!([t2.0, t3.0], [t1.0 + 1, t1.0 + 2]);
    assert_eq!(st.last_token, t3.0);

    release(&mut st, "x", 0, t1, false);
    let t4 = assign(&mut st, "x", 0, b);
    assert!(t4 > t3);

    // Forgetting every key does not reset the counter.
    release(&mut st, "x", 0, t4, false);
    release(&mut st, "y", 0, t2, false);
    release(&mut st, "y", 1, t3, false);
    for s in [a, b] {
        unregister(&mut st, s, "x");
        unregister(&mut st, s, "y");
    }
    assert!(st.keys.is_empty());
    register(&mut st, a, "x", KeySpec::singleton());
    assert!(assign(&mut st, "x", 0, a) > t4);
    consistent(&st);
}

// ---- Release -----------------------------------------------------------------------------

#[test]
fn release_refuses_a_stale_token() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());
    register(&mut st, b, "j", KeySpec::singleton());
    let t1 = assign(&mut st, "k", 0, a);
    let tj = assign(&mut st, "j", 0, b);

    refused(&mut st, release_cmd("k", 0, tj, false), Rejection::StaleToken);
    refused(&mut st, release_cmd("k", 0, Token(t1.0 + 100), false), Rejection::StaleToken);
    refused(&mut st, release_cmd("k", 1, t1, false), Rejection::StaleToken);
    refused(&mut st, release_cmd("nokey", 0, t1, false), Rejection::StaleToken);

    release(&mut st, "k", 0, t1, false);
    assert!(st.vacant.contains(&(key("k"), 0)));
    refused(&mut st, release_cmd("k", 0, t1, false), Rejection::StaleToken);

    let t2 = assign(&mut st, "k", 0, b);
    refused(&mut st, release_cmd("k", 0, t1, true), Rejection::StaleToken);
    assert_eq!(st.owner(&key("k"), 0).map(|o| o.token), Some(t2));
    consistent(&st);
}

#[test]
fn a_hand_over_is_recorded_for_the_planner() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, b, "k", KeySpec::singleton());

    let t = assign(&mut st, "k", 0, a);
    release(&mut st, "k", 0, t, true);
    assert_eq!(st.keys[&key("k")].handed_over_by, vec![Some(a)]);

    let t = assign(&mut st, "k", 0, b);
    release(&mut st, "k", 0, t, false);
    assert_eq!(st.keys[&key("k")].handed_over_by, vec![None]);

    let t = assign(&mut st, "k", 0, b);
    release(&mut st, "k", 0, t, true);
    assign(&mut st, "k", 0, a);
    // The owner's session ending is no hand-over.
    st.apply(&Command::ExpireSession { session: a, term: 0 });
    assert_eq!(st.keys[&key("k")].handed_over_by, vec![None]);
    consistent(&st);
}

// ---- Send --------------------------------------------------------------------------------

#[test]
fn send_numbers_each_keys_messages_from_one_without_gaps() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, a, "j", KeySpec::singleton());
    let me = client(1, 1);
    assert_eq!(send(&mut st, "k", b"k1", me, 1), sent(1));
    assert_eq!(send(&mut st, "j", b"j1", me, 2), sent(1));
    // A refusal in between takes no number.
    refused_send(
        &mut st,
        send_cmd("k", &[0; 9], me, 3, 0),
        Rejection::PayloadTooLarge { size: 9, max: 8 },
    );
    assert_eq!(send(&mut st, "k", b"k2", me, 4), sent(2));
    assert_eq!(send(&mut st, "k", b"k3", me, 5), sent(3));
    assert_eq!(
        queued(&st, "k"),
        vec![(1, b"k1".to_vec()), (2, b"k2".to_vec()), (3, b"k3".to_vec())]
    );
    assert_eq!(queued(&st, "j"), vec![(1, b"j1".to_vec())]);
    assert_eq!(st.keys[&key("k")].queue.bytes, 6);
    assert_eq!(st.total_bytes, 8);
    consistent(&st);
}

#[test]
fn send_to_an_unknown_key_is_refused() {
    let mut st = ClusterState::new();
    open(&mut st, 1, 1, 0);
    refused_send(&mut st, send_cmd("nokey", b"x", client(1, 1), 1, 0), Rejection::NoSuchKey);
    assert!(st.keys.is_empty());
    consistent(&st);
}

#[test]
fn send_refuses_a_payload_over_the_limit() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    refused_send(
        &mut st,
        send_cmd("k", &[1; 9], client(1, 1), 1, 0),
        Rejection::PayloadTooLarge { size: 9, max: 8 },
    );
    assert_eq!(send(&mut st, "k", &[1; 8], client(1, 1), 2), sent(1));
    consistent(&st);
}

#[test]
fn a_queue_is_full_at_its_message_count() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    for serial in 1..=3 {
        assert_eq!(send(&mut st, "k", b"x", client(1, 1), serial), sent(serial));
    }
    refused_send(&mut st, send_cmd("k", b"", client(1, 1), 4, 0), Rejection::QueueFull);
    consistent(&st);
}

#[test]
fn a_queue_is_full_at_its_byte_limit() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    assert_eq!(send(&mut st, "k", &[0; 8], client(1, 1), 1), sent(1));
    assert_eq!(send(&mut st, "k", &[0; 7], client(1, 1), 2), sent(2));
    refused_send(&mut st, send_cmd("k", &[0; 2], client(1, 1), 3, 0), Rejection::QueueFull);
    // Exactly at the limit is still within it.
    assert_eq!(send(&mut st, "k", &[0; 1], client(1, 1), 4), sent(3));
    assert_eq!(st.keys[&key("k")].queue.bytes, 16);
    consistent(&st);
}

#[test]
fn the_store_is_full_at_its_total_byte_limit() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    for k in ["x", "y", "z"] {
        register(&mut st, a, k, KeySpec::singleton());
    }
    let me = client(1, 1);
    assert_eq!(send(&mut st, "x", &[0; 8], me, 1), sent(1));
    assert_eq!(send(&mut st, "x", &[0; 8], me, 2), sent(2));
    assert_eq!(send(&mut st, "y", &[0; 8], me, 3), sent(1));
    assert_eq!(st.total_bytes, 24);
    // "y" and "z" have room of their own; the store has none.
    refused_send(&mut st, send_cmd("y", &[0; 1], me, 4, 0), Rejection::StoreFull);
    refused_send(&mut st, send_cmd("z", &[0; 1], me, 5, 0), Rejection::StoreFull);
    assert_eq!(send(&mut st, "z", b"", me, 6), sent(1));

    // Acknowledging frees room in the store.
    let t = assign(&mut st, "x", 0, a);
    assert_eq!(st.apply(&ack_cmd("x", t, 1)), Outcome::Acked { head: Some(Seq(2)) });
    assert_eq!(st.total_bytes, 16);
    assert_eq!(send(&mut st, "y", &[0; 8], me, 7), sent(2));
    consistent(&st);
}

#[test]
fn a_retried_request_gets_its_original_outcome_and_is_not_queued_twice() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    let me = client(1, 1);
    assert_eq!(send(&mut st, "k", b"first", me, 1), sent(1));
    let before = st.clone();
    // Even a retry with another body and key is answered from the window.
    assert_eq!(send(&mut st, "k", b"other", me, 1), sent(1));
    assert_eq!(send(&mut st, "nokey", b"first", me, 1), sent(1));
    assert_eq!(st, before);
    // The same serial from another node is another request.
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, b, "k", KeySpec::singleton());
    assert_eq!(send(&mut st, "k", b"theirs", client(2, 1), 1), sent(2));

    // A refusal is an outcome too: the retry repeats it even once there is room.
    assert_eq!(send(&mut st, "k", b"x", me, 2), sent(3));
    assert_eq!(send(&mut st, "k", b"y", me, 3), Outcome::Rejected(Rejection::QueueFull));
    let t = assign(&mut st, "k", 0, a);
    st.apply(&ack_cmd("k", t, 3));
    assert_eq!(send(&mut st, "k", b"y", me, 3), Outcome::Rejected(Rejection::QueueFull));
    assert!(st.keys[&key("k")].queue.messages.is_empty());
    consistent(&st);
}

#[test]
fn a_request_below_the_clients_floor_is_refused() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    let me = client(1, 1);
    assert_eq!(st.apply(&send_cmd("k", b"1", me, 1, 0)), sent(1));
    assert_eq!(st.apply(&send_cmd("k", b"2", me, 2, 0)), sent(2));
    assert_eq!(st.apply(&send_cmd("k", b"3", me, 3, 2)), sent(3));
    let window = &st.clients[&me];
    assert_eq!(window.floor, 2);
    assert_eq!(window.answered.keys().copied().collect::<Vec<_>>(), vec![2, 3]);

    refused_send(&mut st, send_cmd("k", b"1", me, 1, 0), Rejection::StaleRequest);
    assert_eq!(st.apply(&send_cmd("k", b"2", me, 2, 0)), sent(2));
    // A lower floor later does not lower it.
    assert_eq!(st.apply(&send_cmd("k", b"", me, 4, 1)), Outcome::Rejected(Rejection::QueueFull));
    assert_eq!(st.clients[&me].floor, 2);
    assert_eq!(queued(&st, "k").len(), 3);
    consistent(&st);
}

#[test]
fn a_request_from_a_non_current_incarnation_is_refused() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    open(&mut st, 1, 2, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, b, "k", KeySpec::singleton());
    for from in [client(1, 1), client(1, 3), client(9, 1)] {
        refused(&mut st, send_cmd("k", b"x", from, 1, 0), Rejection::StaleRequest);
    }
    assert_eq!(send(&mut st, "k", b"x", client(1, 2), 1), sent(1));
    consistent(&st);
}

// ---- Ack ---------------------------------------------------------------------------------

#[test]
fn only_the_current_token_of_slot_zero_acknowledges() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "k", KeySpec::exclusive(2));
    register(&mut st, b, "k", KeySpec::exclusive(2));
    for serial in 1..=3 {
        assert_eq!(send(&mut st, "k", b"m", client(1, 1), serial), sent(serial));
    }
    // Nobody consumes yet.
    refused(&mut st, ack_cmd("k", Token(1), 1), Rejection::StaleToken);
    let t0 = assign(&mut st, "k", 0, a);
    let t1 = assign(&mut st, "k", 1, b);
    refused(&mut st, ack_cmd("k", t1, 1), Rejection::StaleToken);
    refused(&mut st, ack_cmd("nokey", t0, 1), Rejection::NoSuchKey);
    assert_eq!(st.apply(&ack_cmd("k", t0, 1)), Outcome::Acked { head: Some(Seq(2)) });

    release(&mut st, "k", 0, t0, false);
    refused(&mut st, ack_cmd("k", t0, 2), Rejection::StaleToken);
    let t2 = assign(&mut st, "k", 0, a);
    refused(&mut st, ack_cmd("k", t0, 2), Rejection::StaleToken);
    assert_eq!(st.apply(&ack_cmd("k", t2, 2)), Outcome::Acked { head: Some(Seq(3)) });
    consistent(&st);
}

#[test]
fn ack_drops_the_acknowledged_prefix_and_its_bytes() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    register(&mut st, a, "j", KeySpec::singleton());
    let me = client(1, 1);
    assert_eq!(send(&mut st, "k", b"1", me, 1), sent(1));
    assert_eq!(send(&mut st, "k", b"22", me, 2), sent(2));
    assert_eq!(send(&mut st, "k", b"333", me, 3), sent(3));
    assert_eq!(send(&mut st, "j", b"4444", me, 4), sent(1));
    assert_eq!(st.total_bytes, 10);
    let t = assign(&mut st, "k", 0, a);

    assert_eq!(st.apply(&ack_cmd("k", t, 2)), Outcome::Acked { head: Some(Seq(3)) });
    assert_eq!(queued(&st, "k"), vec![(3, b"333".to_vec())]);
    assert_eq!(st.keys[&key("k")].queue.bytes, 3);
    assert_eq!(st.total_bytes, 7);

    // Acknowledging an already dropped prefix is harmless.
    let before = st.clone();
    assert_eq!(st.apply(&ack_cmd("k", t, 1)), Outcome::Acked { head: Some(Seq(3)) });
    assert_eq!(st.apply(&ack_cmd("k", t, 0)), Outcome::Acked { head: Some(Seq(3)) });
    assert_eq!(st, before);

    refused(&mut st, ack_cmd("k", t, 4), Rejection::AckBeyondQueue);
    assert_eq!(st.apply(&ack_cmd("k", t, 3)), Outcome::Acked { head: None });
    assert_eq!(st.keys[&key("k")].queue.bytes, 0);
    assert_eq!(st.total_bytes, 4);
    refused(&mut st, ack_cmd("k", t, 4), Rejection::AckBeyondQueue);

    // Numbering goes on after the queue emptied.
    assert_eq!(send(&mut st, "k", b"5", me, 5), sent(4));
    consistent(&st);
}

#[test]
fn a_key_is_forgotten_once_it_has_neither_candidates_nor_messages() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    assert_eq!(send(&mut st, "k", b"m", client(1, 1), 1), sent(1));
    assert_eq!(send(&mut st, "k", b"n", client(1, 1), 2), sent(2));
    unregister(&mut st, a, "k");
    assert!(st.keys.contains_key(&key("k")), "a key with messages was dropped");

    let b = open(&mut st, 2, 1, 0);
    register(&mut st, b, "k", KeySpec::singleton());
    let t = assign(&mut st, "k", 0, b);
    assert_eq!(st.apply(&ack_cmd("k", t, 2)), Outcome::Acked { head: None });
    assert!(st.keys.contains_key(&key("k")), "a key with a candidate was dropped");
    release(&mut st, "k", 0, t, false);
    unregister(&mut st, b, "k");
    assert!(!st.keys.contains_key(&key("k")));
    assert!(st.vacant.is_empty());
    assert_eq!(st.total_bytes, 0);
    consistent(&st);
}

#[test]
fn messages_from_reads_from_a_sequence_number_on() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    for serial in 1..=3 {
        send(&mut st, "k", &[serial as u8], client(1, 1), serial);
    }
    let t = assign(&mut st, "k", 0, a);
    st.apply(&ack_cmd("k", t, 1));
    let q = &st.keys[&key("k")].queue;
    let seqs = |from: u64, max: usize| {
        q.messages_from(Seq(from), max).map(|m| m.seq.0).collect::<Vec<_>>()
    };
    assert_eq!(seqs(0, 10), vec![2, 3]);
    assert_eq!(seqs(2, 10), vec![2, 3]);
    assert_eq!(seqs(3, 10), vec![3]);
    assert_eq!(seqs(4, 10), Vec::<u64>::new());
    assert_eq!(seqs(2, 1), vec![2]);
    assert_eq!(q.head(), Some(Seq(2)));
}

#[test]
fn unusable_lease_terms_or_limits_are_refused_and_never_adopted() {
    let mut st = ClusterState::new();
    let with = |lease: LeaseTerms, limits: Limits| Command::OpenSession {
        storage: disk(1),
        client: client(1, 1),
        attempt: 0,
        lease,
        limits,
    };
    let good = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
    for lease in [
        LeaseTerms { ttl_ms: 0, margin_ms: 0 },
        LeaseTerms { ttl_ms: 2000, margin_ms: 0 },
        LeaseTerms { ttl_ms: 100, margin_ms: 100 },
    ] {
        refused(&mut st, with(lease, Limits::default()), Rejection::InvalidSessionTerms);
    }
    let zero = Limits { max_messages_per_key: 0, ..Limits::default() };
    refused(&mut st, with(good, zero), Rejection::InvalidSessionTerms);
    assert_eq!(st.limits, None, "nothing unusable is adopted");
    assert!(matches!(st.apply(&with(good, Limits::default())), Outcome::SessionOpened { .. }));
    consistent(&st);
}

#[test]
fn a_key_registered_again_never_reuses_a_sequence_number() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    let t = assign(&mut st, "k", 0, a);
    assert_eq!(send(&mut st, "k", b"one", client(1, 1), 1), sent(1));
    assert_eq!(send(&mut st, "k", b"two", client(1, 1), 2), sent(2));
    assert!(matches!(st.apply(&ack_cmd("k", t, 2)), Outcome::Acked { head: None }));
    // Nobody runs it and nothing is queued: the key is forgotten.
    release(&mut st, "k", 0, t, false);
    unregister(&mut st, a, "k");
    assert!(!st.keys.contains_key(&key("k")));
    register(&mut st, a, "k", KeySpec::singleton());
    assert_eq!(send(&mut st, "k", b"three", client(1, 1), 3), sent(3));
    consistent(&st);
}

/// The token invariant's check reports an ownership ended by a command that did not name
/// it (what a withdrawal used to do), and accepts the commands that may end one.
#[test]
fn the_token_invariant_check_catches_an_unnamed_end() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    register(&mut st, a, "k", KeySpec::singleton());
    let t = assign(&mut st, "k", 0, a);
    // The state an Unregister that vacated the slot would have left.
    let mut vacated = st.clone();
    release(&mut vacated, "k", 0, t, false);
    let unnamed = [
        unregister_cmd(a, "k"),
        Command::CloseSession { session: a },
        open_on(1, 2, 0, 77),
        release_cmd("k", 0, Token(t.0 + 1), false),
    ];
    for command in unnamed {
        let e = ClusterState::ownerships_ended_by_name(&st, &vacated, &command).unwrap_err();
        assert!(e.contains("without naming it"), "{e}");
    }
    let named = [
        release_cmd("k", 0, t, false),
        Command::ExpireSession { session: a, term: 0 },
        open_on(1, 2, 0, disk(1)),
    ];
    for command in named {
        ClusterState::ownerships_ended_by_name(&st, &vacated, &command).unwrap();
    }
    // Nothing ended: nothing to name.
    ClusterState::ownerships_ended_by_name(&st, &st, &unregister_cmd(a, "k")).unwrap();
}

#[test]
fn a_status_page_lists_keys_in_order_by_prefix_and_says_where_the_next_starts() {
    use highlander_core::wire::KeyQuery;
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    for name in ["a", "t:1", "t:2", "t:3", "u"] {
        register(&mut st, a, name, KeySpec::singleton());
    }
    assign(&mut st, "t:2", 0, a);
    let names = |q: &KeyQuery| -> (Vec<String>, Option<String>) {
        let (keys, _, next) = st.key_reports(q);
        (keys.iter().map(|k| k.key.to_string()).collect(), next.map(|k| k.to_string()))
    };
    assert_eq!(names(&KeyQuery::all()).0, ["a", "t:1", "t:2", "t:3", "u"]);
    let first = KeyQuery::default().with_prefix("t:").limit(2);
    assert_eq!(names(&first), (vec!["t:1".into(), "t:2".into()], Some("t:2".into())));
    let second = first.clone().after(key("t:2"));
    assert_eq!(names(&second), (vec!["t:3".into()], None));
    // An `after` before the prefix starts at the prefix; one past it lists nothing.
    assert_eq!(names(&first.clone().after(key("a"))).0, ["t:1", "t:2"]);
    assert_eq!(names(&first.after(key("t:9"))), (vec![], None));
    // The summary counts every key, whatever is listed.
    let (keys, sum, next) = st.key_reports(&KeyQuery::summary());
    assert!(keys.is_empty() && next.is_none());
    assert_eq!((sum.keys, sum.slots, sum.owned, sum.vacant, sum.moving), (5, 5, 1, 4, 0));
}

#[test]
fn a_session_end_touches_every_key_it_registered_or_owned() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1, 0);
    let b = open(&mut st, 2, 1, 0);
    register(&mut st, a, "x", KeySpec::singleton());
    register(&mut st, a, "y", KeySpec::singleton());
    register(&mut st, b, "z", KeySpec::singleton());
    assign(&mut st, "x", 0, a);
    let touched = |c: &Command| {
        let mut out = std::collections::BTreeSet::new();
        st.keys_touched_by(c, &mut out);
        out.into_iter().map(|k| k.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(touched(&Command::ExpireSession { session: a, term: 0 }), ["x", "y"]);
    assert_eq!(touched(&Command::CloseSession { session: b }), ["z"]);
    // A new process of node 1 on the same storage ends session a.
    assert_eq!(touched(&open_on(1, 2, 0, disk(1))), ["x", "y"]);
    assert_eq!(touched(&assign_cmd("y", 0, a)), ["y"]);
}
