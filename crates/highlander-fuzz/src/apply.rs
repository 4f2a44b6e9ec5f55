//! Command sequences through `ClusterState::apply`, read from bytes.
//!
//! Each op takes an opcode byte and a few argument bytes; arguments pick mostly live sessions
//! and current tokens, so that sequences reach deep states. After every command the state
//! must be consistent, no ownership may have ended without being named by the command,
//! a refused command must have changed nothing (a refused `Send` only its client's window),
//! and assigned tokens must grow. Leader rounds (`plan`) run in between.

use highlander_core::state::ClusterState;
use highlander_core::{
    ClientId, Command, Key, KeySpec, LeaseTable, LeaseTerms, Limits, Millis, NodeId, Outcome,
    Payload, RequestId, Seq, SessionId, Token, plan,
};

const LEASE: LeaseTerms = LeaseTerms { ttl_ms: 2000, margin_ms: 100 };
const LIMITS: Limits = Limits {
    max_payload_bytes: 6,
    max_messages_per_key: 3,
    max_bytes_per_key: 10,
    max_total_bytes: 16,
};
const KEYS: [&str; 3] = ["a", "b", "c"];

/// Reads argument bytes; past the end of the input every read is 0.
struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// What the run knows beyond the state: clients' next serials and registration epochs.
struct Run {
    state: ClusterState,
    term: u64,
    last_token: u64,
    serials: std::collections::BTreeMap<ClientId, u64>,
    epoch: u64,
}

impl Run {
    fn session(&self, pick: u8) -> SessionId {
        let live: Vec<SessionId> = self.state.sessions.keys().copied().collect();
        if pick < 200 && !live.is_empty() {
            live[pick as usize % live.len()]
        } else {
            SessionId(u64::from(pick % 12))
        }
    }

    fn token(&self, key: &Key, slot: u32, pick: u8) -> Token {
        match self.state.owner(key, slot) {
            Some(owner) if pick < 200 => owner.token,
            _ => Token(u64::from(pick % 16)),
        }
    }

    fn command(&mut self, input: &mut Input<'_>) -> Option<Command> {
        let op = input.byte();
        let key = Key::new(KEYS[input.byte() as usize % KEYS.len()]).expect("a valid key");
        Some(match op % 11 {
            0 => {
                let node = NodeId(1 + u64::from(input.byte() % 3));
                let how = input.byte();
                let (incarnation, attempt, storage) = match self.state.nodes.get(&node) {
                    None => (1, 0, node.0),
                    Some(r) => match how % 5 {
                        0 => (r.incarnation, r.attempt, r.storage),
                        1 => (r.incarnation, r.attempt + 1, r.storage),
                        2 => (r.incarnation + 1, 0, r.storage),
                        3 => (r.incarnation + 1, 0, r.storage + 100),
                        _ => (r.incarnation.saturating_sub(1), 0, r.storage),
                    },
                };
                Command::OpenSession {
                    client: ClientId { node, incarnation },
                    attempt,
                    lease: LEASE,
                    limits: LIMITS,
                    storage,
                }
            }
            1 => Command::CloseSession { session: self.session(input.byte()) },
            2 => Command::ExpireSession {
                session: self.session(input.byte()),
                term: if input.byte() < 220 { self.term } else { self.term.wrapping_sub(1) },
            },
            3 => {
                let spec = match input.byte() % 4 {
                    0 | 1 => KeySpec::singleton(),
                    2 => KeySpec::exclusive(2),
                    _ => KeySpec::exclusive(u32::from(input.byte() % 4)),
                };
                self.epoch += 1;
                let back = u64::from(input.byte() % 3);
                Command::Register {
                    session: self.session(input.byte()),
                    key,
                    spec,
                    epoch: self.epoch.saturating_sub(back),
                }
            }
            4 => {
                self.epoch += 1;
                let back = u64::from(input.byte() % 3);
                Command::Unregister {
                    session: self.session(input.byte()),
                    key,
                    epoch: self.epoch.saturating_sub(back),
                }
            }
            5 => Command::Assign {
                key,
                slot: u32::from(input.byte() % 3),
                session: self.session(input.byte()),
            },
            6 => {
                let slot = u32::from(input.byte() % 3);
                let token = self.token(&key, slot, input.byte());
                Command::Release { key, slot, token, hand_over: input.byte().is_multiple_of(2) }
            }
            7 => {
                let slot = u32::from(input.byte() % 3);
                let token = self.token(&key, slot, input.byte());
                Command::RequestMove { key, slot, token }
            }
            8 => {
                let node = NodeId(1 + u64::from(input.byte() % 3));
                let incarnation = self.state.nodes.get(&node).map_or(1, |r| r.incarnation);
                let client = ClientId { node, incarnation };
                let next = self.serials.entry(client).or_insert(0);
                let back = u64::from(input.byte() % 4);
                *next += 1;
                let serial = next.saturating_sub(back);
                let len = input.byte() as usize % 9;
                Command::Send {
                    key,
                    payload: Payload::from(vec![serial as u8; len]),
                    request: RequestId { client, serial },
                    floor: serial.saturating_sub(u64::from(input.byte() % 3)),
                }
            }
            9 => {
                let token = self.token(&key, 0, input.byte());
                let head = self
                    .state
                    .keys
                    .get(&key)
                    .map_or(1, |k| k.queue.head().map_or(k.queue.next_seq, |s| s.0));
                Command::Ack { key, token, upto: Seq(head + u64::from(input.byte() % 3)) }
            }
            _ => return None,
        })
    }

