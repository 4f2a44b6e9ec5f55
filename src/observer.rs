//! A hook that sees what a node's tasks do, for simulators and invariant checkers.

use highlander_core::{JobId, Key, NodeId, Payload, Seq, TickOrigin, Token};

/// Receives a node's task events as they happen. The simulator's invariant checker is one;
/// production code rarely needs one (use `tracing` instead).
///
/// Calls are made synchronously from the node's runtime, so they must be quick and must not
/// block; the instant of an event is the instant of the call.
pub trait Observer: Send + Sync + 'static {
    /// A task for `key`'s `slot` with fencing token `token` is about to run its first poll.
    fn task_started(&self, node: NodeId, key: &Key, slot: u32, token: Token) {
        let _ = (node, key, slot, token);
    }

    /// This node began leading Raft term `term`: it won an election. A hint for checkers of
    /// election stability; a leader's authority never rests on it (every lease it grants is
    /// confirmed by a quorum).
    fn leader_elected(&self, node: NodeId, term: u64) {
        let _ = (node, term);
    }

    /// The task has stopped: it returned, panicked, was aborted, or its node was killed.
    /// No code of the task runs after this call.
    fn task_stopped(&self, node: NodeId, key: &Key, slot: u32, token: Token) {
        let _ = (node, key, slot, token);
    }

    /// The task took a message from its inbox.
    fn message_delivered(
        &self,
        node: NodeId,
        key: &Key,
        token: Token,
        seq: Seq,
        payload: &Payload,
    ) {
        let _ = (node, key, token, seq, payload);
    }

    /// A run of a schedule's tick is about to run its first poll, under the ownership with
    /// `token`: nominal time `tick_ms`, run id `run` (one per fire), `attempt` from 1.
    #[allow(clippy::too_many_arguments)]
    fn tick_started(
        &self,
        node: NodeId,
        key: &Key,
        token: Token,
        run: u64,
        tick_ms: u64,
        attempt: u32,
        origin: TickOrigin,
    ) {
        let _ = (node, key, token, run, tick_ms, attempt, origin);
    }

    /// The run has stopped (returned, panicked, was aborted, or its node was killed).
    fn tick_stopped(&self, node: NodeId, key: &Key, token: Token, run: u64) {
        let _ = (node, key, token, run);
    }

    /// A job's handler is about to run its first poll, on `node`, under the claim with
    /// `token`. `partition` is the job's partition key.
    fn job_started(
        &self,
        node: NodeId,
        queue: &Key,
        job: JobId,
        token: Token,
        partition: Option<&str>,
    ) {
        let _ = (node, queue, job, token, partition);
    }

    /// The handler has stopped (returned, was aborted, or its node was killed). No code of
    /// it runs after this call.
    fn job_stopped(&self, node: NodeId, queue: &Key, job: JobId, token: Token) {
        let _ = (node, queue, job, token);
    }
}
