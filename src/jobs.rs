//! Jobs: a durable work queue on the cluster. Enqueue from any node; workers on the nodes
//! that run a queue claim due jobs for their session, run them, and complete or fail each
//! with its claim token.
//!
//! The job table lives in the replicated state (`highlander-core`, `state::jobs`). A claimed
//! job belongs to the claiming session, so when a node dies its jobs are claimable again as
//! soon as its session expires (TTL + margin), and never while it lives. Like a task, a
//! job's handler is stopped before its node's lease runs out: cancelled one stop grace
//! before the lease deadline and aborted at it, so it has stopped before the job can be
//! claimed again elsewhere. Handlers are also stopped at the job's own deadline (its
//! timeout, extendable), when an operator cancels the job, and when the node shuts down.
//!
//! Each worker is one loop per queue on this node: it claims as many jobs as it has room
//! for in one `Claim`, starts their handlers from the applied state, and writes completions
//! and failures in batches.

use crate::error::Error;
use crate::node::{Node, Shared, outcome_error, write_error};
use crate::proposer::WriteError;
use crate::session;
use crate::task::Lease;
use crate::watchdog::Watched;
use highlander_core::wire::{JobReport, JobsReply, JobsRequest, QueueReport};
use highlander_core::{
    Command, IntoKey, JobAction, JobId, JobSpec, JobState, Key, NodeId, Outcome, Payload,
    QueueCaps, Rejection, RequestId, SessionId, Token,
};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, warn};

/// The timeout of a job enqueued without one, unless its worker says otherwise: 30 minutes.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How many completions and failures a worker writes in one go at most.
const REPORT_BATCH: usize = 1024;
/// After a claim that found nothing, the next waits at least this long (doubling to 16×).
const EMPTY_CLAIM_PAUSE: Duration = Duration::from_millis(10);

/// How a job is enqueued. The defaults: priority 0 (runs first), now, 25 attempts, the
/// worker's timeout, no unique or partition key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnqueueOptions {
    spec: JobSpec,
    delay: Option<Duration>,
}

impl EnqueueOptions {
    /// The defaults.
    pub fn new() -> EnqueueOptions {
        EnqueueOptions::default()
    }

    /// 0 (runs first, the default) to 9 (runs last); first in, first out within one.
    pub fn priority(mut self, priority: u8) -> Self {
        self.spec.priority = priority;
        self
    }

    /// Not before this time of day (judged by the cluster's clock, the median of the
    /// nodes' wall clocks).
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.spec.run_at_ms = Some(system_ms(at));
        self.delay = None;
        self
    }

    /// Not before `delay` from now (the cluster's time of day when the node enqueues).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// How many attempts the job gets before it is dead (default 25; at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.spec.max_attempts = attempts;
        self
    }

    /// How long one attempt may run before its handler is cancelled (default: the worker's
    /// timeout). Never clamped: what you give is what the worker honours.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.spec.timeout_ms = Some(timeout.as_millis().max(1) as u64);
        self
    }

    /// While an unfinished job of the queue (scheduled, available, running or retryable)
    /// holds this key, another enqueue with it is refused with [`Error::DuplicateJob`],
    /// which names the job holding it. Exact: enforced by the replicated state machine.
    pub fn unique(mut self, key: impl Into<String>) -> Self {
        self.spec.unique = Some(key.into());
        self
    }

    /// Jobs with one partition key count against the queue's per-partition cap (one at a
    /// time per tenant, say).
    pub fn partition(mut self, key: impl Into<String>) -> Self {
        self.spec.partition = Some(key.into());
        self
    }
}

/// How long to wait before the next attempt of a failed job, given the attempt that failed
/// (from 1). Computed by the failing node and stored as an absolute time.
pub type Backoff = Arc<dyn Fn(u32) -> Duration + Send + Sync>;

/// The default backoff: attempt⁴ + 15 s, ± 10 % (deterministic per job and attempt).
pub fn default_backoff(job: JobId, attempt: u32) -> Duration {
    let base = u64::from(attempt).saturating_pow(4).saturating_add(15).saturating_mul(1000);
    // ±10 % from a hash of the job and the attempt: spread, and the same on a retried write.
    let h = (job.0 ^ (u64::from(attempt) << 48)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let permille = (h % 201) as i64 - 100;
    let jitter = base as i64 / 1000 * permille;
    Duration::from_millis((base as i64 + jitter).max(0) as u64)
}

/// How a node runs a queue's jobs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Jobs of the queue this node runs at once (default 10).
    pub concurrency: u32,
    /// The most jobs of the queue running at once across the cluster (default none). Every
    /// worker of a queue must give the same caps, or none.
    pub global_cap: Option<u32>,
    /// The most jobs with one partition key running at once across the cluster.
    pub partition_cap: Option<u32>,
    /// The timeout of jobs enqueued without one (default 30 minutes).
    pub timeout: Duration,
    /// The wait before a failed job's next attempt (default [`default_backoff`]); `None`
    /// uses the default.
    pub backoff: Option<Backoff>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 10,
            global_cap: None,
            partition_cap: None,
            timeout: DEFAULT_JOB_TIMEOUT,
            backoff: None,
        }
    }
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("concurrency", &self.concurrency)
            .field("global_cap", &self.global_cap)
            .field("partition_cap", &self.partition_cap)
            .field("timeout", &self.timeout)
            .field("backoff", &self.backoff.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl WorkerOptions {
    /// `concurrency` jobs at once on this node.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// At most `n` jobs of the queue at once across the cluster.
    pub fn global_cap(mut self, n: u32) -> Self {
        self.global_cap = Some(n);
        self
    }

    /// At most `n` jobs per partition key at once across the cluster.
    pub fn partition_cap(mut self, n: u32) -> Self {
        self.partition_cap = Some(n);
        self
    }

    /// The timeout of jobs enqueued without one.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The wait before a failed job's next attempt.
    pub fn backoff(mut self, backoff: impl Fn(u32) -> Duration + Send + Sync + 'static) -> Self {
        self.backoff = Some(Arc::new(backoff));
        self
    }

    fn caps(&self) -> QueueCaps {
        QueueCaps { global: self.global_cap, per_partition: self.partition_cap }
    }

    fn validate(&self) -> Result<(), Error> {
        let max = highlander_core::state::MAX_CLAIM;
        if self.concurrency == 0 || self.concurrency > max {
            return Err(Error::InvalidJob(format!("concurrency must be 1 to {max}")));
        }
        if self.global_cap == Some(0) || self.partition_cap == Some(0) {
            return Err(Error::InvalidJob("a cap of 0 would run nothing".into()));
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidJob("the timeout must be above zero".into()));
        }
        Ok(())
    }
}

