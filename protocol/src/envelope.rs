//! Request bodies and the one reply envelope shared by every op.
//!
//! ```json
//! {"nkey":"U...","hostname":"web1","ok":true,"signature":"s","value":"active"}
//! {"nkey":"U...","hostname":"web1","ok":false,
//!  "error":{"code":"not-found","dbus_name":"org.freedesktop.DBus.Error.UnknownObject","message":"..."}}
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// The body of a request (JSON). Every field is optional; an empty payload means `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Interface of the member. When absent the agent resolves it by introspection and
    /// refuses an ambiguous member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Method arguments (call): a JSON array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    /// D-Bus signature of `args` (call) or of `value` (set). When absent the agent takes it
    /// from introspection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The new property value (set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// Per-request D-Bus call timeout; the agent caps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl Request {
    /// Parses a request payload; an empty payload is an empty request.
    pub fn from_payload(payload: &[u8]) -> Result<Self, serde_json::Error> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(Request::default());
        }
        // Parsed as a value first: serde would also build the struct from a JSON array.
        let value: serde_json::Value = serde_json::from_slice(payload)?;
        if !value.is_object() {
            return Err(serde::de::Error::custom(
                "a request body must be a JSON object",
            ));
        }
        serde_json::from_value(value)
    }
}

impl Request {
    /// Refuses fields the op does not use, so a typo'd request fails loudly instead of doing
    /// something else than meant.
    pub fn check_for(&self, op: crate::subject::Op) -> Result<(), String> {
        use crate::subject::Op;
        let (args, value, signature) = match op {
            Op::Call => (true, false, true),
            Op::Set => (false, true, true),
            _ => (false, false, false),
        };
        let unused = [
            ("args", self.args.is_some() && !args),
            ("value", self.value.is_some() && !value),
            ("signature", self.signature.is_some() && !signature),
            (
                "interface",
                self.interface.is_some() && matches!(op, Op::Introspect | Op::ListNames),
            ),
        ];
        match unused.iter().find(|(_, bad)| *bad) {
            Some((field, _)) => Err(format!("{op} does not take \"{field}\"")),
            None => Ok(()),
        }
    }
}

/// Error classes, in the style of Cockpit's problem codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    NotFound,
    AccessDenied,
    InvalidArgument,
    Timeout,
    Disconnected,
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not-found",
            ErrorCode::AccessDenied => "access-denied",
            ErrorCode::InvalidArgument => "invalid-argument",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Disconnected => "disconnected",
            ErrorCode::InternalError => "internal-error",
        }
    }

    /// Classifies a D-Bus error name. Unknown names are `internal-error`: the D-Bus name is
    /// kept in the envelope, so nothing is lost.
    pub fn from_dbus_name(name: &str) -> ErrorCode {
        let last = name.rsplit('.').next().unwrap_or(name);
        match last {
            "ServiceUnknown" | "NameHasNoOwner" | "UnknownObject" | "UnknownInterface"
            | "UnknownMethod" | "UnknownProperty" | "NoSuchUnit" | "FileNotFound" | "NoSuchJob"
            | "LoadFailed" => ErrorCode::NotFound,
            "AccessDenied"
            | "AuthFailed"
            | "InteractiveAuthorizationRequired"
            | "PropertyReadOnly"
            | "UnitMasked" => ErrorCode::AccessDenied,
            "InvalidArgs" | "InvalidSignature" | "MatchRuleInvalid" | "InvalidFileContent" => {
                ErrorCode::InvalidArgument
            }
            "Timeout" | "NoReply" | "TimedOut" => ErrorCode::Timeout,
            "Disconnected" | "NoServer" | "NoNetwork" => ErrorCode::Disconnected,
            _ => ErrorCode::InternalError,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, for a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// The D-Bus error name when the error came from D-Bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbus_name: Option<String>,
    pub message: String,
}

/// The longest error message a reply carries; longer ones (a D-Bus peer's, or one quoting bad
/// input) are cut, saying how long they were. Messages quote input through `codec::quote`
/// already; this is the backstop for text cbus does not control.
pub const MAX_ERROR_MESSAGE: usize = 1024;

fn bounded(message: String) -> String {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message;
    }
    let mut cut = MAX_ERROR_MESSAGE - 40;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes)", &message[..cut], message.len())
}

