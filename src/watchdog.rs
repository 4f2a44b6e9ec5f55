//! The lease watchdog: a thread of its own that sees a task still executing after the lease
//! deadline of its ownership, and says so — or, with fail-stop, ends the process.
//!
//! Stopping a task is cooperative: at the lease deadline the supervisor aborts it, and the
//! abort takes effect the next time the task yields. A handler stuck in synchronous code
//! (a blocking call, a long computation) does not yield, so it outlives the lease while the
//! cluster may already have given its key to another node: two owners at once. Nothing
//! inside the process can stop such a thread; only exiting the process can, which is what
//! controllers built on leases do when they lose theirs (Kubernetes' leader election exits).
//!
//! Every task's future is wrapped in a [`Watched`] that marks when it is inside `poll`. This
//! thread compares that with the node's lease deadline, in real time, without needing the
//! node's runtime to make progress (a stuck handler may block it). A task inside `poll` more
//! than half the lease margin after the deadline is an *overrun*: logged as an error with
//! its key, slot and token, counted, listed in `status`, and, if the node was built with
//! [`fail_stop`](crate::NodeBuilder::fail_stop), the process exits with
//! [`FAIL_STOP_EXIT_CODE`] — still before any other node can have been given the key, which
//! takes two margins past the deadline.

use highlander_core::wire::OverrunReport;
use highlander_core::{Key, NodeId, Token};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The exit code of a process that a fail-stop node ended because a task outlived its lease
/// (EX_SOFTWARE). A supervisor (systemd, Kubernetes) restarts it; the key has moved by then.
pub const FAIL_STOP_EXIT_CODE: i32 = 70;

/// The longest the thread sleeps between looks, so status stays current while overruns last.
const LOOK_EVERY: Duration = Duration::from_millis(100);

struct Registry {
    epoch: Instant,
    nodes: Mutex<Vec<Weak<NodeWatch>>>,
    wake: Condvar,
}

fn registry() -> &'static Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry {
            epoch: Instant::now(),
            nodes: Mutex::default(),
            wake: Condvar::new(),
        });
        let r = registry.clone();
        std::thread::Builder::new()
            .name("highlander-watchdog".into())
            .spawn(move || r.run())
            .expect("the watchdog thread starts");
        registry
    })
}

