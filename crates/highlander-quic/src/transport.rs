//! [`QuicTransport`]: one QUIC endpoint per node that serves its peers and dials them.

use crate::config::{Limits, QuicConfig, Timeouts};
use crate::frame::{self, KIND_FRAME, KIND_SNAPSHOT, ReadFail, code};
use crate::pki::{self, NodeIdentity, Renewer};
use crate::socket::{ObservedSocket, QUIC_V1};
use crate::throttle::{Kind, Throttle, warn_throttled};
use crate::tls;
use bytes::Bytes;
use highlander_core::codec::{self, CodecError, MAX_FRAME_BYTES, MAX_SNAPSHOT_BYTES};
use highlander_core::wire::{RaftMessage, Request, Response};
use highlander_core::{BoxFuture, NodeId, Payload, RequestHandler, Transport, TransportError};
use quinn::{ConnectionError, Endpoint, RecvStream, SendStream, TransportErrorCode, VarInt};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// One warning per kind of trouble per this window.
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// How long `shutdown` waits for peers to acknowledge the close.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Connection attempts quinn queues before we look at them.
const MAX_INCOMING: usize = 256;

/// Inbound handshakes in progress at once; more are refused before any crypto, so strangers
/// cannot make the node hold unbounded handshake state.
const MAX_HANDSHAKES: usize = 64;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// The configuration or identity was refused.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// The listen address could not be bound.
    #[error("listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Built outside a tokio runtime; the endpoint needs one to run its driver.
    #[error("QuicTransport must be built inside a tokio runtime (with I/O and time enabled)")]
    NoRuntime,
    /// The QUIC endpoint could not start on the socket.
    #[error("cannot start the QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The TLS configuration could not be built.
    #[error("{0}")]
    Tls(String),
}

/// The production [`Transport`]: QUIC (quinn) with mutual TLS (rustls, ring), one UDP
/// endpoint that serves and dials, one connection per peer dialed on demand, one stream per
/// request.
///
/// Errors from [`Transport::request`]: `UnknownPeer` for an id outside the peer list;
/// `Closed` after [`Transport::shutdown`] (or once the endpoint closed under a request);
/// `Unreachable` when no connection could be had (dial failed, backing off, refused by the
/// peer's TLS, peer not serving) or the connection was lost during the request — in the last
/// case the request may have been served; `Timeout` when the caller's timeout ran out
/// first (may have been served); `Codec` for a request above its size limit, or a response
/// that does not decode.
///
/// Dropping the transport closes the endpoint at once (peers see the close); prefer
/// [`Transport::shutdown`], which drains first.
pub struct QuicTransport {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    local_addr: SocketAddr,
    peers: BTreeMap<NodeId, SocketAddr>,
    members: BTreeSet<NodeId>,
    timeouts: Timeouts,
    limits: Limits,
    endpoint: Endpoint,
    identity: NodeIdentity,
    server_transport: Arc<quinn::TransportConfig>,
    client_transport: Arc<quinn::TransportConfig>,
    /// Replaced when a cluster-secret certificate is renewed.
    client_config: Mutex<quinn::ClientConfig>,
    outbound: BTreeMap<NodeId, Mutex<Slot>>,
    inbound: Mutex<BTreeMap<NodeId, Vec<quinn::Connection>>>,
    handler: OnceLock<Arc<dyn RequestHandler>>,
    closing: AtomicBool,
    inflight: Inflight,
    frame_budget: Arc<Semaphore>,
    snapshot_slots: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    /// Dials started, for tests of de-duplication.
    dials: AtomicUsize,
    throttle: Arc<Throttle>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// The outbound connection to one peer.
struct Slot {
    state: SlotState,
    /// Dials that failed in a row (a connection that died before carrying one request counts
    /// as a failed dial: TLS 1.3 reports a refused client certificate only after "connected").
    failures: u32,
    last_error: String,
}

enum SlotState {
    Idle,
    Dialing(watch::Receiver<Option<DialResult>>),
    Connected(Arc<Live>),
    Failed { retry_at: Instant },
}

type DialResult = Result<Arc<Live>, String>;

struct Live {
    conn: quinn::Connection,
    /// Whether a request on it got a response: proof the peer accepted us.
    proven: AtomicBool,
}

/// Counts inbound requests in flight so shutdown can wait for them.
#[derive(Default)]
struct Inflight {
    count: AtomicUsize,
    zero: Notify,
}

struct InflightGuard<'a>(&'a Inflight);

