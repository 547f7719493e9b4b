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

use std::str::FromStr;

use base64::Engine as _;
use serde_json::{Map, Number, Value as Json};
use zvariant::{Array, Dict, ObjectPath, Signature, StructureBuilder, Value};

use crate::error::CodecError;
use crate::names;

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

/// Converts one D-Bus value to JSON. Its type comes from the value itself.
pub fn to_json(value: &Value<'_>) -> Result<Json, CodecError> {
    to_json_depth(value, 0)
}

fn to_json_depth(value: &Value<'_>, depth: usize) -> Result<Json, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::new("value nested too deeply"));
    }
    Ok(match value {
        Value::U8(v) => Json::from(*v),
        Value::Bool(v) => Json::from(*v),
        Value::I16(v) => Json::from(*v),
        Value::U16(v) => Json::from(*v),
        Value::I32(v) => Json::from(*v),
        Value::U32(v) => Json::from(*v),
        Value::I64(v) => Json::String(v.to_string()),
        Value::U64(v) => Json::String(v.to_string()),
        Value::F64(v) => double_to_json(*v),
        Value::Str(s) => Json::String(s.as_str().to_owned()),
        Value::Signature(s) => Json::String(s.to_string()),
        Value::ObjectPath(p) => Json::String(p.as_str().to_owned()),
        Value::Value(inner) => {
            let mut obj = Map::new();
            obj.insert(
                "t".into(),
                Json::String(inner.value_signature().to_string()),
            );
            obj.insert(
                "v".into(),
                to_json_depth(inner, depth + 1).map_err(|e| e.within("variant"))?,
            );
            Json::Object(obj)
        }
        Value::Array(array) => {
            if matches!(array.element_signature(), Signature::U8) {
                let bytes: Vec<u8> = array
                    .inner()
                    .iter()
                    .map(|v| match v {
                        Value::U8(b) => Ok(*b),
                        _ => Err(CodecError::new("byte array holds a non-byte")),
                    })
                    .collect::<Result<_, _>>()?;
                Json::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Json::Array(
                    array
                        .inner()
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            to_json_depth(v, depth + 1)
                                .map_err(|e| e.within(format!("element {i}")))
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
        }
        Value::Dict(dict) => {
            let mut obj = Map::new();
            for (k, v) in dict.iter() {
                let key = key_to_text(k)?;
                let json = to_json_depth(v, depth + 1)
                    .map_err(|e| e.within(format!("key {}", quote(&key))))?;
                obj.insert(key, json);
            }
            Json::Object(obj)
        }
        Value::Structure(s) => Json::Array(
            s.fields()
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    to_json_depth(v, depth + 1).map_err(|e| e.within(format!("field {i}")))
                })
                .collect::<Result<_, _>>()?,
        ),
        #[cfg(unix)]
        Value::Fd(_) => {
            return Err(CodecError::new(
                "file descriptors (h) cannot be sent over cbus",
            ))
        }
        #[allow(unreachable_patterns)]
        _ => return Err(CodecError::new("unsupported D-Bus type")),
    })
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

/// The JSON of `value` inside a variant: `{"t": signature, "v": value}`. Used where D-Bus
/// hands out a variant's content directly (property values of `GetAll`).
pub fn variant_to_json(value: &Value<'_>) -> Result<Json, CodecError> {
    variant_depth(value, 0)
}

fn variant_depth(inner: &Value<'_>, depth: usize) -> Result<Json, CodecError> {
    let mut obj = Map::new();
    obj.insert(
        "t".into(),
        Json::String(inner.value_signature().to_string()),
    );
    obj.insert(
        "v".into(),
        to_json_depth(inner, depth).map_err(|e| e.within("variant"))?,
    );
    Ok(Json::Object(obj))
}

/// Converts JSON to a D-Bus value of the given type.
pub fn from_json(json: &Json, signature: &Signature) -> Result<Value<'static>, CodecError> {
    from_json_depth(json, signature, 0)
}

