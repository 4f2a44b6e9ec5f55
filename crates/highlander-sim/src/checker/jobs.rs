//! Invariants 10 to 13, of the job queues:
//!
//! 10. a job runs on at most one node at a time (one handler call holds it);
//! 11. each run of a job holds a larger claim token than the job's earlier runs;
//! 12. a queue's caps hold at every instant: no more running jobs than its global cap, no
//!     more of one partition key than its per-partition cap (for caps the test declares);
//! 13. at the end of a run, after faults stopped, every acknowledged enqueue has finished
//!     (completed, dead or cancelled): none is lost
//!     ([`InvariantChecker::check_jobs_finished`](super::InvariantChecker::check_jobs_finished)).

use super::{Ctx, ViolationKind};
use crate::checker::Violation;
use highlander_core::{JobId, Key, NodeId, QueueCaps, Token};
use std::collections::BTreeMap;
use std::time::Duration;

/// One run of a job, as the checker saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRun {
    /// The node running it.
    pub node: NodeId,
    /// Its claim token.
    pub token: Token,
    /// When it started.
    pub started: Duration,
    /// When it stopped, if it has.
    pub stopped: Option<Duration>,
}

#[derive(Debug, Default)]
pub(super) struct JobHistory {
    pub(super) queue: Option<Key>,
    pub(super) partition: Option<String>,
    pub(super) runs: Vec<JobRun>,
}

/// What the checker knows of jobs.
#[derive(Debug, Default)]
pub(super) struct Jobs {
    pub(super) jobs: BTreeMap<JobId, JobHistory>,
    pub(super) caps: BTreeMap<Key, QueueCaps>,
    /// Acknowledged enqueues: job, node, queue, instant.
    pub(super) enqueued: BTreeMap<JobId, (NodeId, Key, Duration)>,
}

impl Jobs {
    pub(super) fn enqueued(&mut self, at: Duration, from: NodeId, queue: Key, job: JobId) {
        self.enqueued.insert(job, (from, queue, at));
    }

    fn active(&self, queue: &Key) -> impl Iterator<Item = (&JobId, &JobHistory)> {
        self.jobs.iter().filter(move |(_, h)| {
            h.queue.as_ref() == Some(queue) && h.runs.last().is_some_and(|r| r.stopped.is_none())
        })
    }

    pub(super) fn started(
        &mut self,
        ctx: &Ctx<'_>,
        node: NodeId,
        job: JobId,
        token: Token,
        partition: Option<String>,
    ) -> Vec<Violation> {
        let mut found = Vec::new();
        let h = self.jobs.entry(job).or_default();
        h.queue = Some(ctx.key.clone());
        h.partition = partition;
        if let Some(r) = h.runs.last() {
            if r.stopped.is_none() {
                found.push(ctx.report(
                    ViolationKind::JobRunTwice,
                    None,
                    &[node, r.node],
                    Some(r.started),
                    format!(
                        "{job} started with {token} while {} runs it with {} since {}",
                        r.node,
                        r.token,
                        super::At(r.started)
                    ),
                ));
            }
            if let Some(top) = h.runs.iter().map(|r| r.token).max()
                && token <= top
            {
                found.push(ctx.report(
                    ViolationKind::JobTokenNotIncreasing,
                    None,
                    &[node],
                    None,
                    format!("{job} started with {token}, not above its earlier run's {top}"),
                ));
            }
        }
        h.runs.push(JobRun { node, token, started: ctx.at, stopped: None });
        if let Some(caps) = self.caps.get(ctx.key).copied() {
            let running: Vec<(&JobId, &JobHistory)> = self.active(ctx.key).collect();
            if let Some(cap) = caps.global
                && running.len() as u64 > u64::from(cap)
            {
                found.push(ctx.report(
                    ViolationKind::JobCapExceeded,
                    None,
                    &[node],
                    None,
                    format!(
                        "{} jobs of the queue run at once, above its cap of {cap}",
                        running.len()
                    ),
                ));
            }
            let partition = self.jobs.get(&job).and_then(|h| h.partition.clone());
            if let (Some(cap), Some(p)) = (caps.per_partition, partition) {
                let same = running.iter().filter(|(_, h)| h.partition.as_ref() == Some(&p)).count();
                if same as u64 > u64::from(cap) {
                    found.push(ctx.report(
                        ViolationKind::JobCapExceeded,
                        None,
                        &[node],
                        None,
                        format!(
                            "{same} jobs of partition {p:?} run at once, above its cap of {cap}"
                        ),
                    ));
                }
            }
        }
        found
    }

    pub(super) fn stopped(
        &mut self,
        ctx: &Ctx<'_>,
        node: NodeId,
        job: JobId,
        token: Token,
    ) -> Vec<Violation> {
        let run = self
            .jobs
            .get_mut(&job)
            .and_then(|h| h.runs.iter_mut().rev().find(|r| r.token == token && r.node == node));
        match run {
            Some(r) if r.stopped.is_none() => {
                r.stopped = Some(ctx.at);
                Vec::new()
            }
            _ => vec![ctx.report(
                ViolationKind::StopWithoutStart,
                None,
                &[node],
                None,
                format!("{job} stopped with {token}, which does not run it"),
            )],
        }
    }
}
