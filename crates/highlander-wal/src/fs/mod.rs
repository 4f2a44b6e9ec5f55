//! The file-system boundary: every byte this crate reads or writes goes through [`Fs`].
//!
//! [`RealFs`] is the operating system's file system; [`SimFs`] is an in-memory one that
//! remembers what has been made durable and can simulate a power loss, a torn write or a
//! failing `fdatasync`. The WAL is written against the trait only, so every crash-consistency
//! argument can be tested deterministically with [`SimFs`].

mod real;
mod sim;

pub use real::RealFs;
pub use sim::{CrashMode, SimFs};

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// How [`Fs::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading only.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// A new file for reading and writing; fails if the name exists.
    CreateNew,
    /// Opens the file for reading and writing, creating it empty if it does not exist.
    CreateOrOpen,
}

/// A file system as the WAL needs it: files addressed by path, directory operations that
/// are durable only after [`Fs::sync_dir`], and an advisory directory lock.
pub trait Fs: Send + Sync + fmt::Debug + 'static {
    /// Opens (or creates, per `mode`) the file at `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>>;

    /// Creates `path` and any missing parents. Durable only after [`Fs::sync_dir`] of each
    /// parent.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;

    /// The names (not paths) of the entries in directory `path`, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;

    /// Whether `path` names an existing file or directory.
    fn exists(&self, path: &Path) -> io::Result<bool>;

    /// Atomically renames `from` to `to`, replacing `to`. Durable only after
    /// [`Fs::sync_dir`] of the directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes the file at `path`. Durable only after [`Fs::sync_dir`] of the directory.
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Makes every create, rename and remove in directory `path` durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Tries to take an exclusive lock on the lock file at `path` (created if missing),
    /// held until the returned guard is dropped or the process dies.
    fn try_lock(&self, path: &Path) -> io::Result<LockAttempt>;
}

/// The outcome of [`Fs::try_lock`].
pub enum LockAttempt {
    /// The lock is ours until the guard is dropped.
    Acquired(Box<dyn LockGuard>),
    /// Somebody else holds it.
    Held {
        /// What the holder wrote into the lock file (its pid), if it could be read.
        holder: Option<String>,
    },
}

impl fmt::Debug for LockAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockAttempt::Acquired(_) => f.write_str("Acquired"),
            LockAttempt::Held { holder } => f.debug_struct("Held").field("holder", holder).finish(),
        }
    }
}

/// Holds a directory lock; dropping it releases the lock.
pub trait LockGuard: Send + Sync {}

/// An open file. All methods take `&self` and are safe to call from several threads; reads
/// and writes are positional, so there is no shared cursor.
pub trait File: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`, extending the file if needed. Not durable until
    /// [`File::sync_data`].
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// The file's current length.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Sets the file's length: shrinking drops the bytes past `len`, growing adds zeros.
    /// Durable only after [`File::sync_data`] or [`File::sync_all`].
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// Reserves disk space so that `[0, len)` is allocated and reads as zeros past the old
    /// end (`fallocate` on Linux). Grows the file to `len` if it is shorter.
    fn allocate(&self, len: u64) -> io::Result<()>;

    /// Makes the file's data (and its length) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;

    /// Makes the file's data and all its metadata durable: `fsync`.
    fn sync_all(&self) -> io::Result<()>;
}

/// Reads exactly `buf.len()` bytes at `offset`, or fails with `UnexpectedEof`.
pub fn read_exact_at(file: &dyn File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ends early"));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a whole file into memory.
pub fn read_all(file: &dyn File) -> io::Result<Vec<u8>> {
    let len = file.len()?;
    let len = usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large for memory"))?;
    let mut buf = vec![0u8; len];
    read_exact_at(file, &mut buf, 0)?;
    Ok(buf)
}