/// What a job's handler sees: one attempt of one job.
///
/// Check [`still_owner`](Self::still_owner), or pass [`token`](Self::token) downstream as an
/// idempotency key or fencing token, before a side effect that must not happen twice: a job
/// runs at least once, and a process pause can outlast any lease.
pub struct JobContext {
    id: JobId,
    queue: Key,
    attempt: u32,
    max_attempts: u32,
    token: Token,
    payload: Payload,
    node: NodeId,
    session: SessionId,
    cancel: watch::Receiver<bool>,
    /// The job's deadline on the lease clock, which `extend` moves.
    deadline: Arc<watch::Sender<Instant>>,
    shared: Arc<Shared>,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// Its queue.
    pub fn queue(&self) -> &Key {
        &self.queue
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many attempts the job may have.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The claim token of this attempt: larger than every earlier claim's and every earlier
    /// ownership's in the cluster. Use it as an idempotency key or fencing token downstream.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The node running the attempt.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The job's input.
    pub fn payload(&self) -> &Payload {
        &self.payload
    }

    /// The input decoded from JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.payload.as_bytes())
    }

    /// The input decoded from bincode (as [`encode_bincode`] wrote it).
    pub fn bincode<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<T, highlander_core::codec::CodecError> {
        highlander_core::codec::decode(self.payload.as_bytes())
    }

    /// Whether the attempt has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the attempt is asked to stop: an operator cancelled the job, its
    /// deadline passed, the node's lease is about to lapse, or the node shuts down. The
    /// handler is aborted if it has not returned by the end of the stop grace.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Whether the node still holds a valid lease for this claim and the attempt has not
    /// been asked to stop. Cheap (local state only): call it right before a side effect.
    pub fn still_owner(&self) -> bool {
        !self.is_cancelled() && self.shared.lease().valid_at(self.session, self.shared.clock.now())
    }

    /// How long until the attempt's deadline.
    pub fn time_left(&self) -> Duration {
        self.deadline.borrow().saturating_duration_since(self.shared.clock.now())
    }

    /// Moves the attempt's deadline to `by` from now, once the cluster has recorded it
    /// (never clamped). Fails if the claim is no longer this attempt's (the job was
    /// cancelled and ended, or the node lost its session).
    pub async fn extend(&self, by: Duration) -> Result<(), Error> {
        let deadline_ms = self.shared.cluster_clock.now_ms().saturating_add(by.as_millis() as u64);
        let local = self.shared.clock.now() + by;
        let command = Command::ExtendJob { job: self.id, token: self.token, deadline_ms };
        match self.shared.proposer.write_one(command).await {
            Ok(Outcome::JobExtended) => {
                self.deadline.send_replace(local);
                Ok(())
            }
            Ok(other) => Err(outcome_error(&self.queue, other)),
            Err(e) => Err(write_error(e)),
        }
    }
}

/// Encodes a value as JSON, for [`Node::enqueue`] and [`JobContext::json`].
pub fn encode_json<T: serde::Serialize>(value: &T) -> Result<Payload, serde_json::Error> {
    serde_json::to_vec(value).map(Payload::from)
}

/// Encodes a value with bincode, for [`Node::enqueue`] and [`JobContext::bincode`].
pub fn encode_bincode<T: serde::Serialize>(
    value: &T,
) -> Result<Payload, highlander_core::codec::CodecError> {
    highlander_core::codec::encode(value).map(Payload::from)
}

/// Why an attempt failed, as a handler returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFailure {
    error: String,
    discard: bool,
}

impl JobFailure {
    /// A failure the job is retried after (if it has attempts left).
    pub fn retry(error: impl Display) -> JobFailure {
        JobFailure { error: error.to_string(), discard: false }
    }

    /// A failure no retry can fix: the job is dead at once.
    pub fn discard(error: impl Display) -> JobFailure {
        JobFailure { error: error.to_string(), discard: true }
    }
}

impl<E: Display> From<E> for JobFailure {
    fn from(e: E) -> JobFailure {
        JobFailure::retry(e)
    }
}

/// What a job handler may return: `Result<T, E>` where `T` is `()`, a [`Payload`], bytes,
/// a string or an `Option` of a payload (the job's small result), and `E` displays (any
/// error; the attempt is retried) or is a [`JobFailure`].
pub trait JobResult: Send + 'static {
    /// The result, or why the attempt failed.
    fn into_result(self) -> Result<Option<Payload>, JobFailure>;
}

/// A handler's success value: the job's optional result.
pub trait JobOutput: Send + 'static {
    /// As a payload.
    fn into_payload(self) -> Option<Payload>;
}

impl JobOutput for () {
    fn into_payload(self) -> Option<Payload> {
        None
    }
}
impl JobOutput for Payload {
    fn into_payload(self) -> Option<Payload> {
        Some(self)
    }
}
impl JobOutput for Option<Payload> {
    fn into_payload(self) -> Option<Payload> {
        self
    }
}
impl JobOutput for Vec<u8> {
    fn into_payload(self) -> Option<Payload> {
        Some(Payload::from(self))
    }
}
impl JobOutput for String {
    fn into_payload(self) -> Option<Payload> {
        Some(Payload::from(self.into_bytes()))
    }
}

impl<T: JobOutput, E: Into<JobFailure> + Send + 'static> JobResult for Result<T, E> {
    fn into_result(self) -> Result<Option<Payload>, JobFailure> {
        self.map(JobOutput::into_payload).map_err(Into::into)
    }
}

/// The results of one handler call: per job, its result or failure.
type Results = Vec<(JobId, Result<Option<Payload>, JobFailure>)>;
/// A handler, boxed: called with the jobs of one call (one, or a batch).
type BoxedJobs =
    Arc<dyn Fn(Vec<JobContext>) -> highlander_core::BoxFuture<'static, Results> + Send + Sync>;

impl Node {
    /// Enqueues a job from any node. Returns its id once it is committed on a quorum: from
    /// then on it runs at least once on a worker of `queue` (until it completes, or is dead
    /// after its attempts, or cancelled), across crashes and leader changes.
    ///
    /// Fails with a typed error, having enqueued nothing, when the payload is too large,
    /// the table is full, the queue would be one too many, or (with a unique key) an
    /// unfinished job holds the key. [`Error::Timeout`] means the outcome is unknown; a
    /// retry with the same unique key cannot enqueue it twice.
    pub async fn enqueue(
        &self,
        queue: impl IntoKey,
        payload: impl Into<Payload>,
    ) -> Result<JobId, Error> {
        self.enqueue_with(queue, payload, EnqueueOptions::default()).await
    }

    /// [`enqueue`](Self::enqueue) with options: priority, run-at or delay, attempts,
    /// timeout, unique and partition keys.
    pub async fn enqueue_with(
        &self,
        queue: impl IntoKey,
        payload: impl Into<Payload>,
        options: EnqueueOptions,
    ) -> Result<JobId, Error> {
        enqueue(self.shared(), queue.into_key()?, payload.into(), options).await
    }

