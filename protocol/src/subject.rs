//! NATS subjects: the only place they are built and parsed.
//!
//! ```text
//! dbus.signals.<nkey>.<sender>.<path tokens>                     signals (path last, so `unit.>` works)
//! dbus.agent.<nkey>.<dest>.<path tokens>.<op>.<member>           a request to one agent
//! dbus.broadcast.<dest>.<path tokens>.<op>.<member>              a request to every agent (queue group = nkey)
//! dbus.presence.<nkey>                                           hello / heartbeat / goodbye
//! dbus.ping                                                      every agent replies with its AgentInfo
//! dbus.ping.<nkey>                                               that agent alone replies (a liveness probe)
//! dbus.metrics.<nkey>                                            the agent's own Prometheus text
//! dbus.audit.<nkey>                                              the agent's audit entries
//! ```
//! Bus names are one token each, escaped with [`crate::token`]. Object path elements are
//! already valid tokens and stay readable; the root path `/` is the token `-`, which no path
//! element can be. A request without a member (getall, introspect, list-names) uses `-` too.

use std::fmt;
use std::str::FromStr;

use crate::error::SubjectError;
use crate::names;
use crate::token;

/// First token of every cbus subject.
pub const PREFIX: &str = "dbus";
/// nats-server closes the connection when subject + reply + sizes exceed `max_control_line`
/// (4096 bytes by default) instead of returning an error, so we refuse long subjects ourselves.
pub const MAX_SUBJECT_LEN: usize = 1024;
/// Subject every agent answers with its [`crate::presence::AgentInfo`].
pub const PING: &str = "dbus.ping";
/// Where a liveness probe is sent to every agent (`dbus.ping.<nkey>`, [`ping_one`]).
pub const PING_ONE_ALL: &str = "dbus.ping.*";
/// Subscribe here for every agent's presence events.
pub const PRESENCE_ALL: &str = "dbus.presence.*";
/// Subscribe here for every agent's metrics.
pub const METRICS_ALL: &str = "dbus.metrics.*";
/// Subscribe here for every agent's audit entries.
pub const AUDIT_ALL: &str = "dbus.audit.*";
/// Every signal of every agent (the signal stream's subject).
pub const SIGNALS_ALL: &str = "dbus.signals.>";
/// Subscribe here (queue group = own nkey) to serve broadcast requests.
pub const BROADCAST_ALL: &str = "dbus.broadcast.>";
/// Token standing for the root path `/` or for "no member".
const NONE_TOKEN: &str = "-";

/// The operations an agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Read one property.
    Get,
    /// Write one property.
    Set,
    /// Read every property of an interface (or of all interfaces).
    #[serde(rename = "getall")]
    GetAll,
    /// Call a method.
    Call,
    /// Introspect an object: XML and a parsed schema.
    Introspect,
    /// List the names on the bus with their owners.
    ListNames,
}

impl Op {
    /// Every op, in documentation order.
    pub const ALL: [Op; 6] = [
        Op::Get,
        Op::Set,
        Op::GetAll,
        Op::Call,
        Op::Introspect,
        Op::ListNames,
    ];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::GetAll => "getall",
            Op::Call => "call",
            Op::Introspect => "introspect",
            Op::ListNames => "list-names",
        }
    }

    /// Whether the op needs a member token (property or method name).
    pub fn needs_member(self) -> bool {
        matches!(self, Op::Get | Op::Set | Op::Call)
    }

    /// Whether the op only reads (allowed by the default policy).
    pub fn is_read(self) -> bool {
        !matches!(self, Op::Set | Op::Call)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = SubjectError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| SubjectError::UnknownOp(s.to_owned()))
    }
}

/// Who a request goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// One agent, by nkey.
    Agent(String),
    /// Every agent; each machine answers once (queue group = its nkey).
    Broadcast,
}

/// A parsed request subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSubject {
    pub target: Target,
    /// Bus name of the destination, e.g. `org.freedesktop.systemd1`.
    pub destination: String,
    /// Object path, e.g. `/org/freedesktop/systemd1`.
    pub path: String,
    pub op: Op,
    /// Property or method name; `None` for ops without one.
    pub member: Option<String>,
}

impl RequestSubject {
    /// Builds and validates a request subject.
    pub fn new(
        target: Target,
        destination: impl Into<String>,
        path: impl Into<String>,
        op: Op,
        member: Option<String>,
    ) -> Result<Self, SubjectError> {
        let subject = RequestSubject {
            target,
            destination: destination.into(),
            path: path.into(),
            op,
            member,
        };
        subject.validate()?;
        Ok(subject)
    }

