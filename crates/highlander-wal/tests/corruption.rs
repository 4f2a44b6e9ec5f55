//! The corruption matrix on a real directory: cut tails at every offset, zeroed tails,
//! flipped bits in the middle, stale tails after truncation, missing segments, damaged hard
//! state and snapshots, and the directory lock.

mod common;

use common::payload;
use highlander_wal::format::{RECORD_HEADER_LEN, RecordHeader, SEGMENT_HEADER_LEN, record_size};
use highlander_wal::{
    CrashMode, EntryId, Options, RealFs, SimFs, StoredVote, Wal, WalError, WalOptions,
};
use std::fs;
use std::path::{Path, PathBuf};

fn opts(segment_size: u64) -> Options {
    Options {
        wal: WalOptions { segment_size, committed_sync_every: 1 },
        purge_requires_snapshot: false,
        ..Options::default()
    }
}

fn open(dir: &Path, o: &Options) -> Result<Wal, WalError> {
    highlander_wal::open(RealFs::shared(), dir, o.clone()).map(|o| o.wal)
}

fn id(term: u64, index: u64) -> EntryId {
    EntryId { term, node: 1, index }
}

/// Appends `batches` batches of `per` entries of term `term` from `first` on; returns them.
fn fill(wal: &mut Wal, first: u64, batches: u64, per: u64, term: u64) -> Vec<(EntryId, Vec<u8>)> {
    let mut all = Vec::new();
    let mut i = first;
    for b in 0..batches {
        let batch: Vec<(EntryId, Vec<u8>)> = (0..per)
            .map(|k| {
                let e = id(term, i + k);
                (e, payload(e, b * 1000 + k, (37 * (i + k) as usize) % 300))
            })
            .collect();
        wal.append(batch.iter().map(|(e, p)| (*e, p.as_slice()))).unwrap();
        i += per;
        all.extend(batch);
    }
    all
}

fn vote(wal: &mut Wal, term: u64) {
    wal.save_vote(StoredVote { term, node: 1, committed: true }).unwrap();
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// (offset, end of header+payload, index) of every record in a segment file.
fn records(path: &Path) -> Vec<(u64, u64, u64)> {
    let bytes = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN as usize;
    while pos + RECORD_HEADER_LEN <= bytes.len() {
        let h = RecordHeader::parse(&bytes[pos..]);
        if h.crc == 0 && h.len == 0 {
            break;
        }
        let end = pos + RECORD_HEADER_LEN + h.len as usize;
        out.push((pos as u64, end as u64, h.id.index));
        pos += record_size(h.len as usize) as usize;
    }
    out
}

fn read_all(wal: &Wal) -> Vec<(EntryId, Vec<u8>)> {
    wal.reader().read(..).unwrap()
}

#[test]
fn cut_last_segment_at_every_offset_of_its_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4096);
    let all = {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 12, 3, 1)
    };
    let segs = segments(dir.path());
    assert!(segs.len() >= 2, "want a multi-segment log, got {segs:?}");
    let last = segs.last().unwrap().clone();
    let original = fs::read(&last).unwrap();
    let recs = records(&last);
    assert!(recs.len() >= 4);
    let from = recs[recs.len() - 4].0;
    let to = recs.last().unwrap().1 + 8;
    let mut checked = 0;
    for cut in from..=to {
        for extra in segments(dir.path()).into_iter().filter(|s| !segs.contains(s)) {
            fs::remove_file(extra).unwrap();
        }
        fs::write(&last, &original[..cut as usize]).unwrap();
        let wal = open(dir.path(), &o).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let lost: Vec<u64> = recs.iter().filter(|r| r.1 > cut).map(|r| r.2).collect();
        let keep =
            all.iter().filter(|(e, _)| !lost.contains(&e.index)).cloned().collect::<Vec<_>>();
        assert!(read_all(&wal) == keep, "cut at {cut}: wrong entries");
        if cut % 7 == 0 {
            // The log goes on after the cut and keeps what it writes.
            let mut wal = wal;
            let next = keep.last().unwrap().0.index + 1;
            let extra = fill(&mut wal, next, 1, 2, 1);
            drop(wal);
            let wal = open(dir.path(), &o).unwrap();
            let mut want = keep.clone();
            want.extend(extra);
            assert!(read_all(&wal) == want, "cut at {cut}: append after recovery");
        }
        checked += 1;
    }
    assert!(checked > 100);
}

