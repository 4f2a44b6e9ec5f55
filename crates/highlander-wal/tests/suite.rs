//! openraft's storage suite against the WAL log store on a temporary directory, with a
//! minimal in-memory state machine whose snapshots go through the snapshot store.

#![allow(clippy::result_large_err)]

mod common;

use common::sm::{SE, Sm, Tc, err};
use highlander_wal::{IoMode, LogStore, Options, RealFs};
use openraft::testing::{StoreBuilder, Suite};
use std::sync::Arc;

struct Builder(IoMode);

impl StoreBuilder<Tc, LogStore<Tc>, Sm, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore<Tc>, Sm), SE> {
        let dir = tempfile::tempdir().map_err(err)?;
        // The suite purges without snapshots; the runtime keeps the default (refuse).
        let opts = Options { purge_requires_snapshot: false, ..Options::default() };
        let opened = highlander_wal::open(RealFs::shared(), dir.path(), opts).map_err(err)?;
        let log = LogStore::new(opened.wal, self.0).map_err(err)?;
        let sm = Sm { state: Arc::default(), snapshots: opened.snapshots };
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_suite_io_thread() {
    Suite::test_all(Builder(IoMode::Thread)).unwrap();
}

#[test]
fn openraft_suite_inline() {
    Suite::test_all(Builder(IoMode::Inline)).unwrap();
}
