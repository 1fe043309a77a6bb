//! The shim's core on the host: what the microcontroller answers to what the line brings.

use std::sync::atomic::{AtomicU32, Ordering};

use firmware_shim::{Config, Frame, Method, SERIAL_VERSION, Service, Shim};
use mesh_proto::Status;
use mesh_proto::serial::{Decoder, encode};

/// Runs of `counter/bump`: only the replay test calls it.
static BUMPS: AtomicU32 = AtomicU32::new(0);

fn read(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    out[..4].copy_from_slice(b"21.5");
    Ok(4)
}

fn bump(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let n = BUMPS.fetch_add(1, Ordering::SeqCst) + 1;
    out[0] = n as u8;
    Ok(1)
}

fn set(body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    if body.is_empty() {
        return Err(Status::InvalidArgument);
    }
    out[..body.len()].copy_from_slice(body);
    Ok(body.len())
}

static SERVICES: &[Service] = &[
    Service {
        name: "sensor",
        methods: &[Method {
            name: "read",
            handler: read,
        }],
    },
    Service {
        name: "actuator",
        methods: &[Method {
            name: "set",
            handler: set,
        }],
    },
    Service {
        name: "counter",
        methods: &[Method {
            name: "bump",
            handler: bump,
        }],
    },
];

fn shim() -> Shim<256, 64> {
    Shim::new(Config {
        name: "mcu-1",
        firmware: "0.1.0",
        services: SERVICES,
        heartbeat_ms: 1000,
        key: None,
    })
}

fn line(frame: &Frame<'_>) -> Vec<u8> {
    let (mut scratch, mut out) = ([0u8; 512], [0u8; 600]);
    let n = encode(frame, &mut scratch, &mut out).expect("encode");
    out[..n].to_vec()
}

fn call(id: u16, service: u8, method: u8, body: &[u8]) -> Vec<u8> {
    line(&Frame::Call {
        id,
        service,
        method,
        body,
    })
}

/// What the shim sent, decoded as the node reads it: (kind, id, status, body).
fn heard(bytes: &[u8]) -> Vec<(String, u16, Option<Status>, Vec<u8>)> {
    let mut d = Decoder::<512>::new();
    let mut out = Vec::new();
    d.feed(
        bytes,
        |f| {
            out.push(match f {
                Frame::Reply { id, status, body } => {
                    ("reply".into(), id, Some(status), body.to_vec())
                }
                Frame::Announce {
                    name,
                    version,
                    services,
                    ..
                } => {
                    assert_eq!(version, SERIAL_VERSION);
                    let names: Vec<&str> = services.iter().map(|s| s.name).collect();
                    (
                        format!("announce {name} {}", names.join(",")),
                        0,
                        None,
                        vec![],
                    )
                }
                Frame::Heartbeat { .. } => ("heartbeat".into(), 0, None, vec![]),
                other => (format!("{other:?}"), 0, None, vec![]),
            })
        },
        |why| panic!("the shim sent a bad frame: {why:?}"),
    );
    out
}

fn run(shim: &mut Shim<256, 64>, input: &[u8]) -> Vec<(String, u16, Option<Status>, Vec<u8>)> {
    let mut sent = Vec::new();
    // As a UART hands them over: a few bytes at a time.
    for chunk in input.chunks(7) {
        shim.receive(chunk, 0, &mut |b: &[u8]| sent.extend_from_slice(b));
    }
    heard(&sent)
}

#[test]
fn it_announces_itself_at_start_and_when_asked() {
    let mut s = shim();
    let mut sent = Vec::new();
    s.start(0, &mut |b: &[u8]| sent.extend_from_slice(b));
    assert_eq!(heard(&sent)[0].0, "announce mcu-1 sensor,actuator,counter");
    let got = run(&mut s, &line(&Frame::Discover));
    assert_eq!(got[0].0, "announce mcu-1 sensor,actuator,counter");
}

#[test]
fn calls_are_answered_by_their_handlers_with_the_same_id() {
    let mut s = shim();
    let got = run(
        &mut s,
        &[
            call(1, 0, 0, b""),
            call(2, 1, 0, b"on"),
            call(3, 1, 0, b""),
            call(4, 5, 0, b""),
        ]
        .concat(),
    );
    assert_eq!(
        got,
        [
            ("reply".to_owned(), 1, Some(Status::Ok), b"21.5".to_vec()),
            ("reply".to_owned(), 2, Some(Status::Ok), b"on".to_vec()),
            ("reply".to_owned(), 3, Some(Status::InvalidArgument), vec![]),
            ("reply".to_owned(), 4, Some(Status::NotFound), vec![]),
        ]
    );
}

#[test]
fn noise_cuts_flipped_bits_and_oversized_frames_are_dropped_and_the_next_frame_is_served() {
    let mut s = shim();
    let good = call(9, 1, 0, b"x");
    let mut input = Vec::new();
    // Random bytes (a fixed xorshift: the same every run), ending in a delimiter.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        input.push(state as u8);
    }
    input.push(0);
    // A truncated frame, then a delimiter.
    input.extend_from_slice(&good[..good.len() / 2]);
    input.push(0);
    // Flipped bits.
    let mut flipped = call(10, 1, 0, b"y");
    flipped[2] ^= 0x04;
    input.extend_from_slice(&flipped);
    // Longer than the shim's buffer.
    input.extend_from_slice(&call(11, 1, 0, &[7u8; 400]));
    // The good one.
    input.extend_from_slice(&good);
    let got = run(&mut s, &input);
    assert_eq!(
        got,
        [("reply".to_owned(), 9, Some(Status::Ok), b"x".to_vec())]
    );
    let dropped: u32 = s.dropped().iter().sum();
    assert!(dropped >= 4, "{:?}", s.dropped());
}

#[test]
fn a_repeated_request_id_runs_the_handler_once() {
    let mut s = shim();
    let got = run(
        &mut s,
        &[
            call(42, 2, 0, b""),
            call(42, 2, 0, b""),
            call(42, 2, 0, b""),
        ]
        .concat(),
    );
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|g| g.1 == 42 && g.3 == [1]), "{got:?}");
    assert_eq!(
        BUMPS.load(Ordering::SeqCst),
        1,
        "the handler ran more than once"
    );
    assert_eq!(s.replayed, 2);
    // A new id runs it again.
    let got = run(&mut s, &call(43, 2, 0, b""));
    assert_eq!(got[0].3, [2]);
}

#[test]
fn heartbeats_come_when_due() {
    let mut s = shim();
    let mut sent = Vec::new();
    s.start(0, &mut |b: &[u8]| sent.extend_from_slice(b));
    sent.clear();
    s.poll(500, &mut |b: &[u8]| sent.extend_from_slice(b));
    assert!(sent.is_empty());
    s.poll(1000, &mut |b: &[u8]| sent.extend_from_slice(b));
    assert_eq!(heard(&sent)[0].0, "heartbeat");
}
