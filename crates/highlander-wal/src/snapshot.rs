//! Snapshot files: one checksummed file per snapshot, written under a temporary name, synced,
//! renamed and the directory synced; the newest two are kept.
//!
//! ```text
//! snapshots/<seq:020>.snap
//!   header (80 B)  magic "HLSNAPSH" | version u32 | flags u32 (1: has last log id) | seq u64
//!                  | last log id: term u64, node u64, index u64 | meta_len u64 | data_len u64
//!                  | crc32c of meta ++ data u32 | reserved u32 | crc32c of bytes 0..72 u32
//!                  | reserved u32
//!   meta bytes     opaque (the runtime's encoded SnapshotMeta)
//!   data bytes     opaque (the runtime's encoded state)
//! ```
//!
//! The header is written last, so a file whose header checks out was written whole; the
//! body checksum is verified on every load.

use crate::EntryId;
use crate::error::{Result, WalError};
use crate::format::FORMAT_VERSION;
use crate::fs::{self, File, Fs, LockGuard, OpenMode};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const MAGIC: &[u8; 8] = b"HLSNAPSH";
const HEADER_LEN: u64 = 80;
const WRITE_BUF: usize = 1 << 20;

/// A durable snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Write order: a later snapshot has a larger number.
    pub seq: u64,
    /// The last log entry the snapshot covers (`None` for a snapshot of the empty state).
    pub last_log: Option<EntryId>,
    /// Length of the opaque metadata.
    pub meta_len: u64,
    /// Length of the opaque state data.
    pub data_len: u64,
    /// The file.
    pub path: PathBuf,
}

impl SnapshotInfo {
    fn order_key(&self) -> (Option<u64>, u64) {
        (self.last_log.map(|l| l.index), self.seq)
    }
}

/// A snapshot read back and verified.
#[derive(Clone, Debug)]
pub struct LoadedSnapshot {
    /// Where it came from.
    pub info: SnapshotInfo,
    /// The opaque metadata given when it was written.
    pub meta: Vec<u8>,
    /// The opaque state data.
    pub data: Vec<u8>,
}

struct Header {
    seq: u64,
    last_log: Option<EntryId>,
    meta_len: u64,
    data_len: u64,
    body_crc: u32,
}

fn encode_header(h: &Header) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    if let Some(l) = h.last_log {
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&l.term.to_le_bytes());
        b[32..40].copy_from_slice(&l.node.to_le_bytes());
        b[40..48].copy_from_slice(&l.index.to_le_bytes());
    }
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[48..56].copy_from_slice(&h.meta_len.to_le_bytes());
    b[56..64].copy_from_slice(&h.data_len.to_le_bytes());
    b[64..68].copy_from_slice(&h.body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[..72]);
    b[72..76].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_header(path: &Path, b: &[u8]) -> Result<Header> {
    let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    if b.len() < HEADER_LEN as usize || &b[0..8] != MAGIC {
        return Err(WalError::corrupt(path, 0, "not a snapshot file (bad magic)"));
    }
    if crc32c::crc32c(&b[..72]) != u32_at(72) {
        return Err(WalError::corrupt(path, 0, "snapshot header fails its checksum"));
    }
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(WalError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(Header {
        seq: u64_at(16),
        last_log: (u32_at(12) & 1 != 0).then(|| EntryId {
            term: u64_at(24),
            node: u64_at(32),
            index: u64_at(40),
        }),
        meta_len: u64_at(48),
        data_len: u64_at(56),
        body_crc: u32_at(64),
    })
}

fn snapshot_name(seq: u64) -> String {
    format!("{seq:020}.snap")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".snap")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

struct State {
    next_seq: u64,
    /// Valid snapshots, oldest first (by last log index, then write order).
    list: Vec<SnapshotInfo>,
}

struct Inner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    keep: usize,
    verify_writes: bool,
    /// Index + 1 of the newest durable snapshot, shared with the log's purge check.
    mark: Arc<AtomicU64>,
    state: Mutex<State>,
    _lock: Arc<dyn LockGuard>,
}

