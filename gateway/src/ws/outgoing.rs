//! The messages the gateway sends, as one serialisable type ([`ServerFrame`]); docs/protocol.md
//! ("WebSocket API") describes them.
//!
//! A frame's text goes through a `serde_json::Value`, whose maps sort their keys: that is what
//! the `json!` frames this type replaced sent, so the wire text is byte for byte the same
//! (the tests below pin it), and dashboards and clients see no change.

use std::collections::BTreeMap;

use cbus_protocol::introspect::ObjectSchema;
use cbus_protocol::ErrorBody;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::frames::VERSION;
use crate::model::{unit_type, MachineRow, UnitRow, UNIT_STATES};

/// The column schema of unit rows: name and type of each array element.
pub(super) const UNIT_COLUMNS: [(&str, &str); 11] = [
    ("machine", "nkey"),
    ("host", "string"),
    ("name", "string"),
    ("type", "string"),
    ("description", "string"),
    ("load", "string"),
    ("active", "string"),
    ("sub", "string"),
    ("since_us", "timestamp_us|null"),
    ("restarts", "u32|null"),
    ("path", "object_path"),
];

/// The fields of a signal, as in each signals delta.
const SIGNAL_FIELDS: [&str; 9] = [
    "machine",
    "host",
    "sender",
    "sender_name",
    "path",
    "interface",
    "member",
    "signature",
    "args",
];

/// Unit rows go out as compact arrays in [`UNIT_COLUMNS`] order: a big fleet's snapshot is
/// mostly unit rows, and field names would triple it.
impl Serialize for UnitRow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let u = &self.unit;
        (
            &self.machine,
            &self.host,
            &self.name,
            unit_type(&self.name),
            &u.description,
            &u.load,
            &u.active,
            &u.sub,
            u.since_us,
            u.restarts,
            u.path(&self.name),
        )
            .serialize(s)
    }
}

/// A message to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum ServerFrame<'a> {
    Hello {
        v: u32,
        server: &'static str,
        version: &'static str,
        heartbeat_ms: u64,
        resources: [&'static str; 6],
        ops: [&'static str; 8],
    },
    Ping {
        t: u64,
    },
    Pong {
        t: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sub: Option<&'a str>,
        error: ErrorBody,
    },
    Unsubscribed {
        sub: &'a str,
    },
    Snapshot {
        sub: &'a str,
        resource: &'static str,
        seq: u64,
        schema: Schema,
        data: SnapshotData,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ErrorBody>,
    },
    Delta {
        sub: &'a str,
        seq: u64,
        data: &'a Delta<'a>,
    },
    /// One machine's result of a request.
    Result {
        id: &'a Value,
        machine: &'a str,
        /// `null` for a machine the gateway does not know.
        host: Option<&'a str>,
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        signature: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<&'a Value>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorBody>,
    },
    /// A request's end, with how its machines fared.
    Done {
        id: &'a Value,
        ok: usize,
        failed: usize,
        timed_out: usize,
        /// Rolling requests only: machines never asked because `max_fail` was exceeded.
        #[serde(skip_serializing_if = "Option::is_none")]
        not_started: Option<usize>,
        /// Rolling requests only: whether `max_fail` was exceeded.
        #[serde(skip_serializing_if = "Option::is_none")]
        halted: Option<bool>,
    },
}

/// What a client may subscribe to and ask for, as `hello` announces it.
const RESOURCES: [&str; 6] = ["machines", "units", "fleet", "object", "signals", "audit"];
const OPS: [&str; 8] = [
    "get",
    "set",
    "call",
    "start",
    "stop",
    "restart",
    "introspect",
    "list-names",
];

impl ServerFrame<'_> {
    /// The first frame of a session.
    pub(super) fn hello(heartbeat_ms: u64) -> ServerFrame<'static> {
        ServerFrame::Hello {
            v: VERSION,
            server: "cbus-gateway",
            version: cbus_protocol::VERSION,
            heartbeat_ms,
            resources: RESOURCES,
            ops: OPS,
        }
    }

    /// The frame's JSON text.
    pub(super) fn to_text(&self) -> String {
        match serde_json::to_value(self) {
            Ok(v) => v.to_string(),
            // Only maps with non-string keys fail, and no frame has one.
            Err(e) => {
                tracing::error!(error = %e, "a server frame did not serialise");
                r#"{"type":"error","error":{"code":"internal-error","message":"frame"}}"#.into()
            }
        }
    }
}

