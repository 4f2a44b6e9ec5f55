//! Schedules on the simulator, in simulated time: ticks fire once per tick across the
//! cluster, in order, never early, through crashes, leader changes, outages, overlaps, DST
//! days and a wrong wall clock. The invariant checker watches every run.

mod common;

use common::init_tracing;
use highlander::{CatchUp, Delivery, Overlap, ScheduleOptions, TickOrigin};
use highlander_sim::{SimCluster, TickRun};
use std::time::Duration;

/// The runs of `key`'s ticks the checker saw.
fn runs(sim: &SimCluster, key: &str) -> Vec<TickRun> {
    sim.checker().tick_runs(&highlander::Key::new(key).unwrap())
}

#[tokio::test(start_paused = true)]
async fn an_interval_fires_once_per_tick_across_the_cluster() {
    init_tracing();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(1)
        .setup(|node| async move {
            node.every_with(
                "flush",
                Duration::from_secs(1),
                ScheduleOptions::default(),
                |_t| async move {},
            )
            .await
        })
        .build()
        .await
        .expect("cluster starts");
    sim.run_for(Duration::from_secs(20)).await;
    let r = runs(&sim, "flush");
    println!("{} runs: first {:?}", r.len(), r.first());
    assert!(r.len() >= 18, "{} runs in 20 s", r.len());
    assert!(r.iter().all(|r| r.attempt == 1 && r.origin == TickOrigin::Scheduled));
    let lateness: Vec<u64> = r.iter().map(|r| r.started_ms - r.tick_ms).collect();
    println!("lateness ms: {lateness:?}");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

/// A cluster of `nodes` on which every node registers `key`: every `period`, with
/// `options`, a handler that works for `work` (and stops early when cancelled).
async fn cluster_with(
    nodes: u64,
    seed: u64,
    key: &'static str,
    period: Duration,
    options: ScheduleOptions,
    work: Duration,
) -> SimCluster {
    init_tracing();
    SimCluster::builder()
        .nodes(nodes)
        .seed(seed)
        .setup(move |node| {
            let options = options.clone();
            async move {
                node.every_with(key, period, options, move |t| async move {
                    tokio::select! {
                        _ = tokio::time::sleep(work) => {}
                        _ = t.cancelled() => {}
                    }
                })
                .await
            }
        })
        .build()
        .await
        .expect("cluster starts")
}

/// The node running `key`'s slot now.
fn owner(sim: &SimCluster, key: &str) -> Option<highlander::NodeId> {
    sim.owners(key).first().copied().flatten().map(|(n, _)| n)
}

/// Each tick's runs, by tick.
fn by_tick(runs: &[TickRun]) -> std::collections::BTreeMap<u64, Vec<TickRun>> {
    let mut m = std::collections::BTreeMap::<u64, Vec<TickRun>>::new();
    for r in runs {
        m.entry(r.tick_ms).or_default().push(r.clone());
    }
    m
}

/// A crash of the owner in the middle of a run: under at-least-once the tick runs again on
/// the next owner (attempt 2, same run id), exactly once more; under at-most-once it does
/// not run again. Either way no tick is fired twice and later ticks go on.
#[tokio::test(start_paused = true)]
async fn a_crash_mid_run_reruns_the_tick_once_or_never_by_delivery_policy() {
    for (delivery, reruns) in
        [(Delivery::AtLeastOnce { max_attempts: 2 }, true), (Delivery::AtMostOnce, false)]
    {
        let options = ScheduleOptions::default().delivery(delivery);
        let mut sim =
            cluster_with(3, 7, "report", Duration::from_secs(10), options, Duration::from_secs(4))
                .await;
        // Wait until a run is half-way, then kill its node.
        sim.wait_until(Duration::from_secs(30), |s| {
            runs(s, "report").last().is_some_and(|r| {
                r.stopped.is_none() && s.now() >= r.started + Duration::from_secs(2)
            })
        })
        .await
        .expect("a run under way");
        let cut = runs(&sim, "report").last().cloned().unwrap();
        sim.kill(cut.node).await;
        sim.run_for(Duration::from_secs(40)).await;
        let all = runs(&sim, "report");
        let of_cut: Vec<&TickRun> = all.iter().filter(|r| r.tick_ms == cut.tick_ms).collect();
        println!("{delivery:?}: runs of the cut tick {of_cut:?}");
        if reruns {
            assert_eq!(of_cut.len(), 2, "{of_cut:?}");
            assert_eq!((of_cut[1].run, of_cut[1].attempt), (cut.run, 2));
            assert_ne!(of_cut[1].node, cut.node);
        } else {
            assert_eq!(of_cut.len(), 1, "{of_cut:?}");
        }
        // Later ticks still fire, once each.
        let later: Vec<_> = by_tick(&all).into_iter().filter(|(t, _)| *t > cut.tick_ms).collect();
        assert!(later.len() >= 3, "{later:?}");
        assert!(later.iter().all(|(_, r)| r.len() == 1), "{later:?}");
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}

/// The leader dies just before a tick is due: the tick still fires once (late by the
/// election, not lost and not doubled), and so does every tick after it.
#[tokio::test(start_paused = true)]
async fn a_leader_crash_at_a_tick_boundary_neither_loses_nor_doubles_a_tick() {
    let mut sim = cluster_with(
        3,
        11,
        "flush",
        Duration::from_secs(5),
        ScheduleOptions::default(),
        Duration::from_millis(100),
    )
    .await;
    sim.run_for(Duration::from_secs(12)).await;
    // 50 ms before the next multiple of 5 s of true time.
    let wall = sim.wall_ms();
    let next = (wall / 5000 + 1) * 5000;
    sim.run_for(Duration::from_millis(next - wall - 50)).await;
    let leader = sim.status().and_then(|s| s.leader).expect("a leader");
    sim.kill(leader).await;
    sim.run_for(Duration::from_secs(30)).await;
    let ticks = by_tick(&runs(&sim, "flush"));
    let due: Vec<u64> = (0..6).map(|i| next + i * 5000).collect();
    for t in &due {
        let r = ticks.get(t).unwrap_or_else(|| panic!("tick {t} never ran: {ticks:?}"));
        assert_eq!(r.len(), 1, "{r:?}");
    }
    println!("the boundary tick started {} ms late", ticks[&next][0].started_ms - next);
    sim.assert_invariants();
    sim.shutdown_all().await;
}

/// The whole cluster is down for six periods. When it comes back the catch-up policy
/// decides what runs: the newest missed tick (`Latest`), none (`Skip`), or the newest
/// three, oldest first (`All { max: 3 }`); the others are counted as missed.
#[tokio::test(start_paused = true)]
async fn after_a_whole_cluster_outage_the_catch_up_policy_decides_what_runs() {
    const PERIOD: u64 = 5_000;
    for (catch_up, replayed) in
        [(CatchUp::Latest { window_ms: None }, 1), (CatchUp::Skip, 0), (CatchUp::All { max: 3 }, 3)]
    {
        let options = ScheduleOptions::default().catch_up(catch_up);
        let mut sim = cluster_with(
            3,
            3,
            "sweep",
            Duration::from_millis(PERIOD),
            options,
            Duration::from_millis(50),
        )
        .await;
        sim.run_for(Duration::from_secs(12)).await;
        assert!(!runs(&sim, "sweep").is_empty());
        for id in 1..=3 {
            sim.kill(id).await;
        }
        let down_from = sim.wall_ms();
        // Back 200 ms after a tick, 30 s later: the newest missed tick is more than the
        // misfire grace old by the time a node owns the schedule again.
        let back = (down_from / PERIOD + 6) * PERIOD + 200;
        sim.run_for(Duration::from_millis(back - down_from)).await;
        for id in 1..=3 {
            sim.restart_in_background(id).await.unwrap();
        }
        sim.run_for(Duration::from_secs(15)).await;
        let all = runs(&sim, "sweep");
        let catch: Vec<&TickRun> = all.iter().filter(|r| r.origin == TickOrigin::CatchUp).collect();
        let ticks: Vec<u64> = catch.iter().map(|r| r.tick_ms).collect();
        println!("{catch_up:?}: caught up {ticks:?}");
        assert_eq!(catch.len(), replayed, "{catch:?}");
        // The newest missed ticks, oldest first, ending with the one just before `back`.
        let newest = back - 200;
        let want: Vec<u64> = (0..replayed as u64).rev().map(|i| newest - i * PERIOD).collect();
        assert_eq!(ticks, want);
        // No other tick of the outage ran; regular ticks resume after it.
        assert!(!all.iter().any(|r| r.tick_ms > down_from
            && r.tick_ms <= newest
            && r.origin == TickOrigin::Scheduled));
        assert!(all.iter().any(|r| r.origin == TickOrigin::Scheduled && r.tick_ms > back));
        let report = sim.node(1).describe_schedule("sweep").expect("a schedule");
        assert!(report.counts.missed >= 6 - replayed as u64, "{:?}", report.counts);
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}

/// A handler that takes 2.5 periods, under each overlap policy.
#[tokio::test(start_paused = true)]
async fn overlap_policies_with_a_slow_handler() {
    for overlap in
        [Overlap::Skip, Overlap::BufferOne, Overlap::CancelOther, Overlap::AllowAll { max: 3 }]
    {
        let options = ScheduleOptions::default().overlap(overlap);
        let mut sim = cluster_with(
            3,
            5,
            "slow",
            Duration::from_secs(2),
            options,
            Duration::from_millis(5000),
        )
        .await;
        sim.run_for(Duration::from_secs(30)).await;
        let all = runs(&sim, "slow");
        let most_at_once = all
            .iter()
            .map(|a| {
                all.iter()
                    .filter(|b| b.started <= a.started && b.stopped.is_none_or(|s| s > a.started))
                    .count()
            })
            .max()
            .unwrap_or(0);
        let counts = sim.node(1).describe_schedule("slow").expect("a schedule").counts;
        println!("{overlap:?}: {} runs, at most {most_at_once} at once, {counts:?}", all.len());
        match overlap {
            Overlap::Skip => {
                assert_eq!(most_at_once, 1);
                assert!(counts.overlap_skipped >= 5, "{counts:?}");
                // Skipped ticks never run.
                assert!(all.len() <= 6, "{}", all.len());
            }
            Overlap::BufferOne => {
                assert_eq!(most_at_once, 1);
                // Back to back: a buffered tick starts as soon as the one before ends (a
                // write later), not at its next tick.
                let back_to_back = all
                    .windows(2)
                    .filter(|w| {
                        w[0].stopped.is_some_and(|s| w[1].started - s < Duration::from_millis(100))
                    })
                    .count();
                assert!(back_to_back >= 3, "{all:?}");
                assert!(counts.overlap_skipped >= 3, "{counts:?}");
            }
            Overlap::CancelOther => {
                assert_eq!(most_at_once, 1);
                // Every tick runs, each cutting the one before short.
                assert!(all.len() >= 12, "{}", all.len());
                assert!(counts.cancelled >= 10, "{counts:?}");
            }
            Overlap::AllowAll { max } => {
                assert_eq!(most_at_once, max as usize);
                assert!(all.len() >= 12, "{}", all.len());
            }
        }
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}

/// One node's clock is 30 s fast: first the owner's, then the leader's. Ticks fire by the
/// cluster's time of day (the median), so none fires early in true time.
#[tokio::test(start_paused = true)]
async fn a_node_thirty_seconds_fast_fires_nothing_early() {
    for whose in ["owner", "leader"] {
        let mut sim = cluster_with(
            3,
            13,
            "tick",
            Duration::from_secs(1),
            ScheduleOptions::default(),
            Duration::from_millis(10),
        )
        .await;
        sim.run_for(Duration::from_secs(3)).await;
        let fast = match whose {
            "owner" => owner(&sim, "tick").expect("an owner"),
            _ => sim.status().and_then(|s| s.leader).expect("a leader"),
        };
        sim.set_wall_clock_offset(fast, 30_000);
        let from = sim.wall_ms();
        sim.run_for(Duration::from_secs(20)).await;
        let after: Vec<TickRun> =
            runs(&sim, "tick").into_iter().filter(|r| r.tick_ms > from + 1000).collect();
        println!("{whose} ({fast}) fast: {} runs", after.len());
        assert!(after.len() >= 17, "{after:?}");
        assert!(after.iter().all(|r| r.started_ms >= r.tick_ms && r.started_ms < r.tick_ms + 1000));
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}

/// 64 schedules on 3 nodes: spread evenly, moved within a TTL and a margin when a node
/// dies, and spread again when it comes back.
#[tokio::test(start_paused = true)]
async fn many_schedules_spread_over_the_nodes_and_move_on_failure() {
    init_tracing();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(17)
        .setup(|node| async move {
            for i in 0..64 {
                node.every(format!("s{i}"), Duration::from_secs(5), |_t| async move {}).await?;
            }
            Ok(())
        })
        .build()
        .await
        .expect("cluster starts");
    let keys: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
    let load = |sim: &SimCluster| {
        let mut per = std::collections::BTreeMap::new();
        for k in &keys {
            if let Some(n) = owner(sim, k) {
                *per.entry(n).or_insert(0usize) += 1;
            }
        }
        per
    };
    sim.wait_until(Duration::from_secs(30), |s| load(s).values().sum::<usize>() == 64)
        .await
        .expect("every schedule has an owner");
    sim.run_for(Duration::from_secs(10)).await;
    let per = load(&sim);
    println!("spread: {per:?}");
    assert!(per.values().all(|&n| n <= 24), "{per:?}");
    let victim = *per.keys().next().unwrap();
    sim.kill(victim).await;
    let ttl = highlander::Timing::default().session_ttl;
    let moved = sim
        .wait_until(Duration::from_secs(30), |s| {
            let per = load(s);
            !per.contains_key(&victim) && per.values().sum::<usize>() == 64
        })
        .await
        .expect("every schedule moves");
    println!("moved after {moved:?} (TTL {ttl:?})");
    assert!(moved <= ttl * 2, "{moved:?}");
    let before: Vec<_> = keys.iter().map(|k| owner(&sim, k)).collect();
    sim.restart(victim).await.unwrap();
    sim.run_for(Duration::from_secs(30)).await;
    let per = load(&sim);
    println!("after the restart: {per:?}");
    // Only what the returning node takes moves: no schedule changes hands between the
    // nodes that stayed.
    let after: Vec<_> = keys.iter().map(|k| owner(&sim, k)).collect();
    let shuffled: Vec<&String> = keys
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| b != a && **a != Some(victim))
        .map(|(k, _)| k)
        .collect();
    assert!(shuffled.is_empty(), "moved between the nodes that stayed: {shuffled:?}");
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert!(moved <= 64_usize.div_ceil(3) + 2, "{moved} moved");
    assert!(per.get(&victim).copied().unwrap_or(0) >= 10, "{per:?}");
    assert!(per.values().all(|&n| n <= 24), "{per:?}");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

/// Pause, resume, trigger and backfill from any node; bad schedules fail with a message
/// that says what to change.
#[tokio::test(start_paused = true)]
async fn operators_pause_resume_trigger_and_backfill_from_any_node() {
    let mut sim = cluster_with(
        3,
        19,
        "digest",
        Duration::from_secs(10),
        ScheduleOptions::default(),
        Duration::from_millis(10),
    )
    .await;
    sim.run_for(Duration::from_secs(25)).await;
    let n = runs(&sim, "digest").len();
    sim.node(2).pause_schedule("digest").await.expect("paused");
    sim.run_for(Duration::from_secs(30)).await;
    assert_eq!(runs(&sim, "digest").len(), n, "nothing fires while paused");
    assert!(sim.node(3).describe_schedule("digest").unwrap().paused);
    // A trigger is an operator's explicit act: it runs even while the schedule is paused.
    let run = sim.node(3).trigger_schedule("digest").await.expect("triggered");
    sim.run_for(Duration::from_secs(2)).await;
    let all = runs(&sim, "digest");
    let triggered: Vec<&TickRun> = all.iter().filter(|r| r.run == run).collect();
    assert_eq!(triggered.len(), 1, "{all:?}");
    assert_eq!(triggered[0].origin, TickOrigin::Trigger);
    // Backfill the first three ticks again.
    let first = all[0].tick_ms;
    let from = std::time::UNIX_EPOCH + Duration::from_millis(first);
    let to = from + Duration::from_secs(20);
    let ids = sim.node(1).backfill_schedule("digest", from, to).await.expect("backfilled");
    assert_eq!(ids.len(), 3, "{ids:?}");
    sim.run_for(Duration::from_secs(5)).await;
    let back: Vec<u64> = runs(&sim, "digest")
        .iter()
        .filter(|r| r.origin == TickOrigin::Backfill)
        .map(|r| r.tick_ms)
        .collect();
    assert_eq!(back, [first, first + 10_000, first + 20_000]);
    // Resumed: regular ticks again, none of the paused ones replayed.
    sim.node(3).resume_schedule("digest").await.expect("resumed");
    let resumed = sim.wall_ms();
    sim.run_for(Duration::from_secs(20)).await;
    let all = runs(&sim, "digest");
    assert!(all.iter().any(|r| r.origin == TickOrigin::Scheduled && r.tick_ms > resumed));
    assert!(!all.iter().any(|r| r.origin == TickOrigin::CatchUp), "{all:?}");

    // Bad schedules: typed errors that say what to change.
    let node = sim.node(1);
    let cases = [
        node.cron("bad1", "61 * * * *", |_t| async move {}).await,
        node.cron_with(
            "bad2",
            "0 9 * * *",
            ScheduleOptions::default().zone("Mars/Olympus"),
            |_t| async move {},
        )
        .await,
        node.every("bad3", Duration::from_millis(200), |_t| async move {}).await,
        node.every_with(
            "bad4",
            Duration::from_secs(5),
            ScheduleOptions::default()
                .catch_up(CatchUp::All { max: 5 })
                .overlap(Overlap::CancelOther),
            |_t| async move {},
        )
        .await,
    ];
    for case in cases {
        let e = case.expect_err("a bad schedule is refused");
        println!("{e}");
        assert!(matches!(e, highlander::Error::InvalidSchedule { .. }), "{e:?}");
    }
    let e = node.pause_schedule("nosuch").await.expect_err("no such key");
    assert!(matches!(e, highlander::Error::NoSuchKey { .. }), "{e:?}");
    sim.assert_invariants();
    sim.shutdown_all().await;
}

/// A cluster started at `start_ms` (true time) on which every node registers the cron
/// `expression` in `zone` as `"dst"`, and an interval `"control"` every minute.
async fn dst_cluster(start_ms: u64, zone: &'static str, expression: &'static str) -> SimCluster {
    init_tracing();
    SimCluster::builder()
        .nodes(3)
        .seed(start_ms % 1000 + 23)
        .start_time_ms(start_ms)
        .setup(move |node| async move {
            let options = ScheduleOptions::default().zone(zone);
            node.cron_with("dst", expression, options, |_t| async move {}).await?;
            node.every("control", Duration::from_secs(60), |_t| async move {}).await
        })
        .build()
        .await
        .expect("cluster starts")
}

/// A local time that DST skips runs once, at the first instant after the gap: in New York
/// (02:30 on 2026-03-08 runs at 03:00 EDT), Berlin (2026-03-29, 03:00 CEST) and on Lord Howe
/// Island, whose clocks move by 30 minutes (02:15 on 2026-10-04 runs at 02:30 +11:00).
#[tokio::test(start_paused = true)]
async fn a_time_skipped_by_dst_runs_once_after_the_gap_in_three_zones() {
    for (start_ms, zone, expression, due_ms) in [
        (1_772_953_080_000, "America/New_York", "30 2 * * *", 1_772_953_200_000),
        (1_774_745_880_000, "Europe/Berlin", "0 30 2 * * *", 1_774_746_000_000),
        (1_791_041_280_000, "Australia/Lord_Howe", "15 2 * * *", 1_791_041_400_000),
    ] {
        let mut sim = dst_cluster(start_ms, zone, expression).await;
        sim.run_for(Duration::from_secs(180)).await;
        let r = runs(&sim, "dst");
        println!("{zone}: {:?}", r.iter().map(|r| (r.tick_ms, r.started_ms)).collect::<Vec<_>>());
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].tick_ms, due_ms);
        assert!(r[0].started_ms - due_ms < 1000, "{r:?}");
        assert!(runs(&sim, "control").len() >= 2);
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}

/// A local time that DST repeats runs once, the first time: a cluster that starts inside the
/// repeated hour does not run it again (New York 01:30 on 2026-11-01, Berlin 02:30 on
/// 2026-10-25, Lord Howe 01:45 on 2026-04-05).
#[tokio::test(start_paused = true)]
async fn a_time_repeated_by_dst_does_not_run_a_second_time_in_three_zones() {
    for (start_ms, zone, expression) in [
        (1_793_514_480_000, "America/New_York", "30 1 * * *"),
        (1_792_891_680_000, "Europe/Berlin", "30 2 * * *"),
        (1_775_315_580_000, "Australia/Lord_Howe", "45 1 * * *"),
    ] {
        let mut sim = dst_cluster(start_ms, zone, expression).await;
        sim.run_for(Duration::from_secs(180)).await;
        let r = runs(&sim, "dst");
        println!("{zone}: {r:?}");
        assert!(r.is_empty(), "{r:?}");
        assert!(runs(&sim, "control").len() >= 2);
        let next = sim.node(1).describe_schedule("dst").expect("a schedule").next[0];
        assert!(next > start_ms + 20 * 3600 * 1000, "next tick {next}");
        sim.assert_invariants();
        sim.shutdown_all().await;
    }
}
