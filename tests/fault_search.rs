//! A randomized fault search: every seed derives a schedule of kills, restarts, graceful
//! shutdowns, partitions (two-way and one-way), lossy, slow or duplicating links, lost disks,
//! a second process of a node started on new storage while the first still runs, nodes
//! removed from the membership and added back, and withdrawals whose callers give up at any
//! point; each node's clock runs at its own rate, within the lease margin. The schedule runs
//! on a simulated cluster with the invariant checker watching every event; then the faults
//! stop and liveness is checked: every node votes again, every key is owned again and every
//! acknowledged message is delivered within a bound.
//!
//! `HIGHLANDER_SIM_SEEDS=n` runs n seeds (default 500), `HIGHLANDER_SIM_SEED=s` replays one.
//! A failing seed prints `SIM_SEED=s` and its schedule. The schedule is a pure function of the
//! seed; the run itself is deterministic up to openraft's own randomness (election timeouts).

mod common;

use common::Journal;
use highlander::{
    Delivery, EnqueueOptions, Error, JobContext, JobFailure, Overlap, ScheduleOptions, Timing,
    WorkerOptions,
};
use highlander_sim::{LinkFaults, SimCluster};
use std::fmt;
use std::time::Duration;

const KEYS: [&str; 3] = ["k0", "k1", "k2"];
/// A singleton whose handler ignores cancellation: only the abort at the lease deadline
/// stops it, so an over-long lease shows as two owners.
const STUBBORN: &str = "stubborn";
const GROUP: &str = "group";
const GROUP_SLOTS: u32 = 2;
/// Schedules: every second with the default policies (a run of 300 ms), and every two
/// seconds at most once with up to two runs at once (a run of 3 s). The checker watches
/// their ticks: fired once, never early, in order, only under ownership.
const SCHEDULES: [&str; 2] = ["tick", "tock"];
/// A job queue every node works on (3 at a time, at most 4 across the cluster, one per
/// partition): every send also enqueues a job, which runs 200 ms and fails one attempt in
/// four. The checker watches its runs (one at a time, increasing tokens, caps) and the
/// liveness phase checks every acknowledged job finished.
const QUEUE: &str = "work";
const QUEUE_CAPS: highlander::QueueCaps =
    highlander::QueueCaps { global: Some(4), per_partition: Some(1) };

/// The singletons a node may withdraw from: the plain keys, then the stubborn one.
fn withdrawable(i: usize) -> &'static str {
    KEYS.get(i).copied().unwrap_or(STUBBORN)
}

/// SplitMix64: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Kill(u64),
    Restart(u64),
    Shutdown(u64),
    Partition(Vec<u64>, Vec<u64>),
    OneWay(Vec<u64>, Vec<u64>),
    Heal,
    Link {
        from: u64,
        to: u64,
        drop_pct: u64,
        dup_pct: u64,
        delay_ms: (u64, u64),
    },
    ClearLinks,
    Send {
        from: u64,
        key: usize,
        count: u64,
    },
    /// Unregister a singleton on a node (its caller giving up after `cut_ms`, if set), then
    /// register it again at once.
    Withdraw {
        node: u64,
        key: usize,
        cut_ms: Option<u64>,
    },
    /// The node loses its disk and comes back on an empty one.
    Wipe(u64),
    /// Another process of the node starts on a new disk; the first runs on, cut off.
    Replace(u64),
    /// The node is removed from the membership (it stops), then comes back on an empty disk
    /// and is added again.
    Readd(u64),
    Wait(u64),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Kill(n) => write!(f, "kill n{n}"),
            Step::Restart(n) => write!(f, "restart n{n}"),
            Step::Shutdown(n) => write!(f, "shutdown n{n}"),
            Step::Partition(a, b) => write!(f, "partition {a:?} | {b:?}"),
            Step::OneWay(a, b) => write!(f, "cut {a:?} -> {b:?}"),
            Step::Heal => write!(f, "heal"),
            Step::Link { from, to, drop_pct, dup_pct, delay_ms } => {
                write!(
                    f,
                    "link n{from}->n{to} drop {drop_pct}% dup {dup_pct}% delay {delay_ms:?} ms"
                )
            }
            Step::ClearLinks => write!(f, "clear links"),
            Step::Send { from, key, count } => {
                write!(f, "send {count} to {} from n{from}", key_name(*key))
            }
            Step::Withdraw { node, key, cut_ms: None } => {
                write!(f, "withdraw n{node} from {}", withdrawable(*key))
            }
            Step::Withdraw { node, key, cut_ms: Some(cut) } => {
                write!(f, "withdraw n{node} from {}, given up after {cut} ms", withdrawable(*key))
            }
            Step::Wipe(n) => write!(f, "wipe n{n}'s disk"),
            Step::Replace(n) => write!(f, "start n{n} again on a new disk, the old one cut off"),
            Step::Readd(n) => write!(f, "remove n{n} from the membership and add it back"),
            Step::Wait(ms) => write!(f, "wait {ms} ms"),
        }
    }
}

