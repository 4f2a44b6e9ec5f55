//! One highlander node per process, talking QUIC with mutual TLS to its peers, hosting a demo
//! singleton. Start three of them (three terminals, or a script) and they form a cluster: the
//! singleton runs on one, and moves to another when that one dies.
//!
//! # Three terminals
//!
//! Build once, make a cluster secret (every node reads the same file), then start one node per
//! terminal. With flags:
//!
//! ```text
//! cargo build --release --example node
//! mkdir -p /tmp/hl
//! target/release/examples/node --generate-secret /tmp/hl/cluster.secret
//! #   (or: cargo run -p highlander-cli -- secret --out /tmp/hl/cluster.secret,
//! #    or: head -c 32 /dev/urandom | base64 > /tmp/hl/cluster.secret)
//!
//! # terminal 1
//! target/release/examples/node --id 1 --listen 127.0.0.1:7001 \
//!     --peer 1=127.0.0.1:7001 --peer 2=127.0.0.1:7002 --peer 3=127.0.0.1:7003 \
//!     --secret-file /tmp/hl/cluster.secret --data-dir /tmp/hl/n1
//! # terminal 2
//! target/release/examples/node --id 2 --listen 127.0.0.1:7002 \
//!     --peer 1=127.0.0.1:7001 --peer 2=127.0.0.1:7002 --peer 3=127.0.0.1:7003 \
//!     --secret-file /tmp/hl/cluster.secret --data-dir /tmp/hl/n2
//! # terminal 3
//! target/release/examples/node --id 3 --listen 127.0.0.1:7003 \
//!     --peer 1=127.0.0.1:7001 --peer 2=127.0.0.1:7002 --peer 3=127.0.0.1:7003 \
//!     --secret-file /tmp/hl/cluster.secret --data-dir /tmp/hl/n3
//! ```
//!
//! Or with one `node.toml` per node (see `highlander::NodeConfig` for every field), e.g.
//! `/tmp/hl/node1.toml`:
//!
//! ```toml
//! id = 1
//! listen = "127.0.0.1:7001"
//! data_dir = "n1"                  # relative paths are resolved against the file's directory
//!
//! [peers]
//! 1 = "127.0.0.1:7001"
//! 2 = "127.0.0.1:7002"
//! 3 = "127.0.0.1:7003"
//!
//! [tls]
//! cluster_secret_file = "cluster.secret"
//!
//! # [timing]
//! # preset = "fast"                # session TTL 500 ms instead of 2 s
//! ```
//!
//! `node2.toml` and `node3.toml` differ only in `id`, `listen` and `data_dir`. Then
//! `target/release/examples/node --config /tmp/hl/node1.toml` in terminal 1, and so on.
//!
//! Type `send demo hello` in any terminal: the owner's terminal prints `delivered`. Press
//! Ctrl-C in the owner's terminal (a graceful hand-over, in milliseconds) or kill it with
//! `kill -9` (a crash: another node takes over after the session TTL, at most about 2.1 s) and watch
//! another terminal print `started` with a larger token. A node restarted on its data
//! directory rejoins with everything it had acknowledged.
//!
//! # Flags
//!
//! ```text
//! --config PATH          a node.toml; --data-dir and --fast may still override it
//! --id N                 this node's id
//! --listen ADDR          the UDP address to listen on (default: this node's --peer address)
//! --peer ID=ADDR         every node of the cluster, this one included (repeat the flag)
//! --secret-file PATH     the cluster secret (from --generate-secret)
//! --data-dir PATH        keep the Raft log on disk (without it: memory, and the node must
//!                        never be restarted under the same id)
//! --fast                 Timing::fast(): session TTL 500 ms
//! --voters N             the first N ids vote, the other peers are learners (default: up
//!                        to 5); the same on every node
//! --fail-stop            exit (code 70) if a task still runs after its lease deadline
//! --key NAME             the singleton key to host (default: demo)
//! --no-stdin             read no commands (run under a service manager; stop with SIGTERM)
//! --generate-secret PATH write a fresh cluster secret to PATH (mode 0600) and exit
//! ```
//!
//! # Driving it from a program
//!
//! Commands, one per line on stdin: `send <key> <text>` (the text is the rest of the line),
//! `status`, `pause` / `resume` (this node's handler stops / resumes taking messages, so they
//! stay queued), `block <ms>` (this node's handler blocks its thread in synchronous code for
//! that long, as a stuck handler would), `shutdown` (graceful: hands the singleton over
//! first), `help`. End of stdin
//! also shuts the node down gracefully, so a node whose parent died does not linger.
//!
//! Events, one per line on stdout: an event name, then `name=value` fields; a value is bare or,
//! if it is text, quoted and escaped as a Rust string literal (`{:?}`).
//!
//! ```text
//! listening id=1 addr=127.0.0.1:7001 storage=disk timing=standard
//! ready id=1 key=demo                        session open and the singleton registered
//! started key=demo token=7 node=1            this node now runs the singleton
//! delivered key=demo seq=3 token=7 text="hello"
//! stopped key=demo token=7                   the handler returned (asked to stop)
//! sent key=demo seq=3 text="hello"           a `send` was committed on a quorum
//! blocking key=demo token=7 ms=5000         the handler blocks its thread (`block`)
//! status id=1 leader=2 term=4 applied=31 members=1,2,3 sessions=3 lease_ms=1800 overruns=0
//! owner key=demo slot=0 node=1 token=7 queued=0 candidates=1,2,3
//! paused | resumed
//! error op=send key=demo text="hello" reason="..."
//! shutting-down id=1 reason=command          (or signal, eof)
//! bye id=1
//! ```
//!
//! Logs go to stderr (`RUST_LOG` filters them). SIGTERM and Ctrl-C shut down gracefully; a
//! second one exits at once.

