//! The commands the replicated state machine applies, and what each one produced.

use crate::schedule::{ScheduleAction, ScheduleSpec, TickOrigin, TickResult};
use crate::{ClientId, JobId, Key, Limits, Payload, RequestId, Seq, SessionId, Token};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The most slots (owners at once) a key may have.
pub const MAX_SLOTS: u32 = 1024;

/// What kind of work a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyKind {
    /// Runs on exactly one node at a time.
    Singleton,
    /// Runs on exactly `slots` distinct nodes at a time.
    Exclusive,
    /// A schedule: one slot, whose owner fires the schedule's ticks (registered with
    /// [`Command::RegisterSchedule`], which carries the schedule).
    Schedule,
}

/// How a key is run: the same on every session that registers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySpec {
    /// Singleton or exclusive group.
    pub kind: KeyKind,
    /// How many owners the key has at once (1 for a singleton).
    pub slots: u32,
}

impl KeySpec {
    /// A key that runs on exactly one node.
    pub const fn singleton() -> KeySpec {
        KeySpec { kind: KeyKind::Singleton, slots: 1 }
    }

    /// A key that runs on exactly `slots` distinct nodes.
    pub const fn exclusive(slots: u32) -> KeySpec {
        KeySpec { kind: KeyKind::Exclusive, slots }
    }

    /// A schedule key: one slot.
    pub const fn schedule() -> KeySpec {
        KeySpec { kind: KeyKind::Schedule, slots: 1 }
    }

    /// Whether the spec can be run: 1 slot for a singleton or a schedule, 1..=[`MAX_SLOTS`]
    /// otherwise.
    pub fn is_valid(&self) -> bool {
        match self.kind {
            KeyKind::Singleton | KeyKind::Schedule => self.slots == 1,
            KeyKind::Exclusive => (1..=MAX_SLOTS).contains(&self.slots),
        }
    }
}

/// The lease terms a session was opened with. The node measures its lease with them and the
/// leader expires the session with them, so both sides agree even if nodes are configured
/// differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTerms {
    /// Session time-to-live, in milliseconds.
    pub ttl_ms: u64,
    /// Allowance for clock-rate drift, in milliseconds: the node gives up its lease `margin`
    /// before `ttl` runs out, the leader waits `margin` after it.
    pub margin_ms: u64,
}

impl LeaseTerms {
    /// How long a session may stay silent at the leader before it is expired.
    pub fn expiry_after_ms(&self) -> u64 {
        // Saturating: the terms come from a peer's configuration and must not crash the leader.
        self.ttl_ms.saturating_add(self.margin_ms)
    }
}