    /// Runs `handler` for jobs of `queue` on this node, `options.concurrency` at a time.
    /// The handler returns `Ok` (with an optional small result) to complete the job, or an
    /// error to fail the attempt (retried after the backoff while attempts remain).
    ///
    /// Returns once the worker runs (and, with caps, once they are in force). One worker
    /// per queue per node.
    ///
    /// ```no_run
    /// # async fn demo(node: highlander::Node) -> Result<(), highlander::Error> {
    /// use highlander::WorkerOptions;
    /// node.worker("mail", WorkerOptions::default().concurrency(4), |ctx| async move {
    ///     let to: String = ctx.json()?;
    ///     println!("mail to {to}, attempt {} (idempotency key {})", ctx.attempt(), ctx.token());
    ///     Ok::<_, serde_json::Error>(())
    /// })
    /// .await?;
    /// node.enqueue("mail", highlander::encode_json(&"ada@example.com").unwrap()).await?;
    /// # Ok(()) }
    /// ```
    pub async fn worker<K, F, Fut, R>(
        &self,
        queue: K,
        options: WorkerOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: JobResult,
    {
        let handler = Arc::new(handler);
        let run: BoxedJobs = Arc::new(move |mut jobs: Vec<JobContext>| {
            let handler = handler.clone();
            Box::pin(async move {
                let Some(ctx) = jobs.pop() else { return Vec::new() };
                let id = ctx.id;
                vec![(id, handler(ctx).await.into_result())]
            })
        });
        let parallel = options.concurrency;
        self.start_worker(queue.into_key()?, options, parallel, 1, run).await
    }

    /// Runs `handler` for up to `max_batch` jobs of `queue` at a time (go-session-lock's
    /// "tasker" shape): it gets the claimed jobs' contexts and returns the ids of those that
    /// succeeded; the others fail their attempt. One batch runs at a time on this node.
    pub async fn batch_worker<K, F, Fut>(
        &self,
        queue: K,
        max_batch: u32,
        options: WorkerOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(Vec<JobContext>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<JobId>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let run: BoxedJobs = Arc::new(move |jobs: Vec<JobContext>| {
            let handler = handler.clone();
            Box::pin(async move {
                let ids: Vec<JobId> = jobs.iter().map(|c| c.id).collect();
                let ok: BTreeSet<JobId> = handler(jobs).await.into_iter().collect();
                ids.into_iter()
                    .map(|id| {
                        let r = if ok.contains(&id) {
                            Ok(None)
                        } else {
                            Err(JobFailure::retry("the batch handler did not report it done"))
                        };
                        (id, r)
                    })
                    .collect()
            })
        });
        let options = WorkerOptions { concurrency: max_batch, ..options };
        self.start_worker(queue.into_key()?, options, 1, max_batch, run).await
    }

    async fn start_worker(
        &self,
        queue: Key,
        options: WorkerOptions,
        parallel: u32,
        batch: u32,
        run: BoxedJobs,
    ) -> Result<(), Error> {
        options.validate()?;
        let shared = self.shared().clone();
        if shared.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        if !shared.workers.reserve(&queue) {
            return Err(Error::AlreadyRegistered { key: queue });
        }
        let caps = options.caps();
        if caps != QueueCaps::default() {
            let configured = configure(&shared, &queue, caps, false).await;
            if let Err(e) = configured {
                shared.workers.release(&queue);
                return Err(e);
            }
        }
        let worker = Worker::new(shared.clone(), queue, options, parallel, batch, run);
        shared.workers.spawn(worker.run());
        Ok(())
    }

    /// Sets a queue's caps from any node, replacing caps in force (jobs running beyond a
    /// lowered cap finish; no new one starts until the queue is below it).
    pub async fn configure_queue(&self, queue: impl IntoKey, caps: QueueCaps) -> Result<(), Error> {
        configure(self.shared(), &queue.into_key()?, caps, true).await
    }

    /// A job as this node has applied it: state, attempts, errors, result. `None` if the
    /// table holds no such job (never enqueued here yet, or dropped after it finished).
    pub fn job(&self, job: JobId) -> Option<JobReport> {
        let shared = self.shared();
        let now = shared.cluster_clock.now_ms();
        let applied = shared.applied.read();
        let j = applied.state.jobs.jobs.get(&job)?;
        Some(applied.state.job_report(j, now))
    }

    /// Jobs as this node has applied them: of `queue` (or all), in `state` (or any), newest
    /// first, at most `limit`. `jobs(Some(q), Some(JobState::Dead), 100)` lists a queue's
    /// dead letters.
    pub fn jobs(
        &self,
        queue: Option<&Key>,
        state: Option<JobState>,
        limit: usize,
    ) -> Vec<JobReport> {
        list_jobs(self.shared(), queue, state, limit)
    }

    /// Every job queue with its depths by state, running jobs per node and the age of its
    /// oldest available job, as this node has applied them.
    pub fn queues(&self) -> Vec<QueueReport> {
        let shared = self.shared();
        let now = shared.cluster_clock.now_ms();
        shared.applied.read().state.queue_reports(now)
    }

    /// Waits until the job has finished (completed, dead or cancelled) as applied on this
    /// node, at most `timeout`; returns its report. A job already dropped by the retention
    /// limits (or discarded) is [`Error::NoSuchJob`]. A change made through another node is
    /// seen once this node has applied it, so a `wait` right after a `retry_job` elsewhere
    /// may still see the job's earlier end.
    pub async fn wait(&self, job: JobId, timeout: Duration) -> Result<JobReport, Error> {
        let shared = self.shared();
        let mut changes = shared.applied.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            {
                let now = shared.cluster_clock.now_ms();
                let applied = shared.applied.read();
                match applied.state.jobs.jobs.get(&job) {
                    Some(j) if j.state.is_finished() => {
                        return Ok(applied.state.job_report(j, now));
                    }
                    Some(_) => {}
                    None if job.0 <= applied.state.jobs.last_job => {
                        return Err(Error::NoSuchJob { job });
                    }
                    None => {}
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Stopped("the node is stopping".into())),
                Err(_) => return Err(Error::Timeout),
            }
        }
    }

    /// Cancels a job from any node: one that has not started is cancelled at once; a
    /// running one's handler is asked to stop (and aborted after the stop grace), and the
    /// job is cancelled when the attempt ends. Returns where the job stands.
    pub async fn cancel_job(&self, job: JobId) -> Result<JobState, Error> {
        control(self.shared(), job, JobAction::Cancel).await
    }

    /// Runs a dead or cancelled job again, now, with its attempts counted from zero.
    pub async fn retry_job(&self, job: JobId) -> Result<JobState, Error> {
        control(self.shared(), job, JobAction::Retry).await
    }

    /// Drops a finished job from the table.
    pub async fn discard_job(&self, job: JobId) -> Result<(), Error> {
        control(self.shared(), job, JobAction::Discard).await.map(|_| ())
    }

    /// Drops the finished jobs in `state` (completed, dead or cancelled) of `queue` (or of
    /// every queue); returns how many.
    pub async fn purge_jobs(&self, queue: Option<Key>, state: JobState) -> Result<u64, Error> {
        purge(self.shared(), queue, state).await
    }
}

/// Enqueues a job through this node (the API's and a peer's or the CLI's way in).
async fn enqueue(
    shared: &Shared,
    queue: Key,
    payload: Payload,
    options: EnqueueOptions,
) -> Result<JobId, Error> {
    let mut spec = options.spec;
    if let Some(delay) = options.delay {
        spec.run_at_ms =
            Some(shared.cluster_clock.now_ms().saturating_add(delay.as_millis() as u64));
    }
    spec.validate().map_err(Error::InvalidJob)?;
    let max = {
        let applied = shared.applied.read();
        applied.state.limits.unwrap_or(shared.limits).max_payload_bytes
    };
    if payload.len() as u64 > u64::from(max) {
        return Err(Error::PayloadTooLarge { size: payload.len() as u64, max: u64::from(max) });
    }
    need_session(shared).await?;
    let (serial, floor, _guard) = shared.begin_request();
    let command = Command::Enqueue {
        queue: queue.clone(),
        payload,
        spec: Box::new(spec),
        request: RequestId { client: shared.client(), serial },
        floor,
    };
    match shared.proposer.write_one(command).await {
        Ok(Outcome::Enqueued { job }) => Ok(job),
        Ok(other) => Err(outcome_error(&queue, other)),
        Err(e) => Err(write_error(e)),
    }
}

async fn need_session(shared: &Shared) -> Result<SessionId, Error> {
    // Requests are de-duplicated per process, which the cluster learns of with its session.
    session::wait_for_session(shared, shared.timing.write_timeout)
        .await
        .ok_or_else(|| Error::Unavailable("no session: the node has not reached a quorum".into()))
}

async fn configure(
    shared: &Shared,
    queue: &Key,
    caps: QueueCaps,
    force: bool,
) -> Result<(), Error> {
    let command = Command::ConfigureQueue { queue: queue.clone(), caps, force };
    match shared.proposer.write_one(command).await {
        Ok(Outcome::QueueConfigured) => Ok(()),
        Ok(other) => Err(outcome_error(queue, other)),
        Err(e) => Err(write_error(e)),
    }
}

fn list_jobs(
    shared: &Shared,
    queue: Option<&Key>,
    state: Option<JobState>,
    limit: usize,
) -> Vec<JobReport> {
    let now = shared.cluster_clock.now_ms();
    let applied = shared.applied.read();
    let st = &applied.state;
    st.jobs
        .jobs
        .values()
        .rev()
        .filter(|j| queue.is_none_or(|q| *q == j.queue))
        .filter(|j| state.is_none_or(|s| j.state_at(now) == s))
        .take(limit)
        .map(|j| st.job_report(j, now))
        .collect()
}

fn job_error(job: JobId, queue: Option<&Key>, outcome: Outcome) -> Error {
    match outcome {
        Outcome::Rejected(Rejection::NoSuchJob) => Error::NoSuchJob { job },
        Outcome::Rejected(Rejection::WrongJobState { state }) => {
            Error::WrongJobState { job, state }
        }
        other => match queue {
            Some(q) => outcome_error(q, other),
            None => match other {
                Outcome::Rejected(r) => Error::Rejected(r),
                other => Error::Stopped(format!("unexpected outcome {other}")),
            },
        },
    }
}

async fn control(shared: &Arc<Shared>, job: JobId, action: JobAction) -> Result<JobState, Error> {
    need_session(shared).await?;
    let queue = shared.applied.read().state.jobs.jobs.get(&job).map(|j| j.queue.clone());
    let (serial, floor, _guard) = shared.begin_request();
    let command = Command::JobControl {
        job,
        action,
        request: RequestId { client: shared.client(), serial },
        floor,
    };
    match shared.proposer.write_one(command).await {
        Ok(Outcome::JobUpdated { state }) => Ok(state),
        Ok(Outcome::JobsPurged { .. }) => Ok(JobState::Completed),
        Ok(other) => Err(job_error(job, queue.as_ref(), other)),
        Err(e) => Err(write_error(e)),
    }
}

async fn purge(shared: &Arc<Shared>, queue: Option<Key>, state: JobState) -> Result<u64, Error> {
    need_session(shared).await?;
    let (serial, floor, _guard) = shared.begin_request();
    let command = Command::PurgeJobs {
        queue: queue.clone(),
        state,
        request: RequestId { client: shared.client(), serial },
        floor,
    };
    match shared.proposer.write_one(command).await {
        Ok(Outcome::JobsPurged { count }) => Ok(count),
        Ok(Outcome::Rejected(Rejection::WrongJobState { state })) => {
            Err(Error::InvalidJob(format!("only finished jobs are purged, not {}", state.name())))
        }
        Ok(Outcome::Rejected(r)) => Err(Error::Rejected(r)),
        Ok(other) => Err(Error::Stopped(format!("unexpected outcome {other}"))),
        Err(e) => Err(write_error(e)),
    }
}

/// Serves an operator's request about jobs, from a peer or the CLI
/// ([`Request::Jobs`](highlander_core::wire::Request::Jobs)).
pub(crate) async fn serve(shared: &Arc<Shared>, request: JobsRequest) -> Result<JobsReply, Error> {
    match request {
        JobsRequest::List { queue, state, limit } => Ok(JobsReply::Jobs(list_jobs(
            shared,
            queue.as_ref(),
            state,
            limit.min(10_000) as usize,
        ))),
        JobsRequest::Show { job } => {
            let now = shared.cluster_clock.now_ms();
            let applied = shared.applied.read();
            match applied.state.jobs.jobs.get(&job) {
                Some(j) => Ok(JobsReply::Jobs(vec![applied.state.job_report(j, now)])),
                None => Err(Error::NoSuchJob { job }),
            }
        }
        JobsRequest::Control { job, action } => {
            let state = control(shared, job, action).await?;
            Ok(JobsReply::Done(Outcome::JobUpdated { state }))
        }
        JobsRequest::Purge { queue, state } => {
            let count = purge(shared, queue, state).await?;
            Ok(JobsReply::Done(Outcome::JobsPurged { count }))
        }
        JobsRequest::Enqueue { queue, payload, spec, delay_ms } => {
            let options =
                EnqueueOptions { spec: *spec, delay: delay_ms.map(Duration::from_millis) };
            let job = enqueue(shared, queue, payload, options).await?;
            Ok(JobsReply::Done(Outcome::Enqueued { job }))
        }
    }
}

/// The worker loops of this node.
#[derive(Default)]
pub(crate) struct Workers {
    queues: Mutex<BTreeSet<Key>>,
    loops: Mutex<Option<JoinSet<()>>>,
}

impl Workers {
    fn reserve(&self, queue: &Key) -> bool {
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).insert(queue.clone())
    }

