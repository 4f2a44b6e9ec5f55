//! The replicated state and the deterministic function that applies commands to it.
//!
//! Every map is ordered (`BTreeMap`/`BTreeSet`), so every replica iterates the same way and
//! serializes its state to the same bytes. Nothing here reads a clock.

use crate::command::{Command, KeyKind, KeySpec, LeaseTerms, Message, Outcome, Owner, Rejection};
use crate::{ClientId, JobId, Key, Limits, NodeId, Payload, RequestId, Seq, SessionId, Token};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod jobs;
mod schedules;
mod session_set;

pub use jobs::{Job, JobClaim, JobError, JobQueue, JobTable, MAX_CLAIM, MAX_JOB_ERRORS, Partition};
pub use schedules::{
    FireOutcome, FireRecord, MAX_ERROR_BYTES, MAX_PENDING, PendingTick, RECENT_FIRES,
    ScheduleCounts, ScheduleState, TickRun,
};
pub use session_set::SessionSet;

/// A live session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The session's id.
    pub id: SessionId,
    /// The process that opened it.
    pub client: ClientId,
    /// Which re-open of that process this is.
    pub attempt: u32,
    /// The lease terms both the node and the leader honour.
    pub lease: LeaseTerms,
    /// The storage the process runs on (see [`Command::OpenSession`]).
    pub storage: u64,
    /// The keys this session has registered, each with the epoch of the registration in
    /// force.
    pub keys: BTreeMap<Key, u64>,
    /// The slots this session owns.
    pub owned: BTreeSet<(Key, u32)>,
    /// The jobs this session has claimed and not yet completed or failed, by queue (no
    /// empty sets).
    pub jobs: BTreeMap<Key, BTreeSet<JobId>>,
}

impl Session {
    /// The node this session belongs to.
    pub fn node(&self) -> NodeId {
        self.client.node
    }

    /// Whether the session owns a slot of `key` (a lookup, not a scan of what it owns).
    pub fn owns_slot_of(&self, key: &Key) -> bool {
        self.owned.range((key.clone(), 0)..=(key.clone(), u32::MAX)).next().is_some()
    }
}

/// What the state remembers about a node between its sessions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The newest incarnation seen.
    pub incarnation: u64,
    /// The newest attempt of that incarnation.
    pub attempt: u32,
    /// The storage of that newest process.
    pub storage: u64,
    /// Whether the newest process has opened its session. While it has not, `session` (if
    /// any) belongs to an earlier process on other storage that it waits out: that session
    /// is *superseded*, renewed no more and expired once silent for its TTL and margin.
    pub opened: bool,
    /// The node's live session, if any.
    pub session: Option<SessionId>,
}

/// A key's queue of messages not yet acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    /// The sequence number the next message will get.
    pub next_seq: u64,
    /// Unacknowledged messages in sequence order, without gaps.
    pub messages: VecDeque<Message>,
    /// The sum of their payload sizes.
    pub bytes: u64,
}

impl Queue {
    /// Messages with sequence numbers from `from` on, at most `max` of them.
    pub fn messages_from(&self, from: Seq, max: usize) -> impl Iterator<Item = &Message> {
        let skip = match self.messages.front() {
            Some(head) if from.0 > head.seq.0 => (from.0 - head.seq.0) as usize,
            _ => 0,
        };
        self.messages.iter().skip(skip).take(max)
    }

    /// The first unacknowledged message's sequence number, if any.
    pub fn head(&self) -> Option<Seq> {
        self.messages.front().map(|m| m.seq)
    }
}

/// One key: how it runs, who can run it, who runs it, and its messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyState {
    /// How the key runs.
    pub spec: KeySpec,
    /// Sessions that registered the key.
    pub candidates: SessionSet,
    /// One entry per slot: the owner, or `None` if vacant.
    pub slots: Vec<Option<Owner>>,
    /// Per slot, the session that last handed it over, which the planner avoids if it can.
    pub handed_over_by: Vec<Option<SessionId>>,
    /// Messages for the owner of slot 0.
    pub queue: Queue,
    /// For a schedule key: its ticks.
    pub schedule: Option<Box<ScheduleState>>,
}

