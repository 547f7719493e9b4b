//! JSON to D-Bus values, walking the signature (see the table in the codec module).

use std::str::FromStr;

use base64::Engine as _;
use serde_json::{Number, Value as Json};
use zvariant::{Array, Dict, ObjectPath, Signature, StructureBuilder, Value};

use super::{
    as_variant, describe, name_error_text, parse_arguments, parse_single, quote, type_name,
    MAX_DEPTH, MAX_SAFE_INTEGER,
};
use crate::error::CodecError;
use crate::names;

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
            // zvariant 5 orders signature values so that any two compare equal, and its Dict
            // keeps one entry per key: a dict keyed by signatures would silently lose all but
            // one entry (zvariant_utils 4.2, `Signature::cmp`). Refused rather than lost.
            if matches!(key.signature(), Signature::Signature) && obj.len() > 1 {
                return Err(CodecError::new(format!(
                    "a dict keyed by signatures ({sig}) can hold one entry here, not {}: the D-Bus \
                     library cbus uses would merge them",
                    obj.len()
                )));
            }
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
