//! What nodes say to each other. Every frame on every transport is one [`Request`] or one
//! [`Response`], encoded by [`codec`](crate::codec).

use crate::command::{Command, JobAction, JobSpec, JobState, KeySpec, Outcome, QueueCaps};
use crate::schedule::ScheduleSpec;
use crate::state::{FireRecord, Job, JobError, PendingTick, ScheduleCounts};
use crate::{JobId, Key, NodeId, Payload, SessionId, Token};
use serde::{Deserialize, Serialize};

/// The protocol version, carried in the transport handshake (ALPN for QUIC).
pub const PROTOCOL_VERSION: u32 = 6;

/// A request from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A Raft message for the Raft member `to`, encoded by the Raft glue; core does not look
    /// inside. A node whose storage is another member refuses it with
    /// [`Response::WrongMember`]: a message for its lost storage must not reach the new one.
    Raft {
        /// The Raft member the message is for.
        to: u64,
        /// The message.
        message: RaftMessage,
    },
    /// Commands forwarded to the leader, to be written as one entry.
    Write(Vec<Command>),
    /// A session keepalive, answered by the leader once it has confirmed its leadership.
    KeepAlive {
        /// The session to renew.
        session: SessionId,
        /// How long the sender's lease has been lapsed, in milliseconds (0 while valid).
        lapsed_ms: u64,
        /// The sender's wall clock when it sent this, ms since the Unix epoch: the leader
        /// learns from it how the nodes' clocks differ, for the cluster's time of day.
        wall_ms: u64,
    },
    /// A report of what the receiving node knows, with the keys `query` selects (the
    /// summary covers every key).
    Status(KeyQuery),
    /// Are you there? Answered with [`Response::Pong`]; a node that hears no peer probes
    /// with it whether its own messages get answers.
    Ping,
    /// What is your storage's place in the cluster? Asked by a node starting on empty storage
    /// before it decides whether it forms a new cluster or joins the existing one.
    Hello,
    /// A membership request, served by the leader (other nodes answer with its id).
    Membership(MembershipRequest),
    /// An operator's change to a schedule, served by any node with a session.
    Schedule {
        /// The schedule's key.
        key: Key,
        /// What to do.
        op: ScheduleOp,
    },
    /// An operator's look at, or change to, the job table, served by any node with a
    /// session.
    Jobs(JobsRequest),
}

/// What an operator asks of the job table ([`Request::Jobs`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobsRequest {
    /// Jobs of a queue (or of all), in a state (or in any), newest first, at most `limit`.
    List {
        /// The queue, or every queue.
        queue: Option<Key>,
        /// The state, or any.
        state: Option<JobState>,
        /// The most jobs listed.
        limit: u32,
    },
    /// One job, whole.
    Show {
        /// The job.
        job: JobId,
    },
    /// Cancel, retry or discard one job.
    Control {
        /// The job.
        job: JobId,
        /// What to do.
        action: JobAction,
    },
    /// Drop the finished jobs in `state` (of one queue, or of all).
    Purge {
        /// The queue, or every queue.
        queue: Option<Key>,
        /// Completed, dead or cancelled.
        state: JobState,
    },
    /// Enqueue a job through the receiving node (as `Node::enqueue_with` there).
    Enqueue {
        /// The queue.
        queue: Key,
        /// The job's input.
        payload: Payload,
        /// Its options.
        spec: Box<JobSpec>,
        /// Not before this long from now on the cluster's clock (instead of a run-at).
        delay_ms: Option<u64>,
    },
}

/// The answer to a [`Request::Jobs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobsReply {
    /// The jobs listed or shown.
    Jobs(Vec<JobReport>),
    /// What a change did.
    Done(Outcome),
}

/// One job, as a node has applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// Its id.
    pub id: JobId,
    /// Its queue.
    pub queue: Key,
    /// Where it stands (a scheduled or retryable job whose time has come is available).
    pub state: JobState,
    /// Its priority (0 runs first).
    pub priority: u8,
    /// Attempts started.
    pub attempt: u32,
    /// Attempts it may have.
    pub max_attempts: u32,
    /// When it may run next, ms since the Unix epoch.
    pub run_at_ms: u64,
    /// When it was enqueued.
    pub enqueued_ms: u64,
    /// When it finished.
    pub finished_ms: Option<u64>,
    /// Its unique key.
    pub unique: Option<String>,
    /// Its partition key.
    pub partition: Option<String>,
    /// Its input.
    pub payload: Payload,
    /// While running: the node that runs it.
    pub node: Option<NodeId>,
    /// While running: the claim token.
    pub token: Option<Token>,
    /// While running: when its handler is cancelled.
    pub deadline_ms: Option<u64>,
    /// While running: an operator cancelled it.
    pub cancel_requested: bool,
    /// The newest attempt errors.
    pub errors: Vec<JobError>,
    /// What its handler returned.
    pub result: Option<Payload>,
}

