//! Files a node (or a gateway) keeps between runs, written so that a crash or a power cut leaves
//! the old content or the new one: a temp file, fsync, rename, fsync the folder.
//!
//! Writing fsyncs, which can take a long time on an SD card: from async code use the `_async`
//! forms, which run on tokio's blocking pool and never stall the runtime thread that serves calls.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use mesh_proto::control::BundleRef;

/// Writes `contents` to `path` atomically, with `mode` (Unix); creates the folder if needed.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = options.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// SHA-256 of a policy bundle's text: what identifies it (with the gateway epoch and version).
pub fn bundle_hash(toml: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, toml.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

/// A hash as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A policy bundle as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedBundle {
    /// Which bundle it is.
    pub id: BundleRef,
    /// Its text.
    pub toml: String,
}

/// Why a saved bundle cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Damaged {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The last good bundle a node (or a gateway) keeps on disk: `<dir>/policy.toml`, written
/// atomically, its first line a header with the bundle's epoch, version, length and SHA-256:
///
/// ```text
/// # starling policy epoch 7361 version 4 length 120 sha256 9f86d0...
/// ```
///
/// Loading checks the header, the length and the hash: a file cut short, flipped bits, or bytes
/// from elsewhere are [`Damaged`], never taken as a smaller policy. A missing file is no bundle.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
}

impl PolicyStore {
    /// A store in `dir` (created when first written).
    pub fn new(dir: &Path) -> Self {
        PolicyStore {
            dir: dir.to_owned(),
        }
    }

    /// The folder it writes into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file it keeps the bundle in.
    pub fn path(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    /// Saves `bundle` atomically (blocking: fsyncs).
    pub fn save(&self, bundle: &SavedBundle) -> std::io::Result<()> {
        let mut text = format!(
            "# starling policy epoch {} version {} length {} sha256 {}\n",
            bundle.id.epoch,
            bundle.id.version,
            bundle.toml.len(),
            hex(&bundle.id.hash)
        );
        text.push_str(&bundle.toml);
        write_atomic(&self.path(), text.as_bytes(), 0o600)
    }

    /// [`PolicyStore::save`] on the blocking pool.
    pub async fn save_async(&self, bundle: SavedBundle) -> std::io::Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.save(&bundle))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The saved bundle: `Ok(None)` if there is none, `Err` if the file is there but cannot be
    /// trusted (unreadable, damaged, from an older format).
    pub fn load(&self) -> Result<Option<SavedBundle>, Damaged> {
        let path = self.path();
        let damaged = |reason: String| Damaged {
            path: path.display().to_string(),
            reason,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(damaged(format!("cannot read: {e}"))),
        };
        let text = String::from_utf8(bytes).map_err(|_| damaged("not UTF-8 text".into()))?;
        let (header, toml) = text
            .split_once('\n')
            .ok_or_else(|| damaged("no header line".into()))?;
        let fields: Vec<&str> = header.split_whitespace().collect();
        let (epoch, version, length, hash) = match fields.as_slice() {
            [
                "#",
                "starling",
                "policy",
                "epoch",
                e,
                "version",
                v,
                "length",
                l,
                "sha256",
                h,
            ] => (e.parse::<u64>(), v.parse::<u64>(), l.parse::<usize>(), *h),
            ["#", "starling", "policy", "version", v] => {
                // Written by a node before bundles carried a checksum: taken once (it was written
                // atomically) and rewritten in the current form, so an upgrade does not black
                // out a node whose gateway is not upgraded yet.
                let version = v
                    .parse::<u64>()
                    .map_err(|_| damaged(format!("bad version in {header:?}")))?;
                let bundle = SavedBundle {
                    id: BundleRef {
                        epoch: 0,
                        version,
                        hash: bundle_hash(toml),
                    },
                    toml: toml.to_owned(),
                };
                tracing::warn!(
                    "{}: saved in the older form without a checksum; taken once and rewritten",
                    path.display()
                );
                if let Err(e) = self.save(&bundle) {
                    tracing::warn!("cannot rewrite {}: {e}", path.display());
                }
                return Ok(Some(bundle));
            }
            _ => return Err(damaged(format!("not a bundle header: {header:?}"))),
        };
        let (Ok(epoch), Ok(version), Ok(length)) = (epoch, version, length) else {
            return Err(damaged(format!("bad numbers in the header {header:?}")));
        };
        if toml.len() != length {
            return Err(damaged(format!(
                "the bundle is {} bytes, its header says {length}",
                toml.len()
            )));
        }
        let actual = bundle_hash(toml);
        if hex(&actual) != hash {
            return Err(damaged(
                "the bundle's SHA-256 does not match its header".into(),
            ));
        }
        Ok(Some(SavedBundle {
            id: BundleRef {
                epoch,
                version,
                hash: actual,
            },
            toml: toml.to_owned(),
        }))
    }
}

/// A state folder held by one running node: `<state_dir>/node.lock`, locked (an advisory lock the
/// kernel drops when the process dies) for as long as the node runs, and holding `key=value` lines
/// that say who holds it and where it listens (`pid`, `name`, `quic`, `ingress`, `admin`), for
/// operators, `status` commands and tests.
///
/// Two nodes on one machine that share a state folder would boot under each other's saved policy:
/// the second is refused, with the holder named.
#[derive(Debug)]
pub struct StateLock {
    file: std::fs::File,
    path: PathBuf,
    entries: BTreeMap<String, String>,
}

