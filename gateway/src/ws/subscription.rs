//! Subscriptions: a client's [`Resource`] compiled into what the session follows ([`Kind`]),
//! with the snapshot and the deltas each kind sends.

use std::collections::HashSet;
use std::time::Duration;

use cbus_protocol::presence::now_ms;
use cbus_protocol::subject::{self, validate_nkey, SignalFilter};
use cbus_protocol::{names, ErrorBody};
use tokio::sync::oneshot;

use super::context::WsContext;
use super::frames::{glob_regex, Glob, Resource};
use super::history::{
    forward_audit, forward_signal_history, AuditQuery, AuditRing, SignalHistory, AUDIT_LIMIT,
    AUDIT_SINCE, MAX_AUDIT_LIMIT, MAX_AUDIT_SINCE, MAX_SIGNAL_REPLAY, MAX_SIGNAL_SINCE,
    SIGNAL_REPLAY,
};
use super::outgoing::{AuditRow, Delta, HistoryInfo, Schema, SnapshotData};
use super::signals::{forward_signals, Ready, SignalMatch, SignalSink};
use crate::aggregate::{Builder, Query, MAX_FAILED_MACHINES, MAX_FAILED_UNITS, MAX_PAGE};
use crate::changes::{Change, Interest, ObjectChangeKind, ObjectKey};

/// A subscription, compiled.
pub(super) enum Kind {
    Machines,
    Units {
        machines: Option<HashSet<String>>,
        unit: Option<Glob>,
    },
    /// Sent again, whole, by the session's throttle when the store changed.
    Fleet(Query),
    Object {
        key: ObjectKey,
        /// Whether a snapshot went out (deltas only make sense after one).
        loaded: bool,
    },
    Signals {
        task: tokio::task::AbortHandle,
        /// What its history reader found, when it asked for the recent past.
        history: Option<HistoryInfo>,
    },
    /// The audit trail: the newest entries the session received, for its snapshots.
    Audit {
        task: tokio::task::AbortHandle,
        ring: AuditRing,
        history: Option<HistoryInfo>,
    },
}

pub(super) struct Sub {
    /// The client's id.
    pub id: String,
    pub kind: Kind,
    /// Of the last delta (the snapshot's is the current one).
    pub seq: u64,
    /// Moves with each snapshot owed, so the writer skips frames of the old stream.
    pub gen: u64,
}

/// A compiled subscription; `ready` is set for a signals subscription: it resolves once the
/// NATS subscription is in place on the server, so no signal sent after the snapshot is missed.
pub(super) struct Compiled {
    pub kind: Kind,
    pub ready: Option<oneshot::Receiver<Ready>>,
}

