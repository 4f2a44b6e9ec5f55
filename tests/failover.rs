//! Failover scenarios on the simulator, in simulated time. Each prints what it measured.

mod common;

use common::{Journal, init_tracing};
use highlander::{NodeId, Timing};
use highlander_sim::SimCluster;
use std::time::Duration;
use tokio::time::Instant;

async fn cluster(seed: u64, keys: &'static [&'static str], journal: &Journal) -> SimCluster {
    init_tracing();
    let journal = journal.clone();
    SimCluster::builder()
        .nodes(3)
        .seed(seed)
        .setup(move |node| {
            let journal = journal.clone();
            async move {
                for key in keys {
                    node.singleton(*key, journal.consumer()).await?;
                }
                Ok(())
            }
        })
        .build()
        .await
        .expect("cluster starts")
}

async fn owned(sim: &SimCluster, key: &str) -> (NodeId, highlander::Token) {
    sim.wait_until(Duration::from_secs(10), |s| s.owners(key).first().copied().flatten().is_some())
        .await
        .expect("the key gets an owner");
    sim.owners(key)[0].unwrap()
}

#[tokio::test(start_paused = true)]
async fn owner_crash_fails_over_within_ttl_plus_one_second() {
    let journal = Journal::default();
    let mut sim = cluster(11, &["report"], &journal).await;
    let (owner, token) = owned(&sim, "report").await;
    sim.run_for(Duration::from_secs(1)).await;

    let killed = Instant::now();
    sim.kill(owner).await;
    let ttl = Timing::default().session_ttl;
    sim.wait_until(ttl + Duration::from_secs(2), |_| {
        journal.starts("report").iter().any(|(n, _, at)| *n != owner && *at > killed)
    })
    .await
    .expect("another node runs the singleton");
    let (node, new_token, at) = journal
        .starts("report")
        .into_iter()
        .find(|(n, _, at)| *n != owner && *at > killed)
        .unwrap();
    let took = at - killed;
    println!(
        "crash failover: {} ms (ttl {} ms), {owner}/{token} -> {node}/{new_token}",
        took.as_millis(),
        ttl.as_millis()
    );
    assert!(took <= ttl + Duration::from_secs(1), "failover took {took:?}");
    assert!(new_token > token, "token {new_token} must exceed {token}");
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn leader_crash_does_not_move_a_live_owners_tasks() {
    let journal = Journal::default();
    let keys: &'static [&'static str] = &["a", "b", "c", "d", "e", "f"];
    let mut sim = cluster(12, keys, &journal).await;
    for k in keys {
        owned(&sim, k).await;
    }
    // Let the placement settle first (keys spread, and kept off the leader where they can
    // be), so that any later move would be the leader crash's doing.
    let placement = |s: &SimCluster| keys.iter().map(|k| s.owners(k)).collect::<Vec<_>>();
    let mut last = placement(&sim);
    for _ in 0..30 {
        sim.run_for(Duration::from_secs(3)).await;
        let now = placement(&sim);
        if now == last {
            break;
        }
        last = now;
    }
    sim.run_for(Duration::from_secs(1)).await;
    let leader = sim.status().and_then(|s| s.leader).expect("a leader");
    let survivors: Vec<(&str, NodeId, highlander::Token)> = keys
        .iter()
        .filter_map(|k| sim.owners(k)[0].filter(|(n, _)| *n != leader).map(|(n, t)| (*k, n, t)))
        .collect();
    assert!(!survivors.is_empty(), "some keys are owned by followers");
    let starts_before: Vec<usize> =
        survivors.iter().map(|(k, _, _)| journal.starts(k).len()).collect();

    let killed = Instant::now();
    sim.kill(leader).await;
    let took = sim
        .wait_until(Duration::from_secs(10), |s| {
            s.status().and_then(|st| st.leader).is_some_and(|l| l != leader)
        })
        .await
        .expect("a new leader");
    // Stay past a whole TTL: a lease that lapsed during the election would show by now.
    sim.run_for(Timing::default().session_ttl * 2).await;
    println!(
        "leader crash: new leader after {} ms; follower-owned keys kept: {}",
        took.as_millis(),
        survivors.len()
    );
    for ((key, node, token), before) in survivors.iter().zip(starts_before) {
        assert_eq!(
            sim.owners(key)[0],
            Some((*node, *token)),
            "{key} must keep its owner and token"
        );
        assert_eq!(journal.starts(key).len(), before, "{key} must not be restarted");
    }
    assert!(Instant::now() > killed);
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn an_owner_cut_off_stops_before_the_new_owner_starts() {
    let journal = Journal::default();
    let sim = cluster(13, &["poller"], &journal).await;
    let (owner, token) = owned(&sim, "poller").await;
    let others: Vec<u64> = sim.ids().into_iter().filter(|n| *n != owner).map(|n| n.0).collect();
    sim.run_for(Duration::from_millis(700)).await;

    let cut = Instant::now();
    sim.partition(&[owner.0], &others);
    sim.wait_until(Duration::from_secs(10), |_| {
        journal.starts("poller").iter().any(|(n, _, _)| *n != owner)
    })
    .await
    .expect("the majority side takes the key over");
    let (node, new_token, at) =
        journal.starts("poller").into_iter().find(|(n, _, _)| *n != owner).unwrap();
    println!(
        "partitioned owner: {node}/{new_token} runs {} ms after the cut",
        (at - cut).as_millis()
    );
    assert!(new_token > token);
    // The checker saw every start and stop: the old owner stopped before the new one ran.
    sim.assert_invariants();

    // After healing, the old owner comes back as a candidate and the key stays where it is.
    sim.heal();
    sim.run_for(Duration::from_secs(5)).await;
    assert_eq!(sim.owners("poller")[0], Some((node, new_token)));
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn a_cut_off_owner_that_ignores_cancellation_is_aborted_in_time() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(17)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("stubborn", j.stubborn()).await }
        })
        .build()
        .await
        .unwrap();
    let (owner, token) = owned(&sim, "stubborn").await;
    let others: Vec<u64> = sim.ids().into_iter().filter(|n| *n != owner).map(|n| n.0).collect();
    sim.run_for(Duration::from_millis(300)).await;
    sim.partition(&[owner.0], &others);
    sim.wait_until(Duration::from_secs(10), |_| {
        journal.starts("stubborn").iter().any(|(n, _, _)| *n != owner)
    })
    .await
    .expect("the majority side takes the key over");
    let (_, new_token, _) =
        journal.starts("stubborn").into_iter().find(|(n, _, _)| *n != owner).unwrap();
    assert!(new_token > token);
    // The handler never returned: only the abort at the lease deadline stopped it in time.
    sim.assert_invariants();
}

