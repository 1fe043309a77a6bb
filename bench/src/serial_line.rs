//! A call to a microcontroller over a serial line at a real rate: a node (in this process) with a
//! `serial://` upstream, firmware-shim (in a thread of this process) on the other end, and between
//! them two socat pty pairs joined by a proxy that passes bytes no faster than the baud rate
//! allows (8N1: ten bits a byte), each way. Measured: calls a second with a 64-byte body, one at
//! a time (the shim takes one call at a time), against what the line allows for the bytes each
//! call puts on it both ways.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use firmware_shim::{Config, Method, Service, Shim};
use mesh_gateway::ca::Ca;
use mesh_node::{CallOptions, Node, NodeConfig};
use mesh_proto::Status;
use mesh_proto::serial::{Frame, encode};

pub struct SerialFigures {
    pub baud: u32,
    pub calls: usize,
    pub per_second: f64,
    pub allowed_per_second: f64,
    pub bytes_per_call: usize,
    pub p50: Duration,
}

struct Socat(Child);

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pty_pair(a: &Path, b: &Path) -> anyhow::Result<Socat> {
    let child = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stderr(Stdio::null())
        .spawn()
        .context("socat")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(a.exists() && b.exists()) {
        anyhow::ensure!(Instant::now() < deadline, "socat made no pty pair");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Socat(child))
}

fn open(p: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| p.display().to_string())
}

/// Copies `from` to `to`, a byte taking ten bit times at `baud`.
fn throttle(mut from: std::fs::File, mut to: std::fs::File, baud: u32) {
    std::thread::spawn(move || {
        let per_byte = Duration::from_secs_f64(10.0 / f64::from(baud));
        let started = Instant::now();
        // When the line is free for the next byte.
        let mut next = Duration::ZERO;
        let mut buf = [0u8; 64];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for b in &buf[..n] {
                let now = started.elapsed();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
                if to.write_all(std::slice::from_ref(b)).is_err() {
                    return;
                }
                next += per_byte;
            }
        }
    });
}

fn echo(body: &[u8], out: &mut [u8]) -> Result<usize, Status> {
    out[..body.len()].copy_from_slice(body);
    Ok(body.len())
}

static SERVICES: &[Service] = &[Service {
    name: "sensor",
    methods: &[Method {
        name: "echo",
        handler: echo,
    }],
}];

/// The microcontroller: firmware-shim on `device`, in a thread.
fn mcu(device: &Path) -> anyhow::Result<()> {
    let line = open(device)?;
    let mut writer = line.try_clone()?;
    let mut reader = line;
    std::thread::spawn(move || {
        let mut shim = Shim::<1024, 256>::new(Config {
            name: "bench-mcu",
            firmware: "0.1.0",
            services: SERVICES,
            heartbeat_ms: 1000,
            key: None,
        });
        let started = Instant::now();
        let mut send = |bytes: &[u8]| {
            let _ = writer.write_all(bytes);
        };
        shim.start(0, &mut send);
        let mut buf = [0u8; 64];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = started.elapsed().as_millis() as u32;
            shim.receive(&buf[..n], now, &mut send);
            shim.poll(now, &mut send);
        }
    });
    Ok(())
}

pub fn measure(baud: u32, calls: usize) -> anyhow::Result<SerialFigures> {
    let dir = tempfile::tempdir()?;
    let p = |name: &str| dir.path().join(name);
    let _node_pair = pty_pair(&p("node"), &p("node-far"))?;
    let _mcu_pair = pty_pair(&p("mcu-near"), &p("mcu"))?;
    let (near, far) = (open(&p("node-far"))?, open(&p("mcu-near"))?);
    throttle(near.try_clone()?, far.try_clone()?, baud);
    throttle(far, near, baud);
    mcu(&p("mcu"))?;

    let ca = Ca::generate("serial.bench")?;
    let nd = p("node-b");
    ca.issue_node("node-b", 1)?
        .save(&nd.join("certs"), ca.cert_pem())?;
    let conf = nd.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "name = \"node-b\"\nlisten = \"127.0.0.1:0\"\ningress = \"off\"\nlog = \"warn\"\nstate_dir = \"state\"\n\
             [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
             [discovery]\nmdns = false\n[[services]]\nname = \"sensor\"\nupstream = \"serial://{}?baud={baud}\"\n",
            p("node").display()
        ),
    )?;
    let config = NodeConfig::load(&conf)?;
    let identity = config.load_identity()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let body = bytes::Bytes::from(vec![0x5a; 64]);
    let figures = rt.block_on(async {
        let node = Node::start(config, identity).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.hosted().iter().any(|s| s.as_str() == "sensor") {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the microcontroller never announced"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let options = CallOptions::default();
        let mut latencies = Vec::with_capacity(calls);
        let started = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            let reply = node
                .call_with("sensor", "echo", body.clone(), &options)
                .await;
            anyhow::ensure!(
                reply.status == Status::Ok,
                "a call failed: {}",
                reply.message
            );
            latencies.push(t.elapsed());
        }
        let elapsed = started.elapsed();
        node.shutdown().await;
        latencies.sort();
        Ok::<_, anyhow::Error>((elapsed, latencies[latencies.len() / 2]))
    })?;
    let (elapsed, p50) = figures;
    // The bytes a call puts on the line: its request and its reply, as encoded.
    let line_len = |frame: &Frame<'_>| {
        let (mut scratch, mut out) = ([0u8; 512], [0u8; 600]);
        encode(frame, &mut scratch, &mut out).unwrap_or(0)
    };
    let request = line_len(&Frame::Call {
        id: 300,
        service: 0,
        method: 0,
        body: &body,
    });
    let reply = line_len(&Frame::Reply {
        id: 300,
        status: Status::Ok,
        body: &body,
    });
    let bytes_per_call = request + reply;
    Ok(SerialFigures {
        baud,
        calls,
        per_second: calls as f64 / elapsed.as_secs_f64(),
        allowed_per_second: f64::from(baud) / 10.0 / bytes_per_call as f64,
        bytes_per_call,
        p50,
    })
}

impl SerialFigures {
    pub fn print(&self) {
        println!(
            "\nserial line at {} baud (8N1, paced by a proxy), 64-byte bodies, one call at a time:\n  \
             {:.1} calls/s, {:.0}% of the {:.1} calls/s the line allows for the {} bytes a call \
             puts on it (request and reply); p50 {:.1} ms over {} calls",
            self.baud,
            self.per_second,
            self.per_second / self.allowed_per_second * 100.0,
            self.allowed_per_second,
            self.bytes_per_call,
            self.p50.as_secs_f64() * 1e3,
            self.calls,
        );
    }
}
