//! The in-memory Raft log and state machine.
//!
//! [`MemStorage`] stands for a node's disk: the vote, the log, the committed id and the latest
//! snapshot live in it and survive a simulated crash and restart of the node. The applied
//! [`ClusterState`] is volatile, as in a real process: after a restart it is rebuilt from the
//! snapshot and the committed log, which openraft replays.

// openraft's `StorageError` is large; it is the trait's error type, so it is returned as is.
#![allow(clippy::result_large_err)]

use super::{LogId, Member, TypeConfig};
use highlander_core::{ClusterState, Key, Outcome, codec};
use highlander_wal::{
    Fs, Identity, IoMode, LockWatch, RealFs, SealedSnapshot, SnapshotStore, SnapshotWriter,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::watch;

type StorageResult<T> = Result<T, StorageError<u64>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn into a second panic here; the data is still consistent
    // because every critical section below completes or changes nothing.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn storage_error(subject: ErrorSubject<u64>, verb: ErrorVerb, msg: String) -> StorageError<u64> {
    StorageError::from_io_error(subject, verb, std::io::Error::other(msg))
}

/// A node's durable storage kept in memory: hand the same value to a restarted node (as the
/// simulator does) and it finds its vote, log and snapshot as a disk would have kept them.
#[derive(Clone, Default)]
pub struct MemStorage {
    disk: Arc<Mutex<Disk>>,
}

impl std::fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = lock(&self.disk);
        f.debug_struct("MemStorage")
            .field("log_entries", &d.log.len())
            .field("boots", &d.boots)
            .finish()
    }
}

impl MemStorage {
    /// Empty storage, as on a node's first start.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Counts a start of the node and returns the count (1 on the first start).
    pub(crate) fn next_boot(&self) -> u64 {
        let mut d = lock(&self.disk);
        d.boots += 1;
        d.boots
    }

    /// The number of log entries held (after compaction).
    pub fn log_len(&self) -> usize {
        lock(&self.disk).log.len()
    }
}

#[derive(Default)]
struct Disk {
    vote: Option<Vote<u64>>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    snapshot: Option<StoredSnapshot>,
    boots: u64,
    identity: Option<Identity>,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, Member>,
    data: Vec<u8>,
}

/// The in-memory log. Clones share the same storage (openraft's replication tasks read
/// through clones).
#[derive(Clone)]
pub(crate) struct MemLog {
    storage: MemStorage,
}

