//! Lossless conversion between D-Bus values and JSON, driven by the D-Bus signature.
//!
//! zvariant's own serde support is not used for JSON: it maps JSON integers to 64-bit types
//! whatever the signature says and has no byte-string form, so values do not survive a round
//! trip. Here the parsed signature is walked alongside the JSON value instead:
//!
//! | D-Bus         | JSON out                              | JSON in also accepts |
//! |---------------|---------------------------------------|----------------------|
//! | y n q i u     | number (range-checked on input)       |                      |
//! | x t           | decimal string (JavaScript loses precision above 2^53) | number up to 2^53 |
//! | d             | number; `"NaN"`, `"Infinity"`, `"-Infinity"` | |
//! | b             | true / false                          |                      |
//! | s o g         | string (o and g validated)            |                      |
//! | ay            | base64 string                         | array of bytes       |
//! | arrays, structs | JSON arrays                         |                      |
//! | a{KV}         | object; keys in their canonical text  |                      |
//! | v             | `{"t": signature, "v": value}`        |                      |
//! | h             | refused                               |                      |
//!
//! `encode` turns D-Bus values into JSON, `decode` JSON into D-Bus values; the signature
//! helpers, names and the variant form both use are here.

mod decode;
mod encode;

pub use decode::from_json;
pub use encode::{to_json, variant_to_json};

use std::str::FromStr;

use serde_json::Value as Json;
use zvariant::{Signature, Value};

use crate::error::CodecError;

/// Largest integer a JSON number may carry for a 64-bit type (JavaScript's safe range).
const MAX_SAFE_INTEGER: u64 = 1 << 53;

/// Deeper nesting is refused: D-Bus allows 32 array + 32 struct levels, and recursion on
/// untrusted input must be bounded.
const MAX_DEPTH: usize = 64;

/// Parses a D-Bus signature of zero or more complete types (a method's argument list, such as
/// `"ss"` or `"a{sv}(ii)"`) into one signature per argument.
pub fn parse_arguments(signature: &str) -> Result<Vec<Signature>, CodecError> {
    if signature.is_empty() {
        return Ok(Vec::new());
    }
    if signature.contains('h') {
        // Checked on the text because 'h' can only be a type code, never inside a name.
        return Err(CodecError::new(
            "file descriptors (h) cannot be sent over cbus",
        ));
    }
    // Wrapping in parentheses makes "(ii)" one struct argument and "ii" two arguments.
    let wrapped = format!("({signature})");
    match Signature::from_str(&wrapped) {
        Ok(Signature::Structure(fields)) => {
            for field in fields.iter() {
                check_dict_keys(field)?;
            }
            Ok(fields.iter().cloned().collect())
        }
        Ok(_) | Err(_) => Err(CodecError::new(format!(
            "invalid D-Bus signature {}",
            quote(signature)
        ))),
    }
}

/// zvariant accepts any dict key type; the D-Bus specification allows only basic types.
/// The most characters of outside input an error message quotes.
pub const QUOTE_MAX_CHARS: usize = 100;

/// `text` quoted for an error message or a log: whole when short, else its first
/// [`QUOTE_MAX_CHARS`] characters, `…` and its length (`"((((…" (122880 bytes)`). Bad input can
/// be as large as a request; an error that echoed it whole would be as large again, in every
/// reply and log line.
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_MAX_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// A [`NameError`](crate::NameError) as text, quoting the bad name with [`quote`] (its `Display` quotes the
/// name whole).
pub fn name_error_text(e: &crate::error::NameError) -> String {
    use crate::error::NameError;
    match e {
        NameError::BusName { name, reason } => {
            format!("invalid bus name {}: {reason}", quote(name))
        }
        NameError::Interface { name, reason } => {
            format!("invalid interface name {}: {reason}", quote(name))
        }
        NameError::Member { name } => format!(
            "invalid member name {}: must match [A-Za-z_][A-Za-z0-9_]* (at most 255 bytes)",
            quote(name)
        ),
        NameError::ObjectPath { path, reason } => {
            format!("invalid object path {}: {reason}", quote(path))
        }
    }
}

fn check_dict_keys(sig: &Signature) -> Result<(), CodecError> {
    match sig {
        Signature::Array(child) => check_dict_keys(child.signature()),
        Signature::Dict { key, value } => {
            if !is_basic(key.signature()) {
                return Err(CodecError::new(format!(
                    "invalid D-Bus signature {sig}: dict keys must be basic types, not {}",
                    key.signature()
                )));
            }
            check_dict_keys(value.signature())
        }
        Signature::Structure(fields) => fields.iter().try_for_each(check_dict_keys),
        _ => Ok(()),
    }
}

