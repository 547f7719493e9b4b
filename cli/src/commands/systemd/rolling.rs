//! `cbus start|stop|restart|reload UNIT --batch N|P%`: a rolling operation.
//!
//! The plan (which machine next, how many in flight, the `--max-fail` threshold) is
//! `cbus_client::systemd::rollout`'s; this module runs it. Each machine: queue the job, wait for
//! its `JobRemoved` (a poll of the job object every second covers a dropped signal), read the
//! unit's state once, then hold: the machine is done only if no `PropertiesChanged` from systemd
//! says the unit left the wanted state (active; inactive for `stop`) for `--hold`, and one read
//! at the end finds it still there, entered no later than at the start of the hold (so a flap
//! whose signals were dropped is caught too, as is a machine that fell silent). The signals are
//! read by one subscription pair for the whole rollout, subscribed before the first job, and
//! routed to the machine they name (the subject's `<nkey>`; only systemd's own are believed).
//!
//! The `--json` report can be fed back with `--resume FILE`: only the machines it says are not
//! done run again. The file is outside input: bounded in size and count, every entry checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Outcome};
use cbus_client::systemd::rollout::{Amount, Order, Rollout, Step};
use cbus_client::systemd::{
    self, get_property, JobRemoved, JobResult, ManagerSignal, PropertiesChanged, UnitJob, JOB, UNIT,
};
use cbus_protocol::presence::AgentState;
use cbus_protocol::subject::SignalFilter;
use cbus_protocol::ErrorCode;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ok_value, POLL_EVERY, SILENCE_LIMIT};
use crate::args::UnitAction;
use crate::error::{usage, Failure};
use crate::fanout::{parse_duration, verdict_of, Context};
use crate::output;
use crate::render::{self, Format};
use crate::status::Status;

/// The largest `--resume` file read.
pub const MAX_RESUME_BYTES: u64 = 16 * 1024 * 1024;
/// The most machines a `--resume` file may list.
pub const MAX_RESUME_MACHINES: usize = 100_000;
/// Signals queued for one machine in flight; beyond, they are dropped (the read at the end of
/// the hold still catches what they said).
const MACHINE_QUEUE: usize = 64;

/// What a machine's unit must be in once its job is done.
fn wanted(job: UnitJob) -> (&'static str, &'static str) {
    match job {
        UnitJob::Stop => ("inactive", "InactiveEnterTimestamp"),
        _ => ("active", "ActiveEnterTimestamp"),
    }
}

/// Whether `state` is the wanted one (`reloading` is still active).
fn is_wanted(job: UnitJob, state: &str) -> bool {
    state == wanted(job).0 || (job != UnitJob::Stop && state == "reloading")
}

fn job_word(job: UnitJob) -> &'static str {
    match job {
        UnitJob::Start => "start",
        UnitJob::Stop => "stop",
        UnitJob::Restart => "restart",
        UnitJob::Reload => "reload",
    }
}

/// A signal for one machine in flight.
#[derive(Debug)]
enum Event {
    JobRemoved(JobRemoved),
    Changed(PropertiesChanged),
}

/// One machine's line in the report.
#[derive(Debug, Clone)]
struct Report {
    host: String,
    nkey: String,
    step: Step,
    status: Status,
    job: Option<String>,
    job_result: Option<JobResult>,
    active: Option<String>,
    /// The unit's own `Result` (`exit-code`, ...), read when it failed.
    result: Option<String>,
    note: Option<String>,
    started: Option<Duration>,
    took: Option<Duration>,
}

impl Report {
    fn new(host: &str, nkey: &str) -> Report {
        Report {
            host: host.to_owned(),
            nkey: nkey.to_owned(),
            step: Step::NotStarted,
            status: Status::NotStarted,
            job: None,
            job_result: None,
            active: None,
            result: None,
            note: None,
            started: None,
            took: None,
        }
    }

    fn end(mut self, step: Step, status: Status, note: Option<String>) -> Report {
        self.step = step;
        self.status = status;
        self.note = note;
        self
    }

    fn failed(self, note: impl Into<String>) -> Report {
        self.end(Step::Failed, Status::Failed, Some(note.into()))
    }

