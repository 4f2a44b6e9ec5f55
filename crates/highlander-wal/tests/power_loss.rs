//! Power loss over many seeds: a random workload on the simulated disk, with the machine
//! dying in the middle of operations, syncs failing and crashes that keep a random part of
//! what was not synced. After every failure the log is reopened: every acknowledged entry,
//! vote and purge point must be there, and nothing that was not acknowledged may appear
//! except the operation that was in flight.
//!
//! `HIGHLANDER_WAL_SEEDS` sets the number of seeds (default 1000).

mod common;

use common::Harness;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn power_loss_over_many_seeds() {
    let seeds: u64 =
        std::env::var("HIGHLANDER_WAL_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let (mut crashes, mut failures) = (0, 0);
    let first: u64 =
        std::env::var("HIGHLANDER_WAL_SEED_FROM").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    for seed in first..first + seeds {
        let mut rng = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let segment = [1024, 2048, 8192][(seed % 3) as usize];
        let mut h = Harness::new(seed, segment, 1 + seed % 4);
        for _ in 0..60 {
            let r = splitmix(&mut rng);
            // Mostly appends; a fault in about one step of four.
            let kind = match r % 16 {
                0..=6 => (r >> 8) as u8 % 4,
                7..=11 => 4 + (r >> 8) as u8 % 6,
                12..=14 => 10,
                _ => 12,
            };
            let (x, y) = (splitmix(&mut rng), splitmix(&mut rng));
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                h.abstract_step(kind, x, y)
            }));
            if let Err(p) = outcome {
                eprintln!("power-loss failure at seed {seed} (set HIGHLANDER_WAL_SEEDS to rerun)");
                std::panic::resume_unwind(p);
            }
        }
        crashes += h.crashes;
        failures += h.inflight_failures;
    }
    eprintln!("{seeds} seeds, {crashes} crashes, {failures} operations cut short by a fault");
    assert!(failures > seeds / 2, "the faults did not bite: {failures} failed operations");
}