#[test]
fn zeroed_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(16 << 10);
    let all = {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 5, 4, 1)
    };
    let last = segments(dir.path()).pop().unwrap();
    let recs = records(&last);
    let original = fs::read(&last).unwrap();
    // Zero from inside each of the last few records to the end of the written part.
    for r in &recs[recs.len() - 5..] {
        for start in [r.0, r.0 + 3, r.0 + 40, (r.0 + r.1) / 2] {
            let mut b = original.clone();
            b[start as usize..].fill(0);
            fs::write(&last, &b).unwrap();
            let wal = open(dir.path(), &o).unwrap();
            let keep: Vec<_> = all.iter().filter(|(e, _)| e.index < r.2).cloned().collect();
            assert!(read_all(&wal) == keep, "zeroed from {start}");
        }
    }
}

fn expect_corrupt(r: Result<Wal, WalError>, file: &Path, offset: u64) {
    match r {
        Err(WalError::Corrupt { path, offset: o, reason }) => {
            assert_eq!(path, file, "{reason}");
            assert_eq!(o, offset, "{reason}");
            let msg = WalError::Corrupt { path, offset: o, reason }.to_string();
            assert!(msg.contains(&file.display().to_string()) && msg.contains(&offset.to_string()));
        }
        Err(e) => panic!("expected corruption at {} offset {offset}, got {e}", file.display()),
        Ok(_) => panic!("opened a log with a flipped bit at {} offset {offset}", file.display()),
    }
}

#[test]
fn flipped_bit_in_the_middle_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(16 << 10);
    {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 12, 3, 1);
    }
    let segs = segments(dir.path());
    // Every field of a record in the middle of the last segment, one in the first segment,
    // and the last record of all (intact bytes that fail their checksum are not a tear).
    let last = segs.last().unwrap().clone();
    let first = segs[0].clone();
    let mut targets = Vec::new();
    let recs = records(&last);
    let mid = recs[recs.len() / 2];
    for field in [0u64, 4, 8, 16, 24, 32, 36, 40, 41] {
        targets.push((last.clone(), mid.0, mid.0 + field));
    }
    let r0 = records(&first)[1];
    targets.push((first.clone(), r0.0, r0.0 + 44));
    let end = *recs.last().unwrap();
    targets.push((last.clone(), end.0, end.0 + 42));
    for (file, rec, at) in targets {
        let original = fs::read(&file).unwrap();
        let mut b = original.clone();
        b[at as usize] ^= 0x10;
        fs::write(&file, &b).unwrap();
        expect_corrupt(open(dir.path(), &o), &file, rec);
        fs::write(&file, &original).unwrap();
    }
    // A damaged segment header.
    let original = fs::read(&last).unwrap();
    let mut b = original.clone();
    b[20] ^= 1;
    fs::write(&last, &b).unwrap();
    expect_corrupt(open(dir.path(), &o), &last, 0);
    fs::write(&last, &original).unwrap();
    open(dir.path(), &o).unwrap();
}

#[test]
fn missing_middle_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(2048);
    {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 20, 3, 1);
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 3);
    fs::remove_file(&segs[1]).unwrap();
    expect_corrupt(open(dir.path(), &o), &segs[2], 0);
}

