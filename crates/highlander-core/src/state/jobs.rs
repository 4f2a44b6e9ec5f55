//! The job table: a durable work queue whose jobs are claimed by sessions, fenced by claim
//! tokens, and retried when an attempt fails or its session ends.
//!
//! A job that is claimed belongs to the claiming session until the claim's token completes
//! or fails it, or the session ends (an expiry, or a new process on the same storage). There
//! is no rescue timer: a live worker is never raced by a second run of its job, and a dead
//! one's jobs are claimable again as soon as its session is expired (its TTL and margin).
//!
//! Indexes, per queue: `waiting` holds jobs whose `run_at` is after the table's clock (the
//! highest stamp a job command has seen, so due-ness never goes back), `ready` the due jobs
//! a claim may take in (priority, run_at, id) order. A partitioned job waits in its
//! partition's `due` set; only the partition's first job is in `ready`, and only while the
//! partition runs fewer jobs than its cap, so a claim never scans blocked partitions.

use super::{ClusterState, schedules::shorten};
use crate::command::{JobAction, JobSpec, JobState, Outcome, QueueCaps, Rejection};
use crate::{JobId, Key, Limits, Payload, RequestId, SessionId, Token};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The most jobs one `Claim` takes.
pub const MAX_CLAIM: u32 = 1024;
/// The most attempt errors a job keeps (the newest).
pub const MAX_JOB_ERRORS: usize = 8;

/// A job's place in `ready` and in its partition's `due` set.
type ReadyKey = (u8, u64, JobId);

/// One job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its queue.
    pub queue: Key,
    /// Its input.
    pub payload: Payload,
    /// Its options.
    pub spec: JobSpec,
    /// Where it stands.
    pub state: JobState,
    /// When it may run next (ms since the Unix epoch, the cluster's time of day).
    pub run_at_ms: u64,
    /// Attempts started (claims), counted from the last operator retry.
    pub attempt: u32,
    /// When it was enqueued.
    pub enqueued_ms: u64,
    /// While running: who runs it.
    pub claim: Option<JobClaim>,
    /// The newest attempt errors, oldest first.
    pub errors: Vec<JobError>,
    /// What the handler returned, once completed.
    pub result: Option<Payload>,
    /// When it finished (completed, dead or cancelled).
    pub finished_ms: Option<u64>,
    /// Its place in the order jobs finished in (0 while unfinished).
    pub finish_seq: u64,
}

impl Job {
    /// The bytes the job holds in the table: payload, result and error texts.
    pub fn bytes(&self) -> u64 {
        let errors: usize = self.errors.iter().map(|e| e.error.len()).sum();
        (self.payload.len() + self.result.as_ref().map_or(0, Payload::len) + errors) as u64
    }

    /// The state as a report shows it at `now_ms`: a scheduled or retryable job whose time
    /// has come is available.
    pub fn state_at(&self, now_ms: u64) -> JobState {
        match self.state {
            JobState::Scheduled | JobState::Retryable if self.run_at_ms <= now_ms => {
                JobState::Available
            }
            s => s,
        }
    }

    fn ready_key(&self) -> ReadyKey {
        (self.spec.priority, self.run_at_ms, self.id)
    }
}

/// Who runs a claimed job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobClaim {
    /// The claiming session.
    pub session: SessionId,
    /// The claim token: completion, failure and extension must carry it.
    pub token: Token,
    /// When the attempt was claimed.
    pub claimed_ms: u64,
    /// When its handler is cancelled if still running (the node enforces it).
    pub deadline_ms: u64,
    /// An operator cancelled the job: the node stops the handler, and the attempt's end
    /// leaves the job cancelled.
    pub cancel_requested: bool,
}

/// One failed attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// Which attempt.
    pub attempt: u32,
    /// What went wrong.
    pub error: String,
    /// When.
    pub at_ms: u64,
}

