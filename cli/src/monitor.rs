//! `cbus monitor`: live signals from the fleet, one line each (or NDJSON).

use cbus_protocol::headers;
use cbus_protocol::subject::SignalFilter;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::query::Context;
use crate::render::Format;
use crate::Failure;

pub async fn run(
    ctx: &Context,
    sender: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    path: Option<String>,
) -> Result<(), Failure> {
    // With a selection, only the selected machines' signals are shown.
    let selecting = !(ctx.selector.nkeys.is_empty()
        && ctx.selector.hosts.is_empty()
        && ctx.selector.labels.is_empty());
    let allowed: Option<Vec<String>> = if selecting {
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
    let filter = SignalFilter {
        nkey: match allowed.as_deref() {
            Some([one]) => Some(one.clone()),
            _ => None,
        },
        sender,
        path_prefix: path,
    };
    let subjects = filter
        .subjects()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let client = ctx.fleet.client();
    let mut subs = Vec::new();
    for s in subjects {
        subs.push(
            client
                .subscribe(s)
                .await
                .map_err(|e| Failure::Connection(e.to_string()))?,
        );
    }
    let mut messages = futures::stream::select_all(subs);
    loop {
        let msg = tokio::select! {
            m = messages.next() => match m { Some(m) => m, None => return Ok(()) },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let h = msg.headers.as_ref();
        let get = |name: &'static str| headers::get(h, name).unwrap_or("").to_owned();
        let nkey = get(headers::NKEY);
        if let Some(allowed) = &allowed {
            if !allowed.contains(&nkey) {
                continue;
            }
        }
        if interface
            .as_ref()
            .is_some_and(|i| *i != get(headers::INTERFACE))
            || member.as_ref().is_some_and(|m| *m != get(headers::MEMBER))
        {
            continue;
        }
        let args: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let host = match get(headers::HOSTNAME) {
            h if h.is_empty() => nkey.chars().take(8).collect(),
            h => h,
        };
        let sender = match get(headers::SENDER_NAME) {
            n if n.is_empty() => get(headers::SENDER),
            n => n,
        };
        let time = cbus_protocol::presence::now_ms();
        if ctx.format == Format::Json {
            println!(
                "{}",
                json!({"time_ms": time, "host": host, "nkey": nkey, "sender": get(headers::SENDER), "sender_name": get(headers::SENDER_NAME), "path": get(headers::PATH), "interface": get(headers::INTERFACE), "member": get(headers::MEMBER), "signature": get(headers::SIGNATURE), "args": args})
            );
        } else {
            let secs = time / 1000;
            println!(
                "{:02}:{:02}:{:02}.{:03} {host} {sender} {} {}.{} {}",
                (secs / 3600) % 24,
                (secs / 60) % 60,
                secs % 60,
                time % 1000,
                get(headers::PATH),
                get(headers::INTERFACE),
                get(headers::MEMBER),
                args
            );
        }
    }
}
