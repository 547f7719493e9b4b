//! The client side of the contract: who is out there, and asking all of them at once.
//!
//! The original CBus always waited its full timeout after a broadcast, because it could not know
//! how many answers to expect. Here the caller first learns the fleet from the presence registry
//! (a JetStream KV bucket the agents refresh on every heartbeat; [`Fleet::agents`]), then sends a
//! targeted request to each selected agent on its own reply subject ([`Fleet::fan_out`]). It
//! returns as soon as every target answered. A target whose subscription is gone yields NATS's
//! "no responders" at once instead of a timeout, and one that stays silent is reported by name.
//!
//! The `registry` module reads the fleet (and keeps the registry bucket), `maintenance` the
//! operators' marks of machines expected away (not asked, never a failure), `kv` is the bucket
//! replay both use, and `fan_out` asks the fleet.

mod fan_out;
mod kv;
mod maintenance;
mod probe;
mod registry;

pub use fan_out::OutcomeStream;
pub use maintenance::{attach_maintenance, ensure_maintenance};
pub use probe::{PROBE_MAX, PROBE_QUIET, PROBE_WINDOW_MIN};
pub use registry::{close_registry, ensure_registry, registry_config, Selection};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::envelope::{Reply, Request};
use cbus_protocol::error::SubjectError;
use cbus_protocol::subject::Op;

pub use cbus_protocol::maintenance::Maintenance;
pub use cbus_protocol::presence::{status_from, AgentStatus};

/// Why the fleet could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read the agent registry (JetStream KV bucket {bucket}): {message}")]
    Registry {
        bucket: &'static str,
        message: String,
    },
    /// The server has no agent registry: no JetStream, or no bucket yet. A ping stands in for
    /// it by design, unlike a registry that exists and could not be read ([`FleetError::Registry`]).
    #[error("no agent registry on this NATS server (JetStream KV bucket {bucket}): {message}")]
    NoRegistry {
        bucket: &'static str,
        message: String,
    },
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error("invalid selector: {0}")]
    Selector(String),
}

/// Which agents a request goes to; empty fields select everything.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub nkeys: Vec<String>,
    /// Hostname globs (`web-*`).
    pub hosts: Vec<String>,
    /// Labels that must all match (`role=web`).
    pub labels: Vec<(String, String)>,
}

impl Selector {
    /// Keeps the agents this selector names.
    pub fn select(&self, agents: &[AgentStatus]) -> Result<Vec<AgentStatus>, FleetError> {
        let picks = self.matcher()?;
        Ok(agents.iter().filter(|a| picks(a)).cloned().collect())
    }

    /// [`Selector::select`] of an owned list: the agents kept are moved, not copied (a full
    /// fan-out at 50,000 machines selects all of them).
    pub fn select_owned(
        &self,
        mut agents: Vec<AgentStatus>,
    ) -> Result<Vec<AgentStatus>, FleetError> {
        let picks = self.matcher()?;
        agents.retain(|a| picks(a));
        Ok(agents)
    }

    /// Whether an agent is one this selector names.
    fn matcher(&self) -> Result<impl Fn(&AgentStatus) -> bool + '_, FleetError> {
        let hosts = if self.hosts.is_empty() {
            None
        } else {
            let mut b = globset::GlobSetBuilder::new();
            for h in &self.hosts {
                b.add(
                    globset::Glob::new(h)
                        .map_err(|e| FleetError::Selector(format!("{h:?}: {e}")))?,
                );
            }
            Some(b.build().map_err(|e| FleetError::Selector(e.to_string()))?)
        };
        Ok(move |a: &AgentStatus| {
            (self.nkeys.is_empty() || self.nkeys.contains(&a.info.nkey))
                && hosts.as_ref().is_none_or(|g| g.is_match(&a.info.hostname))
                && self
                    .labels
                    .iter()
                    .all(|(k, v)| a.info.labels.get(k) == Some(v))
        })
    }
}

impl Selector {
    /// The hostnames selected, when every host glob is a plain name (no `*?[]{}\`):
    /// those can be looked up in the registry's host index. `Some(empty)` when no host is named.
    pub fn literal_hosts(&self) -> Option<Vec<&str>> {
        self.hosts
            .iter()
            .map(|h| (!h.contains(['*', '?', '[', ']', '{', '}', '\\'])).then_some(h.as_str()))
            .collect()
    }
}

