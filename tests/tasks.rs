//! How tasks are run: restart policies, health deadlines, exclusive groups, batching.

mod common;

use common::{Journal, init_tracing};
use highlander::{Error, RestartPolicy, TaskOptions};
use highlander_sim::SimCluster;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

type Log = Arc<Mutex<Vec<(highlander::NodeId, highlander::Token, Instant)>>>;

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_restarts_in_place_with_backoff_and_the_same_token() {
    init_tracing();
    let log: Log = Arc::default();
    let l = log.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(41)
        .setup(move |node| {
            let l = l.clone();
            async move {
                node.singleton("flaky", move |ctx| {
                    let l = l.clone();
                    async move {
                        l.lock().unwrap().push((ctx.node_id(), ctx.token(), Instant::now()));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let fails = true;
                        if fails {
                            panic!("the handler fails");
                        }
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |_| log.lock().unwrap().len() >= 5).await.unwrap();
    let runs = log.lock().unwrap().clone();
    let (node, token, _) = runs[0];
    assert!(
        runs.iter().all(|(n, t, _)| (*n, *t) == (node, token)),
        "same node, same token: {runs:?}"
    );
    let gaps: Vec<u128> = runs.windows(2).map(|w| (w[1].2 - w[0].2).as_millis()).collect();
    // 10 ms of work, then backoff 100, 200, 400, 800 ms.
    assert!(gaps.windows(2).all(|g| g[1] > g[0]), "backoff grows: {gaps:?}");
    assert!(gaps[0] >= 100, "first backoff: {gaps:?}");
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn a_handler_with_hand_over_policy_moves_to_another_node_when_it_returns() {
    init_tracing();
    let log: Log = Arc::default();
    let l = log.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(42)
        .setup(move |node| {
            let l = l.clone();
            async move {
                let options =
                    TaskOptions { restart: RestartPolicy::HandOver, ..TaskOptions::default() };
                node.singleton_with("relay", options, move |ctx| {
                    let l = l.clone();
                    async move {
                        l.lock().unwrap().push((ctx.node_id(), ctx.token(), Instant::now()));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |_| log.lock().unwrap().len() >= 4).await.unwrap();
    let runs = log.lock().unwrap().clone();
    for w in runs.windows(2) {
        assert_ne!(w[0].0, w[1].0, "a hand-over goes to another node: {runs:?}");
        assert!(w[1].1 > w[0].1, "with a larger token: {runs:?}");
        assert!(w[1].2 - w[0].2 < Duration::from_millis(300), "promptly: {runs:?}");
    }
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn a_missed_health_deadline_releases_the_slot() {
    init_tracing();
    let log: Log = Arc::default();
    let l = log.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(43)
        .setup(move |node| {
            let l = l.clone();
            async move {
                let options = TaskOptions {
                    health_deadline: Some(Duration::from_millis(300)),
                    ..TaskOptions::default()
                };
                node.singleton_with("watchdog", options, move |ctx| {
                    let l = l.clone();
                    async move {
                        l.lock().unwrap().push((ctx.node_id(), ctx.token(), Instant::now()));
                        // Healthy for a second, then it hangs (and ignores cancellation).
                        for _ in 0..10 {
                            ctx.heartbeat();
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        std::future::pending::<()>().await;
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(10), |_| log.lock().unwrap().len() >= 2).await.unwrap();
    let runs = log.lock().unwrap().clone();
    let hung_for = runs[1].2 - runs[0].2;
    assert_ne!(runs[0].0, runs[1].0, "handed to another node");
    assert!(runs[1].1 > runs[0].1);
    // One second healthy, the 300 ms deadline, up to one stop grace (500 ms) to abort.
    assert!(
        hung_for >= Duration::from_millis(1300) && hung_for < Duration::from_millis(2000),
        "{hung_for:?}"
    );
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn an_exclusive_group_runs_on_distinct_nodes_and_refills_after_a_crash() {
    init_tracing();
    let sim_builder = SimCluster::builder().nodes(3).seed(44).setup(|node| async move {
        node.exclusive("pair", 2, |ctx| async move { ctx.cancelled().await }).await
    });
    let mut sim = sim_builder.build().await.unwrap();
    let filled = |s: &SimCluster| {
        let o = s.owners("pair");
        o.len() == 2 && o.iter().all(|x| x.is_some()) && o[0].unwrap().0 != o[1].unwrap().0
    };
    sim.wait_until(Duration::from_secs(5), filled).await.expect("two distinct owners");
    let victim = sim.owners("pair")[1].unwrap().0;
    sim.kill(victim).await;
    sim.wait_until(Duration::from_secs(10), |s| {
        filled(s) && s.owners("pair").iter().all(|o| o.unwrap().0 != victim)
    })
    .await
    .expect("the slot is refilled on the remaining node");
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn concurrent_sends_share_raft_entries() {
    init_tracing();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(45)
        .setup(|node| async move {
            node.singleton("bulk", |ctx| async move { ctx.cancelled().await }).await
        })
        .build()
        .await
        .unwrap();
    sim.run_for(Duration::from_millis(500)).await;
    let node = sim.node(1).clone();
    let before = node.status().applied_index;
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let node = node.clone();
            tokio::spawn(async move { node.send("bulk", format!("m{i}")).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    let entries = node.status().applied_index - before;
    println!("200 concurrent sends took {entries} Raft entries");
    assert!(entries < 50, "the proposer batches: {entries} entries for 200 sends");
    let queued = node.status().keys.iter().find(|k| k.key.as_str() == "bulk").unwrap().queued;
    assert_eq!(queued, 200);
}

#[tokio::test(start_paused = true)]
async fn keys_that_piled_up_on_the_first_node_spread_out_safely() {
    init_tracing();
    let keys: Vec<String> = (0..9).map(|i| format!("job{i}")).collect();
    let ks = keys.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(46)
        .setup(move |node| {
            let ks = ks.clone();
            async move {
                for k in &ks {
                    node.singleton(k.as_str(), |ctx| async move { ctx.cancelled().await }).await?;
                }
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    let loads = |s: &SimCluster| {
        let mut per = std::collections::BTreeMap::new();
        for k in &keys {
            if let Some(Some((n, _))) = s.owners(k).first().copied() {
                *per.entry(n).or_insert(0i32) += 1;
            }
        }
        per
    };
    println!("right after start: {:?}", loads(&sim));
    // Even, counting one extra slot for the leader's node (the planner keeps keys off it).
    let even = |s: &SimCluster| {
        let leader = s.status().and_then(|st| st.leader);
        let l = loads(s);
        let weighted: Vec<i32> =
            l.iter().map(|(n, c)| *c + i32::from(Some(*n) == leader)).collect();
        l.len() == 3 && weighted.iter().max().unwrap() - weighted.iter().min().unwrap() <= 1
    };
    let took = sim.wait_until(Duration::from_secs(30), even).await.expect("the keys spread evenly");
    println!("spread evenly after {} ms: {:?}", took.as_millis(), loads(&sim));
    // And then nothing moves any more.
    let owners: Vec<_> = keys.iter().map(|k| sim.owners(k)).collect();
    sim.run_for(Duration::from_secs(10)).await;
    assert_eq!(owners, keys.iter().map(|k| sim.owners(k)).collect::<Vec<_>>());
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn unregister_hands_the_key_over_only_after_the_task_has_stopped() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(44)
        .setup(move |node| {
            let j = j.clone();
            async move {
                node.singleton("job", j.consumer()).await?;
                // Ignores cancellation: only the abort at the end of the grace stops it.
                node.singleton("stubborn", j.stubborn()).await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| {
        s.owners("job")[0].is_some() && s.owners("stubborn")[0].is_some()
    })
    .await
    .unwrap();
    for i in 0..20u64 {
        sim.send(1 + i % 3, "job", format!("a{i}")).await.unwrap();
    }

    for key in ["job", "stubborn"] {
        let (first, t1) = sim.owners(key)[0].unwrap();
        let node = sim.node(first).clone();
        let withdrawal = tokio::spawn(async move { node.unregister(key).await });
        if key == "stubborn" {
            // Its task holds on until the grace ends. Registering again meanwhile is safe: the
            // withdrawal, landing after the newer registration, is refused by the cluster
            // instead of undoing it, and the slot still moves only once the task has ended.
            sim.run_for(Duration::from_millis(20)).await;
            sim.node(first).singleton(key, journal.stubborn()).await.unwrap();
            withdrawal.await.unwrap().unwrap();
            let report = sim.status().unwrap();
            let k = report.keys.iter().find(|k| k.key.as_str() == key).unwrap();
            assert!(k.candidates.contains(&first), "the newer registration was undone");
            sim.node(first).unregister(key).await.unwrap();
        } else {
            withdrawal.await.unwrap().unwrap();
        }
        // Released only after the task ended; the checker would flag any overlap.
        sim.wait_until(Duration::from_secs(5), |s| {
            s.owners(key)[0].is_some_and(|(n, _)| n != first)
        })
        .await
        .unwrap();
        let (_, t2) = sim.owners(key)[0].unwrap();
        assert!(t2 > t1, "{key}: a larger token for the next owner");
        let report = sim.status().unwrap();
        let k = report.keys.iter().find(|k| k.key.as_str() == key).unwrap();
        assert!(!k.candidates.contains(&first), "{key}: {first} is no candidate any more");
        match sim.node(first).unregister(key).await {
            Err(Error::NotRegistered { .. }) => {}
            other => panic!("a second unregister: {other:?}"),
        }
    }

    // Messages sent before and after all reach the next owner, in order.
    for i in 0..20u64 {
        sim.send(1 + i % 3, "job", format!("b{i}")).await.unwrap();
    }
    sim.wait_until(Duration::from_secs(10), |s| s.checker().check_all_delivered().is_ok())
        .await
        .unwrap();
    let delivered = journal.payloads("job");
    let expected: Vec<Vec<u8>> = (0..20)
        .map(|i| format!("a{i}"))
        .chain((0..20).map(|i| format!("b{i}")))
        .map(String::into_bytes)
        .collect();
    assert!(expected.iter().all(|m| delivered.contains(m)), "none lost");

    // An unregister whose caller gives up half-way leaves the key free to register again.
    let (owner, _) = sim.owners("job")[0].unwrap();
    let cut_short =
        tokio::time::timeout(Duration::from_millis(1), sim.node(owner).unregister("job")).await;
    assert!(cut_short.is_err(), "the release takes a Raft round, longer than 1 ms");
    sim.node(owner).singleton("job", journal.consumer()).await.unwrap();

    // Withdrawn from every node, the key runs nowhere; registered again, it runs again.
    for id in sim.ids() {
        let _ = sim.node(id).unregister("job").await;
    }
    sim.wait_until(Duration::from_secs(5), |s| s.owners("job").iter().all(Option::is_none))
        .await
        .unwrap();
    sim.node(2).singleton("job", journal.consumer()).await.unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("job")[0].is_some_and(|(n, _)| n.0 == 2))
        .await
        .unwrap();
    sim.assert_invariants();
}
