//! Read-only views of a node's data directory, for operators (`highlander wal verify` and
//! `highlander wal dump`). Both take the directory's lock, so they refuse to run beside a
//! live node instead of reading a log that is being written.

use crate::error::Error;
use crate::raft::TypeConfig;
use highlander_wal::{RealFs, WalError};
use openraft::{Entry, EntryPayload};
use std::path::Path;
use std::sync::Arc;

/// What checking a data directory found.
#[derive(Clone, Debug)]
pub struct DataDirReport {
    /// Whether a node could open it as it is.
    pub healthy: bool,
    /// Why it could not (invariants between hard state, log and snapshots).
    pub problems: Vec<String>,
    /// The saved vote, as text.
    pub vote: Option<String>,
    /// The last committed entry the node recorded (term, index); written lazily.
    pub committed: Option<(u64, u64)>,
    /// The last purged entry (term, index).
    pub last_purged: Option<(u64, u64)>,
    /// The last entry in the log (term, index).
    pub last: Option<(u64, u64)>,
    /// Segment files and records checked.
    pub segments: usize,
    /// Records whose checksum was verified.
    pub records: u64,
    /// A torn tail that opening would cut, as "file at offset".
    pub torn_tail: Option<String>,
    /// Snapshot files with their last index and whether their checksum holds.
    pub snapshots: Vec<String>,
}

/// One log entry, decoded for display.
#[derive(Clone, Debug)]
pub struct DumpedEntry {
    /// Its index.
    pub index: u64,
    /// The term of the leader that wrote it.
    pub term: u64,
    /// What it carries: the commands of a batch, a membership change, or nothing (a new
    /// leader's blank entry).
    pub content: Vec<String>,
}

fn storage(e: WalError) -> Error {
    Error::Storage(e.to_string())
}

/// Checks a data directory without changing it: every record's checksum, the hard state,
/// the snapshots, and the invariants between them.
pub fn verify_data_dir(dir: impl AsRef<Path>) -> Result<DataDirReport, Error> {
    let i = highlander_wal::inspect(Arc::new(RealFs), dir.as_ref()).map_err(storage)?;
    let hs = i.hard_state.unwrap_or_default();
    let pair = |e: Option<highlander_wal::EntryId>| e.map(|e| (e.term, e.index));
    let state = i.reader.log_state();
    Ok(DataDirReport {
        healthy: i.is_healthy(),
        problems: i.problems.clone(),
        vote: hs.vote.map(|v| format!("{v:?}")),
        committed: pair(hs.committed),
        last_purged: pair(hs.last_purged),
        last: pair(state.last),
        segments: i.log.segments,
        records: i.log.records,
        torn_tail: i.log.cut_tail.as_ref().map(|(p, at, len)| {
            format!("{} at offset {at} ({len} bytes would be cut)", p.display())
        }),
        snapshots: i
            .snapshots
            .iter()
            .map(|(s, err)| {
                let last = s.last_log.map(|l| l.index.to_string()).unwrap_or("none".into());
                match err {
                    None => format!("{}: up to index {last}, checksum ok", s.path.display()),
                    Some(e) => format!("{}: up to index {last}, DAMAGED: {e}", s.path.display()),
                }
            })
            .chain(
                i.damaged_snapshots.iter().map(|(p, e)| format!("{}: DAMAGED: {e}", p.display())),
            )
            .collect(),
    })
}

/// Decodes up to `limit` log entries from index `from` on.
pub fn dump_data_dir(
    dir: impl AsRef<Path>,
    from: u64,
    limit: usize,
) -> Result<Vec<DumpedEntry>, Error> {
    let i = highlander_wal::inspect(Arc::new(RealFs), dir.as_ref()).map_err(storage)?;
    let mut out = Vec::new();
    let result: Result<(), WalError> = i.reader.read_with(from.., |id, bytes| {
        if out.len() >= limit {
            return Ok(());
        }
        let entry: Entry<TypeConfig> = highlander_wal::decode_entry(bytes)?;
        let content = match entry.payload {
            EntryPayload::Blank => vec!["(blank: a new leader's first entry)".to_string()],
            EntryPayload::Membership(m) => vec![format!("membership {m}")],
            EntryPayload::Normal(batch) => batch.0.iter().map(|c| format!("{c:?}")).collect(),
        };
        out.push(DumpedEntry { index: id.index, term: id.term, content });
        Ok(())
    });
    result.map_err(storage)?;
    Ok(out)
}
