//! The task supervisor: runs a handler for every slot this node's session owns while its
//! lease holds, and stops it otherwise.
//!
//! A task is asked to stop (cancelled) when its slot is no longer this node's in the applied
//! state, or one stop grace before the lease deadline; it is aborted when the grace ends and
//! at the lease deadline at the latest. The leader gives the slot to another node no earlier
//! than `2 × margin` after that deadline, so the old task has stopped before the new one runs
//! — if it yields to the abort; the watchdog reports (or, with fail-stop, ends the process
//! for) a task that does not.
//!
//! A slot is given up only with its token (`Release`), and only once its task has ended; a
//! registration this node no longer has a handler for (a dropped `unregister`, a `register`
//! that timed out and landed late) is withdrawn here, once no slot of the key is held.
//! All times are on the node's lease clock.

use crate::node::{HandlerEntry, Shared};
use crate::proposer::WriteError;
use crate::raft::store::Changes;
use crate::task::{Acker, Lease, RestartPolicy, TaskContext, TaskProgress};
use crate::watchdog::Watched;
use highlander_core::{Command, Key, Message, Outcome, Seq, Token};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, Id, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// How many messages the delivery loop reads from the applied state at a time.
const DELIVERY_CHUNK: usize = 64;
/// How long acknowledgements gather before they are written together.
const ACK_DELAY: Duration = Duration::from_millis(2);

/// Requests from the node's API to the supervisor.
pub(crate) enum SupervisorCommand {
    /// Stop every task (cancel, then abort after `grace`), run no more, and answer with what
    /// to write before the session closes: the acknowledgements still to be written and a
    /// `Release` (with its token) for every slot whose task has ended. A task still running
    /// after its lease deadline keeps its slot.
    StopAll { grace: Duration, reply: oneshot::Sender<Vec<Command>> },
    /// The node's handlers changed: look again at what should run.
    Reconcile,
}

type SlotId = (Key, u32);

struct Running {
    token: Token,
    abort: AbortHandle,
    cancel: watch::Sender<bool>,
    /// Kept so that `recv` on a slot that gets no messages waits instead of ending.
    _inbox: mpsc::Sender<Message>,
    delivery: Option<AbortHandle>,
    progress: Arc<TaskProgress>,
    /// The handler's health deadline when the task started.
    health: Option<Duration>,
    started: Instant,
    stopping: Option<Stopping>,
}

struct Stopping {
    abort_at: Instant,
    then: AfterStop,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AfterStop {
    /// The slot is not ours any more (or the lease is lapsing): nothing to write.
    Nothing,
    /// Give the slot up.
    Release { hand_over: bool },
    /// The handler ended by itself: restart it after a backoff (same token).
    Restart,
}

struct Backoff {
    until: Instant,
    next: Duration,
}

/// The supervisor's state, owned by its loop.
///
/// A pass looks only at what changed: the keys the applied entries touched since the last
/// pass, keys whose handler changed, and slots whose task ended or whose restart is due. It
/// looks at every slot the session owns only when the node's standing changed (its session,
/// whether the lease still lets tasks run, a stop) or a snapshot replaced the state. With
/// 100,000 keys a pass for one entry costs that entry's keys, not the node's slots.
struct Supervisor {
    shared: Arc<Shared>,
    tasks: JoinSet<Option<String>>,
    deliveries: JoinSet<()>,
    running: BTreeMap<SlotId, Running>,
    by_id: BTreeMap<Id, SlotId>,
    /// The running tasks that were asked to stop, by slot.
    stopping: BTreeSet<SlotId>,
    /// The running tasks with a health deadline, by slot.
    health: BTreeSet<SlotId>,
    backoff: BTreeMap<(SlotId, Token), Backoff>,
    /// Tokens this node gave up (with their slots); never run again.
    given_up: BTreeMap<Token, SlotId>,
    /// Releases being written, so they are not written twice at once.
    releasing: Arc<Mutex<BTreeSet<Token>>>,
    /// Withdrawals of registrations without a handler being written.
    withdrawing: Arc<Mutex<BTreeSet<Key>>>,
    acker: Arc<Acker>,
    stopped: bool,
    /// Acknowledgements of tasks stopped by `stop_all`, for the final write.
    final_acks: Vec<Command>,
    /// The keys applied entries touched since the last pass.
    changes: Arc<Mutex<Changes>>,
    /// Keys to look at on the next pass for reasons of the supervisor's own (a task ended).
    pending: BTreeSet<Key>,
    /// The node's standing at the last pass; a pass with another standing looks at every slot.
    standing: Option<Standing>,
}

/// What decides, for every slot at once, whether tasks may run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Standing {
    session: Option<highlander_core::SessionId>,
    /// The session is live in the applied state.
    live: bool,
    /// The lease lets tasks run (more than a stop grace left).
    lease_ok: bool,
    has_deadline: bool,
    stopped: bool,
}

