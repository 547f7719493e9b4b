//! The WebSocket messages (protocol version [`VERSION`]), parsed strictly.
//!
//! A frame that is not a JSON object with a known `type` and the fields that type needs, with
//! the right JSON types and nothing unknown, is *malformed*: the session closes with 1002 and
//! the parse error as reason, so a client bug shows at once instead of being half-understood.
//! A well-formed message that asks for something impossible (an invalid bus name, an unknown
//! subscription) gets an `error` message and the connection stays.

use serde::Deserialize;
use serde_json::Value;

/// Protocol version announced in `hello`.
pub(crate) const VERSION: u32 = 1;

/// Close codes.
pub(crate) const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub(crate) const CLOSE_GOING_AWAY: u16 = 1001;
pub(crate) const CLOSE_UNAUTHORIZED: u16 = 4401;

/// A message from a client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClientMsg {
    Auth { token: String },
    Subscribe { id: String, resource: Resource },
    Unsubscribe { id: String },
    Request(RequestMsg),
    Ping,
    Pong,
}

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "resource", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Resource {
    /// Every machine and its state.
    Machines {},
    /// Units, optionally of some machines and with names matching a glob (`*`, `?`).
    Units {
        #[serde(default)]
        machines: Option<Vec<String>>,
        #[serde(default)]
        unit: Option<String>,
    },
    /// Fleet aggregates (docs/protocol.md): counts, failed units, one page of unit names.
    Fleet {
        /// Glob of unit names counted.
        #[serde(default)]
        unit: Option<String>,
        /// `key=value`: only machines with this label.
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        offset: Option<usize>,
        #[serde(default)]
        limit: Option<usize>,
        /// Failed units listed at most (default and cap: 100).
        #[serde(default)]
        failed_limit: Option<usize>,
        /// Machines listed per failed unit at most (default and cap: 50).
        #[serde(default)]
        failed_machines: Option<usize>,
    },
    /// One D-Bus object on one machine: schema and property values.
    Object {
        machine: String,
        dest: String,
        path: String,
        #[serde(default)]
        interface: Option<String>,
    },
    /// Signals matching a filter; every field optional.
    Signals {
        #[serde(default)]
        machine: Option<String>,
        /// Unique (`:1.7`) or well-known name of the sender.
        #[serde(default)]
        sender: Option<String>,
        #[serde(default)]
        interface: Option<String>,
        #[serde(default)]
        member: Option<String>,
        #[serde(default)]
        path_prefix: Option<String>,
        /// Start this far back (ms) in the signal stream, when it exists: the recent past, then
        /// live signals with no gap or duplicate between them.
        #[serde(default)]
        since_ms: Option<u64>,
        /// At most this many signals of the past.
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The audit trail: a page of the newest entries, then new ones as they are stored.
    Audit {
        #[serde(default)]
        machine: Option<String>,
        /// How far back the page looks (ms).
        #[serde(default)]
        since_ms: Option<u64>,
        /// Entries in the page at most.
        #[serde(default)]
        limit: Option<usize>,
    },
}

/// Which machines a request goes to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Targets {
    All,
    Some(Vec<String>),
}

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) if s == "all" => Ok(Targets::All),
            Value::Array(items) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(serde::de::Error::custom("targets must be nkey strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Targets::Some),
            _ => Err(serde::de::Error::custom(
                "targets must be \"all\" or an array of nkeys",
            )),
        }
    }
}

/// The operations a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RequestOp {
    Get,
    Set,
    Call,
    Start,
    Stop,
    Restart,
    Introspect,
    ListNames,
}

