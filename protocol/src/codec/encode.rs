//! D-Bus values to JSON (see the table in the codec module).

use base64::Engine as _;
use serde_json::{Map, Number, Value as Json};
use zvariant::{Signature, Value};

use super::{quote, MAX_DEPTH};
use crate::error::CodecError;

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
        Value::Value(inner) => variant_depth(inner, depth + 1)?,
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

fn double_to_json(v: f64) -> Json {
    match Number::from_f64(v) {
        Some(n) => Json::Number(n),
        None if v.is_nan() => Json::String("NaN".into()),
        None if v > 0.0 => Json::String("Infinity".into()),
        None => Json::String("-Infinity".into()),
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
