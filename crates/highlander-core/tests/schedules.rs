//! Schedules in `ClusterState::apply`: edge by edge, then random command sequences checked
//! against the invariants ticks promise.
//!
//! Every refusal is checked to leave the state unchanged (an operator's `ScheduleControl`
//! may only touch its client's de-duplication window), and every test ends with
//! `check_consistency`.

use highlander_core::state::{ClusterState, FireOutcome, MAX_PENDING};
use highlander_core::{
    CatchUp, ClientId, Command, Delivery, Key, KeySpec, LeaseTerms, Limits, NodeId, Outcome,
    Overlap, Payload, Rejection, RequestId, ScheduleAction, ScheduleSpec, SessionId, TickOrigin,
    TickResult, Token, Trigger,
};
use proptest::prelude::*;
use std::collections::BTreeMap;

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const TZDB: &str = "2026f";

fn key(name: &str) -> Key {
    Key::new(name).unwrap()
}

fn every(period_ms: u64) -> ScheduleSpec {
    ScheduleSpec::new(Trigger::Every { period_ms, phase_ms: 0 })
}

fn open(st: &mut ClusterState, node: u64, incarnation: u64) -> SessionId {
    let cmd = Command::OpenSession {
        client: ClientId { node: NodeId(node), incarnation },
        attempt: 0,
        lease: LEASE,
        limits: Limits::default(),
        storage: node,
    };
    match st.apply(&cmd) {
        Outcome::SessionOpened { session } => session,
        other => panic!("open refused: {other}"),
    }
}

/// Applies `commands` as one entry stamped at `now`, returning the outcomes after the stamp.
fn at(st: &mut ClusterState, now: u64, commands: &[Command]) -> Vec<Outcome> {
    let mut entry = vec![Command::Stamp { wall_ms: now }];
    entry.extend_from_slice(commands);
    let term = st.entry_term;
    let mut out = st.apply_entry(term, &entry);
    out.remove(0);
    out
}

/// Applies one command stamped at `now`; a refusal must change nothing (a control command
/// only its client's window).
fn one(st: &mut ClusterState, now: u64, command: Command) -> Outcome {
    let before = st.clone();
    let out = at(st, now, std::slice::from_ref(&command)).remove(0);
    if let Outcome::Rejected(_) = out {
        let mut rest = st.clone();
        rest.clients = before.clients.clone();
        assert_eq!(rest, before, "the refused {command:?} changed the state");
    }
    st.check_consistency().unwrap_or_else(|e| panic!("after {command:?}: {e}"));
    out
}

fn register_schedule(session: SessionId, k: &str, spec: &ScheduleSpec) -> Command {
    Command::RegisterSchedule {
        session,
        key: key(k),
        schedule: Box::new(spec.clone()),
        epoch: 1,
        tzdb: TZDB.into(),
    }
}

fn fire(k: &str, token: Token, tick_ms: u64, start: bool) -> Command {
    Command::Fire {
        key: key(k),
        token,
        tick_ms,
        origin: TickOrigin::Scheduled,
        missed: 0,
        start_ms: start.then_some(tick_ms),
    }
}

fn assign(st: &mut ClusterState, k: &str, session: SessionId) -> Token {
    match st.apply(&Command::Assign { key: key(k), slot: 0, session }) {
        Outcome::Assigned { token } => token,
        other => panic!("assign refused: {other}"),
    }
}

/// One node, a schedule `s` of `spec` registered at `T0` and owned by it.
fn owned(spec: &ScheduleSpec) -> (ClusterState, SessionId, Token) {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1);
    assert_eq!(one(&mut st, T0, register_schedule(a, "s", spec)), Outcome::Registered);
    let token = assign(&mut st, "s", a);
    (st, a, token)
}

fn run_of(out: Outcome) -> u64 {
    match out {
        Outcome::Fired { run: Some(run), .. } => run,
        other => panic!("not fired: {other}"),
    }
}