impl Inflight {
    fn enter(&self) -> InflightGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self)
    }

    async fn idle(&self) {
        loop {
            let notified = self.zero.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks, but a poisoned lock must not panic either.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request ready for the wire.
enum Outgoing {
    Frame(Bytes),
    /// A snapshot chunk for Raft member `to`.
    Snapshot {
        to: u64,
        data: Bytes,
    },
}

impl Outgoing {
    fn new(request: Request) -> Result<Outgoing, TransportError> {
        match request {
            Request::Raft { to, message: RaftMessage::Snapshot(Payload(data)) } => {
                if data.len() > MAX_SNAPSHOT_BYTES {
                    return Err(CodecError::TooLarge {
                        len: data.len(),
                        limit: MAX_SNAPSHOT_BYTES,
                    }
                    .into());
                }
                Ok(Outgoing::Snapshot { to, data })
            }
            other => {
                let body = codec::encode(&other)?;
                if body.len() > MAX_FRAME_BYTES {
                    return Err(
                        CodecError::TooLarge { len: body.len(), limit: MAX_FRAME_BYTES }.into()
                    );
                }
                Ok(Outgoing::Frame(Bytes::from(body)))
            }
        }
    }
}

/// Resets the send side of a request that is abandoned before it completes (timeout or
/// cancellation), so the peer stops receiving it; dropping a quinn stream would finish it.
struct Abandon(Option<SendStream>);

impl Abandon {
    fn stream(&mut self) -> Result<&mut SendStream, TransportError> {
        self.0.as_mut().ok_or(TransportError::Closed)
    }

    fn complete(mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if let Some(mut send) = self.0.take() {
            let _ = send.reset(code::CANCELLED);
        }
    }
}

impl QuicTransport {
    /// Binds `config.listen` and starts the endpoint. Must be called inside a tokio runtime
    /// with I/O and time enabled.
    pub fn bind(config: QuicConfig) -> Result<QuicTransport, QuicError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(QuicError::NoRuntime);
        }
        let addr = config.listen;
        let socket =
            std::net::UdpSocket::bind(addr).map_err(|source| QuicError::Bind { addr, source })?;
        QuicTransport::from_socket(config, socket)
    }

    /// Starts the endpoint on an already bound socket (so a caller can let the OS choose the
    /// port, learn it, and then write the peer list); `config.listen` is not used.
    pub fn from_socket(
        config: QuicConfig,
        socket: std::net::UdpSocket,
    ) -> Result<QuicTransport, QuicError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(QuicError::NoRuntime);
        }
        let socket = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
            .map_err(QuicError::Endpoint)?;
        QuicTransport::with_socket(config, socket, None)
    }

    /// Starts the endpoint on any [`quinn::AsyncUdpSocket`], e.g. a simulated network's, and
    /// optionally seeds the endpoint's random choices (`rng_seed`) so a simulated run
    /// repeats. Production code uses [`QuicTransport::bind`].
    pub fn with_socket(
        config: QuicConfig,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        rng_seed: Option<[u8; 32]>,
    ) -> Result<QuicTransport, QuicError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(QuicError::NoRuntime);
        }
        let identity = pki::load(&config)?;
        let members: BTreeSet<NodeId> = config.peers.keys().copied().collect();
        let (server_transport, client_transport) = transport_configs(&config)?;
        let server = server_config(
            &identity,
            identity.chain.clone(),
            identity.key.clone_key(),
            &members,
            &server_transport,
        )?;
        let client = client_config(
            &identity,
            identity.chain.clone(),
            identity.key.clone_key(),
            &client_transport,
        )?;

        // Stable reset and connection-id keys: a restarted peer recognises our old
        // connection ids and answers with a stateless reset, so we notice in one round trip.
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &identity.endpoint.reset);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        let cid_key = identity.endpoint.cid;
        endpoint_config
            .cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            })
            .supported_versions(vec![QUIC_V1])
            // Peers keep the fixed bit set, so a clear bit marks garbage.
            .grease_quic_bit(false)
            .rng_seed(rng_seed);

        let throttle = Arc::new(Throttle::new(LOG_WINDOW));
        let socket = Arc::new(ObservedSocket::new(socket, throttle.clone()));
        let endpoint = Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(QuicError::Endpoint)?;
        let local_addr = endpoint.local_addr().map_err(QuicError::Endpoint)?;

        let outbound = members
            .iter()
            .map(|&id| {
                let slot = Slot { state: SlotState::Idle, failures: 0, last_error: String::new() };
                (id, Mutex::new(slot))
            })
            .collect();
        let inner = Arc::new(Inner {
            id: config.node_id,
            local_addr,
            peers: config.peers.clone(),
            members,
            timeouts: config.timeouts,
            limits: config.limits,
            endpoint: endpoint.clone(),
            identity,
            server_transport,
            client_transport,
            client_config: Mutex::new(client),
            outbound,
            inbound: Mutex::new(BTreeMap::new()),
            handler: OnceLock::new(),
            closing: AtomicBool::new(false),
            inflight: Inflight::default(),
            frame_budget: Arc::new(Semaphore::new(config.limits.inbound_frame_bytes)),
            snapshot_slots: Arc::new(Semaphore::new(config.limits.inbound_snapshots)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            dials: AtomicUsize::new(0),
            throttle,
            tasks: Mutex::new(Vec::new()),
        });

        let accept = tokio::spawn(accept_loop(inner.clone()));
        lock(&inner.tasks).push(accept.abort_handle());
        if inner.identity.renewer.is_some() {
            let renew = tokio::spawn(renew_loop(Arc::downgrade(&inner)));
            lock(&inner.tasks).push(renew.abort_handle());
        }
        info!(
            node = %inner.id,
            addr = %local_addr,
            alpn = %String::from_utf8_lossy(&tls::alpn()),
            "QUIC transport listening"
        );
        Ok(QuicTransport { inner })
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The static peer list this transport was built with.
    pub fn peers(&self) -> &BTreeMap<NodeId, SocketAddr> {
        &self.inner.peers
    }

    /// Renews a cluster-secret certificate now.
    #[cfg(test)]
    pub(crate) fn renew_now(&self) -> Result<(), String> {
        let renewer = self.inner.identity.renewer.as_ref().ok_or("not in cluster-secret mode")?;
        self.inner.renew(renewer)
    }

    /// Dials started so far.
    #[cfg(test)]
    pub(crate) fn dials(&self) -> usize {
        self.inner.dials.load(Ordering::SeqCst)
    }

    /// Inbound requests in progress.
    #[cfg(test)]
    pub(crate) fn inflight(&self) -> usize {
        self.inner.inflight.count.load(Ordering::SeqCst)
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Tasks hold the inner state; closing the endpoint ends them all.
        self.inner.closing.store(true, Ordering::SeqCst);
        self.inner.endpoint.close(code::SHUTDOWN, b"dropped");
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
    }
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("id", &self.inner.id)
            .field("local_addr", &self.inner.local_addr)
            .field("peers", &self.inner.peers)
            .finish_non_exhaustive()
    }
}

