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
    /// The most jobs the job table holds that have not finished (scheduled, available,
    /// running or retryable). An enqueue beyond it is refused with `JobsFull`.
    pub max_open_jobs: u32,
    /// The most payload bytes those unfinished jobs hold together.
    pub max_open_job_bytes: u64,
    /// The most job queues that exist at once (a queue exists while it holds an unfinished
    /// job or has caps configured). An enqueue to a new queue beyond it is refused.
    pub max_job_queues: u32,
    /// The largest result a job's handler may record with its completion, in bytes.
    pub max_job_result_bytes: u32,
    /// Finished jobs (completed, dead, cancelled) kept for `job`, `wait` and the dead-letter
    /// list: at most this many, the oldest dropped first.
    pub keep_finished_jobs: u32,
    /// ... holding at most this many bytes (payload, result and errors).
    pub keep_finished_job_bytes: u64,
    /// ... and each for at most this long after it finished, in milliseconds of the
    /// cluster's time of day.
    pub keep_finished_job_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::STANDARD
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
    /// One job would not fit in the job table.
    #[error("max_payload_bytes ({payload}) must not exceed max_open_job_bytes ({jobs})")]
    PayloadExceedsJobs {
        /// The payload limit.
        payload: u32,
        /// The limit on unfinished jobs' bytes.
        jobs: u64,
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
    /// The defaults: 1 MiB payloads; 100,000 messages and 16 MiB per key, 48 MiB in all;
    /// 1,000,000 unfinished jobs holding at most 256 MiB, in at most 1,024 queues; job
    /// results up to 64 KiB; finished jobs kept 24 h, at most 100,000 of them and 64 MiB.
    pub const STANDARD: Limits = Limits {
        max_payload_bytes: 1 << 20,
        max_messages_per_key: 100_000,
        max_bytes_per_key: 16 << 20,
        max_total_bytes: 48 << 20,
        max_open_jobs: 1_000_000,
        max_open_job_bytes: 256 << 20,
        max_job_queues: 1024,
        max_job_result_bytes: 64 << 10,
        keep_finished_jobs: 100_000,
        keep_finished_job_bytes: 64 << 20,
        keep_finished_job_ms: 24 * 3600 * 1000,
    };

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
        if self.max_open_jobs == 0 {
            return Err(LimitsError::Zero("max_open_jobs"));
        }
        if self.max_job_queues == 0 {
            return Err(LimitsError::Zero("max_job_queues"));
        }
        if u64::from(self.max_payload_bytes) > self.max_open_job_bytes {
            return Err(LimitsError::PayloadExceedsJobs {
                payload: self.max_payload_bytes,
                jobs: self.max_open_job_bytes,
            });
        }
        if self.max_job_result_bytes > MAX_PAYLOAD_LIMIT {
            return Err(LimitsError::PayloadTooLarge(self.max_job_result_bytes));
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