/// The de-duplication record of one client process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientWindow {
    /// Requests below this serial are never retried; a copy of one is refused.
    pub floor: u64,
    /// What each request at or above the floor produced.
    pub answered: BTreeMap<u64, Outcome>,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The limits the cluster adopted from its first session.
    pub limits: Option<Limits>,
    /// The last session id handed out.
    pub last_session: u64,
    /// The last fencing token handed out.
    pub last_token: u64,
    /// Live sessions.
    pub sessions: BTreeMap<SessionId, Session>,
    /// Per node: its newest incarnation and live session.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Registered keys and keys with queued messages.
    pub keys: BTreeMap<Key, KeyState>,
    /// Slots without an owner, for the planner.
    pub vacant: BTreeSet<(Key, u32)>,
    /// De-duplication windows of client processes.
    pub clients: BTreeMap<ClientId, ClientWindow>,
    /// Payload bytes queued across all keys.
    pub total_bytes: u64,
    /// The highest sequence number any key has handed out. A key created (again) starts
    /// above it, so a sequence number is never reused for a key, even one that was forgotten
    /// when nobody registered it any more and registered again later.
    pub last_seq: u64,
    /// The Raft term of the entry being applied (see [`ClusterState::apply_entry`]).
    pub entry_term: u64,
    /// The cluster's time of day stamped on the entry being applied, if its leader stamped
    /// it ([`Command::Stamp`]).
    pub entry_stamp: Option<u64>,
    /// The job queues.
    pub jobs: JobTable,
}

impl ClusterState {
    /// An empty state, as every replica starts.
    pub fn new() -> ClusterState {
        ClusterState::default()
    }

    /// Applies a batch in order, one outcome per command.
    pub fn apply_batch(&mut self, commands: &[Command]) -> Vec<Outcome> {
        commands.iter().map(|c| self.apply(c)).collect()
    }

    /// Applies the commands of one Raft entry appended in `term`. Commands that are only valid
    /// within the leadership that decided them ([`Command::ExpireSession`]) are checked
    /// against it.
    pub fn apply_entry(&mut self, term: u64, commands: &[Command]) -> Vec<Outcome> {
        self.entry_term = term;
        // A stamp holds for the rest of its own entry only.
        self.entry_stamp = None;
        let outcomes = self.apply_batch(commands);
        self.entry_stamp = None;
        outcomes
    }

    /// Adds to `out` every key whose state `command` may change, as seen before it is
    /// applied: its own key, the queue of the job it names, and for a command that may end a
    /// session (`OpenSession` ends an earlier one on the same storage), every key that
    /// session registered, owns or holds jobs of. An over-approximation, never an under one:
    /// watchers of one key rely on it to wake when anything about their key changed. Costs
    /// what the command touches, not the size of the state.
    pub fn keys_touched_by(&self, command: &Command, out: &mut BTreeSet<Key>) {
        if let Some(key) = command.key() {
            out.insert(key.clone());
        }
        let ending = match command {
            Command::CloseSession { session } | Command::ExpireSession { session, .. } => {
                Some(*session)
            }
            Command::OpenSession { client, .. } => {
                self.nodes.get(&client.node).and_then(|rec| rec.session)
            }
            Command::CompleteJob { job, .. }
            | Command::FailJob { job, .. }
            | Command::ExtendJob { job, .. }
            | Command::JobControl { job, .. } => {
                if let Some(j) = self.jobs.jobs.get(job) {
                    out.insert(j.queue.clone());
                }
                None
            }
            Command::PurgeJobs { queue: None, .. } => {
                out.extend(self.jobs.queues.keys().cloned());
                None
            }
            _ => None,
        };
        if let Some(s) = ending.and_then(|id| self.sessions.get(&id)) {
            out.extend(s.keys.keys().cloned());
            out.extend(s.owned.iter().map(|(k, _)| k.clone()));
            out.extend(s.jobs.keys().cloned());
        }
    }

