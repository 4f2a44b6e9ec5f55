//! The `highlander` command: the operator's tool for a highlander cluster.
//!
//! - `highlander secret` prints a new cluster secret (for `tls.cluster_secret_file`).
//! - `highlander certs init` makes a cluster CA; `highlander certs issue` signs a node's
//!   certificate with it (the PEM-file way to set up trust).
//! - `highlander status` asks a running node, over QUIC with the cluster's credentials from a
//!   `node.toml`, for its leader, term, members, sessions, and every key's owners, fencing
//!   tokens and queue depth; as a table, or as JSON with `--json`.
//! - `highlander members list | add | demote | remove | replace` shows and changes which storage of
//!   each node votes, through the leader (a replaced machine, a removed or added node).
//! - `highlander schedules list | show | pause | resume | trigger` shows the cluster's
//!   schedules (owner, last and next ticks, counters, recent fires) and changes one.
//! - `highlander jobs list | show | retry | cancel | purge` shows the job table (the dead
//!   letters with `--state dead`) and retries, cancels or purges jobs; `highlander enqueue`
//!   adds one.
//! - `highlander wal verify` and `highlander wal dump` check and print a stopped node's data
//!   directory.
//! - `highlander check-config` reads a `node.toml` as a node would and says what it means.
//!
//! Exit codes: 0 on success, 1 when the command failed, 2 when the command line is wrong.
//! Every error names the argument or the configuration field at fault.

/// The options of the commands that ask one node (`schedules`, `jobs`, `enqueue`), for
/// their help texts.
macro_rules! ask_node_options {
    () => {
        "

Options:
  --config FILE    a node.toml of the cluster (its credentials and peer list are used)
  --node N         the node to ask (default: the config's own node)
  --timeout-ms T   how long to wait for the answer (default 5000)"
    };
}

mod args;
mod certs;
mod check;
mod jobs;
mod members;
mod schedules;
mod status;
mod wal;

use args::{CliError, Command, Parsed};
use std::process::ExitCode;

const USAGE: &str = "\
Usage: highlander <command> [options]

Commands:
  secret         print a new cluster secret
  certs init     make a cluster CA (ca.pem, ca.key)
  certs issue    issue a node certificate signed by the CA
  status         ask a running node for the cluster's state (owners, tokens, queues)
  members list   the Raft members: which storage of each node votes, which only learns
  members add    make a node that joined as a learner a voter
  members demote take a node's vote away, keeping it as a learner
  members remove remove a node from the membership (safe with it down)
  members replace  make a node's new storage the voter in place of its old one
  schedules list   every schedule: owner, last and next tick, counters
  schedules show   one schedule: spec, next ticks, pending and recent fires
  schedules pause | resume | trigger   stop and restart a schedule, or run it now
  enqueue        add a job to a queue (from a script: --payload-file -)
  jobs list      jobs by queue and state (dead letters: --state dead)
  jobs show      one job: state, attempts and errors, owner and token, result
  jobs retry | cancel | purge   run a dead job again, cancel one, drop finished ones
  wal verify     check a stopped node's data directory
  wal dump       print the Raft log of a stopped node's data directory
  check-config   check a node.toml and print what it means

Run `highlander <command> --help` for a command's options.";

type Run = fn(&Parsed) -> Result<(), CliError>;

/// Every command, with the words that name it and what runs it.
static COMMANDS: &[(&[&str], &Command, Run)] = &[
    (&["secret"], &certs::SECRET, certs::secret),
    (&["certs", "init"], &certs::INIT, certs::init),
    (&["certs", "issue"], &certs::ISSUE, certs::issue),
    (&["status"], &status::STATUS, status::status),
    (&["members", "list"], &members::LIST, members::list),
    (&["members", "add"], &members::ADD, members::add),
    (&["members", "demote"], &members::DEMOTE, members::demote),
    (&["members", "remove"], &members::REMOVE, members::remove),
    (&["members", "replace"], &members::REPLACE, members::replace),
    (&["schedules", "list"], &schedules::LIST, schedules::list),
    (&["schedules", "show"], &schedules::SHOW, schedules::show),
    (&["schedules", "pause"], &schedules::PAUSE, schedules::pause),
    (&["schedules", "resume"], &schedules::RESUME, schedules::resume),
    (&["schedules", "trigger"], &schedules::TRIGGER, schedules::trigger),
    (&["enqueue"], &jobs::ENQUEUE, jobs::enqueue),
    (&["jobs", "list"], &jobs::LIST, jobs::list),
    (&["jobs", "show"], &jobs::SHOW, jobs::show),
    (&["jobs", "retry"], &jobs::RETRY, jobs::retry),
    (&["jobs", "cancel"], &jobs::CANCEL, jobs::cancel),
    (&["jobs", "purge"], &jobs::PURGE, jobs::purge),
    (&["wal", "verify"], &wal::VERIFY, wal::verify),
    (&["wal", "dump"], &wal::DUMP, wal::dump),
    (&["check-config"], &check::CHECK_CONFIG, check::check_config),
];

fn main() -> ExitCode {
    let mut args = Vec::new();
    for (i, arg) in std::env::args_os().skip(1).enumerate() {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                let message = format!("argument {} ({arg:?}) is not valid UTF-8", i + 1);
                return report(CliError::Usage { command: None, message });
            }
        }
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(e),
    }
}

