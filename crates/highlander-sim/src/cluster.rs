//! [`SimCluster`]: a whole highlander cluster in one process, on the simulated network, a
//! simulated disk per node and tokio's paused clock, with the invariant checker watching
//! every node.

use crate::checker::{Event, InvariantChecker, Violation};
use crate::network::{LinkFaults, SimNetwork};
use highlander::core::BoxFuture;
use highlander::wal::{CrashMode, SimFs};
use highlander::{
    DiskStorage, EnqueueOptions, Error, JobId, Key, KeyQuery, Limits, MemStorage, Node, NodeId,
    Observer, Payload, Seq, StatusReport, Storage, TickOrigin, Timing, Token, WallClock,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// What every node runs when it starts and every time it is restarted: typically the
/// `singleton` registrations of the application under test.
pub type Setup = Arc<dyn Fn(Node) -> BoxFuture<'static, Result<(), Error>> + Send + Sync>;

/// Configures a [`SimCluster`].
pub struct SimClusterBuilder {
    nodes: u64,
    seed: u64,
    timing: Timing,
    limits: Limits,
    setup: Option<Setup>,
    memory: bool,
    clock_rates: BTreeMap<NodeId, f64>,
    epoch_ms: u64,
    wall_offsets: BTreeMap<NodeId, i64>,
    voters: Option<usize>,
}

/// 2026-01-01T00:00:00Z: where simulated wall clocks start unless told otherwise.
pub const DEFAULT_EPOCH_MS: u64 = 1_767_225_600_000;

impl Default for SimClusterBuilder {
    fn default() -> Self {
        SimClusterBuilder {
            nodes: 3,
            seed: 0,
            timing: Timing::default(),
            limits: Limits::default(),
            setup: None,
            memory: false,
            clock_rates: BTreeMap::new(),
            epoch_ms: DEFAULT_EPOCH_MS,
            wall_offsets: BTreeMap::new(),
            voters: None,
        }
    }
}

impl SimClusterBuilder {
    /// How many nodes (ids `1..=n`; default 3).
    pub fn nodes(mut self, n: u64) -> Self {
        self.nodes = n;
        self
    }

    /// The seed of the network's faults (default 0). The same seed gives the same drops,
    /// delays and duplicates for the same sequence of calls.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How many nodes vote: the first `n` ids (default: every node up to 5); the others are
    /// learners (see `NodeBuilder::voters`).
    pub fn voters(mut self, n: usize) -> Self {
        self.voters = Some(n);
        self
    }

    /// The nodes' timing (default [`Timing::default`]).
    pub fn timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// The nodes' queue limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Keep each node's Raft state in memory instead of on its simulated disk. By default
    /// every node has a write-ahead log on a power-loss simulating file system
    /// ([`SimFs`]) that survives its restarts, and a kill loses or tears what was not
    /// synced, as a power cut would.
    pub fn memory_storage(mut self) -> Self {
        self.memory = true;
        self
    }

    /// Makes node `id`'s monotonic clock run at `rate` times simulated time (default 1.0;
    /// 0.5 to 2.0): its lease deadlines, its tasks' aborts and, when it leads, its session
    /// expiries are measured with it. highlander's ownership guarantee assumes the drift
    /// between two nodes over a session TTL stays below the lease margin (2.5 % with the
    /// default timing); with more drift the invariant checker can catch two owners.
    pub fn clock_rate(mut self, id: u64, rate: f64) -> Self {
        self.clock_rates.insert(NodeId(id), rate);
        self
    }

    /// The true time of day when the cluster is built, in ms since the Unix epoch (default
    /// 2026-01-01T00:00:00Z): to run schedules across a chosen day (a DST change, say).
    pub fn start_time_ms(mut self, epoch_ms: u64) -> Self {
        self.epoch_ms = epoch_ms;
        self
    }

    /// Sets node `id`'s wall clock `offset_ms` ahead of the true time of day (behind if
    /// negative). Leases do not read it; schedules fire by the cluster's time of day, the
    /// lower median of the nodes' clocks, so one wrong clock does not make ticks early.
    pub fn wall_clock_offset(mut self, id: u64, offset_ms: i64) -> Self {
        self.wall_offsets.insert(NodeId(id), offset_ms);
        self
    }

    /// What each node runs at every start, e.g. its `singleton` registrations.
    pub fn setup<F, Fut>(mut self, setup: F) -> Self
    where
        F: Fn(Node) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), Error>> + Send + 'static,
    {
        self.setup = Some(Arc::new(move |node| Box::pin(setup(node))));
        self
    }

    /// Starts every node and waits (in simulated time, at most a minute) until each has a
    /// session and has run its setup.
    ///
    /// Must run on a current-thread runtime with the clock paused, for example inside
    /// `#[tokio::test(start_paused = true)]`.
    pub async fn build(self) -> Result<SimCluster, Error> {
        let net = SimNetwork::new(self.seed);
        let origin = Instant::now();
        let checker = Arc::new(Mutex::new(InvariantChecker::new()));
        let wall_offsets = (1..=self.nodes)
            .map(|id| {
                let offset = self.wall_offsets.get(&NodeId(id)).copied().unwrap_or(0);
                (NodeId(id), Arc::new(AtomicI64::new(offset)))
            })
            .collect();
        let mut cluster = SimCluster {
            net,
            nodes: BTreeMap::new(),
            peers: (1..=self.nodes).map(NodeId).collect(),
            timing: self.timing,
            limits: self.limits,
            setup: self.setup,
            checker: checker.clone(),
            observer: Arc::new(CheckerObserver { checker, origin, epoch_ms: self.epoch_ms }),
            origin,
            epoch_ms: self.epoch_ms,
            wall_offsets,
            seed: self.seed,
            memory: self.memory,
            clock_rates: self.clock_rates,
            zombies: Vec::new(),
            wipes: BTreeMap::new(),
            voters: self.voters,
        };
        for id in cluster.peers.clone() {
            let disk = cluster.blank_disk(id);
            cluster.nodes.insert(id, SimNode { disk, node: None });
            cluster.boot(id).await?;
        }
        for id in cluster.peers.clone() {
            cluster.ready_and_setup(id).await?;
        }
        Ok(cluster)
    }
}

