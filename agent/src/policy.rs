//! What may be done remotely.
//!
//! Reads (get, getall, introspect, list-names) are allowed; set and call are denied unless a rule
//! allows them, because a call on the system bus can reboot a machine. A few methods are known
//! to only read ([`READ_ONLY_CALLS`], such as systemd's `ListUnits`) and count as reads, on
//! their own destination only: any service may name an interface `org.freedesktop.systemd1.
//! Manager`, so a method is read-only because of who implements it, not because of its name.
//!
//! A rule names ops and globs over destination, interface and member, and optionally `args`:
//! one glob per positional argument, from the first; a rule with `args` matches only when each
//! of those arguments is a string (or object path) that its glob matches. For `set`, the value
//! is the one argument. `[[deny]]` rules win over `[[allow]]` rules and over [`READ_ONLY_CALLS`]:
//! "may restart services" must not also mean `StartUnit("reboot.target")`.
//!
//! ```toml
//! [[allow]]
//! ops = ["call"]
//! destination = "org.freedesktop.systemd1"
//! interface = "org.freedesktop.systemd1.Manager"
//! member = "{Start,Stop,Restart,Reload}Unit"
//! args = ["*.service", "{replace,fail}"]
//!
//! [[deny]]
//! ops = ["call"]
//! destination = "org.freedesktop.systemd1"
//! member = "{Reboot,PowerOff,Halt,KExec}"
//! ```

use std::path::Path;

use cbus_protocol::Op;
use globset::{Glob, GlobMatcher};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid policy {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<RuleFile>,
    #[serde(default)]
    deny: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    ops: Vec<Op>,
    #[serde(default = "star")]
    destination: String,
    #[serde(default = "star")]
    interface: String,
    #[serde(default = "star")]
    member: String,
    #[serde(default)]
    args: Vec<String>,
}

fn star() -> String {
    "*".into()
}

/// Any destination, in [`READ_ONLY_CALLS`].
const ANY: &str = "*";

/// Methods that only read state, allowed like property reads: (destination, interface, member).
/// A destination of `*` is any: `org.freedesktop.DBus.Peer` is answered by the bus library of
/// every peer, never by application code.
pub const READ_ONLY_CALLS: &[(&str, &str, &str)] = &[
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnits",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnitsByPatterns",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnitsByNames",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnitsFiltered",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListUnitFiles",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "ListJobs",
    ),
    // Never loads a unit (NoSuchUnit when it is not loaded).
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "GetUnit",
    ),
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "GetDefaultTarget",
    ),
    // Only asks systemd to emit unit signals (what `systemctl status` and the gateway need).
    (
        "org.freedesktop.systemd1",
        "org.freedesktop.systemd1.Manager",
        "Subscribe",
    ),
    (ANY, "org.freedesktop.DBus.Peer", "Ping"),
    (ANY, "org.freedesktop.DBus.Peer", "GetMachineId"),
];

/// Whether a call is in [`READ_ONLY_CALLS`].
pub fn is_read_listed(destination: &str, interface: &str, member: &str) -> bool {
    READ_ONLY_CALLS
        .iter()
        .any(|&(d, i, m)| (d == ANY || d == destination) && i == interface && m == member)
}

struct Rule {
    ops: Vec<Op>,
    destination: GlobMatcher,
    interface: GlobMatcher,
    member: GlobMatcher,
    args: Vec<GlobMatcher>,
}

impl Rule {
    /// Whether the rule matches, ignoring its argument patterns.
    fn matches_target(&self, op: Op, destination: &str, interface: &str, member: &str) -> bool {
        self.ops.contains(&op)
            && self.destination.is_match(destination)
            && self.interface.is_match(interface)
            && self.member.is_match(member)
    }

    fn matches(&self, a: &Action<'_>) -> bool {
        self.matches_target(a.op, a.destination, a.interface, a.member)
            && self
                .args
                .iter()
                .enumerate()
                .all(|(i, glob)| matches!(a.args.get(i), Some(Some(s)) if glob.is_match(s)))
    }
}

