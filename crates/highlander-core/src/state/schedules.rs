//! Schedules in the replicated state: each schedule key's high-water mark, its pending ticks
//! and its history, and the `apply` arms of the schedule commands.
//!
//! A tick is fired by the owner of the schedule's one slot with its token, accepted only
//! above the high-water mark and not after the entry's stamp, and recorded as pending in the
//! same step: de-duplication and enqueueing are one state change. A pending tick survives
//! its owner: when the slot is vacated a run in progress counts as interrupted, and the next
//! owner runs the tick again if the delivery policy allows another attempt.
//!
//! Nothing here computes a tick (no time zones, no cron): the owner does, with the same
//! spec and the same bundled database as every other candidate. The state machine only
//! compares integers, so every replica decides the same whatever binary it runs.

use super::ClusterState;
use crate::command::{KeySpec, Outcome, Rejection};
use crate::schedule::{
    Delivery, MAX_REPLAY, Overlap, ScheduleAction, ScheduleSpec, TickOrigin, TickResult,
};
use crate::{Key, NodeId, RequestId, SessionId, Token};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// How many finished (or skipped) fires a schedule remembers.
pub const RECENT_FIRES: usize = 10;
/// The most ticks a schedule may have pending (fired and not finished).
pub const MAX_PENDING: usize = 128;
/// The longest error text a failed run records.
pub const MAX_ERROR_BYTES: usize = 256;

/// A schedule's replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleState {
    /// The schedule every candidate registered.
    pub spec: ScheduleSpec,
    /// The time-zone database its candidates compute ticks with, when its ticks depend on
    /// one ([`ScheduleSpec::needs_tzdb`]).
    pub tzdb: Option<String>,
    /// Ticks at or before this instant are owed to nobody: when the schedule was created,
    /// or last resumed.
    pub floor_ms: u64,
    /// The high-water mark: the newest tick fired (or skipped by the overlap policy).
    pub last_fired: Option<u64>,
    /// Whether it is paused.
    pub paused: bool,
    /// The run id the next pending tick gets.
    pub next_run: u64,
    /// Ticks fired and not finished, by run id (in firing order).
    pub pending: BTreeMap<u64, PendingTick>,
    /// What has happened to its ticks so far.
    pub counts: ScheduleCounts,
    /// The last [`RECENT_FIRES`] fires that finished or were skipped, oldest first.
    pub recent: VecDeque<FireRecord>,
}

/// A tick fired and not finished: waiting for its turn, or running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTick {
    /// Its nominal time.
    pub tick_ms: u64,
    /// Why it runs.
    pub origin: TickOrigin,
    /// The cluster's time of day when it was fired.
    pub fired_ms: u64,
    /// Runs started so far (a run cut short by a failure is followed by another while the
    /// delivery policy allows).
    pub attempts: u32,
    /// The run in progress, if any.
    pub running: Option<TickRun>,
}

/// A run in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRun {
    /// The node running it.
    pub node: NodeId,
    /// Its ownership's token.
    pub token: Token,
    /// When it started (the owner's view of the cluster's time of day).
    pub start_ms: u64,
}

/// Counters of a schedule's ticks since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleCounts {
    /// Ticks fired (including those the overlap policy skipped).
    pub fired: u64,
    /// Ticks that fell due while nobody could fire them and that the catch-up policy did not
    /// fire.
    pub missed: u64,
    /// Ticks skipped because earlier ones had not finished.
    pub overlap_skipped: u64,
    /// Runs that returned successfully.
    pub done: u64,
    /// Runs that returned an error or panicked.
    pub failed: u64,
    /// Runs (or waiting ticks) cancelled by a newer tick or by their owner.
    pub cancelled: u64,
    /// Ticks dropped after a failure cut their run short and the delivery policy allowed no
    /// further attempt.
    pub interrupted: u64,
    /// Runs that were second or later attempts of their tick.
    pub reruns: u64,
}

/// How one fire ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FireOutcome {
    /// The run returned successfully.
    Done,
    /// The run returned an error or panicked.
    Failed(String),
    /// Cancelled by a newer tick (overlap `CancelOther`) or by its owner.
    Cancelled,
    /// A failure cut its last allowed run short.
    Interrupted,
    /// The overlap policy skipped it: earlier ticks had not finished.
    SkippedOverlap,
}

