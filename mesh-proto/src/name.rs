//! The one rule for node, service, method and label names.

use crate::limits::MAX_NAME_LEN;

/// Why a name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    TooLong(usize),
    /// The name holds a byte outside `A-Z a-z 0-9 - _ .` (a slash, a space, ...).
    BadChar(char),
    /// The name does not start with a letter or digit.
    BadStart,
}

impl core::fmt::Display for NameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NameError::Empty => f.write_str("name is empty"),
            NameError::TooLong(n) => {
                write!(
                    f,
                    "name is {n} bytes long, at most {MAX_NAME_LEN} are allowed"
                )
            }
            NameError::BadChar(c) => write!(
                f,
                "name holds {c:?}; only letters, digits, '-', '_' and '.' are allowed"
            ),
            NameError::BadStart => f.write_str("name must start with a letter or a digit"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for NameError {}

/// Checks a node, service or method name: 1 to 63 bytes of `A-Z a-z 0-9 - _ .`, starting with a
/// letter or digit. Names end up in SPIFFE IDs, mDNS instance names and metric labels, so they
/// carry no slashes, spaces or control characters.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.len()));
    }
    // Bytes, not chars: every allowed character is one ASCII byte, so the first byte outside
    // them starts the character to name (a name is checked on every call, both sides).
    if let Some(at) = name
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
    {
        let c = name
            .get(at..)
            .and_then(|rest| rest.chars().next())
            .unwrap_or(char::REPLACEMENT_CHARACTER);
        return Err(NameError::BadChar(c));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(NameError::BadStart);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for n in ["a", "node-a", "sensor.temp", "Read_Holding", "x1"] {
            assert_eq!(validate_name(n), Ok(()), "{n}");
        }
    }

    #[test]
    fn refuses_slashes_spaces_and_long_names() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(validate_name("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(validate_name("-a"), Err(NameError::BadStart));
        let long = "a".repeat(64);
        assert_eq!(validate_name(&long), Err(NameError::TooLong(64)));
        assert_eq!(validate_name(&long[..63]), Ok(()));
    }

    #[test]
    fn a_refused_character_is_named_whole() {
        assert_eq!(validate_name("café"), Err(NameError::BadChar('é')));
        assert_eq!(
            validate_name("a\u{1F600}b"),
            Err(NameError::BadChar('\u{1F600}'))
        );
        assert_eq!(validate_name("a\tb"), Err(NameError::BadChar('\t')));
        assert_eq!(validate_name("é"), Err(NameError::BadChar('é')));
    }
}
