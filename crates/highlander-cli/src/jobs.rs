//! `highlander jobs list | show | retry | cancel | purge`: the cluster's job table, as a
//! node has applied it, and an operator's changes to it; `highlander enqueue` adds a job.
//!
//! `list` and `show` read what the asked node has applied. `retry`, `cancel` and `purge`
//! are written through the cluster by the node asked, once each however often the request
//! is retried. Queue depths are in `highlander status`.

use crate::args::{CliError, Command, Parsed, switch, value};
use crate::schedules::print_json;
use crate::status::{request, runtime, table, target};
use highlander::core::schedule::format_utc;
use highlander::core::wire::{JobReport, JobsReply, JobsRequest, QueueReport, Request, Response};
use highlander::{JobAction, JobId, JobSpec, JobState, Key, NodeId, Outcome};

const DEFAULT_TIMEOUT_MS: u64 = 5000;

pub static LIST: Command = Command {
    name: "jobs list",
    usage: "highlander jobs list --config node.toml [--queue Q] [--state S] [--limit N] [--json]",
    help: concat!(
        "\
Lists jobs, newest first: id, queue, state, attempts, priority, when it may run, the node
and claim token running it, and its last error.
  --queue Q        only this queue
  --state S        only jobs in this state: scheduled, available, running, retryable,
                   completed, dead (the dead letters) or cancelled
  --limit N        at most N jobs (default 50)
  --json           print the jobs as JSON",
        ask_node_options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--queue"),
        value("--state"),
        value("--limit"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static SHOW: Command = Command {
    name: "jobs show",
    usage: "highlander jobs show --config node.toml --job ID [--json]",
    help: concat!(
        "\
Describes one job: its state, options, attempts and their errors, the node and token
running it, and its result.
  --job ID         the job (as printed, j42, or 42)
  --json           print it as JSON",
        ask_node_options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--job"),
        switch("--json"),
        value("--timeout-ms"),
    ],
};

pub static RETRY: Command = Command {
    name: "jobs retry",
    usage: "highlander jobs retry --config node.toml --job ID",
    help: concat!(
        "\
Runs a dead or cancelled job again, now, with its attempts counted from zero.
  --job ID         the job",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), value("--job"), value("--timeout-ms")],
};

pub static CANCEL: Command = Command {
    name: "jobs cancel",
    usage: "highlander jobs cancel --config node.toml --job ID",
    help: concat!(
        "\
Cancels a job: one that has not started is cancelled at once; a running one's handler is
asked to stop (and aborted after the stop grace), and the job ends cancelled.
  --job ID         the job",
        ask_node_options!()
    ),
    flags: &[value("--config"), value("--node"), value("--job"), value("--timeout-ms")],
};

pub static PURGE: Command = Command {
    name: "jobs purge",
    usage: "highlander jobs purge --config node.toml --state dead|completed|cancelled [--queue Q]",
    help: concat!(
        "\
Drops finished jobs in a state from the table (they are also dropped by the retention
limits: count, bytes and age); prints how many.
  --state S        dead, completed or cancelled
  --queue Q        only this queue",
        ask_node_options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--state"),
        value("--queue"),
        value("--timeout-ms"),
    ],
};

pub static ENQUEUE: Command = Command {
    name: "enqueue",
    usage: "highlander enqueue --config node.toml --queue Q (--payload TEXT | --payload-file F) [options]",
    help: concat!(
        "\
Enqueues a job through a node; prints its id once the cluster has committed it. With
--unique, a retry of the same command can never enqueue the job twice: it fails with
\"an unfinished job (jN) holds the unique key\" instead (exit 1).
  --queue Q          the queue
  --payload TEXT     the job's input, as given
  --payload-file F   the job's input, read from a file (- for standard input)
  --unique KEY       refuse it while an unfinished job of the queue holds KEY
  --partition KEY    count it against the queue's per-partition cap
  --priority N       0 (first, the default) to 9
  --delay-ms N       not before N ms from now (the cluster's clock)
  --max-attempts N   attempts before it is dead (default 25)
  --job-timeout-ms N how long one attempt may run (default: the worker's)",
        ask_node_options!()
    ),
    flags: &[
        value("--config"),
        value("--node"),
        value("--queue"),
        value("--payload"),
        value("--payload-file"),
        value("--unique"),
        value("--partition"),
        value("--priority"),
        value("--delay-ms"),
        value("--max-attempts"),
        value("--job-timeout-ms"),
        value("--timeout-ms"),
    ],
};

pub fn enqueue(args: &Parsed) -> Result<(), CliError> {
    let queue = queue(args)?.ok_or_else(|| args.error("--queue is required"))?;
    let payload = match (args.get("--payload"), args.get("--payload-file")) {
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some("-")) => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .map_err(|e| CliError::failed(format!("cannot read standard input: {e}")))?;
            buf
        }
        (None, Some(file)) => {
            std::fs::read(file).map_err(|e| CliError::failed(format!("cannot read {file}: {e}")))?
        }
        _ => return Err(args.error("give exactly one of --payload and --payload-file")),
    };
    let spec = JobSpec {
        priority: args.number("--priority", 0u8, highlander::core::MAX_JOB_PRIORITY)?.unwrap_or(0),
        run_at_ms: None,
        max_attempts: args.number("--max-attempts", 1u32, u32::MAX)?.unwrap_or(25),
        timeout_ms: args.number("--job-timeout-ms", 1u64, u64::MAX)?,
        unique: args.get("--unique").map(str::to_string),
        partition: args.get("--partition").map(str::to_string),
    };
    spec.validate().map_err(|e| args.error(e))?;
    let delay_ms = args.number("--delay-ms", 0u64, u64::MAX)?;
    let what =
        JobsRequest::Enqueue { queue, payload: payload.into(), spec: Box::new(spec), delay_ms };
    match ask(args, what)? {
        JobsReply::Done(Outcome::Enqueued { job }) => {
            println!("{job}");
            Ok(())
        }
        other => Err(CliError::failed(format!("unexpected answer: {other:?}"))),
    }
}

pub fn list(args: &Parsed) -> Result<(), CliError> {
    let queue = queue(args)?;
    let state = args.get("--state").map(|s| parse_state(args, s)).transpose()?;
    let limit = args.number("--limit", 1u32, 10_000)?.unwrap_or(50);
    let jobs = jobs(args, JobsRequest::List { queue, state, limit })?;
    if args.switch("--json") {
        return print_json(&jobs);
    }
    print!("{}", render_list(&jobs));
    Ok(())
}

pub fn show(args: &Parsed) -> Result<(), CliError> {
    let job = job_id(args)?;
    let jobs = jobs(args, JobsRequest::Show { job })?;
    let Some(report) = jobs.first() else {
        return Err(CliError::failed(format!("no such job: {job}")));
    };
    if args.switch("--json") {
        return print_json(report);
    }
    print!("{}", render_show(report));
    Ok(())
}

pub fn retry(args: &Parsed) -> Result<(), CliError> {
    let job = job_id(args)?;
    let state = control(args, JobsRequest::Control { job, action: JobAction::Retry })?;
    println!("{job} retried: {state}");
    Ok(())
}

pub fn cancel(args: &Parsed) -> Result<(), CliError> {
    let job = job_id(args)?;
    let state = control(args, JobsRequest::Control { job, action: JobAction::Cancel })?;
    println!("{job} {}", if state == "running" { "asked to stop (running)".into() } else { state });
    Ok(())
}

pub fn purge(args: &Parsed) -> Result<(), CliError> {
    let queue = queue(args)?;
    let state = parse_state(args, args.required("--state")?)?;
    if !state.is_finished() {
        return Err(args.error("--state: only dead, completed or cancelled jobs are purged"));
    }
    let done = control(args, JobsRequest::Purge { queue, state })?;
    println!("{done}");
    Ok(())
}

fn queue(args: &Parsed) -> Result<Option<Key>, CliError> {
    args.get("--queue")
        .map(|q| Key::new(q).map_err(|e| args.error(format!("--queue: {e}"))))
        .transpose()
}

fn job_id(args: &Parsed) -> Result<JobId, CliError> {
    let text = args.required("--job")?;
    let digits = text.strip_prefix('j').unwrap_or(text);
    digits
        .parse::<u64>()
        .map(JobId)
        .map_err(|_| args.error(format!("--job: {text:?} is not a job id (like j42 or 42)")))
}

fn parse_state(args: &Parsed, text: &str) -> Result<JobState, CliError> {
    let all = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Dead,
        JobState::Cancelled,
    ];
    all.into_iter().find(|s| s.name() == text).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|s| s.name()).collect();
        args.error(format!("--state: {text:?} is not one of {}", names.join(", ")))
    })
}