/// A job queue's depths, as a node has applied them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    /// The queue.
    pub queue: Key,
    /// Its caps.
    pub caps: QueueCaps,
    /// Jobs waiting for their `run_at`.
    pub scheduled: u64,
    /// Jobs that can be claimed now.
    pub available: u64,
    /// Jobs running.
    pub running: u64,
    /// Jobs waiting for a retry.
    pub retryable: u64,
    /// Completed jobs kept.
    pub completed: u64,
    /// Dead jobs kept.
    pub dead: u64,
    /// Cancelled jobs kept.
    pub cancelled: u64,
    /// Running jobs per node.
    pub running_by_node: Vec<(NodeId, u64)>,
    /// How long the oldest available job has been due, in milliseconds.
    pub oldest_available_ms: Option<u64>,
}

/// What an operator asks of a schedule ([`Request::Schedule`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScheduleOp {
    /// No tick fires until it is resumed.
    Pause,
    /// Ticks fire again; those that fell due while paused are skipped.
    Resume,
    /// Run once now.
    Trigger,
    /// Run the ticks between the two instants (ms since the epoch, both included) again; at
    /// most 100.
    Backfill {
        /// The first instant.
        from_ms: u64,
        /// The last instant.
        to_ms: u64,
    },
}

/// Where a node's storage stands in the cluster, as [`Request::Hello`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Empty storage that has not decided yet.
    Blank,
    /// Empty storage that saw every peer empty and will form the cluster with them.
    Bootstrapping,
    /// New storage of a node the cluster already knows, waiting to be added as a learner.
    Joining,
    /// Storage that is (or was) a Raft member: the cluster exists.
    Member,
}

/// The answer to [`Request::Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Where the node's storage stands.
    pub phase: Phase,
    /// Its Raft member id, once decided.
    pub member: Option<u64>,
    /// The peers its configuration says vote when the cluster forms: nodes that disagree
    /// must not form a cluster together (each would initialize a different membership).
    pub voters: Vec<NodeId>,
}

/// A change to (or a look at) the Raft membership, served by the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipRequest {
    /// Voters and learners, with what the leader knows of each.
    List,
    /// The sending node's new storage, member `member`, asks to be added as a learner.
    Join {
        /// Its Raft member id.
        member: u64,
    },
    /// Makes `node`'s newest storage a voter (it must have joined as a learner).
    Add {
        /// The node.
        node: NodeId,
    },
    /// Removes every storage of `node` from the membership, voter or learner.
    Remove {
        /// The node.
        node: NodeId,
    },
    /// Makes `node`'s newest storage the voter in place of its older one, now (a machine
    /// replaced, a disk swapped); the leader does it by itself once the old one is silent.
    Replace {
        /// The node.
        node: NodeId,
    },
    /// Takes `node`'s vote away, keeping its storage as a learner (it still replicates the
    /// log, holds its session and owns keys).
    Demote {
        /// The node.
        node: NodeId,
    },
}

/// The Raft membership as the leader reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipReport {
    /// The leader that answered.
    pub leader: Option<NodeId>,
    /// Whether a joint (changing) configuration is in force.
    pub changing: bool,
    /// Every member, voters first.
    pub members: Vec<MemberReport>,
}

/// One Raft member in a [`MembershipReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    /// The node it belongs to.
    pub node: NodeId,
    /// Its Raft member id (one per storage of the node).
    pub member: u64,
    /// Whether it votes.
    pub voter: bool,
    /// The last log index the leader knows it holds.
    pub matched: Option<u64>,
    /// How long ago it last answered the leader, in milliseconds.
    pub answered_ms_ago: Option<u64>,
}

