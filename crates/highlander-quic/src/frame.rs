//! The stream layout. One request is one bidirectional stream:
//!
//! ```text
//! client → server   [kind: u8][len: u32 big-endian][to: u64 big-endian, snapshots only][len bytes]  FIN
//! server → client   [len: u32 big-endian][len bytes]            FIN
//! ```
//!
//! `kind` [`KIND_FRAME`]: the bytes are one [`Request`](highlander_core::wire::Request)
//! encoded by `highlander_core::codec`, at most `MAX_FRAME_BYTES`. `kind` [`KIND_SNAPSHOT`]:
//! the bytes are the payload of a `Request::Raft { to, message: RaftMessage::Snapshot(..) }`
//! for Raft member `to`, at most
//! `MAX_SNAPSHOT_BYTES`, written in [`SNAPSHOT_CHUNK`]-byte pieces at a lower priority so
//! heartbeats and votes on the same connection overtake it. The response is one
//! [`Response`](highlander_core::wire::Response) frame. Every length is checked against its
//! limit before anything is allocated, and bytes after the frame are refused.

use highlander_core::Payload;
use highlander_core::codec::{self, MAX_FRAME_BYTES, MAX_SNAPSHOT_BYTES};
use highlander_core::wire::{RaftMessage, Request, Response};
use quinn::{ReadError, RecvStream, SendStream, VarInt};
use std::time::Duration;

/// The stream carries one encoded request.
pub(crate) const KIND_FRAME: u8 = 1;
/// The stream carries a snapshot's payload.
pub(crate) const KIND_SNAPSHOT: u8 = 2;
/// How much of a snapshot is written at once.
pub(crate) const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Snapshot streams yield to everything else (whose priority is 0).
pub(crate) const SNAPSHOT_PRIORITY: i32 = -1;

/// Application error codes, on streams (`RESET_STREAM`/`STOP_SENDING`) and connections.
pub(crate) mod code {
    use quinn::VarInt;
    /// Orderly close.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0);
    /// The stream's bytes do not follow the layout or do not decode.
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// A length above its limit.
    pub(crate) const TOO_LARGE: VarInt = VarInt::from_u32(2);
    /// The peer's certificate does not name a member.
    pub(crate) const UNAUTHORIZED: VarInt = VarInt::from_u32(3);
    /// The node is not serving (not yet, or shutting down).
    pub(crate) const NOT_SERVING: VarInt = VarInt::from_u32(4);
    /// The sender gave up (timeout or cancellation), or the stream stalled.
    pub(crate) const CANCELLED: VarInt = VarInt::from_u32(5);
    /// A newer connection from the same peer replaced this one.
    pub(crate) const SUPERSEDED: VarInt = VarInt::from_u32(6);
    /// The request handler failed.
    pub(crate) const INTERNAL: VarInt = VarInt::from_u32(7);
}

/// Why an inbound stream was refused.
#[derive(Debug)]
pub(crate) enum ReadFail {
    /// A length above its limit.
    TooLarge { len: usize, limit: usize },
    /// Not the layout, or not decodable.
    Malformed(String),
    /// No progress within the stream idle timeout.
    Stalled,
    /// The stream or connection failed (the peer gave up, or went away).
    Stream(String),
}

impl ReadFail {
    pub(crate) fn code(&self) -> VarInt {
        match self {
            ReadFail::TooLarge { .. } => code::TOO_LARGE,
            ReadFail::Malformed(_) => code::PROTOCOL,
            ReadFail::Stalled | ReadFail::Stream(_) => code::CANCELLED,
        }
    }
}

fn stream_err(e: ReadError) -> ReadFail {
    ReadFail::Stream(e.to_string())
}

/// Reads exactly `buf.len()` bytes, each read within `idle`.
pub(crate) async fn read_exact(
    recv: &mut RecvStream,
    buf: &mut [u8],
    idle: Duration,
) -> Result<(), ReadFail> {
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout(idle, recv.read(&mut buf[filled..])).await {
            Ok(Ok(Some(n))) => filled += n,
            Ok(Ok(None)) => {
                return Err(ReadFail::Malformed(format!(
                    "the stream ended after {filled} of {} bytes",
                    buf.len()
                )));
            }
            Ok(Err(e)) => return Err(stream_err(e)),
            Err(_) => return Err(ReadFail::Stalled),
        }
    }
    Ok(())
}

