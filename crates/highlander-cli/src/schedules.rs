//! `highlander schedules list | show | pause | resume | trigger`: the cluster's schedules,
//! as a node has applied them, and an operator's changes to one.
//!
//! `list` and `show` read a node's status report (what that node has applied; its next
//! ticks are computed by that node, on the cluster's time of day). `pause`, `resume` and
//! `trigger` are written through the cluster by the node asked, once each however often the
//! request is retried.

use crate::args::{CliError, Command, Parsed, switch, value};
use crate::status::{ask, request, runtime, table, target};
use highlander::core::schedule::format_utc;
use highlander::core::state::FireOutcome;
use highlander::core::wire::{KeyQuery, KeyReport, Request, Response, ScheduleOp};
use highlander::{CatchUp, Delivery, Key, Overlap, StatusReport, TickOrigin, Trigger};

const DEFAULT_TIMEOUT_MS: u64 = 5000;

pub static LIST: Command = Command {
    name: "schedules list",
    usage: "highlander schedules list --config node.toml [--node N] [--json]",
    help: concat!(
        "\
Lists every schedule: its trigger and zone, its owner and fencing token, whether it is
paused, the last tick fired, the next one, and how many ticks ran, were missed (the
catch-up policy did not run them) or skipped (an earlier tick was still running).
  --json           print the schedules as JSON",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), switch("--json"), value("--timeout-ms")],
};

pub static SHOW: Command = Command {
    name: "schedules show",
    usage: "highlander schedules show --config node.toml --key KEY [--node N] [--json]",
    help: concat!(
        "\
Describes one schedule: its spec and policies, its next 10 ticks, the ticks pending (fired
and not finished), the last 10 fires with the node and token that ran them, their attempts,
outcome and lateness, and its counters.
  --key KEY        the schedule
  --json           print it as JSON",
        ask_node_options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--key"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static PAUSE: Command = Command {
    name: "schedules pause",
    usage: "highlander schedules pause --config node.toml --key KEY [--node N]",
    help: concat!(
        "\
Pauses a schedule: no tick fires until it is resumed. Runs going on finish.
  --key KEY        the schedule",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), value("--key"), value("--timeout-ms")],
};

pub static RESUME: Command = Command {
    name: "schedules resume",
    usage: "highlander schedules resume --config node.toml --key KEY [--node N]",
    help: concat!(
        "\
Resumes a paused schedule. Ticks that fell due while it was paused are skipped.
  --key KEY        the schedule",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), value("--key"), value("--timeout-ms")],
};

pub static TRIGGER: Command = Command {
    name: "schedules trigger",
    usage: "highlander schedules trigger --config node.toml --key KEY [--node N]",
    help: concat!(
        "\
Runs a schedule's handler once now, on its owner, beside its regular ticks; prints the run
id (see `schedules show`).
  --key KEY        the schedule",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), value("--key"), value("--timeout-ms")],
};

pub fn list(args: &Parsed) -> Result<(), CliError> {
    let (config, node, addr, timeout) = target(args, DEFAULT_TIMEOUT_MS)?;
    let report = runtime()?.block_on(ask(&config, node, addr, timeout, KeyQuery::all()))?;
    let schedules: Vec<&KeyReport> = report.keys.iter().filter(|k| k.schedule.is_some()).collect();
    if args.switch("--json") {
        return print_json(&schedules);
    }
    print!("{}", render_list(&report));
    Ok(())
}

pub fn show(args: &Parsed) -> Result<(), CliError> {
    let key = key(args)?;
    let (config, node, addr, timeout) = target(args, DEFAULT_TIMEOUT_MS)?;
    // The key itself is the first key with its own name as prefix.
    let query = KeyQuery::default().with_prefix(key.as_str()).limit(1);
    let report = runtime()?.block_on(ask(&config, node, addr, timeout, query))?;
    let Some(k) = report.keys.iter().find(|k| k.key == key) else {
        return Err(CliError::failed(format!("node {} knows no key {key}", node.0)));
    };
    if k.schedule.is_none() {
        return Err(CliError::failed(format!("{key} is not a schedule")));
    }
    if args.switch("--json") {
        return print_json(k);
    }
    print!("{}", render_show(k));
    Ok(())
}

pub fn pause(args: &Parsed) -> Result<(), CliError> {
    change(args, ScheduleOp::Pause).map(|_| println!("paused"))
}

pub fn resume(args: &Parsed) -> Result<(), CliError> {
    change(args, ScheduleOp::Resume).map(|_| println!("resumed"))
}

pub fn trigger(args: &Parsed) -> Result<(), CliError> {
    let runs = change(args, ScheduleOp::Trigger)?;
    let run = runs.first().map_or("-".to_string(), u64::to_string);
    println!("triggered: run {run}");
    Ok(())
}

fn key(args: &Parsed) -> Result<Key, CliError> {
    let text = args.required("--key")?;
    Key::new(text).map_err(|e| args.error(format!("--key: {e}")))
}

fn change(args: &Parsed, op: ScheduleOp) -> Result<Vec<u64>, CliError> {
    let key = key(args)?;
    let (config, node, addr, timeout) = target(args, DEFAULT_TIMEOUT_MS)?;
    let answer = runtime()?.block_on(request(
        &config,
        node,
        addr,
        timeout,
        Request::Schedule { key, op },
    ))?;
    match answer {
        Response::Schedule(Ok(runs)) => Ok(runs),
        Response::Schedule(Err(why)) => Err(CliError::failed(why)),
        other => {
            Err(CliError::failed(format!("node {} sent an unexpected answer: {other:?}", node.0)))
        }
    }
}

/// Prints `value` as pretty JSON (the `--json` of the commands that print state).
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::failed(format!("cannot encode as JSON: {e}")))?;
    println!("{json}");
    Ok(())
}

fn trigger_text(trigger: &Trigger, zone: &str) -> String {
    match trigger {
        Trigger::Cron(expr) if zone == "UTC" => format!("cron {expr}"),
        Trigger::Cron(expr) => format!("cron {expr} ({zone})"),
        Trigger::Every { period_ms, phase_ms: 0 } => format!("every {}", duration(*period_ms)),
        Trigger::Every { period_ms, phase_ms } => {
            format!("every {} +{}", duration(*period_ms), duration(*phase_ms))
        }
    }
}

fn duration(ms: u64) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

/// One line per schedule.
pub fn render_list(report: &StatusReport) -> String {
    let rows: Vec<Vec<String>> = report
        .keys
        .iter()
        .filter_map(|k| k.schedule.as_ref().map(|s| (k, s)))
        .map(|(k, s)| {
            let owner = k.owners.first().copied().flatten();
            vec![
                k.key.to_string(),
                trigger_text(&s.spec.trigger, &s.spec.zone),
                owner.map_or("-".into(), |o| format!("{} {}", o.node, o.token)),
                if s.paused { "paused".into() } else { "active".into() },
                s.last_fired.map_or("-".into(), format_utc),
                s.next.first().map_or("-".into(), |t| format_utc(*t)),
                s.counts.done.to_string(),
                (s.counts.failed + s.counts.interrupted).to_string(),
                s.counts.missed.to_string(),
                s.counts.overlap_skipped.to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no schedules\n".into();
    }
    let headers = [
        "KEY",
        "TRIGGER",
        "OWNER",
        "STATE",
        "LAST FIRED",
        "NEXT",
        "DONE",
        "FAILED",
        "MISSED",
        "SKIPPED",
    ];
    table(Some(&headers), &rows)
}

fn catch_up_text(c: CatchUp) -> String {
    match c {
        CatchUp::Latest { window_ms: None } => "the newest missed tick (within one period)".into(),
        CatchUp::Latest { window_ms: Some(w) } => {
            format!("the newest missed tick, if at most {} late", duration(w))
        }
        CatchUp::Skip => "none: missed ticks are skipped".into(),
        CatchUp::All { max } => format!("every missed tick, the newest {max} at most"),
    }
}

fn overlap_text(o: Overlap) -> String {
    match o {
        Overlap::Skip => "skip a tick while the previous one runs".into(),
        Overlap::BufferOne => "one tick waits while the previous one runs".into(),
        Overlap::CancelOther => "a new tick cancels the running one".into(),
        Overlap::AllowAll { max } => format!("up to {max} ticks run at once"),
    }
}

fn delivery_text(d: Delivery) -> String {
    match d {
        Delivery::AtLeastOnce { max_attempts } => {
            format!("at least once ({max_attempts} attempts when a crash cuts a run short)")
        }
        Delivery::AtMostOnce => "at most once".into(),
    }
}

fn origin(o: TickOrigin) -> &'static str {
    match o {
        TickOrigin::Scheduled => "scheduled",
        TickOrigin::CatchUp => "catch-up",
        TickOrigin::Trigger => "trigger",
        TickOrigin::Backfill => "backfill",
    }
}

/// Everything about one schedule.
pub fn render_show(k: &KeyReport) -> String {
    let Some(s) = &k.schedule else { return format!("{} is not a schedule\n", k.key) };
    let spec = &s.spec;
    let owner = k.owners.first().copied().flatten();
    let mut overview = vec![
        vec!["key".into(), k.key.to_string()],
        vec!["trigger".into(), trigger_text(&spec.trigger, &spec.zone)],
        vec!["catch-up".into(), catch_up_text(spec.catch_up)],
        vec!["overlap".into(), overlap_text(spec.overlap)],
        vec!["delivery".into(), delivery_text(spec.delivery)],
        vec!["state".into(), if s.paused { "paused".into() } else { "active".into() }],
        vec!["owner".into(), owner.map_or("-".into(), |o| format!("{} {}", o.node, o.token))],
        vec!["last fired".into(), s.last_fired.map_or("-".into(), format_utc)],
    ];
    if spec.jitter_ms > 0 {
        overview.push(vec!["jitter".into(), duration(spec.jitter_ms)]);
    }
    if let Some(start) = spec.start_ms {
        overview.push(vec!["from".into(), format_utc(start)]);
    }
    if let Some(end) = spec.end_ms {
        overview.push(vec!["until".into(), format_utc(end)]);
    }
    if let Some(tzdb) = &s.tzdb {
        overview.push(vec!["tzdb".into(), tzdb.clone()]);
    }
    let c = &s.counts;
    overview.push(vec![
        "counts".into(),
        format!(
            "fired {}, done {}, failed {}, cancelled {}, interrupted {}, re-runs {}, missed {}, \
             skipped {}",
            c.fired,
            c.done,
            c.failed,
            c.cancelled,
            c.interrupted,
            c.reruns,
            c.missed,
            c.overlap_skipped
        ),
    ]);
    let mut out = table(None, &overview);
    out.push_str("\nnext ticks:\n");
    let next: Vec<Vec<String>> = s.next.iter().map(|t| vec![format_utc(*t)]).collect();
    out.push_str(&if next.is_empty() { "  none\n".into() } else { table(None, &next) });
    if !s.pending.is_empty() {
        out.push_str("\npending:\n");
        let rows: Vec<Vec<String>> = s
            .pending
            .iter()
            .map(|(run, p)| {
                vec![
                    run.to_string(),
                    format_utc(p.tick_ms),
                    origin(p.origin).into(),
                    p.attempts.to_string(),
                    p.running
                        .map_or("waiting".into(), |r| format!("running on {} {}", r.node, r.token)),
                ]
            })
            .collect();
        out.push_str(&table(Some(&["RUN", "TICK", "ORIGIN", "ATTEMPTS", "STATE"]), &rows));
    }
    out.push_str("\nlast fires:\n");
    if s.recent.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .recent
            .iter()
            .rev()
            .map(|f| {
                let outcome = match &f.outcome {
                    FireOutcome::Done => "done".to_string(),
                    FireOutcome::Failed(e) => format!("failed: {e}"),
                    FireOutcome::Cancelled => "cancelled".into(),
                    FireOutcome::Interrupted => "interrupted".into(),
                    FireOutcome::SkippedOverlap => "skipped (overlap)".into(),
                };
                vec![
                    f.run.map_or("-".into(), |r| r.to_string()),
                    format_utc(f.tick_ms),
                    origin(f.origin).into(),
                    f.ran.map_or("-".into(), |(n, _)| n.to_string()),
                    f.ran.map_or("-".into(), |(_, t)| t.to_string()),
                    f.attempts.to_string(),
                    f.lateness_ms().map_or("-".into(), |l| format!("{l} ms")),
                    outcome,
                ]
            })
            .collect();
        let headers = ["RUN", "TICK", "ORIGIN", "NODE", "TOKEN", "ATTEMPTS", "LATE", "OUTCOME"];
        out.push_str(&table(Some(&headers), &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander::core::state::{FireRecord, ScheduleCounts};
    use highlander::core::wire::{OwnerReport, ScheduleReport};
    use highlander::{KeySpec, NodeId, ScheduleSpec, SessionId, Token};

    fn report() -> KeyReport {
        let mut spec = ScheduleSpec::new(Trigger::Cron("0 30 2 * * *".into()));
        spec.zone = "Europe/Berlin".into();
        KeyReport {
            key: Key::new("nightly").unwrap(),
            spec: KeySpec::schedule(),
            owners: vec![Some(OwnerReport {
                node: NodeId(2),
                session: SessionId(4),
                token: Token(9),
            })],
            candidates: vec![NodeId(1), NodeId(2)],
            queued: 0,
            queued_bytes: 0,
            schedule: Some(ScheduleReport {
                spec,
                paused: false,
                last_fired: Some(1_767_231_000_000),
                mark_ms: 1_767_231_000_000,
                tzdb: Some("2026f".into()),
                pending: vec![],
                counts: ScheduleCounts {
                    fired: 3,
                    done: 2,
                    missed: 1,
                    ..ScheduleCounts::default()
                },
                recent: vec![FireRecord {
                    run: Some(3),
                    tick_ms: 1_767_231_000_000,
                    origin: TickOrigin::CatchUp,
                    ran: Some((NodeId(2), Token(9))),
                    attempts: 2,
                    outcome: FireOutcome::Done,
                    start_ms: Some(1_767_231_002_150),
                    end_ms: Some(1_767_231_003_000),
                }],
                next: vec![1_767_317_400_000],
            }),
        }
    }

    #[test]
    fn lists_and_shows_a_schedule() {
        let status = StatusReport { keys: vec![report()], ..StatusReport::default() };
        let list = render_list(&status);
        let row: Vec<&str> = list.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "nightly",
                "cron",
                "0",
                "30",
                "2",
                "*",
                "*",
                "*",
                "(Europe/Berlin)",
                "n2",
                "t9",
                "active",
                "2026-01-01T01:30:00Z",
                "2026-01-02T01:30:00Z",
                "2",
                "0",
                "1",
                "0"
            ],
            "{list}"
        );
        let show = render_show(&report());
        assert!(show.lines().any(|l| l.split_whitespace().eq(["tzdb", "2026f"])), "{show}");
        assert!(show.contains("the newest missed tick (within one period)"), "{show}");
        let fire = show.lines().find(|l| l.trim_start().starts_with("3 ")).unwrap();
        let cells: Vec<&str> = fire.split_whitespace().collect();
        assert_eq!(
            cells,
            ["3", "2026-01-01T01:30:00Z", "catch-up", "n2", "t9", "2", "2150", "ms", "done"],
            "{show}"
        );
        assert!(show.contains("fired 3, done 2"), "{show}");
    }
}