/// Why a membership request was not served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MembershipRefusal {
    /// The receiver is not the leader; `leader` is its best guess.
    #[error("not the leader (leader is {leader:?})")]
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The request cannot be served as asked; the text says why and what to do.
    #[error("{0}")]
    Invalid(String),
    /// The change did not complete (no quorum, a change already under way, a timeout).
    #[error("not completed: {0}")]
    Unavailable(String),
}

/// The kinds of Raft message, each carrying the encoded openraft request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftMessage {
    /// AppendEntries (also the heartbeat).
    AppendEntries(Payload),
    /// RequestVote.
    Vote(Payload),
    /// One chunk of a snapshot the leader is sending (the runtime defines its contents).
    Snapshot(Payload),
    /// A pre-vote: would the receiver vote for this candidate now? Changes no term.
    PreVote(Payload),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The encoded openraft response (or openraft error) to a [`Request::Raft`].
    Raft(Payload),
    /// The result of a [`Request::Write`].
    Write(Result<Vec<Outcome>, WriteRefusal>),
    /// The answer to a keepalive.
    KeepAlive(KeepAliveReply),
    /// The receiving node's report.
    Status(Box<StatusReport>),
    /// The node cannot serve the request (shutting down, or the request was malformed).
    Refused(String),
    /// The answer to a [`Request::Ping`].
    Pong,
    /// The Raft message was for another member than this node's storage (an earlier,
    /// lost storage of the node): not delivered.
    WrongMember {
        /// This node's member id, if it has one yet.
        current: Option<u64>,
    },
    /// The answer to a [`Request::Hello`].
    Hello(HelloReply),
    /// The answer to a [`Request::Membership`].
    Membership(Result<MembershipReport, MembershipRefusal>),
    /// The answer to a [`Request::Schedule`]: the run ids of the ticks it made pending, or
    /// why it was refused.
    Schedule(Result<Vec<u64>, String>),
    /// The answer to a [`Request::Jobs`], or why it was refused.
    Jobs(Result<JobsReply, String>),
}

/// Why a forwarded write was not written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WriteRefusal {
    /// The receiver is not the leader; `leader` is its best guess.
    #[error("not the leader (leader is {leader:?})")]
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The receiver could not complete the write; the outcome is unknown.
    #[error("write did not complete: {0}")]
    Unavailable(String),
}

/// The leader's answer to a keepalive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeepAliveReply {
    /// Renewed: the lease runs from when the keepalive was sent.
    Renewed {
        /// The cluster's time of day when the leader answered (the lower median of the
        /// nodes' wall clocks it knows), if it knows enough clocks to say.
        cluster_ms: Option<u64>,
    },
    /// The receiver is not the leader; `leader` is its best guess.
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The session has ended or is being expired: the node must stop its tasks and open a
    /// new session.
    SessionEnded,
    /// The leader could not confirm its leadership in time; try again.
    Unconfirmed,
    /// The session's storage is not a Raft member (removed, replaced by newer storage of the
    /// node, or never added): it does not receive the log, so it must not act. A node whose
    /// storage was a member stops; one that is still joining ends the session and joins
    /// first. Said only by a leader that has just confirmed its leadership. The session is
    /// not renewed and expires after its TTL.
    Removed,
}

/// A node's report of the cluster as it has applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The reporting node.
    pub node: Option<NodeId>,
    /// The leader it knows of (a hint, not authority).
    pub leader: Option<NodeId>,
    /// Its current Raft term.
    pub term: u64,
    /// The index of the last entry it applied.
    pub applied_index: u64,
    /// The voting members of the cluster.
    pub members: Vec<NodeId>,
    /// The members that replicate the log without voting.
    pub learners: Vec<NodeId>,
    /// Whether this node's storage votes, in a membership no change is half-way through.
    pub voting: bool,
    /// This node's Raft member id (its storage's), once decided.
    pub member: Option<u64>,
    /// Where this node's storage stands in the cluster.
    pub phase: Option<Phase>,
    /// This node's lease: milliseconds left (negative once lapsed), if it has a session.
    pub lease_left_ms: Option<i64>,
    /// Tasks of this node still running after the lease deadline of their ownership.
    pub overruns: Vec<OverrunReport>,
    /// How many tasks have ever outlived their lease deadline on this node.
    pub overruns_total: u64,
    /// Round trips this node observed to its peers, against what its timing supports.
    pub network: Option<NetworkReport>,
    /// What this node thinks is wrong (timing that does not fit the network, a task that
    /// outlived its lease, ...), one line each.
    pub warnings: Vec<String>,
    /// Live sessions.
    pub sessions: Vec<SessionReport>,
    /// Counts over every key, whatever the query listed.
    pub key_summary: KeySummary,
    /// The keys the query selected, in key order: their owners and queue depths.
    pub keys: Vec<KeyReport>,
    /// Set when more keys match than were listed: pass it as [`KeyQuery::after`] for the next
    /// page (it is the last key listed; never set when the query listed none).
    pub next_after: Option<Key>,
    /// Job queues and their depths.
    pub queues: Vec<QueueReport>,
}