fn ask(args: &Parsed, what: JobsRequest) -> Result<JobsReply, CliError> {
    let (config, node, addr, timeout) = target(args, DEFAULT_TIMEOUT_MS)?;
    let answer = runtime()?.block_on(request(&config, node, addr, timeout, Request::Jobs(what)))?;
    match answer {
        Response::Jobs(Ok(reply)) => Ok(reply),
        Response::Jobs(Err(why)) => Err(CliError::failed(why)),
        other => {
            Err(CliError::failed(format!("node {} sent an unexpected answer: {other:?}", node.0)))
        }
    }
}

fn jobs(args: &Parsed, what: JobsRequest) -> Result<Vec<JobReport>, CliError> {
    match ask(args, what)? {
        JobsReply::Jobs(jobs) => Ok(jobs),
        other => Err(CliError::failed(format!("unexpected answer: {other:?}"))),
    }
}

fn control(args: &Parsed, what: JobsRequest) -> Result<String, CliError> {
    match ask(args, what)? {
        JobsReply::Done(Outcome::JobUpdated { state }) => Ok(state.name().to_string()),
        JobsReply::Done(Outcome::JobsPurged { count }) => Ok(format!("{count} jobs purged")),
        other => Err(CliError::failed(format!("unexpected answer: {other:?}"))),
    }
}

