//! Command sequences through `ClusterState::apply`, read from bytes.
//!
//! Each op takes an opcode byte and a few argument bytes; arguments pick mostly live sessions
//! and current tokens, so that sequences reach deep states. After every command the state
//! must be consistent, no ownership may have ended without being named by the command,
//! a refused command must have changed nothing (a refused `Send` or schedule control only
//! its client's window), assigned tokens must grow, and a schedule's accepted ticks must
//! strictly increase and never pass the entry's stamp. Job commands run beside them:
//! claim tokens grow with assignment tokens, a job is claimed only once due and never
//! beyond its attempts, and a job's claim ends only by its token or its session's end.
//! Leader rounds (`plan`) run in between.

use highlander_core::state::ClusterState;
use highlander_core::{
    CatchUp, ClientId, Command, Delivery, JobAction, JobId, JobSpec, JobState, Key, KeySpec,
    LeaseTable, LeaseTerms, Limits, Millis, NodeId, Outcome, Overlap, Payload, QueueCaps,
    RequestId, ScheduleAction, ScheduleSpec, Seq, SessionId, TickOrigin, TickResult, Token,
    Trigger, plan,
};
use std::collections::BTreeMap;

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
const LIMITS: Limits = Limits {
    max_payload_bytes: 6,
    max_messages_per_key: 3,
    max_bytes_per_key: 10,
    max_total_bytes: 16,
    ..Limits::STANDARD
};
const KEYS: [&str; 3] = ["a", "b", "c"];

/// Reads argument bytes; past the end of the input every read is 0.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// What the run knows beyond the state: clients' next serials and registration epochs.
struct Run {
    state: ClusterState,
    term: u64,
    last_token: u64,
    serials: BTreeMap<ClientId, u64>,
    epoch: u64,
    /// The cluster's time of day the next stamped entry carries.
    wall: u64,
    /// The newest tick accepted per schedule key.
    fired: BTreeMap<Key, u64>,
}

/// The schedules a key may be registered with.
fn schedule_spec(pick: u8) -> ScheduleSpec {
    let base = ScheduleSpec::new(Trigger::Every { period_ms: 1_000, phase_ms: 0 });
    match pick % 6 {
        0 => base,
        1 => ScheduleSpec { overlap: Overlap::AllowAll { max: 2 }, ..base },
        2 => ScheduleSpec { delivery: Delivery::AtMostOnce, overlap: Overlap::BufferOne, ..base },
        3 => ScheduleSpec {
            overlap: Overlap::CancelOther,
            catch_up: CatchUp::Skip,
            delivery: Delivery::AtLeastOnce { max_attempts: 3 },
            ..base
        },
        4 => ScheduleSpec { jitter_ms: 5_000, ..base },
        _ => ScheduleSpec { paused: true, end_ms: Some(T0 + 60_000), ..base },
    }
}

/// 2026-01-01T00:00:00Z, where the fuzzed clock starts.
const T0: u64 = 1_767_225_600_000;

impl Run {
    fn session(&self, pick: u8) -> SessionId {
        let live: Vec<SessionId> = self.state.sessions.keys().copied().collect();
        if pick < 200 && !live.is_empty() {
            live[pick as usize % live.len()]
        } else {
            SessionId(u64::from(pick % 12))
        }
    }

    fn token(&self, key: &Key, slot: u32, pick: u8) -> Token {
        match self.state.owner(key, slot) {
            Some(owner) if pick < 200 => owner.token,
            _ => Token(u64::from(pick % 16)),
        }
    }

