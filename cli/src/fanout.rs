//! One command's view of the fleet: connect lazily, select targets, ask them, judge the result.
//!
//! Arguments are validated before anything is sent, so the connection is opened only when a
//! command first needs the fleet ([`Context::fleet`]); a typo never waits for a server. The
//! fan-out itself is `cbus_client::fleet`'s: this module adds the spinner, the timing the JSON
//! summary reports, and the verdict that becomes the exit code.
//!
//! Every command has one deadline, computed once when it starts: `--timeout` after the start
//! (plus `--job-timeout` for a job wait, [`Context::extend_deadline`]). Connecting, reading the
//! registry, subscribing, publishing, flushing and waiting for replies all count against it
//! ([`Context::bounded`]), so a server that dies or freezes mid-command cannot make `cbus` hang:
//! at the deadline it exits with [`Failure::Disconnected`]. Machines that did not answer while
//! the connection was down are not reported as timed out (the silence was NATS's, not theirs).

use std::borrow::Cow;
use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

pub use cbus_client::duration::parse_duration;
use cbus_client::fleet::{
    AgentStatus, FanOutOptions, Fleet, FleetError, Outcome, Query, Selector, TargetOutcome,
};
use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::args::{ConnArgs, TargetArgs};
use crate::config::FileConfig;
use crate::connect::Health;
use crate::error::{usage, Failure};
use crate::render::{self, Format};
use crate::spinner::Spinner;
use crate::status::Status;

/// How long a ping-based discovery (server without JetStream) collects answers.
const PING_WINDOW: Duration = Duration::from_millis(500);
/// Default `--timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How far past the deadline a fan-out may run before it is abandoned: its reply wait ends at
/// the deadline by itself, and this keeps its answers from being cut off by a hair.
const FAN_OUT_SLACK: Duration = Duration::from_millis(100);

/// The fleet (connected on first use), the selection, the deadline and the output format.
pub struct Context {
    conn: ConnArgs,
    file: FileConfig,
    fleet: OnceCell<(Fleet, Health)>,
    pub selector: Selector,
    pub timeout: Duration,
    pub format: Format,
    /// `--ask-unresponsive`, `--ask-maintenance`, `--no-grace`.
    pub options: FanOutOptions,
    /// When the command started; its deadline is this plus the budget.
    started: Instant,
    budget: Cell<Duration>,
    /// Set when a selection came from a ping because the registry could not be read: the
    /// command's output may lack machines, which [`Context::finish`] turns into exit 3.
    unread: Cell<bool>,
}

/// The outcomes of one fan-out and how long it took.
pub struct Asked {
    pub outcomes: Vec<TargetOutcome>,
    pub elapsed: Duration,
}