/// A remote set or call, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    pub op: Op,
    pub destination: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    /// The positional arguments (for set: the value) as text when they are strings or object
    /// paths, `None` otherwise.
    pub args: &'a [Option<&'a str>],
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A read (a read op, or a call in [`READ_ONLY_CALLS`]): sent without auto-start.
    Read,
    /// Allowed by a rule (or `--allow-all`).
    Allowed,
    /// Refused; says why.
    Denied(String),
}

/// The loaded policy.
pub struct Policy {
    allow_all: bool,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Policy {
    /// Reads only; nothing may be set or called.
    pub fn read_only() -> Self {
        Policy {
            allow_all: false,
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }

    pub fn allow_all() -> Self {
        Policy {
            allow_all: true,
            ..Self::read_only()
        }
    }

    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PolicyError::Invalid {
            path: shown,
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let glob = |g: &str| {
            Glob::new(g)
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("glob {g:?}: {e}"))
        };
        let rules = |list: Vec<RuleFile>, kind: &str| {
            list.into_iter()
                .enumerate()
                .map(|(n, r)| {
                    if let Some(op) = r.ops.iter().find(|op| op.is_read()) {
                        // Reads are always allowed; a rule about them would silently do nothing.
                        return Err(format!(
                            "[[{kind}]] rule {}: op {op} is a read; rules are about set and call",
                            n + 1
                        ));
                    }
                    Ok(Rule {
                        ops: r.ops,
                        destination: glob(&r.destination)?,
                        interface: glob(&r.interface)?,
                        member: glob(&r.member)?,
                        args: r.args.iter().map(|a| glob(a)).collect::<Result<_, _>>()?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Policy {
            allow_all: false,
            allow: rules(file.allow, "allow")?,
            deny: rules(file.deny, "deny")?,
        })
    }

    /// Whether `a` may be done, and how.
    pub fn check(&self, a: &Action<'_>) -> Verdict {
        if a.op.is_read() {
            return Verdict::Read;
        }
        if let Some(n) = self.deny.iter().position(|r| r.matches(a)) {
            return Verdict::Denied(format!("denied by [[deny]] rule {}", n + 1));
        }
        if a.op == Op::Call && is_read_listed(a.destination, a.interface, a.member) {
            return Verdict::Read;
        }
        if self.allow_all || self.allow.iter().any(|r| r.matches(a)) {
            return Verdict::Allowed;
        }
        Verdict::Denied("no [[allow]] rule matches".into())
    }

    /// Whether some allow rule could allow `op` of `member` on `destination` (with `interface`
    /// when known), whatever the arguments: only then may looking the member up (introspection)
    /// start the destination's service.
    pub fn may_allow(
        &self,
        op: Op,
        destination: &str,
        interface: Option<&str>,
        member: &str,
    ) -> bool {
        self.allow_all
            || self.allow.iter().any(|r| {
                r.ops.contains(&op)
                    && r.destination.is_match(destination)
                    && interface.is_none_or(|i| r.interface.is_match(i))
                    && r.member.is_match(member)
            })
    }

    /// Shorthand for tests: whether [`Policy::check`] lets `op` through with these arguments.
    pub fn allows(
        &self,
        op: Op,
        destination: &str,
        interface: &str,
        member: &str,
        args: &[Option<&str>],
    ) -> bool {
        let a = Action {
            op,
            destination,
            interface,
            member,
            args,
        };
        !matches!(self.check(&a), Verdict::Denied(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD: &str = "org.freedesktop.systemd1";
    const MGR: &str = "org.freedesktop.systemd1.Manager";

    #[test]
    fn default_is_read_only() {
        let p = Policy::read_only();
        assert!(p.allows(Op::Get, "a.b", "a.b.C", "X", &[]));
        assert!(!p.allows(Op::Call, "a.b", "a.b.C", "X", &[]));
        assert!(!p.allows(Op::Set, "a.b", "a.b.C", "X", &[]));
        assert!(Policy::allow_all().allows(Op::Call, "a.b", "a.b.C", "X", &[]));
        assert!(p.allows(Op::Call, SD, MGR, "ListUnits", &[]));
        assert!(p.allows(Op::Call, SD, MGR, "Subscribe", &[]));
        assert!(!p.allows(Op::Call, SD, MGR, "StartUnit", &[]));
        assert!(p.allows(
            Op::Call,
            "org.any",
            "org.freedesktop.DBus.Peer",
            "Ping",
            &[]
        ));
    }

    #[test]
    fn read_listed_methods_are_tied_to_their_destination() {
        let p = Policy::read_only();
        // Another service implementing an interface of the same name does not get a pass.
        assert!(!p.allows(Op::Call, "org.evil", MGR, "ListUnits", &[]));
        assert_eq!(
            p.check(&Action {
                op: Op::Call,
                destination: SD,
                interface: MGR,
                member: "GetUnit",
                args: &[Some("a.service")],
            }),
            Verdict::Read
        );
    }

    #[test]
    fn rules_match_by_glob_and_arguments() {
        let p = Policy::parse(
            r#"
            [[allow]]
            ops = ["call"]
            destination = "org.freedesktop.systemd1"
            member = "{Start,Stop}Unit"
            args = ["*.service"]

            [[deny]]
            ops = ["call"]
            member = "*"
            args = ["evil*"]
            "#,
        )
        .unwrap();
        let call = |member: &str, args: &[Option<&str>]| p.allows(Op::Call, SD, MGR, member, args);
        assert!(call("StartUnit", &[Some("a.service"), Some("replace")]));
        assert!(!call(
            "StartUnit",
            &[Some("reboot.target"), Some("replace")]
        ));
        // The argument must be there, and be a string.
        assert!(!call("StartUnit", &[]));
        assert!(!call("StartUnit", &[None]));
        assert!(!call("PowerOff", &[]));
        // Deny wins over allow.
        assert!(!call("StartUnit", &[Some("evil.service")]));
        assert!(!p.allows(Op::Set, SD, MGR, "StartUnit", &[Some("a.service")]));
        assert!(Policy::parse("[[allow]]\nops=[\"frob\"]").is_err());
        assert!(Policy::parse("[[deny]]").is_err());
        assert!(Policy::parse("[[allow]]\nops=[\"get\"]").is_err());
        assert!(Policy::parse("[[allow]]\nops=[\"call\"]\nargs=[\"[\"]").is_err());
        assert!(p.may_allow(Op::Call, SD, None, "StartUnit"));
        assert!(!p.may_allow(Op::Call, "org.other", None, "StartUnit"));
    }

    #[test]
    fn example_policy_allows_service_control_only() {
        let p = Policy::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policy.example.toml"
        )))
        .unwrap();
        for m in [
            "StartUnit",
            "StopUnit",
            "RestartUnit",
            "ReloadUnit",
            "TryRestartUnit",
        ] {
            assert!(
                p.allows(
                    Op::Call,
                    SD,
                    MGR,
                    m,
                    &[Some("nginx.service"), Some("replace")]
                ),
                "{m}"
            );
            assert!(
                !p.allows(
                    Op::Call,
                    SD,
                    MGR,
                    m,
                    &[Some("nginx.socket"), Some("replace")]
                ),
                "{m}"
            );
        }
        for unit in [
            "reboot.target",
            "poweroff.target",
            "halt.target",
            "kexec.target",
            "ctrl-alt-del.target",
            "systemd-reboot.service",
            "systemd-poweroff.service",
        ] {
            assert!(
                !p.allows(
                    Op::Call,
                    SD,
                    MGR,
                    "StartUnit",
                    &[Some(unit), Some("replace")]
                ),
                "{unit}"
            );
        }
        for m in ["Reboot", "PowerOff", "Halt", "KExec"] {
            assert!(!p.allows(Op::Call, SD, MGR, m, &[]), "{m}");
        }
        assert!(!p.allows(
            Op::Call,
            SD,
            MGR,
            "StartUnit",
            &[Some("a.service"), Some("isolate")]
        ));
        assert!(!p.allows(Op::Set, SD, MGR, "LogLevel", &[Some("debug")]));
        assert!(p.allows(Op::Call, SD, MGR, "GetUnit", &[Some("reboot.target")]));
        assert!(matches!(
            Policy::load(Path::new("/nonexistent/policy.toml")),
            Err(PolicyError::Read { .. })
        ));
    }
}
