//! The safety audit's findings, each as the scenario that exposed it, on the simulator with
//! the invariant checker watching every task start, stop and delivery. All times are
//! simulated; each test prints what it measured.
//!
//! Finding 2 (a late `Unregister`) is proven in core, where its exact sequence can be
//! replayed (`crates/highlander-core/tests/state.rs`), and here by withdrawals dropped at
//! random points; finding 4 (`recv` past the lease) by a unit test of `TaskContext` and the
//! real-process pause test (`tests/processes.rs`); finding 7 (a handler stuck in synchronous
//! code) by the real-process fail-stop test.

mod common;

use common::{Journal, init_tracing};
use highlander::{Error, NodeId, Timing};
use highlander_sim::{LinkFaults, SimCluster, ViolationKind};
use std::time::Duration;
use tokio::time::Instant;

async fn cluster(seed: u64, journal: &Journal) -> SimCluster {
    init_tracing();
    let j = journal.clone();
    SimCluster::builder()
        .nodes(3)
        .seed(seed)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("k", j.consumer()).await }
        })
        .build()
        .await
        .expect("cluster starts")
}

async fn owner_of(sim: &SimCluster, key: &str) -> (NodeId, highlander::Token) {
    sim.wait_until(Duration::from_secs(10), |s| s.owners(key).first().copied().flatten().is_some())
        .await
        .expect("the key gets an owner");
    sim.owners(key)[0].unwrap()
}

fn leader(sim: &SimCluster) -> NodeId {
    sim.status().and_then(|s| s.leader).expect("a leader")
}

/// Finding 1: the owner's node lags, the other two commit more, one of them loses its disk
/// and restarts empty, the last up-to-date node dies. The lagging node and the wiped one
/// must not form a quorum: the wiped storage is a new member (a learner), so no leader is
/// elected until the up-to-date node is back, and then every acknowledged message is there.
#[tokio::test(start_paused = true)]
async fn finding_1_a_wiped_voter_never_forms_a_quorum_with_a_lagging_node() {
    let journal = Journal::default();
    let mut sim = cluster(101, &journal).await;
    let (owner, _) = owner_of(&sim, "k").await;
    let up_to_date: Vec<u64> = sim.ids().iter().map(|n| n.0).filter(|n| *n != owner.0).collect();
    let (survivor, wiped) = (up_to_date[0], up_to_date[1]);

    // The owner's node lags: cut off, it misses what the other two commit.
    sim.partition(&[owner.0], &up_to_date);
    sim.run_for(Duration::from_secs(1)).await;
    for i in 0..10 {
        sim.send(survivor, "k", format!("m{i}")).await.expect("committed by the two others");
    }
    // One of the two loses its disk; then the other, the last up-to-date node, dies.
    sim.wipe(wiped).await;
    sim.restart_in_background(wiped).await.unwrap();
    sim.run_for(Duration::from_secs(1)).await;
    sim.kill(survivor).await;
    sim.heal();

    // The lagging node and the wiped one together: no leader, nothing committed.
    let term_before = sim.try_node(owner).unwrap().status().term;
    sim.run_for(Duration::from_secs(10)).await;
    for id in [owner, NodeId(wiped)] {
        let status = sim.try_node(id).unwrap().status();
        assert_eq!(status.leader.filter(|l| l.0 != survivor), None, "{id} follows a leader");
    }
    let lagging = sim.try_node(owner).unwrap().status();
    println!(
        "lagging + wiped for 10 s: terms {term_before} -> {}, no leader, {} keys applied",
        lagging.term,
        lagging.keys.len()
    );

    // The up-to-date node comes back: it leads, and the wiped node's new storage becomes a
    // voter in place of the lost one.
    sim.restart_in_background(survivor).await.unwrap();
    sim.wait_until(Duration::from_secs(30), |s| s.checker().check_all_delivered().is_ok())
        .await
        .unwrap_or_else(|| panic!("undelivered: {:?}", sim.checker().check_all_delivered()));
    let replaced = sim
        .wait_until(Duration::from_secs(30), |s| {
            s.try_node(wiped).is_some_and(|n| {
                let st = n.status();
                st.member.is_some_and(|m| m != wiped) && st.members.contains(&NodeId(wiped))
            })
        })
        .await;
    assert!(replaced.is_some(), "the wiped node's new storage votes: {:?}", sim.status());
    sim.assert_invariants();
}