fn run(args: &[String]) -> Result<(), CliError> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        [] => Err(CliError::Usage { command: None, message: "no command given".into() }),
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            Ok(())
        }
        ["-V" | "--version"] => {
            println!("highlander {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        [group @ ("certs" | "wal" | "members" | "schedules"), "-h" | "--help"]
        | ["help", group @ ("certs" | "wal" | "members" | "schedules")] => {
            println!("{}", group_usage(group));
            Ok(())
        }
        ["help", topic @ ..] => match find(topic) {
            Some((command, _, [])) => {
                print_help(command);
                Ok(())
            }
            _ => Err(CliError::Usage {
                command: None,
                message: format!("no help for {:?}", topic.join(" ")),
            }),
        },
        _ => {
            let Some((command, run, rest)) = find(&words) else {
                return Err(unknown(&words));
            };
            match args::parse(command, &args[args.len() - rest.len()..])? {
                None => {
                    print_help(command);
                    Ok(())
                }
                Some(parsed) => run(&parsed),
            }
        }
    }
}

/// The command named by the first words of `words`, and the words after its name.
fn find<'a>(words: &'a [&'a str]) -> Option<(&'static Command, Run, &'a [&'a str])> {
    COMMANDS.iter().find_map(|(name, command, run)| {
        words.starts_with(name).then(|| (*command, *run, &words[name.len()..]))
    })
}

fn unknown(words: &[&str]) -> CliError {
    let message = match words {
        [] => "no command given".to_string(),
        [group @ ("certs" | "wal" | "members" | "schedules")] => {
            let subs: Vec<&str> = COMMANDS
                .iter()
                .filter(|(name, _, _)| name[0] == *group)
                .map(|(name, _, _)| name[1])
                .collect();
            format!("`highlander {group}` needs a subcommand: {}", subs.join(" or "))
        }
        [group @ ("certs" | "wal" | "members" | "schedules"), sub, ..] => {
            format!("unknown subcommand {sub:?} of `highlander {group}`")
        }
        [first, ..] => format!("unknown command {first:?}"),
    };
    CliError::Usage { command: None, message }
}

/// The usage lines of a command group's subcommands.
fn group_usage(group: &str) -> String {
    let lines: Vec<String> = COMMANDS
        .iter()
        .filter(|(name, _, _)| name[0] == group)
        .map(|(_, command, _)| format!("  {}", command.usage))
        .collect();
    format!(
        "Usage:\n{}\n\nRun `highlander {group} <subcommand> --help` for more.",
        lines.join("\n")
    )
}

fn print_help(command: &Command) {
    println!("Usage: {}\n\n{}", command.usage, command.help);
}

fn report(error: CliError) -> ExitCode {
    match error {
        CliError::Usage { command, message } => {
            eprintln!("highlander: {message}");
            match command {
                Some(c) => {
                    eprintln!("\nUsage: {}\nRun `highlander {} --help` for more.", c.usage, c.name)
                }
                None => eprintln!("\n{USAGE}"),
            }
            ExitCode::from(2)
        }
        CliError::Failed(message) => {
            eprintln!("highlander: {message}");
            ExitCode::from(1)
        }
    }
}
