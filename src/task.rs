//! What a task sees: its [`TaskContext`], and the options that say how it is run.

use crate::clock::LeaseClock;
use crate::observer::Observer;
use highlander_core::{Key, Message, NodeId, Seq, SessionId, Token};
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

/// What the node's session keeper publishes: the live session and until when the node may
/// act as the owner of what the session owns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) session: Option<SessionId>,
    /// Renewed keepalive send time + TTL − margin; `None` until the first renewal.
    pub(crate) deadline: Option<Instant>,
}

impl Lease {
    pub(crate) fn valid_at(&self, session: SessionId, now: Instant) -> bool {
        self.session == Some(session) && self.deadline.is_some_and(|d| now < d)
    }
}

/// What happens when a task's handler returns or panics while the node still owns its slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Run the handler again on this node, with the same token, after a backoff that doubles
    /// from `min` to `max` (and starts again from `min` once a run lasted longer than `max`).
    InPlace {
        /// The first backoff.
        min: Duration,
        /// The longest backoff.
        max: Duration,
    },
    /// Release the slot so the leader gives it to another node if one can take it.
    HandOver,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::InPlace { min: Duration::from_millis(100), max: Duration::from_secs(10) }
    }
}

/// How a task is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOptions {
    /// What to do when the handler returns or panics.
    pub restart: RestartPolicy,
    /// If set, the handler must call [`TaskContext::heartbeat`] at least this often; when it
    /// misses the deadline the task is stopped and its slot handed over.
    pub health_deadline: Option<Duration>,
    /// How many delivered messages may wait in the task's inbox.
    pub inbox_capacity: usize,
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions { restart: RestartPolicy::default(), health_deadline: None, inbox_capacity: 64 }
    }
}

/// What a handler may return: `()` or a `Result` whose error is logged.
pub trait TaskResult: Send + 'static {
    /// The error text, if the run failed.
    fn into_error(self) -> Option<String>;
}

impl TaskResult for () {
    fn into_error(self) -> Option<String> {
        None
    }
}

impl<E: Display + Send + 'static> TaskResult for Result<(), E> {
    fn into_error(self) -> Option<String> {
        self.err().map(|e| e.to_string())
    }
}

pub(crate) type BoxedHandler =
    Arc<dyn Fn(TaskContext) -> highlander_core::BoxFuture<'static, Option<String>> + Send + Sync>;

/// Boxes a user's handler closure.
pub(crate) fn box_handler<F, Fut, R>(handler: F) -> BoxedHandler
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: TaskResult,
{
    Arc::new(move |ctx| {
        let fut = handler(ctx);
        Box::pin(async move { fut.await.into_error() })
    })
}

/// The slots whose tasks acknowledged messages since the supervisor last wrote their
/// acknowledgements, and the signal that wakes it: the write covers those slots only, not
/// every task of the node.
#[derive(Default)]
pub(crate) struct Acker {
    pub(crate) signal: Notify,
    dirty: Mutex<std::collections::BTreeSet<(Key, u32)>>,
}

impl Acker {
    /// Marks a slot as having acknowledgements to write, and wakes the supervisor.
    pub(crate) fn mark(&self, slot: &(Key, u32)) {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(slot.clone());
        self.signal.notify_one();
    }