    /// Applies one command, in the term set by the last [`apply_entry`](Self::apply_entry)
    /// (replicas apply through `apply_entry`; this is for tests and tools).
    ///
    /// A refused command leaves the state unchanged, except that a refused `Send` is
    /// recorded in its client's de-duplication window, so a retry gets the same answer.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        match command {
            Command::OpenSession { client, attempt, lease, limits, storage } => {
                self.open_session(*client, *attempt, *lease, *limits, *storage)
            }
            Command::CloseSession { session } => {
                // Running jobs are ended by their claim tokens too: a close must not let
                // another session claim a job whose handler may still run.
                if self
                    .sessions
                    .get(session)
                    .is_some_and(|s| !s.owned.is_empty() || !s.jobs.is_empty())
                {
                    return Outcome::Rejected(Rejection::StillOwner);
                }
                self.end_session_outcome(*session)
            }
            Command::ExpireSession { session, term } => {
                if *term != self.entry_term {
                    return Outcome::Rejected(Rejection::WrongTerm {
                        decided: *term,
                        appended: self.entry_term,
                    });
                }
                self.end_session_outcome(*session)
            }
            Command::Register { session, key, spec, epoch } => {
                self.register(*session, key, *spec, *epoch)
            }
            Command::Unregister { session, key, epoch } => self.unregister(*session, key, *epoch),
            Command::Assign { key, slot, session } => self.assign(key, *slot, *session),
            Command::Release { key, slot, token, hand_over } => {
                self.release(key, *slot, *token, *hand_over)
            }
            Command::Send { key, payload, request, floor } => {
                self.send(key, payload, *request, *floor)
            }
            Command::RequestMove { key, slot, token } => self.request_move(key, *slot, *token),
            Command::Ack { key, token, upto } => self.ack(key, *token, *upto),
            Command::Stamp { wall_ms } => {
                self.entry_stamp = Some(*wall_ms);
                Outcome::Stamped
            }
            Command::RegisterSchedule { session, key, schedule, epoch, tzdb } => {
                self.register_schedule(*session, key, schedule, *epoch, tzdb)
            }
            Command::Fire { key, token, tick_ms, origin, missed, start_ms } => {
                self.fire(key, *token, *tick_ms, *origin, *missed, *start_ms)
            }
            Command::SkipTicks { key, token, upto_ms, missed } => {
                self.skip_ticks(key, *token, *upto_ms, *missed)
            }
            Command::TickStarted { key, token, run, start_ms } => {
                self.tick_started(key, *token, *run, *start_ms)
            }
            Command::TickDone { key, token, run, result, end_ms } => {
                self.tick_done(key, *token, *run, result, *end_ms)
            }
            Command::ScheduleControl { key, action, request, floor } => {
                self.schedule_control(key, action, *request, *floor)
            }
            Command::Enqueue { .. }
            | Command::ConfigureQueue { .. }
            | Command::Claim { .. }
            | Command::CompleteJob { .. }
            | Command::FailJob { .. }
            | Command::ExtendJob { .. }
            | Command::JobControl { .. }
            | Command::PurgeJobs { .. } => {
                // A refused job command leaves the state as it was, the job table's clock
                // (which it read from the entry's stamp) included.
                let clock = self.jobs.clock_ms;
                let outcome = self.apply_job(command);
                if matches!(outcome, Outcome::Rejected(_)) {
                    self.jobs.clock_ms = clock;
                }
                outcome
            }
        }
    }

    fn apply_job(&mut self, command: &Command) -> Outcome {
        match command {
            Command::Enqueue { queue, payload, spec, request, floor } => {
                self.enqueue_job(queue, payload, spec, *request, *floor)
            }
            Command::ConfigureQueue { queue, caps, force } => {
                self.configure_queue(queue, *caps, *force)
            }
            Command::Claim { queue, session, limit, timeout_ms } => {
                self.claim_jobs(queue, *session, *limit, *timeout_ms)
            }
            Command::CompleteJob { job, token, result } => self.complete_job(*job, *token, result),
            Command::FailJob { job, token, error, retry_at_ms, discard, interrupted } => {
                self.fail_job(*job, *token, error, *retry_at_ms, *discard, *interrupted)
            }
            Command::ExtendJob { job, token, deadline_ms } => {
                self.extend_job(*job, *token, *deadline_ms)
            }
            Command::JobControl { job, action, request, floor } => {
                self.job_control(*job, *action, *request, *floor)
            }
            Command::PurgeJobs { queue, state, request, floor } => {
                self.purge_jobs(queue, *state, *request, *floor)
            }
            _ => Outcome::Rejected(Rejection::InvalidJob("not a job command".into())),
        }
    }

    /// The live session of a node, if any.
    pub fn session_of(&self, node: NodeId) -> Option<&Session> {
        let id = self.nodes.get(&node)?.session?;
        self.sessions.get(&id)
    }

    /// The owner of a key's slot, if any.
    pub fn owner(&self, key: &Key, slot: u32) -> Option<Owner> {
        self.keys.get(key)?.slots.get(slot as usize).copied().flatten()
    }

    /// Whether a newer process of the session's node, on other storage, waits for this
    /// session to end: the leader renews it no more, gives it no slot, and expires it once it
    /// has been silent for its TTL and margin.
    pub fn is_superseded(&self, session: SessionId) -> bool {
        let Some(s) = self.sessions.get(&session) else { return false };
        self.nodes.get(&s.node()).is_some_and(|rec| {
            rec.session == Some(session)
                && (rec.incarnation, rec.attempt) != (s.client.incarnation, s.attempt)
        })
    }

    fn open_session(
        &mut self,
        client: ClientId,
        attempt: u32,
        lease: LeaseTerms,
        limits: Limits,
        storage: u64,
    ) -> Outcome {
        // Terms and limits come from a peer's configuration: refuse what cannot work rather
        // than adopt it.
        if limits.validate().is_err() {
            return Outcome::Rejected(Rejection::InvalidSessionTerms);
        }
        if lease.ttl_ms == 0 || lease.margin_ms == 0 || lease.margin_ms >= lease.ttl_ms {
            return Outcome::Rejected(Rejection::InvalidSessionTerms);
        }
        match self.limits {
            Some(cluster) if cluster != limits => {
                return Outcome::Rejected(Rejection::LimitsMismatch { cluster });
            }
            _ => {}
        }
        if let Some(rec) = self.nodes.get(&client.node).cloned() {
            let asked = (client.incarnation, attempt);
            let known = (rec.incarnation, rec.attempt);
            if asked < known {
                return Outcome::Rejected(Rejection::StaleIncarnation {
                    current: rec.incarnation,
                    attempt: rec.attempt,
                    storage: rec.storage,
                });
            }
            let previous = rec.session.filter(|s| self.sessions.contains_key(s));
            if asked == known && rec.opened {
                // A retry of the request that opened the node's newest session.
                return match previous {
                    Some(session) => Outcome::SessionOpened { session },
                    None => Outcome::Rejected(Rejection::StaleIncarnation {
                        current: rec.incarnation,
                        attempt: rec.attempt,
                        storage: rec.storage,
                    }),
                };
            }
            // A newer start or re-open, or a successor asking again.
            if let Some(previous) = previous {
                let same_storage = self.sessions[&previous].storage == storage;
                if !same_storage {
                    // The earlier process may still run (cut off, or the id configured
                    // twice): it keeps its slots until its lease has run out and the leader
                    // expires it. Until then this process waits, recorded as the successor.
                    self.nodes.insert(
                        client.node,
                        NodeRecord {
                            incarnation: client.incarnation,
                            attempt,
                            storage,
                            opened: false,
                            session: Some(previous),
                        },
                    );
                    return Outcome::WaitingForPrevious { session: previous };
                }
                // The same storage: this process holds its lock, so the one that opened the
                // previous session is gone. Its keys move now, not after a TTL.
                self.end_session(previous);
            }
        }
        if self.limits.is_none() {
            self.limits = Some(limits);
        }
        // A new process of the node will never retry the requests of an older one.
        let stale: Vec<ClientId> = self
            .clients
            .keys()
            .filter(|c| c.node == client.node && c.incarnation != client.incarnation)
            .copied()
            .collect();
        for c in stale {
            self.clients.remove(&c);
        }
        self.last_session += 1;
        let id = SessionId(self.last_session);
        self.sessions.insert(
            id,
            Session {
                id,
                client,
                attempt,
                lease,
                storage,
                keys: BTreeMap::new(),
                owned: BTreeSet::new(),
                jobs: BTreeMap::new(),
            },
        );
        self.nodes.insert(
            client.node,
            NodeRecord {
                incarnation: client.incarnation,
                attempt,
                storage,
                opened: true,
                session: Some(id),
            },
        );
        Outcome::SessionOpened { session: id }
    }

    fn end_session_outcome(&mut self, id: SessionId) -> Outcome {
        if self.end_session(id) {
            Outcome::SessionEnded
        } else {
            Outcome::Rejected(Rejection::NoSuchSession)
        }
    }

    /// Ends a session and vacates its slots; false if it was not live.
    fn end_session(&mut self, id: SessionId) -> bool {
        let Some(session) = self.sessions.remove(&id) else {
            return false;
        };
        for (key, slot) in &session.owned {
            self.vacate(key, *slot, None);
        }
        self.jobs_lost(
            &session.jobs.values().flatten().copied().collect(),
            "the worker's session ended (its node stopped or was cut off)",
        );
        for key in session.keys.keys() {
            if let Some(k) = self.keys.get_mut(key) {
                k.candidates.remove(&id);
            }
            self.forget_key_if_idle(key);
        }
        if let Some(rec) = self.nodes.get_mut(&session.node())
            && rec.session == Some(id)
        {
            rec.session = None;
        }
        true
    }

    fn register(&mut self, session: SessionId, key: &Key, spec: KeySpec, epoch: u64) -> Outcome {
        // A schedule is registered with its schedule (`RegisterSchedule`).
        if !spec.is_valid() || spec.kind == KeyKind::Schedule {
            return Outcome::Rejected(Rejection::InvalidSpec);
        }
        if !self.sessions.contains_key(&session) {
            return Outcome::Rejected(Rejection::NoSuchSession);
        }
        match self.keys.get_mut(key) {
            Some(k) if k.spec != spec => {
                if !k.candidates.is_empty() {
                    return Outcome::Rejected(Rejection::SpecConflict { existing: k.spec });
                }
                // Nobody runs the key; only its messages were left. Take the new spec.
                for slot in 0..k.slots.len() as u32 {
                    self.vacant.remove(&(key.clone(), slot));
                }
                k.spec = spec;
                k.schedule = None;
                k.slots = vec![None; spec.slots as usize];
                k.handed_over_by = vec![None; spec.slots as usize];
                for slot in 0..spec.slots {
                    self.vacant.insert((key.clone(), slot));
                }
                k.candidates.insert(session);
            }
            Some(k) => {
                k.candidates.insert(session);
            }
            None => self.insert_key(key, spec, session, None),
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            let in_force = s.keys.entry(key.clone()).or_insert(epoch);
            *in_force = (*in_force).max(epoch);
        }
        Outcome::Registered
    }

    /// Creates a key with one candidate, every slot vacant.
    fn insert_key(
        &mut self,
        key: &Key,
        spec: KeySpec,
        session: SessionId,
        schedule: Option<ScheduleState>,
    ) {
        let mut candidates = SessionSet::new();
        candidates.insert(session);
        self.keys.insert(
            key.clone(),
            KeyState {
                spec,
                candidates,
                slots: vec![None; spec.slots as usize],
                handed_over_by: vec![None; spec.slots as usize],
                queue: Queue { next_seq: self.last_seq + 1, ..Queue::default() },
                schedule: schedule.map(Box::new),
            },
        );
        for slot in 0..spec.slots {
            self.vacant.insert((key.clone(), slot));
        }
    }

    fn unregister(&mut self, session: SessionId, key: &Key, epoch: u64) -> Outcome {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Outcome::Rejected(Rejection::NoSuchSession);
        };
        let Some(&in_force) = s.keys.get(key) else {
            return Outcome::Unregistered;
        };
        if in_force > epoch {
            return Outcome::Rejected(Rejection::StaleRegistration);
        }
        // A withdrawal never ends an ownership: the slot is released with its token first.
        if s.owns_slot_of(key) {
            return Outcome::Rejected(Rejection::StillOwner);
        }
        s.keys.remove(key);
        if let Some(k) = self.keys.get_mut(key) {
            k.candidates.remove(&session);
        }
        self.forget_key_if_idle(key);
        Outcome::Unregistered
    }

    fn assign(&mut self, key: &Key, slot: u32, session: SessionId) -> Outcome {
        let Some(k) = self.keys.get_mut(key) else {
            return Outcome::Rejected(Rejection::NoSuchKey);
        };
        let Some(current) = k.slots.get(slot as usize) else {
            return Outcome::Rejected(Rejection::NoSuchSlot);
        };
        if current.is_some() {
            return Outcome::Rejected(Rejection::SlotOccupied);
        }
        let Some(s) = self.sessions.get_mut(&session) else {
            return Outcome::Rejected(Rejection::NoSuchSession);
        };
        if !k.candidates.contains(&session) {
            return Outcome::Rejected(Rejection::NotCandidate);
        }
        if s.owns_slot_of(key) {
            return Outcome::Rejected(Rejection::AlreadyOwnsSlot);
        }
        self.last_token += 1;
        let token = Token(self.last_token);
        k.slots[slot as usize] = Some(Owner { session, token, moving: false });
        s.owned.insert((key.clone(), slot));
        self.vacant.remove(&(key.clone(), slot));
        Outcome::Assigned { token }
    }

    fn release(&mut self, key: &Key, slot: u32, token: Token, hand_over: bool) -> Outcome {
        match self.owner(key, slot) {
            Some(owner) if owner.token == token => {
                let by = hand_over.then_some(owner.session);
                self.vacate(key, slot, by);
                Outcome::Released
            }
            _ => Outcome::Rejected(Rejection::StaleToken),
        }
    }

    fn request_move(&mut self, key: &Key, slot: u32, token: Token) -> Outcome {
        let owner = self
            .keys
            .get_mut(key)
            .and_then(|k| k.slots.get_mut(slot as usize))
            .and_then(Option::as_mut);
        match owner {
            Some(owner) if owner.token == token => {
                owner.moving = true;
                Outcome::MoveRequested
            }
            _ => Outcome::Rejected(Rejection::StaleToken),
        }
    }

    /// Empties a slot, keeping every index in step.
    fn vacate(&mut self, key: &Key, slot: u32, handed_over_by: Option<SessionId>) {
        let Some(k) = self.keys.get_mut(key) else { return };
        let Some(Some(owner)) = k.slots.get(slot as usize).copied() else { return };
        k.slots[slot as usize] = None;
        k.handed_over_by[slot as usize] = handed_over_by;
        if let Some(schedule) = k.schedule.as_mut() {
            schedule.owner_gone();
        }
        if let Some(s) = self.sessions.get_mut(&owner.session) {
            s.owned.remove(&(key.clone(), slot));
        }
        self.vacant.insert((key.clone(), slot));
    }

    /// Drops a key nobody can run and nobody has sent anything to. A schedule is kept: its
    /// high-water mark must outlive every process that runs it, or a restart of the whole
    /// cluster would fire its ticks again.
    fn forget_key_if_idle(&mut self, key: &Key) {
        let idle = match self.keys.get(key) {
            Some(k) => {
                k.candidates.is_empty() && k.queue.messages.is_empty() && k.schedule.is_none()
            }
            None => false,
        };
        if idle && let Some(k) = self.keys.remove(key) {
            for slot in 0..k.slots.len() as u32 {
                self.vacant.remove(&(key.clone(), slot));
            }
        }
    }

    fn send(&mut self, key: &Key, payload: &Payload, request: RequestId, floor: u64) -> Outcome {
        self.deduplicated(request, floor, |state| state.enqueue(key, payload))
    }

    /// Applies a client request once: a retry of a request at or above its client's floor
    /// gets the first answer again, and one below the floor (or from a stale process) is
    /// refused. Outcomes are recorded, refusals included, so a retry never acts twice.
    fn deduplicated(
        &mut self,
        request: RequestId,
        floor: u64,
        act: impl FnOnce(&mut ClusterState) -> Outcome,
    ) -> Outcome {
        let client = request.client;
        match self.nodes.get(&client.node) {
            Some(rec) if rec.incarnation == client.incarnation => {}
            _ => return Outcome::Rejected(Rejection::StaleRequest),
        }
        let window = self.clients.entry(client).or_default();
        if request.serial < window.floor {
            return Outcome::Rejected(Rejection::StaleRequest);
        }
        if let Some(answer) = window.answered.get(&request.serial) {
            return answer.clone();
        }
        if floor > window.floor {
            window.floor = floor;
            window.answered = window.answered.split_off(&floor);
        }
        let outcome = act(self);
        if let Some(window) = self.clients.get_mut(&client)
            && request.serial >= window.floor
        {
            window.answered.insert(request.serial, outcome.clone());
        }
        outcome
    }

    fn enqueue(&mut self, key: &Key, payload: &Payload) -> Outcome {
        let limits = self.limits.unwrap_or_default();
        let Some(k) = self.keys.get_mut(key) else {
            return Outcome::Rejected(Rejection::NoSuchKey);
        };
        if k.schedule.is_some() {
            return Outcome::Rejected(Rejection::TakesNoMessages);
        }
        let size = payload.len() as u64;
        if size > u64::from(limits.max_payload_bytes) {
            return Outcome::Rejected(Rejection::PayloadTooLarge {
                size,
                max: u64::from(limits.max_payload_bytes),
            });
        }
        if k.queue.messages.len() >= limits.max_messages_per_key as usize
            || k.queue.bytes + size > limits.max_bytes_per_key
        {
            return Outcome::Rejected(Rejection::QueueFull);
        }
        if self.total_bytes + size > limits.max_total_bytes {
            return Outcome::Rejected(Rejection::StoreFull);
        }
        let seq = Seq(k.queue.next_seq);
        k.queue.next_seq += 1;
        self.last_seq = self.last_seq.max(seq.0);
        k.queue.bytes += size;
        k.queue.messages.push_back(Message { seq, payload: payload.clone() });
        self.total_bytes += size;
        Outcome::Sent { seq }
    }

    fn ack(&mut self, key: &Key, token: Token, upto: Seq) -> Outcome {
        let Some(k) = self.keys.get_mut(key) else {
            return Outcome::Rejected(Rejection::NoSuchKey);
        };
        match k.slots.first() {
            Some(Some(owner)) if owner.token == token => {}
            _ => return Outcome::Rejected(Rejection::StaleToken),
        }
        if upto.0 >= k.queue.next_seq {
            return Outcome::Rejected(Rejection::AckBeyondQueue);
        }
        while let Some(front) = k.queue.messages.front() {
            if front.seq > upto {
                break;
            }
            let size = front.payload.len() as u64;
            k.queue.bytes -= size;
            self.total_bytes -= size;
            k.queue.messages.pop_front();
        }
        let head = k.queue.head();
        self.forget_key_if_idle(key);
        Outcome::Acked { head }
    }

    /// Checks the token invariant for one applied command: every ownership `before` held that
    /// `after` (the state once `command` was applied) no longer holds was ended by `command`
    /// naming it — a `Release` with its token, the expiry of its session, or a new process
    /// of its node on the same storage (which holds that storage's lock, so the old process is
    /// gone). Anything else — a withdrawal, a graceful close, a process on other storage —
    /// would hand a slot on while its owner may still run. Returns the first ownership ended
    /// otherwise. Used by tests and the fuzzer.
    pub fn ownerships_ended_by_name(
        before: &ClusterState,
        after: &ClusterState,
        command: &Command,
    ) -> Result<(), String> {
        for (key, k) in &before.keys {
            for (slot, owner) in k.slots.iter().enumerate() {
                let Some(owner) = owner else { continue };
                let still = after.owner(key, slot as u32).map(|o| (o.session, o.token));
                if still == Some((owner.session, owner.token)) {
                    continue;
                }
                let named = match command {
                    Command::Release { key: k, slot: s, token, .. } => {
                        k == key && *s as usize == slot && *token == owner.token
                    }
                    Command::ExpireSession { session, .. } => *session == owner.session,
                    Command::OpenSession { client, storage, .. } => before
                        .sessions
                        .get(&owner.session)
                        .is_some_and(|s| client.node == s.node() && *storage == s.storage),
                    _ => false,
                };
                if !named {
                    return Err(format!(
                        "{command:?} ended the ownership of {key}/{slot} by {} ({}) without \
                         naming it",
                        owner.session, owner.token
                    ));
                }
            }
        }
        // A job's claim is an ownership too: it ends by its token or its session's end.
        for (id, job) in &before.jobs.jobs {
            let Some(claim) = job.claim else { continue };
            let still = after.jobs.jobs.get(id).and_then(|j| j.claim).map(|c| c.token);
            if still == Some(claim.token) {
                continue;
            }
            let named = match command {
                Command::CompleteJob { job, token, .. } | Command::FailJob { job, token, .. } => {
                    job == id && *token == claim.token
                }
                Command::ExpireSession { session, .. } => *session == claim.session,
                Command::OpenSession { client, storage, .. } => before
                    .sessions
                    .get(&claim.session)
                    .is_some_and(|s| client.node == s.node() && *storage == s.storage),
                _ => false,
            };
            if !named {
                return Err(format!(
                    "{command:?} ended the claim of job {id} by {} ({}) without naming it",
                    claim.session, claim.token
                ));
            }
        }
        Ok(())
    }

    /// Checks the state's internal consistency: every index agrees with what it indexes.
    /// Used by tests and the simulator; returns a description of the first disagreement.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut total = 0u64;
        for (key, k) in &self.keys {
            if k.slots.len() != k.spec.slots as usize || k.handed_over_by.len() != k.slots.len() {
                return Err(format!("key {key}: slot vectors disagree with spec"));
            }
            if k.candidates.is_empty() && k.queue.messages.is_empty() && k.schedule.is_none() {
                return Err(format!("key {key}: idle key kept"));
            }
            match &k.schedule {
                Some(s) if k.spec.kind == KeyKind::Schedule && k.queue.messages.is_empty() => {
                    self.check_schedule(key, s)?
                }
                None if k.spec.kind != KeyKind::Schedule => {}
                _ => return Err(format!("key {key}: schedule state disagrees with its kind")),
            }
            let mut owners = BTreeSet::new();
            for (slot, owner) in k.slots.iter().enumerate() {
                let vacant = self.vacant.contains(&(key.clone(), slot as u32));
                match owner {
                    None if !vacant => {
                        return Err(format!("key {key} slot {slot}: not indexed vacant"));
                    }
                    Some(_) if vacant => {
                        return Err(format!("key {key} slot {slot}: owned but indexed vacant"));
                    }
                    Some(o) => {
                        let Some(s) = self.sessions.get(&o.session) else {
                            return Err(format!(
                                "key {key} slot {slot}: owner {} not live",
                                o.session
                            ));
                        };
                        if !s.owned.contains(&(key.clone(), slot as u32)) {
                            return Err(format!("key {key} slot {slot}: owner does not list it"));
                        }
                        if !k.candidates.contains(&o.session) {
                            return Err(format!("key {key} slot {slot}: owner is not a candidate"));
                        }
                        if !owners.insert(o.session) {
                            return Err(format!("key {key}: one session owns two slots"));
                        }
                        if o.token.0 > self.last_token {
                            return Err(format!("key {key}: token beyond counter"));
                        }
                    }
                    None => {}
                }
            }
            for c in &k.candidates {
                match self.sessions.get(c) {
                    Some(s) if s.keys.contains_key(key) => {}
                    _ => {
                        return Err(format!(
                            "key {key}: candidate {c} not live or not listing key"
                        ));
                    }
                }
            }
            let bytes: u64 = k.queue.messages.iter().map(|m| m.payload.len() as u64).sum();
            if bytes != k.queue.bytes {
                return Err(format!("key {key}: queue bytes {} but holds {bytes}", k.queue.bytes));
            }
            let mut expect = k.queue.messages.front().map(|m| m.seq.0);
            for m in &k.queue.messages {
                if Some(m.seq.0) != expect || m.seq.0 >= k.queue.next_seq {
                    return Err(format!("key {key}: queue sequence broken at {}", m.seq));
                }
                expect = Some(m.seq.0 + 1);
            }
            total += bytes;
        }
        if total != self.total_bytes {
            return Err(format!("total bytes {} but queues hold {total}", self.total_bytes));
        }
        for (key, slot) in &self.vacant {
            match self.keys.get(key) {
                Some(k) if (*slot as usize) < k.slots.len() => {}
                _ => return Err(format!("vacant index names missing slot {key}/{slot}")),
            }
        }
        self.check_jobs()?;
        for (id, s) in &self.sessions {
            if self.nodes.get(&s.node()).and_then(|r| r.session) != Some(*id) {
                return Err(format!("session {id} is not its node's session"));
            }
            for (key, slot) in &s.owned {
                if self.owner(key, *slot).map(|o| o.session) != Some(*id) {
                    return Err(format!("session {id} lists {key}/{slot} it does not own"));
                }
            }
        }
        Ok(())
    }
}
