//! The sans-IO heart of highlander.
//!
//! This crate holds everything about a highlander cluster that can be decided without
//! touching the world: the replicated state of sessions, keys, owners, message queues and
//! the job table ([`ClusterState`], [`state::JobTable`]) and the deterministic [`ClusterState::apply`] that every replica runs on
//! the same commands; when a schedule's ticks fall ([`schedule`], with cron expressions and
//! time zones); the leader's liveness table ([`LeaseTable`]) and its assignment policy
//! ([`plan`]); the messages nodes exchange ([`wire`]) and the one codec that encodes them
//! ([`codec`]); and the [`Transport`] trait a network implements.
//!
//! It never opens a socket or a file, never spawns a task and never reads a clock: time
//! enters only as data ([`Millis`]) passed in by the caller. That makes every function here
//! deterministic, cheap to test, and safe to fuzz. The runtime that drives it lives in the
//! `highlander` crate.

#![warn(missing_docs)]

pub mod codec;
mod command;
mod ids;
mod key;
mod lease;
mod limits;
mod payload;
mod plan;
pub mod schedule;
pub mod state;
mod transport;
pub mod wire;

pub use command::{
    Batch, Command, JobAction, JobSpec, JobState, KeyKind, KeySpec, LeaseTerms, MAX_JOB_PRIORITY,
    MAX_JOB_TAG_BYTES, MAX_SLOTS, Message, Outcome, Owner, QueueCaps, Rejection,
};
pub use ids::{ClientId, JobId, Millis, NodeId, RequestId, Seq, SessionId, Token};
pub use key::{IntoKey, Key, KeyError, MAX_KEY_BYTES};
pub use lease::LeaseTable;
pub use limits::{Limits, LimitsError, MAX_PAYLOAD_LIMIT};
pub use payload::Payload;
pub use plan::{
    MAX_ASSIGNS_PER_PLAN, MAX_MOVES_PER_PLAN, plan, plan_with, rendezvous, spread_settled,
};
pub use schedule::{
    CatchUp, CatchUpPlan, Delivery, Overlap, ScheduleAction, ScheduleError, ScheduleSpec,
    TickOrigin, TickResult, Ticks, Trigger, tzdb_version,
};
pub use state::ClusterState;
pub use transport::{BoxFuture, RequestHandler, Transport, TransportError};
