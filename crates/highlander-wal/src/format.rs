//! The on-disk format: segment headers, records, hard-state slots. All integers are
//! little-endian; every structure carries a CRC32C and every file a format version.
//!
//! ```text
//! segment  log/<first_index:020>.seg, preallocated
//!   header (64 B)  magic "HLWALSEG" | version u32 | reserved u32 | first_index u64
//!                  | seed_crc u32 | reserved (32 B) | crc32c of bytes 0..60
//!   records, each 8-byte aligned, zeros after the last one
//!
//! record   header (40 B) then the payload, then zero padding to 8 bytes
//!   crc u32        crc32c(seed = prev_crc, bytes 4..40 of the header ++ payload)
//!   len u32        payload length
//!   index u64      log index
//!   term u64       leader term of the entry's log id
//!   node u64       leader node of the entry's log id
//!   prev_crc u32   crc of the previous record (the segment's seed_crc for its first)
//!   batch_pos u32  position of the record in the write that carried it (0 = first)
//! ```
//!
//! `crc` covers `prev_crc`, so records form a chain: a record is *self-valid* when its crc
//! matches, and *in the chain* when its `prev_crc` is the crc of the record before it.
//! `batch_pos` lets recovery tell the remnants of one torn write from later writes.

use crate::{EntryId, HardState, StoredVote};

/// The format version written into every segment, hard-state slot and snapshot.
pub const FORMAT_VERSION: u32 = 1;

/// Segment header length.
pub const SEGMENT_HEADER_LEN: u64 = 64;
/// Record header length.
pub const RECORD_HEADER_LEN: usize = 40;
/// The largest payload one record may carry (and the bincode decode limit for entries).
pub const MAX_RECORD_PAYLOAD: usize = 64 << 20;

const SEGMENT_MAGIC: &[u8; 8] = b"HLWALSEG";
const HARD_STATE_MAGIC: &[u8; 8] = b"HLHARDST";

/// The size of one hard-state slot; the two slots sit on separate pages.
pub const HARD_STATE_SLOT: u64 = 4096;
const HARD_STATE_USED: usize = 92;

/// Rounds `n` up to a multiple of 8.
pub fn align8(n: u64) -> u64 {
    (n + 7) & !7
}

/// The bytes a record with a payload of `len` bytes occupies.
pub fn record_size(len: usize) -> u64 {
    align8((RECORD_HEADER_LEN + len) as u64)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A segment's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The index of the first record the segment holds (or would hold).
    pub first_index: u64,
    /// The crc the segment's first record chains from.
    pub seed_crc: u32,
}

/// Why a header did not decode.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not our magic: not a segment, or overwritten.
    Magic,
    /// A version this build does not read.
    Version(u32),
    /// The checksum does not match.
    Checksum,
}

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut b = [0u8; SEGMENT_HEADER_LEN as usize];
        b[0..8].copy_from_slice(SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.first_index.to_le_bytes());
        b[24..28].copy_from_slice(&self.seed_crc.to_le_bytes());
        let crc = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header.
    pub fn decode(b: &[u8]) -> Result<SegmentHeader, HeaderError> {
        if b.len() < SEGMENT_HEADER_LEN as usize || &b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        if crc32c::crc32c(&b[..60]) != u32_at(b, 60) {
            return Err(HeaderError::Checksum);
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        Ok(SegmentHeader { first_index: u64_at(b, 16), seed_crc: u32_at(b, 24) })
    }
}

/// A record header as read from disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// The record's chained crc.
    pub crc: u32,
    /// Payload length.
    pub len: u32,
    /// The entry's log id.
    pub id: EntryId,
    /// The crc this record chains from.
    pub prev_crc: u32,
    /// Position within the write that carried it.
    pub batch_pos: u32,
}

impl RecordHeader {
    /// Reads the header fields at the start of `b` (at least [`RECORD_HEADER_LEN`] bytes).
    pub fn parse(b: &[u8]) -> RecordHeader {
        RecordHeader {
            crc: u32_at(b, 0),
            len: u32_at(b, 4),
            id: EntryId { index: u64_at(b, 8), term: u64_at(b, 16), node: u64_at(b, 24) },
            prev_crc: u32_at(b, 32),
            batch_pos: u32_at(b, 36),
        }
    }

    /// The index of the first record of the write that carried this one.
    pub fn batch_first(&self) -> Option<u64> {
        self.id.index.checked_sub(u64::from(self.batch_pos))
    }
}

