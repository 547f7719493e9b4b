//! `cbus subject`: the NATS subjects behind cbus commands, for `nats sub` / `nats req` and for
//! writing NATS permissions. Built by `protocol::subject`, the same code the agent parses with.

use cbus_protocol::subject::{self, Op, RequestSubject, SignalFilter, Target};

use crate::args::{SubjectCommand, SubjectObject, SubjectQuery};
use crate::error::{usage, Failure};
use crate::output;

fn target(nkey: Option<String>) -> Result<Target, Failure> {
    match nkey {
        Some(n) => {
            subject::validate_nkey(&n).map_err(usage)?;
            Ok(Target::Agent(n))
        }
        None => Ok(Target::Broadcast),
    }
}

fn request(
    op: Op,
    dest: String,
    path: String,
    member: Option<String>,
    nkey: Option<String>,
) -> Result<Vec<String>, Failure> {
    let s = RequestSubject::new(target(nkey)?, dest, path, op, member)
        .and_then(|r| r.encode())
        .map_err(usage)?;
    Ok(vec![s])
}

/// The subjects for a `cbus subject ...` command.
pub fn subjects(cmd: SubjectCommand) -> Result<Vec<String>, Failure> {
    let query = |op, q: SubjectQuery| request(op, q.dest, q.path, Some(q.member), q.nkey);
    let object = |op, o: SubjectObject| request(op, o.dest, o.path, None, o.nkey);
    match cmd {
        SubjectCommand::Get(q) => query(Op::Get, q),
        SubjectCommand::Set(q) => query(Op::Set, q),
        SubjectCommand::Call(q) => query(Op::Call, q),
        SubjectCommand::Getall(o) => object(Op::GetAll, o),
        SubjectCommand::Introspect(o) => object(Op::Introspect, o),
        SubjectCommand::ListNames { nkey } => request(
            Op::ListNames,
            "org.freedesktop.DBus".into(),
            "/org/freedesktop/DBus".into(),
            None,
            nkey,
        ),
        SubjectCommand::Signals { nkey, sender, path } => SignalFilter {
            nkey,
            sender,
            path_prefix: path,
        }
        .subjects()
        .map_err(usage),
        SubjectCommand::Presence { nkey } => Ok(vec![match nkey {
            Some(n) => {
                subject::validate_nkey(&n).map_err(usage)?;
                subject::presence(&n)
            }
            None => subject::PRESENCE_ALL.to_owned(),
        }]),
    }
}

pub fn run(cmd: SubjectCommand) -> Result<(), Failure> {
    let mut text = String::new();
    for s in subjects(cmd)? {
        text.push_str(&s);
        text.push('\n');
    }
    output::print(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N1: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";

    #[test]
    fn subjects_for_each_command() {
        let q = |nkey: Option<&str>| SubjectQuery {
            dest: "org.freedesktop.systemd1".into(),
            path: "/org/freedesktop/systemd1/unit/basic_2etarget".into(),
            member: "ActiveState".into(),
            nkey: nkey.map(Into::into),
        };
        assert_eq!(
            subjects(SubjectCommand::Get(q(None))).unwrap(),
            vec!["dbus.broadcast.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.unit.basic_2etarget.get.ActiveState"]
        );
        assert_eq!(
            subjects(SubjectCommand::Call(q(Some(N1)))).unwrap()[0],
            format!("dbus.agent.{N1}.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.unit.basic_2etarget.call.ActiveState")
        );
        assert!(subjects(SubjectCommand::Get(q(Some("Ubad")))).is_err());
        assert_eq!(
            subjects(SubjectCommand::ListNames { nkey: None }).unwrap(),
            vec!["dbus.broadcast.org_2efreedesktop_2eDBus.org.freedesktop.DBus.list-names.-"]
        );
        assert_eq!(
            subjects(SubjectCommand::Signals {
                nkey: Some(N1.into()),
                sender: Some(":1.1".into()),
                path: None
            })
            .unwrap(),
            vec![format!("dbus.signals.{N1}._3a1_2e1.>")]
        );
        assert_eq!(
            subjects(SubjectCommand::Presence { nkey: None }).unwrap(),
            vec!["dbus.presence.*"]
        );
    }
}
