//! Timing presets and the validation that keeps them safe, and which peers vote.

use crate::error::ConfigError;
use highlander_core::NodeId;
use std::collections::BTreeSet;
use std::time::Duration;

/// The clocks of a node: Raft's heartbeat and election timeouts, and the session lease.
///
/// The safety of ownership (never two live owners of a slot) rests only on bounded clock-rate
/// drift, which `lease_margin` covers. The other relations checked by [`Timing::validate`] are
/// about liveness: a node must be able to renew its lease across a leader election, or every
/// leader crash would stop every task in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often the Raft leader sends heartbeats.
    pub heartbeat: Duration,
    /// The shortest Raft election timeout.
    pub election_min: Duration,
    /// The longest Raft election timeout (also Raft's leader lease).
    pub election_max: Duration,
    /// How long a node's session lives without a renewed keepalive.
    pub session_ttl: Duration,
    /// How often a node sends its keepalive (the lease is renewed from send time).
    pub keepalive_interval: Duration,
    /// Allowance for clock-rate drift: a node stops acting `lease_margin` before its TTL runs
    /// out, the leader waits `lease_margin` after it before expiring the session.
    pub lease_margin: Duration,
    /// How long one write (a send, a registration) may take, retries included, before the
    /// caller gets [`Error::Timeout`](crate::Error::Timeout).
    pub write_timeout: Duration,
}

