//! The fault soak (issue 18): five nodes, a gateway and an MQTT broker in the lab, calls at a
//! steady rate from every host, and random faults drawn from a seed: `kill -9` and restart of a
//! node or the gateway, link cuts, 10% UDP loss, a broker restart, a full disk under one node's
//! state folder, steps of one node's wall clock. Then every call is accounted for:
//!
//! - each call a client made ended by its deadline (plus a bound for scheduling): answered with a
//!   status, refused at the ingress (its node was down), or cut (its node died under it); none
//!   hung;
//! - the cloud's record of each node's telemetry (what the gateway commits to its queue before it
//!   acknowledges a batch, counted once by `(node, node_boot, node_seq)`) equals, status by status,
//!   what the node's clients were answered; a node whose counts differ must have announced a gap
//!   (`node_lost_at_restart`, `node_dropped_batches`), and no node is ever counted more than its
//!   clients saw;
//! - no message between the gateway and the cloud went missing (the queue's sequence has no hole
//!   it did not announce).
//!
//! `STARLING_SOAK_SECONDS` sets how long faults are injected (default 300: the CI soak);
//! `STARLING_SOAK_SEED` repeats a run's schedule (the seed is printed first). The broker is
//! stopped with SIGTERM (it saves its sessions): a broker `kill -9` loses what it acknowledged in
//! its last second (mosquitto saves once a second), which is the broker's loss to account for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_tests::lab::{Lab, config as lab_config};
use starling_tests::mqtt::{Broker, PREFIX, Received, SITE, broker, missing_seqs};
use starling_tests::{NodeProc, Pki, bin, http, post};

/// Hosts 0..NODES run nodes `h0`..; host GW runs the gateway and the broker.
const NODES: usize = 5;
const GW: usize = NODES;
/// Node 3's state folder is a small tmpfs that fills up; node 4's wall clock steps.
const DISK_NODE: usize = 3;
const CLOCK_NODE: usize = 4;
/// A call every 50 ms from every host; each with this deadline.
const EVERY: Duration = Duration::from_millis(50);
const DEADLINE_MS: u64 = 2000;
/// Past its deadline, what a call may take to end (scheduling on a loaded 2-core machine, a
/// reply in flight): beyond it, the call hung.
const GRACE: Duration = Duration::from_secs(3);
const UP: Duration = Duration::from_secs(30);

/// xorshift64*: the schedule from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillNode(usize),
    KillGateway,
    CutLink(usize),
    Loss(usize),
    RestartBroker,
    FullDisk,
    ClockStep(i64),
}

impl Fault {
    /// What it holds while in force: two faults on one target never overlap.
    fn target(&self) -> String {
        match self {
            Fault::KillNode(i) => format!("node {i}"),
            Fault::KillGateway => format!("node {GW}"),
            Fault::CutLink(i) => format!("link {i}"),
            Fault::Loss(i) => format!("loss {i}"),
            Fault::RestartBroker => "broker".into(),
            Fault::FullDisk => "disk".into(),
            Fault::ClockStep(_) => "clock".into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Fault::KillNode(_) => "kill -9 and restart of a node",
            Fault::KillGateway => "kill -9 and restart of the gateway",
            Fault::CutLink(_) => "link cut and restored",
            Fault::Loss(_) => "10% UDP loss on a host",
            Fault::RestartBroker => "broker stopped and restarted",
            Fault::FullDisk => "node 3's state folder full",
            Fault::ClockStep(_) => "node 4's wall clock stepped",
        }
    }
}

