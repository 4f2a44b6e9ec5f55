//! Bounds on what the replicated state holds.

use serde::{Deserialize, Serialize};

/// How much the message queues may hold. The cluster adopts the limits of the first node that
/// opens a session; a node configured differently is refused with
/// [`Rejection::LimitsMismatch`](crate::Rejection::LimitsMismatch), because the state machine
/// must apply every command the same way on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// The largest message payload, in bytes.
    pub max_payload_bytes: u32,
    /// The most messages one key's queue holds.
    pub max_messages_per_key: u32,
    /// The most payload bytes one key's queue holds.
    pub max_bytes_per_key: u64,
    /// The most payload bytes all queues together hold.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_messages_per_key: 100_000,
            max_bytes_per_key: 16 << 20,
            max_total_bytes: 48 << 20,
        }
    }
}

/// A limit that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    /// A limit was zero.
    #[error("limit `{0}` must be greater than zero")]
    Zero(&'static str),
    /// One message would not fit in its own key's queue.
    #[error("max_payload_bytes ({payload}) must not exceed max_bytes_per_key ({per_key})")]
    PayloadExceedsKey {
        /// The payload limit.
        payload: u32,
        /// The per-key byte limit.
        per_key: u64,
    },
    /// One key's queue would not fit in the total.
    #[error("max_bytes_per_key ({per_key}) must not exceed max_total_bytes ({total})")]
    KeyExceedsTotal {
        /// The per-key byte limit.
        per_key: u64,
        /// The total byte limit.
        total: u64,
    },
    /// A payload larger than a wire frame could never be replicated.
    #[error("max_payload_bytes ({0}) must be at most {max} bytes, the largest payload a frame carries", max = MAX_PAYLOAD_LIMIT)]
    PayloadTooLarge(u32),
}

/// The largest value `max_payload_bytes` may take (16 MiB): one message must fit in a frame
/// with room to spare.
pub const MAX_PAYLOAD_LIMIT: u32 = 16 << 20;

impl Limits {
    /// Checks that the limits are consistent.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if self.max_payload_bytes == 0 {
            return Err(LimitsError::Zero("max_payload_bytes"));
        }
        if self.max_messages_per_key == 0 {
            return Err(LimitsError::Zero("max_messages_per_key"));
        }
        if self.max_bytes_per_key == 0 {
            return Err(LimitsError::Zero("max_bytes_per_key"));
        }
        if self.max_total_bytes == 0 {
            return Err(LimitsError::Zero("max_total_bytes"));
        }
        if self.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return Err(LimitsError::PayloadTooLarge(self.max_payload_bytes));
        }
        if u64::from(self.max_payload_bytes) > self.max_bytes_per_key {
            return Err(LimitsError::PayloadExceedsKey {
                payload: self.max_payload_bytes,
                per_key: self.max_bytes_per_key,
            });
        }
        if self.max_bytes_per_key > self.max_total_bytes {
            return Err(LimitsError::KeyExceedsTotal {
                per_key: self.max_bytes_per_key,
                total: self.max_total_bytes,
            });
        }
        Ok(())
    }
}