/// Appends one record (header, payload, padding) to `buf`; returns its crc.
pub fn encode_record(
    buf: &mut Vec<u8>,
    id: EntryId,
    prev_crc: u32,
    batch_pos: u32,
    payload: &[u8],
) -> u32 {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&id.index.to_le_bytes());
    buf.extend_from_slice(&id.term.to_le_bytes());
    buf.extend_from_slice(&id.node.to_le_bytes());
    buf.extend_from_slice(&prev_crc.to_le_bytes());
    buf.extend_from_slice(&batch_pos.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(prev_crc, &buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    let padded = start + record_size(payload.len()) as usize;
    buf.resize(padded, 0);
    crc
}

/// Whether a record (header then payload, exactly `RECORD_HEADER_LEN + len` bytes) carries
/// a crc that matches its own contents.
pub fn self_valid(h: &RecordHeader, record: &[u8]) -> bool {
    crc32c::crc32c_append(h.prev_crc, &record[4..]) == h.crc
}

/// Encodes a hard-state slot with sequence number `seq`.
pub fn encode_hard_state(seq: u64, hs: &HardState) -> [u8; HARD_STATE_USED] {
    let mut b = [0u8; HARD_STATE_USED];
    b[0..8].copy_from_slice(HARD_STATE_MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let mut flags = 0u32;
    if let Some(v) = hs.vote {
        flags |= 1;
        if v.committed {
            flags |= 2;
        }
        b[24..32].copy_from_slice(&v.term.to_le_bytes());
        b[32..40].copy_from_slice(&v.node.to_le_bytes());
    }
    let mut put_id = |b: &mut [u8], at: usize, id: Option<EntryId>, bit: u32| {
        if let Some(id) = id {
            flags |= bit;
            b[at..at + 8].copy_from_slice(&id.term.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&id.node.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&id.index.to_le_bytes());
        }
    };
    put_id(&mut b, 40, hs.committed, 4);
    put_id(&mut b, 64, hs.last_purged, 8);
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[..88]);
    b[88..92].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a hard-state slot: `Ok(None)` for an all-zero (never written) slot.
pub fn decode_hard_state(b: &[u8]) -> Result<Option<(u64, HardState)>, HeaderError> {
    if b.len() < HARD_STATE_USED {
        return Err(HeaderError::Magic);
    }
    if b[..HARD_STATE_USED].iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if &b[0..8] != HARD_STATE_MAGIC {
        return Err(HeaderError::Magic);
    }
    if crc32c::crc32c(&b[..88]) != u32_at(b, 88) {
        return Err(HeaderError::Checksum);
    }
    let version = u32_at(b, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderError::Version(version));
    }
    let flags = u32_at(b, 12);
    let id_at = |at: usize, bit: u32| {
        (flags & bit != 0).then(|| EntryId {
            term: u64_at(b, at),
            node: u64_at(b, at + 8),
            index: u64_at(b, at + 16),
        })
    };
    let hs = HardState {
        vote: (flags & 1 != 0).then(|| StoredVote {
            term: u64_at(b, 24),
            node: u64_at(b, 32),
            committed: flags & 2 != 0,
        }),
        committed: id_at(40, 4),
        last_purged: id_at(64, 8),
    };
    Ok(Some((u64_at(b, 16), hs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_chain() {
        let mut buf = Vec::new();
        let id = EntryId { term: 3, node: 7, index: 42 };
        let crc = encode_record(&mut buf, id, 99, 2, b"hello");
        assert_eq!(buf.len() as u64, record_size(5));
        let h = RecordHeader::parse(&buf);
        assert_eq!((h.crc, h.len, h.id, h.prev_crc, h.batch_pos), (crc, 5, id, 99, 2));
        assert!(self_valid(&h, &buf[..RECORD_HEADER_LEN + 5]));
        assert_eq!(h.batch_first(), Some(40));
        buf[RECORD_HEADER_LEN] ^= 1;
        assert!(!self_valid(&h, &buf[..RECORD_HEADER_LEN + 5]));
    }

    #[test]
    fn hard_state_roundtrip() {
        let hs = HardState {
            vote: Some(StoredVote { term: 5, node: 2, committed: true }),
            committed: Some(EntryId { term: 4, node: 1, index: 10 }),
            last_purged: None,
        };
        let b = encode_hard_state(9, &hs);
        assert_eq!(decode_hard_state(&b), Ok(Some((9, hs))));
        assert_eq!(decode_hard_state(&[0u8; 100]), Ok(None));
        let mut bad = b;
        bad[30] ^= 4;
        assert_eq!(decode_hard_state(&bad), Err(HeaderError::Checksum));
    }

    #[test]
    fn segment_header_roundtrip() {
        let h = SegmentHeader { first_index: 77, seed_crc: 0xdead_beef };
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        let mut b = h.encode();
        b[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&b), Err(HeaderError::Checksum));
    }
}