/// Finding 1, second half: a wiped follower that comes back used to make the leader's
/// openraft core panic in debug builds (its log went backwards), leaving a zombie whose every
/// send failed. Its new storage is a new member: the leader never sees a log go back.
#[tokio::test(start_paused = true)]
async fn finding_1_a_wiped_follower_rejoins_as_new_storage_and_the_leader_keeps_serving() {
    let journal = Journal::default();
    let mut sim = cluster(102, &journal).await;
    owner_of(&sim, "k").await;
    let leader = leader(&sim);
    let follower = sim.ids().into_iter().find(|n| *n != leader).unwrap();
    for i in 0..20 {
        sim.send(leader, "k", format!("a{i}")).await.unwrap();
    }
    let old_member = sim.node(follower).status().member;
    sim.wipe(follower).await;
    sim.restart(follower).await.expect("the wiped node starts and opens a session");
    for i in 0..20 {
        sim.send(leader, "k", format!("b{i}")).await.expect("the leader still serves");
    }
    let status = sim.node(leader).status();
    assert!(status.warnings.iter().all(|w| !w.contains("stopped")), "{:?}", status.warnings);
    let rejoined = sim.node(follower).status();
    assert_ne!(rejoined.member, old_member, "new storage, new member");
    sim.wait_until(Duration::from_secs(30), |s| {
        s.try_node(leader).is_some_and(|n| n.status().members.contains(&follower))
            && s.try_node(follower).is_some_and(|n| n.status().members.contains(&follower))
    })
    .await
    .expect("the new storage votes");
    sim.wait_until(Duration::from_secs(10), |s| s.checker().check_all_delivered().is_ok())
        .await
        .expect("every acknowledged message delivered");
    sim.assert_invariants();
}

/// Finding 3: another process of the owner's node is started on other storage while the
/// first still runs, cut off (an orchestrator replacing an "unreachable" instance). The old
/// session used to end at once and the key moved while the old process still ran it; now the
/// new process waits out the old session's lease.
#[tokio::test(start_paused = true)]
async fn finding_3_a_new_process_on_other_storage_waits_out_the_one_it_replaces() {
    let journal = Journal::default();
    init_tracing();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(103)
        .setup(move |node| {
            let j = j.clone();
            // Ignores cancellation: only the abort at its lease deadline stops it.
            async move { node.singleton("k", j.stubborn()).await }
        })
        .build()
        .await
        .unwrap();
    let (owner, token) = owner_of(&sim, "k").await;
    sim.run_for(Duration::from_millis(300)).await;
    let replaced_at = Instant::now();
    sim.start_replacement(owner).await.unwrap();
    let moved = sim
        .wait_until(Duration::from_secs(20), |s| {
            s.owners("k")[0].is_some_and(|(_, t)| t > token) && s.checker().running().len() == 1
        })
        .await
        .expect("the key runs again");
    let ttl = Timing::default().session_ttl;
    println!(
        "replacement of the owner {owner}: key running again {} ms later (ttl {} ms)",
        moved.as_millis(),
        ttl.as_millis()
    );
    assert!(moved >= ttl - Duration::from_millis(500), "moved before the old lease ran out");
    // The replacement opens its session once the old one has expired.
    sim.wait_until(Duration::from_secs(20), |s| {
        s.status().is_some_and(|st| {
            st.sessions.iter().filter(|x| x.node == owner).count() == 1
                && st.sessions.iter().all(|x| !x.superseded)
        })
    })
    .await
    .expect("the replacement opens its session");
    let _ = replaced_at;
    sim.assert_invariants();
}

/// Finding 6: an owner whose keepalives reach the leader but whose answers never come back
/// kept its keys unowned for about 2.9 x TTL. A lapse is final now, so the first keepalive
/// that reports it lets the leader expire the session at once: failover within about TTL +
/// margin + one keepalive interval, as for any other partition.
#[tokio::test(start_paused = true)]
async fn finding_6_an_owner_that_only_hears_nothing_back_fails_over_within_the_ttl() {
    let journal = Journal::default();
    let sim = cluster(106, &journal).await;
    let (owner, _) = owner_of(&sim, "k").await;
    let leader = leader(&sim);
    assert_ne!(owner, leader, "keys stay off the leader's node");
    sim.run_for(Duration::from_secs(1)).await;
    let cut = Instant::now();
    // Nothing reaches the owner; what it sends still arrives.
    let others: Vec<u64> = sim.ids().iter().map(|n| n.0).filter(|n| *n != owner.0).collect();
    sim.partition_oneway(&others, &[owner.0]);
    sim.wait_until(Duration::from_secs(20), |_| {
        journal.starts("k").iter().any(|(n, _, at)| *n != owner && *at > cut)
    })
    .await
    .expect("another node runs the key");
    let took =
        journal.starts("k").iter().find(|(n, _, at)| *n != owner && *at > cut).unwrap().2 - cut;
    let t = Timing::default();
    let bound = t.session_ttl + t.lease_margin + t.keepalive_interval;
    println!(
        "one-way cut of the owner: failover in {} ms (bound {} ms)",
        took.as_millis(),
        bound.as_millis()
    );
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    sim.assert_invariants();
}

