//! Reversible escaping of arbitrary text into one NATS subject token.
//!
//! Bus names contain `.` and `:`, which NATS treats as a separator and which the original CBus
//! replaced by `_`, losing the name. We use systemd's bus-label scheme instead: every byte outside
//! `[A-Za-z0-9]` becomes `_` followed by two lowercase hex digits, so `:1.42` is `_3a1_2e42`.
//! The empty string is `_` (a lone underscore can never be produced by escaping anything else).
//! Decoding accepts only the canonical form, so every token has exactly one meaning.

use crate::error::SubjectError;

/// Escapes `text` into a token made only of `[A-Za-z0-9_]`.
pub fn escape(text: &str) -> String {
    if text.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(text.len() * 2);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() {
            out.push(byte as char);
        } else {
            out.push('_');
            out.push(hex_digit(byte >> 4));
            out.push(hex_digit(byte & 0x0f));
        }
    }
    out
}

/// Reverses [`escape`]. Rejects anything `escape` could not have produced.
pub fn unescape(token: &str) -> Result<String, SubjectError> {
    if token == "_" {
        return Ok(String::new());
    }
    if token.is_empty() {
        return Err(SubjectError::BadEscape {
            token: token.to_owned(),
            reason: "empty token",
        });
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() {
            out.push(b);
            i += 1;
        } else if b == b'_' {
            let (hi, lo) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&hi), Some(&lo)) => (hex_value(hi), hex_value(lo)),
                _ => (None, None),
            };
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(SubjectError::BadEscape {
                    token: token.to_owned(),
                    reason: "'_' must be followed by two lowercase hex digits",
                });
            };
            let decoded = (hi << 4) | lo;
            if decoded.is_ascii_alphanumeric() {
                return Err(SubjectError::BadEscape {
                    token: token.to_owned(),
                    reason: "escapes a letter or digit (not canonical)",
                });
            }
            out.push(decoded);
            i += 3;
        } else {
            return Err(SubjectError::BadEscape {
                token: token.to_owned(),
                reason: "contains a character outside [A-Za-z0-9_]",
            });
        }
    }
    String::from_utf8(out).map_err(|_| SubjectError::BadEscape {
        token: token.to_owned(),
        reason: "decodes to invalid UTF-8",
    })
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble)])
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples() {
        assert_eq!(escape(":1.42"), "_3a1_2e42");
        assert_eq!(
            escape("org.freedesktop.systemd1"),
            "org_2efreedesktop_2esystemd1"
        );
        assert_eq!(escape("a_b-c"), "a_5fb_2dc");
        assert_eq!(escape(""), "_");
        assert_eq!(unescape("_3a1_2e42").unwrap(), ":1.42");
        assert_eq!(unescape("_").unwrap(), "");
    }

    #[test]
    fn rejects_non_canonical() {
        assert!(unescape("_41").is_err());
        assert!(unescape("_2E").is_err());
        assert!(unescape("a_2").is_err());
        assert!(unescape("a.b").is_err());
        assert!(unescape("").is_err());
    }
}
