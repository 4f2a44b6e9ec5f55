//! Schedules: cron and interval jobs that fire once per tick across the cluster.
//!
//! A schedule is a key with one slot, spread over the nodes and moved on failover like a
//! singleton. Its task here is a *runner*: while this node owns the slot it computes the
//! schedule's ticks, fires each when it falls due on the cluster's time of day (`Fire`, with
//! the slot's token), runs the user's handler for the ticks the state says are pending, and
//! reports how each run ended (`TickDone`). The state machine decides what fires (above the
//! high-water mark, never before the leader's stamp); the runner only proposes.
//!
//! A run is bound to the ownership it started under: when the slot is lost, the lease
//! lapses or the node stops, every run is cancelled and its end is not reported, so the
//! state counts it as cut short and the next owner runs the tick again if the delivery
//! policy allows another attempt.

use crate::error::Error;
use crate::node::{Node, Shared};
use crate::proposer::WriteError;
use crate::task::{Lease, TaskContext, TaskResult};
use crate::watchdog::Watched;
use highlander_core::schedule::MAX_REPLAY;
use highlander_core::wire::{ScheduleOp, ScheduleReport};
use highlander_core::{
    BoxFuture, CatchUp, Command, Delivery, IntoKey, Key, NodeId, Outcome, Overlap, Rejection,
    RequestId, ScheduleAction, ScheduleError, ScheduleSpec, SessionId, TickOrigin, TickResult,
    Ticks, Token, Trigger,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{Instrument, debug, info, info_span, warn};

/// A tick that falls due while its owner could not fire it within this long (a failover, a
/// restart, a process pause) is *missed*: the catch-up policy decides whether it runs.
pub const MISFIRE_GRACE: Duration = Duration::from_secs(1);

/// How a schedule runs: time zone, catch-up, overlap and delivery policies, jitter, bounds.
///
/// The defaults are the ones most users want: UTC; after a failover, a restart or an outage
/// fire only the newest missed tick (`CatchUp::Latest` within one period); skip a tick
/// while the previous one still runs (`Overlap::Skip`); run a tick cut short by a crash once
/// more (`Delivery::AtLeastOnce { max_attempts: 2 }`); no jitter, no bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleOptions {
    /// The IANA time zone cron expressions are evaluated in (default `"UTC"`).
    pub zone: String,
    /// Missed ticks (default: the newest, within one period).
    pub catch_up: CatchUp,
    /// Ticks that fall due while earlier ones run (default: skipped).
    pub overlap: Overlap,
    /// Ticks whose run a crash cuts short (default: run once more).
    pub delivery: Delivery,
    /// Each tick runs up to this much after its time, by a hash of the key and the tick, so
    /// that schedules due at the same instant spread out (default none; below the period).
    pub jitter: Duration,
    /// For [`Node::every`]: where in the period the ticks fall (default 0: at multiples of
    /// the period since the Unix epoch).
    pub phase: Duration,
    /// No tick before this instant.
    pub start: Option<SystemTime>,
    /// No tick after this instant.
    pub end: Option<SystemTime>,
    /// Register it paused: nothing fires until [`Node::resume_schedule`] (if the schedule
    /// is new; a schedule already running keeps its state).
    pub paused: bool,
}

impl Default for ScheduleOptions {
    fn default() -> Self {
        ScheduleOptions {
            zone: "UTC".into(),
            catch_up: CatchUp::Latest { window_ms: None },
            overlap: Overlap::Skip,
            delivery: Delivery::AtLeastOnce { max_attempts: 2 },
            jitter: Duration::ZERO,
            phase: Duration::ZERO,
            start: None,
            end: None,
            paused: false,
        }
    }
}

impl ScheduleOptions {
    /// Evaluates cron expressions in the IANA zone `zone` (`"Europe/Berlin"`).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// Sets the catch-up policy.
    pub fn catch_up(mut self, catch_up: CatchUp) -> Self {
        self.catch_up = catch_up;
        self
    }

    /// Sets the overlap policy.
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Sets the delivery policy.
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// Spreads each tick by up to `jitter` (a hash of the key and the tick).
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// For intervals: where in the period ticks fall.
    pub fn phase(mut self, phase: Duration) -> Self {
        self.phase = phase;
        self
    }

