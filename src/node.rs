//! A node: the public handle, its builder, and the state its loops share.

use crate::clock::{ClusterClock, LeaseClock, SystemClock, WallClock};
use crate::config::Timing;
use crate::error::{ConfigError, Error};
use crate::file_config::NodeConfig;
use crate::leader::{self, LeaderState};
use crate::membership::{self, BootState};
use crate::observer::Observer;
use crate::proposer::{Proposer, WriteError, WritePath};
use crate::raft::store::{self, AppliedState, DiskStorage, MemStorage, Storage};
use crate::raft::{LocalWriteError, RaftNode};
use crate::session;
use crate::supervisor::{self, SupervisorCommand};
use crate::task::{BoxedHandler, Lease, TaskContext, TaskOptions, TaskResult, box_handler};
use crate::watchdog::NodeWatch;
use highlander_core::wire::{
    KeyQuery, MembershipReport, MembershipRequest, NetworkReport, Phase, Request, Response,
    StatusReport, WriteRefusal,
};
use highlander_core::{
    BoxFuture, ClientId, Command, IntoKey, Key, KeySpec, Limits, Millis, NodeId, Outcome, Payload,
    Rejection, RequestHandler, RequestId, ScheduleSpec, Seq, SessionId, Transport,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

/// A handler registered on this node, with how its key runs.
pub(crate) struct HandlerEntry {
    pub(crate) spec: KeySpec,
    /// For a schedule: the schedule.
    pub(crate) schedule: Option<Box<ScheduleSpec>>,
    pub(crate) options: TaskOptions,
    pub(crate) run: BoxedHandler,
}

impl HandlerEntry {
    /// The command that registers this handler's key under `session`.
    pub(crate) fn registration(&self, session: SessionId, key: &Key, epoch: u64) -> Command {
        match &self.schedule {
            Some(schedule) => Command::RegisterSchedule {
                session,
                key: key.clone(),
                schedule: schedule.clone(),
                epoch,
                tzdb: highlander_core::tzdb_version().to_string(),
            },
            None => Command::Register { session, key: key.clone(), spec: self.spec, epoch },
        }
    }
}

/// What the node's loops share.
pub(crate) struct Shared {
    pub(crate) id: NodeId,
    /// Every node of the static peer list, this one included.
    pub(crate) peers: BTreeSet<NodeId>,
    /// The peers that vote when the cluster forms (the others join as learners).
    pub(crate) voters: BTreeSet<NodeId>,
    pub(crate) timing: Timing,
    pub(crate) limits: Limits,
    pub(crate) raft: RaftNode,
    pub(crate) applied: Arc<AppliedState>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) proposer: Proposer,
    pub(crate) leader: LeaderState,
    pub(crate) observer: Option<Arc<dyn Observer>>,
    /// Where this node's storage stands in the cluster.
    pub(crate) boot: BootState,
    /// The clock leases are measured with.
    pub(crate) clock: LeaseClock,
    /// The cluster's time of day, which schedules fire by.
    pub(crate) cluster_clock: Arc<ClusterClock>,
    /// Sees tasks that outlive their lease.
    pub(crate) watch: Arc<NodeWatch>,
    /// The job workers running on this node.
    pub(crate) workers: crate::jobs::Workers,
    client: Mutex<ClientId>,
    lease: watch::Sender<Lease>,
    handlers: Mutex<BTreeMap<Key, Arc<HandlerEntry>>>,
    /// Keys whose handler was added or removed since the supervisor last looked, and the
    /// signal that wakes it for them.
    handler_changes: Mutex<BTreeSet<Key>>,
    pub(crate) handler_signal: tokio::sync::Notify,
    /// The last registration epoch handed out (see [`Command::Register`]).
    epochs: AtomicU64,
    stopping: watch::Sender<bool>,
    fatal: Mutex<Option<Error>>,
    origin: Instant,
    requests: RequestIds,
}

impl Shared {
    /// Now on the lease clock, as the liveness table counts it.
    pub(crate) fn now_millis(&self) -> Millis {
        leader::millis_between(self.origin, self.clock.now())
    }

    /// The instant (on the lease clock) [`Millis`] count from.
    pub(crate) fn origin(&self) -> Instant {
        self.origin
    }

    pub(crate) fn client(&self) -> ClientId {
        *self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_client(&self, client: ClientId) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = client;
    }

    pub(crate) fn lease(&self) -> Lease {
        *self.lease.borrow()
    }

    pub(crate) fn set_lease(&self, lease: Lease) {
        if let Some(d) = lease.deadline {
            self.watch.set_deadline(self.clock.to_real(d));
        }
        self.lease.send_replace(lease);
    }

    pub(crate) fn lease_watch(&self) -> watch::Receiver<Lease> {
        self.lease.subscribe()
    }

    /// Whether this node's storage is in the membership it has applied (committed): it is,
    /// or was until a removal it has not applied yet, a member that receives the log.
    pub(crate) fn member_in_applied_config(&self) -> bool {
        let Some(me) = self.raft.member() else { return false };
        self.applied.read().membership.membership().get_node(&me).is_some()
    }

    /// The next registration epoch: registrations and withdrawals of a key are ordered by
    /// it, so one that lands late cannot undo a newer one.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A request id for a de-duplicated write, with the floor of ids still in flight; the
    /// guard keeps the id in flight until dropped.
    pub(crate) fn begin_request(&self) -> (u64, u64, impl Drop + '_) {
        self.requests.begin()
    }

