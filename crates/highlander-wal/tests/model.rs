//! Model tests: random appends, truncations, purges, votes, commits, clean reopens, crashes
//! (between operations and in the middle of one) and failing syncs, on the simulated disk,
//! each step checked against an in-memory model.

mod common;

use common::Harness;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model(
        seed in any::<u64>(),
        segment in prop_oneof![Just(1024u64), Just(4096), Just(64 << 10)],
        sync_every in 1u64..5,
        ops in prop::collection::vec((0u8..13, any::<u64>(), any::<u64>()), 1..80),
    ) {
        let mut h = Harness::new(seed, segment, sync_every);
        for (kind, x, y) in ops {
            h.abstract_step(kind, x, y);
        }
    }
}
