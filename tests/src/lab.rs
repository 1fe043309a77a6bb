//! A multi-host lab on one machine: network namespaces on a bridge that lives in a namespace of
//! its own (never attached to the machine's real interfaces), addresses in 198.18.0.0/15.
//!
//! Every name carries a per-run tag, and [`Lab`]'s `Drop` deletes exactly the namespaces it made,
//! also when a test panics. Needs root.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Node `name`'s config for a lab host (see [`crate::Pki::config`], `extra` appended): mDNS on,
/// QUIC on every address of its host at port 7400, the ingress on the host's loopback at 7480.
pub fn config(pki: &crate::Pki, name: &str, extra: &str) -> std::path::PathBuf {
    let path = pki.config(name, extra);
    let src = std::fs::read_to_string(&path).expect("config");
    let src = src
        .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:7400\"")
        .replace("ingress = \"127.0.0.1:0\"", "ingress = \"127.0.0.1:7480\"")
        .replace("mdns = false", "mdns = true");
    std::fs::write(&path, src).expect("config");
    path
}

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub ns: String,
    /// Its address on the lab bridge.
    pub ip: Ipv4Addr,
    /// The bridge-side end of its link, in the bridge namespace.
    veth: String,
}

/// Hosts on one bridge.
pub struct Lab {
    // Labs run one at a time: their timing bounds assume the machine is not shared with another.
    _serial: std::sync::MutexGuard<'static, ()>,
    tag: String,
    bridge_ns: String,
    pub hosts: Vec<Host>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves this thread into network namespace `ns` (one `ip netns` made).
fn enter(ns: &str) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    // SAFETY: setns on a valid descriptor of a network namespace changes only this thread's
    // namespace; the file outlives the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// Panics with a clear message unless this process can make network namespaces.
pub fn require_root() {
    // SAFETY-free check: root's effective uid shows in /proc/self/status.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("");
    assert_eq!(
        euid, "0",
        "lab tests make network namespaces and need root (CI runs them as root)"
    );
    assert!(
        Path::new("/usr/sbin/ip").exists()
            || Path::new("/sbin/ip").exists()
            || Path::new("/usr/bin/ip").exists(),
        "lab tests need iproute2 (scripts/setup.sh installs it)"
    );
}

impl Lab {
    /// Makes `n` hosts, `198.18.<k>.2 ..`, each with `eth0` on the bridge and `lo` up.
    pub fn new(n: usize) -> Lab {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{:x}{k}", std::process::id() & 0xfff);
        let bridge_ns = format!("stl-{tag}-br");
        let mut lab = Lab {
            _serial: serial,
            tag: tag.clone(),
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
        };
        ip(&["netns", "add", &bridge_ns]);
        ip(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        let subnet = 1 + (k % 250) as u8;
        for i in 0..n {
            let ns = format!("stl-{tag}-h{i}");
            let veth = format!("v{tag}h{i}");
            assert!(veth.len() <= 15, "interface name {veth} too long");
            ip(&["netns", "add", &ns]);
            // Record it before anything else can fail, so Drop deletes it.
            let host_ip = Ipv4Addr::new(198, 18, subnet, 2 + i as u8);
            lab.hosts.push(Host {
                ns: ns.clone(),
                ip: host_ip,
                veth: veth.clone(),
            });
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "netns", &bridge_ns]);
            ip(&["-n", &bridge_ns, "link", "set", &veth, "master", "br0"]);
            ip(&["-n", &bridge_ns, "link", "set", &veth, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            // mDNS goes to 224.0.0.251 over eth0.
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        lab
    }

    /// The per-run tag in every name this lab made.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Cuts (`false`) or restores (`true`) host `i`'s link.
    pub fn set_link(&self, i: usize, up: bool) {
        let h = &self.hosts[i];
        ip(&[
            "-n",
            &self.bridge_ns,
            "link",
            "set",
            &h.veth,
            if up { "up" } else { "down" },
        ]);
    }

    /// Drops one in `one_in` UDP packets in and out of host `i` (nftables, random).
    pub fn drop_udp(&self, i: usize, one_in: u32) {
        let ns = &self.hosts[i].ns;
        let rules = format!(
            "table inet starling_loss {{\n\
               chain in {{ type filter hook input priority 0; meta l4proto udp numgen random mod {one_in} == 0 drop; }}\n\
               chain out {{ type filter hook output priority 0; meta l4proto udp numgen random mod {one_in} == 0 drop; }}\n\
             }}\n"
        );
        let file = std::env::temp_dir().join(format!("stl-{}-{i}.nft", self.tag));
        std::fs::write(&file, rules).expect("nft rules");
        run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "nft",
                "-f",
                file.to_str().expect("utf-8"),
            ],
        );
        let _ = std::fs::remove_file(file);
    }

    /// Lets UDP through host `i` again (undoes [`Lab::drop_udp`]).
    pub fn stop_dropping_udp(&self, i: usize) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.hosts[i].ns,
                "nft",
                "delete",
                "table",
                "inet",
                "starling_loss",
            ],
        );
    }

    /// Runs `f` on a thread inside host `i`'s network namespace: the sockets it opens and the
    /// processes it starts are on that host.
    pub fn in_host<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        let ns = self.hosts[i].ns.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&ns);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Like [`Lab::in_host`], on a thread of its own that runs on.
    pub fn spawn_in_host<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = self.hosts[i].ns.clone();
        std::thread::spawn(move || {
            enter(&ns);
            f()
        })
    }

    /// Runs `cmd args` inside host `i`: the prefix to put before a command.
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.hosts[i].ns.clone(),
        ]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge_ns])
            .status();
    }
}
