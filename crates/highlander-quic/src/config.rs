//! What a [`QuicTransport`](crate::QuicTransport) is built from, and how it is checked.

use highlander_core::NodeId;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything one node's transport needs: who it is, where it listens, who its peers are,
/// how it proves its identity, and its timeouts and limits.
///
/// Build one with [`QuicConfig::new`] (default timeouts and limits) and adjust the public
/// fields; [`QuicConfig::validate`] (also run by every constructor of the transport) refuses
/// a configuration that cannot work, naming the field to change.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// This node's id. Its certificate must name it (see [`crate::node_name`]).
    pub node_id: NodeId,
    /// The local UDP address to bind, e.g. `0.0.0.0:7000` or `127.0.0.1:7000`. The same socket
    /// serves peers and dials them.
    pub listen: SocketAddr,
    /// The static peer list: every member of the cluster and the address others dial it at,
    /// this node included. Only nodes listed here may connect, and a dialed address must
    /// answer with the id it is listed under.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// How this node proves who it is and decides whom to trust.
    pub identity: Identity,
    /// Timeouts and back-off.
    pub timeouts: Timeouts,
    /// Bounds on what peers can make this node hold.
    pub limits: Limits,
}

impl QuicConfig {
    /// A configuration with default [`Timeouts`] and [`Limits`].
    pub fn new(
        node_id: NodeId,
        listen: SocketAddr,
        peers: BTreeMap<NodeId, SocketAddr>,
        identity: Identity,
    ) -> QuicConfig {
        QuicConfig {
            node_id,
            listen,
            peers,
            identity,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
        }
    }

    /// Checks everything that can be checked without reading files or binding sockets.
    /// The identity's files and certificates are checked when the transport is built.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.peers.contains_key(&self.node_id) {
            return Err(ConfigError::OwnIdMissing(self.node_id));
        }
        let mut seen: BTreeMap<SocketAddr, NodeId> = BTreeMap::new();
        for (&id, &addr) in &self.peers {
            if addr.port() == 0 {
                return Err(ConfigError::BadPeerAddress { id, addr, reason: "port 0" });
            }
            if addr.ip().is_unspecified() {
                return Err(ConfigError::BadPeerAddress {
                    id,
                    addr,
                    reason: "an unspecified address (0.0.0.0 or ::) cannot be dialed",
                });
            }
            if addr.ip().is_multicast() {
                return Err(ConfigError::BadPeerAddress {
                    id,
                    addr,
                    reason: "a multicast address",
                });
            }
            // Two ids at one address would make one of them answer for the other.
            if let Some(&other) = seen.get(&addr) {
                return Err(ConfigError::DuplicatePeerAddress { first: other, second: id, addr });
            }
            seen.insert(addr, id);
        }
        if self.listen.ip().is_multicast() {
            return Err(ConfigError::BadListen {
                addr: self.listen,
                reason: "a multicast address cannot be bound",
            });
        }
        self.timeouts.validate()?;
        self.limits.validate()?;
        Ok(())
    }
}

/// How a node proves its identity and which certificates it trusts.
///
/// Every certificate names exactly one node (see [`crate::node_name`]) and chains to the
/// cluster CA; nothing else is trusted.
#[derive(Clone)]
pub enum Identity {
    /// PEM files: the cluster CA certificate, this node's certificate (optionally followed by
    /// intermediates) and its private key (PKCS#8, PKCS#1 or SEC1). Make them with
    /// [`crate::generate_ca`] and [`crate::issue_node_cert`] (the `highlander certs` commands).
    PemFiles {
        /// The cluster CA certificate.
        ca_cert: PathBuf,
        /// This node's certificate chain.
        node_cert: PathBuf,
        /// This node's private key.
        node_key: PathBuf,
    },
    /// The same three PEM documents, already in memory.
    Pem {
        /// The cluster CA certificate.
        ca_cert: String,
        /// This node's certificate chain.
        node_cert: String,
        /// This node's private key.
        node_key: String,
    },
    /// A secret shared by every node: each derives the same CA key from it (the key never
    /// touches disk) and issues itself a short-lived certificate at start, renewed while it
    /// runs.
    ClusterSecret(ClusterSecret),
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::PemFiles { ca_cert, node_cert, node_key } => f
                .debug_struct("PemFiles")
                .field("ca_cert", ca_cert)
                .field("node_cert", node_cert)
                .field("node_key", node_key)
                .finish(),
            // Keys are secrets: never print them.
            Identity::Pem { .. } => f.write_str("Pem { .. }"),
            Identity::ClusterSecret(s) => s.fmt(f),
        }
    }
}

/// The shortest cluster secret accepted, in characters: 43 characters of the base64 alphabet
/// carry at least 258 bits, the most a 256-bit key can use.
pub const MIN_SECRET_CHARS: usize = 43;

/// The fewest distinct characters a cluster secret must contain: a random 43-character base64
/// string has about 30, so fewer than 16 means it was not drawn at random.
pub const MIN_SECRET_DISTINCT_CHARS: usize = 16;