/// The snapshot files of one data directory. Clones share it; it is safe to build one
/// snapshot while another is being installed.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("dir", &self.inner.dir)
            .field("snapshots", &self.state().list)
            .finish()
    }
}

/// What opening the snapshot directory found.
#[derive(Clone, Debug, Default)]
pub struct SnapshotRecovery {
    /// Temporaries of interrupted writes, removed.
    pub removed: Vec<PathBuf>,
    /// Snapshot files that could not be used, with the reason. They are left in place.
    pub damaged: Vec<(PathBuf, String)>,
}

impl SnapshotStore {
    pub(crate) fn open(
        fs: Arc<dyn Fs>,
        dir: PathBuf,
        keep: usize,
        verify_writes: bool,
        mark: Arc<AtomicU64>,
        lock: Arc<dyn LockGuard>,
        repair: bool,
    ) -> Result<(SnapshotStore, SnapshotRecovery)> {
        let mut report = SnapshotRecovery::default();
        let mut list = Vec::new();
        let mut max_seq = 0;
        for name in fs.read_dir(&dir).map_err(|e| WalError::io("list", &dir, e))? {
            let Some(name) = name.to_str().map(str::to_owned) else { continue };
            let path = dir.join(&name);
            if name.ends_with(".tmp") {
                if repair {
                    fs.remove_file(&path).map_err(|e| WalError::io("remove", &path, e))?;
                }
                report.removed.push(path);
                continue;
            }
            let Some(seq) = parse_name(&name) else {
                tracing::warn!(file = %path.display(), "ignoring a file the snapshot store does not own");
                continue;
            };
            max_seq = max_seq.max(seq);
            match read_header(&*fs, &path) {
                Ok(h) if h.seq == seq => list.push(SnapshotInfo {
                    seq,
                    last_log: h.last_log,
                    meta_len: h.meta_len,
                    data_len: h.data_len,
                    path,
                }),
                Ok(h) => report
                    .damaged
                    .push((path, format!("header says seq {} but the name says {seq}", h.seq))),
                Err(e @ WalError::Version { .. }) => return Err(e),
                Err(e) => report.damaged.push((path, e.to_string())),
            }
        }
        if repair && !report.removed.is_empty() {
            fs.sync_dir(&dir).map_err(|e| WalError::io("fsync dir", &dir, e))?;
        }
        for (path, why) in &report.damaged {
            tracing::warn!(file = %path.display(), reason = %why, "unusable snapshot file left in place");
        }
        list.sort_by_key(SnapshotInfo::order_key);
        let store = SnapshotStore {
            inner: Arc::new(Inner {
                fs,
                dir,
                keep: keep.max(1),
                verify_writes,
                mark,
                state: Mutex::new(State { next_seq: max_seq + 1, list }),
                _lock: lock,
            }),
        };
        Ok((store, report))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The valid snapshots, oldest first.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.state().list.clone()
    }

    /// The newest valid snapshot (largest last log index, then latest written).
    pub fn latest(&self) -> Option<SnapshotInfo> {
        self.state().list.last().cloned()
    }

    /// Reads a snapshot whole and verifies its checksums.
    pub fn load(&self, info: &SnapshotInfo) -> Result<LoadedSnapshot> {
        let fs = &*self.inner.fs;
        let file =
            fs.open(&info.path, OpenMode::Read).map_err(|e| WalError::io("open", &info.path, e))?;
        let bytes = fs::read_all(&*file).map_err(|e| WalError::io("read", &info.path, e))?;
        let h = decode_header(&info.path, &bytes)?;
        let body = &bytes[HEADER_LEN as usize..];
        if (body.len() as u64) != h.meta_len.saturating_add(h.data_len) {
            return Err(WalError::corrupt(
                &info.path,
                HEADER_LEN,
                format!(
                    "snapshot body is {} bytes, the header says {} + {}",
                    body.len(),
                    h.meta_len,
                    h.data_len
                ),
            ));
        }
        if crc32c::crc32c(body) != h.body_crc {
            return Err(WalError::corrupt(
                &info.path,
                HEADER_LEN,
                "snapshot body fails its checksum",
            ));
        }
        let (meta, data) = body.split_at(h.meta_len as usize);
        Ok(LoadedSnapshot { info: info.clone(), meta: meta.to_vec(), data: data.to_vec() })
    }