impl Step {
    /// The node whose process this step stops, starts or replaces, if any.
    fn acts_on(&self) -> Option<u64> {
        match self {
            Step::Kill(n)
            | Step::Restart(n)
            | Step::Shutdown(n)
            | Step::Wipe(n)
            | Step::Replace(n)
            | Step::Readd(n) => Some(*n),
            _ => None,
        }
    }
}

/// When each node could have lost its leadership by a fault: one entry per step, from the
/// instant the step began until the next one, naming the nodes that were stopped, started or
/// replaced by the step, or whose messages could not reach a quorum of the others (cut,
/// lossy links, peers down). The rule checked with it: a term rises only after the leader of
/// the previous term was in such a set (pre-vote: a node that starts, restarts or is cut off
/// alone never raises the term of a cluster whose leader is alive).
#[derive(Default)]
struct Disturbances(Vec<(Duration, std::collections::BTreeSet<u64>)>);

impl Disturbances {
    fn record(&mut self, sim: &SimCluster, nodes: u64, began: Duration, step: Option<&Step>) {
        // The voters are the first ids; only they elect.
        let voters = sim.voters().unwrap_or(nodes as usize) as u64;
        let quorum = voters / 2 + 1;
        let mut set: std::collections::BTreeSet<u64> =
            step.and_then(Step::acts_on).into_iter().collect();
        for l in 1..=nodes {
            let unheard = (1..=voters)
                .filter(|m| *m != l)
                .filter(|m| !sim.network().delivers(highlander::NodeId(l), highlander::NodeId(*m)))
                .count() as u64;
            if unheard >= quorum || sim.try_node(l).is_none() {
                set.insert(l);
            }
        }
        self.0.push((began, set));
    }

    /// Whether `node` was disturbed at some moment of `[from, to]`.
    fn disturbed(&self, node: u64, from: Duration, to: Duration) -> bool {
        self.0.iter().enumerate().any(|(i, (start, set))| {
            let end = self.0.get(i + 1).map_or(Duration::MAX, |(next, _)| *next);
            set.contains(&node) && *start <= to && end >= from
        })
    }

    /// Checks the elections seen: one leader per term, and a term rises only when the
    /// previous leader was disturbed between its election and the next one.
    fn check(&self, elections: &[(Duration, highlander::NodeId, u64)]) -> Result<usize, String> {
        let mut by_term = elections.to_vec();
        by_term.sort_by_key(|(at, _, term)| (*term, *at));
        // A leader that saw its leadership flicker (its metrics) reports the same term again.
        by_term.dedup_by_key(|(_, node, term)| (*node, *term));
        for pair in by_term.windows(2) {
            let ((at0, n0, t0), (at1, n1, t1)) = (pair[0], pair[1]);
            if t0 == t1 && n0 != n1 {
                return Err(format!(
                    "two leaders in term {t0}: {n0} at {at0:?} and {n1} at {at1:?}"
                ));
            }
            if t1 > t0 && !self.disturbed(n0.0, at0, at1) {
                return Err(format!(
                    "term rose from {t0} (leader {n0}, elected at {:.3}s) to {t1} ({n1}, at                      {:.3}s) with no fault on {n0} in between",
                    at0.as_secs_f64(),
                    at1.as_secs_f64()
                ));
            }
        }
        Ok(by_term.len())
    }
}

fn key_name(i: usize) -> &'static str {
    if i < KEYS.len() { KEYS[i] } else { GROUP }
}