/// One fire in a schedule's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FireRecord {
    /// The pending tick's run id (`None` for a skipped tick).
    pub run: Option<u64>,
    /// The nominal tick.
    pub tick_ms: u64,
    /// Why it ran.
    pub origin: TickOrigin,
    /// The node and token of its last run, if it ran.
    pub ran: Option<(NodeId, Token)>,
    /// Runs started.
    pub attempts: u32,
    /// How it ended.
    pub outcome: FireOutcome,
    /// When its last run started.
    pub start_ms: Option<u64>,
    /// When it ended.
    pub end_ms: Option<u64>,
}

impl FireRecord {
    /// How late its last run started after its nominal time, in milliseconds (negative
    /// would mean early, which the state machine does not let happen).
    pub fn lateness_ms(&self) -> Option<i64> {
        self.start_ms.map(|s| s as i64 - self.tick_ms as i64)
    }
}

impl ScheduleState {
    fn new(spec: ScheduleSpec, tzdb: Option<String>, now_ms: u64) -> ScheduleState {
        ScheduleState {
            paused: spec.paused,
            spec,
            tzdb,
            floor_ms: now_ms,
            last_fired: None,
            next_run: 1,
            pending: BTreeMap::new(),
            counts: ScheduleCounts::default(),
            recent: VecDeque::new(),
        }
    }

    /// Ticks after this instant are owed: the high-water mark, or the floor.
    pub fn mark_ms(&self) -> u64 {
        self.last_fired.unwrap_or(0).max(self.floor_ms)
    }

    /// How many runs may go at once.
    pub fn concurrency(&self) -> usize {
        match self.spec.overlap {
            Overlap::AllowAll { max } => max as usize,
            _ => 1,
        }
    }

    /// Runs in progress.
    pub fn running(&self) -> usize {
        self.pending.values().filter(|p| p.running.is_some()).count()
    }

    fn record(&mut self, record: FireRecord) {
        match &record.outcome {
            FireOutcome::Done => self.counts.done += 1,
            FireOutcome::Failed(_) => self.counts.failed += 1,
            FireOutcome::Cancelled => self.counts.cancelled += 1,
            FireOutcome::Interrupted => self.counts.interrupted += 1,
            FireOutcome::SkippedOverlap => self.counts.overlap_skipped += 1,
        }
        if self.recent.len() == RECENT_FIRES {
            self.recent.pop_front();
        }
        self.recent.push_back(record);
    }

    fn finish(&mut self, run: u64, outcome: FireOutcome, end_ms: Option<u64>) {
        let Some(p) = self.pending.remove(&run) else { return };
        let ran = p.running.map(|r| (r.node, r.token));
        self.record(FireRecord {
            run: Some(run),
            tick_ms: p.tick_ms,
            origin: p.origin,
            ran,
            attempts: p.attempts,
            outcome,
            start_ms: p.running.map(|r| r.start_ms),
            end_ms,
        });
    }

    fn add_pending(&mut self, tick_ms: u64, origin: TickOrigin, fired_ms: u64) -> u64 {
        let run = self.next_run;
        self.next_run += 1;
        self.pending
            .insert(run, PendingTick { tick_ms, origin, fired_ms, attempts: 0, running: None });
        run
    }

    /// The slot's owner is gone: a run it had in progress was cut short. The tick stays
    /// pending for the next owner if the delivery policy allows another attempt; otherwise
    /// it is dropped as interrupted.
    /// Takes a new spec (a redeploy changed it while nobody ran the schedule). Runs owed
    /// again whose attempts the new delivery policy no longer allows are dropped as
    /// interrupted; the mark, counters and history stay.
    fn respecify(&mut self, spec: ScheduleSpec, tzdb: Option<String>) {
        self.spec = spec;
        self.tzdb = tzdb;
        let max = self.spec.delivery.max_attempts();
        let spent: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.attempts >= max).map(|(run, _)| *run).collect();
        for run in spent {
            self.finish(run, FireOutcome::Interrupted, None);
        }
    }

    pub(super) fn owner_gone(&mut self) {
        let max = self.spec.delivery.max_attempts();
        let cut: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.running.is_some()).map(|(run, _)| *run).collect();
        for run in cut {
            let exhausted = self.pending.get(&run).is_some_and(|p| p.attempts >= max);
            if exhausted {
                self.finish(run, FireOutcome::Interrupted, None);
            } else if let Some(p) = self.pending.get_mut(&run) {
                // Kept for a re-run; when the cut run started stays in its record.
                p.running = None;
            }
        }
    }
}

