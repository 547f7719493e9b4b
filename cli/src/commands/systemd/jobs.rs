//! `cbus start|stop|restart|reload UNIT...`: queue the jobs, wait for them ([`super::wait`]),
//! judge and render each machine's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cbus_client::fleet::{AgentStatus, Outcome};
use cbus_client::systemd::{self, JobResult, UnitJob};
use serde_json::{json, Value};

use super::ok_value;
use crate::args::UnitAction;
use crate::error::{usage, Failure};
use crate::fanout::{parse_duration, verdict_of, Context};
use crate::output;
use crate::render::{self, Format};
use crate::spinner::Spinner;
use crate::status::Status;

use super::wait::{final_states, wait_for_jobs};

/// One machine and one unit of a start/stop/restart/reload.
#[derive(Debug)]
pub(super) struct JobRow {
    pub(super) agent: AgentStatus,
    pub(super) unit: String,
    /// The reply to StartUnit etc.
    pub(super) queued: Outcome,
    pub(super) job: Option<String>,
    /// JobRemoved's result, when the signal was seen.
    pub(super) result: Option<JobResult>,
    pub(super) finished: bool,
    /// Why the wait for this job stopped early (machine stopped answering).
    pub(super) lost: Option<(Status, String)>,
    /// Since when polls of this job got no answer.
    pub(super) silent_since: Option<tokio::time::Instant>,
    pub(super) active: Option<String>,
    pub(super) sub: Option<String>,
}

impl JobRow {
    /// The row of a job `queued` (the reply to StartUnit etc.) on `agent`.
    pub(super) fn new(agent: AgentStatus, unit: String, queued: Outcome) -> JobRow {
        let job = ok_value(&queued)
            .and_then(|v| v.get(0))
            .and_then(Value::as_str)
            .map(str::to_owned);
        JobRow {
            agent,
            unit,
            queued,
            job,
            result: None,
            finished: false,
            lost: None,
            silent_since: None,
            active: None,
            sub: None,
        }
    }

    pub(super) fn pending(&self) -> bool {
        self.job.is_some() && !self.finished && self.lost.is_none()
    }

    /// (status word, RESULT cell, error message).
    fn judge(
        &self,
        no_block: bool,
        job_timeout: Duration,
        timeout: Duration,
    ) -> (Status, String, Option<String>) {
        if ok_value(&self.queued).is_none() {
            let p = render::problem(&self.queued, timeout).unwrap_or_default();
            return (Status::of(&self.queued), p.clone(), Some(p));
        }
        if no_block {
            return (Status::Ok, "queued".into(), None);
        }
        if let Some((status, why)) = &self.lost {
            return (*status, why.clone(), Some(why.clone()));
        }
        if !self.finished {
            let why = format!("job still running after {}", render::duration(job_timeout));
            return (Status::Unfinished, why.clone(), Some(why));
        }
        match &self.result {
            Some(r) if r.succeeded() => (Status::Ok, r.to_string(), None),
            Some(other) => (
                Status::Failed,
                other.to_string(),
                Some(format!("job {other}")),
            ),
            None if self.active.as_deref() == Some("failed") => (
                Status::Failed,
                "finished".into(),
                Some("unit failed".into()),
            ),
            None => (Status::Ok, "finished".into(), None),
        }
    }
}

/// `cbus start|stop|restart|reload UNIT...`.
pub async fn action(ctx: &Context, job: UnitJob, action: UnitAction) -> Result<(), Failure> {
    if action.rolling.is_rolling() {
        return super::rolling::rolling(ctx, job, action).await;
    }
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
            rows.push(JobRow::new(o.agent, u.clone(), o.outcome));
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
    let judged: Vec<(Status, String, Option<String>)> = rows
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
                        "ok": status.is_ok(),
                        "job": r.job,
                        "job_result": r.result.as_ref().map(JobResult::as_str),
                        "active_state": r.active,
                        "sub_state": r.sub,
                    });
                    if let Some(e) = error {
                        d["error"] = match render::outcome_error(&r.queued, ctx.timeout) {
                            Some(body) => json!(body),
                            None => json!({"code": status.error_code(), "message": e}),
                        };
                    }
                    d
                })
                .collect();
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (s, _, _) in &judged {
                *counts.entry(s.as_str()).or_default() += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::systemd::wait::{job_removed, JobSignals};
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
                rtt_ms: None,
            },
            state: AgentState::Running,
            last_seen_ms: 0,
            maintenance: None,
        }
    }

    fn row(queued: Outcome) -> JobRow {
        JobRow::new(agent("a"), "x.service".into(), queued)
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
        assert_eq!(r.judge(false, jt, t).0, Status::Unfinished);
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
        assert_eq!(r.judge(false, jt, t).0, Status::Failed);
        r.result = Some(JobResult::Done);
        assert_eq!(r.judge(false, jt, t), (Status::Ok, "done".into(), None));
        // Seen gone by polling: judged by the final state.
        r.result = None;
        r.active = Some("failed".into());
        assert_eq!(r.judge(false, jt, t).0, Status::Failed);
        r.active = Some("active".into());
        assert_eq!(r.judge(false, jt, t).0, Status::Ok);
        let r = row(Outcome::NoResponders);
        assert!(!r.pending());
        assert_eq!(r.judge(false, jt, t).0, Status::NotConnected);
    }
}