/// The whole plan of one seed: a pure function of it.
#[derive(Debug, PartialEq)]
struct Schedule {
    nodes: u64,
    /// How many of them vote (the first ids); the others are learners. Half the five-node
    /// seeds run three voters and two learners.
    voters: u64,
    /// Each node's clock rate, in parts per million off 1.0: within ±0.8 %, so two clocks
    /// drift apart by at most 1.6 % of a TTL, below the 2.5 % lease margin.
    clock_ppm: Vec<i64>,
    steps: Vec<Step>,
}

impl Schedule {
    fn of(seed: u64) -> Schedule {
        let mut rng = Rng(seed);
        let nodes = if rng.chance(20) { 5 } else { 3 };
        let ids: Vec<u64> = (1..=nodes).collect();
        let clock_ppm = ids.iter().map(|_| rng.below(16_001) as i64 - 8_000).collect();
        let mut steps = Vec::new();
        let count = 10 + rng.below(10);
        for _ in 0..count {
            let step = match rng.below(100) {
                0..=11 => Step::Kill(1 + rng.below(nodes)),
                12..=21 => Step::Restart(1 + rng.below(nodes)),
                22..=25 => Step::Shutdown(1 + rng.below(nodes)),
                26..=35 => {
                    let mut a = Vec::new();
                    let mut b = Vec::new();
                    for id in &ids {
                        if rng.chance(40) { a.push(*id) } else { b.push(*id) }
                    }
                    if a.is_empty() || b.is_empty() { Step::Heal } else { Step::Partition(a, b) }
                }
                36..=41 => {
                    let from = 1 + rng.below(nodes);
                    let to = 1 + (from + rng.below(nodes - 1)) % nodes;
                    Step::OneWay(vec![from], vec![to])
                }
                42..=49 => Step::Heal,
                50..=59 => {
                    let from = 1 + rng.below(nodes);
                    let to = 1 + (from + rng.below(nodes - 1)) % nodes;
                    let lo = rng.below(30);
                    Step::Link {
                        from,
                        to,
                        drop_pct: rng.below(40),
                        dup_pct: rng.below(20),
                        delay_ms: (lo, lo + 1 + rng.below(80)),
                    }
                }
                60..=63 => Step::ClearLinks,
                64..=84 => Step::Send {
                    from: 1 + rng.below(nodes),
                    key: rng.below(KEYS.len() as u64 + 1) as usize,
                    count: 1 + rng.below(5),
                },
                85..=89 => Step::Withdraw {
                    node: 1 + rng.below(nodes),
                    key: rng.below(KEYS.len() as u64 + 1) as usize,
                    cut_ms: rng.chance(60).then(|| 1 + rng.below(800)),
                },
                90..=92 => Step::Wipe(1 + rng.below(nodes)),
                93..=94 => Step::Replace(1 + rng.below(nodes)),
                95 => Step::Readd(1 + rng.below(nodes)),
                _ => Step::Wait(rng.below(3000)),
            };
            steps.push(step);
            // Time passes between faults, sometimes more than a session TTL.
            steps.push(Step::Wait(50 + rng.below(2500)));
        }
        let voters = if nodes == 5 && seed % 2 == 1 { 3 } else { nodes };
        Schedule { nodes, voters, clock_ppm, steps }
    }

    fn clock_rate(&self, node: u64) -> f64 {
        1.0 + self.clock_ppm[node as usize - 1] as f64 / 1e6
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rates: Vec<String> =
            (1..=self.nodes).map(|n| format!("n{n} {:.4}", self.clock_rate(n))).collect();
        writeln!(
            f,
            "{} nodes ({} voters), clock rates {}",
            self.nodes,
            self.voters,
            rates.join(", ")
        )?;
        for s in &self.steps {
            writeln!(f, "  {s}")?;
        }
        Ok(())
    }
}