    fn release(&self, queue: &Key) {
        self.queues.lock().unwrap_or_else(|e| e.into_inner()).remove(queue);
    }

    fn spawn(&self, worker: impl Future<Output = ()> + Send + 'static) {
        self.loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(JoinSet::new)
            .spawn(worker);
    }

    /// Waits (at most `bound`) for every worker to wind down once the node is stopping:
    /// handlers stopped, and their completions and failures written, so the session can
    /// close with no job claimed.
    pub(crate) async fn finish(&self, bound: Duration) {
        let loops = self.loops.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut loops) = loops {
            let drained =
                tokio::time::timeout(bound, async { while loops.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                warn!(
                    "job workers did not wind down in time; their jobs return when the session expires"
                );
            }
            loops.abort_all();
        }
    }

    /// Stops every worker where it stands (the node was killed).
    pub(crate) fn abort(&self) {
        if let Some(mut loops) = self.loops.lock().unwrap_or_else(|e| e.into_inner()).take() {
            loops.abort_all();
        }
    }
}

/// Why the node stops an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// An operator cancelled the job.
    Cancelled,
    /// The job's deadline passed.
    TimedOut,
    /// The node's lease is about to lapse (or has).
    LeaseEnding,
    /// The node is shutting down.
    NodeStopping,
    /// The claim is gone (the session ended): nothing to report.
    ClaimGone,
}

