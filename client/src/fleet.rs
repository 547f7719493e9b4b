//! The client side of the contract: who is out there, and asking all of them at once.
//!
//! The original CBus always waited its full timeout after a broadcast, because it could not know
//! how many answers to expect. Here the caller first learns the fleet from the presence registry
//! (a JetStream KV bucket the agents refresh on every heartbeat; [`Fleet::agents`]), then sends a
//! targeted request to each selected agent on its own reply subject ([`Fleet::fan_out`]). It
//! returns as soon as every target answered. A target whose subscription is gone yields NATS's
//! "no responders" at once instead of a timeout, and one that stays silent is reported by name.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::{
    self, consumer::push::OrderedConfig, consumer::DeliverPolicy, ErrorCode as JsErrorCode,
};
use async_nats::{Client, HeaderMap, StatusCode};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::envelope::{Reply, Request};
use cbus_protocol::error::SubjectError;
use cbus_protocol::presence::{self, AgentInfo, AgentState, PresenceEvent};
use cbus_protocol::subject::{self, Op, RequestSubject, Target};
use cbus_protocol::{codec, ErrorBody, ErrorCode};

use crate::headers;

pub use cbus_protocol::presence::{status_from, AgentStatus};

/// How long a failed bucket create waits for another client's create of the same bucket.
const BUCKET_RACE_WAIT: Duration = Duration::from_secs(2);

/// How long a registry read waits for entries it was promised after the server said none are
/// left (see [`Fleet::registry`]).
const REGISTRY_SETTLE: Duration = Duration::from_millis(200);

/// Why the fleet could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read the agent registry (JetStream KV bucket {bucket}): {message}")]
    Registry {
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
        Ok(agents
            .iter()
            .filter(|a| self.nkeys.is_empty() || self.nkeys.contains(&a.info.nkey))
            .filter(|a| hosts.as_ref().is_none_or(|g| g.is_match(&a.info.hostname)))
            .filter(|a| {
                self.labels
                    .iter()
                    .all(|(k, v)| a.info.labels.get(k) == Some(v))
            })
            .cloned()
            .collect())
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
    /// the others answered ([`FanOutOptions::grace`]); `waited` is how long it waited.
    TimedOut { waited: Duration, after_grace: bool },
    /// Not asked, because the agent said goodbye.
    Stopped,
    /// Not asked, because the registry says its heartbeats stopped
    /// ([`AgentState::Unresponsive`]); `silent` is how long since its last one.
    Unresponsive { silent: Duration },
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
    /// End the wait [`grace_after`] the latest answer, when no further answer came by then
    /// (reads only: get, getall, introspect, list-names); off, silent machines are waited for
    /// until the timeout.
    pub grace: bool,
}