fn transport_configs(
    config: &QuicConfig,
) -> Result<(Arc<quinn::TransportConfig>, Arc<quinn::TransportConfig>), QuicError> {
    let base = || -> Result<quinn::TransportConfig, QuicError> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(config.timeouts.idle).map_err(|_| {
            crate::ConfigError::Timeout { field: "timeouts.idle", reason: "out of range" }
        })?;
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(config.timeouts.keep_alive))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(8 << 20))
            // Bounds what one connection can make us buffer (quinn's default is unbounded).
            .receive_window(VarInt::from_u32(64 << 20))
            .send_window(64 << 20)
            .datagram_receive_buffer_size(None);
        Ok(t)
    };
    let mut server = base()?;
    server.max_concurrent_bidi_streams(VarInt::from_u32(config.limits.max_streams_per_connection));
    // Peers never open streams on a connection we dialed: requests travel on the requester's
    // own connection.
    let mut client = base()?;
    client.max_concurrent_bidi_streams(VarInt::from_u32(0));
    Ok((Arc::new(server), Arc::new(client)))
}

fn server_config(
    identity: &NodeIdentity,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    members: &BTreeSet<NodeId>,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let crypto = tls::server_crypto(identity, chain, key, members).map_err(QuicError::Tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport.clone()).migration(false).max_incoming(MAX_INCOMING);
    Ok(server)
}

fn client_config(
    identity: &NodeIdentity,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, QuicError> {
    let crypto = tls::client_crypto(identity, chain, key).map_err(QuicError::Tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport.clone());
    Ok(client)
}

impl Transport for QuicTransport {
    fn local_id(&self) -> NodeId {
        self.inner.id
    }

    /// Installs `handler`. Connections are accepted from the start; streams that arrive
    /// before this is called are refused as "not serving". Fails with `Closed` after
    /// shutdown and with `Unreachable` (naming this node) if already serving.
    fn serve(&self, handler: Arc<dyn RequestHandler>) -> Result<(), TransportError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        self.inner.handler.set(handler).map_err(|_| TransportError::Unreachable {
            peer: self.inner.id,
            reason: "this transport is already serving".into(),
        })
    }

    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async move {
            let inner = &self.inner;
            if inner.closing.load(Ordering::SeqCst) {
                return Err(TransportError::Closed);
            }
            if !inner.members.contains(&to) {
                return Err(TransportError::UnknownPeer(to));
            }
            let outgoing = Outgoing::new(request)?;
            match tokio::time::timeout(timeout, inner.exchange(to, outgoing)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout),
            }
        })
    }

    /// Stops accepting connections and streams and refuses new requests (`Closed`), waits up
    /// to `timeouts.drain` for the inbound requests in progress to be answered, then closes
    /// the endpoint and waits briefly for peers to acknowledge. This node's own requests
    /// still waiting then fail with `Closed`. Idempotent.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            let first = !inner.closing.swap(true, Ordering::SeqCst);
            inner.endpoint.set_server_config(None);
            if first {
                debug!(node = %inner.id, "QUIC transport draining");
            }
            if tokio::time::timeout(inner.timeouts.drain, inner.inflight.idle()).await.is_err() {
                warn!(
                    node = %inner.id,
                    left = inner.inflight.count.load(Ordering::SeqCst),
                    "requests still in flight after the drain timeout; closing anyway"
                );
            }
            inner.endpoint.close(code::SHUTDOWN, b"shutdown");
            for task in lock(&inner.tasks).drain(..) {
                task.abort();
            }
            let _ = tokio::time::timeout(CLOSE_WAIT, inner.endpoint.wait_idle()).await;
            if first {
                info!(node = %inner.id, "QUIC transport closed");
            }
        })
    }
}