fn node_text(node: Option<NodeId>) -> String {
    node.map_or("-".into(), |n| n.to_string())
}

/// One line per job.
pub fn render_list(jobs: &[JobReport]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.queue.to_string(),
                j.state.name().to_string(),
                format!("{}/{}", j.attempt, j.max_attempts),
                j.priority.to_string(),
                format_utc(j.run_at_ms),
                node_text(j.node),
                j.token.map_or("-".into(), |t| t.to_string()),
                j.errors.last().map_or("-".into(), |e| e.error.clone()),
            ]
        })
        .collect();
    let headers =
        ["JOB", "QUEUE", "STATE", "ATTEMPTS", "PRI", "RUN AT", "NODE", "TOKEN", "LAST ERROR"];
    table(Some(&headers), &rows)
}

/// One job, whole.
pub fn render_show(j: &JobReport) -> String {
    let mut out = format!("job {} in queue {}: {}\n", j.id, j.queue, j.state.name());
    let mut rows = vec![
        vec!["attempts".into(), format!("{} of {}", j.attempt, j.max_attempts)],
        vec!["priority".into(), j.priority.to_string()],
        vec!["enqueued".into(), format_utc(j.enqueued_ms)],
        vec!["run at".into(), format_utc(j.run_at_ms)],
        vec!["payload".into(), format!("{} bytes", j.payload.len())],
    ];
    if let Some(u) = &j.unique {
        rows.push(vec!["unique key".into(), u.clone()]);
    }
    if let Some(p) = &j.partition {
        rows.push(vec!["partition".into(), p.clone()]);
    }
    if let (Some(node), Some(token)) = (j.node, j.token) {
        rows.push(vec!["running on".into(), format!("{node} under {token}")]);
    }
    if let Some(d) = j.deadline_ms {
        rows.push(vec!["deadline".into(), format_utc(d)]);
    }
    if j.cancel_requested {
        rows.push(vec!["cancel".into(), "requested; the handler is being stopped".into()]);
    }
    if let Some(f) = j.finished_ms {
        rows.push(vec!["finished".into(), format_utc(f)]);
    }
    if let Some(r) = &j.result {
        rows.push(vec!["result".into(), format!("{} bytes", r.len())]);
    }
    out.push_str(&table(None, &rows));
    if !j.errors.is_empty() {
        out.push_str("errors:\n");
        let rows: Vec<Vec<String>> = j
            .errors
            .iter()
            .map(|e| vec![format!("attempt {}", e.attempt), format_utc(e.at_ms), e.error.clone()])
            .collect();
        out.push_str(&table(None, &rows));
    }
    out
}