/// Faults from `seed` over `seconds`: (start, fault, held for).
fn schedule(seed: u64, seconds: u64) -> Vec<(Duration, Fault, Duration)> {
    let mut rng = Rng(seed | 1);
    let mut at = Duration::from_secs(2);
    let mut out = Vec::new();
    // Every kind once, in an order from the seed, then kinds at random.
    let mut first: Vec<u64> = vec![0, 2, 3, 5, 7, 8, 9];
    for i in (1..first.len()).rev() {
        first.swap(i, rng.range(0, i as u64) as usize);
    }
    while at < Duration::from_secs(seconds) {
        let host = rng.range(0, NODES as u64) as usize;
        let kind = first.pop().unwrap_or_else(|| rng.range(0, 9));
        let fault = match kind {
            0 | 1 => Fault::KillNode(host % NODES),
            2 => Fault::KillGateway,
            3 | 4 => Fault::CutLink(host),
            5 | 6 => Fault::Loss(host),
            7 => Fault::RestartBroker,
            8 => Fault::FullDisk,
            _ => Fault::ClockStep([-7200, -1200, 1200, 3 * 3600, 86_400][rng.range(0, 4) as usize]),
        };
        let hold = Duration::from_millis(match fault {
            Fault::Loss(_) | Fault::FullDisk | Fault::ClockStep(_) => rng.range(5_000, 20_000),
            _ => rng.range(1_000, 6_000),
        });
        out.push((at, fault, hold));
        at += Duration::from_millis(rng.range(1_500, 6_000));
    }
    out
}

/// How one call ended, as its client saw it.
#[derive(Debug)]
enum Outcome {
    /// The ingress answered, with this `x-starling-status` (or `http <code>` without one).
    Answered(String),
    /// The ingress did not accept the connection: its node was down.
    Refused,
    /// The connection broke before an answer: its node died under it.
    Cut(String),
    /// No end within the deadline and [`GRACE`].
    Hung(String),
}

#[derive(Debug, Default)]
struct Account {
    answered: BTreeMap<String, u64>,
    refused: u64,
    cut: u64,
    /// Why calls were cut, by the client library's words.
    cut_reasons: BTreeMap<String, u64>,
    hung: Vec<String>,
    made: u64,
}

impl Account {
    fn add(&mut self, o: Outcome) {
        self.made += 1;
        match o {
            Outcome::Answered(s) => *self.answered.entry(s).or_default() += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Cut(why) => {
                self.cut += 1;
                *self.cut_reasons.entry(why).or_default() += 1;
            }
            Outcome::Hung(what) => self.hung.push(what),
        }
    }

    fn answered_total(&self) -> u64 {
        self.answered.values().sum()
    }
}

async fn one_call(ingress: SocketAddr, service: String) -> Outcome {
    let call = post(
        ingress,
        &service,
        "say",
        Bytes::from_static(b"soak"),
        Some(DEADLINE_MS),
    );
    match tokio::time::timeout(Duration::from_millis(DEADLINE_MS) + GRACE, call).await {
        Err(_) => Outcome::Hung(service),
        Ok(Ok((code, status, _))) => {
            Outcome::Answered(status.unwrap_or_else(|| format!("http {code}")))
        }
        Ok(Err(e)) if e.contains("refused") => Outcome::Refused,
        Ok(Err(e)) => Outcome::Cut(e),
    }
}

/// Calls from host `i`'s loopback to its node's ingress until `stop`: every [`EVERY`], to the
/// next other host's service in turn, and to the service every host serves.
async fn client(i: usize, stop: Arc<AtomicBool>) -> Account {
    let ingress: SocketAddr = "127.0.0.1:7480".parse().expect("addr");
    let mut account = Account::default();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut k = 0usize;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        k += 1;
        let service = if k.is_multiple_of(2) {
            "shared".to_owned()
        } else {
            format!("svc-h{}", (i + 1 + (k / 2) % (NODES - 1)) % NODES)
        };
        calls.spawn(one_call(ingress, service));
        while let Some(done) = calls.try_join_next() {
            account.add(done.expect("call task"));
        }
    }
    while let Some(done) = calls.join_next().await {
        account.add(done.expect("call task"));
    }
    account
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// What the cloud side is asked.
enum Ask {
    Stop,
    Start,
    Seen(std::sync::mpsc::Sender<Vec<Received>>),
}

