//! Admin tokens: the gateway's own (`admin_token_file`, named `local`, for the commands run on
//! the gateway's machine) and named ones for people and tools (`alice`, `ci`), so the policy
//! history and the audit log say who changed what.
//!
//! Named tokens are made and revoked with the local token only (`mesh-gateway admin-token`), shown
//! once, and kept as SHA-256 hashes in `state/gateway/admin-tokens.json` (mode 0600, written
//! atomically): the file holds nothing a reader could present. A damaged file turns every named
//! token off (the local one still works) and is reported, never taken as an empty list to be
//! overwritten.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::lock;

use serde::{Deserialize, Serialize};

/// The name the gateway's own token goes by.
pub const LOCAL: &str = "local";
/// Named tokens kept at most.
const MAX_TOKENS: usize = 256;
/// The file's size at most (256 tokens take about 40 KB).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The tokens the admin API takes.
pub struct AdminTokens {
    local: String,
    path: PathBuf,
    state: Mutex<State>,
    /// Held by a change while it writes the file (the state's lock is not, so requests are not
    /// held up by a write).
    writing: Mutex<()>,
}

struct State {
    named: Vec<Named>,
    /// Why the file could not be read; named tokens are off until it is fixed.
    damaged: Option<String>,
}

#[derive(Clone, Serialize, Deserialize)]
struct Named {
    name: String,
    /// SHA-256 of the token, hex.
    sha256: String,
    created_unix: u64,
    created_by: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: u32,
    tokens: Vec<Named>,
}

fn sha256_hex(token: &str) -> String {
    mesh_node::state::hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A valid token name: 1 to 64 of `a-z 0-9 . _ -`, starting with a letter or digit.
fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        return Err(format!(
            "{:?}: a token name is 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter \
             or digit",
            mesh_node::process::printable(name)
        ));
    }
    if name == LOCAL {
        return Err(format!(
            "{LOCAL:?} is the gateway's own token (its admin_token_file)"
        ));
    }
    Ok(())
}