    /// Opens a snapshot for streaming (to a peer, say). The metadata is read and returned at
    /// once; the data is verified as it streams and a mismatch is reported as an
    /// `InvalidData` error by the read that reaches the end.
    pub fn open_reader(&self, info: &SnapshotInfo) -> Result<(Vec<u8>, SnapshotReader)> {
        let fs = &*self.inner.fs;
        let file =
            fs.open(&info.path, OpenMode::Read).map_err(|e| WalError::io("open", &info.path, e))?;
        let mut hb = [0u8; HEADER_LEN as usize];
        fs::read_exact_at(&*file, &mut hb, 0).map_err(|e| WalError::io("read", &info.path, e))?;
        let h = decode_header(&info.path, &hb)?;
        let meta_len = usize::try_from(h.meta_len)
            .map_err(|_| WalError::corrupt(&info.path, 48, "metadata length too large"))?;
        let mut meta = vec![0u8; meta_len];
        fs::read_exact_at(&*file, &mut meta, HEADER_LEN)
            .map_err(|e| WalError::io("read", &info.path, e))?;
        let reader = SnapshotReader {
            file,
            pos: HEADER_LEN + h.meta_len,
            end: HEADER_LEN + h.meta_len + h.data_len,
            crc: crc32c::crc32c(&meta),
            expect: h.body_crc,
        };
        Ok((meta, reader))
    }

    /// Starts writing a snapshot covering the log up to `last_log`, with opaque `meta`. Write
    /// the state data into the returned writer, then [`SnapshotWriter::finish`] it. The same
    /// path serves snapshots built here and snapshots streamed in from the leader: nothing
    /// is visible until `finish` has verified and renamed the file.
    pub fn begin(&self, last_log: Option<EntryId>, meta: &[u8]) -> Result<SnapshotWriter> {
        let seq = {
            let mut st = self.state();
            let s = st.next_seq;
            st.next_seq += 1;
            s
        };
        let tmp = self.inner.dir.join(format!("{}.tmp", snapshot_name(seq)));
        let file = self
            .inner
            .fs
            .open(&tmp, OpenMode::CreateNew)
            .map_err(|e| WalError::io("create", &tmp, e))?;
        let mut w = SnapshotWriter {
            store: self.clone(),
            tmp,
            file,
            seq,
            last_log,
            meta_len: meta.len() as u64,
            pos: HEADER_LEN,
            crc: 0,
            buf: Vec::with_capacity(WRITE_BUF),
            done: false,
        };
        w.put(meta)?;
        Ok(w)
    }

    /// Writes a whole snapshot at once: [`SnapshotStore::begin`], write, finish.
    pub fn save(
        &self,
        last_log: Option<EntryId>,
        meta: &[u8],
        data: &[u8],
    ) -> Result<SnapshotInfo> {
        let mut w = self.begin(last_log, meta)?;
        w.put(data)?;
        w.finish()
    }