/// A task that was still running after the lease deadline of its ownership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrunReport {
    /// The key.
    pub key: Key,
    /// The slot.
    pub slot: u32,
    /// The token of the ownership it outlived.
    pub token: Token,
    /// How far past the deadline it was when last seen, in milliseconds.
    pub past_deadline_ms: u64,
}

/// Round trips a node observed, against its timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkReport {
    /// The largest round trip the node's timing is built for, in milliseconds.
    pub supported_rtt_ms: u64,
    /// The slowest recent round trip to a peer (Raft, keepalive), in milliseconds.
    pub observed_rtt_ms: Option<u64>,
    /// Raft and keepalive requests that timed out recently.
    pub recent_timeouts: u64,
}

/// Which keys a [`StatusReport`] lists: at most `limit` keys, in key order, that start with
/// `prefix` and come after `after`. With 100,000 keys a full list is megabytes; the summary
/// ([`KeySummary`]) is always there, so a report that lists nothing still says how many keys
/// are owned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyQuery {
    /// Only keys that start with this text.
    pub prefix: Option<String>,
    /// Only keys after this one (the previous page's [`StatusReport::next_after`]).
    pub after: Option<Key>,
    /// At most this many keys (0: the summary only).
    pub limit: u32,
}

impl KeyQuery {
    /// How many keys a default query lists.
    pub const DEFAULT_LIMIT: u32 = 1000;

    /// The summary only, no keys.
    pub fn summary() -> KeyQuery {
        KeyQuery { prefix: None, after: None, limit: 0 }
    }

    /// Every key (costs the size of the state: for tools and tests, not for polling).
    pub fn all() -> KeyQuery {
        KeyQuery { prefix: None, after: None, limit: u32::MAX }
    }

    /// Only keys that start with `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> KeyQuery {
        self.prefix = Some(prefix.into());
        self
    }

    /// Only keys after `key`.
    pub fn after(mut self, key: Key) -> KeyQuery {
        self.after = Some(key);
        self
    }

    /// At most `limit` keys.
    pub fn limit(mut self, limit: u32) -> KeyQuery {
        self.limit = limit;
        self
    }
}

impl Default for KeyQuery {
    /// The first [`KeyQuery::DEFAULT_LIMIT`] keys.
    fn default() -> KeyQuery {
        KeyQuery { prefix: None, after: None, limit: KeyQuery::DEFAULT_LIMIT }
    }
}

/// Counts over every key of the state, in a [`StatusReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySummary {
    /// Keys (registered, or holding messages).
    pub keys: u64,
    /// Their slots.
    pub slots: u64,
    /// Slots with an owner.
    pub owned: u64,
    /// Slots without one.
    pub vacant: u64,
    /// Owned slots the leader asked to move.
    pub moving: u64,
    /// Messages queued and not yet acknowledged.
    pub queued: u64,
    /// Their payload bytes.
    pub queued_bytes: u64,
    /// Schedule keys.
    pub schedules: u64,
}

/// One live session in a [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// The session.
    pub session: SessionId,
    /// Its node.
    pub node: NodeId,
    /// Session TTL in milliseconds.
    pub ttl_ms: u64,
    /// Slots it owns.
    pub owned: usize,
    /// A newer process of its node (on other storage) waits for it to end.
    pub superseded: bool,
}

/// One key in a [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyReport {
    /// The key.
    pub key: Key,
    /// How it runs.
    pub spec: KeySpec,
    /// Per slot, the owner if any.
    pub owners: Vec<Option<OwnerReport>>,
    /// Nodes that registered the key.
    pub candidates: Vec<NodeId>,
    /// Messages queued and not yet acknowledged.
    pub queued: u64,
    /// Their payload bytes.
    pub queued_bytes: u64,
    /// For a schedule: its ticks.
    pub schedule: Option<ScheduleReport>,
}

