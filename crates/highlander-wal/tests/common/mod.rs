//! A model of the log and a harness that drives a [`Wal`] on a [`SimFs`] through random
//! operations, crashes and I/O failures, checking it against the model after every step.

#![allow(dead_code)]

pub mod sm;

use highlander_wal::{
    CrashMode, EntryId, HardState, Options, SimFs, StoredVote, Wal, WalError, WalOptions,
};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A payload that is unique per append (the salt) and checkable from its own bytes.
pub fn payload(id: EntryId, salt: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 24);
    out.extend_from_slice(&id.index.to_le_bytes());
    out.extend_from_slice(&id.term.to_le_bytes());
    out.extend_from_slice(&salt.to_le_bytes());
    let mut x = id.index ^ id.term.rotate_left(17) ^ salt.rotate_left(41) ^ 0x9E37_79B9;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// What the log should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub entries: BTreeMap<u64, (EntryId, Vec<u8>)>,
    pub purged: Option<EntryId>,
    pub vote: Option<StoredVote>,
    pub committed: Option<EntryId>,
}

impl Model {
    pub fn live(&self) -> impl DoubleEndedIterator<Item = (&u64, &(EntryId, Vec<u8>))> {
        let from = self.purged.map_or(0, |p| p.index + 1);
        self.entries.range(from..)
    }

    pub fn last_live(&self) -> Option<EntryId> {
        self.live().next_back().map(|(_, (id, _))| *id)
    }

    pub fn next_index(&self) -> u64 {
        match (self.last_live(), self.purged) {
            (Some(l), _) => l.index + 1,
            (None, Some(p)) => p.index + 1,
            (None, None) => 0,
        }
    }

    pub fn term(&self) -> u64 {
        self.vote.map_or(0, |v| v.term)
    }

    fn prune(&mut self) {
        if let Some(p) = self.purged {
            self.entries.retain(|i, _| *i > p.index);
        }
    }
}

/// One concrete operation.
#[derive(Clone)]
pub enum Op {
    Append(Vec<(EntryId, Vec<u8>)>),
    Truncate(u64),
    Purge(EntryId),
    Vote(StoredVote),
    Commit(Option<EntryId>),
    Reopen,
    Crash(CrashMode),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Append(b) => write!(f, "Append({:?})", ids(b)),
            Op::Truncate(t) => write!(f, "Truncate({t})"),
            Op::Purge(p) => write!(f, "Purge({p:?})"),
            Op::Vote(v) => write!(f, "Vote({v:?})"),
            Op::Commit(c) => write!(f, "Commit({c:?})"),
            Op::Reopen => write!(f, "Reopen"),
            Op::Crash(m) => write!(f, "Crash({m:?})"),
        }
    }
}

/// What the recovered log holds.
#[derive(Debug)]
struct Seen {
    entries: Vec<(EntryId, Vec<u8>)>,
    purged: Option<EntryId>,
    hard: HardState,
}

pub struct Harness {
    pub fs: SimFs,
    pub dir: PathBuf,
    pub opts: Options,
    pub wal: Option<Wal>,
    pub model: Model,
    committed_history: Vec<Option<EntryId>>,
    salt: u64,
    pub crashes: u64,
    pub inflight_failures: u64,
}

fn pick(r: u64, lo: u64, hi: u64) -> u64 {
    if hi <= lo { lo } else { lo + r % (hi - lo + 1) }
}

impl Harness {
    pub fn new(seed: u64, segment_size: u64, committed_sync_every: u64) -> Harness {
        let fs = SimFs::new(seed);
        let opts = Options {
            wal: WalOptions { segment_size, committed_sync_every },
            purge_requires_snapshot: false,
            ..Options::default()
        };
        let dir = PathBuf::from("/data/node");
        let mut h = Harness {
            fs,
            dir,
            opts,
            wal: None,
            model: Model::default(),
            committed_history: vec![None],
            salt: 0,
            crashes: 0,
            inflight_failures: 0,
        };
        h.reopen();
        h
    }

    pub fn reopen(&mut self) {
        self.wal = None;
        let opened = highlander_wal::open(self.fs.shared(), &self.dir, self.opts.clone())
            .unwrap_or_else(|e| panic!("reopen failed: {e}"));
        self.wal = Some(opened.wal);
    }

    fn wal(&mut self) -> &mut Wal {
        self.wal.as_mut().expect("open")
    }

    /// Runs one abstract step: `kind` 0..=9 is an operation (see [`Harness::gen`]), 10..=11
    /// the same with the machine dying after a few file-system calls, 12 with a failing
    /// sync.
    pub fn abstract_step(&mut self, kind: u8, x: u64, y: u64) {
        match kind {
            0..=9 => {
                let op = self.make_op(kind, x, y);
                self.step(op);
            }
            10 | 11 => {
                let op = self.make_op((y % 8) as u8, x, y.rotate_left(7));
                self.fs.crash_after(x % 12);
                self.step(op);
                self.fs.clear_faults();
            }
            _ => {
                let op = self.make_op((y % 8) as u8, x, y.rotate_left(13));
                self.fs.fail_syncs_after(x % 3);
                self.step(op);
                self.fs.clear_faults();
            }
        }
    }