impl MemLog {
    pub(crate) fn new(storage: MemStorage) -> MemLog {
        MemLog { storage }
    }
}

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let d = lock(&self.storage.disk);
        Ok(d.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let d = lock(&self.storage.disk);
        let last = d.log.values().next_back().map(|e| e.log_id).or(d.last_purged);
        Ok(LogState { last_purged_log_id: d.last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        lock(&self.storage.disk).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(lock(&self.storage.disk).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        lock(&self.storage.disk).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        Ok(lock(&self.storage.disk).committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        {
            let mut d = lock(&self.storage.disk);
            for e in entries {
                d.log.insert(e.log_id.index, e);
            }
        }
        // Memory is "durable" as soon as it is written.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StorageResult<()> {
        let mut d = lock(&self.storage.disk);
        let _ = d.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        let mut d = lock(&self.storage.disk);
        // The purge point is recorded first, so the log state stays correct if the log
        // becomes empty.
        d.last_purged = Some(log_id);
        let keep = d.log.split_off(&(log_id.index + 1));
        d.log = keep;
        Ok(())
    }
}

/// Where a node keeps Raft's log and snapshots: what survives its restart.
pub enum Storage {
    /// In memory: for the simulator and for ephemeral nodes that are never restarted under
    /// the same id.
    Memory(MemStorage),
    /// In a data directory: the write-ahead log and snapshot files of `highlander-wal`.
    Disk(DiskStorage),
}

impl From<MemStorage> for Storage {
    fn from(m: MemStorage) -> Storage {
        Storage::Memory(m)
    }
}

impl From<DiskStorage> for Storage {
    fn from(d: DiskStorage) -> Storage {
        Storage::Disk(d)
    }
}

/// A data directory for the write-ahead log and snapshots.
#[derive(Clone)]
pub struct DiskStorage {
    pub(crate) fs: Arc<dyn Fs>,
    pub(crate) dir: PathBuf,
    pub(crate) io: IoMode,
    pub(crate) options: highlander_wal::Options,
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage").field("dir", &self.dir).field("io", &self.io).finish()
    }
}

impl DiskStorage {
    /// The directory `dir` on the real file system. Log writes and their `fdatasync` run on
    /// a thread of their own, so no executor thread blocks on the disk.
    pub fn new(dir: impl Into<PathBuf>) -> DiskStorage {
        DiskStorage {
            fs: Arc::new(RealFs),
            dir: dir.into(),
            io: IoMode::Thread,
            options: highlander_wal::Options::default(),
        }
    }

    /// The directory `dir` on another file system, such as the simulator's power-loss
    /// [`SimFs`](highlander_wal::SimFs). I/O runs on the calling task, so a paused clock
    /// cannot run ahead of a write.
    /// Segments are small (256 KiB), since a simulated disk keeps them in memory.
    pub fn simulated(fs: Arc<dyn Fs>, dir: impl Into<PathBuf>) -> DiskStorage {
        let mut options = highlander_wal::Options::default();
        options.wal.segment_size = 256 << 10;
        DiskStorage { fs, dir: dir.into(), io: IoMode::Inline, options }
    }
}

/// The log, whichever storage holds it, and how far the durable snapshot reaches (the log
/// is never purged past it).
pub(crate) enum Log {
    Mem(MemLog, Coverage, Tail),
    Wal(Box<highlander_wal::LogStore<TypeConfig>>, Coverage, Tail),
}

impl Log {
    /// The id of the log's last entry, kept current as the log changes.
    pub(crate) fn tail(&self) -> Tail {
        let (Log::Mem(_, _, tail) | Log::Wal(_, _, tail)) = self;
        tail.clone()
    }

    /// Records the log's last id after a change that may have moved it back or past entries.
    async fn reread_tail(&mut self) -> StorageResult<()> {
        let state = self.get_log_state().await?;
        let (Log::Mem(_, _, tail) | Log::Wal(_, _, tail)) = self;
        tail.set(state.last_log_id);
        Ok(())
    }
}

/// The id of the last entry in the log (or the last purged one, if none is left): what
/// openraft 0.9's state knows but does not expose, for pre-vote's comparison of logs.
#[derive(Clone, Default)]
pub(crate) struct Tail(Arc<Mutex<Option<LogId>>>);

impl Tail {
    /// The last log id.
    pub(crate) fn get(&self) -> Option<LogId> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, last: Option<LogId>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = last;
    }
}

/// How far the newest durable snapshot reaches: its last log index + 1 (0 for none). The
/// state machine moves it after a snapshot is durable; the log waits on it before a purge.
#[derive(Clone)]
pub(crate) struct Coverage(Arc<watch::Sender<u64>>);

/// How long a purge waits for the snapshot that covers it. openraft asks for the purge as
/// soon as it has handed a received snapshot to the state machine, without waiting for the
/// install; purging first would leave, after a crash, a log that starts where no snapshot
/// reaches. The install is a rename by then, so the wait is short; if it never completes,
/// the purge is refused and the node stops.
const PURGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Coverage {
    fn new(last: Option<LogId>) -> Coverage {
        Coverage(Arc::new(watch::channel(last.map_or(0, |l| l.index + 1)).0))
    }

    /// Records that a snapshot up to `last` is durable.
    fn advance(&self, last: Option<LogId>) {
        let reach = last.map_or(0, |l| l.index + 1);
        self.0.send_if_modified(|c| {
            let more = reach > *c;
            *c = (*c).max(reach);
            more
        });
    }

    /// Waits until a durable snapshot covers `index`; false if none does within the wait.
    async fn wait_covers(&self, index: u64) -> bool {
        let mut rx = self.0.subscribe();
        matches!(tokio::time::timeout(PURGE_WAIT, rx.wait_for(|c| *c > index)).await, Ok(Ok(_)))
    }
}

/// A reader of the log, whichever storage holds it.
#[derive(Clone)]
pub(crate) enum Reader {
    Mem(MemLog),
    Wal(highlander_wal::LogReader<TypeConfig>),
}

impl RaftLogReader<TypeConfig> for Reader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        match self {
            Reader::Mem(m) => m.try_get_log_entries(range).await,
            Reader::Wal(w) => w.try_get_log_entries(range).await,
        }
    }
}

