//! Snapshot transfer in chunks: the leader sends a snapshot as a sequence of
//! [`RaftMessage::Snapshot`](highlander_core::wire::RaftMessage::Snapshot) requests, each a
//! [`Chunk`] at an offset; the follower streams them into its storage (a temporary snapshot
//! file in a data directory) and only when the last one has arrived, the whole checksum
//! matches and the file has been synced and read back does it ask openraft to install it.
//!
//! The follower answers each chunk with the offset it expects next, so duplicated, delayed or
//! retried chunks cost a round trip, never a corrupt snapshot. One transfer is received at a
//! time; a chunk at offset 0 of another snapshot (or from another leader) replaces it.

use super::Member;
use super::store::{SnapshotInbox, SnapshotSink};
use highlander_core::codec::MAX_SNAPSHOT_BYTES;
use openraft::raft::SnapshotResponse;
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

/// The data bytes carried by one chunk: large enough that a round trip per chunk costs
/// little, small enough that a chunk never competes with heartbeats for long.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// One piece of a snapshot, as it travels.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Chunk {
    /// The sender's vote: a follower that has seen a newer one refuses at once.
    pub(crate) vote: Vote<u64>,
    /// The snapshot this chunk belongs to.
    pub(crate) meta: SnapshotMeta<u64, Member>,
    /// The length of the whole snapshot data.
    pub(crate) total: u64,
    /// CRC32C of the whole snapshot data, checked once it has all arrived.
    pub(crate) crc: u32,
    /// Where `data` starts in the whole.
    pub(crate) offset: u64,
    /// The bytes at `offset`.
    pub(crate) data: Vec<u8>,
}

/// The follower's answer to one chunk.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ChunkReply {
    /// Send the chunk at this offset next.
    Next(u64),
    /// The transfer is over: openraft's answer to the install (which carries the follower's
    /// vote, so a stale leader learns it is stale).
    Done(SnapshotResponse<u64>),
}

/// Splits a snapshot into the chunks that carry it; always at least one, so an empty
/// snapshot is transferred too.
pub(crate) fn chunk_at(
    vote: Vote<u64>,
    meta: &SnapshotMeta<u64, Member>,
    data: &[u8],
    crc: u32,
    offset: u64,
    chunk_bytes: usize,
) -> Chunk {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(chunk_bytes).min(data.len());
    Chunk {
        vote,
        meta: meta.clone(),
        total: data.len() as u64,
        crc,
        offset: start as u64,
        data: data[start..end].to_vec(),
    }
}

/// What the receiver does with a chunk.
pub(crate) enum Step {
    /// Answer the sender with this.
    Reply(ChunkReply),
    /// Every byte has arrived and checked out: install this snapshot, then answer with
    /// openraft's response.
    Install { vote: Vote<u64>, meta: SnapshotMeta<u64, Member>, data: Vec<u8> },
}

/// The transfer in progress on a follower.
struct Incoming {
    vote: Vote<u64>,
    meta: SnapshotMeta<u64, Member>,
    total: u64,
    crc: u32,
    received: u64,
    running_crc: u32,
    sink: SnapshotSink,
}

impl Incoming {
    fn is_for(&self, c: &Chunk) -> bool {
        self.vote == c.vote && self.meta == c.meta && self.total == c.total && self.crc == c.crc
    }
}

/// A follower's receiving end.
pub(crate) struct Receiver {
    /// `None` once the node stops: the inbox holds the data directory (and its lock), which
    /// must be released with the rest of the storage.
    inbox: std::sync::Mutex<Option<SnapshotInbox>>,
    incoming: tokio::sync::Mutex<Option<Incoming>>,
}

impl Receiver {
    pub(crate) fn new(inbox: SnapshotInbox) -> Receiver {
        Receiver {
            inbox: std::sync::Mutex::new(Some(inbox)),
            incoming: tokio::sync::Mutex::new(None),
        }
    }

    fn inbox(&self) -> Option<SnapshotInbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Lets go of the storage: an unfinished transfer is abandoned (its file removed).
    pub(crate) async fn close(&self) {
        let inbox = self.inbox.lock().unwrap_or_else(|e| e.into_inner()).take();
        *self.incoming.lock().await = None;
        if let Some(inbox) = inbox {
            inbox.discard_staged().await;
        }
    }