use highlander::quic::ClusterSecret;
use highlander::{Error, Node, NodeBuilder, NodeConfig, NodeId, TaskContext, Timing};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

const USAGE: &str = "usage: node --config node.toml [--data-dir PATH] [--fast]
       node --id N --peer ID=ADDR... --secret-file PATH [--listen ADDR] [--data-dir PATH] [--fast]
            [--voters N]
       node --generate-secret PATH
common: [--key NAME] [--no-stdin]; see the doc comment of examples/node.rs";

/// Writes one event line to stdout. A closed stdout (the reader went away) is not this
/// node's problem: the line is dropped rather than panicking like `println!` would.
macro_rules! emit {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = out.write_fmt(format_args!($($arg)*));
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }};
}

/// A text value, quoted and escaped so a line stays one line and splits unambiguously.
fn quoted(text: &str) -> String {
    format!("{text:?}")
}

/// A key: bare when that is unambiguous (the usual case), quoted otherwise.
fn key_field(key: &str) -> String {
    if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c == '"' || c == '=') {
        quoted(key)
    } else {
        key.to_string()
    }
}

fn id_list(ids: impl IntoIterator<Item = NodeId>) -> String {
    let mut s = String::new();
    for (i, id) in ids.into_iter().enumerate() {
        let _ = write!(s, "{}{}", if i == 0 { "" } else { "," }, id.0);
    }
    s
}