impl Default for FanOutOptions {
    fn default() -> Self {
        FanOutOptions {
            ask_unresponsive: false,
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

    /// Every agent in the registry with its state, sorted by hostname. Falls back to a ping
    /// (collecting answers for `ping_window`) when the server has no JetStream or no registry.
    pub async fn agents(&self, ping_window: Duration) -> Result<Vec<AgentStatus>, FleetError> {
        let mut agents = match self.registry().await {
            Ok(agents) => agents,
            Err(e) => {
                tracing::debug!(error = %e, "registry unavailable; falling back to ping");
                self.ping(ping_window).await?
            }
        };
        agents.sort_by(|a, b| {
            (a.info.hostname.as_str(), a.info.nkey.as_str())
                .cmp(&(b.info.hostname.as_str(), b.info.nkey.as_str()))
        });
        Ok(agents)
    }

    /// Reads the last presence event of every agent from the KV bucket.
    pub async fn registry(&self) -> Result<Vec<AgentStatus>, FleetError> {
        let registry_err = |message: String| FleetError::Registry {
            bucket: presence::REGISTRY_BUCKET,
            message,
        };
        let js = jetstream::new(self.client.clone());
        let deadline = Instant::now() + Duration::from_secs(5);
        let stream = timeout_at(
            deadline,
            js.get_stream_no_info(format!("KV_{}", presence::REGISTRY_BUCKET)),
        )
        .await
        .map_err(|_| registry_err("timed out".into()))?
        .map_err(|e| registry_err(e.to_string()))?;
        let consumer = timeout_at(
            deadline,
            stream.create_consumer(OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("$KV.{}.>", presence::REGISTRY_BUCKET),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            }),
        )
        .await
        .map_err(|_| registry_err("timed out".into()))?
        .map_err(|e| registry_err(e.to_string()))?;
        // The pending count a message carries is not enough to know the replay is complete:
        // nats-server 2.9 sometimes delivers the first entry twice and counts both, so pending
        // reaches 0 one entry early (a machine silently missing from a fan-out). The replay is
        // complete when as many distinct entries (stream sequences) arrived as the consumer had
        // when it was created; if entries expired meanwhile, fewer ever come, so after pending
        // was 0 a short quiet spell ends the read too.
        let expected = consumer.cached_info().num_pending;
        if expected == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| registry_err(e.to_string()))?;
        let now = presence::now_ms();
        let mut by_nkey = BTreeMap::new();
        let mut sequences = HashSet::new();
        let mut drained = false;
        loop {
            let wait = if drained {
                deadline.min(Instant::now() + REGISTRY_SETTLE)
            } else {
                deadline
            };
            let message = match timeout_at(wait, messages.next()).await {
                Err(_) if drained => {
                    tracing::debug!(
                        expected,
                        got = sequences.len(),
                        "registry replay ended short; entries expired while reading"
                    );
                    break;
                }
                Err(_) => return Err(registry_err("timed out while reading".into())),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(registry_err(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            let info = message.info().map_err(|e| registry_err(e.to_string()))?;
            let pending = info.pending;
            sequences.insert(info.stream_sequence);
            let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some();
            // The key is the nkey whose permissions allowed the write; the body only claims one.
            let key = presence::registry_key_of(&message.subject).unwrap_or_default();
            if !deleted {
                match serde_json::from_slice::<PresenceEvent>(&message.payload) {
                    Ok(event) if event.agent.nkey != key => {
                        Rejected::count(&self.rejected.registry);
                        tracing::warn!(
                            key,
                            claims = %codec::quote(&event.agent.nkey),
                            "ignoring a registry entry that names another machine"
                        );
                    }
                    Ok(event) => {
                        let status = status_from(event, published_ms, now);
                        by_nkey.insert(status.info.nkey.clone(), status);
                    }
                    Err(e) => {
                        tracing::warn!(subject = %message.subject, error = %e, "ignoring malformed registry entry")
                    }
                }
            }
            // As many distinct entries as were promised: the replay is complete, whatever the
            // pending count says (agents heartbeating while it runs keep it above 0 for a while,
            // and a read that waited for 0 could outlast the caller's deadline).
            if sequences.len() as u64 >= expected {
                break;
            }
            if pending == 0 {
                drained = true;
            }
        }
        Ok(by_nkey.into_values().collect())
    }

    /// Asks every connected agent for its info; waits `window` for answers.
    pub async fn ping(&self, window: Duration) -> Result<Vec<AgentStatus>, FleetError> {
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| FleetError::Nats(e.to_string()))?;
        // The window bounds the publish and flush too: while the client reconnects, both wait
        // for a connection that may never come back.
        let deadline = Instant::now() + window;
        timeout_at(
            deadline,
            self.client
                .publish_with_reply(subject::PING, inbox, Bytes::new()),
        )
        .await
        .map_err(|_| FleetError::Nats("ping: no connection to publish on".into()))?
        .map_err(|e| FleetError::Nats(e.to_string()))?;
        flush_until(&self.client, deadline).await?;
        let mut found = BTreeMap::new();
        while let Ok(Some(msg)) = timeout_at(deadline, sub.next()).await {
            if msg.status == Some(StatusCode::NO_RESPONDERS) {
                break;
            }
            if let Ok(info) = serde_json::from_slice::<AgentInfo>(&msg.payload) {
                found.insert(
                    info.nkey.clone(),
                    AgentStatus {
                        info,
                        state: AgentState::Running,
                        last_seen_ms: presence::now_ms(),
                    },
                );
            }
        }
        Ok(found.into_values().collect())
    }

    /// [`Fleet::fan_out_with`] with the default options: unresponsive agents are not asked, and
    /// the wait ends a grace after the latest answer.
    pub async fn fan_out(
        &self,
        targets: &[AgentStatus],
        query: &Query,
        timeout: Duration,
    ) -> Result<Vec<TargetOutcome>, FleetError> {
        self.fan_out_with(targets, query, timeout, FanOutOptions::default())
            .await
    }

    /// Sends `query` to each of `targets` and waits until every one answered, `timeout` passed,
    /// or (with `options.grace`) no further answer came within [`grace_after`] the latest one.
    /// Stopped agents are not asked, nor (unless `options.ask_unresponsive`) unresponsive ones.
    /// Outcomes come back in the order of `targets`.
    pub async fn fan_out_with(
        &self,
        targets: &[AgentStatus],
        query: &Query,
        timeout: Duration,
        options: FanOutOptions,
    ) -> Result<Vec<TargetOutcome>, FleetError> {
        let mut stream = self
            .fan_out_stream(targets, query, timeout, options)
            .await?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; targets.len()];
        while let Some(item) = stream.next().await {
            let (i, o) = item?;
            outcomes[i] = Some(o.outcome);
        }
        Ok(targets
            .iter()
            .zip(outcomes)
            .map(|(agent, outcome)| TargetOutcome {
                agent: agent.clone(),
                // The stream yields every target once; this is never taken.
                outcome: outcome.unwrap_or(Outcome::TimedOut {
                    waited: timeout,
                    after_grace: false,
                }),
            })
            .collect())
    }

    /// [`Fleet::fan_out_with`] as a stream: each target's outcome as soon as it is known, with
    /// its index in `targets`. Those not asked (stopped, unresponsive) come first, answers in
    /// the order they arrive, and the silent last, at the end of the wait (the timeout or the
    /// grace). Every target comes exactly once; an error ends the stream.
    ///
    /// One subscription serves the whole fan-out, so a caller that shows each machine's result
    /// when it arrives (the gateway's requests) needs no subscription per machine. The requests
    /// are sent before this returns; the stream owns what it needs and may outlive `self`.
    pub async fn fan_out_stream(
        &self,
        targets: &[AgentStatus],
        query: &Query,
        timeout: Duration,
        options: FanOutOptions,
    ) -> Result<OutcomeStream, FleetError> {
        let payload = Bytes::from(
            serde_json::to_vec(&query.request).map_err(|e| FleetError::Nats(e.to_string()))?,
        );
        let mut header_map = HeaderMap::new();
        headers::set(&mut header_map, headers::REQUESTER, &self.requester);
        // `timeout` bounds the whole call: publishing and flushing wait for a connection while
        // the client reconnects, so they count against it too.
        let started = Instant::now();
        let until = started + timeout;
        let now_ms = presence::now_ms();

        // One reply subject per target, so "no responders" can be told apart per agent.
        let inbox = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| FleetError::Nats(e.to_string()))?;
        let mut known = VecDeque::new();
        let mut answered = vec![false; targets.len()];
        let mut waiting = 0usize;
        for (i, agent) in targets.iter().enumerate() {
            if agent.state == AgentState::Stopped {
                known.push_back((i, Outcome::Stopped));
                answered[i] = true;
                continue;
            }
            if agent.state == AgentState::Unresponsive && !options.ask_unresponsive {
                known.push_back((
                    i,
                    Outcome::Unresponsive {
                        silent: Duration::from_millis(now_ms.saturating_sub(agent.last_seen_ms)),
                    },
                ));
                answered[i] = true;
                continue;
            }
            let subject = RequestSubject::new(
                Target::Agent(agent.info.nkey.clone()),
                query.destination.clone(),
                query.path.clone(),
                query.op,
                query.member.clone(),
            )?
            .encode()?;
            timeout_at(
                until,
                self.client.publish_with_reply_and_headers(
                    subject,
                    format!("{inbox}.{i}"),
                    header_map.clone(),
                    payload.clone(),
                ),
            )
            .await
            .map_err(|_| {
                FleetError::Nats("no connection to publish on before the deadline".into())
            })?
            .map_err(|e| FleetError::Nats(e.to_string()))?;
            waiting += 1;
        }
        flush_until(&self.client, until).await?;
        let wait = Wait {
            sub,
            targets: targets.to_vec(),
            answered,
            known,
            waiting,
            started,
            until,
            deadline: until,
            timeout,
            // Reads only: a set or call cut off may still run, so its machine is waited for.
            grace: options.grace && query.op.is_read(),
            rejected: self.rejected.clone(),
            ended: false,
        };
        Ok(futures::stream::unfold(wait, Wait::next_outcome).boxed())
    }
}