    fn unreachable(self, outcome: &Outcome, timeout: Duration) -> Report {
        let note = render::problem(outcome, timeout);
        self.end(Step::Unreachable, Status::of(outcome), note)
    }

    fn json(&self) -> Value {
        json!({
            "host": self.host,
            "nkey": self.nkey,
            "state": self.step.as_str(),
            "status": self.status,
            "job": self.job,
            "job_result": self.job_result.as_ref().map(JobResult::as_str),
            "active_state": self.active,
            "result": self.result,
            "error": self.note,
            "started_ms": self.started.map(|d| d.as_millis() as u64),
            "elapsed_ms": self.took.map(|d| d.as_millis() as u64),
        })
    }
}

/// The rollout's settings, checked before connecting.
struct Plan {
    job: UnitJob,
    unit: String,
    batch: Amount,
    hold: Duration,
    max_fail: Amount,
    order: Order,
    job_timeout: Duration,
    /// `--resume`: the machines still to do, by nkey, with their hosts.
    resume: Option<(String, BTreeMap<String, String>)>,
}

fn plan_of(job: UnitJob, a: &UnitAction) -> Result<Plan, Failure> {
    let flag = |name: &'static str| move |e: String| Failure::Usage(format!("--{name}: {e}"));
    let [unit] = a.units.as_slice() else {
        return Err(Failure::Usage(
            "a rolling operation (--batch, --resume) takes one UNIT".into(),
        ));
    };
    let unit = systemd::mangle(unit).map_err(usage)?;
    let r = &a.rolling;
    let batch = match &r.batch {
        Some(b) => Amount::parse_batch(b).map_err(|e| flag("batch")(e.to_string()))?,
        None => Amount::Count(1),
    };
    let max_fail = match &r.max_fail {
        Some(m) => Amount::parse(m).map_err(|e| flag("max-fail")(e.to_string()))?,
        None => Amount::Count(0),
    };
    let order = match &r.order {
        Some(o) => Order::parse(o).map_err(|e| flag("order")(e.to_string()))?,
        None => Order::Host,
    };
    let hold = match &r.hold {
        Some(h) => parse_duration(h).map_err(|e| flag("hold")(e.to_string()))?,
        None => Duration::ZERO,
    };
    let job_timeout = parse_duration(&a.job_timeout).map_err(flag("job-timeout"))?;
    let resume = match &r.resume {
        Some(path) => Some((
            path.display().to_string(),
            read_resume(path, job_word(job), &unit)?,
        )),
        None => None,
    };
    Ok(Plan {
        job,
        unit,
        batch,
        hold,
        max_fail,
        order,
        job_timeout,
        resume,
    })
}

#[derive(Deserialize)]
struct ResumeDoc {
    rollout: ResumeRollout,
    machines: Vec<ResumeMachine>,
}

#[derive(Deserialize)]
struct ResumeRollout {
    action: String,
    unit: String,
}

#[derive(Deserialize)]
struct ResumeMachine {
    host: String,
    nkey: String,
    state: String,
}