#[test]
fn a_schedule_is_registered_with_its_schedule_and_a_stamp() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1);
    let b = open(&mut st, 2, 1);
    let spec = every(10_000);
    // Without a stamp the cluster cannot say when it was created.
    let before = st.clone();
    let out = st.apply_entry(0, &[register_schedule(a, "s", &spec)]);
    assert_eq!(out, vec![Outcome::Rejected(Rejection::Unstamped)]);
    assert_eq!(st, before);
    assert_eq!(one(&mut st, T0, register_schedule(a, "s", &spec)), Outcome::Registered);
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!((s.floor_ms, s.last_fired, s.mark_ms()), (T0, None, T0));
    assert_eq!(st.keys[&key("s")].spec, KeySpec::schedule());
    // The same schedule from another node, even one asking for it paused: a candidate more.
    let paused = ScheduleSpec { paused: true, ..spec.clone() };
    assert_eq!(one(&mut st, T0, register_schedule(b, "s", &paused)), Outcome::Registered);
    assert_eq!(st.keys[&key("s")].candidates.len(), 2);
    // Another schedule under the same key is refused with the one in force.
    let c = open(&mut st, 3, 1);
    let out = one(&mut st, T0, register_schedule(c, "s", &every(20_000)));
    assert_eq!(out, Outcome::Rejected(Rejection::ScheduleConflict { existing: Box::new(spec) }));
    // A plain registration of a schedule key, or of a schedule kind, is refused.
    let plain =
        Command::Register { session: c, key: key("s"), spec: KeySpec::singleton(), epoch: 1 };
    assert_eq!(
        one(&mut st, T0, plain),
        Outcome::Rejected(Rejection::SpecConflict { existing: KeySpec::schedule() })
    );
    let kind = Command::Register { session: c, key: key("t"), spec: KeySpec::schedule(), epoch: 1 };
    assert_eq!(one(&mut st, T0, kind), Outcome::Rejected(Rejection::InvalidSpec));
    // A schedule under a singleton's key is refused too.
    let single =
        Command::Register { session: c, key: key("u"), spec: KeySpec::singleton(), epoch: 1 };
    assert_eq!(one(&mut st, T0, single), Outcome::Registered);
    assert_eq!(
        one(&mut st, T0, register_schedule(c, "u", &every(10_000))),
        Outcome::Rejected(Rejection::SpecConflict { existing: KeySpec::singleton() })
    );
    // A shape that cannot work is refused on every replica alike.
    let bad = ScheduleSpec { jitter_ms: 10_000, ..every(10_000) };
    assert!(matches!(
        one(&mut st, T0, register_schedule(c, "v", &bad)),
        Outcome::Rejected(Rejection::InvalidSchedule(_))
    ));
    // Nobody sends a schedule messages.
    let send = Command::Send {
        key: key("s"),
        payload: Payload::from("x"),
        request: RequestId { client: ClientId { node: NodeId(1), incarnation: 1 }, serial: 1 },
        floor: 1,
    };
    assert_eq!(one(&mut st, T0, send), Outcome::Rejected(Rejection::TakesNoMessages));
}

#[test]
fn zoned_schedules_need_one_time_zone_database() {
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1);
    let b = open(&mut st, 2, 1);
    let mut zoned = ScheduleSpec::new(Trigger::Cron("0 30 2 * * *".into()));
    zoned.zone = "Europe/Berlin".into();
    assert_eq!(one(&mut st, T0, register_schedule(a, "z", &zoned)), Outcome::Registered);
    let other = Command::RegisterSchedule {
        session: b,
        key: key("z"),
        schedule: Box::new(zoned.clone()),
        epoch: 1,
        tzdb: "2025b".into(),
    };
    assert_eq!(
        one(&mut st, T0, other),
        Outcome::Rejected(Rejection::TzdbMismatch { in_force: TZDB.into() })
    );
    // UTC and intervals compute the same instants with any database.
    let utc = ScheduleSpec::new(Trigger::Cron("0 30 2 * * *".into()));
    assert_eq!(one(&mut st, T0, register_schedule(a, "u", &utc)), Outcome::Registered);
    let other = Command::RegisterSchedule {
        session: b,
        key: key("u"),
        schedule: Box::new(utc),
        epoch: 1,
        tzdb: "2025b".into(),
    };
    assert_eq!(one(&mut st, T0, other), Outcome::Registered);
}

#[test]
fn a_tick_fires_once_above_the_mark_with_the_current_token_and_never_early() {
    let (mut st, a, token) = owned(&every(10_000));
    let t1 = T0 + 10_000;
    // Not yet due by the cluster's clock (the owner's clock may be fast).
    assert_eq!(
        one(&mut st, t1 - 1, fire("s", token, t1, true)),
        Outcome::Rejected(Rejection::TooEarly { tick_ms: t1, cluster_ms: t1 - 1 })
    );
    // A stale token.
    assert_eq!(
        one(&mut st, t1, fire("s", Token(token.0 + 7), t1, true)),
        Outcome::Rejected(Rejection::StaleToken)
    );
    // At or before the floor (the schedule's creation).
    assert_eq!(
        one(&mut st, t1, fire("s", token, T0, true)),
        Outcome::Rejected(Rejection::TickNotAfter { last: T0 })
    );
    assert_eq!(
        one(&mut st, t1, fire("s", token, t1, true)),
        Outcome::Fired { run: Some(1), started: true }
    );
    // Once: the same tick again, from any owner, is refused.
    assert_eq!(
        one(&mut st, t1 + 5, fire("s", token, t1, true)),
        Outcome::Rejected(Rejection::TickNotAfter { last: t1 })
    );
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!((s.last_fired, s.counts.fired, s.pending.len()), (Some(t1), 1, 1));
    let p = &s.pending[&1];
    assert_eq!((p.attempts, p.running.map(|r| (r.node, r.token))), (1, Some((NodeId(1), token))));
    // Done: recorded with its lateness.
    let done = Command::TickDone {
        key: key("s"),
        token,
        run: 1,
        result: TickResult::Done,
        end_ms: t1 + 50,
    };
    assert_eq!(one(&mut st, t1 + 50, done.clone()), Outcome::TickDone);
    assert_eq!(one(&mut st, t1 + 50, done), Outcome::Rejected(Rejection::NoSuchRun));
    let s = st.schedule(&key("s")).unwrap();
    assert!(s.pending.is_empty());
    assert_eq!(s.counts.done, 1);
    let record = s.recent.back().unwrap();
    assert_eq!(
        (record.outcome.clone(), record.lateness_ms(), record.ran),
        (FireOutcome::Done, Some(0), Some((NodeId(1), token)))
    );
    let _ = a;
}

