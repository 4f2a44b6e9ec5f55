//! Durable storage for a highlander node: the Raft log and hard state in a segmented
//! write-ahead log, the state machine's snapshots in checksummed files, and the file-system
//! boundary both are written against.
//!
//! What this crate does:
//!
//! - **Log** ([`Wal`]): preallocated segment files of chained-CRC32C records. An append is one
//!   `write` and one `fdatasync`, and it is acknowledged only after both. Truncating a
//!   conflicting suffix and purging a prefix are durable before they return; the purge point
//!   is written before any segment is deleted.
//! - **Hard state**: vote, committed id and purge point in a two-slot checksummed file.
//! - **Identity** ([`Identity`]): which node a directory belongs to and which Raft member its
//!   storage is, so that a node whose storage was lost never comes back as the member it was.
//! - **Recovery** ([`open`]): every record is validated. A torn tail (the unacknowledged write
//!   of a crash) is cut and synced; damage to bytes that were once durable — a bad record
//!   with valid later writes after it, a missing segment, hard state that disagrees with the
//!   log or the snapshots — refuses to open, naming the file and offset.
//! - **Snapshots** ([`SnapshotStore`]): opaque bytes in files written under a temporary name,
//!   synced, verified, renamed and the directory synced; the newest two are kept.
//! - **openraft** ([`LogStore`]): `RaftLogStorage` + `RaftLogReader` for any type
//!   configuration with `NodeId = u64` whose entries serialize with serde.
//! - **Inspection** ([`inspect`]): the same checks read-only, for `wal verify` / `wal dump`.
//! - **[`Fs`]**: [`RealFs`] for production and [`SimFs`], a deterministic simulator of power
//!   loss (unsynced writes dropped or torn at sector granularity, unsynced directory
//!   operations lost, failing `fdatasync`).
//!
//! What it never does:
//!
//! - acknowledge a write before `fdatasync` has returned, or retry a failed sync: an I/O
//!   error stops the log for good ([`WalError::Poisoned`]) and the node must restart from
//!   what is on disk;
//! - repair anything but the tail: corruption in the middle is reported, never skipped;
//! - panic on bad bytes or I/O errors;
//! - interpret snapshot bytes or run a state machine: the runtime owns both;
//! - spawn anything but the optional I/O thread of a [`LogStore`] ([`IoMode::Thread`]).
//!
//! # Wiring it into a node
//!
//! 1. **Open** the data directory once at start: [`open`] takes the directory lock, recovers
//!    the log, loads the newest valid snapshot and checks that hard state, log and snapshot
//!    agree. Its [`Opened`] has the four parts below.
//! 2. **State machine**: rebuild the in-memory state from `opened.snapshot` (its `data` and
//!    `meta` are the bytes the runtime gave when saving it) and keep `opened.snapshots`
//!    ([`SnapshotStore`], cheap to clone) in the `RaftStateMachine`:
//!    - `build_snapshot`: copy the state under a short lock, encode it off the apply path and
//!      [`SnapshotStore::save`] it (or stream it: [`SnapshotStore::begin`], write,
//!      [`SnapshotWriter::finish`]). It is durable when this returns, which is what makes
//!      openraft's purge that follows safe; the log refuses a purge no snapshot covers.
//!    - receiving a snapshot from the leader: stream its chunks into
//!      [`SnapshotStore::begin`] as they arrive, [`SnapshotWriter::seal`] it (synced, read
//!      back), [`SealedSnapshot::read_data`] and check it; `install_snapshot` then
//!      [publishes](SealedSnapshot::publish) that file (or writes the bytes like a built
//!      one), and only then swaps the in-memory state. openraft asks for the purge that
//!      follows without waiting for the install: wait until the snapshot is durable first.
//!    - `get_current_snapshot`: [`SnapshotStore::latest`] and [`SnapshotStore::load`]
//!      (verified), or [`SnapshotStore::open_reader`] to stream it to a peer.
//! 3. **Log**: `LogStore::<TypeConfig>::new(opened.wal, IoMode::Thread)` is openraft's
//!    `RaftLogStorage`; pass it to `Raft::new`. Any storage error it returns stops Raft
//!    (fail-stop), as it must.
//! 4. **Restart in the same process** (tests, the simulator): after `Raft::shutdown`, wait
//!    until `opened.lock` ([`LockWatch`]) says the directory is released; openraft drops its
//!    state machine in a task of its own.
//! 5. **Simulator**: give every node a [`SimFs`] (shared across its restarts) and
//!    [`IoMode::Inline`]; between a node's stop and its restart call
//!    [`SimFs::crash`]`(CrashMode::Torn)` so that what was not synced may be lost.
//!
//! ```no_run
//! # fn main() -> Result<(), highlander_wal::WalError> {
//! use highlander_wal::{IoMode, Options, RealFs};
//! let opened = highlander_wal::open(RealFs::shared(), "/var/lib/app/node-1", Options::default())?;
//! if let Some(snapshot) = &opened.snapshot {
//!     // decode snapshot.meta / snapshot.data into the state machine
//! #   let _ = snapshot;
//! }
//! // let log = highlander_wal::LogStore::<TypeConfig>::new(opened.wal, IoMode::Thread)?;
//! // let raft = openraft::Raft::new(id, config, network, log, state_machine).await?;
//! # let _ = IoMode::Thread; Ok(()) }
//! ```

#![warn(missing_docs)]

mod datadir;
mod error;
pub mod format;
pub mod fs;
mod hardstate;
mod identity;
mod inspect;
mod raft;
mod snapshot;
mod wal;

pub use datadir::{LockWatch, Opened, Options, Recovery, open};
pub use error::{Result, WalError};
pub use fs::{CrashMode, Fs, RealFs, SimFs};
pub use identity::{Identity, read_identity, write_identity};
pub use inspect::{Inspection, inspect};
pub use raft::{IoMode, LogReader, LogStore, decode_entry, encode_entry, entry_id, log_id};
pub use snapshot::{
    LoadedSnapshot, SealedSnapshot, SnapshotInfo, SnapshotReader, SnapshotRecovery, SnapshotStore,
    SnapshotWriter,
};
pub use wal::{LogRecovery, LogState, Wal, WalOptions, WalReader};

/// A log entry's id: the leader id (term and node) that created it, and its index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId {
    /// The term of the leader that created the entry.
    pub term: u64,
    /// The node id of that leader.
    pub node: u64,
    /// The entry's position in the log.
    pub index: u64,
}

/// A saved vote: for whom (term and node) and whether it was granted by a quorum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StoredVote {
    /// The term voted in.
    pub term: u64,
    /// The node voted for.
    pub node: u64,
    /// Whether a quorum granted it (the node became leader).
    pub committed: bool,
}

/// Raft's hard state as the hard-state file holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The last vote saved.
    pub vote: Option<StoredVote>,
    /// The last committed entry the node knew of (written lazily; may lag).
    pub committed: Option<EntryId>,
    /// The last entry deleted by a purge.
    pub last_purged: Option<EntryId>,
}