    fn command(&mut self, input: &mut Input<'_>) -> Option<Command> {
        let op = input.byte();
        let key = Key::new(KEYS[input.byte() as usize % KEYS.len()]).expect("a valid key");
        Some(match op % 22 {
            0 => {
                let node = NodeId(1 + u64::from(input.byte() % 3));
                let how = input.byte();
                let (incarnation, attempt, storage) = match self.state.nodes.get(&node) {
                    None => (1, 0, node.0),
                    Some(r) => match how % 5 {
                        0 => (r.incarnation, r.attempt, r.storage),
                        1 => (r.incarnation, r.attempt + 1, r.storage),
                        2 => (r.incarnation + 1, 0, r.storage),
                        3 => (r.incarnation + 1, 0, r.storage + 100),
                        _ => (r.incarnation.saturating_sub(1), 0, r.storage),
                    },
                };
                Command::OpenSession {
                    client: ClientId { node, incarnation },
                    attempt,
                    lease: LEASE,
                    limits: LIMITS,
                    storage,
                }
            }
            1 => Command::CloseSession { session: self.session(input.byte()) },
            2 => Command::ExpireSession {
                session: self.session(input.byte()),
                term: if input.byte() < 220 { self.term } else { self.term.wrapping_sub(1) },
            },
            3 => {
                let spec = match input.byte() % 4 {
                    0 | 1 => KeySpec::singleton(),
                    2 => KeySpec::exclusive(2),
                    _ => KeySpec::exclusive(u32::from(input.byte() % 4)),
                };
                self.epoch += 1;
                let back = u64::from(input.byte() % 3);
                Command::Register {
                    session: self.session(input.byte()),
                    key,
                    spec,
                    epoch: self.epoch.saturating_sub(back),
                }
            }
            4 => {
                self.epoch += 1;
                let back = u64::from(input.byte() % 3);
                Command::Unregister {
                    session: self.session(input.byte()),
                    key,
                    epoch: self.epoch.saturating_sub(back),
                }
            }
            5 => Command::Assign {
                key,
                slot: u32::from(input.byte() % 3),
                session: self.session(input.byte()),
            },
            6 => {
                let slot = u32::from(input.byte() % 3);
                let token = self.token(&key, slot, input.byte());
                Command::Release { key, slot, token, hand_over: input.byte().is_multiple_of(2) }
            }
            7 => {
                let slot = u32::from(input.byte() % 3);
                let token = self.token(&key, slot, input.byte());
                Command::RequestMove { key, slot, token }
            }
            8 => {
                let node = NodeId(1 + u64::from(input.byte() % 3));
                let incarnation = self.state.nodes.get(&node).map_or(1, |r| r.incarnation);
                let client = ClientId { node, incarnation };
                let next = self.serials.entry(client).or_insert(0);
                let back = u64::from(input.byte() % 4);
                *next += 1;
                let serial = next.saturating_sub(back);
                let len = input.byte() as usize % 9;
                Command::Send {
                    key,
                    payload: Payload::from(vec![serial as u8; len]),
                    request: RequestId { client, serial },
                    floor: serial.saturating_sub(u64::from(input.byte() % 3)),
                }
            }
            9 => {
                let token = self.token(&key, 0, input.byte());
                let head = self
                    .state
                    .keys
                    .get(&key)
                    .map_or(1, |k| k.queue.head().map_or(k.queue.next_seq, |s| s.0));
                Command::Ack { key, token, upto: Seq(head + u64::from(input.byte() % 3)) }
            }
            11 => {
                self.epoch += 1;
                Command::RegisterSchedule {
                    session: self.session(input.byte()),
                    key,
                    schedule: Box::new(schedule_spec(input.byte())),
                    epoch: self.epoch,
                    tzdb: if input.byte() < 240 { "2026f".into() } else { "2025a".into() },
                }
            }
            12 => {
                let token = self.token(&key, 0, input.byte());
                let mark = self.state.schedule(&key).map_or(self.wall, |s| s.mark_ms());
                // Mostly the next second after the mark; sometimes one at or before it, or
                // one later than the stamp.
                let tick = (mark / 1000 + 1) * 1000 + u64::from(input.byte() % 4) * 1000;
                let tick = tick.saturating_sub(u64::from(input.byte() % 3) * 1000);
                let missed = u64::from(input.byte() % 3);
                let how = input.byte();
                if how % 5 == 4 {
                    Command::SkipTicks { key, token, upto_ms: tick, missed }
                } else {
                    let origin =
                        if how % 5 == 3 { TickOrigin::CatchUp } else { TickOrigin::Scheduled };
                    Command::Fire {
                        key,
                        token,
                        tick_ms: tick,
                        origin,
                        missed,
                        start_ms: how.is_multiple_of(2).then_some(self.wall),
                    }
                }
            }
            13 | 14 => {
                let token = self.token(&key, 0, input.byte());
                let pending: Vec<u64> = self
                    .state
                    .schedule(&key)
                    .map_or(vec![], |s| s.pending.keys().copied().collect());
                let pick = input.byte();
                let run = if pick < 200 && !pending.is_empty() {
                    pending[pick as usize % pending.len()]
                } else {
                    u64::from(pick % 8)
                };
                if op % 16 == 13 {
                    Command::TickStarted { key, token, run, start_ms: self.wall }
                } else {
                    let result = match input.byte() % 3 {
                        0 => TickResult::Done,
                        1 => TickResult::Failed("é".repeat(usize::from(input.byte()) * 2)),
                        _ => TickResult::Cancelled,
                    };
                    Command::TickDone { key, token, run, result, end_ms: self.wall }
                }
            }
            15 => {
                let node = NodeId(1 + u64::from(input.byte() % 3));
                let incarnation = self.state.nodes.get(&node).map_or(1, |r| r.incarnation);
                let client = ClientId { node, incarnation };
                let next = self.serials.entry(client).or_insert(0);
                *next += 1;
                let serial = next.saturating_sub(u64::from(input.byte() % 3));
                let action = match input.byte() % 5 {
                    0 => ScheduleAction::Pause,
                    1 => ScheduleAction::Resume,
                    2 => ScheduleAction::Trigger,
                    3 => ScheduleAction::Backfill {
                        ticks: (0..u64::from(input.byte() % 4))
                            .map(|i| self.wall - i * 1000)
                            .collect(),
                    },
                    _ => ScheduleAction::Backfill { ticks: vec![self.wall + 5_000] },
                };
                Command::ScheduleControl {
                    key,
                    action,
                    request: RequestId { client, serial },
                    floor: serial.saturating_sub(1),
                }
            }
            16 => {
                let request = self.request(input);
                let spec = JobSpec {
                    priority: input.byte() % 11,
                    run_at_ms: (input.byte() < 60)
                        .then(|| self.wall + u64::from(input.byte()) * 20),
                    max_attempts: u32::from(input.byte() % 4),
                    timeout_ms: (input.byte() < 40).then_some(u64::from(input.byte())),
                    unique: (input.byte() < 80).then(|| format!("u{}", input.byte() % 3)),
                    partition: (input.byte() < 120).then(|| format!("p{}", input.byte() % 3)),
                };
                let payload = Payload::from(vec![7u8; usize::from(input.byte() % 8)]);
                Command::Enqueue {
                    queue: key,
                    payload,
                    spec: Box::new(spec),
                    request: request.0,
                    floor: request.1,
                }
            }
            17 => Command::Claim {
                queue: key,
                session: self.session(input.byte()),
                limit: u32::from(input.byte() % 5),
                timeout_ms: 1_000,
            },
            18 => {
                let (job, token) = self.claimed(input.byte());
                match input.byte() % 3 {
                    0 => Command::CompleteJob {
                        job,
                        token,
                        result: (input.byte() < 100).then(|| Payload::from(vec![1u8; 3])),
                    },
                    1 => Command::FailJob {
                        job,
                        token,
                        error: "fuzzed".into(),
                        retry_at_ms: self.wall + u64::from(input.byte()) * 10,
                        discard: input.byte() < 30,
                        interrupted: input.byte() < 80,
                    },
                    _ => Command::ExtendJob { job, token, deadline_ms: self.wall + 5_000 },
                }
            }
            19 => {
                let request = self.request(input);
                let job = JobId(u64::from(input.byte() % 24));
                match input.byte() % 4 {
                    0 => Command::JobControl {
                        job,
                        action: [JobAction::Cancel, JobAction::Retry, JobAction::Discard]
                            [usize::from(input.byte() % 3)],
                        request: request.0,
                        floor: request.1,
                    },
                    1 => Command::ConfigureQueue {
                        queue: key,
                        caps: QueueCaps {
                            global: (input.byte() < 128).then(|| u32::from(input.byte() % 4)),
                            per_partition: (input.byte() < 128)
                                .then(|| u32::from(input.byte() % 3)),
                        },
                        force: input.byte() < 60,
                    },
                    _ => Command::PurgeJobs {
                        queue: (input.byte() < 128).then_some(key),
                        state: [
                            JobState::Completed,
                            JobState::Dead,
                            JobState::Cancelled,
                            JobState::Running,
                        ][usize::from(input.byte() % 4)],
                        request: request.0,
                        floor: request.1,
                    },
                }
            }
            _ => return None,
        })
    }