fn is_basic(sig: &Signature) -> bool {
    matches!(
        sig,
        Signature::U8
            | Signature::Bool
            | Signature::I16
            | Signature::U16
            | Signature::I32
            | Signature::U32
            | Signature::I64
            | Signature::U64
            | Signature::F64
            | Signature::Str
            | Signature::ObjectPath
            | Signature::Signature
    )
}

/// Parses one complete type, e.g. a property's signature.
pub fn parse_single(signature: &str) -> Result<Signature, CodecError> {
    let mut args = parse_arguments(signature)?;
    if args.len() != 1 {
        return Err(CodecError::new(format!(
            "expected exactly one complete type, got signature {}",
            quote(signature)
        )));
    }
    Ok(args.remove(0))
}

/// The signature text of a list of argument signatures (`["s","u"]` -> `"su"`).
pub fn arguments_signature(args: &[Signature]) -> String {
    args.iter().map(Signature::to_string).collect()
}

/// Converts method arguments from a JSON array, given the in-signature.
/// Errors name the argument (counted from 1) and the position inside it.
pub fn args_from_json(
    json: &Json,
    signature: &[Signature],
) -> Result<Vec<Value<'static>>, CodecError> {
    let items: &[Json] = match json {
        Json::Array(items) => items,
        Json::Null if signature.is_empty() => &[],
        other => {
            return Err(CodecError::new(format!(
                "arguments must be a JSON array, got {}",
                describe(other)
            )))
        }
    };
    if items.len() != signature.len() {
        return Err(CodecError::new(format!(
            "expected {} argument(s) for signature {}, got {}",
            signature.len(),
            quote(&arguments_signature(signature)),
            items.len()
        )));
    }
    items
        .iter()
        .zip(signature)
        .enumerate()
        .map(|(i, (item, sig))| {
            from_json(item, sig).map_err(|e| e.within(format!("argument {}", i + 1)))
        })
        .collect()
}

