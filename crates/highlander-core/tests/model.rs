//! `ClusterState::apply` against a simple model, over random command sequences.
//!
//! The universe is small on purpose (3 nodes, 3 keys, payloads of 0..=5 bytes, queues of 3
//! messages and 8 bytes) so that every refusal and every edge is reached often. After every
//! command: the outcome equals the model's, the whole state equals the one the model
//! describes, `check_consistency` holds, a refusal changed nothing (a `Send` only its
//! client's window), tokens of successful assigns strictly increase, a twin fed the same
//! commands encodes to the same bytes, and the state survives an encode/decode round trip.
//! And the token invariant: no command ends an ownership without naming it — a slot's owner
//! leaves only through a `Release` carrying its token, an expiry, or a new process of the
//! owner's node on the same storage (which proves the old process gone).
//! Leader rounds (`plan`, with random sessions marked for expiry) run in between; everything
//! they propose must be accepted, and planning again after them proposes nothing.
//!
//! The case count is proptest's default; set `PROPTEST_CASES` to run more.

use highlander_core::codec::{decode_snapshot, encode};
use highlander_core::state::{ClientWindow, ClusterState, KeyState, NodeRecord, Queue, Session};
use highlander_core::{
    ClientId, Command, Key, KeyKind, KeySpec, LeaseTable, LeaseTerms, Limits, MAX_SLOTS, Message,
    Millis, NodeId, Outcome, Owner, Payload, Rejection, RequestId, Seq, SessionId, Token, plan,
};
use proptest::prelude::*;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };

const LIMITS: Limits = Limits {
    max_payload_bytes: 4,
    max_messages_per_key: 3,
    max_bytes_per_key: 8,
    max_total_bytes: 12,
    ..Limits::STANDARD
};

/// What a misconfigured node brings.
const ODD_LIMITS: Limits = Limits { max_messages_per_key: 2, ..LIMITS };

const KEYS: [&str; 3] = ["a", "b", "c"];

fn key(i: usize) -> Key {
    Key::new(KEYS[i]).unwrap()
}

fn rejected(why: Rejection) -> Outcome {
    Outcome::Rejected(why)
}

// ---- The model ---------------------------------------------------------------------------

/// A session as the model sees it; what it owns is read off the keys' slots.
#[derive(Clone, Debug)]
struct MSession {
    client: ClientId,
    attempt: u32,
    lease: LeaseTerms,
    storage: u64,
    keys: BTreeMap<Key, u64>,
}

/// What the model remembers of a node: its newest process and its live session.
#[derive(Clone, Copy, Debug)]
struct MNode {
    incarnation: u64,
    attempt: u32,
    storage: u64,
    opened: bool,
    session: Option<SessionId>,
}

#[derive(Clone, Debug)]
struct MKey {
    spec: KeySpec,
    candidates: BTreeSet<SessionId>,
    slots: Vec<Option<Owner>>,
    handed_over_by: Vec<Option<SessionId>>,
    next_seq: u64,
    queue: Vec<(u64, Payload)>,
}

impl MKey {
    fn new(spec: KeySpec) -> MKey {
        MKey {
            spec,
            candidates: BTreeSet::new(),
            slots: vec![None; spec.slots as usize],
            handed_over_by: vec![None; spec.slots as usize],
            next_seq: 1,
            queue: Vec::new(),
        }
    }

    fn bytes(&self) -> u64 {
        self.queue.iter().map(|(_, p)| p.len() as u64).sum()
    }

    /// Vacates every slot `session` owns; the session did not hand them over.
    fn vacate_all_of(&mut self, session: SessionId) {
        for (slot, owner) in self.slots.iter_mut().enumerate() {
            if owner.is_some_and(|o| o.session == session) {
                *owner = None;
                self.handed_over_by[slot] = None;
            }
        }
    }
}

/// Straight from the design, with no indexes: every derived fact is recomputed.
#[derive(Clone, Debug, Default)]
struct Model {
    term: u64,
    limits: Option<Limits>,
    last_session: u64,
    last_token: u64,
    /// The highest seq ever handed out; a key created again starts above it.
    last_seq: u64,
    sessions: BTreeMap<SessionId, MSession>,
    /// Per node: newest process and live session.
    nodes: BTreeMap<NodeId, MNode>,
    keys: BTreeMap<Key, MKey>,
    /// Per client: floor and remembered outcomes.
    windows: BTreeMap<ClientId, (u64, BTreeMap<u64, Outcome>)>,
}

impl Model {
    fn apply(&mut self, command: &Command) -> Outcome {
        let outcome = self.apply_inner(command);
        // No key is kept that nobody can run and nobody has sent to.
        self.keys.retain(|_, k| !k.candidates.is_empty() || !k.queue.is_empty());
        outcome
    }

