//! The job table: enqueue, claim, completion fenced by claim tokens, retries, caps,
//! uniqueness, cancellation and retention, and a randomized run that checks the table's
//! invariants after every command.

use highlander_core::state::MAX_JOB_ERRORS;
use highlander_core::{
    ClientId, ClusterState, Command, JobAction, JobId, JobSpec, JobState, Key, LeaseTerms, Limits,
    NodeId, Outcome, Payload, QueueCaps, Rejection, RequestId, SessionId, Token,
};
use std::collections::BTreeMap;

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
const T0: u64 = 1_700_000_000_000;

fn limits() -> Limits {
    Limits {
        max_payload_bytes: 1024,
        max_open_jobs: 50,
        max_open_job_bytes: 4096,
        max_job_queues: 4,
        keep_finished_jobs: 10,
        keep_finished_job_bytes: 100_000,
        keep_finished_job_ms: 60_000,
        ..Limits::STANDARD
    }
}

fn q(name: &str) -> Key {
    Key::new(name).unwrap()
}

/// A replica and the clock its leader stamps entries with.
struct Table {
    st: ClusterState,
    now: u64,
    serial: u64,
    term: u64,
}

impl Table {
    fn new() -> Table {
        Table { st: ClusterState::new(), now: T0, serial: 0, term: 1 }
    }