#[test]
fn stale_tail_after_truncation_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(8 << 10);
    let all = {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 20, 3, 1)
    };
    let keep: Vec<_> = all.iter().filter(|(e, _)| e.index < 11).cloned().collect();
    {
        let mut wal = open(dir.path(), &o).unwrap();
        wal.truncate(11).unwrap();
        assert!(read_all(&wal) == keep);
    }
    let mut wal = open(dir.path(), &o).unwrap();
    assert!(read_all(&wal) == keep, "truncated entries came back after reopen");
    vote(&mut wal, 2);
    let new = fill(&mut wal, 11, 1, 2, 2);
    drop(wal);
    let wal = open(dir.path(), &o).unwrap();
    let mut want = keep.clone();
    want.extend(new);
    assert!(read_all(&wal) == want, "old entries after the rewrite");
}

#[test]
fn stale_tail_after_truncation_never_comes_back_after_power_loss() {
    for seed in 0..200 {
        let sim = SimFs::new(seed);
        let o = opts(if seed % 2 == 0 { 2048 } else { 1 << 20 });
        let dir = Path::new("/n");
        let all = {
            let mut wal = highlander_wal::open(sim.shared(), dir, o.clone()).unwrap().wal;
            vote(&mut wal, 1);
            let all = fill(&mut wal, 1, 8, 3, 1);
            wal.truncate(5 + seed % 15).unwrap();
            vote(&mut wal, 2);
            // The rewrite dies somewhere in the middle.
            sim.crash_after(seed % 6);
            let e = id(2, 5 + seed % 15);
            let p = payload(e, 99, 10);
            let _ = wal.append([(e, p.as_slice())]);
            all
        };
        sim.crash(CrashMode::Torn);
        let wal = highlander_wal::open(sim.shared(), dir, o.clone()).unwrap().wal;
        let got = read_all(&wal);
        let cut = 5 + seed % 15;
        for (e, p) in &got {
            if e.index < cut {
                assert!(all.iter().any(|(a, b)| a == e && b == p), "seed {seed}: {e:?} changed");
            } else {
                assert_eq!(e.term, 2, "seed {seed}: a truncated entry {e:?} came back");
            }
        }
        assert!(got.iter().filter(|(e, _)| e.index < cut).count() as u64 == cut - 1, "seed {seed}");
    }
}

#[test]
fn hard_state_falls_back_to_the_other_slot_and_refuses_when_both_are_bad() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(8 << 10);
    {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        vote(&mut wal, 2);
    }
    let hs = dir.path().join("hardstate");
    let original = fs::read(&hs).unwrap();
    // The newest slot (seq 3 → slot 1) torn: the vote before it comes back.
    let mut b = original.clone();
    b[4096 + 30] ^= 0xff;
    fs::write(&hs, &b).unwrap();
    let wal = open(dir.path(), &o).unwrap();
    assert_eq!(wal.hard_state().vote.map(|v| v.term), Some(1));
    drop(wal);
    b[30] ^= 0xff;
    fs::write(&hs, &b).unwrap();
    match open(dir.path(), &o) {
        Err(WalError::Corrupt { path, .. }) => assert_eq!(path, hs),
        other => panic!("expected corruption, got {other:?}"),
    }
    // Segments without a hard state: the vote is lost, refuse.
    fs::write(&hs, &original).unwrap();
    {
        let mut wal = open(dir.path(), &o).unwrap();
        fill(&mut wal, 1, 1, 1, 1);
    }
    fs::remove_file(&hs).unwrap();
    assert!(matches!(open(dir.path(), &o), Err(WalError::Invariant(_))));
}

#[test]
fn committed_past_the_end_and_terms_past_the_vote_refuse_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1 << 20);
    {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 4, 2, 1);
        wal.save_committed(Some(id(1, 8))).unwrap();
        wal.sync().unwrap();
    }
    // Lose the last records as a misbehaving disk would: recovery sees a clean shorter log,
    // but the hard state knows entry 8 was committed.
    let last = segments(dir.path()).pop().unwrap();
    let recs = records(&last);
    let mut b = fs::read(&last).unwrap();
    b[recs[6].0 as usize..].fill(0);
    fs::write(&last, &b).unwrap();
    match open(dir.path(), &o) {
        Err(WalError::Invariant(msg)) => assert!(msg.contains("committed"), "{msg}"),
        other => panic!("expected an invariant error, got {other:?}"),
    }
}