impl Inner {
    /// One request over one stream of the connection to `to`.
    async fn exchange(
        self: &Arc<Self>,
        to: NodeId,
        outgoing: Outgoing,
    ) -> Result<Response, TransportError> {
        let live = self.connection(to).await?;
        let (send, mut recv) = live.conn.open_bi().await.map_err(|e| self.lost(to, &live, e))?;
        let mut send = Abandon(Some(send));
        let written = match outgoing {
            Outgoing::Frame(body) => {
                let mut header = [KIND_FRAME, 0, 0, 0, 0];
                header[1..].copy_from_slice(&(body.len() as u32).to_be_bytes());
                let mut chunks = [Bytes::copy_from_slice(&header), body];
                send.stream()?.write_all_chunks(&mut chunks).await
            }
            Outgoing::Snapshot { to: member, data } => {
                let stream = send.stream()?;
                let _ = stream.set_priority(frame::SNAPSHOT_PRIORITY);
                let mut header = [0u8; 13];
                header[0] = KIND_SNAPSHOT;
                header[1..5].copy_from_slice(&(data.len() as u32).to_be_bytes());
                header[5..].copy_from_slice(&member.to_be_bytes());
                let mut result = stream.write_chunk(Bytes::copy_from_slice(&header)).await;
                let mut at = 0;
                while result.is_ok() && at < data.len() {
                    let end = (at + frame::SNAPSHOT_CHUNK).min(data.len());
                    result = stream.write_chunk(data.slice(at..end)).await;
                    at = end;
                }
                result
            }
        };
        if let Err(e) = written {
            return Err(self.write_failed(to, &live, e));
        }
        let _ = send.stream()?.finish();

        let response = self.read_response(to, &live, &mut recv).await?;
        send.complete();
        if !live.proven.swap(true, Ordering::Relaxed) {
            debug!(peer = %to, "connection proven");
        }
        Ok(response)
    }