/// The jobs of one partition key of a queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Its due jobs, in claim order.
    pub due: BTreeSet<ReadyKey>,
    /// Its running jobs.
    pub running: u32,
    /// Which of its jobs is in the queue's `ready` set, if any.
    pub in_ready: Option<ReadyKey>,
}

/// One queue's indexes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobQueue {
    /// Its caps.
    pub caps: QueueCaps,
    /// Jobs whose `run_at` is after the table's clock, by (run_at, id).
    pub waiting: BTreeSet<(u64, JobId)>,
    /// Due jobs a claim may take, in claim order.
    pub ready: BTreeSet<ReadyKey>,
    /// Partitioned due jobs, and running counts, per partition key.
    pub partitions: BTreeMap<String, Partition>,
    /// Running jobs.
    pub running: BTreeSet<JobId>,
}

impl JobQueue {
    fn is_idle(&self) -> bool {
        self.caps == QueueCaps::default()
            && self.waiting.is_empty()
            && self.ready.is_empty()
            && self.partitions.is_empty()
            && self.running.is_empty()
    }

    /// Puts the partition's first due job in `ready` if the partition is below its cap, and
    /// takes it out otherwise.
    fn refresh_partition(&mut self, name: &str) {
        let cap = self.caps.per_partition.unwrap_or(u32::MAX);
        let Some(p) = self.partitions.get_mut(name) else { return };
        if let Some(old) = p.in_ready.take() {
            self.ready.remove(&old);
        }
        if p.running < cap
            && let Some(first) = p.due.first().copied()
        {
            self.ready.insert(first);
            p.in_ready = Some(first);
        }
        if p.due.is_empty() && p.running == 0 {
            self.partitions.remove(name);
        }
    }
}

/// The job table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTable {
    /// The last job id handed out.
    pub last_job: u64,
    /// The highest stamp a job command has seen: jobs are due when their `run_at` is at or
    /// before it.
    pub clock_ms: u64,
    /// Every job, finished ones within the retention bounds.
    pub jobs: BTreeMap<JobId, Job>,
    /// Per queue, its indexes.
    pub queues: BTreeMap<Key, JobQueue>,
    /// Unique keys held by unfinished jobs.
    pub unique: BTreeMap<(Key, String), JobId>,
    /// Unfinished jobs.
    pub open: u64,
    /// Their payload bytes.
    pub open_bytes: u64,
    /// The last finish sequence number handed out.
    pub last_finish: u64,
    /// Finished jobs in the order they finished, for retention.
    pub finished: BTreeMap<u64, JobId>,
    /// The bytes finished jobs hold.
    pub finished_bytes: u64,
}

impl JobTable {
    /// Whether a claim on `queue` at `now_ms` would find a job: a due job below the caps.
    pub fn has_claimable(&self, queue: &Key, now_ms: u64) -> bool {
        let Some(q) = self.queues.get(queue) else { return false };
        if q.caps.global.is_some_and(|cap| q.running.len() as u64 >= u64::from(cap)) {
            return false;
        }
        !q.ready.is_empty() || q.waiting.first().is_some_and(|(at, _)| *at <= now_ms)
    }

    /// When the queue's next waiting job falls due, if any waits.
    pub fn next_due(&self, queue: &Key) -> Option<u64> {
        self.queues.get(queue)?.waiting.first().map(|(at, _)| *at)
    }

    /// Moves the queue's jobs whose time has come from `waiting` to the due indexes.
    fn promote(&mut self, queue: &Key) {
        let clock = self.clock_ms;
        let Some(q) = self.queues.get_mut(queue) else { return };
        while let Some(&(at, id)) = q.waiting.first() {
            if at > clock {
                break;
            }
            q.waiting.pop_first();
            if let Some(job) = self.jobs.get(&id) {
                Self::make_due(q, job);
            }
        }
    }

