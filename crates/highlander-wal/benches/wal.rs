//! Append throughput and commit latency of the WAL at batch sizes 1, 16 and 256, beside a
//! plain `pwrite` + `fdatasync` of the same bytes into a preallocated file (the floor any
//! durable log pays), interleaved in rounds so neighbour noise hits both alike; then the time
//! to open (recover) a log of 1 GiB, with the page cache warm and cold.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-wal cargo bench --bench wal
//! ```
//!
//! Environment: `HIGHLANDER_WAL_BENCH_DIR` (a directory on the disk to measure; default the
//! system temp dir), `HIGHLANDER_WAL_BENCH_ROUNDS` (default 3),
//! `HIGHLANDER_WAL_BENCH_COMMITS` (commits per round at batch 1, default 400; fewer at larger
//! batches), `HIGHLANDER_WAL_BENCH_PAYLOAD` (bytes per entry, default 200),
//! `HIGHLANDER_WAL_BENCH_RECOVERY_MIB` (log size for the recovery figure, default 1024).

use highlander_wal::{EntryId, Options, RealFs, StoredVote};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Default)]
struct Stats {
    lat: Vec<Duration>,
    entries: u64,
    busy: Duration,
}

impl Stats {
    fn add(&mut self, d: Duration, entries: u64) {
        self.lat.push(d);
        self.entries += entries;
        self.busy += d;
    }

    fn row(&mut self, name: &str, batch: usize) -> String {
        self.lat.sort();
        let q = |p: f64| self.lat[((self.lat.len() - 1) as f64 * p) as usize].as_micros();
        format!(
            "| {name:<26} | {batch:>5} | {:>10.0} | {:>8} | {:>8} | {:>7} |",
            self.entries as f64 / self.busy.as_secs_f64(),
            q(0.50),
            q(0.99),
            self.lat.len()
        )
    }
}

/// The same bytes the WAL writes for one batch, written and synced plainly.
fn baseline_round(dir: &Path, batch: usize, commits: usize, payload: usize, stats: &mut Stats) {
    let path = dir.join("baseline.dat");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let record = highlander_wal::format::record_size(payload) as usize;
    let size = (record * batch * (commits + commits / 10 + 1)) as i64 + (1 << 20);
    // SAFETY: fallocate on a descriptor we own.
    assert_eq!(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size) }, 0);
    file.sync_all().unwrap();
    let buf = bytes(record * batch, 7);
    let mut off = 0u64;
    for i in 0..commits + commits / 10 {
        let t = Instant::now();
        std::os::unix::fs::FileExt::write_all_at(&file, &buf, off).unwrap();
        file.sync_data().unwrap();
        let d = t.elapsed();
        off += buf.len() as u64;
        if i >= commits / 10 {
            stats.add(d, batch as u64);
        }
    }
    drop(file);
    std::fs::remove_file(path).unwrap();
}

fn wal_round(dir: &Path, batch: usize, commits: usize, payload: usize, stats: &mut Stats) {
    let d = dir.join("wal");
    let _ = std::fs::remove_dir_all(&d);
    let opened = highlander_wal::open(RealFs::shared(), &d, Options::default()).unwrap();
    let mut wal = opened.wal;
    wal.save_vote(StoredVote { term: 1, node: 1, committed: true }).unwrap();
    let data = bytes(payload, 11);
    let mut index = 1;
    for i in 0..commits + commits / 10 {
        let ids: Vec<EntryId> =
            (0..batch as u64).map(|k| EntryId { term: 1, node: 1, index: index + k }).collect();
        let t = Instant::now();
        wal.append(ids.iter().map(|id| (*id, data.as_slice()))).unwrap();
        let el = t.elapsed();
        index += batch as u64;
        if i >= commits / 10 {
            stats.add(el, batch as u64);
        }
    }
    drop(wal);
    drop(opened.snapshots);
    std::fs::remove_dir_all(&d).unwrap();
}

fn evict(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: fadvise on a descriptor we own; the pages are clean (synced).
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn recovery(base: &Path, mib: u64) {
    let d = base.join("recovery");
    let _ = std::fs::remove_dir_all(&d);
    let payload = 512;
    let per_batch = 2048u64;
    let data = bytes(payload, 5);
    let built = Instant::now();
    let entries;
    {
        let opened = highlander_wal::open(RealFs::shared(), &d, Options::default()).unwrap();
        let mut wal = opened.wal;
        wal.save_vote(StoredVote { term: 1, node: 1, committed: true }).unwrap();
        let target = mib << 20;
        let per_entry = highlander_wal::format::record_size(payload);
        let mut index = 1;
        while (index - 1) * per_entry < target {
            let ids: Vec<EntryId> =
                (0..per_batch).map(|k| EntryId { term: 1, node: 1, index: index + k }).collect();
            wal.append(ids.iter().map(|id| (*id, data.as_slice()))).unwrap();
            index += per_batch;
        }
        entries = index - 1;
    }
    let size: u64 = std::fs::read_dir(d.join("log"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "\nrecovery: log of {entries} entries ({payload} B payload), {} segment bytes on disk, built in {:.1} s",
        size,
        built.elapsed().as_secs_f64()
    );
    for cold in [false, true, false, true] {
        if cold {
            evict(&d.join("log"));
        }
        let t = Instant::now();
        let opened = highlander_wal::open(RealFs::shared(), &d, Options::default()).unwrap();
        let el = t.elapsed();
        let r = &opened.recovery.log;
        println!(
            "  open ({}): {:>7.1} ms  ({} segments, {} records, {:.0} MiB/s of records)",
            if cold { "page cache evicted" } else { "page cache warm   " },
            el.as_secs_f64() * 1e3,
            r.segments,
            r.records,
            r.bytes as f64 / (1 << 20) as f64 / el.as_secs_f64()
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with no flag: keep that
    // quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let base: PathBuf = std::env::var_os("HIGHLANDER_WAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let rounds = if quick { 1 } else { env_u64("HIGHLANDER_WAL_BENCH_ROUNDS", 3) as usize };
    let commits1 = if quick { 20 } else { env_u64("HIGHLANDER_WAL_BENCH_COMMITS", 400) as usize };
    let payload = env_u64("HIGHLANDER_WAL_BENCH_PAYLOAD", 200) as usize;
    println!(
        "highlander-wal bench: dir {}, {rounds} rounds, payload {payload} B per entry",
        tmp.path().display()
    );
    println!("| {:<26} | batch | entries/s  | p50 µs   | p99 µs   | commits |", "what");
    println!("|{:-<28}|-------|------------|----------|----------|---------|", "");
    for batch in [1usize, 16, 256] {
        let commits = match batch {
            1 => commits1,
            16 => commits1 / 2,
            _ => commits1 / 4,
        }
        .max(10);
        let (mut base_stats, mut wal_stats) = (Stats::default(), Stats::default());
        for _ in 0..rounds {
            baseline_round(tmp.path(), batch, commits, payload, &mut base_stats);
            wal_round(tmp.path(), batch, commits, payload, &mut wal_stats);
        }
        println!("{}", base_stats.row("pwrite+fdatasync baseline", batch));
        println!("{}", wal_stats.row("highlander-wal append", batch));
    }
    let mib = if quick { 8 } else { env_u64("HIGHLANDER_WAL_BENCH_RECOVERY_MIB", 1024) };
    recovery(tmp.path(), mib);
}
