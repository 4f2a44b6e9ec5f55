//! [`SimFs`]: an in-memory file system that knows what a power loss would keep.
//!
//! Every file has a *current* content (what reads see, like the page cache) and a *durable*
//! content (what the disk holds). Writes and length changes are queued per file until
//! `sync_data`/`sync_all`; creates, renames and removes are queued until `sync_dir` of their
//! directory. [`SimFs::crash`] then decides, from a seeded generator, what of the queue
//! survives:
//!
//! - [`CrashMode::DropUnsynced`]: nothing that was not synced.
//! - [`CrashMode::KeepUnsynced`]: everything (a process crash: the page cache survives).
//! - [`CrashMode::Torn`]: each unsynced write keeps a random subset of its 512-byte sectors,
//!   a random prefix of each file's length changes, and a random prefix of the directory
//!   operations (a journal commits them in order).
//!
//! A failed sync (see [`SimFs::fail_syncs_after`]) behaves like Linux after an I/O error:
//! the data it should have written stays readable but will never reach the disk, and a
//! later successful sync does not bring it back.
//!
//! [`SimFs::crash_after`] lets the machine die in the middle of an operation: after that
//! many more mutating calls every call fails, until [`SimFs::crash`] "reboots" it. Handles
//! opened before a crash stay dead, like the file descriptors of a killed process.

use super::{File, Fs, LockAttempt, LockGuard, OpenMode};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// The sector size torn writes are cut at.
pub const SECTOR: u64 = 512;

/// What a simulated crash keeps of the data that was not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Nothing unsynced survives.
    DropUnsynced,
    /// Everything written survives (a process crash rather than a power loss).
    KeepUnsynced,
    /// A random part survives: sectors of writes, a prefix of length changes and a prefix
    /// of directory operations.
    Torn,
}

/// An in-memory, power-loss-simulating [`Fs`]. Clones share the same "disk".
#[derive(Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("SimFs")
            .field("files", &s.names.len())
            .field("crashes", &s.crashes)
            .field("syncs", &s.syncs)
            .finish()
    }
}

type Ino = u64;

#[derive(Debug)]
enum DirOp {
    Mkdir(PathBuf),
    Link(PathBuf, Ino),
    Unlink(PathBuf),
    Rename(PathBuf, PathBuf, Ino),
}