    fn make_due(q: &mut JobQueue, job: &Job) {
        match &job.spec.partition {
            None => {
                q.ready.insert(job.ready_key());
            }
            Some(name) => {
                q.partitions.entry(name.clone()).or_default().due.insert(job.ready_key());
                q.refresh_partition(name);
            }
        }
    }

    /// Indexes a job that waits to run (scheduled, available or retryable).
    fn index_waiting(&mut self, id: JobId) {
        let clock = self.clock_ms;
        let Some(job) = self.jobs.get(&id) else { return };
        let q = self.queues.entry(job.queue.clone()).or_default();
        if job.run_at_ms > clock {
            q.waiting.insert((job.run_at_ms, id));
        } else {
            Self::make_due(q, job);
        }
    }

    /// Takes a waiting job out of the indexes.
    fn unindex_waiting(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else { return };
        let Some(q) = self.queues.get_mut(&job.queue) else { return };
        q.waiting.remove(&(job.run_at_ms, id));
        let key = job.ready_key();
        q.ready.remove(&key);
        if let Some(name) = &job.spec.partition
            && let Some(p) = q.partitions.get_mut(name)
        {
            p.due.remove(&key);
            if p.in_ready == Some(key) {
                p.in_ready = None;
            }
            q.refresh_partition(name);
        }
    }

    fn drop_queue_if_idle(&mut self, queue: &Key) {
        if self.queues.get(queue).is_some_and(JobQueue::is_idle) {
            self.queues.remove(queue);
        }
    }

    /// Records a job as finished, for retention.
    fn mark_finished(&mut self, id: JobId, state: JobState) {
        let clock = self.clock_ms;
        let Some(job) = self.jobs.get_mut(&id) else { return };
        job.state = state;
        job.claim = None;
        job.finished_ms = Some(clock);
        self.last_finish += 1;
        job.finish_seq = self.last_finish;
        self.open -= 1;
        self.open_bytes -= job.payload.len() as u64;
        if let Some(u) = &job.spec.unique {
            self.unique.remove(&(job.queue.clone(), u.clone()));
        }
        self.finished.insert(self.last_finish, id);
        self.finished_bytes += job.bytes();
        let queue = job.queue.clone();
        self.drop_queue_if_idle(&queue);
    }

    /// Drops a finished job from the table.
    fn drop_finished(&mut self, id: JobId) {
        if let Some(job) = self.jobs.remove(&id)
            && job.state.is_finished()
        {
            self.finished.remove(&job.finish_seq);
            self.finished_bytes -= job.bytes();
        }
    }

    /// Drops the oldest finished jobs beyond the retention bounds.
    fn prune(&mut self, limits: &Limits) {
        while let Some((_, &id)) = self.finished.first_key_value() {
            let at = self.jobs.get(&id).and_then(|j| j.finished_ms).unwrap_or(0);
            let over = self.finished.len() as u64 > u64::from(limits.keep_finished_jobs)
                || self.finished_bytes > limits.keep_finished_job_bytes
                || at.saturating_add(limits.keep_finished_job_ms) < self.clock_ms;
            if !over {
                break;
            }
            self.drop_finished(id);
        }
    }
}

impl ClusterState {
    /// Reads the entry's stamp into the job table's clock, which never goes back.
    fn job_clock(&mut self) -> Option<u64> {
        let stamp = self.entry_stamp?;
        self.jobs.clock_ms = self.jobs.clock_ms.max(stamp);
        Some(self.jobs.clock_ms)
    }

    pub(super) fn enqueue_job(
        &mut self,
        queue: &Key,
        payload: &Payload,
        spec: &JobSpec,
        request: RequestId,
        floor: u64,
    ) -> Outcome {
        let Some(now) = self.job_clock() else { return Outcome::Rejected(Rejection::Unstamped) };
        self.deduplicated(request, floor, |state| state.add_job(queue, payload, spec, now))
    }

