//! openraft's log storage over the [`Wal`]: [`LogStore`] implements `RaftLogStorage` and
//! [`LogReader`] implements `RaftLogReader`, for any type configuration with `NodeId = u64`
//! whose entries serialize with serde. Entries are encoded with bincode 2 (standard
//! configuration) and always decoded with a byte limit and no trailing bytes.

// openraft's `StorageError` is large; it is the traits' error type, so it is returned as is.
#![allow(clippy::result_large_err)]

use crate::error::WalError;
use crate::format::MAX_RECORD_PAYLOAD;
use crate::wal::{Wal, WalReader};
use crate::{EntryId, StoredVote};
use openraft::async_runtime::AsyncOneshotSendExt;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, AsyncRuntime, CommittedLeaderId, ErrorSubject, ErrorVerb, LeaderId, LogId, LogState,
    OptionalSend, RaftLogId, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

type SE = StorageError<u64>;

/// Where the log store does its blocking file I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// On a dedicated thread per log store: the async caller awaits the result and no
    /// executor thread ever blocks in `fdatasync`. The choice for real nodes.
    Thread,
    /// On the calling task. Deterministic (the simulator's paused clock cannot run ahead
    /// while a write is "in flight"), but it blocks the executor for every sync.
    Inline,
}

/// Converts an openraft log id.
pub fn entry_id(id: &LogId<u64>) -> EntryId {
    EntryId { term: id.leader_id.term, node: id.leader_id.node_id, index: id.index }
}

/// Converts to an openraft log id.
pub fn log_id(id: EntryId) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(id.term, id.node), id.index)
}

fn stored_vote(v: &Vote<u64>) -> StoredVote {
    StoredVote { term: v.leader_id.term, node: v.leader_id.node_id, committed: v.committed }
}

fn vote(v: StoredVote) -> Vote<u64> {
    Vote { leader_id: LeaderId::new(v.term, v.node), committed: v.committed }
}

fn storage_error(subject: ErrorSubject<u64>, verb: ErrorVerb, e: WalError) -> SE {
    StorageError::IO { source: StorageIOError::new(subject, verb, AnyError::new(&e)) }
}

fn codec() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes an entry as the WAL stores it.
pub fn encode_entry<E: Serialize>(entry: &E) -> Result<Vec<u8>, WalError> {
    bincode::serde::encode_to_vec(entry, codec()).map_err(|e| WalError::Codec(e.to_string()))
}

/// Decodes an entry, refusing more than [`MAX_RECORD_PAYLOAD`] bytes and trailing bytes.
pub fn decode_entry<E: DeserializeOwned>(bytes: &[u8]) -> Result<E, WalError> {
    if bytes.len() > MAX_RECORD_PAYLOAD {
        return Err(WalError::Codec(format!("entry of {} bytes is over the limit", bytes.len())));
    }
    let (e, used) =
        bincode::serde::decode_from_slice(bytes, codec().with_limit::<{ MAX_RECORD_PAYLOAD }>())
            .map_err(|e| WalError::Codec(e.to_string()))?;
    if used != bytes.len() {
        return Err(WalError::Codec(format!(
            "{} trailing bytes after an entry",
            bytes.len() - used
        )));
    }
    Ok(e)
}

type Job = Box<dyn FnOnce(&mut Wal) + Send>;

fn lock(wal: &Mutex<Wal>) -> MutexGuard<'_, Wal> {
    // A panic inside a job leaves the Wal as consistent as an I/O error would; poisoning
    // of the log itself is tracked by the Wal.
    wal.lock().unwrap_or_else(|e| e.into_inner())
}

/// openraft's `RaftLogStorage` over a [`Wal`]. Every write is durable before openraft hears
/// of it: `append` calls `LogFlushed` after the batch's `fdatasync`, `save_vote` returns
/// after the hard state's, and `truncate` and `purge` are durable when they return.
pub struct LogStore<C> {
    wal: Arc<Mutex<Wal>>,
    reader: WalReader,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    _c: PhantomData<fn() -> C>,
}

impl<C> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("log", &self.reader).finish()
    }
}

/// A clone-per-task reader of the log for openraft's replication.
pub struct LogReader<C> {
    reader: WalReader,
    _c: PhantomData<fn() -> C>,
}

impl<C> Clone for LogReader<C> {
    fn clone(&self) -> Self {
        LogReader { reader: self.reader.clone(), _c: PhantomData }
    }
}

