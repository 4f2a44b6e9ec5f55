//! The segmented write-ahead log: appends, truncation, purge, hard state, recovery.

use crate::error::{Result, WalError};
use crate::format::{
    self, FORMAT_VERSION, HeaderError, MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN, RecordHeader,
    SEGMENT_HEADER_LEN, SegmentHeader,
};
use crate::fs::{self, File, Fs, LockGuard, OpenMode};
use crate::hardstate::HardStateFile;
use crate::{EntryId, HardState, StoredVote};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tuning of the log.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Bytes preallocated per segment file (default 64 MiB). A write larger than this gets a
    /// segment of its own, sized to fit.
    pub segment_size: u64,
    /// `committed` is written to the hard state lazily: at the latest when it has advanced by
    /// this many entries since it was last written (default 128), and with every vote or
    /// purge. A stale `committed` is safe: it only means fewer entries are re-applied on start.
    pub committed_sync_every: u64,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        WalOptions { segment_size: 64 << 20, committed_sync_every: 128 }
    }
}

/// What recovery found and did when the log was opened.
#[derive(Clone, Debug, Default)]
pub struct LogRecovery {
    /// Segment files scanned.
    pub segments: usize,
    /// Records validated (including ones at or below the purge point).
    pub records: u64,
    /// Bytes of records validated.
    pub bytes: u64,
    /// A torn or garbage tail that was cut: the file, the offset of the cut and how many
    /// non-zero bytes followed it.
    pub cut_tail: Option<(PathBuf, u64, u64)>,
    /// Files removed: temporaries of interrupted writes and segments an interrupted purge left.
    pub removed: Vec<PathBuf>,
}

struct Segment {
    first_index: u64,
    seed_crc: u32,
    path: PathBuf,
    file: Arc<dyn File>,
    /// Allocated length.
    capacity: u64,
    /// Offset of each record; record `i` holds index `first_index + i`.
    offsets: Vec<u64>,
    /// End of the last record.
    end: u64,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first_index + self.offsets.len() as u64
    }

    fn last_index(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.next_index() - 1)
    }
}

/// One run of entries with the same leader id: entries from `start` on have `(term, node)`
/// until the next run.
#[derive(Clone, Copy, Debug)]
struct Run {
    start: u64,
    term: u64,
    node: u64,
}

#[derive(Default)]
pub(crate) struct Index {
    segments: Vec<Segment>,
    runs: Vec<Run>,
    purged: Option<EntryId>,
}

impl Index {
    fn first_present(&self) -> Option<u64> {
        self.segments.iter().find(|s| !s.offsets.is_empty()).map(|s| s.first_index)
    }

    fn last_present(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(Segment::last_index)
    }

    fn id_of(&self, index: u64) -> Option<EntryId> {
        let pos = self.runs.partition_point(|r| r.start <= index);
        let run = self.runs.get(pos.checked_sub(1)?)?;
        Some(EntryId { term: run.term, node: run.node, index })
    }

    fn last_entry(&self) -> Option<EntryId> {
        self.last_present().and_then(|i| self.id_of(i))
    }

    /// The first index readers may see.
    fn first_visible(&self) -> Option<u64> {
        let first = self.first_present()?;
        Some(match self.purged {
            Some(p) => first.max(p.index + 1),
            None => first,
        })
    }

    /// The last log id in openraft's sense: the last entry, or the purge point if it is
    /// later (an empty log reports its purge point).
    fn last_log_id(&self) -> Option<EntryId> {
        match (self.last_entry(), self.purged) {
            (Some(l), Some(p)) if p.index >= l.index => Some(p),
            (Some(l), _) => Some(l),
            (None, p) => p,
        }
    }

    fn push_run(&mut self, id: EntryId) {
        match self.runs.last() {
            Some(r) if r.term == id.term && r.node == id.node => {}
            _ => self.runs.push(Run { start: id.index, term: id.term, node: id.node }),
        }
    }

    fn truncate_runs(&mut self, from: u64) {
        self.runs.retain(|r| r.start < from);
    }
}

/// Where an append goes.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// After the last live entry, in the active segment or a new one chained to it.
    Continue,
    /// Into the empty active segment, which already starts at the right index.
    ReuseEmpty(u32),
    /// Into a fresh segment: the log holds no live entry and the index moves on.
    Fresh,
}

/// The log state: purge point and last log id (as openraft's `get_log_state` reports them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogState {
    /// The last purged entry.
    pub last_purged: Option<EntryId>,
    /// The last entry, or the purge point when no later entry exists.
    pub last: Option<EntryId>,
}

struct Shared {
    index: RwLock<Index>,
    /// The hard state as the node sees it (`committed` may be ahead of the disk).
    hard: RwLock<HardState>,
}

fn read_lock<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Every critical section leaves the index consistent, so a panic elsewhere does not
    // make it unreadable.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// The write side of the log. One owner; every mutating method is durable when it returns