/// A schedule in a [`StatusReport`]: its spec, its policies, what it has fired and what it
/// will fire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleReport {
    /// The schedule.
    pub spec: ScheduleSpec,
    /// Whether it is paused.
    pub paused: bool,
    /// The newest tick fired (ms since the epoch).
    pub last_fired: Option<u64>,
    /// Ticks after this instant are owed (the high-water mark, or when it was created or
    /// last resumed).
    pub mark_ms: u64,
    /// The time-zone database its ticks are computed with, if they depend on one.
    pub tzdb: Option<String>,
    /// Ticks fired and not finished, by run id.
    pub pending: Vec<(u64, PendingTick)>,
    /// Counters since it was created.
    pub counts: ScheduleCounts,
    /// The last fires that finished or were skipped, oldest first.
    pub recent: Vec<FireRecord>,
    /// The next ticks, as the reporting node computes them (see
    /// [`ScheduleReport::fill_next`]).
    pub next: Vec<u64>,
}

impl ScheduleReport {
    /// Computes the next `n` ticks after `now_ms` (or after the high-water mark, if later).
    pub fn fill_next(&mut self, now_ms: u64, n: usize) {
        self.next = match self.spec.compile() {
            Ok(ticks) => ticks.upcoming(now_ms.max(self.mark_ms), n),
            Err(_) => Vec::new(),
        };
    }
}

/// The owner of one slot in a [`StatusReport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReport {
    /// The owner's node.
    pub node: NodeId,
    /// Its session.
    pub session: SessionId,
    /// Its fencing token.
    pub token: Token,
}

impl crate::state::ClusterState {
    /// Describes the state for a [`StatusReport`]: sessions and every key.
    pub fn report(&self) -> (Vec<SessionReport>, Vec<KeyReport>) {
        let (keys, _, _) = self.key_reports(&KeyQuery::all());
        (self.session_reports(), keys)
    }

    /// Counts over every key.
    pub fn key_summary(&self) -> KeySummary {
        let mut sum = KeySummary { keys: self.keys.len() as u64, ..KeySummary::default() };
        for k in self.keys.values() {
            sum.slots += k.slots.len() as u64;
            for o in &k.slots {
                match o {
                    Some(o) => {
                        sum.owned += 1;
                        sum.moving += u64::from(o.moving);
                    }
                    None => sum.vacant += 1,
                }
            }
            sum.queued += k.queue.messages.len() as u64;
            sum.queued_bytes += k.queue.bytes;
            sum.schedules += u64::from(k.schedule.is_some());
        }
        sum
    }

    /// The keys `query` selects, the summary over all keys, and where the next page starts
    /// if more keys match. Costs the keys listed plus a pass for the summary.
    pub fn key_reports(&self, query: &KeyQuery) -> (Vec<KeyReport>, KeySummary, Option<Key>) {
        use std::ops::Bound;
        let prefix = query.prefix.as_deref().unwrap_or("");
        let start = match &query.after {
            Some(after) => Bound::Excluded(after.clone()),
            None => match Key::new(prefix) {
                Ok(k) => Bound::Included(k),
                Err(_) => Bound::Unbounded,
            },
        };
        let mut matching = self
            .keys
            .range((start, Bound::Unbounded))
            .skip_while(|(k, _)| k.as_str() < prefix)
            .take_while(|(k, _)| k.as_str().starts_with(prefix));
        let keys: Vec<KeyReport> = matching
            .by_ref()
            .take(query.limit as usize)
            .map(|(key, k)| self.key_report(key, k))
            .collect();
        let next_after = match matching.next() {
            Some(_) => keys.last().map(|r| r.key.clone()),
            None => None,
        };
        (keys, self.key_summary(), next_after)
    }

    /// Describes the live sessions.
    pub fn session_reports(&self) -> Vec<SessionReport> {
        self.sessions
            .values()
            .map(|s| SessionReport {
                session: s.id,
                node: s.node(),
                ttl_ms: s.lease.ttl_ms,
                owned: s.owned.len(),
                superseded: self.is_superseded(s.id),
            })
            .collect()
    }

