//! The invariant checker the simulator runs after every event.
//!
//! The harness reports what each simulated node did ([`Event`]): a task started or stopped,
//! a `send` was acknowledged, a task took a message from its inbox. [`InvariantChecker`]
//! keeps just enough history to decide, at each event, whether the run so far still keeps
//! highlander's promises:
//!
//! 1. at most one running owner per (key, slot) at any instant;
//! 2. fencing tokens strictly increase per (key, slot), except a restart in place with the
//!    same token by the same node;
//! 3. messages are delivered only to the live owner of slot 0, under its token;
//! 4. no acknowledged message is lost or reordered: consecutive seqs within one run, a new
//!    run never skips a message nobody has taken, and one (key, seq) always has one payload;
//! 5. at the end of a run, every acknowledged message was delivered at least once
//!    ([`InvariantChecker::check_all_delivered`]);
//! 6. to 9.: schedules' ticks fire once, in order, never early, only under their key's
//!    ownership (see the `ticks` module);
//! 10. to 13.: a job runs on one node at a time, under increasing claim tokens, within its
//!     queue's caps, and no acknowledged job is lost (see the `jobs` module).
//!
//! The checker never panics, whatever it is fed: an odd sequence of events is reported as a
//! violation or ignored, never trusted. All state is in `BTreeMap`s so reports are
//! deterministic for a given seed.

use highlander_core::{JobId, JobState, Key, NodeId, Payload, QueueCaps, Seq, TickOrigin, Token};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

mod jobs;
mod ticks;

pub use jobs::JobRun;
pub use ticks::TickRun;

/// Something a simulated node did, as observed by the harness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node started the handler of `slot` of `key`, holding `token`.
    TaskStarted {
        /// The node running the task.
        node: NodeId,
        /// The task's key.
        key: Key,
        /// The slot it owns (0 for a singleton).
        slot: u32,
        /// The fencing token of this ownership.
        token: Token,
    },
    /// A node stopped (or lost) the handler of `slot` of `key` it ran with `token`.
    TaskStopped {
        /// The node that ran the task.
        node: NodeId,
        /// The task's key.
        key: Key,
        /// The slot it owned.
        slot: u32,
        /// The fencing token it ran with.
        token: Token,
    },
    /// A `send` returned Ok(seq): the message is acknowledged to the sender.
    Sent {
        /// The node whose `send` returned.
        from: NodeId,
        /// The destination key.
        key: Key,
        /// The sequence number the cluster gave the message.
        seq: Seq,
        /// The message body.
        payload: Payload,
    },
    /// A task (owner of slot 0) took this message from its inbox.
    Delivered {
        /// The node whose task took the message.
        node: NodeId,
        /// The task's key.
        key: Key,
        /// The token the task runs with.
        token: Token,
        /// The message's sequence number.
        seq: Seq,
        /// The message body as the task saw it.
        payload: Payload,
    },
    /// A node started running a schedule's tick.
    TickStarted {
        /// The node running it.
        node: NodeId,
        /// The schedule's key.
        key: Key,
        /// The ownership's token.
        token: Token,
        /// The fire it belongs to.
        run: u64,
        /// The tick's nominal time.
        tick_ms: u64,
        /// Which run of the fire, from 1.
        attempt: u32,
        /// Why it runs.
        origin: TickOrigin,
        /// The true time of day at the start (ms since the epoch), not the node's clock.
        true_ms: u64,
    },
    /// An `enqueue` returned Ok(job): the job is acknowledged to the producer.
    JobEnqueued {
        /// The node whose `enqueue` returned.
        from: NodeId,
        /// The queue.
        queue: Key,
        /// The job.
        job: JobId,
    },
    /// A node started a job's handler under a claim.
    JobStarted {
        /// The node running it.
        node: NodeId,
        /// The queue.
        queue: Key,
        /// The job.
        job: JobId,
        /// The claim token.
        token: Token,
        /// The job's partition key.
        partition: Option<String>,
    },
    /// A node's handler of a job stopped (returned, aborted, or its node was killed).
    JobStopped {
        /// The node that ran it.
        node: NodeId,
        /// The queue.
        queue: Key,
        /// The job.
        job: JobId,
        /// The claim token.
        token: Token,
    },
    /// A node's run of a tick stopped.
    TickStopped {
        /// The node that ran it.
        node: NodeId,
        /// The schedule's key.
        key: Key,
        /// The ownership's token.
        token: Token,
        /// The fire it belongs to.
        run: u64,
    },
    /// A node began leading Raft term `term`.
    LeaderElected {
        /// The new leader.
        node: NodeId,
        /// Its term.
        term: u64,
    },
}

/// Which promise a [`Violation`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// A task started on a (key, slot) that another node already runs (invariant 1).
    TwoOwners,
    /// A node started a (key, slot) it was already running, with no stop between (invariant 1).
    StartedTwice,
    /// A stop for a task that is not running (invariant 1).
    StopWithoutStart,
    /// A start whose token is not above every earlier token of the slot (invariant 2).
    TokenNotIncreasing,
    /// A delivery to a node that does not run slot 0 of the key with that token (invariant 3).
    DeliveredToNonOwner,
    /// Within one run, a delivery skipped one or more seqs (invariant 4).
    Gap,
    /// Within one run, a delivery came at or below a seq already delivered (invariant 4).
    OutOfOrder,
    /// A run's first delivery passed over an acknowledged message never delivered (invariant 4).
    SkippedUndelivered,
    /// A delivery's payload differs from the sent one or from an earlier delivery (invariant 4).
    PayloadMismatch,
    /// Two acknowledged sends got the same (key, seq) with different payloads (invariant 4).
    ConflictingSend,
    /// A message carried seq 0, which the cluster never assigns (seqs start at 1).
    InvalidSeq,
    /// An acknowledged message was never delivered by the end of the run (invariant 5).
    Undelivered,
    /// A tick was fired twice, or one fire ran twice at once or repeated an attempt
    /// (invariant 6).
    TickFiredTwice,
    /// A tick started before its nominal time, in true time (invariant 7).
    TickEarly,
    /// A later fire had an earlier tick (invariant 8).
    TicksOutOfOrder,
    /// A tick ran on a node that does not run its key's ownership with that token
    /// (invariant 9).
    TickWithoutOwnership,
    /// A job started while another run of it had not stopped (invariant 10).
    JobRunTwice,
    /// A job's run held a token not above its earlier runs' (invariant 11).
    JobTokenNotIncreasing,
    /// More jobs ran at once than a queue's cap allows (invariant 12).
    JobCapExceeded,
    /// An acknowledged job had not finished by the end of the run (invariant 13).
    JobLost,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::TwoOwners => "two owners",
            ViolationKind::StartedTwice => "started twice",
            ViolationKind::StopWithoutStart => "stop without start",
            ViolationKind::TokenNotIncreasing => "token not increasing",
            ViolationKind::DeliveredToNonOwner => "delivered to a non-owner",
            ViolationKind::Gap => "gap in delivery",
            ViolationKind::OutOfOrder => "delivered out of order",
            ViolationKind::SkippedUndelivered => "new owner skipped undelivered messages",
            ViolationKind::PayloadMismatch => "payload mismatch",
            ViolationKind::ConflictingSend => "conflicting sends",
            ViolationKind::InvalidSeq => "invalid seq",
            ViolationKind::Undelivered => "never delivered",
            ViolationKind::TickFiredTwice => "tick fired twice",
            ViolationKind::TickEarly => "tick started early",
            ViolationKind::TicksOutOfOrder => "ticks out of order",
            ViolationKind::TickWithoutOwnership => "tick run without ownership",
            ViolationKind::JobRunTwice => "job run twice at once",
            ViolationKind::JobTokenNotIncreasing => "job claim token not increasing",
            ViolationKind::JobCapExceeded => "queue cap exceeded",
            ViolationKind::JobLost => "job lost",
        })
    }
}

