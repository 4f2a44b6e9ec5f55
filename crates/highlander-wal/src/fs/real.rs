//! [`Fs`] over the operating system's file system (std, plus `libc` for `fallocate` and
//! `flock`).

use super::{File, Fs, LockAttempt, LockGuard, OpenMode};
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl RealFs {
    /// The real file system, ready to share.
    pub fn shared() -> Arc<dyn Fs> {
        Arc::new(RealFs)
    }
}

#[derive(Debug)]
struct RealFile {
    file: fs::File,
}

impl Fs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn File>> {
        let mut o = fs::OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::CreateOrOpen => o.read(true).write(true).create(true),
        };
        Ok(Arc::new(RealFile { file: o.open(path)? }))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        fs::File::open(path)?.sync_all()
    }

    fn try_lock(&self, path: &Path) -> io::Result<LockAttempt> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // flock locks the open file description, so a second open in this very process
        // conflicts too (an fcntl lock would not), and the kernel drops it when we die.
        // SAFETY: flock on a valid descriptor owned by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut s = String::new();
                let holder = match file.read_to_string(&mut s) {
                    Ok(_) if !s.trim().is_empty() => Some(s.trim().to_string()),
                    _ => None,
                };
                return Ok(LockAttempt::Held { holder });
            }
            return Err(err);
        }
        // Record who holds it, for the error another process will print. Not synced: it is
        // a hint for humans, and the lock itself lives in the kernel.
        file.set_len(0)?;
        let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        write!(file, "pid {} ({exe})", std::process::id())?;
        Ok(LockAttempt::Acquired(Box::new(RealLock { _file: file })))
    }
}

struct RealLock {
    _file: fs::File,
}

impl LockGuard for RealLock {}

impl File for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let Ok(off_len) = libc::off_t::try_from(len) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "length too large"));
        };
        // SAFETY: fallocate on a valid descriptor owned by `self.file`.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, 0, off_len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // A file system without fallocate: grow the file sparsely instead. Appends then
            // pay for allocation, but stay correct.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                if self.len()? < len {
                    self.file.set_len(len)?;
                }
                Ok(())
            }
            _ => Err(err),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}
