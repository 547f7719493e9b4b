//! Who is out there: agent announcements, heartbeats, and the states derived from them.
//!
//! Every presence message carries the agent's full [`AgentInfo`], so a listener that joins late
//! learns an agent from its next heartbeat. Agents also write their info into the JetStream KV
//! bucket [`REGISTRY_BUCKET`] (key = nkey) on each heartbeat, so a CLI can learn the whole fleet
//! in one read instead of waiting for heartbeats. Without JetStream, [`crate::subject::PING`]
//! gives the same information.
//!
//! States (as in the testbed seed): `running` while heartbeats arrive, `unresponsive` once silent
//! for more than [`MISSED_HEARTBEATS`] intervals since the last heartbeat (by the registry's
//! published time: an agent frozen just before a heartbeat is due is unresponsive 2 intervals
//! after the freeze, one frozen just after it, 3), `stopped` after a goodbye, `gone` once the registry
//! entry expired ([`REGISTRY_MAX_AGE`]) or a listener forgot it.
//!
//! The registry bucket itself is specified here as data ([`registry_spec`]); creating, closing
//! and reading it is the client crate's.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::maintenance::Maintenance;

/// JetStream KV bucket holding the latest [`PresenceEvent`] of each agent.
pub const REGISTRY_BUCKET: &str = "cbus-agents";
/// The registry key (an nkey) of a message on the bucket's subject `$KV.<bucket>.<key>`.
pub fn registry_key_of(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("$KV.")?
        .strip_prefix(REGISTRY_BUCKET)?
        .strip_prefix('.')
}

/// The first token of the registry's **host index** keys, `host.<hostname token>.<nkey>`: beside
/// its entry, each agent writes one such key with an empty body, so that a client selecting
/// machines by hostname reads the keys the NATS server filters for that name (one consumer on
/// [`host_index_filter`]) and then only those machines' entries, instead of the whole registry.
/// The nkey is the last token, so the agent's permission can be `host.*.<its nkey>`: the
/// hostname stays a claim, as in the entry itself, and a reader keeps a candidate only when the
/// entry under the nkey (the key the server vouches for) carries the name.
pub const HOST_INDEX: &str = "host";

/// The longest hostname token indexed (a hostname is at most 253 bytes, escaped at most 3x);
/// a longer one is not indexed, and readers find that machine by a full read.
pub const HOST_INDEX_MAX_TOKEN: usize = 768;

/// How often an agent rewrites its host index key: well within [`REGISTRY_MAX_AGE`], so the key
/// never expires while the agent runs, and rarely, since the index holds only the name (the
/// entry, rewritten on every heartbeat, holds the state).
pub const HOST_INDEX_REFRESH: Duration = Duration::from_secs(10 * 60);

/// The registry key holding agent `nkey`'s entry.
pub fn registry_entry_subject(nkey: &str) -> String {
    format!("$KV.{REGISTRY_BUCKET}.{nkey}")
}

/// The subject filter for every agent's entry and nothing else: nkeys are one token, index keys
/// three.
pub fn registry_entries_filter() -> String {
    format!("$KV.{REGISTRY_BUCKET}.*")
}

/// The host index key (a KV key, without the `$KV.<bucket>.` prefix) of agent `nkey` named
/// `hostname`; `None` when the name's token would be longer than [`HOST_INDEX_MAX_TOKEN`].
pub fn host_index_key(hostname: &str, nkey: &str) -> Option<String> {
    let token = crate::token::escape(hostname);
    (token.len() <= HOST_INDEX_MAX_TOKEN).then(|| format!("{HOST_INDEX}.{token}.{nkey}"))
}

/// The subject filter for the index keys of machines named exactly `hostname`.
pub fn host_index_filter(hostname: &str) -> Option<String> {
    let token = crate::token::escape(hostname);
    (token.len() <= HOST_INDEX_MAX_TOKEN)
        .then(|| format!("$KV.{REGISTRY_BUCKET}.{HOST_INDEX}.{token}.*"))
}

/// The nkey an index key's subject (`$KV.<bucket>.host.<token>.<nkey>`) points at.
pub fn host_index_nkey_of(subject: &str) -> Option<&str> {
    let rest = registry_key_of(subject)?.strip_prefix(HOST_INDEX)?;
    let rest = rest.strip_prefix('.')?;
    let (token, nkey) = rest.split_once('.')?;
    (!token.is_empty() && !nkey.is_empty() && !nkey.contains('.')).then_some(nkey)
}

/// The largest registry entry the bucket stores: an [`AgentInfo`] with its labels is well
/// under 1 KiB, and a bound keeps one machine from filling the bucket.
pub const REGISTRY_MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Entries older than this disappear from the registry: the agent is `gone`.
pub const REGISTRY_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What the registry bucket's stream must be: a KV bucket as NATS clients make it (one message
/// per key, direct get), but closed against a writer that may only touch its own key: no rollups
/// (a `Nats-Rollup: all` put would wipe every machine's entry), no purge or delete through the
/// API, entries bounded in size, and a full bucket refusing new entries rather than dropping old
/// ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySpec {
    /// The stream's name (`KV_<bucket>`).
    pub stream: String,
    /// The subjects it stores (`$KV.<bucket>.>`).
    pub subjects: Vec<String>,
    pub max_messages_per_subject: i64,
    pub max_age: Duration,
    pub max_message_size: i32,
    /// Discard policy "new": a full stream refuses writes.
    pub discard_new: bool,
    pub allow_rollup: bool,
    pub deny_delete: bool,
    pub deny_purge: bool,
    pub allow_direct: bool,
}

