//! `firmware-shim`: puts a microcontroller's services on the Starling mesh through the node it is
//! wired to (UART, USB CDC). `#![no_std]`, no allocator: every buffer is sized at compile time.
//!
//! The core is sans-I/O: bytes in ([`Shim::receive`]), frames out (the `tx` callback), time passed
//! in (`now_ms`). [`Shim::pump`] drives it over any UART that implements the `embedded-io` traits,
//! so it runs on any HAL, embassy or not.
//!
//! ```text
//! static SERVICES: &[Service] = &[Service {
//!     name: "sensor",
//!     methods: &[Method { name: "read", handler: read }],
//! }];
//! let mut shim = Shim::<256, 128>::new(Config { name: "mcu-1", firmware: "0.1.0",
//!                                                 services: SERVICES, heartbeat_ms: 1000,
//!                                                 key: None });
//! loop { shim.pump(&mut uart, now_ms()); }
//! ```
//!
//! What the link promises (see `mesh_proto::serial`): every frame is checked (CRC-32) and
//! delimited (COBS), so noise, lost bytes and half frames cost only the frame they hit; a reset
//! microcontroller announces itself unasked, and a restarted node asks ([`Frame::Discover`]); a
//! call repeated with the same id (the node retried a lost frame of an idempotent method) is
//! answered from a small replay cache, without running the handler twice.
#![no_std]

use heapless::{Deque, Vec};
use mesh_proto::Status;
pub use mesh_proto::serial::Key;
use mesh_proto::serial::{Decoder, MAX_METHODS, MAX_SERVICES, encode_keyed};
pub use mesh_proto::serial::{Dropped, Frame, SERIAL_VERSION, ServiceDecl};

/// A method's handler: the request body in, the reply body written into `out`; the bytes
/// written, or the status to answer with.
pub type Handler = fn(body: &[u8], out: &mut [u8]) -> Result<usize, Status>;

/// One method of a service.
pub struct Method {
    /// Its name.
    pub name: &'static str,
    /// What answers it.
    pub handler: Handler,
}

/// One service the microcontroller hosts.
pub struct Service {
    /// Its name.
    pub name: &'static str,
    /// Its methods (at most 4).
    pub methods: &'static [Method],
}

/// Who the microcontroller is and what it serves, fixed at compile time.
pub struct Config {
    /// Its name on the mesh: `spiffe://<td>/node/<node>/leaf/<name>`.
    pub name: &'static str,
    /// Its firmware version.
    pub firmware: &'static str,
    /// Its services (at most 4).
    pub services: &'static [Service],
    /// A heartbeat every this many milliseconds.
    pub heartbeat_ms: u32,
    /// The key this microcontroller shares with its node (feature `psk`): every frame is tagged
    /// with it, and frames without its tag are dropped. None: frames are not authenticated.
    pub key: Option<&'static Key>,
}

/// Replies remembered for repeated request ids.
const REPLAY: usize = 4;

struct Replayed<const B: usize> {
    id: u16,
    status: Status,
    body: Vec<u8, B>,
}

/// The microcontroller's side of the link. `RX` is the longest frame it reads (encoded), `B`
/// the longest body it answers (and remembers for repeats).
pub struct Shim<const RX: usize = 256, const B: usize = 128> {
    config: Config,
    decoder: Decoder<RX>,
    replay: Deque<Replayed<B>, REPLAY>,
    /// A reply body being written by a handler.
    body: [u8; B],
    /// A frame's postcard bytes, then its bytes on the line.
    scratch: [u8; RX],
    line: [u8; RX],
    last_heartbeat: Option<u32>,
    /// Calls answered since start.
    pub calls: u32,
    /// Repeated calls answered from the replay cache.
    pub replayed: u32,
}

impl<const RX: usize, const B: usize> Shim<RX, B> {
    /// A shim for `config`.
    pub const fn new(config: Config) -> Self {
        let decoder = match config.key {
            Some(key) => Decoder::with_key(*key),
            None => Decoder::new(),
        };
        Shim {
            config,
            decoder,
            replay: Deque::new(),
            body: [0; B],
            scratch: [0; RX],
            line: [0; RX],
            last_heartbeat: None,
            calls: 0,
            replayed: 0,
        }
    }

    /// Frames dropped since start: too long, garbled, bad checksum, unknown, unauthenticated.
    pub fn dropped(&self) -> [u32; 5] {
        self.decoder.dropped
    }

    /// Announces the microcontroller (at start: a reset is announced unasked).
    pub fn start(&mut self, now_ms: u32, tx: &mut impl FnMut(&[u8])) {
        self.last_heartbeat = Some(now_ms);
        announce(&self.config, &mut self.scratch, &mut self.line, tx);
    }