impl ErrorBody {
    /// An error; a message over [`MAX_ERROR_MESSAGE`] bytes is cut.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            dbus_name: None,
            message: bounded(message.into()),
        }
    }

    /// An error returned by a D-Bus peer, classified by its name.
    pub fn from_dbus(dbus_name: impl Into<String>, message: impl Into<String>) -> Self {
        let dbus_name = dbus_name.into();
        ErrorBody {
            code: ErrorCode::from_dbus_name(&dbus_name),
            dbus_name: Some(dbus_name),
            message: bounded(message.into()),
        }
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dbus_name {
            Some(name) => write!(f, "{}: {} ({name})", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for ErrorBody {}

/// A successful result: the D-Bus signature of `value` and the value in the JSON codec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Success {
    /// Absent for results that are not D-Bus values (introspect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    pub value: serde_json::Value,
}

/// The reply to any request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireReply", into = "WireReply")]
pub struct Reply {
    pub nkey: String,
    pub hostname: String,
    pub result: Result<Success, ErrorBody>,
}

impl Reply {
    pub fn to_payload(&self) -> bytes::Bytes {
        // Serializing this type cannot fail: no maps with non-string keys, no foreign types.
        serde_json::to_vec(self)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":{{\"code\":\"internal-error\",\"message\":\"{e}\"}}}}").into_bytes())
            .into()
    }

    pub fn from_payload(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

#[derive(Serialize, Deserialize)]
struct WireReply {
    nkey: String,
    hostname: String,
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

impl TryFrom<WireReply> for Reply {
    type Error = String;
    fn try_from(w: WireReply) -> Result<Self, String> {
        let result = match (w.ok, w.error) {
            (true, None) => Ok(Success {
                signature: w.signature,
                value: w.value.unwrap_or(serde_json::Value::Null),
            }),
            (false, Some(e)) => Err(e),
            (true, Some(_)) => return Err("reply has ok=true and an error".into()),
            (false, None) => return Err("reply has ok=false but no error".into()),
        };
        Ok(Reply {
            nkey: w.nkey,
            hostname: w.hostname,
            result,
        })
    }
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> Self {
        match r.result {
            Ok(s) => WireReply {
                nkey: r.nkey,
                hostname: r.hostname,
                ok: true,
                signature: s.signature,
                value: Some(s.value),
                error: None,
            },
            Err(e) => WireReply {
                nkey: r.nkey,
                hostname: r.hostname,
                ok: false,
                signature: None,
                value: None,
                error: Some(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_wire_form() {
        let ok = Reply {
            nkey: "U1".into(),
            hostname: "web1".into(),
            result: Ok(Success {
                signature: Some("s".into()),
                value: "active".into(),
            }),
        };
        let text = serde_json::to_string(&ok).unwrap();
        assert_eq!(
            text,
            r#"{"nkey":"U1","hostname":"web1","ok":true,"signature":"s","value":"active"}"#
        );
        assert_eq!(Reply::from_payload(text.as_bytes()).unwrap(), ok);

        let err = Reply {
            nkey: "U1".into(),
            hostname: "web1".into(),
            result: Err(ErrorBody::from_dbus(
                "org.freedesktop.systemd1.NoSuchUnit",
                "Unit x.service not loaded.",
            )),
        };
        let text = serde_json::to_string(&err).unwrap();
        assert!(text.contains(r#""code":"not-found""#), "{text}");
        assert_eq!(Reply::from_payload(text.as_bytes()).unwrap(), err);
        assert!(Reply::from_payload(br#"{"nkey":"U","hostname":"h","ok":false}"#).is_err());
    }

    #[test]
    fn requests() {
        assert_eq!(Request::from_payload(b"").unwrap(), Request::default());
        let r = Request::from_payload(br#"{"args":["a",1],"signature":"su"}"#).unwrap();
        assert_eq!(r.signature.as_deref(), Some("su"));
        assert!(Request::from_payload(br#"{"argz":[]}"#).is_err());
        assert!(Request::from_payload(b"[]").is_err());
        assert!(Request::from_payload(b"null").is_err());
        let r = Request::from_payload(br#"{"args":[1]}"#).unwrap();
        assert!(r.check_for(crate::Op::Call).is_ok());
        assert_eq!(
            r.check_for(crate::Op::Get).unwrap_err(),
            "get does not take \"args\""
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let e = ErrorBody::new(ErrorCode::InvalidArgument, "é".repeat(100_000));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE, "{}", e.message.len());
        assert!(e.message.ends_with("… (200000 bytes)"));
        let e = ErrorBody::from_dbus("x.y.Failed", "z".repeat(5000));
        assert!(e.message.len() <= MAX_ERROR_MESSAGE);
        assert_eq!(ErrorBody::new(ErrorCode::Timeout, "short").message, "short");
    }

    #[test]
    fn codes() {
        assert_eq!(
            ErrorCode::from_dbus_name("org.freedesktop.DBus.Error.UnknownProperty"),
            ErrorCode::NotFound
        );
        assert_eq!(
            ErrorCode::from_dbus_name("org.freedesktop.DBus.Error.AccessDenied"),
            ErrorCode::AccessDenied
        );
        assert_eq!(
            ErrorCode::from_dbus_name("x.y.Weird"),
            ErrorCode::InternalError
        );
    }
}
