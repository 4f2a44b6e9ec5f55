//! Recovery of a data directory that the input damaged.
//!
//! A valid directory is written on a simulated disk (three batches of entries in small
//! segments, a vote, an identity), then the input damages it: bytes written over a segment,
//! a segment cut short, or the hard state, identity or a snapshot file replaced by the
//! input's bytes. Opening it must either refuse with an error or recover a log whose every
//! entry is one that was written at that index — a prefix, never other bytes.

use highlander_wal::fs::{Fs, OpenMode};
use highlander_wal::{EntryId, Options, SimFs, StoredVote, WalOptions};
use std::path::{Path, PathBuf};

fn options() -> Options {
    Options {
        wal: WalOptions { segment_size: 1024, committed_sync_every: 1 },
        purge_requires_snapshot: false,
        ..Options::default()
    }
}

fn payload(index: u64) -> Vec<u8> {
    (0..(index * 7 % 90) as usize).map(|i| (index as usize * 31 + i) as u8).collect()
}

/// Writes the valid directory; returns the entries written.
fn write_valid(fs: &SimFs, dir: &Path) -> Vec<(EntryId, Vec<u8>)> {
    let opened = highlander_wal::open(std::sync::Arc::new(fs.clone()), dir, options())
        .expect("a new directory opens");
    let mut wal = opened.wal;
    let mut written = Vec::new();
    let mut index = 1;
    for batch in 0..3u64 {
        let entries: Vec<(EntryId, Vec<u8>)> = (0..4)
            .map(|k| {
                let id = EntryId { term: 1 + batch, node: 1, index: index + k };
                (id, payload(index + k))
            })
            .collect();
        wal.append(entries.iter().map(|(id, p)| (*id, p.as_slice()))).expect("append");
        index += 4;
        written.extend(entries);
    }
    wal.save_vote(StoredVote { term: 3, node: 1, committed: true }).expect("vote");
    highlander_wal::write_identity(fs, dir, highlander_wal::Identity { node: 1, member: 1 })
        .expect("identity");
    written
}

fn files(fs: &SimFs, dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = fs
        .read_dir(&dir.join("log"))
        .unwrap_or_default()
        .into_iter()
        .map(|n| dir.join("log").join(n))
        .collect();
    names.sort();
    names
}

/// Damages a valid directory as `data` says, then recovers it.
pub fn wal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (at, bytes) = match rest {
        [a, b, tail @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), tail),
        _ => (0, rest),
    };
    let fs = SimFs::new(7);
    let dir = PathBuf::from("/data");
    let written = write_valid(&fs, &dir);
    let segments = files(&fs, &dir);
    let write_over = |path: &Path, at: u64, bytes: &[u8]| {
        if let Ok(f) = fs.open(path, OpenMode::ReadWrite) {
            let len = f.len().unwrap_or(0).max(1);
            let _ = f.write_all_at(bytes, at % len);
        }
    };
    let replace = |path: &Path, bytes: &[u8]| {
        if let Ok(f) = fs.open(path, OpenMode::CreateOrOpen) {
            let _ = f.set_len(0);
            let _ = f.write_all_at(bytes, 0);
        }
    };
    match mode % 7 {
        0 => {
            let seg = &segments[at as usize % segments.len().max(1)];
            write_over(seg, at.wrapping_mul(13), bytes);
        }
        1 => {
            let seg = &segments[at as usize % segments.len().max(1)];
            if let Ok(f) = fs.open(seg, OpenMode::ReadWrite) {
                let len = f.len().unwrap_or(0).max(1);
                let _ = f.set_len(at % len);
            }
        }
        2 => replace(&dir.join("hardstate"), bytes),
        3 => replace(&dir.join("identity"), bytes),
        4 => replace(&dir.join("snapshots").join("00000000000000000001.snap"), bytes),
        5 => replace(&dir.join("log").join("00000000000000000100.seg"), bytes),
        _ => {
            if let Some(last) = segments.last() {
                replace(last, bytes);
            }
        }
    }
    // The identity is read on its own; damage there is refused, never misread.
    if let Ok(Some(identity)) = highlander_wal::read_identity(&fs, &dir) {
        assert_eq!(identity.node, 1, "an identity changed without being refused");
    }
    let Ok(opened) = highlander_wal::open(std::sync::Arc::new(fs.clone()), &dir, options()) else {
        return;
    };
    let reader = opened.wal.reader();
    let Ok(recovered) = reader.read(..) else { return };
    let mut expected = written.iter();
    for (id, bytes) in &recovered {
        match expected.find(|(w, _)| w.index == id.index) {
            Some((w, p)) => {
                assert_eq!(w, id, "entry {} came back with another id", id.index);
                assert_eq!(p, bytes, "entry {} came back with other bytes", id.index);
            }
            None => panic!("entry {} was never written, or came back out of order", id.index),
        }
    }
}