    /// Turns abstract random numbers into an operation that is valid for the model.
    pub fn make_op(&mut self, kind: u8, x: u64, y: u64) -> Op {
        let m = &self.model;
        let last = m.last_live();
        match kind % 10 {
            0..=3 => {
                let n = 1 + x % 6;
                let term = m.term();
                let first = m.next_index();
                let batch = (0..n)
                    .map(|k| {
                        self.salt += 1;
                        let id = EntryId { term, node: term % 3, index: first + k };
                        (id, payload(id, self.salt, ((y >> (k * 4)) % 700) as usize))
                    })
                    .collect();
                Op::Append(batch)
            }
            4 => match last {
                Some(l) => {
                    let lo = [m.purged.map(|p| p.index + 1), m.committed.map(|c| c.index + 1)]
                        .into_iter()
                        .flatten()
                        .max()
                        .unwrap_or(0)
                        .max(*m.entries.keys().next().unwrap_or(&0));
                    if lo > l.index {
                        Op::Vote(self.next_vote())
                    } else {
                        Op::Truncate(pick(y, lo, l.index))
                    }
                }
                None => Op::Vote(self.next_vote()),
            },
            5 => {
                let lo = m.purged.map_or(0, |p| p.index + 1);
                let hi = last.map_or(lo, |l| l.index) + 2;
                let i = pick(y, lo, hi);
                let id = match m.entries.get(&i) {
                    Some((id, _)) => *id,
                    None => EntryId { term: m.term(), node: m.term() % 3, index: i },
                };
                Op::Purge(id)
            }
            6 => Op::Vote(self.next_vote()),
            7 => {
                let lo = m.committed.map_or(0, |c| c.index);
                match last {
                    Some(l) if lo <= l.index => {
                        let i = pick(y, lo.max(m.purged.map_or(0, |p| p.index + 1)), l.index);
                        Op::Commit(m.entries.get(&i).map(|(id, _)| *id).or(m.committed))
                    }
                    _ => Op::Commit(m.committed),
                }
            }
            8 => Op::Reopen,
            _ => Op::Crash(match x % 3 {
                0 => CrashMode::DropUnsynced,
                1 => CrashMode::KeepUnsynced,
                _ => CrashMode::Torn,
            }),
        }
    }

    fn next_vote(&self) -> StoredVote {
        let t = self.model.term() + 1;
        StoredVote { term: t, node: t % 3, committed: t.is_multiple_of(2) }
    }

    fn run(&mut self, op: &Op) -> Result<(), WalError> {
        match op {
            Op::Append(b) => self.wal().append(b.iter().map(|(id, p)| (*id, p.as_slice()))),
            Op::Truncate(t) => self.wal().truncate(*t),
            Op::Purge(p) => self.wal().purge(*p),
            Op::Vote(v) => self.wal().save_vote(*v),
            Op::Commit(c) => self.wal().save_committed(*c),
            Op::Reopen => {
                self.wal().sync()?;
                self.reopen();
                Ok(())
            }
            Op::Crash(mode) => {
                self.wal = None;
                self.fs.crash(*mode);
                self.crashes += 1;
                self.reopen();
                Ok(())
            }
        }
    }

    /// Applies `op`. If it fails (a simulated crash or sync failure armed beforehand), the
    /// machine loses power, the log is reopened and checked against what the op may have
    /// done.
    pub fn step(&mut self, op: Op) {
        if std::env::var_os("HIGHLANDER_WAL_TRACE").is_some() {
            eprintln!("step {op:?} down_after={:?}", self.fs.is_down());
        }
        if let Op::Commit(c) = &op {
            // It may reach the disk even if the call fails.
            self.committed_history.push(*c);
        }
        match self.run(&op) {
            Ok(()) => {
                self.commit_to_model(&op);
                self.check_exact();
            }
            Err(e) => {
                assert!(
                    matches!(e, WalError::Io { .. } | WalError::Poisoned(_)),
                    "op {op:?} failed with a non-I/O error: {e}"
                );
                self.inflight_failures += 1;
                self.wal = None;
                self.fs.clear_faults();
                self.fs.crash(CrashMode::Torn);
                self.crashes += 1;
                self.reopen();
                self.check_inflight(&op);
            }
        }
    }