/// A fan-out's outcomes as they become known, each with its target's index
/// ([`Fleet::fan_out_stream`]).
pub type OutcomeStream = BoxStream<'static, Result<(usize, TargetOutcome), FleetError>>;

/// The state of a fan-out waiting for its answers.
struct Wait {
    sub: async_nats::Subscriber,
    targets: Vec<AgentStatus>,
    /// Whose outcome is known (yielded or queued in `known`).
    answered: Vec<bool>,
    /// Outcomes known and not yet yielded.
    known: VecDeque<(usize, Outcome)>,
    /// Asked and not answered yet.
    waiting: usize,
    started: Instant,
    /// When the timeout ends the wait.
    until: Instant,
    /// When the wait ends: `until`, or earlier once a grace applies.
    deadline: Instant,
    timeout: Duration,
    grace: bool,
    rejected: Arc<Rejected>,
    /// Nothing more will be known.
    ended: bool,
}

impl Wait {
    async fn next_outcome(mut self) -> Option<(Result<(usize, TargetOutcome), FleetError>, Wait)> {
        loop {
            if let Some((i, outcome)) = self.known.pop_front() {
                let agent = self.targets[i].clone();
                return Some((Ok((i, TargetOutcome { agent, outcome })), self));
            }
            if self.ended {
                return None;
            }
            if self.waiting == 0 {
                self.ended = true;
                continue;
            }
            // Until the first answer only the timeout ends the wait (all silent says nothing
            // about how long answers take); after each answer, the silent get a grace.
            let msg = match timeout_at(self.deadline, self.sub.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    self.ended = true;
                    return Some((
                        Err(FleetError::Nats("reply subscription closed".into())),
                        self,
                    ));
                }
                Err(_) => {
                    let waited = self.started.elapsed().min(self.timeout);
                    let after_grace = self.deadline < self.until;
                    for (i, answered) in self.answered.iter_mut().enumerate() {
                        if !*answered {
                            *answered = true;
                            self.known.push_back((
                                i,
                                Outcome::TimedOut {
                                    waited,
                                    after_grace,
                                },
                            ));
                        }
                    }
                    self.waiting = 0;
                    self.ended = true;
                    continue;
                }
            };
            let Some(i) = msg
                .subject
                .rsplit('.')
                .next()
                .and_then(|t| t.parse::<usize>().ok())
                .filter(|i| *i < self.targets.len())
            else {
                continue;
            };
            if self.answered[i] {
                continue;
            }
            let outcome = self.outcome_of(i, &msg);
            self.answered[i] = true;
            self.waiting -= 1;
            if self.grace {
                let now = Instant::now();
                self.deadline = self.until.min(now + grace_after(now - self.started));
            }
            let agent = self.targets[i].clone();
            return Some((Ok((i, TargetOutcome { agent, outcome })), self));
        }
    }

    /// What target `i`'s reply (or NATS's "no responders" in its place) says.
    fn outcome_of(&self, i: usize, msg: &async_nats::Message) -> Outcome {
        let target = &self.targets[i].info;
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            return Outcome::NoResponders;
        }
        let failed = |message: String| {
            Outcome::Replied(Reply {
                nkey: target.nkey.clone(),
                hostname: target.hostname.clone(),
                result: Err(ErrorBody::new(ErrorCode::InternalError, message)),
            })
        };
        match Reply::from_payload(&msg.payload) {
            // Only the agent asked could answer on this reply subject (allow_responses); an
            // envelope naming another machine is a forgery, never that machine's word.
            Ok(reply) if reply.nkey != target.nkey => {
                Rejected::count(&self.rejected.replies);
                tracing::warn!(agent = %target.hostname, claims = %codec::quote(&reply.nkey), "reply names another machine");
                failed("the agent's reply names another machine; ignored".into())
            }
            Ok(reply) => Outcome::Replied(reply),
            Err(e) => {
                tracing::warn!(agent = %target.hostname, error = %e, "malformed reply");
                failed(format!("malformed reply from agent: {e}"))
            }
        }
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