/// The keys a pass looks at.
enum Scope {
    All,
    Keys(BTreeSet<Key>),
}

impl Scope {
    fn contains(&self, key: &Key) -> bool {
        match self {
            Scope::All => true,
            Scope::Keys(keys) => keys.contains(key),
        }
    }
}

/// The slots `(key, 0..)` of one key in a map or set ordered by slot id.
fn key_range(key: &Key) -> std::ops::RangeInclusive<SlotId> {
    (key.clone(), 0)..=(key.clone(), u32::MAX)
}

pub(crate) async fn run(shared: Arc<Shared>, mut commands: mpsc::Receiver<SupervisorCommand>) {
    let acker = Arc::new(Acker::default());
    let mut s = Supervisor {
        shared: shared.clone(),
        tasks: JoinSet::new(),
        deliveries: JoinSet::new(),
        running: BTreeMap::new(),
        by_id: BTreeMap::new(),
        stopping: BTreeSet::new(),
        health: BTreeSet::new(),
        backoff: BTreeMap::new(),
        given_up: BTreeMap::new(),
        releasing: Arc::default(),
        withdrawing: Arc::default(),
        acker: acker.clone(),
        stopped: false,
        final_acks: Vec::new(),
        changes: shared.applied.changes(),
        pending: BTreeSet::new(),
        standing: None,
    };
    let mut applied = shared.applied.subscribe();
    let mut lease = shared.lease_watch();
    let mut ack_timer: Option<Instant> = None;
    let clock = shared.clock;
    loop {
        s.reconcile();
        let wake = s.next_wake(*lease.borrow());
        let ack_at = ack_timer.unwrap_or(Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            cmd = commands.recv() => match cmd {
                Some(SupervisorCommand::StopAll { grace, reply }) => {
                    let acks = s.stop_all(grace).await;
                    let _ = reply.send(acks);
                }
                Some(SupervisorCommand::Reconcile) => {}
                None => return,
            },
            Some(done) = s.tasks.join_next_with_id() => s.finished(done),
            Some(_) = s.deliveries.join_next() => {}
            changed = lease.changed() => if changed.is_err() { return },
            changed = applied.changed() => if changed.is_err() { return },
            _ = shared.handler_signal.notified() => {}
            _ = acker.signal.notified(), if ack_timer.is_none() => {
                ack_timer = Some(Instant::now() + ACK_DELAY);
            }
            _ = tokio::time::sleep_until(ack_at), if ack_timer.is_some() => {
                ack_timer = None;
                s.flush_acks();
            }
            _ = sleep_until_opt(clock, wake) => {}
        }
    }
}