/// A cluster secret: at least [`MIN_SECRET_CHARS`] characters of the base64 alphabet (either
/// variant, `=` padding allowed), such as [`ClusterSecret::generate`] makes.
///
/// Why this strict: any client that connects to a node sees a certificate signed by the key
/// derived from the secret, so a guessable secret can be brute-forced offline and the CA key
/// recovered. The length check guarantees the *capacity* for 256 bits; the
/// distinct-characters check refuses the most obvious non-random strings. Neither can prove
/// randomness: generate the secret, never type one.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(String);

impl ClusterSecret {
    /// Checks and wraps a secret. Surrounding whitespace (a trailing newline from a file) is
    /// removed first.
    pub fn new(secret: impl Into<String>) -> Result<ClusterSecret, SecretError> {
        let secret: String = secret.into();
        let trimmed = secret.trim();
        let len = trimmed.chars().count();
        if len < MIN_SECRET_CHARS {
            return Err(SecretError::TooShort { len, min: MIN_SECRET_CHARS });
        }
        let body = trimmed.trim_end_matches('=');
        if let Some(c) = body.chars().find(|c| !is_base64_char(*c)) {
            return Err(SecretError::BadCharacter(c));
        }
        let distinct = body.chars().collect::<std::collections::BTreeSet<_>>().len();
        if distinct < MIN_SECRET_DISTINCT_CHARS {
            return Err(SecretError::NotRandom { distinct, min: MIN_SECRET_DISTINCT_CHARS });
        }
        Ok(ClusterSecret(trimmed.to_owned()))
    }

    /// A new random secret: 32 bytes from the operating system's generator, as 43 characters
    /// of unpadded URL-safe base64.
    pub fn generate() -> Result<ClusterSecret, SecretError> {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| SecretError::NoRandomness)?;
        ClusterSecret::new(base64url(&bytes))
    }

    /// The secret itself, to hand to the other nodes. Keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

fn is_base64_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_')
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// Why a cluster secret was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Too short to carry a 256-bit key.
    #[error(
        "identity.cluster_secret: {len} characters is too short; at least {min} characters of \
         base64 (32 random bytes) are needed so the CA key cannot be guessed; generate one \
         with `ClusterSecret::generate`"
    )]
    TooShort {
        /// The secret's length in characters.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// A character outside the base64 alphabet.
    #[error(
        "identity.cluster_secret: the character {0:?} is not in the base64 alphabet; use a \
         generated secret"
    )]
    BadCharacter(char),
    /// Too few distinct characters to have been drawn at random.
    #[error(
        "identity.cluster_secret: only {distinct} distinct characters (a random secret has \
         about 30, at least {min} are required); use a generated secret"
    )]
    NotRandom {
        /// Distinct characters found.
        distinct: usize,
        /// The minimum.
        min: usize,
    },
    /// The operating system's random generator failed.
    #[error("identity.cluster_secret: the system random generator failed")]
    NoRandomness,
}

/// Timeouts and back-off. Set the same values on every node: QUIC negotiates the smaller idle
/// timeout of the two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a dial (QUIC + TLS handshake) may take before it counts as failed.
    pub connect: Duration,
    /// A connection that hears nothing for this long is dead.
    pub idle: Duration,
    /// How often an otherwise quiet connection sends a keep-alive; shorter than `idle`
    /// (a third of it or less keeps one lost keep-alive harmless).
    pub keep_alive: Duration,
    /// How long an inbound request may go without progress (its next bytes, or room to write
    /// its response) before its stream is dropped; frees the slots of stalled peers.
    pub stream_idle: Duration,
    /// The first pause before redialing a peer whose dial failed; doubled on every failure.
    pub reconnect_min: Duration,
    /// The longest pause between dials of a peer.
    pub reconnect_max: Duration,
    /// How long [`shutdown`](highlander_core::Transport::shutdown) waits for requests in
    /// flight before closing the endpoint anyway.
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            idle: Duration::from_secs(10),
            keep_alive: Duration::from_secs(3),
            stream_idle: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
            drain: Duration::from_secs(5),
        }
    }
}

impl Timeouts {
    fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("timeouts.connect", self.connect),
            ("timeouts.idle", self.idle),
            ("timeouts.keep_alive", self.keep_alive),
            ("timeouts.stream_idle", self.stream_idle),
            ("timeouts.reconnect_min", self.reconnect_min),
            ("timeouts.reconnect_max", self.reconnect_max),
        ];
        for (field, value) in nonzero {
            if value.is_zero() {
                return Err(ConfigError::Timeout { field, reason: "must be more than zero" });
            }
        }
        if self.keep_alive >= self.idle {
            return Err(ConfigError::Timeout {
                field: "timeouts.keep_alive",
                reason: "must be shorter than timeouts.idle, or quiet connections die",
            });
        }
        // QUIC encodes the idle timeout in milliseconds in a 62-bit integer.
        if self.idle > Duration::from_secs(365 * 24 * 3600) {
            return Err(ConfigError::Timeout { field: "timeouts.idle", reason: "at most a year" });
        }
        if self.reconnect_min > self.reconnect_max {
            return Err(ConfigError::Timeout {
                field: "timeouts.reconnect_min",
                reason: "must not exceed timeouts.reconnect_max",
            });
        }
        Ok(())
    }
}