    fn apply_inner(&mut self, command: &Command) -> Outcome {
        match command {
            Command::OpenSession { client, attempt, lease, limits, storage } => {
                self.open(*client, *attempt, *lease, *limits, *storage)
            }
            Command::CloseSession { session } => {
                if self.owns_any(*session, None) {
                    return rejected(Rejection::StillOwner);
                }
                self.end(*session)
            }
            Command::ExpireSession { session, term } => {
                if *term != self.term {
                    return rejected(Rejection::WrongTerm { decided: *term, appended: self.term });
                }
                self.end(*session)
            }
            Command::Register { session, key, spec, epoch } => {
                self.register(*session, key, *spec, *epoch)
            }
            Command::Unregister { session, key, epoch } => {
                let owns = self.owns_any(*session, Some(key));
                let Some(s) = self.sessions.get_mut(session) else {
                    return rejected(Rejection::NoSuchSession);
                };
                match s.keys.get(key) {
                    None => return Outcome::Unregistered,
                    Some(in_force) if in_force > epoch => {
                        return rejected(Rejection::StaleRegistration);
                    }
                    Some(_) if owns => return rejected(Rejection::StillOwner),
                    Some(_) => {}
                }
                s.keys.remove(key);
                self.keys.get_mut(key).expect("a registered key exists").candidates.remove(session);
                Outcome::Unregistered
            }
            Command::Assign { key, slot, session } => self.assign(key, *slot as usize, *session),
            Command::Release { key, slot, token, hand_over } => {
                let k = self.keys.get_mut(key);
                let Some(k) = k.filter(|k| (*slot as usize) < k.slots.len()) else {
                    return rejected(Rejection::StaleToken);
                };
                match k.slots[*slot as usize] {
                    Some(owner) if owner.token == *token => {
                        k.slots[*slot as usize] = None;
                        k.handed_over_by[*slot as usize] = hand_over.then_some(owner.session);
                        Outcome::Released
                    }
                    _ => rejected(Rejection::StaleToken),
                }
            }
            Command::RequestMove { key, slot, token } => {
                match self.keys.get_mut(key).and_then(|k| k.slots.get_mut(*slot as usize)) {
                    Some(Some(owner)) if owner.token == *token => {
                        owner.moving = true;
                        Outcome::MoveRequested
                    }
                    _ => rejected(Rejection::StaleToken),
                }
            }
            Command::Send { key, payload, request, floor } => {
                self.send(key, payload, *request, *floor)
            }
            Command::Ack { key, token, upto } => {
                let Some(k) = self.keys.get_mut(key) else {
                    return rejected(Rejection::NoSuchKey);
                };
                if k.slots[0].map(|o| o.token) != Some(*token) {
                    return rejected(Rejection::StaleToken);
                }
                if upto.0 >= k.next_seq {
                    return rejected(Rejection::AckBeyondQueue);
                }
                k.queue.retain(|(seq, _)| *seq > upto.0);
                Outcome::Acked { head: k.queue.first().map(|(seq, _)| Seq(*seq)) }
            }
            // Schedules have their own property test (`schedules.rs`); this model runs
            // without them.
            Command::Stamp { .. }
            | Command::RegisterSchedule { .. }
            | Command::Fire { .. }
            | Command::SkipTicks { .. }
            | Command::TickStarted { .. }
            | Command::TickDone { .. }
            | Command::ScheduleControl { .. }
            | Command::Enqueue { .. }
            | Command::ConfigureQueue { .. }
            | Command::Claim { .. }
            | Command::CompleteJob { .. }
            | Command::FailJob { .. }
            | Command::ExtendJob { .. }
            | Command::JobControl { .. }
            | Command::PurgeJobs { .. } => unreachable!("not generated"),
        }
    }

    /// Whether `session` owns a slot (of `key`, or of any key).
    fn owns_any(&self, session: SessionId, key: Option<&Key>) -> bool {
        self.keys
            .iter()
            .filter(|(k, _)| key.is_none_or(|key| key == *k))
            .any(|(_, k)| k.slots.iter().flatten().any(|o| o.session == session))
    }