/// A column of unit rows.
#[derive(Debug, Serialize)]
pub(super) struct Column {
    name: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
}

/// What a snapshot's rows mean.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum Schema {
    Machines {
        key: &'static str,
        states: [&'static str; 4],
    },
    Units {
        key: [&'static str; 2],
        columns: Vec<Column>,
        states: [&'static str; 6],
    },
    Object(Box<ObjectSchema>),
    Signals {
        fields: [&'static str; 9],
        /// Only when the subscription asked for the recent past (`since_ms`).
        #[serde(skip_serializing_if = "Option::is_none")]
        history: Option<Box<HistoryInfo>>,
    },
    /// The audit trail: the fields of an entry and who vouches for which (docs/security.md).
    Audit(Box<AuditSchema>),
    /// A fleet aggregate: its limits.
    Fleet {
        max_failed_units: usize,
        max_failed_machines: usize,
        max_page: usize,
    },
    /// `null`: an object that failed to load.
    Absent,
}

impl Schema {
    pub(super) fn machines() -> Schema {
        Schema::Machines {
            key: "nkey",
            states: ["running", "unresponsive", "stopped", "gone"],
        }
    }

    pub(super) fn units() -> Schema {
        Schema::Units {
            key: ["machine", "name"],
            columns: UNIT_COLUMNS
                .iter()
                .map(|&(name, kind)| Column { name, kind })
                .collect(),
            states: UNIT_STATES,
        }
    }

    pub(super) fn fleet() -> Schema {
        Schema::Fleet {
            max_failed_units: crate::aggregate::MAX_FAILED_UNITS,
            max_failed_machines: crate::aggregate::MAX_FAILED_MACHINES,
            max_page: crate::aggregate::MAX_PAGE,
        }
    }

    pub(super) fn signals(history: Option<HistoryInfo>) -> Schema {
        Schema::Signals {
            fields: SIGNAL_FIELDS,
            history: history.map(Box::new),
        }
    }

    pub(super) fn audit(history: Option<HistoryInfo>) -> Schema {
        Schema::Audit(Box::new(AuditSchema {
            fields: AUDIT_FIELDS,
            server_vouches: ["machine", "seq", "stored_ms"],
            agent_vouches: [
                "time_ms",
                "hostname",
                "broadcast",
                "op",
                "destination",
                "path",
                "interface",
                "member",
                "args_bytes",
                "args_sha256",
                "policy",
            ],
            claimed: ["requester", "reply_to"],
            history,
        }))
    }
}

/// The schema of an audit subscription: the fields of an entry and who vouches for which
/// (docs/security.md).
#[derive(Debug, Serialize)]
pub(super) struct AuditSchema {
    fields: [&'static str; 18],
    /// Vouched for by the NATS server: only that machine's agent may publish on its subject,
    /// and the server stamps the time it stored the entry.
    server_vouches: [&'static str; 3],
    /// Vouched for by the machine's agent (true unless that machine is compromised).
    agent_vouches: [&'static str; 11],
    /// The requester's claims: nobody vouches for them.
    claimed: [&'static str; 2],
    /// `null` when the subscription's reader did not answer in time.
    history: Option<HistoryInfo>,
}

/// A snapshot's rows.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum SnapshotData {
    Machines(Vec<MachineRow>),
    Units(Vec<UnitRow>),
    /// interface -> property -> `{"t": signature, "v": value}`
    Object(BTreeMap<String, Map<String, Value>>),
    /// Signals have no state: always `[]`.
    Signals([(); 0]),
    /// The newest audit entries, oldest first.
    Audit(Vec<AuditRow>),
    Fleet(Box<crate::aggregate::Summary>),
    /// `null`: an object that failed to load.
    Absent,
}

/// What changed since the last snapshot or delta of a subscription.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub(super) enum Delta<'a> {
    Machine {
        upsert: [&'a MachineRow; 1],
    },
    /// The machine's units are `upsert`, all of them.
    ReplaceUnits {
        replace: &'a str,
        upsert: Vec<&'a UnitRow>,
    },
    Units {
        #[serde(skip_serializing_if = "Vec::is_empty")]
        upsert: Vec<&'a UnitRow>,
        /// `[machine, unit]` pairs.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        remove: Vec<[&'a str; 2]>,
    },
    Object {
        interface: &'a str,
        changed: &'a Map<String, Value>,
    },
    Signal(&'a SignalData),
    Audit(&'a AuditRow),
}

/// One signal as a client sees it.
#[derive(Debug, Serialize)]
pub(super) struct SignalData {
    pub machine: String,
    /// The name the machine's presence gave, not one a signal claims.
    pub host: Option<String>,
    pub sender: Option<String>,
    pub sender_name: Option<String>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub signature: Option<String>,
    pub args: Value,
    /// When the gateway received it; for a signal read from the signal stream, when the NATS
    /// server stored it.
    pub received_ms: u64,
    /// Read from the signal stream (`since_ms`): when the server stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_ms: Option<u64>,
    /// Stored before the subscription began: part of the replay, not live.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// The fields of an audit row, as in each audit snapshot and delta.
const AUDIT_FIELDS: [&str; 18] = [
    "machine",
    "host",
    "seq",
    "stored_ms",
    "time_ms",
    "hostname",
    "requester",
    "reply_to",
    "op",
    "destination",
    "path",
    "interface",
    "member",
    "args_bytes",
    "args_sha256",
    "broadcast",
    "policy",
    "result",
];

/// One audit entry as a client sees it: the agent's entry with what the gateway knows of it.
#[derive(Debug, Clone, Serialize)]
pub(super) struct AuditRow {
    /// The nkey of the entry's subject, which only that machine's agent may publish on.
    pub machine: String,
    /// The name the machine's presence gave.
    pub host: Option<String>,
    /// The stream sequence (0 for an entry heard live, without the audit stream).
    pub seq: u64,
    /// When the NATS server stored it (the gateway's clock for an entry heard live).
    pub stored_ms: u64,
    #[serde(flatten)]
    pub entry: cbus_protocol::audit::AuditEntry,
    /// Its size on the wire, for the byte bounds.
    #[serde(skip)]
    pub bytes: usize,
}

/// What a subscription's reader of a history stream found (docs/protocol.md).
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct HistoryInfo {
    pub stream: &'static str,
    /// Whether the stream exists and could be read; else the subscription is live only.
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How far back it reads (ms), after the gateway's bounds.
    pub since_ms: u64,
    /// At most this many entries in a page, or signals replayed.
    pub limit: usize,
    /// Audit: entries in the page; signals: signals the replay holds at most.
    pub replayed: u64,
    /// Older entries read but not in the page (it keeps the newest `limit`).
    pub older: u64,
    /// Whether the read began at the stream's last messages rather than at `since_ms` ago, so
    /// that older ones within `since_ms` were not read.
    pub truncated: bool,
    /// Entries dropped: unreadable, or naming another machine than their subject.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Unit;
    use cbus_protocol::presence::AgentState;
    use cbus_protocol::ErrorCode;
    use serde_json::json;

    fn row() -> MachineRow {
        MachineRow {
            nkey: "U1".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            bus: "system".into(),
            bus_connected: true,
            labels: BTreeMap::from([("role".into(), "web".into())]),
            started_at_ms: 1,
            heartbeat_ms: 1000,
            state: AgentState::Running,
            last_seen_ms: 2,
            units: 3,
            units_loaded: true,
            maintenance: None,
            system_state: None,
        }
    }

    fn unit_row() -> UnitRow {
        UnitRow {
            machine: "U1".into(),
            host: "h".into(),
            name: "x.service".into(),
            unit: Unit {
                active: "active".into(),
                since_us: Some(5),
                odd_path: Some("/u/x".into()),
                ..Default::default()
            },
        }
    }

    #[test]
    fn unit_rows_are_compact() {
        let v = serde_json::to_value(unit_row()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), UNIT_COLUMNS.len());
        assert_eq!(v[3], "service");
        assert_eq!(v[8], 5);
        assert_eq!(v[9], Value::Null);
        assert_eq!(v[10], "/u/x", "the path the machine reported");
        let mut usual = unit_row();
        usual.unit.odd_path = None;
        let v = serde_json::to_value(usual).unwrap();
        assert_eq!(
            v[10], "/org/freedesktop/systemd1/unit/x_2eservice",
            "systemd's path for the name"
        );
    }

    /// Each frame is the text the `json!` frames before it were.
    #[test]
    fn frames_are_what_they_were() {
        let id = json!(7);
        let err = ErrorBody::new(ErrorCode::NotFound, "no such machine");
        let cases: Vec<(ServerFrame, Value)> = vec![
            (
                ServerFrame::hello(15000),
                json!({
                    "type": "hello", "v": 1, "server": "cbus-gateway",
                    "version": cbus_protocol::VERSION, "heartbeat_ms": 15000,
                    "resources": ["machines", "units", "fleet", "object", "signals", "audit"],
                    "ops": ["get", "set", "call", "start", "stop", "restart", "introspect", "list-names"],
                }),
            ),
            (ServerFrame::Ping { t: 3 }, json!({"type": "ping", "t": 3})),
            (
                ServerFrame::Error {
                    id: Some(&id),
                    sub: None,
                    error: err.clone(),
                },
                json!({"type": "error", "error": err, "id": 7}),
            ),
            (
                ServerFrame::Error {
                    id: None,
                    sub: Some("s"),
                    error: err.clone(),
                },
                json!({"type": "error", "error": err, "sub": "s"}),
            ),
            (
                ServerFrame::Unsubscribed { sub: "s" },
                json!({"type": "unsubscribed", "sub": "s"}),
            ),
            (
                ServerFrame::Snapshot {
                    sub: "m",
                    resource: "machines",
                    seq: 0,
                    schema: Schema::machines(),
                    data: SnapshotData::Machines(vec![row()]),
                    resync: true,
                    error: None,
                },
                json!({
                    "type": "snapshot", "sub": "m", "resource": "machines", "seq": 0,
                    "schema": {"key": "nkey", "states": ["running", "unresponsive", "stopped", "gone"]},
                    "data": [row()], "resync": true,
                }),
            ),
            (
                ServerFrame::Snapshot {
                    sub: "u",
                    resource: "units",
                    seq: 4,
                    schema: Schema::units(),
                    data: SnapshotData::Units(vec![unit_row()]),
                    resync: false,
                    error: None,
                },
                json!({
                    "type": "snapshot", "sub": "u", "resource": "units", "seq": 4,
                    "schema": {
                        "key": ["machine", "name"],
                        "columns": UNIT_COLUMNS.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
                        "states": UNIT_STATES,
                    },
                    "data": [["U1", "h", "x.service", "service", "", "", "active", "", 5, null, "/u/x"]],
                }),
            ),
            (
                ServerFrame::Snapshot {
                    sub: "o",
                    resource: "object",
                    seq: 0,
                    schema: Schema::Absent,
                    data: SnapshotData::Absent,
                    resync: false,
                    error: Some(err.clone()),
                },
                json!({
                    "type": "snapshot", "sub": "o", "resource": "object", "seq": 0,
                    "schema": null, "data": null, "error": err,
                }),
            ),
            (
                ServerFrame::Snapshot {
                    sub: "s",
                    resource: "signals",
                    seq: 0,
                    schema: Schema::signals(None),
                    data: SnapshotData::Signals([]),
                    resync: false,
                    error: None,
                },
                json!({
                    "type": "snapshot", "sub": "s", "resource": "signals", "seq": 0,
                    "schema": {"fields": ["machine", "host", "sender", "sender_name", "path", "interface", "member", "signature", "args"]},
                    "data": [],
                }),
            ),
            (
                ServerFrame::Result {
                    id: &id,
                    machine: "U1",
                    host: None,
                    ok: false,
                    signature: None,
                    value: None,
                    timed_out: false,
                    error: Some(&err),
                },
                json!({"type": "result", "id": 7, "machine": "U1", "host": null, "ok": false, "error": err}),
            ),
            (
                ServerFrame::Result {
                    id: &id,
                    machine: "U1",
                    host: Some("h"),
                    ok: true,
                    signature: Some("s"),
                    value: Some(&Value::Null),
                    timed_out: false,
                    error: None,
                },
                json!({"type": "result", "id": 7, "machine": "U1", "host": "h", "ok": true, "signature": "s", "value": null}),
            ),
            (
                ServerFrame::Result {
                    id: &id,
                    machine: "U1",
                    host: Some("h"),
                    ok: false,
                    signature: None,
                    value: None,
                    timed_out: true,
                    error: Some(&err),
                },
                json!({"type": "result", "id": 7, "machine": "U1", "host": "h", "ok": false, "timed_out": true, "error": err}),
            ),
            (
                ServerFrame::Done {
                    id: &id,
                    ok: 1,
                    failed: 2,
                    timed_out: 3,
                    not_started: None,
                    halted: None,
                },
                json!({"type": "done", "id": 7, "ok": 1, "failed": 2, "timed_out": 3}),
            ),
        ];
        for (frame, old) in cases {
            assert_eq!(frame.to_text(), old.to_string());
        }
    }

    #[test]
    fn deltas_are_what_they_were() {
        let (m, u) = (row(), unit_row());
        let changed = Map::from_iter([("Count".to_owned(), json!({"t": "i", "v": 3}))]);
        let signal = SignalData {
            machine: "U1".into(),
            host: Some("h".into()),
            sender: Some(":1.7".into()),
            sender_name: None,
            path: Some("/o".into()),
            interface: Some("org.x.Y".into()),
            member: Some("Changed".into()),
            signature: Some("s".into()),
            args: json!(["a"]),
            received_ms: 9,
            stored_ms: None,
            replayed: false,
        };
        let cases: Vec<(Delta, Value)> = vec![
            (Delta::Machine { upsert: [&m] }, json!({"upsert": [m]})),
            (
                Delta::ReplaceUnits {
                    replace: "U1",
                    upsert: vec![],
                },
                json!({"replace": "U1", "upsert": []}),
            ),
            (
                Delta::Units {
                    upsert: vec![&u],
                    remove: vec![],
                },
                json!({"upsert": [serde_json::to_value(&u).unwrap()]}),
            ),
            (
                Delta::Units {
                    upsert: vec![],
                    remove: vec![["U1", "x.service"]],
                },
                json!({"remove": [["U1", "x.service"]]}),
            ),
            (
                Delta::Object {
                    interface: "org.x.Y",
                    changed: &changed,
                },
                json!({"interface": "org.x.Y", "changed": changed}),
            ),
            (
                Delta::Signal(&signal),
                json!({
                    "machine": "U1", "host": "h", "sender": ":1.7", "sender_name": null,
                    "path": "/o", "interface": "org.x.Y", "member": "Changed", "signature": "s",
                    "args": ["a"], "received_ms": 9,
                }),
            ),
        ];
        for (delta, old) in cases {
            let frame = ServerFrame::Delta {
                sub: "d",
                seq: 2,
                data: &delta,
            };
            let old = json!({"type": "delta", "sub": "d", "seq": 2, "data": old});
            assert_eq!(frame.to_text(), old.to_string());
        }
    }
}
