//! Every policy bundle the gateway accepted, kept (bounded) in `policy-history.json` in its state
//! folder: its version, epoch, hash, time, where it came from and who sent it, and the operator's
//! text, so an operator can see what changed, diff two versions and roll back to one.
//!
//! The history informs; it never decides what is enforced (the saved bundle does). A damaged
//! history file is set aside (`policy-history.json.damaged`), said in the log and the audit log,
//! and a new history starts.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Entries kept at most.
pub const MAX_ENTRIES: usize = 32;

/// Bytes of policy text kept at most, over every entry (the newest entry is always kept).
pub const MAX_TEXT_BYTES: usize = 4 * 1024 * 1024;

/// One accepted bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Its version.
    pub version: u64,
    /// The gateway epoch it was made in.
    pub epoch: u64,
    /// SHA-256 of the bundle nodes get, hex.
    pub hash: String,
    /// When it was accepted, seconds since the Unix epoch.
    pub at_unix: u64,
    /// Where it came from: `file`, `api`, `cloud`, `revocation`.
    pub source: String,
    /// Who sent it: the admin token's holder, the policy file's path, the cloud's signer.
    pub author: String,
    /// The operator's text (without the deny list the gateway appends).
    pub policy: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    entries: VecDeque<Entry>,
}

/// The history, newest last.
pub struct History {
    path: PathBuf,
    entries: VecDeque<Entry>,
}

impl History {
    /// Reads the history in `dir`; a damaged file is set aside and a new history starts (`Err`
    /// says why, for the log and the audit log, with the history that starts).
    pub fn load(dir: &Path) -> Result<History, (History, String)> {
        let path = dir.join("policy-history.json");
        let fresh = |path: PathBuf| History {
            path,
            entries: VecDeque::new(),
        };
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(file) => Ok(History {
                    path,
                    entries: file.entries,
                }),
                Err(e) => {
                    let aside = dir.join("policy-history.json.damaged");
                    let _ = std::fs::rename(&path, &aside);
                    let why = format!(
                        "{} is damaged ({e}): set aside as {}; a new history starts",
                        path.display(),
                        aside.display()
                    );
                    Err((fresh(path), why))
                }
            },
            Err(_) => Ok(fresh(path)),
        }
    }

    /// Adds `entry` (a version already there is replaced) and drops the oldest past the bounds;
    /// returns the file's new content, to write with [`History::save`].
    pub fn record(&mut self, entry: Entry) -> Vec<u8> {
        self.entries
            .retain(|e| !(e.version == entry.version && e.epoch == entry.epoch));
        self.entries.push_back(entry);
        while self.entries.len() > MAX_ENTRIES
            || (self.entries.len() > 1
                && self.entries.iter().map(|e| e.policy.len()).sum::<usize>() > MAX_TEXT_BYTES)
        {
            self.entries.pop_front();
        }
        self.encoded()
    }

    fn encoded(&self) -> Vec<u8> {
        serde_json::to_vec(&File {
            entries: self.entries.clone(),
        })
        .unwrap_or_default()
    }

    /// Writes `bytes` (from [`History::record`]) atomically, private to the gateway's user.
    pub fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        mesh_node::state::write_atomic(path, bytes, 0o600)
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `version` of `epoch` is recorded.
    pub fn has(&self, epoch: u64, version: u64) -> bool {
        self.entries
            .iter()
            .any(|e| e.epoch == epoch && e.version == version)
    }

    /// Every entry, newest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().rev()
    }

    /// The newest entry of `version` (any epoch: the newest one first).
    pub fn get(&self, version: u64) -> Option<&Entry> {
        self.entries().find(|e| e.version == version)
    }
}