#[test]
fn second_open_of_a_directory_is_refused_naming_it_and_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1 << 20);
    let first = open(dir.path(), &o).unwrap();
    match open(dir.path(), &o) {
        Err(e @ WalError::Locked { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
    drop(first);
    open(dir.path(), &o).unwrap();
}

#[test]
fn purge_needs_a_durable_snapshot_and_open_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        wal: WalOptions { segment_size: 4096, committed_sync_every: 1 },
        ..Options::default()
    };
    let snapshot_path = {
        let opened = highlander_wal::open(RealFs::shared(), dir.path(), o.clone()).unwrap();
        let mut wal = opened.wal;
        vote(&mut wal, 1);
        fill(&mut wal, 1, 10, 3, 1);
        assert!(matches!(wal.purge(id(1, 5)), Err(WalError::Invalid(_))), "purge without snapshot");
        let info = opened.snapshots.save(Some(id(1, 12)), b"meta", b"state").unwrap();
        assert!(matches!(wal.purge(id(1, 13)), Err(WalError::Invalid(_))), "purge past snapshot");
        wal.purge(id(1, 12)).unwrap();
        assert_eq!(wal.reader().read(..).unwrap().first().unwrap().0.index, 13);
        info.path
    };
    let opened = highlander_wal::open(RealFs::shared(), dir.path(), o.clone()).unwrap();
    assert_eq!(opened.snapshot.as_ref().unwrap().data, b"state");
    drop(opened);
    fs::remove_file(&snapshot_path).unwrap();
    match highlander_wal::open(RealFs::shared(), dir.path(), o) {
        Err(WalError::Invariant(msg)) => assert!(msg.contains("purged up to index 12"), "{msg}"),
        other => panic!("expected an invariant error, got {other:?}"),
    }
}

#[test]
fn snapshots_keep_two_fall_back_past_damage_and_clean_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1 << 20);
    let (a, b) = {
        let opened = highlander_wal::open(RealFs::shared(), dir.path(), o.clone()).unwrap();
        let s = opened.snapshots;
        let _old = s.save(Some(id(1, 1)), b"m1", b"one").unwrap();
        let a = s.save(Some(id(1, 2)), b"m2", b"two").unwrap();
        let mut w = s.begin(Some(id(1, 3)), b"m3").unwrap();
        std::io::Write::write_all(&mut w, &vec![7u8; 3 << 20]).unwrap();
        let b = w.finish().unwrap();
        assert_eq!(s.list(), vec![a.clone(), b.clone()], "two newest kept");
        (a, b)
    };
    // An interrupted write leaves only a temporary.
    fs::write(dir.path().join("snapshots").join("00000000000000000009.snap.tmp"), b"half").unwrap();
    let opened = highlander_wal::open(RealFs::shared(), dir.path(), o.clone()).unwrap();
    assert_eq!(opened.recovery.snapshots.removed.len(), 1, "temporary removed");
    let loaded = opened.snapshot.clone().unwrap();
    assert_eq!(
        (loaded.info, loaded.meta.as_slice(), loaded.data.len()),
        (b.clone(), &b"m3"[..], 3 << 20)
    );
    // Streaming read verifies as it goes.
    let (meta, mut r) = opened.snapshots.open_reader(&b).unwrap();
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut data).unwrap();
    assert_eq!((meta.as_slice(), data.len()), (&b"m3"[..], 3 << 20));
    drop(opened);
    // Damage the newest: the older one is used and the damage reported.
    let mut bytes = fs::read(&b.path).unwrap();
    bytes[1000] ^= 1;
    fs::write(&b.path, &bytes).unwrap();
    let opened = highlander_wal::open(RealFs::shared(), dir.path(), o).unwrap();
    assert_eq!(opened.snapshot.unwrap().info, a);
    assert_eq!(opened.recovery.skipped_snapshots.len(), 1);
    let (_, mut r) = opened.snapshots.open_reader(&b).unwrap();
    let err = std::io::Read::read_to_end(&mut r, &mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn a_sealed_snapshot_is_invisible_until_published_and_gone_if_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(1 << 20);
    let snaps = dir.path().join("snapshots");
    let temporaries = || {
        fs::read_dir(&snaps)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().to_string_lossy().ends_with(".tmp"))
            .count()
    };
    let opened = highlander_wal::open(RealFs::shared(), dir.path(), o.clone()).unwrap();
    let s = opened.snapshots.clone();
    let old = s.save(Some(id(1, 2)), b"m2", b"two").unwrap();

    // Sealed and dropped (the install was refused): nothing left, nothing listed.
    let mut w = s.begin(Some(id(2, 9)), b"m9").unwrap();
    std::io::Write::write_all(&mut w, b"refused").unwrap();
    let sealed = w.seal().unwrap();
    assert_eq!(sealed.read_data().unwrap(), b"refused");
    assert_eq!((s.latest(), temporaries()), (Some(old.clone()), 1), "sealed is not visible");
    drop(sealed);
    assert_eq!((s.latest(), temporaries()), (Some(old.clone()), 0), "dropped is removed");

    // Sealed, read back, then published: the one a restart loads.
    let mut w = s.begin(Some(id(2, 10)), b"m10").unwrap();
    std::io::Write::write_all(&mut w, &vec![5u8; 2 << 20]).unwrap();
    let sealed = w.seal().unwrap();
    assert_eq!(sealed.read_data().unwrap(), vec![5u8; 2 << 20]);
    let info = sealed.publish().unwrap();
    assert_eq!((s.latest(), temporaries()), (Some(info.clone()), 0));
    drop((s, opened));
    let opened = highlander_wal::open(RealFs::shared(), dir.path(), o).unwrap();
    let loaded = opened.snapshot.unwrap();
    assert_eq!((loaded.info, loaded.meta, loaded.data.len()), (info, b"m10".to_vec(), 2 << 20));
}