    fn add_job(&mut self, queue: &Key, payload: &Payload, spec: &JobSpec, now: u64) -> Outcome {
        let limits = self.limits.unwrap_or_default();
        if let Err(e) = spec.validate() {
            return Outcome::Rejected(Rejection::InvalidJob(e));
        }
        let size = payload.len() as u64;
        if size > u64::from(limits.max_payload_bytes) {
            return Outcome::Rejected(Rejection::PayloadTooLarge {
                size,
                max: u64::from(limits.max_payload_bytes),
            });
        }
        let jobs = &mut self.jobs;
        if let Some(u) = &spec.unique
            && let Some(existing) = jobs.unique.get(&(queue.clone(), u.clone()))
        {
            return Outcome::Rejected(Rejection::DuplicateJob { existing: *existing });
        }
        if !jobs.queues.contains_key(queue)
            && jobs.queues.len() as u64 >= u64::from(limits.max_job_queues)
        {
            return Outcome::Rejected(Rejection::TooManyQueues { max: limits.max_job_queues });
        }
        if jobs.open >= u64::from(limits.max_open_jobs)
            || jobs.open_bytes + size > limits.max_open_job_bytes
        {
            return Outcome::Rejected(Rejection::JobsFull {
                open: jobs.open,
                bytes: jobs.open_bytes,
            });
        }
        jobs.last_job += 1;
        let id = JobId(jobs.last_job);
        let run_at_ms = spec.run_at_ms.unwrap_or(now);
        let state = if run_at_ms > now { JobState::Scheduled } else { JobState::Available };
        if let Some(u) = &spec.unique {
            jobs.unique.insert((queue.clone(), u.clone()), id);
        }
        jobs.open += 1;
        jobs.open_bytes += size;
        jobs.jobs.insert(
            id,
            Job {
                id,
                queue: queue.clone(),
                payload: payload.clone(),
                spec: spec.clone(),
                state,
                run_at_ms,
                attempt: 0,
                enqueued_ms: now,
                claim: None,
                errors: Vec::new(),
                result: None,
                finished_ms: None,
                finish_seq: 0,
            },
        );
        jobs.index_waiting(id);
        jobs.prune(&limits);
        Outcome::Enqueued { job: id }
    }

    pub(super) fn configure_queue(&mut self, queue: &Key, caps: QueueCaps, force: bool) -> Outcome {
        let limits = self.limits.unwrap_or_default();
        let jobs = &mut self.jobs;
        match jobs.queues.get(queue) {
            Some(q) if q.caps == caps => return Outcome::QueueConfigured,
            Some(q) if !force && q.caps != QueueCaps::default() => {
                return Outcome::Rejected(Rejection::QueueCapsConflict { existing: q.caps });
            }
            None if jobs.queues.len() as u64 >= u64::from(limits.max_job_queues) => {
                return Outcome::Rejected(Rejection::TooManyQueues { max: limits.max_job_queues });
            }
            _ => {}
        }
        let q = jobs.queues.entry(queue.clone()).or_default();
        q.caps = caps;
        let names: Vec<String> = q.partitions.keys().cloned().collect();
        for name in names {
            q.refresh_partition(&name);
        }
        jobs.drop_queue_if_idle(queue);
        Outcome::QueueConfigured
    }

