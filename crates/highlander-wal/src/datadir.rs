//! Opening a data directory: lock, recover the log, find the snapshot, check they agree.

use crate::error::{Result, WalError};
use crate::fs::{Fs, LockAttempt, LockGuard};
use crate::hardstate::{self, HardStateFile};
use crate::snapshot::{LoadedSnapshot, SnapshotRecovery, SnapshotStore};
use crate::wal::{LogRecovery, Wal, WalOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How a data directory is opened.
#[derive(Clone, Debug)]
pub struct Options {
    /// Log tuning.
    pub wal: WalOptions,
    /// Snapshot files kept (default 2: the newest and one to fall back on).
    pub keep_snapshots: usize,
    /// Read every snapshot file back after writing it and before renaming it into place
    /// (default true).
    pub verify_snapshot_writes: bool,
    /// Refuse to purge the log past the newest durable snapshot of this directory, and
    /// refuse to open a directory whose purge point no snapshot covers (default true). Turn
    /// it off only when snapshots are kept elsewhere.
    pub purge_requires_snapshot: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            wal: WalOptions::default(),
            keep_snapshots: 2,
            verify_snapshot_writes: true,
            purge_requires_snapshot: true,
        }
    }
}

/// What opening found and repaired.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// The directory was new (or had no hard state yet).
    pub created: bool,
    /// The log's recovery.
    pub log: LogRecovery,
    /// The snapshot directory's recovery.
    pub snapshots: SnapshotRecovery,
    /// Snapshots that failed verification while looking for the newest good one.
    pub skipped_snapshots: Vec<(PathBuf, String)>,
    /// How long opening took.
    pub elapsed: Duration,
}

/// An opened data directory: the log, the snapshot store, the newest snapshot (loaded and
/// verified) for the state machine to start from, and what recovery did.
#[derive(Debug)]
pub struct Opened {
    /// The Raft log and hard state.
    pub wal: Wal,
    /// The snapshot files.
    pub snapshots: SnapshotStore,
    /// The newest snapshot that verified, to rebuild the state machine from.
    pub snapshot: Option<LoadedSnapshot>,
    /// What recovery found.
    pub recovery: Recovery,
    /// Tells when every part of this opened directory has been dropped and its lock released.
    pub lock: LockWatch,
}

/// Watches the directory lock of an [`Opened`] directory. The log and the snapshot store
/// share the lock and it is released when the last of them is dropped. openraft drops its
/// state machine (and any snapshot builder) in tasks of their own, after `Raft::shutdown`
/// returns: a node restarted in the same process waits for [`LockWatch::released`] first.
#[derive(Clone)]
pub struct LockWatch(Weak<dyn LockGuard>);

impl LockWatch {
    /// Whether the lock has been released.
    pub fn released(&self) -> bool {
        self.0.strong_count() == 0
    }
}

impl std::fmt::Debug for LockWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockWatch").field("released", &self.released()).finish()
    }
}

/// Opens the data directory `dir` (creating it if needed): takes its lock, recovers the log
/// (cutting a torn tail, refusing corruption), loads the newest valid snapshot and checks the
/// invariants between hard state, log and snapshot.
///
/// Layout: `LOCK`, `hardstate`, `log/<first_index>.seg`, `snapshots/<seq>.snap`.
pub fn open(fs: Arc<dyn Fs>, dir: impl AsRef<Path>, opts: Options) -> Result<Opened> {
    let started = Instant::now();
    let dir = dir.as_ref().to_path_buf();
    let mut recovery = Recovery::default();

    // Every directory created here is made durable in its parent, or a power loss could
    // take the whole data directory with it.
    let mut missing = Vec::new();
    for a in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        if fs.exists(a).map_err(|e| WalError::io("stat", a, e))? {
            break;
        }
        missing.push(a.to_path_buf());
    }
    fs.create_dir_all(&dir).map_err(|e| WalError::io("create dir", &dir, e))?;
    for d in missing.iter().rev() {
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(|e| WalError::io("fsync dir", parent, e))?;
        }
    }
    let lock: Arc<dyn LockGuard> = match fs
        .try_lock(&dir.join("LOCK"))
        .map_err(|e| WalError::io("lock", dir.join("LOCK"), e))?
    {
        LockAttempt::Acquired(g) => Arc::from(g),
        LockAttempt::Held { holder } => return Err(WalError::Locked { dir, holder }),
    };

    let log_dir = dir.join("log");
    let snap_dir = dir.join("snapshots");
    let mut made = false;
    for d in [&log_dir, &snap_dir] {
        if !fs.exists(d).map_err(|e| WalError::io("stat", d, e))? {
            fs.create_dir_all(d).map_err(|e| WalError::io("create dir", d, e))?;
            made = true;
        }
    }
    if made {
        fs.sync_dir(&dir).map_err(|e| WalError::io("fsync dir", &dir, e))?;
    }

    let hs_path = dir.join(hardstate::FILE_NAME);
    if !fs.exists(&hs_path).map_err(|e| WalError::io("stat", &hs_path, e))? {
        let names = fs.read_dir(&log_dir).map_err(|e| WalError::io("list", &log_dir, e))?;
        if names.iter().any(|n| n.to_str().is_some_and(|n| n.ends_with(".seg"))) {
            return Err(WalError::Invariant(format!(
                "{} is missing but {} holds segments: the vote and purge point are lost",
                hs_path.display(),
                log_dir.display()
            )));
        }
    }
    let (hard, created) = HardStateFile::open(&*fs, &dir)?;
    recovery.created = created;
    let hs = hard.state();

    let watch = LockWatch(Arc::downgrade(&lock));
    let (mut wal, log_report) = Wal::open(fs.clone(), &dir, opts.wal.clone(), lock.clone(), hard)?;
    recovery.log = log_report;

    let mark = Arc::new(AtomicU64::new(0));
    let (snapshots, snap_report) = SnapshotStore::open(
        fs,
        snap_dir,
        opts.keep_snapshots,
        opts.verify_snapshot_writes,
        mark.clone(),
        lock,
        true,
    )?;
    recovery.snapshots = snap_report;

    let mut snapshot = None;
    for info in snapshots.list().into_iter().rev() {
        match snapshots.load(&info) {
            Ok(s) => {
                snapshot = Some(s);
                break;
            }
            Err(e @ WalError::Corrupt { .. }) => {
                tracing::warn!(file = %info.path.display(), error = %e, "skipping a damaged snapshot");
                recovery.skipped_snapshots.push((info.path.clone(), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    let covered = snapshot.as_ref().and_then(|s| s.info.last_log).map_or(0, |l| l.index + 1);
    mark.fetch_max(covered, std::sync::atomic::Ordering::AcqRel);

    if opts.purge_requires_snapshot {
        if let Some(p) = hs.last_purged
            && covered <= p.index
        {
            return Err(WalError::Invariant(format!(
                "the log is purged up to index {} but the newest valid snapshot covers {}: \
                 the entries in between exist nowhere",
                p.index,
                covered.checked_sub(1).map_or_else(|| "nothing".into(), |c| format!("up to {c}"))
            )));
        }
        wal.set_snapshot_mark(mark);
    }
    recovery.elapsed = started.elapsed();
    tracing::info!(
        dir = %dir.display(),
        segments = recovery.log.segments,
        records = recovery.log.records,
        cut_tail = ?recovery.log.cut_tail,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "data directory opened"
    );
    Ok(Opened { wal, snapshots, snapshot, recovery, lock: watch })
}