/// The registry bucket's stream configuration, as [`presence::registry_spec`] specifies it, with
/// `replicas` copies: 1 on a single server, 3 on a cluster (a registry that survives a node).
pub fn registry_config(replicas: usize) -> jetstream::stream::Config {
    let spec = presence::registry_spec();
    jetstream::stream::Config {
        num_replicas: replicas.max(1),
        name: spec.stream,
        subjects: spec.subjects,
        max_messages_per_subject: spec.max_messages_per_subject,
        max_age: spec.max_age,
        max_message_size: spec.max_message_size,
        discard: if spec.discard_new {
            jetstream::stream::DiscardPolicy::New
        } else {
            jetstream::stream::DiscardPolicy::Old
        },
        allow_rollup: spec.allow_rollup,
        deny_delete: spec.deny_delete,
        deny_purge: spec.deny_purge,
        allow_direct: spec.allow_direct,
        ..Default::default()
    }
}

/// Whether an existing bucket's configuration has what [`registry_config`] guarantees, with at
/// least `replicas` copies.
fn registry_is_closed(config: &jetstream::stream::Config, replicas: usize) -> bool {
    config.num_replicas >= replicas
        && presence::registry_is_closed(
            config.allow_rollup,
            config.deny_delete,
            config.deny_purge,
            config.max_message_size,
        )
}