impl Context {
    /// Validates the selection and timeout; does not connect yet.
    pub fn new(
        conn: ConnArgs,
        targets: &TargetArgs,
        file: FileConfig,
        format: Format,
    ) -> Result<Self, Failure> {
        let timeout = match targets.timeout.as_deref().or(file.timeout.as_deref()) {
            Some(t) => parse_duration(t).map_err(|e| Failure::Usage(format!("--timeout: {e}")))?,
            None => DEFAULT_TIMEOUT,
        };
        let labels = targets
            .labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
                _ => Err(Failure::Usage(format!(
                    "--labels wants KEY=VALUE, got {l:?}"
                ))),
            })
            .collect::<Result<_, _>>()?;
        for n in &targets.nkeys {
            cbus_protocol::subject::validate_nkey(n).map_err(usage)?;
        }
        let selector = Selector {
            nkeys: targets.nkeys.clone(),
            hosts: targets.hosts.clone(),
            labels,
        };
        // Bad globs are usage errors, found before connecting.
        selector.select(&[]).map_err(usage)?;
        Ok(Context {
            conn,
            file,
            fleet: OnceCell::new(),
            selector,
            timeout,
            format,
            options: FanOutOptions {
                ask_unresponsive: targets.ask_unresponsive,
                ask_maintenance: targets.ask_maintenance,
                grace: !targets.no_grace,
            },
            started: Instant::now(),
            budget: Cell::new(timeout),
            unread: Cell::new(false),
        })
    }

    /// Gives the command `extra` more time (a job wait's `--job-timeout`); call before the
    /// fleet is first used.
    pub fn extend_deadline(&self, extra: Duration) {
        self.budget.set(self.budget.get().saturating_add(extra));
    }

    /// The command's deadline.
    pub fn deadline(&self) -> Instant {
        self.started + self.budget.get()
    }

    /// Time left until the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Runs one NATS step (`what`, for the message), giving up at the deadline with
    /// [`Failure::Disconnected`].
    pub async fn bounded<T>(
        &self,
        what: &str,
        step: impl Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::time::timeout_at(self.deadline(), step)
            .await
            .map_err(|_| self.no_answer(what))
    }

    fn no_answer(&self, what: &str) -> Failure {
        Failure::Disconnected(format!(
            "{what}: NATS did not answer before the command's deadline ({} after it started)",
            render::duration(self.budget.get())
        ))
    }

    /// The connected fleet; connects on first use.
    pub async fn fleet(&self) -> Result<&Fleet, Failure> {
        Ok(&self.link().await?.0)
    }

    /// What the connection's background task knows (connects first if needed).
    pub async fn health(&self) -> Result<&Health, Failure> {
        Ok(&self.link().await?.1)
    }

    async fn link(&self) -> Result<&(Fleet, Health), Failure> {
        self.fleet
            .get_or_try_init(|| async {
                let (client, health) =
                    crate::connect::connect(&self.conn, &self.file, self.deadline()).await?;
                Ok((Fleet::new(client, crate::connect::requester()), health))
            })
            .await
    }

    /// Whether --nkeys, --hosts or --labels narrowed the fleet.
    pub fn selecting(&self) -> bool {
        !(self.selector.nkeys.is_empty()
            && self.selector.hosts.is_empty()
            && self.selector.labels.is_empty())
    }

    /// Every known agent that the selection picks (possibly none), and how many are known.
    pub async fn selected(&self) -> Result<(Vec<AgentStatus>, usize), Failure> {
        self.selected_with(&self.selector).await
    }

    /// Every known agent that `selector` picks (possibly none), and how many are known.
    pub async fn selected_with(
        &self,
        selector: &Selector,
    ) -> Result<(Vec<AgentStatus>, usize), Failure> {
        let (fleet, health) = self.link().await?;
        let mark = health.mark();
        // The registry gets three quarters of what is left after a ping's window, so that when
        // it cannot be read in time (a cluster electing its stream's leader) a ping still
        // finds the machines and leaves time to ask them.
        let registry_wait = self.remaining().saturating_sub(PING_WINDOW).mul_f64(0.75);
        // A selection of a few machines reads only theirs (the registry's host index).
        let read = self
            .bounded(
                "reading the agent registry",
                fleet.select_within(selector, registry_wait, PING_WINDOW),
            )
            .await?;
        // An empty or failed read while the connection was down says nothing about the fleet.
        let found = match read {
            Ok(found) if found.known > 0 || !health.lost_since(mark) => found,
            Ok(_) => {
                return Err(Failure::Disconnected(
                    "lost the connection to NATS while reading the agent registry".into(),
                ))
            }
            Err(e) if health.lost_since(mark) => return Err(Failure::Disconnected(e.to_string())),
            Err(e) => return Err(Failure::Connection(e.to_string())),
        };
        if let Some(e) = found.unread {
            // Said at once, before any output: what follows lists only the machines that
            // answered the ping, and none as stopped or unresponsive.
            eprintln!(
                "warning: {e}; the machines are those that answered a ping within {} (others, \
                 and unresponsive ones, are missing)",
                render::duration(PING_WINDOW)
            );
            self.unread.set(true);
        }
        Ok((found.agents, found.known))
    }

    /// A command's result, made exit 3 ([`Failure::Unreachable`]) when it succeeded on a list
    /// of machines from a ping rather than the registry ([`Context::selected_with`]): some
    /// machines may be missing from it, so "all ok" cannot be said. A failure stays as it is.
    pub fn finish(&self, result: Result<(), Failure>) -> Result<(), Failure> {
        match result {
            Ok(()) if self.unread.get() => Err(Failure::Unreachable(
                "some machines may be missing: the agent registry could not be read, so the \
                 list came from a ping"
                    .into(),
            )),
            result => result,
        }
    }

    /// The agents to ask; none is a failure (exit 1), never an empty success.
    pub async fn targets(&self) -> Result<Vec<AgentStatus>, Failure> {
        let (selected, known) = self.selected().await?;
        if selected.is_empty() {
            return Err(Failure::Partial(if known == 0 {
                "no agents are registered on this NATS server (is cbus-agent running?)".into()
            } else {
                format!("no machines match the selection ({known} agent(s) known; see cbus agents)")
            }));
        }
        Ok(selected)
    }

    /// Sends one query to every target, with a spinner (counting answers as they arrive) when
    /// stderr is a terminal. Targets given by value (`Vec`) become the outcomes' agents as they
    /// are; borrowed ones (`&targets`) are copied into them, a second copy of the selection
    /// while the answers come in: a command that asks the whole fleet once gives them away.
    pub async fn ask(
        &self,
        targets: impl Into<Cow<'_, [AgentStatus]>>,
        query: &Query,
    ) -> Result<Asked, Failure> {
        let targets = targets.into();
        let spinner = Spinner::start(targets.len());
        self.ask_with(targets, query, Some(&spinner)).await
    }

    /// Like [`Context::ask`], without a spinner (for polls inside a longer wait).
    pub async fn ask_quietly(
        &self,
        targets: impl Into<Cow<'_, [AgentStatus]>>,
        query: &Query,
    ) -> Result<Asked, Failure> {
        self.ask_with(targets.into(), query, None).await
    }

    async fn ask_with(
        &self,
        targets: Cow<'_, [AgentStatus]>,
        query: &Query,
        spinner: Option<&Spinner>,
    ) -> Result<Asked, Failure> {
        let started = Instant::now();
        let (fleet, health) = self.link().await?;
        let remaining = self.remaining();
        let mark = health.mark();
        // Each target's outcome by its index; the targets are paired with them at the end.
        let mut found: Vec<Option<Outcome>> = vec![None; targets.len()];
        if remaining.is_zero() {
            // Nothing would wait for the answers (an earlier step used the time up): not sent.
        } else {
            tracing::debug!(
                machines = targets.len(),
                member = query.member.as_deref().unwrap_or(""),
                "asking"
            );
            let asked = async {
                let mut stream = fleet
                    .fan_out_stream(&targets, query, self.timeout.min(remaining), self.options)
                    .await?;
                while let Some(item) = stream.next().await {
                    let (i, outcome) = item?;
                    if let Some(s) = spinner {
                        s.answered();
                    }
                    if let Some(slot) = found.get_mut(i) {
                        *slot = Some(outcome);
                    }
                }
                Ok::<_, FleetError>(())
            };
            tokio::time::timeout_at(self.deadline() + FAN_OUT_SLACK, asked)
                .await
                .map_err(|_| self.no_answer("sending requests"))?
                .map_err(|e| match e {
                    FleetError::Subject(e) => usage(e),
                    other => Failure::Disconnected(other.to_string()),
                })?;
        }
        // The stream yields every target once; the fallback is taken only when nothing was sent.
        let pair = |(agent, outcome): (AgentStatus, Option<Outcome>)| TargetOutcome {
            agent,
            outcome: outcome.unwrap_or(Outcome::TimedOut {
                waited: Duration::ZERO,
                after_grace: false,
                probed: false,
            }),
        };
        let outcomes: Vec<TargetOutcome> = match targets {
            Cow::Owned(targets) => targets.into_iter().zip(found).map(pair).collect(),
            Cow::Borrowed(targets) => targets.iter().cloned().zip(found).map(pair).collect(),
        };
        let silent = outcomes
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::TimedOut { .. }))
            .count();
        if silent > 0 && health.lost_since(mark) {
            return Err(Failure::Disconnected(format!(
                "lost the connection to NATS while waiting for {silent} machine(s); \
                 what they did is unknown"
            )));
        }
        Ok(Asked {
            outcomes,
            elapsed: started.elapsed(),
        })
    }
}

