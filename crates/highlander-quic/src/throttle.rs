//! Rate-limited warnings: a peer that misbehaves in a loop must not flood the log.

use highlander_core::NodeId;
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// What went wrong, one warning per kind per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// Datagrams that are not QUIC for this node.
    Garbage,
    /// A handshake refused for its certificate.
    BadCertificate,
    /// A handshake refused for its protocol version (ALPN).
    ProtocolVersion,
    /// Any other failed inbound handshake.
    Handshake,
    /// A frame longer than its limit.
    Oversized,
    /// A frame that does not decode, or a broken stream layout.
    Malformed,
    /// A stream that stalled.
    Stalled,
    /// A connection that has all its request slots busy.
    Busy,
    /// A dialed peer that is someone else, or refused us.
    Dial,
    /// A response that does not decode.
    BadResponse,
    /// A handler that panicked.
    Panic,
    /// Renewing the cluster-secret certificate failed.
    Renewal,
}

/// What a warning is about: its kind, and the peer if it is an authenticated member (never a
/// network address, which a stranger could vary to grow the map without bound).
pub(crate) type Key = (Kind, Option<NodeId>);

/// Lets one warning per key through per window and counts the rest.
pub(crate) struct Throttle {
    window: Duration,
    state: Mutex<BTreeMap<Key, (Instant, u64)>>,
}

impl Throttle {
    pub(crate) fn new(window: Duration) -> Throttle {
        Throttle { window, state: Mutex::new(BTreeMap::new()) }
    }

    /// `Some(n)` if a warning about `key` may be logged now, `n` being how many were held
    /// back since the last one; `None` if it should be held back (log it at debug instead).
    pub(crate) fn allow(&self, key: Key) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.get_mut(&key) {
            Some((last, held)) if now.saturating_duration_since(*last) < self.window => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let n = *held;
                *last = now;
                *held = 0;
                Some(n)
            }
            None => {
                state.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Logs a warning through the throttle, or at debug level when held back.
macro_rules! warn_throttled {
    ($throttle:expr, $key:expr, $($arg:tt)+) => {
        match $throttle.allow($key) {
            Some(held_back) => tracing::warn!(held_back, $($arg)+),
            None => tracing::debug!($($arg)+),
        }
    };
}
pub(crate) use warn_throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_warning_per_window() {
        let t = Throttle::new(Duration::from_secs(10));
        assert_eq!(t.allow((Kind::Garbage, None)), Some(0));
        assert_eq!(t.allow((Kind::Garbage, None)), None);
        assert_eq!(t.allow((Kind::Oversized, Some(NodeId(1)))), Some(0));
        assert_eq!(t.allow((Kind::Oversized, Some(NodeId(2)))), Some(0));
        assert_eq!(t.allow((Kind::Garbage, None)), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(t.allow((Kind::Garbage, None)), Some(2));
    }
}
