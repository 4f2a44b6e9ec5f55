//! A real cluster: three processes of the `node` example on 127.0.0.1, talking QUIC with
//! mutual TLS, each with its Raft log on disk. The test drives them through their stdin and
//! reads what they do from their stdout (see the doc comment of `examples/node.rs`).
//!
//! `cargo test` builds the example; `cargo test --test processes` alone does not, so run
//! `cargo build --examples` first in that case. Waits are wall-clock (real processes) and
//! generous; nothing here asserts on timing.

use highlander::quic::ClusterSecret;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long any one wait may take before the test gives up. Startup and failover take a few
/// seconds; this leaves room for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(40);
const KEY: &str = "demo";
/// The session TTL of the standard timing the nodes run with.
const TTL: Duration = Duration::from_secs(2);

/// The two tests start three processes each; run them one after the other so they do not
/// compete for the machine's cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// One line a node printed.
#[derive(Clone, Debug)]
struct Event {
    /// When the test read the line.
    at: Instant,
    node: u64,
    /// Which start of that node (1 for the first process, 2 after a restart, ...).
    life: u32,
    name: String,
    fields: BTreeMap<String, String>,
}

impl Event {
    fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    fn num(&self, field: &str) -> Option<u64> {
        self.get(field)?.parse().ok()
    }

    fn text(&self) -> Option<&str> {
        self.get("text")
    }
}

/// Splits `name k=v k="quoted \"text\""` into its name and fields.
fn parse_event(line: &str) -> (String, BTreeMap<String, String>) {
    let (name, mut rest) = line.split_once(' ').unwrap_or((line, ""));
    let mut fields = BTreeMap::new();
    loop {
        rest = rest.trim_start();
        let Some((key, after)) = rest.split_once('=') else { break };
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('t') => value.push('\t'),
                        Some('r') => value.push('\r'),
                        Some(other) => value.push(other),
                        None => {}
                    },
                    c => value.push(c),
                }
            }
            (value, &quoted[end..])
        } else {
            let end = after.find(' ').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        fields.insert(key.to_string(), value);
        rest = tail;
    }
    (name.to_string(), fields)
}

#[derive(Default)]
struct Events {
    list: Mutex<Vec<Event>>,
    changed: Condvar,
}