/// `Ok`, and an I/O failure poisons the log for good.
pub struct Wal {
    fs: Arc<dyn Fs>,
    log_dir: PathBuf,
    opts: WalOptions,
    hard: HardStateFile,
    shared: Arc<Shared>,
    /// crc of the last record of the chain (what the next record chains from).
    last_crc: u32,
    poisoned: Option<String>,
    /// Index + 1 of the newest durable snapshot (0: none); purge may not pass it.
    snapshot_mark: Option<Arc<AtomicU64>>,
    _lock: Arc<dyn LockGuard>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.log_dir)
            .field("state", &self.log_state())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// A cheap, cloneable, thread-safe reader of the log (openraft's replication tasks each hold
/// one). It sees every append once `append` has returned.
#[derive(Clone)]
pub struct WalReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for WalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalReader").field("state", &self.log_state()).finish()
    }
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The parts of `[start, end)` split at sector boundaries of the file.
fn has_zero_sector_piece(bytes: &[u8], start: u64, end: u64) -> bool {
    const SECTOR: u64 = 512;
    let mut s = start;
    while s < end {
        let e = ((s / SECTOR + 1) * SECTOR).min(end);
        if bytes[s as usize..e as usize].iter().all(|&b| b == 0) {
            return true;
        }
        s = e;
    }
    false
}

/// Scans the segment bytes from `pos` on, following the chain. Returns the offsets of the
/// valid records and where the chain stopped.
struct Scan {
    offsets: Vec<u64>,
    stop: u64,
    last_crc: u32,
    last_id: Option<EntryId>,
}

fn scan_chain(
    bytes: &[u8],
    mut pos: u64,
    mut expect: u64,
    mut prev_crc: u32,
    mut prev_id: Option<EntryId>,
) -> Scan {
    let mut offsets = Vec::new();
    let len = bytes.len() as u64;
    loop {
        if pos + RECORD_HEADER_LEN as u64 > len {
            break;
        }
        let hb = &bytes[pos as usize..pos as usize + RECORD_HEADER_LEN];
        let h = RecordHeader::parse(hb);
        let end = pos + RECORD_HEADER_LEN as u64 + u64::from(h.len);
        let ok = (h.len as usize) <= MAX_RECORD_PAYLOAD
            && end <= len
            && h.prev_crc == prev_crc
            && h.id.index == expect
            && prev_id.is_none_or(|p| (h.id.term, h.id.node) >= (p.term, p.node))
            && h.batch_first().is_some()
            && format::self_valid(&h, &bytes[pos as usize..end as usize]);
        if !ok {
            break;
        }
        offsets.push(pos);
        prev_crc = h.crc;
        prev_id = Some(h.id);
        expect += 1;
        pos += format::record_size(h.len as usize);
    }
    Scan { offsets, stop: pos, last_crc: prev_crc, last_id: prev_id }
}

/// Decides what the bytes after the last valid record of the *last* segment are: `Ok(())`
/// for the remains of the one write that was in flight when the process stopped (a torn
/// tail), `Err(reason)` for damage to bytes that were once durable.
///
/// Writes only ever go to zeroed space at the end of the log, and a write starts only once
/// the one before it is synced. So a torn write leaves, after the last valid record, pieces
/// of itself and zero sectors, and nothing from a later write.
fn classify_tail(bytes: &[u8], x: u64, expect: u64) -> std::result::Result<(), String> {
    let len = bytes.len() as u64;
    // Where the zeros that run to the end of the file begin.
    let zeros_from = bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p as u64 + 1);
    // A tear shows as a lost (zero) sector, a write cut short by the end of the file, or (if
    // sector writes are not atomic) zeros from somewhere inside the record to the end.
    let torn = |start: u64, end: u64| {
        end > len || zeros_from < end || has_zero_sector_piece(bytes, start, end)
    };
    // The record at x: intact bytes that fail their checksum are a bit flip, not a tear.
    if x + RECORD_HEADER_LEN as u64 <= len {
        let h = RecordHeader::parse(&bytes[x as usize..x as usize + RECORD_HEADER_LEN]);
        let sane = (h.len as usize) <= MAX_RECORD_PAYLOAD;
        let end = x + RECORD_HEADER_LEN as u64 + if sane { u64::from(h.len) } else { 0 };
        if !torn(x, end) {
            return Err(if sane {
                format!(
                    "record for index {expect} is intact on disk but fails its checksum or \
                     chain (a torn write would have left zeros)"
                )
            } else {
                format!("record header for index {expect} is garbage")
            });
        }
    }
    // Later bytes may only be remnants of the same write.
    let mut q = x + 8;
    while q + RECORD_HEADER_LEN as u64 <= len {
        let hb = &bytes[q as usize..q as usize + RECORD_HEADER_LEN];
        if hb.iter().all(|&b| b == 0) {
            q += 8;
            continue;
        }
        let h = RecordHeader::parse(hb);
        let end = q + RECORD_HEADER_LEN as u64 + u64::from(h.len);
        if (h.len as usize) <= MAX_RECORD_PAYLOAD
            && end <= len
            && format::self_valid(&h, &bytes[q as usize..end as usize])
        {
            let same_write = h.id.index >= expect && h.batch_first().is_some_and(|f| f <= expect);
            if !same_write {
                return Err(format!(
                    "a valid record (index {}) of a later write follows at offset {q}",
                    h.id.index
                ));
            }
            q += format::record_size(h.len as usize);
        } else {
            q += 8;
        }
    }
    Ok(())
}