/// What happened with one target of a fan-out.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The agent answered (successfully or with an error in the envelope).
    Replied(Reply),
    /// Nobody listens on the agent's subject: it is not connected to NATS.
    NoResponders,
    /// No answer before the fan-out ended: at its timeout, or (`after_grace`) at the grace after
    /// the others answered ([`FanOutOptions::grace`]), or (`probed`, with `after_grace`) when it
    /// did not answer a liveness probe either (module `probe`); `waited` is how long it waited.
    TimedOut {
        waited: Duration,
        after_grace: bool,
        probed: bool,
    },
    /// Not asked, because the agent said goodbye.
    Stopped,
    /// Not asked, because the registry says its heartbeats stopped
    /// ([`AgentState::Unresponsive`](cbus_protocol::presence::AgentState::Unresponsive)); `silent` is how long since its last one.
    Unresponsive { silent: Duration },
    /// Not asked, because an operator marked it under maintenance (expected away); neither a
    /// failure nor unreachable.
    Maintenance(Maintenance),
}

/// The shortest grace a fan-out gives the silent after its latest answer. A second: on a loaded
/// two-core host a live agent's answer can lag the others by a few hundred milliseconds, and a
/// live machine cut off is a wrong report.
pub const GRACE_MIN: Duration = Duration::from_secs(1);
/// The grace is this many times the latest answer's delay.
pub const GRACE_FACTOR: u32 = 2;

/// How long a fan-out waits for the rest after an answer `latest` after the requests went out:
/// `max(GRACE_MIN, GRACE_FACTOR x latest)` (answers arrive in order, so the latest is the
/// slowest so far).
pub fn grace_after(latest: Duration) -> Duration {
    (latest * GRACE_FACTOR).max(GRACE_MIN)
}

/// How a fan-out treats machines that are, or turn out to be, silent.
#[derive(Debug, Clone, Copy)]
pub struct FanOutOptions {
    /// Ask agents the registry calls unresponsive too (and wait for them like the others);
    /// by default they are reported at once as [`Outcome::Unresponsive`].
    pub ask_unresponsive: bool,
    /// Ask machines under maintenance too (and wait for them like the others); by default they
    /// are reported at once as [`Outcome::Maintenance`].
    pub ask_maintenance: bool,
    /// End the wait [`grace_after`] the latest answer, when no further answer came by then
    /// (reads only: get, getall, introspect, list-names); off, silent machines are waited for
    /// until the timeout.
    pub grace: bool,
}

impl Default for FanOutOptions {
    fn default() -> Self {
        FanOutOptions {
            ask_unresponsive: false,
            ask_maintenance: false,
            grace: true,
        }
    }
}

/// One target and its outcome, in the order of the target list.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetOutcome {
    pub agent: AgentStatus,
    pub outcome: Outcome,
}

/// What to ask every target.
#[derive(Debug, Clone)]
pub struct Query {
    pub destination: String,
    pub path: String,
    pub op: Op,
    pub member: Option<String>,
    pub request: Request,
}

/// A connection to the fleet.
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    requester: String,
    rejected: Arc<Rejected>,
}

/// Messages dropped because what they said about identity disagreed with where they arrived:
/// the registry key (or reply subject) is what the server's permissions guarantee, the body is
/// a claim (docs/security.md).
#[derive(Debug, Default)]
pub struct Rejected {
    /// Registry entries whose body names another nkey than their key.
    pub registry: AtomicU64,
    /// Replies whose envelope names another nkey than the agent they were asked of.
    pub replies: AtomicU64,
}

impl Rejected {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Fleet {
    /// `requester` is recorded by agents in their audit log (e.g. `alice@laptop`).
    pub fn new(client: Client, requester: impl Into<String>) -> Self {
        Fleet {
            client,
            requester: requester.into(),
            rejected: Arc::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// What this fleet connection dropped as forged so far.
    pub fn rejected(&self) -> &Rejected {
        &self.rejected
    }
}

/// Flushes, giving up at `deadline`: a flush waits for the connection, and while the client
/// reconnects to a server that is gone or frozen that may be forever.
async fn flush_until(client: &Client, deadline: Instant) -> Result<(), FleetError> {
    timeout_at(deadline, client.flush())
        .await
        .map_err(|_| FleetError::Nats("flush did not complete before the deadline".into()))?
        .map_err(|e| FleetError::Nats(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_hostnames_are_looked_up_globs_are_not() {
        let sel = |hosts: &[&str]| Selector {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..Default::default()
        };
        assert_eq!(sel(&[]).literal_hosts(), Some(vec![]));
        assert_eq!(
            sel(&["web-1", "db.example"]).literal_hosts(),
            Some(vec!["web-1", "db.example"])
        );
        for glob in ["web-*", "web-?", "web-[12]", "{a,b}", "a\\b"] {
            assert_eq!(sel(&["web-1", glob]).literal_hosts(), None, "{glob}");
        }
    }

    #[test]
    fn grace_is_twice_the_latest_answer_at_least_a_second() {
        assert_eq!(grace_after(Duration::from_millis(10)), GRACE_MIN);
        assert_eq!(
            grace_after(Duration::from_millis(500)),
            Duration::from_secs(1)
        );
        assert_eq!(
            grace_after(Duration::from_millis(700)),
            Duration::from_millis(1400)
        );
    }
}
