//! `tcp://host:port`: a service that speaks its own protocol over TCP (Modbus TCP, OPC UA, SSH,
//! MQTT). It is reached through a TCP forward on the calling node (`[[forwards]]`, or
//! `mesh-node forward`): each TCP connection accepted there is one QUIC stream to an endpoint of
//! the service, opened with a head that names the service and the method `connect` (so
//! authorization, rate limits and audit apply as to any call) and flagged as a tunnel. The hosting
//! node connects to the upstream and answers `Ok`, or `Unavailable` when the upstream refuses (the
//! caller's breaker counts it and the forward tries another endpoint); after that head the stream
//! carries the connection's raw bytes both ways.
//!
//! Half-close is preserved end to end: a side that shuts down its writing half ends its QUIC send
//! stream (FIN), and the far side shuts down the writing half of its TCP connection; bytes still
//! flow the other way until that side closes too. An abort on either side (a TCP reset, a QUIC
//! stream reset, a failed write) resets the other (a QUIC stream reset, a TCP RST), so no side
//! takes a connection cut short for a whole one. A connection with no bytes either way for the idle
//! timeout is closed on both sides (the hosting node's `limits.tcp_idle_timeout_ms` and the
//! forward's `idle_timeout_ms`: the shorter wins). Memory per connection is one read buffer each
//! way (64 KiB) plus what QUIC's flow control lets through: a slow reader on either side slows the
//! writer, it never grows a buffer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest read from a TCP connection, and from a QUIC stream, in one go.
const READ_BYTES: usize = 64 * 1024;

/// Parses `tcp://host:port`.
pub(crate) fn parse(s: &str) -> Result<String, String> {
    let rest = s.strip_prefix("tcp://").unwrap_or(s);
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || rest.contains('/') {
        return Err(format!(
            "{s:?}: a tcp upstream is a host and a port and nothing else, like tcp://127.0.0.1:502"
        ));
    }
    Ok(rest.to_owned())
}

/// Connects to a TCP upstream within `timeout`.
pub(crate) async fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, String> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(authority))
        .await
        .map_err(|_| format!("connecting to tcp://{authority} timed out after {timeout:?}"))?
        .map_err(|e| format!("tcp://{authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Which end of a tunnel a pump runs at: where the bytes it reads from TCP go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The forward: its TCP peer is the local client, so TCP bytes go to the service.
    Forward,
    /// The hosting node: its TCP peer is the upstream, so TCP bytes come from the service.
    Upstream,
}

/// Bytes that crossed a tunnel, and when anything last did.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// From the local client to the service.
    pub(crate) to_service: AtomicU64,
    /// From the service to the local client.
    pub(crate) from_service: AtomicU64,
    /// Milliseconds after the pump started when a byte last crossed.
    last_ms: AtomicU64,
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides closed (each half-close carried across).
    Closed,
    /// Nothing crossed for the idle timeout.
    Idle,
    /// A side aborted, or a write failed; the other side was reset.
    Aborted(String),
}

/// A QUIC send stream that is reset when dropped unless it was finished: dropping a quinn stream
/// would finish it, and a far side must not take an abort for a clean half-close.
pub(crate) struct SendHalf(pub(crate) Option<quinn::SendStream>);

impl SendHalf {
    /// The stream, no longer reset on drop.
    pub(crate) fn keep(mut self) -> Option<quinn::SendStream> {
        self.0.take()
    }

    fn get(&mut self) -> Option<&mut quinn::SendStream> {
        self.0.as_mut()
    }

    fn finish(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.finish();
        }
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        if let Some(mut s) = self.0.take() {
            let _ = s.reset(0u32.into());
        }
    }
}

