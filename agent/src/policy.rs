//! What may be done remotely.
//!
//! Reads (get, getall, introspect, list-names) are allowed; set and call are denied unless a rule
//! allows them, because a call on the system bus can reboot a machine. A few methods are known
//! to only read ([`READ_ONLY_CALLS`], such as systemd's `ListUnits`) and count as reads. A rule names ops and
//! globs over destination, interface and member:
//!
//! ```toml
//! [[allow]]
//! ops = ["call"]
//! destination = "org.freedesktop.systemd1"
//! interface = "org.freedesktop.systemd1.Manager"
//! member = "{Start,Stop,Restart,Reload}Unit"
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
}

fn star() -> String {
    "*".into()
}

/// Methods that only read state, allowed like property reads: (interface, member).
pub const READ_ONLY_CALLS: &[(&str, &str)] = &[
    ("org.freedesktop.systemd1.Manager", "ListUnits"),
    ("org.freedesktop.systemd1.Manager", "ListUnitsByPatterns"),
    ("org.freedesktop.systemd1.Manager", "ListUnitsByNames"),
    ("org.freedesktop.systemd1.Manager", "ListUnitsFiltered"),
    ("org.freedesktop.systemd1.Manager", "ListUnitFiles"),
    ("org.freedesktop.systemd1.Manager", "ListJobs"),
    ("org.freedesktop.systemd1.Manager", "GetUnit"),
    ("org.freedesktop.systemd1.Manager", "GetDefaultTarget"),
    // Only asks systemd to emit unit signals (what `systemctl status` and the gateway need).
    ("org.freedesktop.systemd1.Manager", "Subscribe"),
    ("org.freedesktop.DBus.Peer", "Ping"),
    ("org.freedesktop.DBus.Peer", "GetMachineId"),
];

struct Rule {
    ops: Vec<Op>,
    destination: GlobMatcher,
    interface: GlobMatcher,
    member: GlobMatcher,
}

/// The loaded policy.
pub struct Policy {
    allow_all: bool,
    rules: Vec<Rule>,
}

impl Policy {
    /// Reads only; nothing may be set or called.
    pub fn read_only() -> Self {
        Policy {
            allow_all: false,
            rules: Vec::new(),
        }
    }

    pub fn allow_all() -> Self {
        Policy {
            allow_all: true,
            rules: Vec::new(),
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
        let rules = file
            .allow
            .into_iter()
            .map(|r| {
                Ok(Rule {
                    ops: r.ops,
                    destination: glob(&r.destination)?,
                    interface: glob(&r.interface)?,
                    member: glob(&r.member)?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Policy {
            allow_all: false,
            rules,
        })
    }

    /// Whether `op` on destination/interface/member is allowed.
    pub fn allows(&self, op: Op, destination: &str, interface: &str, member: &str) -> bool {
        if op.is_read() || self.allow_all {
            return true;
        }
        if op == Op::Call && READ_ONLY_CALLS.contains(&(interface, member)) {
            return true;
        }
        self.rules.iter().any(|r| {
            r.ops.contains(&op)
                && r.destination.is_match(destination)
                && r.interface.is_match(interface)
                && r.member.is_match(member)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_read_only() {
        let p = Policy::read_only();
        assert!(p.allows(Op::Get, "a.b", "a.b.C", "X"));
        assert!(!p.allows(Op::Call, "a.b", "a.b.C", "X"));
        assert!(!p.allows(Op::Set, "a.b", "a.b.C", "X"));
        assert!(Policy::allow_all().allows(Op::Call, "a.b", "a.b.C", "X"));
        let mgr = "org.freedesktop.systemd1.Manager";
        assert!(p.allows(Op::Call, "org.freedesktop.systemd1", mgr, "ListUnits"));
        assert!(p.allows(Op::Call, "org.freedesktop.systemd1", mgr, "Subscribe"));
        assert!(!p.allows(Op::Call, "org.freedesktop.systemd1", mgr, "StartUnit"));
    }

    #[test]
    fn rules_match_by_glob() {
        let p = Policy::parse(
            r#"
            [[allow]]
            ops = ["call"]
            destination = "org.freedesktop.systemd1"
            member = "{Start,Stop}Unit"
            "#,
        )
        .unwrap();
        let iface = "org.freedesktop.systemd1.Manager";
        assert!(p.allows(Op::Call, "org.freedesktop.systemd1", iface, "StartUnit"));
        assert!(!p.allows(Op::Call, "org.freedesktop.systemd1", iface, "PowerOff"));
        assert!(!p.allows(Op::Set, "org.freedesktop.systemd1", iface, "StartUnit"));
        assert!(Policy::parse("[[allow]]\nops=[\"frob\"]").is_err());
        assert!(Policy::parse("[[deny]]").is_err());
    }

    #[test]
    fn example_policy_allows_unit_control_only() {
        let p = Policy::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/policy.example.toml"
        )))
        .unwrap();
        let (sd, mgr) = (
            "org.freedesktop.systemd1",
            "org.freedesktop.systemd1.Manager",
        );
        for m in ["StartUnit", "StopUnit", "RestartUnit", "ReloadUnit"] {
            assert!(p.allows(Op::Call, sd, mgr, m), "{m}");
        }
        assert!(!p.allows(Op::Call, sd, mgr, "PowerOff"));
        assert!(!p.allows(Op::Set, sd, mgr, "LogLevel"));
        assert!(matches!(
            Policy::load(Path::new("/nonexistent/policy.toml")),
            Err(PolicyError::Read { .. })
        ));
    }
}