    fn open(
        &mut self,
        client: ClientId,
        attempt: u32,
        lease: LeaseTerms,
        limits: Limits,
        storage: u64,
    ) -> Outcome {
        if let Some(cluster) = self.limits.filter(|l| *l != limits) {
            return rejected(Rejection::LimitsMismatch { cluster });
        }
        if let Some(&node) = self.nodes.get(&client.node) {
            let stale = rejected(Rejection::StaleIncarnation {
                current: node.incarnation,
                attempt: node.attempt,
                storage: node.storage,
            });
            match (client.incarnation, attempt).cmp(&(node.incarnation, node.attempt)) {
                Ordering::Less => return stale,
                Ordering::Equal if node.opened => {
                    return node
                        .session
                        .map_or(stale, |session| Outcome::SessionOpened { session });
                }
                _ => {
                    if let Some(previous) = node.session {
                        if self.sessions[&previous].storage != storage {
                            let waiting = MNode {
                                incarnation: client.incarnation,
                                attempt,
                                storage,
                                opened: false,
                                session: Some(previous),
                            };
                            self.nodes.insert(client.node, waiting);
                            return Outcome::WaitingForPrevious { session: previous };
                        }
                        self.end(previous);
                    }
                }
            }
        }
        self.limits.get_or_insert(limits);
        self.windows.retain(|c, _| c.node != client.node || c.incarnation == client.incarnation);
        self.last_session += 1;
        let id = SessionId(self.last_session);
        self.sessions
            .insert(id, MSession { client, attempt, lease, storage, keys: BTreeMap::new() });
        let node = MNode {
            incarnation: client.incarnation,
            attempt,
            storage,
            opened: true,
            session: Some(id),
        };
        self.nodes.insert(client.node, node);
        Outcome::SessionOpened { session: id }
    }

    fn end(&mut self, id: SessionId) -> Outcome {
        let Some(session) = self.sessions.remove(&id) else {
            return rejected(Rejection::NoSuchSession);
        };
        for k in self.keys.values_mut() {
            k.vacate_all_of(id);
            k.candidates.remove(&id);
        }
        if let Some(node) = self.nodes.get_mut(&session.client.node)
            && node.session == Some(id)
        {
            node.session = None;
        }
        Outcome::SessionEnded
    }

    fn register(&mut self, session: SessionId, key: &Key, spec: KeySpec, epoch: u64) -> Outcome {
        let valid = match spec.kind {
            KeyKind::Singleton => spec.slots == 1,
            KeyKind::Exclusive => spec.slots >= 1 && spec.slots <= MAX_SLOTS,
            // A schedule comes with its schedule, in `RegisterSchedule`.
            KeyKind::Schedule => false,
        };
        if !valid {
            return rejected(Rejection::InvalidSpec);
        }
        if !self.sessions.contains_key(&session) {
            return rejected(Rejection::NoSuchSession);
        }
        let last_seq = self.last_seq;
        let k = self
            .keys
            .entry(key.clone())
            .or_insert_with(|| MKey { next_seq: last_seq + 1, ..MKey::new(spec) });
        if k.spec != spec {
            if !k.candidates.is_empty() {
                return rejected(Rejection::SpecConflict { existing: k.spec });
            }
            // Only messages were left: the key starts over with the new spec, queue kept.
            let queue = std::mem::take(&mut k.queue);
            let next_seq = k.next_seq;
            *k = MKey { queue, next_seq, ..MKey::new(spec) };
        }
        k.candidates.insert(session);
        let keys = &mut self.sessions.get_mut(&session).unwrap().keys;
        let in_force = keys.entry(key.clone()).or_insert(epoch);
        *in_force = (*in_force).max(epoch);
        Outcome::Registered
    }

    fn assign(&mut self, key: &Key, slot: usize, session: SessionId) -> Outcome {
        let Some(k) = self.keys.get_mut(key) else {
            return rejected(Rejection::NoSuchKey);
        };
        if slot >= k.slots.len() {
            return rejected(Rejection::NoSuchSlot);
        }
        if k.slots[slot].is_some() {
            return rejected(Rejection::SlotOccupied);
        }
        if !self.sessions.contains_key(&session) {
            return rejected(Rejection::NoSuchSession);
        }
        if !k.candidates.contains(&session) {
            return rejected(Rejection::NotCandidate);
        }
        if k.slots.iter().flatten().any(|o| o.session == session) {
            return rejected(Rejection::AlreadyOwnsSlot);
        }
        self.last_token += 1;
        let token = Token(self.last_token);
        k.slots[slot] = Some(Owner { session, token, moving: false });
        Outcome::Assigned { token }
    }

    fn send(&mut self, key: &Key, payload: &Payload, request: RequestId, floor: u64) -> Outcome {
        let client = request.client;
        if self.nodes.get(&client.node).map(|n| n.incarnation) != Some(client.incarnation) {
            return rejected(Rejection::StaleRequest);
        }
        let (old_floor, answered) = self.windows.get(&client).cloned().unwrap_or_default();
        if request.serial < old_floor {
            return rejected(Rejection::StaleRequest);
        }
        if let Some(outcome) = answered.get(&request.serial) {
            return outcome.clone();
        }
        let floor = floor.max(old_floor);
        let mut answered: BTreeMap<u64, Outcome> =
            answered.into_iter().filter(|(serial, _)| *serial >= floor).collect();
        let outcome = self.enqueue(key, payload);
        if request.serial >= floor {
            answered.insert(request.serial, outcome.clone());
        }
        self.windows.insert(client, (floor, answered));
        outcome
    }

