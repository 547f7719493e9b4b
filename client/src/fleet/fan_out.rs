//! Asking every target at once, and knowing when to stop waiting.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::presence::{self, AgentState};
use cbus_protocol::subject::{self, RequestSubject, Target};
use cbus_protocol::{codec, ErrorBody, ErrorCode, Reply};

use super::probe::{Probe, PROBE_MAX, PROBE_QUIET};
use super::{
    flush_until, grace_after, AgentStatus, FanOutOptions, Fleet, FleetError, Outcome, Query,
    Rejected, TargetOutcome,
};
use crate::headers;

impl Fleet {
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
    /// Stopped agents are not asked, nor (unless `options.ask_unresponsive`) unresponsive ones,
    /// nor (unless `options.ask_maintenance`) machines under maintenance.
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
                    probed: false,
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
            if let Some(mark) = agent
                .maintenance
                .as_ref()
                .filter(|_| !options.ask_maintenance)
            {
                known.push_back((i, Outcome::Maintenance(mark.clone())));
                answered[i] = true;
                continue;
            }
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
            targets: targets.iter().cloned().map(Some).collect(),
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
            client: self.client.clone(),
            // Reads only, as the grace: probes shorten it.
            probe: if options.grace && query.op.is_read() {
                Probe::Idle
            } else {
                Probe::Done
            },
            last_answer: None,
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
    /// Each target until its outcome is yielded: moved out then (each is yielded once), not
    /// cloned again, which at 50,000 machines was a second copy of the whole selection.
    targets: Vec<Option<AgentStatus>>,
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
    /// For probes (module `probe`): the connection, the round's state, and when the latest
    /// answer came.
    client: async_nats::Client,
    probe: Probe,
    last_answer: Option<Instant>,
}

/// What woke a waiting fan-out.
enum Event {
    Reply(Option<async_nats::Message>),
    /// A presence message while probing (a probed machine is alive).
    Presence(async_nats::Message),
    /// The deadline, a probe due, or a probe's window ended.
    Tick,
}

impl Wait {
    async fn next_outcome(mut self) -> Option<(Result<(usize, TargetOutcome), FleetError>, Wait)> {
        loop {
            if let Some((i, outcome)) = self.known.pop_front() {
                let Some(agent) = self.targets[i].take() else {
                    continue;
                };
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
            // about how long answers take); after each answer, the silent get a grace, and once
            // the answers pause, a probe (module `probe`).
            let wake = self.wake();
            let event = {
                let presence = match &mut self.probe {
                    Probe::Sent { presence, .. } => Some(presence),
                    _ => None,
                };
                tokio::select! {
                    m = self.sub.next() => Event::Reply(m),
                    Some(m) = async {
                        match presence {
                            Some(p) => p.next().await,
                            None => std::future::pending().await,
                        }
                    } => Event::Presence(m),
                    _ = tokio::time::sleep_until(wake) => Event::Tick,
                }
            };
            let msg = match event {
                Event::Reply(Some(msg)) => msg,
                Event::Reply(None) => {
                    self.ended = true;
                    return Some((
                        Err(FleetError::Nats("reply subscription closed".into())),
                        self,
                    ));
                }
                Event::Presence(m) => {
                    self.alive(&m.subject);
                    continue;
                }
                Event::Tick => {
                    self.tick().await;
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
            let Some(agent) = self.targets[i].take() else {
                continue;
            };
            let outcome = Self::outcome_of(&agent, &self.rejected, &msg);
            self.answered[i] = true;
            self.waiting -= 1;
            if self.grace {
                let now = Instant::now();
                self.deadline = self.until.min(now + grace_after(now - self.started));
                self.last_answer = Some(now);
            }
            return Some((Ok((i, TargetOutcome { agent, outcome })), self));
        }
    }

    /// When to wake without a message: the deadline, or earlier for the probe's next step.
    fn wake(&self) -> Instant {
        let step = match (&self.probe, self.last_answer) {
            (Probe::Idle, Some(last)) => last + PROBE_QUIET,
            (Probe::Sent { at, window, .. }, _) => *at + *window,
            _ => self.deadline,
        };
        step.min(self.deadline)
    }

    /// The deadline passed (every silent machine timed out), or the probe's next step is due:
    /// send it, or end its window (every probed machine still silent is cut off).
    async fn tick(&mut self) {
        let now = Instant::now();
        let waited = self.started.elapsed().min(self.timeout);
        if now >= self.deadline {
            let after_grace = self.deadline < self.until;
            for (i, answered) in self.answered.iter_mut().enumerate() {
                if !*answered {
                    *answered = true;
                    self.known.push_back((
                        i,
                        Outcome::TimedOut {
                            waited,
                            after_grace,
                            probed: false,
                        },
                    ));
                }
            }
            self.waiting = 0;
            self.ended = true;
            return;
        }
        match &self.probe {
            Probe::Idle if self.last_answer.is_some_and(|l| now >= l + PROBE_QUIET) => {
                if self.waiting > PROBE_MAX {
                    self.probe = Probe::Done;
                    return;
                }
                let silent = (0..self.answered.len()).filter(|&i| !self.answered[i]);
                self.probe = match Probe::send(
                    &self.client,
                    &self.targets,
                    silent,
                    now - self.started,
                    self.deadline,
                )
                .await
                {
                    Ok(sent) => sent,
                    Err(e) => {
                        // Without a probe the grace still ends the wait.
                        tracing::debug!(error = %e, "cannot probe the silent machines");
                        Probe::Done
                    }
                };
            }
            Probe::Sent { at, window, .. } if now >= *at + *window => {
                let Probe::Sent { probed, .. } = std::mem::replace(&mut self.probe, Probe::Done)
                else {
                    return;
                };
                for i in probed.into_values() {
                    if !self.answered[i] {
                        self.answered[i] = true;
                        self.waiting -= 1;
                        self.known.push_back((
                            i,
                            Outcome::TimedOut {
                                waited,
                                after_grace: true,
                                probed: true,
                            },
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    /// A presence message while probing: the machine it came from (by its subject, which only
    /// that machine may publish on) is alive, and is left to the grace.
    fn alive(&mut self, presence_subject: &str) {
        if let Probe::Sent { probed, .. } = &mut self.probe {
            if let Some(nkey) = subject::nkey_of(presence_subject) {
                probed.remove(nkey);
            }
            if probed.is_empty() {
                self.probe = Probe::Done;
            }
        }
    }

    /// What `agent`'s reply (or NATS's "no responders" in its place) says.
    fn outcome_of(agent: &AgentStatus, rejected: &Rejected, msg: &async_nats::Message) -> Outcome {
        let target = &agent.info;
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
                Rejected::count(&rejected.replies);
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
