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
use crate::task::{Lease, RestartPolicy, TaskContext, TaskProgress};
use crate::watchdog::Watched;
use highlander_core::{Command, Key, Message, Outcome, Seq, Token};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot, watch};
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
struct Supervisor {
    shared: Arc<Shared>,
    tasks: JoinSet<Option<String>>,
    deliveries: JoinSet<()>,
    running: BTreeMap<SlotId, Running>,
    by_id: BTreeMap<Id, SlotId>,
    backoff: BTreeMap<(SlotId, Token), Backoff>,
    /// Tokens this node gave up; never run again.
    given_up: BTreeSet<Token>,
    /// Releases being written, so they are not written twice at once.
    releasing: Arc<std::sync::Mutex<BTreeSet<Token>>>,
    /// Withdrawals of registrations without a handler being written.
    withdrawing: Arc<std::sync::Mutex<BTreeSet<Key>>>,
    acker: Arc<Notify>,
    stopped: bool,
    /// Acknowledgements of tasks stopped by `stop_all`, for the final write.
    final_acks: Vec<Command>,
}

pub(crate) async fn run(shared: Arc<Shared>, mut commands: mpsc::Receiver<SupervisorCommand>) {
    let acker = Arc::new(Notify::new());
    let mut s = Supervisor {
        shared: shared.clone(),
        tasks: JoinSet::new(),
        deliveries: JoinSet::new(),
        running: BTreeMap::new(),
        by_id: BTreeMap::new(),
        backoff: BTreeMap::new(),
        given_up: BTreeSet::new(),
        releasing: Arc::default(),
        withdrawing: Arc::default(),
        acker: acker.clone(),
        stopped: false,
        final_acks: Vec::new(),
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
            _ = acker.notified(), if ack_timer.is_none() => {
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
    /// The slots this node may run now, with their tokens, and the slots to hand over (which
    /// must stop, then be released): those the leader asked it to move, and those of keys
    /// this node no longer has a handler for (it is withdrawing from them).
    fn desired(
        &self,
        lease: &Lease,
        now: Instant,
        handlers: &BTreeMap<Key, Arc<HandlerEntry>>,
    ) -> (BTreeMap<SlotId, Token>, BTreeMap<SlotId, Token>) {
        let mut run = BTreeMap::new();
        let mut moving = BTreeMap::new();
        if self.stopped || self.shared.is_stopping() {
            return (run, moving);
        }
        let Some(session) = lease.session else { return (run, moving) };
        let applied = self.shared.applied.read();
        let Some(s) = applied.state.sessions.get(&session) else { return (run, moving) };
        // Stop asking tasks to run one grace before the lease runs out.
        let lease_ok = lease.deadline.is_some_and(|d| now + self.shared.timing.stop_grace() < d);
        for (key, slot) in &s.owned {
            if let Some(owner) = applied.state.owner(key, *slot)
                && owner.session == session
                && !self.given_up.contains(&owner.token)
            {
                if owner.moving || !handlers.contains_key(key) {
                    moving.insert((key.clone(), *slot), owner.token);
                } else if lease_ok {
                    run.insert((key.clone(), *slot), owner.token);
                }
            }
        }
        (run, moving)
    }

    fn reconcile(&mut self) {
        let now = self.shared.clock.now();
        let lease = self.shared.lease();
        // One copy of the handlers for this pass: what runs and what is handed over agree.
        let handlers = self.shared.handlers().clone();
        let (desired, moving) = self.desired(&lease, now, &handlers);
        let grace = self.shared.timing.stop_grace();

        // Stop what must not run.
        for (slot_id, r) in self.running.iter_mut() {
            let keep = desired.get(slot_id) == Some(&r.token);
            if keep || r.stopping.is_some() {
                if !keep {
                    if let (Some(st), Some(d)) = (r.stopping.as_mut(), lease.deadline) {
                        // Never past the lease deadline.
                        st.abort_at = st.abort_at.min(d);
                    } else if lease.deadline.is_none()
                        && let Some(st) = r.stopping.as_mut()
                    {
                        st.abort_at = now;
                    }
                }
                continue;
            }
            let abort_at = match lease.deadline {
                Some(d) => (now + grace).min(d),
                None => now,
            };
            // Asked to hand the slot over: release it once the task has stopped.
            let then = if moving.get(slot_id) == Some(&r.token) {
                AfterStop::Release { hand_over: true }
            } else {
                AfterStop::Nothing
            };
            info!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, after = ?then, "stopping task");
            let _ = r.cancel.send(true);
            r.stopping = Some(Stopping { abort_at, then });
        }
        let due: Vec<SlotId> = self
            .running
            .iter()
            .filter(|(_, r)| r.stopping.as_ref().is_some_and(|st| st.abort_at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for slot_id in due {
            if let Some(r) = self.running.get(&slot_id) {
                warn!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task did not stop in its grace period; aborting");
                r.abort.abort();
            }
        }

        // Health deadlines.
        for (slot_id, r) in self.running.iter_mut() {
            if r.stopping.is_some() {
                continue;
            }
            let Some(h) = handlers.get(&slot_id.0) else { continue };
            if let Some(limit) = h.options.health_deadline
                && r.progress.last_beat() + limit <= now
            {
                warn!(node = %self.shared.id, key = %slot_id.0, slot = slot_id.1, token = %r.token, "task missed its health deadline; handing the slot over");
                let _ = r.cancel.send(true);
                r.stopping = Some(Stopping {
                    abort_at: now + grace,
                    then: AfterStop::Release { hand_over: true },
                });
            }
        }

        // Slots to hand over that run nothing here: release them now.
        for (slot_id, token) in &moving {
            if !self.running.contains_key(slot_id) && !self.given_up.contains(token) {
                self.given_up.insert(*token);
                self.release(slot_id.clone(), *token, true, None);
            }
        }

        // Start what should run.
        self.backoff.retain(|(slot_id, token), _| desired.get(slot_id) == Some(token));
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
                    self.given_up.insert(*token);
                    self.release(slot_id.clone(), *token, true, None);
                }
            }
        }

        self.withdraw_orphans(&lease, &handlers);

        // Forget given-up tokens the state no longer shows as ours.
        if !self.given_up.is_empty() {
            let applied = self.shared.applied.read();
            let session = lease.session;
            let still: BTreeSet<Token> = session
                .and_then(|s| applied.state.sessions.get(&s))
                .map(|s| {
                    s.owned
                        .iter()
                        .filter_map(|(k, slot)| applied.state.owner(k, *slot))
                        .map(|o| o.token)
                        .collect()
                })
                .unwrap_or_default();
            let releasing = self.releasing.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.given_up.retain(|t| still.contains(t) || releasing.contains(t));
        }
    }

    /// Withdraws the session's registrations of keys this node has no handler for and holds
    /// no slot of: left behind by an `unregister` whose caller gave up, or by a `register`
    /// that timed out and landed anyway. Otherwise the leader would keep handing this node
    /// slots it can only give back.
    fn withdraw_orphans(&self, lease: &Lease, handlers: &BTreeMap<Key, Arc<HandlerEntry>>) {
        if self.stopped || self.shared.is_stopping() {
            return;
        }
        let Some(session) = lease.session else { return };
        let orphans: Vec<(Key, u64)> = {
            let applied = self.shared.applied.read();
            let Some(s) = applied.state.sessions.get(&session) else { return };
            s.keys
                .iter()
                .filter(|(k, _)| !handlers.contains_key(*k))
                .filter(|(k, _)| !s.owned.iter().any(|(owned, _)| owned == *k))
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
                match shared.proposer.write(vec![command]).await {
                    Ok(outcomes) => {
                        debug!(node = %shared.id, %key, outcome = ?outcomes.first(), "withdrew a registration without a handler")
                    }
                    Err(e) => {
                        debug!(node = %shared.id, %key, error = ?e, "withdrawal failed; will retry")
                    }
                }
                withdrawing.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
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
        for r in self.running.values() {
            if let Some(st) = &r.stopping {
                at(st.abort_at);
            }
        }
        for b in self.backoff.values() {
            at(b.until);
        }
        let handlers = self.shared.handlers().clone();
        for (slot_id, r) in &self.running {
            if let Some(limit) = handlers.get(&slot_id.0).and_then(|h| h.options.health_deadline) {
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
        let progress = Arc::new(TaskProgress::new(now, self.acker.clone()));
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
        self.running.insert(
            slot_id,
            Running {
                token,
                abort,
                cancel: cancel_tx,
                _inbox: inbox_tx,
                delivery,
                progress,
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
                self.given_up.insert(r.token);
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
            .running
            .iter()
            .filter_map(|(slot_id, r)| {
                let upto = r.progress.ack_upto.load(Ordering::Acquire);
                pending_ack(slot_id, r.token, &r.progress).map(|c| (c, r.progress.clone(), upto))
            })
            .collect();
        if acks.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let commands: Vec<Command> = acks.iter().map(|(c, _, _)| c.clone()).collect();
            match shared.proposer.write(commands).await {
                Ok(outcomes) => {
                    for ((_, progress, upto), o) in acks.iter().zip(outcomes) {
                        if matches!(o, Outcome::Acked { .. }) {
                            progress.ack_committed.fetch_max(*upto, Ordering::AcqRel);
                        }
                    }
                }
                Err(e) => {
                    debug!(node = %shared.id, error = ?e, "ack write failed; will retry with the next ack")
                }
            }
            // Anything acknowledged meanwhile goes out with the next notification.
            if acks.iter().any(|(_, p, upto)| p.ack_upto.load(Ordering::Acquire) > *upto)
                && let Some((_, p, _)) = acks.first()
            {
                p.acker.notify_one();
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
    let mut changes = shared.applied.subscribe();
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