impl<C> Debug for LogReader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.reader.fmt(f)
    }
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    /// Wraps an opened log.
    pub fn new(wal: Wal, mode: IoMode) -> Result<LogStore<C>, WalError> {
        let reader = wal.reader();
        let wal = Arc::new(Mutex::new(wal));
        let (jobs, thread) = match mode {
            IoMode::Inline => (None, None),
            IoMode::Thread => {
                let (tx, rx) = mpsc::channel::<Job>();
                let w = wal.clone();
                let handle = std::thread::Builder::new()
                    .name("highlander-wal".into())
                    .spawn(move || {
                        // Jobs run in order: openraft's writes stay serialized.
                        for job in rx {
                            job(&mut lock(&w));
                        }
                    })
                    .map_err(|e| WalError::io("spawn", "highlander-wal thread", e))?;
                (Some(tx), Some(handle))
            }
        };
        Ok(LogStore { wal, reader, jobs, thread, _c: PhantomData })
    }

    /// A reader sharing this store's log.
    pub fn reader(&self) -> LogReader<C> {
        LogReader { reader: self.reader.clone(), _c: PhantomData }
    }

    /// Runs `f` on the log, on the I/O thread or inline.
    async fn run<T>(&self, f: impl FnOnce(&mut Wal) -> T + Send + 'static) -> Result<T, WalError>
    where
        T: Send + 'static,
    {
        let Some(jobs) = &self.jobs else {
            return Ok(f(&mut lock(&self.wal)));
        };
        let (tx, rx) = C::AsyncRuntime::oneshot();
        jobs.send(Box::new(move |w: &mut Wal| {
            let _ = tx.send(f(w));
        }))
        .map_err(|_| WalError::Poisoned("the log's I/O thread has stopped".into()))?;
        rx.await.map_err(|_| WalError::Poisoned("the log's I/O thread has stopped".into()))
    }

    /// Forces lazily held state (the committed id) to disk; call it on clean shutdown.
    pub async fn sync(&mut self) -> Result<(), WalError> {
        self.run(|w| w.sync()).await?
    }
}

impl<C> Drop for LogStore<C> {
    fn drop(&mut self) {
        // Let queued writes finish and release the log (and the directory lock with it)
        // before the drop returns, so a restart in this process finds it free.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_entries<C>(reader: &WalReader, range: impl RangeBounds<u64>) -> Result<Vec<C::Entry>, SE>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: DeserializeOwned,
{
    let mut out = Vec::new();
    reader
        .read_with(range, |id, payload| {
            let entry: C::Entry = decode_entry(payload)?;
            if entry_id(entry.get_log_id()) != id {
                return Err(WalError::Codec(format!(
                    "record {id:?} holds an entry for {:?}",
                    entry.get_log_id()
                )));
            }
            out.push(entry);
            Ok(())
        })
        .map_err(|e: WalError| storage_error(ErrorSubject::Logs, ErrorVerb::Read, e))?;
    Ok(out)
}

impl<C> RaftLogReader<C> for LogReader<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, SE> {
        read_entries::<C>(&self.reader, range)
    }
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, SE> {
        read_entries::<C>(&self.reader, range)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<NodeId = u64>,
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, SE> {
        let s = self.reader.log_state();
        Ok(LogState {
            last_purged_log_id: s.last_purged.map(log_id),
            last_log_id: s.last.map(log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader()
    }

    async fn save_vote(&mut self, v: &Vote<u64>) -> Result<(), SE> {
        let v = stored_vote(v);
        self.run(move |w| w.save_vote(v))
            .await
            .and_then(|r| r)
            .map_err(|e| storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, SE> {
        Ok(self.reader.hard_state().vote.map(vote))
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), SE> {
        let c = committed.as_ref().map(entry_id);
        self.run(move |w| w.save_committed(c))
            .await
            .and_then(|r| r)
            .map_err(|e| storage_error(ErrorSubject::Store, ErrorVerb::Write, e))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, SE> {
        Ok(self.reader.hard_state().committed.map(log_id))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), SE>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        for e in entries {
            let id = entry_id(e.get_log_id());
            let bytes = encode_entry(&e)
                .map_err(|err| storage_error(ErrorSubject::Logs, ErrorVerb::Write, err))?;
            batch.push((id, bytes));
        }
        let result = self
            .run(move |w| {
                let r = w.append(batch.iter().map(|(id, b)| (*id, b.as_slice())));
                // Acknowledged only after the batch's fdatasync; a failure is reported and
                // never retried (the log is poisoned).
                callback.log_io_completed(match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                });
                r
            })
            .await
            .and_then(|r| r);
        result.map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, e))
    }

    async fn truncate(&mut self, id: LogId<u64>) -> Result<(), SE> {
        let from = id.index;
        self.run(move |w| w.truncate(from))
            .await
            .and_then(|r| r)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, id: LogId<u64>) -> Result<(), SE> {
        let upto = entry_id(&id);
        self.run(move |w| w.purge(upto))
            .await
            .and_then(|r| r)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}