/// The broker and the cloud application, on a thread in the gateway's host (the broker listens
/// on its loopback). Returns the broker's URL and the site's certificate and key.
fn cloud_side(
    lab: &Lab,
    dir: PathBuf,
) -> (
    tokio::sync::mpsc::UnboundedSender<Ask>,
    (String, PathBuf, PathBuf, PathBuf),
    std::thread::JoinHandle<()>,
) {
    let (asks, mut rx) = tokio::sync::mpsc::unbounded_channel::<Ask>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = lab.spawn_in_host(GW, move || {
        let mut broker: Broker = broker(&dir);
        let (crt, key) = broker.pki.issue(SITE, false).expect("issue");
        let _ = ready_tx.send((broker.url(), broker.pki.ca(), crt, key));
        runtime().block_on(async move {
            let app = starling_tests::mqtt::CloudApp::connect(&broker, "soak-app").await;
            while let Some(ask) = rx.recv().await {
                match ask {
                    Ask::Stop => broker.stop(),
                    Ask::Start => broker.restart().expect("the broker restarts"),
                    Ask::Seen(reply) => {
                        let _ = reply.send(app.seen());
                    }
                }
            }
            drop(app);
        });
    });
    let site = ready.recv().expect("the broker starts");
    (asks, site, thread)
}

fn seen(asks: &tokio::sync::mpsc::UnboundedSender<Ask>) -> Vec<Received> {
    let (tx, rx) = std::sync::mpsc::channel();
    asks.send(Ask::Seen(tx)).expect("cloud side");
    rx.recv().expect("cloud side")
}