/// The registry bucket's specification (see [`RegistrySpec`]).
pub fn registry_spec() -> RegistrySpec {
    RegistrySpec {
        stream: format!("KV_{REGISTRY_BUCKET}"),
        subjects: vec![format!("$KV.{REGISTRY_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: REGISTRY_MAX_AGE,
        max_message_size: REGISTRY_MAX_ENTRY_BYTES as i32,
        discard_new: true,
        allow_rollup: false,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
    }
}

/// Whether a bucket with these settings has what [`registry_spec`] guarantees against writers
/// (no rollup, delete or purge, entries bounded); the other settings may differ.
pub fn registry_is_closed(
    allow_rollup: bool,
    deny_delete: bool,
    deny_purge: bool,
    max_message_size: i32,
) -> bool {
    !allow_rollup
        && deny_delete
        && deny_purge
        && max_message_size > 0
        && max_message_size <= REGISTRY_MAX_ENTRY_BYTES as i32
}

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// Silent intervals after which an agent is `unresponsive`.
pub const MISSED_HEARTBEATS: u32 = 3;

/// What an agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub nkey: String,
    pub hostname: String,
    /// cbus version of the agent.
    pub version: String,
    /// `system`, `user`, or the bus address.
    pub bus: String,
    /// Unix time in milliseconds when the agent started.
    pub started_at_ms: u64,
    /// Heartbeat interval the agent uses, so listeners know when it is late.
    pub heartbeat_ms: u64,
    /// Whether the agent is connected to its bus right now.
    #[serde(default)]
    pub bus_connected: bool,
    /// Operator-defined labels (`--label role=web`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How long the agent's recent registry writes took to be acknowledged, in ms, rounded up
    /// ([`rtt_claim`]): how far it is from the fleet's JetStream. A claim, used only to size
    /// how long a liveness probe waits for this agent's answer; absent until its first write
    /// was acknowledged, and from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u32>,
}

/// The round trip an agent claims after a registry write acknowledged in `sample`, given its
/// previous claim: the sample rounded up to a power of two of milliseconds, or half the
/// previous claim when that is larger. Powers of two keep the entry the same from one
/// heartbeat to the next (readers that compare entries see no churn); halving lets a slow spell
/// be forgotten over a few heartbeats rather than at once, so a probe errs on waiting longer.
pub fn rtt_claim(previous: Option<u32>, sample: Duration) -> u32 {
    let ms = u32::try_from(sample.as_millis()).unwrap_or(u32::MAX).max(1);
    let rounded = ms.checked_next_power_of_two().unwrap_or(1 << 31);
    rounded.max(previous.unwrap_or(0) / 2)
}

/// The kinds of presence message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PresenceKind {
    Hello,
    Heartbeat,
    Goodbye,
}

impl PresenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceKind::Hello => "hello",
            PresenceKind::Heartbeat => "heartbeat",
            PresenceKind::Goodbye => "goodbye",
        }
    }
}

/// A message on `dbus.presence.<nkey>`, also the value stored in the registry.
///
/// On the wire the agent's fields are flat beside `event` and `sent_at_ms`. It is read through
/// [`PresenceWire`], a plain struct of the same fields, not with `#[serde(flatten)]`: flatten
/// buffers every field of a message into serde's generic content tree before sorting it out, and
/// a CLI reads one of these per machine (50,000 in a registry read at scale; docs/benchmarks.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PresenceWire")]
pub struct PresenceEvent {
    pub event: PresenceKind,
    /// Unix time in milliseconds, by the agent's clock.
    pub sent_at_ms: u64,
    #[serde(flatten)]
    pub agent: AgentInfo,
}

/// [`PresenceEvent`]'s wire form, flat: what it is deserialized from. Unknown fields are
/// ignored, as the flattened form ignored them.
#[derive(Deserialize)]
struct PresenceWire {
    event: PresenceKind,
    sent_at_ms: u64,
    nkey: String,
    hostname: String,
    version: String,
    bus: String,
    started_at_ms: u64,
    heartbeat_ms: u64,
    #[serde(default)]
    bus_connected: bool,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    rtt_ms: Option<u32>,
}

impl From<PresenceWire> for PresenceEvent {
    fn from(w: PresenceWire) -> Self {
        PresenceEvent {
            event: w.event,
            sent_at_ms: w.sent_at_ms,
            agent: AgentInfo {
                nkey: w.nkey,
                hostname: w.hostname,
                version: w.version,
                bus: w.bus,
                started_at_ms: w.started_at_ms,
                heartbeat_ms: w.heartbeat_ms,
                bus_connected: w.bus_connected,
                labels: w.labels,
                rtt_ms: w.rtt_ms,
            },
        }
    }
}