    /// Takes one chunk. `current` is the follower's vote. An error refuses the chunk and
    /// abandons the transfer; the leader starts it again later.
    pub(crate) async fn accept(&self, chunk: Chunk, current: Vote<u64>) -> Result<Step, String> {
        // A sender whose vote is not at least ours (older, or incomparable) is no leader of
        // ours: nothing of it is written.
        let accepted = matches!(
            chunk.vote.partial_cmp(&current),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        );
        if !accepted {
            return Ok(Step::Reply(ChunkReply::Done(SnapshotResponse { vote: current })));
        }
        let mut slot = self.incoming.lock().await;
        if !slot.as_ref().is_some_and(|i| i.is_for(&chunk)) {
            if chunk.offset != 0 {
                // A chunk of a transfer this node does not have (it restarted, or a newer
                // one replaced it): start over.
                return Ok(Step::Reply(ChunkReply::Next(0)));
            }
            if chunk.total > MAX_SNAPSHOT_BYTES as u64 {
                *slot = None;
                return Err(format!(
                    "a snapshot of {} bytes exceeds the limit of {MAX_SNAPSHOT_BYTES}",
                    chunk.total
                ));
            }
            // Replacing an abandoned transfer drops its sink, which removes its file.
            *slot = None;
            let Some(inbox) = self.inbox() else { return Err("the node is stopping".into()) };
            let sink = inbox.begin(&chunk.meta).await?;
            *slot = Some(Incoming {
                vote: chunk.vote,
                meta: chunk.meta.clone(),
                total: chunk.total,
                crc: chunk.crc,
                received: 0,
                running_crc: 0,
                sink,
            });
        }
        let Some(mut incoming) = slot.take() else {
            return Err("no transfer in progress".into());
        };
        if chunk.offset != incoming.received {
            // A duplicate or a retry of a chunk already taken.
            let next = incoming.received;
            *slot = Some(incoming);
            return Ok(Step::Reply(ChunkReply::Next(next)));
        }
        let len = chunk.data.len() as u64;
        if len > incoming.total - incoming.received {
            return Err(format!(
                "a chunk of {len} bytes at offset {} runs past the snapshot's {} bytes",
                chunk.offset, incoming.total
            ));
        }
        if len == 0 && incoming.received < incoming.total {
            return Err("an empty chunk before the end of the snapshot".into());
        }
        incoming.running_crc = crc32c::crc32c_append(incoming.running_crc, &chunk.data);
        incoming.received += len;
        incoming.sink = incoming.sink.write(chunk.data).await?;
        if incoming.received < incoming.total {
            let next = incoming.received;
            *slot = Some(incoming);
            return Ok(Step::Reply(ChunkReply::Next(next)));
        }
        if incoming.running_crc != incoming.crc {
            return Err(format!(
                "snapshot {} fails its checksum: {:#010x} received, {:#010x} sent",
                incoming.meta.snapshot_id, incoming.running_crc, incoming.crc
            ));
        }
        let data = incoming.sink.finish(incoming.meta.snapshot_id.clone()).await?;
        if crc32c::crc32c(&data) != incoming.crc {
            self.installed().await;
            return Err(format!(
                "snapshot {} read back from storage differs from what was received",
                incoming.meta.snapshot_id
            ));
        }
        Ok(Step::Install { vote: incoming.vote, meta: incoming.meta, data })
    }

    /// Called after openraft has had its say on a completed transfer: a staged file it did
    /// not install is removed.
    pub(crate) async fn installed(&self) {
        if let Some(inbox) = self.inbox() {
            inbox.discard_staged().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::store::{AppliedState, MemStorage, StateMachine};
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    fn meta(index: u64) -> SnapshotMeta<u64, Member> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("2-1-{index}"),
        }
    }

    fn receiver() -> Receiver {
        let sm = StateMachine::in_memory(MemStorage::new(), AppliedState::new()).unwrap();
        Receiver::new(sm.inbox())
    }