/// Reads and validates every segment. With `repair`, also does what recovery must before the
/// log is written again: removes temporaries and segments a purge left behind, cuts a torn
/// tail and extends a short last segment (all durably). Without it nothing is changed and
/// `report` says what would be.
pub(crate) fn load_segments(
    fs: &dyn Fs,
    log_dir: &Path,
    purged: Option<EntryId>,
    opts: &WalOptions,
    repair: bool,
    report: &mut LogRecovery,
) -> Result<(Index, u32)> {
    let log_dir = log_dir.to_path_buf();
    let mut segs: Vec<(u64, PathBuf)> = Vec::new();
    let mut removed_any = false;
    let names = fs.read_dir(&log_dir).map_err(|e| WalError::io("list", &log_dir, e))?;
    for name in names {
        let Some(name) = name.to_str().map(str::to_owned) else { continue };
        let path = log_dir.join(&name);
        if name.ends_with(".tmp") {
            // A segment being prepared when the process stopped; never used.
            if repair {
                fs.remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            }
            report.removed.push(path);
            removed_any = true;
        } else if let Some(first) = parse_segment_name(&name) {
            segs.push((first, path));
        } else {
            tracing::warn!(file = %path.display(), "ignoring a file the log does not own");
        }
    }
    segs.sort();
    // Finish a purge that stopped before its segments were deleted.
    if let Some(p) = purged {
        while segs.len() >= 2 && segs[1].0 <= p.index + 1 {
            let (_, path) = segs.remove(0);
            if repair {
                fs.remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
            }
            report.removed.push(path);
            removed_any = true;
        }
    }
    if removed_any && repair {
        fs.sync_dir(&log_dir).map_err(|e| WalError::io("fsync dir", &log_dir, e))?;
    }

    let mut index = Index { purged, ..Index::default() };
    let mut chain: Option<(u64, u32, Option<EntryId>)> = None; // (expect, crc, last id)
    let count = segs.len();
    for (i, (first, path)) in segs.into_iter().enumerate() {
        let mode = if repair { OpenMode::ReadWrite } else { OpenMode::Read };
        let file = fs.open(&path, mode).map_err(|e| WalError::io("open", &path, e))?;
        let bytes = fs::read_all(&*file).map_err(|e| WalError::io("read", &path, e))?;
        let header = match SegmentHeader::decode(&bytes) {
            Ok(h) => h,
            Err(HeaderError::Version(v)) => {
                return Err(WalError::Version { path, found: v, supported: FORMAT_VERSION });
            }
            Err(e) => {
                return Err(WalError::corrupt(path, 0, format!("bad segment header: {e:?}")));
            }
        };
        if header.first_index != first {
            return Err(WalError::corrupt(
                path,
                0,
                format!("header says first index {} but the name says {first}", header.first_index),
            ));
        }
        let (expect, prev_crc, prev_id) = match chain {
            None => (header.first_index, header.seed_crc, None),
            Some((expect, crc, id)) => {
                if header.first_index != expect || header.seed_crc != crc {
                    return Err(WalError::corrupt(
                        path,
                        0,
                        format!(
                            "segment starts at index {} (chain seed {:#x}) but the previous \
                             segment ends before index {expect} (crc {crc:#x}): a segment is \
                             missing or damaged",
                            header.first_index, header.seed_crc
                        ),
                    ));
                }
                (expect, crc, id)
            }
        };
        let scan = scan_chain(&bytes, SEGMENT_HEADER_LEN, expect, prev_crc, prev_id);
        let tail = &bytes[scan.stop.min(bytes.len() as u64) as usize..];
        let nonzero = tail.iter().filter(|&&b| b != 0).count() as u64;
        let expect_next = expect + scan.offsets.len() as u64;
        if nonzero > 0 {
            if i + 1 < count {
                return Err(WalError::corrupt(
                    path,
                    scan.stop,
                    format!("record for index {expect_next} is damaged and later segments exist"),
                ));
            }
            if let Err(reason) = classify_tail(&bytes, scan.stop, expect_next) {
                return Err(WalError::corrupt(path, scan.stop, reason));
            }
            // A torn write that was never acknowledged: cut it, durably, before anything
            // is appended after it.
            if repair {
                let capacity = (bytes.len() as u64).max(opts.segment_size);
                file.set_len(scan.stop).map_err(|e| WalError::io("truncate", &path, e))?;
                file.allocate(capacity).map_err(|e| WalError::io("fallocate", &path, e))?;
                file.sync_all().map_err(|e| WalError::io("fsync", &path, e))?;
                tracing::warn!(file = %path.display(), offset = scan.stop, bytes = nonzero, "cut a torn tail");
            }
            report.cut_tail = Some((path.clone(), scan.stop, nonzero));
        }
        report.segments += 1;
        report.records += scan.offsets.len() as u64;
        report.bytes += scan.stop - SEGMENT_HEADER_LEN;
        for (k, _) in scan.offsets.iter().enumerate() {
            let off = scan.offsets[k] as usize;
            let h = RecordHeader::parse(&bytes[off..off + RECORD_HEADER_LEN]);
            index.push_run(h.id);
        }
        chain = Some((expect_next, scan.last_crc, scan.last_id));
        // A file that ends inside the padding of its last record, or a last segment
        // shorter than a segment, is extended before anything is written after it.
        let mut want = scan.stop;
        if i + 1 == count {
            want = want.max(opts.segment_size);
        }
        if repair && file.len().map_err(|e| WalError::io("stat", &path, e))? < want {
            file.allocate(want).map_err(|e| WalError::io("fallocate", &path, e))?;
            file.sync_all().map_err(|e| WalError::io("fsync", &path, e))?;
        }
        let capacity = file.len().map_err(|e| WalError::io("stat", &path, e))?;
        index.segments.push(Segment {
            first_index: header.first_index,
            seed_crc: header.seed_crc,
            path,
            file,
            capacity,
            offsets: scan.offsets,
            end: scan.stop,
        });
    }
    Ok((index, chain.map(|c| c.1).unwrap_or(0)))
}

