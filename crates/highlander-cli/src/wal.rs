//! `highlander wal verify` and `highlander wal dump`: read a stopped node's data directory.

use crate::args::{CliError, Command, Parsed, value};
use highlander::{DataDirReport, Error};
use std::path::Path;

const DEFAULT_DUMP_LIMIT: usize = 1000;

pub static VERIFY: Command = Command {
    name: "wal verify",
    usage: "highlander wal verify --dir DIR",
    help: "\
Checks a node's data directory without changing it: every log record's checksum, the hard
state (vote, committed, purge point), the snapshot files, and the invariants between them.
Prints a summary; exits with 1 if a node could not start on it as it is.

The node must be stopped: the check takes the directory's lock, as a node does.

Options:
  --dir DIR   the node's data_dir",
    flags: &[value("--dir")],
};

pub static DUMP: Command = Command {
    name: "wal dump",
    usage: "highlander wal dump --dir DIR [--from I] [--limit K]",
    help: "\
Prints the Raft log of a stopped node's data directory, one line per entry: its index, its
term, and what it carries (the commands of a batch, a membership change, or a new leader's
blank entry).

Options:
  --dir DIR    the node's data_dir
  --from I     the first index to print (default: the first in the log)
  --limit K    print at most K entries (default 1000)",
    flags: &[value("--dir"), value("--from"), value("--limit")],
};

pub fn verify(args: &Parsed) -> Result<(), CliError> {
    let dir = data_dir(args)?;
    let report = highlander::verify_data_dir(dir).map_err(|e| open_error(dir, e))?;
    print!("{}", render(dir, &report));
    if report.healthy {
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{} is not healthy: a node would refuse to start on it",
            dir.display()
        )))
    }
}

pub fn dump(args: &Parsed) -> Result<(), CliError> {
    let from = args.number("--from", 0, u64::MAX)?.unwrap_or(0);
    let limit = args.number("--limit", 1, usize::MAX)?.unwrap_or(DEFAULT_DUMP_LIMIT);
    let dir = data_dir(args)?;
    // One more than asked, to tell whether there is more.
    let entries = highlander::dump_data_dir(dir, from, limit.saturating_add(1))
        .map_err(|e| open_error(dir, e))?;
    if entries.is_empty() {
        eprintln!("no entries from index {from} on");
        return Ok(());
    }
    let width = entries.iter().map(|e| e.index.to_string().len()).max().unwrap_or(1);
    for entry in entries.iter().take(limit) {
        let content = entry.content.join(" | ");
        println!("{:>width$}  t{}  {}", entry.index, entry.term, content.replace('\n', "\\n"));
    }
    if let Some(next) = entries.get(limit) {
        eprintln!(
            "stopped after {limit} entries; continue with --from {} (or raise --limit)",
            next.index
        );
    }
    Ok(())
}

/// The directory, checked to look like a data directory: reading one takes its lock, which
/// would leave a LOCK file behind in any directory given by mistake.
fn data_dir(args: &Parsed) -> Result<&Path, CliError> {
    let dir = Path::new(args.required("--dir")?);
    if !dir.is_dir() {
        return Err(CliError::failed(format!("--dir {}: no such directory", dir.display())));
    }
    let known = ["hardstate", "log", "snapshots", "LOCK"];
    if !known.iter().any(|name| dir.join(name).exists()) {
        return Err(CliError::failed(format!(
            "--dir {}: not a highlander data directory (it holds none of {})",
            dir.display(),
            known.join(", ")
        )));
    }
    Ok(dir)
}

fn open_error(dir: &Path, e: Error) -> CliError {
    let text = match e {
        Error::Storage(text) => text,
        other => other.to_string(),
    };
    if text.contains("is locked by") {
        CliError::failed(format!(
            "{} is in use by a running node; stop the node first ({text})",
            dir.display()
        ))
    } else if text.starts_with("corrupt ") || text.contains("invariant") {
        CliError::failed(format!(
            "{} is damaged, a node would refuse to start on it: {text}",
            dir.display()
        ))
    } else {
        CliError::failed(format!("{} cannot be read: {text}", dir.display()))
    }
}

fn render(dir: &Path, r: &DataDirReport) -> String {
    let entry = |e: Option<(u64, u64)>| match e {
        Some((term, index)) => format!("index {index} (term {term})"),
        None => "none".to_string(),
    };
    let mut out = format!(
        "{}: {}\n",
        dir.display(),
        if r.healthy { "healthy" } else { "NOT HEALTHY: a node would refuse to start" }
    );
    for problem in &r.problems {
        out.push_str(&format!("  problem      {problem}\n"));
    }
    let lines = [
        ("vote", r.vote.clone().unwrap_or_else(|| "none".into())),
        ("committed", entry(r.committed)),
        ("last purged", entry(r.last_purged)),
        ("last entry", entry(r.last)),
        (
            "checked",
            format!(
                "{} record{} in {} segment{}",
                r.records,
                plural(r.records as usize),
                r.segments,
                plural(r.segments)
            ),
        ),
        (
            "torn tail",
            r.torn_tail
                .clone()
                .map(|t| format!("{t}; a node cuts it on start"))
                .unwrap_or_else(|| "none".into()),
        ),
    ];
    for (name, value) in lines {
        out.push_str(&format!("  {name:<12} {value}\n"));
    }
    if r.snapshots.is_empty() {
        out.push_str("  snapshots    none\n");
    }
    for (i, s) in r.snapshots.iter().enumerate() {
        out.push_str(&format!("  {:<12} {s}\n", if i == 0 { "snapshots" } else { "" }));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
