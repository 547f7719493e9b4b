//! Asking every target at once, and knowing when to stop waiting.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::presence::{self, AgentState};
use cbus_protocol::subject::{RequestSubject, Target};
use cbus_protocol::{codec, ErrorBody, ErrorCode, Reply};

use super::probe::{self, Probe, Silent, PROBE_CONTROLS, PROBE_MAX};
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
            let (i, outcome) = item?;
            if let Some(slot) = outcomes.get_mut(i) {
                *slot = Some(outcome);
            }
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
    /// The stream yields the index, not the target: the caller pairs each outcome with its own
    /// `targets[i]`. It keeps no copy of the targets, only the nkey and hostname of each one
    /// asked (what a reply is checked against), so a fan-out to 50,000 machines holds the
    /// selection once, in the caller (a copy here was ~40 MB of the CLI's peak,
    /// docs/benchmarks.md).
    ///
    /// One subscription serves the whole fan-out, so a caller that shows each machine's result
    /// when it arrives (the gateway's requests) needs no subscription per machine. The requests
    /// are sent before this returns; the stream owns what it needs and may outlive `self` and
    /// `targets`.
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
        let mut asked = Asked::with_capacity(targets.len());
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
            asked.push(i, &agent.info.nkey, &agent.info.hostname, agent.info.rtt_ms);
            waiting += 1;
        }
        flush_until(&self.client, until).await?;
        let wait = Wait {
            sub,
            asked,
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
            recent: VecDeque::with_capacity(PROBE_CONTROLS + 1),
        };
        Ok(futures::stream::unfold(wait, Wait::next_outcome).boxed())
    }
}

/// A fan-out's outcomes as they become known, each with its target's index
/// ([`Fleet::fan_out_stream`]).
pub type OutcomeStream = BoxStream<'static, Result<(usize, Outcome), FleetError>>;

/// The nkey and hostname of each target asked, by its index, in one string: what a reply is
/// checked against (and named by in a log), without a copy of each target's status or a heap
/// allocation per target; and the round trip each claims, for probes.
struct Asked {
    /// Index in the targets of each target asked, ascending.
    index: Vec<usize>,
    /// Where each one's nkey and hostname end in `text`.
    ends: Vec<(usize, usize)>,
    /// Every asked target's nkey then hostname, one after the other.
    text: String,
    /// Each one's `rtt_ms` (4 bytes each, as a plain `u32`; a claim of 0 ms, which no agent
    /// makes, counts as none).
    rtt_ms: Vec<Option<NonZeroU32>>,
}

impl Asked {
    fn with_capacity(targets: usize) -> Self {
        Asked {
            index: Vec::with_capacity(targets),
            ends: Vec::with_capacity(targets),
            text: String::new(),
            rtt_ms: Vec::with_capacity(targets),
        }
    }

    /// Records target `i`, asked; `i` grows with each call.
    fn push(&mut self, i: usize, nkey: &str, hostname: &str, rtt_ms: Option<u32>) {
        self.text.push_str(nkey);
        let nkey_end = self.text.len();
        self.text.push_str(hostname);
        self.index.push(i);
        self.ends.push((nkey_end, self.text.len()));
        self.rtt_ms.push(rtt_ms.and_then(NonZeroU32::new));
    }

    /// Where target `i` is in the lists, when it was asked.
    fn position(&self, i: usize) -> Option<usize> {
        self.index.binary_search(&i).ok()
    }

    /// Target `i`'s nkey and hostname, when it was asked.
    fn get(&self, i: usize) -> Option<(&str, &str)> {
        let at = self.position(i)?;
        let start = match at {
            0 => 0,
            _ => self.ends[at - 1].1,
        };
        let (nkey_end, end) = self.ends[at];
        Some((&self.text[start..nkey_end], &self.text[nkey_end..end]))
    }

    /// Target `i` as a probe asks it, when it was asked.
    fn silent(&self, i: usize) -> Option<Silent<'_>> {
        let rtt_ms = self.rtt_ms[self.position(i)?];
        Some(Silent {
            nkey: self.get(i)?.0,
            index: i,
            rtt_ms: rtt_ms.map(NonZeroU32::get),
        })
    }
}