#[test]
fn inspect_reports_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(4096);
    let all = {
        let mut wal = open(dir.path(), &o).unwrap();
        vote(&mut wal, 1);
        fill(&mut wal, 1, 6, 3, 1)
    };
    // A torn last record: inspect says it would be cut, and leaves it.
    let last = segments(dir.path()).pop().unwrap();
    let recs = records(&last);
    let mut b = fs::read(&last).unwrap();
    let r = recs.last().unwrap();
    b[(r.0 + 40) as usize..].fill(0);
    fs::write(&last, &b).unwrap();
    let i = highlander_wal::inspect(RealFs::shared(), dir.path()).unwrap();
    assert!(i.is_healthy(), "{:?}", i.problems);
    assert_eq!(i.log.cut_tail.as_ref().map(|c| (&c.0, c.1)), Some((&last, r.0)));
    assert_eq!(i.hard_state.unwrap().vote.unwrap().term, 1);
    let dumped = i.reader.read(..).unwrap();
    assert!(dumped[..] == all[..all.len() - 1]);
    drop(i);
    assert_eq!(fs::read(&last).unwrap(), b, "inspect changed the segment");
    // Held by a running node: refused.
    let wal = open(dir.path(), &o).unwrap();
    assert!(matches!(
        highlander_wal::inspect(RealFs::shared(), dir.path()),
        Err(WalError::Locked { .. })
    ));
    drop(wal);
    // A flipped bit in the middle: the same error open gives.
    let first = segments(dir.path())[0].clone();
    let r0 = records(&first)[1];
    let mut b = fs::read(&first).unwrap();
    b[r0.0 as usize + 50] ^= 4;
    fs::write(&first, &b).unwrap();
    match highlander_wal::inspect(RealFs::shared(), dir.path()) {
        Err(WalError::Corrupt { path, offset, .. }) => assert_eq!((path, offset), (first, r0.0)),
        other => panic!("expected corruption, got {other:?}"),
    }
}