/// One change to the replicated state. A Raft entry carries a batch of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Opens a liveness session for a starting node.
    ///
    /// The node's previous session, if still live, ends at once only when it ran on the same
    /// `storage`: the new process holds that storage's lock, so the old one is gone. A
    /// process on other storage (another machine, a wiped disk, an id configured twice) is
    /// answered [`Outcome::WaitingForPrevious`] and recorded as the node's successor:
    /// the leader renews the old session no more and expires it once its lease has run out.
    OpenSession {
        /// The process asking.
        client: ClientId,
        /// Distinguishes re-opens by the same process after its session ended.
        attempt: u32,
        /// The lease terms the node will honour.
        lease: LeaseTerms,
        /// The node's configured limits; the first session adopts them for the cluster.
        limits: Limits,
        /// The identity of the storage the process runs on (its Raft member id): one per
        /// data directory, new whenever a node starts on empty storage.
        storage: u64,
    },
    /// Ends a session gracefully. Refused with [`Rejection::StillOwner`] while the session
    /// owns a slot: those are released first, each with its token.
    CloseSession {
        /// The session to end.
        session: SessionId,
    },
    /// Ends a session the leader found silent for longer than its lease terms allow.
    ///
    /// Applied only from an entry of the same `term`: the leader decided it from the liveness
    /// table of that leadership, which is only valid within it. An expiry decided under an
    /// older leadership of the same node (its view of leadership lags) and appended under a
    /// newer one could overtake a renewal granted by a leader in between.
    ExpireSession {
        /// The session to end.
        session: SessionId,
        /// The Raft term of the leadership that decided the expiry.
        term: u64,
    },
    /// Says that a session can run `key`.
    Register {
        /// The session offering to run the key.
        session: SessionId,
        /// The key.
        key: Key,
        /// How the key is run.
        spec: KeySpec,
        /// Orders this registration among the session's registrations and withdrawals of the
        /// key (the node numbers them): a withdrawal older than the registration in force,
        /// landing late, is refused instead of undoing it.
        epoch: u64,
    },
    /// Withdraws a registration made at or before `epoch`. It never vacates a slot: refused
    /// with [`Rejection::StillOwner`] while the session owns one of the key's slots (the node
    /// releases it first, with its token), and with [`Rejection::StaleRegistration`] when a
    /// newer registration is in force.
    Unregister {
        /// The session withdrawing.
        session: SessionId,
        /// The key.
        key: Key,
        /// The newest registration epoch this withdrawal covers.
        epoch: u64,
    },
    /// Gives a vacant slot to a live candidate session, with a fresh fencing token.
    Assign {
        /// The key.
        key: Key,
        /// The slot index.
        slot: u32,
        /// The new owner.
        session: SessionId,
    },
    /// Vacates a slot, if `token` is still the owner's token.
    Release {
        /// The key.
        key: Key,
        /// The slot index.
        slot: u32,
        /// The owner's token.
        token: Token,
        /// Whether the releasing session prefers not to be given the slot again.
        hand_over: bool,
    },
    /// Appends a message to a key's queue.
    Send {
        /// The key.
        key: Key,
        /// The message body.
        payload: Payload,
        /// De-duplicates retries.
        request: RequestId,
        /// The client will not retry requests with a serial below this, so their
        /// de-duplication records can be dropped.
        floor: u64,
    },
    /// Asks the owner of a slot to hand it over, if `token` is still its token. The slot stays
    /// owned until the owner, having stopped its task, releases it.
    RequestMove {
        /// The key.
        key: Key,
        /// The slot index.
        slot: u32,
        /// The owner's token.
        token: Token,
    },
    /// Drops a key's queued messages up to and including `upto`, if `token` is the token of
    /// the key's consuming slot (slot 0).
    Ack {
        /// The key.
        key: Key,
        /// The consumer's token.
        token: Token,
        /// The last message handled.
        upto: Seq,
    },
    /// Stamps the commands after it in the same entry with the cluster's time of day, in
    /// milliseconds since the Unix epoch, as the leader saw it when it appended the entry
    /// (the lower median of the wall clocks of the nodes it hears from, so one node's wrong
    /// clock, the leader's included, does not move it). Only a leader writes it, in front of
    /// the commands that need it ([`Command::needs_stamp`]); one a client sends is dropped.
    Stamp {
        /// The cluster's time of day.
        wall_ms: u64,
    },
    /// Says that a session can run the schedule `key`: a key of kind
    /// [`KeyKind::Schedule`] with one slot, whose owner fires the schedule's ticks. Every
    /// session that registers the key must give the same schedule.
    RegisterSchedule {
        /// The session offering to run the schedule.
        session: SessionId,
        /// The key.
        key: Key,
        /// The schedule.
        schedule: Box<ScheduleSpec>,
        /// As in [`Command::Register`].
        epoch: u64,
        /// The version of the time-zone database the node computes ticks with. Every
        /// candidate of a schedule whose ticks depend on it ([`ScheduleSpec::needs_tzdb`])
        /// must have the same, so no two owners compute different instants for one tick.
        tzdb: String,
    },
    /// The owner of a schedule fires a tick: applied only with the slot's current token, for
    /// a tick above the schedule's high-water mark and not later than the entry's stamp (a
    /// fast clock on the owner cannot fire early). The tick is recorded as pending in the
    /// same step (or skipped by the overlap policy), and runs once per attempt.
    Fire {
        /// The schedule's key.
        key: Key,
        /// The owner's token.
        token: Token,
        /// The tick's nominal time, ms since the Unix epoch.
        tick_ms: u64,
        /// Scheduled on time, or a missed tick the catch-up policy fires.
        origin: TickOrigin,
        /// Ticks the catch-up policy skipped to get to this one.
        missed: u64,
        /// If set, the owner starts running the tick at once (if the overlap policy lets
        /// it), at this time of day: one command instead of `Fire` and `TickStarted`.
        start_ms: Option<u64>,
    },
    /// The owner of a schedule skips missed ticks its catch-up policy does not run: the
    /// high-water mark moves to `upto_ms` (checked as a `Fire` of it would be) and `missed`
    /// is counted.
    SkipTicks {
        /// The schedule's key.
        key: Key,
        /// The owner's token.
        token: Token,
        /// The newest tick skipped.
        upto_ms: u64,
        /// How many ticks were skipped.
        missed: u64,
    },
    /// The owner of a schedule starts a run of a pending tick. Refused, and the tick dropped
    /// as interrupted, when it has run as often as its delivery policy allows.
    TickStarted {
        /// The schedule's key.
        key: Key,
        /// The owner's token.
        token: Token,
        /// The pending tick's run id.
        run: u64,
        /// When the run starts (the owner's view of the cluster's time of day).
        start_ms: u64,
    },
    /// The owner of a schedule reports how a run ended; the tick is no longer pending.
    TickDone {
        /// The schedule's key.
        key: Key,
        /// The owner's token.
        token: Token,
        /// The pending tick's run id.
        run: u64,
        /// How it ended.
        result: TickResult,
        /// When it ended.
        end_ms: u64,
    },
    /// An operator pauses, resumes, triggers or backfills a schedule, from any node.
    ScheduleControl {
        /// The schedule's key.
        key: Key,
        /// What to do.
        action: ScheduleAction,
        /// De-duplicates retries (a trigger must not run twice because a write was retried).
        request: RequestId,
        /// As in [`Command::Send`].
        floor: u64,
    },
    /// Adds a job to a queue's job table, from any node. Refused with
    /// [`Rejection::DuplicateJob`] when its unique key is held by an unfinished job of the
    /// queue. Its `run_at` (default: the entry's stamp) is judged against the cluster's time.
    Enqueue {
        /// The queue.
        queue: Key,
        /// The job's input.
        payload: Payload,
        /// Its options.
        spec: Box<JobSpec>,
        /// De-duplicates retries, so a retried enqueue never adds the job twice.
        request: RequestId,
        /// As in [`Command::Send`].
        floor: u64,
    },
    /// Sets a queue's concurrency caps. Without `force`, refused with
    /// [`Rejection::QueueCapsConflict`] when other caps are in force (a worker started with
    /// other caps than its peers); with it, replaces them (jobs running beyond a lowered cap
    /// finish; no new one starts until the queue is below it).
    ConfigureQueue {
        /// The queue.
        queue: Key,
        /// The caps.
        caps: QueueCaps,
        /// Replace caps in force.
        force: bool,
    },
    /// A node's worker pool claims due jobs of a queue for its session: as many as it has
    /// room for (`limit` minus the jobs of the queue the session runs), within the queue's
    /// caps, chosen by (priority, run_at, id). Each claimed job takes a fresh claim token
    /// from the counter that fencing tokens come from, and runs until its session ends.
    Claim {
        /// The queue.
        queue: Key,
        /// The claiming session.
        session: SessionId,
        /// The most jobs of the queue the session runs at once (its worker's concurrency).
        limit: u32,
        /// The worker's timeout for jobs that were enqueued without one, in milliseconds.
        timeout_ms: u64,
    },
    /// The handler of a claimed job succeeded. Refused with a stale claim token.
    CompleteJob {
        /// The job.
        job: JobId,
        /// Its claim token.
        token: Token,
        /// A small result kept with the job.
        result: Option<Payload>,
    },
    /// An attempt of a claimed job failed. Refused with a stale claim token. The job runs
    /// again at `retry_at_ms` (an absolute time of day the node computed, so every replica
    /// applies the same) unless it is out of attempts or `discard` is set: then it is dead.
    FailJob {
        /// The job.
        job: JobId,
        /// Its claim token.
        token: Token,
        /// What went wrong (cut to [`MAX_ERROR_BYTES`](crate::state::MAX_ERROR_BYTES)).
        error: String,
        /// When to try again, ms since the Unix epoch.
        retry_at_ms: u64,
        /// Do not try again.
        discard: bool,
        /// The node stopped the attempt for reasons of its own (it is shutting down, or its
        /// lease lapsed), not the job's: the attempt is not counted.
        interrupted: bool,
    },
    /// Moves a running job's deadline, if `token` is still its claim token.
    ExtendJob {
        /// The job.
        job: JobId,
        /// Its claim token.
        token: Token,
        /// The new deadline, ms since the Unix epoch.
        deadline_ms: u64,
    },
    /// An operator cancels, retries or discards a job, from any node.
    JobControl {
        /// The job.
        job: JobId,
        /// What to do.
        action: JobAction,
        /// De-duplicates retries.
        request: RequestId,
        /// As in [`Command::Send`].
        floor: u64,
    },
    /// Drops finished jobs in `state` (of one queue, or of all).
    PurgeJobs {
        /// The queue, or every queue.
        queue: Option<Key>,
        /// Completed, dead or cancelled.
        state: JobState,
        /// De-duplicates retries.
        request: RequestId,
        /// As in [`Command::Send`].
        floor: u64,
    },
}