    fn commit_to_model(&mut self, op: &Op) {
        let m = &mut self.model;
        match op {
            Op::Append(b) => {
                for (id, p) in b {
                    m.entries.insert(id.index, (*id, p.clone()));
                }
                m.prune();
            }
            Op::Truncate(t) => {
                m.entries.retain(|i, _| *i < *t);
            }
            Op::Purge(p) => {
                if m.purged.is_none_or(|q| q.index < p.index) {
                    m.purged = Some(*p);
                    m.prune();
                }
            }
            Op::Vote(v) => m.vote = Some(*v),
            Op::Commit(c) => m.committed = *c,
            Op::Reopen => {}
            Op::Crash(_) => {
                // Lazily written committed may have gone back; anything it held is fine.
                let got = self.wal.as_ref().expect("open").hard_state().committed;
                assert!(self.committed_history.contains(&got), "committed {got:?} never set");
                self.model.committed = got;
            }
        }
    }

    fn seen(&self) -> Seen {
        let wal = self.wal.as_ref().expect("open");
        let entries = wal.reader().read(..).unwrap_or_else(|e| panic!("read failed: {e}"));
        Seen { entries, purged: wal.log_state().last_purged, hard: wal.hard_state() }
    }

    fn expect_entries(&self) -> Vec<(EntryId, Vec<u8>)> {
        self.model.live().map(|(_, e)| e.clone()).collect()
    }

    pub fn check_exact(&self) {
        let s = self.seen();
        let m = &self.model;
        assert_eq!(s.purged, m.purged, "purge point");
        assert_eq!(s.hard.vote, m.vote, "vote");
        assert_eq!(s.hard.committed, m.committed, "committed");
        let want = self.expect_entries();
        assert_eq!(ids(&s.entries), ids(&want), "entry ids");
        assert!(s.entries == want, "entry bytes differ");
        let state = self.wal.as_ref().expect("open").log_state();
        let want_last = match (m.last_live(), m.purged) {
            (Some(l), _) => Some(l),
            (None, p) => p,
        };
        assert_eq!(state.last, want_last, "last log id");
    }

    fn check_inflight(&mut self, op: &Op) {
        let s = self.seen();
        assert!(
            self.committed_history.contains(&s.hard.committed),
            "committed {:?} was never set",
            s.hard.committed
        );
        let before = self.model.clone();
        let old: Vec<(EntryId, Vec<u8>)> = self.expect_entries();
        match op {
            Op::Append(b) => {
                assert_eq!(s.purged, before.purged);
                assert_eq!(s.hard.vote, before.vote);
                // The acknowledged log plus a prefix of the batch.
                let mut ok = false;
                for j in 0..=b.len() {
                    let mut want = old.clone();
                    want.extend(
                        b[..j]
                            .iter()
                            .filter(|(id, _)| before.purged.is_none_or(|p| id.index > p.index))
                            .cloned(),
                    );
                    if s.entries == want {
                        ok = true;
                        for (id, p) in &b[..j] {
                            self.model.entries.insert(id.index, (*id, p.clone()));
                        }
                        self.model.prune();
                        break;
                    }
                }
                assert!(
                    ok,
                    "after a crash during {op:?}: got {:?}, had {:?}",
                    ids(&s.entries),
                    ids(&old)
                );
            }
            Op::Truncate(t) => {
                assert_eq!(s.purged, before.purged);
                assert_eq!(s.hard.vote, before.vote);
                // A prefix of the old log that keeps everything before `t`.
                let keep = old.iter().filter(|(id, _)| id.index < *t).count();
                let n = s.entries.len();
                assert!(
                    n >= keep && n <= old.len() && s.entries[..] == old[..n],
                    "after a crash during {op:?}: got {:?}, had {:?}",
                    ids(&s.entries),
                    ids(&old)
                );
                self.model.entries.retain(|i, _| s.entries.iter().any(|(id, _)| id.index == *i));
            }
            Op::Purge(p) => {
                assert!(
                    s.purged == before.purged || s.purged == Some(*p),
                    "purge point {:?}",
                    s.purged
                );
                assert_eq!(s.hard.vote, before.vote);
                self.model.purged = s.purged;
                self.model.prune();
                assert!(s.entries == self.expect_entries(), "entries after a crash during {op:?}");
            }
            Op::Vote(v) => {
                assert!(
                    s.hard.vote == before.vote || s.hard.vote == Some(*v),
                    "vote {:?}",
                    s.hard.vote
                );
                assert_eq!(s.purged, before.purged);
                assert!(s.entries == old, "entries after a crash during {op:?}");
                self.model.vote = s.hard.vote;
            }
            Op::Commit(_) | Op::Reopen | Op::Crash(_) => {
                assert_eq!(s.purged, before.purged);
                assert_eq!(s.hard.vote, before.vote);
                assert!(s.entries == old, "entries after a crash during {op:?}");
            }
        }
        self.model.committed = s.hard.committed;
        self.check_exact();
    }
}

pub fn ids(v: &[(EntryId, Vec<u8>)]) -> Vec<(u64, u64)> {
    v.iter().map(|(id, _)| (id.index, id.term)).collect()
}
