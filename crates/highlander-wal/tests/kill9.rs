//! The kill -9 loop: a child process (this test binary, re-invoked) appends and acknowledges
//! batches, truncates, votes, snapshots and purges, printing what it acknowledged; the
//! parent SIGKILLs it at a random point, reopens the directory and checks that every
//! acknowledged entry is present and byte-identical.
//!
//! `HIGHLANDER_WAL_KILLS` sets the number of kills (default 30).

mod common;

use common::payload;
use highlander_wal::{EntryId, Options, RealFs, StoredVote, WalOptions};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const CHILD_DIR: &str = "HIGHLANDER_WAL_KILL9_DIR";
const CHILD_SEED: &str = "HIGHLANDER_WAL_KILL9_SEED";

fn options() -> Options {
    Options {
        wal: WalOptions { segment_size: 128 << 10, committed_sync_every: 8 },
        ..Options::default()
    }
}

/// The bytes of entry (index, term): the parent recomputes them to check what it reads.
fn entry_bytes(id: EntryId) -> Vec<u8> {
    payload(id, id.term * 1_000_003 + id.index, ((id.index * 7919 + id.term) % 400) as usize)
}

fn next(rng: &mut u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng
}

/// The child: runs until killed. Every line it prints describes something already durable
/// (ACK, VOTE) or about to be attempted (TRUNCATING, PURGING).
#[test]
#[ignore = "run by kill9_loop as a child process"]
fn kill9_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else { return };
    let mut rng: u64 = std::env::var(CHILD_SEED).unwrap().parse::<u64>().unwrap() | 1;
    let opened = highlander_wal::open(RealFs::shared(), &dir, options()).unwrap();
    let (mut wal, snapshots) = (opened.wal, opened.snapshots);
    let out = std::io::stdout();
    let say = |line: String| {
        let mut o = out.lock();
        writeln!(o, "{line}").unwrap();
        o.flush().unwrap();
    };
    let mut term = wal.hard_state().vote.map_or(0, |v| v.term) + 1;
    wal.save_vote(StoredVote { term, node: 1, committed: true }).unwrap();
    say(format!("VOTE {term}"));
    loop {
        let r = next(&mut rng);
        let state = wal.log_state();
        let next_index = wal.next_index().unwrap_or(1);
        let committed = wal.hard_state().committed.map_or(0, |c| c.index);
        let floor = state.last_purged.map_or(0, |p| p.index).max(committed) + 1;
        match r % 40 {
            0 | 1 if next_index > floor => {
                // A new leader overwrites part of the uncommitted tail.
                let from = next_index - 1 - (r >> 8) % (next_index - floor).min(8);
                say(format!("TRUNCATING {from}"));
                wal.truncate(from).unwrap();
                term += 1;
                wal.save_vote(StoredVote { term, node: 1, committed: true }).unwrap();
                say(format!("VOTE {term}"));
            }
            2..=4 if next_index > 1 => {
                let upto = next_index - 1;
                let id = wal.reader().entry_id(upto).unwrap();
                wal.save_committed(Some(id)).unwrap();
            }
            5 if committed > 0 => {
                // Snapshot up to the committed entry, then purge behind it.
                let id = wal.reader().entry_id(committed).or(state.last_purged).unwrap();
                snapshots.save(Some(id), b"meta", &id.index.to_le_bytes()).unwrap();
                let upto = committed.saturating_sub((r >> 8) % 50);
                if let Some(pid) = wal.reader().entry_id(upto) {
                    say(format!("PURGING {upto}"));
                    wal.purge(pid).unwrap();
                }
            }
            _ => {
                let n = 1 + (r >> 8) % 32;
                let batch: Vec<(EntryId, Vec<u8>)> = (0..n)
                    .map(|k| {
                        let id = EntryId { term, node: 1, index: next_index + k };
                        (id, entry_bytes(id))
                    })
                    .collect();
                wal.append(batch.iter().map(|(id, p)| (*id, p.as_slice()))).unwrap();
                say(format!("ACK {} {} {term}", next_index, next_index + n - 1));
            }
        }
    }
}