impl Default for Timing {
    /// The standard preset: heartbeat 50 ms, election 150–300 ms, session TTL 2 s,
    /// keepalive every 500 ms, margin 50 ms (2.5% of the TTL: some 250 times the worst
    /// rate drift of a crystal oscillator, ~100 ppm).
    fn default() -> Self {
        Timing {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
            session_ttl: Duration::from_secs(2),
            keepalive_interval: Duration::from_millis(500),
            lease_margin: Duration::from_millis(50),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a timing configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsafe timing: {0}")]
pub struct TimingError(pub String);

impl Timing {
    /// The standard preset (see [`Timing::default`]).
    pub fn standard() -> Timing {
        Timing::default()
    }

    /// A preset for a LAN: heartbeat 20 ms, election 50–100 ms, session TTL 500 ms,
    /// keepalive every 100 ms, margin 25 ms. The same safety argument holds; elections and
    /// scheduling hiccups longer than about 200 ms make nodes stop their tasks until renewed.
    pub fn fast() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(20),
            election_min: Duration::from_millis(50),
            election_max: Duration::from_millis(100),
            session_ttl: Duration::from_millis(500),
            keepalive_interval: Duration::from_millis(100),
            lease_margin: Duration::from_millis(25),
            write_timeout: Duration::from_secs(2),
        }
    }

    /// A preset for links of up to 150 ms round trip (across regions): heartbeat 190 ms,
    /// election 570–1140 ms, session TTL 6.5 s, keepalive every 1.63 s, margin 163 ms. The
    /// same as [`Timing::for_rtt`]`(150 ms)`. Failover is bounded by the TTL, so slower than
    /// the standard preset: that is the price of a slow network, paid honestly.
    pub fn wan() -> Timing {
        Timing::for_rtt(Duration::from_millis(150))
    }

    /// Timing for a network whose round trips (plus a follower's log flush) take up to
    /// `rtt`: the standard preset when it fits, otherwise every value scaled from a heartbeat
    /// of 1.25 × `rtt` (openraft 0.9 gives every AppendEntries and every leadership
    /// confirmation one heartbeat to answer), with the TTL long enough to ride out an
    /// election and a margin of 2.5 % of it.
    pub fn for_rtt(rtt: Duration) -> Timing {
        let standard = Timing::standard();
        if rtt <= standard.supported_rtt() {
            return standard;
        }
        let ceil = |d: Duration, step: u64| {
            let ms = d.as_millis() as u64;
            Duration::from_millis(ms.div_ceil(step) * step)
        };
        let heartbeat = ceil(rtt * 5 / 4, 10);
        let election_min = heartbeat * 3;
        let election_max = heartbeat * 6;
        let bound = election_max * 2 + heartbeat * 2 + heartbeat / 2;
        let session_ttl = ceil(bound.mul_f64(2.2), 500);
        Timing {
            heartbeat,
            election_min,
            election_max,
            session_ttl,
            keepalive_interval: ceil(session_ttl / 4, 10),
            lease_margin: ceil(session_ttl / 40, 1),
            write_timeout: ceil(bound * 3, 1000).max(Duration::from_secs(5)),
        }
    }

    /// The longest round trip (with a follower's log flush) this timing is built for: four
    /// fifths of the heartbeat, because openraft 0.9 times out every AppendEntries and every
    /// heartbeat of a leadership confirmation after one heartbeat interval. Slower, nothing
    /// commits and every lease lapses; a node reports it in `status` and its log.
    pub fn supported_rtt(&self) -> Duration {
        self.heartbeat * 4 / 5
    }

    /// How long a node waits for the answer to one keepalive: the leader answers only after
    /// a confirmation round with a quorum, so it takes two round trips at least.
    pub(crate) fn keepalive_rpc_timeout(&self) -> Duration {
        (self.keepalive_interval / 2).max(self.heartbeat * 3)
    }

    /// The longest a leader change is expected to take without split votes: a follower waits
    /// out Raft's leader lease (`election_max`) and its own election timeout (at most
    /// `election_max`) and the ticker may add a heartbeat and a half; one more heartbeat
    /// covers the pre-vote and vote round trips and the new leader's first commit.
    pub fn election_bound(&self) -> Duration {
        self.election_max * 2 + self.heartbeat * 2 + self.heartbeat / 2
    }

    /// How long before its lease deadline a node asks its tasks to stop; at the deadline it
    /// aborts them. One keepalive interval: a task is asked to stop once the node has missed
    /// enough renewals that the deadline is within one more interval.
    pub fn stop_grace(&self) -> Duration {
        self.keepalive_interval
    }

    /// Checks the relations that keep ownership safe and the cluster live, and explains the
    /// first one that does not hold.
    pub fn validate(&self) -> Result<(), TimingError> {
        let ms = |d: Duration| d.as_millis();
        if self.heartbeat < Duration::from_millis(1) {
            return Err(TimingError("heartbeat must be at least 1 ms".into()));
        }
        if self.election_min < self.heartbeat * 2 {
            return Err(TimingError(format!(
                "election_min ({} ms) must be at least twice the heartbeat ({} ms), or followers \
                 start elections between two heartbeats of a healthy leader",
                ms(self.election_min),
                ms(self.heartbeat)
            )));
        }
        if self.election_max <= self.election_min {
            return Err(TimingError(format!(
                "election_max ({} ms) must exceed election_min ({} ms): the random spread \
                 between them is what breaks split votes",
                ms(self.election_max),
                ms(self.election_min)
            )));
        }
        if self.lease_margin * 100 < self.session_ttl || self.lease_margin.is_zero() {
            return Err(TimingError(format!(
                "lease_margin ({} ms) must be at least 1% of session_ttl ({} ms): it is the \
                 allowance for clock-rate drift between a node and the leader",
                ms(self.lease_margin),
                ms(self.session_ttl)
            )));
        }
        if self.keepalive_interval.is_zero() || self.keepalive_interval * 3 > self.session_ttl {
            return Err(TimingError(format!(
                "keepalive_interval ({} ms) must be non-zero and at most a third of \
                 session_ttl ({} ms), so that a lost keepalive does not end a lease",
                ms(self.keepalive_interval),
                ms(self.session_ttl)
            )));
        }
        let needed = self.election_bound() + self.keepalive_interval * 2 + self.lease_margin;
        if self.session_ttl < needed {
            return Err(TimingError(format!(
                "session_ttl ({} ms) is too short: a leader election may take {} ms \
                 (2 x election_max + 2.5 x heartbeat), and a node must still renew its lease \
                 after it, one keepalive interval ({} ms) later and one stop grace ({} ms) \
                 before its lease ends (margin {} ms). Use a session_ttl of at least {} ms, or \
                 shorten the Raft timeouts",
                ms(self.session_ttl),
                ms(self.election_bound()),
                ms(self.keepalive_interval),
                ms(self.stop_grace()),
                ms(self.lease_margin),
                ms(needed)
            )));
        }
        if self.keepalive_rpc_timeout() < self.supported_rtt() * 2 {
            return Err(TimingError(format!(
                "keepalive_interval ({} ms) is too short for the round trips this timing \
                 supports ({} ms): a keepalive is answered after a second round trip to a \
                 quorum, within half a keepalive interval",
                ms(self.keepalive_interval),
                ms(self.supported_rtt())
            )));
        }
        if self.write_timeout < self.election_bound() {
            return Err(TimingError(format!(
                "write_timeout ({} ms) must be at least the election bound ({} ms), or writes \
                 fail during every leader change",
                ms(self.write_timeout),
                ms(self.election_bound())
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        Timing::default().validate().unwrap();
        Timing::fast().validate().unwrap();
        Timing::wan().validate().unwrap();
    }

    #[test]
    fn timing_derived_from_a_round_trip_supports_it_and_is_valid() {
        assert_eq!(Timing::for_rtt(Duration::from_millis(10)), Timing::standard());
        assert_eq!(Timing::for_rtt(Duration::from_millis(40)), Timing::standard());
        for ms in [41, 60, 100, 150, 250, 400, 1000] {
            let rtt = Duration::from_millis(ms);
            let t = Timing::for_rtt(rtt);
            t.validate().unwrap_or_else(|e| panic!("for_rtt({ms} ms): {e}"));
            assert!(t.supported_rtt() >= rtt, "for_rtt({ms} ms) supports {:?}", t.supported_rtt());
            assert!(t.lease_margin * 100 >= t.session_ttl * 2, "margin below 2% at {ms} ms");
        }
        let wan = Timing::wan();
        assert!(wan.supported_rtt() >= Duration::from_millis(150));
        assert_eq!(wan.heartbeat, Duration::from_millis(190));
        assert_eq!(wan.session_ttl, Duration::from_millis(6500));
        // The standard preset does not support a 100 ms round trip (finding 5).
        assert!(Timing::standard().supported_rtt() < Duration::from_millis(100));
    }

    #[test]
    fn unsafe_values_are_refused_with_a_reason() {
        let t = Timing {
            session_ttl: Duration::from_millis(1500),
            keepalive_interval: Duration::from_millis(400),
            ..Timing::default()
        };
        let e = t.validate().unwrap_err().to_string();
        assert!(e.contains("session_ttl (1500 ms) is too short"), "{e}");
        assert!(e.contains("at least"), "{e}");

        let t = Timing { lease_margin: Duration::ZERO, ..Timing::default() };
        assert!(t.validate().unwrap_err().to_string().contains("clock-rate drift"));

        let t = Timing { election_max: Duration::from_millis(150), ..Timing::default() };
        assert!(t.validate().unwrap_err().to_string().contains("split votes"));

        let t = Timing { keepalive_interval: Duration::from_millis(900), ..Timing::default() };
        assert!(t.validate().unwrap_err().to_string().contains("third"));

        let t = Timing { election_min: Duration::from_millis(60), ..Timing::default() };
        assert!(t.validate().unwrap_err().to_string().contains("twice the heartbeat"));
    }
}

/// The most voters a cluster gets by default: the first five peers (by id) vote, the others
/// are learners.
pub const DEFAULT_MAX_VOTERS: usize = 5;

/// The peers that vote when the cluster forms: the first `voters` ids of `peers` (all of
/// them up to [`DEFAULT_MAX_VOTERS`] when `voters` is `None`).
pub(crate) fn initial_voters(
    peers: &BTreeSet<NodeId>,
    voters: Option<usize>,
) -> Result<BTreeSet<NodeId>, ConfigError> {
    let n = voters.unwrap_or(peers.len().min(DEFAULT_MAX_VOTERS));
    if n == 0 || n > peers.len() {
        return Err(ConfigError::Voters { voters: n, peers: peers.len() });
    }
    Ok(peers.iter().copied().take(n).collect())
}

/// What a voter set of `n` costs, if it is not the usual 3 or 5 (or more, odd): one
/// sentence for `check-config` and `status`, `None` for an odd number of 3 or more.
pub fn voters_warning(n: usize) -> Option<String> {
    match n {
        0 => Some("no voters: nothing can be committed".into()),
        1 => Some(
            "1 voter: the cluster stops writing (no failover, no sends) while that node is down; \
             use 3 voters to tolerate 1 failure"
                .into(),
        ),
        2 => Some(
            "2 voters: a quorum is both, so the cluster stops writing while either is down; \
             use 3 voters to tolerate 1 failure"
                .into(),
        ),
        n if n % 2 == 0 => Some(format!(
            "{n} voters: tolerate {} failure(s), no more than {} voters would, with a larger \
             quorum ({}); use {} or {}",
            (n - 1) / 2,
            n - 1,
            n / 2 + 1,
            n - 1,
            n + 1
        )),
        _ => None,
    }
}

#[cfg(test)]
mod voter_tests {
    use super::*;

    #[test]
    fn the_first_ids_vote_and_the_default_is_five() {
        let peers: BTreeSet<NodeId> = (1..=9).map(NodeId).collect();
        let ids = |v: BTreeSet<NodeId>| v.into_iter().map(|n| n.0).collect::<Vec<_>>();
        assert_eq!(ids(initial_voters(&peers, None).unwrap()), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(initial_voters(&peers, Some(3)).unwrap()), vec![1, 2, 3]);
        let three: BTreeSet<NodeId> = (1..=3).map(NodeId).collect();
        assert_eq!(ids(initial_voters(&three, None).unwrap()), vec![1, 2, 3]);
        assert!(initial_voters(&three, Some(0)).is_err());
        assert!(initial_voters(&three, Some(4)).is_err());
    }

    #[test]
    fn even_and_tiny_voter_sets_say_what_they_cost() {
        assert_eq!(voters_warning(3), None);
        assert_eq!(voters_warning(5), None);
        assert_eq!(voters_warning(7), None);
        assert!(voters_warning(1).unwrap().contains("1 voter"));
        assert!(voters_warning(2).unwrap().contains("either"));
        let four = voters_warning(4).unwrap();
        assert!(four.contains("tolerate 1 failure") && four.contains("quorum (3)"), "{four}");
    }
}