    pub(super) fn claim_jobs(
        &mut self,
        queue: &Key,
        session: SessionId,
        limit: u32,
        timeout_ms: u64,
    ) -> Outcome {
        let Some(now) = self.job_clock() else { return Outcome::Rejected(Rejection::Unstamped) };
        let Some(s) = self.sessions.get(&session) else {
            return Outcome::Rejected(Rejection::NoSuchSession);
        };
        if self.is_superseded(session) {
            return Outcome::Rejected(Rejection::Superseded);
        }
        let mine = s.jobs.get(queue).map_or(0, BTreeSet::len);
        let mut room = limit.min(MAX_CLAIM).saturating_sub(mine as u32);
        self.jobs.promote(queue);
        let mut claimed = Vec::new();
        let Some(q) = self.jobs.queues.get_mut(queue) else {
            return Outcome::Claimed { jobs: claimed };
        };
        if let Some(cap) = q.caps.global {
            room = room.min(cap.saturating_sub(q.running.len() as u32));
        }
        while room > 0 {
            let Some(key @ (_, _, id)) = q.ready.pop_first() else { break };
            let Some(job) = self.jobs.jobs.get_mut(&id) else { continue };
            if let Some(name) = &job.spec.partition
                && let Some(p) = q.partitions.get_mut(name)
            {
                p.due.remove(&key);
                p.in_ready = None;
                p.running += 1;
                q.refresh_partition(name);
            }
            self.last_token += 1;
            let token = Token(self.last_token);
            job.state = JobState::Running;
            job.attempt += 1;
            job.claim = Some(JobClaim {
                session,
                token,
                claimed_ms: now,
                deadline_ms: now.saturating_add(job.spec.timeout_ms.unwrap_or(timeout_ms)),
                cancel_requested: false,
            });
            q.running.insert(id);
            claimed.push((id, token));
            room -= 1;
        }
        if let Some(s) = self.sessions.get_mut(&session)
            && !claimed.is_empty()
        {
            s.jobs.entry(queue.clone()).or_default().extend(claimed.iter().map(|(id, _)| *id));
        }
        Outcome::Claimed { jobs: claimed }
    }

    /// The running job `id` if `token` is its claim token.
    fn claimed_job(&self, id: JobId, token: Token) -> Result<&Job, Rejection> {
        let job = self.jobs.jobs.get(&id).ok_or(Rejection::NoSuchJob)?;
        match job.claim {
            Some(c) if c.token == token => Ok(job),
            _ => Err(Rejection::StaleToken),
        }
    }

    pub(super) fn complete_job(
        &mut self,
        id: JobId,
        token: Token,
        result: &Option<Payload>,
    ) -> Outcome {
        let Some(_) = self.job_clock() else { return Outcome::Rejected(Rejection::Unstamped) };
        if let Err(r) = self.claimed_job(id, token) {
            return Outcome::Rejected(r);
        }
        let limits = self.limits.unwrap_or_default();
        if let Some(r) = result
            && r.len() as u64 > u64::from(limits.max_job_result_bytes)
        {
            return Outcome::Rejected(Rejection::PayloadTooLarge {
                size: r.len() as u64,
                max: u64::from(limits.max_job_result_bytes),
            });
        }
        self.end_attempt(id);
        if let Some(job) = self.jobs.jobs.get_mut(&id) {
            job.result = result.clone();
        }
        self.jobs.mark_finished(id, JobState::Completed);
        self.jobs.prune(&limits);
        Outcome::JobUpdated { state: JobState::Completed }
    }

    pub(super) fn fail_job(
        &mut self,
        id: JobId,
        token: Token,
        error: &str,
        retry_at_ms: u64,
        discard: bool,
        interrupted: bool,
    ) -> Outcome {
        let Some(_) = self.job_clock() else { return Outcome::Rejected(Rejection::Unstamped) };
        if let Err(r) = self.claimed_job(id, token) {
            return Outcome::Rejected(r);
        }
        let mut retry_at_ms = retry_at_ms;
        if interrupted && let Some(job) = self.jobs.jobs.get_mut(&id) {
            // Not the job's fault: the attempt is given back, and the job keeps its place
            // in line (its earlier run-at) instead of queueing behind newer jobs.
            job.attempt = job.attempt.saturating_sub(1);
            retry_at_ms = retry_at_ms.min(job.run_at_ms);
        }
        let state = self.attempt_failed(id, error, retry_at_ms, discard);
        self.jobs.prune(&self.limits.unwrap_or_default());
        Outcome::JobUpdated { state }
    }

