//! Waiting for queued jobs: `JobRemoved` signals (systemd's only) and a poll of each job object,
//! never past the command's deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Outcome, TargetOutcome};
use cbus_client::headers::SignalRefused;
use cbus_client::systemd::{self, get_property, JobRemoved, ManagerSignal, JOB, UNIT};
use cbus_protocol::ErrorCode;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use super::{ok_value, CONCURRENCY, POLL_EVERY, SILENCE_LIMIT};
use crate::error::Failure;
use crate::fanout::Context;
use crate::render;
use crate::status::Status;

use super::jobs::JobRow;

/// What became of the `JobRemoved` signals seen during a wait.
#[derive(Debug, Default, PartialEq)]
pub(super) struct JobSignals {
    /// Results taken.
    pub(super) accepted: u64,
    /// Not from systemd, or the `NKey` header disagreeing with the subject: forged by someone
    /// (a local user on that machine, or a compromised agent).
    pub(super) refused: u64,
}

/// Waits until every queued job is gone (signal or poll), a machine stops answering, or
/// `job_timeout` passes; never past the command's deadline.
pub(super) async fn wait_for_jobs(
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
pub(super) fn job_removed(rows: &mut [JobRow], msg: &async_nats::Message, seen: &mut JobSignals) {
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
                    probed: false,
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
                Err(e) => row.lost = Some((Status::Failed, format!("cannot follow the job: {e}"))),
            },
            // A frozen server looks like silent machines until the client's pings notice it;
            // a machine is given up only after a silence longer than that.
            Outcome::TimedOut { .. }
                if row.silent_since.get_or_insert(polled).elapsed() < SILENCE_LIMIT => {}
            other => {
                row.lost = Some((
                    Status::of(other),
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
pub(super) async fn final_states(ctx: &Context, rows: &mut [JobRow]) -> Result<(), Failure> {
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
