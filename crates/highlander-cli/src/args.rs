//! A small argument parser: `--flag VALUE`, `--flag=VALUE`, switches, repeated flags and
//! `--help`. Each command declares its flags in a [`Command`]; anything else is a usage error
//! that names the argument.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One command's interface.
pub struct Command {
    /// As typed after `highlander`, e.g. `certs init`.
    pub name: &'static str,
    /// The usage line(s) without the leading `Usage: `.
    pub usage: &'static str,
    /// What it does and what its options mean, printed by `--help`.
    pub help: &'static str,
    /// The flags it takes.
    pub flags: &'static [Flag],
}

/// One flag of a command.
pub struct Flag {
    /// With its dashes, e.g. `--dir`.
    pub name: &'static str,
    /// Whether it takes a value (`--dir DIR`) or is a switch (`--json`).
    pub takes_value: bool,
    /// Whether it may be given more than once (`--addr A --addr B`).
    pub repeat: bool,
}

/// A value-taking flag given once.
pub const fn value(name: &'static str) -> Flag {
    Flag { name, takes_value: true, repeat: false }
}

/// A value-taking flag that may be repeated.
pub const fn values(name: &'static str) -> Flag {
    Flag { name, takes_value: true, repeat: true }
}

/// A switch.
pub const fn switch(name: &'static str) -> Flag {
    Flag { name, takes_value: false, repeat: false }
}

/// Why a command did not succeed; decides the exit code.
#[derive(Debug)]
pub enum CliError {
    /// The command line is wrong (exit 2); the message names the argument, the usage line
    /// of the command follows it.
    Usage { command: Option<&'static Command>, message: String },
    /// The command ran and failed (exit 1).
    Failed(String),
}

impl CliError {
    pub fn usage(command: &'static Command, message: impl Into<String>) -> CliError {
        CliError::Usage { command: Some(command), message: message.into() }
    }

    pub fn failed(message: impl Into<String>) -> CliError {
        CliError::Failed(message.into())
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The arguments a command was given.
#[derive(Debug)]
pub struct Parsed {
    command: &'static Command,
    values: BTreeMap<&'static str, Vec<String>>,
}

/// Parses `args` (everything after the command's name). `Ok(None)` means help was asked for.
pub fn parse(command: &'static Command, args: &[String]) -> Result<Option<Parsed>, CliError> {
    let mut values: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        if !arg.starts_with("--") || arg == "--" {
            return Err(CliError::usage(command, format!("unexpected argument {arg:?}")));
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, v)) => (name, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let Some(flag) = command.flags.iter().find(|f| f.name == name) else {
            return Err(CliError::usage(
                command,
                format!("unknown option {name:?} for `highlander {}`", command.name),
            ));
        };
        let value = match (flag.takes_value, inline) {
            (true, Some(v)) => v,
            (true, None) => match args.next() {
                Some(v) if !v.starts_with("--") => v.clone(),
                _ => {
                    return Err(CliError::usage(command, format!("{name} needs a value")));
                }
            },
            (false, Some(_)) => {
                return Err(CliError::usage(command, format!("{name} takes no value")));
            }
            (false, None) => String::new(),
        };
        let seen = values.entry(flag.name).or_default();
        if !seen.is_empty() && !flag.repeat {
            return Err(CliError::usage(command, format!("{name} is given more than once")));
        }
        seen.push(value);
    }
    Ok(Some(Parsed { command, values }))
}

impl Parsed {
    /// A usage error for this command.
    pub fn error(&self, message: impl Into<String>) -> CliError {
        CliError::usage(self.command, message)
    }

    /// Whether a switch was given.
    pub fn switch(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// The value of a flag given at most once.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    /// Every value of a repeatable flag, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.values.get(name).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default()
    }

    /// The value of a required flag; a usage error naming it if missing or empty.
    pub fn required(&self, name: &str) -> Result<&str, CliError> {
        match self.get(name) {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(self.error(format!("{name} must not be empty"))),
            None => Err(self.error(format!("{name} is required"))),
        }
    }

    /// A number in `min..=max`, if the flag was given.
    pub fn number<T>(&self, name: &str, min: T, max: T) -> Result<Option<T>, CliError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(text) = self.get(name) else { return Ok(None) };
        let n: T = text.parse().map_err(|_| {
            self.error(format!("{name}: {text:?} is not a whole number from {min} to {max}"))
        })?;
        if n < min || n > max {
            return Err(self.error(format!("{name}: {n} is out of range ({min} to {max})")));
        }
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static CMD: Command = Command {
        name: "test",
        usage: "highlander test --dir DIR",
        help: "",
        flags: &[value("--dir"), values("--addr"), switch("--json"), value("--days")],
    };

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn message(r: Result<Option<Parsed>, CliError>) -> String {
        match r {
            Err(CliError::Usage { message, .. }) => message,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn parses_values_switches_and_repeats() {
        let p = parse(&CMD, &args(&["--dir", "d", "--addr=a", "--addr", "b", "--json"]))
            .unwrap()
            .unwrap();
        assert_eq!(p.get("--dir"), Some("d"));
        assert_eq!(p.all("--addr"), ["a", "b"]);
        assert!(p.switch("--json"));
        assert_eq!(p.number::<u32>("--days", 1, 10).unwrap(), None);
        assert!(parse(&CMD, &args(&["--dir", "d", "-h"])).unwrap().is_none());
    }

    #[test]
    fn errors_name_the_argument() {
        assert!(message(parse(&CMD, &args(&["--colour"]))).contains("--colour"));
        assert!(message(parse(&CMD, &args(&["stray"]))).contains("stray"));
        assert!(message(parse(&CMD, &args(&["--dir"]))).contains("--dir needs a value"));
        assert!(message(parse(&CMD, &args(&["--dir", "--json"]))).contains("--dir"));
        assert!(message(parse(&CMD, &args(&["--dir", "a", "--dir", "b"]))).contains("once"));
        assert!(message(parse(&CMD, &args(&["--json=1"]))).contains("--json takes no value"));
        let p = parse(&CMD, &args(&["--days", "x"])).unwrap().unwrap();
        assert!(matches!(p.number::<u32>("--days", 1, 9), Err(CliError::Usage { message, .. })
            if message.contains("--days") && message.contains("\"x\"")));
        let p = parse(&CMD, &args(&["--days", "0"])).unwrap().unwrap();
        assert!(p.number::<u32>("--days", 1, 9).is_err());
        assert!(matches!(p.required("--dir"), Err(CliError::Usage { message, .. })
            if message == "--dir is required"));
    }
}
