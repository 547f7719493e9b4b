//! `cbus monitor`: live signals from the fleet, one line each (or NDJSON).
//!
//! The NATS subscription does the coarse filtering (`protocol::subject::SignalFilter`: machine,
//! unique sender, path prefix); interface, member and well-known sender names are not in the
//! subject, so they are matched here against the signal's headers. Signal subjects carry the
//! sender's unique name (`:1.7`) only, so `--sender org.freedesktop.systemd1` is matched against
//! the `Sender-Name` header the agent adds.
//!
//! A signal's machine is the `<nkey>` token of the subject it arrived on: the server's
//! permissions let an agent publish only under its own nkey, while headers are whatever the
//! publisher wrote. So the host shown is the registry's hostname for that nkey (never the
//! `Hostname` header), and a signal whose `NKey` header names another machine is dropped and
//! counted (a compromised agent trying to speak for another), not shown as either.
//!
//! With `--since`, signals come from the signal stream instead (`cbus streams init --signals`):
//! one ordered consumer from that long ago, which goes on delivering signals as the stream
//! stores them. There is one source, so the replay and the live part have no seam to lose or
//! repeat a signal at; the consumer is recreated after its last stream sequence when NATS
//! restarts, and `cbus_client::streams::History` drops anything at or below that sequence. The
//! stream takes one filter subject (nats-server 2.9), so the sender, path and machine filters
//! are applied here as well. Times shown are when the server stored each signal.

use std::collections::HashMap;
use std::time::Duration;

use cbus_client::headers;
use cbus_client::streams;
use cbus_protocol::names;
use cbus_protocol::streams::SIGNAL_STREAM;
use cbus_protocol::subject::{SignalFilter, SignalSubject};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::error::{usage, Failure};
use crate::fanout::Context;
use crate::output;
use crate::render::{self, Format};