struct SimNode {
    disk: NodeDisk,
    node: Option<Node>,
}

/// What survives a node's restart.
enum NodeDisk {
    Memory(MemStorage),
    Sim(SimFs),
}

impl NodeDisk {
    fn storage(&self, id: NodeId) -> Storage {
        match self {
            NodeDisk::Memory(m) => Storage::Memory(m.clone()),
            NodeDisk::Sim(fs) => {
                Storage::Disk(DiskStorage::simulated(Arc::new(fs.clone()), format!("/{id}")))
            }
        }
    }
}

/// A simulated cluster: real highlander nodes, a simulated network, simulated time.
///
/// Kill, restart and partition nodes, degrade links, advance time, and check after every
/// event that no key slot had two running owners, tokens only grew, and no acknowledged
/// message was lost or reordered.
pub struct SimCluster {
    net: SimNetwork,
    nodes: BTreeMap<NodeId, SimNode>,
    peers: Vec<NodeId>,
    timing: Timing,
    limits: Limits,
    setup: Option<Setup>,
    checker: Arc<Mutex<InvariantChecker>>,
    observer: Arc<CheckerObserver>,
    origin: Instant,
    seed: u64,
    memory: bool,
    clock_rates: BTreeMap<NodeId, f64>,
    /// Earlier processes of nodes that were started again elsewhere while they still ran.
    zombies: Vec<Node>,
    /// How many times each node's disk was replaced by a blank one.
    wipes: BTreeMap<NodeId, u64>,
    /// The true time of day at `origin`.
    epoch_ms: u64,
    /// How far each node's wall clock is ahead of the true time of day.
    wall_offsets: BTreeMap<NodeId, Arc<AtomicI64>>,
    voters: Option<usize>,
}

impl SimCluster {
    /// Starts configuring a cluster.
    pub fn builder() -> SimClusterBuilder {
        SimClusterBuilder::default()
    }

    /// How many nodes vote when the cluster forms, if set (see [`SimClusterBuilder::voters`]).
    pub fn voters(&self) -> Option<usize> {
        self.voters
    }

    /// The seed the cluster was built with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Every node id, running or not.
    pub fn ids(&self) -> Vec<NodeId> {
        self.peers.clone()
    }