/// The options of one job, fixed when it is enqueued.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// 0 (runs first) to 9 (runs last); first in first out within a priority.
    pub priority: u8,
    /// Not before this time of day (ms since the Unix epoch); `None` for now.
    pub run_at_ms: Option<u64>,
    /// How many attempts it gets before it is dead (at least 1).
    pub max_attempts: u32,
    /// How long one attempt may run before its handler is cancelled, in milliseconds;
    /// `None` for the claiming worker's timeout.
    pub timeout_ms: Option<u64>,
    /// While an unfinished job of the queue holds this key, another with it is refused.
    pub unique: Option<String>,
    /// Jobs with the same partition key count against the queue's per-partition cap.
    pub partition: Option<String>,
}

/// The longest unique or partition key of a job, in bytes.
pub const MAX_JOB_TAG_BYTES: usize = 256;
/// The highest (last-running) job priority.
pub const MAX_JOB_PRIORITY: u8 = 9;

impl JobSpec {
    /// The defaults: priority 0, now, 25 attempts, the worker's timeout, no unique or
    /// partition key.
    pub fn new() -> JobSpec {
        JobSpec {
            priority: 0,
            run_at_ms: None,
            max_attempts: 25,
            timeout_ms: None,
            unique: None,
            partition: None,
        }
    }