    fn enqueue(&mut self, key: &Key, payload: &Payload) -> Outcome {
        let limits = self.limits.expect("a current client implies adopted limits");
        let total: u64 = self.keys.values().map(MKey::bytes).sum();
        let Some(k) = self.keys.get_mut(key) else {
            return rejected(Rejection::NoSuchKey);
        };
        let size = payload.len() as u64;
        let max = u64::from(limits.max_payload_bytes);
        if size > max {
            return rejected(Rejection::PayloadTooLarge { size, max });
        }
        if k.queue.len() >= limits.max_messages_per_key as usize
            || k.bytes() + size > limits.max_bytes_per_key
        {
            return rejected(Rejection::QueueFull);
        }
        if total + size > limits.max_total_bytes {
            return rejected(Rejection::StoreFull);
        }
        let seq = k.next_seq;
        k.next_seq += 1;
        k.queue.push((seq, payload.clone()));
        self.last_seq = self.last_seq.max(seq);
        Outcome::Sent { seq: Seq(seq) }
    }

    /// The `ClusterState` this model describes, indexes and all.
    fn to_state(&self) -> ClusterState {
        let mut st = ClusterState::new();
        st.limits = self.limits;
        st.last_session = self.last_session;
        st.last_token = self.last_token;
        st.last_seq = self.last_seq;
        st.entry_term = self.term;
        for (id, s) in &self.sessions {
            let owned = self
                .keys
                .iter()
                .flat_map(|(key, k)| {
                    k.slots.iter().enumerate().filter_map(move |(slot, owner)| {
                        owner.filter(|o| o.session == *id).map(|_| (key.clone(), slot as u32))
                    })
                })
                .collect();
            let session = Session {
                id: *id,
                client: s.client,
                attempt: s.attempt,
                lease: s.lease,
                storage: s.storage,
                keys: s.keys.clone(),
                owned,
                jobs: BTreeMap::new(),
            };
            st.sessions.insert(*id, session);
        }
        for (id, node) in &self.nodes {
            let record = NodeRecord {
                incarnation: node.incarnation,
                attempt: node.attempt,
                storage: node.storage,
                opened: node.opened,
                session: node.session,
            };
            st.nodes.insert(*id, record);
        }
        for (key, k) in &self.keys {
            for (slot, owner) in k.slots.iter().enumerate() {
                if owner.is_none() {
                    st.vacant.insert((key.clone(), slot as u32));
                }
            }
            let messages: VecDeque<Message> = k
                .queue
                .iter()
                .map(|(seq, payload)| Message { seq: Seq(*seq), payload: payload.clone() })
                .collect();
            let queue = Queue { next_seq: k.next_seq, messages, bytes: k.bytes() };
            st.total_bytes += k.bytes();
            let state = KeyState {
                spec: k.spec,
                candidates: k.candidates.iter().copied().collect(),
                slots: k.slots.clone(),
                handed_over_by: k.handed_over_by.clone(),
                queue,
                schedule: None,
            };
            st.keys.insert(key.clone(), state);
        }
        for (client, (floor, answered)) in &self.windows {
            let window = ClientWindow { floor: *floor, answered: answered.clone() };
            st.clients.insert(*client, window);
        }
        st
    }
}

// ---- Operations, resolved against the model when they run ---------------------------------

/// A session: usually one of the live ones, sometimes any id (dead, unborn or live).
#[derive(Clone, Copy, Debug)]
struct Pick(u8);

/// A token: usually the current owner's of the slot in question (or of its neighbour slot),
/// sometimes any small number.
#[derive(Clone, Copy, Debug)]
struct TokenPick {
    current: bool,
    neighbour: bool,
    raw: u64,
}

/// A request serial, relative to the highest one the client's window knows.
#[derive(Clone, Copy, Debug)]
enum SerialPick {
    Next,
    Back(u64),
}

#[derive(Clone, Copy, Debug)]
enum OpenHow {
    Retry,
    NewAttempt,
    NewIncarnation,
    Older,
}

/// A registration epoch: the session's next one, or one behind the newest in force.
#[derive(Clone, Copy, Debug)]
enum EpochPick {
    Next,
    Back(u64),
}

