//! A real single-node openraft `Raft` over the WAL, restarted several times: the vote, the
//! log, snapshots and purges survive, and the state machine comes back from the newest
//! snapshot plus the log. This is the wiring the runtime needs, in miniature.

#![allow(clippy::result_large_err)]

mod common;

use common::sm::{Sm, State, Tc};
use highlander_wal::{IoMode, LogStore, Options, RealFs, WalOptions};
use openraft::error::{InitializeError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{Config, EmptyNode, Raft, ServerState, SnapshotPolicy};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A network for a cluster of one: nobody to talk to.
struct NoNet;

impl RaftNetworkFactory<Tc> for NoNet {
    type Network = NoNet;
    async fn new_client(&mut self, _target: u64, _node: &EmptyNode) -> NoNet {
        NoNet
    }
}

fn unreachable() -> Unreachable {
    Unreachable::new(&std::io::Error::other("single-node test"))
}

impl RaftNetwork<Tc> for NoNet {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<Tc>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, EmptyNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, EmptyNode, RaftError<u64>>> {
        Err(RPCError::Unreachable(unreachable()))
    }

    async fn full_snapshot(
        &mut self,
        _vote: openraft::Vote<u64>,
        _snapshot: openraft::Snapshot<Tc>,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed>
        + openraft::OptionalSend
        + 'static,
        _option: RPCOption,
    ) -> Result<
        SnapshotResponse<u64>,
        openraft::error::StreamingError<Tc, openraft::error::Fatal<u64>>,
    > {
        Err(openraft::error::StreamingError::Unreachable(unreachable()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_raft_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(
        Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
            max_in_snapshot_log_to_keep: 5,
            purge_batch_size: 1,
            ..Config::default()
        }
        .validate()
        .unwrap(),
    );
    let opts = Options {
        wal: WalOptions { segment_size: 16 << 10, committed_sync_every: 16 },
        ..Options::default()
    };
    let mut expected = 0u64;
    let mut next = 1u64;
    for round in 0..4 {
        // Start-up: open the directory, rebuild the state machine from the newest snapshot,
        // hand the log to openraft (which re-applies what it knows to be committed).
        let opened = highlander_wal::open(RealFs::shared(), dir.path(), opts.clone()).unwrap();
        let state: State = match &opened.snapshot {
            Some(s) => highlander_wal::decode_entry(&s.data).unwrap(),
            None => State::default(),
        };
        if round > 0 {
            assert!(opened.snapshot.is_some(), "round {round}: no snapshot was kept");
        }
        let released = opened.lock.clone();
        let sm = Sm { state: Arc::new(Mutex::new(state)), snapshots: opened.snapshots };
        let applied = sm.state.clone();
        let log = LogStore::<Tc>::new(opened.wal, IoMode::Thread).unwrap();
        let raft = Raft::new(1, config.clone(), NoNet, log, sm).await.unwrap();
        match raft.initialize(BTreeSet::from([1u64])).await {
            Ok(()) => assert_eq!(round, 0, "initialized twice"),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => assert!(round > 0),
            Err(e) => panic!("initialize: {e}"),
        }
        raft.wait(Some(Duration::from_secs(10)))
            .state(ServerState::Leader, "leader")
            .await
            .unwrap();
        for _ in 0..30 {
            let resp = raft.client_write(next).await.unwrap();
            expected += next;
            next += 1;
            assert_eq!(resp.data, expected, "round {round}: running sum");
        }
        let m = raft.metrics().borrow().clone();
        assert!(m.snapshot.is_some(), "round {round}: no snapshot built");
        assert!(m.purged.is_some(), "round {round}: nothing purged");
        raft.shutdown().await.unwrap();
        assert_eq!(applied.lock().unwrap().sum, expected);
        drop(raft);
        // openraft drops the state machine in a task of its own after shutdown returns.
        for _ in 0..5000 {
            if released.released() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(released.released(), "round {round}: the data directory is still held");
    }
}