impl Events {
    fn push(&self, e: Event) {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).push(e);
        self.changed.notify_all();
    }

    fn snapshot(&self) -> Vec<Event> {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `found` returns something for the events so far, or panics naming `what`.
    /// Returns when a node says something new, or after `at_most`.
    fn next_or(&self, at_most: Duration) {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let seen = list.len();
        let _ = self.changed.wait_timeout_while(list, at_most, |l| l.len() == seen);
    }

    fn wait<T>(&self, what: &str, mut found: impl FnMut(&[Event]) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(t) = found(&list) {
                return t;
            }
            let now = Instant::now();
            assert!(now < deadline, "gave up waiting for {what} after {WAIT:?}");
            list = self
                .changed
                .wait_timeout(list, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

struct Proc {
    child: Child,
    stdin: ChildStdin,
}

/// Three node processes and everything they need. Dropping it kills and reaps every child,
/// also when the test panics (and then prints what the nodes said).
struct Cluster {
    exe: PathBuf,
    /// Arguments every node gets besides its id, peers, secret and data directory.
    extra: Vec<String>,
    dir: tempfile::TempDir,
    ports: BTreeMap<u64, u16>,
    procs: BTreeMap<u64, Proc>,
    lives: BTreeMap<u64, u32>,
    events: Arc<Events>,
}

fn node_exe() -> PathBuf {
    let test = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/processes-<hash> -> target/<profile>/examples/node
    let profile_dir = test.parent().and_then(Path::parent).expect("target/<profile>");
    let exe = profile_dir.join("examples").join(format!("node{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.is_file(),
        "{} does not exist: run `cargo build --examples` first (`cargo test` builds it, \
         `cargo test --test processes` alone does not)",
        exe.display()
    );
    exe
}

/// Distinct free UDP ports on 127.0.0.1: held together while chosen, so they differ.
fn free_ports(n: usize) -> Vec<u16> {
    let sockets: Vec<std::net::UdpSocket> =
        (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind")).collect();
    sockets.iter().map(|s| s.local_addr().expect("local addr").port()).collect()
}

impl Cluster {
    fn start(n: u64) -> Cluster {
        Cluster::start_with(n, &[])
    }

    fn start_with(n: u64, extra: &[&str]) -> Cluster {
        let exe = node_exe();
        let dir = tempfile::tempdir().expect("temp dir");
        let secret = ClusterSecret::generate().expect("random secret");
        std::fs::write(dir.path().join("cluster.secret"), secret.expose()).expect("secret file");
        let ports = (1..=n).zip(free_ports(n as usize)).collect();
        let mut cluster = Cluster {
            exe,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            dir,
            ports,
            procs: BTreeMap::new(),
            lives: BTreeMap::new(),
            events: Arc::default(),
        };
        for id in 1..=n {
            cluster.spawn(id);
        }
        cluster
    }

    fn ids(&self) -> Vec<u64> {
        self.ports.keys().copied().collect()
    }

    fn life(&self, id: u64) -> u32 {
        self.lives.get(&id).copied().unwrap_or(0)
    }

    /// Starts node `id` (again) on its port and data directory.
    fn spawn(&mut self, id: u64) {
        assert!(!self.procs.contains_key(&id), "node {id} is already running");
        let life = self.life(id) + 1;
        self.lives.insert(id, life);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--id").arg(id.to_string());
        for (peer, port) in &self.ports {
            cmd.arg("--peer").arg(format!("{peer}=127.0.0.1:{port}"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{id}.log")))
            .expect("log file");
        cmd.arg("--secret-file")
            .arg(self.dir.path().join("cluster.secret"))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{id}")))
            .args(&self.extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn the node example");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let events = self.events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (name, fields) = parse_event(&line);
                events.push(Event { at: Instant::now(), node: id, life, name, fields });
            }
            // The process closed its stdout: it has exited (or is about to).
            let fields = BTreeMap::new();
            events.push(Event { at: Instant::now(), node: id, life, name: "eof".into(), fields });
        });
        self.procs.insert(id, Proc { child, stdin });
    }

    /// SIGKILL, then reap.
    fn kill(&mut self, id: u64) {
        let mut p = self.procs.remove(&id).expect("a running node");
        p.child.kill().expect("SIGKILL");
        p.child.wait().expect("reap");
    }

    /// Sends a signal (`STOP`, `CONT`) to node `id`'s process.
    fn signal(&self, id: u64, signal: &str) {
        let pid = self.procs[&id].child.id().to_string();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }

    /// Waits until node `id`'s current process has exited, reaps it, and returns its exit code.
    fn wait_exit(&mut self, id: u64) -> Option<i32> {
        let life = self.life(id);
        self.events.wait("the process to exit", |events| {
            events.iter().any(|e| e.node == id && e.life == life && e.name == "eof").then_some(())
        });
        let mut p = self.procs.remove(&id).expect("a running node");
        p.child.wait().expect("reap").code()
    }

    /// The leader node `via` reports.
    fn leader(&mut self, via: u64) -> u64 {
        let from = self.len();
        self.command(via, "status");
        self.events.wait("a status line naming a leader", |events| {
            events[from..]
                .iter()
                .find(|e| e.name == "status" && e.node == via)
                .and_then(|e| e.num("leader"))
        })
    }

    /// Sends batches of messages through `via` for at least `period`, each batch waiting for
    /// its acknowledgements; returns every text acknowledged.
    fn send_for(&mut self, via: &[u64], prefix: &str, period: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut sent = Vec::new();
        let mut round = 0;
        while start.elapsed() < period {
            let batch = texts(&format!("{prefix}{round}"), 4);
            self.send_all(via, &batch);
            sent.extend(batch);
            round += 1;
        }
        sent
    }

    /// Checks what every process printed: no message was taken under a token once a larger
    /// token of the key had started (one owner at every moment the test can observe).
    fn assert_one_owner_at_a_time(&self) {
        let mut newest = 0u64;
        for e in self.events.snapshot() {
            match e.name.as_str() {
                "started" => newest = newest.max(e.num("token").unwrap_or(0)),
                "delivered" => {
                    let token = e.num("token").unwrap_or(0);
                    assert!(
                        token >= newest,
                        "n{}/{} took {:?} under t{token} after t{newest} had started",
                        e.node,
                        e.life,
                        e.text()
                    );
                }
                _ => {}
            }
        }
    }

    fn command(&mut self, id: u64, line: &str) {
        let p = self.procs.get_mut(&id).expect("a running node");
        writeln!(p.stdin, "{line}").expect("write to the node's stdin");
        p.stdin.flush().expect("flush the node's stdin");
    }

    /// Waits for `ready` from the current life of every running node.
    fn wait_ready(&self) {
        let want: BTreeSet<(u64, u32)> = self.procs.keys().map(|&id| (id, self.life(id))).collect();
        self.events.wait("every node to be ready", |events| {
            let ready: BTreeSet<(u64, u32)> =
                events.iter().filter(|e| e.name == "ready").map(|e| (e.node, e.life)).collect();
            want.is_subset(&ready).then_some(())
        });
    }

    /// Waits for a `started` line after event `from` that `accept` likes; returns its node
    /// and token.
    /// Waits for a `started` line after event `from` that `accept` likes; returns its node,
    /// token and when it was read.
    fn wait_started(
        &self,
        what: &str,
        from: usize,
        accept: impl Fn(&Event) -> bool,
    ) -> (u64, u64, Instant) {
        self.events.wait(what, |events| {
            let e = events.get(from..)?.iter().find(|e| e.name == "started" && accept(e))?;
            Some((e.node, e.num("token").expect("started lines carry a numeric token"), e.at))
        })
    }

    fn len(&self) -> usize {
        self.events.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Sends every text (round-robin over `via`) until each is acknowledged with a `sent`
    /// line; an `error` (say, a timeout during the failover) sends it again. Returns once
    /// all are acknowledged.
    fn send_all(&mut self, via: &[u64], texts: &[String]) {
        let mut pending: BTreeMap<String, (usize, u32)> = BTreeMap::new();
        for (i, text) in texts.iter().enumerate() {
            let from = self.len();
            self.command(via[i % via.len()], &format!("send {KEY} {text}"));
            pending.insert(text.clone(), (from, 1));
        }
        while !pending.is_empty() {
            let (acked, failed) = self.events.wait("send acknowledgements", |events| {
                let mut acked = Vec::new();
                let mut failed = Vec::new();
                for (text, (from, _)) in &pending {
                    let answers = events[*from..].iter().filter(|e| e.text() == Some(text));
                    for e in answers {
                        if e.name == "sent" {
                            acked.push(text.clone());
                            break;
                        }
                        if e.name == "error" && e.get("op") == Some("send") {
                            failed.push(text.clone());
                            break;
                        }
                    }
                }
                (!acked.is_empty() || !failed.is_empty()).then_some((acked, failed))
            });
            for text in acked {
                pending.remove(&text);
            }
            for text in failed {
                let tries = pending[&text].1;
                assert!(tries < 5, "{text:?} could not be sent in {tries} tries");
                let from = self.len();
                let live: Vec<u64> =
                    via.iter().copied().filter(|n| self.procs.contains_key(n)).collect();
                self.command(live[tries as usize % live.len()], &format!("send {KEY} {text}"));
                pending.insert(text, (from, tries + 1));
            }
        }
    }

    /// Waits until every text has been delivered to a handler (by any node, at any time).
    fn wait_delivered(&self, texts: &[String]) {
        let want: BTreeSet<&str> = texts.iter().map(String::as_str).collect();
        self.events.wait("every acknowledged message to be delivered", |events| {
            let got: BTreeSet<&str> = events
                .iter()
                .filter(|e| e.name == "delivered" && e.get("key") == Some(KEY))
                .filter_map(Event::text)
                .collect();
            want.is_subset(&got).then_some(())
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut p) in std::mem::take(&mut self.procs) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- what the nodes printed (node/life: line) ---");
            for e in self.events.snapshot().iter().rev().take(80).rev() {
                eprintln!("n{}/{}: {} {:?}", e.node, e.life, e.name, e.fields);
            }
            for id in self.ids() {
                let log = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- node {id}'s log, last lines ---");
                for line in &lines[lines.len().saturating_sub(25)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[test]
fn a_killed_owner_process_is_replaced_and_no_message_is_lost() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.wait_ready();
    let (owner, token, _) = c.wait_started("a first owner", 0, |_| true);

    let mut sent = texts("before", 12);
    c.send_all(&c.ids(), &sent);
    c.wait_delivered(&sent);

    let survivors: Vec<u64> = c.ids().into_iter().filter(|n| *n != owner).collect();
    let from = c.len();
    let killed = Instant::now();
    c.kill(owner);
    // Sent while the owner is dead and its session not yet expired: they wait in the queue.
    let during = texts("during", 8);
    c.send_all(&survivors, &during);
    let (new_owner, new_token, at) = c.wait_started("a new owner", from, |e| e.node != owner);
    // Reported, never asserted: the figure belongs to the benchmark.
    eprintln!(
        "n{owner} (t{token}) killed; n{new_owner} runs it with t{new_token} {} ms later",
        (at - killed).as_millis()
    );
    assert!(survivors.contains(&new_owner));
    assert!(new_token > token, "token {new_token} of the new owner is not above {token}");
    let after = texts("after", 8);
    c.send_all(&survivors, &after);
    sent.extend(during);
    sent.extend(after);
    c.wait_delivered(&sent);
}

#[test]
fn a_cluster_whose_processes_are_all_killed_comes_back_with_its_singleton_and_messages() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.wait_ready();
    c.wait_started("a first owner", 0, |_| true);
    let ids = c.ids();

    let mut acknowledged = texts("early", 10);
    c.send_all(&ids, &acknowledged);
    c.wait_delivered(&acknowledged);

    // Hold further messages in the queue: no handler takes them until the restart.
    for &id in &ids {
        c.command(id, "pause");
    }
    c.events.wait("every node to pause", |events| {
        let paused: BTreeSet<u64> =
            events.iter().filter(|e| e.name == "paused").map(|e| e.node).collect();
        (paused.len() == ids.len()).then_some(())
    });
    let held = texts("held", 10);
    c.send_all(&ids, &held);
    acknowledged.extend(held.iter().cloned());
    // Every held message is in the replicated queue before the power cut.
    let deadline = Instant::now() + WAIT;
    loop {
        let from = c.len();
        c.command(ids[0], "status");
        let queued = c.events.wait("a status report", |events| {
            events[from..]
                .iter()
                .find(|e| e.name == "owner" && e.get("key") == Some(KEY))
                .map(|e| e.num("queued").unwrap_or(0))
        });
        if queued >= held.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {queued} messages queued after {WAIT:?}");
        // Ask again once the nodes have moved on (a new line), or after 100 ms.
        c.events.next_or(Duration::from_millis(100));
    }
    let before = c.events.snapshot();
    let max_before = before
        .iter()
        .filter(|e| e.name == "started")
        .filter_map(|e| e.num("token"))
        .max()
        .expect("an owner ran");
    // At most one held message was taken (by a handler already waiting when told to pause).
    let taken: BTreeSet<&str> =
        before.iter().filter(|e| e.name == "delivered").filter_map(Event::text).collect();
    let still_queued: Vec<String> =
        held.iter().filter(|t| !taken.contains(t.as_str())).cloned().collect();
    assert!(still_queued.len() >= held.len() - 1, "the handlers did not pause");

    // Power cut: every process at once, no hand-over, nothing flushed that was not synced.
    for &id in &ids {
        c.kill(id);
    }
    let from = c.len();
    let restarted = Instant::now();
    for &id in &ids {
        c.spawn(id);
    }
    c.wait_ready();
    let (owner, token, at) = c.wait_started("an owner after the restart", from, |e| e.life == 2);
    eprintln!(
        "all killed and restarted; n{owner} runs it with t{token} {} ms after the restart",
        (at - restarted).as_millis()
    );
    assert!(token > max_before, "token {token} after the restart is not above {max_before}");
    // What was still queued at the power cut comes out of the queue that survived on disk.
    c.wait_delivered(&acknowledged);
    let after = c.events.snapshot();
    let redelivered: BTreeSet<&str> =
        after[from..].iter().filter(|e| e.name == "delivered").filter_map(Event::text).collect();
    for text in &still_queued {
        assert!(
            redelivered.contains(text.as_str()),
            "{text:?} was not delivered after the restart"
        );
    }
}

/// Item 8 of the safety issue: the owner's process is stopped (SIGSTOP) for three session
/// TTLs while messages keep coming, then continued. Another node must take the key over only
/// after the old lease ran out, the resumed process must take no message and do nothing under
/// its old token, and every acknowledged message must be delivered.
#[test]
fn a_paused_owner_does_nothing_under_its_old_token_after_resuming() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.wait_ready();
    let (owner, token, _) = c.wait_started("a first owner", 0, |_| true);
    let others: Vec<u64> = c.ids().into_iter().filter(|n| *n != owner).collect();
    let mut sent = texts("before", 8);
    c.send_all(&c.ids(), &sent);
    c.wait_delivered(&sent);

    let from = c.len();
    c.signal(owner, "STOP");
    let paused = Instant::now();
    sent.extend(c.send_for(&others, "paused", TTL * 3));
    let (new_owner, new_token, _) = c.wait_started("a new owner", from, |e| e.node != owner);
    assert!(new_token > token);
    eprintln!("n{owner} (t{token}) paused; n{new_owner} took over with t{new_token}");
    c.signal(owner, "CONT");
    let resumed = c.len();
    eprintln!("resumed after {} ms", paused.elapsed().as_millis());
    sent.extend(c.send_for(&c.ids(), "resumed", TTL));
    c.wait_delivered(&sent);

    let events = c.events.snapshot();
    let after: Vec<&Event> = events[resumed..]
        .iter()
        .filter(|e| e.node == owner && e.life == 1 && e.num("token") == Some(token))
        .collect();
    assert!(
        after.iter().all(|e| e.name != "delivered"),
        "the resumed owner took messages under its old token: {after:?}"
    );
    c.assert_one_owner_at_a_time();
}

/// The same with the leader stopped: keys stay off the leader's node, so the owner keeps its
/// lease through the election; nothing is lost, and the resumed leader disturbs nothing.
#[test]
fn a_paused_leader_loses_nothing_and_gives_no_key_two_owners() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.wait_ready();
    c.wait_started("a first owner", 0, |_| true);
    let leader = c.leader(1);
    let others: Vec<u64> = c.ids().into_iter().filter(|n| *n != leader).collect();
    let mut sent = texts("before", 8);
    c.send_all(&c.ids(), &sent);

    c.signal(leader, "STOP");
    sent.extend(c.send_for(&others, "paused", TTL * 3));
    c.signal(leader, "CONT");
    sent.extend(c.send_for(&c.ids(), "resumed", TTL));
    c.wait_delivered(&sent);
    c.assert_one_owner_at_a_time();
}

/// Finding 7 of the safety audit: a handler blocked in synchronous code cannot be aborted and
/// used to outlive its lease with only a log line to show for it. With `--fail-stop` the
/// watchdog ends the process (exit code 70) half a lease margin after the deadline, before
/// anyone else can own the key; the key then moves on with a larger token.
#[test]
fn a_handler_stuck_past_its_lease_makes_a_fail_stop_node_exit() {
    let _serial = serial();
    let mut c = Cluster::start_with(3, &["--fail-stop"]);
    c.wait_ready();
    c.wait_started("a first owner", 0, |_| true);
    let deadline = Instant::now() + WAIT;
    // Block the handler of whichever node owns the key when the command arrives: the first
    // owner may hand the key on (placement keeps keys off the leader's node) before it.
    let (owner, token, from) = loop {
        let (owner, token) = c
            .events
            .snapshot()
            .iter()
            .rev()
            .find(|e| e.name == "started")
            .map(|e| (e.node, e.num("token").expect("started lines carry a numeric token")))
            .expect("an owner started");
        let from = c.len();
        c.command(owner, "block 30000");
        let asked = Instant::now();
        let blocked = loop {
            let events = c.events.snapshot();
            if events[from..].iter().any(|e| e.node == owner && e.name == "blocking") {
                break true;
            }
            if asked.elapsed() > Duration::from_secs(5) {
                break false;
            }
            c.events.next_or(Duration::from_millis(200));
        };
        if blocked {
            break (owner, token, from);
        }
        assert!(Instant::now() < deadline, "gave up waiting for the handler to block");
    };
    let others: Vec<u64> = c.ids().into_iter().filter(|n| *n != owner).collect();
    // The others stop answering: the owner's lease lapses while its handler is stuck.
    for &o in &others {
        c.signal(o, "STOP");
    }
    let stopped = Instant::now();
    let code = c.wait_exit(owner);
    eprintln!(
        "n{owner} exited with {code:?} {} ms after its peers stopped",
        stopped.elapsed().as_millis()
    );
    for &o in &others {
        c.signal(o, "CONT");
    }
    assert_eq!(code, Some(highlander::FAIL_STOP_EXIT_CODE));
    let log = std::fs::read_to_string(c.dir.path().join(format!("node-{owner}.log"))).unwrap();
    assert!(log.contains("still running after the lease deadline"), "{log}");
    let (next, next_token, _) = c.wait_started("a new owner", from, |e| e.node != owner);
    assert!(next_token > token);
    eprintln!("n{next} runs it with t{next_token}");
    c.assert_one_owner_at_a_time();
}

#[test]
fn event_lines_parse() {
    let (name, f) = parse_event(r#"delivered key=demo seq=3 token=7 text="a \"b\" c=d""#);
    assert_eq!(name, "delivered");
    assert_eq!(f["seq"], "3");
    assert_eq!(f["text"], "a \"b\" c=d");
    let (name, f) = parse_event("bye id=1");
    assert_eq!((name.as_str(), f["id"].as_str()), ("bye", "1"));
}