    /// Checks the options; the text says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.priority > MAX_JOB_PRIORITY {
            return Err(format!("priority {} is above {MAX_JOB_PRIORITY}", self.priority));
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if self.timeout_ms == Some(0) {
            return Err("the timeout must be above zero".into());
        }
        for (name, tag) in [("unique", &self.unique), ("partition", &self.partition)] {
            if let Some(tag) = tag
                && (tag.is_empty() || tag.len() > MAX_JOB_TAG_BYTES)
            {
                return Err(format!("the {name} key must be 1 to {MAX_JOB_TAG_BYTES} bytes"));
            }
        }
        Ok(())
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec::new()
    }
}

/// A queue's concurrency caps, enforced when jobs are claimed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCaps {
    /// The most jobs of the queue running at once across the cluster.
    pub global: Option<u32>,
    /// The most jobs with one partition key running at once across the cluster.
    pub per_partition: Option<u32>,
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Waits for its `run_at`.
    Scheduled,
    /// Can be claimed.
    Available,
    /// Claimed by a session; its handler runs there.
    Running,
    /// An attempt failed; waits for its retry time.
    Retryable,
    /// Its handler succeeded.
    Completed,
    /// Out of attempts, or discarded.
    Dead,
    /// Cancelled by an operator.
    Cancelled,
}

