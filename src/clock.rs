//! The one source of wall-clock time, injectable so that simulations are reproducible, and
//! the cluster's time of day that schedules fire by.
//!
//! Everything else in the runtime measures time with `tokio::time`, which the simulator
//! pauses and advances.

use highlander_core::{Command, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads wall-clock time. Used where a value must differ between runs of a process (a node's
/// incarnation), never for leases, which use the monotonic clock.
pub trait WallClock: Send + Sync + 'static {
    /// Time since the Unix epoch.
    fn since_epoch(&self) -> Duration;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn since_epoch(&self) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
}

/// The cluster's time of day, in milliseconds since the Unix epoch: what schedules fire by.
///
/// Every keepalive carries its sender's wall clock, so the leader knows how each node's clock
/// differs from its own. The cluster's time is the **lower median** of the clocks it has
/// heard from recently, its own included: one wrong clock — the leader's too — cannot move
/// it, and with an even count it leans early, which only makes ticks later. The leader stamps
/// it on every entry that needs it ([`Command::Stamp`]) and the state machine refuses a tick
/// later than the stamp, so a node whose clock runs ahead cannot fire early; keepalive
/// answers carry it too, so every node fires by it rather than by its own clock.
pub(crate) struct ClusterClock {
    wall: Arc<dyn WallClock>,
    /// Cluster time − this node's wall clock, learned from the leader's answers.
    offset_ms: AtomicI64,
    /// Leader side: each node's wall clock − this node's, as its last keepalive showed, and
    /// when that was heard (on `tokio::time`).
    peers: Mutex<BTreeMap<NodeId, (i64, tokio::time::Instant)>>,
}

/// How long a node's clock reading counts for the median after its last keepalive.
const CLOCK_FRESH: Duration = Duration::from_secs(10);

impl ClusterClock {
    pub(crate) fn new(wall: Arc<dyn WallClock>) -> ClusterClock {
        ClusterClock { wall, offset_ms: AtomicI64::new(0), peers: Mutex::default() }
    }

    /// This node's wall clock.
    pub(crate) fn wall_ms(&self) -> u64 {
        self.wall.since_epoch().as_millis() as u64
    }

    /// This node's best view of the cluster's time of day.
    pub(crate) fn now_ms(&self) -> u64 {
        let now = self.wall_ms() as i64 + self.offset_ms.load(Ordering::Relaxed);
        now.max(0) as u64
    }

    /// How far the cluster's time is ahead of this node's wall clock.
    pub(crate) fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Learns the cluster's time from a leader's answer received now. The answer's way back
    /// is not counted: the estimate errs early by it, which makes ticks later, not earlier.
    pub(crate) fn learn(&self, cluster_ms: u64) {
        let offset = cluster_ms as i64 - self.wall_ms() as i64;
        self.offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Leader side: a keepalive `node` sent at `their_ms` on its wall clock arrived now.
    pub(crate) fn heard(&self, node: NodeId, their_ms: u64) {
        let offset = their_ms as i64 - self.wall_ms() as i64;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.insert(node, (offset, tokio::time::Instant::now()));
    }

    /// Leader side: the cluster's time now, if the clocks of at least `needed` nodes (this
    /// one included) were heard from recently.
    pub(crate) fn cluster_ms(&self, me: NodeId, needed: usize) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut offsets: Vec<i64> = vec![0];
        {
            let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            offsets.extend(
                peers
                    .iter()
                    .filter(|(n, (_, at))| {
                        **n != me && now.saturating_duration_since(*at) < CLOCK_FRESH
                    })
                    .map(|(_, (o, _))| *o),
            );
        }
        if offsets.len() < needed.max(1) {
            return None;
        }
        offsets.sort_unstable();
        let median = offsets[(offsets.len() - 1) / 2];
        Some((self.wall_ms() as i64 + median).max(0) as u64)
    }
}

/// Whether a leader must put a [`Command::Stamp`] in front of these commands (one of them
/// needs the cluster's time); `Err` if a client sent a stamp of its own: only a leader writes
/// one.
pub(crate) fn stamp_for(commands: &[Command]) -> Result<bool, String> {
    if commands.iter().any(|c| matches!(c, Command::Stamp { .. })) {
        return Err("a write may not carry a time stamp; the leader writes it".into());
    }
    Ok(commands.iter().any(Command::needs_stamp))
}

/// The monotonic clock a node measures its leases with: its session lease, its tasks'
/// deadlines, and (when it leads) how long each session has been silent.
///
/// In production it is `tokio::time` itself. A simulation can make one node's clock run
/// fast or slow ([`NodeBuilder::clock_rate`](crate::NodeBuilder::clock_rate)) to check what
/// the lease argument assumes: that clocks *run at* nearly the same rate. Local instants are
/// `tokio::time::Instant`s on the node's own timeline, which starts at the node's start.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LeaseClock {
    origin: tokio::time::Instant,
    /// Local seconds per real second; exactly 1.0 unless a simulation says otherwise.
    rate: f64,
}