    pub(crate) fn handlers(&self) -> MutexGuard<'_, BTreeMap<Key, Arc<HandlerEntry>>> {
        self.handlers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `key`'s handler was added or removed, for the supervisor's next pass
    /// (which looks only at what changed).
    pub(crate) fn handler_changed(&self, key: &Key) {
        self.handler_changes.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone());
        self.handler_signal.notify_one();
    }

    /// The keys whose handler changed since the last call.
    pub(crate) fn take_handler_changes(&self) -> BTreeSet<Key> {
        std::mem::take(&mut *self.handler_changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves once the node begins to stop.
    pub(crate) async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Records why the node cannot work (it keeps the first reason).
    /// A fatal node does no more work: it also counts as stopping.
    pub(crate) fn set_fatal(&self, error: Error) {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(error);
        self.stopping.send_replace(true);
    }

    fn fatal(&self) -> Option<Error> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Resolves once the node has failed for good (not when it merely shuts down).
    pub(crate) async fn fatal_stop(&self) {
        self.stopping().await;
        if self.fatal().is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// The report `status` returns and peers get for [`Request::Status`].
    pub(crate) fn status(&self, query: &KeyQuery) -> StatusReport {
        let applied = self.applied.read();
        let sessions = applied.state.session_reports();
        let (mut keys, key_summary, next_after) = applied.state.key_reports(query);
        let cluster_now = self.cluster_clock.now_ms();
        for k in &mut keys {
            if let Some(s) = k.schedule.as_mut() {
                s.fill_next(cluster_now, 10);
            }
        }
        let lease = self.lease();
        let (overruns, overruns_total) = self.watch.overruns();
        let lease_left_ms = lease.deadline.map(|d| {
            let now = self.clock.now();
            if d >= now { (d - now).as_millis() as i64 } else { -((now - d).as_millis() as i64) }
        });
        let (slowest, recent_timeouts) = self.raft.peer_health().recent();
        let network = NetworkReport {
            supported_rtt_ms: self.timing.supported_rtt().as_millis() as u64,
            observed_rtt_ms: slowest.map(|d| d.as_millis() as u64),
            recent_timeouts,
        };
        let phase = membership::hello(self).phase;
        let mut warnings: Vec<String> = Vec::new();
        if let Some(e) = self.fatal() {
            warnings.push(format!("the node has stopped: {e}"));
        }
        warnings.extend(self.raft.timing_warning());
        let offset = self.cluster_clock.offset_ms();
        if offset.unsigned_abs() > 1_000 {
            warnings.push(format!(
                "this node's wall clock is {} ms {} the cluster's time of day; schedules fire by \
                 the cluster's time, but check NTP on this machine",
                offset.unsigned_abs(),
                if offset > 0 { "behind" } else { "ahead of" }
            ));
        }
        if let Some(left) = lease_left_ms.filter(|l| *l < 0) {
            warnings.push(format!(
                "this node's lease lapsed {} ms ago: its tasks are stopped until a new session \
                 is open",
                -left
            ));
        }
        for o in &overruns {
            warnings.push(format!(
                "task {}/{} ({}) is still running {} ms after its lease deadline: another node \
                 may own the key; it does not yield to cancellation",
                o.key, o.slot, o.token, o.past_deadline_ms
            ));
        }
        if matches!(phase, Phase::Blank | Phase::Bootstrapping | Phase::Joining) {
            warnings.push(format!("storage not yet in the cluster ({phase:?})"));
        }
        let voters = self.raft.members();
        if !voters.is_empty()
            && let Some(w) = crate::config::voters_warning(voters.len())
        {
            warnings.push(w);
        }
        let queues = applied.state.queue_reports(cluster_now);
        StatusReport {
            queues,
            node: Some(self.id),
            leader: self.raft.leader_hint(),
            term: self.raft.term(),
            applied_index: applied.last_applied.map(|l| l.index).unwrap_or(0),
            members: self.raft.members(),
            learners: self.raft.learners(),
            voting: self.raft.is_voter(),
            member: self.raft.member(),
            phase: Some(phase),
            lease_left_ms,
            overruns,
            overruns_total,
            network: Some(network),
            warnings,
            sessions,
            key_summary,
            keys,
            next_after,
        }
    }
}

/// Request ids for `send`: serials increase, and the floor is the oldest serial still in
/// flight, below which the state machine may forget its de-duplication records.
#[derive(Default)]
struct RequestIds {
    next: AtomicU64,
    in_flight: Mutex<BTreeSet<u64>>,
}

struct InFlight<'a> {
    ids: &'a RequestIds,
    serial: u64,
}

impl RequestIds {
    fn begin(&self) -> (u64, u64, InFlight<'_>) {
        // The serial is taken under the lock: taken before it, a concurrent send could
        // register a later serial first and raise the floor above this one, and the state
        // machine would refuse this send as stale.
        let mut set = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let serial = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        set.insert(serial);
        let floor = set.first().copied().unwrap_or(serial);
        (serial, floor, InFlight { ids: self, serial })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.ids.in_flight.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.serial);
    }
}

/// A member of a highlander cluster.
///
/// Cloning is cheap; every clone is the same node. Start one with [`Node::builder`].
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
    control: Arc<Control>,
}

/// What only the owner of the node's lifetime touches.
struct Control {
    tasks: Mutex<Option<JoinSet<()>>>,
    supervisor: mpsc::Sender<SupervisorCommand>,
    stopped: AtomicBool,
    /// Released once Raft has let go of the data directory.
    disk_lock: Option<highlander_wal::LockWatch>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.shared.id).finish()
    }
}

/// Configures and starts a [`Node`].
pub struct NodeBuilder {
    id: Option<NodeId>,
    peers: Vec<NodeId>,
    transport: Option<Arc<dyn Transport>>,
    timing: Timing,
    limits: Limits,
    storage: Option<Storage>,
    clock: Arc<dyn WallClock>,
    clock_rate: f64,
    fail_stop: bool,
    observer: Option<Arc<dyn Observer>>,
    voters: Option<usize>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            id: None,
            peers: Vec::new(),
            transport: None,
            timing: Timing::default(),
            limits: Limits::default(),
            storage: None,
            clock: Arc::new(SystemClock),
            clock_rate: 1.0,
            fail_stop: false,
            observer: None,
            voters: None,
        }
    }
}

/// A configuration that passed validation.
struct Validated {
    id: NodeId,
    peers: BTreeSet<NodeId>,
    voters: BTreeSet<NodeId>,
    transport: Arc<dyn Transport>,
}