impl JobState {
    /// Completed, dead or cancelled: nothing more happens to the job unless an operator
    /// retries it.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Completed | JobState::Dead | JobState::Cancelled)
    }

    /// The lowercase name the CLI and reports use.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What an operator does to one job ([`Command::JobControl`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobAction {
    /// A job that has not run yet is cancelled at once; a running one is asked to stop (its
    /// node cancels the handler) and is cancelled when the attempt ends.
    Cancel,
    /// A dead or cancelled job runs again now, with its attempts counted from zero.
    Retry,
    /// A dead, completed or cancelled job is dropped from the table.
    Discard,
}

impl Command {
    /// The key the command is about, if it names one.
    pub fn key(&self) -> Option<&Key> {
        match self {
            Command::Send { key, .. }
            | Command::Register { key, .. }
            | Command::Unregister { key, .. }
            | Command::Assign { key, .. }
            | Command::Release { key, .. }
            | Command::RequestMove { key, .. }
            | Command::Ack { key, .. }
            | Command::RegisterSchedule { key, .. }
            | Command::Fire { key, .. }
            | Command::SkipTicks { key, .. }
            | Command::TickStarted { key, .. }
            | Command::TickDone { key, .. }
            | Command::ScheduleControl { key, .. } => Some(key),
            Command::Enqueue { queue, .. }
            | Command::ConfigureQueue { queue, .. }
            | Command::Claim { queue, .. } => Some(queue),
            _ => None,
        }
    }

    /// A rough size in bytes, for batching.
    pub fn approx_size(&self) -> usize {
        match self {
            Command::Send { key, payload, .. } => 48 + key.as_str().len() + payload.len(),
            Command::Register { key, .. }
            | Command::Unregister { key, .. }
            | Command::Assign { key, .. }
            | Command::Release { key, .. }
            | Command::RequestMove { key, .. }
            | Command::Ack { key, .. }
            | Command::Fire { key, .. }
            | Command::SkipTicks { key, .. }
            | Command::TickStarted { key, .. } => 32 + key.as_str().len(),
            Command::RegisterSchedule { key, schedule, .. } => {
                96 + key.as_str().len() + schedule.zone.len()
            }
            Command::TickDone { key, result, .. } => {
                let text = match result {
                    TickResult::Failed(e) => e.len(),
                    _ => 0,
                };
                40 + key.as_str().len() + text
            }
            Command::ScheduleControl { key, action, .. } => {
                let ticks = match action {
                    ScheduleAction::Backfill { ticks } => ticks.len() * 8,
                    _ => 0,
                };
                48 + key.as_str().len() + ticks
            }
            Command::Enqueue { queue, payload, spec, .. } => {
                let tags = spec.unique.as_ref().map_or(0, String::len)
                    + spec.partition.as_ref().map_or(0, String::len);
                80 + queue.as_str().len() + payload.len() + tags
            }
            Command::CompleteJob { result, .. } => 32 + result.as_ref().map_or(0, Payload::len),
            Command::FailJob { error, .. } => 40 + error.len(),
            _ => 48,
        }
    }

    /// Whether the command is applied against the cluster's time of day, which the leader
    /// writes in front of it as a [`Command::Stamp`].
    pub fn needs_stamp(&self) -> bool {
        matches!(
            self,
            Command::RegisterSchedule { .. }
                | Command::Fire { .. }
                | Command::SkipTicks { .. }
                | Command::ScheduleControl { .. }
                | Command::Enqueue { .. }
                | Command::Claim { .. }
                | Command::CompleteJob { .. }
                | Command::FailJob { .. }
                | Command::JobControl { .. }
        )
    }
}