/// `{"type":"request", ...}`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestMsg {
    /// Echoed in every `result` and the `done`; a string or a number.
    pub id: Value,
    pub op: RequestOp,
    pub targets: Targets,
    /// Unit name, for start/stop/restart.
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub dest: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub interface: Option<String>,
    /// Property (get/set) or method (call).
    #[serde(default)]
    pub member: Option<String>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub signature: Option<String>,
    #[serde(default)]
    pub value: Option<Value>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Rolling start/stop/restart: machines in flight at most (`3`, `25%`).
    #[serde(default)]
    pub batch: Option<String>,
    /// Rolling: failed or unreachable machines tolerated before no more start (`0`, `10%`).
    #[serde(default)]
    pub max_fail: Option<String>,
    /// Rolling: a machine is done once its unit reached the job's state and stayed in it this
    /// long (the CLI's `--hold`), judged from the gateway's cache, which signals keep.
    #[serde(default)]
    pub hold_ms: Option<u64>,
    /// Rolling: `host` (the default) or `label:KEY` (the CLI's `--order`).
    #[serde(default)]
    pub order: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthMsg {
    #[serde(rename = "type")]
    _type: String,
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdMsg {
    #[serde(rename = "type")]
    _type: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Bare {
    #[serde(rename = "type")]
    _type: String,
    #[serde(default, rename = "t")]
    _t: Option<Value>,
}

/// Why a frame is malformed (the close reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Malformed(pub String);

fn bad(e: impl std::fmt::Display) -> Malformed {
    Malformed(e.to_string())
}

/// Parses one text frame.
pub(crate) fn parse(text: &str) -> Result<ClientMsg, Malformed> {
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(bad("a message must be a JSON object"));
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(bad("a message needs a string \"type\"")),
    };
    let whole = |obj: serde_json::Map<String, Value>| Value::Object(obj);
    match kind.as_str() {
        "auth" => {
            let m: AuthMsg =
                serde_json::from_value(whole(obj)).map_err(|e| bad(format!("auth: {e}")))?;
            Ok(ClientMsg::Auth { token: m.token })
        }
        "subscribe" => {
            obj.remove("type");
            let id = match obj.remove("id") {
                Some(Value::String(s)) if !s.is_empty() && s.len() <= 128 => s,
                _ => {
                    return Err(bad(
                        "subscribe: needs a string \"id\" (1 to 128 characters)",
                    ))
                }
            };
            let resource: Resource =
                serde_json::from_value(whole(obj)).map_err(|e| bad(format!("subscribe: {e}")))?;
            Ok(ClientMsg::Subscribe { id, resource })
        }
        "unsubscribe" => {
            let m: IdMsg =
                serde_json::from_value(whole(obj)).map_err(|e| bad(format!("unsubscribe: {e}")))?;
            Ok(ClientMsg::Unsubscribe { id: m.id })
        }
        "request" => {
            obj.remove("type");
            let r: RequestMsg =
                serde_json::from_value(whole(obj)).map_err(|e| bad(format!("request: {e}")))?;
            if !(r.id.is_string() || r.id.is_number()) {
                return Err(bad("request: \"id\" must be a string or a number"));
            }
            Ok(ClientMsg::Request(r))
        }
        "ping" | "pong" => {
            let _: Bare =
                serde_json::from_value(whole(obj)).map_err(|e| bad(format!("{kind}: {e}")))?;
            Ok(if kind == "ping" {
                ClientMsg::Ping
            } else {
                ClientMsg::Pong
            })
        }
        other => Err(bad(format!(
            "unknown message type {:?}",
            other.chars().take(40).collect::<String>()
        ))),
    }
}

/// A close reason fits in 123 bytes; cut on a character boundary.
pub(crate) fn close_reason(text: &str) -> String {
    let mut s = String::new();
    for c in text.chars() {
        if s.len() + c.len_utf8() > 123 {
            break;
        }
        s.push(c);
    }
    s
}

/// A unit glob: the anchored regex, and the literal text before its first wildcard, so that a
/// snapshot looks names up by prefix in each machine's sorted units instead of matching every
/// name (at 10,000 machines x 200 units the regex over 2,000,000 names was 75 % of a
/// snapshot's time).
#[derive(Debug, Clone)]
pub(crate) struct Glob {
    re: regex::Regex,
    prefix: String,
}

impl Glob {
    pub(crate) fn new(glob: &str) -> Result<Glob, regex::Error> {
        let prefix = glob.split(['*', '?']).next().unwrap_or_default().to_owned();
        Ok(Glob {
            re: glob_regex(glob)?,
            prefix,
        })
    }

    pub(crate) fn is_match(&self, name: &str) -> bool {
        self.re.is_match(name)
    }

    /// Every name the glob matches starts with this.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// A glob (`*`, `?`) as an anchored regex.
pub(crate) fn glob_regex(glob: &str) -> Result<regex::Regex, regex::Error> {
    let mut re = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message() {
        assert_eq!(
            parse(r#"{"type":"auth","token":"x"}"#).unwrap(),
            ClientMsg::Auth { token: "x".into() }
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"m","resource":"machines"}"#).unwrap(),
            ClientMsg::Subscribe {
                id: "m".into(),
                resource: Resource::Machines {}
            }
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"u","resource":"units","machines":["U1"],"unit":"ssh*"}"#)
                .unwrap(),
            ClientMsg::Subscribe {
                id: "u".into(),
                resource: Resource::Units {
                    machines: Some(vec!["U1".into()]),
                    unit: Some("ssh*".into())
                }
            }
        );
        match parse(r#"{"type":"subscribe","id":"o","resource":"object","machine":"U","dest":"a.b","path":"/"}"#).unwrap() {
            ClientMsg::Subscribe { resource: Resource::Object { interface: None, .. }, .. } => {}
            other => panic!("{other:?}"),
        }
        match parse(
            r#"{"type":"subscribe","id":"s","resource":"signals","member":"PropertiesChanged"}"#,
        )
        .unwrap()
        {
            ClientMsg::Subscribe {
                resource:
                    Resource::Signals {
                        member: Some(_),
                        machine: None,
                        ..
                    },
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"type":"subscribe","id":"a","resource":"audit","machine":"U1","since_ms":3600000,"limit":5}"#)
                .unwrap(),
            ClientMsg::Subscribe {
                id: "a".into(),
                resource: Resource::Audit {
                    machine: Some("U1".into()),
                    since_ms: Some(3_600_000),
                    limit: Some(5)
                }
            }
        );
        match parse(r#"{"type":"subscribe","id":"s","resource":"signals","since_ms":60000}"#)
            .unwrap()
        {
            ClientMsg::Subscribe {
                resource:
                    Resource::Signals {
                        since_ms: Some(60_000),
                        limit: None,
                        ..
                    },
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"type":"unsubscribe","id":"m"}"#).unwrap(),
            ClientMsg::Unsubscribe { id: "m".into() }
        );
        match parse(
            r#"{"type":"request","id":7,"op":"restart","targets":"all","unit":"x.service"}"#,
        )
        .unwrap()
        {
            ClientMsg::Request(r) => {
                assert_eq!(r.op, RequestOp::Restart);
                assert_eq!(r.targets, Targets::All);
            }
            other => panic!("{other:?}"),
        }
        match parse(r#"{"type":"request","id":"a","op":"list-names","targets":["U1","U2"]}"#)
            .unwrap()
        {
            ClientMsg::Request(r) => {
                assert_eq!(r.targets, Targets::Some(vec!["U1".into(), "U2".into()]))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientMsg::Ping);
        assert_eq!(parse(r#"{"type":"pong","t":1}"#).unwrap(), ClientMsg::Pong);
    }

    #[test]
    fn malformed_frames_are_refused() {
        for bad in [
            "",
            "nope",
            "[]",
            "{}",
            r#"{"type":1}"#,
            r#"{"type":"frob"}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"auth","token":"x","extra":1}"#,
            r#"{"type":"subscribe","resource":"machines"}"#,
            r#"{"type":"subscribe","id":"m","resource":"tables"}"#,
            r#"{"type":"subscribe","id":"m","resource":"machines","x":1}"#,
            r#"{"type":"subscribe","id":"o","resource":"object","machine":"U"}"#,
            r#"{"type":"subscribe","id":"a","resource":"audit","since_ms":-1}"#,
            r#"{"type":"subscribe","id":"a","resource":"audit","host":"x"}"#,
            r#"{"type":"request","id":{},"op":"get","targets":"all"}"#,
            r#"{"type":"request","id":1,"op":"reboot","targets":"all"}"#,
            r#"{"type":"request","id":1,"op":"get","targets":"some"}"#,
            r#"{"type":"request","id":1,"op":"get","targets":[1]}"#,
            r#"{"type":"request","id":1,"op":"get"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let e = parse(r#"{"type":"frob"}"#).unwrap_err();
        assert_eq!(e.to_string(), "unknown message type \"frob\"");
    }

    #[test]
    fn helpers() {
        assert_eq!(close_reason(&"é".repeat(100)).len(), 122);
        let g = glob_regex("ssh*.serv?ce").unwrap();
        assert!(g.is_match("sshd.service"));
        assert!(!g.is_match("xsshd.service"));
        assert!(glob_regex("a.b").unwrap().is_match("a.b"));
        let g = Glob::new("emu-001.*").unwrap();
        assert_eq!(g.prefix(), "emu-001.");
        assert!(g.is_match("emu-001.service") && !g.is_match("emu-0010.service"));
        assert_eq!(Glob::new("*ssh*").unwrap().prefix(), "");
        assert_eq!(Glob::new("ssh?d.service").unwrap().prefix(), "ssh");
        assert!(!glob_regex("a.b").unwrap().is_match("axb"));
    }
}