/// Carries bytes between `tcp` and a QUIC stream until both sides have closed, one aborts, or
/// nothing crosses for `idle`. `leftover` is what was read from the QUIC stream past the heads.
/// `report` is called at least once a second with the bytes that crossed since its last call
/// (to the service, from the service), and once at the end.
pub(crate) async fn pump(
    tcp: TcpStream,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    leftover: Bytes,
    idle: Duration,
    end: End,
    mut report: impl FnMut(u64, u64),
) -> Ended {
    let flow = Flow::default();
    let started = Instant::now();
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    // What comes in from QUIC goes out to TCP, and the other way round.
    let (quic_in, tcp_in) = match end {
        End::Forward => (&flow.from_service, &flow.to_service),
        End::Upstream => (&flow.to_service, &flow.from_service),
    };
    let touch = || {
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        flow.last_ms.store(ms, Ordering::Relaxed);
    };
    let quic_to_tcp = async {
        if !leftover.is_empty() {
            tcp_write
                .write_all(&leftover)
                .await
                .map_err(|e| format!("writing to TCP: {e}"))?;
            quic_in.fetch_add(leftover.len() as u64, Ordering::Relaxed);
        }
        // QUIC hands data over per packet (about 1.2 kB): gathered into one buffer, it costs one
        // TCP write per read, not one per packet.
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    tcp_write
                        .write_all(&buf[..n])
                        .await
                        .map_err(|e| format!("writing to TCP: {e}"))?;
                    quic_in.fetch_add(n as u64, Ordering::Relaxed);
                    touch();
                }
                Ok(None) => {
                    // The far side half-closed: so does this one.
                    let _ = tcp_write.shutdown().await;
                    return Ok::<_, String>(());
                }
                Err(e) => return Err(format!("the far side ended the tunnel: {e}")),
            }
        }
    };
    let tcp_to_quic = async {
        let mut send = SendHalf(Some(send));
        let mut buf = BytesMut::with_capacity(READ_BYTES);
        loop {
            if buf.capacity() < READ_BYTES / 4 {
                buf.reserve(READ_BYTES);
            }
            let n = tcp_read
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading from TCP: {e}"))?;
            let Some(stream) = send.get() else {
                return Ok(());
            };
            if n == 0 {
                send.finish();
                return Ok::<_, String>(());
            }
            let chunk = buf.split().freeze();
            stream
                .write_chunk(chunk)
                .await
                .map_err(|e| format!("the far side stopped reading: {e}"))?;
            tcp_in.fetch_add(n as u64, Ordering::Relaxed);
            touch();
        }
    };
    let check = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut reported_to, mut reported_from) = (0, 0);
    let mut flush = |flow: &Flow| {
        let to = flow.to_service.load(Ordering::Relaxed);
        let from = flow.from_service.load(Ordering::Relaxed);
        if (to, from) != (reported_to, reported_from) {
            report(to - reported_to, from - reported_from);
            (reported_to, reported_from) = (to, from);
        }
    };
    let ended = {
        let mut quic_to_tcp = std::pin::pin!(quic_to_tcp);
        let mut tcp_to_quic = std::pin::pin!(tcp_to_quic);
        let (mut in_done, mut out_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut quic_to_tcp, if !in_done => match r {
                    Ok(()) => in_done = true,
                    Err(e) => break Ended::Aborted(e),
                },
                r = &mut tcp_to_quic, if !out_done => match r {
                    Ok(()) => out_done = true,
                    Err(e) => break Ended::Aborted(e),
                },
                _ = tick.tick() => {
                    flush(&flow);
                    let last = Duration::from_millis(flow.last_ms.load(Ordering::Relaxed));
                    if started.elapsed().saturating_sub(last) >= idle {
                        break Ended::Idle;
                    }
                }
            }
            if in_done && out_done {
                break Ended::Closed;
            }
        }
        // The halves dropped here reset the QUIC side (`SendHalf`) and stop its reading.
    };
    flush(&flow);
    if matches!(ended, Ended::Aborted(_)) {
        // The TCP side too is reset, not closed: a peer must not take a connection cut short
        // for a whole one (dropping the write half would send a FIN).
        if let Ok(stream) = tcp_read.reunite(tcp_write) {
            let _ = stream.set_zero_linger();
        }
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_upstreams() {
        assert_eq!(parse("tcp://127.0.0.1:502").as_deref(), Ok("127.0.0.1:502"));
        assert_eq!(
            parse("tcp://plc.local:4840").as_deref(),
            Ok("plc.local:4840")
        );
        for bad in [
            "tcp://127.0.0.1",
            "tcp://:502",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:502/x",
            "tcp://127.0.0.1:99999",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("tcp://127.0.0.1:502"), "{e}");
        }
    }
}