    /// Applies one command in an entry stamped with `now`.
    fn apply(&mut self, command: Command) -> Outcome {
        let before = self.st.clone();
        let stamp = Command::Stamp { wall_ms: self.now };
        let out = self.st.apply_entry(self.term, &[stamp, command.clone()]).pop().unwrap();
        self.st.check_consistency().unwrap_or_else(|e| panic!("after {command:?}: {e}"));
        ClusterState::ownerships_ended_by_name(&before, &self.st, &command)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn open(&mut self, node: u64) -> SessionId {
        let client = ClientId { node: NodeId(node), incarnation: 1 };
        let cmd = Command::OpenSession {
            client,
            attempt: 0,
            lease: LEASE,
            limits: limits(),
            storage: node,
        };
        match self.apply(cmd) {
            Outcome::SessionOpened { session } => session,
            other => panic!("{other}"),
        }
    }

    fn request(&mut self) -> RequestId {
        self.serial += 1;
        RequestId { client: ClientId { node: NodeId(1), incarnation: 1 }, serial: self.serial }
    }

    fn enqueue_with(&mut self, queue: &str, payload: &str, spec: JobSpec) -> Outcome {
        let request = self.request();
        self.apply(Command::Enqueue {
            queue: q(queue),
            payload: Payload::from(payload.as_bytes().to_vec()),
            spec: Box::new(spec),
            request,
            floor: 0,
        })
    }

    fn enqueue(&mut self, queue: &str, payload: &str) -> JobId {
        self.enqueue_spec(queue, payload, JobSpec::new())
    }

    fn enqueue_spec(&mut self, queue: &str, payload: &str, spec: JobSpec) -> JobId {
        match self.enqueue_with(queue, payload, spec) {
            Outcome::Enqueued { job } => job,
            other => panic!("{other}"),
        }
    }

    fn claim(&mut self, queue: &str, session: SessionId, limit: u32) -> Vec<(JobId, Token)> {
        match self.apply(Command::Claim { queue: q(queue), session, limit, timeout_ms: 60_000 }) {
            Outcome::Claimed { jobs } => jobs,
            other => panic!("{other}"),
        }
    }

    fn complete(&mut self, job: JobId, token: Token) -> Outcome {
        self.apply(Command::CompleteJob { job, token, result: Some(Payload::from(&b"ok"[..])) })
    }

    fn fail(&mut self, job: JobId, token: Token, retry_in: u64) -> Outcome {
        let retry_at_ms = self.now + retry_in;
        self.apply(Command::FailJob {
            job,
            token,
            error: "boom".into(),
            retry_at_ms,
            discard: false,
            interrupted: false,
        })
    }

    fn control(&mut self, job: JobId, action: JobAction) -> Outcome {
        let request = self.request();
        self.apply(Command::JobControl { job, action, request, floor: 0 })
    }

    fn expire(&mut self, session: SessionId) {
        let term = self.term;
        assert_eq!(self.apply(Command::ExpireSession { session, term }), Outcome::SessionEnded);
    }

    fn state(&self, job: JobId) -> JobState {
        self.st.jobs.jobs[&job].state
    }
}

#[test]
fn a_job_is_claimed_once_and_completed_only_with_its_claim_token() {
    let mut t = Table::new();
    let a = t.open(1);
    let b = t.open(2);
    let job = t.enqueue("mail", "hello");
    assert_eq!(t.state(job), JobState::Available);
    let claimed = t.claim("mail", a, 10);
    assert_eq!(claimed.len(), 1);
    let (_, token) = claimed[0];
    // Nobody else gets it while it runs.
    assert!(t.claim("mail", b, 10).is_empty());
    assert_eq!(t.complete(job, Token(token.0 + 1)), Outcome::Rejected(Rejection::StaleToken));
    assert_eq!(t.complete(job, token), Outcome::JobUpdated { state: JobState::Completed });
    assert_eq!(t.complete(job, token), Outcome::Rejected(Rejection::StaleToken));
    let done = &t.st.jobs.jobs[&job];
    assert_eq!((done.attempt, done.result.as_ref().map(|r| r.as_bytes())), (1, Some(&b"ok"[..])));
}

#[test]
fn claim_tokens_come_from_the_fencing_counter() {
    let mut t = Table::new();
    let a = t.open(1);
    t.enqueue("q", "1");
    t.enqueue("q", "2");
    let before = t.st.last_token;
    let claimed = t.claim("q", a, 10);
    let tokens: Vec<u64> = claimed.iter().map(|(_, t)| t.0).collect();
    assert_eq!(tokens, vec![before + 1, before + 2]);
    assert_eq!(t.st.last_token, before + 2);
}

#[test]
fn claims_take_jobs_by_priority_then_run_at_then_id_and_only_when_due() {
    let mut t = Table::new();
    let a = t.open(1);
    let low = t.enqueue_spec("q", "low", JobSpec { priority: 5, ..JobSpec::new() });
    let first = t.enqueue("q", "first");
    let later =
        t.enqueue_spec("q", "later", JobSpec { run_at_ms: Some(t.now + 5_000), ..JobSpec::new() });
    let second = t.enqueue("q", "second");
    match &t.st.jobs.jobs[&later].state {
        JobState::Scheduled => {}
        s => panic!("{s:?}"),
    }
    let order: Vec<JobId> = t.claim("q", a, 10).into_iter().map(|(j, _)| j).collect();
    assert_eq!(order, vec![first, second, low]);
    // Not due: a claim at the same cluster time finds nothing.
    assert!(t.claim("q", a, 10).is_empty());
    t.now += 5_000;
    let order: Vec<JobId> = t.claim("q", a, 10).into_iter().map(|(j, _)| j).collect();
    assert_eq!(order, vec![later]);
}

#[test]
fn a_claim_takes_no_more_than_the_sessions_room() {
    let mut t = Table::new();
    let a = t.open(1);
    for i in 0..5 {
        t.enqueue("q", &i.to_string());
    }
    assert_eq!(t.claim("q", a, 2).len(), 2);
    // The session runs 2 of the queue already.
    assert_eq!(t.claim("q", a, 2).len(), 0);
    assert_eq!(t.claim("q", a, 3).len(), 1);
}

#[test]
fn the_global_and_partition_caps_hold_at_every_claim() {
    let mut t = Table::new();
    let a = t.open(1);
    let b = t.open(2);
    let caps = QueueCaps { global: Some(3), per_partition: Some(1) };
    assert_eq!(
        t.apply(Command::ConfigureQueue { queue: q("q"), caps, force: false }),
        Outcome::QueueConfigured
    );
    let other = QueueCaps { global: Some(4), per_partition: None };
    assert_eq!(
        t.apply(Command::ConfigureQueue { queue: q("q"), caps: other, force: false }),
        Outcome::Rejected(Rejection::QueueCapsConflict { existing: caps })
    );
    let tenant = |p: &str| JobSpec { partition: Some(p.to_string()), ..JobSpec::new() };
    let a1 = match t.enqueue_with("q", "a1", tenant("a")) {
        Outcome::Enqueued { job } => job,
        o => panic!("{o}"),
    };
    let a2 = match t.enqueue_with("q", "a2", tenant("a")) {
        Outcome::Enqueued { job } => job,
        o => panic!("{o}"),
    };
    t.enqueue_with("q", "b1", tenant("b"));
    t.enqueue("q", "x1");
    t.enqueue("q", "x2");
    // One of tenant a, one of b, one plain: the global cap of 3 stops the rest.
    let first = t.claim("q", a, 10);
    assert_eq!(first.len(), 3);
    assert!(first.iter().any(|(j, _)| *j == a1));
    assert!(!first.iter().any(|(j, _)| *j == a2));
    assert!(t.claim("q", b, 10).is_empty());
    // a1 done: tenant a may run again, and the global cap has room for one.
    let token = first.iter().find(|(j, _)| *j == a1).unwrap().1;
    t.complete(a1, token);
    let next = t.claim("q", b, 10);
    assert_eq!(next.iter().map(|(j, _)| *j).collect::<Vec<_>>(), vec![a2]);
}

#[test]
fn a_unique_key_is_held_until_the_job_finishes() {
    let mut t = Table::new();
    let a = t.open(1);
    let spec = JobSpec { unique: Some("invoice-7".into()), ..JobSpec::new() };
    let job = match t.enqueue_with("q", "x", spec.clone()) {
        Outcome::Enqueued { job } => job,
        o => panic!("{o}"),
    };
    assert_eq!(
        t.enqueue_with("q", "y", spec.clone()),
        Outcome::Rejected(Rejection::DuplicateJob { existing: job })
    );
    // Another queue has its own keys.
    assert!(matches!(t.enqueue_with("other", "y", spec.clone()), Outcome::Enqueued { .. }));
    // Held while running and while retryable (Oban's missing-`retryable` trap).
    let (_, token) = t.claim("q", a, 1)[0];
    assert_eq!(
        t.enqueue_with("q", "y", spec.clone()),
        Outcome::Rejected(Rejection::DuplicateJob { existing: job })
    );
    t.fail(job, token, 10_000);
    assert_eq!(t.state(job), JobState::Retryable);
    assert_eq!(
        t.enqueue_with("q", "y", spec.clone()),
        Outcome::Rejected(Rejection::DuplicateJob { existing: job })
    );
    t.now += 10_000;
    let (_, token) = t.claim("q", a, 1)[0];
    t.complete(job, token);
    assert!(matches!(t.enqueue_with("q", "y", spec), Outcome::Enqueued { .. }));
}

#[test]
fn a_retried_enqueue_adds_the_job_once() {
    let mut t = Table::new();
    t.open(1);
    let request = t.request();
    let cmd = Command::Enqueue {
        queue: q("q"),
        payload: Payload::from(&b"x"[..]),
        spec: Box::new(JobSpec::new()),
        request,
        floor: 0,
    };
    let first = t.apply(cmd.clone());
    assert_eq!(t.apply(cmd), first);
    assert_eq!(t.st.jobs.jobs.len(), 1);
}

#[test]
fn a_dead_sessions_jobs_are_retryable_at_once_and_attempts_never_exceed_the_maximum() {
    let mut t = Table::new();
    let a = t.open(1);
    let b = t.open(2);
    let job = match t.enqueue_with("q", "x", JobSpec { max_attempts: 2, ..JobSpec::new() }) {
        Outcome::Enqueued { job } => job,
        o => panic!("{o}"),
    };
    t.claim("q", a, 1);
    t.expire(a);
    let j = &t.st.jobs.jobs[&job];
    assert_eq!((j.state_at(t.now), j.attempt), (JobState::Available, 1));
    assert!(j.errors[0].error.contains("session ended"));
    // Claimable again at once, by the surviving session.
    let (_, token) = t.claim("q", b, 1)[0];
    t.fail(job, token, 1);
    assert_eq!(t.state(job), JobState::Dead);
    assert_eq!(t.st.jobs.jobs[&job].attempt, 2);
    // Dead jobs can be retried by an operator, with their attempts counted afresh.
    assert_eq!(
        t.control(job, JobAction::Retry),
        Outcome::JobUpdated { state: JobState::Available }
    );
    assert_eq!(t.st.jobs.jobs[&job].attempt, 0);
    assert_eq!(t.claim("q", b, 1).len(), 1);
}

#[test]
fn an_interrupted_attempt_is_not_counted() {
    let mut t = Table::new();
    let a = t.open(1);
    let job = t.enqueue_spec("q", "x", JobSpec { max_attempts: 1, ..JobSpec::new() });
    let (_, token) = t.claim("q", a, 1)[0];
    let out = t.apply(Command::FailJob {
        job,
        token,
        error: "the node is shutting down".into(),
        retry_at_ms: t.now,
        discard: false,
        interrupted: true,
    });
    assert_eq!(out, Outcome::JobUpdated { state: JobState::Retryable });
    assert_eq!(t.st.jobs.jobs[&job].attempt, 0);
    let claimed = t.claim("q", a, 1);
    assert_eq!(claimed.len(), 1);
    assert_eq!(t.st.jobs.jobs[&job].attempt, 1);
}

#[test]
fn a_session_with_claimed_jobs_cannot_close_without_ending_them() {
    let mut t = Table::new();
    let a = t.open(1);
    let job = t.enqueue("q", "x");
    let (_, token) = t.claim("q", a, 1)[0];
    assert_eq!(
        t.apply(Command::CloseSession { session: a }),
        Outcome::Rejected(Rejection::StillOwner)
    );
    t.fail(job, token, 0);
    assert_eq!(t.apply(Command::CloseSession { session: a }), Outcome::SessionEnded);
}

#[test]
fn cancel_finishes_a_waiting_job_and_asks_a_running_one_to_stop() {
    let mut t = Table::new();
    let a = t.open(1);
    let waiting = t.enqueue("q", "w");
    let running = t.enqueue("q", "r");
    assert_eq!(
        t.control(waiting, JobAction::Cancel),
        Outcome::JobUpdated { state: JobState::Cancelled }
    );
    let (id, token) = t.claim("q", a, 1)[0];
    assert_eq!(id, running);
    assert_eq!(
        t.control(running, JobAction::Cancel),
        Outcome::JobUpdated { state: JobState::Running }
    );
    assert!(t.st.jobs.jobs[&running].claim.unwrap().cancel_requested);
    // The handler was stopped; the attempt's end leaves it cancelled, not retried.
    t.fail(running, token, 0);
    assert_eq!(t.state(running), JobState::Cancelled);
    assert_eq!(
        t.control(running, JobAction::Cancel),
        Outcome::Rejected(Rejection::WrongJobState { state: JobState::Cancelled })
    );
}

#[test]
fn bad_jobs_and_full_tables_are_refused_and_change_nothing() {
    let mut t = Table::new();
    t.open(1);
    assert!(matches!(
        t.enqueue_with("q", "x", JobSpec { priority: 10, ..JobSpec::new() }),
        Outcome::Rejected(Rejection::InvalidJob(_))
    ));
    assert!(matches!(
        t.enqueue_with("q", "x", JobSpec { max_attempts: 0, ..JobSpec::new() }),
        Outcome::Rejected(Rejection::InvalidJob(_))
    ));
    for name in ["a", "b", "c", "d"] {
        t.enqueue(name, "x");
    }
    assert_eq!(
        t.enqueue_with("e", "x", JobSpec::new()),
        Outcome::Rejected(Rejection::TooManyQueues { max: 4 })
    );
    let big = "x".repeat(1000);
    for _ in 0..4 {
        t.enqueue_with("a", &big, JobSpec::new());
    }
    assert!(matches!(
        t.enqueue_with("a", &big, JobSpec::new()),
        Outcome::Rejected(Rejection::JobsFull { .. })
    ));
    for _ in 8..50 {
        t.enqueue("a", "x");
    }
    assert!(matches!(
        t.enqueue_with("a", "x", JobSpec::new()),
        Outcome::Rejected(Rejection::JobsFull { open: 50, .. })
    ));
    assert_eq!(t.st.jobs.jobs.len(), 50);
}

#[test]
fn finished_jobs_are_kept_within_count_and_age_bounds_and_purged_on_demand() {
    let mut t = Table::new();
    let a = t.open(1);
    let mut done = Vec::new();
    for i in 0..15 {
        let job = t.enqueue("q", &i.to_string());
        let (_, token) = t.claim("q", a, 1)[0];
        t.complete(job, token);
        done.push(job);
    }
    // 10 kept: the oldest 5 dropped.
    assert_eq!(t.st.jobs.finished.len(), 10);
    assert!(!t.st.jobs.jobs.contains_key(&done[4]));
    assert!(t.st.jobs.jobs.contains_key(&done[5]));
    // Dead letters are purged on demand.
    let job = match t.enqueue_with("q", "dies", JobSpec { max_attempts: 1, ..JobSpec::new() }) {
        Outcome::Enqueued { job } => job,
        o => panic!("{o}"),
    };
    let (_, token) = t.claim("q", a, 1)[0];
    t.fail(job, token, 0);
    let request = t.request();
    assert_eq!(
        t.apply(Command::PurgeJobs {
            queue: Some(q("q")),
            state: JobState::Dead,
            request,
            floor: 0
        }),
        Outcome::JobsPurged { count: 1 }
    );
    // Age: a minute later, the next job command drops them all.
    t.now += 60_001;
    t.enqueue("q", "new");
    assert_eq!(t.st.jobs.finished.len(), 0);
}

#[test]
fn a_failed_attempt_keeps_its_error_and_retries_at_the_absolute_time_given() {
    let mut t = Table::new();
    let a = t.open(1);
    let job = t.enqueue("q", "x");
    for i in 0..12 {
        let (_, token) = t.claim("q", a, 1)[0];
        t.fail(job, token, 1_000);
        assert_eq!(t.st.jobs.jobs[&job].run_at_ms, t.now + 1_000);
        assert!(t.claim("q", a, 1).is_empty(), "retried early at attempt {i}");
        t.now += 1_000;
    }
    assert_eq!(t.st.jobs.jobs[&job].errors.len(), MAX_JOB_ERRORS);
    assert_eq!(t.st.jobs.jobs[&job].errors.last().unwrap().attempt, 12);
}

/// A tiny deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random enqueues, claims, completions with right and stale tokens, failures, expiries,
/// restarts, cancels, retries and clock moves: after every command the indexes agree, no
/// claim ends without its token or its session's end, caps and attempts hold, and no job
/// is lost (every job enqueued is in the table until it finished).
#[test]
fn random_histories_keep_every_job_invariant() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut t = Table::new();
        let mut sessions: Vec<SessionId> = (1..=3).map(|n| t.open(n)).collect();
        let caps = QueueCaps { global: Some(4), per_partition: Some(1) };
        t.apply(Command::ConfigureQueue { queue: q("q"), caps, force: false });
        let mut tokens: BTreeMap<JobId, Token> = BTreeMap::new();
        let mut enqueued: Vec<JobId> = Vec::new();
        let mut last_seen: BTreeMap<JobId, JobState> = BTreeMap::new();
        for _ in 0..600 {
            match rng.below(10) {
                0..=2 => {
                    let spec = JobSpec {
                        priority: rng.below(3) as u8,
                        run_at_ms: (rng.below(3) == 0).then(|| t.now + rng.below(3000)),
                        max_attempts: 1 + rng.below(3) as u32,
                        unique: (rng.below(3) == 0).then(|| format!("u{}", rng.below(4))),
                        partition: (rng.below(2) == 0).then(|| format!("p{}", rng.below(3))),
                        ..JobSpec::new()
                    };
                    let queue = if rng.below(4) == 0 { "r" } else { "q" };
                    if let Outcome::Enqueued { job } = t.enqueue_with(queue, "payload", spec) {
                        enqueued.push(job);
                        last_seen.insert(job, t.state(job));
                    }
                }
                3 | 4 => {
                    let s = sessions[rng.below(sessions.len() as u64) as usize];
                    let queue = if rng.below(4) == 0 { "r" } else { "q" };
                    if let Outcome::Claimed { jobs } = t.apply(Command::Claim {
                        queue: q(queue),
                        session: s,
                        limit: 1 + rng.below(4) as u32,
                        timeout_ms: 60_000,
                    }) {
                        tokens.extend(jobs);
                    }
                }
                5 | 6 => {
                    if let Some((&job, &token)) =
                        tokens.iter().nth(rng.below(tokens.len().max(1) as u64) as usize)
                    {
                        let token = if rng.below(5) == 0 {
                            Token(token.0.saturating_sub(1))
                        } else {
                            token
                        };
                        if rng.below(2) == 0 {
                            t.complete(job, token);
                        } else {
                            let retry_at_ms = t.now + rng.below(2000);
                            t.apply(Command::FailJob {
                                job,
                                token,
                                error: "boom".into(),
                                retry_at_ms,
                                discard: rng.below(8) == 0,
                                interrupted: rng.below(4) == 0,
                            });
                        }
                    }
                }
                7 => {
                    let i = rng.below(sessions.len() as u64) as usize;
                    t.expire(sessions[i]);
                    let node = 1 + i as u64;
                    let client = ClientId { node: NodeId(node), incarnation: 1 };
                    let attempt = t.st.nodes[&NodeId(node)].attempt + 1;
                    let cmd = Command::OpenSession {
                        client,
                        attempt,
                        lease: LEASE,
                        limits: limits(),
                        storage: node,
                    };
                    if let Outcome::SessionOpened { session } = t.apply(cmd) {
                        sessions[i] = session;
                    }
                }
                8 => {
                    if let Some(&job) =
                        enqueued.get(rng.below(enqueued.len().max(1) as u64) as usize)
                    {
                        let action = [JobAction::Cancel, JobAction::Retry, JobAction::Discard]
                            [rng.below(3) as usize];
                        t.control(job, action);
                    }
                }
                _ => t.now += rng.below(1500),
            }
            // Tokens of ended claims are stale now; keep them to try them again.
            let running: Vec<&highlander_core::state::Job> =
                t.st.jobs.jobs.values().filter(|j| j.state == JobState::Running).collect();
            let in_q = running.iter().filter(|j| j.queue == q("q")).count();
            assert!(in_q <= 4, "seed {seed}: global cap exceeded: {in_q}");
            let mut per: BTreeMap<&str, u32> = BTreeMap::new();
            for j in running.iter().filter(|j| j.queue == q("q")) {
                if let Some(p) = &j.spec.partition {
                    *per.entry(p).or_default() += 1;
                }
            }
            assert!(per.values().all(|n| *n <= 1), "seed {seed}: partition cap exceeded: {per:?}");
            for j in t.st.jobs.jobs.values() {
                assert!(
                    j.attempt <= j.spec.max_attempts,
                    "seed {seed}: {} attempts of {}",
                    j.attempt,
                    j.id
                );
            }
            // No job is lost: one leaves the table only once it has finished.
            for job in &enqueued {
                match t.st.jobs.jobs.get(job) {
                    Some(j) => {
                        last_seen.insert(*job, j.state);
                    }
                    None => {
                        let last = last_seen.get(job).copied();
                        assert!(
                            last.is_some_and(JobState::is_finished),
                            "seed {seed}: {job} left the table as {last:?}"
                        );
                    }
                }
            }
        }
    }
}
