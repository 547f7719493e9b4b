//! Requests: a client's request checked and turned into a query, then sent to every target in
//! one fan-out, with one `result` per machine as it arrives and a `done` at the end: one silent
//! machine delays nobody else's result, and is reported by name as timed out when the deadline
//! passes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, FanOutOptions, Fleet, Query};
use cbus_client::systemd::{self, UnitJob};
use cbus_protocol::subject::{RequestSubject, Target};
use cbus_protocol::{ErrorBody, ErrorCode, Op, Request};
use futures::StreamExt;
use serde_json::{json, Value};

use super::context::WsContext;
use super::frames::{RequestMsg, RequestOp, Targets};
use super::outgoing::ServerFrame;
use super::rolling::{self, Driver, Ended, Options, Rolling};
use super::writer::{Frame, Outbox};
use crate::requests::{self, result_of, MachineResult};
use crate::store::Store;

/// Longest timeout a request may ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A request ready to send.
#[derive(Debug)]
pub(super) struct Prepared {
    query: Query,
    timeout: Duration,
    rolling: Option<Rolling>,
    /// The unit of a start, stop or restart, and whether the job is a stop or a restart (what
    /// a rolling hold waits for).
    unit: Option<(String, bool, bool)>,
}

/// Checks a request and runs it in a task of its own, at most `max_inflight` per connection;
/// the error, with the request's id, says why it cannot go.
pub(super) fn start(
    ctx: &WsContext,
    r: RequestMsg,
    inflight: &Arc<AtomicUsize>,
    max_inflight: usize,
    out: Outbox,
) -> Result<(), (Value, String)> {
    let prepared = prepare(&r, ctx.request_timeout).map_err(|m| (r.id.clone(), m))?;
    if inflight.load(Ordering::SeqCst) >= max_inflight {
        let message = format!("at most {max_inflight} requests in flight per connection");
        return Err((r.id, message));
    }
    let (targets, unknown) = match &r.targets {
        Targets::All => ctx.store.targets(None),
        Targets::Some(list) => ctx.store.targets(Some(list)),
    };
    inflight.fetch_add(1, Ordering::SeqCst);
    let inflight = inflight.clone();
    let (fleet, store) = (ctx.fleet.clone(), ctx.store.clone());
    tokio::spawn(async move {
        run(fleet, store, r.id, prepared, targets, unknown, out).await;
        inflight.fetch_sub(1, Ordering::SeqCst);
    });
    Ok(())
}

/// Builds the query of a request, or says what is wrong with it.
pub(super) fn prepare(r: &RequestMsg, default_timeout: Duration) -> Result<Prepared, String> {
    let need = |v: &Option<String>, what: &str| {
        v.clone()
            .ok_or_else(|| format!("{} needs \"{what}\"", op_name(r.op)))
    };
    let timeout = r
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(default_timeout)
        .min(MAX_REQUEST_TIMEOUT);
    // Every field the client gave goes in, so check_for refuses those the op does not take.
    let request = |default_args: Option<Value>| Request {
        interface: r.interface.clone(),
        args: r.args.clone().or(default_args),
        signature: r.signature.clone(),
        value: r.value.clone(),
        timeout_ms: r.timeout_ms,
    };
    let query = match r.op {
        RequestOp::Start | RequestOp::Stop | RequestOp::Restart => {
            let unit = need(&r.unit, "unit")?;
            systemd::validate(&unit).map_err(|e| e.to_string())?;
            let job = match r.op {
                RequestOp::Start => UnitJob::Start,
                RequestOp::Stop => UnitJob::Stop,
                _ => UnitJob::Restart,
            };
            let mut q = systemd::unit_job(job, &unit);
            q.request.timeout_ms = r.timeout_ms;
            q
        }
        RequestOp::Get => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Get,
            member: Some(need(&r.member, "member")?),
            request: request(None),
        },
        RequestOp::Set => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Set,
            member: Some(need(&r.member, "member")?),
            request: {
                if r.value.is_none() {
                    return Err("set needs \"value\"".into());
                }
                request(None)
            },
        },
        RequestOp::Call => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Call,
            member: Some(need(&r.member, "member")?),
            request: request(Some(json!([]))),
        },
        RequestOp::Introspect => Query {
            destination: need(&r.dest, "dest")?,
            path: r.path.clone().unwrap_or_else(|| "/".into()),
            op: Op::Introspect,
            member: None,
            request: Request {
                timeout_ms: r.timeout_ms,
                ..Default::default()
            },
        },
        RequestOp::ListNames => Query {
            destination: "org.freedesktop.DBus".into(),
            path: "/".into(),
            op: Op::ListNames,
            member: None,
            request: Request {
                timeout_ms: r.timeout_ms,
                ..Default::default()
            },
        },
    };
    // Fails early, with the protocol's message, on names a subject cannot carry.
    RequestSubject::new(
        Target::Broadcast,
        query.destination.clone(),
        query.path.clone(),
        query.op,
        query.member.clone(),
    )
    .map_err(|e| e.to_string())?;
    query.request.check_for(query.op)?;
    let rolling = Rolling::parse(Options {
        batch: r.batch.as_deref(),
        max_fail: r.max_fail.as_deref(),
        hold_ms: r.hold_ms,
        order: r.order.as_deref(),
    })?;
    let unit = match r.op {
        RequestOp::Start | RequestOp::Stop | RequestOp::Restart => r.unit.clone().map(|u| {
            let (stop, restart) = (r.op == RequestOp::Stop, r.op == RequestOp::Restart);
            (u, stop, restart)
        }),
        _ if rolling.is_some() => {
            return Err("batch, max_fail, hold_ms and order are for start, stop and restart".into())
        }
        _ => None,
    };
    Ok(Prepared {
        query,
        timeout,
        rolling,
        unit,
    })
}