/// One step of a run: a command with its arguments picked against the model when it runs (so
/// that sessions, tokens and serials are mostly real ones), or a leader round, a new term, or
/// a twin restored from a snapshot.
#[derive(Clone, Debug)]
enum Op {
    Open {
        node: u64,
        how: OpenHow,
        odd_limits: bool,
        /// Open from other storage than the node's newest process (a wiped disk, another
        /// machine) rather than the same.
        other_storage: bool,
    },
    Close {
        session: Pick,
    },
    Expire {
        session: Pick,
        stale_term: bool,
    },
    Register {
        session: Pick,
        key: usize,
        spec: u8,
        epoch: EpochPick,
    },
    Unregister {
        session: Pick,
        key: usize,
        epoch: EpochPick,
    },
    Assign {
        key: usize,
        slot: u32,
        session: Pick,
    },
    Release {
        key: usize,
        slot: u32,
        token: TokenPick,
        hand_over: bool,
    },
    Send {
        node: u64,
        incarnation: i8,
        serial: SerialPick,
        floor: Option<u64>,
        len: usize,
        key: usize,
    },
    Ack {
        key: usize,
        token: TokenPick,
        relative: bool,
        upto: u64,
    },
    NewTerm,
    Plan {
        expiring: u8,
    },
    Restore,
}

fn token_pick() -> impl Strategy<Value = TokenPick> {
    (prop::bool::weighted(0.8), prop::bool::weighted(0.2), 0u64..12)
        .prop_map(|(current, neighbour, raw)| TokenPick { current, neighbour, raw })
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let pick = || (0u8..13).prop_map(Pick);
    let key = || 0usize..KEYS.len();
    // Slot 3 exists for no key here.
    let slot = || 0u32..4;
    let how = prop_oneof![
        Just(OpenHow::Retry),
        Just(OpenHow::NewAttempt),
        Just(OpenHow::NewIncarnation),
        Just(OpenHow::Older),
    ];
    let epoch =
        || prop_oneof![4 => Just(EpochPick::Next), 1 => (0u64..3).prop_map(EpochPick::Back)];
    let op = prop_oneof![
        3 => (1u64..=3, how, prop::bool::weighted(0.05), prop::bool::weighted(0.2))
            .prop_map(|(node, how, odd_limits, other_storage)| Op::Open { node, how, odd_limits, other_storage }),
        1 => pick().prop_map(|session| Op::Close { session }),
        1 => (pick(), prop::bool::weighted(0.2))
            .prop_map(|(session, stale_term)| Op::Expire { session, stale_term }),
        6 => (pick(), key(), 0u8..10, epoch())
            .prop_map(|(session, key, spec, epoch)| Op::Register { session, key, spec, epoch }),
        2 => (pick(), key(), epoch()).prop_map(|(session, key, epoch)| Op::Unregister { session, key, epoch }),
        3 => (key(), slot(), pick()).prop_map(|(key, slot, session)| Op::Assign { key, slot, session }),
        2 => (key(), slot(), token_pick(), any::<bool>())
            .prop_map(|(key, slot, token, hand_over)| Op::Release { key, slot, token, hand_over }),
        8 => (
            1u64..=3,
            prop_oneof![10 => Just(0i8), 1 => Just(-1i8), 1 => Just(1i8)],
            prop_oneof![4 => Just(SerialPick::Next), 1 => (0u64..4).prop_map(SerialPick::Back)],
            prop_oneof![4 => Just(None), 1 => (0u64..3).prop_map(Some)],
            0usize..=5,
            key(),
        )
            .prop_map(|(node, incarnation, serial, floor, len, key)| Op::Send {
                node,
                incarnation,
                serial,
                floor,
                len,
                key,
            }),
        4 => (key(), token_pick(), prop::bool::weighted(0.8), 0u64..5)
            .prop_map(|(key, token, relative, upto)| Op::Ack { key, token, relative, upto }),
        1 => Just(Op::NewTerm),
        3 => prop_oneof![9 => Just(0u8), 1 => any::<u8>()].prop_map(|expiring| Op::Plan { expiring }),
        1 => Just(Op::Restore),
    ];
    // Every run starts with the three nodes up; the rest is random.
    let start: Vec<Op> = (1..=3)
        .map(|node| Op::Open { node, how: OpenHow::Retry, odd_limits: false, other_storage: false })
        .collect();
    prop::collection::vec(op, 1..150)
        .prop_map(move |ops| start.iter().cloned().chain(ops).collect())
}

impl Model {
    fn session(&self, pick: Pick) -> SessionId {
        let live: Vec<SessionId> = self.sessions.keys().copied().collect();
        match pick.0 {
            p if p < 11 && !live.is_empty() => live[p as usize % live.len()],
            p => SessionId(u64::from(p % 10)),
        }
    }