    /// Ends a running job's attempt as failed: the job is cancelled (if asked), dead (out of
    /// attempts, or discarded) or retryable at `retry_at_ms`.
    fn attempt_failed(
        &mut self,
        id: JobId,
        error: &str,
        retry_at_ms: u64,
        discard: bool,
    ) -> JobState {
        let now = self.jobs.clock_ms;
        let cancelled = self.end_attempt(id);
        let Some(job) = self.jobs.jobs.get_mut(&id) else { return JobState::Dead };
        job.errors.push(JobError { attempt: job.attempt, error: shorten(error), at_ms: now });
        if job.errors.len() > MAX_JOB_ERRORS {
            job.errors.remove(0);
        }
        let state = if cancelled {
            JobState::Cancelled
        } else if discard || job.attempt >= job.spec.max_attempts {
            JobState::Dead
        } else {
            JobState::Retryable
        };
        if state.is_finished() {
            self.jobs.mark_finished(id, state);
        } else {
            job.state = state;
            job.run_at_ms = retry_at_ms;
            self.jobs.index_waiting(id);
        }
        state
    }

    /// Takes a running job off its session and the running indexes; returns whether an
    /// operator asked to cancel it.
    fn end_attempt(&mut self, id: JobId) -> bool {
        let Some(job) = self.jobs.jobs.get_mut(&id) else { return false };
        let Some(claim) = job.claim.take() else { return false };
        if let Some(s) = self.sessions.get_mut(&claim.session)
            && let Some(set) = s.jobs.get_mut(&job.queue)
        {
            set.remove(&id);
            if set.is_empty() {
                s.jobs.remove(&job.queue);
            }
        }
        if let Some(q) = self.jobs.queues.get_mut(&job.queue) {
            q.running.remove(&id);
            if let Some(name) = &job.spec.partition {
                let p = q.partitions.entry(name.clone()).or_default();
                p.running = p.running.saturating_sub(1);
                q.refresh_partition(name);
            }
        }
        claim.cancel_requested
    }

    /// The session's running jobs lost their owner (the session ended): each is claimable
    /// again at once, in its old place in line (its run-at), with the attempt counted (or
    /// dead, or cancelled).
    pub(super) fn jobs_lost(&mut self, jobs: &BTreeSet<JobId>, why: &str) {
        for id in jobs {
            let at = self.jobs.jobs.get(id).map_or(self.jobs.clock_ms, |j| j.run_at_ms);
            self.attempt_failed(*id, why, at, false);
        }
        self.jobs.prune(&self.limits.unwrap_or_default());
    }

    pub(super) fn extend_job(&mut self, id: JobId, token: Token, deadline_ms: u64) -> Outcome {
        if let Err(r) = self.claimed_job(id, token) {
            return Outcome::Rejected(r);
        }
        if let Some(c) = self.jobs.jobs.get_mut(&id).and_then(|j| j.claim.as_mut()) {
            c.deadline_ms = deadline_ms;
        }
        Outcome::JobExtended
    }

    pub(super) fn job_control(
        &mut self,
        id: JobId,
        action: JobAction,
        request: RequestId,
        floor: u64,
    ) -> Outcome {
        let Some(now) = self.job_clock() else { return Outcome::Rejected(Rejection::Unstamped) };
        self.deduplicated(request, floor, |state| state.control_job(id, action, now))
    }

