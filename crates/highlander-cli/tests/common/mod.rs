//! Shared by the integration tests: run the built `highlander` binary with a deadline, and
//! never leave a child process behind.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What one run of the command produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with everything the command said unless it exited with `code`.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "exit code of a run that said:\n{self:#?}");
        self
    }
}

/// Kills and reaps the child when dropped, also while a failing test unwinds.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `highlander args...` and waits at most 60 s for it.
pub fn highlander(args: &[&str]) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_highlander"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the highlander binary starts");
    let mut child = Reap(child);
    // Read both pipes on threads so a chatty child never blocks on a full pipe. The child has
    // exited when its stdout closes; the channel says so without polling.
    let (closed, stdout_closed) = std::sync::mpsc::channel();
    let drain = |pipe: Option<Box<dyn Read + Send>>,
                 closed: Option<std::sync::mpsc::Sender<()>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            if let Some(closed) = closed {
                let _ = closed.send(());
            }
            text
        })
    };
    let stdout =
        drain(child.0.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), Some(closed));
    let stderr = drain(child.0.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), None);
    // On a timeout the panic drops `child`, which kills and reaps it.
    assert!(
        stdout_closed.recv_timeout(Duration::from_secs(60)).is_ok(),
        "highlander {args:?} ran for over 60 s"
    );
    let status = child.0.wait().expect("wait for highlander");
    Run {
        code: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// [`highlander`] from async code, off the runtime's worker threads (the nodes under test
/// run on them and must keep their timers).
pub async fn highlander_async(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        highlander(&args)
    })
    .await
    .expect("the run finishes")
}

/// A path as a `&str` for the command line.
pub fn s(path: &std::path::Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