    /// The ids of running nodes.
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.node.is_some()).map(|(id, _)| *id).collect()
    }

    /// A running node, or `None` if it is killed or shut down.
    pub fn try_node(&self, id: impl Into<NodeId>) -> Option<&Node> {
        self.nodes.get(&id.into()).and_then(|n| n.node.as_ref())
    }

    /// A running node.
    ///
    /// # Panics
    /// If the node does not exist or is not running (a test asking for a dead node has a bug).
    pub fn node(&self, id: impl Into<NodeId>) -> &Node {
        let id = id.into();
        self.try_node(id).unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// A node's simulated disk (`None` with [`SimClusterBuilder::memory_storage`]), to inspect
    /// or to damage. Its data directory is `/n<id>`.
    pub fn disk(&self, id: impl Into<NodeId>) -> Option<SimFs> {
        match &self.nodes.get(&id.into())?.disk {
            NodeDisk::Sim(fs) => Some(fs.clone()),
            NodeDisk::Memory(_) => None,
        }
    }

    /// The simulated network, for finer faults.
    pub fn network(&self) -> &SimNetwork {
        &self.net
    }

    /// Simulated time since the cluster was built.
    pub fn now(&self) -> Duration {
        Instant::now() - self.origin
    }

    /// The true time of day now, in ms since the Unix epoch (no node's clock offset).
    pub fn wall_ms(&self) -> u64 {
        self.epoch_ms + self.now().as_millis() as u64
    }

    /// Moves node `id`'s wall clock to `offset_ms` ahead of the true time of day (behind if
    /// negative), at once, as a clock step would.
    pub fn set_wall_clock_offset(&self, id: impl Into<NodeId>, offset_ms: i64) {
        if let Some(o) = self.wall_offsets.get(&id.into()) {
            o.store(offset_ms, Ordering::Relaxed);
        }
    }

    /// Lets simulated time pass.
    pub async fn run_for(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    /// Kills a node: it stops at once, its messages in flight are lost, nothing is handed
    /// over. Its storage is kept for [`restart`](Self::restart).
    pub async fn kill(&mut self, id: impl Into<NodeId>) {
        let id = id.into();
        self.net.set_down(id, true);
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(node) = n.node.take() {
                node.kill().await;
            }
            // The power goes out with the process: whatever was not synced is lost or torn.
            if let NodeDisk::Sim(fs) = &n.disk {
                fs.crash(CrashMode::Torn);
            }
        }
    }

    /// A blank disk for node `id`, different for each wipe.
    fn blank_disk(&self, id: NodeId) -> NodeDisk {
        if self.memory {
            return NodeDisk::Memory(MemStorage::new());
        }
        let wipes = self.wipes.get(&id).copied().unwrap_or(0);
        let seed = self.seed ^ id.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ wipes.rotate_left(32);
        NodeDisk::Sim(SimFs::new(seed))
    }

    /// Kills a node and gives it a blank disk, as if its machine lost its data directory (or
    /// was replaced by a new one under the same id). [`restart`](Self::restart) it to bring
    /// it back: it joins the cluster as new storage — a learner that catches up and then
    /// votes in place of the lost one — never as the member it was.
    pub async fn wipe(&mut self, id: impl Into<NodeId>) {
        let id = id.into();
        self.kill(id).await;
        *self.wipes.entry(id).or_insert(0) += 1;
        let disk = self.blank_disk(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.disk = disk;
        }
    }

    /// Starts another process for node `id` on a blank disk while the current one keeps
    /// running, as an orchestrator does when it replaces an instance it believes dead (or as
    /// an id configured twice would). The new process takes over the node's address: the old
    /// one is cut off — nothing reaches it and nothing it sends arrives — but its tasks run
    /// until it stops them itself. Both report their task events as node `id`, so the
    /// invariant checker sees any overlap. Does not wait for the new process's session.
    pub async fn start_replacement(&mut self, id: impl Into<NodeId>) -> Result<(), Error> {
        let id = id.into();
        let old = self.nodes.get_mut(&id).and_then(|n| n.node.take());
        *self.wipes.entry(id).or_insert(0) += 1;
        let disk = self.blank_disk(id);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.disk = disk;
        }
        self.zombies.extend(old);
        self.boot(id).await?;
        self.setup_in_background(id);
        Ok(())
    }

    /// Earlier processes of nodes started again with [`start_replacement`](Self::start_replacement).
    pub fn replaced_processes(&self) -> &[Node] {
        &self.zombies
    }

    /// Sets node `id`'s clock rate for its next start (see [`SimClusterBuilder::clock_rate`]).
    pub fn set_clock_rate(&mut self, id: impl Into<NodeId>, rate: f64) {
        self.clock_rates.insert(id.into(), rate);
    }

    /// Shuts a node down gracefully (it hands its keys over first).
    pub async fn shutdown(&mut self, id: impl Into<NodeId>) {
        let id = id.into();
        if let Some(node) = self.nodes.get_mut(&id).and_then(|n| n.node.take()) {
            node.shutdown().await;
        }
    }

    /// Starts a stopped node again from the storage it had, and runs its setup once it has a
    /// session. Restarting a running node kills it first.
    pub async fn restart(&mut self, id: impl Into<NodeId>) -> Result<(), Error> {
        let id = id.into();
        if self.try_node(id).is_some() {
            self.kill(id).await;
        }
        self.boot(id).await?;
        self.ready_and_setup(id).await
    }

    /// Starts a stopped node again without waiting for it to reach a quorum; its setup runs
    /// in the background once it does.
    pub async fn restart_in_background(&mut self, id: impl Into<NodeId>) -> Result<(), Error> {
        let id = id.into();
        if self.try_node(id).is_some() {
            self.kill(id).await;
        }
        self.boot(id).await?;
        self.setup_in_background(id);
        Ok(())
    }

    /// Runs node `id`'s setup in the background once it has a session.
    fn setup_in_background(&self, id: NodeId) {
        let node = self.node(id).clone();
        let setup = self.setup.clone();
        let bound = self.timing.write_timeout * 20;
        tokio::spawn(async move {
            if node.ready(bound).await.is_ok()
                && let Some(setup) = setup
                && let Err(e) = setup(node.clone()).await
            {
                tracing::warn!(node = %node.id(), error = %e, "setup after a start failed");
            }
        });
    }

    async fn boot(&mut self, id: NodeId) -> Result<(), Error> {
        let storage = match self.nodes.get(&id) {
            Some(n) => n.disk.storage(id),
            None => return Err(Error::Config(highlander::ConfigError::OwnIdMissing(id))),
        };
        let transport = self.net.transport(id);
        self.net.set_down(id, false);
        let mut builder = Node::builder();
        if let Some(n) = self.voters {
            builder = builder.voters(n);
        }
        let node = builder
            .id(id)
            .peers(self.peers.clone())
            .transport(transport)
            .timing(self.timing)
            .limits(self.limits)
            .storage(storage)
            .clock(SimClock {
                origin: self.origin,
                epoch_ms: self.epoch_ms,
                offset_ms: self.wall_offsets.get(&id).cloned().unwrap_or_default(),
            })
            .clock_rate(self.clock_rates.get(&id).copied().unwrap_or(1.0))
            .observer(self.observer.clone())
            .start()
            .await?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.node = Some(node);
        }
        Ok(())
    }

    async fn ready_and_setup(&self, id: NodeId) -> Result<(), Error> {
        let node = self.node(id).clone();
        node.ready(Duration::from_secs(60)).await?;
        if let Some(setup) = &self.setup {
            setup(node).await?;
        }
        Ok(())
    }

    /// Cuts both directions between two groups of nodes.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        self.net.partition(&ids(a), &ids(b));
    }

    /// Cuts only the direction from `from` to `to`.
    pub fn partition_oneway(&self, from: &[u64], to: &[u64]) {
        self.net.partition_oneway(&ids(from), &ids(to));
    }

    /// Removes every partition.
    pub fn heal(&self) {
        self.net.heal();
    }

    /// Sets the faults of the directed link `from → to`.
    pub fn link(&self, from: u64, to: u64, faults: LinkFaults) {
        self.net.set_link(NodeId(from), NodeId(to), faults);
    }

    /// Sends from node `from` and, if the send is acknowledged, records it for the
    /// invariant checker, which then expects its delivery.
    pub async fn send(
        &self,
        from: impl Into<NodeId>,
        key: &str,
        payload: impl Into<Payload>,
    ) -> Result<Seq, Error> {
        let from = from.into();
        let payload = payload.into();
        let node = self
            .try_node(from)
            .ok_or_else(|| Error::Unavailable(format!("node {from} is not running")))?
            .clone();
        let seq = node.send(key, payload.clone()).await?;
        let key = Key::new(key)?;
        self.observer.record(Event::Sent { from, key, seq, payload });
        Ok(seq)
    }

    /// Enqueues a job from node `from` and, if the enqueue is acknowledged, records it for
    /// the invariant checker, which then expects it to finish.
    pub async fn enqueue(
        &self,
        from: impl Into<NodeId>,
        queue: &str,
        payload: impl Into<Payload>,
        options: EnqueueOptions,
    ) -> Result<JobId, Error> {
        let from = from.into();
        let node = self
            .try_node(from)
            .ok_or_else(|| Error::Unavailable(format!("node {from} is not running")))?
            .clone();
        let job = node.enqueue_with(queue, payload, options).await?;
        let queue = Key::new(queue)?;
        self.observer.record(Event::JobEnqueued { from, queue, job });
        Ok(job)
    }

    /// Declares a queue's caps to the invariant checker, which then checks them at every
    /// job start.
    pub fn expect_queue_caps(&self, queue: &str, caps: highlander::QueueCaps) {
        if let Ok(queue) = Key::new(queue) {
            self.checker().expect_queue_caps(queue, caps);
        }
    }

    /// A job as the most up-to-date running node has applied it.
    pub fn job(&self, job: JobId) -> Option<highlander::JobReport> {
        let node = self
            .nodes
            .values()
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.status_with(&KeyQuery::summary()).applied_index)?;
        node.job(job)
    }

    /// Panics unless every acknowledged enqueue has finished (completed, dead or cancelled)
    /// on the most up-to-date running node: call once faults stopped and the cluster had
    /// time to settle.
    pub fn assert_jobs_finished(&self) {
        let lost = self.checker().check_jobs_finished(|job| self.job(job).map(|r| r.state));
        if !lost.is_empty() {
            let lines: Vec<String> = lost.iter().take(20).map(|v| v.to_string()).collect();
            panic!(
                "SIM_SEED={}: {} job(s) unfinished:\n{}",
                self.seed,
                lost.len(),
                lines.join("\n")
            );
        }
    }

    /// The newest status among running nodes (the one that applied the most), with its first
    /// [`KeyQuery::DEFAULT_LIMIT`] keys.
    pub fn status(&self) -> Option<StatusReport> {
        self.status_with(&KeyQuery::default())
    }

    /// The newest status among running nodes, listing the keys `query` selects.
    pub fn status_with(&self, query: &KeyQuery) -> Option<StatusReport> {
        let newest = self
            .nodes
            .values()
            .filter_map(|n| n.node.as_ref())
            .max_by_key(|n| n.status_with(&KeyQuery::summary()).applied_index)?;
        Some(newest.status_with(query))
    }

    /// The owner (node, token) of each slot of `key`, as the most up-to-date running node has
    /// applied it.
    pub fn owners(&self, key: &str) -> Vec<Option<(NodeId, Token)>> {
        // The key is the first one with its own name as prefix.
        let query = KeyQuery::default().with_prefix(key).limit(1);
        let Some(status) = self.status_with(&query) else { return Vec::new() };
        status
            .keys
            .iter()
            .find(|k| k.key.as_str() == key)
            .map(|k| k.owners.iter().map(|o| o.map(|o| (o.node, o.token))).collect())
            .unwrap_or_default()
    }

    /// Waits (in simulated time) until `done` holds, checking every 10 ms; returns how long it
    /// took, or `None` after `timeout`.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&SimCluster) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if done(self) {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The invariant checker, to inspect or to feed extra events.
    pub fn checker(&self) -> MutexGuard<'_, InvariantChecker> {
        self.checker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every invariant violation seen so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.checker().violations().to_vec()
    }

    /// Panics with a report naming every violation (and the seed) if there is any.
    pub fn assert_invariants(&self) {
        let v = self.violations();
        if !v.is_empty() {
            let lines: Vec<String> = v.iter().map(|v| v.to_string()).collect();
            panic!(
                "SIM_SEED={}: {} invariant violation(s):\n{}",
                self.seed,
                v.len(),
                lines.join("\n")
            );
        }
    }

    /// Stops every running node gracefully (and kills earlier processes left running by
    /// [`start_replacement`](Self::start_replacement)).
    pub async fn shutdown_all(&mut self) {
        for zombie in std::mem::take(&mut self.zombies) {
            zombie.kill().await;
        }
        for id in self.running() {
            self.shutdown(id).await;
        }
    }
}