impl RaftLogReader<TypeConfig> for Log {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        match self {
            Log::Mem(m, ..) => m.try_get_log_entries(range).await,
            Log::Wal(w, ..) => w.try_get_log_entries(range).await,
        }
    }
}

impl RaftLogStorage<TypeConfig> for Log {
    type LogReader = Reader;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let state = match self {
            Log::Mem(m, ..) => m.get_log_state().await,
            Log::Wal(w, ..) => w.get_log_state().await,
        }?;
        let (Log::Mem(_, _, tail) | Log::Wal(_, _, tail)) = self;
        tail.set(state.last_log_id);
        Ok(state)
    }

    async fn get_log_reader(&mut self) -> Reader {
        match self {
            Log::Mem(m, ..) => Reader::Mem(m.get_log_reader().await),
            Log::Wal(w, ..) => Reader::Wal(w.get_log_reader().await),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        match self {
            Log::Mem(m, ..) => m.save_vote(vote).await,
            Log::Wal(w, ..) => w.save_vote(vote).await,
        }
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        match self {
            Log::Mem(m, ..) => m.read_vote().await,
            Log::Wal(w, ..) => w.read_vote().await,
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> StorageResult<()> {
        match self {
            Log::Mem(m, ..) => m.save_committed(committed).await,
            Log::Wal(w, ..) => w.save_committed(committed).await,
        }
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId>> {
        match self {
            Log::Mem(m, ..) => m.read_committed().await,
            Log::Wal(w, ..) => w.read_committed().await,
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let (Log::Mem(_, _, tail) | Log::Wal(_, _, tail)) = self;
        let tail = tail.clone();
        let mut last = None;
        let entries = entries.into_iter().inspect(|e| last = Some(e.log_id));
        match self {
            Log::Mem(m, ..) => m.append(entries, callback).await,
            Log::Wal(w, ..) => w.append(entries, callback).await,
        }?;
        if last.is_some() {
            tail.set(last);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> StorageResult<()> {
        match self {
            Log::Mem(m, ..) => m.truncate(log_id).await,
            Log::Wal(w, ..) => w.truncate(log_id).await,
        }?;
        self.reread_tail().await
    }

    async fn purge(&mut self, log_id: LogId) -> StorageResult<()> {
        let (Log::Mem(_, coverage, _) | Log::Wal(_, coverage, _)) = self;
        if !coverage.wait_covers(log_id.index).await {
            tracing::error!(upto = log_id.index, "no durable snapshot covers the purge");
        }
        match self {
            Log::Mem(m, ..) => m.purge(log_id).await,
            Log::Wal(w, ..) => w.purge(log_id).await,
        }?;
        self.reread_tail().await
    }
}

/// Where snapshots are kept.
#[derive(Clone)]
enum SnapshotHome {
    Mem(MemStorage),
    Disk {
        store: SnapshotStore,
        io: IoMode,
        /// A snapshot received from the leader, sealed and checked, waiting for openraft to
        /// install it: installing publishes this file instead of writing the bytes again.
        staged: Arc<Mutex<Option<(String, SealedSnapshot)>>>,
    },
}

/// Runs blocking file work where the node's I/O mode says.
async fn run_io<T: Send + 'static>(
    io: IoMode,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    match io {
        IoMode::Inline => Ok(work()),
        IoMode::Thread => tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string()),
    }
}

impl SnapshotHome {
    /// Makes a snapshot durable before it counts (purging the log relies on it).
    async fn save(&self, snapshot: StoredSnapshot) -> StorageResult<()> {
        match self {
            SnapshotHome::Mem(m) => {
                lock(&m.disk).snapshot = Some(snapshot);
                Ok(())
            }
            SnapshotHome::Disk { store, io, staged } => {
                let last = snapshot.meta.last_log_id.as_ref().map(highlander_wal::entry_id);
                let received = lock(staged).take_if(|(id, sealed)| {
                    *id == snapshot.meta.snapshot_id && sealed.last_log() == last
                });
                if let Some((_, sealed)) = received {
                    let publish = run_io(*io, move || sealed.publish()).await.map_err(|e| {
                        storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e)
                    })?;
                    return publish.map(|_| ()).map_err(|e| {
                        storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e.to_string())
                    });
                }
                let meta = codec::encode(&snapshot.meta).map_err(|e| {
                    storage_error(
                        ErrorSubject::StateMachine,
                        ErrorVerb::Write,
                        format!("encode snapshot meta: {e}"),
                    )
                })?;
                let store = store.clone();
                let write = move || store.save(last, &meta, &snapshot.data);
                let result = match io {
                    IoMode::Inline => write(),
                    IoMode::Thread => tokio::task::spawn_blocking(write).await.map_err(|e| {
                        storage_error(ErrorSubject::StateMachine, ErrorVerb::Write, e.to_string())
                    })?,
                };
                result.map(|_| ()).map_err(|e| {
                    storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e.to_string())
                })
            }
        }
    }

    /// The newest durable snapshot, verified.
    fn latest(&self) -> StorageResult<Option<StoredSnapshot>> {
        match self {
            SnapshotHome::Mem(m) => Ok(lock(&m.disk).snapshot.clone()),
            SnapshotHome::Disk { store, .. } => {
                let Some(info) = store.latest() else { return Ok(None) };
                let loaded = store.load(&info).map_err(|e| {
                    storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, e.to_string())
                })?;
                stored_from_disk(&loaded.meta, loaded.data).map(Some)
            }
        }
    }
}