#[test]
fn bounds_and_pauses_stop_fires() {
    let spec =
        ScheduleSpec { start_ms: Some(T0 + 20_000), end_ms: Some(T0 + 40_000), ..every(10_000) };
    let (mut st, _, token) = owned(&spec);
    assert_eq!(
        one(&mut st, T0 + 10_000, fire("s", token, T0 + 10_000, false)),
        Outcome::Rejected(Rejection::OutsideBounds)
    );
    assert!(matches!(
        one(&mut st, T0 + 20_000, fire("s", token, T0 + 20_000, false)),
        Outcome::Fired { .. }
    ));
    assert_eq!(
        one(&mut st, T0 + 50_000, fire("s", token, T0 + 50_000, false)),
        Outcome::Rejected(Rejection::OutsideBounds)
    );

    let (mut st, _, token) = owned(&every(10_000));
    let client = ClientId { node: NodeId(1), incarnation: 1 };
    let control = |serial: u64, action: ScheduleAction| Command::ScheduleControl {
        key: key("s"),
        action,
        request: RequestId { client, serial },
        floor: serial,
    };
    assert_eq!(
        one(&mut st, T0 + 1, control(1, ScheduleAction::Pause)),
        Outcome::ScheduleChanged { runs: vec![] }
    );
    assert_eq!(
        one(&mut st, T0 + 10_000, fire("s", token, T0 + 10_000, false)),
        Outcome::Rejected(Rejection::Paused)
    );
    // Resumed at 35 s: the ticks at 10, 20 and 30 s fell due while paused and are skipped.
    assert_eq!(
        one(&mut st, T0 + 35_000, control(2, ScheduleAction::Resume)),
        Outcome::ScheduleChanged { runs: vec![] }
    );
    assert_eq!(st.schedule(&key("s")).unwrap().mark_ms(), T0 + 35_000);
    assert_eq!(
        one(&mut st, T0 + 35_000, fire("s", token, T0 + 30_000, false)),
        Outcome::Rejected(Rejection::TickNotAfter { last: T0 + 35_000 })
    );
    assert!(matches!(
        one(&mut st, T0 + 40_000, fire("s", token, T0 + 40_000, false)),
        Outcome::Fired { .. }
    ));
}

#[test]
fn triggers_and_backfills_run_once_however_often_they_are_retried() {
    let (mut st, _, token) =
        owned(&ScheduleSpec { overlap: Overlap::AllowAll { max: 5 }, ..every(10_000) });
    let client = ClientId { node: NodeId(1), incarnation: 1 };
    let trigger = Command::ScheduleControl {
        key: key("s"),
        action: ScheduleAction::Trigger,
        request: RequestId { client, serial: 1 },
        floor: 1,
    };
    let first = one(&mut st, T0 + 5_000, trigger.clone());
    assert_eq!(first, Outcome::ScheduleChanged { runs: vec![1] });
    // The proposer retried the write: the same answer, nothing more pending.
    assert_eq!(one(&mut st, T0 + 5_100, trigger), first);
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!(s.pending.len(), 1);
    assert_eq!((s.pending[&1].tick_ms, s.pending[&1].origin), (T0 + 5_000, TickOrigin::Trigger));
    // A trigger does not move the high-water mark: the regular tick still fires.
    assert_eq!(s.last_fired, None);
    let backfill = |serial: u64, ticks: Vec<u64>| Command::ScheduleControl {
        key: key("s"),
        action: ScheduleAction::Backfill { ticks },
        request: RequestId { client, serial },
        floor: serial,
    };
    assert!(matches!(
        one(&mut st, T0 + 5_000, backfill(2, vec![])),
        Outcome::Rejected(Rejection::InvalidSchedule(_))
    ));
    assert!(matches!(
        one(&mut st, T0 + 5_000, backfill(3, (0..101).collect())),
        Outcome::Rejected(Rejection::InvalidSchedule(_))
    ));
    assert!(matches!(
        one(&mut st, T0 + 5_000, backfill(4, vec![T0 + 10_000])),
        Outcome::Rejected(Rejection::TooEarly { .. })
    ));
    assert_eq!(
        one(&mut st, T0 + 5_000, backfill(5, vec![T0 - 20_000, T0 - 10_000])),
        Outcome::ScheduleChanged { runs: vec![2, 3] }
    );
    assert!(matches!(
        one(&mut st, T0 + 10_000, fire("s", token, T0 + 10_000, false)),
        Outcome::Fired { run: Some(4), .. }
    ));
    // Not a schedule, no key.
    assert_eq!(
        one(
            &mut st,
            T0 + 10_000,
            Command::ScheduleControl {
                key: key("nope"),
                action: ScheduleAction::Pause,
                request: RequestId { client, serial: 6 },
                floor: 6
            }
        ),
        Outcome::Rejected(Rejection::NoSuchKey)
    );
}

