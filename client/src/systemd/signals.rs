//! systemd's signals as cbus forwards them: where to subscribe, which to believe, and what the
//! Manager's say.
//!
//! A signal is a claim any local user can make (`busctl emit`), so unit state is taken only from
//! signals whose sender the agent saw own `org.freedesktop.systemd1` (the `Sender-Name` header:
//! no local user can own that name), and only for the machine the subject's `<nkey>` token names
//! (what NATS permissions guarantee; the `NKey` header is the publisher's word).

use async_nats::HeaderMap;
use serde_json::Value;

use cbus_protocol::subject::SignalFilter;
use cbus_protocol::SubjectError;

use super::{DESTINATION, MANAGER, MANAGER_PATH, UNIT_PATH};
use crate::headers::{self, SignalRefused};

/// The subject of the Manager's own signals (`UnitNew`, `JobRemoved`, ...), without the units'
/// `PropertiesChanged` below it; of one machine, or (`None`) of all.
pub fn manager_signals(nkey: Option<&str>) -> Result<String, SubjectError> {
    SignalFilter {
        nkey: nkey.map(str::to_owned),
        sender: None,
        path_prefix: Some(MANAGER_PATH.into()),
    }
    .exact_subject()
}

/// The subject of every unit object's signals (`PropertiesChanged` of
/// `/org/freedesktop/systemd1/unit/*`); of one machine, or (`None`) of all.
pub fn unit_signals(nkey: Option<&str>) -> Result<String, SubjectError> {
    let subjects = SignalFilter {
        nkey: nkey.map(str::to_owned),
        sender: None,
        path_prefix: Some(UNIT_PATH.into()),
    }
    .subjects()?;
    // The unit directory itself is no object and emits nothing: only what is below it counts.
    Ok(subjects
        .into_iter()
        .last()
        .expect("a path prefix gives the path and what is below it"))
}

/// The machine a systemd signal is from, if systemd sent it: the subject's `<nkey>` (not
/// contradicted by the `NKey` header) and a sender that owns `org.freedesktop.systemd1`.
pub fn systemd_signal<'a>(
    subject: &'a str,
    h: Option<&HeaderMap>,
) -> Result<&'a str, SignalRefused> {
    let nkey = headers::signal_machine(subject, h)?;
    if !headers::sender_owns(h, DESTINATION) {
        return Err(SignalRefused::NotFromOwner(DESTINATION));
    }
    Ok(nkey)
}

/// How a job ended, as `JobRemoved` says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobResult {
    Done,
    Canceled,
    Timeout,
    Failed,
    Dependency,
    Skipped,
    /// A result this version does not know (systemd adds some now and then).
    Other(String),
}

impl JobResult {
    pub fn parse(s: &str) -> JobResult {
        match s {
            "done" => JobResult::Done,
            "canceled" => JobResult::Canceled,
            "timeout" => JobResult::Timeout,
            "failed" => JobResult::Failed,
            "dependency" => JobResult::Dependency,
            "skipped" => JobResult::Skipped,
            other => JobResult::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            JobResult::Done => "done",
            JobResult::Canceled => "canceled",
            JobResult::Timeout => "timeout",
            JobResult::Failed => "failed",
            JobResult::Dependency => "dependency",
            JobResult::Skipped => "skipped",
            JobResult::Other(s) => s,
        }
    }

    /// The job did what was asked (`skipped`: there was nothing to do, e.g. a reload of a unit
    /// that is not running).
    pub fn succeeded(&self) -> bool {
        matches!(self, JobResult::Done | JobResult::Skipped)
    }
}

impl std::fmt::Display for JobResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `JobRemoved(u id, o job, s unit, s result)`: a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRemoved {
    pub id: u32,
    /// The job's object path, as `StartUnit` etc. returned it.
    pub job: String,
    pub unit: String,
    pub result: JobResult,
}

impl JobRemoved {
    /// From the signal's arguments (the JSON array a signal's body is).
    pub fn from_args(args: &Value) -> Option<JobRemoved> {
        Some(JobRemoved {
            id: args
                .get(0)
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(0),
            job: args.get(1)?.as_str()?.to_owned(),
            unit: args.get(2).and_then(Value::as_str).unwrap_or("").to_owned(),
            result: JobResult::parse(args.get(3)?.as_str()?),
        })
    }
}

/// A Manager signal that tells about units and jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerSignal {
    /// `UnitNew(s id, o unit)`: systemd loaded a unit (also when merely asked about one).
    UnitNew { name: String, path: String },
    /// `UnitRemoved(s id, o unit)`: systemd unloaded it.
    UnitRemoved { name: String, path: String },
    /// `JobRemoved(u, o, s, s)`.
    JobRemoved(JobRemoved),
    /// `Reloading(b active)`: a daemon-reload starts (`true`) or ended (`false`); unit files
    /// may have appeared or gone.
    Reloading { active: bool },
}