/// Runs one seed; `Err` describes what went wrong.
async fn run_seed(seed: u64) -> Result<String, String> {
    let schedule = Schedule::of(seed);
    let journal = Journal::default();
    let j = journal.clone();
    let mut builder =
        SimCluster::builder().nodes(schedule.nodes).voters(schedule.voters as usize).seed(seed);
    for n in 1..=schedule.nodes {
        builder = builder.clock_rate(n, schedule.clock_rate(n));
    }
    let mut sim = builder
        .setup(move |node| {
            let j = j.clone();
            async move {
                for k in KEYS {
                    node.singleton(k, j.consumer()).await?;
                }
                node.exclusive(GROUP, GROUP_SLOTS, j.consumer()).await?;
                node.singleton(STUBBORN, j.stubborn()).await?;
                let work = |ms| {
                    move |t: highlander::TickContext| async move {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                            _ = t.cancelled() => {}
                        }
                    }
                };
                node.every(SCHEDULES[0], Duration::from_secs(1), work(300)).await?;
                let options = ScheduleOptions::default()
                    .overlap(Overlap::AllowAll { max: 2 })
                    .delivery(Delivery::AtMostOnce);
                node.every_with(SCHEDULES[1], Duration::from_secs(2), options, work(3000)).await?;
                let workers = WorkerOptions::default()
                    .concurrency(3)
                    .global_cap(4)
                    .partition_cap(1)
                    .backoff(|attempt| Duration::from_millis(100 * u64::from(attempt)));
                node.worker(QUEUE, workers, |ctx: JobContext| async move {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = ctx.cancelled() => return Err(JobFailure::retry("stopped")),
                    }
                    if ctx.id().0 % 4 == u64::from(ctx.attempt()) % 4 {
                        return Err(JobFailure::retry("this attempt fails"));
                    }
                    Ok(())
                })
                .await?;
                Ok(())
            }
        })
        .build()
        .await
        .map_err(|e| format!("cluster did not start: {e}"))?;

    sim.expect_queue_caps(QUEUE, QUEUE_CAPS);
    let mut serial = 0u64;
    let mut acknowledged = 0u64;
    let mut jobs = 0u64;
    let mut producers = tokio::task::JoinSet::new();
    let mut disks = Disks { voters: schedule.voters, ..Disks::default() };
    let trace = std::env::var("HIGHLANDER_SIM_TRACE").is_ok();
    let mut disturbances = Disturbances::default();
    disturbances.record(&sim, schedule.nodes, sim.now(), None);
    for step in &schedule.steps {
        let began = sim.now();
        if trace {
            eprintln!("[{:>8.3}s] {step}", began.as_secs_f64());
        }
        match step {
            Step::Kill(n) => sim.kill(*n).await,
            Step::Shutdown(n) => sim.shutdown(*n).await,
            Step::Restart(n) => {
                if sim.try_node(*n).is_none() {
                    sim.restart_in_background(*n)
                        .await
                        .map_err(|e| format!("restart n{n}: {e}"))?;
                }
            }
            Step::Partition(a, b) => sim.partition(a, b),
            Step::OneWay(a, b) => sim.partition_oneway(a, b),
            Step::Heal => sim.heal(),
            Step::Link { from, to, drop_pct, dup_pct, delay_ms } => sim.link(
                *from,
                *to,
                LinkFaults {
                    drop: *drop_pct as f64 / 100.0,
                    duplicate: *dup_pct as f64 / 100.0,
                    delay_min: Duration::from_millis(delay_ms.0),
                    delay_max: Duration::from_millis(delay_ms.1),
                },
            ),
            Step::ClearLinks => sim.network().clear_link_faults(),
            Step::Send { from, key, count } => {
                for _ in 0..*count {
                    serial += 1;
                    let payload = format!("s{seed}-m{serial}");
                    // A send that cannot complete in time has an unknown outcome: it may still
                    // be delivered, which the checker allows, but it is not expected.
                    match tokio::time::timeout(
                        Duration::from_secs(1),
                        sim.send(*from, key_name(*key), payload),
                    )
                    .await
                    {
                        Ok(Ok(_)) => acknowledged += 1,
                        // Expected under faults: no quorum, a stopping node, or every node that
                        // registered the key is gone (an idle key is forgotten).
                        Ok(Err(
                            Error::Timeout
                            | Error::Unavailable(_)
                            | Error::ShuttingDown
                            | Error::Stopped(_)
                            | Error::NoSuchKey { .. },
                        ))
                        | Err(_) => {}
                        Ok(Err(e)) => {
                            return Err(format!("send failed with an unexpected error: {e}"));
                        }
                    }
                    // And a job, in one of three partitions, from the same node: enqueued in
                    // the background, like a producer beside the faults, so the schedule's
                    // timing does not depend on how long an enqueue waits for a quorum.
                    if let Some(node) = sim.try_node(*from).cloned() {
                        let options = EnqueueOptions::new()
                            .partition(format!("p{}", serial % 3))
                            .max_attempts(5);
                        let payload = format!("job {serial}");
                        let from = highlander::NodeId(*from);
                        producers.spawn(async move {
                            let enqueue = node.enqueue_with(QUEUE, payload, options);
                            (from, tokio::time::timeout(Duration::from_secs(5), enqueue).await)
                        });
                    }
                }
            }
            Step::Withdraw { node, key, cut_ms } => {
                let Some(n) = sim.try_node(*node).cloned() else { continue };
                let name = withdrawable(*key);
                // Each may fail under faults (no quorum, a stopping node, the slot not released
                // in time); what matters is that no two owners ever overlap, which the checker
                // sees, and that the key is owned again in the liveness phase. A caller that
                // gives up early leaves its withdrawal in flight: it must not undo the
                // registration that follows.
                let cut = cut_ms.map_or(Duration::from_secs(3), Duration::from_millis);
                let _ = tokio::time::timeout(cut, n.unregister(name)).await;
                let register = async {
                    if name == STUBBORN {
                        n.singleton(name, journal.stubborn()).await
                    } else {
                        n.singleton(name, journal.consumer()).await
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(3), register).await;
            }
            Step::Wipe(n) => {
                if disks.may_lose_one(&sim) {
                    disks.counts[0] += 1;
                    sim.wipe(*n).await;
                    sim.restart_in_background(*n)
                        .await
                        .map_err(|e| format!("restart n{n}: {e}"))?;
                    disks.replaced(*n);
                }
            }
            Step::Replace(n) => {
                if disks.may_lose_one(&sim) && sim.try_node(*n).is_some() {
                    disks.counts[1] += 1;
                    sim.start_replacement(*n).await.map_err(|e| format!("replace n{n}: {e}"))?;
                    disks.replaced(*n);
                }
            }
            Step::Readd(n) => {
                // Only with every node up: a removal needs a quorum of the new voter set too.
                let all_up = sim.running().len() as u64 == schedule.nodes;
                if all_up && disks.may_lose_one(&sim) {
                    let via = sim.ids().into_iter().find(|id| id.0 != *n).unwrap();
                    let via = sim.node(via).clone();
                    // Whether or not the removal completes in time (it may still complete),
                    // the node comes back on an empty disk: as new storage that the leader
                    // promotes in place of the old one, or, if the removal went through, as a
                    // learner added back below.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), via.remove_member(*n)).await;
                    {
                        disks.counts[2] += 1;
                        sim.wipe(*n).await;
                        sim.restart_in_background(*n)
                            .await
                            .map_err(|e| format!("restart n{n}: {e}"))?;
                        disks.removed(*n);
                    }
                }
            }
            Step::Wait(ms) => sim.run_for(Duration::from_millis(*ms)).await,
        }
        disturbances.record(&sim, schedule.nodes, began, Some(step));
        if !sim.violations().is_empty() {
            break;
        }
    }

    // The producers' answers: an acknowledged job must finish (invariant 13).
    let queue = highlander::Key::new(QUEUE).map_err(|e| e.to_string())?;
    while let Some(done) = producers.join_next().await {
        match done.map_err(|e| format!("a producer failed: {e}"))? {
            (from, Ok(Ok(job))) => {
                jobs += 1;
                let at = sim.now();
                let event = highlander_sim::Event::JobEnqueued { from, queue: queue.clone(), job };
                let _ = sim.checker().record(at, event);
            }
            (
                _,
                Ok(Err(
                    Error::Timeout
                    | Error::Unavailable(_)
                    | Error::ShuttingDown
                    | Error::Stopped(_),
                )),
            )
            | (_, Err(_)) => {}
            (_, Ok(Err(e))) => return Err(format!("enqueue failed with an unexpected error: {e}")),
        }
    }

    // Liveness: faults stop, every node comes back.
    let faults_end = sim.now();
    sim.heal();
    sim.network().clear_link_faults();
    for id in sim.ids() {
        if sim.try_node(id).is_none() {
            sim.restart_in_background(id).await.map_err(|e| format!("restart {id}: {e}"))?;
            disturbances.record(&sim, schedule.nodes, faults_end, Some(&Step::Restart(id.0)));
        }
    }
    disturbances.record(&sim, schedule.nodes, sim.now(), None);
    // Every node's current storage votes again: removed nodes are added back; replaced
    // storage is promoted by the leader once the old one has been silent for a TTL.
    let bound = Timing::default().session_ttl * 3 + Duration::from_secs(10);
    let voting = sim
        .wait_until(bound * 2, |s| {
            s.ids()
                .iter()
                .all(|id| s.try_node(*id).is_some_and(|n| settled(n, id.0 <= schedule.voters)))
        })
        .await;
    if voting.is_none() {
        for id in disks.readd.iter().copied().filter(|id| *id <= schedule.voters) {
            if let Some(n) = sim.try_node(id).cloned() {
                let _ = tokio::time::timeout(Duration::from_secs(10), n.add_member(id)).await;
            }
        }
    }
    let voting = sim
        .wait_until(bound * 2, |s| {
            s.ids()
                .iter()
                .all(|id| s.try_node(*id).is_some_and(|n| settled(n, id.0 <= schedule.voters)))
        })
        .await;
    if voting.is_none() {
        let states: Vec<String> = sim
            .ids()
            .iter()
            .map(|id| match sim.try_node(*id) {
                Some(n) => {
                    let st = n.status();
                    format!(
                        "{id}: voting {} phase {:?} warnings {:?}",
                        st.voting, st.phase, st.warnings
                    )
                }
                None => format!("{id}: down"),
            })
            .collect();
        return Err(format!("liveness: not every node votes again: {}", states.join("; ")));
    }
    // Owned again means: a task runs for every slot, on a running node, with the token the
    // cluster's state gives that slot.
    let owned = sim
        .wait_until(bound, |s| {
            let running = s.checker().running();
            let live = s.running();
            let expected = KEYS
                .iter()
                .chain([&STUBBORN])
                .chain(SCHEDULES.iter())
                .map(|k| (*k, 0))
                .chain((0..GROUP_SLOTS).map(|i| (GROUP, i)));
            expected.into_iter().all(|(k, slot)| {
                let owner = s.owners(k).get(slot as usize).copied().flatten();
                let key = highlander::Key::new(k).unwrap();
                match (owner, running.get(&(key, slot))) {
                    (Some((node, token)), Some(run)) => {
                        *run == (node, token) && live.contains(&node)
                    }
                    _ => false,
                }
            })
        })
        .await;
    let Some(took) = owned else {
        return Err(format!(
            "liveness: not every slot has a running owner {} ms after faults stopped: state {:?}, running {:?}",
            bound.as_millis(),
            sim.status().map(|s| s
                .keys
                .iter()
                .map(|k| (k.key.to_string(), k.owners.clone()))
                .collect::<Vec<_>>()),
            sim.checker().running()
        ));
    };
    // Schedules fire again: a tick due after the faults stopped runs.
    let after_ms = sim.wall_ms();
    let ticking = sim
        .wait_until(bound, |s| {
            SCHEDULES.iter().all(|k| {
                let key = highlander::Key::new(*k).unwrap();
                s.checker().tick_runs(&key).iter().any(|r| r.tick_ms > after_ms)
            })
        })
        .await;
    if ticking.is_none() {
        return Err("liveness: a schedule does not fire after the faults stopped".into());
    }
    // Exactly once from then on: every tick of 8 s fires (the checker already holds that
    // none fires twice). The window opens once a caught-up run of "tock" (3 s) has ended,
    // since a third run at once is an overlap its policy skips.
    let from_ms = sim.wall_ms() + 4000;
    sim.run_for(Duration::from_secs(13)).await;
    let to_ms = from_ms + 8000;
    for (k, period) in SCHEDULES.iter().zip([1000u64, 2000]) {
        let key = highlander::Key::new(*k).unwrap();
        let fired: std::collections::BTreeSet<u64> =
            sim.checker().tick_runs(&key).iter().map(|r| r.tick_ms).collect();
        let first = from_ms.div_ceil(period) * period;
        let lost: Vec<u64> =
            (first..=to_ms).step_by(period as usize).filter(|t| !fired.contains(t)).collect();
        if !lost.is_empty() {
            return Err(format!(
                "liveness: {k}'s ticks {lost:?} did not fire after the faults stopped"
            ));
        }
    }
    let delivered = sim.wait_until(bound, |s| s.checker().check_all_delivered().is_ok()).await;
    if delivered.is_none() {
        let e = sim.checker().check_all_delivered().unwrap_err();
        return Err(format!(
            "liveness: acknowledged message not delivered after faults stopped: {e}"
        ));
    }
    let finished = sim
        .wait_until(bound, |s| {
            s.checker()
                .jobs_enqueued()
                .iter()
                .all(|j| s.job(*j).is_some_and(|r| r.state.is_finished()))
        })
        .await;
    if finished.is_none() {
        let lost = sim.checker().check_jobs_finished(|job| sim.job(job).map(|r| r.state));
        return Err(format!(
            "liveness: {} acknowledged job(s) not finished after faults stopped; first: {}",
            lost.len(),
            lost.first().map(|v| v.to_string()).unwrap_or_default()
        ));
    }
    let violations = sim.violations();
    if !violations.is_empty() {
        let lines: Vec<String> = violations.iter().map(|v| v.to_string()).collect();
        return Err(lines.join("\n"));
    }
    let elections = disturbances.check(sim.checker().elections())?;
    sim.shutdown_all().await;
    let [wiped, replaced, readded] = disks.counts;
    Ok(format!(
        "faults {:.1}s, owned again {} ms after, {elections} elections, {acknowledged} \
         acknowledged, {jobs} jobs, \
         {} starts, \
         {wiped} disks lost, {replaced} processes replaced, {readded} nodes removed and added",
        faults_end.as_secs_f64(),
        took.as_millis(),
        journal.entries().iter().filter(|e| matches!(e, common::Entry::Started { .. })).count()
    ))
}

