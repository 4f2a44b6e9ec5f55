//! The production transport of highlander: QUIC with mutual TLS.
//!
//! [`QuicTransport`] implements [`highlander_core::Transport`] over quinn 0.11 and rustls 0.23
//! (ring only, TLS 1.3 only, no 0-RTT, no session resumption). Each node runs one UDP endpoint
//! that both serves its peers and dials them; it keeps one outbound connection per peer,
//! dialed on demand, shared by concurrent callers and redialed with back-off; every request
//! travels on its own bidirectional stream under the caller's timeout. The protocol version
//! rides in ALPN (`highlander/<PROTOCOL_VERSION>`, see [`alpn`]); a peer offering another is
//! refused during the handshake with a log line saying so.
//!
//! Trust: a node's id is bound to its certificate as the DNS name
//! `node-<id>.highlander.invalid` ([`node_name`]). A peer is accepted only if its certificate
//! chains to the cluster CA and names a node of the static peer list, and a dialed address
//! must answer with the id it is listed under, so an address that points at the wrong node
//! can never reach Raft. Two set-ups ([`Identity`]): PEM files made by [`generate_ca`] and
//! [`issue_node_cert`], or a shared [`ClusterSecret`] from which every node derives the same
//! CA key (HKDF-SHA256) and issues itself a short-lived certificate.
//!
//! # Wire layout
//!
//! One request is one bidirectional stream, opened on the requester's own connection:
//!
//! ```text
//! requester → server   [kind: u8][len: u32 big-endian][len bytes]  FIN
//! server → requester   [len: u32 big-endian][len bytes]            FIN
//! ```
//!
//! Kind 1: the bytes are one `Request` encoded by `highlander_core::codec`, at most
//! `codec::MAX_FRAME_BYTES`, decoded with that limit (trailing bytes refused). Kind 2: the
//! bytes are the payload of a `Request::Raft { to, message: RaftMessage::Snapshot(..) }`, at most
//! `codec::MAX_SNAPSHOT_BYTES`, written in 1 MiB chunks on a stream of lower priority, so
//! heartbeats and votes on the same connection overtake it; the receiver holds only the bytes
//! that arrived, never the length claimed, and the runtime decodes the payload. The response
//! is one `Response` frame. Every length is checked against its limit before anything is
//! allocated. A refused stream is reset with an application code (1 malformed, 2 too large,
//! 4 not serving, 5 cancelled or stalled, 7 handler failed).
//!
//! What it never does: look inside a Raft message, retry a request (the runtime decides), send
//! early data, trust any CA but the cluster's, allocate a buffer for a length before checking
//! it against its limit, write a key to disk, or panic on anything a peer sends.

#![warn(missing_docs)]

mod config;
mod frame;
mod pki;
mod socket;
mod throttle;
mod tls;
mod transport;

pub use config::{
    ClusterSecret, ConfigError, Identity, Limits, MIN_SECRET_CHARS, MIN_SECRET_DISTINCT_CHARS,
    QuicConfig, SecretError, Timeouts,
};
pub use frame::{decode_request_stream, decode_response_stream};
pub use pki::{
    CaPem, CertError, DEFAULT_CA_VALIDITY_DAYS, DEFAULT_NODE_VALIDITY_DAYS, NODE_NAME_SUFFIX,
    NodeCertPem, cert_node_id, generate_ca, issue_node_cert, node_id_from_name, node_name,
};
pub use tls::alpn;
pub use transport::{QuicError, QuicTransport};

#[cfg(test)]
mod tests;