impl ManagerSignal {
    /// The signal a message's `Interface` and `Member` headers and JSON body make; `None` for
    /// another signal or one whose arguments do not fit. Says nothing about who sent it (see
    /// [`systemd_signal`]).
    pub fn decode(h: Option<&HeaderMap>, payload: &[u8]) -> Option<ManagerSignal> {
        if headers::get(h, headers::INTERFACE) != Some(MANAGER) {
            return None;
        }
        let member = headers::get(h, headers::MEMBER)?;
        let args = serde_json::from_slice::<Value>(payload).unwrap_or(Value::Null);
        Self::from_args(member, &args)
    }

    /// The signal named `member` with arguments `args`.
    pub fn from_args(member: &str, args: &Value) -> Option<ManagerSignal> {
        let unit = || {
            Some((
                args.get(0)?.as_str()?.to_owned(),
                args.get(1).and_then(Value::as_str).unwrap_or("").to_owned(),
            ))
        };
        match member {
            "UnitNew" => unit().map(|(name, path)| ManagerSignal::UnitNew { name, path }),
            "UnitRemoved" => unit().map(|(name, path)| ManagerSignal::UnitRemoved { name, path }),
            "JobRemoved" => JobRemoved::from_args(args).map(ManagerSignal::JobRemoved),
            "Reloading" => Some(ManagerSignal::Reloading {
                active: args.get(0).and_then(Value::as_bool).unwrap_or(false),
            }),
            _ => None,
        }
    }
}

/// `org.freedesktop.DBus.Properties.PropertiesChanged(s interface, a{sv} changed, as
/// invalidated)`, as unit objects send it: changed values are variants (read them with
/// [`super::unvariant`]); invalidated ones changed without their value being sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertiesChanged {
    pub interface: String,
    pub changed: serde_json::Map<String, Value>,
    pub invalidated: Vec<String>,
}

impl PropertiesChanged {
    /// The interface D-Bus sends the signal on.
    pub const INTERFACE: &'static str = "org.freedesktop.DBus.Properties";
    pub const MEMBER: &'static str = "PropertiesChanged";