/// Checks a resource and starts what it needs (an object followed, a signals task); the error
/// says what is wrong with it.
pub(super) fn compile(
    ctx: &WsContext,
    resource: &Resource,
    signals: impl FnOnce() -> SignalSink,
) -> Result<Compiled, String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let kind = match resource {
        Resource::Machines {} => Kind::Machines,
        Resource::Units { machines, unit } => Kind::Units {
            machines: machines.as_ref().map(|m| m.iter().cloned().collect()),
            unit: match unit {
                Some(g) => Some(Glob::new(g).map_err(|e| format!("invalid unit pattern: {e}"))?),
                None => None,
            },
        },
        Resource::Fleet {
            unit,
            label,
            offset,
            limit,
            failed_limit,
            failed_machines,
        } => {
            let label = match label {
                None => None,
                Some(l) if l.len() > 512 => return Err("label too long".into()),
                Some(l) => match l.split_once('=') {
                    Some((k, v)) => Some((k.to_owned(), v.to_owned())),
                    None => return Err("label must be key=value".into()),
                },
            };
            Kind::Fleet(Query {
                unit: match unit {
                    Some(g) => {
                        Some(glob_regex(g).map_err(|e| format!("invalid unit pattern: {e}"))?)
                    }
                    None => None,
                },
                label,
                offset: offset.unwrap_or(0),
                limit: limit.unwrap_or(100).min(MAX_PAGE),
                failed_limit: failed_limit.unwrap_or(MAX_FAILED_UNITS),
                failed_machines: failed_machines.unwrap_or(MAX_FAILED_MACHINES),
            })
        }
        Resource::Object {
            machine,
            dest,
            path,
            interface,
        } => {
            validate_nkey(machine).map_err(|e| text(&e))?;
            names::validate_bus_name(dest).map_err(|e| text(&e))?;
            names::validate_object_path(path).map_err(|e| text(&e))?;
            if let Some(i) = interface {
                names::validate_interface(i).map_err(|e| text(&e))?;
            }
            let key = ObjectKey {
                machine: machine.clone(),
                dest: dest.clone(),
                path: path.clone(),
                interface: interface.clone(),
            };
            ctx.objects.acquire(&key);
            Kind::Object { key, loaded: false }
        }
        Resource::Audit {
            machine,
            since_ms,
            limit,
        } => {
            if let Some(m) = machine {
                validate_nkey(m).map_err(|e| text(&e))?;
            }
            let since = since_ms.map_or(AUDIT_SINCE, Duration::from_millis);
            let q = AuditQuery {
                machine: machine.clone(),
                since: since.min(MAX_AUDIT_SINCE),
                limit: limit.unwrap_or(AUDIT_LIMIT).clamp(1, MAX_AUDIT_LIMIT),
            };
            let ring = AuditRing::new(q.limit);
            let (ready_tx, ready_rx) = oneshot::channel();
            let client = ctx.fleet.client().clone();
            let task = tokio::spawn(forward_audit(
                client,
                ctx.store.clone(),
                q,
                signals(),
                ready_tx,
            ));
            return Ok(Compiled {
                kind: Kind::Audit {
                    task: task.abort_handle(),
                    ring,
                    history: None,
                },
                ready: Some(ready_rx),
            });
        }
        Resource::Signals {
            machine,
            sender,
            interface,
            member,
            path_prefix,
            since_ms,
            limit,
        } => {
            if let Some(s) = sender {
                names::validate_bus_name(s).map_err(|e| text(&e))?;
            }
            if let Some(i) = interface {
                names::validate_interface(i).map_err(|e| text(&e))?;
            }
            if let Some(m) = member {
                names::validate_member(m).map_err(|e| text(&e))?;
            }
            // The sender is matched on headers: a well-known name is not in the subject.
            let filter = SignalFilter {
                nkey: machine.clone(),
                sender: None,
                path_prefix: path_prefix.clone(),
            };
            let subjects = filter.subjects().map_err(|e| text(&e))?;
            let m = SignalMatch {
                sender: sender.clone(),
                interface: interface.clone(),
                member: member.clone(),
                path_prefix: path_prefix.clone(),
            };
            let (ready_tx, ready_rx) = oneshot::channel();
            let client = ctx.fleet.client().clone();
            let store = ctx.store.clone();
            let task = match since_ms {
                None => tokio::spawn(forward_signals(
                    client,
                    store,
                    subjects,
                    m,
                    signals(),
                    ready_tx,
                    Ready::default(),
                )),
                Some(ms) => {
                    let q = SignalHistory {
                        filter: match machine {
                            Some(n) => format!("{}.signals.{n}.>", subject::PREFIX),
                            None => subject::SIGNALS_ALL.to_owned(),
                        },
                        subjects,
                        since: Duration::from_millis(*ms).min(MAX_SIGNAL_SINCE),
                        limit: limit.unwrap_or(SIGNAL_REPLAY).clamp(1, MAX_SIGNAL_REPLAY),
                    };
                    tokio::spawn(forward_signal_history(
                        client,
                        store,
                        q,
                        m,
                        signals(),
                        ready_tx,
                    ))
                }
            };
            return Ok(Compiled {
                kind: Kind::Signals {
                    task: task.abort_handle(),
                    history: None,
                },
                ready: Some(ready_rx),
            });
        }
    };
    Ok(Compiled { kind, ready: None })
}

/// Stops what a subscription holds.
pub(super) fn release(ctx: &WsContext, sub: Sub) {
    match sub.kind {
        Kind::Object { key, .. } => ctx.objects.release(&key),
        Kind::Signals { task, .. } | Kind::Audit { task, .. } => task.abort(),
        _ => {}
    }
}