/// A cut-off owner that is shut down gracefully just before its lease deadline must still
/// stop its task by that deadline, not one stop grace after the shutdown began (found by the
/// fault search, seed 2685).
#[tokio::test(start_paused = true)]
async fn a_graceful_shutdown_never_outlasts_the_lease_deadline() {
    init_tracing();
    for delay_ms in [1400u64, 1500, 1600, 1700, 1800] {
        let journal = Journal::default();
        let j = journal.clone();
        let mut sim = SimCluster::builder()
            .nodes(3)
            .seed(18)
            .setup(move |node| {
                let j = j.clone();
                async move { node.singleton("stubborn", j.stubborn()).await }
            })
            .build()
            .await
            .unwrap();
        let (owner, _) = owned(&sim, "stubborn").await;
        let others: Vec<u64> = sim.ids().into_iter().filter(|n| *n != owner).map(|n| n.0).collect();
        sim.run_for(Duration::from_millis(300)).await;
        sim.partition(&[owner.0], &others);
        sim.run_for(Duration::from_millis(delay_ms)).await;
        // Shut down in the window between "asked to stop" and the lease deadline.
        sim.shutdown(owner).await;
        sim.wait_until(Duration::from_secs(10), |_| {
            journal.starts("stubborn").iter().any(|(n, _, _)| *n != owner)
        })
        .await
        .expect("the majority side takes the key over");
        sim.assert_invariants();
    }
}