/// Finding 5: at 100 ms round trips the standard timing commits nothing (openraft 0.9 gives
/// each AppendEntries one heartbeat, 50 ms). Nodes now say so in `status`; and the WAN
/// timing, built for such links, runs the cluster and fails over within its bounds.
#[tokio::test(start_paused = true)]
async fn finding_5_slow_links_are_reported_and_the_wan_timing_works_on_them() {
    init_tracing();
    let slow = |lo: u64, hi: u64| LinkFaults {
        delay_min: Duration::from_millis(lo),
        delay_max: Duration::from_millis(hi),
        ..LinkFaults::default()
    };
    // Standard timing, 100 ms round trips: reported.
    let journal = Journal::default();
    let sim = cluster(105, &journal).await;
    sim.network().set_all_links(slow(50, 50));
    let warned = sim
        .wait_until(Duration::from_secs(10), |s| {
            s.ids().iter().all(|id| {
                s.try_node(*id)
                    .is_some_and(|n| n.status().warnings.iter().any(|w| w.contains("round trips")))
            })
        })
        .await;
    assert!(warned.is_some(), "no timing warning: {:?}", sim.status().map(|s| s.warnings));
    let report = sim.status().unwrap().network.unwrap();
    println!(
        "standard timing at 100 ms round trips: warned after {} ms (slowest {:?} ms, supported {} ms)",
        warned.unwrap().as_millis(),
        report.observed_rtt_ms,
        report.supported_rtt_ms
    );

    // The WAN timing on 120-150 ms round trips: works, and fails over.
    let journal = Journal::default();
    let j = journal.clone();
    let wan = Timing::wan();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(1051)
        .timing(wan)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("k", j.consumer()).await }
        })
        .build()
        .await
        .unwrap();
    sim.network().set_all_links(slow(60, 75));
    sim.run_for(Duration::from_secs(5)).await;
    let (owner, _) = owner_of(&sim, "k").await;
    for i in 0..10 {
        sim.send(1 + i % 3, "k", format!("w{i}")).await.expect("commits on slow links");
    }
    assert!(sim.status().unwrap().warnings.iter().all(|w| !w.contains("round trips")));
    let killed = Instant::now();
    sim.kill(owner).await;
    let bound = wan.session_ttl + wan.lease_margin + wan.keepalive_interval;
    sim.wait_until(bound + Duration::from_secs(1), |_| {
        journal.starts("k").iter().any(|(n, _, at)| *n != owner && *at > killed)
    })
    .await
    .expect("fails over");
    let took = journal.starts("k").iter().find(|(n, _, at)| *n != owner && *at > killed).unwrap().2
        - killed;
    println!("wan timing at 120-150 ms round trips: crash failover in {} ms", took.as_millis());
    sim.wait_until(Duration::from_secs(20), |s| s.checker().check_all_delivered().is_ok())
        .await
        .expect("all delivered");
    sim.assert_invariants();
}

/// Withdrawals dropped at every point of their course, each followed at once by a new
/// registration (finding 2's pattern), under a lossy, slow network: a late withdrawal never
/// vacates the slot of a newer registration (the checker sees no overlap) and never undoes
/// it (the key ends up run by a node that registered it).
#[tokio::test(start_paused = true)]
async fn dropped_withdrawals_never_undo_a_newer_registration() {
    let journal = Journal::default();
    init_tracing();
    let j = journal.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(107)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("k", j.stubborn()).await }
        })
        .build()
        .await
        .unwrap();
    owner_of(&sim, "k").await;
    sim.network().set_all_links(LinkFaults {
        drop: 0.1,
        duplicate: 0.1,
        delay_min: Duration::from_millis(1),
        delay_max: Duration::from_millis(15),
    });
    for round in 0..30u64 {
        let (owner, _) = owner_of(&sim, "k").await;
        let node = sim.node(owner).clone();
        // Drop the withdrawal after 1..=600 ms: before, during or after its release.
        let cut = Duration::from_millis(1 + (round * 37) % 600);
        let _ = tokio::time::timeout(cut, node.unregister("k")).await;
        match node.singleton("k", journal.stubborn()).await {
            Ok(()) | Err(Error::Timeout) => {}
            Err(e) => panic!("round {round}: register again: {e}"),
        }
        sim.run_for(Duration::from_millis(200)).await;
        assert!(sim.violations().is_empty(), "round {round}: {:?}", sim.violations());
    }
    sim.network().clear_link_faults();
    // Every node registered the key last: each stays a candidate, and the key runs.
    sim.wait_until(Duration::from_secs(10), |s| {
        s.status().is_some_and(|st| {
            st.keys.iter().any(|k| k.key.as_str() == "k" && k.candidates.len() == 3)
        }) && s.owners("k")[0].is_some()
    })
    .await
    .unwrap_or_else(|| panic!("a registration was undone: {:?}", sim.status().map(|s| s.keys)));
    sim.assert_invariants();
}