/// One handler call in progress.
struct Call {
    jobs: Vec<(JobId, Token)>,
    stop: watch::Sender<Option<Stop>>,
    abort: AbortHandle,
}

/// What a job's handler call ended with, per job: the command to write, if any.
type Ended = Vec<(JobId, Token, Option<Command>)>;

struct Worker {
    shared: Arc<Shared>,
    queue: Key,
    options: WorkerOptions,
    backoff: Option<Backoff>,
    parallel: u32,
    batch: u32,
    run: BoxedJobs,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
    handlers: JoinSet<(u64, Ended)>,
    /// Jobs whose handler ended, until the applied state shows their claim gone.
    ended: BTreeMap<JobId, Token>,
    /// Completions and failures not yet written.
    reports: Vec<Command>,
    io: JoinSet<Io>,
    claiming: bool,
    writing: bool,
    claim_pause: Duration,
    claim_after: Instant,
}

enum Io {
    Claimed(Result<Outcome, WriteError>),
    Written(Vec<Command>, Result<Vec<Outcome>, WriteError>),
}

/// A claimed job of this session, as applied here.
struct Claimed {
    id: JobId,
    token: Token,
    attempt: u32,
    max_attempts: u32,
    payload: Payload,
    deadline_ms: u64,
    partition: Option<String>,
}

