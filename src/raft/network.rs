//! openraft's network, carried over the node's [`Transport`]: each Raft RPC is encoded with
//! the one codec and sent as a [`Request::Raft`] frame.

use super::transfer::{CHUNK_BYTES, ChunkReply, chunk_at};
use super::{Member, PeerHealth, TypeConfig};
use crate::config::Timing;
use highlander_core::wire::{RaftMessage, Request, Response};
use highlander_core::{NodeId, Payload, Transport, TransportError, codec};
use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Snapshot, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

type RpcResult<T> = Result<T, RPCError<u64, Member, RaftError<u64>>>;

/// An AppendEntries larger than this is split by openraft (we answer `PayloadTooLarge`).
const APPEND_BUDGET_BYTES: usize = codec::MAX_FRAME_BYTES / 2;

/// The least time the last chunk of a snapshot is given, whatever openraft's hint says: the
/// follower answers it only after syncing, reading back and installing the whole snapshot.
const SNAPSHOT_MIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The time any other chunk is given: 1 MiB to write to a file. A peer that died mid-transfer
/// is given up on after this, not after the install's long timeout.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(3);

/// Creates a [`Peer`] per target member, lazily: nothing is dialed here.
pub(crate) struct Network {
    transport: Arc<dyn Transport>,
    backoff: Duration,
    health: Arc<PeerHealth>,
}

impl Network {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        timing: &Timing,
        health: Arc<PeerHealth>,
    ) -> Network {
        Network { transport, backoff: timing.heartbeat, health }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &Member) -> Peer {
        Peer {
            transport: self.transport.clone(),
            node: NodeId(node.node),
            member: target,
            backoff: self.backoff,
            health: self.health.clone(),
        }
    }
}

/// openraft's connection to one member: messages go to its node, addressed to the member.
pub(crate) struct Peer {
    transport: Arc<dyn Transport>,
    node: NodeId,
    member: u64,
    backoff: Duration,
    health: Arc<PeerHealth>,
}

impl Peer {
    async fn call<Resp: DeserializeOwned>(
        &self,
        message: RaftMessage,
        action: RPCTypes,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let from = self.transport.local_id().0;
        let sent = tokio::time::Instant::now();
        let request = Request::Raft { to: self.member, message };
        let response = self.transport.request(self.node, request, timeout).await;
        match &response {
            Ok(Response::Raft(_)) => {
                self.health.answered(self.member);
                if action != RPCTypes::InstallSnapshot {
                    self.health.round_trip(sent.elapsed());
                }
            }
            Err(TransportError::Timeout) => self.health.timed_out(),
            Ok(_) | Err(_) => {}
        }
        match response {
            Ok(Response::Raft(body)) => codec::decode::<Resp>(body.as_bytes())
                .map_err(|e| CallError::Network(NetworkError::new(&TransportError::Codec(e)))),
            // The node runs other storage now: the member this is for is gone. Unreachable, so
            // openraft backs off instead of retrying at once.
            Ok(Response::WrongMember { current }) => {
                Err(CallError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                    "{} runs member {current:?}, not member {}",
                    self.node, self.member
                )))))
            }
            Ok(other) => Err(CallError::Network(NetworkError::new(&std::io::Error::other(
                format!("unexpected response to a Raft request: {}", response_kind(&other)),
            )))),
            Err(TransportError::Timeout) => {
                Err(CallError::Timeout(Timeout { action, id: from, target: self.member, timeout }))
            }
            // A peer that cannot be reached fails fast; openraft retries `Network` errors at
            // once, so these must be `Unreachable`, which waits out `backoff()` first.
            Err(
                e @ (TransportError::Unreachable { .. }
                | TransportError::UnknownPeer(_)
                | TransportError::Closed),
            ) => Err(CallError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(CallError::Network(NetworkError::new(&e))),
        }
    }
}