/// The content of one Raft entry: commands packed by the proposer so that many callers share
/// one log append.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch(pub Vec<Command>);

/// What applying one command did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A session is open (or was already open for this exact request).
    SessionOpened {
        /// The session.
        session: SessionId,
    },
    /// The node's earlier process, on other storage, still has a live session: this process
    /// is recorded as the node's successor and asks again once that session has ended. The
    /// leader renews the earlier session no more, so it ends within its TTL and margin.
    WaitingForPrevious {
        /// The session being waited out.
        session: SessionId,
    },
    /// The session ended.
    SessionEnded,
    /// The registration is in place.
    Registered,
    /// The registration is gone.
    Unregistered,
    /// The slot has a new owner.
    Assigned {
        /// The owner's fencing token.
        token: Token,
    },
    /// The slot is vacant.
    Released,
    /// The owner has been asked to hand the slot over.
    MoveRequested,
    /// The message is queued.
    Sent {
        /// Its sequence number in the key's queue.
        seq: Seq,
    },
    /// The queue's acknowledged prefix is gone.
    Acked {
        /// The sequence number now at the head of the queue, if any message remains.
        head: Option<Seq>,
    },
    /// The command was refused; the state is unchanged.
    Rejected(Rejection),
    /// The entry is stamped.
    Stamped,
    /// The tick is fired: above the high-water mark, which now stands at it.
    Fired {
        /// The run id of the pending tick, or `None` if the overlap policy skipped it.
        run: Option<u64>,
        /// Whether it started at once (see [`Command::Fire`]).
        started: bool,
    },
    /// Missed ticks were skipped; the high-water mark stands at the newest.
    TicksSkipped,
    /// A run of a pending tick started.
    TickStarted {
        /// Which run of the tick this is, from 1.
        attempt: u32,
    },
    /// The tick has run as often as its delivery policy allows (a run was cut short each
    /// time): it is dropped as interrupted instead of started again.
    TickExhausted {
        /// Runs started.
        attempts: u32,
    },
    /// The run's end is recorded.
    TickDone,
    /// The schedule changed as asked.
    ScheduleChanged {
        /// The run ids of ticks a trigger or a backfill made pending.
        runs: Vec<u64>,
    },
    /// The job is in the table.
    Enqueued {
        /// Its id.
        job: JobId,
    },
    /// The queue's caps are in force.
    QueueConfigured,
    /// Jobs claimed for the session, each with its claim token (possibly none).
    Claimed {
        /// The jobs and their tokens.
        jobs: Vec<(JobId, Token)>,
    },
    /// The job moved to `state` (a completion, a failure, an operator's action).
    JobUpdated {
        /// Where it stands now.
        state: JobState,
    },
    /// The running job's deadline moved.
    JobExtended,
    /// Finished jobs dropped.
    JobsPurged {
        /// How many.
        count: u64,
    },
}