    /// The slots marked since the last call.
    pub(crate) fn take(&self) -> std::collections::BTreeSet<(Key, u32)> {
        std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Shared between a running task's context and the supervisor: how far the task has
/// acknowledged, and when it last reported health.
pub(crate) struct TaskProgress {
    /// The highest sequence number the task has acknowledged (0: none).
    pub(crate) ack_upto: AtomicU64,
    /// The highest sequence number an `Ack` was committed for.
    pub(crate) ack_committed: AtomicU64,
    pub(crate) last_beat: Mutex<Instant>,
    /// The task's slot, as the acker knows it.
    pub(crate) slot: (Key, u32),
    pub(crate) acker: Arc<Acker>,
}

impl TaskProgress {
    pub(crate) fn new(now: Instant, slot: (Key, u32), acker: Arc<Acker>) -> TaskProgress {
        TaskProgress {
            ack_upto: AtomicU64::new(0),
            ack_committed: AtomicU64::new(0),
            last_beat: Mutex::new(now),
            slot,
            acker,
        }
    }

    fn ack(&self, seq: Seq) {
        if self.ack_upto.fetch_max(seq.0, Ordering::AcqRel) < seq.0 {
            self.acker.mark(&self.slot);
        }
    }

    pub(crate) fn last_beat(&self) -> Instant {
        *self.last_beat.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running task's view of its ownership and its messages.
///
/// The context is valid for one run of the handler. Check [`still_owner`](Self::still_owner)
/// (or compare [`token`](Self::token) downstream) before a side effect that must not happen
/// twice: a process pause can outlast any lease.
pub struct TaskContext {
    pub(crate) node: NodeId,
    pub(crate) key: Key,
    pub(crate) slot: u32,
    pub(crate) token: Token,
    pub(crate) session: SessionId,
    pub(crate) cancel: watch::Receiver<bool>,
    pub(crate) inbox: mpsc::Receiver<Message>,
    pub(crate) lease: watch::Receiver<Lease>,
    pub(crate) progress: Arc<TaskProgress>,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) last_taken: Option<Seq>,
    pub(crate) clock: LeaseClock,
}

impl TaskContext {
    /// The key this task runs.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Which slot of the key (always 0 for a singleton).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The fencing token of this ownership: larger than the token of every earlier owner of
    /// the slot. Pass it to downstream systems so they can refuse a stale owner.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The node running the task.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// Whether the task has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// Resolves when the task is asked to stop (its slot was released or reassigned, the
    /// node's lease is about to lapse, or the node shuts down). The task is aborted if it has
    /// not returned by the end of the grace period.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Whether the node still holds a valid lease for this ownership and the task has not
    /// been asked to stop. Cheap: reads local state only (the lease deadline on the node's
    /// own monotonic clock), so call it right before a side effect.
    pub fn still_owner(&self) -> bool {
        !self.is_cancelled() && self.lease.borrow().valid_at(self.session, self.clock.now())
    }

    /// The next message for this key, in sequence order; `None` once the task is asked to
    /// stop or its lease has passed. Calling it acknowledges the message returned by the
    /// previous call (if the lease still holds).
    ///
    /// Nothing is handed over after the lease deadline, whatever the state of the task: a
    /// process resumed after a pause longer than its lease gets `None` here before the
    /// supervisor has had a chance to cancel it, even if messages wait in its inbox.
    ///
    /// Messages are delivered at least once: a message taken but not acknowledged when the
    /// owner fails is delivered again to the next owner. Only slot 0 of a key receives
    /// messages; other slots wait here until cancelled.
    pub async fn recv(&mut self) -> Option<Message> {
        if let Some(prev) = self.last_taken {
            self.ack_upto(prev);
        }
        loop {
            if !self.still_owner() {
                return None;
            }
            let deadline = self.lease.borrow().deadline?;
            let clock = self.clock;
            let message = tokio::select! {
                biased;
                _ = wait_cancelled(&mut self.cancel) => return None,
                // At the deadline the lease is looked at again: renewed meanwhile, the wait
                // goes on until the new deadline; lapsed, nothing more is handed over.
                _ = clock.sleep_until(deadline) => continue,
                m = self.inbox.recv() => m?,
            };
            // A message is handed over only while the task may still act as the owner.
            if !self.still_owner() {
                return None;
            }
            self.last_taken = Some(message.seq);
            if let Some(o) = &self.observer {
                o.message_delivered(
                    self.node,
                    &self.key,
                    self.token,
                    message.seq,
                    &message.payload,
                );
            }
            return Some(message);
        }
    }

    /// Acknowledges every message returned by [`recv`](Self::recv) so far, if the lease still
    /// holds: past it, the messages are delivered again to the next owner.
    pub fn ack(&self) {
        if let Some(seq) = self.last_taken {
            self.ack_upto(seq);
        }
    }

    fn ack_upto(&self, seq: Seq) {
        if self.still_owner() {
            self.progress.ack(seq);
        }
    }

    /// Reports the task healthy, for [`TaskOptions::health_deadline`].
    pub fn heartbeat(&self) {
        *self.progress.last_beat.lock().unwrap_or_else(|e| e.into_inner()) = self.clock.now();
    }
}

async fn wait_cancelled(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|c| *c).await.is_err() {
        // The supervisor is gone (node killed): nothing will ever be delivered again.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander_core::Payload;
    use std::time::Duration;

    /// A context as the supervisor builds it, with a message already in its inbox.
    fn context(
        lease: &watch::Sender<Lease>,
    ) -> (TaskContext, watch::Sender<bool>, mpsc::Sender<Message>) {
        let (cancel_tx, cancel) = watch::channel(false);
        let (inbox_tx, inbox) = mpsc::channel(8);
        let ctx = TaskContext {
            node: NodeId(1),
            key: Key::new("k").unwrap(),
            slot: 0,
            token: Token(7),
            session: SessionId(1),
            cancel,
            inbox,
            lease: lease.subscribe(),
            progress: Arc::new(TaskProgress::new(
                Instant::now(),
                (Key::new("k").unwrap(), 0),
                Arc::default(),
            )),
            observer: None,
            last_taken: None,
            clock: LeaseClock::new(1.0),
        };
        (ctx, cancel_tx, inbox_tx)
    }

    fn message(seq: u64) -> Message {
        Message { seq: Seq(seq), payload: Payload::from(vec![seq as u8]) }
    }

    /// Finding 4 of the safety audit: after a pause longer than its lease, a task took the
    /// messages waiting in its inbox before the supervisor had cancelled it. `recv` checks
    /// the lease itself: past the deadline it hands nothing over and acknowledges nothing.
    #[tokio::test(start_paused = true)]
    async fn recv_hands_nothing_over_after_the_lease_deadline() {
        let deadline = Instant::now() + Duration::from_secs(2);
        let lease =
            watch::channel(Lease { session: Some(SessionId(1)), deadline: Some(deadline) }).0;
        let (mut ctx, _cancel, inbox) = context(&lease);
        inbox.send(message(1)).await.unwrap();
        inbox.send(message(2)).await.unwrap();
        assert_eq!(ctx.recv().await.map(|m| m.seq), Some(Seq(1)));
        // The process is "paused" past its deadline: nobody cancelled the task, and a message
        // waits in its inbox.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!ctx.is_cancelled());
        assert!(!ctx.still_owner());
        assert_eq!(ctx.recv().await.map(|m| m.seq), None, "a message taken past the lease");
        ctx.ack();
        assert_eq!(ctx.progress.ack_upto.load(Ordering::Acquire), 0, "acknowledged past the lease");
    }

    /// Waiting in `recv` ends at the lease deadline, even if nothing else happens.
    #[tokio::test(start_paused = true)]
    async fn recv_returns_at_the_lease_deadline() {
        let deadline = Instant::now() + Duration::from_secs(2);
        let lease =
            watch::channel(Lease { session: Some(SessionId(1)), deadline: Some(deadline) }).0;
        let (mut ctx, _cancel, _inbox) = context(&lease);
        let started = Instant::now();
        assert_eq!(ctx.recv().await.map(|m| m.seq), None);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        // A renewal while waiting moves the deadline on.
        let lease2 = watch::channel(Lease {
            session: Some(SessionId(1)),
            deadline: Some(Instant::now() + Duration::from_secs(1)),
        })
        .0;
        let (mut ctx, _cancel, _inbox) = context(&lease2);
        let renew = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            lease2.send_replace(Lease {
                session: Some(SessionId(1)),
                deadline: Some(Instant::now() + Duration::from_secs(1)),
            });
        };
        let started = Instant::now();
        let (got, ()) = tokio::join!(ctx.recv(), renew);
        assert!(got.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(1500));
    }
}
