//! Test your highlander failover without a network.
//!
//! `highlander-sim` runs a whole highlander cluster inside one test process: real nodes with
//! their real Raft, sessions and task supervisors, talking over a simulated network
//! ([`SimNetwork`]) on tokio's paused clock. Time costs nothing, faults are seeded and
//! reproducible, and an [`InvariantChecker`] watches every task start, stop and delivery for
//! two owners at once, fencing tokens that go backwards, and lost or reordered messages.
//!
//! It never opens a socket or a file, and never reads the system clock: node wall clocks are
//! simulated too. Run it on a current-thread runtime with the clock paused:
//!
//! ```no_run
//! use highlander_sim::SimCluster;
//! use std::time::Duration;
//!
//! #[tokio::test(start_paused = true)]
//! async fn failover() {
//!     let mut sim = SimCluster::builder()
//!         .nodes(3)
//!         .seed(7)
//!         .setup(|node| async move {
//!             node.singleton("report", |ctx| async move { ctx.cancelled().await }).await
//!         })
//!         .build()
//!         .await
//!         .unwrap();
//!     let (owner, _token) = sim.owners("report")[0].unwrap();
//!     sim.kill(owner).await;
//!     sim.wait_until(Duration::from_secs(5), |s| s.owners("report")[0].is_some_and(|(n, _)| n != owner))
//!         .await
//!         .expect("failed over");
//!     sim.assert_invariants();
//! }
//! ```
//!
//! Users add it as a dev-dependency.

#![warn(missing_docs)]

mod checker;
mod cluster;
mod network;

pub use checker::{Event, InvariantChecker, JobRun, TickRun, Violation, ViolationKind};
pub use cluster::{DEFAULT_EPOCH_MS, Setup, SimCluster, SimClusterBuilder, lossy};
pub use network::{LinkFaults, NetStats, SimNetwork, SimTransport};