/// What is wrong between the hard state and the log (empty when they agree).
pub(crate) fn invariant_problems(hs: &HardState, ix: &Index) -> Vec<String> {
    let mut out = Vec::new();
    let (first, last) = (ix.first_present(), ix.last_entry());
    if let (Some(p), Some(first)) = (hs.last_purged, first)
        && first > p.index + 1
    {
        out.push(format!(
            "the log starts at index {first} but only entries up to {} were purged: entries in \
             between are missing",
            p.index
        ));
    }
    if let Some(l) = last
        && l.term > hs.vote.map_or(0, |v| v.term)
    {
        out.push(format!(
            "the last entry {l:?} has a term later than the saved vote {:?}",
            hs.vote
        ));
    }
    if let Some(c) = hs.committed {
        let top =
            [last.map(|l| l.index), hs.last_purged.map(|p| p.index)].into_iter().flatten().max();
        if top.is_none_or(|t| c.index > t) {
            out.push(format!(
                "committed {c:?} is past the end of the log (last entry {last:?}, purged up to \
                 {:?}): acknowledged entries were lost",
                hs.last_purged
            ));
        } else if hs.last_purged.is_none_or(|p| c.index > p.index)
            && first.is_some_and(|f| c.index >= f)
            && ix.id_of(c.index) != Some(c)
        {
            out.push(format!(
                "committed {c:?} but the log holds {:?} at that index",
                ix.id_of(c.index)
            ));
        }
    }
    out
}

impl Wal {
    /// Opens (recovering) the log in `dir`: `dir/hardstate` and `dir/log/`.
    pub(crate) fn open(
        fs: Arc<dyn Fs>,
        dir: &Path,
        opts: WalOptions,
        lock: Arc<dyn LockGuard>,
        hard: HardStateFile,
    ) -> Result<(Wal, LogRecovery)> {
        let log_dir = dir.join("log");
        let mut report = LogRecovery::default();
        let hs = hard.state();
        let purged = hs.last_purged;

        let (index, last_crc) = load_segments(&*fs, &log_dir, purged, &opts, true, &mut report)?;

        let mut wal = Wal {
            fs,
            log_dir,
            opts,
            hard,
            shared: Arc::new(Shared { index: RwLock::new(index), hard: RwLock::new(hs) }),
            last_crc,
            poisoned: None,
            snapshot_mark: None,
            _lock: lock,
        };
        wal.check_and_settle(&mut report)?;
        Ok((wal, report))
    }

    /// Startup invariants between the hard state and the log, and the clean-up of a purge
    /// that went past the end of the log.
    fn check_and_settle(&mut self, report: &mut LogRecovery) -> Result<()> {
        let hs = self.hard.state();
        let last = {
            let ix = read_lock(&self.shared.index);
            if let Some(problem) = invariant_problems(&hs, &ix).into_iter().next() {
                return Err(WalError::Invariant(problem));
            }
            ix.last_entry()
        };
        // Every entry at or below the purge point and none after it: the files are dead
        // weight, and the next append starts a new segment after the purge point.
        if let (Some(p), Some(l)) = (hs.last_purged, last)
            && l.index < p.index
        {
            let removed = self.remove_all_segments()?;
            report.removed.extend(removed);
        }
        Ok(())
    }

    /// Lets purge check that a durable snapshot covers what it deletes.
    pub(crate) fn set_snapshot_mark(&mut self, mark: Arc<AtomicU64>) {
        self.snapshot_mark = Some(mark);
    }

