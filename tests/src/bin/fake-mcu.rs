//! A microcontroller for the tests, on the host: `firmware-shim`'s core on a serial device (one
//! end of a pty pair), serving `sensor` (`read`, `info`) and `actuator` (`set`).
//!
//! `fake-mcu <device> [name] [heartbeat_ms] [key (64 hex digits)]`. `actuator/set` answers how many times it ran, so a
//! test sees a handler run twice. The tests kill it as a microcontroller is unplugged.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use firmware_shim::{Config, Method, Service, Shim};
use mesh_proto::Status;

static SETS: AtomicU32 = AtomicU32::new(0);

fn read(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let v = b"21.5";
    out[..v.len()].copy_from_slice(v);
    Ok(v.len())
}

fn info(_body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    let v = b"fake-mcu 0.1.0";
    out[..v.len()].copy_from_slice(v);
    Ok(v.len())
}

/// Answers how many times it ran, then the body: a repeated request id must not run it again.
fn set(body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    if body.is_empty() {
        return Err(Status::InvalidArgument);
    }
    let n = SETS.fetch_add(1, Ordering::SeqCst) + 1;
    let text = format!("{n}:");
    let len = (text.len() + body.len()).min(out.len());
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()..len].copy_from_slice(&body[..len - text.len()]);
    Ok(len)
}

static SERVICES: &[Service] = &[
    Service {
        name: "sensor",
        methods: &[
            Method {
                name: "read",
                handler: read,
            },
            Method {
                name: "info",
                handler: info,
            },
        ],
    },
    Service {
        name: "actuator",
        methods: &[Method {
            name: "set",
            handler: set,
        }],
    },
];

fn main() {
    let mut args = std::env::args().skip(1);
    let device = args
        .next()
        .expect("usage: fake-mcu <device> [name] [heartbeat_ms]");
    let name: &'static str = Box::leak(
        args.next()
            .unwrap_or_else(|| "mcu-1".into())
            .into_boxed_str(),
    );
    let heartbeat_ms = args.next().and_then(|h| h.parse().ok()).unwrap_or(200);
    let key: Option<&'static [u8; 32]> = args.next().map(|hex| {
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("a key of 64 hex digits");
        }
        &*Box::leak(Box::new(key))
    });
    let line = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device)
        .unwrap_or_else(|e| panic!("{device}: {e}"));
    let mut writer = line.try_clone().expect("clone");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut reader = line;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut shim = Shim::<1024, 512>::new(Config {
        name,
        firmware: "0.1.0",
        services: SERVICES,
        heartbeat_ms,
        key,
    });
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u32;
    let mut send = |bytes: &[u8]| {
        let _ = writer.write_all(bytes);
        let _ = writer.flush();
    };
    shim.start(now(), &mut send);
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(bytes) => shim.receive(&bytes, now(), &mut send),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        shim.poll(now(), &mut send);
    }
}