/// One broken invariant, with enough context to find it in the run's trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The simulated instant of the event that broke the invariant.
    pub at: Duration,
    /// The key concerned.
    pub key: Key,
    /// The slot concerned, for ownership violations.
    pub slot: Option<u32>,
    /// The nodes involved: the one whose event broke the invariant first, then the others.
    pub nodes: Vec<NodeId>,
    /// Which invariant broke.
    pub kind: ViolationKind,
    /// What happened, in words, naming the conflicting earlier event and its instant.
    pub detail: String,
    /// The instant of the earlier event this one conflicts with, if there is one.
    pub earlier: Option<Duration>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug-quote the key so an odd key (spaces, newlines) stays on one readable line.
        write!(f, "at {}: key {:?}", At(self.at), self.key.as_str())?;
        if let Some(slot) = self.slot {
            write!(f, " slot {slot}")?;
        }
        f.write_str(if self.nodes.len() == 1 { ", node " } else { ", nodes " })?;
        if self.nodes.is_empty() {
            f.write_str("none")?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{node}")?;
        }
        write!(f, ": {}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Violation {}

/// Checks highlander's invariants over the events of one simulated run.
#[derive(Debug, Default)]
pub struct InvariantChecker {
    keys: BTreeMap<Key, KeyState>,
    jobs: jobs::Jobs,
    violations: Vec<Violation>,
    events: usize,
    /// The latest instant recorded; end-of-run reports carry it.
    now: Duration,
    /// Every election won, in the order seen: (instant, leader, term).
    elections: Vec<(Duration, NodeId, u64)>,
}

impl InvariantChecker {
    /// A checker that has seen nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an event at simulated instant `at` (time since the run began) and checks every
    /// invariant it touches.
    ///
    /// Every violation found is kept (see [`violations`](Self::violations)); if this event
    /// broke more than one invariant, the first is returned. The checker goes on after a
    /// violation, so later events are still checked.
    pub fn record(&mut self, at: Duration, event: Event) -> Result<(), Violation> {
        self.events = self.events.saturating_add(1);
        self.now = self.now.max(at);
        let found = match event {
            Event::TaskStarted { node, key, slot, token } => {
                let ctx = Ctx { at, key: &key };
                let state = self.keys.entry(key.clone()).or_default();
                state.started(&ctx, node, slot, token)
            }
            Event::TaskStopped { node, key, slot, token } => {
                let ctx = Ctx { at, key: &key };
                let state = self.keys.entry(key.clone()).or_default();
                if slot == 0 {
                    state.ticks.ownership_stopped(at, node, token);
                }
                state.stopped(&ctx, node, slot, token)
            }
            Event::TickStarted { node, key, token, run, tick_ms, attempt, origin, true_ms } => {
                let ctx = Ctx { at, key: &key };
                let state = self.keys.entry(key.clone()).or_default();
                let owner_runs = state
                    .slots
                    .get(&0)
                    .is_some_and(|s| s.running.iter().any(|r| r.node == node && r.token == token));
                let run = TickRun {
                    node,
                    token,
                    run,
                    tick_ms,
                    attempt,
                    origin,
                    started: at,
                    started_ms: true_ms,
                    stopped: None,
                };
                state.ticks.started(&ctx, run, owner_runs)
            }
            Event::JobEnqueued { from, queue, job } => {
                self.jobs.enqueued(at, from, queue, job);
                Vec::new()
            }
            Event::JobStarted { node, queue, job, token, partition } => {
                let ctx = Ctx { at, key: &queue };
                self.jobs.started(&ctx, node, job, token, partition)
            }
            Event::JobStopped { node, queue, job, token } => {
                let ctx = Ctx { at, key: &queue };
                self.jobs.stopped(&ctx, node, job, token)
            }
            Event::TickStopped { node, key, token, run } => {
                let state = self.keys.entry(key.clone()).or_default();
                state.ticks.stopped(at, node, token, run);
                Vec::new()
            }
            Event::Sent { from, key, seq, payload } => {
                let ctx = Ctx { at, key: &key };
                let state = self.keys.entry(key.clone()).or_default();
                state.sent(&ctx, from, seq, payload)
            }
            Event::Delivered { node, key, token, seq, payload } => {
                let ctx = Ctx { at, key: &key };
                let state = self.keys.entry(key.clone()).or_default();
                state.delivered(&ctx, node, token, seq, payload)
            }
            Event::LeaderElected { node, term } => {
                self.elections.push((at, node, term));
                Vec::new()
            }
        };
        let first = found.first().cloned();
        self.violations.extend(found);
        match first {
            Some(violation) => Err(violation),
            None => Ok(()),
        }
    }

    /// Every election won so far, in the order seen: (instant, leader, term). Raft's election
    /// safety (one leader per term) and a harness's rules about when terms may rise are
    /// checked on it.
    pub fn elections(&self) -> &[(Duration, NodeId, u64)] {
        &self.elections
    }

    /// End-of-run check, after faults stopped and the cluster settled: every Sent message was
    /// Delivered at least once.
    ///
    /// Returns the first undelivered message of the first key that has one; the detail says
    /// how many other keys have some. [`undelivered`](Self::undelivered) lists one per key.
    pub fn check_all_delivered(&self) -> Result<(), Violation> {
        let mut all = self.undelivered().into_iter();
        let Some(mut first) = all.next() else {
            return Ok(());
        };
        let more = all.count();
        if more > 0 {
            first.detail.push_str(&format!("; {more} more key(s) have undelivered messages"));
        }
        Err(first)
    }

    /// One [`ViolationKind::Undelivered`] per key that has an acknowledged message never
    /// delivered to an owner, naming the lowest such seq; in key order.
    ///
    /// These are not added to [`violations`](Self::violations): whether they count depends
    /// on the cluster having settled, which only the caller knows.
    pub fn undelivered(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        for (key, state) in &self.keys {
            let mut missing =
                state.sent.iter().filter(|(seq, _)| !state.delivered.contains_key(seq));
            let Some((seq, sent)) = missing.next() else {
                continue;
            };
            let total = missing.count().saturating_add(1);
            let mut detail =
                format!("{seq} sent by {} at {} was never delivered", sent.from, At(sent.at));
            if total > 1 {
                detail.push_str(&format!(
                    " ({total} of the {} acknowledged messages on this key were never delivered)",
                    state.sent.len()
                ));
            }
            out.push(Violation {
                at: self.now,
                key: key.clone(),
                slot: None,
                nodes: vec![sent.from],
                kind: ViolationKind::Undelivered,
                detail,
                earlier: Some(sent.at),
            });
        }
        out
    }

    /// Declares a queue's caps, which invariant 12 then checks at every job start.
    pub fn expect_queue_caps(&mut self, queue: Key, caps: QueueCaps) {
        self.jobs.caps.insert(queue, caps);
    }

    /// Every run of `job` so far, in start order.
    pub fn job_runs(&self, job: JobId) -> Vec<JobRun> {
        self.jobs.jobs.get(&job).map(|h| h.runs.clone()).unwrap_or_default()
    }

    /// The acknowledged enqueues so far.
    pub fn jobs_enqueued(&self) -> Vec<JobId> {
        self.jobs.enqueued.keys().copied().collect()
    }

    /// End-of-run check, after faults stopped and the cluster settled (invariant 13):
    /// `state_of` gives each acknowledged job's state as a node applied it (`None` if the
    /// table does not hold it); every one must have finished. Returns one violation per
    /// unfinished job (not added to [`violations`](Self::violations)).
    pub fn check_jobs_finished(
        &self,
        state_of: impl Fn(JobId) -> Option<JobState>,
    ) -> Vec<Violation> {
        let mut out = Vec::new();
        for (job, (from, queue, at)) in &self.jobs.enqueued {
            let state = state_of(*job);
            if state.is_some_and(JobState::is_finished) {
                continue;
            }
            out.push(Violation {
                at: self.now,
                key: queue.clone(),
                slot: None,
                nodes: vec![*from],
                kind: ViolationKind::JobLost,
                detail: format!(
                    "{job} enqueued by {from} at {} has not finished: {}",
                    At(*at),
                    state.map_or("not in the table", JobState::name)
                ),
                earlier: Some(*at),
            });
        }
        out
    }

    /// Every violation found so far, in the order found.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// The tasks running now: for every key slot with a running task, its node and token
    /// (the earliest-started one if, against the invariant, there are several).
    pub fn running(&self) -> BTreeMap<(Key, u32), (NodeId, Token)> {
        let mut out = BTreeMap::new();
        for (key, state) in &self.keys {
            for (slot, st) in &state.slots {
                if let Some(r) = st.running.first() {
                    out.insert((key.clone(), *slot), (r.node, r.token));
                }
            }
        }
        out
    }

    /// Every run of `key`'s ticks so far, in start order.
    pub fn tick_runs(&self, key: &Key) -> Vec<TickRun> {
        self.keys.get(key).map(|k| k.ticks.runs.clone()).unwrap_or_default()
    }

    /// How many events [`record`](Self::record) has seen.
    pub fn events_recorded(&self) -> usize {
        self.events
    }
}

/// The instant and key of the event being checked, shared by every report it makes.
struct Ctx<'a> {
    at: Duration,
    key: &'a Key,
}