impl DirOp {
    fn dir(&self) -> PathBuf {
        let p = match self {
            DirOp::Mkdir(p) | DirOp::Link(p, _) | DirOp::Unlink(p) | DirOp::Rename(_, p, _) => p,
        };
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

#[derive(Debug)]
enum FileOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<FileOp>,
}

struct State {
    rng: u64,
    epoch: u64,
    /// Mutating calls left before the machine dies mid-operation.
    countdown: Option<u64>,
    dead: bool,
    /// Successful syncs left before syncs start failing.
    sync_budget: Option<u64>,
    dirs: BTreeSet<PathBuf>,
    durable_dirs: BTreeSet<PathBuf>,
    names: BTreeMap<PathBuf, Ino>,
    durable_names: BTreeMap<PathBuf, Ino>,
    pending_dir: Vec<DirOp>,
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    locks: BTreeSet<PathBuf>,
    crashes: u64,
    syncs: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not hide the state from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dead_error() -> io::Error {
    io::Error::other("simulated power loss: the machine is down")
}

fn stale_error() -> io::Error {
    io::Error::other("file handle from before a simulated crash")
}

fn apply_op(disk: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::SetLen(len) => disk.resize(*len as usize, 0),
        FileOp::Write(off, data) => {
            let (a, b) = (*off as usize, *off as usize + data.len());
            if disk.len() < b {
                disk.resize(b, 0);
            }
            disk[a..b].copy_from_slice(data);
        }
    }
}

fn is_root(p: &Path) -> bool {
    p.as_os_str().is_empty() || p == Path::new("/")
}

impl State {
    fn next_u64(&mut self) -> u64 {
        // splitmix64: small, seedable, good enough to pick what survives.
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// Counts one mutating call; fails once the machine is dead.
    fn tick(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(dead_error());
        }
        if let Some(n) = self.countdown.as_mut() {
            if *n == 0 {
                self.dead = true;
                return Err(dead_error());
            }
            *n -= 1;
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead { Err(dead_error()) } else { Ok(()) }
    }

    fn dir_exists(&self, p: &Path) -> bool {
        is_root(p) || self.dirs.contains(p)
    }

    fn parent_exists(&self, p: &Path) -> bool {
        p.parent().is_none_or(|d| self.dir_exists(d))
    }

    /// Whether the next sync succeeds (and uses up one of the budget).
    fn sync_ok(&mut self) -> bool {
        self.syncs += 1;
        match self.sync_budget.as_mut() {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    fn apply_dir_op(names: &mut BTreeMap<PathBuf, Ino>, dirs: &mut BTreeSet<PathBuf>, op: &DirOp) {
        match op {
            DirOp::Mkdir(p) => {
                dirs.insert(p.clone());
            }
            DirOp::Link(p, ino) => {
                names.insert(p.clone(), *ino);
            }
            DirOp::Unlink(p) => {
                names.remove(p);
            }
            DirOp::Rename(from, to, ino) => {
                names.remove(from);
                names.insert(to.clone(), *ino);
            }
        }
    }

    fn crash(&mut self, mode: CrashMode) {
        // Directory operations: a prefix survives (all, none, or a random one).
        let ops = std::mem::take(&mut self.pending_dir);
        let keep = match mode {
            CrashMode::DropUnsynced => 0,
            CrashMode::KeepUnsynced => ops.len(),
            CrashMode::Torn => self.below(ops.len() as u64 + 1) as usize,
        };
        for op in &ops[..keep] {
            Self::apply_dir_op(&mut self.durable_names, &mut self.durable_dirs, op);
        }
        // A name under a directory that did not survive is gone with it.
        let dirs = self.durable_dirs.clone();
        let dir_ok = |p: &Path| p.ancestors().skip(1).all(|a| is_root(a) || dirs.contains(a));
        self.durable_names.retain(|p, _| dir_ok(p));
        self.durable_dirs = dirs.iter().filter(|d| dir_ok(d)).cloned().collect();

        // File contents.
        let mut inos: Vec<Ino> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(mut inode) = self.inodes.remove(&ino) else { continue };
            let pending = std::mem::take(&mut inode.pending);
            let mut disk = std::mem::take(&mut inode.durable);
            match mode {
                CrashMode::DropUnsynced => {}
                CrashMode::KeepUnsynced => {
                    for op in &pending {
                        apply_op(&mut disk, op);
                    }
                }
                CrashMode::Torn => {
                    let set_lens =
                        pending.iter().filter(|o| matches!(o, FileOp::SetLen(_))).count();
                    let meta_keep = self.below(set_lens as u64 + 1) as usize;
                    let mut seen = 0;
                    for op in &pending {
                        match op {
                            FileOp::SetLen(len) => {
                                if seen < meta_keep {
                                    disk.resize(*len as usize, 0);
                                }
                                seen += 1;
                            }
                            FileOp::Write(off, data) => {
                                let end = off + data.len() as u64;
                                let mut s = *off;
                                while s < end {
                                    let e = ((s / SECTOR + 1) * SECTOR).min(end);
                                    if self.next_u64() & 1 == 1 {
                                        let (a, b) = (s as usize, e as usize);
                                        if disk.len() < b {
                                            disk.resize(b, 0);
                                        }
                                        let from = (s - off) as usize;
                                        disk[a..b].copy_from_slice(&data[from..from + (b - a)]);
                                    }
                                    s = e;
                                }
                            }
                        }
                    }
                }
            }
            inode.current = disk.clone();
            inode.durable = disk;
            self.inodes.insert(ino, inode);
        }
        let live: BTreeSet<Ino> = self.durable_names.values().copied().collect();
        self.inodes.retain(|ino, _| live.contains(ino));
        self.names = self.durable_names.clone();
        self.dirs = self.durable_dirs.clone();
        self.locks.clear();
        self.epoch += 1;
        self.dead = false;
        self.countdown = None;
        self.crashes += 1;
    }
}

impl SimFs {
    /// An empty simulated disk whose crash decisions follow `seed`.
    pub fn new(seed: u64) -> SimFs {
        SimFs {
            state: Arc::new(Mutex::new(State {
                rng: seed ^ 0x5DEE_CE66_D1CE_4E5B,
                epoch: 0,
                countdown: None,
                dead: false,
                sync_budget: None,
                dirs: BTreeSet::new(),
                durable_dirs: BTreeSet::new(),
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending_dir: Vec::new(),
                inodes: HashMap::new(),
                next_ino: 1,
                locks: BTreeSet::new(),
                crashes: 0,
                syncs: 0,
            })),
        }
    }

    /// This disk as a shared [`Fs`].
    pub fn shared(&self) -> Arc<dyn Fs> {
        Arc::new(self.clone())
    }

    /// Loses power: keeps what `mode` says of the unsynced state, invalidates every open
    /// handle and lock, and brings the machine back up. Sync faults stay armed.
    pub fn crash(&self, mode: CrashMode) {
        lock(&self.state).crash(mode);
    }

    /// The machine dies after `n` more mutating calls (writes, syncs, length changes,
    /// directory operations): the `n+1`-th and every later call fail until [`SimFs::crash`].
    pub fn crash_after(&self, n: u64) {
        let mut s = lock(&self.state);
        s.countdown = Some(n);
    }

    /// Whether the machine died (see [`SimFs::crash_after`]) and awaits [`SimFs::crash`].
    pub fn is_down(&self) -> bool {
        lock(&self.state).dead
    }

    /// After `n` more successful syncs, every sync fails with an I/O error (and its data is
    /// lost) until [`SimFs::clear_faults`].
    pub fn fail_syncs_after(&self, n: u64) {
        lock(&self.state).sync_budget = Some(n);
    }

    /// Disarms the faults set by [`SimFs::fail_syncs_after`] and [`SimFs::crash_after`].
    pub fn clear_faults(&self) {
        let mut s = lock(&self.state);
        s.sync_budget = None;
        s.countdown = None;
    }

    /// How many sync calls (file or directory) have been made.
    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// A random number from this disk's generator (for tests that want one seed for all).
    pub fn random(&self) -> u64 {
        lock(&self.state).next_u64()
    }

    /// The current content of the file at `path`, if it exists.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let s = lock(&self.state);
        let ino = s.names.get(path)?;
        s.inodes.get(ino).map(|i| i.current.clone())
    }

    /// Overwrites the file at `path` durably, bypassing the queue (to plant corruption).
    pub fn poke(&self, path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut s = lock(&self.state);
        let ino = *s.names.get(path).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let inode =
            s.inodes.get_mut(&ino).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        for buf in [&mut inode.current, &mut inode.durable] {
            let end = offset as usize + bytes.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[offset as usize..end].copy_from_slice(bytes);
        }
        Ok(())
    }

    fn with_file<T>(
        &self,
        f: &SimFile,
        mutating: bool,
        op: impl FnOnce(&mut State, Ino) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut s = lock(&self.state);
        if f.epoch != s.epoch {
            return Err(stale_error());
        }
        if mutating {
            s.tick()?;
        } else {
            s.alive()?;
        }
        if !s.inodes.contains_key(&f.ino) {
            return Err(stale_error());
        }
        op(&mut s, f.ino)
    }
}

struct SimFile {
    fs: SimFs,
    ino: Ino,
    epoch: u64,
    writable: bool,
    path: PathBuf,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimFile({})", self.path.display())
    }
}

struct SimLock {
    fs: SimFs,
    path: PathBuf,
    epoch: u64,
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut s = lock(&self.fs.state);
        if s.epoch == self.epoch {
            s.locks.remove(&self.path);
        }
    }
}