    /// A de-duplicated request id of a node's current process (a retry now and then) and
    /// its floor.
    fn request(&mut self, input: &mut Input<'_>) -> (RequestId, u64) {
        let node = NodeId(1 + u64::from(input.byte() % 3));
        let incarnation = self.state.nodes.get(&node).map_or(1, |r| r.incarnation);
        let client = ClientId { node, incarnation };
        let next = self.serials.entry(client).or_insert(0);
        *next += 1;
        let serial = next.saturating_sub(u64::from(input.byte() % 3));
        (RequestId { client, serial }, serial.saturating_sub(1))
    }

    /// A running job and its claim token, mostly; a stale or made-up pair otherwise.
    fn claimed(&self, pick: u8) -> (JobId, Token) {
        let running: Vec<(JobId, Token)> = self
            .state
            .jobs
            .jobs
            .values()
            .filter_map(|j| j.claim.map(|c| (j.id, c.token)))
            .collect();
        match running.get(pick as usize % running.len().max(1)) {
            Some((job, token)) if pick < 200 => (*job, *token),
            Some((job, token)) => (*job, Token(token.0.saturating_sub(1))),
            None => (JobId(u64::from(pick % 8)), Token(u64::from(pick % 16))),
        }
    }

    fn step(&mut self, command: &Command) {
        self.step_stamped(command, false);
    }