impl Ctx<'_> {
    /// Builds a violation of this event, naming each node once.
    fn report(
        &self,
        kind: ViolationKind,
        slot: Option<u32>,
        nodes: &[NodeId],
        earlier: Option<Duration>,
        detail: String,
    ) -> Violation {
        // Keep the event's own node first; drop repeats so a node is named once.
        let mut named: Vec<NodeId> = Vec::with_capacity(nodes.len());
        for node in nodes {
            if !named.contains(node) {
                named.push(*node);
            }
        }
        Violation { at: self.at, key: self.key.clone(), slot, nodes: named, kind, detail, earlier }
    }
}

/// One run of a task: from its start to its stop.
#[derive(Debug)]
struct Run {
    node: NodeId,
    token: Token,
    started: Duration,
    /// The highest seq this run took, and when; `None` until its first delivery.
    last: Option<(Seq, Duration)>,
}

/// A start of a slot: who, with which token, when.
#[derive(Clone, Copy, Debug)]
struct Grant {
    node: NodeId,
    token: Token,
    at: Duration,
}

/// What the checker remembers about one (key, slot).
#[derive(Debug, Default)]
struct SlotState {
    /// Normally zero or one run; more only after a violation, kept so that each later stop
    /// matches its own start instead of cascading into more reports.
    running: Vec<Run>,
    /// The highest token ever started on the slot, with its first start.
    highest: Option<Grant>,
    /// The most recent start, to tell a restart in place from a token coming back.
    last_start: Option<Grant>,
    /// When each finished (node, token) run last stopped, to explain stale events.
    stopped: BTreeMap<(NodeId, Token), Duration>,
}

/// An acknowledged send: the reference payload of its seq.
#[derive(Debug)]
struct SentRecord {
    from: NodeId,
    payload: Payload,
    at: Duration,
}

/// A delivery to a live owner.
#[derive(Debug)]
struct DeliveryRecord {
    node: NodeId,
    token: Token,
    payload: Payload,
    at: Duration,
}

