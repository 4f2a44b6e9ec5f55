//! Voters and learners, and big clusters, on the simulator in simulated time: the first few
//! peers vote, the others are learners that replicate the log, hold sessions and own keys
//! with the same failover and hand-over bounds. Each scenario prints what it measured.

mod common;

use common::{Journal, init_tracing};
use highlander::{KeyQuery, NodeId, Timing, Token};
use highlander_sim::SimCluster;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

async fn cluster(nodes: u64, voters: usize, keys: Vec<String>, journal: &Journal) -> SimCluster {
    init_tracing();
    let journal = journal.clone();
    let keys = std::sync::Arc::new(keys);
    SimCluster::builder()
        .nodes(nodes)
        .voters(voters)
        .seed(nodes * 1000 + voters as u64)
        .setup(move |node| {
            let (journal, keys) = (journal.clone(), keys.clone());
            async move {
                for key in keys.iter() {
                    node.singleton(key.as_str(), journal.consumer()).await?;
                }
                Ok(())
            }
        })
        .build()
        .await
        .expect("cluster starts")
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Slot 0's owner of every key, from one status report (asking per key would cost a report
/// per key).
fn owners(sim: &SimCluster) -> BTreeMap<String, (NodeId, Token)> {
    let Some(status) = sim.status_with(&KeyQuery::all()) else { return BTreeMap::new() };
    status
        .keys
        .iter()
        .filter_map(|k| {
            let o = k.owners.first().copied().flatten()?;
            Some((k.key.to_string(), (o.node, o.token)))
        })
        .collect()
}

/// Waits until every key has an owner.
async fn all_owned(sim: &SimCluster, keys: &[String], within: Duration) -> Duration {
    let began = Instant::now();
    sim.wait_until(within, |s| {
        let owned = owners(s);
        keys.iter().all(|k| owned.contains_key(k))
    })
    .await
    .unwrap_or_else(|| panic!("not every key is owned within {within:?}"));
    began.elapsed()
}

#[tokio::test(start_paused = true)]
async fn learners_own_keys_and_fail_over_within_the_voters_bounds() {
    let keys = names("k", 21);
    let journal = Journal::default();
    let mut sim = cluster(7, 3, keys.clone(), &journal).await;
    all_owned(&sim, &keys, Duration::from_secs(10)).await;
    sim.run_for(Duration::from_secs(2)).await;

    // The first three ids vote; the others are learners, and own keys too.
    let st = sim.status().unwrap();
    assert_eq!(st.members, vec![NodeId(1), NodeId(2), NodeId(3)], "voters: {st:?}");
    assert_eq!(st.learners, (4..=7).map(NodeId).collect::<Vec<_>>());
    for id in sim.ids() {
        assert_eq!(sim.node(id).status().voting, id.0 <= 3, "{id} voting");
    }
    let owned = owners(&sim);
    let owner_nodes: std::collections::BTreeSet<NodeId> =
        keys.iter().filter_map(|k| owned.get(k.as_str()).copied().map(|(n, _)| n)).collect();
    assert!(owner_nodes.iter().any(|n| n.0 > 3), "no learner owns a key: {owner_nodes:?}");

    // A learner that crashes: its keys run elsewhere within TTL + margin + 100 ms.
    let timing = Timing::default();
    let bound = timing.session_ttl + timing.lease_margin + Duration::from_millis(100);
    let victim = *owner_nodes.iter().next_back().unwrap();
    let theirs: Vec<&String> = keys
        .iter()
        .filter(|k| owned.get(k.as_str()).copied().is_some_and(|(n, _)| n == victim))
        .collect();
    let killed = Instant::now();
    sim.kill(victim).await;
    sim.wait_until(bound * 2, |_| {
        theirs
            .iter()
            .all(|k| journal.starts(k).iter().any(|(n, _, at)| *n != victim && *at > killed))
    })
    .await
    .expect("the learner's keys run elsewhere");
    let slowest = theirs
        .iter()
        .map(|k| {
            let (_, _, at) = journal
                .starts(k)
                .into_iter()
                .find(|(n, _, at)| *n != victim && *at > killed)
                .unwrap();
            at - killed
        })
        .max()
        .unwrap();
    println!(
        "learner {victim} crashed: its {} keys ran elsewhere after at most {} ms (bound {} ms)",
        theirs.len(),
        slowest.as_millis(),
        bound.as_millis()
    );
    assert!(slowest <= bound, "failover took {slowest:?}, bound {bound:?}");

    // A learner that shuts down hands over at once.
    sim.restart(victim).await.unwrap();
    sim.run_for(Duration::from_secs(3)).await;
    let owned = owners(&sim);
    let pairs: Vec<(String, NodeId)> = keys
        .iter()
        .filter_map(|k| owned.get(k.as_str()).copied().map(|(n, _)| (k.clone(), n)))
        .collect();
    let (key, learner) = pairs.iter().find(|(_, n)| n.0 > 3).cloned().expect("a learner owns one");
    let began = Instant::now();
    sim.shutdown(learner).await;
    sim.wait_until(Duration::from_secs(5), |_| {
        journal.starts(&key).iter().any(|(n, _, at)| *n != learner && *at >= began)
    })
    .await
    .expect("another node takes the key");
    let (_, _, at) =
        journal.starts(&key).into_iter().find(|(n, _, at)| *n != learner && *at >= began).unwrap();
    println!("learner {learner} shut down: {key} handed over in {} ms", (at - began).as_millis());
    assert!(at - began <= Duration::from_millis(100));

    // The leader (a voter) crashes: the learners' keys stay where they are.
    sim.restart(learner).await.unwrap();
    sim.run_for(Duration::from_secs(3)).await;
    let leader = sim.status().unwrap().leader.unwrap();
    let owned = owners(&sim);
    let before: Vec<_> = keys
        .iter()
        .map(|k| owned.get(k.as_str()).copied())
        .filter(|o| o.is_some_and(|(n, _)| n.0 > 3))
        .collect();
    sim.kill(leader).await;
    sim.run_for(timing.session_ttl * 2).await;
    let owned = owners(&sim);
    let after: Vec<_> = keys
        .iter()
        .map(|k| owned.get(k.as_str()).copied())
        .filter(|o| o.is_some_and(|(n, _)| n.0 > 3))
        .collect();
    assert!(
        before.iter().all(|o| after.contains(o)),
        "a learner's key moved: {before:?} -> {after:?}"
    );
    sim.assert_invariants();
}

/// The membership commands move a node between voter and learner: demote takes the vote
/// and leaves the node owning its keys; add gives it back.
#[tokio::test(start_paused = true)]
async fn demote_and_add_move_a_node_between_voter_and_learner() {
    let keys = names("d", 6);
    let journal = Journal::default();
    let sim = cluster(5, 5, keys.clone(), &journal).await;
    all_owned(&sim, &keys, Duration::from_secs(10)).await;
    let report = sim.node(1).demote_member(5).await.expect("demote 5");
    assert!(report.members.iter().any(|m| m.node == NodeId(5) && !m.voter), "{report:?}");
    let report = sim.node(2).demote_member(4).await.expect("demote 4");
    let voters: Vec<NodeId> = report.members.iter().filter(|m| m.voter).map(|m| m.node).collect();
    assert_eq!(voters, vec![NodeId(1), NodeId(2), NodeId(3)]);
    sim.run_for(Duration::from_secs(1)).await;
    assert!(!sim.node(5).status().voting && !sim.node(4).status().voting);
    let err = sim.node(1).demote_member(5).await.unwrap_err();
    assert!(err.to_string().contains("does not vote"), "{err}");
    // Still a full node: it sends, and owns what it owned.
    sim.send(5, "d0", "from a learner").await.expect("a learner forwards writes");
    let report = sim.node(3).add_member(5).await.expect("add 5 back");
    assert!(report.members.iter().any(|m| m.node == NodeId(5) && m.voter), "{report:?}");
    sim.run_for(Duration::from_secs(1)).await;
    assert!(sim.node(5).status().voting);
    sim.assert_invariants();
}

/// A big cluster: 50 nodes, 5 voters and 45 learners, each key registered on 3 nodes. Kills
/// of learners and of the leader, and a partition of learners: the invariants hold, a
/// crashed learner's keys run elsewhere within TTL + margin + 100 ms, and every key is owned
/// again once the faults stop.
#[tokio::test(start_paused = true)]
async fn fifty_nodes_five_voters_keep_their_invariants_under_faults() {
    const NODES: u64 = 50;
    let keys_total: usize =
        std::env::var("HIGHLANDER_SIM_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let keys = names("t", keys_total);
    let per_node = std::sync::Arc::new(keys.clone());
    let started = std::time::Instant::now();
    let mut sim = SimCluster::builder()
        .nodes(NODES)
        .voters(5)
        .seed(50)
        .memory_storage()
        .setup(move |node| {
            let (j, keys) = (j.clone(), per_node.clone());
            async move {
                // Each key on three nodes: its index's node and the next two.
                let me = node.id().0 as usize - 1;
                let mine: Vec<&String> = keys
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (0..3).any(|d| (i + d) % NODES as usize == me))
                    .map(|(_, k)| k)
                    .collect();
                for key in mine {
                    node.singleton(key.as_str(), j.consumer()).await?;
                }
                Ok(())
            }
        })
        .build()
        .await
        .expect("cluster starts");
    let owned_in = all_owned(&sim, &keys, Duration::from_secs(60)).await;
    let st = sim.status().unwrap();
    assert_eq!(st.members.len(), 5, "{:?}", st.members);
    assert_eq!(st.learners.len(), 45);
    println!(
        "{NODES} nodes (5 voters), {keys_total} keys on 3 nodes each: all owned {} ms after \
         start-up ({} s of CPU so far)",
        owned_in.as_millis(),
        started.elapsed().as_secs()
    );

    // Crash three learners that own keys: their keys run elsewhere in time.
    let timing = Timing::default();
    let bound = timing.session_ttl + timing.lease_margin + Duration::from_millis(100);
    let mut victims: Vec<NodeId> = Vec::new();
    let owned = owners(&sim);
    for k in &keys {
        // Three apart, so that every key keeps a live node to run on.
        if let Some((n, _)) = owned.get(k.as_str()).copied()
            && n.0 > 5
            && victims.iter().all(|v| v.0.abs_diff(n.0) >= 3)
        {
            victims.push(n);
        }
        if victims.len() == 3 {
            break;
        }
    }
    let theirs: Vec<&String> = keys
        .iter()
        .filter(|k| owned.get(k.as_str()).copied().is_some_and(|(n, _)| victims.contains(&n)))
        .collect();
    let killed = Instant::now();
    for v in &victims {
        sim.kill(*v).await;
    }
    let moved = |k: &String| {
        journal.starts(k).into_iter().find(|(n, _, at)| !victims.contains(n) && *at > killed)
    };
    sim.wait_until(bound * 2, |_| theirs.iter().all(|k| moved(k).is_some()))
        .await
        .expect("the learners' keys run elsewhere");
    let slowest = theirs.iter().map(|k| moved(k).unwrap().2 - killed).max().unwrap();
    println!(
        "3 learners crashed: their {} keys ran elsewhere after at most {} ms (bound {} ms)",
        theirs.len(),
        slowest.as_millis(),
        bound.as_millis()
    );
    assert!(slowest <= bound, "failover took {slowest:?}, bound {bound:?}");

    // The leader crashes; ten learners are cut off from everyone else; then all heals.
    let leader = sim.status().unwrap().leader.unwrap();
    sim.kill(leader).await;
    let cut: Vec<u64> = (30..40).collect();
    let rest: Vec<u64> = (1..=NODES).filter(|n| !cut.contains(n)).collect();
    sim.partition(&cut, &rest);
    sim.run_for(timing.session_ttl * 3).await;
    sim.heal();
    for id in victims.iter().copied().chain([leader]) {
        sim.restart_in_background(id).await.unwrap();
    }
    let again = all_owned(&sim, &keys, Duration::from_secs(60)).await;
    sim.run_for(Duration::from_secs(3)).await;
    println!(
        "after the leader's crash and a partition of 10 learners: all {keys_total} keys owned \
         {} ms after the heal; {} s of CPU in all",
        again.as_millis(),
        started.elapsed().as_secs()
    );
    sim.assert_invariants();
}
