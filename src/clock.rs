//! The one source of wall-clock time, injectable so that simulations are reproducible.
//!
//! Everything else in the runtime measures time with `tokio::time`, which the simulator
//! pauses and advances.

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
    use super::LeaseClock;
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