/// One turn's reading of the applied state (see [`Worker::view`]).
struct View {
    /// This session's claims of the queue: job → (claim token, cancel requested).
    live: BTreeMap<JobId, (Token, bool)>,
    /// Whether a claim now would find a job.
    claimable: bool,
    /// When the queue's next scheduled job falls due.
    next_due: Option<u64>,
    /// The cluster's time of day when read.
    now_ms: u64,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        queue: Key,
        options: WorkerOptions,
        parallel: u32,
        batch: u32,
        run: BoxedJobs,
    ) -> Worker {
        let backoff = options.backoff.clone();
        Worker {
            shared,
            queue,
            backoff,
            options,
            parallel,
            batch,
            run,
            calls: BTreeMap::new(),
            next_call: 0,
            handlers: JoinSet::new(),
            ended: BTreeMap::new(),
            reports: Vec::new(),
            io: JoinSet::new(),
            claiming: false,
            writing: false,
            claim_pause: EMPTY_CLAIM_PAUSE,
            claim_after: Instant::now(),
        }
    }

    async fn run(mut self) {
        let shared = self.shared.clone();
        let mut applied = shared.applied.subscribe();
        let mut lease = shared.lease_watch();
        let mut stopping = false;
        let stop_deadline_bound = shared.timing.stop_grace() + shared.timing.election_bound() * 2;
        let mut wind_down_until: Option<Instant> = None;
        loop {
            if !stopping && shared.is_stopping() {
                stopping = true;
                wind_down_until = Some(Instant::now() + stop_deadline_bound);
                for call in self.calls.values() {
                    call.stop.send_replace(Some(Stop::NodeStopping));
                }
            }
            let now_lease = shared.lease();
            let view = self.view(now_lease.session);
            self.reconcile(now_lease, &view, stopping);
            self.flush_reports(stopping);
            if !stopping {
                self.maybe_claim(now_lease, &view);
            }
            let idle = self.calls.is_empty() && self.reports.is_empty();
            if stopping && idle && !self.writing && !self.claiming {
                return;
            }
            let wake_claim = if self.claiming || stopping {
                None
            } else {
                self.next_claim_time(now_lease, &view)
            };
            let wind_down = wind_down_until;
            tokio::select! {
                _ = applied.changed() => {}
                _ = lease.changed() => {}
                Some(done) = self.handlers.join_next(), if !self.handlers.is_empty() => {
                    self.call_ended(done);
                }
                Some(done) = self.io.join_next(), if !self.io.is_empty() => {
                    if let Ok(done) = done {
                        self.io_done(done);
                    }
                }
                _ = sleep_until_opt(wake_claim) => {}
                _ = shared.stopping(), if !stopping => {}
                _ = sleep_until_opt(wind_down) => {
                    warn!(node = %shared.id, queue = %self.queue, "job worker stopped before its reports were written");
                    return;
                }
            }
        }
    }

    /// What the loop needs of the applied state, read once per turn under one lock: this
    /// session's claims of the queue, and whether (or when) a job can be claimed.
    fn view(&self, session: Option<SessionId>) -> View {
        let applied = self.shared.applied.read();
        let st = &applied.state;
        let mut live = BTreeMap::new();
        let mine = session.and_then(|s| st.sessions.get(&s)).and_then(|s| s.jobs.get(&self.queue));
        for j in mine.into_iter().flatten().filter_map(|id| st.jobs.jobs.get(id)) {
            if let Some(c) = j.claim {
                live.insert(j.id, (c.token, c.cancel_requested));
            }
        }
        let now_ms = self.shared.cluster_clock.now_ms();
        View {
            live,
            claimable: st.jobs.has_claimable(&self.queue, now_ms),
            next_due: st.jobs.next_due(&self.queue),
            now_ms,
        }
    }

    /// The claimed jobs `ids` as applied here, with what their handlers need.
    fn details(&self, ids: &[JobId]) -> Vec<Claimed> {
        let applied = self.shared.applied.read();
        let st = &applied.state;
        ids.iter()
            .filter_map(|id| st.jobs.jobs.get(id))
            .filter_map(|j| {
                let c = j.claim?;
                Some(Claimed {
                    id: j.id,
                    token: c.token,
                    attempt: j.attempt,
                    max_attempts: j.spec.max_attempts,
                    payload: j.payload.clone(),
                    deadline_ms: c.deadline_ms,
                    partition: j.spec.partition.clone(),
                })
            })
            .collect()
    }

    /// Starts handlers for claimed jobs that have none, stops those whose claim is gone or
    /// was cancelled, and forgets ended jobs whose report has been applied.
    fn reconcile(&mut self, lease: Lease, view: &View, stopping: bool) {
        let live = &view.live;
        self.ended.retain(|id, token| live.get(id).is_some_and(|c| c.0 == *token));
        for call in self.calls.values() {
            let gone = call.jobs.iter().any(|(id, t)| live.get(id).is_none_or(|c| c.0 != *t));
            let cancelled = call.jobs.iter().all(|(id, _)| live.get(id).is_some_and(|c| c.1));
            if gone {
                call.stop.send_replace(Some(Stop::ClaimGone));
            } else if cancelled && call.stop.borrow().is_none() {
                call.stop.send_replace(Some(Stop::Cancelled));
            }
        }
        let Some(session) = lease.session else { return };
        let in_calls = self.calls.values().flat_map(|c| &c.jobs);
        let held = in_calls.filter(|(id, _)| live.contains_key(id)).count() + self.ended.len();
        if live.len() <= held {
            // Every claim has its handler, running or ended.
            return;
        }
        let running: BTreeSet<JobId> =
            self.calls.values().flat_map(|c| c.jobs.iter().map(|(id, _)| *id)).collect();
        let mut idle: Vec<(JobId, Token)> = Vec::new();
        for (id, (token, cancelled)) in live {
            if running.contains(id) || self.ended.contains_key(id) {
                continue;
            }
            if *cancelled {
                // Cancelled before its handler started: end the attempt without running it.
                self.ended.insert(*id, *token);
                self.reports.push(Command::FailJob {
                    job: *id,
                    token: *token,
                    error: "cancelled before it started".into(),
                    retry_at_ms: self.shared.cluster_clock.now_ms(),
                    discard: false,
                    interrupted: false,
                });
                continue;
            }
            idle.push((*id, *token));
        }
        if idle.is_empty() {
            return;
        }
        if stopping {
            // Claimed as the node began to stop: give them back, uncounted.
            let now = self.shared.cluster_clock.now_ms();
            for (job, token) in idle {
                self.ended.insert(job, token);
                self.reports.push(Command::FailJob {
                    job,
                    token,
                    error: "the node shut down before the job started".into(),
                    retry_at_ms: now,
                    discard: false,
                    interrupted: true,
                });
            }
            return;
        }
        // Never start anything the lease does not cover.
        if !lease.valid_at(session, self.shared.clock.now()) {
            return;
        }
        let free = (self.parallel as usize).saturating_sub(self.calls.len()) * self.batch as usize;
        let ids: Vec<JobId> = idle.iter().take(free).map(|(id, _)| *id).collect();
        let mut jobs = self.details(&ids);
        while !jobs.is_empty() && (self.calls.len() as u32) < self.parallel {
            let take = jobs.len().min(self.batch as usize);
            let call: Vec<Claimed> = jobs.drain(..take).collect();
            let refs: Vec<&Claimed> = call.iter().collect();
            self.start_call(session, &refs);
        }
    }

    fn start_call(&mut self, session: SessionId, jobs: &[&Claimed]) {
        let shared = self.shared.clone();
        let (stop_tx, stop_rx) = watch::channel(None);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let now_ms = shared.cluster_clock.now_ms();
        let now = shared.clock.now();
        let mut deadlines = Vec::new();
        let contexts: Vec<JobContext> = jobs
            .iter()
            .map(|c| {
                let local = now + Duration::from_millis(c.deadline_ms.saturating_sub(now_ms));
                let deadline = Arc::new(watch::channel(local).0);
                deadlines.push(deadline.clone());
                JobContext {
                    id: c.id,
                    queue: self.queue.clone(),
                    attempt: c.attempt,
                    max_attempts: c.max_attempts,
                    token: c.token,
                    payload: c.payload.clone(),
                    node: shared.id,
                    session,
                    cancel: cancel_rx.clone(),
                    deadline,
                    shared: shared.clone(),
                }
            })
            .collect();
        let ids: Vec<(JobId, Token, u32)> =
            jobs.iter().map(|c| (c.id, c.token, c.attempt)).collect();
        let call_id = self.next_call;
        self.next_call += 1;
        let watch = shared.watch.task(self.queue.clone(), 0, jobs[0].token);
        let handler = CatchPanic(Box::pin((self.run)(contexts)));
        let panicked: Vec<JobId> = ids.iter().map(|(id, _, _)| *id).collect();
        let fut = Watched::new(
            async move {
                match handler.await {
                    Ok(results) => results,
                    // A panic fails the attempt of every job of the call, like an error.
                    Err(why) => panicked
                        .into_iter()
                        .map(|id| {
                            (id, Err(JobFailure::retry(format!("the handler panicked: {why}"))))
                        })
                        .collect(),
                }
            },
            watch,
        );
        let backoff = self.backoff.clone();
        let guard = ObservedCall::new(&shared, &self.queue, jobs);
        let driver =
            drive(shared, session, fut, stop_rx, cancel_tx, deadlines, ids.clone(), backoff);
        let observed = Observed { fut: Box::pin(driver), _guard: guard };
        let abort = self.handlers.spawn(async move { (call_id, observed.await) });
        self.calls.insert(
            call_id,
            Call { jobs: ids.iter().map(|(id, t, _)| (*id, *t)).collect(), stop: stop_tx, abort },
        );
    }

    fn call_ended(&mut self, done: Result<(u64, Ended), tokio::task::JoinError>) {
        let (call_id, ended) = match done {
            Ok(done) => done,
            Err(e) => {
                // The driver itself panicked or was aborted: find its call by elimination.
                warn!(node = %self.shared.id, queue = %self.queue, error = %e, "a job call ended abnormally");
                let finished: Vec<u64> = self
                    .calls
                    .iter()
                    .filter(|(_, c)| c.abort.is_finished())
                    .map(|(id, _)| *id)
                    .collect();
                // Its jobs go back, so they do not stay claimed until the session ends.
                let now = self.shared.cluster_clock.now_ms();
                for id in finished {
                    if let Some(call) = self.calls.remove(&id) {
                        for (job, token) in call.jobs {
                            self.ended.insert(job, token);
                            self.reports.push(Command::FailJob {
                                job,
                                token,
                                error: format!("the node's job driver failed: {e}"),
                                retry_at_ms: now,
                                discard: false,
                                interrupted: false,
                            });
                        }
                    }
                }
                return;
            }
        };
        self.calls.remove(&call_id);
        for (job, token, report) in ended {
            self.ended.insert(job, token);
            if let Some(report) = report {
                self.reports.push(report);
            }
        }
    }

    /// Writes pending reports (one write in flight), dropping those whose claim is gone.
    fn flush_reports(&mut self, stopping: bool) {
        if self.writing || self.reports.is_empty() {
            return;
        }
        if !stopping && self.shared.lease().session.is_none() {
            return;
        }
        {
            let applied = self.shared.applied.read();
            let st = &applied.state;
            self.reports.retain(|c| match c {
                Command::CompleteJob { job, token, .. } | Command::FailJob { job, token, .. } => {
                    // A claim this node has not applied yet is kept; one it has applied
                    // is kept while it stands.
                    token.0 > st.last_token
                        || st
                            .jobs
                            .jobs
                            .get(job)
                            .and_then(|j| j.claim)
                            .is_some_and(|c| c.token == *token)
                }
                _ => true,
            });
        }
        if self.reports.is_empty() {
            return;
        }
        let take = self.reports.len().min(REPORT_BATCH);
        let batch: Vec<Command> = self.reports.drain(..take).collect();
        let proposer = self.shared.proposer.clone();
        self.writing = true;
        self.io.spawn(async move {
            let result = proposer.write(batch.clone()).await;
            Io::Written(batch, result)
        });
    }

    /// Room for a claim now: the jobs this node could take on (a whole batch's worth in
    /// batch mode, once no batch runs), if any. Jobs whose handler has ended while their
    /// completion is being written hold no handler: their room can be claimed again already
    /// (the claim's limit counts them, so the state grants only what no handler holds).
    fn room(&self, view: &View) -> Option<u32> {
        if self.batch > 1 && !self.calls.is_empty() {
            return None;
        }
        let ended = view.live.keys().filter(|id| self.ended.contains_key(id)).count();
        let busy = (view.live.len() - ended) as u32;
        let free = (self.parallel * self.batch).saturating_sub(busy);
        (free > 0).then_some(free)
    }

    /// When to claim next: now (or after the pause an empty claim imposed) if a due job
    /// waits and this node has room, when the next scheduled job falls due, or never (a
    /// change to the applied state or a handler's end wakes the loop).
    fn next_claim_time(&self, lease: Lease, view: &View) -> Option<Instant> {
        let session = lease.session?;
        if !lease.valid_at(session, self.shared.clock.now()) {
            return None;
        }
        self.room(view)?;
        if view.claimable {
            return Some(self.claim_after.max(Instant::now()));
        }
        // A due job that is not claimable waits for the queue's cap: a change wakes us.
        let due = view.next_due.filter(|due| *due > view.now_ms)?;
        let wait = Duration::from_millis(due - view.now_ms);
        Some((Instant::now() + wait).max(self.claim_after))
    }

    fn maybe_claim(&mut self, lease: Lease, view: &View) {
        if self.claiming || Instant::now() < self.claim_after || !view.claimable {
            return;
        }
        let Some(session) = lease.session else { return };
        if !lease.valid_at(session, self.shared.clock.now()) || self.room(view).is_none() {
            return;
        }
        let limit = self.parallel * self.batch + self.ended.len() as u32;
        let command = Command::Claim {
            queue: self.queue.clone(),
            session,
            limit,
            timeout_ms: self.options.timeout.as_millis() as u64,
        };
        let proposer = self.shared.proposer.clone();
        self.claiming = true;
        self.io.spawn(async move { Io::Claimed(proposer.write_one(command).await) });
    }

    fn io_done(&mut self, done: Io) {
        match done {
            Io::Claimed(result) => {
                self.claiming = false;
                if let Ok(Outcome::Claimed { jobs }) = &result
                    && self.shared.is_stopping()
                {
                    // Claimed as the node began to stop (this node may not have applied
                    // the claim yet): give them back at once, uncounted, so the session
                    // can close instead of holding them until it expires.
                    let now = self.shared.cluster_clock.now_ms();
                    for (job, token) in jobs {
                        if self.ended.insert(*job, *token).is_none() {
                            self.reports.push(Command::FailJob {
                                job: *job,
                                token: *token,
                                error: "the node shut down before the job started".into(),
                                retry_at_ms: now,
                                discard: false,
                                interrupted: true,
                            });
                        }
                    }
                    return;
                }
                match result {
                    Ok(Outcome::Claimed { jobs }) if !jobs.is_empty() => {
                        self.claim_pause = EMPTY_CLAIM_PAUSE;
                    }
                    Ok(other) => {
                        // Nothing due after all (this node's view of the cluster's time ran
                        // ahead of the leader's, or another node took them): pause a little.
                        debug!(node = %self.shared.id, queue = %self.queue, outcome = %other, "claim found nothing");
                        self.claim_after = Instant::now() + self.claim_pause;
                        self.claim_pause = (self.claim_pause * 2).min(EMPTY_CLAIM_PAUSE * 16);
                    }
                    Err(e) => {
                        debug!(node = %self.shared.id, queue = %self.queue, error = ?e, "claim failed");
                        self.claim_after = Instant::now() + self.shared.timing.heartbeat;
                    }
                }
            }
            Io::Written(batch, result) => {
                self.writing = false;
                if let Err(e) = result {
                    // Unknown outcome: written again unless its claim is gone by then
                    // (a completion applied twice is refused as stale, harmlessly).
                    debug!(node = %self.shared.id, queue = %self.queue, error = ?e, "job reports not written; trying again");
                    let mut again = batch;
                    again.append(&mut self.reports);
                    self.reports = again;
                }
            }
        }
    }
}