fn ids(v: &[u64]) -> Vec<NodeId> {
    v.iter().map(|i| NodeId(*i)).collect()
}

/// Feeds every node's task events to the invariant checker, stamped with simulated time.
struct CheckerObserver {
    checker: Arc<Mutex<InvariantChecker>>,
    origin: Instant,
    /// The true time of day at `origin`.
    epoch_ms: u64,
}

impl CheckerObserver {
    fn record(&self, event: Event) {
        let at = Instant::now() - self.origin;
        let result = self.checker.lock().unwrap_or_else(|e| e.into_inner()).record(at, event);
        if let Err(v) = result {
            tracing::error!(violation = %v, "invariant violated");
        }
    }
}

impl Observer for CheckerObserver {
    fn tick_started(
        &self,
        node: NodeId,
        key: &Key,
        token: Token,
        run: u64,
        tick_ms: u64,
        attempt: u32,
        origin: TickOrigin,
    ) {
        let true_ms = self.epoch_ms + (Instant::now() - self.origin).as_millis() as u64;
        self.record(Event::TickStarted {
            node,
            key: key.clone(),
            token,
            run,
            tick_ms,
            attempt,
            origin,
            true_ms,
        });
    }

    fn tick_stopped(&self, node: NodeId, key: &Key, token: Token, run: u64) {
        self.record(Event::TickStopped { node, key: key.clone(), token, run });
    }