/// The command line, parsed but not yet checked against itself.
#[derive(Default)]
struct Args {
    config: Option<PathBuf>,
    id: Option<u64>,
    listen: Option<SocketAddr>,
    peers: Vec<(u64, SocketAddr)>,
    secret_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    fast: bool,
    fail_stop: bool,
    key: Option<String>,
    no_stdin: bool,
    generate_secret: Option<PathBuf>,
    voters: Option<usize>,
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args::default();
    while let Some(arg) = argv.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => argv.next().ok_or_else(|| format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "--config" => args.config = Some(value("--config")?.into()),
            "--id" => {
                let v = value("--id")?;
                args.id = Some(
                    v.parse().map_err(|_| format!("--id {v:?}: expected a node id (a number)"))?,
                );
            }
            "--listen" => {
                let v = value("--listen")?;
                args.listen = Some(v.parse().map_err(|_| {
                    format!("--listen {v:?}: expected an address like 127.0.0.1:7001")
                })?);
            }
            "--peer" => {
                let v = value("--peer")?;
                let (id, addr) =
                    v.split_once('=').ok_or_else(|| format!("--peer {v:?}: expected ID=ADDR"))?;
                let id: u64 = id
                    .trim()
                    .parse()
                    .map_err(|_| format!("--peer {v:?}: {id:?} is not a node id (a number)"))?;
                let addr: SocketAddr = addr.trim().parse().map_err(|_| {
                    format!("--peer {v:?}: {addr:?} is not an address like 127.0.0.1:7001")
                })?;
                if args.peers.iter().any(|(p, _)| *p == id) {
                    return Err(format!("--peer: node {id} is listed twice"));
                }
                args.peers.push((id, addr));
            }
            "--secret-file" => args.secret_file = Some(value("--secret-file")?.into()),
            "--data-dir" => args.data_dir = Some(value("--data-dir")?.into()),
            "--key" => args.key = Some(value("--key")?),
            "--voters" => {
                let v = value("--voters")?;
                args.voters = Some(
                    v.parse()
                        .map_err(|_| format!("--voters {v:?}: expected a number of voters"))?,
                );
            }
            "--generate-secret" => args.generate_secret = Some(value("--generate-secret")?.into()),
            "--fast" | "--no-stdin" | "--fail-stop" if inline.is_some() => {
                return Err(format!("{flag} takes no value"));
            }
            "--fast" => args.fast = true,
            "--fail-stop" => args.fail_stop = true,
            "--no-stdin" => args.no_stdin = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// What the node runs with, once the arguments agree with each other.
struct Setup {
    config: NodeConfig,
    key: String,
    no_stdin: bool,
    fail_stop: bool,
}

fn setup(args: Args) -> Result<Setup, String> {
    let key = args.key.unwrap_or_else(|| "demo".to_string());
    highlander::Key::new(key.clone()).map_err(|e| format!("--key {key:?}: {e}"))?;
    let mut config = if let Some(path) = &args.config {
        if args.id.is_some()
            || args.listen.is_some()
            || !args.peers.is_empty()
            || args.secret_file.is_some()
        {
            return Err("--config already says --id, --listen, --peer and --secret-file; \
                        give either the file or the flags"
                .into());
        }
        NodeConfig::from_file(path).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        let id = args.id.ok_or("--id is required (or --config)")?;
        if args.peers.is_empty() {
            return Err("--peer ID=ADDR is required for every node, this one included".into());
        }
        let peers: BTreeMap<NodeId, SocketAddr> =
            args.peers.iter().map(|(id, addr)| (NodeId(*id), *addr)).collect();
        let own = *peers.get(&NodeId(id)).ok_or_else(|| {
            format!("--peer: node {id} (this node, --id) is not listed; list every node")
        })?;
        let listen = args.listen.unwrap_or(own);
        if listen.port() != own.port() {
            return Err(format!(
                "--listen {listen} does not match this node's --peer {id}={own}: \
                 peers would dial the wrong port"
            ));
        }
        let path = args.secret_file.ok_or("--secret-file is required (or --config)")?;
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("--secret-file {}: {e}", path.display()))?;
        let secret = ClusterSecret::new(text.trim())
            .map_err(|e| format!("--secret-file {}: {e}", path.display()))?;
        NodeConfig {
            id: NodeId(id),
            listen,
            peers,
            identity: highlander::quic::Identity::ClusterSecret(secret),
            timing: Timing::standard(),
            data_dir: None,
            voters: None,
        }
    };
    if args.fast {
        config.timing = Timing::fast();
    }
    if args.voters.is_some() {
        config.voters = args.voters;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = Some(dir);
    }
    Ok(Setup { config, key, no_stdin: args.no_stdin, fail_stop: args.fail_stop })
}

fn generate_secret(path: &PathBuf) -> Result<(), String> {
    let secret = ClusterSecret::generate().map_err(|e| e.to_string())?;
    let mut options = std::fs::OpenOptions::new();
    // Never overwrite: a cluster whose nodes hold different secrets cannot form.
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(file, "{}", secret.expose()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("node: {e}\n{USAGE}");
            emit!("error op=args reason={}", quoted(&e));
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.generate_secret {
        return match generate_secret(path) {
            Ok(()) => {
                emit!("secret-written path={}", quoted(&path.display().to_string()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("node: --generate-secret {e}");
                emit!("error op=generate-secret reason={}", quoted(&e));
                ExitCode::from(2)
            }
        };
    }
    let setup = match setup(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("node: {e}");
            emit!("error op=config reason={}", quoted(&e));
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,highlander=info,highlander_quic=info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(setup))
}

/// Why the node is leaving.
enum Exit {
    Command,
    Signal,
    Eof,
    Fatal,
}

async fn run(setup: Setup) -> ExitCode {
    let Setup { config, key, no_stdin, fail_stop } = setup;
    let id = config.id;
    let timing = match config.timing {
        t if t == Timing::standard() => "standard",
        t if t == Timing::fast() => "fast",
        _ => "custom",
    };
    let storage = if config.data_dir.is_some() { "disk" } else { "memory" };
    let node = match NodeBuilder::from_config(&config) {
        Ok(builder) => builder.fail_stop(fail_stop).start().await,
        Err(e) => Err(e),
    };
    let node = match node {
        Ok(node) => node,
        Err(e) => {
            eprintln!("node {}: cannot start: {e}", id.0);
            emit!("error op=start reason={}", quoted(&e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    emit!("listening id={} addr={} storage={storage} timing={timing}", id.0, config.listen);
    if config.data_dir.is_none() {
        tracing::warn!(
            "no --data-dir: the Raft log is in memory; a restart of node {} joins the cluster \
             as new storage",
            id.0
        );
    }

    let (pause_tx, pause_rx) = watch::channel(false);
    let (block_tx, block_rx) = watch::channel((0u64, 0u64));
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<()>(1);
    let controls = Controls { paused: pause_rx, block: block_rx };
    let bring_up = tokio::spawn(bring_up(node.clone(), key, controls, fatal_tx));
    let mut commands = if no_stdin { None } else { Some(read_stdin()) };
    let mut signals = Signals::install();

    let exit = loop {
        tokio::select! {
            line = recv_line(&mut commands) => match line {
                None => break Exit::Eof,
                Some(line) => {
                    if let Some(exit) = command(&node, &pause_tx, &block_tx, line.trim()) {
                        break exit;
                    }
                }
            },
            () = signals.next() => break Exit::Signal,
            // A closed channel (bring-up done) disables this branch.
            Some(()) = fatal_rx.recv() => break Exit::Fatal,
        }
    };
    bring_up.abort();
    let reason = match exit {
        Exit::Command => "command",
        Exit::Signal => "signal",
        Exit::Eof => "eof",
        Exit::Fatal => "fatal",
    };
    emit!("shutting-down id={} reason={reason}", id.0);
    // A second signal while handing over means "now": exit without waiting.
    tokio::select! {
        () = node.shutdown() => {}
        () = signals.next() => {
            emit!("bye id={} graceful=false", id.0);
            return ExitCode::from(130);
        }
    }
    emit!("bye id={}", id.0);
    if matches!(exit, Exit::Fatal) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// What stdin commands tell the handler: pause, and block (a request number and how long).
#[derive(Clone)]
struct Controls {
    paused: watch::Receiver<bool>,
    block: watch::Receiver<(u64, u64)>,
}

/// Waits for a session (peers may start minutes apart), then registers the singleton.
async fn bring_up(node: Node, key: String, controls: Controls, fatal: mpsc::Sender<()>) {
    let id = node.id().0;
    let mut waited = 0u32;
    loop {
        match node.ready(Duration::from_secs(5)).await {
            Ok(()) => break,
            Err(Error::Unavailable(_)) => {
                waited += 5;
                tracing::info!("waiting for a quorum of peers ({waited} s so far)");
            }
            Err(e) => {
                emit!("error op=ready reason={}", quoted(&e.to_string()));
                let _ = fatal.send(()).await;
                return;
            }
        }
    }
    loop {
        let c = controls.clone();
        let result = node.singleton(key.as_str(), move |ctx| demo(ctx, c.clone())).await;
        match result {
            Ok(()) => break,
            // No quorum right now, or the outcome is unknown: registering again is harmless
            // (the handler is removed from this node when registration fails).
            Err(e @ (Error::Unavailable(_) | Error::Timeout)) => {
                tracing::info!("registering {key:?} again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                emit!(
                    "error op=register key={} reason={}",
                    key_field(&key),
                    quoted(&e.to_string())
                );
                let _ = fatal.send(()).await;
                return;
            }
        }
    }
    emit!("ready id={id} key={}", key_field(&key));
}

/// The demo singleton: says when it starts and stops, and prints every message it handles.
async fn demo(mut ctx: TaskContext, controls: Controls) {
    let Controls { mut paused, mut block } = controls;
    let key = key_field(ctx.key().as_str());
    let token = ctx.token().0;
    emit!("started key={key} token={token} node={}", ctx.node_id().0);
    // Only block requests made after this start count.
    block.borrow_and_update();
    loop {
        if *paused.borrow() {
            tokio::select! {
                () = ctx.cancelled() => break,
                _ = paused.wait_for(|p| !*p) => {}
            }
        }
        // Asking for the next message acknowledges the previous one.
        let message = tokio::select! {
            m = ctx.recv() => m,
            Ok(()) = block.changed() => {
                let ms = block.borrow_and_update().1;
                emit!("blocking key={key} token={token} ms={ms}");
                // Synchronous code that never yields: cancellation and abort cannot stop it.
                std::thread::sleep(Duration::from_millis(ms));
                emit!("unblocked key={key} token={token}");
                continue;
            }
        };
        let Some(message) = message else { break };
        let text = String::from_utf8_lossy(message.payload.as_bytes());
        emit!("delivered key={key} seq={} token={token} text={}", message.seq.0, quoted(&text));
    }
    emit!("stopped key={key} token={token}");
}

/// Runs one stdin command; returns `Some` when the node should leave.
fn command(
    node: &Node,
    pause: &watch::Sender<bool>,
    block: &watch::Sender<(u64, u64)>,
    line: &str,
) -> Option<Exit> {
    let (verb, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    match verb {
        "" => {}
        "send" => {
            let rest = rest.trim_start();
            let (key, text) = rest.split_once(' ').unwrap_or((rest, ""));
            if key.is_empty() {
                emit!("error op=command reason={}", quoted("usage: send <key> <text>"));
                return None;
            }
            let (node, key, text) = (node.clone(), key.to_string(), text.to_string());
            // Concurrently, so a send waiting out a leader election does not hold up
            // `status` or `shutdown`.
            tokio::spawn(async move {
                match node.send(key.as_str(), text.clone()).await {
                    Ok(seq) => {
                        emit!("sent key={} seq={} text={}", key_field(&key), seq.0, quoted(&text))
                    }
                    Err(e) => emit!(
                        "error op=send key={} text={} reason={}",
                        key_field(&key),
                        quoted(&text),
                        quoted(&e.to_string())
                    ),
                }
            });
        }
        "status" => status(node),
        "pause" => {
            pause.send_replace(true);
            emit!("paused");
        }
        "resume" => {
            pause.send_replace(false);
            emit!("resumed");
        }
        "block" => match rest.trim().parse::<u64>() {
            Ok(ms) => {
                block.send_modify(|(n, m)| {
                    *n += 1;
                    *m = ms;
                });
            }
            Err(_) => emit!("error op=command reason={}", quoted("usage: block <ms>")),
        },
        "shutdown" | "quit" | "exit" => return Some(Exit::Command),
        "help" => emit!(
            "help commands={}",
            quoted("send <key> <text> | status | pause | resume | block <ms> | shutdown")
        ),
        other => emit!(
            "error op=command reason={}",
            quoted(&format!("unknown command {other:?}; try help"))
        ),
    }
    None
}

fn status(node: &Node) {
    let s = node.status();
    let leader = s.leader.map_or("none".to_string(), |l| l.0.to_string());
    let lease = s.lease_left_ms.map_or("none".to_string(), |ms| ms.to_string());
    emit!(
        "status id={} leader={leader} term={} applied={} members={} sessions={} lease_ms={lease} overruns={}",
        node.id().0,
        s.term,
        s.applied_index,
        id_list(s.members.iter().copied()),
        s.sessions.len(),
        s.overruns_total
    );
    for k in &s.keys {
        for (slot, owner) in k.owners.iter().enumerate() {
            let owner = match owner {
                Some(o) => format!("node={} token={}", o.node.0, o.token.0),
                None => "node=none".to_string(),
            };
            emit!(
                "owner key={} slot={slot} {owner} queued={} candidates={}",
                key_field(k.key.as_str()),
                k.queued,
                id_list(k.candidates.iter().copied())
            );
        }
    }
}

/// Lines from stdin, read on a plain thread (a blocking read cannot be cancelled, and the
/// thread simply ends with the process). The channel closes at end of input.
fn read_stdin() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn recv_line(commands: &mut Option<mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// SIGTERM and Ctrl-C (SIGINT), as one stream of "please stop".
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate())
                .map_err(|e| tracing::warn!("cannot catch SIGTERM: {e}"))
                .ok();
            Signals { term }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        let term = async {
            match &mut self.term {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = term => {}
            r = tokio::signal::ctrl_c() => {
                if r.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