/// Which nodes' storage the cluster lost, so that a schedule never loses a second disk before
/// the first one's replacement votes (a majority of lost disks is a lost cluster, by design).
#[derive(Default)]
struct Disks {
    /// The nodes that vote when all is settled (the first ids).
    voters: u64,
    pending: std::collections::BTreeSet<u64>,
    /// Nodes removed and brought back: the liveness phase adds them if the step could not.
    readd: std::collections::BTreeSet<u64>,
    /// Disks lost, processes replaced, nodes removed, as run (the guard skips some).
    counts: [u32; 3],
}

impl Disks {
    fn may_lose_one(&mut self, sim: &SimCluster) -> bool {
        let voters = self.voters;
        self.pending.retain(|n| !sim.try_node(*n).is_some_and(|node| settled(node, *n <= voters)));
        self.pending.is_empty()
    }

    fn replaced(&mut self, node: u64) {
        self.pending.insert(node);
    }

    fn removed(&mut self, node: u64) {
        self.pending.insert(node);
        self.readd.insert(node);
    }
}

/// Whether a node's current storage is back in its role: voting if it is a voter, a member
/// (joined, replicating) if it is a learner.
fn settled(node: &highlander::Node, voter: bool) -> bool {
    let st = node.status();
    st.voting == voter && st.phase == Some(highlander::core::wire::Phase::Member)
}