/// What the checker remembers about one key: its slots and its message history.
#[derive(Debug, Default)]
struct KeyState {
    slots: BTreeMap<u32, SlotState>,
    /// The first acknowledged send of each seq.
    sent: BTreeMap<Seq, SentRecord>,
    /// The first delivery of each seq to a live owner; its last entry is the highest seq
    /// anyone has taken.
    delivered: BTreeMap<Seq, DeliveryRecord>,
    /// For a schedule: its ticks' runs.
    ticks: ticks::TickHistory,
}

impl KeyState {
    /// Invariants 1 and 2 for a start; the run is recorded even when it breaks them.
    fn started(&mut self, ctx: &Ctx<'_>, node: NodeId, slot: u32, token: Token) -> Vec<Violation> {
        let mut found = Vec::new();
        let st = self.slots.entry(slot).or_default();

        // Invariant 1: nobody else (and not this node again) may be running the slot.
        if !st.running.is_empty() {
            let kind = if st.running.iter().any(|r| r.node != node) {
                ViolationKind::TwoOwners
            } else {
                ViolationKind::StartedTwice
            };
            let mut nodes = vec![node];
            let mut runs = Vec::new();
            for r in &st.running {
                nodes.push(r.node);
                runs.push(format!("{} runs {} (started at {})", r.node, r.token, At(r.started)));
            }
            let earlier = st.running.iter().map(|r| r.started).min();
            let detail = format!("{node} started {token} while {}", runs.join(" and "));
            found.push(ctx.report(kind, Some(slot), &nodes, earlier, detail));
        }

        // Invariant 2: above every earlier token, unless this is the same node restarting
        // the very ownership that was started last.
        if let Some(high) = st.highest {
            if token < high.token {
                found.push(ctx.report(
                    ViolationKind::TokenNotIncreasing,
                    Some(slot),
                    &[node, high.node],
                    Some(high.at),
                    format!(
                        "{node} started {token}, below {} that {} started at {}",
                        high.token,
                        high.node,
                        At(high.at)
                    ),
                ));
            } else if token == high.token {
                let last_is_same =
                    st.last_start.is_some_and(|last| last.node == node && last.token == token);
                if high.node != node {
                    found.push(ctx.report(
                        ViolationKind::TokenNotIncreasing,
                        Some(slot),
                        &[node, high.node],
                        Some(high.at),
                        format!(
                            "{node} started {token}, which {} already started at {}",
                            high.node,
                            At(high.at)
                        ),
                    ));
                } else if !last_is_same {
                    // Only reachable when a different start came in between; name it.
                    let (other, detail) = match st.last_start {
                        Some(last) => (
                            last,
                            format!(
                                "{node} restarted {token}, but {} started {} at {} in between",
                                last.node,
                                last.token,
                                At(last.at)
                            ),
                        ),
                        None => (high, format!("{node} restarted {token}")),
                    };
                    found.push(ctx.report(
                        ViolationKind::TokenNotIncreasing,
                        Some(slot),
                        &[node, other.node],
                        Some(other.at),
                        detail,
                    ));
                }
            }
        }

        let grant = Grant { node, token, at: ctx.at };
        if st.highest.is_none_or(|high| token > high.token) {
            st.highest = Some(grant);
        }
        st.last_start = Some(grant);
        st.running.push(Run { node, token, started: ctx.at, last: None });
        found
    }

    /// Invariant 1 for a stop: it must end a running task.
    fn stopped(&mut self, ctx: &Ctx<'_>, node: NodeId, slot: u32, token: Token) -> Vec<Violation> {
        let st = self.slots.entry(slot).or_default();
        // The latest matching run ends: with duplicates (already reported), stops pair up
        // with starts one for one.
        if let Some(i) = st.running.iter().rposition(|r| r.node == node && r.token == token) {
            st.running.remove(i);
            st.stopped.insert((node, token), ctx.at);
            return Vec::new();
        }
        let mut nodes = vec![node];
        let (earlier, detail) = if let Some(&when) = st.stopped.get(&(node, token)) {
            (Some(when), format!("{node} stopped {token}, which already stopped at {}", At(when)))
        } else if let Some(r) = st.running.iter().find(|r| r.node == node) {
            (
                Some(r.started),
                format!(
                    "{node} stopped {token}, but it runs {} (started at {})",
                    r.token,
                    At(r.started)
                ),
            )
        } else if let Some(r) = st.running.first() {
            nodes.push(r.node);
            (
                Some(r.started),
                format!(
                    "{node} stopped {token}, which it never started; {} runs {} (started at {})",
                    r.node,
                    r.token,
                    At(r.started)
                ),
            )
        } else {
            (None, format!("{node} stopped {token}, which it never started"))
        };
        vec![ctx.report(ViolationKind::StopWithoutStart, Some(slot), &nodes, earlier, detail)]
    }

    /// Invariant 4 for an acknowledged send: one payload per seq.
    fn sent(&mut self, ctx: &Ctx<'_>, from: NodeId, seq: Seq, payload: Payload) -> Vec<Violation> {
        if seq.0 == 0 {
            let detail = format!("{from} was told its send got {seq}; seqs start at #1");
            return vec![ctx.report(ViolationKind::InvalidSeq, None, &[from], None, detail)];
        }
        if let Some(prev) = self.sent.get(&seq) {
            // The same payload again is a retried send answered twice: fine.
            if prev.payload == payload {
                return Vec::new();
            }
            let detail = format!(
                "{from} was told {seq} for {}, but {} was told {seq} for {} at {}{}",
                Shown(&payload),
                prev.from,
                Shown(&prev.payload),
                At(prev.at),
                Diff(&payload, &prev.payload)
            );
            return vec![ctx.report(
                ViolationKind::ConflictingSend,
                None,
                &[from, prev.from],
                Some(prev.at),
                detail,
            )];
        }
        let mut found = Vec::new();
        // The delivery may be seen before the send returns; then the check happens here.
        if let Some(d) = self.delivered.get(&seq)
            && d.payload != payload
        {
            let detail = format!(
                "{from} sent {seq} as {}, but {} ({}) took it as {} at {}{}",
                Shown(&payload),
                d.node,
                d.token,
                Shown(&d.payload),
                At(d.at),
                Diff(&payload, &d.payload)
            );
            found.push(ctx.report(
                ViolationKind::PayloadMismatch,
                None,
                &[from, d.node],
                Some(d.at),
                detail,
            ));
        }
        self.sent.insert(seq, SentRecord { from, payload, at: ctx.at });
        found
    }