    /// The change a `PropertiesChanged` message of the object `path` says, and the machine it
    /// is from (the subject's `<nkey>`), if the agent saw its sender own the bus name `owner`;
    /// `None` for another signal, another object, or a sender that does not own `owner`
    /// (anyone on that machine's bus may emit one).
    pub fn from_owner<'a>(
        subject: &'a str,
        h: Option<&HeaderMap>,
        payload: &[u8],
        path: &str,
        owner: &str,
    ) -> Option<(&'a str, PropertiesChanged)> {
        if headers::get(h, headers::MEMBER) != Some(Self::MEMBER)
            || headers::get(h, headers::INTERFACE) != Some(Self::INTERFACE)
            || headers::get(h, headers::PATH) != Some(path)
            || !headers::sender_owns(h, owner)
        {
            return None;
        }
        let nkey = headers::signal_machine(subject, h).ok()?;
        let args = serde_json::from_slice::<Value>(payload).ok()?;
        Some((nkey, Self::from_args(&args)?))
    }

    /// The new value of `property` if the change carries it, or `Err(())` when it was only
    /// invalidated (changed without its value being sent: read it).
    pub fn value_of(&self, property: &str) -> Option<Result<&Value, ()>> {
        match self.changed.get(property) {
            Some(v) => Some(Ok(super::unvariant(v))),
            None if self.invalidated.iter().any(|p| p == property) => Some(Err(())),
            None => None,
        }
    }

    /// From the signal's arguments; `None` without an interface name. Missing or ill-typed
    /// maps and lists count as empty.
    pub fn from_args(args: &Value) -> Option<PropertiesChanged> {
        Some(PropertiesChanged {
            interface: args.get(0)?.as_str()?.to_owned(),
            changed: args
                .get(1)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
            invalidated: args
                .get(2)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NA: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
    const NB: &str = "UCZR2FMXVH2LW2J3GXYZWTM4U6V7RWIZ6XNWHN3PSD3OBPB4GEEEPB4B";

    #[test]
    fn subjects() {
        assert_eq!(
            manager_signals(None).unwrap(),
            "dbus.signals.*.*.org.freedesktop.systemd1"
        );
        assert_eq!(
            unit_signals(None).unwrap(),
            "dbus.signals.*.*.org.freedesktop.systemd1.unit.>"
        );
        assert_eq!(
            manager_signals(Some(NA)).unwrap(),
            format!("dbus.signals.{NA}.*.org.freedesktop.systemd1")
        );
        assert!(manager_signals(Some("Ubad")).is_err());
    }

    fn h(nkey: &str, sender_names: &str, member: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        headers::set(&mut h, headers::NKEY, nkey);
        headers::set(&mut h, headers::INTERFACE, MANAGER);
        headers::set(&mut h, headers::MEMBER, member);
        headers::set(&mut h, headers::SENDER_NAME, sender_names);
        h
    }

    #[test]
    fn only_systemd_on_its_own_machine_is_believed() {
        let subject = format!("dbus.signals.{NA}._3a1_2e1.org.freedesktop.systemd1");
        let ok = h(NA, "org.freedesktop.systemd1 org.x", "JobRemoved");
        assert_eq!(systemd_signal(&subject, Some(&ok)), Ok(NA));
        assert_eq!(
            systemd_signal(&subject, Some(&h(NA, "org.example.Other", "JobRemoved"))),
            Err(SignalRefused::NotFromOwner(DESTINATION))
        );
        assert_eq!(
            systemd_signal(&subject, Some(&h(NA, "", "JobRemoved"))),
            Err(SignalRefused::NotFromOwner(DESTINATION))
        );
        assert!(matches!(
            systemd_signal(&subject, Some(&h(NB, DESTINATION, "JobRemoved"))),
            Err(SignalRefused::NkeyMismatch { .. })
        ));
        assert_eq!(
            systemd_signal("dbus.signals.x", Some(&ok)),
            Err(SignalRefused::Subject)
        );
    }

    #[test]
    fn manager_signals_decode() {
        let body = |v: Value| serde_json::to_vec(&v).unwrap();
        let job = ManagerSignal::decode(
            Some(&h(NA, DESTINATION, "JobRemoved")),
            &body(json!([
                7,
                "/org/freedesktop/systemd1/job/7",
                "x.service",
                "failed"
            ])),
        );
        assert_eq!(
            job,
            Some(ManagerSignal::JobRemoved(JobRemoved {
                id: 7,
                job: "/org/freedesktop/systemd1/job/7".into(),
                unit: "x.service".into(),
                result: JobResult::Failed,
            }))
        );
        assert_eq!(
            ManagerSignal::from_args("UnitNew", &json!(["a.service", "/o/a"])),
            Some(ManagerSignal::UnitNew {
                name: "a.service".into(),
                path: "/o/a".into()
            })
        );
        assert_eq!(
            ManagerSignal::decode(Some(&h(NA, DESTINATION, "Reloading")), b"not json"),
            Some(ManagerSignal::Reloading { active: false })
        );
        assert_eq!(ManagerSignal::from_args("UnitNew", &json!([])), None);
        assert_eq!(
            ManagerSignal::from_args("JobNew", &json!([1, "/j", "u"])),
            None
        );
        let mut other = h(NA, DESTINATION, "UnitNew");
        headers::set(&mut other, headers::INTERFACE, "org.example.I");
        assert_eq!(
            ManagerSignal::decode(Some(&other), &body(json!(["a", "/a"]))),
            None
        );
        assert!(JobResult::parse("skipped").succeeded());
        let pc = PropertiesChanged::from_args(&json!([
            super::super::UNIT,
            {"ActiveState": {"t": "s", "v": "active"}},
            ["SubState", 3]
        ]))
        .unwrap();
        assert_eq!(pc.interface, super::super::UNIT);
        assert_eq!(
            super::super::unvariant(&pc.changed["ActiveState"]),
            &json!("active")
        );
        assert_eq!(pc.invalidated, ["SubState"]);
        assert_eq!(pc.value_of("ActiveState"), Some(Ok(&json!("active"))));
        assert_eq!(pc.value_of("SubState"), Some(Err(())));
        assert_eq!(pc.value_of("LoadState"), None);
        // Only from the owner, of the object asked about, on the subject's machine.
        let path = "/org/freedesktop/systemd1/unit/x_2eservice";
        let subject =
            format!("dbus.signals.{NA}._3a1_2e1.org.freedesktop.systemd1.unit.x_2eservice");
        let mut hp = h(NA, DESTINATION, PropertiesChanged::MEMBER);
        headers::set(&mut hp, headers::INTERFACE, PropertiesChanged::INTERFACE);
        headers::set(&mut hp, headers::PATH, path);
        let payload =
            body(json!([super::super::UNIT, {"ActiveState": {"t": "s", "v": "failed"}}, []]));
        let (nkey, change) =
            PropertiesChanged::from_owner(&subject, Some(&hp), &payload, path, DESTINATION)
                .unwrap();
        assert_eq!(nkey, NA);
        assert_eq!(change.value_of("ActiveState"), Some(Ok(&json!("failed"))));
        assert!(PropertiesChanged::from_owner(
            &subject,
            Some(&hp),
            &payload,
            "/other",
            DESTINATION
        )
        .is_none());
        assert!(
            PropertiesChanged::from_owner(&subject, Some(&hp), &payload, path, "org.x").is_none()
        );
        headers::set(&mut hp, headers::NKEY, NB);
        assert!(
            PropertiesChanged::from_owner(&subject, Some(&hp), &payload, path, DESTINATION)
                .is_none()
        );
        assert_eq!(PropertiesChanged::from_args(&json!([])), None);
        assert_eq!(JobResult::parse("new-thing").as_str(), "new-thing");
    }
}