/// What the first five bytes of a request stream announce: its kind and its body length,
/// checked against the kind's limit before anything is allocated.
pub(crate) fn request_header(head: [u8; 5]) -> Result<(u8, usize), ReadFail> {
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let limit = match head[0] {
        KIND_FRAME => MAX_FRAME_BYTES,
        KIND_SNAPSHOT => MAX_SNAPSHOT_BYTES,
        other => return Err(ReadFail::Malformed(format!("unknown stream kind {other}"))),
    };
    if len > limit {
        return Err(ReadFail::TooLarge { len, limit });
    }
    Ok((head[0], len))
}

/// Decodes the whole byte stream of one request as a node's server does (header, limit,
/// the member a snapshot is for, body, nothing after), without a network. The server reads
/// streams piece by piece under timeouts with the same rules; this is for fuzzing and tools.
pub fn decode_request_stream(bytes: &[u8]) -> Result<Request, String> {
    let head: [u8; 5] =
        bytes.get(..5).and_then(|h| h.try_into().ok()).ok_or("fewer than 5 header bytes")?;
    let (kind, len) = request_header(head).map_err(|e| format!("{e:?}"))?;
    let rest = &bytes[5..];
    let (to, body) = if kind == KIND_SNAPSHOT {
        let to: [u8; 8] =
            rest.get(..8).and_then(|t| t.try_into().ok()).ok_or("no member id for a snapshot")?;
        (Some(u64::from_be_bytes(to)), &rest[8..])
    } else {
        (None, rest)
    };
    if body.len() != len {
        return Err(format!("the header says {len} bytes, the stream has {}", body.len()));
    }
    match to {
        Some(to) => {
            Ok(Request::Raft { to, message: RaftMessage::Snapshot(Payload::from(body.to_vec())) })
        }
        None => codec::decode::<Request>(body).map_err(|e| e.to_string()),
    }
}

/// Decodes the whole byte stream of one response as a node's client does: a length within
/// the frame limit, that many bytes of one response, nothing after.
pub fn decode_response_stream(bytes: &[u8]) -> Result<Response, String> {
    let len: [u8; 4] = bytes.get(..4).and_then(|l| l.try_into().ok()).ok_or("no length")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(format!("{len} bytes exceed the frame limit"));
    }
    let body = &bytes[4..];
    if body.len() != len {
        return Err(format!("the length says {len} bytes, the stream has {}", body.len()));
    }
    codec::decode::<Response>(body).map_err(|e| e.to_string())
}

/// Waits for the end of the stream; any byte before it is an error.
pub(crate) async fn expect_end(recv: &mut RecvStream, idle: Duration) -> Result<(), ReadFail> {
    match tokio::time::timeout(idle, recv.read_chunk(1, true)).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(_))) => Err(ReadFail::Malformed("bytes after the frame".into())),
        Ok(Err(e)) => Err(stream_err(e)),
        Err(_) => Err(ReadFail::Stalled),
    }
}

/// Reads a snapshot payload of `len` bytes as it arrives: memory grows with the bytes
/// received, never with the length claimed.
pub(crate) async fn read_snapshot(
    recv: &mut RecvStream,
    len: usize,
    idle: Duration,
) -> Result<Vec<u8>, ReadFail> {
    let mut chunks = Vec::new();
    let mut got = 0;
    while got < len {
        match tokio::time::timeout(idle, recv.read_chunk(len - got, true)).await {
            Ok(Ok(Some(chunk))) => {
                got += chunk.bytes.len();
                chunks.push(chunk.bytes);
            }
            Ok(Ok(None)) => {
                return Err(ReadFail::Malformed(format!(
                    "the snapshot ended after {got} of {len} bytes"
                )));
            }
            Ok(Err(e)) => return Err(stream_err(e)),
            Err(_) => return Err(ReadFail::Stalled),
        }
    }
    expect_end(recv, idle).await?;
    let mut data = Vec::with_capacity(len);
    for chunk in chunks {
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// Writes `[len][body]` in pieces, each within `idle`.
pub(crate) async fn write_response(
    send: &mut SendStream,
    body: Vec<u8>,
    idle: Duration,
) -> Result<(), String> {
    let len = u32::try_from(body.len()).map_err(|_| "response longer than u32".to_string())?;
    write_timed(send, bytes::Bytes::copy_from_slice(&len.to_be_bytes()), idle).await?;
    let body = bytes::Bytes::from(body);
    let mut at = 0;
    while at < body.len() {
        let end = (at + SNAPSHOT_CHUNK).min(body.len());
        write_timed(send, body.slice(at..end), idle).await?;
        at = end;
    }
    send.finish().map_err(|e| e.to_string())
}

async fn write_timed(
    send: &mut SendStream,
    buf: bytes::Bytes,
    idle: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(idle, send.write_chunk(buf)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the peer took no data within the stream idle timeout".to_string()),
    }
}