    fn control_job(&mut self, id: JobId, action: JobAction, now: u64) -> Outcome {
        let limits = self.limits.unwrap_or_default();
        let Some(job) = self.jobs.jobs.get_mut(&id) else {
            return Outcome::Rejected(Rejection::NoSuchJob);
        };
        let state = job.state;
        match (action, state) {
            (JobAction::Cancel, JobState::Running) => {
                if let Some(c) = job.claim.as_mut() {
                    c.cancel_requested = true;
                }
                Outcome::JobUpdated { state }
            }
            (JobAction::Cancel, s) if !s.is_finished() => {
                self.jobs.unindex_waiting(id);
                self.jobs.mark_finished(id, JobState::Cancelled);
                self.jobs.prune(&limits);
                Outcome::JobUpdated { state: JobState::Cancelled }
            }
            (JobAction::Retry, JobState::Dead | JobState::Cancelled) => {
                let (queue, unique, size) =
                    (job.queue.clone(), job.spec.unique.clone(), job.payload.len() as u64);
                let jobs = &self.jobs;
                if let Some(u) = unique
                    && let Some(existing) = jobs.unique.get(&(queue.clone(), u))
                {
                    return Outcome::Rejected(Rejection::DuplicateJob { existing: *existing });
                }
                if !jobs.queues.contains_key(&queue)
                    && jobs.queues.len() as u64 >= u64::from(limits.max_job_queues)
                {
                    return Outcome::Rejected(Rejection::TooManyQueues {
                        max: limits.max_job_queues,
                    });
                }
                if jobs.open >= u64::from(limits.max_open_jobs)
                    || jobs.open_bytes + size > limits.max_open_job_bytes
                {
                    return Outcome::Rejected(Rejection::JobsFull {
                        open: jobs.open,
                        bytes: jobs.open_bytes,
                    });
                }
                let jobs = &mut self.jobs;
                let Some(job) = jobs.jobs.get_mut(&id) else {
                    return Outcome::Rejected(Rejection::NoSuchJob);
                };
                job.finished_ms = None;
                jobs.finished.remove(&job.finish_seq);
                job.finish_seq = 0;
                jobs.finished_bytes -= job.bytes();
                job.state = JobState::Available;
                job.attempt = 0;
                job.run_at_ms = now;
                job.result = None;
                if let Some(u) = &job.spec.unique {
                    jobs.unique.insert((queue, u.clone()), id);
                }
                jobs.open += 1;
                jobs.open_bytes += size;
                jobs.index_waiting(id);
                Outcome::JobUpdated { state: JobState::Available }
            }
            (JobAction::Discard, s) if s.is_finished() => {
                self.jobs.drop_finished(id);
                Outcome::JobsPurged { count: 1 }
            }
            (_, state) => Outcome::Rejected(Rejection::WrongJobState { state }),
        }
    }

    pub(super) fn purge_jobs(
        &mut self,
        queue: &Option<Key>,
        state: JobState,
        request: RequestId,
        floor: u64,
    ) -> Outcome {
        self.deduplicated(request, floor, |s| {
            if !state.is_finished() {
                return Outcome::Rejected(Rejection::WrongJobState { state });
            }
            let ids: Vec<JobId> = s
                .jobs
                .finished
                .values()
                .copied()
                .filter(|id| {
                    s.jobs.jobs.get(id).is_some_and(|j| {
                        j.state == state && queue.as_ref().is_none_or(|q| *q == j.queue)
                    })
                })
                .collect();
            for id in &ids {
                s.jobs.drop_finished(*id);
            }
            Outcome::JobsPurged { count: ids.len() as u64 }
        })
    }