/// Tells the node's observer (the simulator's checker) that a call's jobs started, and,
/// when dropped, that they stopped.
struct ObservedCall {
    observer: Option<Arc<dyn crate::Observer>>,
    node: NodeId,
    queue: Key,
    jobs: Vec<(JobId, Token)>,
}

impl ObservedCall {
    fn new(shared: &Shared, queue: &Key, jobs: &[&Claimed]) -> ObservedCall {
        let observer = shared.observer.clone();
        if let Some(o) = &observer {
            for c in jobs {
                o.job_started(shared.id, queue, c.id, c.token, c.partition.as_deref());
            }
        }
        ObservedCall {
            observer,
            node: shared.id,
            queue: queue.clone(),
            jobs: jobs.iter().map(|c| (c.id, c.token)).collect(),
        }
    }
}

impl Drop for ObservedCall {
    fn drop(&mut self) {
        if let Some(o) = &self.observer {
            for (job, token) in &self.jobs {
                o.job_stopped(self.node, &self.queue, *job, *token);
            }
        }
    }
}

/// A call's driver and its observer guard. Fields drop in declaration order, so the
/// driver (holding the handler's future) is gone before the guard reports the stop, also
/// when the call is aborted or the node killed.
struct Observed<F> {
    fut: std::pin::Pin<Box<F>>,
    _guard: ObservedCall,
}