impl AdminTokens {
    /// The local token and the named ones kept at `path`. A damaged file is reported by
    /// [`AdminTokens::damaged`], and turns the named tokens off.
    pub fn open(local: String, path: &Path) -> Self {
        let read = std::fs::File::open(path).and_then(|f| {
            use std::io::Read;
            let mut bytes = Vec::new();
            f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
            if bytes.len() as u64 > MAX_FILE_BYTES {
                return Err(std::io::Error::other(format!(
                    "larger than {MAX_FILE_BYTES} bytes"
                )));
            }
            Ok(bytes)
        });
        let state = match read {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                named: Vec::new(),
                damaged: None,
            },
            Err(e) => State {
                named: Vec::new(),
                damaged: Some(format!("{}: {e}", path.display())),
            },
            Ok(bytes) => match Self::parse(&bytes) {
                Ok(named) => State {
                    named,
                    damaged: None,
                },
                Err(e) => State {
                    named: Vec::new(),
                    damaged: Some(format!("{}: {e}", path.display())),
                },
            },
        };
        AdminTokens {
            local,
            path: path.to_owned(),
            state: Mutex::new(state),
            writing: Mutex::new(()),
        }
    }

    fn parse(bytes: &[u8]) -> Result<Vec<Named>, String> {
        let file: File = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if file.version != 1 {
            return Err(format!("version {} is not known", file.version));
        }
        if file.tokens.len() > MAX_TOKENS {
            return Err(format!("more than {MAX_TOKENS} tokens"));
        }
        for (i, t) in file.tokens.iter().enumerate() {
            check_name(&t.name).map_err(|e| format!("token {i}: {e}"))?;
            if t.sha256.len() != 64
                || !t
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "token {:?}: sha256 is not 64 lower-case hex digits",
                    t.name
                ));
            }
            check_name(&t.created_by)
                .or_else(|e| {
                    if t.created_by == LOCAL {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| format!("token {:?}: created_by {e}", t.name))?;
            if file.tokens[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("token {:?} is listed twice", t.name));
            }
        }
        Ok(file.tokens)
    }

    /// Why the file of named tokens could not be read, if it could not.
    pub fn damaged(&self) -> Option<String> {
        lock(&self.state).damaged.clone()
    }

    /// Who presents `token`: [`LOCAL`], a named token's name, or nobody.
    pub fn who(&self, token: &str) -> Option<String> {
        if constant_time_eq(token.as_bytes(), self.local.as_bytes()) {
            return Some(LOCAL.to_owned());
        }
        let hash = sha256_hex(token);
        let state = lock(&self.state);
        // Every entry is compared, so the time taken says nothing of which one matched.
        let mut found = None;
        for t in &state.named {
            if constant_time_eq(hash.as_bytes(), t.sha256.as_bytes()) {
                found = Some(t.name.clone());
            }
        }
        found
    }

    /// Makes a token named `name`; returns it (shown once: only its hash is kept).
    pub fn create(&self, name: &str, by: &str) -> Result<String, String> {
        check_name(name)?;
        let _writing = lock(&self.writing);
        let mut named = {
            let state = lock(&self.state);
            if let Some(why) = &state.damaged {
                return Err(format!(
                    "the named tokens' file is damaged ({why}): fix or remove it first"
                ));
            }
            if state.named.iter().any(|t| t.name == name) {
                return Err(format!("a token named {name:?} exists: revoke it first"));
            }
            if state.named.len() >= MAX_TOKENS {
                return Err(format!(
                    "{MAX_TOKENS} named tokens exist: revoke some first"
                ));
            }
            state.named.clone()
        };
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| "no randomness".to_owned())?;
        let token = format!("sgt_{}", mesh_node::state::hex(&bytes));
        named.push(Named {
            name: name.to_owned(),
            sha256: sha256_hex(&token),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            created_by: by.to_owned(),
        });
        self.save(&named)?;
        lock(&self.state).named = named;
        Ok(token)
    }

    /// Revokes the token named `name`; false if there is none.
    pub fn revoke(&self, name: &str) -> Result<bool, String> {
        let _writing = lock(&self.writing);
        let named: Vec<Named> = {
            let state = lock(&self.state);
            if let Some(why) = &state.damaged {
                return Err(format!(
                    "the named tokens' file is damaged ({why}): fix or remove it first"
                ));
            }
            if !state.named.iter().any(|t| t.name == name) {
                return Ok(false);
            }
            state
                .named
                .iter()
                .filter(|t| t.name != name)
                .cloned()
                .collect()
        };
        self.save(&named)?;
        lock(&self.state).named = named;
        Ok(true)
    }

    /// The named tokens (never the tokens or their hashes).
    pub fn list(&self) -> serde_json::Value {
        let state = lock(&self.state);
        serde_json::json!({
            "tokens": state.named.iter().map(|t| serde_json::json!({
                "name": t.name,
                "created_unix": t.created_unix,
                "created_by": t.created_by,
            })).collect::<Vec<_>>(),
            "damaged": state.damaged,
        })
    }

    fn save(&self, named: &[Named]) -> Result<(), String> {
        let file = File {
            version: 1,
            tokens: named.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        mesh_node::state::write_atomic(&self.path, &bytes, 0o600)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_tokens_are_kept_as_hashes_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("admin-tokens.json");
        let tokens = AdminTokens::open("local-secret".into(), &path);
        assert_eq!(tokens.who("local-secret").as_deref(), Some(LOCAL));
        let alice = tokens.create("alice", LOCAL).expect("create");
        assert!(alice.starts_with("sgt_") && alice.len() == 68);
        assert_eq!(tokens.who(&alice).as_deref(), Some("alice"));
        assert_eq!(tokens.who("sgt_00"), None);
        assert!(tokens.create("alice", LOCAL).is_err(), "a second alice");
        assert!(tokens.create("local", LOCAL).is_err());
        assert!(tokens.create("Bad Name", LOCAL).is_err());
        let text = std::fs::read_to_string(&path).expect("file");
        assert!(!text.contains(&alice), "the token itself was written");

        let again = AdminTokens::open("local-secret".into(), &path);
        assert_eq!(again.who(&alice).as_deref(), Some("alice"));
        assert!(again.revoke("alice").expect("revoke"));
        assert!(!again.revoke("alice").expect("revoke"));
        assert_eq!(again.who(&alice), None);
        assert_eq!(
            AdminTokens::open("local-secret".into(), &path).who(&alice),
            None
        );
    }

    #[test]
    fn a_damaged_file_turns_named_tokens_off_and_is_not_overwritten() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("admin-tokens.json");
        let tokens = AdminTokens::open("l".into(), &path);
        let alice = tokens.create("alice", LOCAL).expect("create");
        let text = std::fs::read_to_string(&path).expect("file");
        std::fs::write(&path, &text[..text.len() / 2]).expect("cut");
        let damaged = AdminTokens::open("l".into(), &path);
        assert!(damaged.damaged().is_some());
        assert_eq!(damaged.who(&alice), None);
        assert_eq!(damaged.who("l").as_deref(), Some(LOCAL));
        assert!(damaged.create("bob", LOCAL).is_err());
        assert!(damaged.revoke("alice").is_err());
        assert_eq!(
            std::fs::read_to_string(&path).expect("file"),
            text[..text.len() / 2]
        );
    }
}
