//! Crash-safety of the files a node and a gateway keep: a process killed (`SIGKILL`) at any
//! point while it writes one leaves the old content or the new one, never a damaged file taken
//! as good, and the next write goes through whatever the crash left behind. One loop per way of
//! writing:
//!
//! - the saved policy (`write_atomic`: temporary file, fsync, rename, fsync of the folder; the
//!   time floor and the join tokens are written the same way), judged by its checksum header;
//! - a node's key and certificate, rotated together (two files and a rename), judged by the pair
//!   loading as an identity whose key is the certificate's;
//! - the gateway's named admin tokens, created and revoked, judged by which tokens work;
//! - the gateway's cloud queue (a redb database), pushed to and acknowledged, judged by which
//!   messages it holds.
//!
//! Each loop runs this test binary as a child that writes until it is killed at a random point
//! (the seed is printed), 40 or 60 times. A kill is not a power cut: the page cache survives it
//! (see docs/RELIABILITY.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_gateway::admin_tokens::AdminTokens;
use mesh_gateway::cloud::queue::{Bounds, Class, Queue};
use mesh_node::identity::renew::{CredentialFiles, finish_interrupted_rotation, write_credentials};
use mesh_node::state::{PolicyStore, SavedBundle, bundle_hash};
use mesh_proto::control::BundleRef;

/// The child's job, when the parent starts this test binary with it set: `<job> <folder>`.
const CHILD: &str = "STARLING_CRASH_CHILD";

/// If this process is a child, does its job (never returns).
fn child_if_asked() {
    let Ok(job) = std::env::var(CHILD) else {
        return;
    };
    let (job, dir) = job.split_once(' ').expect("job and folder");
    let dir = Path::new(dir);
    match job {
        "policy" => child(dir),
        "credentials" => credentials_child(dir),
        "tokens" => tokens_child(dir),
        "queue" => queue_child(dir),
        other => panic!("no job {other}"),
    }
}

/// The seed of a loop's kill times: from the clock, printed.
fn seed() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("seed {seed} (the kill times are drawn from it)");
    seed
}

