//! The hard-state file: vote, committed id and purge point in two checksummed slots.
//!
//! A write goes to the slot that does not hold the newest state and is synced before the
//! next write may touch the other one, so a torn write can only damage the slot being
//! written: on open the valid slot with the highest sequence number wins.

use crate::HardState;
use crate::error::{Result, WalError};
use crate::format::{self, FORMAT_VERSION, HARD_STATE_SLOT, HeaderError};
use crate::fs::{self, File, Fs, OpenMode};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) const FILE_NAME: &str = "hardstate";
const TMP_NAME: &str = "hardstate.tmp";

pub(crate) struct HardStateFile {
    path: PathBuf,
    file: Arc<dyn File>,
    seq: u64,
    state: HardState,
}

/// Picks the newest valid slot.
fn parse(path: &Path, bytes: &[u8]) -> Result<(u64, HardState)> {
    let path = path.to_path_buf();
    let mut best: Option<(u64, HardState)> = None;
    let mut errors = Vec::new();
    for slot in 0..2u64 {
        let start = (slot * HARD_STATE_SLOT) as usize;
        let end = (start + HARD_STATE_SLOT as usize).min(bytes.len());
        let b = bytes.get(start..end).unwrap_or(&[]);
        match format::decode_hard_state(b) {
            Ok(Some((seq, hs))) => {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, hs));
                }
            }
            Ok(None) => {}
            Err(HeaderError::Version(v)) => {
                return Err(WalError::Version { path, found: v, supported: FORMAT_VERSION });
            }
            Err(e) => errors.push((slot, e)),
        }
    }
    let Some((seq, state)) = best else {
        return Err(WalError::corrupt(
            &path,
            errors.first().map(|(s, _)| s * HARD_STATE_SLOT).unwrap_or(0),
            format!("no valid hard-state slot ({errors:?})"),
        ));
    };
    for (slot, e) in errors {
        // The other slot was being written when the process stopped: harmless.
        tracing::warn!(path = %path.display(), slot, error = ?e, "ignoring a torn hard-state slot");
    }
    Ok((seq, state))
}

/// Reads the hard state without creating or changing anything (`None` if there is none).
pub(crate) fn read(fs: &dyn Fs, dir: &Path) -> Result<Option<HardState>> {
    let path = dir.join(FILE_NAME);
    if !fs.exists(&path).map_err(|e| WalError::io("stat", &path, e))? {
        return Ok(None);
    }
    let file = fs.open(&path, OpenMode::Read).map_err(|e| WalError::io("open", &path, e))?;
    let bytes = fs::read_all(&*file).map_err(|e| WalError::io("read", &path, e))?;
    Ok(Some(parse(&path, &bytes)?.1))
}

impl HardStateFile {
    /// Opens the hard state in `dir`, creating it (durably) if there is none. Returns the
    /// file and whether it was created.
    pub(crate) fn open(fs: &dyn Fs, dir: &Path) -> Result<(HardStateFile, bool)> {
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(TMP_NAME);
        if fs.exists(&tmp).map_err(|e| WalError::io("stat", &tmp, e))? {
            // A creation that did not reach its rename: nothing in it was ever relied on.
            fs.remove_file(&tmp).map_err(|e| WalError::io("remove", &tmp, e))?;
        }
        if !fs.exists(&path).map_err(|e| WalError::io("stat", &path, e))? {
            return Ok((Self::create(fs, dir, &path, &tmp)?, true));
        }
        let file =
            fs.open(&path, OpenMode::ReadWrite).map_err(|e| WalError::io("open", &path, e))?;
        let bytes = fs::read_all(&*file).map_err(|e| WalError::io("read", &path, e))?;
        let (seq, state) = parse(&path, &bytes)?;
        Ok((HardStateFile { path, file, seq, state }, false))
    }

    fn create(fs: &dyn Fs, dir: &Path, path: &Path, tmp: &Path) -> Result<HardStateFile> {
        let file = fs.open(tmp, OpenMode::CreateNew).map_err(|e| WalError::io("create", tmp, e))?;
        let state = HardState::default();
        let slot = format::encode_hard_state(1, &state);
        file.set_len(2 * HARD_STATE_SLOT).map_err(|e| WalError::io("set_len", tmp, e))?;
        file.write_all_at(&slot, 0).map_err(|e| WalError::io("write", tmp, e))?;
        file.sync_all().map_err(|e| WalError::io("fsync", tmp, e))?;
        fs.rename(tmp, path).map_err(|e| WalError::io("rename", tmp, e))?;
        fs.sync_dir(dir).map_err(|e| WalError::io("fsync dir", dir, e))?;
        Ok(HardStateFile { path: path.to_path_buf(), file, seq: 1, state })
    }

    pub(crate) fn state(&self) -> HardState {
        self.state
    }

    /// Writes `state` durably (one slot write and one fdatasync).
    pub(crate) fn store(&mut self, state: HardState) -> Result<()> {
        let seq = self.seq + 1;
        let slot = format::encode_hard_state(seq, &state);
        let offset = (seq % 2) * HARD_STATE_SLOT;
        self.file.write_all_at(&slot, offset).map_err(|e| WalError::io("write", &self.path, e))?;
        self.file.sync_data().map_err(|e| WalError::io("fdatasync", &self.path, e))?;
        self.seq = seq;
        self.state = state;
        Ok(())
    }
}