    /// Checks the job table's indexes against its jobs. Part of
    /// [`check_consistency`](ClusterState::check_consistency).
    pub(super) fn check_jobs(&self) -> Result<(), String> {
        let t = &self.jobs;
        let (mut open, mut open_bytes, mut finished_bytes) = (0u64, 0u64, 0u64);
        let mut unique = BTreeMap::new();
        for (id, job) in &t.jobs {
            if job.id != *id || id.0 > t.last_job {
                return Err(format!("job {id}: id disagrees with its record or the counter"));
            }
            let q = t.queues.get(&job.queue);
            if job.state.is_finished() {
                finished_bytes += job.bytes();
                if job.claim.is_some() || t.finished.get(&job.finish_seq) != Some(id) {
                    return Err(format!("job {id}: finished but claimed or not indexed"));
                }
                continue;
            }
            open += 1;
            open_bytes += job.payload.len() as u64;
            if let Some(u) = &job.spec.unique
                && unique.insert((job.queue.clone(), u.clone()), *id).is_some()
            {
                return Err(format!("job {id}: unique key held twice"));
            }
            let Some(q) = q else { return Err(format!("job {id}: its queue has no index")) };
            let key = job.ready_key();
            let waiting = q.waiting.contains(&(job.run_at_ms, *id));
            let due = match &job.spec.partition {
                None => q.ready.contains(&key),
                Some(name) => q.partitions.get(name).is_some_and(|p| p.due.contains(&key)),
            };
            match (job.state, &job.claim) {
                (JobState::Running, Some(c)) => {
                    if waiting || due || !q.running.contains(id) {
                        return Err(format!("job {id}: running but indexed as waiting"));
                    }
                    let listed = self.sessions.get(&c.session).and_then(|s| s.jobs.get(&job.queue));
                    if !listed.is_some_and(|ids| ids.contains(id)) {
                        return Err(format!("job {id}: its claim's session is gone"));
                    }
                    if c.token.0 > self.last_token {
                        return Err(format!("job {id}: claim token beyond the counter"));
                    }
                }
                (JobState::Running, None) | (_, Some(_)) => {
                    return Err(format!("job {id}: state and claim disagree"));
                }
                _ => {
                    if waiting == due {
                        return Err(format!("job {id}: waiting {waiting} and due {due}"));
                    }
                    // Waiting jobs are promoted lazily; a due one was due when indexed.
                    if due && job.run_at_ms > t.clock_ms {
                        return Err(format!("job {id}: due before its time"));
                    }
                }
            }
        }
        if open != t.open || open_bytes != t.open_bytes || finished_bytes != t.finished_bytes {
            return Err("job counters disagree with the table".into());
        }
        if unique != t.unique {
            return Err("unique keys disagree with the table".into());
        }
        if t.finished.len() != t.jobs.values().filter(|j| j.state.is_finished()).count() {
            return Err("finished index names missing jobs".into());
        }
        for (name, q) in &t.queues {
            let running =
                t.jobs.values().filter(|j| &j.queue == name && j.state == JobState::Running);
            if running.count() != q.running.len() {
                return Err(format!("queue {name}: running index disagrees"));
            }
            let cap = q.caps.per_partition.unwrap_or(u32::MAX);
            let mut in_ready = 0;
            for (pname, p) in &q.partitions {
                let n = q
                    .running
                    .iter()
                    .filter(|id| t.jobs[id].spec.partition.as_deref() == Some(pname.as_str()))
                    .count();
                if n as u32 != p.running {
                    return Err(format!("queue {name} partition {pname}: running count"));
                }
                let expect = if p.running < cap { p.due.first().copied() } else { None };
                if p.in_ready != expect || expect.is_some_and(|k| !q.ready.contains(&k)) {
                    return Err(format!("queue {name} partition {pname}: head not in ready"));
                }
                in_ready += usize::from(p.in_ready.is_some());
            }
            let plain = q.ready.iter().filter(|(_, _, id)| t.jobs[id].spec.partition.is_none());
            if plain.count() + in_ready != q.ready.len() {
                return Err(format!("queue {name}: ready holds a job twice or a stray"));
            }
        }
        for s in self.sessions.values() {
            for (queue, ids) in &s.jobs {
                if ids.is_empty() {
                    return Err(format!("session {} keeps an empty job set", s.id));
                }
                for id in ids {
                    let Some(j) = t.jobs.get(id) else {
                        return Err(format!("session {} lists missing job {id}", s.id));
                    };
                    if j.claim.map(|c| c.session) != Some(s.id) || &j.queue != queue {
                        return Err(format!("session {} lists job {id} it does not run", s.id));
                    }
                }
            }
        }
        Ok(())
    }
}