    fn vote(term: u64) -> Vote<u64> {
        Vote::new_committed(term, 1)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Sends `data` through `r` the way the leader does, with `chunk` bytes per chunk,
    /// following the receiver's offsets; `deliver` may tamper with each chunk.
    async fn transfer(
        r: &Receiver,
        data: &[u8],
        chunk: usize,
        mut deliver: impl FnMut(usize, Chunk) -> Vec<Chunk>,
    ) -> Result<Vec<u8>, String> {
        let crc = crc32c::crc32c(data);
        let m = meta(10);
        let mut offset = 0;
        for round in 0..1000 {
            let mut reply = None;
            for c in deliver(round, chunk_at(vote(2), &m, data, crc, offset, chunk)) {
                reply = Some(r.accept(c, vote(1)).await?);
            }
            match reply {
                Some(Step::Install { data, .. }) => return Ok(data),
                Some(Step::Reply(ChunkReply::Next(n))) => offset = n,
                Some(Step::Reply(ChunkReply::Done(_))) => return Err("refused".into()),
                None => {}
            }
        }
        Err("no progress".into())
    }

    #[tokio::test]
    async fn chunks_reassemble_across_duplicates_and_losses() {
        let r = receiver();
        let whole = data(10_000);
        // Every third chunk is lost, every other one duplicated, and an old chunk replayed.
        let mut old: Option<Chunk> = None;
        let got = transfer(&r, &whole, 777, |round, c| {
            let mut out = Vec::new();
            if round % 3 == 2 {
                return out;
            }
            if let Some(o) = old.take() {
                out.push(o);
            }
            out.push(c.clone());
            if round % 2 == 0 {
                out.push(c.clone());
            }
            old = Some(c);
            out
        })
        .await
        .unwrap();
        assert_eq!(got, whole);
    }

    #[tokio::test]
    async fn an_empty_snapshot_is_one_chunk() {
        let got = transfer(&receiver(), &[], CHUNK_BYTES, |_, c| vec![c]).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn a_corrupted_chunk_fails_the_checksum_and_installs_nothing() {
        let r = receiver();
        let err = transfer(&r, &data(5000), 1000, |round, mut c| {
            if round == 2 {
                c.data[10] ^= 1;
            }
            vec![c]
        })
        .await
        .unwrap_err();
        assert!(err.contains("fails its checksum"), "{err}");
        // The failed transfer is gone: a later chunk is told to start over.
        let c = chunk_at(vote(2), &meta(10), &data(5000), 0, 1000, 1000);
        assert!(matches!(r.accept(c, vote(1)).await, Ok(Step::Reply(ChunkReply::Next(0)))));
    }

    #[tokio::test]
    async fn overlong_and_oversized_chunks_are_refused() {
        let r = receiver();
        let m = meta(10);
        let mut c = chunk_at(vote(2), &m, &data(100), 0, 0, 100);
        c.total = 50;
        let err = r.accept(c, vote(1)).await.err().unwrap();
        assert!(err.contains("runs past"), "{err}");
        let mut c = chunk_at(vote(2), &m, &data(100), 0, 0, 100);
        c.total = MAX_SNAPSHOT_BYTES as u64 + 1;
        let err = r.accept(c, vote(1)).await.err().unwrap();
        assert!(err.contains("exceeds the limit"), "{err}");
    }

    #[tokio::test]
    async fn a_stale_sender_is_told_the_newer_vote_and_nothing_is_written() {
        let r = receiver();
        let c = chunk_at(vote(2), &meta(10), &data(100), 0, 0, 10);
        match r.accept(c, vote(3)).await.unwrap() {
            Step::Reply(ChunkReply::Done(resp)) => assert_eq!(resp.vote, vote(3)),
            _ => panic!("a stale sender must be refused at once"),
        }
        assert!(r.incoming.lock().await.is_none());
    }

    #[tokio::test]
    async fn a_new_snapshot_replaces_an_unfinished_one() {
        let r = receiver();
        let a = data(3000);
        let c = chunk_at(vote(2), &meta(10), &a, crc32c::crc32c(&a), 0, 1000);
        assert!(matches!(r.accept(c, vote(1)).await, Ok(Step::Reply(ChunkReply::Next(1000)))));
        let b = data(1500);
        let c = chunk_at(vote(2), &meta(20), &b, crc32c::crc32c(&b), 0, 1000);
        assert!(matches!(r.accept(c, vote(1)).await, Ok(Step::Reply(ChunkReply::Next(1000)))));
        let c = chunk_at(vote(2), &meta(20), &b, crc32c::crc32c(&b), 1000, 1000);
        match r.accept(c, vote(1)).await.unwrap() {
            Step::Install { meta: m, data, .. } => assert_eq!((m, data), (meta(20), b)),
            _ => panic!("the second snapshot completes"),
        }
    }
}