    async fn read_response(
        &self,
        to: NodeId,
        live: &Arc<Live>,
        recv: &mut RecvStream,
    ) -> Result<Response, TransportError> {
        let mut len = [0u8; 4];
        match recv.read_exact(&mut len).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => {
                return Err(unreachable(to, "the peer ended the stream without a response"));
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(self.read_failed(to, live, e)),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            let _ = recv.stop(code::TOO_LARGE);
            warn_throttled!(
                self.throttle,
                (Kind::BadResponse, Some(to)),
                peer = %to,
                len,
                limit = MAX_FRAME_BYTES,
                "refused a response longer than the frame limit",
            );
            return Err(CodecError::TooLarge { len, limit: MAX_FRAME_BYTES }.into());
        }
        let mut body = vec![0u8; len];
        match recv.read_exact(&mut body).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(n)) => {
                return Err(unreachable(
                    to,
                    format!("the peer ended the stream after {n} of {len} response bytes"),
                ));
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(self.read_failed(to, live, e)),
        }
        match recv.read_chunk(1, true).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                let _ = recv.stop(code::PROTOCOL);
                warn_throttled!(
                    self.throttle,
                    (Kind::BadResponse, Some(to)),
                    peer = %to,
                    "refused a response with bytes after its frame",
                );
                return Err(CodecError::Malformed("bytes after the response frame".into()).into());
            }
            Err(e) => return Err(self.read_failed(to, live, e)),
        }
        codec::decode::<Response>(&body).map_err(|e| {
            warn_throttled!(
                self.throttle,
                (Kind::BadResponse, Some(to)),
                peer = %to,
                error = %e,
                "refused a response that does not decode",
            );
            TransportError::Codec(e)
        })
    }

    fn write_failed(&self, to: NodeId, live: &Arc<Live>, e: quinn::WriteError) -> TransportError {
        match e {
            quinn::WriteError::ConnectionLost(e) => self.lost(to, live, e),
            quinn::WriteError::Stopped(code) => stream_refused(to, code),
            other => unreachable(to, other.to_string()),
        }
    }

    fn read_failed(&self, to: NodeId, live: &Arc<Live>, e: quinn::ReadError) -> TransportError {
        match e {
            quinn::ReadError::ConnectionLost(e) => self.lost(to, live, e),
            quinn::ReadError::Reset(code) => stream_refused(to, code),
            other => unreachable(to, other.to_string()),
        }
    }

    /// The connection to `to` failed: forget it, so the next request dials again.
    fn lost(&self, to: NodeId, live: &Arc<Live>, e: ConnectionError) -> TransportError {
        if matches!(e, ConnectionError::LocallyClosed) || self.closing.load(Ordering::SeqCst) {
            return TransportError::Closed;
        }
        let reason = format!("connection lost: {e}");
        let Some(slot) = self.outbound.get(&to) else {
            return unreachable(to, reason);
        };
        let mut slot = lock(slot);
        if let SlotState::Connected(current) = &slot.state
            && current.conn.stable_id() == live.conn.stable_id()
        {
            self.forget(to, &mut slot, live, &e);
        }
        unreachable(to, reason)
    }

    /// Drops the dead connection `live` from `slot`. A peer that restarted (its stateless
    /// reset) is dialed again at once; a peer that closed, timed out or never accepted a
    /// request is backed off, so callers fail fast instead of queueing behind a dial.
    fn forget(&self, to: NodeId, slot: &mut Slot, live: &Live, e: &ConnectionError) {
        let proven = live.proven.load(Ordering::Relaxed);
        if proven && matches!(e, ConnectionError::Reset) {
            debug!(peer = %to, error = %e, "peer restarted; dialing again");
            slot.state = SlotState::Idle;
            slot.failures = 0;
        } else {
            // TLS 1.3 tells a client that its certificate was refused only after it considers
            // itself connected: the refusal arrives as a TLS alert closing the connection.
            let refused = matches!(e, ConnectionError::ConnectionClosed(c)
                if (0x100..0x200).contains(&u64::from(c.error_code)));
            if refused {
                warn_throttled!(
                    self.throttle,
                    (Kind::Dial, Some(to)),
                    peer = %to,
                    addr = ?self.peers.get(&to),
                    error = %e,
                    "peer refused our certificate (does it list this node, and trust our CA?)",
                );
            } else {
                debug!(peer = %to, error = %e, proven, "connection lost");
            }
            self.fail(slot, format!("connection lost: {e}"));
        }
    }

    fn fail(&self, slot: &mut Slot, error: String) {
        slot.failures = slot.failures.saturating_add(1);
        let doublings = (slot.failures - 1).min(16);
        let pause = self
            .timeouts
            .reconnect_min
            .saturating_mul(1 << doublings)
            .min(self.timeouts.reconnect_max);
        slot.state = SlotState::Failed { retry_at: Instant::now() + pause };
        slot.last_error = error;
    }

    /// The connection to `to`: the cached one, or one dial shared by every caller.
    async fn connection(self: &Arc<Self>, to: NodeId) -> Result<Arc<Live>, TransportError> {
        let Some(slot) = self.outbound.get(&to) else {
            return Err(TransportError::UnknownPeer(to));
        };
        let mut rx = {
            let mut slot = lock(slot);
            // A dial task that ended without answering (its runtime shut down): start over.
            if let SlotState::Dialing(rx) = &slot.state
                && rx.has_changed().is_err()
            {
                slot.state = SlotState::Idle;
            }
            if let SlotState::Connected(live) = &slot.state {
                let live = live.clone();
                match live.conn.close_reason() {
                    None => return Ok(live),
                    Some(e) => self.forget(to, &mut slot, &live, &e),
                }
            }
            match &slot.state {
                SlotState::Dialing(rx) if slot.failures == 0 => rx.clone(),
                // A peer that failed last time: do not make callers wait on the redial.
                SlotState::Dialing(_) => {
                    return Err(unreachable(to, format!("redialing after: {}", slot.last_error)));
                }
                SlotState::Failed { retry_at } if Instant::now() < *retry_at => {
                    return Err(unreachable(to, format!("backing off after: {}", slot.last_error)));
                }
                _ => {
                    let (tx, rx) = watch::channel(None);
                    slot.state = SlotState::Dialing(rx.clone());
                    // Its own task: a caller that gives up must not abort the handshake.
                    tokio::spawn(self.clone().dial(to, tx));
                    rx
                }
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(result) => result.clone(),
            Err(_) => return Err(TransportError::Closed),
        };
        match result {
            _ if self.closing.load(Ordering::SeqCst) => Err(TransportError::Closed),
            Some(Ok(live)) => Ok(live),
            Some(Err(reason)) => Err(unreachable(to, reason)),
            None => Err(TransportError::Closed),
        }
    }

    async fn dial(self: Arc<Self>, to: NodeId, tx: watch::Sender<Option<DialResult>>) {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let Some(&addr) = self.peers.get(&to) else {
            tx.send_replace(Some(Err(format!("{to} is not a peer"))));
            return;
        };
        let config = lock(&self.client_config).clone();
        let result = match self.endpoint.connect_with(config, addr, &pki::node_name(to)) {
            Ok(connecting) => match tokio::time::timeout(self.timeouts.connect, connecting).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no handshake within {:?}", self.timeouts.connect)),
            },
            Err(e) => Err(e.to_string()),
        };
        let result = {
            let Some(slot) = self.outbound.get(&to) else {
                return;
            };
            let mut slot = lock(slot);
            match result {
                Ok(conn) => {
                    debug!(peer = %to, %addr, "connected");
                    let live = Arc::new(Live { conn, proven: AtomicBool::new(false) });
                    slot.state = SlotState::Connected(live.clone());
                    Ok(live)
                }
                Err(error) => {
                    if self.closing.load(Ordering::SeqCst) {
                        slot.state = SlotState::Idle;
                    } else {
                        warn_throttled!(
                            self.throttle,
                            (Kind::Dial, Some(to)),
                            peer = %to,
                            %addr,
                            %error,
                            "cannot connect to peer",
                        );
                        self.fail(&mut slot, error.clone());
                    }
                    Err(error)
                }
            }
        };
        tx.send_replace(Some(result));
    }

    /// `peer` just connected to us: it is up, so dial it again without waiting out a back-off.
    fn peer_is_up(&self, peer: NodeId) {
        if let Some(slot) = self.outbound.get(&peer) {
            let mut slot = lock(slot);
            if matches!(slot.state, SlotState::Failed { .. }) {
                slot.state = SlotState::Idle;
                slot.failures = 0;
            }
        }
    }

    fn log_handshake_failure(&self, remote: SocketAddr, e: &ConnectionError) {
        let code = match e {
            ConnectionError::TransportError(t) => Some(t.code),
            ConnectionError::ConnectionClosed(c) => Some(c.error_code),
            _ => None,
        };
        let alert = |n: u8| code == Some(TransportErrorCode::crypto(n));
        if alert(120) {
            warn_throttled!(
                self.throttle,
                (Kind::ProtocolVersion, None),
                %remote,
                error = %e,
                ours = %String::from_utf8_lossy(&tls::alpn()),
                "refused a connection that speaks another protocol version (ALPN); run the same highlander version on every node",
            );
        } else if [42, 43, 44, 45, 46, 48, 49, 116].into_iter().any(alert) {
            warn_throttled!(
                self.throttle,
                (Kind::BadCertificate, None),
                %remote,
                error = %e,
                "refused a connection whose certificate is not a member's (wrong CA, or a node id outside the peer list)",
            );
        } else {
            warn_throttled!(
                self.throttle,
                (Kind::Handshake, None),
                %remote,
                error = %e,
                "an inbound handshake failed",
            );
        }
    }

    fn register_inbound(&self, peer: NodeId, conn: &quinn::Connection) {
        let oldest = {
            let mut inbound = lock(&self.inbound);
            let conns = inbound.entry(peer).or_default();
            conns.retain(|c| c.close_reason().is_none());
            conns.push(conn.clone());
            if conns.len() > self.limits.connections_per_peer {
                Some(conns.remove(0))
            } else {
                None
            }
        };
        if let Some(old) = oldest {
            debug!(%peer, "closing the peer's oldest connection: over the per-peer limit");
            old.close(code::SUPERSEDED, b"superseded by a newer connection");
        }
    }

    fn unregister_inbound(&self, peer: NodeId, conn: &quinn::Connection) {
        let mut inbound = lock(&self.inbound);
        if let Some(conns) = inbound.get_mut(&peer) {
            conns.retain(|c| c.stable_id() != conn.stable_id());
            if conns.is_empty() {
                inbound.remove(&peer);
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        handshake: OwnedSemaphorePermit,
    ) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(self.timeouts.connect, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                self.log_handshake_failure(remote, &e);
                return;
            }
            Err(_) => {
                warn_throttled!(
                    self.throttle,
                    (Kind::Handshake, None),
                    %remote,
                    "an inbound handshake did not finish in time",
                );
                return;
            }
        };
        drop(handshake);
        // The verifier already refused non-members; this reads the id it checked.
        let peer = match tls::peer_node(&conn) {
            Ok(peer) if self.members.contains(&peer) => peer,
            Ok(peer) => {
                warn_throttled!(
                    self.throttle,
                    (Kind::BadCertificate, None),
                    %remote,
                    %peer,
                    "refused a node outside the peer list",
                );
                conn.close(code::UNAUTHORIZED, b"not a member");
                return;
            }
            Err(error) => {
                warn_throttled!(
                    self.throttle,
                    (Kind::BadCertificate, None),
                    %remote,
                    %error,
                    "refused a connection without a node identity",
                );
                conn.close(code::UNAUTHORIZED, b"no node identity");
                return;
            }
        };
        debug!(%peer, %remote, "accepted a connection");
        self.register_inbound(peer, &conn);
        self.peer_is_up(peer);
        let slots = Arc::new(Semaphore::new(self.limits.max_requests_per_connection));
        loop {
            let permit = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    warn_throttled!(
                        self.throttle,
                        (Kind::Busy, Some(peer)),
                        %peer,
                        limit = self.limits.max_requests_per_connection,
                        "peer has every request slot of its connection busy; further streams wait",
                    );
                    match slots.clone().acquire_owned().await {
                        Ok(permit) => permit,
                        Err(_) => break,
                    }
                }
            };
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(streams) => streams,
                Err(e) => {
                    debug!(%peer, error = %e, "connection ended");
                    break;
                }
            };
            if self.closing.load(Ordering::SeqCst) {
                let _ = send.reset(code::NOT_SERVING);
                let _ = recv.stop(code::NOT_SERVING);
                continue;
            }
            tokio::spawn(self.clone().serve_stream(peer, send, recv, permit));
        }
        self.unregister_inbound(peer, &conn);
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer: NodeId,
        mut send: SendStream,
        mut recv: RecvStream,
        slot: OwnedSemaphorePermit,
    ) {
        let _inflight = self.inflight.enter();
        let (request, budget) = match self.read_request(&mut recv).await {
            Ok(read) => read,
            Err(fail) => {
                match &fail {
                    ReadFail::TooLarge { len, limit } => {
                        warn_throttled!(
                            self.throttle,
                            (Kind::Oversized, Some(peer)),
                            %peer,
                            len,
                            limit,
                            "refused a frame longer than its limit",
                        );
                    }
                    ReadFail::Malformed(error) => {
                        warn_throttled!(
                            self.throttle,
                            (Kind::Malformed, Some(peer)),
                            %peer,
                            %error,
                            "refused a frame that does not decode",
                        );
                    }
                    ReadFail::Stalled => {
                        warn_throttled!(
                            self.throttle,
                            (Kind::Stalled, Some(peer)),
                            %peer,
                            idle = ?self.timeouts.stream_idle,
                            "dropped a request that stalled",
                        );
                    }
                    ReadFail::Stream(error) => {
                        debug!(%peer, %error, "request stream failed");
                    }
                }
                let code = fail.code();
                let _ = recv.stop(code);
                let _ = send.reset(code);
                return;
            }
        };
        let Some(handler) = self.handler.get().cloned() else {
            let _ = send.reset(code::NOT_SERVING);
            return;
        };
        // Its own task, so a panicking handler costs one stream, not the connection.
        let response = match tokio::spawn(handler.handle(peer, request)).await {
            Ok(response) => response,
            Err(e) => {
                if e.is_panic() {
                    warn_throttled!(
                        self.throttle,
                        (Kind::Panic, Some(peer)),
                        %peer,
                        "request handler panicked",
                    );
                }
                let _ = send.reset(code::INTERNAL);
                return;
            }
        };
        drop(budget);
        let body = match codec::encode(&response) {
            Ok(body) if body.len() <= MAX_FRAME_BYTES => Ok(body),
            Ok(body) => codec::encode(&Response::Refused(format!(
                "the response of {} bytes exceeds the frame limit of {MAX_FRAME_BYTES}",
                body.len()
            ))),
            Err(e) => codec::encode(&Response::Refused(format!("cannot encode the response: {e}"))),
        };
        let body = match body {
            Ok(body) => body,
            Err(_) => {
                let _ = send.reset(code::INTERNAL);
                return;
            }
        };
        if let Err(error) = frame::write_response(&mut send, body, self.timeouts.stream_idle).await
        {
            debug!(%peer, %error, "could not send a response");
            return;
        }
        // The slot is free, but the request counts as in flight until the peer has the whole
        // response: closing the endpoint (shutdown) would abandon unacknowledged data.
        drop(slot);
        let _ = tokio::time::timeout(self.timeouts.stream_idle, send.stopped()).await;
    }

    /// Reads one request; the permit holds its bytes against the inbound budget until the
    /// handler is done with them.
    async fn read_request(
        &self,
        recv: &mut RecvStream,
    ) -> Result<(Request, Option<OwnedSemaphorePermit>), ReadFail> {
        let idle = self.timeouts.stream_idle;
        let mut head = [0u8; 5];
        frame::read_exact(recv, &mut head, idle).await?;
        let (kind, len) = frame::request_header(head)?;
        match kind {
            KIND_FRAME => {
                // `len` fits in u32: it came from one.
                let budget = self.frame_budget.clone().acquire_many_owned(len as u32);
                let permit = match tokio::time::timeout(idle, budget).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(ReadFail::Stream("closing".into())),
                    Err(_) => return Err(ReadFail::Stalled),
                };
                let mut body = vec![0u8; len];
                frame::read_exact(recv, &mut body, idle).await?;
                frame::expect_end(recv, idle).await?;
                let request = codec::decode::<Request>(&body)
                    .map_err(|e| ReadFail::Malformed(e.to_string()))?;
                Ok((request, Some(permit)))
            }
            KIND_SNAPSHOT => {
                let mut member = [0u8; 8];
                frame::read_exact(recv, &mut member, idle).await?;
                let slot = self.snapshot_slots.clone().acquire_owned();
                let permit = match tokio::time::timeout(idle, slot).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(ReadFail::Stream("closing".into())),
                    Err(_) => return Err(ReadFail::Stalled),
                };
                let data = frame::read_snapshot(recv, len, idle).await?;
                let request = Request::Raft {
                    to: u64::from_be_bytes(member),
                    message: RaftMessage::Snapshot(Payload::from(data)),
                };
                Ok((request, Some(permit)))
            }
            other => Err(ReadFail::Malformed(format!("unknown stream kind {other}"))),
        }
    }

    /// Renews the cluster-secret certificate for new connections; existing ones keep theirs.
    fn renew(&self, renewer: &Renewer) -> Result<(), String> {
        let (chain, key) = renewer.issue().map_err(|e| e.to_string())?;
        let server = server_config(
            &self.identity,
            chain.clone(),
            key.clone_key(),
            &self.members,
            &self.server_transport,
        )
        .map_err(|e| e.to_string())?;
        let client = client_config(&self.identity, chain, key, &self.client_transport)
            .map_err(|e| e.to_string())?;
        if !self.closing.load(Ordering::SeqCst) {
            self.endpoint.set_server_config(Some(server));
        }
        *lock(&self.client_config) = client;
        Ok(())
    }
}

