//! `cbus monitor`: live signals from the fleet, one line each (or NDJSON).
//!
//! The NATS subscription does the coarse filtering (`protocol::subject::SignalFilter`: machine,
//! unique sender, path prefix); interface, member and well-known sender names are not in the
//! subject, so they are matched here against the signal's headers. Signal subjects carry the
//! sender's unique name (`:1.7`) only, so `--sender org.freedesktop.systemd1` is matched against
//! the `Sender-Name` header the agent adds.

use cbus_protocol::headers;
use cbus_protocol::names;
use cbus_protocol::subject::SignalFilter;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::error::{usage, Failure};
use crate::fanout::Context;
use crate::output;
use crate::render::{self, Format};

/// Above this many selected machines, one wildcard subscription filtered here replaces one
/// subscription per machine.
const MAX_PER_MACHINE_SUBSCRIPTIONS: usize = 100;

/// What to watch.
#[derive(Debug, Default)]
pub struct Watch {
    pub sender: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub path: Option<String>,
}

impl Watch {
    /// Validates the filters before anything is sent.
    pub fn check(&self) -> Result<(), Failure> {
        if let Some(s) = &self.sender {
            names::validate_bus_name(s).map_err(usage)?;
        }
        if let Some(i) = &self.interface {
            names::validate_interface(i).map_err(usage)?;
        }
        if let Some(m) = &self.member {
            names::validate_member(m).map_err(usage)?;
        }
        if let Some(p) = &self.path {
            names::validate_object_path(p).map_err(usage)?;
        }
        Ok(())
    }

    /// The subjects for these machines (`None`: all).
    pub fn subjects(&self, nkeys: Option<&[String]>) -> Result<Vec<String>, Failure> {
        let unique_sender = self.sender.clone().filter(|s| s.starts_with(':'));
        let filter = |nkey: Option<String>| SignalFilter {
            nkey,
            sender: unique_sender.clone(),
            path_prefix: self.path.clone(),
        };
        let mut subjects = Vec::new();
        match nkeys {
            Some(list) if list.len() <= MAX_PER_MACHINE_SUBSCRIPTIONS => {
                for n in list {
                    subjects.extend(filter(Some(n.clone())).subjects().map_err(usage)?);
                }
            }
            _ => subjects.extend(filter(None).subjects().map_err(usage)?),
        }
        Ok(subjects)
    }

    /// Whether a signal with these headers passes the filters the subject could not express.
    pub fn matches(&self, h: Option<&async_nats::HeaderMap>) -> bool {
        let get = |name| headers::get(h, name).unwrap_or("");
        let sender_ok = match &self.sender {
            Some(s) if !s.starts_with(':') => {
                get(headers::SENDER_NAME) == s || get(headers::SENDER) == s
            }
            _ => true,
        };
        sender_ok
            && self
                .interface
                .as_deref()
                .is_none_or(|i| i == get(headers::INTERFACE))
            && self
                .member
                .as_deref()
                .is_none_or(|m| m == get(headers::MEMBER))
    }
}

pub async fn run(ctx: &Context, watch: Watch) -> Result<(), Failure> {
    watch.check()?;
    // With a selection, only the selected machines' signals are shown.
    let allowed: Option<Vec<String>> = if ctx.selecting() {
        Some(
            ctx.targets()
                .await?
                .into_iter()
                .map(|a| a.info.nkey)
                .collect(),
        )
    } else {
        None
    };
    let subjects = watch.subjects(allowed.as_deref())?;
    let client = ctx.fleet().await?.client().clone();
    let mut subs = Vec::new();
    for s in &subjects {
        subs.push(
            client
                .subscribe(s.clone())
                .await
                .map_err(|e| Failure::Connection(format!("cannot subscribe to {s}: {e}")))?,
        );
    }
    client
        .flush()
        .await
        .map_err(|e| Failure::Connection(e.to_string()))?;
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("watching {} (Ctrl-C to stop)", subjects.join(" "));
    }
    let mut messages = futures::stream::select_all(subs);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Connection(format!("cannot watch SIGTERM: {e}")))?;
    loop {
        let msg = tokio::select! {
            m = messages.next() => match m {
                Some(m) => m,
                None => return Err(Failure::Connection("NATS subscription closed".into())),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
        };
        let h = msg.headers.as_ref();
        let get = |name: &'static str| headers::get(h, name).unwrap_or("").to_owned();
        let nkey = get(headers::NKEY);
        if allowed.as_ref().is_some_and(|a| !a.contains(&nkey)) || !watch.matches(h) {
            continue;
        }
        let args: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let host = match get(headers::HOSTNAME) {
            h if h.is_empty() => nkey.chars().take(8).collect(),
            h => h,
        };
        let now = cbus_protocol::presence::now_ms();
        let line = if ctx.format == Format::Json {
            json!({
                "time_ms": now,
                "host": host,
                "nkey": nkey,
                "sender": get(headers::SENDER),
                "sender_name": get(headers::SENDER_NAME),
                "path": get(headers::PATH),
                "interface": get(headers::INTERFACE),
                "member": get(headers::MEMBER),
                "signature": get(headers::SIGNATURE),
                "args": args,
            })
            .to_string()
        } else {
            let sender = match get(headers::SENDER_NAME) {
                n if n.is_empty() => get(headers::SENDER),
                n => n,
            };
            let fields = [
                render::clock_ms(now),
                host,
                sender,
                get(headers::PATH),
                format!("{}.{}", get(headers::INTERFACE), get(headers::MEMBER)),
                args.to_string(),
            ];
            fields.map(|f| render::sanitize(&f)).join(" ")
        };
        output::line(&line)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N1: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";

    #[test]
    fn subjects_and_header_filters() {
        let w = Watch {
            sender: Some("org.freedesktop.systemd1".into()),
            path: Some("/org/freedesktop/systemd1/unit".into()),
            member: Some("PropertiesChanged".into()),
            ..Default::default()
        };
        w.check().unwrap();
        // A well-known sender is not in the subject (subjects carry unique names).
        assert_eq!(
            w.subjects(None).unwrap(),
            vec![
                "dbus.signals.*.*.org.freedesktop.systemd1.unit",
                "dbus.signals.*.*.org.freedesktop.systemd1.unit.>"
            ]
        );
        let one = vec![N1.to_string()];
        assert_eq!(
            w.subjects(Some(&one)).unwrap()[0],
            format!("dbus.signals.{N1}.*.org.freedesktop.systemd1.unit")
        );
        let mut h = async_nats::HeaderMap::new();
        headers::set(&mut h, headers::SENDER, ":1.1");
        headers::set(&mut h, headers::SENDER_NAME, "org.freedesktop.systemd1");
        headers::set(&mut h, headers::MEMBER, "PropertiesChanged");
        assert!(w.matches(Some(&h)));
        headers::set(&mut h, headers::MEMBER, "JobRemoved");
        assert!(!w.matches(Some(&h)));
        let unique = Watch {
            sender: Some(":1.7".into()),
            ..Default::default()
        };
        assert_eq!(
            unique.subjects(None).unwrap(),
            vec!["dbus.signals.*._3a1_2e7.>"]
        );
        assert!(unique.matches(None));
        assert!(Watch {
            member: Some("a.b".into()),
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(Watch {
            path: Some("x".into()),
            ..Default::default()
        }
        .check()
        .is_err());
    }
}
