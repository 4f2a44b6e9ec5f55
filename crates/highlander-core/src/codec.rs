//! The one place that turns values into bytes and back (bincode 2.0.1, pinned: the crate is
//! final upstream, so every call lives here and can be swapped in one change).
//!
//! Decoding is always bounded: input longer than the limit is refused before it is read,
//! allocations while decoding are capped by the same limit, and trailing bytes are an error.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame (one request or response) a node accepts: 64 MiB.
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// The largest snapshot a node accepts: 1 GiB.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Why bytes could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input is longer than the limit for its kind.
    #[error("{len} bytes exceed the limit of {limit} bytes")]
    TooLarge {
        /// The input's length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes do not decode as the expected type.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The value decoded but bytes were left over.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a value.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes one frame-sized value (at most [`MAX_FRAME_BYTES`]).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    check_len(bytes, MAX_FRAME_BYTES)?;
    finish(
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MAX_FRAME_BYTES>()),
        bytes.len(),
    )
}

/// Decodes a snapshot (at most [`MAX_SNAPSHOT_BYTES`]).
pub fn decode_snapshot<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    check_len(bytes, MAX_SNAPSHOT_BYTES)?;
    finish(
        bincode::serde::decode_from_slice(bytes, config().with_limit::<MAX_SNAPSHOT_BYTES>()),
        bytes.len(),
    )
}

fn check_len(bytes: &[u8], limit: usize) -> Result<(), CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge { len: bytes.len(), limit });
    }
    Ok(())
}

fn finish<T>(
    result: Result<(T, usize), bincode::error::DecodeError>,
    len: usize,
) -> Result<T, CodecError> {
    let (value, read) = result.map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != len {
        return Err(CodecError::TrailingBytes(len - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Request, Response};
    use crate::{Command, Key, Payload, SessionId};

    #[test]
    fn round_trip_and_refusals() {
        let req = Request::Write(vec![Command::Unregister {
            epoch: 3,
            session: SessionId(3),
            key: Key::new("k").unwrap(),
        }]);
        let bytes = encode(&req).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), req);

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode::<Request>(&trailing), Err(CodecError::TrailingBytes(1)));

        assert!(matches!(
            decode::<Request>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(decode::<Response>(&[0xff; 7]), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // Variant `Raft`, inner `AppendEntries`, then a payload claiming ~2^60 bytes.
        let mut evil = vec![0u8, 0u8, 0xfd];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(decode::<Request>(&evil), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn payload_encodes_as_one_block() {
        let p = Payload::from(vec![7u8; 1000]);
        let bytes = encode(&p).unwrap();
        assert!(bytes.len() <= 1003, "{}", bytes.len());
        assert_eq!(decode::<Payload>(&bytes).unwrap(), p);
    }

    #[test]
    fn too_large_input_is_refused_before_reading() {
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode::<Request>(&big),
            Err(CodecError::TooLarge { len: MAX_FRAME_BYTES + 1, limit: MAX_FRAME_BYTES })
        );
    }
}
