//! Manager method calls and property reads, as fan-out queries.
//!
//! Every call names its interface and its signature: without one the agent would introspect
//! systemd's Manager (a large document) to type the arguments, and a JSON `[]` would be
//! ambiguous between "no arguments" and "an empty array".

use serde_json::{json, Value};

use cbus_protocol::{Op, Request};

use super::{unit::exact_pattern, DESTINATION, MANAGER, MANAGER_PATH, UNIT};
use crate::fleet::Query;

/// A Manager method call with its in-signature (`""` for none).
pub fn manager_call(method: &str, args: Value, signature: &str) -> Query {
    Query {
        destination: DESTINATION.into(),
        path: MANAGER_PATH.into(),
        op: Op::Call,
        member: Some(method.into()),
        request: Request {
            interface: Some(MANAGER.into()),
            args: Some(args),
            signature: Some(signature.into()),
            ..Default::default()
        },
    }
}

/// `ListUnits()`: every loaded unit (read the reply with [`super::units_of_reply`]).
pub fn list_units() -> Query {
    manager_call("ListUnits", json!([]), "")
}

/// `ListUnitsByPatterns(states, patterns)`: loaded units in one of `states` (all when empty)
/// whose names match one of the fnmatch `patterns` (all when empty). Loads nothing.
pub fn list_units_by_patterns(states: &[&str], patterns: &[&str]) -> Query {
    manager_call("ListUnitsByPatterns", json!([states, patterns]), "asas")
}

/// `ListUnitsByPatterns` for exactly the unit `name`: whether systemd has it loaded, without
/// loading it (reading the unit's object would).
pub fn list_unit(name: &str) -> Query {
    list_units_by_patterns(&[], &[&exact_pattern(name)])
}

/// `Subscribe()`: without a subscriber systemd sends no unit signals on the system bus. The
/// subscription belongs to the agent's bus connection; a second one fails with
/// `org.freedesktop.systemd1.AlreadySubscribed`.
pub fn subscribe() -> Query {
    manager_call("Subscribe", json!([]), "")
}

/// The jobs a unit can be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitJob {
    Start,
    Stop,
    Restart,
    Reload,
}

impl UnitJob {
    /// The Manager method that queues the job.
    pub fn method(self) -> &'static str {
        match self {
            UnitJob::Start => "StartUnit",
            UnitJob::Stop => "StopUnit",
            UnitJob::Restart => "RestartUnit",
            UnitJob::Reload => "ReloadUnit",
        }
    }
}

/// `StartUnit(unit, "replace")` etc.: queues the job, replacing conflicting ones (systemctl's
/// default); the reply is the job's object path.
pub fn unit_job(job: UnitJob, unit: &str) -> Query {
    manager_call(job.method(), json!([unit, "replace"]), "ss")
}

/// A property `Get` on any systemd object (`path`), e.g. a job's `State`.
pub fn get_property(path: &str, interface: &str, name: &str) -> Query {
    Query {
        destination: DESTINATION.into(),
        path: path.into(),
        op: Op::Get,
        member: Some(name.into()),
        request: Request {
            interface: Some(interface.into()),
            ..Default::default()
        },
    }
}

/// `GetAll` of a unit object's `org.freedesktop.systemd1.Unit` interface (values are variants:
/// read them with [`super::prop`]). Reading a unit's object loads the unit.
pub fn unit_properties(path: &str) -> Query {
    Query {
        destination: DESTINATION.into(),
        path: path.into(),
        op: Op::GetAll,
        member: None,
        request: Request {
            interface: Some(UNIT.into()),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_has_a_signature_and_checks() {
        let calls = [
            (list_units(), "ListUnits", ""),
            (list_unit("a*.service"), "ListUnitsByPatterns", "asas"),
            (subscribe(), "Subscribe", ""),
            (
                unit_job(UnitJob::Restart, "nginx.service"),
                "RestartUnit",
                "ss",
            ),
        ];
        for (q, method, signature) in calls {
            assert_eq!(q.member.as_deref(), Some(method));
            assert_eq!(q.request.signature.as_deref(), Some(signature));
            assert_eq!(q.request.interface.as_deref(), Some(MANAGER));
            assert!(q.request.check_for(Op::Call).is_ok(), "{method}");
        }
        let q = unit_job(UnitJob::Reload, "nginx.service");
        assert_eq!(q.request.args, Some(json!(["nginx.service", "replace"])));
        assert_eq!(
            list_unit("a*.service").request.args,
            Some(json!([[], ["a[*].service"]]))
        );
        assert!(
            unit_properties("/org/freedesktop/systemd1/unit/a_2eservice")
                .request
                .check_for(Op::GetAll)
                .is_ok()
        );
        assert!(get_property(
            "/org/freedesktop/systemd1/job/7",
            super::super::JOB,
            "State"
        )
        .request
        .check_for(Op::Get)
        .is_ok());
    }
}