/// Above this many selected machines, one wildcard subscription filtered here replaces one
/// subscription per machine.
const MAX_PER_MACHINE_SUBSCRIPTIONS: usize = 100;
/// A signal from an nkey the registry did not name re-reads the registry, at most this often.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How long a ping-based registry read (server without JetStream) collects answers.
const PING_WINDOW: Duration = Duration::from_millis(500);

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

    /// The one filter subject for the signal stream (`--since`): one machine's signals when one
    /// is selected, else all; [`Watch::subject_matches`] does the rest.
    pub fn stream_filter(&self, nkeys: Option<&[String]>) -> String {
        match nkeys {
            Some([one]) => format!("{}.signals.{one}.>", cbus_protocol::subject::PREFIX),
            _ => cbus_protocol::subject::SIGNALS_ALL.to_owned(),
        }
    }

    /// Whether a signal's subject passes the sender (unique name) and path filters.
    pub fn subject_matches(&self, origin: &SignalSubject) -> bool {
        let sender_ok = match &self.sender {
            Some(s) if s.starts_with(':') => origin.sender == *s,
            _ => true,
        };
        let path_ok = match self.path.as_deref() {
            None | Some("/") => true,
            Some(p) => {
                origin.path == p
                    || origin
                        .path
                        .strip_prefix(p)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        };
        sender_ok && path_ok
    }

    /// Whether a signal with these headers passes the filters the subject could not express.
    pub fn matches(&self, h: Option<&async_nats::HeaderMap>) -> bool {
        let get = |name| headers::get(h, name).unwrap_or("");
        let sender_ok = match &self.sender {
            Some(s) if !s.starts_with(':') => headers::sender_owns(h, s),
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

/// Why signals were not shown although they matched.
#[derive(Debug, Default)]
struct Dropped {
    /// The `NKey` header named another machine than the subject.
    impersonating: u64,
    /// The subject is not a signal subject.
    malformed: u64,
}

/// Hostnames by nkey, from the registry.
struct Hosts {
    by_nkey: HashMap<String, String>,
    refreshed: Instant,
}

impl Hosts {
    fn new(agents: &[cbus_client::fleet::AgentStatus]) -> Hosts {
        Hosts {
            by_nkey: agents
                .iter()
                .map(|a| (a.info.nkey.clone(), a.info.hostname.clone()))
                .collect(),
            refreshed: Instant::now(),
        }
    }

    /// The registry's hostname of `nkey`; an nkey it does not know re-reads it (rate-limited,
    /// bounded by --timeout), else the nkey's first characters stand for the host.
    async fn name(&mut self, ctx: &Context, nkey: &str) -> String {
        if !self.by_nkey.contains_key(nkey) && self.refreshed.elapsed() >= REFRESH_EVERY {
            self.refreshed = Instant::now();
            if let Ok(fleet) = ctx.fleet().await {
                match tokio::time::timeout(ctx.timeout, fleet.agents(PING_WINDOW)).await {
                    Ok(Ok(agents)) => {
                        *self = Hosts::new(&agents);
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "cannot re-read the registry"),
                    Err(_) => tracing::debug!("re-reading the registry timed out"),
                }
            }
        }
        match self.by_nkey.get(nkey) {
            Some(h) => h.clone(),
            None => nkey.chars().take(8).collect(),
        }
    }
}

/// A signal and, from the stream, when the server stored it.
type Item = Result<(async_nats::Message, Option<u64>), String>;

pub async fn run(
    ctx: &Context,
    watch: Watch,
    since: Option<&str>,
    js_domain: Option<&str>,
) -> Result<(), Failure> {
    watch.check()?;
    let since = since
        .map(|s| crate::fanout::parse_duration(s).map_err(|e| usage(format!("--since: {e}"))))
        .transpose()?;
    // The setup is bounded by --timeout; the watch itself runs until stopped, or until the
    // client gives up reconnecting.
    let (agents, _) = ctx.selected().await?;
    // With a selection, only the selected machines' signals are shown.
    let allowed: Option<Vec<String>> = if ctx.selecting() {
        if agents.is_empty() {
            // Same message as every other command with an empty selection.
            ctx.targets().await?;
        }
        Some(agents.iter().map(|a| a.info.nkey.clone()).collect())
    } else {
        None
    };
    let mut hosts = Hosts::new(&agents);
    let client = ctx.fleet().await?.client().clone();
    let (messages, what): (BoxStream<'static, Item>, String) = match since {
        Some(since) => {
            let filter = watch.stream_filter(allowed.as_deref());
            let js = streams::context(client, js_domain);
            let history = ctx
                .bounded(
                    "opening the signal stream",
                    streams::history(&js, SIGNAL_STREAM, &filter, since),
                )
                .await?
                .map_err(|e| Failure::Connection(e.to_string()))?;
            let stream = futures::stream::unfold(history, |mut h| async move {
                let item = h.next().await?;
                Some((
                    item.map(|s| (s.message, Some(s.published_ms)))
                        .map_err(|e| e.to_string()),
                    h,
                ))
            });
            (
                stream.boxed(),
                format!(
                    "{filter} in stream {SIGNAL_STREAM}, from {} ago",
                    render::duration(since)
                ),
            )
        }
        None => {
            let subjects = watch.subjects(allowed.as_deref())?;
            let mut subs = Vec::new();
            for s in &subjects {
                subs.push(
                    ctx.bounded("subscribing", client.subscribe(s.clone()))
                        .await?
                        .map_err(|e| {
                            Failure::Connection(format!("cannot subscribe to {s}: {e}"))
                        })?,
                );
            }
            ctx.bounded("subscribing", client.flush())
                .await?
                .map_err(|e| Failure::Disconnected(e.to_string()))?;
            (
                futures::stream::select_all(subs)
                    .map(|m| Ok((m, None)))
                    .boxed(),
                subjects.join(" "),
            )
        }
    };
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("watching {what} (Ctrl-C to stop)");
    }
    let health = ctx.health().await?.clone();
    let mut dropped = Dropped::default();
    let result = watch_loop(
        ctx,
        &watch,
        messages,
        allowed.as_deref(),
        &mut hosts,
        &mut dropped,
        &health,
    )
    .await;
    if dropped.impersonating > 0 || dropped.malformed > 0 {
        tracing::warn!(
            impersonating = dropped.impersonating,
            malformed = dropped.malformed,
            "dropped {} signal(s) whose NKey header disagreed with the machine of their subject, \
             and {} with a malformed subject",
            dropped.impersonating,
            dropped.malformed
        );
    }
    result
}

async fn watch_loop(
    ctx: &Context,
    watch: &Watch,
    mut messages: BoxStream<'static, Item>,
    allowed: Option<&[String]>,
    hosts: &mut Hosts,
    dropped: &mut Dropped,
    health: &crate::connect::Health,
) -> Result<(), Failure> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Connection(format!("cannot watch SIGTERM: {e}")))?;
    // A stream consumer waits through reconnects without ending; the client giving up is
    // noticed here.
    let mut check = tokio::time::interval(Duration::from_secs(1));
    let gave_up = || {
        Failure::Disconnected(format!(
            "lost the connection to NATS and gave up after {} reconnect attempts",
            crate::connect::MAX_RECONNECTS
        ))
    };
    loop {
        let (msg, stored_ms) = tokio::select! {
            m = messages.next() => match m {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "reading the signal stream");
                    if health.gave_up() {
                        return Err(gave_up());
                    }
                    continue;
                }
                // The client closes its subscriptions when it stops reconnecting.
                None => return Err(Failure::Disconnected(format!(
                    "lost the connection to NATS and gave up after {} reconnect attempts",
                    crate::connect::MAX_RECONNECTS
                ))),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = check.tick() => {
                if health.gave_up() {
                    return Err(gave_up());
                }
                continue;
            }
        };
        let h = msg.headers.as_ref();
        let Ok(origin) = SignalSubject::parse(&msg.subject) else {
            dropped.malformed += 1;
            tracing::debug!(subject = %render::sanitize(&msg.subject), dropped = dropped.malformed, "signal with a malformed subject dropped");
            continue;
        };
        let nkey = origin.nkey.as_str();
        if let Some(claimed) = headers::get(h, headers::NKEY).filter(|c| *c != nkey) {
            dropped.impersonating += 1;
            tracing::debug!(
                subject = %msg.subject,
                claimed = %render::sanitize(claimed),
                dropped = dropped.impersonating,
                "signal whose NKey header names another machine than its subject dropped"
            );
            continue;
        }
        if allowed.is_some_and(|a| !a.iter().any(|n| n == nkey))
            || !watch.subject_matches(&origin)
            || !watch.matches(h)
        {
            continue;
        }
        let get = |name: &'static str| headers::get(h, name).unwrap_or("").to_owned();
        let args: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let host = hosts.name(ctx, nkey).await;
        let now = stored_ms.unwrap_or_else(cbus_protocol::presence::now_ms);
        let line = if ctx.format == Format::Json {
            json!({
                "time_ms": now,
                "host": host,
                "nkey": nkey,
                "sender": origin.sender,
                "sender_name": get(headers::SENDER_NAME),
                "path": origin.path,
                "interface": get(headers::INTERFACE),
                "member": get(headers::MEMBER),
                "signature": get(headers::SIGNATURE),
                "args": args,
            })
            .to_string()
        } else {
            let sender = match get(headers::SENDER_NAME) {
                n if n.is_empty() => origin.sender.clone(),
                n => n,
            };
            let fields = [
                render::clock_ms(now),
                host,
                sender,
                origin.path.clone(),
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