#[test]
fn overlapping_ticks_follow_the_overlap_policy() {
    let tick = |n: u64| T0 + n * 10_000;
    // Skip: while tick 1 runs, tick 2 moves the mark but runs never.
    let (mut st, _, token) = owned(&every(10_000));
    run_of(one(&mut st, tick(1), fire("s", token, tick(1), true)));
    assert_eq!(
        one(&mut st, tick(2), fire("s", token, tick(2), true)),
        Outcome::Fired { run: None, started: false }
    );
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!((s.last_fired, s.counts.overlap_skipped, s.pending.len()), (Some(tick(2)), 1, 1));
    assert_eq!(s.recent.back().unwrap().outcome, FireOutcome::SkippedOverlap);
    // A missed tick the catch-up policy fires queues whatever the policy.
    let catch_up = Command::Fire {
        key: key("s"),
        token,
        tick_ms: tick(4),
        origin: TickOrigin::CatchUp,
        missed: 1,
        start_ms: None,
    };
    assert_eq!(
        one(&mut st, tick(4) + 1, catch_up),
        Outcome::Fired { run: Some(2), started: false }
    );
    assert_eq!(st.schedule(&key("s")).unwrap().counts.missed, 1);

    // BufferOne: one waits, the third is skipped.
    let (mut st, _, token) = owned(&ScheduleSpec { overlap: Overlap::BufferOne, ..every(10_000) });
    run_of(one(&mut st, tick(1), fire("s", token, tick(1), true)));
    // Asked to start, but one runs already: it waits.
    assert_eq!(
        one(&mut st, tick(2), fire("s", token, tick(2), true)),
        Outcome::Fired { run: Some(2), started: false }
    );
    assert_eq!(
        one(&mut st, tick(3), fire("s", token, tick(3), true)),
        Outcome::Fired { run: None, started: false }
    );

    // AllowAll: up to max at once.
    let (mut st, _, token) =
        owned(&ScheduleSpec { overlap: Overlap::AllowAll { max: 2 }, ..every(10_000) });
    assert_eq!(
        one(&mut st, tick(1), fire("s", token, tick(1), true)),
        Outcome::Fired { run: Some(1), started: true }
    );
    assert_eq!(
        one(&mut st, tick(2), fire("s", token, tick(2), true)),
        Outcome::Fired { run: Some(2), started: true }
    );
    assert_eq!(
        one(&mut st, tick(3), fire("s", token, tick(3), true)),
        Outcome::Fired { run: None, started: false }
    );

    // CancelOther: the running one is cancelled, the new one fires.
    let (mut st, _, token) =
        owned(&ScheduleSpec { overlap: Overlap::CancelOther, ..every(10_000) });
    run_of(one(&mut st, tick(1), fire("s", token, tick(1), true)));
    assert_eq!(
        one(&mut st, tick(2), fire("s", token, tick(2), true)),
        Outcome::Fired { run: Some(2), started: true }
    );
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(
        (s.counts.cancelled, s.recent.back().unwrap().outcome.clone()),
        (1, FireOutcome::Cancelled)
    );
}