/// Which machines' changes the subscriptions need.
pub(super) fn interest<'a>(subs: impl Iterator<Item = &'a Sub>) -> Interest {
    let mut interest = Interest::default();
    for sub in subs {
        match &sub.kind {
            Kind::Machines => interest.machine_rows = true,
            Kind::Units { machines: None, .. } => interest.all_machines = true,
            Kind::Units {
                machines: Some(set),
                ..
            } => interest.machines.extend(set.iter().cloned()),
            Kind::Object { key, .. } => {
                interest.machines.insert(key.machine.clone());
            }
            Kind::Signals { .. } | Kind::Audit { .. } | Kind::Fleet(_) => {}
        }
    }
    interest
}

/// What a snapshot carries.
pub(super) struct Snapshot {
    pub resource: &'static str,
    pub schema: Schema,
    pub data: SnapshotData,
    pub error: Option<ErrorBody>,
}

/// What a change means for one subscription.
pub(super) enum Update<'a> {
    Delta(Delta<'a>),
    /// A fresh snapshot (a followed object was loaded again).
    Snapshot,
}

impl Kind {
    /// Whether the subscription is fed by the change hub (and so resyncs when it lagged).
    pub(super) fn follows_changes(&self) -> bool {
        !matches!(
            self,
            Kind::Signals { .. } | Kind::Audit { .. } | Kind::Fleet(_)
        )
    }

    /// What the subscription's task said once in place.
    pub(super) fn ready(&mut self, r: Ready) {
        match self {
            Kind::Signals { history, .. } => *history = r.history,
            Kind::Audit { ring, history, .. } => {
                *history = r.history;
                for row in r.page {
                    ring.push(row);
                }
            }
            _ => {}
        }
    }

    /// Keeps an audit row for the next (resync) snapshot.
    pub(super) fn keep(&mut self, row: &AuditRow) {
        if let Kind::Audit { ring, .. } = self {
            ring.push(row.clone());
        }
    }

    pub(super) fn is_fleet(&self) -> bool {
        matches!(self, Kind::Fleet(_))
    }

    /// The current state; `None` while an object is still loading (its Reset change brings
    /// the snapshot).
    pub(super) fn snapshot(&mut self, ctx: &WsContext) -> Option<Snapshot> {
        let (resource, schema, data, error) = match self {
            Kind::Machines => (
                "machines",
                Schema::machines(),
                SnapshotData::Machines(ctx.store.machine_rows(now_ms())),
                None,
            ),
            Kind::Units { machines, unit } => {
                let rows = ctx.store.unit_rows(
                    |m| machines.as_ref().is_none_or(|set| set.contains(m)),
                    unit.as_ref().map_or("", |g| g.prefix()),
                    |n| unit.as_ref().is_none_or(|g| g.is_match(n)),
                );
                ("units", Schema::units(), SnapshotData::Units(rows), None)
            }
            Kind::Object { key, loaded } => match ctx.objects.state(key)? {
                Ok(state) => {
                    *loaded = true;
                    (
                        "object",
                        Schema::Object(Box::new(state.schema)),
                        SnapshotData::Object(state.properties),
                        None,
                    )
                }
                Err(e) => {
                    *loaded = true;
                    ("object", Schema::Absent, SnapshotData::Absent, Some(e))
                }
            },
            Kind::Fleet(q) => {
                let mut b = Builder::default();
                let now = now_ms();
                ctx.store.each_machine(|m| b.add(m, q, now));
                (
                    "fleet",
                    Schema::fleet(),
                    SnapshotData::Fleet(Box::new(b.finish(q))),
                    None,
                )
            }
            Kind::Signals { history, .. } => (
                "signals",
                Schema::signals(history.clone()),
                SnapshotData::Signals([]),
                None,
            ),
            Kind::Audit { ring, history, .. } => (
                "audit",
                Schema::audit(history.clone()),
                SnapshotData::Audit(ring.rows()),
                None,
            ),
        };
        Some(Snapshot {
            resource,
            schema,
            data,
            error,
        })
    }