impl NodeBuilder {
    /// A builder for the node a `node.toml` file describes, its QUIC transport already bound
    /// (so this must run inside a tokio runtime). Add an observer or limits, then `start`.
    pub fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<NodeBuilder, Error> {
        NodeBuilder::from_config(&NodeConfig::from_file(path)?)
    }

    /// Like [`from_config_file`](Self::from_config_file), from a parsed configuration.
    pub fn from_config(config: &NodeConfig) -> Result<NodeBuilder, Error> {
        let transport = highlander_quic::QuicTransport::bind(config.quic_config())
            .map_err(|e| ConfigError::Transport(e.to_string()))?;
        let builder = Node::builder()
            .id(config.id)
            .peers(config.peers.keys().copied())
            .transport(transport)
            .timing(config.timing);
        let builder = match config.voters {
            Some(n) => builder.voters(n),
            None => builder,
        };
        Ok(match &config.data_dir {
            Some(dir) => builder.data_dir(dir),
            None => builder,
        })
    }

    /// This node's id, as it appears in the peer list.
    pub fn id(mut self, id: impl Into<NodeId>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Every node of the cluster, this one included. Every node must be given the same list.
    pub fn peers<I, P>(mut self, peers: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<NodeId>,
    {
        self.peers = peers.into_iter().map(Into::into).collect();
        self
    }

    /// The network the node talks over.
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The timing preset (default: [`Timing::default`]).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// The queue limits; every node must use the same.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keep Raft's log, vote and snapshots in `dir` (created if needed): a write-ahead log
    /// that acknowledges an entry only after it is on disk, and checksummed snapshot files.
    /// A node restarted on the same directory finds everything it acknowledged. This is what
    /// production nodes use.
    pub fn data_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.storage = Some(Storage::Disk(DiskStorage::new(dir)));
        self
    }

    /// Keep Raft's state in `storage`: a [`MemStorage`] (the simulator keeps one per node so
    /// a restarted node finds what it had) or a [`DiskStorage`]. Without this or
    /// [`data_dir`](Self::data_dir), the node keeps its state in fresh memory and must never
    /// be restarted under the same id: a voter that forgets its vote or log breaks Raft.
    pub fn storage(mut self, storage: impl Into<Storage>) -> Self {
        self.storage = Some(storage.into());
        self
    }

    /// The wall clock (default: the system's). A node's incarnation reads it, and schedules
    /// fire by the cluster's time of day, the lower median of the nodes' wall clocks.
    pub fn clock(mut self, clock: impl WallClock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Exits the process (with [`FAIL_STOP_EXIT_CODE`](crate::FAIL_STOP_EXIT_CODE)) when a
    /// task is still executing after the lease deadline of its ownership (default: off; the
    /// overrun is then logged as an error, counted and listed in `status`).
    ///
    /// Stopping a task is cooperative: a handler stuck in synchronous code does not yield to
    /// its abort, and keeps running while another node may already own its key. Exiting is
    /// the only way to stop such a thread; a watchdog thread does it half a lease margin after
    /// the deadline, before any other node can have been given the key. Turn it on when your
    /// handlers call blocking code and a service manager restarts the process.
    pub fn fail_stop(mut self, on: bool) -> Self {
        self.fail_stop = on;
        self
    }

    /// For simulations: this node's monotonic clock runs at `rate` times real time (default
    /// 1.0; 0.5 to 2.0). The lease argument assumes clocks run at nearly the same rate — the
    /// drift over a session TTL stays below the lease margin — and this lets a simulator show
    /// that the guarantees hold within that bound and break beyond it.
    pub fn clock_rate(mut self, rate: f64) -> Self {
        self.clock_rate = rate;
        self
    }

    /// How many peers vote: the first `n` ids of the peer list (default: every peer up to
    /// [`DEFAULT_MAX_VOTERS`](crate::DEFAULT_MAX_VOTERS), then the first five). The other
    /// peers are **learners**: they replicate the log, hold sessions, own keys, run jobs
    /// and forward writes like any node, but never vote, so 50 instances cost the quorum of
    /// 3 or 5. Failover and hand-over bounds are the same for keys a learner owns.
    ///
    /// It applies when the cluster forms. After that, which storage votes is the cluster's
    /// own record, changed only by explicit membership changes ([`Node::add_member`],
    /// [`Node::demote_member`], [`Node::remove_member`]), never by editing one node's file.
    /// Every node must be given the same number. An even number or fewer than 3 is allowed
    /// and costs what [`voters_warning`](crate::voters_warning) says.
    pub fn voters(mut self, n: usize) -> Self {
        self.voters = Some(n);
        self
    }

    /// A hook that sees every task start, stop and delivery (used by the simulator).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn validate(&self) -> Result<Validated, ConfigError> {
        let id = self.id.ok_or(ConfigError::MissingId)?;
        if self.peers.is_empty() {
            return Err(ConfigError::NoPeers);
        }
        let mut peers = BTreeSet::new();
        for p in &self.peers {
            if !peers.insert(*p) {
                return Err(ConfigError::DuplicatePeer(*p));
            }
        }
        if !peers.contains(&id) {
            return Err(ConfigError::OwnIdMissing(id));
        }
        let transport = self.transport.clone().ok_or(ConfigError::MissingTransport)?;
        if transport.local_id() != id {
            return Err(ConfigError::TransportMismatch {
                transport: transport.local_id(),
                node: id,
            });
        }
        if let Some(big) = peers.iter().find(|p| p.0 >= membership::JOINED_MEMBER_BASE) {
            return Err(ConfigError::NodeIdTooLarge(*big));
        }
        if !(0.5..=2.0).contains(&self.clock_rate) {
            return Err(ConfigError::ClockRate(self.clock_rate.to_string()));
        }
        self.timing.validate()?;
        self.limits.validate()?;
        let voters = crate::config::initial_voters(&peers, self.voters)?;
        Ok(Validated { id, peers, voters, transport })
    }

    /// Starts the node: opens (and locks) its storage, serves the transport, and starts its
    /// loops. It returns at once; the node opens its session once it reaches a quorum (see
    /// [`Node::ready`]).
    ///
    /// On empty storage the node first asks its peers where they stand. On the cluster's
    /// first start every node is empty: they form the cluster together once every peer has
    /// started and answered (a first start waits for all; a restart needs only a quorum).
    /// If some peer is already part of a cluster, this node joins it as new storage, a
    /// learner first: a node whose storage was lost or replaced never comes back as the
    /// Raft member it was. Fails at once if the storage cannot be opened (locked by another
    /// process, damaged, or another node's).
    pub async fn start(self) -> Result<Node, Error> {
        let Validated { id, peers, voters, transport } = self.validate()?;
        let storage = self.storage.unwrap_or_else(|| Storage::Memory(MemStorage::new()));
        let (boot, in_flight) = match &storage {
            Storage::Memory(m) => (m.next_boot(), crate::proposer::IN_FLIGHT_MEMORY),
            Storage::Disk(_) => (0, crate::proposer::IN_FLIGHT_DISK),
        };
        // Strictly larger on every start of this node id, whatever the wall clock does.
        let incarnation = (self.clock.since_epoch().as_micros() as u64).max(1).saturating_add(boot);
        let applied = AppliedState::new();
        let opened = store::open(storage, applied.clone()).map_err(Error::Storage)?;
        let clock = LeaseClock::new(self.clock_rate);
        let watch = NodeWatch::new(id, self.timing.lease_margin / 2, self.fail_stop);
        let raft = RaftNode::new(id, self.timing);
        let cluster_clock = Arc::new(ClusterClock::new(self.clock.clone()));
        let mut tasks = JoinSet::new();
        let path = WritePath {
            raft: raft.clone(),
            transport: transport.clone(),
            attempt_timeout: self.timing.election_bound(),
            retry_pause: self.timing.heartbeat,
            in_flight,
            clock: cluster_clock.clone(),
            applied: applied.clone(),
        };
        let proposer = Proposer::start(path, self.timing.write_timeout, &mut tasks);
        let (leader, keepalives) = LeaderState::new();
        let shared = Arc::new(Shared {
            id,
            peers: peers.clone(),
            voters,
            timing: self.timing,
            limits: self.limits,
            raft: raft.clone(),
            applied,
            transport: transport.clone(),
            proposer,
            leader,
            observer: self.observer,
            boot: BootState::new(id.0, opened.identity, opened.blank),
            clock,
            cluster_clock,
            watch,
            workers: crate::jobs::Workers::default(),
            client: Mutex::new(ClientId { node: id, incarnation }),
            lease: watch::channel(Lease::default()).0,
            handlers: Mutex::default(),
            handler_changes: Mutex::default(),
            handler_signal: tokio::sync::Notify::new(),
            epochs: AtomicU64::new(0),
            stopping: watch::channel(false).0,
            fatal: Mutex::default(),
            origin: clock.now(),
            requests: RequestIds::default(),
        });
        transport.serve(Arc::new(Inbound { shared: Arc::downgrade(&shared) }))?;
        let store::Opened { log, sm, lock: disk_lock, identity, blank, keeper } = opened;
        let (sup_tx, sup_rx) = mpsc::channel(8);
        tasks.spawn(membership::run(
            shared.clone(),
            log,
            sm,
            identity,
            blank,
            keeper,
            peers.clone(),
        ));
        tasks.spawn(leader::confirm_loop(shared.clone(), keepalives));
        tasks.spawn(leader::duties_loop(shared.clone()));
        tasks.spawn(session::run(shared.clone()));
        tasks.spawn(supervisor::run(shared.clone(), sup_rx));
        info!(node = %id, incarnation, peers = ?peers, "node started");
        Ok(Node {
            shared,
            control: Arc::new(Control {
                tasks: Mutex::new(Some(tasks)),
                supervisor: sup_tx,
                stopped: AtomicBool::new(false),
                disk_lock,
            }),
        })
    }
}

impl Node {
    /// Starts the node a `node.toml` file describes (see [`NodeConfig`]), over QUIC.
    pub async fn from_config_file(path: impl AsRef<std::path::Path>) -> Result<Node, Error> {
        NodeBuilder::from_config_file(path)?.start().await
    }