fn stored_from_disk(meta: &[u8], data: Vec<u8>) -> StorageResult<StoredSnapshot> {
    let meta = codec::decode(meta).map_err(|e| {
        storage_error(
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            format!("snapshot meta does not decode: {e}"),
        )
    })?;
    Ok(StoredSnapshot { meta, data })
}

/// A node's storage, opened (and, for a data directory, locked).
pub(crate) struct Opened {
    /// The log for openraft.
    pub(crate) log: Log,
    /// The state machine, rebuilt from the newest snapshot.
    pub(crate) sm: StateMachine,
    /// For a data directory, a watch on its lock.
    pub(crate) lock: Option<LockWatch>,
    /// Which node and Raft member the storage belongs to, if it was ever decided.
    pub(crate) identity: Option<Identity>,
    /// No vote, no log entry, no snapshot: the storage never took part in Raft.
    pub(crate) blank: bool,
    /// Where the identity is recorded once decided.
    pub(crate) keeper: IdentityKeeper,
}

/// Records a storage's identity where the storage lives.
#[derive(Clone)]
pub(crate) enum IdentityKeeper {
    Mem(MemStorage),
    Disk { fs: Arc<dyn Fs>, dir: PathBuf, io: IoMode },
}

impl IdentityKeeper {
    /// Records `identity` durably, before the storage takes part in Raft as that member.
    pub(crate) async fn write(&self, identity: Identity) -> Result<(), String> {
        match self {
            IdentityKeeper::Mem(m) => {
                lock(&m.disk).identity = Some(identity);
                Ok(())
            }
            IdentityKeeper::Disk { fs, dir, io } => {
                let (fs, dir) = (fs.clone(), dir.clone());
                run_io(*io, move || highlander_wal::write_identity(&*fs, &dir, identity))
                    .await?
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// Opens a node's storage: the log for openraft, the state machine (rebuilt from the newest
/// snapshot), its identity, and, for a data directory, a watch on its lock.
pub(crate) fn open(storage: Storage, applied: Arc<AppliedState>) -> Result<Opened, String> {
    match storage {
        Storage::Memory(m) => {
            let sm = StateMachine::open(SnapshotHome::Mem(m.clone()), applied, None)
                .map_err(|e| e.to_string())?;
            let coverage = sm.coverage.clone();
            let (identity, blank) = {
                let d = lock(&m.disk);
                let blank = d.vote.is_none()
                    && d.log.is_empty()
                    && d.last_purged.is_none()
                    && d.snapshot.is_none();
                (d.identity, blank)
            };
            Ok(Opened {
                log: Log::Mem(MemLog::new(m.clone()), coverage, Tail::default()),
                sm,
                lock: None,
                identity,
                blank,
                keeper: IdentityKeeper::Mem(m),
            })
        }
        Storage::Disk(d) => {
            let opened = highlander_wal::open(d.fs.clone(), &d.dir, d.options.clone())
                .map_err(|e| e.to_string())?;
            let identity =
                highlander_wal::read_identity(&*d.fs, &d.dir).map_err(|e| e.to_string())?;
            let recovery = &opened.recovery;
            tracing::info!(
                dir = %d.dir.display(),
                created = recovery.created,
                elapsed_ms = recovery.elapsed.as_millis() as u64,
                "data directory opened"
            );
            let blank = opened.wal.hard_state().vote.is_none()
                && opened.wal.log_state().last.is_none()
                && opened.snapshot.is_none();
            let initial = match opened.snapshot {
                Some(s) => Some(stored_from_disk(&s.meta, s.data).map_err(|e| e.to_string())?),
                None => None,
            };
            let home =
                SnapshotHome::Disk { store: opened.snapshots, io: d.io, staged: Arc::default() };
            let sm = StateMachine::open(home, applied, initial).map_err(|e| e.to_string())?;
            let log = highlander_wal::LogStore::new(opened.wal, d.io).map_err(|e| e.to_string())?;
            let coverage = sm.coverage.clone();
            Ok(Opened {
                log: Log::Wal(Box::new(log), coverage, Tail::default()),
                sm,
                lock: Some(opened.lock),
                identity,
                blank,
                keeper: IdentityKeeper::Disk { fs: d.fs.clone(), dir: d.dir.clone(), io: d.io },
            })
        }
    }
}

/// Receives snapshots streamed from the leader into the node's storage: for a data
/// directory, into a temporary snapshot file that is synced and read back before openraft
/// is asked to install it; in memory, into a buffer.
#[derive(Clone)]
pub(crate) struct SnapshotInbox {
    home: SnapshotHome,
}

impl SnapshotInbox {
    /// A sink for the data of the snapshot described by `meta`.
    pub(crate) async fn begin(
        &self,
        meta: &SnapshotMeta<u64, Member>,
    ) -> Result<SnapshotSink, String> {
        match &self.home {
            SnapshotHome::Mem(_) => Ok(SnapshotSink::Memory(Vec::new())),
            SnapshotHome::Disk { store, io, staged } => {
                let encoded = codec::encode(meta).map_err(|e| e.to_string())?;
                let last = meta.last_log_id.as_ref().map(highlander_wal::entry_id);
                let store = store.clone();
                let writer = run_io(*io, move || store.begin(last, &encoded))
                    .await?
                    .map_err(|e| e.to_string())?;
                Ok(SnapshotSink::File { writer, io: *io, staged: staged.clone() })
            }
        }
    }

    /// Forgets a staged snapshot that openraft did not install (it was not newer than what
    /// the node has, or the sender's vote was stale); its temporary file is removed.
    pub(crate) async fn discard_staged(&self) {
        if let SnapshotHome::Disk { io, staged, .. } = &self.home {
            let unused = lock(staged).take();
            if unused.is_some() {
                let _ = run_io(*io, move || drop(unused)).await;
            }
        }
    }
}

/// Where one incoming snapshot's bytes go while they arrive.
pub(crate) enum SnapshotSink {
    Memory(Vec<u8>),
    File {
        writer: SnapshotWriter,
        io: IoMode,
        staged: Arc<Mutex<Option<(String, SealedSnapshot)>>>,
    },
}

impl SnapshotSink {
    /// Appends the next bytes.
    pub(crate) async fn write(self, bytes: Vec<u8>) -> Result<SnapshotSink, String> {
        match self {
            SnapshotSink::Memory(mut buf) => {
                buf.extend_from_slice(&bytes);
                Ok(SnapshotSink::Memory(buf))
            }
            SnapshotSink::File { mut writer, io, staged } => {
                let writer = run_io(io, move || {
                    std::io::Write::write_all(&mut writer, &bytes).map(|()| writer)
                })
                .await?
                .map_err(|e| e.to_string())?;
                Ok(SnapshotSink::File { writer, io, staged })
            }
        }
    }

    /// Ends the transfer and returns the data as the node's storage now holds it. For a
    /// data directory the file is synced and read back (checksummed) first, then staged so
    /// that installing it publishes this very file.
    pub(crate) async fn finish(self, snapshot_id: String) -> Result<Vec<u8>, String> {
        match self {
            SnapshotSink::Memory(buf) => Ok(buf),
            SnapshotSink::File { writer, io, staged } => {
                let (sealed, data) = run_io(io, move || {
                    let sealed = writer.seal()?;
                    let data = sealed.read_data()?;
                    Ok::<_, highlander_wal::WalError>((sealed, data))
                })
                .await?
                .map_err(|e| e.to_string())?;
                let replaced = lock(&staged).replace((snapshot_id, sealed));
                if replaced.is_some() {
                    let _ = run_io(io, move || drop(replaced)).await;
                }
                Ok(data)
            }
        }
    }
}

/// What a snapshot file holds.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    version: u32,
    state: ClusterState,
}

const SNAPSHOT_VERSION: u32 = 3;

/// Decodes `bytes` as snapshot data the way a follower checks a received snapshot, and a
/// consistent state encodes back to what decodes equal. For the fuzzer.
pub(crate) fn decode_snapshot_data(bytes: &[u8]) {
    if let Ok(body) = codec::decode_snapshot::<SnapshotBody>(bytes)
        && body.state.check_consistency().is_ok()
    {
        let encoded = codec::encode(&body).expect("a decoded snapshot encodes");
        let again: SnapshotBody = codec::decode_snapshot(&encoded).expect("and decodes");
        assert_eq!(again.state, body.state, "a snapshot changed in a round trip");
    }
}

/// The applied state, shared between the state machine (the only writer) and the runtime's
/// readers (supervisor, leader duties, status).
pub(crate) struct Applied {
    pub(crate) state: ClusterState,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: StoredMembership<u64, Member>,
}

/// The applied state behind a lock, plus a watch that ticks with the applied index.
pub(crate) struct AppliedState {
    inner: RwLock<Applied>,
    index: watch::Sender<u64>,
    /// Per key, the index of the last entry that touched it: a task that follows one key (a
    /// schedule's runner, a task's delivery loop) wakes for its key only, not for every entry
    /// of a busy cluster.
    keys: Mutex<KeyWatches>,
    /// The change sets of loops that keep per-key state (the supervisor), each told which
    /// keys changed since it last looked.
    sinks: Mutex<Vec<std::sync::Weak<Mutex<Changes>>>>,
}

/// Per-key watches, with closed ones swept once the map has doubled since the last sweep
/// (a sweep on every new watch would cost the number of watches each time).
#[derive(Default)]
struct KeyWatches {
    watches: BTreeMap<Key, watch::Sender<u64>>,
    sweep_at: usize,
}

/// Which keys changed in the applied state since a consumer last took its changes.
#[derive(Debug)]
pub(crate) struct Changes {
    /// Everything may have changed (a snapshot was installed, or the consumer is new).
    pub(crate) all: bool,
    /// The keys applied entries touched (see `ClusterState::keys_touched_by`).
    pub(crate) keys: BTreeSet<Key>,
}

impl Changes {
    /// Takes the changes gathered so far, leaving none.
    pub(crate) fn take(&mut self) -> Changes {
        Changes { all: std::mem::take(&mut self.all), keys: std::mem::take(&mut self.keys) }
    }
}

impl AppliedState {
    pub(crate) fn new() -> Arc<AppliedState> {
        Arc::new(AppliedState {
            inner: RwLock::new(Applied {
                state: ClusterState::new(),
                last_applied: None,
                membership: StoredMembership::default(),
            }),
            index: watch::channel(0).0,
            keys: Mutex::default(),
            sinks: Mutex::default(),
        })
    }

    /// A receiver notified whenever an applied entry touches `key` (see
    /// `ClusterState::keys_touched_by`: that includes the end of a session that registered
    /// or owned it) and after a snapshot is installed.
    pub(crate) fn watch_key(&self, key: &Key) -> watch::Receiver<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.watches.len() >= keys.sweep_at {
            keys.watches.retain(|_, tx| tx.receiver_count() > 0);
            keys.sweep_at = (keys.watches.len() * 2).max(64);
        }
        keys.watches.entry(key.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    /// A change set that every apply adds its touched keys to, starting with everything.
    pub(crate) fn changes(&self) -> Arc<Mutex<Changes>> {
        let changes = Arc::new(Mutex::new(Changes { all: true, keys: BTreeSet::new() }));
        let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        sinks.retain(|w| w.strong_count() > 0);
        sinks.push(Arc::downgrade(&changes));
        changes
    }

    /// Tells the change sets and the watchers of `touched` (of every key if `None`).
    fn notify_keys(&self, touched: Option<&BTreeSet<Key>>, index: u64) {
        for sink in self.sinks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let Some(sink) = sink.upgrade() else { continue };
            let mut changes = sink.lock().unwrap_or_else(|e| e.into_inner());
            match touched {
                Some(touched) if !changes.all => changes.keys.extend(touched.iter().cloned()),
                Some(_) => {}
                None => {
                    changes.all = true;
                    changes.keys.clear();
                }
            }
        }
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match touched {
            Some(touched) => {
                for tx in touched.iter().filter_map(|key| keys.watches.get(key)) {
                    tx.send_replace(index);
                }
            }
            None => {
                for tx in keys.watches.values() {
                    tx.send_replace(index);
                }
            }
        }
    }

    /// Reads the applied state. Hold the guard briefly and never across an await.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that is notified whenever something is applied.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.index.subscribe()
    }

    fn notify(&self, index: u64) {
        self.index.send_replace(index);
    }
}

/// The state machine half of the store.
pub(crate) struct StateMachine {
    home: SnapshotHome,
    applied: Arc<AppliedState>,
    coverage: Coverage,
}

impl StateMachine {
    /// Opens the state machine, rebuilding the applied state from `initial` (or, if none is
    /// given, from the newest snapshot in `home`).
    fn open(
        home: SnapshotHome,
        applied: Arc<AppliedState>,
        initial: Option<StoredSnapshot>,
    ) -> StorageResult<StateMachine> {
        let snapshot = match initial {
            Some(s) => Some(s),
            None => home.latest()?,
        };
        let coverage = Coverage::new(snapshot.as_ref().and_then(|s| s.meta.last_log_id));
        if let Some(s) = snapshot {
            let body = decode_snapshot(&s.meta, &s.data)?;
            let mut a = applied.write();
            a.state = body.state;
            a.last_applied = s.meta.last_log_id;
            a.membership = s.meta.last_membership.clone();
        }
        Ok(StateMachine { home, applied, coverage })
    }

    /// Where snapshots streamed in from the leader are received.
    pub(crate) fn inbox(&self) -> SnapshotInbox {
        SnapshotInbox { home: self.home.clone() }
    }

    /// An in-memory state machine over `storage`, for tests.
    #[cfg(test)]
    pub(crate) fn in_memory(
        storage: MemStorage,
        applied: Arc<AppliedState>,
    ) -> StorageResult<StateMachine> {
        StateMachine::open(SnapshotHome::Mem(storage), applied, None)
    }
}

fn decode_snapshot(meta: &SnapshotMeta<u64, Member>, data: &[u8]) -> StorageResult<SnapshotBody> {
    let body: SnapshotBody = codec::decode_snapshot(data).map_err(|e| {
        storage_error(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Read,
            format!("snapshot does not decode: {e}"),
        )
    })?;
    // A snapshot from a peer is checked before it replaces anything: an inconsistent state
    // would make later commands misbehave.
    if let Err(e) = body.state.check_consistency() {
        return Err(storage_error(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Read,
            format!("snapshot state is inconsistent: {e}"),
        ));
    }
    if body.version != SNAPSHOT_VERSION {
        return Err(storage_error(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Read,
            format!("snapshot format version {} is not {SNAPSHOT_VERSION}", body.version),
        ));
    }
    Ok(body)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId>, StoredMembership<u64, Member>)> {
        let a = self.applied.read();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<Outcome>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut touched = BTreeSet::new();
        let index = {
            let mut a = self.applied.write();
            for entry in entries {
                a.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => out.push(Vec::new()),
                    EntryPayload::Normal(batch) => {
                        for c in &batch.0 {
                            a.state.keys_touched_by(c, &mut touched);
                        }
                        out.push(a.state.apply_entry(entry.log_id.leader_id.term, &batch.0))
                    }
                    EntryPayload::Membership(m) => {
                        a.membership = StoredMembership::new(Some(entry.log_id), m);
                        out.push(Vec::new());
                    }
                }
            }
            a.last_applied.map(|l| l.index).unwrap_or(0)
        };
        // The change sets first: a loop woken by the index finds its keys already there.
        self.applied.notify_keys(Some(&touched), index);
        self.applied.notify(index);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            home: self.home.clone(),
            applied: self.applied.clone(),
            coverage: self.coverage.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Vec<u8>>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<Vec<u8>>,
    ) -> StorageResult<()> {
        // Decode and check before anything is replaced: a bad snapshot changes nothing.
        let body = decode_snapshot(meta, &snapshot)?;
        // Durable before the state is swapped: a crash right after must not find an older
        // snapshot with a log that was truncated for this one.
        self.home.save(StoredSnapshot { meta: meta.clone(), data: *snapshot }).await?;
        self.coverage.advance(meta.last_log_id);
        let index = {
            let mut a = self.applied.write();
            a.state = body.state;
            a.last_applied = meta.last_log_id;
            a.membership = meta.last_membership.clone();
            a.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.applied.notify_keys(None, index);
        self.applied.notify(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let s = self.home.latest()?;
        Ok(s.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(s.data) }))
    }
}

/// Builds snapshots from a copy of the applied state, so `apply` is not held up while the
/// copy is encoded.
pub(crate) struct SnapshotBuilder {
    home: SnapshotHome,
    applied: Arc<AppliedState>,
    coverage: Coverage,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (state, last_applied, membership) = {
            let a = self.applied.read();
            (a.state.clone(), a.last_applied, a.membership.clone())
        };
        let data =
            codec::encode(&SnapshotBody { version: SNAPSHOT_VERSION, state }).map_err(|e| {
                storage_error(
                    ErrorSubject::StateMachine,
                    ErrorVerb::Write,
                    format!("encode snapshot: {e}"),
                )
            })?;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        };
        let meta =
            SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        self.home.save(StoredSnapshot { meta: meta.clone(), data: data.clone() }).await?;
        self.coverage.advance(meta.last_log_id);
        Ok(Snapshot { meta, snapshot: Box::new(data) })
    }
}