    /// Invariants 3 and 4 for a delivery.
    fn delivered(
        &mut self,
        ctx: &Ctx<'_>,
        node: NodeId,
        token: Token,
        seq: Seq,
        payload: Payload,
    ) -> Vec<Violation> {
        if seq.0 == 0 {
            let detail = format!("{node} ({token}) took {seq}; seqs start at #1");
            return vec![ctx.report(ViolationKind::InvalidSeq, None, &[node], None, detail)];
        }
        let mut found = Vec::new();

        // Invariant 4, payloads: the sent payload is the reference once known; until then,
        // the first delivery is.
        if let Some(s) = self.sent.get(&seq) {
            if s.payload != payload {
                let detail = format!(
                    "{node} ({token}) took {seq} as {}, but {} sent it as {} at {}{}",
                    Shown(&payload),
                    s.from,
                    Shown(&s.payload),
                    At(s.at),
                    Diff(&payload, &s.payload)
                );
                found.push(ctx.report(
                    ViolationKind::PayloadMismatch,
                    None,
                    &[node, s.from],
                    Some(s.at),
                    detail,
                ));
            }
        } else if let Some(d) = self.delivered.get(&seq)
            && d.payload != payload
        {
            let detail = format!(
                "{node} ({token}) took {seq} as {}, but {} ({}) took it as {} at {}{}",
                Shown(&payload),
                d.node,
                d.token,
                Shown(&d.payload),
                At(d.at),
                Diff(&payload, &d.payload)
            );
            found.push(ctx.report(
                ViolationKind::PayloadMismatch,
                None,
                &[node, d.node],
                Some(d.at),
                detail,
            ));
        }

        // Invariant 3: only the live owner of slot 0, under the token it runs with.
        let slot0 = self.slots.get_mut(&0);
        let Some(st) = slot0 else {
            let detail = format!("{node} ({token}) took {seq}, but nobody has run slot 0");
            found.push(ctx.report(
                ViolationKind::DeliveredToNonOwner,
                Some(0),
                &[node],
                None,
                detail,
            ));
            return found;
        };
        let Some(run) = st.running.iter_mut().rev().find(|r| r.node == node && r.token == token)
        else {
            let mut nodes = vec![node];
            let mut detail =
                format!("{node} ({token}) took {seq}, but it does not run slot 0 with {token}");
            let mut earlier = None;
            if let Some(&when) = st.stopped.get(&(node, token)) {
                detail.push_str(&format!(" (that run stopped at {})", At(when)));
                earlier = Some(when);
            }
            if st.running.is_empty() {
                detail.push_str("; nobody runs slot 0");
            }
            for r in &st.running {
                nodes.push(r.node);
                detail.push_str(&format!(
                    "; {} runs it with {} (started at {})",
                    r.node,
                    r.token,
                    At(r.started)
                ));
                earlier = earlier.or(Some(r.started));
            }
            // A non-owner's delivery does not count as delivered nor move the sequence.
            found.push(ctx.report(
                ViolationKind::DeliveredToNonOwner,
                Some(0),
                &nodes,
                earlier,
                detail,
            ));
            return found;
        };

        // Invariant 4, order: consecutive within a run; a run's first delivery may go back
        // (redelivery) but not past the highest seq anyone has taken plus one.
        match run.last {
            Some((prev, prev_at)) => {
                if prev.0.checked_add(1) == Some(seq.0) {
                    // The expected next message.
                } else if seq > prev {
                    let detail = format!(
                        "{node} ({token}) took {seq} right after {prev} (taken at {}): {} skipped",
                        At(prev_at),
                        Skipped(prev, seq)
                    );
                    found.push(ctx.report(
                        ViolationKind::Gap,
                        Some(0),
                        &[node],
                        Some(prev_at),
                        detail,
                    ));
                } else {
                    let detail = format!(
                        "{node} ({token}) took {seq} after {prev} (taken at {}) in the same run",
                        At(prev_at)
                    );
                    found.push(ctx.report(
                        ViolationKind::OutOfOrder,
                        Some(0),
                        &[node],
                        Some(prev_at),
                        detail,
                    ));
                }
            }
            None => {
                // A run may begin at any message nobody has taken; it may not pass over an
                // acknowledged message that was never delivered. (Seqs can jump: a key that
                // was forgotten and registered again continues above every seq ever used.)
                let skipped = self.sent.range(..seq).find(|(s, _)| !self.delivered.contains_key(s));
                if let Some((missed, rec)) = skipped {
                    let detail = format!(
                        "{node} ({token}) began its run with {seq}, but {missed} (sent by {} at {}) \
                         was never delivered: skipped",
                        rec.from,
                        At(rec.at)
                    );
                    found.push(ctx.report(
                        ViolationKind::SkippedUndelivered,
                        Some(0),
                        &[node, rec.from],
                        Some(rec.at),
                        detail,
                    ));
                }
            }
        }
        // Keep the highest seq of the run, so one swapped pair gives two reports, not a
        // report on every later message.
        if run.last.is_none_or(|(prev, _)| seq > prev) {
            run.last = Some((seq, ctx.at));
        }
        self.delivered.entry(seq).or_insert(DeliveryRecord { node, token, payload, at: ctx.at });
        found
    }
}

/// Shows an instant as seconds, with as many decimals as it needs ("12.345s").
struct At(Duration);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (secs, nanos) = (self.0.as_secs(), self.0.subsec_nanos());
        if nanos % 1_000_000 == 0 {
            write!(f, "{secs}.{:03}s", nanos / 1_000_000)
        } else if nanos % 1_000 == 0 {
            write!(f, "{secs}.{:06}s", nanos / 1_000)
        } else {
            write!(f, "{secs}.{nanos:09}s")
        }
    }
}

/// Shows a payload on one line: its first bytes, escaped, and its length when cut.
struct Shown<'a>(&'a Payload);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 24;
        let bytes = self.0.as_bytes();
        let head = &bytes[..bytes.len().min(SHOWN)];
        write!(f, "\"{}\"", head.escape_ascii())?;
        if bytes.len() > SHOWN {
            write!(f, "...({} bytes)", bytes.len())?;
        }
        Ok(())
    }
}

/// Says where two payloads first differ, since the shown prefixes may look alike.
struct Diff<'a>(&'a Payload, &'a Payload);

impl fmt::Display for Diff<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, b) = (self.0.as_bytes(), self.1.as_bytes());
        let at = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        write!(f, " (first difference at byte {at})")
    }
}