impl<F: Future<Output = Ended>> Future for Observed<F> {
    type Output = Ended;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Ended> {
        self.fut.as_mut().poll(cx)
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs one handler call until it returns or is stopped, and says what to write for each
/// of its jobs.
#[allow(clippy::too_many_arguments)]
async fn drive(
    shared: Arc<Shared>,
    session: SessionId,
    fut: impl Future<Output = Results>,
    mut stop: watch::Receiver<Option<Stop>>,
    cancel: watch::Sender<bool>,
    deadlines: Vec<Arc<watch::Sender<Instant>>>,
    jobs: Vec<(JobId, Token, u32)>,
    backoff: Option<Backoff>,
) -> Ended {
    let mut fut = std::pin::pin!(fut);
    let grace = shared.timing.stop_grace();
    let mut lease = shared.lease_watch();
    let mut deadline_rx: Vec<watch::Receiver<Instant>> =
        deadlines.iter().map(|d| d.subscribe()).collect();
    let clock = shared.clock;
    let reason = loop {
        let l = *lease.borrow();
        let lease_cut = match l.deadline {
            Some(d) if l.session == Some(session) => d.checked_sub(grace).unwrap_or(d),
            _ => break Stop::LeaseEnding,
        };
        let job_deadline = deadline_rx.iter().map(|d| *d.borrow()).min().unwrap_or(lease_cut);
        if let Some(r) = *stop.borrow() {
            break r;
        }
        let changed_deadline = async {
            if deadline_rx.is_empty() {
                std::future::pending::<()>().await;
            }
            let futures = deadline_rx.iter_mut().map(|d| Box::pin(d.changed()));
            let _ = futures_select_all(futures).await;
        };
        tokio::select! {
            results = &mut fut => return finished(&shared, None, results, &jobs, &backoff),
            _ = stop.changed() => {}
            _ = lease.changed() => {}
            _ = changed_deadline => {}
            _ = tokio::time::sleep_until(clock.to_real(lease_cut)) => break Stop::LeaseEnding,
            _ = tokio::time::sleep_until(clock.to_real(job_deadline)) => break Stop::TimedOut,
        }
    };
    cancel.send_replace(true);
    // The grace, but never past the lease deadline: after it another node may run the job.
    let mut abort_at = clock.now() + grace;
    let l = *lease.borrow();
    match l.deadline {
        Some(d) if l.session == Some(session) => abort_at = abort_at.min(d),
        _ => abort_at = clock.now(),
    }
    tokio::select! {
        results = &mut fut => finished(&shared, Some(reason), results, &jobs, &backoff),
        _ = tokio::time::sleep_until(clock.to_real(abort_at)) => {
            let text = format!("stopped: {}", stop_text(reason));
            jobs.iter().map(|(id, token, attempt)| {
                (*id, *token, stopped(&shared, reason, *id, *token, *attempt, &text, &backoff))
            }).collect()
        }
    }
}

/// A handler's future whose panic is caught and returned as its message, so a panicking
/// handler fails its jobs' attempts instead of leaving them claimed.
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(out)) => std::task::Poll::Ready(Ok(out)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic".into());
                std::task::Poll::Ready(Err(why))
            }
        }
    }
}

/// Resolves when the first of `futures` does.
async fn futures_select_all<F: Future + Unpin>(futures: impl Iterator<Item = F>) {
    let mut list: Vec<F> = futures.collect();
    std::future::poll_fn(|cx| {
        for f in list.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

fn stop_text(reason: Stop) -> &'static str {
    match reason {
        Stop::Cancelled => "cancelled by an operator",
        Stop::TimedOut => "the attempt's deadline passed",
        Stop::LeaseEnding => "the node's lease was about to lapse",
        Stop::NodeStopping => "the node shut down",
        Stop::ClaimGone => "the claim ended",
    }
}

/// The report for a job whose handler returned (after a stop request, if `reason`).
fn finished(
    shared: &Shared,
    reason: Option<Stop>,
    results: Results,
    jobs: &[(JobId, Token, u32)],
    backoff: &Option<Backoff>,
) -> Ended {
    let results: BTreeMap<JobId, Result<Option<Payload>, JobFailure>> =
        results.into_iter().collect();
    let max_result =
        shared.applied.read().state.limits.unwrap_or(shared.limits).max_job_result_bytes;
    jobs.iter()
        .map(|(id, token, attempt)| {
            let report = match (results.get(id), reason) {
                (_, Some(Stop::ClaimGone)) => None,
                (Some(Ok(result)), _) => match result {
                    Some(r) if r.len() as u64 > u64::from(max_result) => Some(fail(
                        shared,
                        *id,
                        *token,
                        *attempt,
                        &JobFailure::discard(format!(
                            "the handler's result of {} bytes exceeds the limit of {max_result}",
                            r.len()
                        )),
                        backoff,
                    )),
                    _ => Some(Command::CompleteJob {
                        job: *id,
                        token: *token,
                        result: result.clone(),
                    }),
                },
                (Some(Err(failure)), None | Some(Stop::Cancelled | Stop::TimedOut)) => {
                    Some(fail(shared, *id, *token, *attempt, failure, backoff))
                }
                (Some(Err(failure)), Some(r)) => {
                    let text = format!("{} ({})", failure.error, stop_text(r));
                    stopped(shared, r, *id, *token, *attempt, &text, backoff)
                }
                (None, r) => {
                    let text = match r {
                        Some(r) => format!("stopped: {}", stop_text(r)),
                        None => "the handler returned no result for the job".into(),
                    };
                    Some(fail(shared, *id, *token, *attempt, &JobFailure::retry(text), backoff))
                }
            };
            (*id, *token, report)
        })
        .collect()
}

fn fail(
    shared: &Shared,
    job: JobId,
    token: Token,
    attempt: u32,
    failure: &JobFailure,
    backoff: &Option<Backoff>,
) -> Command {
    let wait = match backoff {
        Some(b) => b(attempt),
        None => default_backoff(job, attempt),
    };
    Command::FailJob {
        job,
        token,
        error: failure.error.clone(),
        retry_at_ms: shared.cluster_clock.now_ms().saturating_add(wait.as_millis() as u64),
        discard: failure.discard,
        interrupted: false,
    }
}

/// The report for a job whose handler the node stopped and aborted.
fn stopped(
    shared: &Shared,
    reason: Stop,
    job: JobId,
    token: Token,
    attempt: u32,
    text: &str,
    backoff: &Option<Backoff>,
) -> Option<Command> {
    match reason {
        Stop::ClaimGone => None,
        Stop::Cancelled | Stop::TimedOut => {
            Some(fail(shared, job, token, attempt, &JobFailure::retry(text), backoff))
        }
        // Not the job's doing: it runs again at once, the attempt uncounted.
        Stop::LeaseEnding | Stop::NodeStopping => Some(Command::FailJob {
            job,
            token,
            error: text.to_string(),
            retry_at_ms: shared.cluster_clock.now_ms(),
            discard: false,
            interrupted: true,
        }),
    }
}

fn system_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