    fn install(&self, info: SnapshotInfo) -> Result<()> {
        let fs = &*self.inner.fs;
        let dir = &self.inner.dir;
        let mut st = self.state();
        st.list.push(info);
        st.list.sort_by_key(SnapshotInfo::order_key);
        if let Some(newest) = st.list.last() {
            let covered = newest.last_log.map_or(0, |l| l.index + 1);
            self.inner.mark.fetch_max(covered, Ordering::AcqRel);
        }
        // Older ones go only now that the new one is durable.
        let excess = st.list.len().saturating_sub(self.inner.keep);
        let old: Vec<SnapshotInfo> = st.list.drain(..excess).collect();
        drop(st);
        for o in &old {
            fs.remove_file(&o.path).map_err(|e| WalError::io("remove", &o.path, e))?;
        }
        if !old.is_empty() {
            fs.sync_dir(dir).map_err(|e| WalError::io("fsync dir", dir, e))?;
        }
        Ok(())
    }
}

fn read_header(fs: &dyn Fs, path: &Path) -> Result<Header> {
    let file = fs.open(path, OpenMode::Read).map_err(|e| WalError::io("open", path, e))?;
    let mut hb = [0u8; HEADER_LEN as usize];
    match fs::read_exact_at(&*file, &mut hb, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(WalError::corrupt(path, 0, "snapshot file shorter than its header"));
        }
        Err(e) => return Err(WalError::io("read", path, e)),
    }
    let h = decode_header(path, &hb)?;
    let len = file.len().map_err(|e| WalError::io("stat", path, e))?;
    if len != HEADER_LEN + h.meta_len.saturating_add(h.data_len) {
        return Err(WalError::corrupt(path, len, "snapshot file length does not match its header"));
    }
    Ok(h)
}

/// Streams one snapshot into a temporary file. Dropping it without
/// [`SnapshotWriter::finish`] removes the temporary file.
pub struct SnapshotWriter {
    store: SnapshotStore,
    tmp: PathBuf,
    file: Arc<dyn File>,
    seq: u64,
    last_log: Option<EntryId>,
    meta_len: u64,
    pos: u64,
    crc: u32,
    buf: Vec<u8>,
    done: bool,
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("tmp", &self.tmp)
            .field("written", &self.pos)
            .finish()
    }
}

impl SnapshotWriter {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= WRITE_BUF {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, self.pos)
            .map_err(|e| WalError::io("write", &self.tmp, e))?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Makes the snapshot durable and visible: writes the header, `fdatasync`, reads the
    /// file back and checks it (unless turned off), renames it into place, syncs the
    /// directory, then deletes snapshots beyond the newest two. Only after this returns may
    /// the log be purged up to the snapshot, or the in-memory state be replaced by it.
    pub fn finish(self) -> Result<SnapshotInfo> {
        self.seal()?.publish()
    }

    /// Makes the temporary file durable and checked, but not yet visible: writes the header,
    /// `fdatasync`, and reads the file back (unless turned off). A snapshot streamed in from
    /// the leader is sealed, read back and decoded before anything relies on it; only then
    /// is it [published](SealedSnapshot::publish). Dropping the sealed snapshot removes it.
    pub fn seal(mut self) -> Result<SealedSnapshot> {
        self.flush_buf()?;
        let data_len = self.pos - HEADER_LEN - self.meta_len;
        let header = encode_header(&Header {
            seq: self.seq,
            last_log: self.last_log,
            meta_len: self.meta_len,
            data_len,
            body_crc: self.crc,
        });
        let tmp = self.tmp.clone();
        self.file.write_all_at(&header, 0).map_err(|e| WalError::io("write", &tmp, e))?;
        self.file.sync_data().map_err(|e| WalError::io("fdatasync", &tmp, e))?;
        if self.store.inner.verify_writes {
            self.verify()?;
        }
        Ok(SealedSnapshot { writer: self, data_len })
    }