    fn validate(&self) -> Result<(), SubjectError> {
        if let Target::Agent(nkey) = &self.target {
            validate_nkey(nkey)?;
        }
        names::validate_bus_name(&self.destination)?;
        names::validate_object_path(&self.path)?;
        match (&self.member, self.op.needs_member()) {
            (Some(member), _) => names::validate_member(member)?,
            (None, true) => return Err(SubjectError::MissingMember(self.op)),
            (None, false) => {}
        }
        Ok(())
    }

    /// The subject text. Fails when the result would be longer than [`MAX_SUBJECT_LEN`].
    pub fn encode(&self) -> Result<String, SubjectError> {
        self.validate()?;
        let mut s = String::from(PREFIX);
        match &self.target {
            Target::Agent(nkey) => {
                s.push_str(".agent.");
                s.push_str(nkey);
            }
            Target::Broadcast => s.push_str(".broadcast"),
        }
        s.push('.');
        s.push_str(&token::escape(&self.destination));
        push_path(&mut s, &self.path);
        s.push('.');
        s.push_str(self.op.as_str());
        s.push('.');
        s.push_str(self.member.as_deref().unwrap_or(NONE_TOKEN));
        check_len(s)
    }

    /// Parses a subject produced by [`RequestSubject::encode`].
    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let (target, rest) = match tokens.as_slice() {
            [PREFIX, "agent", nkey, rest @ ..] => (Target::Agent((*nkey).to_owned()), rest),
            [PREFIX, "broadcast", rest @ ..] => (Target::Broadcast, rest),
            _ => return Err(SubjectError::NotARequest(subject.to_owned())),
        };
        // dest, at least one path token, op, member
        let [dest, path @ .., op, member] = rest else {
            return Err(SubjectError::TooFewTokens(subject.to_owned()));
        };
        if path.is_empty() {
            return Err(SubjectError::TooFewTokens(subject.to_owned()));
        }
        let member = match *member {
            NONE_TOKEN => None,
            m => Some(m.to_owned()),
        };
        RequestSubject::new(
            target,
            token::unescape(dest)?,
            parse_path(path)?,
            op.parse()?,
            member,
        )
    }
}

/// A parsed signal subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSubject {
    pub nkey: String,
    /// The sender's unique name (`:1.7`); only the bus driver itself sends as
    /// `org.freedesktop.DBus`.
    pub sender: String,
    pub path: String,
}

impl SignalSubject {
    pub fn new(
        nkey: impl Into<String>,
        sender: impl Into<String>,
        path: impl Into<String>,
    ) -> Result<Self, SubjectError> {
        let subject = SignalSubject {
            nkey: nkey.into(),
            sender: sender.into(),
            path: path.into(),
        };
        validate_nkey(&subject.nkey)?;
        names::validate_bus_name(&subject.sender)?;
        names::validate_object_path(&subject.path)?;
        Ok(subject)
    }

    pub fn encode(&self) -> Result<String, SubjectError> {
        let mut s = format!(
            "{PREFIX}.signals.{}.{}",
            self.nkey,
            token::escape(&self.sender)
        );
        push_path(&mut s, &self.path);
        check_len(s)
    }

    pub fn parse(subject: &str) -> Result<Self, SubjectError> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let [PREFIX, "signals", nkey, sender, path @ ..] = tokens.as_slice() else {
            return Err(SubjectError::NotASignal(subject.to_owned()));
        };
        if path.is_empty() {
            return Err(SubjectError::TooFewTokens(subject.to_owned()));
        }
        SignalSubject::new(*nkey, token::unescape(sender)?, parse_path(path)?)
    }
}

/// A subscription pattern for signals; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignalFilter {
    pub nkey: Option<String>,
    /// Unique name of the sender.
    pub sender: Option<String>,
    /// Matches this path and everything below it.
    pub path_prefix: Option<String>,
}

impl SignalFilter {
    /// The subjects to subscribe to: NATS's `>` needs at least one more token, so a path prefix
    /// needs the exact path and the path followed by `.>`.
    pub fn subjects(&self) -> Result<Vec<String>, SubjectError> {
        let nkey = match &self.nkey {
            Some(n) => {
                validate_nkey(n)?;
                n.clone()
            }
            None => "*".to_owned(),
        };
        let sender = match &self.sender {
            Some(s) => {
                names::validate_bus_name(s)?;
                token::escape(s)
            }
            None => "*".to_owned(),
        };
        let base = format!("{PREFIX}.signals.{nkey}.{sender}");
        match self.path_prefix.as_deref() {
            None | Some("/") => Ok(vec![format!("{base}.>")]),
            Some(path) => {
                names::validate_object_path(path)?;
                let mut exact = base;
                push_path(&mut exact, path);
                let below = format!("{exact}.>");
                Ok(vec![check_len(exact)?, check_len(below)?])
            }
        }
    }
}