/// Shortens an error text to [`MAX_ERROR_BYTES`] on a character boundary.
pub(crate) fn shorten(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl ClusterState {
    /// The schedule of `key`, if it is one.
    pub fn schedule(&self, key: &Key) -> Option<&ScheduleState> {
        self.keys.get(key)?.schedule.as_deref()
    }

    pub(super) fn register_schedule(
        &mut self,
        session: SessionId,
        key: &Key,
        spec: &ScheduleSpec,
        epoch: u64,
        tzdb: &str,
    ) -> Outcome {
        if let Err(e) = spec.check_shape() {
            return Outcome::Rejected(Rejection::InvalidSchedule(e.to_string()));
        }
        let Some(now) = self.entry_stamp else { return Outcome::Rejected(Rejection::Unstamped) };
        if !self.sessions.contains_key(&session) {
            return Outcome::Rejected(Rejection::NoSuchSession);
        }
        let tzdb = spec.needs_tzdb().then(|| tzdb.to_string());
        match self.keys.get_mut(key) {
            Some(k) => {
                let idle = k.candidates.is_empty();
                match &mut k.schedule {
                    // Another kind of key: its messages (all that can be left of it when
                    // nobody runs it) are kept, and a schedule takes none.
                    None => {
                        return Outcome::Rejected(Rejection::SpecConflict { existing: k.spec });
                    }
                    // A schedule nobody runs any more (every process that ran it is gone,
                    // say a redeploy): the new spec and database take over; the mark,
                    // counters and history stay, so no tick fires twice.
                    Some(s) if idle => s.respecify(spec.clone(), tzdb),
                    Some(s) => {
                        if !same_schedule(&s.spec, spec) {
                            return Outcome::Rejected(Rejection::ScheduleConflict {
                                existing: Box::new(s.spec.clone()),
                            });
                        }
                        if let Some(in_force) = &s.tzdb
                            && Some(in_force) != tzdb.as_ref()
                        {
                            return Outcome::Rejected(Rejection::TzdbMismatch {
                                in_force: in_force.clone(),
                            });
                        }
                    }
                }
                k.candidates.insert(session);
            }
            None => {
                let schedule = ScheduleState::new(spec.clone(), tzdb, now);
                self.insert_key(key, KeySpec::schedule(), session, Some(schedule));
            }
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            let in_force = s.keys.entry(key.clone()).or_insert(epoch);
            *in_force = (*in_force).max(epoch);
        }
        Outcome::Registered
    }

    /// The slot-0 owner's token and the schedule of `key`, or why there is none.
    fn owned_schedule(
        &mut self,
        key: &Key,
        token: Token,
    ) -> Result<(NodeId, &mut ScheduleState), Rejection> {
        let k = self.keys.get_mut(key).ok_or(Rejection::NoSuchKey)?;
        let owner = match k.slots.first() {
            Some(Some(o)) if o.token == token => *o,
            _ => return Err(Rejection::StaleToken),
        };
        let node =
            self.sessions.get(&owner.session).map(|s| s.node()).ok_or(Rejection::StaleToken)?;
        let s = k.schedule.as_mut().ok_or(Rejection::NotASchedule)?;
        Ok((node, s))
    }

    pub(super) fn fire(
        &mut self,
        key: &Key,
        token: Token,
        tick_ms: u64,
        origin: TickOrigin,
        missed: u64,
        start_ms: Option<u64>,
    ) -> Outcome {
        let Some(now) = self.entry_stamp else { return Outcome::Rejected(Rejection::Unstamped) };
        if !matches!(origin, TickOrigin::Scheduled | TickOrigin::CatchUp) {
            return Outcome::Rejected(Rejection::InvalidSchedule(
                "a fire is scheduled or a catch-up; triggers and backfills are operator actions"
                    .into(),
            ));
        }
        let (node, s) = match self.due_tick(key, token, tick_ms, now) {
            Ok(x) => x,
            Err(r) => return Outcome::Rejected(r),
        };
        s.last_fired = Some(tick_ms);
        s.counts.fired += 1;
        s.counts.missed = s.counts.missed.saturating_add(missed);
        let limit = match (origin, s.spec.overlap) {
            (_, Overlap::CancelOther) => {
                let others: Vec<u64> = s.pending.keys().copied().collect();
                for run in others {
                    s.finish(run, FireOutcome::Cancelled, Some(now));
                }
                MAX_PENDING
            }
            // Replays queue behind what is pending, whatever the overlap policy.
            (TickOrigin::CatchUp, _) => MAX_PENDING,
            (_, Overlap::Skip) => 1,
            (_, Overlap::BufferOne) => 2,
            (_, Overlap::AllowAll { max }) => max as usize,
        };
        if s.pending.len() >= limit.min(MAX_PENDING) {
            s.record(FireRecord {
                run: None,
                tick_ms,
                origin,
                ran: None,
                attempts: 0,
                outcome: FireOutcome::SkippedOverlap,
                start_ms: None,
                end_ms: None,
            });
            return Outcome::Fired { run: None, started: false };
        }
        let run = s.add_pending(tick_ms, origin, now);
        let started = match start_ms {
            Some(start_ms) if s.running() < s.concurrency() => {
                if let Some(p) = s.pending.get_mut(&run) {
                    p.attempts = 1;
                    p.running = Some(TickRun { node, token, start_ms });
                }
                true
            }
            _ => false,
        };
        Outcome::Fired { run: Some(run), started }
    }

    /// The schedule of `key` if `tick_ms` may fire now with `token`: the current owner's
    /// token, not paused, above the mark, not after the entry's stamp, within the bounds.
    fn due_tick(
        &mut self,
        key: &Key,
        token: Token,
        tick_ms: u64,
        now: u64,
    ) -> Result<(NodeId, &mut ScheduleState), Rejection> {
        let (node, s) = self.owned_schedule(key, token)?;
        if s.paused {
            return Err(Rejection::Paused);
        }
        let mark = s.mark_ms();
        if tick_ms <= mark {
            return Err(Rejection::TickNotAfter { last: mark });
        }
        if tick_ms > now {
            return Err(Rejection::TooEarly { tick_ms, cluster_ms: now });
        }
        if s.spec.start_ms.is_some_and(|b| tick_ms < b)
            || s.spec.end_ms.is_some_and(|b| tick_ms > b)
        {
            return Err(Rejection::OutsideBounds);
        }
        Ok((node, s))
    }

    pub(super) fn skip_ticks(
        &mut self,
        key: &Key,
        token: Token,
        upto_ms: u64,
        missed: u64,
    ) -> Outcome {
        let Some(now) = self.entry_stamp else { return Outcome::Rejected(Rejection::Unstamped) };
        let s = match self.due_tick(key, token, upto_ms, now) {
            Ok((_, s)) => s,
            Err(r) => return Outcome::Rejected(r),
        };
        s.last_fired = Some(upto_ms);
        s.counts.missed = s.counts.missed.saturating_add(missed);
        Outcome::TicksSkipped
    }

    pub(super) fn tick_started(
        &mut self,
        key: &Key,
        token: Token,
        run: u64,
        start_ms: u64,
    ) -> Outcome {
        let (node, s) = match self.owned_schedule(key, token) {
            Ok(x) => x,
            Err(r) => return Outcome::Rejected(r),
        };
        // The same start again (a write retried after its answer was lost, and applied
        // twice): the same answer, and no second attempt counted.
        if let Some(p) = s.pending.get(&run)
            && p.running.is_some_and(|r| r.token == token && r.start_ms == start_ms)
        {
            return Outcome::TickStarted { attempt: p.attempts };
        }
        let max = s.spec.delivery.max_attempts();
        let others = s.pending.iter().filter(|(r, p)| **r != run && p.running.is_some()).count();
        if others >= s.concurrency() && s.pending.contains_key(&run) {
            return Outcome::Rejected(Rejection::Busy);
        }
        let Some(p) = s.pending.get_mut(&run) else {
            return Outcome::Rejected(Rejection::NoSuchRun);
        };
        if p.attempts >= max {
            // Started before and cut short (by a restart of the owner's task under the same
            // token): no attempt is left, and the tick is dropped. Not a refusal: the state
            // changes.
            let attempts = p.attempts;
            s.finish(run, FireOutcome::Interrupted, None);
            return Outcome::TickExhausted { attempts };
        }
        p.attempts += 1;
        p.running = Some(TickRun { node, token, start_ms });
        let attempt = p.attempts;
        if attempt > 1 {
            s.counts.reruns += 1;
        }
        Outcome::TickStarted { attempt }
    }

    pub(super) fn tick_done(
        &mut self,
        key: &Key,
        token: Token,
        run: u64,
        result: &TickResult,
        end_ms: u64,
    ) -> Outcome {
        let (_, s) = match self.owned_schedule(key, token) {
            Ok(x) => x,
            Err(r) => return Outcome::Rejected(r),
        };
        if !s.pending.contains_key(&run) {
            return Outcome::Rejected(Rejection::NoSuchRun);
        }
        let outcome = match result {
            TickResult::Done => FireOutcome::Done,
            TickResult::Failed(e) => FireOutcome::Failed(shorten(e)),
            TickResult::Cancelled => FireOutcome::Cancelled,
        };
        s.finish(run, outcome, Some(end_ms));
        Outcome::TickDone
    }

    pub(super) fn schedule_control(
        &mut self,
        key: &Key,
        action: &ScheduleAction,
        request: RequestId,
        floor: u64,
    ) -> Outcome {
        let Some(now) = self.entry_stamp else { return Outcome::Rejected(Rejection::Unstamped) };
        self.deduplicated(request, floor, |state| {
            let Some(k) = state.keys.get_mut(key) else {
                return Outcome::Rejected(Rejection::NoSuchKey);
            };
            let Some(s) = k.schedule.as_mut() else {
                return Outcome::Rejected(Rejection::NotASchedule);
            };
            let mut runs = Vec::new();
            match action {
                ScheduleAction::Pause => s.paused = true,
                ScheduleAction::Resume => {
                    if s.paused {
                        s.paused = false;
                        // What fell due while paused is skipped, not caught up.
                        s.floor_ms = s.floor_ms.max(now);
                    }
                }
                ScheduleAction::Trigger => {
                    if s.pending.len() >= MAX_PENDING {
                        return Outcome::Rejected(Rejection::TooManyPending {
                            max: MAX_PENDING as u32,
                        });
                    }
                    runs.push(s.add_pending(now, TickOrigin::Trigger, now));
                }
                ScheduleAction::Backfill { ticks } => {
                    if ticks.is_empty() || ticks.len() > MAX_REPLAY as usize {
                        return Outcome::Rejected(Rejection::InvalidSchedule(format!(
                            "a backfill runs 1 to {MAX_REPLAY} ticks, not {}",
                            ticks.len()
                        )));
                    }
                    if let Some(&late) = ticks.iter().find(|t| **t > now) {
                        return Outcome::Rejected(Rejection::TooEarly {
                            tick_ms: late,
                            cluster_ms: now,
                        });
                    }
                    if s.pending.len() + ticks.len() > MAX_PENDING {
                        return Outcome::Rejected(Rejection::TooManyPending {
                            max: MAX_PENDING as u32,
                        });
                    }
                    for t in ticks {
                        runs.push(s.add_pending(*t, TickOrigin::Backfill, now));
                    }
                }
            }
            Outcome::ScheduleChanged { runs }
        })
    }

    /// Checks the schedule parts of [`ClusterState::check_consistency`] for one key.
    pub(super) fn check_schedule(&self, key: &Key, s: &ScheduleState) -> Result<(), String> {
        if s.pending.len() > MAX_PENDING {
            return Err(format!("schedule {key}: {} ticks pending", s.pending.len()));
        }
        if s.recent.len() > RECENT_FIRES {
            return Err(format!("schedule {key}: {} recent fires kept", s.recent.len()));
        }
        if s.running() > s.concurrency().max(1) {
            return Err(format!("schedule {key}: {} runs at once", s.running()));
        }
        let owner = self.owner(key, 0);
        for (run, p) in &s.pending {
            if *run >= s.next_run {
                return Err(format!("schedule {key}: run id {run} not handed out"));
            }
            if let Some(r) = p.running
                && owner.map(|o| o.token) != Some(r.token)
            {
                return Err(format!("schedule {key}: run {run} runs under a token not in force"));
            }
            if p.attempts > s.spec.delivery.max_attempts() {
                return Err(format!("schedule {key}: run {run} ran {} times", p.attempts));
            }
            if p.running.is_some() && p.attempts == 0 {
                return Err(format!("schedule {key}: run {run} running without an attempt"));
            }
            if matches!(s.spec.delivery, Delivery::AtMostOnce) && p.attempts > 1 {
                return Err(format!("schedule {key}: at-most-once run {run} ran twice"));
            }
        }
        Ok(())
    }
}

/// Two registrations agree on a schedule if they differ at most in whether it starts
/// paused (an initial state, not part of what the schedule is).
fn same_schedule(a: &ScheduleSpec, b: &ScheduleSpec) -> bool {
    ScheduleSpec { paused: false, ..a.clone() } == ScheduleSpec { paused: false, ..b.clone() }
}
