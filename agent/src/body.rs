//! Message bodies as argument lists with their exact signature.
//!
//! zvariant parses the body signatures `ii` (two arguments) and `(ii)` (one struct argument) to
//! the same value, so a body decoded through it cannot tell one struct from its fields, and the
//! JSON would not round-trip. The signature text is therefore read from the message header bytes
//! (a few lines of the D-Bus wire format) and decides whether the decoded fields are one struct.

use cbus_protocol::codec;
use zvariant::{Signature, Structure, StructureBuilder, Value};

/// Header field code of the body signature.
const FIELD_SIGNATURE: u8 = 8;

/// Why a body could not be turned into arguments.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("cannot decode the message body: {0}")]
    Decode(String),
    #[error(transparent)]
    Codec(#[from] cbus_protocol::CodecError),
}

/// The exact body signature text and the arguments of a message.
pub fn arguments(msg: &zbus::Message) -> Result<(String, Vec<Value<'static>>), BodyError> {
    let body = msg.body();
    if body.is_empty() {
        return Ok((String::new(), Vec::new()));
    }
    let text = signature_text(msg.data()).unwrap_or_else(|| body.signature().to_string());
    let fields = body
        .deserialize::<Structure<'_>>()
        .map_err(|e| BodyError::Decode(e.to_string()))?
        .into_fields();
    let fields: Vec<Value<'static>> = fields
        .into_iter()
        .map(|v| v.try_to_owned().map(Value::from))
        .collect::<Result<_, _>>()
        .map_err(|e| BodyError::Decode(e.to_string()))?;
    let args = codec::parse_arguments(&text)?;
    if let [Signature::Structure(_)] = args.as_slice() {
        // One struct argument: zvariant handed out its fields.
        let mut b = StructureBuilder::new();
        for f in fields {
            b = b.append_field(f);
        }
        let one = b.build().map_err(|e| BodyError::Decode(e.to_string()))?;
        return Ok((text, vec![Value::Structure(one)]));
    }
    Ok((text, fields))
}

/// The SIGNATURE header field of a raw D-Bus message, or `None` when there is none or the
/// bytes are not a message.
pub fn signature_text(raw: &[u8]) -> Option<String> {
    let little = match raw.first()? {
        b'l' => true,
        b'B' => false,
        _ => return None,
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = raw.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let fields_len = u32_at(12)? as usize;
    let end = 16usize.checked_add(fields_len)?;
    let mut at = 16;
    while at < end {
        at = align(at, 8);
        let code = *raw.get(at)?;
        let sig_len = *raw.get(at + 1)? as usize;
        let sig = raw.get(at + 2..at + 2 + sig_len)?;
        at += 2 + sig_len + 1;
        match sig {
            b"g" => {
                let len = *raw.get(at)? as usize;
                let text = raw.get(at + 1..at + 1 + len)?;
                if code == FIELD_SIGNATURE {
                    return String::from_utf8(text.to_vec()).ok();
                }
                at += 1 + len + 1;
            }
            b"s" | b"o" => {
                at = align(at, 4);
                let len = u32_at(at)? as usize;
                at += 4 + len + 1;
            }
            b"u" => at = align(at, 4) + 4,
            _ => return None,
        }
    }
    None
}

fn align(at: usize, to: usize) -> usize {
    at.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal<B>(body: &B) -> zbus::Message
    where
        B: serde::Serialize + zvariant::DynamicType,
    {
        zbus::Message::signal("/a/b", "a.b.C", "S")
            .unwrap()
            .build(body)
            .unwrap()
    }

    #[test]
    fn one_struct_is_not_its_fields() {
        let m = signal(&((1i32, "x"),));
        let (sig, args) = arguments(&m).unwrap();
        assert_eq!(sig, "(is)");
        assert_eq!(
            codec::args_to_json(&args).unwrap(),
            serde_json::json!([[1, "x"]])
        );

        let m = signal(&(1i32, "x"));
        let (sig, args) = arguments(&m).unwrap();
        assert_eq!(sig, "is");
        assert_eq!(
            codec::args_to_json(&args).unwrap(),
            serde_json::json!([1, "x"])
        );

        let m = signal(&((7u8,),));
        assert_eq!(arguments(&m).unwrap().0, "(y)");
        let m = signal(&("only",));
        let (sig, args) = arguments(&m).unwrap();
        assert_eq!((sig.as_str(), args.len()), ("s", 1));
        let m = signal(&());
        assert_eq!(arguments(&m).unwrap(), (String::new(), Vec::new()));
    }

    #[test]
    fn garbage_is_not_a_signature() {
        assert_eq!(signature_text(b""), None);
        assert_eq!(signature_text(b"x123"), None);
        assert_eq!(signature_text(&[b'l'; 20]), None);
    }
}