    /// No tick before `start` nor after `end`.
    pub fn bounds(mut self, start: Option<SystemTime>, end: Option<SystemTime>) -> Self {
        self.start = start;
        self.end = end;
        self
    }

    /// Registers the schedule paused.
    pub fn paused(mut self, paused: bool) -> Self {
        self.paused = paused;
        self
    }

    fn spec(&self, trigger: Trigger) -> ScheduleSpec {
        ScheduleSpec {
            trigger,
            zone: self.zone.clone(),
            catch_up: self.catch_up,
            overlap: self.overlap,
            delivery: self.delivery,
            jitter_ms: self.jitter.as_millis() as u64,
            start_ms: self.start.map(system_ms),
            end_ms: self.end.map(system_ms),
            paused: self.paused,
        }
    }
}

fn system_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn ms_to_system(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// What a schedule's handler sees: one run of one tick.
///
/// Use [`tick`](Self::tick), [`attempt`](Self::attempt) and [`token`](Self::token) to build
/// an idempotency key for side effects, and check [`still_owner`](Self::still_owner) right
/// before one: a process pause can outlast any lease.
pub struct TickContext {
    key: Key,
    node: NodeId,
    token: Token,
    session: SessionId,
    run: u64,
    tick_ms: u64,
    attempt: u32,
    origin: TickOrigin,
    cancel: watch::Receiver<bool>,
    lease: watch::Receiver<Lease>,
    clock: crate::clock::LeaseClock,
}

impl TickContext {
    /// The schedule's key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The tick's nominal time.
    pub fn tick(&self) -> SystemTime {
        ms_to_system(self.tick_ms)
    }

    /// The tick's nominal time in milliseconds since the Unix epoch: with the key, a name
    /// for the tick that every node agrees on.
    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Which run of the tick this is, from 1; above 1 the previous run was cut short by a
    /// crash or a lost lease and may have done part of its work.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Why the tick runs: on time, late after a failover or outage, or by an operator.
    pub fn origin(&self) -> TickOrigin {
        self.origin
    }

    /// The run's id among the schedule's fires (in firing order).
    pub fn run_id(&self) -> u64 {
        self.run
    }

    /// The fencing token of the ownership the run belongs to.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The node running the tick.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// Whether the run has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the run is asked to stop: the schedule moved, the lease is about to
    /// lapse, the node shuts down, or a newer tick replaces it (`Overlap::CancelOther`).
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether the node still holds a valid lease for this ownership and the run has not
    /// been asked to stop. Cheap: reads local state only.
    pub fn still_owner(&self) -> bool {
        !self.is_cancelled() && self.lease.borrow().valid_at(self.session, self.clock.now())
    }
}

/// A schedule handler, boxed.
type TickHandler =
    Arc<dyn Fn(TickContext) -> BoxFuture<'static, Option<String>> + Send + Sync + 'static>;

impl Node {
    /// Runs `handler` once per tick of the cron `expression`, on one node of the cluster per
    /// tick: 5 fields (`"*/5 * * * *"`, minute first), 6 with seconds first
    /// (`"0 */5 * * * *"`), or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`; in
    /// UTC (see [`cron_with`](Self::cron_with) for a time zone and policies).
    ///
    /// The schedule is a key with one slot: schedules spread over the nodes that register
    /// them and move on failover like singletons. Every node that registers it must give the
    /// same expression and options. A bad expression, a zone not in the bundled database,
    /// ticks under a second apart or contradicting policies fail with
    /// [`Error::InvalidSchedule`], saying what to change.
    ///
    /// ```no_run
    /// # async fn demo(node: highlander::Node) -> Result<(), highlander::Error> {
    /// node.cron("report", "0 */5 * * * *", |tick| async move {
    ///     println!("report for {:?}, attempt {}", tick.tick(), tick.attempt());
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn cron<K, F, Fut, R>(
        &self,
        key: K,
        expression: &str,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TickContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        self.cron_with(key, expression, ScheduleOptions::default(), handler).await
    }

    /// Like [`cron`](Self::cron), with a time zone and policies.
    pub async fn cron_with<K, F, Fut, R>(
        &self,
        key: K,
        expression: &str,
        options: ScheduleOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TickContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        let spec = options.spec(Trigger::Cron(expression.to_string()));
        self.schedule(key, spec, handler).await
    }

    /// Runs `handler` once every `period` (at least a second), on one node of the cluster
    /// per tick. Ticks fall at multiples of the period since the Unix epoch (plus
    /// [`ScheduleOptions::phase`]), not at "last run + period", so every owner computes the
    /// same ticks and a failover does not shift them.
    pub async fn every<K, F, Fut, R>(
        &self,
        key: K,
        period: Duration,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TickContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        self.every_with(key, period, ScheduleOptions::default(), handler).await
    }

    /// Like [`every`](Self::every), with a phase and policies.
    pub async fn every_with<K, F, Fut, R>(
        &self,
        key: K,
        period: Duration,
        options: ScheduleOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TickContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        let trigger = Trigger::Every {
            period_ms: period.as_millis() as u64,
            phase_ms: options.phase.as_millis() as u64,
        };
        let spec = options.spec(trigger);
        self.schedule(key, spec, handler).await
    }

    /// Runs `handler` on the ticks of `spec` (what [`cron_with`](Self::cron_with) and
    /// [`every_with`](Self::every_with) build).
    pub async fn schedule<K, F, Fut, R>(
        &self,
        key: K,
        spec: ScheduleSpec,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TickContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        let key = key.into_key()?;
        let ticks =
            spec.compile().map_err(|error| Error::InvalidSchedule { key: key.clone(), error })?;
        let handler: TickHandler = Arc::new(move |ctx| {
            let fut = handler(ctx);
            Box::pin(async move { fut.await.into_error() })
        });
        let shared = Arc::downgrade(self.shared());
        let ticks = Arc::new(ticks);
        let run: crate::task::BoxedHandler = Arc::new(move |ctx: TaskContext| {
            let shared = shared.clone();
            let ticks = ticks.clone();
            let handler = handler.clone();
            Box::pin(async move {
                match shared.upgrade() {
                    Some(shared) => Runner::new(shared, ticks, handler, ctx).run().await,
                    None => None,
                }
            })
        });
        self.register_schedule(key, spec, run).await
    }

    /// Pauses a schedule from any node: no tick fires until it is resumed; runs going on
    /// finish.
    pub async fn pause_schedule(&self, key: impl IntoKey) -> Result<(), Error> {
        control(self.shared(), key.into_key()?, ScheduleOp::Pause).await.map(|_| ())
    }

    /// Resumes a paused schedule. Ticks that fell due while it was paused are skipped.
    pub async fn resume_schedule(&self, key: impl IntoKey) -> Result<(), Error> {
        control(self.shared(), key.into_key()?, ScheduleOp::Resume).await.map(|_| ())
    }

    /// Runs a schedule's handler once now, beside its regular ticks; returns the run id.
    pub async fn trigger_schedule(&self, key: impl IntoKey) -> Result<u64, Error> {
        let runs = control(self.shared(), key.into_key()?, ScheduleOp::Trigger).await?;
        runs.first().copied().ok_or_else(|| Error::Stopped("no run id for the trigger".into()))
    }

    /// Runs the schedule's ticks between `from` and `to` (both included) again, whatever ran
    /// before; at most 100 ticks. Returns their run ids.
    pub async fn backfill_schedule(
        &self,
        key: impl IntoKey,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<u64>, Error> {
        let op = ScheduleOp::Backfill { from_ms: system_ms(from), to_ms: system_ms(to) };
        control(self.shared(), key.into_key()?, op).await
    }

    /// A schedule as this node has applied it: its spec, whether it is paused, its pending
    /// ticks, the last fires with their owner, token, attempts, outcome and lateness, its
    /// counters, and its next 10 ticks. `None` if `key` is not a schedule.
    pub fn describe_schedule(&self, key: impl IntoKey) -> Option<ScheduleReport> {
        let key = key.into_key().ok()?;
        let (_, keys) = self.shared().applied.read().state.report();
        let mut report = keys.into_iter().find(|k| k.key == key)?.schedule?;
        report.fill_next(self.shared().cluster_clock.now_ms(), 10);
        Some(report)
    }
}

/// Serves an operator's change to a schedule, from the API or from a peer
/// ([`Request::Schedule`](highlander_core::wire::Request::Schedule)).
pub(crate) async fn control(
    shared: &Arc<Shared>,
    key: Key,
    op: ScheduleOp,
) -> Result<Vec<u64>, Error> {
    let action = match op {
        ScheduleOp::Pause => ScheduleAction::Pause,
        ScheduleOp::Resume => ScheduleAction::Resume,
        ScheduleOp::Trigger => ScheduleAction::Trigger,
        ScheduleOp::Backfill { from_ms, to_ms } => {
            let ticks = backfill_ticks(shared, &key, from_ms, to_ms)?;
            if ticks.is_empty() {
                return Ok(Vec::new());
            }
            ScheduleAction::Backfill { ticks }
        }
    };
    if crate::session::wait_for_session(shared, shared.timing.write_timeout).await.is_none() {
        return Err(Error::Unavailable("no session: the node has not reached a quorum".into()));
    }
    let (serial, floor, _guard) = shared.begin_request();
    let command = Command::ScheduleControl {
        key: key.clone(),
        action,
        request: RequestId { client: shared.client(), serial },
        floor,
    };
    match shared.proposer.write_one(command).await {
        Ok(Outcome::ScheduleChanged { runs }) => Ok(runs),
        Ok(Outcome::Rejected(Rejection::NotASchedule)) => Err(Error::NotASchedule { key }),
        Ok(Outcome::Rejected(Rejection::NoSuchKey)) => Err(Error::NoSuchKey { key }),
        Ok(Outcome::Rejected(r)) => Err(Error::Rejected(r)),
        Ok(other) => Err(Error::Stopped(format!("unexpected outcome {other}"))),
        Err(WriteError::Timeout) => Err(Error::Timeout),
        Err(WriteError::Stopped(e)) => Err(Error::Stopped(e)),
    }
}

/// The schedule's ticks in `[from_ms, to_ms]`, computed from its spec as this node applied it.
fn backfill_ticks(shared: &Shared, key: &Key, from_ms: u64, to_ms: u64) -> Result<Vec<u64>, Error> {
    let spec = {
        let applied = shared.applied.read();
        match applied.state.schedule(key) {
            Some(s) => s.spec.clone(),
            None if applied.state.keys.contains_key(key) => {
                return Err(Error::NotASchedule { key: key.clone() });
            }
            None => return Err(Error::NoSuchKey { key: key.clone() }),
        }
    };
    let ticks =
        spec.compile().map_err(|error| Error::InvalidSchedule { key: key.clone(), error })?;
    let mut list = Vec::new();
    let mut at = from_ms.saturating_sub(1);
    while let Some(t) = ticks.next_after(at) {
        if t > to_ms {
            break;
        }
        if list.len() == MAX_REPLAY as usize {
            return Err(Error::InvalidSchedule {
                key: key.clone(),
                error: ScheduleError::Invalid(format!(
                    "the range holds more than {MAX_REPLAY} ticks; backfill a shorter one"
                )),
            });
        }
        list.push(t);
        at = t;
    }
    Ok(list)
}

/// How a run ended, as the runner saw it.
enum RunEnd {
    /// The handler returned (with an error text if it failed).
    Returned(Option<String>),
    Panicked,
    Aborted,
}

struct LocalRun {
    cancel: watch::Sender<bool>,
    abort: AbortHandle,
    /// Reports the run stopped, once.
    stopped: Arc<TickStopped>,
    /// Asked to stop: its end is not reported (the state already counts it as cut short,
    /// cancelled or replaced).
    stopping: bool,
}

/// The schedule task of one ownership.
struct Runner {
    shared: Arc<Shared>,
    ticks: Arc<Ticks>,
    handler: TickHandler,
    ctx: TaskContext,
    runs: JoinSet<(u64, RunEnd)>,
    local: BTreeMap<u64, LocalRun>,
    /// Ends to report, kept until a `TickDone` for them is written.
    unreported: BTreeMap<u64, (TickResult, u64)>,
    /// The start times this runner proposed and has not seen applied by its own write: a
    /// pending run marked running under this token with one of them was started by a write
    /// of ours whose answer was lost, and is adopted rather than started (and counted) again.
    proposed_starts: BTreeSet<u64>,
    last_start: u64,
    /// Runs that ended here (reported or not): never started again by this runner, even
    /// while this node's applied state has not caught up with the leader's.
    finished: BTreeSet<u64>,
    /// The newest tick this runner fired or skipped: the mark as far as it knows, while the
    /// applied state lags.
    fired_mark: u64,
}

/// What the runner reads of the state each turn.
struct View {
    paused: bool,
    mark: u64,
    /// The run id the state hands out next: runs below it are known to this view.
    next_run: u64,
    /// Pending runs in run order.
    pending: Vec<PendingView>,
}

/// One pending run as the runner sees it.
#[derive(Clone, Copy)]
struct PendingView {
    run: u64,
    tick: u64,
    origin: TickOrigin,
    attempts: u32,
    /// Running under this token, started at this cluster time.
    running: Option<(Token, u64)>,
}

impl Runner {
    fn new(
        shared: Arc<Shared>,
        ticks: Arc<Ticks>,
        handler: TickHandler,
        ctx: TaskContext,
    ) -> Runner {
        Runner {
            shared,
            ticks,
            handler,
            ctx,
            runs: JoinSet::new(),
            local: BTreeMap::new(),
            unreported: BTreeMap::new(),
            proposed_starts: BTreeSet::new(),
            last_start: 0,
            finished: BTreeSet::new(),
            fired_mark: 0,
        }
    }

    /// The state of the schedule, if this runner's token still owns it.
    fn view(&mut self) -> Option<View> {
        let shared = self.shared.clone();
        let applied = shared.applied.read();
        let k = applied.state.keys.get(&self.ctx.key)?;
        if k.slots.first().copied().flatten().map(|o| o.token) != Some(self.ctx.token) {
            return None;
        }
        let s = k.schedule.as_ref()?;
        // A finished run is remembered until this node's state shows it ended; runs at or
        // above `next_run` are not known to this state yet and stay remembered.
        self.finished.retain(|run| *run >= s.next_run || s.pending.contains_key(run));
        Some(View {
            paused: s.paused,
            mark: s.mark_ms().max(self.fired_mark),
            next_run: s.next_run,
            pending: s
                .pending
                .iter()
                .filter(|(run, _)| !self.finished.contains(run))
                .map(|(run, p)| PendingView {
                    run: *run,
                    tick: p.tick_ms,
                    origin: p.origin,
                    attempts: p.attempts,
                    running: p.running.map(|r| (r.token, r.start_ms)),
                })
                .collect(),
        })
    }

    /// A start time, unique among this runner's proposals.
    fn start_ms(&mut self) -> u64 {
        let now = self.shared.cluster_clock.now_ms().max(self.last_start + 1);
        self.last_start = now;
        now
    }

    async fn run(mut self) -> Option<String> {
        // Woken by entries that name this key only: with a thousand schedules on a node,
        // waking every runner for every entry costs more than the ticks themselves.
        let mut applied = self.shared.applied.watch_key(&self.ctx.key);
        let concurrency = match self.ticks.spec().overlap {
            Overlap::AllowAll { max } => max as usize,
            _ => 1,
        };
        loop {
            if self.ctx.is_cancelled() || !self.ctx.still_owner() {
                break;
            }
            self.report_ends().await;
            let Some(view) = self.view() else {
                // Not (or no longer) the owner in the applied state: the supervisor cancels.
                tokio::select! {
                    _ = self.ctx.cancelled() => break,
                    changed = applied.changed() => if changed.is_err() { break },
                }
                continue;
            };
            // Runs the state no longer holds (replaced by a newer tick) stop; runs this node's
            // applied state has not caught up with yet are not among them.
            let pending: BTreeSet<u64> = view.pending.iter().map(|p| p.run).collect();
            for (run, local) in self.local.iter_mut() {
                if *run < view.next_run && !pending.contains(run) && !local.stopping {
                    let _ = local.cancel.send(true);
                    local.stopping = true;
                }
            }
            if self.start_pending(&view, concurrency).await {
                continue;
            }
            let wake = match self.fire(&view, concurrency).await {
                Fired::Again => continue,
                Fired::WaitUntil(at) => Some(at),
                Fired::Idle => None,
            };
            let sleep = async {
                match wake {
                    Some(at) => {
                        let now = self.shared.cluster_clock.now_ms();
                        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.ctx.cancelled() => break,
                Some(done) = self.runs.join_next() => self.ended(done),
                changed = applied.changed() => if changed.is_err() { break },
                _ = sleep => {}
            }
        }
        self.stop().await;
        None
    }

    /// Starts pending runs while the overlap policy allows. True if it wrote something
    /// (look at the state again).
    async fn start_pending(&mut self, view: &View, concurrency: usize) -> bool {
        let token = self.ctx.token;
        let mut wrote = false;
        for &PendingView { run, tick, origin, attempts, running } in &view.pending {
            if self.local.contains_key(&run) {
                continue;
            }
            if self.local.len() >= concurrency || !self.ctx.still_owner() {
                break;
            }
            if let Some((t, start)) = running
                && t == token
                && self.proposed_starts.contains(&start)
            {
                // Started by a write of ours whose answer was lost.
                self.spawn(run, tick, origin, attempts);
                continue;
            }
            let start_ms = self.start_ms();
            self.proposed_starts.insert(start_ms);
            let command = Command::TickStarted { key: self.ctx.key.clone(), token, run, start_ms };
            wrote = true;
            match self.shared.proposer.write_one(command).await {
                Ok(Outcome::TickStarted { attempt }) => {
                    // Started by this very write: nothing left to adopt later.
                    self.proposed_starts.remove(&start_ms);
                    self.spawn(run, tick, origin, attempt)
                }
                Ok(Outcome::TickExhausted { attempts }) => {
                    self.finished.insert(run);
                    warn!(node = %self.shared.id, key = %self.ctx.key, run, tick, attempts, "tick dropped: its runs were cut short as often as its delivery policy allows");
                }
                Ok(other) => {
                    debug!(node = %self.shared.id, key = %self.ctx.key, run, outcome = %other, "tick not started")
                }
                Err(e) => {
                    debug!(node = %self.shared.id, key = %self.ctx.key, run, error = ?e, "starting a tick failed; will look again")
                }
            }
            break;
        }
        wrote
    }

    /// Fires the next tick if it is due.
    async fn fire(&mut self, view: &View, concurrency: usize) -> Fired {
        if view.paused {
            return Fired::Idle;
        }
        let Some(next) = self.ticks.next_after(view.mark) else { return Fired::Idle };
        let due_at = next + self.ticks.jitter(&self.ctx.key, next);
        let now = self.shared.cluster_clock.now_ms();
        if due_at > now {
            return Fired::WaitUntil(due_at);
        }
        if !self.ctx.still_owner() {
            return Fired::Idle;
        }
        let token = self.ctx.token;
        let key = self.ctx.key.clone();
        let late = now - due_at > MISFIRE_GRACE.as_millis() as u64
            || self.ticks.next_after(next).is_some_and(|after| after <= now);
        let can_start = self.local.len() < concurrency
            && view.pending.iter().all(|p| self.local.contains_key(&p.run));
        let commands: Vec<Command> = if late {
            let plan = self.ticks.catch_up(Some(view.mark), now);
            if plan.fire.is_empty() {
                // Nothing of what was missed runs: the mark moves past it.
                let upto = self.ticks.latest_at(now).unwrap_or(next);
                info!(node = %self.shared.id, %key, missed = plan.missed, "missed ticks skipped by the catch-up policy");
                vec![Command::SkipTicks {
                    key: key.clone(),
                    token,
                    upto_ms: upto,
                    missed: plan.missed,
                }]
            } else {
                info!(node = %self.shared.id, %key, firing = plan.fire.len(), missed = plan.missed, "catching up missed ticks");
                let start =
                    if can_start && plan.fire.len() == 1 { Some(self.start_ms()) } else { None };
                plan.fire
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Command::Fire {
                        key: key.clone(),
                        token,
                        tick_ms: *t,
                        origin: TickOrigin::CatchUp,
                        missed: if i == 0 { plan.missed } else { 0 },
                        start_ms: start,
                    })
                    .collect()
            }
        } else {
            let start = if can_start { Some(self.start_ms()) } else { None };
            vec![Command::Fire {
                key: key.clone(),
                token,
                tick_ms: next,
                origin: TickOrigin::Scheduled,
                missed: 0,
                start_ms: start,
            }]
        };
        for c in &commands {
            if let Command::Fire { start_ms: Some(s), .. } = c {
                self.proposed_starts.insert(*s);
            }
        }
        match self.shared.proposer.write(commands.clone()).await {
            Ok(outcomes) => {
                for (c, o) in commands.iter().zip(outcomes) {
                    match c {
                        Command::Fire { tick_ms: t, .. }
                        | Command::SkipTicks { upto_ms: t, .. }
                            if matches!(o, Outcome::Fired { .. } | Outcome::TicksSkipped) =>
                        {
                            self.fired_mark = self.fired_mark.max(*t);
                        }
                        _ => {}
                    }
                    match (c, o) {
                        (
                            Command::Fire { tick_ms, origin, start_ms, .. },
                            Outcome::Fired { run: Some(run), started: true },
                        ) => {
                            // Started by this very write: nothing left to adopt later. (A
                            // refusal keeps the start: an earlier try of the same write may
                            // have been applied with it.)
                            if let Some(s) = start_ms {
                                self.proposed_starts.remove(s);
                            }
                            self.spawn(run, *tick_ms, *origin, 1)
                        }
                        (_, Outcome::Fired { .. } | Outcome::TicksSkipped) => {}
                        (_, Outcome::Rejected(Rejection::TooEarly { tick_ms, cluster_ms })) => {
                            // This node's view of the cluster's time is ahead: learn it, and
                            // wait for the tick by the cluster's clock.
                            self.shared.cluster_clock.learn(cluster_ms);
                            debug!(node = %self.shared.id, %key, tick_ms, cluster_ms, "tick not due yet by the cluster's clock");
                            return Fired::WaitUntil(
                                tick_ms.max(self.shared.cluster_clock.now_ms() + 1),
                            );
                        }
                        (_, Outcome::Rejected(Rejection::OutsideBounds)) => return Fired::Idle,
                        (_, other) => {
                            debug!(node = %self.shared.id, %key, outcome = %other, "fire refused")
                        }
                    }
                }
                Fired::Again
            }
            Err(WriteError::Timeout) => Fired::Again,
            Err(WriteError::Stopped(_)) => Fired::Idle,
        }
    }

    fn spawn(&mut self, run: u64, tick_ms: u64, origin: TickOrigin, attempt: u32) {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let shared = &self.shared;
        let tick = TickContext {
            key: self.ctx.key.clone(),
            node: shared.id,
            token: self.ctx.token,
            session: self.ctx.session,
            run,
            tick_ms,
            attempt,
            origin,
            cancel: cancel_rx,
            lease: shared.lease_watch(),
            clock: shared.clock,
        };
        let observer = shared.observer.clone();
        let (node, key, token) = (shared.id, self.ctx.key.clone(), self.ctx.token);
        let fut = (self.handler)(tick);
        let watch = shared.watch.task(key.clone(), 0, token);
        let span =
            info_span!("tick", node = %node, key = %key, token = %token, run, tick_ms, attempt);
        let stopped = Arc::new(TickStopped {
            observer: observer.clone(),
            node,
            key: key.clone(),
            token,
            run,
            reported: AtomicBool::new(false),
        });
        let guard = stopped.clone();
        let abort = self.runs.spawn(
            async move {
                if let Some(o) = &observer {
                    o.tick_started(node, &key, token, run, tick_ms, attempt, origin);
                }
                // Reported stopped however the run ends: returned, panicked or aborted.
                let _stopped = guard;
                let end = Watched::new(fut, watch).await;
                (run, RunEnd::Returned(end))
            }
            .instrument(span),
        );
        self.local.insert(run, LocalRun { cancel: cancel_tx, abort, stopping: false, stopped });
    }

    /// A run's task ended.
    fn ended(&mut self, done: Result<(u64, RunEnd), tokio::task::JoinError>) {
        let (run, end) = match done {
            Ok(x) => x,
            Err(e) => {
                let Some(run) =
                    self.local.iter().find(|(_, l)| l.abort.id() == e.id()).map(|(r, _)| *r)
                else {
                    return;
                };
                (run, if e.is_panic() { RunEnd::Panicked } else { RunEnd::Aborted })
            }
        };
        let Some(local) = self.local.remove(&run) else { return };
        self.finished.insert(run);
        if local.stopping {
            return;
        }
        let result = match end {
            RunEnd::Returned(None) => TickResult::Done,
            RunEnd::Returned(Some(e)) => TickResult::Failed(e),
            RunEnd::Panicked => TickResult::Failed("the handler panicked".into()),
            RunEnd::Aborted => return,
        };
        if let TickResult::Failed(e) = &result {
            warn!(node = %self.shared.id, key = %self.ctx.key, run, error = %e, "tick failed");
        }
        self.unreported.insert(run, (result, self.shared.cluster_clock.now_ms()));
    }

    /// Writes the ends of finished runs (while the ownership holds: past it, they are cut
    /// short as far as the cluster knows).
    async fn report_ends(&mut self) {
        // The lease, not the cancellation: a run that ended before its ownership did is
        // reported even while the task stops.
        let lease_holds = self.ctx.lease.borrow().valid_at(self.ctx.session, self.ctx.clock.now());
        if self.unreported.is_empty() || !lease_holds {
            return;
        }
        let token = self.ctx.token;
        let list: Vec<(u64, TickResult, u64)> =
            self.unreported.iter().map(|(r, (res, end))| (*r, res.clone(), *end)).collect();
        let commands: Vec<Command> = list
            .iter()
            .map(|(run, result, end_ms)| Command::TickDone {
                key: self.ctx.key.clone(),
                token,
                run: *run,
                result: result.clone(),
                end_ms: *end_ms,
            })
            .collect();
        match self.shared.proposer.write(commands).await {
            Ok(_) => {
                for (run, _, _) in list {
                    self.unreported.remove(&run);
                }
            }
            Err(e) => {
                debug!(node = %self.shared.id, key = %self.ctx.key, error = ?e, "reporting tick ends failed; will retry")
            }
        }
    }

    /// The ownership ends: every run is cancelled; ends reported before are kept, the rest
    /// count as cut short. The supervisor aborts this task (and with it the runs) at the end
    /// of the stop grace.
    async fn stop(&mut self) {
        for local in self.local.values_mut() {
            let _ = local.cancel.send(true);
            local.stopping = true;
        }
        // Ends that were in before the stop are still ours to report.
        self.report_ends().await;
        while let Some(done) = self.runs.join_next().await {
            self.ended(done);
        }
    }
}

enum Fired {
    /// Something was written: look at the state again.
    Again,
    /// The next tick falls due at this cluster time.
    WaitUntil(u64),
    /// Nothing to fire (paused, ended, or no longer the owner).
    Idle,
}

/// Reports a run stopped: when its task ends (returned, panicked, aborted) or when the
/// runner itself is dropped (the supervisor aborted it, the node was killed), whichever comes
/// first — aborted runs execute nothing after that, even if their task is dropped later.
struct TickStopped {
    observer: Option<Arc<dyn crate::observer::Observer>>,
    node: NodeId,
    key: Key,
    token: Token,
    run: u64,
    reported: AtomicBool,
}

impl TickStopped {
    fn report(&self) {
        if !self.reported.swap(true, Ordering::AcqRel)
            && let Some(o) = &self.observer
        {
            o.tick_stopped(self.node, &self.key, self.token, self.run);
        }
    }
}

impl Drop for TickStopped {
    fn drop(&mut self) {
        self.report();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.runs.abort_all();
        for local in self.local.values() {
            local.stopped.report();
        }
    }
}
