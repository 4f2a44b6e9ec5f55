//! The whole cluster loses power and comes back: every node is killed (its simulated disk
//! loses or tears whatever was not synced) and restarted from its disk.

mod common;

use common::{Journal, init_tracing};
use highlander_sim::SimCluster;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(start_paused = true)]
async fn a_cluster_that_loses_power_keeps_its_singletons_tokens_and_messages() {
    init_tracing();
    let journal = Journal::default();
    let consuming = Arc::new(AtomicBool::new(false));
    let (j, c) = (journal.clone(), consuming.clone());
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(51)
        .setup(move |node| {
            let (j, c) = (j.clone(), c.clone());
            async move {
                node.singleton("ledger", j.consumer()).await?;
                // A second key whose handler takes nothing while `consuming` is off, so its
                // messages must survive in the queue.
                node.singleton("backlog", move |mut ctx| {
                    let c = c.clone();
                    async move {
                        while !c.load(Ordering::SeqCst) {
                            tokio::select! {
                                _ = ctx.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            }
                        }
                        while ctx.recv().await.is_some() {}
                    }
                })
                .await
            }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| {
        s.owners("ledger")[0].is_some() && s.owners("backlog")[0].is_some()
    })
    .await
    .unwrap();
    let mut sent = Vec::new();
    for i in 0..20 {
        for n in sim.running() {
            let text = format!("m{i} from {n}");
            sim.send(n, "ledger", text.clone()).await.unwrap();
            sim.send(n, "backlog", text.clone()).await.unwrap();
            sent.push(text);
        }
    }
    sim.wait_until(Duration::from_secs(5), |_| journal.payloads("ledger").len() >= sent.len())
        .await
        .unwrap();
    let token_before = |s: &SimCluster, k: &str| s.owners(k)[0].unwrap().1;
    let (ledger_token, backlog_token) =
        (token_before(&sim, "ledger"), token_before(&sim, "backlog"));
    let backlog_depth =
        sim.status().unwrap().keys.iter().find(|k| k.key.as_str() == "backlog").unwrap().queued;
    assert_eq!(backlog_depth, sent.len() as u64);

    // Power cut everywhere.
    for id in sim.ids() {
        sim.kill(id).await;
    }
    sim.run_for(Duration::from_secs(1)).await;
    for id in sim.ids() {
        sim.restart_in_background(id).await.unwrap();
    }
    let took = sim
        .wait_until(Duration::from_secs(30), |s| {
            let running = s.checker().running();
            ["ledger", "backlog"].iter().all(|k| {
                let key = highlander::Key::new(*k).unwrap();
                running.get(&(key, 0)).is_some_and(|(n, _)| s.running().contains(n))
            })
        })
        .await
        .expect("both singletons run again");
    assert!(token_before(&sim, "ledger") > ledger_token, "a larger token after the restart");
    assert!(token_before(&sim, "backlog") > backlog_token, "a larger token after the restart");
    let depth =
        sim.status().unwrap().keys.iter().find(|k| k.key.as_str() == "backlog").unwrap().queued;
    assert_eq!(depth, sent.len() as u64, "every acknowledged message is still queued");

    consuming.store(true, Ordering::SeqCst);
    sim.wait_until(Duration::from_secs(10), |s| s.checker().check_all_delivered().is_ok())
        .await
        .expect("every acknowledged message is delivered");
    let ledger: BTreeSet<Vec<u8>> = journal.payloads("ledger").into_iter().collect();
    assert!(sent.iter().all(|m| ledger.contains(m.as_bytes())));
    println!(
        "power cut: singletons ran again {} ms after the restart; {} messages kept",
        took.as_millis(),
        sent.len()
    );
    sim.assert_invariants();
}

#[tokio::test(start_paused = true)]
async fn snapshots_compact_the_log_and_a_restart_starts_from_them() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(52)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("stream", j.consumer()).await }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("stream")[0].is_some()).await.unwrap();
    // One entry per send (sequential), several snapshots' worth.
    for i in 0..2500 {
        sim.send(1 + i % 3, "stream", format!("m{i}")).await.unwrap();
    }
    sim.wait_until(Duration::from_secs(10), |s| s.checker().check_all_delivered().is_ok())
        .await
        .unwrap();
    sim.run_for(Duration::from_secs(1)).await;
    let applied = sim.status().unwrap().applied_index;

    sim.kill(2).await;
    let disk = sim.disk(2).unwrap();
    let inspection = highlander::wal::inspect(Arc::new(disk), "/n2").unwrap();
    let state = inspection.reader.log_state();
    let purged = state.last_purged.map(|p| p.index).unwrap_or(0);
    let kept = state.last.map(|l| l.index).unwrap_or(0) - purged;
    println!(
        "applied {applied}, purged up to {purged}, {kept} entries kept, {} snapshots",
        inspection.snapshots.len()
    );
    assert!(purged > 2000, "the log was compacted behind a snapshot");
    assert!(kept < 3000, "the log stays bounded: {kept} entries");
    assert!(
        !inspection.snapshots.is_empty() && inspection.snapshots.len() <= 2,
        "the two newest snapshots are kept"
    );

    // Restarted from its snapshot and the rest of its log, the node serves again.
    sim.restart(2).await.unwrap();
    sim.send(2, "stream", "after").await.unwrap();
    sim.wait_until(Duration::from_secs(10), |s| s.checker().check_all_delivered().is_ok())
        .await
        .unwrap();
    sim.assert_invariants();
}