fn from_json_depth(
    json: &Json,
    sig: &Signature,
    depth: usize,
) -> Result<Value<'static>, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::new("value nested too deeply"));
    }
    let mismatch = || {
        CodecError::new(format!(
            "expected {}, got {}",
            type_name(sig),
            describe(json)
        ))
    };
    Ok(match sig {
        Signature::U8 => Value::U8(small_int(json, sig)?),
        Signature::I16 => Value::I16(small_int(json, sig)?),
        Signature::U16 => Value::U16(small_int(json, sig)?),
        Signature::I32 => Value::I32(small_int(json, sig)?),
        Signature::U32 => Value::U32(small_int(json, sig)?),
        Signature::I64 => Value::I64(big_int(json, sig)?),
        Signature::U64 => Value::U64(big_int(json, sig)?),
        Signature::F64 => Value::F64(double_from_json(json).ok_or_else(mismatch)?),
        Signature::Bool => Value::Bool(json.as_bool().ok_or_else(mismatch)?),
        Signature::Str => {
            let s = json.as_str().ok_or_else(mismatch)?;
            if s.contains('\0') {
                return Err(CodecError::new("D-Bus strings cannot contain NUL"));
            }
            Value::from(s.to_owned())
        }
        Signature::ObjectPath => {
            let s = json.as_str().ok_or_else(mismatch)?;
            names::validate_object_path(s).map_err(|e| CodecError::new(name_error_text(&e)))?;
            Value::ObjectPath(
                ObjectPath::try_from(s.to_owned()).map_err(|e| CodecError::new(e.to_string()))?,
            )
        }
        Signature::Signature => {
            let s = json.as_str().ok_or_else(mismatch)?;
            Value::Signature(signature_value(s)?)
        }
        Signature::Variant => {
            let Some((t, v)) = as_variant(json) else {
                return Err(CodecError::new(format!(
                    "expected a variant {{\"t\": signature, \"v\": value}}, got {}",
                    describe(json)
                )));
            };
            let inner_sig = parse_single(t).map_err(|e| e.within("variant type"))?;
            let inner =
                from_json_depth(v, &inner_sig, depth + 1).map_err(|e| e.within("variant"))?;
            Value::Value(Box::new(inner))
        }
        Signature::Array(child) => {
            let elem_sig = child.signature();
            let mut array = Array::new(elem_sig);
            if matches!(elem_sig, Signature::U8) {
                if let Json::String(text) = json {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text)
                        .map_err(|e| {
                            CodecError::new(format!("expected base64 for a byte array: {e}"))
                        })?;
                    for b in bytes {
                        push(&mut array, Value::U8(b))?;
                    }
                    return Ok(Value::Array(array));
                }
            }
            let items = json.as_array().ok_or_else(mismatch)?;
            for (i, item) in items.iter().enumerate() {
                let v = from_json_depth(item, elem_sig, depth + 1)
                    .map_err(|e| e.within(format!("element {i}")))?;
                push(&mut array, v)?;
            }
            Value::Array(array)
        }
        Signature::Dict { key, value } => {
            let obj = json.as_object().ok_or_else(mismatch)?;
            let mut dict = Dict::new(key.signature(), value.signature());
            for (k, v) in obj {
                let kv = key_from_text(k, key.signature())
                    .map_err(|e| e.within(format!("key {}", quote(k))))?;
                let vv = from_json_depth(v, value.signature(), depth + 1)
                    .map_err(|e| e.within(format!("key {}", quote(k))))?;
                dict.append(kv, vv)
                    .map_err(|e| CodecError::new(e.to_string()))?;
            }
            Value::Dict(dict)
        }
        Signature::Structure(fields) => {
            let items = json.as_array().ok_or_else(mismatch)?;
            if items.len() != fields.len() {
                return Err(CodecError::new(format!(
                    "expected a struct {sig} of {} fields, got an array of {}",
                    fields.len(),
                    items.len()
                )));
            }
            let mut builder = StructureBuilder::new();
            for (i, (item, field_sig)) in items.iter().zip(fields.iter()).enumerate() {
                let v = from_json_depth(item, field_sig, depth + 1)
                    .map_err(|e| e.within(format!("field {i}")))?;
                builder = builder.append_field(v);
            }
            Value::Structure(
                builder
                    .build()
                    .map_err(|e| CodecError::new(e.to_string()))?,
            )
        }
        #[cfg(unix)]
        Signature::Fd => {
            return Err(CodecError::new(
                "file descriptors (h) cannot be sent over cbus",
            ))
        }
        Signature::Unit => {
            return Err(CodecError::new("empty signature where a value is expected"))
        }
        #[allow(unreachable_patterns)]
        _ => return Err(CodecError::new(format!("unsupported D-Bus type {sig}"))),
    })
}

fn push(array: &mut Array<'static>, v: Value<'static>) -> Result<(), CodecError> {
    array.append(v).map_err(|e| CodecError::new(e.to_string()))
}

fn signature_value(text: &str) -> Result<Signature, CodecError> {
    // A 'g' value is a list of complete types ("" and "ss" are valid signatures too).
    parse_arguments(text)
        .map_err(|_| CodecError::new(format!("invalid D-Bus signature {}", quote(text))))?;
    Signature::from_str(text)
        .map_err(|e| CodecError::new(format!("invalid D-Bus signature {}: {e}", quote(text))))
}

