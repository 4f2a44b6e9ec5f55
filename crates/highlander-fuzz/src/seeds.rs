//! The seed corpora: a few valid and a few broken inputs per target, from which the fuzzer
//! starts. Written to `fuzz/corpus/` by the ignored `write_seed_corpus` test.

use highlander_core::codec;
use highlander_core::state::ClusterState;
use highlander_core::wire::{
    HelloReply, KeepAliveReply, KeyQuery, MembershipReport, MembershipRequest, Phase, RaftMessage,
    Request, Response, ScheduleOp, StatusReport, WriteRefusal,
};
use highlander_core::{
    Batch, ClientId, Command, Key, KeySpec, LeaseTerms, Limits, NodeId, Outcome, Payload,
    RequestId, ScheduleAction, ScheduleSpec, SessionId, TickOrigin, TickResult, Token, Trigger,
};

type Seeds = Vec<(String, Vec<u8>)>;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("quic_frames", quic_frames()),
        ("codec", codec_seeds()),
        ("apply", apply()),
        ("wal", wal()),
        ("config", config()),
    ]
}

fn requests() -> Vec<Request> {
    let key = Key::new("irc:#rust").unwrap();
    let client = ClientId { node: NodeId(2), incarnation: 7 };
    vec![
        Request::Ping,
        Request::Status(KeyQuery::default()),
        Request::Status(KeyQuery::default().with_prefix("tenant:").after(key.clone()).limit(7)),
        Request::Hello,
        Request::KeepAlive { session: SessionId(3), lapsed_ms: 0, wall_ms: 1_767_225_600_000 },
        Request::Membership(MembershipRequest::Join { member: 1 << 63 }),
        Request::Membership(MembershipRequest::Replace { node: NodeId(3) }),
        Request::Raft { to: 2, message: RaftMessage::Vote(Payload::from(vec![1, 2, 3])) },
        Request::Write(vec![
            Command::OpenSession {
                client,
                attempt: 0,
                lease: LeaseTerms { ttl_ms: 2000, margin_ms: 50 },
                limits: Limits::default(),
                storage: 2,
            },
            Command::Register {
                session: SessionId(1),
                key: key.clone(),
                spec: KeySpec::singleton(),
                epoch: 1,
            },
            Command::Send {
                key: key.clone(),
                payload: Payload::from("hello"),
                request: RequestId { client, serial: 1 },
                floor: 1,
            },
            Command::Release { key: key.clone(), slot: 0, token: Token(4), hand_over: true },
            Command::Unregister { session: SessionId(1), key: key.clone(), epoch: 2 },
        ]),
        Request::Write(vec![
            Command::RegisterSchedule {
                session: SessionId(1),
                key: key.clone(),
                schedule: Box::new(ScheduleSpec::new(Trigger::Cron("0 */5 * * * *".into()))),
                epoch: 3,
                tzdb: "2026f".into(),
            },
            Command::Fire {
                key: key.clone(),
                token: Token(5),
                tick_ms: 1_767_225_900_000,
                origin: TickOrigin::Scheduled,
                missed: 0,
                start_ms: Some(1_767_225_900_004),
            },
            Command::TickDone {
                key: key.clone(),
                token: Token(5),
                run: 1,
                result: TickResult::Failed("boom".into()),
                end_ms: 1_767_225_900_090,
            },
            Command::ScheduleControl {
                key: key.clone(),
                action: ScheduleAction::Backfill { ticks: vec![1_767_225_600_000] },
                request: RequestId { client, serial: 2 },
                floor: 2,
            },
        ]),
        Request::Schedule { key, op: ScheduleOp::Backfill { from_ms: 0, to_ms: 1 << 50 } },
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::Pong,
        Response::KeepAlive(KeepAliveReply::Renewed { cluster_ms: Some(1_767_225_600_000) }),
        Response::KeepAlive(KeepAliveReply::Removed),
        Response::Write(Ok(vec![
            Outcome::Registered,
            Outcome::WaitingForPrevious { session: SessionId(1) },
        ])),
        Response::Write(Err(WriteRefusal::NotLeader { leader: Some(NodeId(1)) })),
        Response::WrongMember { current: Some(9) },
        Response::Hello(HelloReply {
            phase: Phase::Bootstrapping,
            member: Some(1),
            voters: vec![NodeId(1), NodeId(2), NodeId(3)],
        }),
        Response::Membership(Ok(MembershipReport::default())),
        Response::Schedule(Ok(vec![1, 2])),
        Response::Schedule(Err("not a schedule".into())),
        Response::Status(Box::default()),
    ]
}