    /// A reader that shares this log's index.
    pub fn reader(&self) -> WalReader {
        WalReader { shared: self.shared.clone() }
    }

    /// The purge point and last log id.
    pub fn log_state(&self) -> LogState {
        self.reader().log_state()
    }

    /// The hard state as the node sees it (`committed` may be ahead of the disk).
    pub fn hard_state(&self) -> HardState {
        *read_lock(&self.shared.hard)
    }

    /// The error that stopped the log, if one did.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn check_poison(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(WalError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Runs a mutation; an I/O error poisons the log (fail-stop).
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Wal) -> Result<T>) -> Result<T> {
        self.check_poison()?;
        let r = f(self);
        if let Err(e @ WalError::Io { .. }) = &r {
            tracing::error!(error = %e, "storage write failed; the log accepts no more writes");
            self.poisoned = Some(e.to_string());
        }
        r
    }

    /// The index after the last entry or the purge point, whichever is later (`None` for an
    /// empty log that was never purged): where the next append continues the log.
    pub fn next_index(&self) -> Option<u64> {
        let ix = read_lock(&self.shared.index);
        match (ix.last_present(), ix.purged) {
            (Some(l), Some(p)) => Some(l.max(p.index) + 1),
            (Some(l), None) => Some(l + 1),
            (None, Some(p)) => Some(p.index + 1),
            (None, None) => None,
        }
    }

    /// Appends `entries` (log id and payload, consecutive indexes) with one write and one
    /// `fdatasync`; they are durable and readable when this returns `Ok`.
    pub fn append<'a, I>(&mut self, entries: I) -> Result<()>
    where
        I: IntoIterator<Item = (EntryId, &'a [u8])>,
    {
        self.check_poison()?;
        let entries: Vec<(EntryId, &[u8])> = entries.into_iter().collect();
        let Some(&(first, _)) = entries.first() else { return Ok(()) };
        let (plan, mut prev, mut next, purged) = {
            let ix = read_lock(&self.shared.index);
            let live = match (ix.last_present(), ix.purged) {
                (Some(l), Some(p)) => l > p.index,
                (Some(_), None) => true,
                _ => false,
            };
            let plan = if live {
                Plan::Continue
            } else {
                match ix.segments.last() {
                    Some(s) if s.offsets.is_empty() && s.first_index == first.index => {
                        Plan::ReuseEmpty(s.seed_crc)
                    }
                    _ => Plan::Fresh,
                }
            };
            let last = if live { ix.last_entry() } else { None };
            (plan, last, last.map(|l| l.index + 1), ix.purged)
        };
        let mut crc = match plan {
            Plan::Continue => self.last_crc,
            Plan::ReuseEmpty(seed) => seed,
            Plan::Fresh => 0,
        };
        let mut buf = Vec::new();
        let mut ids = Vec::with_capacity(entries.len());
        for (pos, &(id, payload)) in entries.iter().enumerate() {
            // After the last live entry; or, in a log without one, anywhere that leaves no
            // hole after the purge point (openraft's suite appends at or below it).
            let hole = match (next, purged) {
                (Some(e), _) => e != id.index,
                (None, Some(p)) => id.index > p.index + 1,
                (None, None) => false,
            };
            if hole {
                return Err(WalError::Invalid(format!(
                    "append of index {} but the log expects {:?} (no holes)",
                    id.index,
                    next.or(purged.map(|p| p.index + 1))
                )));
            }
            if prev.is_some_and(|p| (id.term, id.node) < (p.term, p.node)) {
                return Err(WalError::Invalid(format!(
                    "append of {id:?} after {prev:?}: leader ids never go back"
                )));
            }
            if payload.len() > MAX_RECORD_PAYLOAD {
                return Err(WalError::Invalid(format!(
                    "entry {} is {} bytes, more than the limit of {MAX_RECORD_PAYLOAD}",
                    id.index,
                    payload.len()
                )));
            }
            let pos =
                u32::try_from(pos).map_err(|_| WalError::Invalid("batch too large".into()))?;
            crc = format::encode_record(&mut buf, id, crc, pos, payload);
            ids.push(id);
            next = Some(id.index + 1);
            prev = Some(id);
        }
        self.guarded(|w| w.write_batch(&buf, &ids, crc, plan))
    }

    fn write_batch(&mut self, buf: &[u8], ids: &[EntryId], crc: u32, plan: Plan) -> Result<()> {
        let Some(first) = ids.first().map(|i| i.index) else { return Ok(()) };
        let need = buf.len() as u64;
        let (fits, active_empty) = {
            let ix = read_lock(&self.shared.index);
            let s = ix.segments.last();
            (s.is_some_and(|s| s.end + need <= s.capacity), s.is_some_and(|s| s.offsets.is_empty()))
        };
        match plan {
            Plan::Fresh => {
                // Nothing live in the log: the old files hold only purged or truncated
                // entries. They go before the new segment exists, so no crash can leave a
                // segment that does not continue the one before it.
                self.remove_all_segments()?;
                self.rotate(first, 0, need)?;
            }
            Plan::Continue | Plan::ReuseEmpty(_) if !fits && active_empty => {
                // The active segment holds no record yet (it starts at `first`): grow it
                // rather than create a second file of the same name.
                let mut ix = write_lock(&self.shared.index);
                if let Some(s) = ix.segments.last_mut() {
                    let cap = self.opts.segment_size.max(SEGMENT_HEADER_LEN + need);
                    s.file.allocate(cap).map_err(|e| WalError::io("fallocate", &s.path, e))?;
                    s.file.sync_all().map_err(|e| WalError::io("fsync", &s.path, e))?;
                    s.capacity = s.capacity.max(cap);
                }
            }
            Plan::Continue if !fits => self.rotate(first, self.last_crc, need)?,
            Plan::Continue | Plan::ReuseEmpty(_) => {}
        }
        let (file, path, at) = {
            let ix = read_lock(&self.shared.index);
            let s = ix.segments.last().ok_or_else(|| WalError::Invalid("no segment".into()))?;
            (s.file.clone(), s.path.clone(), s.end)
        };
        file.write_all_at(buf, at).map_err(|e| WalError::io("write", &path, e))?;
        file.sync_data().map_err(|e| WalError::io("fdatasync", &path, e))?;
        // Durable: publish to readers.
        let mut offsets = Vec::with_capacity(ids.len());
        let mut off = at;
        for _ in ids {
            offsets.push(off);
            let h = RecordHeader::parse(&buf[(off - at) as usize..]);
            off += format::record_size(h.len as usize);
        }
        let mut ix = write_lock(&self.shared.index);
        for id in ids {
            ix.push_run(*id);
        }
        if let Some(s) = ix.segments.last_mut() {
            s.offsets.extend(offsets);
            s.end = off;
        }
        drop(ix);
        self.last_crc = crc;
        Ok(())
    }

    /// Creates a new active segment (prepared under a temporary name, synced, renamed and
    /// the directory synced) before any record is written into it.
    fn rotate(&mut self, first_index: u64, seed_crc: u32, need: u64) -> Result<()> {
        let name = segment_name(first_index);
        let path = self.log_dir.join(&name);
        let tmp = self.log_dir.join(format!("{name}.tmp"));
        let capacity = self.opts.segment_size.max(SEGMENT_HEADER_LEN + need);
        let header = SegmentHeader { first_index, seed_crc }.encode();
        if self.fs.exists(&path).map_err(|e| WalError::io("stat", &path, e))? {
            return Err(WalError::Invalid(format!("segment {} exists already", path.display())));
        }
        if self.fs.exists(&tmp).map_err(|e| WalError::io("stat", &tmp, e))? {
            self.fs.remove_file(&tmp).map_err(|e| WalError::io("remove", &tmp, e))?;
        }
        let file =
            self.fs.open(&tmp, OpenMode::CreateNew).map_err(|e| WalError::io("create", &tmp, e))?;
        file.allocate(capacity).map_err(|e| WalError::io("fallocate", &tmp, e))?;
        file.write_all_at(&header, 0).map_err(|e| WalError::io("write", &tmp, e))?;
        file.sync_all().map_err(|e| WalError::io("fsync", &tmp, e))?;
        self.fs.rename(&tmp, &path).map_err(|e| WalError::io("rename", &tmp, e))?;
        self.fs.sync_dir(&self.log_dir).map_err(|e| WalError::io("fsync dir", &self.log_dir, e))?;
        write_lock(&self.shared.index).segments.push(Segment {
            first_index,
            seed_crc,
            path,
            file,
            capacity,
            offsets: Vec::new(),
            end: SEGMENT_HEADER_LEN,
        });
        self.last_crc = seed_crc;
        Ok(())
    }

    /// Removes every segment file (durably). Only for a log with no live entry.
    fn remove_all_segments(&mut self) -> Result<Vec<PathBuf>> {
        let segs = std::mem::take(&mut write_lock(&self.shared.index).segments);
        write_lock(&self.shared.index).runs.clear();
        let mut removed = Vec::new();
        for s in segs.iter().rev() {
            self.fs.remove_file(&s.path).map_err(|e| WalError::io("remove", &s.path, e))?;
            removed.push(s.path.clone());
        }
        if !segs.is_empty() {
            self.fs
                .sync_dir(&self.log_dir)
                .map_err(|e| WalError::io("fsync dir", &self.log_dir, e))?;
        }
        self.last_crc = 0;
        Ok(removed)
    }

    /// Deletes the entries from index `from` on, durably, before it returns.
    ///
    /// Later segments are removed first (newest first, each removal made durable) and the
    /// segment holding `from` is then cut with `ftruncate`, so every crash leaves a prefix of
    /// the old log and no stale record can come back behind a new one.
    pub fn truncate(&mut self, from: u64) -> Result<()> {
        self.check_poison()?;
        let (last, purged) = {
            let ix = read_lock(&self.shared.index);
            (ix.last_present(), ix.purged)
        };
        let Some(last) = last else { return Ok(()) };
        if from > last {
            return Ok(());
        }
        if let Some(p) = purged
            && from <= p.index
        {
            return Err(WalError::Invalid(format!(
                "truncate from {from} reaches purged entries (purged up to {})",
                p.index
            )));
        }
        if let Some(c) = self.hard_state().committed
            && from <= c.index
        {
            return Err(WalError::Invalid(format!(
                "truncate from {from} would delete committed entry {}",
                c.index
            )));
        }
        self.guarded(|w| w.truncate_io(from))
    }

    fn truncate_io(&mut self, from: u64) -> Result<()> {
        let mut ix = write_lock(&self.shared.index);
        let si = ix.segments.iter().rposition(|s| s.first_index <= from).unwrap_or(0);
        let doomed: Vec<(PathBuf, Arc<dyn File>)> =
            ix.segments.drain(si + 1..).map(|s| (s.path, s.file)).collect();
        let seg = &mut ix.segments[si];
        let k = from.saturating_sub(seg.first_index) as usize;
        let cut = seg.offsets.get(k).copied().unwrap_or(seg.end);
        let new_crc = match k.checked_sub(1) {
            None => seg.seed_crc,
            Some(prev) => {
                let mut b = [0u8; 4];
                fs::read_exact_at(&*seg.file, &mut b, seg.offsets[prev])
                    .map_err(|e| WalError::io("read", &seg.path, e))?;
                u32::from_le_bytes(b)
            }
        };
        seg.offsets.truncate(k);
        seg.end = cut;
        let (file, path, capacity) = (seg.file.clone(), seg.path.clone(), seg.capacity);
        ix.truncate_runs(from);
        // Readers no longer see the doomed entries; the I/O below runs without the lock.
        drop(ix);
        for (p, _) in doomed.iter().rev() {
            self.fs.remove_file(p).map_err(|e| WalError::io("remove", p, e))?;
            self.fs
                .sync_dir(&self.log_dir)
                .map_err(|e| WalError::io("fsync dir", &self.log_dir, e))?;
        }
        file.set_len(cut).map_err(|e| WalError::io("truncate", &path, e))?;
        file.allocate(capacity).map_err(|e| WalError::io("fallocate", &path, e))?;
        file.sync_all().map_err(|e| WalError::io("fsync", &path, e))?;
        self.last_crc = new_crc;
        Ok(())
    }

    /// Deletes the entries up to and including `upto`: the purge point is written to the
    /// hard state (synced) first, then whole segments at or below it are deleted and the
    /// directory synced. Refused past the newest durable snapshot when the log knows it.
    pub fn purge(&mut self, upto: EntryId) -> Result<()> {
        self.check_poison()?;
        let state = self.hard_state();
        if state.last_purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        if let Some(mark) = &self.snapshot_mark {
            let covered = mark.load(Ordering::Acquire);
            if upto.index >= covered {
                return Err(WalError::Invalid(format!(
                    "purge up to {} but the newest durable snapshot covers {}",
                    upto.index,
                    covered
                        .checked_sub(1)
                        .map_or_else(|| "nothing".to_string(), |c| format!("up to {c}"))
                )));
            }
        }
        self.guarded(|w| {
            let hs = HardState { last_purged: Some(upto), ..w.hard_state() };
            w.store_hard(hs)?;
            let mut ix = write_lock(&w.shared.index);
            ix.purged = Some(upto);
            let beyond_end = ix.last_present().is_none_or(|l| l < upto.index);
            let mut doomed = Vec::new();
            if beyond_end {
                doomed.extend(ix.segments.drain(..).map(|s| s.path));
                ix.runs.clear();
            } else {
                while ix.segments.len() >= 2 && ix.segments[1].first_index <= upto.index + 1 {
                    doomed.push(ix.segments.remove(0).path);
                }
                // Keep only the run that covers the first visible entry and later ones.
                let keep_from = ix.runs.partition_point(|r| r.start <= upto.index + 1);
                if keep_from > 1 {
                    ix.runs.drain(..keep_from - 1);
                }
            }
            drop(ix);
            for p in &doomed {
                w.fs.remove_file(p).map_err(|e| WalError::io("remove", p, e))?;
            }
            if !doomed.is_empty() {
                w.fs.sync_dir(&w.log_dir).map_err(|e| WalError::io("fsync dir", &w.log_dir, e))?;
            }
            if beyond_end {
                w.last_crc = 0;
            }
            Ok(())
        })
    }

    fn store_hard(&mut self, hs: HardState) -> Result<()> {
        self.hard.store(hs)?;
        *write_lock(&self.shared.hard) = hs;
        Ok(())
    }

    /// Saves the vote durably (one hard-state write and one `fdatasync`).
    pub fn save_vote(&mut self, vote: StoredVote) -> Result<()> {
        self.guarded(|w| {
            let hs = HardState { vote: Some(vote), ..w.hard_state() };
            w.store_hard(hs)
        })
    }

    /// Records the committed log id. It is written lazily (see
    /// [`WalOptions::committed_sync_every`]); [`Wal::sync`] forces it out.
    pub fn save_committed(&mut self, committed: Option<EntryId>) -> Result<()> {
        self.check_poison()?;
        let mut hs = self.hard_state();
        hs.committed = committed;
        let on_disk = self.hard.state().committed.map(|c| c.index);
        let due = match (committed, on_disk) {
            (Some(c), Some(d)) => c.index >= d + self.opts.committed_sync_every,
            (Some(c), None) => c.index + 1 >= self.opts.committed_sync_every,
            (None, _) => false,
        };
        if due {
            self.guarded(|w| w.store_hard(hs))
        } else {
            *write_lock(&self.shared.hard) = hs;
            Ok(())
        }
    }

    /// Writes anything held lazily (the committed id) to disk.
    pub fn sync(&mut self) -> Result<()> {
        let hs = self.hard_state();
        if hs == self.hard.state() {
            return Ok(());
        }
        self.guarded(|w| w.store_hard(hs))
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Best effort: a committed id held lazily goes out with the log. Losing it is safe
        // (it only means fewer entries are re-applied on start), so errors are ignored.
        if self.poisoned.is_none() && self.hard_state() != self.hard.state() {
            let _ = self.hard.store(self.hard_state());
        }
    }
}