/// A run cut short by its owner's failure runs again on the next owner, as often as the
/// delivery policy allows, and never again under at-most-once.
#[test]
fn a_tick_cut_short_by_a_failure_runs_again_within_its_attempts() {
    let tick = T0 + 10_000;
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1);
    let b = open(&mut st, 2, 1);
    let c = open(&mut st, 3, 1);
    let spec = every(10_000); // at-least-once, 2 attempts
    for s in [a, b, c] {
        assert_eq!(one(&mut st, T0, register_schedule(s, "s", &spec)), Outcome::Registered);
    }
    let ta = assign(&mut st, "s", a);
    run_of(one(&mut st, tick, fire("s", ta, tick, true)));
    // a dies mid-run.
    assert_eq!(
        st.apply_entry(2, &[Command::ExpireSession { session: a, term: 2 }]),
        vec![Outcome::SessionEnded]
    );
    let p = &st.schedule(&key("s")).unwrap().pending[&1];
    assert_eq!((p.attempts, p.running), (1, None));
    // The old owner's report of its run is refused: it is not the owner any more.
    let late = Command::TickDone {
        key: key("s"),
        token: ta,
        run: 1,
        result: TickResult::Done,
        end_ms: tick + 9,
    };
    assert_eq!(one(&mut st, tick + 3_000, late), Outcome::Rejected(Rejection::StaleToken));
    let tb = assign(&mut st, "s", b);
    let start = |token, at| Command::TickStarted { key: key("s"), token, run: 1, start_ms: at };
    assert_eq!(
        one(&mut st, tick + 3_000, start(tb, tick + 3_000)),
        Outcome::TickStarted { attempt: 2 }
    );
    assert_eq!(st.schedule(&key("s")).unwrap().counts.reruns, 1);
    // The same start applied again (a retried write whose first answer was lost) is the
    // same start: same answer, no attempt counted, nothing changed.
    let before = st.schedule(&key("s")).unwrap().clone();
    assert_eq!(
        one(&mut st, tick + 3_100, start(tb, tick + 3_000)),
        Outcome::TickStarted { attempt: 2 }
    );
    assert_eq!(st.schedule(&key("s")).unwrap(), &before);
    // b dies too: two attempts were allowed, both cut short. The tick is dropped.
    st.apply_entry(2, &[Command::ExpireSession { session: b, term: 2 }]);
    let s = st.schedule(&key("s")).unwrap();
    assert!(s.pending.is_empty());
    assert_eq!(
        (s.counts.interrupted, s.recent.back().unwrap().outcome.clone()),
        (1, FireOutcome::Interrupted)
    );
    st.check_consistency().unwrap();
    let _ = c;

    // At most once: a run cut short is never run again; a tick that never started still runs.
    let mut st = ClusterState::new();
    let a = open(&mut st, 1, 1);
    let b = open(&mut st, 2, 1);
    let once = ScheduleSpec {
        delivery: Delivery::AtMostOnce,
        overlap: Overlap::BufferOne,
        ..every(10_000)
    };
    for s in [a, b] {
        assert_eq!(one(&mut st, T0, register_schedule(s, "s", &once)), Outcome::Registered);
    }
    let ta = assign(&mut st, "s", a);
    assert_eq!(
        one(&mut st, tick, fire("s", ta, tick, true)),
        Outcome::Fired { run: Some(1), started: true }
    );
    assert_eq!(
        one(&mut st, tick + 10_000, fire("s", ta, tick + 10_000, true)),
        Outcome::Fired { run: Some(2), started: false }
    );
    st.apply_entry(2, &[Command::ExpireSession { session: a, term: 2 }]);
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!(
        s.pending.keys().copied().collect::<Vec<_>>(),
        vec![2],
        "the started tick is dropped, the waiting one kept"
    );
    assert_eq!(s.counts.interrupted, 1);
    let tb = assign(&mut st, "s", b);
    let start = Command::TickStarted { key: key("s"), token: tb, run: 2, start_ms: tick + 12_000 };
    assert_eq!(one(&mut st, tick + 12_000, start), Outcome::TickStarted { attempt: 1 });
    // The same owner's task restarted under the same token (a lapse and a renewal) may not
    // start it again.
    let again = Command::TickStarted { key: key("s"), token: tb, run: 2, start_ms: tick + 13_000 };
    assert_eq!(one(&mut st, tick + 13_000, again), Outcome::TickExhausted { attempts: 1 });
    assert!(st.schedule(&key("s")).unwrap().pending.is_empty());
}