/// Why a state folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another running process holds it.
    #[error("state dir {dir} is in use by {holder}; give each node its own state_dir")]
    Held {
        /// The folder.
        dir: String,
        /// Who holds it, as its lock file says.
        holder: String,
    },
    /// It cannot be created or written.
    #[error("state dir {dir}: {source}")]
    Io {
        /// The folder.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl StateLock {
    /// Takes the lock on `dir` (created if missing, mode 0700) for this process, named `name`.
    pub fn acquire(dir: &Path, name: &str) -> Result<StateLock, StateError> {
        let io = |source| StateError::Io {
            dir: dir.display().to_string(),
            source,
        };
        create_private_dir(dir).map_err(io)?;
        let path = dir.join("node.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let entries = parse_entries(&text);
                let holder = match (entries.get("name"), entries.get("pid")) {
                    (Some(n), Some(p)) => format!("node {n} (pid {p})"),
                    _ => "another process".to_owned(),
                };
                return Err(StateError::Held {
                    dir: dir.display().to_string(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut lock = StateLock {
            file,
            path,
            entries: BTreeMap::new(),
        };
        lock.set("pid", &std::process::id().to_string());
        lock.set("name", name);
        Ok(lock)
    }

    /// Records `key=value` (an address this node listens on) in the lock file.
    pub fn set(&mut self, key: &str, value: &str) {
        self.entries.insert(key.to_owned(), value.to_owned());
        let text: String = self
            .entries
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        // The file is informative: a failure to write it is logged, not fatal.
        let written = self
            .file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .and_then(|()| self.file.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", self.path.display());
        }
    }

    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a lock file's `key=value` lines (for tools and tests).
pub fn read_lock_file(dir: &Path) -> Option<BTreeMap<String, String>> {
    std::fs::read_to_string(dir.join("node.lock"))
        .ok()
        .map(|t| parse_entries(&t))
}

fn parse_entries(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(version: u64, toml: &str) -> SavedBundle {
        SavedBundle {
            id: BundleRef {
                epoch: 7,
                version,
                hash: bundle_hash(toml),
            },
            toml: toml.to_owned(),
        }
    }

    #[test]
    fn store_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::new(&dir.path().join("state"));
        assert_eq!(store.load(), Ok(None));
        store.save(&bundle(3, "[defaults]\n")).expect("save");
        assert_eq!(store.load(), Ok(Some(bundle(3, "[defaults]\n"))));
        store.save(&bundle(4, "")).expect("save");
        assert_eq!(store.load(), Ok(Some(bundle(4, ""))));
        assert!(!dir.path().join("state/.policy.toml.tmp").exists());
    }

    #[test]
    fn a_damaged_bundle_is_never_taken_as_a_smaller_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::new(dir.path());
        let toml = "[authorization]\ndefault = \"deny\"\n[[authorization.rules]]\nname = \"r\"\neffect = \"allow\"\n";
        store.save(&bundle(2, toml)).expect("save");
        let good = std::fs::read(store.path()).expect("read");
        let header_len = good.iter().position(|b| *b == b'\n').expect("header") + 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("cut at a line boundary", good[..header_len + 23].to_vec()),
            ("cut mid-line", good[..good.len() - 3].to_vec()),
            ("a flipped bit", {
                let mut b = good.clone();
                b[header_len + 5] ^= 0x01;
                b
            }),
            (
                "random bytes",
                (0..200u32).map(|i| (i * 37 % 251) as u8).collect(),
            ),
            ("empty", Vec::new()),
        ];
        for (what, bytes) in cases {
            std::fs::write(store.path(), &bytes).expect("write");
            let result = store.load();
            assert!(result.is_err(), "{what}: taken as {result:?}");
        }
    }

    #[test]
    fn the_older_form_is_taken_once_and_rewritten_with_a_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::new(dir.path());
        std::fs::write(
            store.path(),
            "# starling policy version 5\n[defaults]\ncall_timeout_ms = 9\n",
        )
        .expect("write");
        let taken = store.load().expect("legacy").expect("bundle");
        assert_eq!((taken.id.epoch, taken.id.version), (0, 5));
        let rewritten = std::fs::read_to_string(store.path()).expect("read");
        assert!(rewritten.starts_with("# starling policy epoch 0 version 5 length"));
        assert_eq!(store.load().expect("load"), Some(taken));
    }

    #[test]
    fn a_state_dir_is_held_by_one_node_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let mut first = StateLock::acquire(&state, "node-a").expect("first");
        first.set("quic", "127.0.0.1:7400");
        let e = StateLock::acquire(&state, "node-b").expect_err("second");
        let pid = std::process::id();
        assert_eq!(
            e.to_string(),
            format!(
                "state dir {} is in use by node node-a (pid {pid}); give each node its own state_dir",
                state.display()
            )
        );
        let seen = read_lock_file(&state).expect("lock file");
        assert_eq!(seen.get("quic").map(String::as_str), Some("127.0.0.1:7400"));
        drop(first);
        StateLock::acquire(&state, "node-b").expect("free again");
    }
}
