//! The NATS permissions each kind of cbus client gets, written once as data.
//!
//! NATS guarantees one thing about a message: the subject it arrived on is one its publisher was
//! allowed to publish to. cbus builds identity on that alone (docs/security.md): an agent may
//! publish only under its own nkey, so `dbus.signals.<nkey>.…`, `dbus.presence.<nkey>`,
//! `dbus.metrics.<nkey>` and the registry key `<nkey>` speak for that machine and no other. What
//! a header or a body says about identity is a claim that consumers check against the subject.
//!
//! The same sets are rendered for the dev fleet's nats-server (`cbus permissions`), the NixOS
//! module and docs/protocol.md, so a deployment cannot drift from what the code expects. Three
//! roles:
//! - **agent** (one per machine, user = its nkey): publish its own subjects and registry entry,
//!   answer requests (`allow_responses`); subscribe only to its own requests, broadcasts in its
//!   own queue group (so it cannot answer for another machine), pings, and its own inbox prefix
//!   ([`agent_inbox_prefix`]), so it never reads anyone else's replies.
//! - **gateway**: send requests, read signals, presence, metrics, audit entries, the registry,
//!   the maintenance marks ([`crate::maintenance`]; read only) and the history streams
//!   ([`crate::streams`]), and keep the registry bucket's configuration
//!   ([`crate::presence::registry_spec`]).
//! - **operator** (the `cbus` CLI's user): the gateway's rights plus the rest of the JetStream
//!   API, for an administrator.

use serde::Serialize;

use crate::maintenance::MAINTENANCE_BUCKET;
use crate::presence::{HOST_INDEX, REGISTRY_BUCKET};
use crate::subject;

/// What one NATS user may do, in nats-server's `permissions` shape (JSON is valid server
/// configuration, so [`Permissions::to_config`] can be pasted into a `users` entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Permissions {
    pub publish: Rules,
    pub subscribe: Rules,
    /// Whether the user may publish to the reply subject of a request it received (once, and only
    /// while the request is fresh; nats-server's defaults for `allow_responses: true`).
    pub allow_responses: bool,
}

/// Allowed subjects. Subscribe entries may name a queue group after a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rules {
    pub allow: Vec<String>,
}

/// The role a NATS user plays in cbus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Agent,
    Gateway,
    Operator,
}

/// The inbox prefix an agent uses, so its subscribe permission can be that prefix only.
pub fn agent_inbox_prefix(nkey: &str) -> String {
    format!("_INBOX_{nkey}")
}

fn js_api(rest: &str) -> String {
    format!("$JS.API.{rest}")
}

fn registry_stream() -> String {
    format!("KV_{REGISTRY_BUCKET}")
}

/// The JetStream API calls that read a KV bucket's `stream` (open the bucket, replay it, get one
/// entry): the registry's, and the maintenance marks'.
fn kv_read(stream: &str) -> Vec<String> {
    let mut calls = vec![
        js_api("INFO"),
        js_api(&format!("STREAM.INFO.{stream}")),
        js_api(&format!("STREAM.MSG.GET.{stream}")),
        js_api(&format!("DIRECT.GET.{stream}.>")),
    ];
    calls.extend(consumers(stream));
    calls
}

/// Creating, deleting and asking about consumers of `stream` (an ordered consumer's life).
fn consumers(stream: &str) -> Vec<String> {
    ["CREATE.{s}", "CREATE.{s}.>", "DELETE.{s}.>", "INFO.{s}.>"]
        .iter()
        .map(|c| js_api(&format!("CONSUMER.{}", c.replace("{s}", stream))))
        .collect()
}

/// The JetStream API calls that read a history stream ([`crate::streams`]) through an ordered
/// pull consumer: open it, make the consumer and pull from it.
fn history_read(stream: &str) -> Vec<String> {
    let mut calls = vec![js_api(&format!("STREAM.INFO.{stream}"))];
    calls.extend(consumers(stream));
    calls.push(js_api(&format!("CONSUMER.MSG.NEXT.{stream}.>")));
    calls
}

