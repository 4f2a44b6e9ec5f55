//! The bodies of highlander's fuzz targets.
//!
//! `fuzz/` (a cargo-fuzz package, built on nightly) runs each function under libFuzzer; the
//! corpus replay test of this crate runs every stored input through the same functions on
//! stable, in `cargo test --workspace`. A function returns normally for any input; a panic
//! is a bug: input from a peer, a disk or a file made the code misbehave, or an invariant
//! that should hold for any command sequence did not.
//!
//! | target | what it feeds | what must hold |
//! |---|---|---|
//! | `quic_frames` | bytes of one QUIC request stream and of one response stream | refused with a reason or decoded; what decodes round-trips |
//! | `codec` | bytes as every wire and snapshot type | as above, for every type a node decodes from a peer |
//! | `apply` | a sequence of commands (and leader rounds) | the state stays consistent; no ownership ends unnamed; a refusal changes nothing; tokens grow |
//! | `wal` | damage to a valid data directory (overwrites, truncations, foreign files) | recovery refuses or returns a prefix of what was written, never other bytes |
//! | `config` | bytes as a `node.toml` | parsed or refused with a typed error |
//!
//! It opens no socket and touches no real file: the WAL target runs on a simulated disk.

#![warn(missing_docs)]

mod apply;
pub mod seeds;
mod wal;

pub use apply::apply;
pub use wal::wal;

use highlander_core::codec;
use highlander_core::state::ClusterState;
use highlander_core::wire::{MembershipReport, Request, Response, StatusReport};
use highlander_core::{Batch, Command};
use serde_roundtrip::roundtrip;

/// The names of the targets, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: [&str; 5] = ["quic_frames", "codec", "apply", "wal", "config"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "quic_frames" => quic_frames(data),
        "codec" => codec(data),
        "apply" => apply(data),
        "wal" => wal(data),
        "config" => config(data),
        other => panic!("no fuzz target {other:?}"),
    }
}

/// Bytes of one QUIC request stream and of one response stream, decoded as a node's server
/// and client decode them.
pub fn quic_frames(data: &[u8]) {
    if let Ok(request) = highlander_quic::decode_request_stream(data) {
        roundtrip(&request);
    }
    if let Ok(response) = highlander_quic::decode_response_stream(data) {
        roundtrip(&response);
    }
}

/// Bytes decoded as every type that crosses the wire or the disk.
pub fn codec(data: &[u8]) {
    if let Ok(v) = codec::decode::<Request>(data) {
        roundtrip(&v);
    }
    if let Ok(v) = codec::decode::<Response>(data) {
        roundtrip(&v);
    }
    if let Ok(v) = codec::decode::<Batch>(data) {
        roundtrip(&v);
    }
    if let Ok(v) = codec::decode::<Command>(data) {
        roundtrip(&v);
    }
    if let Ok(v) = codec::decode::<StatusReport>(data) {
        roundtrip(&v);
    }
    if let Ok(v) = codec::decode::<MembershipReport>(data) {
        roundtrip(&v);
    }
    if let Ok(state) = codec::decode_snapshot::<ClusterState>(data)
        && state.check_consistency().is_ok()
    {
        let bytes = codec::encode(&state).expect("a decoded state encodes");
        let again: ClusterState = codec::decode_snapshot(&bytes).expect("and decodes");
        assert_eq!(again, state, "a state changed in a round trip");
    }
    highlander::__fuzz::raft_payloads(data);
}

/// Bytes as the text of a `node.toml`: parsed or refused with a typed error. Relative paths
/// point into a directory that does not exist.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let base = std::path::Path::new("/nonexistent/highlander-fuzz");
    if let Ok(config) = highlander::NodeConfig::from_toml(text, base) {
        assert!(config.peers.contains_key(&config.id), "a config without its own node");
        config.timing.validate().expect("an accepted timing is valid");
    }
}

mod serde_roundtrip {
    use highlander_core::codec;
    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use std::fmt::Debug;

    /// Encodes `value` and decodes it again: the same value must come back.
    pub fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let bytes = codec::encode(value).expect("a decoded value encodes");
        let again: T = codec::decode(&bytes).expect("an encoded value decodes");
        assert_eq!(&again, value, "a value changed in a round trip");
    }
}