impl Registry {
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn run(&self) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            nodes.retain(|n| n.strong_count() > 0);
            let now = Instant::now();
            let mut next = now + LOOK_EVERY;
            for node in nodes.iter().filter_map(Weak::upgrade) {
                if let Some(at) = node.look(self, now) {
                    next = next.min(at);
                }
            }
            let wait = next.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            nodes = self.wake.wait_timeout(nodes, wait).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// What the watchdog knows of one node: the lease deadline its tasks are bound by, and the
/// tasks.
pub(crate) struct NodeWatch {
    node: NodeId,
    fail_stop: bool,
    slack: Duration,
    /// The lease deadline (registry ms; 0 for none yet). A lapsed session keeps its last
    /// deadline: its tasks were bound by it.
    bound: AtomicU64,
    tasks: Mutex<Vec<Weak<TaskWatch>>>,
    /// The list's length at which ended tasks are next swept out.
    sweep_at: AtomicUsize,
    overruns: Mutex<BTreeMap<(Key, u32, Token), u64>>,
    overruns_total: AtomicU64,
}

/// One running task, as the watchdog sees it.
pub(crate) struct TaskWatch {
    key: Key,
    slot: u32,
    token: Token,
    /// Registry ms at which the current `poll` began; 0 while not in `poll`.
    in_poll_since: AtomicU64,
    reported: AtomicBool,
}

impl NodeWatch {
    /// Watches the tasks of `node`; `slack` past a deadline, a task still executing is an
    /// overrun.
    pub(crate) fn new(node: NodeId, slack: Duration, fail_stop: bool) -> Arc<NodeWatch> {
        let watch = NodeWatch::unregistered(node, slack, fail_stop);
        let r = registry();
        r.nodes.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&watch));
        r.wake.notify_all();
        watch
    }

    /// A watch the thread does not look at (tests look themselves).
    fn unregistered(node: NodeId, slack: Duration, fail_stop: bool) -> Arc<NodeWatch> {
        Arc::new(NodeWatch {
            node,
            fail_stop,
            slack,
            bound: AtomicU64::new(0),
            tasks: Mutex::default(),
            sweep_at: AtomicUsize::new(64),
            overruns: Mutex::default(),
            overruns_total: AtomicU64::new(0),
        })
    }

    /// The lease deadline the node's tasks are bound by now, in real time.
    pub(crate) fn set_deadline(&self, deadline: tokio::time::Instant) {
        let r = registry();
        self.bound.store(r.ms(deadline.into_std()), Ordering::Release);
        r.wake.notify_all();
    }

    /// Registers a task about to run.
    pub(crate) fn task(&self, key: Key, slot: u32, token: Token) -> Arc<TaskWatch> {
        let task = Arc::new(TaskWatch {
            key,
            slot,
            token,
            in_poll_since: AtomicU64::new(0),
            reported: AtomicBool::new(false),
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Ended tasks are swept once the list has doubled since the last sweep: a sweep per
        // start would cost the number of tasks each time.
        if tasks.len() >= self.sweep_at.load(Ordering::Relaxed) {
            tasks.retain(|t| t.strong_count() > 0);
            self.sweep_at.store((tasks.len() * 2).max(64), Ordering::Relaxed);
        }
        tasks.push(Arc::downgrade(&task));
        task
    }

    /// Tasks executing past the deadline now, and how many ever did.
    pub(crate) fn overruns(&self) -> (Vec<OverrunReport>, u64) {
        let list = self
            .overruns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((key, slot, token), past)| OverrunReport {
                key: key.clone(),
                slot: *slot,
                token: *token,
                past_deadline_ms: *past,
            })
            .collect();
        (list, self.overruns_total.load(Ordering::Relaxed))
    }

    /// One look: reports overruns; returns when the next look is due.
    fn look(&self, r: &Registry, now: Instant) -> Option<Instant> {
        let bound = self.bound.load(Ordering::Acquire);
        if bound == 0 {
            return None;
        }
        let limit = bound + self.slack.as_millis() as u64;
        let now_ms = r.ms(now);
        let tasks: Vec<Arc<TaskWatch>> = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut overruns = BTreeMap::new();
        if now_ms > limit {
            for t in &tasks {
                if t.in_poll_since.load(Ordering::Acquire) == 0 {
                    continue;
                }
                let past = now_ms - bound;
                overruns.insert((t.key.clone(), t.slot, t.token), past);
                if !t.reported.swap(true, Ordering::AcqRel) {
                    self.overruns_total.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        node = %self.node, key = %t.key, slot = t.slot, token = %t.token, past_deadline_ms = past,
                        "a task is still running after the lease deadline of its ownership: \
                         another node may own the key now. It does not yield to cancellation \
                         (blocking or long synchronous code?)"
                    );
                    if self.fail_stop {
                        eprintln!(
                            "highlander: node {}: task {}/{} ({}) outlived its lease by {past} ms; \
                             fail-stop: exiting with code {FAIL_STOP_EXIT_CODE}",
                            self.node, t.key, t.slot, t.token
                        );
                        std::process::exit(FAIL_STOP_EXIT_CODE);
                    }
                }
            }
        }
        *self.overruns.lock().unwrap_or_else(|e| e.into_inner()) = overruns;
        let due = r.epoch + Duration::from_millis(limit);
        (due > now).then_some(due + Duration::from_millis(1))
    }
}

impl TaskWatch {
    fn enter(&self) {
        self.in_poll_since.store(registry().ms(Instant::now()), Ordering::Release);
    }

    fn leave(&self) {
        self.in_poll_since.store(0, Ordering::Release);
    }
}

/// A task's future, marked while it executes.
pub(crate) struct Watched<F> {
    inner: Pin<Box<F>>,
    watch: Arc<TaskWatch>,
}

impl<F> Watched<F> {
    pub(crate) fn new(inner: F, watch: Arc<TaskWatch>) -> Watched<F> {
        Watched { inner: Box::pin(inner), watch }
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.watch.enter();
        let out = self.inner.as_mut().poll(cx);
        self.watch.leave();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task inside `poll` past its deadline (plus the slack) is reported; one that is not
    /// executing, or a look before the slack has passed, reports nothing. The look is made
    /// directly, at chosen instants, rather than by waiting for the thread.
    #[test]
    fn a_task_executing_past_its_deadline_is_an_overrun() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let watch = NodeWatch::unregistered(NodeId(9), Duration::from_millis(25), false);
        let key = Key::new("stuck").unwrap();
        let stuck = watch.task(key.clone(), 0, Token(3));
        let idle = watch.task(Key::new("idle").unwrap(), 0, Token(4));
        let deadline = rt.block_on(async { tokio::time::Instant::now() });
        watch.set_deadline(deadline);
        stuck.enter();
        let r = registry();
        let at = |ms| deadline.into_std() + Duration::from_millis(ms);
        assert!(watch.look(r, at(10)).is_some(), "before the slack: look again later");
        assert_eq!(watch.overruns(), (vec![], 0));
        watch.look(r, at(40));
        let (list, total) = watch.overruns();
        assert_eq!(total, 1);
        assert_eq!(list.len(), 1, "only the task inside poll: {list:?}");
        assert_eq!((list[0].key.clone(), list[0].token), (key, Token(3)));
        // Counted once, however long it lasts; listed while it lasts.
        watch.look(r, at(90));
        assert_eq!(watch.overruns().1, 1);
        stuck.leave();
        watch.look(r, at(95));
        assert_eq!(watch.overruns(), (vec![], 1));
        drop(idle);
    }
}