/// Why a command was refused. Refusal is a normal outcome, not a failure of the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The session does not exist or has ended.
    #[error("no such session")]
    NoSuchSession,
    /// The key has never been registered, or every registration and message is gone.
    #[error("no such key")]
    NoSuchKey,
    /// The slot index is beyond the key's slot count.
    #[error("no such slot")]
    NoSuchSlot,
    /// The session has not registered the key.
    #[error("the session is not a candidate for the key")]
    NotCandidate,
    /// The slot already has an owner.
    #[error("the slot is occupied")]
    SlotOccupied,
    /// The session already owns another slot of the key.
    #[error("the session already owns a slot of the key")]
    AlreadyOwnsSlot,
    /// The token is not the current owner's token.
    #[error("stale fencing token")]
    StaleToken,
    /// The key is registered elsewhere with a different spec.
    #[error("the key is registered with a different spec: {existing:?}")]
    SpecConflict {
        /// The spec in force.
        existing: KeySpec,
    },
    /// The spec cannot be run.
    #[error("invalid key spec")]
    InvalidSpec,
    /// The payload is larger than the cluster's limit.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The key's queue is at its message or byte limit.
    #[error("the key's queue is full")]
    QueueFull,
    /// All queues together are at the cluster's byte limit.
    #[error("the cluster's message store is full")]
    StoreFull,
    /// The node's limits differ from the cluster's.
    #[error("the node's limits differ from the cluster's: {cluster:?}")]
    LimitsMismatch {
        /// The limits the cluster adopted.
        cluster: Limits,
    },
    /// An older incarnation or attempt of the node. On the same storage (a clock that went
    /// back), the node starts again above `current`; on other storage, another process runs
    /// as this node and this one must stop.
    #[error(
        "stale incarnation; the cluster knows incarnation {current} attempt {attempt} on storage {storage:#x}"
    )]
    StaleIncarnation {
        /// The newest incarnation the state knows for the node.
        current: u64,
        /// Its newest attempt.
        attempt: u32,
        /// The storage that incarnation runs on.
        storage: u64,
    },
    /// The session still owns a slot of the key (or, for `CloseSession`, any slot): only a
    /// `Release` with the slot's token, or an expiry, may vacate it.
    #[error("the session still owns a slot; release it with its token first")]
    StillOwner,
    /// A withdrawal older than the registration in force.
    #[error("a newer registration of the key is in force")]
    StaleRegistration,
    /// A request from a process that is no longer the node's current incarnation, or one the
    /// client said it would not retry.
    #[error("request from a stale client, or already answered")]
    StaleRequest,
    /// An acknowledgement beyond the last queued message.
    #[error("acknowledgement beyond the end of the queue")]
    AckBeyondQueue,
    /// Lease terms or limits that cannot work (zero, or a margin not below the TTL).
    #[error("invalid lease terms or limits")]
    InvalidSessionTerms,
    /// An expiry decided under another leadership than the one that appended it.
    #[error("expiry decided under term {decided}, appended in term {appended}")]
    WrongTerm {
        /// The term whose leader decided the expiry.
        decided: u64,
        /// The term of the entry that carried it.
        appended: u64,
    },
    /// A schedule command on a key that is not a schedule.
    #[error("the key is not a schedule")]
    NotASchedule,
    /// A message sent to a schedule: its queue carries nothing but its own ticks.
    #[error("the key is a schedule, which takes no messages")]
    TakesNoMessages,
    /// The schedule is registered elsewhere with a different schedule.
    #[error("the schedule is registered with a different spec: {}", existing.describe())]
    ScheduleConflict {
        /// The schedule in force.
        existing: Box<ScheduleSpec>,
    },
    /// The schedule cannot be run (the text says what to change).
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// The schedule's ticks depend on the time-zone database, and its other candidates
    /// compute them with another version.
    #[error(
        "the schedule's other nodes use time-zone database {in_force}; a node with another \
         version would compute other instants for its ticks"
    )]
    TzdbMismatch {
        /// The version its candidates have.
        in_force: String,
    },
    /// A command that needs the cluster's time of day in an entry a leader did not stamp.
    #[error("the entry carries no time of day")]
    Unstamped,
    /// A tick at or below the schedule's high-water mark: it has fired (or was skipped).
    #[error("tick not after {last}: already fired or skipped")]
    TickNotAfter {
        /// The high-water mark.
        last: u64,
    },
    /// A tick later than the cluster's time of day: the owner's clock is ahead.
    #[error("tick {tick_ms} is not due yet: the cluster's time is {cluster_ms}")]
    TooEarly {
        /// The tick.
        tick_ms: u64,
        /// The entry's stamp.
        cluster_ms: u64,
    },
    /// A tick outside the schedule's start and end bounds.
    #[error("tick outside the schedule's bounds")]
    OutsideBounds,
    /// The schedule is paused.
    #[error("the schedule is paused")]
    Paused,
    /// No pending tick has this run id (it ended, or was dropped).
    #[error("no such pending tick")]
    NoSuchRun,
    /// As many runs of the schedule as its overlap policy allows are going.
    #[error("the schedule runs as many ticks at once as its overlap policy allows")]
    Busy,
    /// An unfinished job of the queue holds the unique key.
    #[error("an unfinished job ({existing}) holds the unique key")]
    DuplicateJob {
        /// The job holding it.
        existing: JobId,
    },
    /// The job table holds as many unfinished jobs (or their bytes) as the limits allow.
    #[error("the job table is full: {open} unfinished jobs hold {bytes} bytes")]
    JobsFull {
        /// Unfinished jobs.
        open: u64,
        /// Their payload bytes.
        bytes: u64,
    },
    /// A new queue, and as many queues exist as the limits allow.
    #[error("{max} job queues exist already")]
    TooManyQueues {
        /// The limit.
        max: u32,
    },
    /// The job's options cannot be run (the text says what to change).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// No such job in the table (never enqueued, or dropped after it finished).
    #[error("no such job")]
    NoSuchJob,
    /// The job is not in a state the command applies to.
    #[error("the job is {}", state.name())]
    WrongJobState {
        /// Where it stands.
        state: JobState,
    },
    /// Other caps are in force for the queue.
    #[error("the queue has other caps in force: {existing:?}")]
    QueueCapsConflict {
        /// The caps in force.
        existing: QueueCaps,
    },
    /// The session is waited out by a newer process of its node and gets no work.
    #[error("the session is superseded by a newer process of its node")]
    Superseded,
    /// The schedule has as many pending ticks as it may hold.
    #[error("the schedule has {max} ticks pending already")]
    TooManyPending {
        /// The limit.
        max: u32,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::SessionOpened { session } => write!(f, "session {session} opened"),
            Outcome::WaitingForPrevious { session } => {
                write!(f, "waiting for session {session} of an earlier process to end")
            }
            Outcome::SessionEnded => f.write_str("session ended"),
            Outcome::Registered => f.write_str("registered"),
            Outcome::Unregistered => f.write_str("unregistered"),
            Outcome::Assigned { token } => write!(f, "assigned {token}"),
            Outcome::Released => f.write_str("released"),
            Outcome::MoveRequested => f.write_str("move requested"),
            Outcome::Sent { seq } => write!(f, "sent {seq}"),
            Outcome::Acked { head } => write!(f, "acked, head {head:?}"),
            Outcome::Rejected(r) => write!(f, "rejected: {r}"),
            Outcome::Stamped => f.write_str("stamped"),
            Outcome::Fired { run: Some(run), started } => {
                write!(f, "fired as run {run}{}", if *started { ", started" } else { "" })
            }
            Outcome::Fired { run: None, .. } => f.write_str("fired, skipped as an overlap"),
            Outcome::TicksSkipped => f.write_str("missed ticks skipped"),
            Outcome::TickStarted { attempt } => write!(f, "tick started, attempt {attempt}"),
            Outcome::TickExhausted { attempts } => {
                write!(f, "tick dropped after {attempts} interrupted runs")
            }
            Outcome::TickDone => f.write_str("tick done"),
            Outcome::ScheduleChanged { runs } => write!(f, "schedule changed, runs {runs:?}"),
            Outcome::Enqueued { job } => write!(f, "enqueued {job}"),
            Outcome::QueueConfigured => f.write_str("queue configured"),
            Outcome::Claimed { jobs } => write!(f, "claimed {} jobs", jobs.len()),
            Outcome::JobUpdated { state } => write!(f, "job {}", state.name()),
            Outcome::JobExtended => f.write_str("job extended"),
            Outcome::JobsPurged { count } => write!(f, "{count} jobs purged"),
        }
    }
}

/// Identifies the owner of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The owning session.
    pub session: SessionId,
    /// Its fencing token for this slot.
    pub token: Token,
    /// The leader asked the owner to hand the slot over (to spread keys): the owner stops
    /// its task, then releases the slot. Nobody else gets it before that release.
    pub moving: bool,
}

/// A queued message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its position in the key's queue.
    pub seq: Seq,
    /// Its body.
    pub payload: Payload,
}
