//! A tiny openraft type configuration and an in-memory state machine whose snapshots go
//! through the [`SnapshotStore`] (tmp file, fsync, rename, fsync dir) before `build_snapshot`
//! or `install_snapshot` return, as the runtime's must.

#![allow(clippy::result_large_err, dead_code)]

use highlander_wal::{SnapshotStore, entry_id};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EmptyNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use std::sync::{Arc, Mutex};

openraft::declare_raft_types!(
    /// A tiny configuration: entries carry a number, the state machine sums them.
    pub Tc:
        D = u64,
        R = u64,
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<Tc>,
        SnapshotData = Vec<u8>,
);

pub type SE = StorageError<u64>;

#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub last_applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, EmptyNode>,
    pub sum: u64,
}

/// The state machine: state in memory, snapshots in the snapshot store.
pub struct Sm {
    pub state: Arc<Mutex<State>>,
    pub snapshots: SnapshotStore,
}

pub fn err(e: impl std::fmt::Display) -> SE {
    StorageError::IO { source: StorageIOError::write_state_machine(AnyError::error(e)) }
}

pub fn load_current(snapshots: &SnapshotStore) -> Result<Option<Snapshot<Tc>>, SE> {
    let Some(info) = snapshots.latest() else { return Ok(None) };
    let loaded = snapshots.load(&info).map_err(err)?;
    let meta: SnapshotMeta<u64, EmptyNode> =
        highlander_wal::decode_entry(&loaded.meta).map_err(err)?;
    Ok(Some(Snapshot { meta, snapshot: Box::new(loaded.data) }))
}

impl RaftSnapshotBuilder<Tc> for Sm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<Tc>, SE> {
        let state = self.state.lock().unwrap().clone();
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{:?}", state.last_applied),
        };
        let data = highlander_wal::encode_entry(&state).map_err(err)?;
        let meta_bytes = highlander_wal::encode_entry(&meta).map_err(err)?;
        // Durable before openraft may purge the log up to it.
        self.snapshots
            .save(state.last_applied.as_ref().map(entry_id), &meta_bytes, &data)
            .map_err(err)?;
        Ok(Snapshot { meta, snapshot: Box::new(data) })
    }
}

impl RaftStateMachine<Tc> for Sm {
    type SnapshotBuilder = Sm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, EmptyNode>), SE> {
        let s = self.state.lock().unwrap();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<u64>, SE>
    where
        I: IntoIterator<Item = Entry<Tc>> + Send,
        I::IntoIter: Send,
    {
        let mut s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for e in entries {
            s.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(n) => s.sum += n,
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(e.log_id), m);
                }
            }
            out.push(s.sum);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Sm {
        Sm { state: self.state.clone(), snapshots: self.snapshots.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, SE> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, EmptyNode>,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), SE> {
        // Check, write durably, then swap.
        let state: State = highlander_wal::decode_entry(&snapshot).map_err(err)?;
        let meta_bytes = highlander_wal::encode_entry(meta).map_err(err)?;
        let mut w = self
            .snapshots
            .begin(meta.last_log_id.as_ref().map(entry_id), &meta_bytes)
            .map_err(err)?;
        std::io::Write::write_all(&mut w, &snapshot).map_err(err)?;
        w.finish().map_err(err)?;
        *self.state.lock().unwrap() = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<Tc>>, SE> {
        load_current(&self.snapshots)
    }
}