/// A line diff of `old` to `new`: lines kept (`  `), removed (`- `) and added (`+ `), in order
/// (longest common subsequence of what differs between a shared start and end). Past a size where
/// that costs too much (4 million cells), the lines only in one or the other, removed first.
pub fn diff(old: &str, new: &str) -> Vec<String> {
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) =
        (old.lines().collect(), new.lines().collect());
    // The lines both share at the start and at the end cost nothing to match.
    let prefix = old_lines
        .iter()
        .zip(&new_lines)
        .take_while(|(a, b)| a == b)
        .count();
    let suffix = old_lines[prefix..]
        .iter()
        .rev()
        .zip(new_lines[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let a = &old_lines[prefix..old_lines.len() - suffix];
    let b = &new_lines[prefix..new_lines.len() - suffix];
    let mut out: Vec<String> = old_lines[..prefix]
        .iter()
        .map(|l| format!("  {l}"))
        .collect();
    out.extend(middle(a, b));
    out.extend(
        old_lines[old_lines.len() - suffix..]
            .iter()
            .map(|l| format!("  {l}")),
    );
    out
}

/// The diff of what differs between the shared start and end.
fn middle(a: &[&str], b: &[&str]) -> Vec<String> {
    if (a.len() + 1).saturating_mul(b.len() + 1) > 4_000_000 {
        let (in_a, in_b): (
            std::collections::HashSet<&str>,
            std::collections::HashSet<&str>,
        ) = (a.iter().copied().collect(), b.iter().copied().collect());
        let mut out: Vec<String> = a
            .iter()
            .filter(|l| !in_b.contains(*l))
            .map(|l| format!("- {l}"))
            .collect();
        out.extend(
            b.iter()
                .filter(|l| !in_a.contains(*l))
                .map(|l| format!("+ {l}")),
        );
        return out;
    }
    // lcs[i][j]: the longest common subsequence of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(version: u64, policy: &str) -> Entry {
        Entry {
            version,
            epoch: 7,
            hash: "00".into(),
            at_unix: 1,
            source: "api".into(),
            author: "admin token".into(),
            policy: policy.into(),
        }
    }

    #[test]
    fn the_history_is_bounded_kept_and_a_damaged_one_is_set_aside() {
        let dir = tempfile::tempdir().expect("dir");
        let mut h = History::load(dir.path()).unwrap_or_else(|(h, _)| h);
        let mut bytes = Vec::new();
        for v in 1..=(MAX_ENTRIES as u64 + 5) {
            bytes = h.record(entry(v, "a = 1\n"));
        }
        History::save(h.path(), &bytes).expect("save");
        let back = History::load(dir.path()).unwrap_or_else(|(_, why)| panic!("{why}"));
        assert_eq!(back.entries().count(), MAX_ENTRIES);
        assert_eq!(
            back.entries().next().map(|e| e.version),
            Some(MAX_ENTRIES as u64 + 5)
        );
        assert!(back.get(5).is_none() && back.get(6).is_some());
        // The text bound: a huge bundle pushes out older ones, never itself.
        let mut h = back;
        h.record(entry(100, &"x".repeat(MAX_TEXT_BYTES)));
        assert_eq!(h.entries().count(), 1);

        std::fs::write(dir.path().join("policy-history.json"), b"{not json").expect("write");
        let (fresh, why) = History::load(dir.path()).err().expect("damaged");
        assert!(why.contains("damaged"), "{why}");
        assert_eq!(fresh.entries().count(), 0);
        assert!(dir.path().join("policy-history.json.damaged").exists());
    }

    #[test]
    fn a_big_diff_stays_cheap() {
        // Large texts sharing most lines: only the middle is matched line by line.
        let shared: String = (0..20_000).map(|i| format!("k{i} = {i}\n")).collect();
        let old = format!("{shared}x = 1\n{shared}");
        let new = format!("{shared}x = 2\n{shared}");
        let d = diff(&old, &new);
        assert_eq!(d.len(), 40_002);
        assert_eq!(d[20_000..20_002], ["- x = 1", "+ x = 2"]);
        // Nothing shared and too big to match: the lines only in one or the other.
        let a: String = (0..3000).map(|i| format!("a{i}\n")).collect();
        let b: String = (0..3000).map(|i| format!("b{i}\n")).collect();
        let d = diff(&a, &b);
        assert_eq!(d.len(), 6000);
        assert!(d[0].starts_with("- a0") && d[3000].starts_with("+ b0"));
    }

    #[test]
    fn the_diff_keeps_order_and_marks_what_changed() {
        let old = "[authorization]\ndefault = \"deny\"\n[[rate_limits]]\nper_second = 5\n";
        let new = "[authorization]\ndefault = \"allow\"\n[[rate_limits]]\nper_second = 5\n";
        assert_eq!(
            diff(old, new),
            [
                "  [authorization]",
                "- default = \"deny\"",
                "+ default = \"allow\"",
                "  [[rate_limits]]",
                "  per_second = 5",
            ]
        );
    }
}