fn request_subjects() -> Vec<String> {
    vec![
        format!("{}.agent.>", subject::PREFIX),
        subject::BROADCAST_ALL.to_owned(),
        subject::PING.to_owned(),
        subject::PING_ONE_ALL.to_owned(),
    ]
}

fn watched_subjects() -> Vec<String> {
    vec![
        format!("{}.signals.>", subject::PREFIX),
        subject::PRESENCE_ALL.to_owned(),
        subject::METRICS_ALL.to_owned(),
        subject::AUDIT_ALL.to_owned(),
        "_INBOX.>".to_owned(),
    ]
}

/// The permissions of the agent whose nkey is `nkey`.
pub fn agent(nkey: &str) -> Permissions {
    agent_in_domain(nkey, None)
}

/// The permissions of an agent whose registry lives in the JetStream domain `domain` (an agent
/// at a site, whose leaf node has no JetStream: it runs `cbus-agent --js-domain DOMAIN`, and its
/// JetStream calls go to `$JS.<domain>.API.…`, which the hub maps to its own API). The leaf
/// enforces this set, so a site machine is held to its own key as on the hub.
pub fn agent_in_domain(nkey: &str, domain: Option<&str>) -> Permissions {
    let stream = registry_stream();
    let api = |rest: &str| match domain {
        Some(d) => format!("$JS.{d}.API.{rest}"),
        None => js_api(rest),
    };
    // Its entry, and its host index keys (`host.<any name>.<nkey>`: the name is a claim).
    let kv = |key: String| match domain {
        Some(_) => api(&format!("$KV.{REGISTRY_BUCKET}.{key}")),
        None => format!("$KV.{REGISTRY_BUCKET}.{key}"),
    };
    let entry = kv(nkey.to_owned());
    let index = kv(format!("{HOST_INDEX}.*.{nkey}"));
    Permissions {
        publish: Rules {
            allow: vec![
                format!("{}.signals.{nkey}.>", subject::PREFIX),
                subject::presence(nkey),
                subject::metrics(nkey),
                // Its audit entries: the subject proves which machine wrote them.
                subject::audit(nkey),
                entry,
                index,
                // Opening the bucket; never creating or changing it.
                api(&format!("STREAM.INFO.{stream}")),
            ],
        },
        subscribe: Rules {
            allow: vec![
                subject::agent_requests(nkey),
                format!("{} {nkey}", subject::BROADCAST_ALL),
                subject::PING.to_owned(),
                subject::ping_one(nkey),
                format!("{}.>", agent_inbox_prefix(nkey)),
            ],
        },
        allow_responses: true,
    }
}

/// The gateway's permissions.
pub fn gateway() -> Permissions {
    let stream = registry_stream();
    let mut publish = request_subjects();
    publish.extend(kv_read(&stream));
    publish.extend(kv_read(&format!("KV_{MAINTENANCE_BUCKET}")));
    publish.push(js_api(&format!("STREAM.CREATE.{stream}")));
    publish.push(js_api(&format!("STREAM.UPDATE.{stream}")));
    // Reading the audit trail and the signal history (the dashboard); never changing them.
    publish.extend(history_read(crate::streams::AUDIT_STREAM));
    publish.extend(history_read(crate::streams::SIGNAL_STREAM));
    Permissions {
        publish: Rules { allow: publish },
        subscribe: Rules {
            allow: watched_subjects(),
        },
        allow_responses: false,
    }
}

/// The operator's permissions (the `cbus` CLI).
pub fn operator() -> Permissions {
    let mut publish = request_subjects();
    publish.push(js_api(">"));
    // Marking machines for maintenance is a put on the bucket's subjects.
    publish.push(format!("$KV.{MAINTENANCE_BUCKET}.>"));
    Permissions {
        publish: Rules { allow: publish },
        subscribe: Rules {
            allow: watched_subjects(),
        },
        allow_responses: false,
    }
}

impl Role {
    /// This role's permissions; agents need their nkey.
    pub fn permissions(self, nkey: Option<&str>) -> Option<Permissions> {
        match (self, nkey) {
            (Role::Agent, Some(nkey)) => Some(agent(nkey)),
            (Role::Agent, None) => None,
            (Role::Gateway, _) => Some(gateway()),
            (Role::Operator, _) => Some(operator()),
        }
    }
}

