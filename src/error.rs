//! The errors the public API returns.

use crate::config::TimingError;
use highlander_core::{
    JobId, JobState, Key, KeyError, KeySpec, LimitsError, NodeId, QueueCaps, Rejection,
    ScheduleError, TransportError,
};

/// A configuration the node refused to start with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `Node::builder().id(..)` was not called.
    #[error("the node id is missing: call .id(..)")]
    MissingId,
    /// `Node::builder().transport(..)` was not called.
    #[error("the transport is missing: call .transport(..)")]
    MissingTransport,
    /// The peer list is empty.
    #[error("the peer list is empty: list every node of the cluster, this one included")]
    NoPeers,
    /// The node's own id is not in the peer list.
    #[error("node {0} is not in the peer list; every node must list itself")]
    OwnIdMissing(NodeId),
    /// An id appears twice in the peer list.
    #[error("node {0} appears twice in the peer list")]
    DuplicatePeer(NodeId),
    /// The transport speaks for another node.
    #[error("the transport belongs to node {transport}, but this node is {node}")]
    TransportMismatch {
        /// The transport's node.
        transport: NodeId,
        /// This node.
        node: NodeId,
    },
    /// The configuration file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong, with the line for syntax errors.
        reason: String,
    },
    /// A field of the configuration is wrong.
    #[error("{field}: {reason}")]
    Field {
        /// The field, as written in the file (e.g. `peers.2`, `tls.cluster_secret`).
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The transport refused its configuration.
    #[error("transport: {0}")]
    Transport(String),
    /// The timing is unsafe.
    #[error(transparent)]
    Timing(#[from] TimingError),
    /// The limits are inconsistent.
    #[error("bad limits: {0}")]
    Limits(#[from] LimitsError),
    /// A node id in the peer list is too large: ids at or above 2^63 name storage that
    /// joined the cluster later.
    #[error("node id {0} is too large: node ids must be below 2^63")]
    NodeIdTooLarge(NodeId),
    /// The number of voters is not between 1 and the number of peers.
    #[error(
        "voters = {voters} is out of range: use 1 to {peers} (the number of peers); 3 or 5 is \
         usual, the other peers are learners"
    )]
    Voters {
        /// The number asked for.
        voters: usize,
        /// The number of peers.
        peers: usize,
    },
    /// The simulated clock rate is out of range.
    #[error("clock rate {0} is out of range: use 0.5 to 2.0 (1.0 outside simulations)")]
    ClockRate(String),
    /// The node's limits differ from the ones the cluster adopted.
    #[error(
        "this node's limits differ from the cluster's ({cluster:?}); configure the same limits on every node"
    )]
    LimitsMismatch {
        /// The cluster's limits.
        cluster: highlander_core::Limits,
    },
}

/// What a call on a [`Node`](crate::Node) can fail with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The node was configured wrongly.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The key is not a valid key.
    #[error("invalid key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The payload exceeds the cluster's limit; nothing was sent.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload's size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The key's queue is full; nothing was sent. Retry after the owner catches up.
    #[error("the queue of {key} is full")]
    QueueFull {
        /// The key.
        key: Key,
    },
    /// The cluster's message store is full; nothing was sent.
    #[error("the cluster's message store is full")]
    StoreFull,
    /// Nobody has registered the key and it holds no messages; nothing was sent.
    #[error("no such key: {key}")]
    NoSuchKey {
        /// The key.
        key: Key,
    },
    /// The key is registered elsewhere with a different spec.
    #[error("{key} is registered with a different spec: {existing:?}")]
    SpecConflict {
        /// The key.
        key: Key,
        /// The spec in force.
        existing: KeySpec,
    },
    /// This node already has a handler for the key.
    #[error("this node already has a handler for {key}")]
    AlreadyRegistered {
        /// The key.
        key: Key,
    },
    /// This node has no handler for the key.
    #[error("this node has no handler for {key}")]
    NotRegistered {
        /// The key.
        key: Key,
    },
    /// The write did not complete in time. It may or may not have been applied; a retry of
    /// the same call may duplicate it.
    #[error("timed out; the outcome is unknown")]
    Timeout,
    /// The node has no session yet (no quorum reachable since start).
    #[error("the node is not connected to a quorum: {0}")]
    Unavailable(String),
    /// The node is shutting down or has stopped.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// Raft stopped on this node (a storage failure or a shutdown).
    #[error("the node has stopped: {0}")]
    Stopped(String),
    /// Durable storage failed or holds damaged data; the node stops rather than risk a lie.
    #[error("storage: {0}")]
    Storage(String),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Another process now runs as this node, on other storage (the node was started again
    /// elsewhere, or its id is configured twice): this one stopped.
    #[error("superseded: {0}")]
    Superseded(String),
    /// This node's storage is no longer a member of the cluster (removed, or replaced by newer
    /// storage of the node): it stopped. Start it on an empty data directory to join again.
    #[error("removed from the cluster: {0}")]
    Removed(String),
    /// A membership change was refused; the text says why and what to do.
    #[error("membership: {0}")]
    Membership(String),
    /// The schedule cannot be run; the error says what to change.
    #[error("schedule {key}: {error}")]
    InvalidSchedule {
        /// The key.
        key: Key,
        /// What is wrong.
        error: ScheduleError,
    },
    /// The key is not a schedule.
    #[error("{key} is not a schedule")]
    NotASchedule {
        /// The key.
        key: Key,
    },
    /// An unfinished job of the queue holds the unique key: nothing was enqueued, and
    /// `existing` is the job that holds it.
    #[error("queue {queue}: an unfinished job ({existing}) holds the unique key")]
    DuplicateJob {
        /// The queue.
        queue: Key,
        /// The job holding the key.
        existing: JobId,
    },
    /// The job table is at its limit of unfinished jobs or their bytes; nothing was
    /// enqueued. Retry once workers catch up.
    #[error("the job table is full: {open} unfinished jobs hold {bytes} bytes")]
    JobsFull {
        /// Unfinished jobs.
        open: u64,
        /// Their payload bytes.
        bytes: u64,
    },
    /// A job for a new queue, and the cluster has as many queues as its limits allow.
    #[error("{max} job queues exist already")]
    TooManyQueues {
        /// The limit.
        max: u32,
    },
    /// The job's or the worker's options cannot work; the text says what to change.
    #[error("invalid job options: {0}")]
    InvalidJob(String),
    /// No such job (never enqueued, or dropped after it finished).
    #[error("no such job: {job}")]
    NoSuchJob {
        /// The job.
        job: JobId,
    },
    /// The job is not in a state the call applies to (retrying a running job, ...).
    #[error(
        "job {job} is {}: cancel applies to unfinished jobs, retry to dead or cancelled ones, \
         discard and purge to finished ones",
        state.name()
    )]
    WrongJobState {
        /// The job.
        job: JobId,
        /// Where it stands.
        state: JobState,
    },
    /// Other caps are in force for the queue (set by another worker, or by
    /// [`Node::configure_queue`](crate::Node::configure_queue)).
    #[error("queue {queue} has other caps in force: {existing:?}")]
    QueueCapsConflict {
        /// The queue.
        queue: Key,
        /// The caps in force.
        existing: QueueCaps,
    },
    /// The state machine refused the command for a reason not listed above.
    #[error("refused: {0}")]
    Rejected(Rejection),
}