/// Exit status for a list of outcomes: success, or a summary naming every machine that did not
/// succeed, grouped by why (an unresponsive machine with its silence, `web-3 (silent 17s)`;
/// timed out with how long the fan-out waited).
pub fn verdict(outcomes: &[TargetOutcome], timeout: Duration) -> Result<(), Failure> {
    // Timed out at the grace: say how long it waited; at the timeout, the timeout.
    let waited = outcomes
        .iter()
        .filter_map(|o| match o.outcome {
            Outcome::TimedOut {
                waited,
                after_grace: true,
                ..
            } => Some(waited),
            _ => None,
        })
        .max()
        .unwrap_or(timeout);
    let names: Vec<String> = outcomes
        .iter()
        .map(|o| match o.outcome {
            Outcome::Unresponsive { silent } => format!(
                "{} (silent {})",
                o.agent.info.hostname,
                render::silence(silent)
            ),
            _ => o.agent.info.hostname.clone(),
        })
        .collect();
    verdict_of(
        names
            .iter()
            .zip(outcomes)
            .map(|(name, o)| (name.as_str(), Status::of(&o.outcome))),
        waited.min(timeout),
    )
}

/// [`verdict`] over (host, status) pairs, for commands with several rows per machine.
pub fn verdict_of<'a>(
    items: impl Iterator<Item = (&'a str, Status)>,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut total = std::collections::BTreeSet::new();
    let mut groups: Vec<(Status, Vec<&str>)> = Vec::new();
    for (host, status) in items {
        total.insert(host);
        if !status.counts_against() {
            continue;
        }
        match groups.iter_mut().find(|(s, _)| *s == status) {
            Some((_, hosts)) => {
                if !hosts.contains(&host) {
                    hosts.push(host)
                }
            }
            None => groups.push((status, vec![host])),
        }
    }
    if groups.is_empty() {
        return Ok(());
    }
    let bad: std::collections::BTreeSet<&str> =
        groups.iter().flat_map(|(_, h)| h.iter().copied()).collect();
    let parts: Vec<String> = groups
        .iter()
        .map(|(status, hosts)| {
            let why = status.reason(&render::duration(timeout));
            format!("{why}: {}", hosts.join(", "))
        })
        .collect();
    let message = format!(
        "{} of {} machine(s) did not succeed; {}",
        bad.len(),
        total.len(),
        parts.join("; ")
    );
    // Any failure is exit 1; only machines that could not be reached is exit 3.
    if groups.iter().all(|(s, _)| s.is_unreachable()) {
        Err(Failure::Unreachable(message))
    } else {
        Err(Failure::Partial(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maintenance_never_fails_a_command() {
        use Status::*;
        let t = Duration::from_secs(5);
        assert!(verdict_of([("a", Ok), ("b", Maintenance)].into_iter(), t).is_ok());
        let e = verdict_of([("a", Maintenance), ("c", Unresponsive)].into_iter(), t).unwrap_err();
        assert!(matches!(&e, Failure::Unreachable(m) if m.contains("c") && !m.contains("a,")));
        assert!(matches!(
            verdict_of([("b", Maintenance), ("d", Failed)].into_iter(), t),
            Err(Failure::Partial(_))
        ));
    }

    #[test]
    fn verdict_names_machines_by_reason() {
        let t = Duration::from_secs(5);
        use Status::*;
        assert!(verdict_of([("a", Ok), ("b", Ok)].into_iter(), t).is_ok());
        let e = verdict_of(
            [
                ("a", Ok),
                ("b", TimedOut),
                ("c", NotConnected),
                ("d", TimedOut),
            ]
            .into_iter(),
            t,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert_eq!(
            e.to_string(),
            "3 of 4 machine(s) did not succeed; timed out after 5s: b, d; not connected: c"
        );
        // A failure among the unreachable is exit 1.
        let e = verdict_of(
            [("a", Failed), ("b", Unresponsive), ("c", Ok)].into_iter(),
            t,
        )
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        // Several rows of one machine count it once.
        let e = verdict_of([("a", Failed), ("a", Failed), ("b", Ok)].into_iter(), t).unwrap_err();
        assert_eq!(
            e.to_string(),
            "1 of 2 machine(s) did not succeed; failed: a"
        );
    }

    #[test]
    fn selection_is_validated_before_connecting() {
        let conn = crate::args::ConnArgs {
            nats_url: vec!["nats://127.0.0.1:1".into()],
            ..Default::default()
        };
        let targets = |labels: Vec<&str>, hosts: Vec<&str>, nkeys: Vec<&str>| TargetArgs {
            nkeys: nkeys.into_iter().map(Into::into).collect(),
            hosts: hosts.into_iter().map(Into::into).collect(),
            labels: labels.into_iter().map(Into::into).collect(),
            timeout: None,
            ask_unresponsive: false,
            ask_maintenance: false,
            no_grace: false,
        };
        let new = |t: &TargetArgs| {
            Context::new(conn.clone(), t, FileConfig::default(), Format::Table).map(|c| c.timeout)
        };
        assert_eq!(
            new(&targets(vec![], vec![], vec![])).unwrap(),
            DEFAULT_TIMEOUT
        );
        assert!(new(&targets(vec!["role"], vec![], vec![])).is_err());
        assert!(new(&targets(vec![], vec!["web-[a"], vec![])).is_err());
        assert!(new(&targets(vec![], vec![], vec!["not-an-nkey"])).is_err());
        let file = FileConfig {
            timeout: Some("250ms".into()),
            ..Default::default()
        };
        let c = Context::new(conn, &targets(vec![], vec![], vec![]), file, Format::Json).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(250));
    }
}