impl WalReader {
    pub(crate) fn from_index(index: Index, hard: HardState) -> WalReader {
        WalReader {
            shared: Arc::new(Shared { index: RwLock::new(index), hard: RwLock::new(hard) }),
        }
    }

    /// The purge point and last log id.
    pub fn log_state(&self) -> LogState {
        let ix = read_lock(&self.shared.index);
        LogState { last_purged: ix.purged, last: ix.last_log_id() }
    }

    /// The hard state as the node sees it.
    pub fn hard_state(&self) -> HardState {
        *read_lock(&self.shared.hard)
    }

    /// The log id of the entry at `index`, if the log holds it.
    pub fn entry_id(&self, index: u64) -> Option<EntryId> {
        let ix = read_lock(&self.shared.index);
        let first = ix.first_visible()?;
        let last = ix.last_present()?;
        if index < first || index > last {
            return None;
        }
        ix.id_of(index)
    }

    /// Calls `f` with each entry in `range` that the log holds, in order. Every record is
    /// checked against its checksum as it is read.
    pub fn read_with<E>(
        &self,
        range: impl RangeBounds<u64>,
        mut f: impl FnMut(EntryId, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E>
    where
        E: From<WalError>,
    {
        let ix = read_lock(&self.shared.index);
        let (Some(first), Some(last)) = (ix.first_visible(), ix.last_present()) else {
            return Ok(());
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e,
            Bound::Excluded(&e) => match e.checked_sub(1) {
                Some(e) => e,
                None => return Ok(()),
            },
            Bound::Unbounded => u64::MAX,
        }
        .min(last);
        if start > end {
            return Ok(());
        }
        const CHUNK: u64 = 4 << 20;
        let mut buf = Vec::new();
        for seg in &ix.segments {
            let Some(seg_last) = seg.last_index() else { continue };
            if seg_last < start || seg.first_index > end {
                continue;
            }
            let a = (start.max(seg.first_index) - seg.first_index) as usize;
            let b = (end.min(seg_last) - seg.first_index) as usize;
            let mut k = a;
            while k <= b {
                // A run of whole records of at most CHUNK bytes (or one larger record).
                let from = seg.offsets[k];
                let mut j = k + 1;
                while j <= b && seg.offsets[j] - from < CHUNK {
                    j += 1;
                }
                let to = seg.offsets.get(j).copied().unwrap_or(seg.end);
                buf.resize((to - from) as usize, 0);
                fs::read_exact_at(&*seg.file, &mut buf, from)
                    .map_err(|e| WalError::io("read", &seg.path, e))?;
                for i in k..j {
                    let rel = (seg.offsets[i] - from) as usize;
                    let bad = |why: &str| {
                        WalError::corrupt(&seg.path, seg.offsets[i], format!("on read: {why}"))
                    };
                    if rel + RECORD_HEADER_LEN > buf.len() {
                        return Err(bad("record runs past its neighbour").into());
                    }
                    let h = RecordHeader::parse(&buf[rel..]);
                    let rend = rel + RECORD_HEADER_LEN + h.len as usize;
                    let expect = seg.first_index + i as u64;
                    if rend > buf.len()
                        || h.id.index != expect
                        || !format::self_valid(&h, &buf[rel..rend])
                    {
                        return Err(bad("record fails its checksum").into());
                    }
                    f(h.id, &buf[rel + RECORD_HEADER_LEN..rend])?;
                }
                k = j;
            }
        }
        Ok(())
    }

    /// The entries in `range` with their payloads.
    pub fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<(EntryId, Vec<u8>)>> {
        let mut out = Vec::new();
        self.read_with(range, |id, p| {
            out.push((id, p.to_vec()));
            Ok::<(), WalError>(())
        })?;
        Ok(out)
    }
}