/// Converts method results or signal arguments to a JSON array.
pub fn args_to_json(values: &[Value<'_>]) -> Result<Json, CodecError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| to_json(v).map_err(|e| e.within(format!("argument {}", i + 1))))
        .collect::<Result<Vec<_>, _>>()
        .map(Json::Array)
}

/// The signature and value of a variant's JSON form, `{"t": signature, "v": value}` (exactly
/// those two keys, `t` a string); `None` for anything else. The one rule for what a variant
/// looks like, for the codec and for readers of replies alike.
pub fn as_variant(json: &Json) -> Option<(&str, &Json)> {
    let obj = json.as_object()?;
    match (obj.get("t"), obj.get("v"), obj.len()) {
        (Some(Json::String(t)), Some(v), 2) => Some((t, v)),
        _ => None,
    }
}

/// A variant's value if `json` is one ([`as_variant`]), else `json` itself: property values
/// come as variants from `GetAll` and in signals, plain from `Get`.
pub fn unvariant(json: &Json) -> &Json {
    as_variant(json).map_or(json, |(_, v)| v)
}

/// An unsigned integer as the codec writes `t` (a decimal string) or as JSON allows it (a
/// number), inside a variant or not.
pub fn as_u64(json: &Json) -> Option<u64> {
    match unvariant(json) {
        Json::String(s) => s.parse().ok(),
        Json::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A human name for a type, for error messages.
pub fn type_name(sig: &Signature) -> String {
    match sig {
        Signature::U8 => "byte".into(),
        Signature::Bool => "boolean".into(),
        Signature::I16 => "int16".into(),
        Signature::U16 => "uint16".into(),
        Signature::I32 => "int32".into(),
        Signature::U32 => "uint32".into(),
        Signature::I64 => "int64".into(),
        Signature::U64 => "uint64".into(),
        Signature::F64 => "double".into(),
        Signature::Str => "string".into(),
        Signature::ObjectPath => "object path".into(),
        Signature::Signature => "signature".into(),
        Signature::Variant => "variant".into(),
        Signature::Array(c) if matches!(c.signature(), Signature::U8) => {
            "byte array (base64 string or array of bytes)".into()
        }
        Signature::Array(_) => format!("array {sig}"),
        Signature::Dict { .. } => format!("dict {sig} (JSON object)"),
        Signature::Structure(_) => format!("struct {sig} (JSON array)"),
        other => other.to_string(),
    }
}

fn describe(json: &Json) -> String {
    let mut text = json.to_string();
    if text.len() > 40 {
        let mut cut = 37;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bad_input_is_quoted_in_bounded_form() {
        assert_eq!(quote("ab\"c"), r#""ab\"c""#);
        let long = "(".repeat(120_000);
        let q = quote(&long);
        assert!(q.len() < 200, "{q}");
        assert!(q.ends_with("… (120000 bytes)"), "{q}");
        let e = parse_arguments(&long).unwrap_err().to_string();
        assert!(
            e.len() < 300 && e.starts_with("invalid D-Bus signature"),
            "{e}"
        );
        let e = from_json(
            &json!(format!("/{}", "a-".repeat(60_000))),
            &Signature::ObjectPath,
        )
        .unwrap_err()
        .to_string();
        assert!(e.len() < 300 && e.starts_with("invalid object path"), "{e}");
        // Multi-byte characters are never cut in half.
        assert!(quote(&"é".repeat(500)).ends_with("… (1000 bytes)"));
    }

    fn round(sig: &str, j: Json) -> Json {
        let s = parse_single(sig).unwrap();
        let v = from_json(&j, &s).unwrap();
        assert_eq!(v.value_signature().to_string(), sig);
        to_json(&v).unwrap()
    }

    #[test]
    fn table() {
        assert_eq!(round("u", json!(7)), json!(7));
        assert_eq!(
            round("t", json!("18446744073709551615")),
            json!("18446744073709551615")
        );
        assert_eq!(round("x", json!(-5)), json!("-5"));
        assert_eq!(round("d", json!("NaN")), json!("NaN"));
        assert_eq!(round("d", json!(1.5)), json!(1.5));
        assert_eq!(round("ay", json!([1, 2, 3])), json!("AQID"));
        assert_eq!(round("ay", json!("AQID")), json!("AQID"));
        assert_eq!(
            round("a{ui}", json!({"1": -1, "20": 2})),
            json!({"1": -1, "20": 2})
        );
        assert_eq!(
            round("v", json!({"t": "u", "v": 3})),
            json!({"t": "u", "v": 3})
        );
        assert_eq!(round("(sib)", json!(["a", 1, true])), json!(["a", 1, true]));
        assert_eq!(round("g", json!("a{sv}")), json!("a{sv}"));
    }

    #[test]
    fn errors_name_positions() {
        let sig = parse_arguments("sau").unwrap();
        let err = args_from_json(&json!(["x", [1, 2, 3, -1]]), &sig).unwrap_err();
        assert_eq!(
            err.to_string(),
            "argument 2, element 3: expected uint32, got -1"
        );
        let err = args_from_json(&json!(["x"]), &sig).unwrap_err();
        assert!(err.to_string().contains("expected 2 argument(s)"), "{err}");
        assert!(parse_arguments("h").is_err());
        assert!(parse_arguments("a{vs}").is_err());
        assert!(parse_arguments("(").is_err());
        assert!(from_json(&json!(256), &Signature::U8).is_err());
        assert!(from_json(&json!(9007199254740993u64), &Signature::U64).is_err());
        assert!(from_json(&json!("007"), &Signature::U64).is_err());
        assert!(from_json(&json!("/a/"), &Signature::ObjectPath).is_err());
        assert!(from_json(&json!({"t": "u"}), &Signature::Variant).is_err());
        // One rule for what a variant is: exactly `t` (a string) and `v`.
        assert_eq!(unvariant(&json!({"t": "u", "v": 3})), &json!(3));
        assert_eq!(
            unvariant(&json!({"t": "u", "v": 3, "x": 1})),
            &json!({"t": "u", "v": 3, "x": 1})
        );
        assert_eq!(
            unvariant(&json!({"t": 1, "v": 3})),
            &json!({"t": 1, "v": 3})
        );
        assert_eq!(
            as_u64(&json!({"t": "t", "v": "18446744073709551615"})),
            Some(u64::MAX)
        );
        assert_eq!(as_u64(&json!(7)), Some(7));
        assert_eq!(as_u64(&json!("x")), None);
        assert!(from_json(&json!(1.5), &Signature::I32).is_err());
    }

    #[test]
    fn argument_lists() {
        assert_eq!(parse_arguments("").unwrap().len(), 0);
        assert_eq!(parse_arguments("ss").unwrap().len(), 2);
        assert_eq!(parse_arguments("(ss)").unwrap().len(), 1);
        assert_eq!(
            arguments_signature(&parse_arguments("a{sv}(ii)s").unwrap()),
            "a{sv}(ii)s"
        );
    }
}