    fn token(&self, key: usize, slot: u32, pick: TokenPick) -> Token {
        let current = self.keys.get(&self::key(key)).and_then(|k| {
            let slot =
                if pick.neighbour { (slot as usize + 1) % k.slots.len() } else { slot as usize };
            k.slots.get(slot).copied().flatten()
        });
        match current {
            Some(owner) if pick.current => owner.token,
            _ => Token(pick.raw),
        }
    }

    /// A registration epoch of `session` for `key`, relative to the newest in force there
    /// (or to the session's id, so epochs grow from session to session as a node's do).
    fn epoch(&self, session: SessionId, key: usize, pick: EpochPick) -> u64 {
        let base = self
            .sessions
            .get(&session)
            .and_then(|s| s.keys.get(&self::key(key)).copied())
            .unwrap_or(session.0 * 10);
        match pick {
            EpochPick::Next => base + 1,
            EpochPick::Back(back) => base.saturating_sub(back),
        }
    }

    fn spec(key: usize, pick: u8) -> KeySpec {
        match pick {
            7 => KeySpec::singleton(),
            8 => KeySpec::exclusive(2),
            9 => KeySpec::exclusive(0),
            // Mostly each key's own spec, so that conflicts stay the exception.
            _ => [KeySpec::singleton(), KeySpec::exclusive(2), KeySpec::exclusive(3)][key],
        }
    }

    /// The concrete command an operation stands for now, if it is one command.
    fn resolve(&self, op: &Op) -> Option<Command> {
        Some(match *op {
            Op::Open { node, how, odd_limits, other_storage } => {
                let known = self.nodes.get(&NodeId(node));
                let (incarnation, attempt) = match (known, how) {
                    (None, _) => (1, 0),
                    (Some(n), OpenHow::Retry) => (n.incarnation, n.attempt),
                    (Some(n), OpenHow::NewAttempt) => (n.incarnation, n.attempt + 1),
                    (Some(n), OpenHow::NewIncarnation) => (n.incarnation + 1, 0),
                    (Some(n), OpenHow::Older) if n.attempt > 0 => (n.incarnation, n.attempt - 1),
                    (Some(n), OpenHow::Older) => (n.incarnation - 1, 5),
                };
                // Storage ids are the node id for its first disk, then larger ones.
                let newest = known.map_or(node, |n| n.storage);
                let storage = if other_storage { newest + 100 } else { newest };
                Command::OpenSession {
                    client: ClientId { node: NodeId(node), incarnation },
                    attempt,
                    lease: LEASE,
                    limits: if odd_limits { ODD_LIMITS } else { LIMITS },
                    storage,
                }
            }
            Op::Close { session } => Command::CloseSession { session: self.session(session) },
            Op::Expire { session, stale_term } => Command::ExpireSession {
                session: self.session(session),
                term: if stale_term { self.term.wrapping_sub(1) } else { self.term },
            },
            Op::Register { session, key, spec, epoch } => {
                let session = self.session(session);
                Command::Register {
                    session,
                    key: self::key(key),
                    spec: Model::spec(key, spec),
                    epoch: self.epoch(session, key, epoch),
                }
            }
            Op::Unregister { session, key, epoch } => {
                let session = self.session(session);
                Command::Unregister {
                    session,
                    key: self::key(key),
                    epoch: self.epoch(session, key, epoch),
                }
            }
            Op::Assign { key, slot, session } => {
                Command::Assign { key: self::key(key), slot, session: self.session(session) }
            }
            Op::Release { key, slot, token, hand_over } => {
                // Aim at an owned slot when the pick wants a current token.
                let owned: Vec<u32> = self.keys.get(&self::key(key)).map_or(vec![], |k| {
                    (0..k.slots.len() as u32).filter(|s| k.slots[*s as usize].is_some()).collect()
                });
                let slot = match owned.len() {
                    n if n > 0 && token.current => owned[slot as usize % n],
                    _ => slot,
                };
                Command::Release {
                    key: self::key(key),
                    slot,
                    token: self.token(key, slot, token),
                    hand_over,
                }
            }
            Op::Send { node, incarnation, serial, floor, len, key } => {
                let current = self.nodes.get(&NodeId(node)).map_or(1, |n| n.incarnation);
                let incarnation = current.saturating_add_signed(i64::from(incarnation));
                let client = ClientId { node: NodeId(node), incarnation };
                let (old_floor, answered) = self.windows.get(&client).cloned().unwrap_or_default();
                let top = answered.keys().copied().max().unwrap_or(old_floor);
                let serial = match serial {
                    SerialPick::Next => top + 1,
                    SerialPick::Back(back) => top.saturating_sub(back),
                };
                // A raised floor lies at or below the request's own serial, as a client's does.
                let floor = floor.map_or(old_floor, |below| serial.saturating_sub(below));
                Command::Send {
                    key: self::key(key),
                    payload: Payload::from(vec![serial as u8; len]),
                    request: RequestId { client, serial },
                    floor,
                }
            }
            Op::Ack { key, token, relative, upto } => {
                // Relative to the head: 0 acknowledges nothing new, 1 the head, and so on.
                let upto = match self.keys.get(&self::key(key)) {
                    Some(k) if relative => {
                        let head = k.queue.first().map_or(k.next_seq, |(seq, _)| *seq);
                        (head + upto).saturating_sub(1)
                    }
                    _ => upto,
                };
                Command::Ack {
                    key: self::key(key),
                    token: self.token(key, 0, token),
                    upto: Seq(upto),
                }
            }
            Op::NewTerm | Op::Plan { .. } | Op::Restore => return None,
        })
    }
}