pub(crate) fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::Raft(_) => "raft",
        Response::Write(_) => "write",
        Response::KeepAlive(_) => "keepalive",
        Response::Status(_) => "status",
        Response::Refused(_) => "refused",
        Response::Pong => "pong",
        Response::WrongMember { .. } => "wrong-member",
        Response::Hello(_) => "hello",
        Response::Membership(_) => "membership",
        Response::Schedule(_) => "schedule",
        Response::Jobs(_) => "jobs",
    }
}

enum CallError {
    Timeout(Timeout<u64>),
    Unreachable(Unreachable),
    Network(NetworkError),
}

impl<E: std::error::Error> From<CallError> for RPCError<u64, Member, E> {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Timeout(t) => RPCError::Timeout(t),
            CallError::Unreachable(u) => RPCError::Unreachable(u),
            CallError::Network(n) => RPCError::Network(n),
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Payload, NetworkError> {
    codec::encode(value).map(Payload::from).map_err(|e| NetworkError::new(&e))
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        let entries = rpc.entries.len() as u64;
        let body = encode(&rpc)?;
        if body.len() > APPEND_BUDGET_BYTES && entries > 1 {
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)));
        }
        let result: Result<AppendEntriesResponse<u64>, RaftError<u64>> = self
            .call(RaftMessage::AppendEntries(body), RPCTypes::AppendEntries, option.hard_ttl())
            .await?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.member, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        let body = encode(&rpc)?;
        let result: Result<VoteResponse<u64>, RaftError<u64>> =
            self.call(RaftMessage::Vote(body), RPCTypes::Vote, option.hard_ttl()).await?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.member, e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let timeout = option.hard_ttl().max(SNAPSHOT_MIN_TIMEOUT);
        let send = self.send_snapshot(vote, snapshot, timeout);
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result,
        }
    }

    fn backoff(&self) -> Backoff {
        // Used after `Unreachable`: one heartbeat, so a peer that comes back is replicated to
        // well before its election timeout.
        Backoff::new(std::iter::repeat(self.backoff))
    }
}

impl Peer {
    /// Sends a snapshot chunk by chunk, each at the offset the follower asked for last.
    async fn send_snapshot(
        &self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        timeout: Duration,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let data = &snapshot.snapshot[..];
        let crc = crc32c::crc32c(data);
        let chunks = data.len().div_ceil(CHUNK_BYTES) as u64;
        // Each round either moves forward or is a follower's request to go back (after it
        // lost a transfer); a bounded number of rounds keeps a confused peer from holding
        // the replication task forever.
        let mut offset = 0;
        for _ in 0..2 * chunks + 4 {
            let chunk = chunk_at(vote, &snapshot.meta, data, crc, offset, CHUNK_BYTES);
            let last = chunk.offset + chunk.data.len() as u64 == chunk.total;
            let timeout = if last { timeout } else { CHUNK_TIMEOUT.min(timeout) };
            let body = encode(&chunk).map_err(StreamingError::Network)?;
            let reply = self
                .call::<Result<ChunkReply, Fatal<u64>>>(
                    RaftMessage::Snapshot(body),
                    RPCTypes::InstallSnapshot,
                    timeout,
                )
                .await;
            match reply {
                Ok(Ok(ChunkReply::Done(resp))) => return Ok(resp),
                Ok(Ok(ChunkReply::Next(next))) if next <= data.len() as u64 => offset = next,
                Ok(Ok(ChunkReply::Next(bad))) => {
                    return Err(StreamingError::Network(NetworkError::new(
                        &std::io::Error::other(format!(
                            "the follower asked for offset {bad} of {} bytes",
                            data.len()
                        )),
                    )));
                }
                Ok(Err(fatal)) => return Err(StreamingError::Network(NetworkError::new(&fatal))),
                Err(CallError::Timeout(t)) => return Err(StreamingError::Timeout(t)),
                Err(CallError::Unreachable(u)) => return Err(StreamingError::Unreachable(u)),
                Err(CallError::Network(n)) => return Err(StreamingError::Network(n)),
            }
        }
        Err(StreamingError::Network(NetworkError::new(&std::io::Error::other(
            "snapshot transfer made no progress",
        ))))
    }
}
