//! Messages sent from every node before, during and after a failover are all delivered, in
//! order, none lost (the invariant checker verifies order and gaps at every delivery).

mod common;

/// Sends ten messages from every running node, in turn; returns each payload with its result.
async fn send_round(
    round: &str,
    sim: &SimCluster,
) -> Vec<(String, Result<highlander::Seq, Error>)> {
    let mut out = Vec::new();
    for i in 0..10 {
        for n in sim.running() {
            let payload = format!("{round}-{n}-{i}");
            out.push((payload.clone(), sim.send(n, "chan", payload).await));
        }
    }
    out
}

use common::{Journal, init_tracing};
use highlander::Error;
use highlander_sim::SimCluster;
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test(start_paused = true)]
async fn messages_from_every_node_survive_a_failover() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(21)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("chan", j.consumer()).await }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("chan")[0].is_some()).await.unwrap();
    let (owner, _) = sim.owners("chan")[0].unwrap();

    let mut acknowledged = Vec::new();
    let mut unknown = 0;
    for (p, r) in send_round("before", &sim).await {
        acknowledged.push((p, r.expect("sends succeed before the failover")));
    }

    sim.kill(owner).await;
    // While the owner's session has not expired yet, sends still commit and queue.
    for (p, r) in send_round("during", &sim).await {
        match r {
            Ok(seq) => acknowledged.push((p, seq)),
            Err(Error::Timeout) => unknown += 1,
            Err(e) => panic!("unexpected error during the failover: {e}"),
        }
    }
    sim.wait_until(Duration::from_secs(10), |s| {
        s.owners("chan")[0].is_some_and(|(n, _)| n != owner)
    })
    .await
    .expect("failover");
    for (p, r) in send_round("after", &sim).await {
        acknowledged.push((p, r.expect("sends succeed after the failover")));
    }

    // Everything acknowledged reaches the new owner.
    let want: BTreeSet<String> = acknowledged.iter().map(|(p, _)| p.clone()).collect();
    sim.wait_until(Duration::from_secs(10), |_| {
        let got: BTreeSet<String> =
            journal.payloads("chan").into_iter().map(|p| String::from_utf8(p).unwrap()).collect();
        want.is_subset(&got)
    })
    .await
    .expect("every acknowledged message is delivered");

    // Sequence numbers follow send order from each sender, and the checker saw no gap,
    // reordering or second owner.
    let seqs: Vec<u64> = acknowledged.iter().map(|(_, s)| s.0).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequential sends get increasing seqs");
    sim.checker().check_all_delivered().expect("all sent delivered");
    sim.assert_invariants();
    println!(
        "messages: {} acknowledged, {unknown} with unknown outcome, all delivered in order",
        acknowledged.len()
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_taken_but_not_acknowledged_is_redelivered_to_the_next_owner() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(22)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("chan", j.consumer()).await }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("chan")[0].is_some()).await.unwrap();
    let (owner, _) = sim.owners("chan")[0].unwrap();
    let other = sim.running().into_iter().find(|n| *n != owner).unwrap();
    sim.send(other, "chan", "only").await.unwrap();
    sim.wait_until(Duration::from_secs(2), |_| journal.payloads("chan").len() == 1).await.unwrap();
    // The consumer took "only" but never asked for the next one: it is not acknowledged.
    sim.kill(owner).await;
    sim.wait_until(Duration::from_secs(10), |_| journal.payloads("chan").len() == 2)
        .await
        .expect("redelivered after failover");
    assert_eq!(journal.payloads("chan"), vec![b"only".to_vec(), b"only".to_vec()]);
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn acknowledged_messages_are_not_redelivered_and_leave_the_queue() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(23)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("chan", j.consumer()).await }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("chan")[0].is_some()).await.unwrap();
    let (owner, _) = sim.owners("chan")[0].unwrap();
    for i in 0..20 {
        sim.send(owner, "chan", format!("m{i}")).await.unwrap();
    }
    sim.wait_until(Duration::from_secs(2), |_| journal.payloads("chan").len() == 20).await.unwrap();
    sim.run_for(Duration::from_millis(200)).await;
    // The consumer is back in recv() after m19, which acknowledged m19 and all before it.
    let depth = |s: &SimCluster| {
        s.status().unwrap().keys.iter().find(|k| k.key.as_str() == "chan").unwrap().queued
    };
    assert_eq!(depth(&sim), 0, "everything handled is acknowledged and gone from the queue");
    sim.kill(owner).await;
    sim.wait_until(Duration::from_secs(10), |s| {
        s.owners("chan")[0].is_some_and(|(n, _)| n != owner)
    })
    .await
    .unwrap();
    sim.run_for(Duration::from_secs(1)).await;
    assert_eq!(journal.starts("chan").len(), 2, "the new owner runs");
    assert_eq!(journal.payloads("chan").len(), 20, "nothing acknowledged is delivered again");
    sim.assert_invariants();
}