/// The mark outlives every process that ran the schedule: when all of them are gone (a
/// restart or redeploy of the whole cluster) a new registration finds the schedule where it
/// was, and may bring a new spec; no tick at or below the mark fires again.
#[test]
fn a_schedule_outlives_its_processes_and_a_redeploy_may_change_it() {
    let spec = every(10_000);
    let (mut st, a, token) = owned(&spec);
    run_of(one(&mut st, T0 + 10_000, fire("s", token, T0 + 10_000, true)));
    let gone = Command::ExpireSession { session: a, term: st.entry_term };
    assert!(!matches!(one(&mut st, T0 + 15_000, gone), Outcome::Rejected(_)));
    let s = st.schedule(&key("s")).expect("kept without candidates");
    assert_eq!(s.mark_ms(), T0 + 10_000);
    // A redeploy with another period takes over the idle schedule and keeps its mark.
    let b = open(&mut st, 2, 1);
    let faster = every(5_000);
    assert_eq!(one(&mut st, T0 + 16_000, register_schedule(b, "s", &faster)), Outcome::Registered);
    let s = st.schedule(&key("s")).unwrap();
    assert_eq!(s.spec, faster);
    assert_eq!(s.counts.fired, 1);
    let token = assign(&mut st, "s", b);
    let out = one(&mut st, T0 + 16_000, fire("s", token, T0 + 10_000, true));
    assert!(matches!(out, Outcome::Rejected(Rejection::TickNotAfter { .. })), "{out}");
    // The next tick fires (skipped as an overlap: the run cut short by the expiry is owed
    // again first).
    let out = one(&mut st, T0 + 16_000, fire("s", token, T0 + 15_000, true));
    assert!(matches!(out, Outcome::Fired { .. }), "{out}");
    assert_eq!(st.schedule(&key("s")).unwrap().mark_ms(), T0 + 15_000);
    // While a process runs it, a different spec is still a conflict.
    let c = open(&mut st, 3, 1);
    let out = one(&mut st, T0 + 17_000, register_schedule(c, "s", &spec));
    assert!(matches!(out, Outcome::Rejected(Rejection::ScheduleConflict { .. })), "{out}");
    // A singleton key nobody runs but messages are left of stays one: a schedule takes no
    // messages, and none is lost.
    let d = open(&mut st, 4, 1);
    let reg = Command::Register { session: d, key: key("k"), spec: KeySpec::singleton(), epoch: 1 };
    assert_eq!(one(&mut st, T0 + 18_000, reg), Outcome::Registered);
    let send = Command::Send {
        key: key("k"),
        payload: Payload::from("kept"),
        request: RequestId { client: ClientId { node: NodeId(4), incarnation: 1 }, serial: 1 },
        floor: 0,
    };
    assert!(!matches!(one(&mut st, T0 + 18_000, send), Outcome::Rejected(_)));
    let unreg = Command::Unregister { session: d, key: key("k"), epoch: 1 };
    assert_eq!(one(&mut st, T0 + 18_000, unreg), Outcome::Unregistered);
    let out = one(&mut st, T0 + 19_000, register_schedule(d, "k", &spec));
    assert!(matches!(out, Outcome::Rejected(Rejection::SpecConflict { .. })), "{out}");
    st.check_consistency().unwrap();
}

#[test]
fn pending_ticks_are_bounded() {
    let (mut st, _, token) =
        owned(&ScheduleSpec { catch_up: CatchUp::All { max: 100 }, ..every(1_000) });
    for n in 1..=(MAX_PENDING as u64 + 5) {
        let cmd = Command::Fire {
            key: key("s"),
            token,
            tick_ms: T0 + n * 1_000,
            origin: TickOrigin::CatchUp,
            missed: 0,
            start_ms: None,
        };
        let out = one(&mut st, T0 + 1_000_000, cmd);
        if n as usize <= MAX_PENDING {
            assert!(matches!(out, Outcome::Fired { run: Some(_), .. }), "{n}: {out}");
        } else {
            assert_eq!(out, Outcome::Fired { run: None, started: false }, "{n}");
        }
    }
    assert_eq!(st.schedule(&key("s")).unwrap().pending.len(), MAX_PENDING);
}

// ---- Random sequences ---------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Open(u64),
    Expire(u8),
    Register { session: u8, spec: u8 },
    Unregister(u8),
    Assign(u8),
    Release { current: bool, hand_over: bool },
    Fire { current: bool, ahead: u8, back: u8, catch_up: bool, start: bool },
    Start { current: bool, run: u8 },
    Done { current: bool, run: u8, result: u8 },
    Control { action: u8, serial_back: u8 },
    Advance(u16),
    Restore,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        2 => (1u64..=3).prop_map(Op::Open),
        1 => any::<u8>().prop_map(Op::Expire),
        3 => (any::<u8>(), 0u8..6).prop_map(|(session, spec)| Op::Register { session, spec }),
        1 => any::<u8>().prop_map(Op::Unregister),
        3 => any::<u8>().prop_map(Op::Assign),
        1 => (prop::bool::weighted(0.8), any::<bool>()).prop_map(|(current, hand_over)| Op::Release { current, hand_over }),
        8 => (prop::bool::weighted(0.85), 0u8..4, 0u8..3, prop::bool::weighted(0.2), prop::bool::weighted(0.7))
            .prop_map(|(current, ahead, back, catch_up, start)| Op::Fire { current, ahead, back, catch_up, start }),
        4 => (prop::bool::weighted(0.85), 0u8..6).prop_map(|(current, run)| Op::Start { current, run }),
        5 => (prop::bool::weighted(0.85), 0u8..6, 0u8..3).prop_map(|(current, run, result)| Op::Done { current, run, result }),
        2 => (0u8..4, 0u8..3).prop_map(|(action, serial_back)| Op::Control { action, serial_back }),
        4 => (0u16..25_000).prop_map(Op::Advance),
        1 => Just(Op::Restore),
    ];
    prop::collection::vec(op, 1..120)
}