    fn task_started(&self, node: NodeId, key: &Key, slot: u32, token: Token) {
        self.record(Event::TaskStarted { node, key: key.clone(), slot, token });
    }

    fn job_started(
        &self,
        node: NodeId,
        queue: &Key,
        job: JobId,
        token: Token,
        partition: Option<&str>,
    ) {
        let partition = partition.map(str::to_string);
        self.record(Event::JobStarted { node, queue: queue.clone(), job, token, partition });
    }

    fn job_stopped(&self, node: NodeId, queue: &Key, job: JobId, token: Token) {
        self.record(Event::JobStopped { node, queue: queue.clone(), job, token });
    }

    fn leader_elected(&self, node: NodeId, term: u64) {
        self.record(Event::LeaderElected { node, term });
    }

    fn task_stopped(&self, node: NodeId, key: &Key, slot: u32, token: Token) {
        self.record(Event::TaskStopped { node, key: key.clone(), slot, token });
    }

    fn message_delivered(
        &self,
        node: NodeId,
        key: &Key,
        token: Token,
        seq: Seq,
        payload: &Payload,
    ) {
        self.record(Event::Delivered {
            node,
            key: key.clone(),
            token,
            seq,
            payload: payload.clone(),
        });
    }
}

/// Wall-clock time for simulated nodes: the epoch plus simulated time plus the node's offset.
struct SimClock {
    origin: Instant,
    epoch_ms: u64,
    offset_ms: Arc<AtomicI64>,
}

impl WallClock for SimClock {
    fn since_epoch(&self) -> Duration {
        let true_ms = self.epoch_ms as i64 + (Instant::now() - self.origin).as_millis() as i64;
        Duration::from_millis((true_ms + self.offset_ms.load(Ordering::Relaxed)).max(0) as u64)
    }
}

/// Makes [`LinkFaults`] easy to build in tests.
pub fn lossy(drop: f64, delay_ms: std::ops::Range<u64>) -> LinkFaults {
    LinkFaults {
        drop,
        duplicate: 0.0,
        delay_min: Duration::from_millis(delay_ms.start),
        delay_max: Duration::from_millis(delay_ms.end),
    }
}