/// Runs test `test` of this binary as a child doing `job` in `dir`, and kills it (`SIGKILL`) a
/// random 0-20 ms after it printed its first line (its first write is done, others under way).
/// Returns every line it printed with `crash: ` (that prefix taken off).
fn run_and_kill(test: &str, job: &str, dir: &Path, state: &mut u64) -> Vec<String> {
    let mut c = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", test, "--nocapture"])
        .env(CHILD, format!("{job} {}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = c.stdout.take().expect("the child's output");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        // Only the job's own lines: libtest prints its own too.
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(said) = line.strip_prefix("crash: ") {
                let _ = tx.send(said.to_owned());
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("{job}: the child wrote nothing in 30 s"));
    // The kill lands after a random 0-20 ms more (the fault under test, not a wait).
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    std::thread::sleep(Duration::from_micros(*state % 20_000));
    c.kill().expect("SIGKILL");
    c.wait().expect("reaped");
    reader.join().expect("reader");
    let mut lines = vec![first];
    lines.extend(rx.try_iter());
    lines
}

/// A bundle whose text says its version, padded so that writes take long enough to be cut.
fn bundle(version: u64) -> SavedBundle {
    let mut toml = format!("# version {version}\n");
    toml.push_str(&"# padding padding padding padding padding padding padding\n".repeat(2000));
    SavedBundle {
        id: BundleRef {
            epoch: 1,
            version,
            hash: bundle_hash(&toml),
        },
        toml,
    }
}

fn child(dir: &Path) -> ! {
    let store = PolicyStore::new(dir);
    let start = store.load().ok().flatten().map_or(1, |b| b.id.version + 1);
    for version in start.. {
        store.save(&bundle(version)).expect("save");
        // Tells the parent a save finished: it starts its random delay after the first.
        println!("crash: saved {version}");
    }
    unreachable!("versions ran out")
}

#[test]
fn a_node_killed_while_saving_its_policy_keeps_the_old_or_the_new_bundle() {
    child_if_asked();
    let dir = tempfile::tempdir().expect("dir");
    let store = PolicyStore::new(dir.path());
    let seed = seed();
    let mut state = seed;
    let mut newest = 0;
    let rounds = 60;
    for round in 0..rounds {
        run_and_kill(
            "a_node_killed_while_saving_its_policy_keeps_the_old_or_the_new_bundle",
            "policy",
            dir.path(),
            &mut state,
        );
        match store.load() {
            Ok(Some(saved)) => {
                assert_eq!(
                    saved,
                    bundle(saved.id.version),
                    "round {round}, seed {seed}"
                );
                assert!(
                    saved.id.version >= newest,
                    "round {round}: version {} after {newest} (seed {seed})",
                    saved.id.version
                );
                newest = saved.id.version;
            }
            Ok(None) => assert_eq!(
                newest, 0,
                "round {round}: the bundle vanished (seed {seed})"
            ),
            Err(damaged) => panic!("round {round}: {damaged:?} (seed {seed})"),
        }
    }
    // Every round saved at least once before its kill.
    assert!(newest >= rounds, "only {newest} saves in {rounds} rounds");
    // Whatever the last kill left (a temporary file), the next save and load go through.
    let started = Instant::now();
    store
        .save(&bundle(newest + 1))
        .expect("save after the kills");
    assert_eq!(
        store.load().expect("loads").expect("a bundle").id.version,
        newest + 1
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

// ---- A node's key and certificate, rotated together ----

fn credential_files(dir: &Path) -> CredentialFiles {
    CredentialFiles {
        cert: dir.join("certs/node.crt"),
        key: dir.join("certs/node.key"),
        ca: dir.join("certs/ca.crt"),
    }
}

fn pair_path(dir: &Path, v: usize, ext: &str) -> PathBuf {
    dir.join(format!("pairs/{v}.{ext}"))
}

/// Which pair's certificate `cert` is (the pairs are made by the parent, each with its own key).
fn pair_of(dir: &Path, cert: &str) -> Option<usize> {
    (0..)
        .map_while(|v| {
            std::fs::read_to_string(pair_path(dir, v, "crt"))
                .ok()
                .map(|c| (v, c))
        })
        .find(|(_, c)| c == cert)
        .map(|(v, _)| v)
}

/// Rotates to pair after pair (each a new key), from the one the files hold, printing each done.
fn credentials_child(dir: &Path) -> ! {
    let files = credential_files(dir);
    let now = pair_of(dir, &std::fs::read_to_string(&files.cert).expect("cert")).expect("known");
    for v in now + 1.. {
        let Ok(cert) = std::fs::read_to_string(pair_path(dir, v, "crt")) else {
            break;
        };
        let key = std::fs::read_to_string(pair_path(dir, v, "key")).expect("key");
        write_credentials(&files, &cert, Some(&key)).expect("write");
        println!("crash: saved {v}");
    }
    println!("crash: exhausted");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_node_killed_while_rotating_its_key_keeps_a_key_and_certificate_that_match() {
    child_if_asked();
    let pki = starling_tests::Pki::new();
    let dir = tempfile::tempdir().expect("dir");
    let dir = dir.path();
    std::fs::create_dir_all(dir.join("pairs")).expect("pairs");
    let pairs = 800;
    for v in 0..pairs {
        let issued = pki.ca.issue_node("rotor", 1).expect("issue");
        std::fs::write(pair_path(dir, v, "crt"), &issued.cert_pem).expect("pair");
        std::fs::write(pair_path(dir, v, "key"), &issued.key_pem).expect("pair");
    }
    let files = credential_files(dir);
    std::fs::create_dir_all(dir.join("certs")).expect("certs");
    std::fs::copy(pair_path(dir, 0, "crt"), &files.cert).expect("cert");
    std::fs::copy(pair_path(dir, 0, "key"), &files.key).expect("key");
    std::fs::write(&files.ca, pki.ca.cert_pem()).expect("ca");
    let seed = seed();
    let mut state = seed;
    let mut newest = 0;
    let mut rounds = 0;
    while rounds < 40 {
        let lines = run_and_kill(
            "a_node_killed_while_rotating_its_key_keeps_a_key_and_certificate_that_match",
            "credentials",
            dir,
            &mut state,
        );
        rounds += 1;
        // What the next start does first.
        finish_interrupted_rotation(&files);
        if let Err(e) = mesh_node::Identity::load(&files.cert, &files.key, &files.ca) {
            panic!("round {rounds}: the files do not load as an identity: {e} (seed {seed})");
        }
        let cert = std::fs::read_to_string(&files.cert).expect("cert");
        let v = pair_of(dir, &cert).expect("a certificate of the pairs");
        assert_eq!(
            std::fs::read_to_string(&files.key).expect("key"),
            std::fs::read_to_string(pair_path(dir, v, "key")).expect("pair key"),
            "round {rounds}: the key is not the certificate's (seed {seed})"
        );
        let saved = lines
            .iter()
            .filter_map(|l| l.strip_prefix("saved ")?.parse::<usize>().ok())
            .max()
            .expect("a save");
        assert!(
            v == saved || v == saved + 1,
            "round {rounds}: holds pair {v}, the child had saved {saved} (seed {seed})"
        );
        assert!(v >= newest, "round {rounds}: pair {v} after {newest}");
        newest = v;
        if lines.iter().any(|l| l == "exhausted") {
            break;
        }
    }
    assert!(
        rounds >= 20,
        "only {rounds} rounds before the pairs ran out"
    );
    assert!(!dir.join("certs/node.key.next").exists());
}

// ---- The gateway's named admin tokens ----

fn tokens_path(dir: &Path) -> PathBuf {
    dir.join("admin-tokens.json")
}

/// Creates tokens `t<n>` from after the newest there is, revoking the one made eight before.
fn tokens_child(dir: &Path) -> ! {
    let tokens = AdminTokens::open("the-local-token".into(), &tokens_path(dir));
    let start = tokens.list()["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["name"].as_str()?.strip_prefix('t')?.parse::<u64>().ok())
        .max()
        .map_or(0, |n| n + 1);
    for v in start.. {
        let token = tokens.create(&format!("t{v}"), "crash").expect("create");
        println!("crash: created {v} {token}");
        if v >= 8 {
            tokens.revoke(&format!("t{}", v - 8)).expect("revoke");
            println!("crash: revoked {}", v - 8);
        }
    }
    unreachable!("names ran out")
}

#[test]
fn a_gateway_killed_while_changing_its_admin_tokens_keeps_the_old_or_the_new_set() {
    child_if_asked();
    let dir = tempfile::tempdir().expect("dir");
    let seed = seed();
    let mut state = seed;
    // Token by number (unknown for a creation that landed as the child was killed), and
    // whether it is revoked (reported, or seen).
    let mut made: BTreeMap<u64, (Option<String>, bool)> = BTreeMap::new();
    for round in 0..40 {
        let lines = run_and_kill(
            "a_gateway_killed_while_changing_its_admin_tokens_keeps_the_old_or_the_new_set",
            "tokens",
            dir.path(),
            &mut state,
        );
        for line in &lines {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["created", v, token] => {
                    made.insert(v.parse().expect("n"), (Some((*token).to_owned()), false));
                }
                ["revoked", v] => made.entry(v.parse().expect("n")).or_default().1 = true,
                _ => panic!("the child said {line:?}"),
            }
        }
        let tokens = AdminTokens::open("the-local-token".into(), &tokens_path(dir.path()));
        assert_eq!(
            tokens.damaged(),
            None,
            "round {round}: the file is damaged (seed {seed})"
        );
        // The revocation after the newest creation may have been under way at the kill: what
        // the file says of it is taken as done or not done.
        let newest = *made.keys().next_back().expect("a token");
        let under_way = newest.checked_sub(8);
        for (v, (token, revoked)) in made.iter_mut() {
            let Some(token) = token else { continue };
            let who = tokens.who(token);
            if Some(*v) == under_way && !*revoked {
                *revoked = who.is_none();
            } else if *revoked {
                assert_eq!(who, None, "round {round}: t{v} works after its revocation");
            } else {
                assert_eq!(
                    who.as_deref(),
                    Some(format!("t{v}").as_str()),
                    "round {round}: t{v} was lost (seed {seed})"
                );
            }
        }
        assert_eq!(tokens.who("the-local-token").as_deref(), Some("local"));
    }
}

// ---- The gateway's cloud queue ----

fn queue_bounds() -> Bounds {
    Bounds {
        max_bytes: 64 << 20,
        max_messages: 100_000,
        ttl_ms: [0; 4],
    }
}

/// Pushes messages and acknowledges the oldest after every third, printing each done.
fn queue_child(dir: &Path) -> ! {
    let mut queue = Queue::open(dir, queue_bounds()).expect("open");
    loop {
        let seq = queue
            .push(Class::Telemetry, "t", 1, |seq, _| {
                format!("message {seq}").into_bytes()
            })
            .expect("push");
        println!("crash: pushed {seq}");
        if seq.is_multiple_of(3) {
            let oldest = queue.next(1).expect("next");
            let (s, _) = oldest.first().expect("a message");
            queue.ack(*s).expect("ack");
            println!("crash: acked {s}");
        }
    }
}

#[test]
fn a_gateway_killed_while_queueing_for_the_cloud_keeps_every_message_it_took() {
    child_if_asked();
    let dir = tempfile::tempdir().expect("dir");
    let seed = seed();
    let mut state = seed;
    let mut pushed = BTreeSet::new();
    let mut acked = BTreeSet::new();
    for round in 0..40 {
        let lines = run_and_kill(
            "a_gateway_killed_while_queueing_for_the_cloud_keeps_every_message_it_took",
            "queue",
            dir.path(),
            &mut state,
        );
        let before = pushed.last().copied().unwrap_or(0);
        // Acks are not flushed on their own (a lost one makes a message go again); the next
        // push flushes them. Those after the last push may come back.
        let mut unflushed = Vec::new();
        for line in &lines {
            match line.split_once(' ') {
                Some(("pushed", s)) => {
                    let s: u64 = s.parse().expect("seq");
                    assert!(
                        s > before,
                        "round {round}: seq {s} again after a restart (seed {seed})"
                    );
                    pushed.insert(s);
                    unflushed.clear();
                }
                Some(("acked", s)) => {
                    let s = s.parse::<u64>().expect("seq");
                    acked.insert(s);
                    unflushed.push(s);
                }
                _ => panic!("the child said {line:?}"),
            }
        }
        let queue = Queue::open(dir.path(), queue_bounds()).unwrap_or_else(|e| {
            panic!("round {round}: the queue does not open: {e} (seed {seed})")
        });
        let held: BTreeMap<u64, Vec<u8>> = queue
            .next(1_000_000)
            .expect("read")
            .into_iter()
            .map(|(s, m)| (s, m.payload))
            .collect();
        for (s, payload) in &held {
            assert_eq!(
                *payload,
                format!("message {s}").into_bytes(),
                "round {round}"
            );
            if acked.contains(s) {
                assert!(
                    unflushed.contains(s),
                    "round {round}: {s} is back after its ack and a push after it (seed {seed})"
                );
                // It goes again: waiting once more.
                acked.remove(s);
            }
            let newest = pushed.last().copied().unwrap_or(0);
            assert!(
                pushed.contains(s) || *s == newest + 1,
                "round {round}: {s} was never pushed (seed {seed})"
            );
        }
        // What was pushed and not acknowledged is there, but for the oldest, whose ack may have
        // been under way at the kill.
        let waiting: Vec<u64> = pushed.difference(&acked).copied().collect();
        let missing: Vec<u64> = waiting
            .iter()
            .copied()
            .filter(|s| !held.contains_key(s))
            .collect();
        assert!(
            missing.is_empty() || missing == [waiting[0]],
            "round {round}: lost {missing:?} (seed {seed})"
        );
        // An ack under way at the kill that did land: it is acked now.
        acked.extend(missing);
        // A push under way that did land.
        if let Some((s, _)) = held.iter().next_back() {
            pushed.insert(*s);
        }
    }
    assert!(pushed.len() >= 40, "only {} pushes", pushed.len());
}