/// Kills and reaps the child however the test ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Acked {
    /// index -> term of every acknowledged entry not since truncated.
    entries: BTreeMap<u64, u64>,
    vote: u64,
    purge_limit: u64,
    truncations: u64,
    purges: u64,
}

impl Acked {
    fn line(&mut self, line: &str) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| f[i].parse::<u64>().unwrap();
        match f.first().copied() {
            Some("ACK") => {
                for i in num(1)..=num(2) {
                    self.entries.insert(i, num(3));
                }
            }
            Some("VOTE") => self.vote = num(1),
            Some("TRUNCATING") => {
                let from = num(1);
                self.entries.retain(|i, _| *i < from);
                self.truncations += 1;
            }
            Some("PURGING") => {
                self.purge_limit = self.purge_limit.max(num(1));
                self.purges += 1;
            }
            _ => {}
        }
    }

    fn check(&self, dir: &Path, round: u64) {
        let opened = highlander_wal::open(RealFs::shared(), dir, options())
            .unwrap_or_else(|e| panic!("round {round}: reopen after kill -9 failed: {e}"));
        let wal = opened.wal;
        let hs = wal.hard_state();
        assert!(hs.vote.is_some_and(|v| v.term >= self.vote), "round {round}: vote went back");
        let purged = wal.log_state().last_purged.map_or(0, |p| p.index);
        assert!(purged <= self.purge_limit, "round {round}: purged past what was asked");
        let got: BTreeMap<u64, (EntryId, Vec<u8>)> =
            wal.reader().read(..).unwrap().into_iter().map(|(id, p)| (id.index, (id, p))).collect();
        for (id, bytes) in got.values() {
            assert!(
                *bytes == entry_bytes(*id),
                "round {round}: entry {id:?} is not what was written"
            );
        }
        for (&i, &term) in self.entries.range(purged + 1..) {
            match got.get(&i) {
                Some((id, _)) => assert_eq!(id.term, term, "round {round}: entry {i} changed term"),
                None => panic!("round {round}: acknowledged entry {i} (term {term}) is gone"),
            }
        }
        if let Some(s) = &opened.snapshot {
            assert!(s.info.last_log.map_or(0, |l| l.index) >= purged);
        }
    }
}

#[test]
fn kill9_loop() {
    let kills: u64 =
        std::env::var("HIGHLANDER_WAL_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked = Acked::default();
    let mut rng = 0x1234_5678_9abc_def1u64 ^ u64::from(std::process::id());
    let mut total = 0;
    for round in 0..kills {
        let child = Command::new(&exe)
            .args(["--ignored", "--exact", "kill9_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_SEED, next(&mut rng).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Reaper(child);
        let mut out = BufReader::new(child.0.stdout.take().unwrap());
        // Kill after a random number of acknowledgements: the child is mid-write by then.
        let target = 1 + next(&mut rng) % 60;
        let mut acks = 0;
        let mut line = String::new();
        while acks < target {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 {
                break;
            }
            acked.line(line.trim_end());
            acks += u64::from(line.starts_with("ACK "));
        }
        let _ = child.0.kill();
        let status = child.0.wait().unwrap();
        // Whatever it printed before it died was durable when printed.
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        for l in rest.lines().filter(|l| !l.is_empty()) {
            if rest.ends_with('\n') || !rest.ends_with(l) {
                acked.line(l);
            }
        }
        if acks < target {
            let mut err = String::new();
            let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("round {round}: the child stopped by itself ({status}):\n{err}");
        }
        total += acks;
        acked.check(dir.path(), round);
    }
    eprintln!(
        "{kills} kills, {total} acknowledged batches checked, {} truncations, {} purges",
        acked.truncations, acked.purges
    );
}