/// The life-cycle state of an agent as seen by a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    Running,
    Unresponsive,
    Stopped,
    Gone,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Running => "running",
            AgentState::Unresponsive => "unresponsive",
            AgentState::Stopped => "stopped",
            AgentState::Gone => "gone",
        }
    }

    /// The state given the last event seen and how long ago it was seen (by the listener's
    /// clock or the server's, never by comparing with the agent's clock).
    pub fn derive(last: PresenceKind, heartbeat: Duration, silent_for: Duration) -> AgentState {
        match last {
            PresenceKind::Goodbye => AgentState::Stopped,
            _ if silent_for > heartbeat * MISSED_HEARTBEATS => AgentState::Unresponsive,
            _ => AgentState::Running,
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent as the registry or a ping sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentStatus {
    #[serde(flatten)]
    pub info: AgentInfo,
    pub state: AgentState,
    /// Unix ms of the last presence message, by the NATS server's clock (or ours for pings).
    pub last_seen_ms: u64,
    /// The operator's maintenance mark, when one is active: the machine is expected to be away.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
}

/// An agent's status from its last presence event, seen `now_ms - seen_ms` ago.
pub fn status_from(event: PresenceEvent, seen_ms: u64, now_ms: u64) -> AgentStatus {
    let heartbeat = Duration::from_millis(event.agent.heartbeat_ms.max(1));
    let silent_for = Duration::from_millis(now_ms.saturating_sub(seen_ms));
    AgentStatus {
        state: AgentState::derive(event.event, heartbeat, silent_for),
        info: event.agent,
        last_seen_ms: seen_ms,
        maintenance: None,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let hb = Duration::from_secs(5);
        assert_eq!(
            AgentState::derive(PresenceKind::Heartbeat, hb, Duration::from_secs(4)),
            AgentState::Running
        );
        assert_eq!(
            AgentState::derive(PresenceKind::Hello, hb, Duration::from_secs(16)),
            AgentState::Unresponsive
        );
        assert_eq!(
            AgentState::derive(PresenceKind::Goodbye, hb, Duration::ZERO),
            AgentState::Stopped
        );
        // The rule: silent for more than 3 intervals since the last heartbeat.
        assert_eq!(
            AgentState::derive(PresenceKind::Heartbeat, hb, hb * 3),
            AgentState::Running
        );
        assert_eq!(
            AgentState::derive(
                PresenceKind::Heartbeat,
                hb,
                hb * 3 + Duration::from_millis(1)
            ),
            AgentState::Unresponsive
        );
    }

    #[test]
    fn host_index_keys_end_in_the_nkey_and_filter_by_name() {
        let key = host_index_key("web-1.example", "UA").unwrap();
        assert_eq!(key, "host.web_2d1_2eexample.UA");
        let subject = format!("$KV.{REGISTRY_BUCKET}.{key}");
        assert_eq!(host_index_nkey_of(&subject), Some("UA"));
        assert_eq!(
            host_index_filter("web-1.example").unwrap(),
            format!("$KV.{REGISTRY_BUCKET}.host.web_2d1_2eexample.*")
        );
        // An entry's subject is not an index key, and the entries' filter is one token deep.
        assert_eq!(host_index_nkey_of(&registry_entry_subject("UA")), None);
        assert_eq!(registry_entries_filter().matches('.').count(), 2);
        assert!(host_index_key(&"x".repeat(HOST_INDEX_MAX_TOKEN + 1), "UA").is_none());
        assert!(HOST_INDEX_REFRESH < REGISTRY_MAX_AGE / 10);
    }

    #[test]
    fn wire_form_is_flat() {
        let ev = PresenceEvent {
            event: PresenceKind::Hello,
            sent_at_ms: 1,
            agent: AgentInfo {
                nkey: "U".into(),
                hostname: "h".into(),
                version: "0.1.0".into(),
                bus: "system".into(),
                started_at_ms: 1,
                heartbeat_ms: 5000,
                bus_connected: true,
                labels: BTreeMap::new(),
                rtt_ms: Some(4),
            },
        };
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["rtt_ms"], 4);
        assert_eq!(v["event"], "hello");
        assert_eq!(v["hostname"], "h");
        assert_eq!(serde_json::from_value::<PresenceEvent>(v).unwrap(), ev);
    }

    #[test]
    fn rtt_claims_round_up_and_forget_slowly() {
        let ms = Duration::from_millis;
        assert_eq!(rtt_claim(None, Duration::ZERO), 1);
        assert_eq!(rtt_claim(None, ms(3)), 4);
        assert_eq!(rtt_claim(None, ms(4)), 4);
        assert_eq!(rtt_claim(Some(4), ms(3)), 4);
        // A slow write is remembered, then halved away write by write.
        assert_eq!(rtt_claim(Some(4), ms(200)), 256);
        assert_eq!(rtt_claim(Some(256), ms(1)), 128);
        assert_eq!(rtt_claim(Some(128), ms(1)), 64);
        assert_eq!(rtt_claim(None, Duration::from_secs(u64::MAX)), 1 << 31);
    }
}
