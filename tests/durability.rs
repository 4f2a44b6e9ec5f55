//! The whole cluster loses power and comes back: every node is killed (its simulated disk
//! loses or tears whatever was not synced) and restarted from its disk.

mod common;

use common::{Journal, init_tracing};
use highlander::wal::Fs;
use highlander_sim::SimCluster;
use std::collections::BTreeSet;
use std::path::Path;
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

#[tokio::test(start_paused = true)]
async fn a_node_behind_the_compacted_log_catches_up_from_a_snapshot_sent_in_chunks() {
    init_tracing();
    let journal = Journal::default();
    let j = journal.clone();
    let mut sim = SimCluster::builder()
        .nodes(3)
        .seed(53)
        .setup(move |node| {
            let j = j.clone();
            async move { node.singleton("backlog", j.stubborn()).await }
        })
        .build()
        .await
        .unwrap();
    sim.wait_until(Duration::from_secs(5), |s| s.owners("backlog")[0].is_some()).await.unwrap();
    sim.kill(3).await;

    // Nobody consumes: 2,200 messages of 1 KiB stay queued (over 2 MiB of state), and the
    // entries that carried them are compacted behind a snapshot while node 3 is away.
    let body = vec![b'x'; 1024];
    for i in 0..2200u32 {
        let mut m = i.to_le_bytes().to_vec();
        m.extend_from_slice(&body);
        sim.send(1 + u64::from(i % 2), "backlog", m).await.unwrap();
    }
    let leader = sim.status().unwrap();
    let queued = |r: &highlander::StatusReport| {
        r.keys.iter().find(|k| k.key.as_str() == "backlog").map(|k| (k.queued, k.queued_bytes))
    };
    let want = queued(&leader).unwrap();
    assert_eq!(want.0, 2200);

    // Node 3 restarts behind the leader's purge point: only a snapshot can catch it up. It
    // loses power 0, 1, 2, ... ms after the snapshot starts streaming in (its temporary file
    // lost or torn) until a cut comes after the install; each time its data directory is
    // healthy: no purge point without the snapshot that covers it.
    let receiving = |sim: &SimCluster| {
        let names = sim.disk(3).unwrap().read_dir(Path::new("/n3/snapshots")).unwrap_or_default();
        names.iter().any(|n| n.to_string_lossy().ends_with(".tmp"))
    };
    for after_ms in 0.. {
        sim.restart_in_background(3).await.unwrap();
        let mut waited = 0;
        while !receiving(&sim) && waited < 20_000 {
            sim.run_for(Duration::from_millis(1)).await;
            waited += 1;
        }
        assert!(receiving(&sim), "node 3 starts receiving a snapshot");
        sim.run_for(Duration::from_millis(after_ms)).await;
        sim.kill(3).await;
        let inspection = highlander::wal::inspect(Arc::new(sim.disk(3).unwrap()), "/n3").unwrap();
        assert!(inspection.problems.is_empty(), "cut {after_ms} ms in: {:?}", inspection.problems);
        if !inspection.snapshots.is_empty() {
            break;
        }
    }
    sim.restart(3).await.unwrap();
    sim.wait_until(Duration::from_secs(20), |s| {
        let r = s.node(3).status();
        r.applied_index >= leader.applied_index && queued(&r) == Some(want)
    })
    .await
    .unwrap();
    let received = {
        sim.kill(3).await;
        let disk = sim.disk(3).unwrap();
        let inspection = highlander::wal::inspect(Arc::new(disk), "/n3").unwrap();
        assert!(inspection.is_healthy(), "{:?}", inspection.problems);
        let (info, _) = inspection.snapshots.last().cloned().expect("node 3 keeps a snapshot");
        info
    };
    assert!(
        received.data_len > 1 << 20,
        "the snapshot ({} bytes) took more than one 1 MiB chunk",
        received.data_len
    );

    // Restarted again, node 3 loads the snapshot it received from its own disk.
    sim.restart(3).await.unwrap();
    let loaded = sim
        .wait_until(Duration::from_secs(10), |s| queued(&s.node(3).status()) == Some(want))
        .await;
    let r = sim.node(3).status();
    assert!(
        loaded.is_some(),
        "node 3 after restart: applied {}, {:?}",
        r.applied_index,
        queued(&r)
    );
    sim.assert_invariants();
}