    fn step(&mut self, command: &Command) {
        // As the entry's term is recorded before its commands apply.
        let mut before = self.state.clone();
        before.entry_term = self.term;
        let outcome = self.state.apply_entry(self.term, std::slice::from_ref(command)).remove(0);
        if let Err(e) = self.state.check_consistency() {
            panic!("inconsistent after {command:?}: {e}");
        }
        if let Err(e) = ClusterState::ownerships_ended_by_name(&before, &self.state, command) {
            panic!("token invariant: {e}");
        }
        match &outcome {
            Outcome::Rejected(_) if matches!(command, Command::Send { .. }) => {
                let mut rest = self.state.clone();
                rest.clients = before.clients.clone();
                assert_eq!(rest, before, "the refused {command:?} changed more than its window");
            }
            Outcome::Rejected(_) => {
                assert_eq!(self.state, before, "the refused {command:?} changed the state")
            }
            Outcome::Assigned { token } => {
                assert!(token.0 > self.last_token, "token {token} after t{}", self.last_token);
                self.last_token = token.0;
            }
            _ => {}
        }
    }

    /// A leader of the current term, everyone heard from now and the sessions `expiring`
    /// selects marked for expiry: what it plans is applied.
    fn leader_round(&mut self, expiring: u8) {
        let mut table = LeaseTable::new(self.term, Millis(0));
        table.observe(&self.state, Millis(0));
        for (i, s) in self.state.sessions.keys().enumerate() {
            if expiring & (1 << (i % 8)) != 0 {
                table.mark_expiring(*s);
            }
        }
        for command in plan(&self.state, &table, Millis(0)) {
            self.step(&command);
        }
    }
}

/// Runs the command sequence `data` describes.
pub fn apply(data: &[u8]) {
    let mut run = Run {
        state: ClusterState::new(),
        term: 1,
        last_token: 0,
        serials: Default::default(),
        epoch: 0,
    };
    let mut input = Input { data, at: 0 };
    let mut ops = 0;
    while !input.done() && ops < 400 {
        ops += 1;
        match run.command(&mut input) {
            Some(command) => run.step(&command),
            None => match input.byte() % 3 {
                0 => run.leader_round(input.byte()),
                1 => {
                    run.term += 1;
                    run.state.apply_entry(run.term, &[]);
                }
                _ => {
                    // A replica restored from a snapshot of the state goes on the same way.
                    let bytes = highlander_core::codec::encode(&run.state).expect("encodes");
                    let restored: ClusterState =
                        highlander_core::codec::decode_snapshot(&bytes).expect("decodes");
                    assert_eq!(restored, run.state, "a snapshot round trip changed the state");
                }
            },
        }
    }
}