/// The specs one key may be registered with: mostly the same, sometimes another.
fn spec(pick: u8) -> ScheduleSpec {
    let base = every(10_000);
    match pick {
        0 | 1 => base,
        2 => ScheduleSpec { overlap: Overlap::AllowAll { max: 2 }, ..base },
        3 => ScheduleSpec { delivery: Delivery::AtMostOnce, overlap: Overlap::BufferOne, ..base },
        4 => ScheduleSpec {
            overlap: Overlap::CancelOther,
            delivery: Delivery::AtLeastOnce { max_attempts: 3 },
            ..base
        },
        _ => ScheduleSpec { paused: true, ..base },
    }
}

struct Sim {
    st: ClusterState,
    now: u64,
    incarnations: BTreeMap<u64, u64>,
    serial: u64,
    /// Every tick ever accepted by a `Fire`, in order.
    fired: Vec<u64>,
    /// Runs started per (run id, spec in force) — never above the policy's attempts.
    starts: BTreeMap<u64, u32>,
}

impl Sim {
    fn session(&self, pick: u8) -> SessionId {
        let live: Vec<SessionId> = self.st.sessions.keys().copied().collect();
        if pick < 230 && !live.is_empty() {
            live[pick as usize % live.len()]
        } else {
            SessionId(u64::from(pick % 9))
        }
    }

    fn token(&self, current: bool) -> Token {
        match self.st.owner(&key("s"), 0) {
            Some(o) if current => o.token,
            _ => Token(self.st.last_token.saturating_sub(1)),
        }
    }

    fn resolve(&mut self, op: &Op) -> Option<(Command, bool)> {
        let k = key("s");
        Some(match *op {
            Op::Open(node) => {
                let inc = self.incarnations.entry(node).or_insert(0);
                *inc += 1;
                let cmd = Command::OpenSession {
                    client: ClientId { node: NodeId(node), incarnation: *inc },
                    attempt: 0,
                    lease: LEASE,
                    limits: Limits::default(),
                    storage: node,
                };
                (cmd, false)
            }
            Op::Expire(pick) => {
                (Command::ExpireSession { session: self.session(pick), term: 1 }, false)
            }
            Op::Register { session, spec: pick } => {
                (register_schedule(self.session(session), "s", &spec(pick)), true)
            }
            Op::Unregister(pick) => {
                (Command::Unregister { session: self.session(pick), key: k, epoch: 5 }, false)
            }
            Op::Assign(pick) => {
                (Command::Assign { key: k, slot: 0, session: self.session(pick) }, false)
            }
            Op::Release { current, hand_over } => {
                (Command::Release { key: k, slot: 0, token: self.token(current), hand_over }, false)
            }
            Op::Fire { current, ahead, back, catch_up, start } => {
                let mark = self.st.schedule(&k).map_or(self.now, |s| s.mark_ms());
                // Mostly the next tick that is due; sometimes one not due, or an old one.
                let next = (mark / 10_000 + 1) * 10_000;
                let tick =
                    (next + u64::from(ahead) * 10_000).saturating_sub(u64::from(back) * 10_000);
                let origin = if catch_up { TickOrigin::CatchUp } else { TickOrigin::Scheduled };
                let cmd = Command::Fire {
                    key: k,
                    token: self.token(current),
                    tick_ms: tick,
                    origin,
                    missed: u64::from(ahead),
                    start_ms: start.then_some(self.now),
                };
                (cmd, true)
            }
            Op::Start { current, run } => {
                let run = self.run(run);
                (
                    Command::TickStarted {
                        key: k,
                        token: self.token(current),
                        run,
                        start_ms: self.now,
                    },
                    false,
                )
            }
            Op::Done { current, run, result } => {
                let run = self.run(run);
                let result = match result {
                    0 => TickResult::Done,
                    1 => TickResult::Failed("x".repeat(300)),
                    _ => TickResult::Cancelled,
                };
                (
                    Command::TickDone {
                        key: k,
                        token: self.token(current),
                        run,
                        result,
                        end_ms: self.now,
                    },
                    false,
                )
            }
            Op::Control { action, serial_back } => {
                self.serial += 1;
                let serial = self.serial.saturating_sub(u64::from(serial_back));
                let inc = *self.incarnations.get(&1).unwrap_or(&1);
                let action = match action {
                    0 => ScheduleAction::Pause,
                    1 => ScheduleAction::Resume,
                    2 => ScheduleAction::Trigger,
                    _ => ScheduleAction::Backfill {
                        ticks: vec![
                            self.now.saturating_sub(30_000),
                            self.now.saturating_sub(20_000),
                        ],
                    },
                };
                let request =
                    RequestId { client: ClientId { node: NodeId(1), incarnation: inc }, serial };
                (
                    Command::ScheduleControl {
                        key: k,
                        action,
                        request,
                        floor: serial.saturating_sub(2),
                    },
                    true,
                )
            }
            Op::Advance(_) | Op::Restore => return None,
        })
    }