fn quic_frames() -> Seeds {
    let mut out = Vec::new();
    for (i, r) in requests().iter().enumerate() {
        let body = codec::encode(r).unwrap();
        let mut stream = vec![1u8];
        stream.extend((body.len() as u32).to_be_bytes());
        stream.extend(body);
        out.push((format!("request-{i}"), stream));
    }
    for (i, r) in responses().iter().enumerate() {
        let body = codec::encode(r).unwrap();
        let mut stream = (body.len() as u32).to_be_bytes().to_vec();
        stream.extend(body);
        out.push((format!("response-{i}"), stream));
    }
    let mut snapshot = vec![2u8];
    snapshot.extend(4u32.to_be_bytes());
    snapshot.extend(7u64.to_be_bytes());
    snapshot.extend([9, 8, 7, 6]);
    out.push(("snapshot".into(), snapshot));
    out.push(("huge-length".into(), vec![1, 0xff, 0xff, 0xff, 0xff, 0]));
    out.push(("unknown-kind".into(), vec![9, 0, 0, 0, 1, 0]));
    out.push(("short".into(), vec![1, 0]));
    out
}

fn state() -> ClusterState {
    let mut st = ClusterState::new();
    let client = ClientId { node: NodeId(1), incarnation: 1 };
    let key = Key::new("k").unwrap();
    st.apply_batch(&[
        Command::OpenSession {
            client,
            attempt: 0,
            lease: LeaseTerms { ttl_ms: 2000, margin_ms: 50 },
            limits: Limits::default(),
            storage: 1,
        },
        Command::Register {
            session: SessionId(1),
            key: key.clone(),
            spec: KeySpec::exclusive(2),
            epoch: 1,
        },
        Command::Assign { key: key.clone(), slot: 0, session: SessionId(1) },
        Command::Send {
            key,
            payload: Payload::from("m"),
            request: RequestId { client, serial: 1 },
            floor: 1,
        },
    ]);
    st
}

fn codec_seeds() -> Seeds {
    let mut out: Seeds = Vec::new();
    for (i, r) in requests().iter().enumerate() {
        out.push((format!("request-{i}"), codec::encode(r).unwrap()));
    }
    for (i, r) in responses().iter().enumerate() {
        out.push((format!("response-{i}"), codec::encode(r).unwrap()));
    }
    out.push((
        "batch".into(),
        codec::encode(&Batch(vec![Command::CloseSession { session: SessionId(2) }])).unwrap(),
    ));
    out.push(("state".into(), codec::encode(&state()).unwrap()));
    out.push(("status".into(), codec::encode(&StatusReport::default()).unwrap()));
    out.push(("string-length".into(), vec![0xfc, 0xff, 0xff, 0xff, 0x7f]));
    out
}

/// Deterministic pseudo-random bytes (SplitMix64).
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn apply() -> Seeds {
    // Three nodes open sessions, register, a leader round assigns, a send, an ack, a close.
    let opens = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0];
    let registers = [3, 0, 0, 0, 0, 3, 0, 0, 0, 1, 3, 0, 0, 0, 2];
    let round = [10, 0, 0, 0];
    let traffic = [8, 0, 0, 0, 3, 0, 9, 0, 0, 1, 1, 0, 0, 6, 0, 0, 0, 0, 4, 0, 0, 0];
    let mut crafted = Vec::new();
    for part in [&opens[..], &registers, &round, &traffic, &round] {
        crafted.extend_from_slice(part);
    }
    let mut out: Seeds = vec![("crafted".into(), crafted)];
    for i in 0..8 {
        out.push((format!("random-{i}"), bytes(i, 300)));
    }
    out
}

fn wal() -> Seeds {
    let mut out: Seeds = Vec::new();
    for mode in 0..7u8 {
        for (i, at) in [0u16, 40, 300].iter().enumerate() {
            let mut data = vec![mode];
            data.extend(at.to_le_bytes());
            data.extend(bytes(u64::from(mode) * 10 + i as u64, 8 + 20 * i));
            out.push((format!("mode{mode}-{i}"), data));
        }
    }
    out
}

fn config() -> Seeds {
    let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC0zMg==";
    let base = |extra: &str| {
        format!(
            "id = 1\nlisten = \"127.0.0.1:7001\"\n{extra}\n[peers]\n1 = \"127.0.0.1:7001\"\n\
             2 = \"127.0.0.1:7002\"\n3 = \"127.0.0.1:7003\"\n\n[tls]\ncluster_secret = \"{secret}\"\n"
        )
    };
    vec![
        ("minimal".into(), base("").into_bytes()),
        ("data-dir".into(), base("data_dir = \"n1\"").into_bytes()),
        ("wan".into(), format!("{}\n[timing]\npreset = \"wan\"\n", base("")).into_bytes()),
        ("rtt".into(), format!("{}\n[timing]\nrtt_ms = 120\n", base("")).into_bytes()),
        ("bad-timing".into(), format!("{}\n[timing]\nsession_ttl_ms = 10\n", base("")).into_bytes()),
        ("not-toml".into(), b"id = = 1\n[[[".to_vec()),
        ("pem".into(), "id = 1\nlisten = \"127.0.0.1:7001\"\n[peers]\n1 = \"127.0.0.1:7001\"\n[tls]\nca_cert = \"ca.pem\"\nnode_cert = \"n.pem\"\nnode_key = \"n.key\"\n".as_bytes().to_vec()),
    ]
}
