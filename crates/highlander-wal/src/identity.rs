//! The identity file: which node a data directory belongs to, and which Raft member this
//! incarnation of its storage is.
//!
//! A node that loses its data directory must never come back as the Raft member it was: that
//! member may have voted and acknowledged entries it no longer remembers. So every data
//! directory records the member id it was given when it was first used, and a directory
//! without one is new storage, whatever the node id. The file is written once, before the
//! storage takes part in Raft, under a temporary name that is synced, renamed and whose
//! directory is synced.
//!
//! Layout (28 bytes, little-endian): magic `HLID`, format version (u32), node id (u64),
//! member id (u64), CRC32C of the preceding 24 bytes.

use crate::error::{Result, WalError};
use crate::fs::{self, Fs, OpenMode};
use std::path::Path;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "identity";
const TMP_NAME: &str = "identity.tmp";
const MAGIC: &[u8; 4] = b"HLID";
const VERSION: u32 = 1;
const LEN: usize = 28;

/// Which node a data directory belongs to and which Raft member its storage is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The node id from the static peer list.
    pub node: u64,
    /// The Raft member id of this storage: the node id for the members that formed the
    /// cluster, a fresh number for storage that joined it later.
    pub member: u64,
}

impl Identity {
    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.node.to_le_bytes());
        b[16..24].copy_from_slice(&self.member.to_le_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Identity> {
        let corrupt = |reason: &str| WalError::corrupt(path, 0, reason.to_string());
        if b.len() != LEN {
            return Err(corrupt(&format!("{} bytes, expected {LEN}", b.len())));
        }
        if &b[0..4] != MAGIC {
            return Err(corrupt("not an identity file"));
        }
        let crc = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&b[..24]) {
            return Err(corrupt("checksum mismatch"));
        }
        let version = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(WalError::Version {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        Ok(Identity {
            node: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            member: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        })
    }
}

/// Reads the identity of the data directory `dir`, `None` if it has none yet. A damaged
/// file is an error: the directory's owner cannot be told, so nothing may be assumed.
pub fn read_identity(fs: &dyn Fs, dir: &Path) -> Result<Option<Identity>> {
    let path = dir.join(FILE_NAME);
    if !fs.exists(&path).map_err(|e| WalError::io("stat", &path, e))? {
        return Ok(None);
    }
    let file = fs.open(&path, OpenMode::Read).map_err(|e| WalError::io("open", &path, e))?;
    let bytes = fs::read_all(&*file).map_err(|e| WalError::io("read", &path, e))?;
    Identity::decode(&path, &bytes).map(Some)
}

/// Records the identity of the data directory `dir` durably: written under a temporary name,
/// synced, renamed into place, and the directory synced. A crash at any point leaves either
/// no identity or this one.
pub fn write_identity(fs: &dyn Fs, dir: &Path, identity: Identity) -> Result<()> {
    let tmp = dir.join(TMP_NAME);
    let path = dir.join(FILE_NAME);
    if fs.exists(&tmp).map_err(|e| WalError::io("stat", &tmp, e))? {
        fs.remove_file(&tmp).map_err(|e| WalError::io("remove", &tmp, e))?;
    }
    let file = fs.open(&tmp, OpenMode::CreateNew).map_err(|e| WalError::io("create", &tmp, e))?;
    file.write_all_at(&identity.encode(), 0).map_err(|e| WalError::io("write", &tmp, e))?;
    file.sync_all().map_err(|e| WalError::io("fsync", &tmp, e))?;
    drop(file);
    fs.rename(&tmp, &path).map_err(|e| WalError::io("rename", &path, e))?;
    fs.sync_dir(dir).map_err(|e| WalError::io("fsync dir", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{CrashMode, SimFs};
    use std::path::PathBuf;

    #[test]
    fn an_identity_survives_a_power_cut_once_written() {
        let fs = SimFs::new(7);
        let dir = PathBuf::from("/d");
        fs.create_dir_all(&dir).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        assert_eq!(read_identity(&fs, &dir).unwrap(), None);
        let id = Identity { node: 3, member: 0x1234_5678_9abc };
        write_identity(&fs, &dir, id).unwrap();
        fs.crash(CrashMode::Torn);
        assert_eq!(read_identity(&fs, &dir).unwrap(), Some(id));
    }

    #[test]
    fn a_damaged_identity_is_refused() {
        let fs = SimFs::new(1);
        let dir = PathBuf::from("/d");
        fs.create_dir_all(&dir).unwrap();
        write_identity(&fs, &dir, Identity { node: 1, member: 1 }).unwrap();
        let file = fs.open(&dir.join(FILE_NAME), OpenMode::ReadWrite).unwrap();
        file.write_all_at(&[0xff], 9).unwrap();
        let err = read_identity(&fs, &dir).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
        file.set_len(3).unwrap();
        assert!(matches!(read_identity(&fs, &dir).unwrap_err(), WalError::Corrupt { .. }));
    }
}