async fn sleep_until_opt(clock: crate::clock::LeaseClock, at: Option<Instant>) {
    match at {
        Some(at) => clock.sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// The node's standing now (see [`Standing`]).
    fn standing(&self, lease: &Lease, now: Instant) -> Standing {
        let live = lease
            .session
            .is_some_and(|id| self.shared.applied.read().state.sessions.contains_key(&id));
        Standing {
            session: lease.session,
            live,
            // Stop asking tasks to run one grace before the lease runs out.
            lease_ok: lease.deadline.is_some_and(|d| now + self.shared.timing.stop_grace() < d),
            has_deadline: lease.deadline.is_some(),
            stopped: self.stopped || self.shared.is_stopping(),
        }
    }

    /// Of the slots in `scope`: those this node may run now, with their tokens, and those to
    /// hand over (which must stop, then be released): those the leader asked it to move, and
    /// those of keys this node no longer has a handler for (it is withdrawing from them).
    fn desired(
        &self,
        standing: &Standing,
        scope: &Scope,
        handlers: &BTreeMap<Key, Arc<HandlerEntry>>,
    ) -> (BTreeMap<SlotId, Token>, BTreeMap<SlotId, Token>) {
        let mut run = BTreeMap::new();
        let mut moving = BTreeMap::new();
        if standing.stopped {
            return (run, moving);
        }
        let Some(session) = standing.session else { return (run, moving) };
        let applied = self.shared.applied.read();
        let Some(s) = applied.state.sessions.get(&session) else { return (run, moving) };
        let owned: Box<dyn Iterator<Item = &SlotId>> = match scope {
            Scope::All => Box::new(s.owned.iter()),
            Scope::Keys(keys) => Box::new(keys.iter().flat_map(|k| s.owned.range(key_range(k)))),
        };
        for (key, slot) in owned {
            if let Some(owner) = applied.state.owner(key, *slot)
                && owner.session == session
                && !self.given_up.contains_key(&owner.token)
            {
                if owner.moving || !handlers.contains_key(key) {
                    moving.insert((key.clone(), *slot), owner.token);
                } else if standing.lease_ok {
                    run.insert((key.clone(), *slot), owner.token);
                }
            }
        }
        (run, moving)
    }

    /// What this pass looks at: everything if the standing changed or the state was
    /// replaced, else the keys that changed and the slots whose restart is due.
    fn scope(&mut self, standing: Standing, now: Instant) -> Scope {
        let changes = self.changes.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handler_changes = self.shared.take_handler_changes();
        let pending = std::mem::take(&mut self.pending);
        if changes.all || self.standing != Some(standing) {
            self.standing = Some(standing);
            return Scope::All;
        }
        let mut keys = changes.keys;
        keys.extend(handler_changes);
        keys.extend(pending);
        keys.extend(
            self.backoff
                .iter()
                .filter(|(_, b)| b.until <= now)
                .map(|((slot, _), _)| slot.0.clone()),
        );
        Scope::Keys(keys)
    }

    fn reconcile(&mut self) {
        let now = self.shared.clock.now();
        let lease = self.shared.lease();
        let standing = self.standing(&lease, now);
        let scope = self.scope(standing, now);
        if matches!(&scope, Scope::Keys(k) if k.is_empty()) && self.stopping.is_empty() {
            // Nothing changed: only the timers below could be due, and none runs.
            self.check_health(now);
            return;
        }
        // One copy of the handlers of this pass's keys: what runs and what is handed over
        // agree.
        let handlers: BTreeMap<Key, Arc<HandlerEntry>> = {
            let all = self.shared.handlers();
            match &scope {
                Scope::All => all.clone(),
                Scope::Keys(keys) => {
                    keys.iter().filter_map(|k| all.get(k).map(|h| (k.clone(), h.clone()))).collect()
                }
            }
        };
        let (desired, moving) = self.desired(&standing, &scope, &handlers);
        let grace = self.shared.timing.stop_grace();

        // Stop what must not run.
        let in_scope: Vec<SlotId> = match &scope {
            Scope::All => self.running.keys().cloned().collect(),
            Scope::Keys(keys) => keys
                .iter()
                .flat_map(|k| self.running.range(key_range(k)).map(|(id, _)| id.clone()))
                .collect(),
        };
        for slot_id in in_scope {
            let Some(r) = self.running.get_mut(&slot_id) else { continue };
            let keep = desired.get(&slot_id) == Some(&r.token);
            if keep || r.stopping.is_some() {
                if !keep
                    && lease.deadline.is_none()
                    && let Some(st) = r.stopping.as_mut()
                {
                    st.abort_at = now;
                }
                continue;
            }
            let abort_at = match lease.deadline {
                Some(d) => (now + grace).min(d),
                None => now,
            };
            // Asked to hand the slot over: release it once the task has stopped.
            let then = if moving.get(&slot_id) == Some(&r.token) {
                AfterStop::Release { hand_over: true }
            } else {
                AfterStop::Nothing
            };
            info!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, after = ?then, "stopping task");
            let _ = r.cancel.send(true);
            r.stopping = Some(Stopping { abort_at, then });
            self.stopping.insert(slot_id);
        }
        // Tasks asked to stop never run past the lease deadline.
        let mut due = Vec::new();
        for slot_id in &self.stopping {
            let Some(st) = self.running.get_mut(slot_id).and_then(|r| r.stopping.as_mut()) else {
                continue;
            };
            if let Some(d) = lease.deadline {
                st.abort_at = st.abort_at.min(d);
            }
            if st.abort_at <= now {
                due.push(slot_id.clone());
            }
        }
        for slot_id in due {
            if let Some(r) = self.running.get(&slot_id) {
                warn!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task did not stop in its grace period; aborting");
                r.abort.abort();
            }
        }

        self.check_health(now);

        // Slots to hand over that run nothing here: release them now.
        for (slot_id, token) in &moving {
            if !self.running.contains_key(slot_id) && !self.given_up.contains_key(token) {
                self.given_up.insert(*token, slot_id.clone());
                self.release(slot_id.clone(), *token, true, None);
            }
        }

        // Start what should run.
        self.backoff.retain(|(slot_id, token), _| {
            !scope.contains(&slot_id.0) || desired.get(slot_id) == Some(token)
        });
        for (slot_id, token) in &desired {
            if self.running.contains_key(slot_id) {
                continue;
            }
            if self.backoff.get(&(slot_id.clone(), *token)).is_some_and(|b| b.until > now) {
                continue;
            }
            match handlers.get(&slot_id.0) {
                Some(h) => self.start(slot_id.clone(), *token, h.clone(), &lease),
                None => {
                    // Assigned a key this node no longer handles: give it back.
                    self.given_up.insert(*token, slot_id.clone());
                    self.release(slot_id.clone(), *token, true, None);
                }
            }
        }

        self.withdraw_orphans(&standing, &scope, &handlers);

        // Forget given-up tokens the state no longer shows as ours.
        if !self.given_up.is_empty() {
            let applied = self.shared.applied.read();
            let releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.given_up.retain(|token, (key, slot)| {
                let ours = applied
                    .state
                    .owner(key, *slot)
                    .is_some_and(|o| o.token == *token && Some(o.session) == lease.session);
                ours || releasing.contains(token)
            });
        }
    }

    /// Hands over the slots of tasks that missed their health deadline.
    fn check_health(&mut self, now: Instant) {
        let grace = self.shared.timing.stop_grace();
        let mut missed = Vec::new();
        for slot_id in &self.health {
            let Some(r) = self.running.get(slot_id) else { continue };
            if r.stopping.is_none()
                && let Some(limit) = r.health
                && r.progress.last_beat() + limit <= now
            {
                missed.push(slot_id.clone());
            }
        }
        for slot_id in missed {
            let Some(r) = self.running.get_mut(&slot_id) else { continue };
            warn!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task missed its health deadline; handing the slot over");
            let _ = r.cancel.send(true);
            r.stopping = Some(Stopping {
                abort_at: now + grace,
                then: AfterStop::Release { hand_over: true },
            });
            self.health.remove(&slot_id);
            self.stopping.insert(slot_id);
        }
    }

    /// Withdraws the session's registrations (of the keys in `scope`) of keys this node has
    /// no handler for and holds no slot of: left behind by an `unregister` whose caller gave
    /// up, or by a `register` that timed out and landed anyway. Otherwise the leader would
    /// keep handing this node slots it can only give back.
    fn withdraw_orphans(
        &self,
        standing: &Standing,
        scope: &Scope,
        handlers: &BTreeMap<Key, Arc<HandlerEntry>>,
    ) {
        if standing.stopped {
            return;
        }
        let Some(session) = standing.session else { return };
        let orphans: Vec<(Key, u64)> = {
            let applied = self.shared.applied.read();
            let Some(s) = applied.state.sessions.get(&session) else { return };
            let registered: Box<dyn Iterator<Item = (&Key, &u64)>> = match scope {
                Scope::All => Box::new(s.keys.iter()),
                Scope::Keys(keys) => Box::new(keys.iter().filter_map(|k| s.keys.get_key_value(k))),
            };
            registered
                .filter(|(k, _)| !handlers.contains_key(*k))
                .filter(|(k, _)| s.owned.range(key_range(k)).next().is_none())
                .map(|(k, epoch)| (k.clone(), *epoch))
                .collect()
        };
        for (key, epoch) in orphans {
            if !self.withdrawing.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone()) {
                continue;
            }
            let shared = self.shared.clone();
            let withdrawing = self.withdrawing.clone();
            tokio::spawn(async move {
                // Covers the registration in force only: a newer one (the key registered
                // again meanwhile) makes the cluster refuse it.
                let command = Command::Unregister { session, key: key.clone(), epoch };
                let result = shared.proposer.write(vec![command]).await.map(|o| o.first().cloned());
                match &result {
                    Ok(outcome) => {
                        debug!(node = %shared.id, %key, ?outcome, "withdrew a registration without a handler")
                    }
                    Err(e) => {
                        debug!(node = %shared.id, %key, error = ?e, "withdrawal failed; will retry")
                    }
                }
                let result = result.map(|o| o.ok_or(()));
                let failed = !matches!(result, Ok(Ok(_)));
                withdrawing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                if failed {
                    // Looked at again on the next pass, which retries the withdrawal.
                    shared.handler_changed(&key);
                }
            });
        }
    }

    fn next_wake(&self, lease: Lease) -> Option<Instant> {
        let grace = self.shared.timing.stop_grace();
        let mut wake: Option<Instant> = None;
        let now = self.shared.clock.now();
        let mut at = |t: Instant| {
            if t > now {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        if let Some(d) = lease.deadline
            && !self.running.is_empty()
        {
            at(d.checked_sub(grace).unwrap_or(d));
            at(d);
        }
        for slot_id in &self.stopping {
            if let Some(st) = self.running.get(slot_id).and_then(|r| r.stopping.as_ref()) {
                at(st.abort_at);
            }
        }
        for b in self.backoff.values() {
            at(b.until);
        }
        for slot_id in &self.health {
            if let Some(r) = self.running.get(slot_id)
                && let Some(limit) = r.health
            {
                at(r.progress.last_beat() + limit);
            }
        }
        // Only future instants: anything already due was handled by `reconcile`, and a past
        // instant here would spin the loop (and freeze a paused clock).
        wake.filter(|w| *w > self.shared.clock.now())
    }

    fn start(&mut self, slot_id: SlotId, token: Token, handler: Arc<HandlerEntry>, lease: &Lease) {
        let shared = &self.shared;
        let Some(session) = lease.session else { return };
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let (inbox_tx, inbox_rx) = mpsc::channel(handler.options.inbox_capacity.max(1));
        let now = shared.clock.now();
        let progress = Arc::new(TaskProgress::new(now, slot_id.clone(), self.acker.clone()));
        let ctx = TaskContext {
            node: shared.id,
            key: slot_id.0.clone(),
            slot: slot_id.1,
            token,
            session,
            cancel: cancel_rx,
            inbox: inbox_rx,
            lease: shared.lease_watch(),
            progress: progress.clone(),
            observer: shared.observer.clone(),
            last_taken: None,
            clock: shared.clock,
        };
        let span = info_span!("task", node = %shared.id, key = %slot_id.0, slot = slot_id.1, token = %token);
        info!(parent: &span, "starting task");
        if let Some(o) = &shared.observer {
            o.task_started(shared.id, &slot_id.0, slot_id.1, token);
        }
        let watch = shared.watch.task(slot_id.0.clone(), slot_id.1, token);
        let fut = Watched::new((handler.run)(ctx), watch);
        let abort = self.tasks.spawn(fut.instrument(span.clone()));
        self.by_id.insert(abort.id(), slot_id.clone());
        let delivery = (slot_id.1 == 0).then(|| {
            self.deliveries.spawn(
                deliver(shared.clone(), slot_id.0.clone(), token, inbox_tx.clone())
                    .instrument(span),
            )
        });
        let health = handler.options.health_deadline;
        if health.is_some() {
            self.health.insert(slot_id.clone());
        }
        self.running.insert(
            slot_id,
            Running {
                token,
                abort,
                cancel: cancel_tx,
                _inbox: inbox_tx,
                delivery,
                progress,
                health,
                started: now,
                stopping: None,
            },
        );
    }

    /// A task's future ended (returned, panicked or was aborted).
    fn finished(&mut self, done: Result<(Id, Option<String>), tokio::task::JoinError>) {
        let (id, outcome) = match done {
            Ok((id, err)) => (
                id,
                match err {
                    None => "returned".to_string(),
                    Some(e) => format!("returned an error: {e}"),
                },
            ),
            Err(e) if e.is_panic() => (e.id(), "panicked".to_string()),
            Err(e) => (e.id(), "was aborted".to_string()),
        };
        let Some(slot_id) = self.by_id.remove(&id) else { return };
        let Some(r) = self.running.remove(&slot_id) else { return };
        self.stopping.remove(&slot_id);
        self.health.remove(&slot_id);
        // Looked at again on the next pass: the slot may be to run again, or to release.
        self.pending.insert(slot_id.0.clone());
        if let Some(d) = &r.delivery {
            d.abort();
        }
        let shared = self.shared.clone();
        if let Some(o) = &shared.observer {
            o.task_stopped(shared.id, &slot_id.0, slot_id.1, r.token);
        }
        let then = match &r.stopping {
            Some(st) => st.then,
            None if self.stopped || shared.is_stopping() => AfterStop::Nothing,
            None => match shared.handlers().get(&slot_id.0).map(|h| h.options.restart) {
                Some(RestartPolicy::HandOver) | None => AfterStop::Release { hand_over: true },
                Some(RestartPolicy::InPlace { .. }) => AfterStop::Restart,
            },
        };
        if outcome == "panicked" || outcome.starts_with("returned an error") {
            error!(node = %shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task {outcome}");
        } else {
            info!(node = %shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task {outcome}");
        }
        match then {
            AfterStop::Nothing => {}
            AfterStop::Restart => {
                let Some(RestartPolicy::InPlace { min, max }) =
                    shared.handlers().get(&slot_id.0).map(|h| h.options.restart)
                else {
                    return;
                };
                let key = (slot_id.clone(), r.token);
                let now = shared.clock.now();
                let ran = now.saturating_duration_since(r.started);
                let delay = match self.backoff.get(&key) {
                    Some(b) if ran < max => b.next,
                    _ => min,
                };
                info!(node = %shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, backoff_ms = delay.as_millis() as u64, "restarting in place");
                self.backoff
                    .insert(key, Backoff { until: now + delay, next: (delay * 2).min(max) });
            }
            AfterStop::Release { hand_over } => {
                self.given_up.insert(r.token, slot_id.clone());
                let ack = pending_ack(&slot_id, r.token, &r.progress);
                self.release(slot_id, r.token, hand_over, ack);
            }
        }
    }

    /// Writes `[ack?, Release]` in the background, retrying until it lands or the slot is no
    /// longer ours.
    fn release(&self, slot_id: SlotId, token: Token, hand_over: bool, ack: Option<Command>) {
        {
            let mut releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner());
            if !releasing.insert(token) {
                return;
            }
        }
        let shared = self.shared.clone();
        let releasing = self.releasing.clone();
        let mut commands: Vec<Command> = ack.into_iter().collect();
        commands.push(Command::Release {
            key: slot_id.0.clone(),
            slot: slot_id.1,
            token,
            hand_over,
        });
        tokio::spawn(async move {
            loop {
                match shared.proposer.write(commands.clone()).await {
                    Ok(_) => break,
                    Err(WriteError::Stopped(_)) => break,
                    Err(WriteError::Timeout) => {
                        let still_ours = shared
                            .applied
                            .read()
                            .state
                            .owner(&slot_id.0, slot_id.1)
                            .map(|o| o.token)
                            == Some(token);
                        if !still_ours {
                            break;
                        }
                    }
                }
            }
            releasing.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
        });
    }

    /// Writes the acknowledgements running tasks have made since the last write.
    fn flush_acks(&self) {
        let acks: Vec<(Command, Arc<TaskProgress>, u64)> = self
            .acker
            .take()
            .into_iter()
            .filter_map(|slot_id| {
                let r = self.running.get(&slot_id)?;
                let upto = r.progress.ack_upto.load(Ordering::Acquire);
                pending_ack(&slot_id, r.token, &r.progress).map(|c| (c, r.progress.clone(), upto))
            })
            .collect();
        if acks.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let commands: Vec<Command> = acks.iter().map(|(c, _, _)| c.clone()).collect();
            let written = shared.proposer.write(commands).await;
            let failed = matches!(written, Err(WriteError::Timeout));
            match written {
                Ok(outcomes) => {
                    for ((_, progress, upto), o) in acks.iter().zip(outcomes) {
                        if matches!(o, Outcome::Acked { .. }) {
                            progress.ack_committed.fetch_max(*upto, Ordering::AcqRel);
                        }
                    }
                }
                Err(e) => debug!(node = %shared.id, error = ?e, "ack write failed; will retry"),
            }
            // Anything acknowledged meanwhile, or not written, goes out with the next write.
            for (_, p, upto) in &acks {
                if failed || p.ack_upto.load(Ordering::Acquire) > *upto {
                    p.acker.mark(&p.slot);
                }
            }
        });
    }

    /// Cancels every task, waits up to `grace`, aborts the rest, and returns what to write
    /// before the session closes: the acknowledgements not yet written, and a `Release` with
    /// its token for every owned slot whose task has ended (or never ran). No task is started
    /// afterwards. A task that has not ended a slack after the lease deadline (it does not
    /// yield to its abort) is left to the watchdog, and its slot is not released.
    async fn stop_all(&mut self, grace: Duration) -> Vec<Command> {
        self.stopped = true;
        for r in self.running.values() {
            let _ = r.cancel.send(true);
        }
        // The grace never runs past the lease deadline, nor past an abort already scheduled:
        // a node cut off from the cluster may be shut down just before its lease lapses, and
        // the leader may give its slots away right after that deadline.
        let clock = self.shared.clock;
        let now = clock.now();
        let lease = self.shared.lease();
        let lease_end = lease.deadline.unwrap_or(now);
        let abort_at = self
            .running
            .values()
            .filter_map(|r| r.stopping.as_ref().map(|st| st.abort_at))
            .fold((now + grace).min(lease_end), Instant::min);
        let give_up_at = abort_at.max(lease_end) + self.shared.timing.lease_margin / 2;
        let mut aborted = false;
        while !self.running.is_empty() {
            let next = if aborted { give_up_at } else { abort_at };
            tokio::select! {
                Some(done) = self.tasks.join_next_with_id() => {
                    // Capture the ack before the entry disappears.
                    let slot = match &done {
                        Ok((id, _)) => self.by_id.get(id).cloned(),
                        Err(e) => self.by_id.get(&e.id()).cloned(),
                    };
                    let ack = slot.as_ref().and_then(|s| self.running.get(s).and_then(|r| pending_ack(s, r.token, &r.progress)));
                    self.finished(done);
                    if let Some(a) = ack {
                        self.final_acks.push(a);
                    }
                }
                _ = clock.sleep_until(next) => {
                    if aborted {
                        for (slot_id, r) in &self.running {
                            error!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task did not stop at its lease deadline; its slot is left to expire");
                        }
                        break;
                    }
                    for r in self.running.values() {
                        r.abort.abort();
                    }
                    aborted = true;
                }
            }
        }
        let mut commands = std::mem::take(&mut self.final_acks);
        let Some(session) = lease.session else { return commands };
        let applied = self.shared.applied.read();
        if let Some(s) = applied.state.sessions.get(&session) {
            for (key, slot) in &s.owned {
                let still_running = self.running.contains_key(&(key.clone(), *slot));
                if let Some(owner) = applied.state.owner(key, *slot)
                    && !still_running
                {
                    commands.push(Command::Release {
                        key: key.clone(),
                        slot: *slot,
                        token: owner.token,
                        hand_over: true,
                    });
                }
            }
        }
        commands
    }
}