impl LeaseClock {
    /// A clock running at `rate` times real time, from now.
    pub(crate) fn new(rate: f64) -> LeaseClock {
        LeaseClock { origin: tokio::time::Instant::now(), rate }
    }

    /// Now, on this node's timeline.
    pub(crate) fn now(&self) -> tokio::time::Instant {
        self.to_local(tokio::time::Instant::now())
    }

    fn to_local(self, real: tokio::time::Instant) -> tokio::time::Instant {
        if self.rate == 1.0 {
            return real;
        }
        self.origin + real.saturating_duration_since(self.origin).mul_f64(self.rate)
    }

    /// The real instant at which this node's clock shows `local`.
    pub(crate) fn to_real(self, local: tokio::time::Instant) -> tokio::time::Instant {
        if self.rate == 1.0 {
            return local;
        }
        self.origin + local.saturating_duration_since(self.origin).div_f64(self.rate)
    }

    /// Sleeps until this node's clock shows `local`.
    pub(crate) async fn sleep_until(&self, local: tokio::time::Instant) {
        tokio::time::sleep_until(self.to_real(local)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{ClusterClock, LeaseClock, WallClock};
    use highlander_core::NodeId;
    use std::sync::Arc;

    struct Fixed(u64);

    impl WallClock for Fixed {
        fn since_epoch(&self) -> Duration {
            Duration::from_millis(self.0)
        }
    }

    /// One clock 30 s off, the leader's or another's, does not move the cluster's time.
    #[tokio::test(start_paused = true)]
    async fn the_cluster_time_is_the_lower_median_of_the_clocks() {
        // The leader is 30 s fast; the two others are right.
        let fast_leader = ClusterClock::new(Arc::new(Fixed(130_000)));
        assert_eq!(fast_leader.cluster_ms(NodeId(1), 2), None, "too few clocks known");
        fast_leader.heard(NodeId(2), 100_000);
        assert_eq!(fast_leader.cluster_ms(NodeId(1), 2), Some(100_000));
        fast_leader.heard(NodeId(3), 100_005);
        assert_eq!(fast_leader.cluster_ms(NodeId(1), 2), Some(100_005));
        // The leader is right; a follower is 30 s fast.
        let leader = ClusterClock::new(Arc::new(Fixed(100_000)));
        leader.heard(NodeId(2), 130_000);
        assert_eq!(leader.cluster_ms(NodeId(1), 2), Some(100_000));
        leader.heard(NodeId(3), 100_010);
        assert_eq!(leader.cluster_ms(NodeId(1), 2), Some(100_010));
        // A clock not heard from for a while no longer counts.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(leader.cluster_ms(NodeId(1), 2), None);
        // A node learns the cluster's time from the leader's answers.
        let slow = ClusterClock::new(Arc::new(Fixed(70_000)));
        slow.learn(100_000);
        assert_eq!((slow.now_ms(), slow.offset_ms()), (100_000, 30_000));
    }
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_fast_clock_sees_more_time_pass() {
        let fast = LeaseClock::new(1.05);
        let exact = LeaseClock::new(1.0);
        let (f0, e0) = (fast.now(), exact.now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fast.now() - f0, Duration::from_millis(2100));
        assert_eq!(exact.now() - e0, Duration::from_secs(2));
        // Waiting 2.1 s on the fast clock takes 2 s of real time.
        let start = tokio::time::Instant::now();
        fast.sleep_until(fast.now() + Duration::from_millis(2100)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