    /// Starts configuring a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// The node's timing.
    pub fn timing(&self) -> Timing {
        self.shared.timing
    }

    fn check_running(&self) -> Result<(), Error> {
        if let Some(error) = self.shared.fatal() {
            return Err(error);
        }
        if self.shared.is_stopping() {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    /// Waits until the node has a session (it reached a quorum), at most `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<(), Error> {
        self.check_running()?;
        match session::wait_for_session(&self.shared, timeout).await {
            Some(_) => Ok(()),
            None => Err(self.shared.fatal().unwrap_or_else(|| {
                Error::Unavailable(format!("no session within {} ms", timeout.as_millis()))
            })),
        }
    }

    /// Runs `handler` as the singleton task for `key`: on exactly one node of the cluster at a
    /// time, among the nodes that registered it, moving to another when its owner fails.
    ///
    /// Returns once the registration is committed. The handler is called with a fresh
    /// [`TaskContext`] every time this node becomes the owner.
    ///
    /// If it fails (or its future is dropped before it returns), this node has no handler for
    /// the key and runs nothing of it; a registration that reaches the cluster anyway is
    /// withdrawn by the node, and registering again is safe at any moment.
    ///
    /// ```no_run
    /// # async fn demo(node: highlander::Node) -> Result<(), highlander::Error> {
    /// node.singleton("irc:#rust", |mut ctx| async move {
    ///     while let Some(message) = ctx.recv().await {
    ///         println!("{} got {:?} under token {}", ctx.key(), message.payload, ctx.token());
    ///     }
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn singleton<K, F, Fut, R>(&self, key: K, handler: F) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        self.register(
            key.into_key()?,
            KeySpec::singleton(),
            TaskOptions::default(),
            box_handler(handler),
        )
        .await
    }

    /// Like [`singleton`](Self::singleton), with options (restart policy, health deadline,
    /// inbox capacity).
    pub async fn singleton_with<K, F, Fut, R>(
        &self,
        key: K,
        options: TaskOptions,
        handler: F,
    ) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        self.register(key.into_key()?, KeySpec::singleton(), options, box_handler(handler)).await
    }

