//! Certified labels: the labels an issuer wrote into a certificate, the only labels that
//! authorization and routing decide on. A node's announced labels (its config, its hello) are for
//! display.
//!
//! They travel in a non-critical X.509 extension (so SPIFFE tooling that does not know it still
//! takes the certificate) whose value is a DER `SEQUENCE OF UTF8String`, each `key=value`, sorted
//! by key. The OID is an arc under `2.25` (a UUID-style arc that needs no registration).

use std::collections::BTreeMap;

use mesh_proto::limits::{MAX_LABELS, MAX_NAME_LEN};

/// The extension's OID, arc by arc.
pub const LABELS_OID: &[u64] = &[2, 25, 13_912_480_217_550_341_963];

/// Labels certified for a peer.
pub type Labels = BTreeMap<String, String>;

/// Why labels cannot be certified, or why a certificate's label extension is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// A key is not a valid name.
    #[error("label key {0:?}: {1}")]
    Key(String, String),
    /// A value is empty, too long or holds a character labels may not.
    #[error("label {0:?}: value {1:?} must be 1 to 63 bytes of letters, digits, '-', '_' or '.'")]
    Value(String, String),
    /// More labels than a hello or a certificate holds.
    #[error("at most {MAX_LABELS} labels")]
    TooMany,
    /// The same key twice.
    #[error("label {0:?} given twice")]
    Repeated(String),
    /// An item is not `key=value`.
    #[error("{0:?} is not key=value")]
    NotPair(String),
    /// The extension's bytes are not a `SEQUENCE OF UTF8String`.
    #[error("the certificate's label extension is malformed: {0}")]
    Malformed(&'static str),
}

/// Checks one label.
pub fn check_label(key: &str, value: &str) -> Result<(), LabelError> {
    mesh_proto::validate_name(key).map_err(|e| LabelError::Key(key.into(), e.to_string()))?;
    let ok = !value.is_empty()
        && value.len() <= MAX_NAME_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(LabelError::Value(key.into(), value.into()));
    }
    Ok(())
}

/// Parses `zone=hall-1,version=v1` (the command-line and token form).
pub fn parse_list(text: &str) -> Result<Labels, LabelError> {
    let mut labels = Labels::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| LabelError::NotPair(item.into()))?;
        let (k, v) = (k.trim(), v.trim());
        check_label(k, v)?;
        if labels.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(LabelError::Repeated(k.into()));
        }
    }
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany);
    }
    Ok(labels)
}

/// The extension value for `labels`, checked.
pub fn encode(labels: &Labels) -> Result<Vec<u8>, LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany);
    }
    let mut items = Vec::new();
    for (k, v) in labels {
        check_label(k, v)?;
        let item = format!("{k}={v}");
        items.push(0x0c);
        push_len(&mut items, item.len());
        items.extend_from_slice(item.as_bytes());
    }
    let mut out = vec![0x30];
    push_len(&mut out, items.len());
    out.extend_from_slice(&items);
    Ok(out)
}

/// Reads an extension value written by [`encode`]; anything else is refused (a certificate with
/// a malformed label extension is not a certificate to trust labels from).
pub fn decode(der: &[u8]) -> Result<Labels, LabelError> {
    let (tag, body, rest) = tlv(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(LabelError::Malformed("not a single SEQUENCE"));
    }
    let mut labels = Labels::new();
    let mut body = body;
    while !body.is_empty() {
        let (tag, item, rest) = tlv(body)?;
        if tag != 0x0c {
            return Err(LabelError::Malformed("an item is not a UTF8String"));
        }
        let item =
            std::str::from_utf8(item).map_err(|_| LabelError::Malformed("an item is not UTF-8"))?;
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| LabelError::NotPair(item.into()))?;
        check_label(k, v)?;
        if labels.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(LabelError::Repeated(k.into()));
        }
        if labels.len() > MAX_LABELS {
            return Err(LabelError::TooMany);
        }
        body = rest;
    }
    Ok(labels)
}

/// The content octets of [`LABELS_OID`]'s DER encoding (what a parser compares).
pub fn oid_der() -> Vec<u8> {
    let mut out = vec![(LABELS_OID[0] * 40 + LABELS_OID[1]) as u8];
    for &arc in &LABELS_OID[2..] {
        let mut groups = vec![(arc & 0x7f) as u8];
        let mut rest = arc >> 7;
        while rest > 0 {
            groups.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.extend(groups.iter().rev());
    }
    out
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

/// One DER tag-length-value: `(tag, value, rest)`.
fn tlv(der: &[u8]) -> Result<(u8, &[u8], &[u8]), LabelError> {
    let short = LabelError::Malformed("truncated");
    let (&tag, der) = der.split_first().ok_or(short.clone())?;
    let (&first, der) = der.split_first().ok_or(short.clone())?;
    let (len, der) = match first {
        n if n < 0x80 => (usize::from(n), der),
        0x81 => {
            let (&n, der) = der.split_first().ok_or(short.clone())?;
            (usize::from(n), der)
        }
        0x82 => {
            let b = der.get(..2).ok_or(short.clone())?;
            (usize::from(b[0]) << 8 | usize::from(b[1]), &der[2..])
        }
        _ => return Err(LabelError::Malformed("length too large")),
    };
    if der.len() < len {
        return Err(short);
    }
    Ok((tag, &der[..len], &der[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let labels = parse_list("zone=hall-1, version=v1").expect("labels");
        assert_eq!(
            decode(&encode(&labels).expect("labels")).expect("labels"),
            labels
        );
        assert_eq!(
            decode(&encode(&Labels::new()).expect("labels")).expect("labels"),
            Labels::new()
        );
        let many: Labels = (0..16)
            .map(|i| (format!("key-{i}"), "v".repeat(63)))
            .collect();
        assert_eq!(
            decode(&encode(&many).expect("labels")).expect("labels"),
            many
        );
    }

    #[test]
    fn the_oid_encodes_as_der_does() {
        // As OpenSSL and rcgen write 2.25.13912480217550341963.
        let want = [
            0x69, 0x81, 0xc1, 0x89, 0xc3, 0xe1, 0xbd, 0xfd, 0xf3, 0x8e, 0x4b,
        ];
        assert_eq!(oid_der(), want);
    }

    #[test]
    fn refuses_bad_lists_and_bytes() {
        assert!(matches!(parse_list("zone"), Err(LabelError::NotPair(_))));
        assert!(matches!(
            parse_list("zone=a,zone=b"),
            Err(LabelError::Repeated(_))
        ));
        assert!(matches!(parse_list("zone=a b"), Err(LabelError::Value(..))));
        assert!(matches!(parse_list("zone="), Err(LabelError::Value(..))));
        let good = encode(&parse_list("zone=a").expect("labels")).expect("labels");
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        assert!(decode(&[0x30, 0x03, 0x04, 0x01, b'x']).is_err());
        assert!(decode(&[0x30, 0x84, 0, 0, 0, 1]).is_err());
    }
}
