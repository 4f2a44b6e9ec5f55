//! The seam between the runtime and the network: a transport moves [`Request`]s to peers and
//! hands inbound ones to a [`RequestHandler`]. It knows nothing of Raft.

use crate::NodeId;
use crate::codec::CodecError;
use crate::wire::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A boxed, sendable future: the transport traits are object-safe so a node holds
/// `Arc<dyn Transport>` whatever network it runs on.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a request got no response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No response within the request's timeout; the request may or may not have been served.
    #[error("timed out")]
    Timeout,
    /// The peer could not be reached.
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// The peer is not in the static peer list.
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// This transport has been shut down.
    #[error("transport closed")]
    Closed,
    /// A frame could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] CodecError),
}

/// Serves requests that arrive from peers.
pub trait RequestHandler: Send + Sync + 'static {
    /// Handles one request from `from`. The future must not panic on any input.
    fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response>;
}

/// Carries requests between the nodes of one cluster.
pub trait Transport: Send + Sync + 'static {
    /// The node this transport speaks for.
    fn local_id(&self) -> NodeId;

    /// Starts handing inbound requests to `handler`. Called once by the node at start.
    fn serve(&self, handler: Arc<dyn RequestHandler>) -> Result<(), TransportError>;

    /// Sends `request` to `to` and waits at most `timeout` for its response.
    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>>;

    /// Stops serving and sending; requests in flight are answered or fail with
    /// [`TransportError::Closed`].
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}