fn check_writable(f: &SimFile) -> io::Result<()> {
    if f.writable {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "file opened read-only"))
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut s = lock(&self.state);
        let existing = s.names.get(path).copied();
        let ino = match (mode, existing) {
            (OpenMode::CreateNew, Some(_)) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
            }
            (OpenMode::Read | OpenMode::ReadWrite, None) => {
                s.alive()?;
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such file"));
            }
            (_, Some(ino)) => {
                s.alive()?;
                ino
            }
            (OpenMode::CreateNew | OpenMode::CreateOrOpen, None) => {
                s.tick()?;
                if !s.parent_exists(path) {
                    return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
                }
                let ino = s.next_ino;
                s.next_ino += 1;
                s.inodes.insert(ino, Inode::default());
                s.names.insert(path.to_path_buf(), ino);
                s.pending_dir.push(DirOp::Link(path.to_path_buf(), ino));
                ino
            }
        };
        Ok(Arc::new(SimFile {
            fs: self.clone(),
            ino,
            epoch: s.epoch,
            writable: mode != OpenMode::Read,
            path: path.to_path_buf(),
        }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        let mut missing: Vec<PathBuf> =
            path.ancestors().filter(|a| !s.dir_exists(a)).map(Path::to_path_buf).collect();
        missing.reverse();
        for d in missing {
            s.tick()?;
            if s.names.contains_key(&d) {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "a file has that name"));
            }
            s.dirs.insert(d.clone());
            s.pending_dir.push(DirOp::Mkdir(d));
        }
        Ok(())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        let s = lock(&self.state);
        s.alive()?;
        if !s.dir_exists(path) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        let child = |p: &PathBuf| {
            if p.parent() == Some(path) { p.file_name().map(|n| n.to_os_string()) } else { None }
        };
        Ok(s.names.keys().filter_map(child).chain(s.dirs.iter().filter_map(child)).collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let s = lock(&self.state);
        s.alive()?;
        Ok(s.names.contains_key(path) || s.dir_exists(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.tick()?;
        let ino = *s.names.get(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if !s.parent_exists(to) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        s.names.remove(from);
        s.names.insert(to.to_path_buf(), ino);
        s.pending_dir.push(DirOp::Rename(from.to_path_buf(), to.to_path_buf(), ino));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.tick()?;
        if s.names.remove(path).is_none() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        s.pending_dir.push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = lock(&self.state);
        s.tick()?;
        if !s.dir_exists(path) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no such directory"));
        }
        if !s.sync_ok() {
            return Err(io::Error::other("simulated EIO from fsync(dir)"));
        }
        let ops = std::mem::take(&mut s.pending_dir);
        let (mine, rest): (Vec<DirOp>, Vec<DirOp>) =
            ops.into_iter().partition(|op| op.dir() == path);
        let State { durable_names, durable_dirs, .. } = &mut *s;
        for op in &mine {
            State::apply_dir_op(durable_names, durable_dirs, op);
        }
        s.pending_dir = rest;
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<LockAttempt> {
        let mut s = lock(&self.state);
        s.alive()?;
        if !s.locks.insert(path.to_path_buf()) {
            return Ok(LockAttempt::Held {
                holder: Some("another user of this simulated disk".to_string()),
            });
        }
        Ok(LockAttempt::Acquired(Box::new(SimLock {
            fs: self.clone(),
            path: path.to_path_buf(),
            epoch: s.epoch,
        })))
    }
}

impl File for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.fs.with_file(self, false, |s, ino| {
            let data = &s.inodes[&ino].current;
            let Ok(off) = usize::try_from(offset) else { return Ok(0) };
            if off >= data.len() {
                return Ok(0);
            }
            let n = buf.len().min(data.len() - off);
            buf[..n].copy_from_slice(&data[off..off + n]);
            Ok(n)
        })
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_writable(self)?;
        self.fs.with_file(self, true, |s, ino| {
            let inode = s.inodes.get_mut(&ino).ok_or_else(stale_error)?;
            let end = offset as usize + buf.len();
            if inode.current.len() < end {
                inode.current.resize(end, 0);
            }
            inode.current[offset as usize..end].copy_from_slice(buf);
            inode.pending.push(FileOp::Write(offset, buf.to_vec()));
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.fs.with_file(self, false, |s, ino| Ok(s.inodes[&ino].current.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        check_writable(self)?;
        self.fs.with_file(self, true, |s, ino| {
            let inode = s.inodes.get_mut(&ino).ok_or_else(stale_error)?;
            inode.current.resize(len as usize, 0);
            inode.pending.push(FileOp::SetLen(len));
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        check_writable(self)?;
        self.fs.with_file(self, true, |s, ino| {
            let inode = s.inodes.get_mut(&ino).ok_or_else(stale_error)?;
            if (inode.current.len() as u64) < len {
                inode.current.resize(len as usize, 0);
                inode.pending.push(FileOp::SetLen(len));
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.fs.with_file(self, true, |s, ino| {
            let ok = s.sync_ok();
            let inode = s.inodes.get_mut(&ino).ok_or_else(stale_error)?;
            if ok {
                // Only what is queued reaches the disk: data lost to an earlier failed sync
                // stays lost even though reads still see it.
                for op in std::mem::take(&mut inode.pending) {
                    apply_op(&mut inode.durable, &op);
                }
                Ok(())
            } else {
                // Like Linux after a writeback error: the pages stay readable, marked clean,
                // and never reach the disk. A crash brings the old content back.
                inode.pending.clear();
                Err(io::Error::other("simulated EIO from fdatasync"))
            }
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}