/// The machines of a `--json` report at `path` that are not done, by nkey (with their hosts),
/// after checking that it is a report of `action UNIT`.
fn read_resume(path: &Path, action: &str, unit: &str) -> Result<BTreeMap<String, String>, Failure> {
    let bad = |why: String| Failure::Usage(format!("--resume {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut text = Vec::new();
    file.take(MAX_RESUME_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_RESUME_BYTES {
        return Err(bad(format!(
            "larger than {} MiB; not a cbus report",
            MAX_RESUME_BYTES >> 20
        )));
    }
    parse_resume(&text, action, unit).map_err(bad)
}

fn parse_resume(text: &[u8], action: &str, unit: &str) -> Result<BTreeMap<String, String>, String> {
    let doc: ResumeDoc = serde_json::from_slice(text)
        .map_err(|e| format!("not the --json report of a rolling operation ({e})"))?;
    if doc.rollout.action != action || doc.rollout.unit != unit {
        return Err(format!(
            "is the report of `{} {}`, not of `{action} {unit}`",
            render::sanitize(&doc.rollout.action),
            render::sanitize(&doc.rollout.unit)
        ));
    }
    if doc.machines.len() > MAX_RESUME_MACHINES {
        return Err(format!("lists more than {MAX_RESUME_MACHINES} machines"));
    }
    let mut seen = HashSet::new();
    let mut todo = BTreeMap::new();
    for (i, m) in doc.machines.into_iter().enumerate() {
        cbus_protocol::subject::validate_nkey(&m.nkey).map_err(|e| format!("machine {i}: {e}"))?;
        if !seen.insert(m.nkey.clone()) {
            return Err(format!("machine {i}: {} is listed twice", m.nkey));
        }
        let step = Step::parse(&m.state).ok_or_else(|| {
            format!(
                "machine {i}: unknown state {:?}",
                render::sanitize(&m.state.chars().take(40).collect::<String>())
            )
        })?;
        if step != Step::Done {
            let host: String = render::sanitize(&m.host).chars().take(255).collect();
            todo.insert(m.nkey, host);
        }
    }
    Ok(todo)
}

/// `cbus start|stop|restart|reload UNIT --batch ...`.
pub async fn rolling(ctx: &Context, job: UnitJob, action: UnitAction) -> Result<(), Failure> {
    let plan = plan_of(job, &action)?;
    let started = Instant::now();
    let mut targets = ctx.targets().await?;
    // Resumed: the machines still to do; those no longer known are reported unreachable.
    let mut reports_missing = Vec::new();
    if let Some((_, todo)) = &plan.resume {
        targets.retain(|a| todo.contains_key(&a.info.nkey));
        let known: HashSet<&str> = targets.iter().map(|a| a.info.nkey.as_str()).collect();
        for (nkey, host) in todo.iter().filter(|(n, _)| !known.contains(n.as_str())) {
            let mut r = Report::new(host, nkey);
            r.step = Step::Unreachable;
            r.status = Status::Stopped;
            r.note = Some("not in the registry, or not selected, now".into());
            reports_missing.push(r);
        }
    }
    targets.sort_by(|a, b| {
        let key = |x: &AgentStatus| {
            let labels = &x.info.labels;
            let (missing, v, h) = plan
                .order
                .key(&x.info.hostname, |k| labels.get(k).map(String::as_str));
            (missing, v.to_owned(), h.to_owned(), x.info.nkey.clone())
        };
        key(a).cmp(&key(b))
    });
    let mut rollout = Rollout::new(targets.len(), plan.batch, plan.max_fail);
    // Each round of machines may take a job wait, a hold and a few reads.
    let rounds = targets.len().div_ceil(rollout.batch().max(1)) as u32;
    ctx.extend_deadline((plan.job_timeout + plan.hold + ctx.timeout * 3) * rounds);

    let fleet = ctx.fleet().await?;
    let unit_path = systemd::unit_path(&plan.unit);
    // Subscribed before any job is queued, so no signal can slip past.
    let mut subs = Vec::new();
    for subject in [
        systemd::manager_signals(None).map_err(usage)?,
        SignalFilter {
            nkey: None,
            sender: None,
            path_prefix: Some(unit_path.clone()),
        }
        .exact_subject()
        .map_err(usage)?,
    ] {
        match ctx
            .bounded("subscribing to signals", fleet.client().subscribe(subject))
            .await?
        {
            Ok(s) => subs.push(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to systemd's signals; a hold is judged by its last read only")
            }
        }
    }
    ctx.bounded("subscribing", fleet.client().flush())
        .await?
        .map_err(|e| Failure::Disconnected(e.to_string()))?;
    let mut signals = futures::stream::select_all(subs);
    // systemd emits units' PropertiesChanged only while someone is subscribed.
    if !plan.hold.is_zero() {
        let running: Vec<AgentStatus> = targets
            .iter()
            .filter(|a| a.state == AgentState::Running)
            .cloned()
            .collect();
        if !running.is_empty() {
            ctx.ask_quietly(&running, &systemd::subscribe()).await?;
        }
    }

    let mut reports: Vec<Report> = targets
        .iter()
        .map(|a| Report::new(&a.info.hostname, &a.info.nkey))
        .collect();
    let mut queues: HashMap<String, mpsc::Sender<Event>> = HashMap::new();
    let mut running = FuturesUnordered::new();
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut refused = 0u64;
    loop {
        while let Some(i) = rollout.start_next() {
            let (tx, rx) = mpsc::channel(MACHINE_QUEUE);
            queues.insert(targets[i].info.nkey.clone(), tx);
            let report = reports[i].clone();
            let (plan, targets) = (&plan, &targets);
            let since = started.elapsed();
            running.push(async move {
                let mut r = one(ctx, plan, &targets[i], report, rx).await?;
                r.started = Some(since);
                r.took = Some(started.elapsed().saturating_sub(since));
                Ok::<_, Failure>((i, r))
            });
        }
        if rollout.is_over() {
            break;
        }
        tokio::select! {
            done = running.next() => {
                let Some(done) = done else { break };
                let (i, r) = done?;
                queues.remove(&r.nkey);
                rollout.finish(i, r.step);
                if terminal {
                    eprintln!(
                        "[{}/{}] {}: {}{}",
                        rollout.count(Step::Done) + rollout.bad(),
                        targets.len(),
                        render::sanitize(&r.host),
                        r.step,
                        r.note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
                    );
                }
                reports[i] = r;
            }
            Some(msg) = signals.next() => route(&msg, &unit_path, &queues, &mut refused),
        }
    }
    if refused > 0 {
        tracing::warn!(
            refused,
            "ignored {refused} systemd signal(s) that systemd did not send (or that named another \
             machine than their subject)"
        );
    }
    let halted = rollout.halted() && rollout.count(Step::NotStarted) > 0;
    reports.extend(reports_missing);
    render_report(ctx, &plan, &reports, halted, started.elapsed())?;
    let mut verdict = verdict_of(
        reports.iter().map(|r| (r.host.as_str(), r.status)),
        ctx.timeout,
    );
    if halted {
        if let Err(Failure::Partial(m) | Failure::Unreachable(m)) = &verdict {
            verdict = Err(Failure::Partial(format!(
                "stopped at --max-fail {}: {m}",
                plan.max_fail
            )));
        }
    }
    verdict
}

/// Hands a signal to the machine in flight it is about, if systemd sent it there.
fn route(
    msg: &async_nats::Message,
    unit_path: &str,
    queues: &HashMap<String, mpsc::Sender<Event>>,
    refused: &mut u64,
) {
    let h = msg.headers.as_ref();
    let (nkey, event) = if let Some(ManagerSignal::JobRemoved(j)) =
        ManagerSignal::decode(h, &msg.payload)
    {
        match systemd::systemd_signal(&msg.subject, h) {
            Ok(nkey) => (nkey, Event::JobRemoved(j)),
            Err(why) => {
                *refused += 1;
                tracing::debug!(%why, "JobRemoved ignored");
                return;
            }
        }
    } else if let Some((nkey, change)) = PropertiesChanged::from_owner(
        &msg.subject,
        h,
        &msg.payload,
        unit_path,
        systemd::DESTINATION,
    ) {
        (nkey, Event::Changed(change))
    } else {
        if headers_say_properties_changed(h) {
            tracing::debug!(subject = %msg.subject, "PropertiesChanged not from systemd ignored");
        }
        return;
    };
    if let Some(q) = queues.get(nkey) {
        if q.try_send(event).is_err() {
            tracing::debug!(nkey, "signal queue of a machine full; dropped");
        }
    }
}

fn headers_say_properties_changed(h: Option<&async_nats::HeaderMap>) -> bool {
    cbus_client::headers::get(h, cbus_client::headers::MEMBER) == Some(PropertiesChanged::MEMBER)
}

/// The only outcome of a one-machine fan-out.
fn only(asked: crate::fanout::Asked) -> Outcome {
    asked
        .outcomes
        .into_iter()
        .next()
        .map_or(Outcome::NoResponders, |o| o.outcome)
}

/// One machine's turn: queue the job, wait for it, check the state, hold.
async fn one(
    ctx: &Context,
    plan: &Plan,
    agent: &AgentStatus,
    r: Report,
    mut rx: mpsc::Receiver<Event>,
) -> Result<Report, Failure> {
    let me = std::slice::from_ref(agent);
    let t = ctx.timeout;
    if !ctx.options.ask_unresponsive {
        let silent = Duration::from_millis(
            cbus_protocol::presence::now_ms().saturating_sub(agent.last_seen_ms),
        );
        match agent.state {
            AgentState::Unresponsive => {
                return Ok(r.unreachable(&Outcome::Unresponsive { silent }, t))
            }
            AgentState::Stopped | AgentState::Gone => {
                return Ok(r.unreachable(&Outcome::Stopped, t))
            }
            AgentState::Running => {}
        }
    }
    let queued = only(
        ctx.ask_quietly(me, &systemd::unit_job(plan.job, &plan.unit))
            .await?,
    );
    let job = match (
        &queued,
        ok_value(&queued)
            .and_then(|v| v.get(0))
            .and_then(Value::as_str),
    ) {
        (_, Some(job)) => job.to_owned(),
        (Outcome::Replied(_), None) => {
            let why = render::problem(&queued, t).unwrap_or_default();
            return Ok(r.failed(why));
        }
        _ => return Ok(r.unreachable(&queued, t)),
    };
    let mut r = r;
    r.job = Some(job.clone());

    // The job: its JobRemoved, or its object gone at a poll.
    let job_deadline = ctx.deadline().min(Instant::now() + plan.job_timeout);
    let mut poll = tokio::time::interval_at(Instant::now() + POLL_EVERY / 2, POLL_EVERY);
    let mut silent_since: Option<Instant> = None;
    loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(Event::JobRemoved(j)) if j.job == job => {
                    r.job_result = Some(j.result);
                    break;
                }
                Some(_) => {}
                None => {}
            },
            _ = poll.tick() => {
                let o = only(ctx.ask_quietly(me, &get_property(&job, JOB, "State")).await?);
                match &o {
                    Outcome::Replied(rep) => match &rep.result {
                        Ok(_) => silent_since = None,
                        Err(e) if e.code == ErrorCode::NotFound => {
                            // Gone: its JobRemoved (with the result) may still be in flight.
                            let grace = Instant::now() + Duration::from_millis(300);
                            while let Ok(Some(e)) = tokio::time::timeout_at(grace, rx.recv()).await {
                                if let Event::JobRemoved(j) = e {
                                    if j.job == job {
                                        r.job_result = Some(j.result);
                                        break;
                                    }
                                }
                            }
                            break;
                        }
                        Err(e) => return Ok(r.failed(format!("cannot follow the job: {e}"))),
                    },
                    Outcome::TimedOut { .. }
                        if silent_since.get_or_insert_with(Instant::now).elapsed() < SILENCE_LIMIT => {}
                    other => return Ok(r.unreachable(other, t)),
                }
            },
            _ = tokio::time::sleep_until(job_deadline) => {
                let why = format!("job still running after {}", render::duration(plan.job_timeout));
                return Ok(r.failed(why));
            }
        }
    }
    if let Some(res) = r.job_result.as_ref().filter(|res| !res.succeeded()) {
        let why = format!("job {res}");
        let (r, _) = read_state(ctx, plan, agent, r).await?;
        return Ok(with_result(ctx, plan, agent, r).await?.failed(why));
    }

    // The state once, then the hold.
    let (mut r, entered) = read_state(ctx, plan, agent, r).await?;
    let Some(entered) = entered else {
        return Ok(r);
    };
    if !plan.hold.is_zero() {
        let hold_end = Instant::now() + plan.hold;
        loop {
            tokio::select! {
                e = rx.recv() => {
                    let Some(Event::Changed(change)) = e else { continue };
                    if change.interface != UNIT {
                        continue;
                    }
                    let state = match change.value_of("ActiveState") {
                        Some(Ok(v)) => v.as_str().unwrap_or("").to_owned(),
                        // Changed without its value: read it (once per such signal).
                        Some(Err(())) => {
                            let o = only(ctx.ask_quietly(me, &get_property(&systemd::unit_path(&plan.unit), UNIT, "ActiveState")).await?);
                            ok_value(&o).and_then(Value::as_str).unwrap_or("").to_owned()
                        }
                        None => continue,
                    };
                    if !is_wanted(plan.job, &state) {
                        // A signal of the job's own transitions can arrive after the job's
                        // end (two subscriptions, no order between them): it counts only if
                        // the unit is not where it was when the hold began.
                        let (back, now) = read_state(ctx, plan, agent, r).await?;
                        r = back;
                        match now {
                            Some(now) if now == entered => continue,
                            None if r.step == Step::Failed => {
                                let seen = r.active.clone().unwrap_or(state);
                                let why = format!("{seen} during the hold (left {})", wanted(plan.job).0);
                                return Ok(r.failed(why));
                            }
                            None => return Ok(r),
                            Some(_) => {}
                        }
                        r.active = Some(state.clone());
                        let why = format!(
                            "{state} during the hold (left {} after {})",
                            wanted(plan.job).0,
                            render::duration(plan.hold.saturating_sub(hold_end.saturating_duration_since(Instant::now())))
                        );
                        return Ok(with_result(ctx, plan, agent, r).await?.failed(why));
                    }
                },
                _ = tokio::time::sleep_until(hold_end) => break,
            }
        }
    }
    // The end: still there, and not entered again meanwhile (a flap whose signals were lost).
    let (r, again) = read_state(ctx, plan, agent, r).await?;
    match again {
        None => Ok(r),
        Some(again) if again != entered => {
            let why = format!("left {} and came back during the hold", wanted(plan.job).0);
            Ok(with_result(ctx, plan, agent, r).await?.failed(why))
        }
        Some(_) => Ok(r.end(Step::Done, Status::Ok, None)),
    }
}

