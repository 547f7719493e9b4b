//! systemd shortcuts: the same fan-out with systemd's objects and methods filled in.
//!
//! - `units [PATTERN]`: one `ListUnits` (or `ListUnitsByPatterns`) per machine. SINCE (the last
//!   state change) is not in that reply; it costs one more `Get StateChangeTimestamp` per unit,
//!   so it is fetched only when a PATTERN is given and matches at most [`MAX_SINCE_UNITS`]
//!   distinct units, and shown as `-` otherwise.
//! - `status UNIT...`: `GetAll` on the unit's `org.freedesktop.systemd1.Unit` interface plus
//!   `MainPID` from `...Service` for services, both fanned out at once.
//! - `start|stop|restart|reload UNIT...`: `StartUnit` etc. with mode `replace` on every machine,
//!   then (unless `--no-block`) wait until each machine's job is gone, and report the job result
//!   and the final ActiveState/SubState. Jobs are followed two ways at once: systemd's
//!   `JobRemoved` signal forwarded by the agent (subscribed before the jobs are queued, so none
//!   is missed; it carries the result: done, failed, canceled...) and a poll of each job object
//!   every second (a job object disappears when the job ends), which covers a signal the agent
//!   dropped or a NATS user without permission to subscribe to signals. A machine that stops
//!   answering during the wait is reported, not waited for.
//!
//! A `JobRemoved` is a claim that any local user can make (`busctl emit`), so it is taken only
//! when the agent saw its sender own `org.freedesktop.systemd1` (`headers::sender_owns`), and
//! only for the machine named by the `<nkey>` token of its subject (what NATS permissions
//! guarantee; the `NKey` header is the publisher's word). Others are ignored and counted.
//!
//! The whole command, job wait included, ends by its deadline (`--timeout` plus
//! `--job-timeout`): a poll in flight is cut off by it, and a connection lost during the wait
//! that does not come back by then ends the command with `disconnected`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use cbus_client::fleet::{AgentStatus, Outcome, TargetOutcome};
use cbus_client::headers::SignalRefused;
use cbus_client::systemd::{
    self, as_u64, get_property, prop, prop_str, unvariant, JobRemoved, JobResult, ManagerSignal,
    Unit, UnitJob, JOB, SERVICE, UNIT,
};
use cbus_protocol::{names, ErrorCode};
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use crate::args::UnitAction;
use crate::error::{usage, Failure};
use crate::fanout::{parse_duration, verdict, verdict_of, Context, Spinner};
use crate::output;
use crate::render::{self, Format};
/// Above this many distinct units, `units PATTERN` leaves SINCE out.
pub const MAX_SINCE_UNITS: usize = 100;
/// Concurrent fan-outs when one command needs one per unit or per job.
const CONCURRENCY: usize = 16;
/// How often pending jobs are polled.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A machine silent to polls for this long during a job wait is reported, not waited for. It is
/// longer than the client needs to notice a frozen server (three ping intervals), so that a
/// server's silence is reported as `disconnected` rather than blamed on the machines.
const SILENCE_LIMIT: Duration = Duration::from_secs(5);

fn ok_value(o: &Outcome) -> Option<&Value> {
    match o {
        Outcome::Replied(r) => r.result.as_ref().ok().map(|s| &s.value),
        _ => None,
    }
}

fn since_cells(us: Option<u64>) -> (String, String, Value) {
    match us.filter(|u| *u > 0) {
        Some(us) => (
            render::ago(us / 1000),
            render::timestamp_us(us).unwrap_or_else(|| "-".into()),
            json!(render::timestamp_us(us)),
        ),
        None => ("-".into(), "-".into(), Value::Null),
    }
}

