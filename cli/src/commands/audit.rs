//! `cbus audit`: the audit trail, read from the audit stream (`cbus streams init`).
//!
//! Each entry was published by the agent that received the set or call, on its own subject
//! `dbus.audit.<nkey>`; the server's permissions let no other machine publish there, so the
//! machine is the subject's nkey, and an entry whose body names another nkey is dropped and
//! counted. The requester is the client's claim (docs/security.md). The read is one ordered
//! consumer from `--since` ago, ending when it delivered what the stream held for it at the
//! start, or at the command's deadline; at most `--limit` entries (the newest) are kept.

use std::collections::{HashSet, VecDeque};

use cbus_client::streams;
use cbus_protocol::audit::AuditEntry;
use cbus_protocol::streams::AUDIT_STREAM;
use cbus_protocol::subject;
use serde_json::{json, Value};

use crate::error::{usage, Failure};
use crate::fanout::{parse_duration, Context};
use crate::render::{self, Format};

/// Why entries were not shown.
#[derive(Debug, Default)]
struct Dropped {
    /// The body named another machine than the subject.
    impersonating: u64,
    /// Not an audit subject, or not an entry.
    malformed: u64,
}

pub async fn run(
    ctx: &Context,
    since: &str,
    limit: usize,
    js_domain: Option<&str>,
) -> Result<(), Failure> {
    let since = parse_duration(since).map_err(|e| usage(format!("--since: {e}")))?;
    if limit == 0 {
        return Err(usage("--limit must be at least 1"));
    }
    // A selection is resolved to nkeys through the registry; entries are matched by the nkey
    // of their subject.
    let allowed: Option<HashSet<String>> = if ctx.selecting() {
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
    let filter = match allowed.as_ref().map(|a| a.iter().collect::<Vec<_>>()) {
        Some(one) if one.len() == 1 => subject::audit(one[0]),
        _ => subject::AUDIT_ALL.to_owned(),
    };
    let client = ctx.fleet().await?.client().clone();
    let js = streams::context(client, js_domain);
    let mut history = ctx
        .bounded(
            "opening the audit stream",
            streams::history(&js, AUDIT_STREAM, &filter, since),
        )
        .await?
        .map_err(|e| Failure::Connection(e.to_string()))?;
    let mut kept: VecDeque<(u64, String, AuditEntry)> = VecDeque::new();
    let mut older = 0u64;
    let mut dropped = Dropped::default();
    let mut read = 0u64;
    while read < history.pending_at_start {
        let stored = match ctx
            .bounded("reading the audit stream", history.next())
            .await?
        {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(Failure::Disconnected(e.to_string())),
            None => return Err(Failure::Disconnected("the NATS connection closed".into())),
        };
        read += 1;
        let Some(nkey) = subject::audit_nkey(&stored.message.subject) else {
            dropped.malformed += 1;
            continue;
        };
        let entry = match AuditEntry::from_payload(&stored.message.payload) {
            Ok(e) => e,
            Err(e) => {
                dropped.malformed += 1;
                tracing::debug!(error = %e, "audit entry that cannot be read dropped");
                continue;
            }
        };
        if entry.nkey != nkey {
            dropped.impersonating += 1;
            continue;
        }
        if allowed.as_ref().is_some_and(|a| !a.contains(nkey)) {
            continue;
        }
        if kept.len() == limit {
            kept.pop_front();
            older += 1;
        }
        kept.push_back((stored.published_ms, nkey.to_owned(), entry));
    }
    if dropped.impersonating > 0 || dropped.malformed > 0 {
        tracing::warn!(
            "dropped {} audit entr(ies) whose body named another machine than their subject, \
             and {} that could not be read",
            dropped.impersonating,
            dropped.malformed
        );
    }
    if older > 0 {
        eprintln!(
            "cbus: {older} older entr(ies) not shown (--limit {limit}; narrow --since or raise it)"
        );
    }
    print(ctx.format, &kept, older, &dropped)
}

fn print(
    format: Format,
    kept: &VecDeque<(u64, String, AuditEntry)>,
    older: u64,
    dropped: &Dropped,
) -> Result<(), Failure> {
    if format == Format::Json {
        let entries: Vec<Value> = kept
            .iter()
            .map(|(stored, nkey, e)| {
                let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
                v["machine"] = json!(nkey);
                v["stored_ms"] = json!(stored);
                v
            })
            .collect();
        let doc = json!({
            "entries": entries,
            "summary": {
                "entries": kept.len(),
                "older_not_shown": older,
                "dropped_impersonating": dropped.impersonating,
                "dropped_malformed": dropped.malformed,
            }
        });
        return crate::output::line(&doc.to_string());
    }
    let rows: Vec<Vec<String>> = kept
        .iter()
        .map(|(_, _, e)| {
            let member = match &e.interface {
                Some(i) => format!("{i}.{}", e.member),
                None => e.member.clone(),
            };
            let args = match (e.args_bytes, &e.args_sha256) {
                (Some(b), Some(d)) => format!("{b}B sha256:{}", d.get(..12).unwrap_or(d)),
                _ => "-".into(),
            };
            vec![
                render::timestamp_ms(e.time_ms),
                e.hostname.clone(),
                e.requester.clone().unwrap_or_else(|| "-".into()),
                e.op.to_string(),
                e.destination.clone(),
                e.path.clone(),
                member,
                e.policy.as_str().to_owned(),
                e.result.clone(),
                args,
            ]
        })
        .collect();
    if rows.is_empty() {
        if format != Format::Simple {
            eprintln!("cbus: no audit entries in that time");
        }
        return Ok(());
    }
    let header = [
        "TIME",
        "HOST",
        "REQUESTER",
        "OP",
        "DESTINATION",
        "PATH",
        "MEMBER",
        "POLICY",
        "RESULT",
        "ARGS",
    ];
    let text = if format == Format::Simple {
        render::simple(&rows)
    } else {
        render::table(&header, &rows)
    };
    crate::output::print(&text)
}