impl Permissions {
    /// The `permissions` value for a nats-server `users` entry, as JSON.
    pub fn to_config(&self) -> String {
        serde_json::to_string(self).expect("permissions serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "UAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

    #[test]
    fn agent_speaks_only_for_itself() {
        let p = agent(A);
        assert!(p
            .publish
            .allow
            .iter()
            .all(|s| s.contains(A) || s.starts_with("$JS.API.STREAM.INFO.")));
        assert!(!p.subscribe.allow.iter().any(|s| s.starts_with("_INBOX.")));
        assert!(p.subscribe.allow.contains(&format!("dbus.broadcast.> {A}")));
        assert!(!p.publish.allow.iter().any(|s| s.contains("STREAM.CREATE")));
        assert!(p.publish.allow.contains(&format!("dbus.audit.{A}")));
        assert!(!p.publish.allow.iter().any(|s| s.contains("dbus.audit.*")));
    }

    #[test]
    fn the_gateway_reads_history_but_never_changes_it() {
        let p = gateway();
        assert!(p.subscribe.allow.contains(&"dbus.audit.*".to_owned()));
        for stream in [crate::streams::AUDIT_STREAM, crate::streams::SIGNAL_STREAM] {
            assert!(p
                .publish
                .allow
                .contains(&format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.>")));
            assert!(!p
                .publish
                .allow
                .iter()
                .any(|s| s.contains(&format!("STREAM.CREATE.{stream}"))
                    || s.contains(&format!("STREAM.UPDATE.{stream}"))
                    || s.contains(&format!("STREAM.PURGE.{stream}"))));
        }
    }

    #[test]
    fn an_agent_at_a_site_speaks_only_for_itself_through_the_hub_domain() {
        let p = agent_in_domain(A, Some("hub"));
        assert!(p
            .publish
            .allow
            .contains(&format!("$JS.hub.API.$KV.cbus-agents.{A}")));
        assert!(p
            .publish
            .allow
            .iter()
            .all(|s| s.contains(A) || s.starts_with("$JS.hub.API.STREAM.INFO.")));
        assert_eq!(p.subscribe, agent(A).subscribe);
        assert_eq!(agent_in_domain(A, None), agent(A));
    }

    #[test]
    fn only_operators_mark_machines_for_maintenance() {
        let put = format!("$KV.{MAINTENANCE_BUCKET}.{A}");
        let stream = format!("KV_{MAINTENANCE_BUCKET}");
        assert!(!agent(A)
            .publish
            .allow
            .iter()
            .any(|s| s.contains(&stream) || s.contains(MAINTENANCE_BUCKET)));
        let g = gateway().publish.allow;
        assert!(g.contains(&format!("$JS.API.STREAM.INFO.{stream}")));
        assert!(!g.iter().any(|s| s == &put || s.starts_with("$KV.")));
        let o = operator().publish.allow;
        assert!(o.contains(&"$JS.API.>".to_owned()));
        assert!(o.contains(&format!("$KV.{MAINTENANCE_BUCKET}.>")));
    }

    /// docs/protocol.md shows each set; it must be the code's, not a copy that drifted.
    #[test]
    fn docs_show_the_sets_the_code_holds() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
        let docs = std::fs::read_to_string(path).unwrap();
        for (role, set) in [
            ("agent", agent("<nkey>")),
            ("gateway", gateway()),
            ("operator", operator()),
        ] {
            let expected = serde_json::to_string_pretty(&set).unwrap();
            let block = docs
                .split(&format!("<!-- permissions:{role} -->\n```json\n"))
                .nth(1)
                .and_then(|rest| rest.split("\n```").next())
                .unwrap_or_else(|| panic!("docs/protocol.md has no {role} block"));
            assert_eq!(
                block, expected,
                "docs/protocol.md's {role} permissions differ"
            );
        }
    }

    #[test]
    fn config_is_json_in_server_shape() {
        let v: serde_json::Value = serde_json::from_str(&gateway().to_config()).unwrap();
        assert!(v["publish"]["allow"].is_array());
        assert!(v["subscribe"]["allow"].is_array());
        assert_eq!(v["allow_responses"], false);
    }
}