fn small_int<T>(json: &Json, sig: &Signature) -> Result<T, CodecError>
where
    T: TryFrom<i64> + TryFrom<u64>,
{
    let err = || {
        CodecError::new(format!(
            "expected {}, got {}",
            type_name(sig),
            describe(json)
        ))
    };
    match json {
        Json::Number(n) => n
            .as_i64()
            .and_then(|v| T::try_from(v).ok())
            .or_else(|| n.as_u64().and_then(|v| T::try_from(v).ok()))
            .ok_or_else(err),
        _ => Err(err()),
    }
}

fn big_int<T>(json: &Json, sig: &Signature) -> Result<T, CodecError>
where
    T: FromStr + TryFrom<i64> + TryFrom<u64>,
{
    let err = || {
        CodecError::new(format!(
            "expected {} (a decimal string, or a number up to 2^53), got {}",
            type_name(sig),
            describe(json)
        ))
    };
    match json {
        Json::String(s) => {
            // Only canonical decimal text: no '+', no leading zeros, no spaces.
            let digits = s.strip_prefix('-').unwrap_or(s);
            let canonical = !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && (digits == "0" || !digits.starts_with('0'))
                && s != "-0";
            if !canonical {
                return Err(err());
            }
            s.parse::<T>().map_err(|_| err())
        }
        Json::Number(n) => {
            if let Some(v) = n.as_i64() {
                if v.unsigned_abs() <= MAX_SAFE_INTEGER {
                    return T::try_from(v).map_err(|_| err());
                }
            } else if let Some(v) = n.as_u64() {
                if v <= MAX_SAFE_INTEGER {
                    return T::try_from(v).map_err(|_| err());
                }
            }
            Err(err())
        }
        _ => Err(err()),
    }
}

fn double_to_json(v: f64) -> Json {
    match Number::from_f64(v) {
        Some(n) => Json::Number(n),
        None if v.is_nan() => Json::String("NaN".into()),
        None if v > 0.0 => Json::String("Infinity".into()),
        None => Json::String("-Infinity".into()),
    }
}

fn double_from_json(json: &Json) -> Option<f64> {
    match json {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

/// Dict keys are basic types; JSON object keys are strings, so numbers and booleans are
/// written in their canonical text and parsed back by the key's signature.
fn key_to_text(key: &Value<'_>) -> Result<String, CodecError> {
    Ok(match key {
        Value::U8(v) => v.to_string(),
        Value::Bool(v) => v.to_string(),
        Value::I16(v) => v.to_string(),
        Value::U16(v) => v.to_string(),
        Value::I32(v) => v.to_string(),
        Value::U32(v) => v.to_string(),
        Value::I64(v) => v.to_string(),
        Value::U64(v) => v.to_string(),
        Value::F64(v) => match double_to_json(*v) {
            Json::String(s) => s,
            n => n.to_string(),
        },
        Value::Str(s) => s.as_str().to_owned(),
        Value::Signature(s) => s.to_string(),
        Value::ObjectPath(p) => p.as_str().to_owned(),
        _ => return Err(CodecError::new("dict key is not a basic type")),
    })
}

fn key_from_text(text: &str, sig: &Signature) -> Result<Value<'static>, CodecError> {
    let as_json = match sig {
        Signature::Str
        | Signature::ObjectPath
        | Signature::Signature
        | Signature::I64
        | Signature::U64 => Json::String(text.to_owned()),
        Signature::F64 => match text {
            "NaN" | "Infinity" | "-Infinity" => Json::String(text.to_owned()),
            _ => serde_json::from_str::<Number>(text)
                .map(Json::Number)
                .map_err(|_| {
                    CodecError::new(format!("expected a double key, got {}", quote(text)))
                })?,
        },
        Signature::Bool => match text {
            "true" => Json::Bool(true),
            "false" => Json::Bool(false),
            _ => {
                return Err(CodecError::new(format!(
                    "expected a boolean key, got {}",
                    quote(text)
                )))
            }
        },
        Signature::U8 | Signature::I16 | Signature::U16 | Signature::I32 | Signature::U32 => {
            // Canonical decimal only, so the key text maps back to itself.
            let n: i64 = text.parse().map_err(|_| {
                CodecError::new(format!(
                    "expected {} key, got {}",
                    type_name(sig),
                    quote(text)
                ))
            })?;
            if n.to_string() != text {
                return Err(CodecError::new(format!(
                    "expected {} key, got {}",
                    type_name(sig),
                    quote(text)
                )));
            }
            Json::from(n)
        }
        _ => {
            return Err(CodecError::new(format!(
                "dict key type {sig} is not a basic type"
            )))
        }
    };
    from_json(&as_json, sig)
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
