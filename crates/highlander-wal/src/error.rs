//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// Why a storage operation failed. An `Io` error from a write or sync *poisons* the
/// [`Wal`](crate::Wal): every later write fails with [`WalError::Poisoned`], because the
/// kernel may already have dropped the data (never retry a failed fsync and acknowledge).
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file-system call failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// Another process (or another open in this one) holds the data directory.
    #[error(
        "data directory {} is locked by another process{}: two nodes must never share one \
         data directory",
        dir.display(),
        holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// What the holder recorded about itself (its pid and executable).
        holder: Option<String>,
    },
    /// Bytes that were once durable are damaged: the store refuses to open rather than
    /// silently lose acknowledged entries. Keep the file for inspection.
    #[error("corrupt {} at offset {offset}: {reason}; refusing to open", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file was written by a format version this build does not read.
    #[error("{} has format version {found}; this build reads version {supported}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// Hard state, log and snapshots disagree in a way no crash can explain.
    #[error("storage invariant violated: {0}; refusing to open")]
    Invariant(String),
    /// An earlier write or sync failed; the store accepts no more writes. Restart the node
    /// so that it recovers from what is on disk.
    #[error("storage stopped after an earlier I/O failure: {0}")]
    Poisoned(String),
    /// The caller asked for something the log cannot do (a hole, a purged index, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// An entry did not encode or decode.
    #[error("codec: {0}")]
    Codec(String),
}

impl WalError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> WalError {
        WalError::Io { op, path: path.into(), source }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        WalError::Corrupt { path: path.into(), offset, reason: reason.into() }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = WalError> = std::result::Result<T, E>;