    /// Takes bytes read from the line, answering every frame they complete.
    pub fn receive(&mut self, bytes: &[u8], now_ms: u32, tx: &mut impl FnMut(&[u8])) {
        let Shim {
            config,
            decoder,
            replay,
            body,
            scratch,
            line,
            calls,
            replayed,
            ..
        } = self;
        let _ = now_ms;
        decoder.feed(
            bytes,
            |frame| match frame {
                Frame::Discover => announce(config, scratch, line, tx),
                Frame::Call {
                    id,
                    service,
                    method,
                    body: request,
                } => {
                    if let Some(r) = replay.iter().find(|r| r.id == id) {
                        *replayed += 1;
                        send(
                            config.key,
                            &Frame::Reply {
                                id,
                                status: r.status,
                                body: &r.body,
                            },
                            scratch,
                            line,
                            tx,
                        );
                        return;
                    }
                    let handler = config
                        .services
                        .get(usize::from(service))
                        .and_then(|s| s.methods.get(usize::from(method)))
                        .map(|m| m.handler);
                    let (status, n) = match handler {
                        None => (Status::NotFound, 0),
                        Some(h) => match h(request, body) {
                            Ok(n) => (Status::Ok, n.min(B)),
                            Err(status) => (status, 0),
                        },
                    };
                    *calls += 1;
                    if replay.is_full() {
                        replay.pop_front();
                    }
                    let _ = replay.push_back(Replayed {
                        id,
                        status,
                        body: Vec::from_slice(&body[..n]).unwrap_or_default(),
                    });
                    send(
                        config.key,
                        &Frame::Reply {
                            id,
                            status,
                            body: &body[..n],
                        },
                        scratch,
                        line,
                        tx,
                    );
                }
                Frame::Refuse { reason } => {
                    let _ = reason;
                    #[cfg(feature = "defmt")]
                    defmt::warn!("the node refused this microcontroller: {}", reason);
                }
                // A node's heartbeat, or frames only a node reads.
                _ => {}
            },
            |_why| {
                #[cfg(feature = "defmt")]
                defmt::debug!("dropped a frame: {}", _why);
            },
        );
    }

    /// Sends a heartbeat when one is due.
    pub fn poll(&mut self, now_ms: u32, tx: &mut impl FnMut(&[u8])) {
        let due = self
            .last_heartbeat
            .is_none_or(|last| now_ms.wrapping_sub(last) >= self.config.heartbeat_ms);
        if due {
            self.last_heartbeat = Some(now_ms);
            send(
                self.config.key,
                &Frame::Heartbeat { uptime_ms: now_ms },
                &mut self.scratch,
                &mut self.line,
                tx,
            );
        }
    }

    /// One turn over a UART: reads what is there (without blocking), answers it, sends a
    /// heartbeat when due. Call it in the main loop (or a task).
    pub fn pump<U>(&mut self, uart: &mut U, now_ms: u32) -> Result<(), U::Error>
    where
        U: embedded_io::Read + embedded_io::ReadReady + embedded_io::Write,
    {
        let mut failed = None;
        let mut tx = |bytes: &[u8]| {
            if failed.is_none()
                && let Err(e) = uart.write_all(bytes)
            {
                failed = Some(e);
            }
        };
        if self.last_heartbeat.is_none() {
            self.start(now_ms, &mut tx);
        }
        self.poll(now_ms, &mut tx);
        if let Some(e) = failed {
            return Err(e);
        }
        let mut buf = [0u8; 32];
        while uart.read_ready()? {
            let n = uart.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let mut failed = None;
            self.receive(&buf[..n], now_ms, &mut |bytes: &[u8]| {
                if failed.is_none()
                    && let Err(e) = uart.write_all(bytes)
                {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }
}

fn announce<const RX: usize>(
    config: &Config,
    scratch: &mut [u8; RX],
    line: &mut [u8; RX],
    tx: &mut impl FnMut(&[u8]),
) {
    let mut services: Vec<ServiceDecl<'_>, MAX_SERVICES> = Vec::new();
    for s in config.services.iter().take(MAX_SERVICES) {
        let mut methods: Vec<&str, MAX_METHODS> = Vec::new();
        for m in s.methods.iter().take(MAX_METHODS) {
            let _ = methods.push(m.name);
        }
        let _ = services.push(ServiceDecl {
            name: s.name,
            methods,
        });
    }
    send(
        config.key,
        &Frame::Announce {
            version: SERIAL_VERSION,
            name: config.name,
            firmware: config.firmware,
            services,
            max_in_flight: 1,
            heartbeat_ms: config.heartbeat_ms,
        },
        scratch,
        line,
        tx,
    );
}

fn send<const RX: usize>(
    key: Option<&Key>,
    frame: &Frame<'_>,
    scratch: &mut [u8; RX],
    line: &mut [u8; RX],
    tx: &mut impl FnMut(&[u8]),
) {
    if let Ok(n) = encode_keyed(frame, key, scratch, line) {
        tx(&line[..n]);
    }
}