#[tokio::test(start_paused = true)]
async fn a_one_way_cut_from_the_leader_still_fails_over_safely() {
    let journal = Journal::default();
    let sim = cluster(14, &["a", "b", "c"], &journal).await;
    for k in ["a", "b", "c"] {
        owned(&sim, k).await;
    }
    let leader = sim.status().and_then(|s| s.leader).unwrap();
    let victim = sim.ids().into_iter().find(|n| *n != leader).unwrap();
    // The victim can still reach the leader, but hears nothing back from anyone.
    let rest: Vec<u64> = sim.ids().into_iter().filter(|n| *n != victim).map(|n| n.0).collect();
    sim.partition_oneway(&rest, &[victim.0]);
    sim.run_for(Duration::from_secs(12)).await;
    let st = sim.status().unwrap();
    for k in &st.keys {
        let owner = k.owners[0].map(|o| o.node);
        assert!(owner.is_some() && owner != Some(victim), "{} is owned by {owner:?}", k.key);
    }
    sim.heal();
    sim.run_for(Duration::from_secs(3)).await;
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_hands_over_within_100ms() {
    let journal = Journal::default();
    let mut sim = cluster(15, &["feed"], &journal).await;
    let (owner, token) = owned(&sim, "feed").await;
    sim.run_for(Duration::from_secs(1)).await;

    let began = Instant::now();
    sim.shutdown(owner).await;
    sim.wait_until(Duration::from_secs(5), |_| {
        journal.starts("feed").iter().any(|(n, _, at)| *n != owner && *at >= began)
    })
    .await
    .expect("another node takes the key");
    let (node, new_token, at) =
        journal.starts("feed").into_iter().find(|(n, _, at)| *n != owner && *at >= began).unwrap();
    let took = at - began;
    println!("graceful hand-over: {} ms, {owner}/{token} -> {node}/{new_token}", took.as_millis());
    assert!(took <= Duration::from_millis(100), "hand-over took {took:?}");
    assert!(new_token > token);
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_gives_up_its_previous_session_at_once() {
    let journal = Journal::default();
    let mut sim = cluster(16, &["job"], &journal).await;
    let (owner, token) = owned(&sim, "job").await;
    let old_session =
        sim.status().unwrap().sessions.iter().find(|s| s.node == owner).map(|s| s.session).unwrap();
    sim.run_for(Duration::from_secs(1)).await;

    sim.kill(owner).await;
    let restarted = Instant::now();
    sim.restart(owner).await.expect("restart");
    let took = sim
        .wait_until(Duration::from_secs(5), |s| {
            let st = s.status().unwrap();
            !st.sessions.iter().any(|x| x.session == old_session)
                && s.owners("job")[0].is_some_and(|(_, t)| t > token)
        })
        .await
        .expect("the old session is closed and the key reassigned");
    let total = Instant::now() - restarted;
    println!(
        "restart: old session closed and key reassigned {} ms after restart",
        total.as_millis()
    );
    assert!(total < Timing::default().session_ttl / 2, "waited {took:?}: looks like a TTL expiry");
    sim.assert_invariants();
}

/// Restarts that disturb nobody (pre-vote): 100 restarts of followers into a healthy
/// cluster, crashes and graceful stops in turn, half of them while the leader's messages to
/// the restarted node are still held up (a connection being re-established) for longer than
/// an election timeout. No term rises, the leader stays, and no key owned by a node that was
/// not restarted changes hands, except to the restarted node itself: the planner's load
/// spread gives a returning node its share back, one release at a time.
#[tokio::test(start_paused = true)]
async fn follower_restarts_raise_no_term_and_move_no_other_key() {
    let keys: &[&str] = &["a", "b", "c", "d", "e", "f"];
    let journal = Journal::default();
    let mut sim = cluster(17, keys, &journal).await;
    for k in keys {
        owned(&sim, k).await;
    }
    sim.run_for(Duration::from_secs(1)).await;
    let first = sim.status().unwrap();
    let (leader, term) = (first.leader.expect("a leader"), first.term);
    let timing = Timing::default();
    let (mut moved_with_restart, mut spread_back) = (0, 0);
    for i in 0..100u64 {
        let followers: Vec<NodeId> = sim.ids().into_iter().filter(|n| *n != leader).collect();
        let f = followers[i as usize % followers.len()];
        let before: Vec<_> = keys.iter().map(|k| sim.owners(k)[0]).collect();
        if i % 2 == 0 {
            sim.kill(f).await;
        } else {
            sim.shutdown(f).await;
        }
        let held_up = i % 4 < 2;
        if held_up {
            sim.partition_oneway(&[leader.0], &[f.0]);
        }
        if held_up {
            sim.restart_in_background(f).await.expect("restart");
            sim.run_for(timing.election_max * 3).await;
            sim.heal();
        } else {
            sim.restart(f).await.expect("restart");
        }
        sim.run_for(Duration::from_millis(700)).await;
        for node in sim.ids() {
            let st = sim.node(node).status();
            assert_eq!(st.term, term, "restart {i} of {f}: {node} is at term {}", st.term);
        }
        for (k, was) in keys.iter().zip(before) {
            let now = sim.owners(k)[0];
            match (was, now) {
                (Some((owner, _)), _) if owner == f => {
                    moved_with_restart += usize::from(now != was)
                }
                (_, Some((owner, _))) if owner == f && now != was => spread_back += 1,
                _ => assert_eq!(now, was, "restart {i} of {f} moved {k}"),
            }
        }
    }
    let st = sim.status().unwrap();
    assert_eq!((st.leader, st.term), (Some(leader), term));
    println!(
        "100 follower restarts: term {term} throughout, leader {leader} throughout, \
         {moved_with_restart} keys moved off the restarted node, {spread_back} onto it"
    );
    sim.assert_invariants();
}