    /// Runs `handler` for `key` on exactly `slots` distinct nodes at a time (each slot has its
    /// own fencing token). Messages sent to the key go to the owner of slot 0.
    pub async fn exclusive<K, F, Fut, R>(&self, key: K, slots: u32, handler: F) -> Result<(), Error>
    where
        K: IntoKey,
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: TaskResult,
    {
        let spec = KeySpec::exclusive(slots);
        if !spec.is_valid() {
            return Err(Error::Rejected(Rejection::InvalidSpec));
        }
        self.register(key.into_key()?, spec, TaskOptions::default(), box_handler(handler)).await
    }

    /// Withdraws this node from running `key`, leaving the other nodes that registered it to
    /// run it. A task of the key running here is cancelled (and aborted after the stop grace,
    /// at the lease deadline at the latest); only once it has ended is its slot released,
    /// with its token and the acknowledgements of what it consumed, so the next owner starts
    /// after it. Then this node's candidacy is withdrawn. Messages still queued stay with the
    /// key.
    ///
    /// Fails with [`Error::NotRegistered`] if this node has no handler for the key, and with
    /// [`Error::Timeout`] if the slot was not released within the write timeout.
    ///
    /// Whatever happens to the call — an error, or its future dropped half-way — the handler
    /// is gone at once: this node runs the key no more, stops a task of it that runs, and
    /// gives back (with its token) any slot of it that it holds or is given; a candidacy left
    /// in the cluster is withdrawn by the node in the background. Registering the key again
    /// is safe at any moment: a withdrawal that lands after the new registration is refused
    /// by the cluster instead of undoing it.
    pub async fn unregister(&self, key: impl IntoKey) -> Result<(), Error> {
        let key = key.into_key()?;
        self.check_running()?;
        let epoch = {
            let mut handlers = self.shared.handlers();
            if handlers.remove(&key).is_none() {
                return Err(Error::NotRegistered { key });
            }
            self.shared.next_epoch()
        };
        self.shared.handler_changed(&key);
        self.withdraw(&key, epoch).await
    }