    /// Applies `command` as one entry, behind the leader's stamp if it needs one (unless
    /// `unstamped`: an entry a leader did not stamp).
    fn step_stamped(&mut self, command: &Command, unstamped: bool) {
        // As the entry's term is recorded before its commands apply.
        let mut before = self.state.clone();
        before.entry_term = self.term;
        let mut entry = Vec::new();
        if command.needs_stamp() && !unstamped {
            entry.push(Command::Stamp { wall_ms: self.wall });
        }
        entry.push(command.clone());
        let existed: Vec<Key> = self.fired.keys().cloned().collect();
        let outcome = self.state.apply_entry(self.term, &entry).pop().expect("one outcome each");
        if let Err(e) = self.state.check_consistency() {
            panic!("inconsistent after {command:?}: {e}");
        }
        if let Err(e) = ClusterState::ownerships_ended_by_name(&before, &self.state, command) {
            panic!("token invariant: {e}");
        }
        for key in existed {
            if self.state.schedule(&key).is_none() {
                // Forgotten: a schedule registered again under the key starts afresh.
                self.fired.remove(&key);
            }
        }
        match (&outcome, command) {
            (Outcome::Fired { .. }, Command::Fire { key, tick_ms, .. })
            | (Outcome::TicksSkipped, Command::SkipTicks { key, upto_ms: tick_ms, .. }) => {
                assert!(
                    *tick_ms <= self.wall,
                    "tick {tick_ms} accepted before its time {}",
                    self.wall
                );
                let last = self.fired.insert(key.clone(), *tick_ms);
                assert!(
                    last.is_none_or(|l| l < *tick_ms),
                    "tick {tick_ms} accepted after {last:?}"
                );
            }
            _ => {}
        }
        match &outcome {
            Outcome::Rejected(_)
                if matches!(
                    command,
                    Command::Send { .. }
                        | Command::ScheduleControl { .. }
                        | Command::Enqueue { .. }
                        | Command::JobControl { .. }
                        | Command::PurgeJobs { .. }
                ) =>
            {
                let mut rest = self.state.clone();
                rest.clients = before.clients.clone();
                assert_eq!(rest, before, "the refused {command:?} changed more than its window");
            }
            Outcome::Rejected(_) => {
                assert_eq!(self.state, before, "the refused {command:?} changed the state")
            }
            Outcome::Assigned { token } => {
                assert!(token.0 > self.last_token, "token {token} after t{}", self.last_token);
                self.last_token = token.0;
            }
            Outcome::Claimed { jobs } => {
                for (job, token) in jobs {
                    assert!(token.0 > self.last_token, "{job} claimed with {token}");
                    self.last_token = token.0;
                    let j = &self.state.jobs.jobs[job];
                    assert!(j.attempt <= j.spec.max_attempts, "{job}: {} attempts", j.attempt);
                    assert!(
                        j.run_at_ms <= self.state.jobs.clock_ms,
                        "{job} claimed before its time"
                    );
                }
            }
            _ => {}
        }
    }

    /// A leader of the current term, everyone heard from now and the sessions `expiring`
    /// selects marked for expiry: what it plans is applied.
    fn leader_round(&mut self, expiring: u8) {
        let mut table = LeaseTable::new(self.term, Millis(0));
        table.observe(&self.state, Millis(0));
        for (i, s) in self.state.sessions.keys().enumerate() {
            if expiring & (1 << (i % 8)) != 0 {
                table.mark_expiring(*s);
            }
        }
        for command in plan(&self.state, &table, Millis(0)) {
            self.step(&command);
        }
    }
}

/// Runs the command sequence `data` describes.
pub fn apply(data: &[u8]) {
    let mut run = Run {
        state: ClusterState::new(),
        term: 1,
        last_token: 0,
        serials: Default::default(),
        epoch: 0,
        wall: T0,
        fired: BTreeMap::new(),
    };
    let mut input = Input { data, at: 0 };
    let mut ops = 0;
    while !input.done() && ops < 400 {
        ops += 1;
        match run.command(&mut input) {
            Some(command) => {
                let unstamped = input.byte() == 255;
                run.step_stamped(&command, unstamped);
                // The cluster's clock moves on, by 0 to 2.55 s.
                run.wall += u64::from(input.byte()) * 10;
            }
            None => match input.byte() % 3 {
                0 => run.leader_round(input.byte()),
                1 => {
                    run.term += 1;
                    run.state.apply_entry(run.term, &[]);
                }
                _ => {
                    // A replica restored from a snapshot of the state goes on the same way.
                    let bytes = highlander_core::codec::encode(&run.state).expect("encodes");
                    let restored: ClusterState =
                        highlander_core::codec::decode_snapshot(&bytes).expect("decodes");
                    assert_eq!(restored, run.state, "a snapshot round trip changed the state");
                }
            },
        }
    }
}