/// Per node: calls counted by status, and the gap it announced (batches), from the cloud's
/// telemetry, each batch counted once.
fn cloud_counts(seen: &[Received]) -> BTreeMap<String, (BTreeMap<String, u64>, u64)> {
    let mut counted = std::collections::BTreeSet::new();
    let mut calls: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    // (node, boot) -> (most dropped seen, lost at restart)
    let mut gaps: BTreeMap<(String, u64), (u64, u64)> = BTreeMap::new();
    let batches = seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/telemetry"))
        .flat_map(|m| m.json()["batches"].as_array().cloned().expect("batches"));
    for v in batches {
        let node = v["node"].as_str().expect("node").to_owned();
        let boot = v["node_boot"].as_u64().expect("node_boot");
        let gap = gaps.entry((node.clone(), boot)).or_default();
        gap.0 = gap
            .0
            .max(v["node_dropped_batches"].as_u64().expect("dropped"));
        gap.1 = gap.1.max(v["node_lost_at_restart"].as_u64().expect("lost"));
        let id = (
            node.clone(),
            boot,
            v["node_seq"].as_u64().expect("node_seq"),
            v["part"].as_u64().unwrap_or(1),
        );
        if !counted.insert(id) {
            continue;
        }
        for c in v["calls"].as_array().expect("calls") {
            assert_eq!(
                c["caller"],
                node.as_str(),
                "a batch of {node} counted calls of another"
            );
            *calls
                .entry(node.clone())
                .or_default()
                .entry(c["status"].as_str().expect("status").to_owned())
                .or_default() += c["count"].as_u64().expect("count");
        }
    }
    let mut out: BTreeMap<String, (BTreeMap<String, u64>, u64)> = BTreeMap::new();
    for (node, by_status) in calls {
        out.entry(node).or_default().0 = by_status;
    }
    for ((node, _), (dropped, lost)) in gaps {
        out.entry(node).or_default().1 += dropped + lost;
    }
    out
}

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount tmpfs on {}", at.display());
        Tmpfs(at.to_owned())
    }

    /// Fills it to the last byte with a file of its own.
    fn fill(&self) {
        use std::io::Write as _;
        let mut f = std::fs::File::create(self.0.join("filler")).expect("filler");
        let block = vec![0u8; 64 << 10];
        loop {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        // The last partial block, byte by byte.
        while f.write_all(&[0]).is_ok() {}
    }

    fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

struct Site {
    lab: Lab,
    nodes: Vec<Option<NodeProc>>,
    node_confs: Vec<PathBuf>,
    gw: Option<NodeProc>,
    gw_conf: PathBuf,
    clock_file: PathBuf,
    disk: Tmpfs,
}

impl Site {
    fn node_cmd(&self, i: usize) -> Vec<String> {
        let mut cmd = self.lab.exec_prefix(i);
        if i == CLOCK_NODE {
            // Its wall clock follows the offset in clock_file.
            cmd.extend(starling_tests::stepped_clock_env(&self.clock_file));
        }
        cmd.push(bin("mesh-node").display().to_string());
        cmd
    }

    fn start_node(&mut self, i: usize) {
        let cmd = self.node_cmd(i);
        self.nodes[i] = Some(NodeProc::start_cmd(
            &format!("h{i}"),
            &cmd,
            &self.node_confs[i],
        ));
    }

    fn start_gateway(&mut self) {
        let mut cmd = self.lab.exec_prefix(GW);
        cmd.push(bin("mesh-gateway").display().to_string());
        self.gw = Some(NodeProc::start_cmd("gw", &cmd, &self.gw_conf));
    }

    fn gateway_admin(&self) -> SocketAddr {
        self.gw
            .as_ref()
            .and_then(|g| g.admin)
            .expect("gateway admin")
    }

    /// `GET path` on the gateway's admin API (from its host), as JSON.
    fn gateway_get(&self, path: &str) -> serde_json::Value {
        let admin = self.gateway_admin();
        let path = path.to_owned();
        let (code, text) = self.lab.in_host(GW, move || {
            runtime().block_on(http("GET", admin, &path, None, ""))
        });
        assert_eq!(code, 200, "{text}");
        serde_json::from_str(&text).expect("json")
    }
}

#[test]
fn every_call_is_accounted_for_under_random_faults() {
    let seconds: u64 = std::env::var("STARLING_SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("STARLING_SOAK_SECONDS is a number of seconds")
        })
        .unwrap_or(300);
    let seed: u64 = std::env::var("STARLING_SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("STARLING_SOAK_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        });
    eprintln!(
        "soak: seed {seed}, {seconds} s of faults (repeat with STARLING_SOAK_SEED={seed} STARLING_SOAK_SECONDS={seconds})"
    );
    let plan = schedule(seed, seconds);

    let lab = Lab::new(NODES + 1);
    let pki = Pki::new();
    let (asks, (url, ca, crt, key), cloud_thread) = cloud_side(&lab, pki.dir.path().join("broker"));
    let gw_ip = lab.hosts[GW].ip;
    let gw_conf = pki.gateway_config(
        "gw",
        "0.0.0.0:7400",
        &format!(
            "[cloud]\nbroker = \"{url}\"\nclient_id = \"{SITE}\"\ntopic_prefix = \"{PREFIX}\"\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nbatch_interval_ms = 1000\n",
            ca.display(),
            crt.display(),
            key.display()
        ),
    );
    let echo =
        |name: &str| format!("[[services]]\nname = \"{name}\"\nupstream = \"builtin:echo\"\n");
    let node_confs: Vec<PathBuf> = (0..NODES)
        .map(|i| {
            let path = lab_config(
                &pki,
                &format!("h{i}"),
                &format!(
                    "{}{}[telemetry]\ninterval_ms = 1000\n\
                     [limits]\nkeep_alive_ms = 500\nidle_timeout_ms = 1500\n",
                    echo(&format!("svc-h{i}")),
                    echo("shared")
                ),
            );
            starling_tests::prepend(&path, &format!("gateway = \"{gw_ip}:7400\"\n"));
            path
        })
        .collect();
    let clock_file = pki.dir.path().join("h4-clock");
    std::fs::write(&clock_file, "+0\n").expect("clock file");
    let disk = Tmpfs::mount(&pki.dir.path().join(format!("h{DISK_NODE}/state")), "1m");
    let mut site = Site {
        lab,
        nodes: (0..NODES).map(|_| None).collect(),
        node_confs,
        gw: None,
        gw_conf,
        clock_file,
        disk,
    };
    site.start_gateway();
    for i in 0..NODES {
        site.start_node(i);
    }
    for n in site.nodes.iter().flatten() {
        n.wait_gateway(UP);
        // The other nodes and the gateway.
        n.wait_peers(NODES, UP);
    }

    // Calls from every host, all through the run.
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..NODES)
        .map(|i| {
            let stop = stop.clone();
            site.lab
                .spawn_in_host(i, move || runtime().block_on(client(i, stop)))
        })
        .collect();

    // The faults, in time order; each heals after its hold, and none starts on a target that
    // is already faulted.
    let started = Instant::now();
    let mut pending: Vec<(Duration, bool, Fault, usize)> = plan
        .iter()
        .enumerate()
        .flat_map(|(n, (at, f, hold))| [(*at, true, *f, n), (*at + *hold, false, *f, n)])
        .collect();
    pending.sort_by_key(|(at, start, _, _)| (*at, !*start));
    // Target -> the fault holding it: a fault skipped for a busy target is never healed.
    let mut busy: BTreeMap<String, usize> = BTreeMap::new();
    let mut injected: BTreeMap<&'static str, u64> = BTreeMap::new();
    let end = Duration::from_secs(seconds);
    for (at, start, fault, n) in pending {
        // Past the end, only heals.
        if start && at >= end {
            continue;
        }
        if let Some(wait) = at.checked_sub(started.elapsed())
            && at < end
        {
            std::thread::sleep(wait);
        }
        if start {
            if busy.contains_key(&fault.target()) {
                continue;
            }
            busy.insert(fault.target(), n);
        } else if busy.get(&fault.target()) == Some(&n) {
            busy.remove(&fault.target());
        } else {
            continue;
        }
        eprintln!(
            "soak {:>6.1}s: {} {fault:?}",
            started.elapsed().as_secs_f64(),
            if start { "inject" } else { "heal" }
        );
        if start {
            *injected.entry(fault.kind()).or_default() += 1;
        }
        match (fault, start) {
            (Fault::KillNode(i), true) => {
                if let Some(n) = site.nodes[i].take() {
                    n.kill();
                }
            }
            (Fault::KillNode(i), false) => site.start_node(i),
            (Fault::KillGateway, true) => {
                if let Some(g) = site.gw.take() {
                    g.kill();
                }
            }
            (Fault::KillGateway, false) => site.start_gateway(),
            (Fault::CutLink(i), up) => site.lab.set_link(i, !up),
            (Fault::Loss(i), true) => site.lab.drop_udp(i, 10),
            (Fault::Loss(i), false) => site.lab.stop_dropping_udp(i),
            (Fault::RestartBroker, true) => asks.send(Ask::Stop).expect("cloud side"),
            (Fault::RestartBroker, false) => asks.send(Ask::Start).expect("cloud side"),
            (Fault::FullDisk, true) => site.disk.fill(),
            (Fault::FullDisk, false) => site.disk.free(),
            (Fault::ClockStep(s), true) => {
                std::fs::write(&site.clock_file, format!("{s:+}\n")).expect("clock")
            }
            (Fault::ClockStep(_), false) => {
                std::fs::write(&site.clock_file, "+0\n").expect("clock")
            }
        }
    }
    assert!(busy.is_empty(), "faults left unhealed: {busy:?}");

    // Healed: everyone back in touch, then the clients stop.
    for n in site.nodes.iter().flatten() {
        n.wait_gateway(UP);
        // The other nodes and the gateway.
        n.wait_peers(NODES, UP);
    }
    stop.store(true, Ordering::SeqCst);
    let accounts: Vec<Account> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    // A stop on purpose hands the gateway the last interval.
    for n in site.nodes.iter_mut().map(Option::take) {
        let n = n.expect("every node runs");
        let name = n.name.clone();
        assert!(n.stop().success(), "{name} did not stop cleanly");
    }
    // Everything the gateway took reaches the cloud.
    let mut waited = Instant::now();
    loop {
        let cloud = site.gateway_get("/v1/cloud");
        if cloud["connected"] == true && cloud["queue_messages"] == 0 && cloud["inflight"] == 0 {
            break;
        }
        assert!(
            waited.elapsed() < UP,
            "the gateway's cloud queue never drained: {cloud}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = site.gateway_get("/v1/cloud");
    let last_seq = status["last_seq"].as_u64().expect("last_seq");
    assert_eq!(status["dropped_unqueued"], 0, "{status}");
    assert!(
        status["dropped"]
            .as_array()
            .expect("dropped")
            .iter()
            .all(|d| d[1] == 0),
        "the cloud queue dropped messages: {status}"
    );
    waited = Instant::now();
    let seen = loop {
        let seen = seen(&asks);
        let (max, missing) = missing_seqs(&seen);
        if max >= last_seq && missing.is_empty() {
            break seen;
        }
        assert!(
            waited.elapsed() < UP,
            "the cloud has messages up to {max} of {last_seq}, missing {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // The account.
    let cloud = cloud_counts(&seen);
    let mut report = String::new();
    let mut unexplained = Vec::new();
    let (mut made, mut answered, mut refused, mut cut, mut gaps) = (0, 0, 0, 0, 0);
    for (i, account) in accounts.iter().enumerate() {
        let node = format!("h{i}");
        let (counted, gap) = cloud.get(&node).cloned().unwrap_or_default();
        let counted_total: u64 = counted.values().sum();
        made += account.made;
        answered += account.answered_total();
        refused += account.refused;
        cut += account.cut;
        gaps += gap;
        report.push_str(&format!(
            "{node}: made {}, answered {} {:?}, refused {}, cut {} {:?}, hung {}; the cloud counted {counted_total} {counted:?}, gap {gap} batches\n",
            account.made,
            account.answered_total(),
            account.answered,
            account.refused,
            account.cut,
            account.cut_reasons,
            account.hung.len()
        ));
        assert!(
            account.hung.is_empty(),
            "{node}: calls hung past their deadline: {:?}\n{report}",
            account.hung
        );
        // Never more than the clients saw, even with what a dying node might have counted
        // before its client saw the answer.
        assert!(
            counted_total <= account.answered_total() + account.cut,
            "{node} counted more calls than its clients made\n{report}"
        );
        if counted != account.answered {
            // A lost batch holds one interval's calls (1 s: 20 from its client), twice that
            // for slack: a gap explains no more.
            let short = account.answered_total().saturating_sub(counted_total);
            let per_batch = 2 * (1000 / EVERY.as_millis() as u64);
            if gap == 0 || short > gap * per_batch + account.cut {
                unexplained.push(node.clone());
            }
            report.push_str(&format!(
                "  {node}: short by {short} calls, explained by its gap of {gap} batches\n"
            ));
        }
    }
    eprintln!(
        "soak report (seed {seed}, {seconds} s):\nfaults injected: {injected:?}\n\
         calls made {made}: answered {answered}, refused at a dead ingress {refused}, cut by a dying node {cut}, hung 0\n\
         gaps announced {gaps} batches; cloud messages queued {last_seq}, none missing\n{report}"
    );
    assert!(
        unexplained.is_empty(),
        "counts differ by more than their announced gaps explain for {unexplained:?} (seed {seed})\n{report}"
    );
    assert!(
        made > 0 && answered * 2 > made,
        "too few calls answered\n{report}"
    );
    drop(asks);
    cloud_thread.join().expect("cloud side");
}
