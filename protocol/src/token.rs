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

/// Where systemd puts its unit objects; the element after it is the unit name, escaped with
/// this scheme as systemd's `bus_label_escape` does it, which also escapes a leading digit.
pub const SYSTEMD_UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// The unit a systemd unit object path names (`…/unit/nginx_2eservice` is `nginx.service`);
/// `None` for another path or an element systemd could not have produced.
pub fn systemd_unit_of_path(path: &str) -> Option<String> {
    let element = path.strip_prefix(SYSTEMD_UNIT_PATH_PREFIX)?;
    decode(element, true).ok().filter(|name| !name.is_empty())
}

/// Reverses [`escape`]. Rejects anything `escape` could not have produced.
pub fn unescape(token: &str) -> Result<String, SubjectError> {
    decode(token, false)
}

/// Decodes the canonical form; with `leading_digit_escaped`, systemd's, whose first byte is
/// escaped when it is a digit (an object path element may not start with one).
fn decode(token: &str, leading_digit_escaped: bool) -> Result<String, SubjectError> {
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
            let systemd_digit = leading_digit_escaped && i == 0 && decoded.is_ascii_digit();
            if decoded.is_ascii_alphanumeric() && !systemd_digit {
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

    #[test]
    fn systemd_unit_paths() {
        let unit = |p: &str| systemd_unit_of_path(p);
        assert_eq!(
            unit("/org/freedesktop/systemd1/unit/nosuch_2eservice").as_deref(),
            Some("nosuch.service")
        );
        assert_eq!(
            unit("/org/freedesktop/systemd1/unit/_31foo_2dbar_40x_2eservice").as_deref(),
            Some("1foo-bar@x.service")
        );
        assert_eq!(unit("/org/freedesktop/systemd1/unit/x_2"), None);
        assert_eq!(unit("/org/freedesktop/systemd1/unit/_"), None);
        assert_eq!(unit("/org/freedesktop/systemd1"), None);
    }
}
