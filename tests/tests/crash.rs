//! Crash-safety of the files a node keeps: a process killed (`SIGKILL`) at any point while it
//! saves its policy leaves the old bundle or the new one, never a damaged file taken as good, and
//! the next save goes through whatever the crash left behind.
//!
//! Every file a node or gateway writes goes through `mesh_node::state::write_atomic` (temporary
//! file, fsync, rename, fsync of the folder); the saved policy is the one whose damage costs
//! most (a node refuses every call until its gateway sends a good bundle), so it is the one the
//! loop checks, with its checksum header as the judge. A kill is not a power cut: the page cache
//! survives it (see docs/RELIABILITY.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_node::state::{PolicyStore, SavedBundle, bundle_hash};
use mesh_proto::control::BundleRef;

/// The child's job, when the parent starts this test binary with it set: save bundles of
/// growing versions into the folder named, forever.
const CHILD: &str = "STARLING_CRASH_CHILD";

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
        println!("saved {version}");
    }
    unreachable!("versions ran out")
}

#[test]
fn a_node_killed_while_saving_its_policy_keeps_the_old_or_the_new_bundle() {
    if let Some(dir) = std::env::var_os(CHILD) {
        child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().expect("dir");
    let store = PolicyStore::new(dir.path());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("seed {seed} (the kill times are drawn from it)");
    let mut state = seed;
    let mut newest = 0;
    let rounds = 60;
    for round in 0..rounds {
        let mut c = Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "--exact",
                "a_node_killed_while_saving_its_policy_keeps_the_old_or_the_new_bundle",
                "--nocapture",
            ])
            .env(CHILD, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = c.stdout.take().expect("the child's output");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if line.starts_with("saved ") && tx.send(()).is_err() {
                    break;
                }
            }
        });
        // Saving has begun (one save is done, the next under way) ...
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("round {round}: the child saved nothing in 30 s"));
        // ... and the kill lands after a random 0-20 ms more (the fault under test, not a wait).
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        std::thread::sleep(Duration::from_micros(state % 20_000));
        c.kill().expect("SIGKILL");
        c.wait().expect("reaped");
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