impl SignalFilter {
    /// The one subject for signals at exactly `path_prefix` (`/` when unset), not below it:
    /// for watching one object, e.g. systemd's manager (`JobRemoved`) without every unit's
    /// `PropertiesChanged` underneath.
    pub fn exact_subject(&self) -> Result<String, SubjectError> {
        let nkey = match &self.nkey {
            Some(n) => {
                validate_nkey(n)?;
                n.clone()
            }
            None => "*".to_owned(),
        };
        let sender = match &self.sender {
            Some(s) => {
                names::validate_bus_name(s)?;
                token::escape(s)
            }
            None => "*".to_owned(),
        };
        let path = self.path_prefix.as_deref().unwrap_or("/");
        names::validate_object_path(path)?;
        let mut s = format!("{PREFIX}.signals.{nkey}.{sender}");
        push_path(&mut s, path);
        check_len(s)
    }
}

/// Presence events of one agent.
pub fn presence(nkey: &str) -> String {
    format!("{PREFIX}.presence.{nkey}")
}

/// A ping for one agent only: it answers as to [`PING`], on its own presence subject. A
/// fan-out probes its silent machines this way, without waking the whole fleet.
pub fn ping_one(nkey: &str) -> String {
    format!("{PING}.{nkey}")
}

/// The agent's own metrics.
pub fn metrics(nkey: &str) -> String {
    format!("{PREFIX}.metrics.{nkey}")
}

/// The agent's audit entries ([`crate::audit::AuditEntry`]).
pub fn audit(nkey: &str) -> String {
    format!("{PREFIX}.audit.{nkey}")
}

/// The `<nkey>` of an audit subject (`dbus.audit.<nkey>`), which NATS permissions tie to the
/// agent that wrote the entry; `None` for another subject.
pub fn audit_nkey(subject: &str) -> Option<&str> {
    let nkey = subject.strip_prefix(PREFIX)?.strip_prefix(".audit.")?;
    validate_nkey(nkey).ok().map(|_| nkey)
}

/// Everything addressed to one agent.
pub fn agent_requests(nkey: &str) -> String {
    format!("{PREFIX}.agent.{nkey}.>")
}

/// The nkey in the last token of a presence or metrics subject.
pub fn nkey_of(subject: &str) -> Option<&str> {
    let nkey = subject.rsplit('.').next()?;
    validate_nkey(nkey).ok().map(|_| nkey)
}

/// The `<nkey>` token of a signal subject (`dbus.signals.<nkey>.<sender>.<path>`), which NATS
/// permissions tie to the agent that published it; `None` for another subject or a malformed
/// nkey. Cheaper than [`SignalSubject::parse`] for a consumer that needs only the machine.
pub fn signal_nkey(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix(".signals.")?;
    let nkey = rest.split('.').next()?;
    validate_nkey(nkey).ok().map(|_| nkey)
}

/// An agent id: a NATS user public key, `U` followed by 55 base32 characters.
pub fn validate_nkey(nkey: &str) -> Result<(), SubjectError> {
    let ok = nkey.len() == 56
        && nkey.starts_with('U')
        && nkey.bytes().all(|b| matches!(b, b'A'..=b'Z' | b'2'..=b'7'));
    if ok {
        Ok(())
    } else {
        Err(SubjectError::BadNkey(nkey.to_owned()))
    }
}

fn push_path(s: &mut String, path: &str) {
    if path == "/" {
        s.push('.');
        s.push_str(NONE_TOKEN);
        return;
    }
    for element in path.split('/').skip(1) {
        s.push('.');
        s.push_str(element);
    }
}

fn parse_path(tokens: &[&str]) -> Result<String, SubjectError> {
    let path = if tokens == [NONE_TOKEN] {
        "/".to_owned()
    } else {
        let mut p = String::new();
        for t in tokens {
            p.push('/');
            p.push_str(t);
        }
        p
    };
    names::validate_object_path(&path)?;
    Ok(path)
}

