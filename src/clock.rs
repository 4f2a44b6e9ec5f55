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