/// Reads ActiveState and when the wanted state was entered. `Some(entered)` when the unit is in
/// the wanted state; otherwise the report is ended (failed with the unit's Result, or
/// unreachable).
async fn read_state(
    ctx: &Context,
    plan: &Plan,
    agent: &AgentStatus,
    mut r: Report,
) -> Result<(Report, Option<String>), Failure> {
    let me = std::slice::from_ref(agent);
    let path = systemd::unit_path(&plan.unit);
    let (state, entered) = futures::future::try_join(
        ctx.ask_quietly(me, &get_property(&path, UNIT, "ActiveState")),
        ctx.ask_quietly(me, &get_property(&path, UNIT, wanted(plan.job).1)),
    )
    .await?;
    let (state, entered) = (only(state), only(entered));
    let Some(s) = ok_value(&state).and_then(Value::as_str) else {
        return Ok(match &state {
            Outcome::Replied(_) => {
                let why = render::problem(&state, ctx.timeout).unwrap_or_default();
                (r.failed(why), None)
            }
            other => (r.unreachable(other, ctx.timeout), None),
        });
    };
    r.active = Some(s.to_owned());
    if r.job_result.as_ref().is_some_and(|j| !j.succeeded()) {
        return Ok((r, None));
    }
    if !is_wanted(plan.job, s) {
        let why = format!("{s} after the job, not {}", wanted(plan.job).0);
        return Ok((with_result(ctx, plan, agent, r).await?.failed(why), None));
    }
    let entered = ok_value(&entered).map(Value::to_string).unwrap_or_default();
    Ok((r, Some(entered)))
}