/// `cbus units [PATTERN]`.
pub async fn units(ctx: &Context, pattern: Option<String>) -> Result<(), Failure> {
    let pattern = pattern
        .map(|p| systemd::pattern(&p))
        .transpose()
        .map_err(usage)?;
    let targets = ctx.targets().await?;
    let spinner = Spinner::start(targets.len());
    let started = Instant::now();
    let q = match &pattern {
        Some(p) => systemd::list_units_by_patterns(&[], &[p]),
        None => systemd::list_units(),
    };
    let asked = ctx.ask_quietly(&targets, &q).await?;
    let listed: Vec<(&TargetOutcome, Vec<Unit>)> = asked
        .outcomes
        .iter()
        .map(|o| {
            (
                o,
                ok_value(&o.outcome)
                    .map(systemd::units_of_reply)
                    .unwrap_or_default(),
            )
        })
        .collect();

    // SINCE: one Get per distinct unit, to the machines that have it.
    let mut since: HashMap<(String, String), u64> = HashMap::new();
    if pattern.is_some() {
        let mut by_unit: BTreeMap<&str, (&str, Vec<AgentStatus>)> = BTreeMap::new();
        for (o, units) in &listed {
            for u in units {
                by_unit
                    .entry(u.name.as_str())
                    .or_insert_with(|| (u.path.as_str(), Vec::new()))
                    .1
                    .push(o.agent.clone());
            }
        }
        if by_unit.len() <= MAX_SINCE_UNITS {
            let results: Vec<(String, Vec<TargetOutcome>)> = futures::stream::iter(by_unit)
                .filter(|(_, (path, _))| {
                    futures::future::ready(names::validate_object_path(path).is_ok())
                })
                .map(|(name, (path, hosts))| async move {
                    let q = get_property(path, UNIT, "StateChangeTimestamp");
                    ctx.ask_quietly(&hosts, &q)
                        .await
                        .map(|a| (name.to_owned(), a.outcomes))
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
            for (name, outcomes) in results {
                for o in outcomes {
                    if let Some(us) = ok_value(&o.outcome).and_then(as_u64) {
                        since.insert((o.agent.info.nkey.clone(), name.clone()), us);
                    }
                }
            }
        }
    }
    drop(spinner);
    let elapsed = started.elapsed();

    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut results = Vec::new();
    for (o, units) in &listed {
        let host = &o.agent.info.hostname;
        let mut r =
            json!({"host": host, "nkey": o.agent.info.nkey, "status": render::status(&o.outcome)});
        match render::outcome_error(&o.outcome, ctx.timeout) {
            Some(e) => {
                r["ok"] = json!(false);
                r["error"] = json!(e);
                rows.push(vec![
                    host.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    render::problem(&o.outcome, ctx.timeout).unwrap_or_default(),
                ]);
            }
            None => {
                r["ok"] = json!(true);
                r["units"] = json!(units.len());
                for u in units {
                    let us = since
                        .get(&(o.agent.info.nkey.clone(), u.name.clone()))
                        .copied();
                    let (ago, stamp, js) = since_cells(us);
                    docs.push(json!({"host": host, "nkey": o.agent.info.nkey, "unit": u.name, "load": u.load, "active": u.active, "sub": u.sub, "since": js, "description": u.description}));
                    let since_cell = if ctx.format == Format::Simple {
                        stamp
                    } else {
                        ago
                    };
                    rows.push(vec![
                        host.clone(),
                        u.name.clone(),
                        u.load.clone(),
                        u.active.clone(),
                        u.sub.clone(),
                        since_cell,
                        u.description.clone(),
                    ]);
                }
            }
        }
        results.push(r);
    }
    match ctx.format {
        Format::Json => output::line(
            &json!({"units": docs, "results": results, "summary": render::summary(&asked.outcomes, elapsed, ctx.timeout)})
                .to_string(),
        )?,
        format => output::print(&render::rows(
            format,
            &["HOST", "UNIT", "LOAD", "ACTIVE", "SUB", "SINCE", "DESCRIPTION"],
            &rows,
        ))?,
    }
    verdict(&asked.outcomes, ctx.timeout)
}

/// `cbus status UNIT...`.
pub async fn status(ctx: &Context, units: Vec<String>) -> Result<(), Failure> {
    let units: Vec<String> = units
        .iter()
        .map(|u| systemd::mangle(u))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    let targets = ctx.targets().await?;
    let spinner = Spinner::start(targets.len());
    let started = Instant::now();
    let per_unit = futures::future::try_join_all(units.iter().map(|u| {
        let targets = &targets;
        async move {
            let path = systemd::unit_path(u);
            let getall = systemd::unit_properties(&path);
            let pid = get_property(&path, SERVICE, "MainPID");
            let (all, pid) = if u.ends_with(".service") {
                let (a, p) = futures::future::try_join(
                    ctx.ask_quietly(targets, &getall),
                    ctx.ask_quietly(targets, &pid),
                )
                .await?;
                (a, Some(p))
            } else {
                (ctx.ask_quietly(targets, &getall).await?, None)
            };
            Ok::<_, Failure>((u.clone(), all, pid))
        }
    }))
    .await?;
    drop(spinner);
    let elapsed = started.elapsed();

    // Rows by host, then by unit in the order given.
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut all_outcomes = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for (u, all, pid) in &per_unit {
            let Some(o) = all.outcomes.get(ti) else {
                continue;
            };
            let host = &t.info.hostname;
            let mut doc = json!({"host": host, "nkey": t.info.nkey, "unit": u, "status": render::status(&o.outcome)});
            match ok_value(&o.outcome) {
                Some(props) => {
                    let main_pid = pid
                        .as_ref()
                        .and_then(|p| p.outcomes.get(ti))
                        .and_then(|p| ok_value(&p.outcome))
                        .and_then(|v| unvariant(v).as_u64())
                        .filter(|p| *p > 0);
                    let us = prop(props, "StateChangeTimestamp").and_then(as_u64);
                    let (ago, stamp, js) = since_cells(us);
                    doc["ok"] = json!(true);
                    doc["load_state"] = json!(prop_str(props, "LoadState"));
                    doc["active_state"] = json!(prop_str(props, "ActiveState"));
                    doc["sub_state"] = json!(prop_str(props, "SubState"));
                    doc["since"] = js;
                    doc["main_pid"] = json!(main_pid);
                    doc["description"] = json!(prop_str(props, "Description"));
                    rows.push(vec![
                        host.clone(),
                        u.clone(),
                        prop_str(props, "LoadState"),
                        prop_str(props, "ActiveState"),
                        prop_str(props, "SubState"),
                        if ctx.format == Format::Simple {
                            stamp
                        } else {
                            ago
                        },
                        main_pid.map_or_else(|| "-".into(), |p| p.to_string()),
                        prop_str(props, "Description"),
                    ]);
                }
                None => {
                    doc["ok"] = json!(false);
                    doc["error"] = json!(render::outcome_error(&o.outcome, ctx.timeout));
                    let mut row = vec![host.clone(), u.clone()];
                    row.extend(std::iter::repeat_n("-".to_string(), 5));
                    row.push(render::problem(&o.outcome, ctx.timeout).unwrap_or_default());
                    rows.push(row);
                }
            }
            docs.push(doc);
            all_outcomes.push(o.clone());
        }
    }
    match ctx.format {
        Format::Json => output::line(
            &json!({"results": docs, "summary": render::summary(&all_outcomes, elapsed, ctx.timeout)})
                .to_string(),
        )?,
        format => output::print(&render::rows(
            format,
            &["HOST", "UNIT", "LOAD", "ACTIVE", "SUB", "SINCE", "PID", "DESCRIPTION"],
            &rows,
        ))?,
    }
    verdict(&all_outcomes, ctx.timeout)
}

/// One machine and one unit of a start/stop/restart/reload.
#[derive(Debug)]
struct JobRow {
    agent: AgentStatus,
    unit: String,
    /// The reply to StartUnit etc.
    queued: Outcome,
    job: Option<String>,
    /// JobRemoved's result, when the signal was seen.
    result: Option<JobResult>,
    finished: bool,
    /// Why the wait for this job stopped early (machine stopped answering).
    lost: Option<(&'static str, String)>,
    /// Since when polls of this job got no answer.
    silent_since: Option<tokio::time::Instant>,
    active: Option<String>,
    sub: Option<String>,
}

impl JobRow {
    fn pending(&self) -> bool {
        self.job.is_some() && !self.finished && self.lost.is_none()
    }

    /// (status word, RESULT cell, error message).
    fn judge(
        &self,
        no_block: bool,
        job_timeout: Duration,
        timeout: Duration,
    ) -> (&'static str, String, Option<String>) {
        if ok_value(&self.queued).is_none() {
            let p = render::problem(&self.queued, timeout).unwrap_or_default();
            return (render::status(&self.queued), p.clone(), Some(p));
        }
        if no_block {
            return ("ok", "queued".into(), None);
        }
        if let Some((status, why)) = &self.lost {
            return (status, why.clone(), Some(why.clone()));
        }
        if !self.finished {
            let why = format!("job still running after {}", render::duration(job_timeout));
            return ("unfinished", why.clone(), Some(why));
        }
        match &self.result {
            Some(r) if r.succeeded() => ("ok", r.to_string(), None),
            Some(other) => ("failed", other.to_string(), Some(format!("job {other}"))),
            None if self.active.as_deref() == Some("failed") => {
                ("failed", "finished".into(), Some("unit failed".into()))
            }
            None => ("ok", "finished".into(), None),
        }
    }
}

/// `cbus start|stop|restart|reload UNIT...`.
pub async fn action(ctx: &Context, job: UnitJob, action: UnitAction) -> Result<(), Failure> {
    let units: Vec<String> = action
        .units
        .iter()
        .map(|u| systemd::mangle(u))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    let job_timeout = parse_duration(&action.job_timeout)
        .map_err(|e| Failure::Usage(format!("--job-timeout: {e}")))?;
    if !action.no_block {
        ctx.extend_deadline(job_timeout);
    }
    let targets = ctx.targets().await?;
    let fleet = ctx.fleet().await?;
    let spinner = Spinner::start(targets.len());
    let started = Instant::now();

    // Subscribe before queueing, so no JobRemoved can slip past.
    let mut signals = if action.no_block {
        None
    } else {
        let subject = systemd::manager_signals(match targets.as_slice() {
            [one] => Some(one.info.nkey.as_str()),
            _ => None,
        })
        .map_err(usage)?;
        match ctx
            .bounded(
                "subscribing to JobRemoved",
                fleet.client().subscribe(subject),
            )
            .await?
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch JobRemoved; polling jobs only");
                None
            }
        }
    };

    let queued = futures::future::try_join_all(units.iter().map(|u| {
        let targets = &targets;
        async move {
            ctx.ask_quietly(targets, &systemd::unit_job(job, u))
                .await
                .map(|a| (u.clone(), a.outcomes))
        }
    }))
    .await?;
    let mut rows: Vec<JobRow> = Vec::new();
    for (u, outcomes) in queued {
        for o in outcomes {
            let job = ok_value(&o.outcome)
                .and_then(|v| v.get(0))
                .and_then(Value::as_str)
                .map(str::to_owned);
            rows.push(JobRow {
                agent: o.agent,
                unit: u.clone(),
                queued: o.outcome,
                job,
                result: None,
                finished: false,
                lost: None,
                silent_since: None,
                active: None,
                sub: None,
            });
        }
    }

    if !action.no_block {
        tracing::debug!(
            jobs = rows.iter().filter(|r| r.pending()).count(),
            "waiting for jobs"
        );
        wait_for_jobs(ctx, &mut rows, signals.as_mut(), job_timeout).await?;
        final_states(ctx, &mut rows).await?;
    }
    drop(signals);
    drop(spinner);
    let elapsed = started.elapsed();

    rows.sort_by(|a, b| {
        (
            a.agent.info.hostname.as_str(),
            units.iter().position(|u| *u == a.unit),
        )
            .cmp(&(
                b.agent.info.hostname.as_str(),
                units.iter().position(|u| *u == b.unit),
            ))
    });
    let judged: Vec<(&'static str, String, Option<String>)> = rows
        .iter()
        .map(|r| r.judge(action.no_block, job_timeout, ctx.timeout))
        .collect();
    match ctx.format {
        Format::Json => {
            let results: Vec<Value> = rows
                .iter()
                .zip(&judged)
                .map(|(r, (status, _, error))| {
                    let mut d = json!({
                        "host": r.agent.info.hostname,
                        "nkey": r.agent.info.nkey,
                        "unit": r.unit,
                        "status": status,
                        "ok": *status == "ok",
                        "job": r.job,
                        "job_result": r.result.as_ref().map(JobResult::as_str),
                        "active_state": r.active,
                        "sub_state": r.sub,
                    });
                    if let Some(e) = error {
                        d["error"] = match render::outcome_error(&r.queued, ctx.timeout) {
                            Some(body) => json!(body),
                            None => json!({"code": job_error_code(status), "message": e}),
                        };
                    }
                    d
                })
                .collect();
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (s, _, _) in &judged {
                *counts.entry(s).or_default() += 1;
            }
            output::line(
                &json!({"results": results, "summary": {
                    "rows": rows.len(),
                    "counts": counts,
                    "elapsed_ms": elapsed.as_millis() as u64,
                    "timeout_ms": ctx.timeout.as_millis() as u64,
                }})
                .to_string(),
            )?;
        }
        format => {
            let table: Vec<Vec<String>> = rows
                .iter()
                .zip(&judged)
                .map(|(r, (_, result, _))| {
                    vec![
                        r.agent.info.hostname.clone(),
                        r.unit.clone(),
                        r.job
                            .as_deref()
                            .and_then(|j| j.rsplit('/').next())
                            .unwrap_or("-")
                            .to_owned(),
                        result.clone(),
                        r.active.clone().unwrap_or_else(|| "-".into()),
                        r.sub.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            output::print(&render::rows(
                format,
                &["HOST", "UNIT", "JOB", "RESULT", "ACTIVE", "SUB"],
                &table,
            ))?;
        }
    }
    verdict_of(
        rows.iter()
            .zip(&judged)
            .map(|(r, (s, _, _))| (r.agent.info.hostname.as_str(), *s)),
        ctx.timeout,
    )
}

fn job_error_code(status: &str) -> ErrorCode {
    match status {
        "timed-out" | "unfinished" => ErrorCode::Timeout,
        "not-connected" | "stopped" => ErrorCode::Disconnected,
        "unresponsive" => ErrorCode::Timeout,
        _ => ErrorCode::InternalError,
    }
}

/// What became of the `JobRemoved` signals seen during a wait.
#[derive(Debug, Default, PartialEq)]
struct JobSignals {
    /// Results taken.
    accepted: u64,
    /// Not from systemd, or the `NKey` header disagreeing with the subject: forged by someone
    /// (a local user on that machine, or a compromised agent).
    refused: u64,
}

/// Waits until every queued job is gone (signal or poll), a machine stops answering, or
/// `job_timeout` passes; never past the command's deadline.
async fn wait_for_jobs(
    ctx: &Context,
    rows: &mut [JobRow],
    mut signals: Option<&mut async_nats::Subscriber>,
    job_timeout: Duration,
) -> Result<(), Failure> {
    let deadline = ctx
        .deadline()
        .min(tokio::time::Instant::now() + job_timeout);
    let mut poll =
        tokio::time::interval_at(tokio::time::Instant::now() + POLL_EVERY / 2, POLL_EVERY);
    let mut seen = JobSignals::default();
    // The last poll found the connection gone: kept until a poll gets through again, and
    // returned if none does before the deadline (the client keeps reconnecting meanwhile).
    let mut lost: Option<Failure> = None;
    let health = ctx.health().await?;
    while rows.iter().any(JobRow::pending) {
        tokio::select! {
            msg = async {
                match signals.as_deref_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            } => match msg {
                Some(msg) => job_removed(rows, &msg, &mut seen),
                None => signals = None,
            },
            _ = poll.tick() => {
                // The deadline holds while a poll waits, too.
                match tokio::time::timeout_at(deadline, poll_jobs(ctx, rows)).await {
                    Err(_) => break,
                    Ok(Ok(())) => lost = None,
                    Ok(Err(e @ Failure::Disconnected(_))) if !health.gave_up() => {
                        tracing::debug!(error = %e, "poll lost the connection; still waiting");
                        lost = Some(e);
                    }
                    Ok(Err(e)) => return Err(e),
                }
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if let Some(e) = lost {
        if rows.iter().any(JobRow::pending) {
            return Err(e);
        }
    }
    // Jobs seen gone by a poll may still have their JobRemoved (with the result) in flight.
    if let Some(s) = signals {
        let grace = ctx
            .deadline()
            .min(tokio::time::Instant::now() + Duration::from_millis(300));
        while rows.iter().any(|r| r.finished && r.result.is_none()) {
            match tokio::time::timeout_at(grace, s.next()).await {
                Ok(Some(msg)) => job_removed(rows, &msg, &mut seen),
                _ => break,
            }
        }
    }
    if seen.refused > 0 {
        tracing::warn!(
            refused = seen.refused,
            accepted = seen.accepted,
            "ignored {} JobRemoved signal(s) that systemd did not send (or that named another \
             machine than their subject)",
            seen.refused
        );
    }
    Ok(())
}

/// Records a `JobRemoved` signal for the job it names, if systemd sent it on the machine its
/// subject names.
fn job_removed(rows: &mut [JobRow], msg: &async_nats::Message, seen: &mut JobSignals) {
    let h = msg.headers.as_ref();
    let Some(ManagerSignal::JobRemoved(JobRemoved { job, result, .. })) =
        ManagerSignal::decode(h, &msg.payload)
    else {
        return;
    };
    let nkey = match systemd::systemd_signal(&msg.subject, h) {
        Ok(nkey) => nkey,
        Err(why) => {
            seen.refused += 1;
            match why {
                SignalRefused::Subject => tracing::debug!(
                    refused = seen.refused,
                    "JobRemoved with a malformed subject ignored"
                ),
                why => tracing::debug!(
                    subject = %msg.subject,
                    refused = seen.refused,
                    %why,
                    "JobRemoved ignored"
                ),
            }
            return;
        }
    };
    for r in rows.iter_mut() {
        if r.agent.info.nkey == nkey && r.job.as_deref() == Some(job.as_str()) && r.result.is_none()
        {
            r.finished = true;
            r.result = Some(result.clone());
            seen.accepted += 1;
        }
    }
}

/// Asks each machine with a pending job whether the job object still exists.
async fn poll_jobs(ctx: &Context, rows: &mut [JobRow]) -> Result<(), Failure> {
    let polled = tokio::time::Instant::now();
    let pending: Vec<(usize, AgentStatus, String)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.pending())
        .filter_map(|(i, r)| r.job.clone().map(|j| (i, r.agent.clone(), j)))
        .collect();
    let answers: Vec<(usize, Outcome)> = futures::stream::iter(pending)
        .map(|(i, agent, job)| async move {
            let asked = ctx
                .ask_quietly(
                    std::slice::from_ref(&agent),
                    &get_property(&job, JOB, "State"),
                )
                .await?;
            let outcome = asked.outcomes.into_iter().next().map_or(
                Outcome::TimedOut {
                    waited: Duration::ZERO,
                    after_grace: false,
                },
                |o| o.outcome,
            );
            Ok::<_, Failure>((i, outcome))
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    for (i, outcome) in answers {
        let Some(row) = rows.get_mut(i) else { continue };
        if row.finished {
            continue;
        }
        if !matches!(outcome, Outcome::TimedOut { .. }) {
            row.silent_since = None;
        }
        match &outcome {
            Outcome::Replied(r) => match &r.result {
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::NotFound => row.finished = true,
                Err(e) => row.lost = Some(("failed", format!("cannot follow the job: {e}"))),
            },
            // A frozen server looks like silent machines until the client's pings notice it;
            // a machine is given up only after a silence longer than that.
            Outcome::TimedOut { .. }
                if row.silent_since.get_or_insert(polled).elapsed() < SILENCE_LIMIT => {}
            other => {
                row.lost = Some((
                    render::status(other),
                    format!(
                        "lost contact while waiting: {}",
                        render::problem(other, ctx.timeout).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Reads ActiveState and SubState of each unit on the machines that queued a job and still
/// answer.
async fn final_states(ctx: &Context, rows: &mut [JobRow]) -> Result<(), Failure> {
    let mut by_unit: BTreeMap<String, Vec<AgentStatus>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.job.is_some() && r.lost.is_none()) {
        by_unit
            .entry(r.unit.clone())
            .or_default()
            .push(r.agent.clone());
    }
    let states: Vec<(String, Vec<TargetOutcome>, Vec<TargetOutcome>)> =
        futures::future::try_join_all(by_unit.into_iter().map(|(u, agents)| async move {
            let path = systemd::unit_path(&u);
            let (a, s) = futures::future::try_join(
                ctx.ask_quietly(&agents, &get_property(&path, UNIT, "ActiveState")),
                ctx.ask_quietly(&agents, &get_property(&path, UNIT, "SubState")),
            )
            .await?;
            Ok::<_, Failure>((u, a.outcomes, s.outcomes))
        }))
        .await?;
    for (u, active, sub) in states {
        for r in rows.iter_mut().filter(|r| r.unit == u) {
            let find = |list: &[TargetOutcome]| {
                list.iter()
                    .find(|o| o.agent.info.nkey == r.agent.info.nkey)
                    .and_then(|o| ok_value(&o.outcome))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            r.active = find(&active);
            r.sub = find(&sub);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbus_client::headers;
    use cbus_client::systemd::DESTINATION as SYSTEMD;
    use cbus_protocol::presence::{AgentInfo, AgentState};
    use cbus_protocol::{Reply, Success};

    const NA: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
    const NB: &str = "UCZR2FMXVH2LW2J3GXYZWTM4U6V7RWIZ6XNWHN3PSD3OBPB4GEEEPB4B";

    fn agent(host: &str) -> AgentStatus {
        AgentStatus {
            info: AgentInfo {
                nkey: if host == "a" { NA.into() } else { NB.into() },
                hostname: host.into(),
                version: "0".into(),
                bus: "system".into(),
                started_at_ms: 0,
                heartbeat_ms: 5000,
                bus_connected: true,
                labels: Default::default(),
            },
            state: AgentState::Running,
            last_seen_ms: 0,
        }
    }

    fn row(queued: Outcome) -> JobRow {
        JobRow {
            agent: agent("a"),
            unit: "x.service".into(),
            job: ok_value(&queued).map(|_| "/org/freedesktop/systemd1/job/7".into()),
            queued,
            result: None,
            finished: false,
            lost: None,
            silent_since: None,
            active: None,
            sub: None,
        }
    }

    fn replied(value: Value) -> Outcome {
        Outcome::Replied(Reply {
            nkey: "Ua".into(),
            hostname: "a".into(),
            result: Ok(Success {
                signature: Some("o".into()),
                value,
            }),
        })
    }

    #[test]
    fn job_rows_are_judged() {
        let t = Duration::from_secs(5);
        let jt = Duration::from_secs(90);
        let r = row(replied(json!(["/org/freedesktop/systemd1/job/7"])));
        assert!(r.pending());
        assert_eq!(r.judge(true, jt, t).1, "queued");
        assert_eq!(r.judge(false, jt, t).0, "unfinished");
        // The JobRemoved signal for this job on this machine, from systemd, finishes it with
        // its result; forgeries do not.
        let signal = |subject_nkey: &str, header_nkey: &str, sender_names: &str| {
            let mut h = async_nats::HeaderMap::new();
            headers::set(&mut h, headers::NKEY, header_nkey);
            headers::set(&mut h, headers::INTERFACE, systemd::MANAGER);
            headers::set(&mut h, headers::MEMBER, "JobRemoved");
            headers::set(&mut h, headers::SENDER_NAME, sender_names);
            async_nats::Message {
                subject: format!("dbus.signals.{subject_nkey}._3a1_2e1.org.freedesktop.systemd1")
                    .into(),
                reply: None,
                payload: serde_json::to_vec(&json!([
                    7,
                    "/org/freedesktop/systemd1/job/7",
                    "x.service",
                    "failed"
                ]))
                .unwrap()
                .into(),
                headers: Some(h),
                status: None,
                description: None,
                length: 0,
            }
        };
        let mut rows = [r];
        let mut seen = JobSignals::default();
        // Not systemd (a local user's busctl emit): ignored, counted.
        job_removed(&mut rows, &signal(NA, NA, "org.example.Other"), &mut seen);
        job_removed(&mut rows, &signal(NA, NA, ""), &mut seen);
        // Another machine's header on this machine's subject: ignored, counted.
        job_removed(&mut rows, &signal(NA, NB, SYSTEMD), &mut seen);
        // Another machine's job: not this row's.
        job_removed(&mut rows, &signal(NB, NB, SYSTEMD), &mut seen);
        assert!(rows[0].pending());
        assert_eq!(
            seen,
            JobSignals {
                accepted: 0,
                refused: 3
            }
        );
        job_removed(
            &mut rows,
            &signal(NA, NA, "org.freedesktop.systemd1 org.x"),
            &mut seen,
        );
        assert_eq!(seen.accepted, 1);
        let [mut r] = rows;
        assert!(!r.pending());
        assert_eq!(r.judge(false, jt, t).0, "failed");
        r.result = Some(JobResult::Done);
        assert_eq!(r.judge(false, jt, t), ("ok", "done".into(), None));
        // Seen gone by polling: judged by the final state.
        r.result = None;
        r.active = Some("failed".into());
        assert_eq!(r.judge(false, jt, t).0, "failed");
        r.active = Some("active".into());
        assert_eq!(r.judge(false, jt, t).0, "ok");
        let r = row(Outcome::NoResponders);
        assert!(!r.pending());
        assert_eq!(r.judge(false, jt, t).0, "not-connected");
    }
}
