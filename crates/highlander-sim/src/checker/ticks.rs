//! The invariants of schedules: what the checker promises about ticks.
//!
//! 6. a scheduled (or caught-up) tick is fired once: every run of it belongs to one fire (one
//!    run id), and a fire's runs have strictly increasing attempts, never two at once;
//! 7. a tick never starts before its nominal time, in true time (not the node's clock);
//! 8. fires of scheduled ticks come in tick order: a later fire never has an earlier tick;
//! 9. a tick runs only under a running ownership of its key (slot 0, same node and token),
//!    and stops when that ownership stops.

use super::{At, Ctx, ViolationKind};
use crate::checker::Violation;
use highlander_core::{NodeId, TickOrigin, Token};
use std::collections::BTreeMap;
use std::time::Duration;

/// One run of a tick, as the checker saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickRun {
    /// The node that ran it.
    pub node: NodeId,
    /// The ownership's token.
    pub token: Token,
    /// The fire it belongs to.
    pub run: u64,
    /// The tick's nominal time (ms since the Unix epoch).
    pub tick_ms: u64,
    /// Which run of the fire, from 1.
    pub attempt: u32,
    /// Why it ran.
    pub origin: TickOrigin,
    /// When it started, in simulated time since the run began.
    pub started: Duration,
    /// When it started, in true time of day (ms since the Unix epoch).
    pub started_ms: u64,
    /// When it stopped, if it has.
    pub stopped: Option<Duration>,
}

/// What the checker remembers about one schedule key.
#[derive(Debug, Default)]
pub(super) struct TickHistory {
    /// Every run, in start order.
    pub(super) runs: Vec<TickRun>,
    /// The tick and origin of each fire (run id).
    fires: BTreeMap<u64, (u64, TickOrigin)>,
    /// The fire of each scheduled or caught-up tick.
    by_tick: BTreeMap<u64, u64>,
    /// The highest attempt started per fire.
    attempts: BTreeMap<u64, u32>,
}

fn scheduled(origin: TickOrigin) -> bool {
    matches!(origin, TickOrigin::Scheduled | TickOrigin::CatchUp)
}

impl TickHistory {
    /// Invariants 6 to 9 for a start. `owner_runs` says whether `node` runs the key's slot 0
    /// with `token` now.
    pub(super) fn started(
        &mut self,
        ctx: &Ctx<'_>,
        run: TickRun,
        owner_runs: bool,
    ) -> Vec<Violation> {
        let mut found = Vec::new();
        let (node, tick) = (run.node, run.tick_ms);
        let report = |kind, nodes: &[NodeId], earlier, detail: String| {
            ctx.report(kind, Some(0), nodes, earlier, detail)
        };
        if !owner_runs {
            found.push(report(
                ViolationKind::TickWithoutOwnership,
                &[node],
                None,
                format!("{node} ran tick {} under {}, which it does not run", ms(tick), run.token),
            ));
        }
        if scheduled(run.origin) && run.started_ms < tick {
            found.push(report(
                ViolationKind::TickEarly,
                &[node],
                None,
                format!(
                    "{node} started tick {} {} ms before it (true time)",
                    ms(tick),
                    tick - run.started_ms
                ),
            ));
        }
        if let Some(other) = self.runs.iter().find(|r| r.run == run.run && r.stopped.is_none()) {
            found.push(report(
                ViolationKind::TickFiredTwice,
                &[node, other.node],
                Some(other.started),
                format!(
                    "{node} started fire {} (tick {}) attempt {} while {} runs attempt {} (started at {})",
                    run.run,
                    ms(tick),
                    run.attempt,
                    other.node,
                    other.attempt,
                    At(other.started)
                ),
            ));
        }
        if let Some(&high) = self.attempts.get(&run.run)
            && run.attempt <= high
        {
            found.push(report(
                ViolationKind::TickFiredTwice,
                &[node],
                None,
                format!(
                    "{node} started fire {} (tick {}) as attempt {}, but attempt {high} ran before",
                    run.run,
                    ms(tick),
                    run.attempt
                ),
            ));
        }
        if scheduled(run.origin) {
            if let Some(&fire) = self.by_tick.get(&tick)
                && fire != run.run
            {
                found.push(report(
                    ViolationKind::TickFiredTwice,
                    &[node],
                    None,
                    format!(
                        "tick {} was fired twice: as fire {fire} and as fire {}",
                        ms(tick),
                        run.run
                    ),
                ));
            }
            let before = self.fires.range(..run.run).rfind(|(_, (_, o))| scheduled(*o));
            let after = self.fires.range(run.run + 1..).find(|(_, (_, o))| scheduled(*o));
            if let Some((r, (t, _))) = before.filter(|(_, (t, _))| *t >= tick) {
                found.push(report(
                    ViolationKind::TicksOutOfOrder,
                    &[node],
                    None,
                    format!(
                        "fire {} has tick {}, not after fire {r}'s tick {}",
                        run.run,
                        ms(tick),
                        ms(*t)
                    ),
                ));
            }
            if let Some((r, (t, _))) = after.filter(|(_, (t, _))| *t <= tick) {
                found.push(report(
                    ViolationKind::TicksOutOfOrder,
                    &[node],
                    None,
                    format!(
                        "fire {} has tick {}, not before fire {r}'s tick {}",
                        run.run,
                        ms(tick),
                        ms(*t)
                    ),
                ));
            }
            self.by_tick.entry(tick).or_insert(run.run);
        }
        self.fires.entry(run.run).or_insert((tick, run.origin));
        let high = self.attempts.entry(run.run).or_insert(0);
        *high = (*high).max(run.attempt);
        self.runs.push(run);
        found
    }

    /// A run stopped. A stop for a run already closed by its ownership's stop is expected
    /// (its task is dropped after it was aborted) and ignored.
    pub(super) fn stopped(&mut self, at: Duration, node: NodeId, token: Token, run: u64) {
        if let Some(r) = self
            .runs
            .iter_mut()
            .rev()
            .find(|r| r.node == node && r.token == token && r.run == run && r.stopped.is_none())
        {
            r.stopped = Some(at);
        }
    }

    /// The ownership (node, token) stopped: its runs stop with it (they were aborted with
    /// its task, and execute nothing after).
    pub(super) fn ownership_stopped(&mut self, at: Duration, node: NodeId, token: Token) {
        for r in self.runs.iter_mut().filter(|r| r.node == node && r.token == token) {
            r.stopped.get_or_insert(at);
        }
    }
}

/// An instant in ms since the epoch, as UTC.
fn ms(t: u64) -> String {
    highlander_core::schedule::format_utc(t)
}
