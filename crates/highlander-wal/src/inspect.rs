//! Read-only inspection of a data directory, for operators (`highlander wal verify` and
//! `highlander wal dump`): everything [`open`](crate::open) would check, nothing it would
//! change.

use crate::HardState;
use crate::error::{Result, WalError};
use crate::fs::{Fs, LockAttempt, LockGuard};
use crate::hardstate;
use crate::snapshot::{SnapshotInfo, SnapshotStore};
use crate::wal::{self, LogRecovery, WalOptions, WalReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// What a data directory holds and what is wrong with it.
#[derive(Debug)]
pub struct Inspection {
    /// The hard state (`None`: there is none yet).
    pub hard_state: Option<HardState>,
    /// The log as recovery would see it; `removed` and `cut_tail` say what opening it would
    /// remove and cut.
    pub log: LogRecovery,
    /// Reads the log's entries (for a dump).
    pub reader: WalReader,
    /// Valid snapshot headers, oldest first, each with the error its body check gave.
    pub snapshots: Vec<(SnapshotInfo, Option<String>)>,
    /// Snapshot files whose header is unusable, and temporaries.
    pub damaged_snapshots: Vec<(PathBuf, String)>,
    /// Invariant violations that would make opening fail.
    pub problems: Vec<String>,
}

impl Inspection {
    /// Whether opening the directory would succeed.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Inspects `dir` without changing it. Takes the directory lock, so it fails with
/// [`WalError::Locked`] while a node runs on it. Damage that makes recovery refuse (a bad
/// record in the middle, a missing segment) is returned as the same error `open` gives.
pub fn inspect(fs: Arc<dyn Fs>, dir: impl AsRef<Path>) -> Result<Inspection> {
    let dir = dir.as_ref().to_path_buf();
    let lock_path = dir.join("LOCK");
    let lock: Arc<dyn LockGuard> =
        match fs.try_lock(&lock_path).map_err(|e| WalError::io("lock", &lock_path, e))? {
            LockAttempt::Acquired(g) => Arc::from(g),
            LockAttempt::Held { holder } => return Err(WalError::Locked { dir, holder }),
        };
    let hard_state = hardstate::read(&*fs, &dir)?;
    let hs = hard_state.unwrap_or_default();
    let mut log = LogRecovery::default();
    let log_dir = dir.join("log");
    let index = if fs.exists(&log_dir).map_err(|e| WalError::io("stat", &log_dir, e))? {
        wal::load_segments(&*fs, &log_dir, hs.last_purged, &WalOptions::default(), false, &mut log)?
            .0
    } else {
        wal::Index::default()
    };
    let mut problems = wal::invariant_problems(&hs, &index);
    if hard_state.is_none() && log.segments > 0 {
        problems.push("the hard state is missing but the log holds segments".into());
    }
    let reader = WalReader::from_index(index, hs);

    let snap_dir = dir.join("snapshots");
    let (mut snapshots, mut damaged_snapshots) = (Vec::new(), Vec::new());
    if fs.exists(&snap_dir).map_err(|e| WalError::io("stat", &snap_dir, e))? {
        let mark = Arc::new(AtomicU64::new(0));
        let (store, rec) = SnapshotStore::open(fs, snap_dir, 2, false, mark, lock, false)?;
        damaged_snapshots = rec.damaged;
        damaged_snapshots.extend(
            rec.removed.into_iter().map(|p| (p, "temporary of an unfinished write".into())),
        );
        for info in store.list() {
            let check = store.load(&info).err().map(|e| e.to_string());
            snapshots.push((info, check));
        }
    }
    if let Some(p) = hs.last_purged {
        let covered = snapshots
            .iter()
            .filter(|(_, err)| err.is_none())
            .filter_map(|(i, _)| i.last_log)
            .map(|l| l.index)
            .max();
        if covered.is_none_or(|c| c < p.index) {
            problems.push(format!(
                "the log is purged up to index {} but no valid snapshot covers it",
                p.index
            ));
        }
    }
    Ok(Inspection { hard_state, log, reader, snapshots, damaged_snapshots, problems })
}
