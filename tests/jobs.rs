//! Jobs on the simulator, in simulated time: every acknowledged job finishes (none lost),
//! a job never runs on two nodes at once, claim tokens fence completions, caps hold at
//! every instant, and a dead worker's jobs run again elsewhere within TTL + margin. The
//! invariant checker watches every run (invariants 10–13).

mod common;

use common::init_tracing;
use highlander::{
    EnqueueOptions, Error, JobContext, JobFailure, JobId, JobState, NodeId, QueueCaps, Timing,
    Token, WorkerOptions,
};
use highlander_sim::SimCluster;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What handlers did: per job, the tokens of the runs whose side effect took place (the
/// token is the idempotency key a downstream system would check).
#[derive(Clone, Default)]
struct Effects(Arc<Mutex<BTreeMap<JobId, Vec<Run>>>>);

/// One run's side effect: where, under which token, when.
type Run = (NodeId, Token, Instant);

impl Effects {
    fn record(&self, ctx: &JobContext) {
        self.0.lock().unwrap().entry(ctx.id()).or_default().push((
            ctx.node_id(),
            ctx.token(),
            Instant::now(),
        ));
    }
    fn of(&self, job: JobId) -> Vec<Run> {
        self.0.lock().unwrap().get(&job).cloned().unwrap_or_default()
    }
    fn started_at(&self, job: JobId) -> Vec<Instant> {
        self.of(job).into_iter().map(|(_, _, at)| at).collect()
    }
}

/// A 3-node cluster whose nodes all run a worker of `queue` with `options`; the handler
/// records its start, works for `work` (stopping early when cancelled) and succeeds.
async fn cluster(
    seed: u64,
    queue: &'static str,
    options: WorkerOptions,
    work: Duration,
    effects: Effects,
) -> SimCluster {
    init_tracing();
    SimCluster::builder()
        .nodes(3)
        .seed(seed)
        .setup(move |node| {
            let options = options.clone();
            let effects = effects.clone();
            async move {
                node.worker(queue, options, move |ctx: JobContext| {
                    let effects = effects.clone();
                    async move {
                        effects.record(&ctx);
                        tokio::select! {
                            _ = tokio::time::sleep(work) => Ok(()),
                            _ = ctx.cancelled() => Err(JobFailure::retry("stopped")),
                        }
                    }
                })
                .await
            }
        })
        .build()
        .await
        .expect("cluster starts")
}

async fn settle_and_check(sim: &mut SimCluster, within: Duration) {
    let done = sim
        .wait_until(within, |s| {
            s.checker()
                .jobs_enqueued()
                .iter()
                .all(|j| s.job(*j).is_some_and(|r| r.state.is_finished()))
        })
        .await;
    if done.is_none() {
        sim.assert_jobs_finished();
    }
    sim.assert_invariants();
    sim.assert_jobs_finished();
}

#[tokio::test(start_paused = true)]
async fn jobs_from_every_node_complete_once_each() {
    let effects = Effects::default();
    let mut sim = cluster(
        1,
        "mail",
        WorkerOptions::default().concurrency(4),
        Duration::from_millis(20),
        effects.clone(),
    )
    .await;
    let mut jobs = Vec::new();
    for i in 0..90u64 {
        let from = 1 + i % 3;
        jobs.push(
            sim.enqueue(from, "mail", format!("job {i}"), EnqueueOptions::new())
                .await
                .expect("enqueued"),
        );
    }
    // `wait` returns once the node has applied the job's end.
    let first = sim.node(1).wait(jobs[0], Duration::from_secs(30)).await.expect("finishes");
    assert_eq!(first.state, JobState::Completed);
    settle_and_check(&mut sim, Duration::from_secs(30)).await;
    let mut nodes = BTreeMap::new();
    for job in &jobs {
        let runs = effects.of(*job);
        assert_eq!(runs.len(), 1, "{job} ran {runs:?}");
        *nodes.entry(runs[0].0).or_insert(0) += 1;
        let report = sim.job(*job).unwrap();
        assert_eq!((report.state, report.attempt), (JobState::Completed, 1));
    }
    // Spread over the nodes, not all on one.
    assert!(nodes.len() >= 2, "ran on {nodes:?}");
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_workers_jobs_run_elsewhere_within_ttl_and_margin() {
    let effects = Effects::default();
    let work = Duration::from_secs(60);
    let mut sim =
        cluster(2, "long", WorkerOptions::default().concurrency(4), work, effects.clone()).await;
    let mut jobs = Vec::new();
    for i in 0..6u64 {
        jobs.push(sim.enqueue(1 + i % 3, "long", "x", EnqueueOptions::new()).await.unwrap());
    }
    sim.run_for(Duration::from_millis(500)).await;
    let victim = effects.of(jobs[0])[0].0;
    let victims: Vec<JobId> = jobs
        .iter()
        .copied()
        .filter(|j| effects.of(*j).first().is_some_and(|r| r.0 == victim))
        .collect();
    assert!(!victims.is_empty());
    let killed_at = Instant::now();
    sim.kill(victim).await;
    let timing = Timing::default();
    // The victim may be the leader: then a new one is elected first, and it gives every
    // session a full TTL from its election.
    let bound = timing.session_ttl + timing.lease_margin * 2 + timing.election_bound();
    let moved = sim
        .wait_until(Duration::from_secs(10), |_| victims.iter().all(|j| effects.of(*j).len() >= 2))
        .await;
    assert!(moved.is_some(), "the dead node's jobs did not run again");
    for job in &victims {
        let again = effects.started_at(*job)[1];
        let took = again - killed_at;
        println!("{job} ran again {} ms after the kill", took.as_millis());
        assert!(took <= bound, "{job} took {took:?}, above {bound:?}");
        // Not before the dead node's session could expire: its last keepalive was at most
        // one interval before the kill.
        let earliest = timing.session_ttl - timing.keepalive_interval;
        assert!(
            took >= earliest,
            "{job} ran again {took:?} after the kill, before its lease ran out"
        );

        let runs = effects.of(*job);
        assert!(runs[1].1 > runs[0].1, "the new run's token is larger");
        let report = sim.job(*job).unwrap();
        assert_eq!(report.attempt, 2, "the lost attempt counts");
        assert!(report.errors[0].error.contains("session ended"), "{:?}", report.errors);
    }
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_cut_off_from_the_leader_stops_its_jobs_before_they_run_elsewhere() {
    let effects = Effects::default();
    let mut sim = cluster(
        3,
        "cut",
        WorkerOptions::default().concurrency(6),
        Duration::from_secs(30),
        effects.clone(),
    )
    .await;
    let mut jobs = Vec::new();
    for _ in 0..9 {
        jobs.push(sim.enqueue(1, "cut", "x", EnqueueOptions::new()).await.unwrap());
    }
    sim.run_for(Duration::from_millis(500)).await;
    let leader = sim.status().and_then(|s| s.leader).unwrap();
    let worker = sim
        .ids()
        .into_iter()
        .find(|n| *n != leader && effects.0.lock().unwrap().values().any(|r| r[0].0 == *n))
        .expect("a follower runs jobs");
    let others: Vec<u64> = sim.ids().iter().map(|n| n.0).filter(|n| *n != worker.0).collect();
    sim.partition(&[worker.0], &others);
    // The checker fails the run if a job starts elsewhere before the cut-off node's handler
    // stopped (invariant 10).
    sim.run_for(Duration::from_secs(8)).await;
    sim.heal();
    let moved: Vec<JobId> = jobs.iter().copied().filter(|j| effects.of(*j).len() >= 2).collect();
    assert!(!moved.is_empty(), "the cut-off node's jobs moved");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn every_job_finishes_across_leader_crashes_during_claims() {
    let effects = Effects::default();
    let mut sim = cluster(
        4,
        "busy",
        WorkerOptions::default().concurrency(8),
        Duration::from_millis(50),
        effects.clone(),
    )
    .await;
    for round in 0..3u64 {
        for i in 0..40u64 {
            let from = sim.running()[(i % sim.running().len() as u64) as usize];
            // A producer whose enqueue times out does not know the outcome; only
            // acknowledged jobs are expected to finish.
            let _ = sim.enqueue(from, "busy", format!("{round}/{i}"), EnqueueOptions::new()).await;
        }
        let leader = sim.status().and_then(|s| s.leader).unwrap();
        sim.kill(leader).await;
        sim.run_for(Duration::from_secs(3)).await;
        sim.restart(leader).await.expect("restarts");
    }
    settle_and_check(&mut sim, Duration::from_secs(60)).await;
    println!("{} jobs enqueued and finished", sim.checker().jobs_enqueued().len());
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_unique_key_admits_one_job_across_racing_nodes() {
    let effects = Effects::default();
    let mut sim =
        cluster(5, "invoices", WorkerOptions::default(), Duration::from_secs(5), effects.clone())
            .await;
    let options = EnqueueOptions::new().unique("invoice-42");
    let nodes: Vec<highlander::Node> = sim.ids().iter().map(|n| sim.node(*n).clone()).collect();
    let tries = nodes.iter().map(|n| {
        let options = options.clone();
        async move { n.enqueue_with("invoices", "bill", options).await }
    });
    let results = futures_join_all(tries).await;
    let ok: Vec<JobId> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(ok.len(), 1, "{results:?}");
    for r in &results {
        match r {
            Ok(_) => {}
            Err(Error::DuplicateJob { existing, .. }) => assert_eq!(*existing, ok[0]),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    // Held while the job runs; free once it completed.
    sim.run_for(Duration::from_secs(1)).await;
    let again = sim.node(1).enqueue_with("invoices", "bill", options.clone()).await;
    assert!(matches!(again, Err(Error::DuplicateJob { .. })), "{again:?}");
    sim.run_for(Duration::from_secs(6)).await;
    assert_eq!(sim.job(ok[0]).unwrap().state, JobState::Completed);
    sim.node(2).enqueue_with("invoices", "bill", options).await.expect("the key is free again");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut out = Vec::new();
    // Polled together: each enqueue is in flight before any returns.
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    out.extend(results.into_iter().map(|r| r.unwrap()));
    out
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_running_job_is_stopped_and_ends_cancelled() {
    let effects = Effects::default();
    let mut sim =
        cluster(6, "slow", WorkerOptions::default(), Duration::from_secs(3600), effects.clone())
            .await;
    let job = sim.enqueue(1, "slow", "x", EnqueueOptions::new()).await.unwrap();
    sim.run_for(Duration::from_millis(300)).await;
    assert_eq!(effects.of(job).len(), 1, "running");
    let state = sim.node(2).cancel_job(job).await.unwrap();
    assert_eq!(state, JobState::Running, "asked to stop");
    sim.run_for(Duration::from_millis(300)).await;
    let report = sim.job(job).unwrap();
    assert_eq!(report.state, JobState::Cancelled);
    assert_eq!(effects.of(job).len(), 1, "not run again");
    let runs = sim.checker().job_runs(job);
    assert!(runs[0].stopped.is_some(), "the handler stopped");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn run_at_holds_across_a_leader_failover() {
    let effects = Effects::default();
    let mut sim =
        cluster(7, "later", WorkerOptions::default(), Duration::from_millis(10), effects.clone())
            .await;
    let enqueued_at = Instant::now();
    let job = sim
        .enqueue(1, "later", "x", EnqueueOptions::new().delay(Duration::from_secs(4)))
        .await
        .unwrap();
    assert_eq!(sim.job(job).unwrap().state, JobState::Scheduled);
    sim.run_for(Duration::from_secs(1)).await;
    let leader = sim.status().and_then(|s| s.leader).unwrap();
    sim.kill(leader).await;
    settle_and_check(&mut sim, Duration::from_secs(20)).await;
    let started = effects.started_at(job)[0] - enqueued_at;
    println!("ran {} ms after the enqueue", started.as_millis());
    assert!(started >= Duration::from_millis(3_900), "ran early: {started:?}");
    assert!(started <= Duration::from_secs(7), "ran late: {started:?}");
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_job_dies_after_its_attempts_and_an_operator_retries_it() {
    init_tracing();
    let fail = Arc::new(Mutex::new(true));
    let f = fail.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(8)
        .setup(move |node| {
            let f = f.clone();
            async move {
                let options = WorkerOptions::default()
                    .backoff(|attempt| Duration::from_millis(100 * u64::from(attempt)));
                node.worker("flaky", options, move |ctx: JobContext| {
                    let f = f.clone();
                    async move {
                        if *f.lock().unwrap() {
                            Err(JobFailure::retry(format!("attempt {} failed", ctx.attempt())))
                        } else {
                            Ok(b"done".to_vec())
                        }
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    let job = sim.enqueue(2, "flaky", "x", EnqueueOptions::new().max_attempts(3)).await.unwrap();
    sim.wait_until(Duration::from_secs(10), |s| {
        s.job(job).is_some_and(|r| r.state == JobState::Dead)
    })
    .await
    .expect("dead");
    let report = sim.job(job).unwrap();
    assert_eq!(report.attempt, 3);
    assert_eq!(report.errors.len(), 3);
    assert_eq!(report.errors[2].error, "attempt 3 failed");
    let dead = sim.node(1).jobs(None, Some(JobState::Dead), 10);
    assert_eq!(dead.iter().map(|r| r.id).collect::<Vec<_>>(), vec![job]);
    *fail.lock().unwrap() = false;
    assert_eq!(sim.node(3).retry_job(job).await.unwrap(), JobState::Available);
    sim.wait_until(Duration::from_secs(10), |s| {
        s.node(1).job(job).is_some_and(|r| r.state == JobState::Completed)
    })
    .await
    .expect("completed after the retry");
    let done = sim.node(1).job(job).unwrap();
    assert_eq!(done.attempt, 1, "attempts counted afresh");
    assert_eq!(done.state, JobState::Completed);
    assert_eq!(done.result.as_ref().map(|r| r.as_bytes().to_vec()), Some(b"done".to_vec()));
    assert_eq!(sim.node(1).purge_jobs(None, JobState::Completed).await.unwrap(), 1);
    assert!(sim.job(job).is_none());
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn global_and_partition_caps_hold_at_every_instant() {
    let effects = Effects::default();
    let caps = QueueCaps { global: Some(3), per_partition: Some(1) };
    let options = WorkerOptions::default().concurrency(5).global_cap(3).partition_cap(1);
    let mut sim = cluster(9, "tenants", options, Duration::from_millis(200), effects.clone()).await;
    sim.expect_queue_caps("tenants", caps);
    for i in 0..40u64 {
        let options = EnqueueOptions::new().partition(format!("tenant-{}", i % 4));
        sim.enqueue(1 + i % 3, "tenants", "x", options).await.unwrap();
    }
    // A node restarted mid-run comes back with the same caps; one with other caps is refused.
    sim.run_for(Duration::from_secs(1)).await;
    let other = sim
        .node(1)
        .worker("tenants2", WorkerOptions::default().global_cap(2), |_ctx| async {
            Ok::<_, String>(())
        })
        .await;
    assert!(other.is_ok());
    let conflict = sim
        .node(2)
        .worker("tenants2", WorkerOptions::default().global_cap(5), |_ctx| async {
            Ok::<_, String>(())
        })
        .await;
    assert!(matches!(conflict, Err(Error::QueueCapsConflict { .. })), "{conflict:?}");
    settle_and_check(&mut sim, Duration::from_secs(30)).await;
    // Three at a time at most, so 40 jobs of 200 ms took at least 14 rounds.
    let starts: Vec<Instant> = effects.0.lock().unwrap().values().map(|r| r[0].2).collect();
    let span = *starts.iter().max().unwrap() - *starts.iter().min().unwrap();
    assert!(span >= Duration::from_millis(2_400), "{span:?}");
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_hung_attempt_is_stopped_at_its_timeout_and_extend_moves_it() {
    init_tracing();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(10)
        .setup(|node| async move {
            node.worker(
                "t",
                WorkerOptions::default().timeout(Duration::from_secs(1)),
                |ctx: JobContext| async move {
                    if ctx.payload().as_bytes() == b"extend" {
                        ctx.extend(Duration::from_secs(10)).await.map_err(JobFailure::retry)?;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(3)) => Ok(()),
                        _ = ctx.cancelled() => Err(JobFailure::discard("gave up when cancelled")),
                    }
                },
            )
            .await
        })
        .build()
        .await
        .unwrap();
    let hung = sim.enqueue(1, "t", "hang", EnqueueOptions::new()).await.unwrap();
    let extended = sim.enqueue(1, "t", "extend", EnqueueOptions::new()).await.unwrap();
    sim.run_for(Duration::from_secs(5)).await;
    let h = sim.job(hung).unwrap();
    assert_eq!(h.state, JobState::Dead, "{h:?}");
    assert!(h.errors[0].error.contains("gave up"), "{:?}", h.errors);
    assert_eq!(sim.job(extended).unwrap().state, JobState::Completed);
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_hands_running_jobs_over_at_once_without_counting_them() {
    let effects = Effects::default();
    let mut sim = cluster(
        11,
        "handover",
        WorkerOptions::default().concurrency(4),
        Duration::from_secs(20),
        effects.clone(),
    )
    .await;
    let mut jobs = Vec::new();
    for i in 0..6u64 {
        jobs.push(sim.enqueue(1 + i % 3, "handover", "x", EnqueueOptions::new()).await.unwrap());
    }
    sim.run_for(Duration::from_millis(500)).await;
    let leaving = effects.of(jobs[0])[0].0;
    let theirs: Vec<JobId> =
        jobs.iter().copied().filter(|j| effects.of(*j)[0].0 == leaving).collect();
    let at = Instant::now();
    sim.shutdown(leaving).await;
    sim.wait_until(Duration::from_secs(5), |_| theirs.iter().all(|j| effects.of(*j).len() >= 2))
        .await
        .expect("handed over");
    for job in &theirs {
        let took = effects.started_at(*job)[1] - at;
        println!("{job} ran again {} ms after the shutdown began", took.as_millis());
        assert!(took < Timing::default().session_ttl, "{job} waited for an expiry: {took:?}");
        let report = sim.job(*job).unwrap();
        assert_eq!(report.attempt, 1, "the interrupted attempt is not counted");
    }
    sim.assert_invariants();
    sim.shutdown_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_fails_its_attempt_and_the_job_is_retried() {
    init_tracing();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(12)
        .setup(|node| async move {
            let options = WorkerOptions::default().backoff(|_| Duration::from_millis(50));
            node.worker("brittle", options, |ctx: JobContext| async move {
                if ctx.attempt() == 1 {
                    panic!("boom on attempt 1");
                }
                Ok::<_, JobFailure>(())
            })
            .await
        })
        .build()
        .await
        .unwrap();
    let job = sim.enqueue(1, "brittle", "x", EnqueueOptions::new()).await.unwrap();
    settle_and_check(&mut sim, Duration::from_secs(10)).await;
    let report = sim.job(job).unwrap();
    assert_eq!((report.state, report.attempt), (JobState::Completed, 2));
    assert!(report.errors[0].error.contains("panicked: boom on attempt 1"), "{:?}", report.errors);
    sim.shutdown_all().await;
}
