//! Files a node (or a gateway) keeps between runs, written so that a crash or a power cut leaves
//! the old content or the new one: a temp file, fsync, rename, fsync the folder.
//!
//! Writing fsyncs, which can take a long time on an SD card: from async code use the `_async`
//! forms, which run on tokio's blocking pool and never stall the runtime thread that serves calls.

use std::io::Write;
use std::path::{Path, PathBuf};

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

/// The last good bundle a node keeps on disk, so it boots and serves under it while the gateway is
/// away: `<state_dir>/policy.toml`, written atomically, with its version in the first line as a
/// comment.
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

    fn path(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    /// Saves bundle `version` atomically (blocking: fsyncs).
    pub fn save(&self, version: u64, toml: &str) -> std::io::Result<()> {
        let mut text = format!("# starling policy version {version}\n");
        text.push_str(toml);
        write_atomic(&self.path(), text.as_bytes(), 0o644)
    }

    /// [`PolicyStore::save`] on the blocking pool.
    pub async fn save_async(&self, version: u64, toml: String) -> std::io::Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.save(version, &toml))
            .await
            .map_err(std::io::Error::other)?
    }

    /// The saved bundle, `(version, toml)`, if there is a readable one.
    pub fn load(&self) -> Option<(u64, String)> {
        let text = std::fs::read_to_string(self.path()).ok()?;
        let (first, rest) = text.split_once('\n')?;
        let version = first
            .strip_prefix("# starling policy version ")?
            .trim()
            .parse()
            .ok()?;
        Some((version, rest.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::new(&dir.path().join("state"));
        assert_eq!(store.load(), None);
        store.save(3, "[defaults]\n").expect("save");
        assert_eq!(store.load(), Some((3, "[defaults]\n".to_owned())));
        store.save(4, "").expect("save");
        assert_eq!(store.load(), Some((4, String::new())));
        assert!(!dir.path().join("state/.policy.toml.tmp").exists());
    }
}
