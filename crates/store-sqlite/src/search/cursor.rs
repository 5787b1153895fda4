//! Keyset cursors: opaque, versioned strings holding the sort-key values and (type, id) of a page's
//! boundary row, the direction to walk from it, and a fingerprint of the query (tenant, types,
//! criteria, sort) so a cursor of another query or tenant is refused.
//!
//! Format (all ASCII, URL-safe): `k1.<dir>.<fingerprint>.<key>.<key>…` where `dir` is `n` (rows
//! after the boundary) or `p` (rows before it), `fingerprint` 16 hex digits, and each key one of
//! `z` (NULL), `i<decimal>` (integer), `r<16 hex digits>` (the bits of an f64), `s<hex of UTF-8>`
//! (text). The last two keys are the boundary row's type and id.

use fhirmesh_core::ports::IndexError;
use rusqlite::types::Value;

const VERSION: &str = "k1";

/// Which way a cursor walks from its boundary row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Next,
    Previous,
}

/// A decoded cursor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cursor {
    pub direction: Direction,
    pub fingerprint: u64,
    /// The sort-key values, then type and id.
    pub keys: Vec<Value>,
}

pub(crate) fn encode(cursor: &Cursor) -> String {
    let mut out = String::from(VERSION);
    out.push('.');
    out.push(match cursor.direction {
        Direction::Next => 'n',
        Direction::Previous => 'p',
    });
    out.push_str(&format!(".{:016x}", cursor.fingerprint));
    for key in &cursor.keys {
        out.push('.');
        match key {
            Value::Null => out.push('z'),
            Value::Integer(i) => out.push_str(&format!("i{i}")),
            Value::Real(f) => out.push_str(&format!("r{:016x}", f.to_bits())),
            Value::Text(s) => {
                out.push('s');
                for byte in s.bytes() {
                    out.push_str(&format!("{byte:02x}"));
                }
            }
            // Sort keys are never blobs; encoded as NULL would change meaning, so as text of hex.
            Value::Blob(bytes) => {
                out.push('b');
                for byte in bytes {
                    out.push_str(&format!("{byte:02x}"));
                }
            }
        }
    }
    out
}

fn invalid(why: &str) -> IndexError {
    IndexError::InvalidCursor(why.to_owned())
}

pub(crate) fn decode(text: &str) -> Result<Cursor, IndexError> {
    if text.len() > 16 * 1024 {
        return Err(invalid("too long"));
    }
    let mut parts = text.split('.');
    if parts.next() != Some(VERSION) {
        return Err(invalid("unknown format"));
    }
    let direction = match parts.next() {
        Some("n") => Direction::Next,
        Some("p") => Direction::Previous,
        _ => return Err(invalid("bad direction")),
    };
    let fingerprint = parts
        .next()
        .filter(|f| f.len() == 16)
        .and_then(|f| u64::from_str_radix(f, 16).ok())
        .ok_or_else(|| invalid("bad fingerprint"))?;
    let keys = parts.map(decode_key).collect::<Result<Vec<_>, _>>()?;
    if keys.len() < 2 {
        return Err(invalid("missing keys"));
    }
    Ok(Cursor { direction, fingerprint, keys })
}

fn decode_key(part: &str) -> Result<Value, IndexError> {
    let (tag, rest) = part.split_at_checked(1).ok_or_else(|| invalid("empty key"))?;
    match tag {
        "z" if rest.is_empty() => Ok(Value::Null),
        "i" => rest.parse::<i64>().map(Value::Integer).map_err(|_| invalid("bad integer key")),
        "r" if rest.len() == 16 => u64::from_str_radix(rest, 16)
            .map(|bits| Value::Real(f64::from_bits(bits)))
            .map_err(|_| invalid("bad real key")),
        "s" => String::from_utf8(hex(rest)?).map(Value::Text).map_err(|_| invalid("key is not UTF-8")),
        "b" => hex(rest).map(Value::Blob),
        _ => Err(invalid("bad key")),
    }
}

fn hex(text: &str) -> Result<Vec<u8>, IndexError> {
    if !text.len().is_multiple_of(2) {
        return Err(invalid("bad hex"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()).ok_or_else(|| invalid("bad hex"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cursor = Cursor {
            direction: Direction::Previous,
            fingerprint: 0xdead_beef_0123_4567,
            keys: vec![
                Value::Null,
                Value::Integer(-42),
                Value::Real(0.1 + 0.2),
                Value::Text("Müller.|%_\u{0}".to_owned()),
                Value::Text("Patient".to_owned()),
                Value::Text("a-1".to_owned()),
            ],
        };
        let text = encode(&cursor);
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'), "{text}");
        assert_eq!(decode(&text), Ok(cursor));
    }

    #[test]
    fn malformed_cursors_are_rejected() {
        for bad in [
            "",
            "k1",
            "k2.n.0000000000000000.s50.s61",
            "k1.x.0000000000000000.s50.s61",
            "k1.n.00000000000000.s50.s61",
            "k1.n.000000000000000g.s50.s61",
            "k1.n.0000000000000000.s50",
            "k1.n.0000000000000000.s5.s61",
            "k1.n.0000000000000000.sff.s61",
            "k1.n.0000000000000000.q1.s61",
            "k1.n.0000000000000000.ix.s61",
            "k1.n.0000000000000000.r12.s61",
            "k1.n.0000000000000000..s61",
            "k1.n.0000000000000000.zz.s61",
            "k1.n.0000000000000000.sé.s61",
        ] {
            assert!(matches!(decode(bad), Err(IndexError::InvalidCursor(_))), "{bad:?}");
        }
    }
}
