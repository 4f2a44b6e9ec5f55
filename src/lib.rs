//! highlander turns your application's own processes into a cluster and runs **singleton
//! tasks** on it: named work that runs on exactly one node at a time (or on exactly N), moves
//! to another node when its owner dies, and receives messages sent to its name from any node,
//! durably and in order.
//!
//! The nodes form their own Raft group (openraft) from a static peer list; there is no Redis,
//! Postgres or etcd beside them. Every ownership carries a fencing token that strictly
//! increases per key. The replicated state and the assignment policy live in the sans-IO
//! `highlander-core` crate; this crate is the runtime that drives them: the Raft glue, the
//! session keeper, the leader's duties, the task supervisor, the schedule runners, the job
//! workers and the batching proposer.
//!
//! It never reads the wall clock for leases (only `tokio::time`, which a simulator pauses)
//! and never opens a socket itself: the network is a [`Transport`] you pass in —
//! `highlander-sim` provides a simulated one for tests.
//!
//! # Guarantees and their assumption
//!
//! - A key slot never has two running owners at the same instant, assuming only that clock
//!   rates drift by less than [`Timing::lease_margin`] over a session TTL (2.5 % by default).
//!   Network delays, partitions, crashes and leader changes do not break it.
//! - A message whose [`Node::send`] returned is delivered at least once, in per-key order,
//!   to the key's owner, across owner crashes and leader changes.
//! - Crash failover takes about the session TTL (2 s by default); a graceful
//!   [`Node::shutdown`] hands keys over in milliseconds.
//! - A schedule's tick ([`Node::cron`], [`Node::every`]) is fired at most once across the
//!   cluster and never before its time on the cluster's clock (the median of the nodes' wall
//!   clocks); its run is at-least-once by default. Schedules are the one feature that reads
//!   the time of day, and they need a majority of clocks synchronised (NTP).
//! - A job enqueued with [`Node::enqueue`] runs at least once on a worker of its queue
//!   ([`Node::worker`]) until it completes, dies after its attempts or is cancelled; one
//!   attempt runs at a time, under a claim token that only grows and that its completion
//!   must carry. A dead worker's jobs are claimable again when its session expires (about
//!   the TTL), never while it lives.
//!
//! # A tour
//!
//! ```no_run
//! use highlander::{Node, Timing};
//! # async fn demo(transport: impl highlander::Transport) -> Result<(), highlander::Error> {
//! let node = Node::builder()
//!     .id(1)
//!     .peers([1, 2, 3])
//!     .transport(transport)
//!     .timing(Timing::default())
//!     .start()
//!     .await?;
//! node.singleton("irc:#rust", |mut ctx| async move {
//!     while let Some(m) = ctx.recv().await {
//!         if !ctx.still_owner() { break; }
//!         println!("token {} got message {}", ctx.token(), m.seq);
//!     }
//! })
//! .await?;
//! let seq = node.send("irc:#rust", "hello").await?;
//! println!("queued as {seq}; owners: {:?}", node.status().keys);
//! node.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod clock;
mod config;
mod error;
mod file_config;
mod inspect;
mod jobs;
mod leader;
mod membership;
mod node;
mod observer;
mod proposer;
mod raft;
mod schedule;
mod session;
mod supervisor;
mod task;
mod watchdog;

pub use clock::{SystemClock, WallClock};
pub use config::{DEFAULT_MAX_VOTERS, Timing, TimingError, voters_warning};
pub use error::{ConfigError, Error};
pub use file_config::NodeConfig;
pub use highlander_core::wire::ScheduleReport;
pub use highlander_core::wire::{JobReport, QueueReport};
pub use highlander_core::wire::{
    KeyQuery, KeyReport, KeySummary, MemberReport, MembershipReport, NetworkReport, OverrunReport,
    OwnerReport, Phase, SessionReport, StatusReport,
};
pub use highlander_core::{
    CatchUp, Delivery, IntoKey, Key, KeyError, KeyKind, KeySpec, Limits, Message, NodeId, Overlap,
    Payload, Rejection, ScheduleError, ScheduleSpec, Seq, SessionId, TickOrigin, Token, Transport,
    TransportError, Trigger,
};
pub use highlander_core::{JobAction, JobId, JobSpec, JobState, Outcome, QueueCaps};
pub use inspect::{DataDirReport, DumpedEntry, dump_data_dir, verify_data_dir};
pub use jobs::{
    Backoff, DEFAULT_JOB_TIMEOUT, EnqueueOptions, JobContext, JobFailure, JobOutput, JobResult,
    WorkerOptions, default_backoff, encode_bincode, encode_json,
};
pub use node::{Node, NodeBuilder};
pub use observer::Observer;
pub use raft::store::{DiskStorage, MemStorage, Storage};
pub use schedule::{MISFIRE_GRACE, ScheduleOptions, TickContext};
pub use task::{RestartPolicy, TaskContext, TaskOptions, TaskResult};
pub use watchdog::FAIL_STOP_EXIT_CODE;

/// The sans-IO core, for transports and tools that speak the wire protocol.
pub use highlander_core as core;
/// The QUIC transport with mutual TLS, for production clusters.
pub use highlander_quic as quic;
/// The write-ahead log and snapshot files (and the file-system seam under them).
pub use highlander_wal as wal;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Decodes bytes as every Raft payload a node accepts from peers.
    pub fn raft_payloads(bytes: &[u8]) {
        crate::raft::decode_raft_payloads(bytes);
    }
}

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
