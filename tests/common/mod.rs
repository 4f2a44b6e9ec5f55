//! Shared helpers for the simulator scenarios.
#![allow(dead_code)]

use highlander::core::BoxFuture;
use highlander::{Key, NodeId, Seq, TaskContext, Token};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// One thing a handler did, stamped with simulated time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Started { node: NodeId, key: Key, token: Token, at: Instant },
    Message { node: NodeId, key: Key, token: Token, seq: Seq, payload: Vec<u8>, at: Instant },
}

/// What the test's handlers did, in order.
#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<Entry>>>);

impl Journal {
    pub fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap().clone()
    }

    fn push(&self, e: Entry) {
        self.0.lock().unwrap().push(e);
    }

    /// Starts of `key`'s task: (node, token, instant).
    pub fn starts(&self, key: &str) -> Vec<(NodeId, Token, Instant)> {
        self.entries()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Started { node, key: k, token, at } if k.as_str() == key => {
                    Some((node, token, at))
                }
                _ => None,
            })
            .collect()
    }

    /// Payloads delivered for `key`, in delivery order (redeliveries included).
    pub fn payloads(&self, key: &str) -> Vec<Vec<u8>> {
        self.entries()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Message { key: k, payload, .. } if k.as_str() == key => Some(payload),
                _ => None,
            })
            .collect()
    }

    /// A handler that records its start and every message it takes, until cancelled.
    pub fn consumer(
        &self,
    ) -> impl Fn(TaskContext) -> BoxFuture<'static, ()> + Send + Sync + 'static {
        let journal = self.clone();
        move |mut ctx: TaskContext| {
            let journal = journal.clone();
            Box::pin(async move {
                journal.push(Entry::Started {
                    node: ctx.node_id(),
                    key: ctx.key().clone(),
                    token: ctx.token(),
                    at: Instant::now(),
                });
                while let Some(m) = ctx.recv().await {
                    journal.push(Entry::Message {
                        node: ctx.node_id(),
                        key: ctx.key().clone(),
                        token: ctx.token(),
                        seq: m.seq,
                        payload: m.payload.as_bytes().to_vec(),
                        at: Instant::now(),
                    });
                }
            })
        }
    }
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl Journal {
    /// A handler that records its start and then ignores cancellation, so only the
    /// supervisor's abort at the lease deadline can stop it.
    pub fn stubborn(
        &self,
    ) -> impl Fn(TaskContext) -> BoxFuture<'static, ()> + Send + Sync + 'static {
        let journal = self.clone();
        move |ctx: TaskContext| {
            let journal = journal.clone();
            Box::pin(async move {
                journal.push(Entry::Started {
                    node: ctx.node_id(),
                    key: ctx.key().clone(),
                    token: ctx.token(),
                    at: Instant::now(),
                });
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        }
    }
}