    /// The rest of [`unregister`](Self::unregister), once the handler is gone.
    async fn withdraw(&self, key: &Key, epoch: u64) -> Result<(), Error> {
        let key = key.clone();
        // The supervisor now treats the key's slots as ones to hand over.
        let _ = self.control.supervisor.send(SupervisorCommand::Reconcile).await;
        let timeout = self.shared.timing.write_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(session) = session::wait_for_session(&self.shared, timeout).await else {
                return Err(Error::Unavailable(
                    "no session: the node has not reached a quorum".into(),
                ));
            };
            // The cluster refuses a withdrawal while the session owns a slot of the key: the
            // slot is released (with its token) once the task has stopped.
            self.wait_released(&key, session, deadline).await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let command = Command::Unregister { session, key: key.clone(), epoch };
            let outcome = self.shared.proposer.write_within(vec![command], remaining).await;
            match outcome.map(|mut o| o.pop()) {
                Ok(Some(Outcome::Unregistered)) => return Ok(()),
                // Registered again meanwhile: the newer registration stands.
                Ok(Some(Outcome::Rejected(Rejection::StaleRegistration))) => return Ok(()),
                // Given a slot of it again before the withdrawal landed: released once more.
                Ok(Some(Outcome::Rejected(Rejection::StillOwner))) if Instant::now() < deadline => {
                }
                // A new session registers only the handlers it has: the key is not among them.
                Ok(Some(Outcome::Rejected(Rejection::NoSuchSession))) => {
                    if self.shared.lease().session != Some(session) {
                        return Ok(());
                    }
                    self.wait_session_change(session).await;
                }
                Ok(Some(Outcome::Rejected(Rejection::StillOwner))) => return Err(Error::Timeout),
                Ok(Some(other)) => return Err(outcome_error(&key, other)),
                Ok(None) => return Err(Error::Stopped("no outcome".into())),
                Err(e) => return Err(write_error(e)),
            }
        }
    }

    /// Waits until `session` owns no slot of `key` in the applied state.
    async fn wait_released(
        &self,
        key: &Key,
        session: SessionId,
        deadline: Instant,
    ) -> Result<(), Error> {
        let mut applied = self.shared.applied.subscribe();
        loop {
            let held = {
                let a = self.shared.applied.read();
                a.state.sessions.get(&session).is_some_and(|s| {
                    s.owned.range((key.clone(), 0)..=(key.clone(), u32::MAX)).next().is_some()
                })
            };
            if !held {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Stopped("the node is stopping".into())),
                Err(_) => return Err(Error::Timeout),
            }
        }
    }

    /// The state the node's loops share, for the API's other rooms (schedules).
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    async fn register(
        &self,
        key: Key,
        spec: KeySpec,
        options: TaskOptions,
        run: BoxedHandler,
    ) -> Result<(), Error> {
        self.register_entry(key, HandlerEntry { spec, schedule: None, options, run }).await
    }

    /// Registers a schedule's runner as the handler of its key.
    pub(crate) async fn register_schedule(
        &self,
        key: Key,
        schedule: ScheduleSpec,
        run: BoxedHandler,
    ) -> Result<(), Error> {
        // The runner ends its runs itself; a runner that returns is restarted in place.
        let entry = HandlerEntry {
            spec: KeySpec::schedule(),
            schedule: Some(Box::new(schedule)),
            options: TaskOptions::default(),
            run,
        };
        self.register_entry(key, entry).await
    }

    async fn register_entry(&self, key: Key, entry: HandlerEntry) -> Result<(), Error> {
        self.check_running()?;
        let entry = Arc::new(entry);
        let epoch = {
            let mut handlers = self.shared.handlers();
            if handlers.contains_key(&key) {
                return Err(Error::AlreadyRegistered { key });
            }
            handlers.insert(key.clone(), entry.clone());
            self.shared.next_epoch()
        };
        self.shared.handler_changed(&key);
        // Nothing runs a key this node could not register (an error, or the caller dropped
        // the future): the handler goes, and a registration that lands anyway is withdrawn
        // by the supervisor.
        let mut pending = PendingRegistration { shared: &self.shared, key: &key, done: false };
        let result = self.register_in_cluster(&key, &entry, epoch).await;
        pending.done = result.is_ok();
        result
    }

    async fn register_in_cluster(
        &self,
        key: &Key,
        entry: &HandlerEntry,
        epoch: u64,
    ) -> Result<(), Error> {
        let timeout = self.shared.timing.write_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(session) = session::wait_for_session(&self.shared, timeout).await else {
                return Err(Error::Unavailable(
                    "no session: the node has not reached a quorum".into(),
                ));
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let command = entry.registration(session, key, epoch);
            let outcome = self.shared.proposer.write_within(vec![command], remaining).await;
            match outcome.map(|mut o| o.pop()) {
                Ok(Some(Outcome::Registered)) => return Ok(()),
                Ok(Some(Outcome::Rejected(Rejection::SpecConflict { existing }))) => {
                    return Err(Error::SpecConflict { key: key.clone(), existing });
                }
                // The session ended meanwhile; the next one registers all handlers anyway,
                // but the caller wants to know it is in place.
                Ok(Some(Outcome::Rejected(Rejection::NoSuchSession)))
                    if Instant::now() < deadline =>
                {
                    self.wait_session_change(session).await;
                }
                Ok(Some(other)) => return Err(outcome_error(key, other)),
                Ok(None) => return Err(Error::Stopped("no outcome".into())),
                Err(e) => return Err(write_error(e)),
            }
        }
    }

    async fn wait_session_change(&self, old: SessionId) {
        let mut rx = self.shared.lease_watch();
        let _ = tokio::time::timeout(
            self.shared.timing.write_timeout,
            rx.wait_for(|l| l.session != Some(old)),
        )
        .await;
    }

    /// Sends a message to `key`'s owner, from any node. Returns the message's sequence number
    /// once it is committed on a quorum: from then on it is delivered at least once, in
    /// sequence order, to the owner of the key, across failovers.
    ///
    /// Fails with a typed error, having queued nothing, when the key is invalid or unknown,
    /// the payload too large, or the queue full. [`Error::Timeout`] means the outcome is
    /// unknown.
    pub async fn send(&self, key: impl IntoKey, payload: impl Into<Payload>) -> Result<Seq, Error> {
        let key = key.into_key()?;
        let payload = payload.into();
        self.check_running()?;
        let max = {
            let applied = self.shared.applied.read();
            applied.state.limits.unwrap_or(self.shared.limits).max_payload_bytes
        };
        if payload.len() as u64 > u64::from(max) {
            return Err(Error::PayloadTooLarge { size: payload.len() as u64, max: u64::from(max) });
        }
        // The cluster de-duplicates sends per process, and learns of this process (its
        // incarnation) only when its session opens: a send before that would be refused as
        // coming from a stale client.
        if session::wait_for_session(&self.shared, self.shared.timing.write_timeout).await.is_none()
        {
            return Err(self.shared.fatal().unwrap_or_else(|| {
                Error::Unavailable(
                    "no session: the node has not reached a quorum since it started".into(),
                )
            }));
        }
        let (serial, floor, _guard) = self.shared.requests.begin();
        let command = Command::Send {
            key: key.clone(),
            payload,
            request: RequestId { client: self.shared.client(), serial },
            floor,
        };
        match self.shared.proposer.write_one(command).await {
            Ok(Outcome::Sent { seq }) => Ok(seq),
            Ok(other) => Err(outcome_error(&key, other)),
            Err(e) => Err(write_error(e)),
        }
    }

    /// What this node knows of the cluster, as of the last entry applied here: the leader it
    /// knows of, live sessions, counts over every key ([`StatusReport::key_summary`]), and
    /// the first [`KeyQuery::DEFAULT_LIMIT`] keys with their owners, tokens and queue depths
    /// ([`StatusReport::next_after`] says if there are more). See
    /// [`status_with`](Self::status_with) for other pages, a key prefix, or the summary only.
    pub fn status(&self) -> StatusReport {
        self.shared.status(&KeyQuery::default())
    }

    /// Like [`status`](Self::status), listing the keys `query` selects: a page after a key,
    /// the keys with a prefix, none ([`KeyQuery::summary`]) or all ([`KeyQuery::all`], which
    /// costs the size of the state).
    ///
    /// ```no_run
    /// # fn demo(node: &highlander::Node) {
    /// use highlander::KeyQuery;
    /// let tenants = node.status_with(&KeyQuery::default().with_prefix("tenant:").limit(50));
    /// println!("{} of {} slots owned", tenants.key_summary.owned, tenants.key_summary.slots);
    /// # }
    /// ```
    pub fn status_with(&self, query: &KeyQuery) -> StatusReport {
        self.shared.status(query)
    }

    /// The Raft membership as the leader reports it: which storage of each node votes, which
    /// only replicates the log (learners), how far each has caught up and when each last
    /// answered the leader.
    pub async fn membership(&self) -> Result<MembershipReport, Error> {
        self.check_running()?;
        membership::ask_leader(&self.shared, MembershipRequest::List).await
    }

    /// Makes `node` a voter: its newest storage, which must have joined as a learner (a node
    /// started on empty storage joins as one by itself). A logged joint-consensus change
    /// through the leader, safe with a minority of nodes down.
    pub async fn add_member(&self, node: impl Into<NodeId>) -> Result<MembershipReport, Error> {
        self.check_running()?;
        let node = node.into();
        membership::ask_leader(&self.shared, MembershipRequest::Add { node }).await
    }

    /// Removes every storage of `node` from the membership, voter or learner. A process of it
    /// that still runs is told at its next keepalive and stops; to bring the node back, start
    /// it on an empty data directory (it joins as a learner) and [`add_member`](Self::add_member)
    /// it. Refused if it would leave the cluster without a voter.
    pub async fn remove_member(&self, node: impl Into<NodeId>) -> Result<MembershipReport, Error> {
        self.check_running()?;
        let node = node.into();
        membership::ask_leader(&self.shared, MembershipRequest::Remove { node }).await
    }

    /// Makes `node`'s newest storage (a new disk or machine, joined as a learner) the voter
    /// in place of its older one, now. The leader does this by itself once the older storage
    /// has been silent for a session TTL and the new one has caught up; this is for when the
    /// operator knows the old one is gone for good.
    pub async fn replace_member(&self, node: impl Into<NodeId>) -> Result<MembershipReport, Error> {
        self.check_running()?;
        let node = node.into();
        membership::ask_leader(&self.shared, MembershipRequest::Replace { node }).await
    }

    /// Takes `node`'s vote away, keeping it as a learner: it still replicates the log, holds
    /// its session, owns keys and forwards writes, but no longer counts towards a quorum.
    /// Through the leader, joint consensus; refused for the last voter. [`add_member`]
    /// (Self::add_member) gives the vote back.
    pub async fn demote_member(&self, node: impl Into<NodeId>) -> Result<MembershipReport, Error> {
        self.check_running()?;
        let node = node.into();
        membership::ask_leader(&self.shared, MembershipRequest::Demote { node }).await
    }

    /// The fencing tokens of the slots this node's session owns, as applied here.
    pub fn owned(&self) -> BTreeMap<(Key, u32), highlander_core::Token> {
        let Some(session) = self.shared.lease().session else { return BTreeMap::new() };
        let applied = self.shared.applied.read();
        let Some(s) = applied.state.sessions.get(&session) else { return BTreeMap::new() };
        s.owned
            .iter()
            .filter_map(|(k, slot)| {
                applied.state.owner(k, *slot).map(|o| ((k.clone(), *slot), o.token))
            })
            .collect()
    }

    /// Leaves the cluster gracefully: stops accepting work, stops every task (waiting at most
    /// one stop grace), releases every slot whose task has ended (with its token and its last
    /// acknowledgements) and closes the session, so other nodes take the keys over at once,
    /// waits (bounded) until they have, then stops Raft and the transport. A task that is
    /// still running after its lease deadline keeps its slot: the session then expires by
    /// itself after its TTL, and the key moves only then.
    pub async fn shutdown(&self) {
        if self.control.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = &self.shared;
        info!(node = %shared.id, "shutting down");
        // Read before signalling: the session keeper forgets the session once it stops.
        let session = shared.lease().session;
        let owned: Vec<(Key, u32)> = self.owned().into_keys().collect();
        shared.stopping.send_replace(true);
        let (reply, rx) = oneshot::channel();
        let grace = shared.timing.stop_grace();
        let releases = if self
            .control
            .supervisor
            .send(SupervisorCommand::StopAll { grace, reply })
            .await
            .is_ok()
        {
            rx.await.unwrap_or_default()
        } else {
            Vec::new()
        };
        // Job workers stop their handlers and write their completions and failures: the
        // session closes only with no job claimed.
        shared.workers.finish(grace + shared.timing.election_bound() * 2).await;
        shared.set_lease(Lease::default());
        if let Some(session) = session {
            let mut commands = releases;
            commands.push(Command::CloseSession { session });
            // Bounded by what a leader change takes: with no quorum to write to, the session
            // expires by itself and a shutdown should not hang for the whole write timeout.
            let bound = shared.timing.election_bound() * 2;
            if let Err(e) = shared.proposer.write_within(commands, bound).await {
                warn!(node = %shared.id, error = ?e, "could not close the session; it will expire");
            } else {
                self.await_handover(session, &owned).await;
                self.let_new_owners_learn(session, &owned).await;
            }
        }
        self.stop_everything().await;
        info!(node = %shared.id, "stopped");
    }

    /// Waits until every slot the node owned has another owner or nobody else can take it,
    /// so that a leaving leader keeps Raft up until the hand-over is committed.
    async fn await_handover(&self, session: SessionId, owned: &[(Key, u32)]) {
        let shared = &self.shared;
        let mut changes = shared.applied.subscribe();
        let bound = shared.timing.write_timeout;
        let _ = tokio::time::timeout(bound, async {
            loop {
                let done = {
                    let applied = shared.applied.read();
                    let st = &applied.state;
                    owned.iter().all(|(key, slot)| match st.keys.get(key) {
                        None => true,
                        Some(k) => {
                            let others = k.candidates.iter().any(|c| *c != session);
                            !others || st.owner(key, *slot).is_some_and(|o| o.session != session)
                        }
                    })
                };
                if done || changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// On a leaving leader, the new owners' assignments are committed here but their nodes
    /// learn of the commit only from the next heartbeat; if Raft stopped first, they would
    /// wait for an election. So send that heartbeat now and wait (bounded) until each new
    /// owner's node reports it has applied as far as this node has.
    async fn let_new_owners_learn(&self, session: SessionId, owned: &[(Key, u32)]) {
        let shared = &self.shared;
        if shared.raft.leader_hint() != Some(shared.id) {
            return;
        }
        let (applied, nodes) = {
            let a = shared.applied.read();
            let index = a.last_applied.map(|l| l.index).unwrap_or(0);
            let nodes: BTreeSet<NodeId> = owned
                .iter()
                .filter_map(|(key, slot)| a.state.owner(key, *slot))
                .filter(|o| o.session != session)
                .filter_map(|o| a.state.sessions.get(&o.session).map(|s| s.node()))
                .filter(|n| *n != shared.id)
                .collect();
            (index, nodes)
        };
        if nodes.is_empty() {
            return;
        }
        shared.raft.heartbeat().await;
        let step = shared.timing.heartbeat;
        let _ = tokio::time::timeout(shared.timing.election_bound(), async {
            for node in nodes {
                loop {
                    let reply = shared
                        .transport
                        .request(node, Request::Status(KeyQuery::summary()), step * 2)
                        .await;
                    match reply {
                        Ok(Response::Status(r)) if r.applied_index >= applied => break,
                        _ => tokio::time::sleep(step / 5).await,
                    }
                }
            }
        })
        .await;
    }

    async fn stop_everything(&self) {
        self.shared.workers.abort();
        let tasks = self.control.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut tasks) = tasks {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        self.shared.raft.shutdown().await;
        self.shared.transport.shutdown().await;
        // openraft drops its storage in tasks of its own after shutdown returns; a node
        // started again on the same directory in this process must find it unlocked.
        if let Some(lock) = &self.control.disk_lock {
            let waited = tokio::time::timeout(Duration::from_secs(5), async {
                while !lock.released() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            if waited.is_err() {
                warn!(node = %self.shared.id, "the data directory is still locked after shutdown");
            }
        }
    }

    /// Stops the node at once, as if its process were killed: tasks are aborted where they
    /// stand, nothing is handed over and nothing more is written or sent. Its session expires
    /// after its TTL. Meant for simulations; a real node would just exit.
    pub async fn kill(&self) {
        if self.control.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        warn!(node = %self.shared.id, "killed");
        self.shared.stopping.send_replace(true);
        self.shared.set_lease(Lease::default());
        self.stop_everything().await;
    }
}

/// Removes the handler of a registration that did not complete, also when its caller drops
/// the future half-way.
struct PendingRegistration<'a> {
    shared: &'a Shared,
    key: &'a Key,
    done: bool,
}

impl Drop for PendingRegistration<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.handlers().remove(self.key);
            self.shared.handler_changed(self.key);
        }
    }
}

pub(crate) fn outcome_error(key: &Key, outcome: Outcome) -> Error {
    match outcome {
        Outcome::Rejected(Rejection::NoSuchKey) => Error::NoSuchKey { key: key.clone() },
        Outcome::Rejected(Rejection::QueueFull) => Error::QueueFull { key: key.clone() },
        Outcome::Rejected(Rejection::StoreFull) => Error::StoreFull,
        Outcome::Rejected(Rejection::PayloadTooLarge { size, max }) => {
            Error::PayloadTooLarge { size, max }
        }
        Outcome::Rejected(Rejection::SpecConflict { existing }) => {
            Error::SpecConflict { key: key.clone(), existing }
        }
        Outcome::Rejected(Rejection::DuplicateJob { existing }) => {
            Error::DuplicateJob { queue: key.clone(), existing }
        }
        Outcome::Rejected(Rejection::JobsFull { open, bytes }) => Error::JobsFull { open, bytes },
        Outcome::Rejected(Rejection::TooManyQueues { max }) => Error::TooManyQueues { max },
        Outcome::Rejected(Rejection::InvalidJob(e)) => Error::InvalidJob(e),
        Outcome::Rejected(Rejection::QueueCapsConflict { existing }) => {
            Error::QueueCapsConflict { queue: key.clone(), existing }
        }
        Outcome::Rejected(r) => Error::Rejected(r),
        other => Error::Stopped(format!("unexpected outcome {other}")),
    }
}

pub(crate) fn write_error(e: WriteError) -> Error {
    match e {
        WriteError::Timeout => Error::Timeout,
        WriteError::Stopped(reason) => Error::Stopped(reason),
    }
}

/// Serves what peers ask of this node.
struct Inbound {
    shared: Weak<Shared>,
}

impl RequestHandler for Inbound {
    fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response> {
        let shared = self.shared.upgrade();
        Box::pin(async move {
            let Some(shared) = shared else {
                return Response::Refused("node stopped".into());
            };
            match request {
                Request::Raft { to, message } => shared.raft.serve(to, message).await,
                Request::Write(commands) => {
                    if shared.is_stopping() {
                        return Response::Refused("node is shutting down".into());
                    }
                    // Give up before the forwarding node does, so an answer is not lost
                    // to a race between the two timeouts.
                    let timeout = shared.timing.election_bound() * 3 / 4;
                    let written = crate::proposer::write_local(
                        &shared.raft,
                        &shared.cluster_clock,
                        &shared.applied,
                        commands,
                        timeout,
                    )
                    .await;
                    Response::Write(match written {
                        Ok(outcomes) => Ok(outcomes),
                        Err(LocalWriteError::NotLeader(leader)) => {
                            Err(WriteRefusal::NotLeader { leader })
                        }
                        Err(LocalWriteError::Timeout) => {
                            Err(WriteRefusal::Unavailable("timed out".into()))
                        }
                        Err(LocalWriteError::Stopped(e)) => Err(WriteRefusal::Unavailable(e)),
                    })
                }
                Request::KeepAlive { session, lapsed_ms, wall_ms } => Response::KeepAlive(
                    leader::keepalive(&shared, from, session, lapsed_ms, wall_ms).await,
                ),
                Request::Status(query) => Response::Status(Box::new(shared.status(&query))),
                Request::Ping => Response::Pong,
                Request::Hello => Response::Hello(membership::hello(&shared)),
                Request::Schedule { key, op } => Response::Schedule(
                    crate::schedule::control(&shared, key, op).await.map_err(|e| e.to_string()),
                ),
                Request::Membership(request) => {
                    Response::Membership(membership::serve(&shared, from, request).await)
                }
                Request::Jobs(request) => Response::Jobs(
                    crate::jobs::serve(&shared, request).await.map_err(|e| e.to_string()),
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::RequestIds;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// No floor handed to any send may pass the serial of a send still in flight: the state
    /// machine would refuse that send as stale.
    #[test]
    fn no_floor_passes_a_send_still_in_flight() {
        let ids = Arc::new(RequestIds::default());
        let highest_floor = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (ids, highest_floor) = (ids.clone(), highest_floor.clone());
                std::thread::spawn(move || {
                    for _ in 0..50_000 {
                        let (serial, floor, guard) = ids.begin();
                        highest_floor.fetch_max(floor, Ordering::SeqCst);
                        let seen = highest_floor.load(Ordering::SeqCst);
                        assert!(
                            seen <= serial,
                            "a floor of {seen} passed serial {serial} in flight"
                        );
                        drop(guard);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