fn check_len(s: String) -> Result<String, SubjectError> {
    if s.len() > MAX_SUBJECT_LEN {
        Err(SubjectError::TooLong {
            len: s.len(),
            max: MAX_SUBJECT_LEN,
        })
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NKEY: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";

    #[test]
    fn request_round_trip() {
        let r = RequestSubject::new(
            Target::Agent(NKEY.into()),
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1/unit/basic_2etarget",
            Op::Get,
            Some("ActiveState".into()),
        )
        .unwrap();
        let s = r.encode().unwrap();
        assert_eq!(
            s,
            format!("dbus.agent.{NKEY}.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.unit.basic_2etarget.get.ActiveState")
        );
        assert_eq!(RequestSubject::parse(&s).unwrap(), r);
    }

    #[test]
    fn broadcast_root_path_no_member() {
        let r = RequestSubject::new(Target::Broadcast, ":1.42", "/", Op::Introspect, None).unwrap();
        let s = r.encode().unwrap();
        assert_eq!(s, "dbus.broadcast._3a1_2e42.-.introspect.-");
        assert_eq!(RequestSubject::parse(&s).unwrap(), r);
    }

    #[test]
    fn signal_round_trip() {
        let sig = SignalSubject::new(
            NKEY,
            ":1.1",
            "/org/freedesktop/systemd1/unit/nscd_2eservice",
        )
        .unwrap();
        let s = sig.encode().unwrap();
        assert_eq!(
            s,
            format!("dbus.signals.{NKEY}._3a1_2e1.org.freedesktop.systemd1.unit.nscd_2eservice")
        );
        assert_eq!(SignalSubject::parse(&s).unwrap(), sig);
    }

    #[test]
    fn filters() {
        let f = SignalFilter {
            path_prefix: Some("/org/freedesktop/systemd1/unit".into()),
            ..Default::default()
        };
        assert_eq!(
            f.subjects().unwrap(),
            vec![
                "dbus.signals.*.*.org.freedesktop.systemd1.unit",
                "dbus.signals.*.*.org.freedesktop.systemd1.unit.>"
            ]
        );
        assert_eq!(
            SignalFilter::default().subjects().unwrap(),
            vec!["dbus.signals.*.*.>"]
        );
    }

    #[test]
    fn exact_filter() {
        let f = SignalFilter {
            nkey: Some(NKEY.into()),
            path_prefix: Some("/org/freedesktop/systemd1".into()),
            ..Default::default()
        };
        let s = f.exact_subject().unwrap();
        assert_eq!(s, format!("dbus.signals.{NKEY}.*.org.freedesktop.systemd1"));
        // What an agent publishes for that object matches; a unit below it does not.
        let at = SignalSubject::new(NKEY, ":1.1", "/org/freedesktop/systemd1")
            .unwrap()
            .encode()
            .unwrap();
        assert_eq!(at.replace("_3a1_2e1", "*"), s);
        assert_eq!(
            SignalFilter::default().exact_subject().unwrap(),
            "dbus.signals.*.*.-"
        );
        let bad = SignalFilter {
            path_prefix: Some("no/slash".into()),
            ..Default::default()
        };
        assert!(bad.exact_subject().is_err());
    }

    #[test]
    fn signal_nkeys() {
        let nkey = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
        let s = format!("dbus.signals.{nkey}._3a1_2e1.org.freedesktop.systemd1");
        assert_eq!(signal_nkey(&s), Some(nkey));
        assert_eq!(signal_nkey(&format!("dbus.presence.{nkey}")), None);
        assert_eq!(signal_nkey("dbus.signals.Ubad._3a1_2e1.-"), None);
    }

    #[test]
    fn audit_subjects() {
        let s = audit(NKEY);
        assert_eq!(s, format!("dbus.audit.{NKEY}"));
        assert_eq!(audit_nkey(&s), Some(NKEY));
        assert_eq!(audit_nkey(&format!("dbus.audit.{NKEY}.x")), None);
        assert_eq!(audit_nkey(&presence(NKEY)), None);
        assert_eq!(audit_nkey("dbus.audit.Ubad"), None);
    }

    #[test]
    fn errors() {
        assert!(matches!(
            RequestSubject::parse("dbus.agent.x"),
            Err(SubjectError::TooFewTokens(_)) | Err(SubjectError::BadNkey(_))
        ));
        assert!(RequestSubject::parse("dbus.broadcast.org_2ex.-.get.-").is_err());
        assert!(RequestSubject::parse("dbus.broadcast.org_2ex.-.frob.X").is_err());
        assert!(RequestSubject::parse("nats.broadcast.a.b.get.X").is_err());
        let long = format!("/{}", vec!["abcdefgh"; 200].join("/"));
        let r =
            RequestSubject::new(Target::Broadcast, "a.b", long, Op::Get, Some("X".into())).unwrap();
        assert!(matches!(r.encode(), Err(SubjectError::TooLong { .. })));
    }
}