    /// Reads the temporary file back and checks it against what was written.
    fn verify(&self) -> Result<()> {
        let mut hb = [0u8; HEADER_LEN as usize];
        fs::read_exact_at(&*self.file, &mut hb, 0)
            .map_err(|e| WalError::io("read", &self.tmp, e))?;
        let h = decode_header(&self.tmp, &hb)?;
        let mut crc = 0u32;
        let mut buf = vec![0u8; WRITE_BUF];
        let mut at = HEADER_LEN;
        let end = HEADER_LEN + h.meta_len + h.data_len;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            fs::read_exact_at(&*self.file, &mut buf[..n], at)
                .map_err(|e| WalError::io("read", &self.tmp, e))?;
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            at += n as u64;
        }
        let len = self.file.len().map_err(|e| WalError::io("stat", &self.tmp, e))?;
        if crc != self.crc || len != end {
            return Err(WalError::corrupt(
                &self.tmp,
                HEADER_LEN,
                "snapshot read back differs from what was written",
            ));
        }
        Ok(())
    }
}

/// A snapshot whose temporary file is durable and checked but not yet visible: see
/// [`SnapshotWriter::seal`]. Dropping it removes the temporary file.
pub struct SealedSnapshot {
    writer: SnapshotWriter,
    data_len: u64,
}

impl std::fmt::Debug for SealedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSnapshot")
            .field("tmp", &self.writer.tmp)
            .field("data_len", &self.data_len)
            .finish()
    }
}

impl SealedSnapshot {
    /// The snapshot's covered log position.
    pub fn last_log(&self) -> Option<EntryId> {
        self.writer.last_log
    }

    /// Reads the data back from the temporary file, checking the body's checksum: what the
    /// caller gets is what a restart would load.
    pub fn read_data(&self) -> Result<Vec<u8>> {
        let w = &self.writer;
        let file = &*w.file;
        let len = usize::try_from(w.meta_len + self.data_len)
            .map_err(|_| WalError::corrupt(&w.tmp, HEADER_LEN, "snapshot too large to load"))?;
        let mut body = vec![0u8; len];
        fs::read_exact_at(file, &mut body, HEADER_LEN)
            .map_err(|e| WalError::io("read", &w.tmp, e))?;
        if crc32c::crc32c(&body) != w.crc {
            return Err(WalError::corrupt(
                &w.tmp,
                HEADER_LEN,
                "snapshot read back fails its checksum",
            ));
        }
        Ok(body.split_off(w.meta_len as usize))
    }

    /// Renames the file into place, syncs the directory, and deletes snapshots beyond the
    /// newest two: from here on the snapshot is the one a restart loads.
    pub fn publish(mut self) -> Result<SnapshotInfo> {
        let w = &mut self.writer;
        let path = w.store.inner.dir.join(snapshot_name(w.seq));
        let fs = w.store.inner.fs.clone();
        fs.rename(&w.tmp, &path).map_err(|e| WalError::io("rename", &w.tmp, e))?;
        w.done = true;
        let dir = w.store.inner.dir.clone();
        fs.sync_dir(&dir).map_err(|e| WalError::io("fsync dir", &dir, e))?;
        let info = SnapshotInfo {
            seq: w.seq,
            last_log: w.last_log,
            meta_len: w.meta_len,
            data_len: self.data_len,
            path,
        };
        w.store.install(info.clone())?;
        Ok(info)
    }
}

impl io::Write for SnapshotWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.put(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Durability comes from `finish`; this only hands the buffer to the file.
        self.flush_buf().map_err(io::Error::other)
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: a leftover temporary is also removed on the next open.
            let _ = self.store.inner.fs.remove_file(&self.tmp);
        }
    }
}

/// Streams the data of a snapshot file, checking its checksum at the end.
pub struct SnapshotReader {
    file: Arc<dyn File>,
    pos: u64,
    end: u64,
    crc: u32,
    expect: u32,
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader").field("pos", &self.pos).field("end", &self.end).finish()
    }
}

impl io::Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        let want = ((self.end - self.pos) as usize).min(buf.len());
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "snapshot file ends early"));
        }
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.pos += n as u64;
        if self.pos == self.end && self.crc != self.expect {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot fails its checksum"));
        }
        Ok(n)
    }
}