// ---- The run -----------------------------------------------------------------------------

struct Run {
    state: ClusterState,
    /// Fed the same commands; from time to time replaced by a decoded copy of `state`.
    twin: ClusterState,
    model: Model,
    last_assigned: u64,
}

impl Run {
    fn new() -> Run {
        Run {
            state: ClusterState::new(),
            twin: ClusterState::new(),
            model: Model::default(),
            last_assigned: 0,
        }
    }

    fn op(&mut self, op: &Op) {
        if let Some(command) = self.model.resolve(op) {
            self.step(command);
            return;
        }
        match *op {
            Op::NewTerm => {
                self.model.term += 1;
                assert_eq!(self.state.apply_entry(self.model.term, &[]), vec![]);
                self.twin.apply_entry(self.model.term, &[]);
                self.check("a new term");
            }
            Op::Plan { expiring } => self.leader_round(expiring),
            Op::Restore => {
                let bytes = encode(&self.state).unwrap();
                self.twin = decode_snapshot(&bytes).unwrap();
            }
            _ => unreachable!("{op:?} resolves to a command"),
        }
    }

    /// Applies one command, as one entry of the current term, to the state, the twin and the
    /// model, and checks everything.
    fn step(&mut self, command: Command) -> Outcome {
        let before = self.state.clone();
        let mut touched = BTreeSet::new();
        before.keys_touched_by(&command, &mut touched);
        let term = self.model.term;
        let outcome = self.state.apply_entry(term, std::slice::from_ref(&command)).remove(0);
        let twin = self.twin.apply_entry(term, std::slice::from_ref(&command)).remove(0);
        assert_eq!(outcome, twin, "the twin answered {command:?} differently");
        let expected = self.model.apply(&command);
        assert_eq!(outcome, expected, "outcome of {command:?}");

        match &outcome {
            Outcome::Assigned { token } => {
                assert!(
                    token.0 > self.last_assigned,
                    "token {token} after t{}",
                    self.last_assigned
                );
                self.last_assigned = token.0;
            }
            Outcome::Rejected(_) if matches!(command, Command::Send { .. }) => {
                let mut rest = self.state.clone();
                rest.clients = before.clients.clone();
                assert_eq!(rest, before, "the refused {command:?} changed more than its window");
            }
            Outcome::Rejected(_) => {
                assert_eq!(self.state, before, "the refused {command:?} changed the state")
            }
            _ => {}
        }
        for changed in keys_changed(&before, &self.state) {
            assert!(
                touched.contains(&changed),
                "{command:?} changed key {changed} but keys_touched_by named only {touched:?}"
            );
        }
        if let Err(e) = ClusterState::ownerships_ended_by_name(&before, &self.state, &command) {
            panic!("token invariant: {e}");
        }
        self.check(&format!("{command:?}"));
        outcome
    }

    fn check(&self, after: &str) {
        if let Err(e) = self.state.check_consistency() {
            panic!("inconsistent after {after}: {e}\n{:#?}", self.state);
        }
        assert_eq!(self.state, self.model.to_state(), "state and model differ after {after}");
        let bytes = encode(&self.state).unwrap();
        assert_eq!(
            bytes,
            encode(&self.twin).unwrap(),
            "the twin encodes differently after {after}"
        );
        let decoded: ClusterState = decode_snapshot(&bytes).unwrap();
        assert_eq!(decoded, self.state, "round trip changed the state after {after}");
    }