/// Names the seqs strictly between two: "#4" or "#4..#6".
struct Skipped(Seq, Seq);

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.0.0.saturating_add(1);
        let last = self.1.0.saturating_sub(1);
        if first >= last {
            write!(f, "{}", Seq(first))
        } else {
            write!(f, "{}..{}", Seq(first), Seq(last))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn key(name: &str) -> Key {
        Key::new(name).unwrap()
    }

    fn start(node: u64, k: &str, slot: u32, token: u64) -> Event {
        Event::TaskStarted { node: NodeId(node), key: key(k), slot, token: Token(token) }
    }

    fn stop(node: u64, k: &str, slot: u32, token: u64) -> Event {
        Event::TaskStopped { node: NodeId(node), key: key(k), slot, token: Token(token) }
    }

    fn sent(from: u64, k: &str, seq: u64, payload: &str) -> Event {
        Event::Sent {
            from: NodeId(from),
            key: key(k),
            seq: Seq(seq),
            payload: Payload::from(payload),
        }
    }

    fn delivered(node: u64, k: &str, token: u64, seq: u64, payload: &str) -> Event {
        Event::Delivered {
            node: NodeId(node),
            key: key(k),
            token: Token(token),
            seq: Seq(seq),
            payload: Payload::from(payload),
        }
    }

    /// Feeds events that must all pass; panics naming the first that does not.
    fn clean(checker: &mut InvariantChecker, events: Vec<(u64, Event)>) {
        for (at, event) in events {
            if let Err(v) = checker.record(ms(at), event.clone()) {
                panic!("{event:?} at {at}ms should pass, got: {v}");
            }
        }
    }

    /// Asserts the report names the key, the nodes and the instants, on one line.
    fn assert_names(v: &Violation, key: &str, nodes: &[&str], instants: &[&str]) {
        let line = v.to_string();
        assert!(!line.contains('\n'), "not one line: {line}");
        assert!(line.contains(&format!("{key:?}")), "key {key} missing: {line}");
        for node in nodes {
            assert!(line.contains(node), "node {node} missing: {line}");
        }
        for instant in instants {
            assert!(line.contains(instant), "instant {instant} missing: {line}");
        }
    }

    #[test]
    fn clean_history_with_failovers_redelivery_and_restarts_passes() {
        let mut c = InvariantChecker::new();
        let k = "irc:#chan";
        clean(
            &mut c,
            vec![
                // Messages queue up before anyone owns the key.
                (10, sent(3, k, 1, "a")),
                (20, start(1, k, 0, 1)),
                (30, delivered(1, k, 1, 1, "a")),
                (40, sent(2, k, 2, "b")),
                (41, sent(3, k, 3, "c")),
                (50, delivered(1, k, 1, 2, "b")),
                // Owner crashes before acking #2: the next owner redelivers it.
                (2_000, stop(1, k, 0, 1)),
                (2_100, start(2, k, 0, 7)),
                (2_110, delivered(2, k, 7, 2, "b")),
                (2_120, delivered(2, k, 7, 3, "c")),
                // The task sees #4 before the sender's `send` returns.
                (2_130, delivered(2, k, 7, 4, "d")),
                (2_140, sent(1, k, 4, "d")),
                // A retried send answered again with the same seq and payload.
                (2_150, sent(1, k, 4, "d")),
                // Lease lapses and comes back: restart in place with the same token.
                (3_000, stop(2, k, 0, 7)),
                (3_500, start(2, k, 0, 7)),
                (3_510, delivered(2, k, 7, 3, "c")),
                (3_520, delivered(2, k, 7, 4, "d")),
                // The handler panics and restarts in place again.
                (3_600, stop(2, k, 0, 7)),
                (3_700, start(2, k, 0, 7)),
                (3_710, sent(2, k, 5, "e")),
                (3_720, delivered(2, k, 7, 5, "e")),
                // Old owner comes back with a later assignment.
                (4_000, stop(2, k, 0, 7)),
                (4_100, start(1, k, 0, 9)),
                (4_110, delivered(1, k, 9, 5, "e")),
                // An exclusive key: two slots on two nodes at once is fine.
                (5_000, start(1, "sampler", 0, 10)),
                (5_000, start(2, "sampler", 1, 11)),
                (5_100, stop(2, "sampler", 1, 11)),
                (5_200, start(3, "sampler", 1, 12)),
                (5_300, sent(3, "sampler", 1, "x")),
                (5_310, delivered(1, "sampler", 10, 1, "x")),
            ],
        );
        assert!(c.violations().is_empty());
        assert_eq!(c.events_recorded(), 30);
        assert_eq!(c.check_all_delivered(), Ok(()));
        assert!(c.undelivered().is_empty());
    }

    #[test]
    fn two_overlapping_owners_fail() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5))]);
        let v = c.record(ms(12_345), start(2, "k", 0, 6)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TwoOwners);
        assert_eq!(v.nodes, vec![NodeId(2), NodeId(1)]);
        assert_eq!(v.slot, Some(0));
        assert_eq!(v.earlier, Some(ms(1_000)));
        assert_names(&v, "k", &["n1", "n2", "t5", "t6"], &["at 12.345s", "1.000s"]);
        // Both runs end cleanly: each stop matches its own start.
        clean(&mut c, vec![(13_000, stop(1, "k", 0, 5)), (14_000, stop(2, "k", 0, 6))]);
        assert_eq!(c.violations().len(), 1);
    }

    #[test]
    fn a_second_start_on_the_same_node_fails() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5))]);
        let v = c.record(ms(2_000), start(1, "k", 0, 5)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::StartedTwice);
        assert_names(&v, "k", &["n1", "t5"], &["at 2.000s", "1.000s"]);
        // Two stops for two starts: no further report.
        clean(&mut c, vec![(3_000, stop(1, "k", 0, 5)), (3_001, stop(1, "k", 0, 5))]);
        assert_eq!(c.violations().len(), 1);
    }

    #[test]
    fn a_stop_of_a_task_not_running_fails() {
        let mut c = InvariantChecker::new();
        let v = c.record(ms(500), stop(4, "k", 0, 1)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::StopWithoutStart);
        assert_names(&v, "k", &["n4", "t1"], &["at 0.500s"]);

        clean(&mut c, vec![(1_000, start(1, "k", 0, 5)), (2_000, stop(1, "k", 0, 5))]);
        let v = c.record(ms(3_000), stop(1, "k", 0, 5)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::StopWithoutStart);
        assert_names(&v, "k", &["n1"], &["at 3.000s", "already stopped at 2.000s"]);
    }

    #[test]
    fn a_token_going_backwards_fails() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5)), (2_000, stop(1, "k", 0, 5))]);
        let v = c.record(ms(3_000), start(2, "k", 0, 3)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TokenNotIncreasing);
        assert_eq!(v.nodes, vec![NodeId(2), NodeId(1)]);
        assert_names(&v, "k", &["n1", "n2", "t3", "t5"], &["at 3.000s", "1.000s"]);

        // The old owner coming back with t5 after t3 ran in between is not "in place".
        clean(&mut c, vec![(4_000, stop(2, "k", 0, 3))]);
        let v = c.record(ms(5_000), start(1, "k", 0, 5)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TokenNotIncreasing);
        assert_names(&v, "k", &["n1", "n2", "t3"], &["at 5.000s", "3.000s"]);
    }

    #[test]
    fn a_smaller_token_on_the_same_node_fails() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5)), (2_000, stop(1, "k", 0, 5))]);
        let v = c.record(ms(3_000), start(1, "k", 0, 4)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TokenNotIncreasing);
        assert_names(&v, "k", &["n1", "t4", "t5"], &["at 3.000s", "1.000s"]);
    }

    #[test]
    fn an_equal_token_on_another_node_fails() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5)), (2_000, stop(1, "k", 0, 5))]);
        let v = c.record(ms(3_000), start(2, "k", 0, 5)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TokenNotIncreasing);
        assert_eq!(v.nodes, vec![NodeId(2), NodeId(1)]);
        assert_names(&v, "k", &["n1", "n2", "t5"], &["at 3.000s", "1.000s"]);
    }

    #[test]
    fn a_gap_within_a_run_fails() {
        let mut c = InvariantChecker::new();
        clean(
            &mut c,
            vec![
                (1_000, start(1, "q", 0, 2)),
                (1_100, delivered(1, "q", 2, 1, "a")),
                (1_200, delivered(1, "q", 2, 2, "b")),
            ],
        );
        let v = c.record(ms(1_300), delivered(1, "q", 2, 5, "e")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::Gap);
        assert_names(&v, "q", &["n1", "#3..#4", "#5"], &["at 1.300s", "1.200s"]);
    }

    #[test]
    fn a_new_owner_skipping_an_untaken_message_fails() {
        let mut c = InvariantChecker::new();
        clean(
            &mut c,
            vec![
                (900, sent(3, "q", 3, "c")),
                (1_000, start(1, "q", 0, 2)),
                (1_100, delivered(1, "q", 2, 1, "a")),
                (1_200, delivered(1, "q", 2, 2, "b")),
                (2_000, stop(1, "q", 0, 2)),
                (3_000, start(2, "q", 0, 3)),
            ],
        );
        let v = c.record(ms(3_100), delivered(2, "q", 3, 4, "d")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::SkippedUndelivered);
        assert_eq!(v.nodes, vec![NodeId(2), NodeId(3)]);
        assert_names(&v, "q", &["n2", "n3", "#3", "#4"], &["at 3.100s", "0.900s"]);

        // A very first owner may not begin past an acknowledged message.
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(900, sent(1, "q", 1, "a")), (1_000, start(1, "q", 0, 2))]);
        let v = c.record(ms(1_500), delivered(1, "q", 2, 2, "b")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::SkippedUndelivered);
        assert_names(&v, "q", &["n1", "#1"], &["at 1.500s", "0.900s"]);
    }

    #[test]
    fn a_run_may_begin_past_seqs_nobody_was_acknowledged_for() {
        // A key forgotten and registered again continues above every seq ever used.
        let mut c = InvariantChecker::new();
        clean(
            &mut c,
            vec![
                (900, sent(1, "q", 1, "a")),
                (1_000, start(1, "q", 0, 2)),
                (1_100, delivered(1, "q", 2, 1, "a")),
                (2_000, stop(1, "q", 0, 2)),
                (3_000, start(2, "q", 0, 9)),
                (3_100, delivered(2, "q", 9, 40, "x")),
                (3_200, delivered(2, "q", 9, 41, "y")),
            ],
        );
    }

    #[test]
    fn a_reordered_message_fails_without_cascading() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "q", 0, 2)), (1_100, delivered(1, "q", 2, 1, "a"))]);
        let v = c.record(ms(1_200), delivered(1, "q", 2, 3, "c")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::Gap);
        let v = c.record(ms(1_300), delivered(1, "q", 2, 2, "b")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::OutOfOrder);
        assert_names(&v, "q", &["n1", "#2", "#3"], &["at 1.300s", "1.200s"]);
        // The run goes on from #3; #4 is in order.
        clean(&mut c, vec![(1_400, delivered(1, "q", 2, 4, "d"))]);
        assert_eq!(c.violations().len(), 2);

        // A duplicate within one run is out of order too.
        let v = c.record(ms(1_500), delivered(1, "q", 2, 4, "d")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::OutOfOrder);
    }

    #[test]
    fn a_delivery_to_a_non_owner_fails() {
        let mut c = InvariantChecker::new();
        // Nobody ever ran the key.
        let v = c.record(ms(500), delivered(3, "q", 1, 1, "a")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::DeliveredToNonOwner);
        assert_names(&v, "q", &["n3"], &["at 0.500s"]);

        clean(
            &mut c,
            vec![
                (1_000, start(1, "q", 0, 2)),
                (2_000, stop(1, "q", 0, 2)),
                (3_000, start(2, "q", 0, 3)),
                (3_000, start(1, "q", 1, 4)),
            ],
        );
        // A node that does not run the key at all.
        let v = c.record(ms(3_100), delivered(3, "q", 3, 1, "a")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::DeliveredToNonOwner);
        assert_eq!(v.nodes, vec![NodeId(3), NodeId(2)]);
        assert_names(&v, "q", &["n2", "n3", "t3"], &["at 3.100s", "3.000s"]);
        // The old owner, under its stale token.
        let v = c.record(ms(3_200), delivered(1, "q", 2, 1, "a")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::DeliveredToNonOwner);
        assert_names(&v, "q", &["n1", "n2", "t2"], &["at 3.200s", "stopped at 2.000s"]);
        // The owner of slot 1: messages go to slot 0 only.
        let v = c.record(ms(3_300), delivered(1, "q", 4, 1, "a")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::DeliveredToNonOwner);
        // The live owner under a wrong token.
        let v = c.record(ms(3_400), delivered(2, "q", 2, 1, "a")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::DeliveredToNonOwner);
        // None of those counted: the live owner may still begin at #1.
        clean(&mut c, vec![(3_500, delivered(2, "q", 3, 1, "a"))]);
    }

    #[test]
    fn a_payload_mismatch_fails() {
        // Delivery after the send.
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "q", 0, 2)), (1_100, sent(2, "q", 1, "hello"))]);
        let v = c.record(ms(1_200), delivered(1, "q", 2, 1, "hellp")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::PayloadMismatch);
        assert_eq!(v.nodes, vec![NodeId(1), NodeId(2)]);
        assert_names(&v, "q", &["n1", "n2", "hellp", "hello", "byte 4"], &["at 1.200s", "1.100s"]);

        // Send returning after the delivery.
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "q", 0, 2)), (1_100, delivered(1, "q", 2, 1, "x"))]);
        let v = c.record(ms(1_200), sent(3, "q", 1, "y")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::PayloadMismatch);
        assert_names(&v, "q", &["n1", "n3"], &["at 1.200s", "1.100s"]);

        // Two deliveries of one seq, no send seen.
        let mut c = InvariantChecker::new();
        clean(
            &mut c,
            vec![
                (1_000, start(1, "q", 0, 2)),
                (1_100, delivered(1, "q", 2, 1, "x")),
                (2_000, stop(1, "q", 0, 2)),
                (2_100, start(2, "q", 0, 3)),
            ],
        );
        let v = c.record(ms(2_200), delivered(2, "q", 3, 1, "z")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::PayloadMismatch);
        assert_names(&v, "q", &["n1", "n2", "t2", "t3"], &["at 2.200s", "1.100s"]);

        // Two acknowledged sends got the same seq.
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, sent(1, "q", 1, "x"))]);
        let v = c.record(ms(1_001), sent(2, "q", 1, "y")).unwrap_err();
        assert_eq!(v.kind, ViolationKind::ConflictingSend);
        assert_names(&v, "q", &["n1", "n2", "#1"], &["at 1.001s", "1.000s"]);
    }

    #[test]
    fn an_undelivered_sent_message_fails() {
        let mut c = InvariantChecker::new();
        clean(
            &mut c,
            vec![
                (1_000, start(1, "q", 0, 2)),
                (1_100, sent(2, "q", 1, "a")),
                (1_200, sent(3, "q", 2, "b")),
                (1_300, sent(3, "q", 3, "c")),
                (1_400, delivered(1, "q", 2, 1, "a")),
                (1_500, sent(2, "other", 1, "x")),
                (9_000, stop(1, "q", 0, 2)),
            ],
        );
        // A delivery to a non-owner does not count as delivered.
        let _ = c.record(ms(9_500), delivered(4, "other", 1, 1, "x"));
        let v = c.check_all_delivered().unwrap_err();
        assert_eq!(v.kind, ViolationKind::Undelivered);
        assert_eq!(v.key, key("other"));
        assert_names(&v, "other", &["n2", "#1", "1 more key"], &["at 9.500s", "1.500s"]);

        let per_key = c.undelivered();
        assert_eq!(per_key.len(), 2);
        let q = &per_key[1];
        assert_eq!(q.key, key("q"));
        assert_eq!(q.nodes, vec![NodeId(3)]);
        assert_names(q, "q", &["n3", "#2", "2 of the 3"], &["at 9.500s", "1.200s"]);
        // End-of-run reports are not added to the running list.
        assert_eq!(c.violations().len(), 1);
    }

    #[test]
    fn every_violation_is_kept_and_the_first_is_returned() {
        let mut c = InvariantChecker::new();
        clean(&mut c, vec![(1_000, start(1, "k", 0, 5))]);
        // Both two owners and an equal token on another node.
        let v = c.record(ms(2_000), start(2, "k", 0, 5)).unwrap_err();
        assert_eq!(v.kind, ViolationKind::TwoOwners);
        let kinds: Vec<_> = c.violations().iter().map(|v| v.kind).collect();
        assert_eq!(kinds, vec![ViolationKind::TwoOwners, ViolationKind::TokenNotIncreasing]);
    }

    #[test]
    fn instants_show_the_precision_they_need() {
        assert_eq!(At(ms(12_345)).to_string(), "12.345s");
        assert_eq!(At(Duration::ZERO).to_string(), "0.000s");
        assert_eq!(At(Duration::from_micros(1_500)).to_string(), "0.001500s");
        assert_eq!(At(Duration::from_nanos(7)).to_string(), "0.000000007s");
        let long = Payload::from("a\nb".repeat(20));
        assert_eq!(
            Shown(&long).to_string(),
            "\"a\\nba\\nba\\nba\\nba\\nba\\nba\\nba\\nb\"...(60 bytes)"
        );
    }

    #[test]
    fn odd_input_never_panics() {
        let mut c = InvariantChecker::new();
        let big = u64::MAX;
        let odd = vec![
            (5_000, sent(1, "k", 0, "zero")),
            (4_000, delivered(1, "k", 1, 0, "zero")),
            (3_000, stop(1, "k", u32::MAX, big)),
            (2_000, start(1, "k", 0, big)),
            (2_000, start(1, "k", 0, big)),
            (1_000, delivered(1, "k", big, big, "max")),
            (1_000, delivered(1, "k", big, big, "max")),
            (1_000, delivered(1, "k", big, 1, "one")),
            (1_000, sent(1, "k", big, "other")),
            (0, stop(1, "k", 0, big)),
            (0, stop(1, "k", 0, big)),
            (0, stop(1, "k", 0, big)),
            (0, start(2, "k", 0, 0)),
        ];
        for (at, event) in odd {
            let _ = c.record(ms(at), event);
        }
        assert!(!c.violations().is_empty());
        let _ = c.check_all_delivered();

        // A deterministic pseudo-random soup of events over few keys, nodes and values.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % n
        };
        let keys = ["a", "b", "c"];
        for step in 0..20_000u64 {
            let k = keys[next(3) as usize];
            let (node, slot, token, seq) = (next(4), next(2) as u32, next(6), next(6));
            let payload = ["x", "y"][next(2) as usize];
            let event = match next(4) {
                0 => start(node, k, slot, token),
                1 => stop(node, k, slot, token),
                2 => sent(node, k, seq, payload),
                _ => delivered(node, k, token, seq, payload),
            };
            let _ = c.record(ms(step), event);
        }
        assert_eq!(c.events_recorded(), 20_013);
        for v in c.violations() {
            assert!(!v.to_string().contains('\n'));
        }
        for v in c.undelivered() {
            assert!(!v.to_string().contains('\n'));
        }
    }
}
