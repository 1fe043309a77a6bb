//! Errors in a config or policy file that a technician can act on: `file:line: key: message`.
//!
//! Every TOML file the mesh reads (a node's config, a gateway's, a policy bundle) is parsed with
//! [`SourceMap`] at hand, so a bad value, an unknown key, a wrong type or a missing key names the
//! file, the line and the dotted key (`identity.key`, `services[1].upstream`).
//!
//! A file read by two programs (a gateway's config holds a node's keys and its own) is checked for
//! unknown top-level keys with [`check_top_level_keys`], each program naming the keys it owns.

use toml::Spanned;

/// A config error: which file, which line, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("{file}: cannot read: {reason}")]
    Read {
        /// The config file.
        file: String,
        /// The I/O error.
        reason: String,
    },
    /// A key holds something unacceptable.
    #[error("{file}:{line}: {key}: {message}")]
    Invalid {
        /// The config file.
        file: String,
        /// 1-based line of the offending key; 0 when no line applies.
        line: usize,
        /// The key, dotted (`identity.key`, `services[1].upstream`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    /// An error about `key` with no line to point at.
    pub fn unplaced(file: &str, key: &str, message: impl ToString) -> Self {
        ConfigError::Invalid {
            file: file.to_owned(),
            line: 0,
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// Turns byte offsets into lines and keys, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct SourceMap<'a> {
    /// The text being parsed.
    pub src: &'a str,
    /// Its name in messages (a path, or `PUT /v1/policy`).
    pub file: &'a str,
}

impl SourceMap<'_> {
    /// The 1-based line of byte `offset`.
    pub fn line(&self, offset: usize) -> usize {
        self.src[..offset.min(self.src.len())].matches('\n').count() + 1
    }

    /// An error about the value `at`, which the file holds under `key`.
    pub fn invalid<T>(&self, at: &Spanned<T>, key: &str, message: impl ToString) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: self.line(at.span().start),
            key: key.to_owned(),
            message: message.to_string(),
        }
    }

    /// A toml parse or type error, with the key found from the span and the table around it.
    pub fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_owned();
        let Some(span) = e.span() else {
            return ConfigError::Invalid {
                file: self.file.to_owned(),
                line: 0,
                key: missing_field(&message).unwrap_or("(document)").to_owned(),
                message,
            };
        };
        let line = self.line(span.start);
        let line_start = self.src[..span.start.min(self.src.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line_text = self.src[line_start..].lines().next().unwrap_or("").trim();
        let table = self.src[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
        let own_key = if line_text.starts_with('[') {
            None
        } else {
            line_text
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_owned())
        };
        let header = if line_text.starts_with('[') {
            Some(
                line_text
                    .trim_matches(|c| c == '[' || c == ']')
                    .trim()
                    .to_owned(),
            )
        } else {
            table
        };
        let leaf = own_key.or_else(|| missing_field(&message).map(str::to_owned));
        let key = match (header, leaf) {
            (Some(t), Some(k)) => format!("{t}.{k}"),
            (Some(t), None) => t,
            (None, Some(k)) => k,
            (None, None) => "(document)".to_owned(),
        };
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line,
            key,
            message,
        }
    }
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Checks that every top-level key of the TOML document `src` is in `known`; the first one that
/// is not is an error naming its line, with `hint` as the message.
pub fn check_top_level_keys(
    at: &SourceMap<'_>,
    known: &[&str],
    hint: &str,
) -> Result<(), ConfigError> {
    let doc = toml::de::DeTable::parse(at.src).map_err(|e| at.toml_error(&e))?;
    let mut unknown: Vec<(usize, String)> = doc
        .get_ref()
        .iter()
        .filter(|(k, _)| !known.contains(&k.get_ref().as_ref()))
        .map(|(k, _)| (k.span().start, k.get_ref().to_string()))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some((offset, key)) => Err(ConfigError::Invalid {
            file: at.file.to_owned(),
            line: at.line(*offset),
            key: key.clone(),
            message: hint.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_top_level_keys_are_named_with_their_line() {
        let src = "a = 1\n[b]\nx = 1\n[[c]]\ny = 2\n";
        let at = SourceMap {
            src,
            file: "f.toml",
        };
        assert_eq!(check_top_level_keys(&at, &["a", "b", "c"], "no"), Ok(()));
        let e = check_top_level_keys(&at, &["a"], "not a key here").expect_err("b");
        assert_eq!(e.to_string(), "f.toml:2: b: not a key here");
        let e = check_top_level_keys(&at, &["b", "c"], "gone").expect_err("a");
        assert_eq!(e.to_string(), "f.toml:1: a: gone");
    }
}