fn unreachable(peer: NodeId, reason: impl Into<String>) -> TransportError {
    TransportError::Unreachable { peer, reason: reason.into() }
}

/// The peer reset or stopped our stream with `code`.
fn stream_refused(peer: NodeId, code: VarInt) -> TransportError {
    match code {
        c if c == code::NOT_SERVING => unreachable(peer, "the peer is not serving"),
        c if c == code::TOO_LARGE => {
            CodecError::Malformed("the peer refused the frame as too large".into()).into()
        }
        c if c == code::PROTOCOL => {
            CodecError::Malformed("the peer refused the frame as malformed".into()).into()
        }
        c if c == code::INTERNAL => unreachable(peer, "the peer's request handler failed"),
        c => unreachable(peer, format!("the peer reset the stream (code {c})")),
    }
}

async fn accept_loop(inner: Arc<Inner>) {
    let endpoint = inner.endpoint.clone();
    while let Some(incoming) = endpoint.accept().await {
        if inner.closing.load(Ordering::SeqCst) {
            incoming.refuse();
            continue;
        }
        let Ok(permit) = inner.handshakes.clone().try_acquire_owned() else {
            warn_throttled!(
                inner.throttle,
                (Kind::Handshake, None),
                remote = %incoming.remote_address(),
                limit = MAX_HANDSHAKES,
                "refused a connection: too many handshakes in progress",
            );
            incoming.refuse();
            continue;
        };
        tokio::spawn(inner.clone().serve_connection(incoming, permit));
    }
}

async fn renew_loop(inner: Weak<Inner>) {
    let period = pki::SECRET_CERT_LIFETIME / 3;
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let Some(renewer) = inner.identity.renewer.as_ref() else {
            return;
        };
        match inner.renew(renewer) {
            Ok(()) => debug!(node = %inner.id, "renewed the node certificate"),
            Err(error) => {
                warn_throttled!(
                    inner.throttle,
                    (Kind::Renewal, None),
                    node = %inner.id,
                    %error,
                    "cannot renew the node certificate; the current one stays until it expires",
                );
            }
        }
    }
}