    fn key_report(&self, key: &Key, k: &crate::state::KeyState) -> KeyReport {
        let node_of = |id: &SessionId| self.sessions.get(id).map(|s| s.node());
        KeyReport {
            key: key.clone(),
            spec: k.spec,
            owners: k
                .slots
                .iter()
                .map(|o| {
                    o.and_then(|o| {
                        node_of(&o.session).map(|node| OwnerReport {
                            node,
                            session: o.session,
                            token: o.token,
                        })
                    })
                })
                .collect(),
            candidates: k.candidates.iter().filter_map(node_of).collect(),
            queued: k.queue.messages.len() as u64,
            queued_bytes: k.queue.bytes,
            schedule: k.schedule.as_ref().map(|s| ScheduleReport {
                spec: s.spec.clone(),
                paused: s.paused,
                last_fired: s.last_fired,
                mark_ms: s.mark_ms(),
                tzdb: s.tzdb.clone(),
                pending: s.pending.iter().map(|(r, p)| (*r, p.clone())).collect(),
                counts: s.counts,
                recent: s.recent.iter().cloned().collect(),
                next: Vec::new(),
            }),
        }
    }
}

impl QueueReport {
    fn empty(queue: Key, caps: QueueCaps) -> QueueReport {
        QueueReport {
            queue,
            caps,
            scheduled: 0,
            available: 0,
            running: 0,
            retryable: 0,
            completed: 0,
            dead: 0,
            cancelled: 0,
            running_by_node: Vec::new(),
            oldest_available_ms: None,
        }
    }
}

impl crate::state::ClusterState {
    /// One job as a report, with its state as of `now_ms`.
    pub fn job_report(&self, job: &Job, now_ms: u64) -> JobReport {
        let node =
            job.claim.and_then(|c| self.sessions.get(&c.session)).map(crate::state::Session::node);
        JobReport {
            id: job.id,
            queue: job.queue.clone(),
            state: job.state_at(now_ms),
            priority: job.spec.priority,
            attempt: job.attempt,
            max_attempts: job.spec.max_attempts,
            run_at_ms: job.run_at_ms,
            enqueued_ms: job.enqueued_ms,
            finished_ms: job.finished_ms,
            unique: job.spec.unique.clone(),
            partition: job.spec.partition.clone(),
            payload: job.payload.clone(),
            node,
            token: job.claim.map(|c| c.token),
            deadline_ms: job.claim.map(|c| c.deadline_ms),
            cancel_requested: job.claim.is_some_and(|c| c.cancel_requested),
            errors: job.errors.clone(),
            result: job.result.clone(),
        }
    }

    /// Every job queue with its depths as of `now_ms` (one pass over the job table), and
    /// the queues of finished jobs whose queue has no index any more.
    pub fn queue_reports(&self, now_ms: u64) -> Vec<QueueReport> {
        let mut reports: std::collections::BTreeMap<Key, QueueReport> = self
            .jobs
            .queues
            .iter()
            .map(|(q, index)| (q.clone(), QueueReport::empty(q.clone(), index.caps)))
            .collect();
        let mut by_node: std::collections::BTreeMap<(Key, NodeId), u64> = Default::default();
        for job in self.jobs.jobs.values() {
            let r = reports
                .entry(job.queue.clone())
                .or_insert_with(|| QueueReport::empty(job.queue.clone(), QueueCaps::default()));
            let state = job.state_at(now_ms);
            match state {
                JobState::Scheduled => r.scheduled += 1,
                JobState::Available => {
                    r.available += 1;
                    let age = now_ms.saturating_sub(job.run_at_ms);
                    r.oldest_available_ms = Some(r.oldest_available_ms.unwrap_or(0).max(age));
                }
                JobState::Running => r.running += 1,
                JobState::Retryable => r.retryable += 1,
                JobState::Completed => r.completed += 1,
                JobState::Dead => r.dead += 1,
                JobState::Cancelled => r.cancelled += 1,
            }
            if let Some(node) =
                job.claim.and_then(|c| self.sessions.get(&c.session)).map(|s| s.node())
            {
                *by_node.entry((job.queue.clone(), node)).or_default() += 1;
            }
        }
        for ((queue, node), n) in by_node {
            if let Some(r) = reports.get_mut(&queue) {
                r.running_by_node.push((node, n));
            }
        }
        reports.into_values().collect()
    }
}