/// The state of a fan-out waiting for its answers.
struct Wait {
    sub: async_nats::Subscriber,
    /// Who was asked, to check each reply against.
    asked: Asked,
    /// Whose outcome is known (yielded or queued in `known`), by index in the targets.
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
    /// For probes (module `probe`): the connection, the probe's state, and when the latest
    /// answer came (or a probe was put off: when the count to the next pause starts).
    client: async_nats::Client,
    probe: Probe,
    last_answer: Option<Instant>,
    /// The latest machines that replied, by index: a probe's controls.
    recent: VecDeque<usize>,
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
    async fn next_outcome(mut self) -> Option<(Result<(usize, Outcome), FleetError>, Wait)> {
        loop {
            if let Some((i, outcome)) = self.known.pop_front() {
                return Some((Ok((i, outcome)), self));
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
                    self.probe.alive(&m.subject);
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
                .filter(|i| *i < self.answered.len())
            else {
                continue;
            };
            if self.answered[i] {
                continue;
            }
            // Only a target that was asked has a reply subject to answer on.
            let Some((nkey, hostname)) = self.asked.get(i) else {
                continue;
            };
            let outcome = Self::outcome_of(nkey, hostname, &self.rejected, &msg);
            self.answered[i] = true;
            self.waiting -= 1;
            if matches!(outcome, Outcome::Replied(_)) {
                self.recent.push_back(i);
                if self.recent.len() > PROBE_CONTROLS {
                    self.recent.pop_front();
                }
            }
            if self.grace {
                let now = Instant::now();
                self.deadline = self.until.min(now + grace_after(now - self.started));
                self.last_answer = Some(now);
            }
            return Some((Ok((i, outcome)), self));
        }
    }

    /// When to wake without a message: the deadline, or earlier for the probe's next step.
    fn wake(&self) -> Instant {
        let step = match (&self.probe, self.last_answer) {
            (Probe::Idle, Some(last)) => last + probe::quiet(last - self.started),
            (Probe::Sent { next_cut, .. }, _) => next_cut.unwrap_or(self.deadline),
            _ => self.deadline,
        };
        step.min(self.deadline)
    }

    /// The deadline passed (every silent machine timed out), or the probe's next step is due:
    /// send it, or end a window (every probed machine still silent at the end of its window is
    /// cut off).
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
            Probe::Idle
                if self
                    .last_answer
                    .is_some_and(|l| now >= l + probe::quiet(l - self.started)) =>
            {
                if self.waiting > PROBE_MAX {
                    // Still under way: probe at the next pause.
                    self.last_answer = Some(now);
                    return;
                }
                let asked = &self.asked;
                let silent = (0..self.answered.len())
                    .filter(|&i| !self.answered[i])
                    .filter_map(|i| asked.silent(i));
                let controls = self.recent.iter().filter_map(|&i| Some(asked.get(i)?.0));
                self.probe = match Probe::send(
                    &self.client,
                    silent,
                    controls,
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
            Probe::Sent {
                next_cut: Some(at), ..
            } if now >= *at => {
                for i in self.probe.cut(&self.client, now, self.deadline).await {
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

    /// What the reply of the agent `nkey` on `hostname` (or NATS's "no responders" in its
    /// place) says.
    fn outcome_of(
        nkey: &str,
        hostname: &str,
        rejected: &Rejected,
        msg: &async_nats::Message,
    ) -> Outcome {
        if msg.status == Some(StatusCode::NO_RESPONDERS) {
            return Outcome::NoResponders;
        }
        let failed = |message: String| {
            Outcome::Replied(Reply {
                nkey: nkey.to_owned(),
                hostname: hostname.to_owned(),
                result: Err(ErrorBody::new(ErrorCode::InternalError, message)),
            })
        };
        match Reply::from_payload(&msg.payload) {
            // Only the agent asked could answer on this reply subject (allow_responses); an
            // envelope naming another machine is a forgery, never that machine's word.
            Ok(reply) if reply.nkey != nkey => {
                Rejected::count(&rejected.replies);
                tracing::warn!(agent = %hostname, claims = %codec::quote(&reply.nkey), "reply names another machine");
                failed("the agent's reply names another machine; ignored".into())
            }
            Ok(reply) => Outcome::Replied(reply),
            Err(e) => {
                tracing::warn!(agent = %hostname, error = %e, "malformed reply");
                failed(format!("malformed reply from agent: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Asked;

    #[test]
    fn asked_targets_are_found_by_index_and_the_others_are_not() {
        let mut asked = Asked::with_capacity(4);
        asked.push(0, "UA", "web-1", Some(4));
        // 1 not asked (stopped, unresponsive or under maintenance).
        asked.push(2, "UC", "", None);
        asked.push(3, "UD", "db-4", Some(1));
        assert_eq!(asked.get(0), Some(("UA", "web-1")));
        assert_eq!(asked.get(1), None);
        assert_eq!(asked.get(2), Some(("UC", "")));
        assert_eq!(asked.get(3), Some(("UD", "db-4")));
        assert_eq!(asked.get(4), None);
        // What a probe asks: the claimed round trip, or none.
        let silent = |i| asked.silent(i).map(|s| (s.nkey, s.index, s.rtt_ms));
        assert_eq!(silent(0), Some(("UA", 0, Some(4))));
        assert_eq!(silent(1), None);
        assert_eq!(silent(2), Some(("UC", 2, None)));
        assert_eq!(silent(3), Some(("UD", 3, Some(1))));
    }
}