impl Drop for Supervisor {
    /// The node was killed (its loops aborted): every task is aborted with the supervisor's
    /// task sets, and reported stopped now, when it stops running.
    fn drop(&mut self) {
        self.tasks.abort_all();
        self.deliveries.abort_all();
        if let Some(o) = &self.shared.observer {
            for ((key, slot), r) in &self.running {
                o.task_stopped(self.shared.id, key, *slot, r.token);
            }
        }
        self.running.clear();
    }
}

fn pending_ack(slot_id: &SlotId, token: Token, progress: &TaskProgress) -> Option<Command> {
    let upto = progress.ack_upto.load(Ordering::Acquire);
    (upto > progress.ack_committed.load(Ordering::Acquire)).then(|| Command::Ack {
        key: slot_id.0.clone(),
        token,
        upto: Seq(upto),
    })
}

/// Feeds the task's inbox from the key's queue in the applied state, in sequence order,
/// starting at the first unacknowledged message.
async fn deliver(shared: Arc<Shared>, key: Key, token: Token, inbox: mpsc::Sender<Message>) {
    // Woken by entries that touch this key only: with many keys, a send to one key does not
    // wake every task's delivery loop.
    let mut changes = shared.applied.watch_key(&key);
    let mut next: Option<Seq> = None;
    loop {
        let chunk: Vec<Message> = {
            let applied = shared.applied.read();
            match applied.state.keys.get(&key) {
                Some(k) if k.slots.first().copied().flatten().map(|o| o.token) == Some(token) => {
                    let from = *next.get_or_insert(k.queue.head().unwrap_or(Seq(k.queue.next_seq)));
                    k.queue.messages_from(from, DELIVERY_CHUNK).cloned().collect()
                }
                _ => Vec::new(),
            }
        };
        if chunk.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
            continue;
        }
        for m in chunk {
            next = Some(Seq(m.seq.0 + 1));
            if inbox.send(m).await.is_err() {
                return;
            }
        }
    }
}