/// The lease argument assumes only that clocks run at nearly the same rate. With the owner's
/// clock 1 % slow and the others' 1 % fast (drift below the 2.5 % margin), a partitioned
/// owner whose handler ignores cancellation is still stopped before anyone else starts it.
#[tokio::test(start_paused = true)]
async fn clock_drift_below_the_margin_never_gives_two_owners() {
    let (violations, took) = partitioned_owner_with_drift(0.99, 1.01, 108).await;
    println!(
        "drift 1 %/1 %: key moved after {} ms, {} violations",
        took.as_millis(),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:?}");
}

/// The same with 5 % drift each way, beyond the margin: the checker must catch two owners
/// (proof that the checker, and the simulated clocks, have teeth).
#[tokio::test(start_paused = true)]
async fn clock_drift_beyond_the_margin_is_caught_by_the_checker() {
    let (violations, took) = partitioned_owner_with_drift(0.95, 1.05, 109).await;
    println!(
        "drift 5 %/5 %: key moved after {} ms, {} violations",
        took.as_millis(),
        violations.len()
    );
    assert!(
        violations.iter().any(|v| v.kind == ViolationKind::TwoOwners),
        "drift beyond the margin went unnoticed: {violations:?}"
    );
}

/// Node 1 (clock at `owner_rate`) owns a stubborn singleton; nodes 2 and 3 (clocks at
/// `others_rate`) register it too; node 1 is partitioned off. Returns the violations and how
/// long the key took to move.
async fn partitioned_owner_with_drift(
    owner_rate: f64,
    others_rate: f64,
    seed: u64,
) -> (Vec<highlander_sim::Violation>, Duration) {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let sim = SimCluster::builder()
        .nodes(3)
        .seed(seed)
        .clock_rate(1, owner_rate)
        .clock_rate(2, others_rate)
        .clock_rate(3, others_rate)
        .setup(move |node| {
            let j = j.clone();
            async move {
                if node.id().0 == 1 {
                    node.singleton("k", j.stubborn()).await?;
                }
                Ok(())
            }
        })
        .build()
        .await
        .unwrap();
    owner_of(&sim, "k").await;
    // Node 1 must not lead: a new leader gives every session a full grace, which would hide
    // the drift. If it does, cut it off until another node leads, then let it back.
    for _ in 0..5 {
        if leader(&sim) != NodeId(1) {
            break;
        }
        sim.partition(&[1], &[2, 3]);
        sim.run_for(Duration::from_secs(3)).await;
        sim.heal();
        sim.wait_until(Duration::from_secs(10), |s| {
            s.owners("k")[0].is_some_and(|(n, _)| n.0 == 1)
                && s.try_node(1).is_some_and(|n| n.status().leader.is_some_and(|l| l.0 != 1))
        })
        .await;
    }
    assert_ne!(leader(&sim), NodeId(1), "node 1 still leads");
    assert_eq!(sim.owners("k")[0].map(|(n, _)| n), Some(NodeId(1)));
    for id in [2, 3] {
        sim.node(id).singleton("k", journal.stubborn()).await.unwrap();
    }
    sim.run_for(Duration::from_secs(1)).await;
    let cut = Instant::now();
    sim.partition(&[1], &[2, 3]);
    let moved = sim
        .wait_until(Duration::from_secs(10), |_| {
            journal.starts("k").iter().any(|(n, _, at)| n.0 != 1 && *at > cut)
        })
        .await
        .expect("the key moves");
    sim.run_for(Duration::from_secs(1)).await;
    (sim.violations(), moved)
}
