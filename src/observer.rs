//! A hook that sees what a node's tasks do, for simulators and invariant checkers.

use highlander_core::{Key, NodeId, Payload, Seq, Token};

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
}