fn op_name(op: RequestOp) -> &'static str {
    match op {
        RequestOp::Get => "get",
        RequestOp::Set => "set",
        RequestOp::Call => "call",
        RequestOp::Start => "start",
        RequestOp::Stop => "stop",
        RequestOp::Restart => "restart",
        RequestOp::Introspect => "introspect",
        RequestOp::ListNames => "list-names",
    }
}

/// Asks every target and sends each machine's result, then the `done`.
pub(super) async fn run(
    fleet: Fleet,
    store: Store,
    id: Value,
    p: Prepared,
    mut targets: Vec<AgentStatus>,
    unknown: Vec<String>,
    out: Outbox,
) {
    let send = |f: ServerFrame<'_>| {
        let (out, text) = (out.clone(), f.to_text());
        async move {
            let _ = out.send(Frame::control(text)).await;
        }
    };
    let (mut ok, mut failed, mut timed_out) = (0usize, 0usize, 0usize);
    let no_such_machine = ErrorBody::new(ErrorCode::NotFound, "no such machine");
    for nkey in &unknown {
        failed += 1;
        send(ServerFrame::Result {
            id: &id,
            machine: nkey,
            host: None,
            ok: false,
            signature: None,
            value: None,
            timed_out: false,
            error: Some(&no_such_machine),
        })
        .await;
    }
    let timeout = p.timeout;
    let too_late = ErrorBody::new(
        ErrorCode::Timeout,
        format!("no reply within {:.1}s", timeout.as_secs_f64()),
    );
    let mut report = |t: &AgentStatus, r: MachineResult| {
        let (success, error) = match &r {
            MachineResult::Ok(s) => {
                ok += 1;
                (Some(s), None)
            }
            MachineResult::Failed(e) => {
                failed += 1;
                (None, Some(e))
            }
            MachineResult::TimedOut => {
                timed_out += 1;
                (None, Some(&too_late))
            }
        };
        ServerFrame::Result {
            id: &id,
            machine: &t.info.nkey,
            host: Some(&t.info.hostname),
            ok: success.is_some(),
            signature: success.and_then(|s| s.signature.as_deref()),
            value: success.map(|s| &s.value),
            timed_out: matches!(r, MachineResult::TimedOut),
            error,
        }
        .to_text()
    };
    // One fan-out, one subscription, each machine's result as it arrives. Each machine is
    // waited for until the timeout (no grace): a client asked each machine, and a slow one is
    // reported as timed out only when the request's deadline passed.
    let options = FanOutOptions {
        ask_unresponsive: false,
        ask_maintenance: true,
        grace: false,
    };
    if let Some(rolling) = p.rolling {
        rolling.sort(&mut targets);
        let (fleet, store, query, targets) = (&fleet, &store, &p.query, &targets);
        let (unit, hold) = (p.unit.as_ref(), rolling.hold);
        let mut driver = Driver::new(targets.len(), &rolling, |i| async move {
            let nkey = &targets[i].info.nkey;
            let sent = tokio::time::Instant::now();
            let before = unit.and_then(|(u, ..)| rolling::before(store, nkey, u));
            let r = requests::ask(fleet, &targets[i], query, timeout).await;
            match (r, unit, hold) {
                (MachineResult::Ok(_), Some((u, stop, restart)), Some(h)) => {
                    let deadline = sent + timeout;
                    rolling::hold(store, nkey, u, (*stop, *restart), before, h, deadline).await
                }
                (r, ..) => r,
            }
        });
        while let Some((i, r)) = driver.next().await {
            let text = report(&targets[i], r);
            let _ = out.send(Frame::control(text)).await;
        }
        let Ended {
            not_started,
            halted,
        } = driver.ended();
        drop(driver);
        return send(ServerFrame::Done {
            id: &id,
            ok,
            failed,
            timed_out,
            not_started: Some(not_started),
            halted: Some(halted),
        })
        .await;
    }
    let mut reported = vec![false; targets.len()];
    let outcomes = if targets.is_empty() {
        // Only unknown machines: nothing to send, no subscription to make.
        Ok(futures::stream::empty().boxed())
    } else {
        fleet
            .fan_out_stream(&targets, &p.query, timeout, options)
            .await
    };
    let failure = match outcomes {
        Err(e) => Some(e),
        Ok(mut outcomes) => loop {
            match outcomes.next().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok((i, outcome))) => {
                    let Some(target) = targets.get(i) else {
                        continue;
                    };
                    reported[i] = true;
                    let text = report(target, result_of(outcome));
                    let _ = out.send(Frame::control(text)).await;
                }
            }
        },
    };
    if let Some(e) = failure {
        for (t, _) in targets.iter().zip(&reported).filter(|(_, r)| !**r) {
            let text = report(t, requests::failed(&e));
            let _ = out.send(Frame::control(text)).await;
        }
    }
    send(ServerFrame::Done {
        id: &id,
        ok,
        failed,
        timed_out,
        not_started: None,
        halted: None,
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frames::{self, ClientMsg};

    fn req(text: &str) -> RequestMsg {
        match frames::parse(text).unwrap() {
            ClientMsg::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_become_queries() {
        let d = Duration::from_secs(10);
        let p = prepare(
            &req(r#"{"type":"request","id":1,"op":"stop","targets":"all","unit":"a.service"}"#),
            d,
        )
        .unwrap();
        assert_eq!(p.query.member.as_deref(), Some("StopUnit"));
        assert_eq!(p.query.request.args, Some(json!(["a.service", "replace"])));
        let p = prepare(&req(r#"{"type":"request","id":1,"op":"set","targets":"all","dest":"org.x.Y","path":"/o","member":"Count","value":3,"timeout_ms":999999}"#), d).unwrap();
        assert_eq!(p.query.op, Op::Set);
        assert_eq!(p.timeout, MAX_REQUEST_TIMEOUT);
        assert!(prepare(
            &req(r#"{"type":"request","id":1,"op":"stop","targets":"all"}"#),
            d
        )
        .unwrap_err()
        .contains("needs \"unit\""));
        assert!(prepare(&req(r#"{"type":"request","id":1,"op":"get","targets":"all","dest":"bad","path":"/","member":"X"}"#), d).is_err());
        assert!(prepare(&req(r#"{"type":"request","id":1,"op":"get","targets":"all","dest":"a.b","path":"/","member":"X","args":[]}"#), d)
            .unwrap_err()
            .contains("does not take"));
        let p = prepare(
            &req(r#"{"type":"request","id":1,"op":"list-names","targets":"all"}"#),
            d,
        )
        .unwrap();
        assert_eq!(p.query.op, Op::ListNames);
    }

    #[test]
    fn unit_names_follow_systemds_rules() {
        let d = Duration::from_secs(10);
        let stop = |unit: &str| {
            prepare(
                &req(
                    &json!({"type":"request","id":1,"op":"stop","targets":"all","unit":unit})
                        .to_string(),
                ),
                d,
            )
        };
        assert!(stop("getty@tty1.service").is_ok());
        for bad in [
            "",
            "a/b.service",
            "getty@.service",
            "nginx",
            &format!("{}.service", "a".repeat(250)),
        ] {
            assert!(
                stop(bad).unwrap_err().starts_with("invalid unit name"),
                "{bad:?}"
            );
        }
    }
}