/// Bounds on what peers can make a node hold. The defaults suit a cluster of a few nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Streams (requests) a peer may have open on one connection at once; QUIC itself makes
    /// the peer wait for more.
    pub max_streams_per_connection: u32,
    /// Requests of one connection read and served at once; further streams wait.
    pub max_requests_per_connection: usize,
    /// Bytes of inbound request frames held at once, over all peers; a frame waits until its
    /// bytes fit. At least [`highlander_core::codec::MAX_FRAME_BYTES`].
    pub inbound_frame_bytes: usize,
    /// Inbound snapshots received at once, over all peers (each up to
    /// [`highlander_core::codec::MAX_SNAPSHOT_BYTES`]).
    pub inbound_snapshots: usize,
    /// Inbound connections kept per peer; a newer one closes the oldest (a restarted peer
    /// dials again before its old connections time out).
    pub connections_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_connection: 256,
            max_requests_per_connection: 128,
            inbound_frame_bytes: 256 << 20,
            inbound_snapshots: 2,
            connections_per_peer: 4,
        }
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            ("limits.max_streams_per_connection", self.max_streams_per_connection as usize),
            ("limits.max_requests_per_connection", self.max_requests_per_connection),
            ("limits.inbound_snapshots", self.inbound_snapshots),
            ("limits.connections_per_peer", self.connections_per_peer),
        ];
        for (field, value) in nonzero {
            if value == 0 {
                return Err(ConfigError::Limit { field, reason: "must be more than zero".into() });
            }
        }
        if self.inbound_frame_bytes < highlander_core::codec::MAX_FRAME_BYTES {
            return Err(ConfigError::Limit {
                field: "limits.inbound_frame_bytes",
                reason: format!(
                    "must be at least the largest frame ({} bytes), or such a frame never fits",
                    highlander_core::codec::MAX_FRAME_BYTES
                ),
            });
        }
        // tokio's semaphore counts at most usize::MAX >> 3 permits.
        if self.inbound_frame_bytes > usize::MAX >> 4 {
            return Err(ConfigError::Limit {
                field: "limits.inbound_frame_bytes",
                reason: "too large".into(),
            });
        }
        Ok(())
    }
}

/// A configuration that cannot work. Every message starts with the field to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The peer list does not contain this node.
    #[error(
        "peers: this node's id {0} is missing; the peer list must list every member, this node too"
    )]
    OwnIdMissing(NodeId),
    /// A peer's address cannot be dialed.
    #[error("peers.{id}: the address {addr} cannot be dialed: {reason}")]
    BadPeerAddress {
        /// The peer.
        id: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two peers share one address.
    #[error(
        "peers.{second}: the address {addr} is already the address of {first}; every node needs its own"
    )]
    DuplicatePeerAddress {
        /// The first peer at the address.
        first: NodeId,
        /// The second.
        second: NodeId,
        /// The address.
        addr: SocketAddr,
    },
    /// The listen address cannot be used.
    #[error("listen: {addr}: {reason}")]
    BadListen {
        /// The address.
        addr: SocketAddr,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A timeout is out of range.
    #[error("{field}: {reason}")]
    Timeout {
        /// The field, e.g. `timeouts.keep_alive`.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A limit is out of range.
    #[error("{field}: {reason}")]
    Limit {
        /// The field, e.g. `limits.inbound_snapshots`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The cluster secret was refused.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A certificate, key or CA could not be used.
    #[error("identity.{field}: {reason}")]
    Identity {
        /// The field: `ca_cert`, `node_cert`, `node_key` or `cluster_secret`.
        field: &'static str,
        /// What is wrong, and where it was read from.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_known_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }

    #[test]
    fn secrets_are_checked() {
        let s = ClusterSecret::generate().unwrap();
        assert_eq!(s.expose().len(), 43);
        assert_eq!(ClusterSecret::new(format!("  {}\n", s.expose())).unwrap(), s);
        assert!(matches!(
            ClusterSecret::new("short"),
            Err(SecretError::TooShort { len: 5, min: MIN_SECRET_CHARS })
        ));
        assert!(matches!(ClusterSecret::new("a".repeat(60)), Err(SecretError::NotRandom { .. })));
        let bad = format!("{}!", s.expose());
        assert_eq!(ClusterSecret::new(bad), Err(SecretError::BadCharacter('!')));
        let msg = ClusterSecret::new("x".repeat(10)).unwrap_err().to_string();
        assert!(msg.contains("at least 43"), "{msg}");
        assert_eq!(format!("{s:?}"), "ClusterSecret(<redacted>)");
    }
}