    /// What a leader of the current term would do, with the sessions `expiring` selects marked
    /// for expiry; then rounds without marks until nothing is left to do.
    fn leader_round(&mut self, expiring: u8) {
        let live: Vec<SessionId> = self.state.sessions.keys().copied().collect();
        let marked: BTreeSet<SessionId> = live
            .iter()
            .enumerate()
            .filter(|(i, _)| expiring & (1 << (i % 8)) != 0)
            .map(|(_, s)| *s)
            .collect();
        let mut table = LeaseTable::new(self.model.term, Millis(0));
        table.observe(&self.state, Millis(0));
        for s in &marked {
            table.mark_expiring(*s);
        }
        let first = plan(&self.state, &table, Millis(0));
        let expired: BTreeSet<SessionId> = first
            .iter()
            .filter_map(|c| match c {
                Command::ExpireSession { session, .. } => Some(*session),
                _ => None,
            })
            .collect();
        assert_eq!(expired, marked, "the plan expired other sessions than the marked ones");
        self.apply_plan(first, &marked);

        // Everyone heard from just now: one round refills what the expiries vacated.
        let fresh = |st: &ClusterState, term| {
            let mut table = LeaseTable::new(term, Millis(0));
            table.observe(st, Millis(0));
            plan(st, &table, Millis(0))
        };
        let second = fresh(&self.state, self.model.term);
        if marked.is_empty() {
            assert_eq!(second, vec![], "planning again proposed more");
        }
        self.apply_plan(second, &BTreeSet::new());
        assert_eq!(fresh(&self.state, self.model.term), vec![], "planning did not settle");
    }

    fn apply_plan(&mut self, commands: Vec<Command>, marked: &BTreeSet<SessionId>) {
        for command in commands {
            if let Command::Assign { session, .. } = &command {
                assert!(!marked.contains(session), "{command:?} to a session being expired");
            }
            let outcome = self.step(command.clone());
            assert!(
                !matches!(outcome, Outcome::Rejected(_)),
                "the plan's {command:?} was refused: {outcome}"
            );
        }
    }
}

/// The keys whose entry, or any session's registration or ownership of them, differs.
fn keys_changed(a: &ClusterState, b: &ClusterState) -> BTreeSet<Key> {
    let mut changed = BTreeSet::new();
    for k in a.keys.keys().chain(b.keys.keys()) {
        if a.keys.get(k) != b.keys.get(k) {
            changed.insert(k.clone());
        }
    }
    let per_session = |st: &ClusterState| -> BTreeSet<(SessionId, Key, String)> {
        st.sessions
            .values()
            .flat_map(|s| {
                let registered =
                    s.keys.iter().map(move |(k, e)| (s.id, k.clone(), format!("r{e}")));
                let owned =
                    s.owned.iter().map(move |(k, slot)| (s.id, k.clone(), format!("o{slot}")));
                registered.chain(owned)
            })
            .collect()
    };
    let (x, y) = (per_session(a), per_session(b));
    changed.extend(x.symmetric_difference(&y).map(|(_, k, _)| k.clone()));
    changed
}

proptest! {
    #[test]
    fn apply_agrees_with_the_model(ops in ops()) {
        let mut run = Run::new();
        for op in &ops {
            run.op(op);
        }
    }
}

/// The model and the runner can tell a wrong state machine from a right one: a hand-written
/// sequence whose every outcome is known.
#[test]
fn a_known_sequence_runs_as_expected() {
    let mut run = Run::new();
    let ops = [
        Op::Open { node: 1, how: OpenHow::Retry, odd_limits: false, other_storage: false },
        Op::Open { node: 2, how: OpenHow::Retry, odd_limits: false, other_storage: false },
        Op::Register { session: Pick(0), key: 0, spec: 0, epoch: EpochPick::Next },
        Op::Register { session: Pick(1), key: 0, spec: 0, epoch: EpochPick::Next },
        Op::Send { node: 1, incarnation: 0, serial: SerialPick::Next, floor: None, len: 2, key: 0 },
        Op::Send {
            node: 1,
            incarnation: 0,
            serial: SerialPick::Back(0),
            floor: None,
            len: 2,
            key: 0,
        },
        Op::Send { node: 2, incarnation: 0, serial: SerialPick::Next, floor: None, len: 3, key: 0 },
        Op::Plan { expiring: 0 },
    ];
    for op in &ops {
        run.op(op);
    }
    let k = &run.state.keys[&key(0)];
    assert_eq!(k.queue.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>(), vec![1, 2]);
    let owner = k.slots[0].expect("the plan assigned the key");
    assert_eq!(owner.token, Token(1));
    let token = TokenPick { current: true, neighbour: false, raw: 0 };
    run.op(&Op::Ack { key: 0, token, relative: true, upto: 1 });
    assert_eq!(run.state.keys[&key(0)].queue.head(), Some(Seq(2)));
    run.op(&Op::Expire { session: Pick(u8::from(owner.session.0 == 2)), stale_term: false });
    run.op(&Op::Plan { expiring: 0 });
    let k = &run.state.keys[&key(0)];
    assert!(k.slots[0].is_some_and(|o| o.token == Token(2) && o.session != owner.session));
}