/// One line per queue, for `highlander status`.
pub fn render_queues(queues: &[QueueReport]) -> String {
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            let by_node: Vec<String> =
                q.running_by_node.iter().map(|(n, c)| format!("{n}:{c}")).collect();
            let caps = match (q.caps.global, q.caps.per_partition) {
                (None, None) => "-".to_string(),
                (g, p) => format!(
                    "{}/{}",
                    g.map_or("-".into(), |g| g.to_string()),
                    p.map_or("-".into(), |p| p.to_string())
                ),
            };
            vec![
                q.queue.to_string(),
                q.scheduled.to_string(),
                q.available.to_string(),
                q.running.to_string(),
                q.retryable.to_string(),
                q.completed.to_string(),
                q.dead.to_string(),
                q.cancelled.to_string(),
                q.oldest_available_ms.map_or("-".into(), |ms| format!("{ms}ms")),
                if by_node.is_empty() { "-".into() } else { by_node.join(",") },
                caps,
            ]
        })
        .collect();
    let headers = [
        "QUEUE",
        "SCHEDULED",
        "AVAILABLE",
        "RUNNING",
        "RETRYABLE",
        "COMPLETED",
        "DEAD",
        "CANCELLED",
        "OLDEST",
        "RUNNING ON",
        "CAPS",
    ];
    table(Some(&headers), &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use highlander::core::state::JobError;
    use highlander::{Payload, Token};

    fn report() -> JobReport {
        JobReport {
            id: JobId(7),
            queue: Key::new("mail").unwrap(),
            state: JobState::Running,
            priority: 2,
            attempt: 2,
            max_attempts: 25,
            run_at_ms: 1_700_000_000_000,
            enqueued_ms: 1_700_000_000_000,
            finished_ms: None,
            unique: Some("invoice-7".into()),
            partition: None,
            payload: Payload::from(&b"hello"[..]),
            node: Some(NodeId(3)),
            token: Some(Token(41)),
            deadline_ms: Some(1_700_000_060_000),
            cancel_requested: false,
            errors: vec![JobError {
                attempt: 1,
                error: "smtp timeout".into(),
                at_ms: 1_700_000_000_500,
            }],
            result: None,
        }
    }

    #[test]
    fn lists_and_shows_a_job_with_its_owner_token_and_errors() {
        let list = render_list(&[report()]);
        assert!(list.contains("JOB"), "{list}");
        assert!(list.contains("j7") && list.contains("running") && list.contains("2/25"), "{list}");
        assert!(
            list.contains("n3") && list.contains("t41") && list.contains("smtp timeout"),
            "{list}"
        );
        let show = render_show(&report());
        assert!(show.contains("job j7 in queue mail: running"), "{show}");
        assert!(show.contains("n3 under t41") && show.contains("invoice-7"), "{show}");
        assert!(show.contains("attempt 1") && show.contains("smtp timeout"), "{show}");
    }

    #[test]
    fn renders_queue_depths() {
        let q = QueueReport {
            queue: Key::new("mail").unwrap(),
            caps: highlander::QueueCaps { global: Some(4), per_partition: None },
            scheduled: 1,
            available: 2,
            running: 3,
            retryable: 0,
            completed: 10,
            dead: 1,
            cancelled: 0,
            running_by_node: vec![(NodeId(1), 2), (NodeId(2), 1)],
            oldest_available_ms: Some(120),
        };
        let text = render_queues(&[q]);
        assert!(
            text.contains("n1:2,n2:1") && text.contains("120ms") && text.contains("4/-"),
            "{text}"
        );
    }
}