/// Adds the unit's own `Result` (`exit-code`, `signal`, ...) to a failed machine's report.
async fn with_result(
    ctx: &Context,
    plan: &Plan,
    agent: &AgentStatus,
    mut r: Report,
) -> Result<Report, Failure> {
    if let Some(iface) = systemd::result_interface(&plan.unit) {
        let o = only(
            ctx.ask_quietly(
                std::slice::from_ref(agent),
                &get_property(&systemd::unit_path(&plan.unit), iface, "Result"),
            )
            .await?,
        );
        r.result = ok_value(&o).and_then(Value::as_str).map(str::to_owned);
    }
    Ok(r)
}

fn render_report(
    ctx: &Context,
    plan: &Plan,
    reports: &[Report],
    halted: bool,
    elapsed: Duration,
) -> Result<(), Failure> {
    let count = |s: Step| reports.iter().filter(|r| r.step == s).count();
    match ctx.format {
        Format::Json => {
            let doc = json!({
                "rollout": {
                    "action": job_word(plan.job),
                    "unit": plan.unit,
                    "batch": plan.batch.to_string(),
                    "hold_ms": plan.hold.as_millis() as u64,
                    "max_fail": plan.max_fail.to_string(),
                    "order": plan.order.to_string(),
                    "halted": halted,
                    "resumed_from": plan.resume.as_ref().map(|(p, _)| p),
                },
                "machines": reports.iter().map(Report::json).collect::<Vec<_>>(),
                "summary": {
                    "machines": reports.len(),
                    "done": count(Step::Done),
                    "failed": count(Step::Failed),
                    "unreachable": count(Step::Unreachable),
                    "not-started": count(Step::NotStarted),
                    "elapsed_ms": elapsed.as_millis() as u64,
                },
            });
            output::line(&doc.to_string())
        }
        format => {
            let rows: Vec<Vec<String>> = reports
                .iter()
                .map(|r| {
                    let dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
                    vec![
                        r.host.clone(),
                        r.step.to_string(),
                        dash(r.job_result.as_ref().map(JobResult::as_str)),
                        dash(r.active.as_deref()),
                        dash(r.result.as_deref()),
                        dash(r.note.as_deref()),
                    ]
                })
                .collect();
            output::print(&render::rows(
                format,
                &["HOST", "STATE", "JOB", "ACTIVE", "RESULT", "NOTE"],
                &rows,
            ))?;
            if format != Format::Simple {
                eprintln!(
                    "{} machine(s): {} done, {} failed, {} unreachable, {} not started{}",
                    reports.len(),
                    count(Step::Done),
                    count(Step::Failed),
                    count(Step::Unreachable),
                    count(Step::NotStarted),
                    if halted {
                        format!(" (stopped at --max-fail {})", plan.max_fail)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NA: &str = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
    const NB: &str = "UCZR2FMXVH2LW2J3GXYZWTM4U6V7RWIZ6XNWHN3PSD3OBPB4GEEEPB4B";

    fn doc(machines: Value) -> Vec<u8> {
        json!({"rollout": {"action": "restart", "unit": "x.service"}, "machines": machines})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn resume_keeps_what_is_not_done_and_refuses_the_hostile() {
        let todo = parse_resume(
            &doc(json!([
                {"host": "a", "nkey": NA, "state": "done"},
                {"host": "b\u{1b}[2J", "nkey": NB, "state": "not-started"},
            ])),
            "restart",
            "x.service",
        )
        .unwrap();
        assert_eq!(todo.len(), 1);
        assert_eq!(todo[NB], "b\\u{1b}[2J");
        let err = |text: &[u8], action: &str| parse_resume(text, action, "x.service").unwrap_err();
        assert!(err(&doc(json!([])), "stop").contains("report of `restart x.service`"));
        assert!(err(b"{", "restart").contains("not the --json report"));
        assert!(err(b"[]", "restart").contains("not the --json report"));
        assert!(err(
            &doc(json!([{"host": "a", "nkey": "Ubad", "state": "done"}])),
            "restart"
        )
        .contains("machine 0"));
        assert!(err(
            &doc(json!([
                {"host": "a", "nkey": NA, "state": "failed"},
                {"host": "a", "nkey": NA, "state": "failed"}
            ])),
            "restart"
        )
        .contains("listed twice"));
        assert!(err(
            &doc(json!([{"host": "a", "nkey": NA, "state": "exploded"}])),
            "restart"
        )
        .contains("unknown state"));
    }

    #[test]
    fn resume_file_is_bounded() {
        let dir = std::env::temp_dir().join(format!("cbus-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_RESUME_BYTES + 10).unwrap();
        let e = read_resume(&big, "restart", "x.service").unwrap_err();
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
        let e = read_resume(&dir.join("none.json"), "restart", "x.service").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wanted_states() {
        assert!(is_wanted(UnitJob::Restart, "active"));
        assert!(is_wanted(UnitJob::Reload, "reloading"));
        assert!(!is_wanted(UnitJob::Start, "activating"));
        assert!(is_wanted(UnitJob::Stop, "inactive"));
        assert!(!is_wanted(UnitJob::Stop, "reloading"));
        assert!(!is_wanted(UnitJob::Stop, "failed"));
    }
}