fn run_one(seed: u64) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run_seed(seed))));
    match result {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn seeds(part: u64, parts: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("HIGHLANDER_SIM_SEED") {
        let seed: u64 = s.parse().expect("HIGHLANDER_SIM_SEED is a number");
        return if part == 0 { vec![seed] } else { vec![] };
    }
    let n: u64 =
        std::env::var("HIGHLANDER_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    (0..n).filter(|s| s % parts == part).map(|s| 1000 + s).collect()
}

fn search(part: u64, parts: u64) {
    common::init_tracing();
    let mut failures = Vec::new();
    let list = seeds(part, parts);
    for seed in &list {
        match run_one(*seed) {
            Ok(summary) => println!("seed {seed}: ok ({summary})"),
            Err(e) => {
                eprintln!("SIM_SEED={seed} failed: {e}\nschedule:\n{}", Schedule::of(*seed));
                failures.push(*seed);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "failing seeds (replay with HIGHLANDER_SIM_SEED=..): {failures:?}"
    );
    println!("{} seeds passed", list.len());
}

// Two halves, so the test harness runs them on both cores.
#[test]
fn fault_search_even_seeds() {
    search(0, 2);
}

#[test]
fn fault_search_odd_seeds() {
    search(1, 2);
}

#[test]
fn the_same_seed_gives_the_same_schedule() {
    for seed in [0, 1, 1000, 123_456_789] {
        assert_eq!(Schedule::of(seed), Schedule::of(seed));
    }
    assert_ne!(Schedule::of(1), Schedule::of(2));
}