/// Creates the registry bucket, or closes an existing one that an older cbus (or anyone with
/// the rights) left open to rollups and purges. For the gateway and operators: agents have no
/// permission to change the bucket (`cbus_protocol::permissions`). A bucket with fewer than `replicas`
/// copies is given more (a fleet that grew from one server to a cluster); one with more keeps
/// them. Returns whether the bucket changed.
pub async fn close_registry(js: &jetstream::Context, replicas: usize) -> Result<bool, FleetError> {
    let registry_err = |message: String| FleetError::Registry {
        bucket: presence::REGISTRY_BUCKET,
        message,
    };
    let mut config = registry_config(replicas);
    match js.get_stream(&config.name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| registry_err(e.to_string()))?;
            if registry_is_closed(&info.config, replicas) {
                return Ok(false);
            }
            config.num_replicas = config.num_replicas.max(info.config.num_replicas);
            js.update_stream(config)
                .await
                .map_err(|e| registry_err(format!("cannot close the bucket: {e}")))?;
            tracing::info!(
                replicas,
                "registry bucket closed to rollups and purges (it was created by an older cbus \
                 or with fewer replicas)"
            );
            Ok(true)
        }
        Err(_) => ensure_registry(js, replicas).await.map(|_| true),
    }
}

/// Opens the registry bucket, creating it when missing (where the server's permissions let this
/// client create it: agents may not, see [`cbus_protocol::permissions`]) with `replicas` copies.
///
/// async-nats 0.51's `create_key_value` first asks for account info, whose reply from
/// nats-server 2.9 it cannot parse; so the bucket's stream is created directly
/// ([`registry_config`]).
pub async fn ensure_registry(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, FleetError> {
    let registry_err = |message: String| FleetError::Registry {
        bucket: presence::REGISTRY_BUCKET,
        message,
    };
    if let Ok(store) = js.get_key_value(presence::REGISTRY_BUCKET).await {
        return Ok(store);
    }
    let bucket = presence::REGISTRY_BUCKET;
    let created = js.get_or_create_stream(registry_config(replicas)).await;
    let Err(create_error) = created else {
        return js
            .get_key_value(bucket)
            .await
            .map_err(|e| registry_err(e.to_string()));
    };
    // Agents that start together all find no bucket and all create it. nats-server 2.9 checks a
    // new stream's name and its subjects under two separate locks, so a create that races
    // another's identical one can fail with "subjects overlap with an existing stream". The
    // bucket is there all the same, so such an error only counts when the bucket does not show.
    let lost_race = matches!(
        create_error.kind(),
        CreateStreamErrorKind::JetStream(e)
            if matches!(e.error_code(), JsErrorCode::STREAM_SUBJECT_OVERLAP | JsErrorCode::STREAM_NAME_EXIST)
    );
    if !lost_race {
        return Err(registry_err(format!(
            "cannot create the bucket: {create_error}"
        )));
    }
    let deadline = Instant::now() + BUCKET_RACE_WAIT;
    loop {
        if let Ok(store) = js.get_key_value(bucket).await {
            return Ok(store);
        }
        if Instant::now() >= deadline {
            return Err(registry_err(format!(
                "cannot create the bucket: {create_error}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