    /// What `change` means for this subscription, if anything.
    pub(super) fn update<'a>(&self, change: &'a Change) -> Option<Update<'a>> {
        match (self, change) {
            (Kind::Machines, Change::Machine(row)) => {
                Some(Update::Delta(Delta::Machine { upsert: [row] }))
            }
            (
                Kind::Units { machines, unit },
                Change::Units {
                    machine,
                    rows,
                    removed,
                    replace,
                },
            ) => {
                if machines.as_ref().is_some_and(|set| !set.contains(machine)) {
                    return None;
                }
                let keep = |n: &str| unit.as_ref().is_none_or(|re| re.is_match(n));
                let upsert: Vec<_> = rows.iter().filter(|r| keep(&r.name)).collect();
                if *replace {
                    return Some(Update::Delta(Delta::ReplaceUnits {
                        replace: machine,
                        upsert,
                    }));
                }
                let remove: Vec<[&str; 2]> = removed
                    .iter()
                    .filter(|n| keep(n))
                    .map(|n| [machine.as_str(), n.as_str()])
                    .collect();
                (!upsert.is_empty() || !remove.is_empty())
                    .then_some(Update::Delta(Delta::Units { upsert, remove }))
            }
            (Kind::Object { key, loaded }, Change::Object(ch)) if *key == ch.key => {
                match &ch.kind {
                    ObjectChangeKind::Reset => Some(Update::Snapshot),
                    ObjectChangeKind::Props { interface, changed } if *loaded => {
                        Some(Update::Delta(Delta::Object { interface, changed }))
                    }
                    ObjectChangeKind::Props { .. } => None,
                }
            }
            _ => None,
        }
    }

    /// Whether a snapshot already went out (a new one is then a resync).
    pub(super) fn loaded(&self) -> bool {
        matches!(self, Kind::Object { loaded: true, .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UnitRow;

    fn row(machine: &str, name: &str) -> UnitRow {
        UnitRow {
            machine: machine.into(),
            host: "h".into(),
            name: name.into(),
            unit: Default::default(),
        }
    }

    fn units(replace: bool, rows: &[(&str, &str)], removed: &[&str]) -> Change {
        Change::Units {
            machine: "A".into(),
            rows: rows.iter().map(|(m, n)| row(m, n)).collect(),
            removed: removed.iter().map(|n| n.to_string()).collect(),
            replace,
        }
    }

    fn text(u: Option<Update>) -> Option<String> {
        match u? {
            Update::Delta(d) => Some(serde_json::to_value(&d).unwrap().to_string()),
            Update::Snapshot => Some("snapshot".into()),
        }
    }

    #[test]
    fn unit_changes_are_filtered_by_machine_and_glob() {
        let ssh = Kind::Units {
            machines: Some(HashSet::from(["A".to_owned()])),
            unit: Some(Glob::new("ssh*").unwrap()),
        };
        let change = units(false, &[("A", "sshd.service"), ("A", "cron.service")], &[]);
        let t = text(ssh.update(&change)).unwrap();
        assert!(t.contains("sshd.service") && !t.contains("cron"), "{t}");
        assert_eq!(
            text(ssh.update(&units(false, &[("A", "cron.service")], &["cron.service"]))),
            None,
            "nothing it follows changed"
        );
        assert_eq!(
            text(ssh.update(&units(false, &[], &["sshd.service"]))).unwrap(),
            r#"{"remove":[["A","sshd.service"]]}"#
        );
        // A full list is sent even when none of it matches: the client drops the machine's rows.
        assert_eq!(
            text(ssh.update(&units(true, &[("A", "cron.service")], &[]))).unwrap(),
            r#"{"replace":"A","upsert":[]}"#
        );
        let other = Kind::Units {
            machines: Some(HashSet::from(["B".to_owned()])),
            unit: None,
        };
        assert_eq!(text(other.update(&change)), None);
        assert_eq!(text(Kind::Machines.update(&change)), None);
    }

    #[test]
    fn objects_send_deltas_only_after_a_snapshot() {
        let key = ObjectKey {
            machine: "A".into(),
            dest: "org.x".into(),
            path: "/o".into(),
            interface: None,
        };
        let props = Change::Object(crate::changes::ObjectChange {
            key: key.clone(),
            kind: ObjectChangeKind::Props {
                interface: "org.x.Y".into(),
                changed: Default::default(),
            },
        });
        let reset = Change::Object(crate::changes::ObjectChange {
            key: key.clone(),
            kind: ObjectChangeKind::Reset,
        });
        let loading = Kind::Object {
            key: key.clone(),
            loaded: false,
        };
        assert_eq!(text(loading.update(&props)), None);
        assert_eq!(text(loading.update(&reset)).unwrap(), "snapshot");
        let loaded = Kind::Object { key, loaded: true };
        assert_eq!(
            text(loaded.update(&props)).unwrap(),
            r#"{"changed":{},"interface":"org.x.Y"}"#
        );
    }
}