    /// A pending run id, mostly.
    fn run(&self, pick: u8) -> u64 {
        let pending: Vec<u64> =
            self.st.schedule(&key("s")).map_or(vec![], |s| s.pending.keys().copied().collect());
        if pick < 5 && !pending.is_empty() {
            pending[pick as usize % pending.len()]
        } else {
            u64::from(pick)
        }
    }

    fn step(&mut self, command: Command, stamped: bool) {
        let before = self.st.clone();
        let mut entry = Vec::new();
        if stamped {
            entry.push(Command::Stamp { wall_ms: self.now });
        }
        entry.push(command.clone());
        let mut twin = self.st.clone();
        let outcome = self.st.apply_entry(1, &entry).pop().unwrap();
        assert_eq!(twin.apply_entry(1, &entry).pop().unwrap(), outcome);
        let mut before = before;
        before.entry_term = 1;
        assert_eq!(twin, self.st, "a replica fed the same entry differs");
        self.st.check_consistency().unwrap_or_else(|e| panic!("after {command:?}: {e}"));
        ClusterState::ownerships_ended_by_name(&before, &self.st, &command).unwrap();
        match &outcome {
            Outcome::Rejected(_) => {
                let mut rest = self.st.clone();
                if matches!(command, Command::ScheduleControl { .. }) {
                    rest.clients = before.clients.clone();
                }
                assert_eq!(rest, before, "the refused {command:?} changed the state");
            }
            Outcome::Fired { .. } => {
                let Command::Fire { tick_ms, .. } = command else { unreachable!() };
                // Strictly increasing, never after the cluster's time.
                assert!(
                    self.fired.last().is_none_or(|last| tick_ms > *last),
                    "tick {tick_ms} after {:?}",
                    self.fired.last()
                );
                assert!(tick_ms <= self.now, "tick {tick_ms} fired before its time {}", self.now);
                self.fired.push(tick_ms);
            }
            Outcome::TickStarted { attempt } => {
                let Command::TickStarted { run, token, start_ms, .. } = command else {
                    unreachable!()
                };
                // The same start again (a retried write) is not another attempt, and changes
                // nothing.
                let repeated = before.schedule(&key("s")).is_some_and(|s| {
                    s.pending
                        .get(&run)
                        .and_then(|p| p.running)
                        .is_some_and(|r| r.token == token && r.start_ms == start_ms)
                });
                let n = self.starts.entry(run).or_insert(0);
                if repeated {
                    let mut unchanged = self.st.clone();
                    unchanged.entry_term = before.entry_term;
                    unchanged.entry_stamp = before.entry_stamp;
                    assert_eq!(unchanged, before, "a repeated start changed the state");
                } else {
                    *n += 1;
                }
                assert_eq!(*n, *attempt, "run {run}: attempts counted wrong");
            }
            _ => {}
        }
        if let Outcome::Fired { run: Some(run), started: true } = outcome {
            self.starts.insert(run, 1);
        }
        if let Some(s) = self.st.schedule(&key("s")) {
            let max = s.spec.delivery.max_attempts();
            for (run, p) in &s.pending {
                assert!(p.attempts <= max, "run {run} started {} times (max {max})", p.attempts);
            }
        }
    }
}

proptest! {
    #[test]
    fn ticks_fire_once_in_order_and_runs_stay_within_their_attempts(ops in ops()) {
        let mut sim = Sim { st: ClusterState::new(), now: T0, incarnations: BTreeMap::new(), serial: 0, fired: vec![], starts: BTreeMap::new() };
        for node in 1..=3 {
            if let Some((c, stamped)) = sim.resolve(&Op::Open(node)) { sim.step(c, stamped); }
        }
        for op in &ops {
            match op {
                Op::Advance(ms) => sim.now += u64::from(*ms),
                Op::Restore => {
                    let bytes = highlander_core::codec::encode(&sim.st).unwrap();
                    let back: ClusterState = highlander_core::codec::decode_snapshot(&bytes).unwrap();
                    prop_assert_eq!(&back, &sim.st);
                    sim.st = back;
                }
                // The key forgotten (nobody registers it) starts afresh: its history with it.
                op => {
                    if let Some((c, stamped)) = sim.resolve(op) {
                        let existed = sim.st.schedule(&key("s")).is_some();
                        sim.step(c, stamped);
                        if existed && sim.st.schedule(&key("s")).is_none() {
                            sim.fired.clear();
                            sim.starts.clear();
                        }
                    }
                }
            }
        }
    }
}
