//! Liveness probes: telling a frozen machine from a slow one while a fan-out waits.
//!
//! Without them the only way to stop waiting for a silent machine is the grace after the
//! others' answers ([`super::grace_after`]): at least a second, because a live machine on a
//! loaded host can lag by a few hundred milliseconds and cutting it off is a wrong report. A
//! frozen machine (a SIGSTOPped agent, a hung host) cost every query that second, and at
//! 50,000 machines twice the slowest answer (9 s, docs/benchmarks.md).
//!
//! So once the answers pause ([`PROBE_QUIET`] without one), the fan-out pings each machine
//! still silent on its own subject (`dbus.ping.<nkey>`). A live agent answers on its own
//! presence subject at once, even while its D-Bus call is slow (pings have their own task); a
//! frozen one cannot. Silent to the probe within its window ([`window`]): it is cut off then,
//! reported as silent to the probe too. Alive: the grace applies as before, so an agent that
//! answers probes but never the request (a compromised one) holds a query no longer than it
//! could without probes. This is Salt's `find_job` idea (ask whether the job is still running
//! before giving up on a minion), with a presence answer that only the machine itself may
//! publish (docs/security.md), so nobody can vouch for another.
//!
//! How long is long enough for a live machine to answer depends on how far it is, which the
//! answers of the others do not tell (a fleet with a far site answers in two bursts, and the
//! silent may all be far). Each agent states it: its registry entry's `rtt_ms`, how long its
//! own registry writes take to be acknowledged. A machine that claims none (an older agent, or
//! before its first write) gets the wide window of before.
//!
//! Nor does a claim know how busy the pipes are right now: a ping answer waits behind the
//! replies queued on the same connections, and on a loaded host the tail of a fan-out's
//! answers is such a queue (with claims alone, the fleet emulator had up to 100 live machines
//! of 1,000 cut off at load 8). So each probe also pings a few machines that just replied
//! ([`PROBE_CONTROLS`], known alive): nobody is cut off before they answered, nor before twice
//! the time their answers took. When they do not answer (agents older than the probe, or one
//! that froze just now), nobody is cut off and the grace ends the wait, as without probes.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_nats::{Client, Subscriber};
use futures::FutureExt;
use futures::StreamExt;
use tokio::time::Instant;

use cbus_protocol::subject;

use super::FleetError;

/// How long no answer must come before the silent are probed, at least: answers of a healthy
/// fleet arrive in one stream (1,000 machines within ~40 ms on 2 cores, with no gap near this
/// long), so a pause this long means the rest are slow or stuck. See [`quiet`].
pub const PROBE_QUIET: Duration = Duration::from_millis(20);
/// The shortest wait for a probe's answer: an agent answers its own ping within
/// `cbus-agent`'s `PROBE_ANSWER_GAP` (10 ms) of its previous answer, plus the round trip.
pub const PROBE_WINDOW_MIN: Duration = Duration::from_millis(20);
/// A probe waits this many times the round trip the machine claims: once for the ping, once
/// for the answer, and once for a host busier than when it measured.
pub const PROBE_RTT_FACTOR: u32 = 3;
/// The shortest wait for a machine that claims no round trip (docs/benchmarks.md: a loaded
/// host adds a few hundred milliseconds).
pub const PROBE_WINDOW_UNKNOWN: Duration = Duration::from_millis(300);
/// At most this many machines are probed: more silent machines than this is a fan-out still
/// under way (or a fleet-wide outage); the probe waits for the next pause, and the grace
/// handles an outage. A probe per machine would only add to the load.
pub const PROBE_MAX: usize = 1_000;
/// How many machines that just replied each probe also pings, to time answers as of now.
pub const PROBE_CONTROLS: usize = 4;

/// How long no answer must come, the latest having come `elapsed` after the requests, before
/// the silent are probed: [`PROBE_QUIET`], or an eighth of `elapsed` when that is longer. A
/// probe sent while the answers still stream in (a loaded host pauses them for tens of
/// milliseconds) is not wrong, as a live machine answers it, but it is early: its controls
/// answer behind the replies still queued, and it cuts nobody off before twice their time.
pub fn quiet(elapsed: Duration) -> Duration {
    (elapsed / 8).max(PROBE_QUIET)
}

/// How long a probe sent `elapsed` after the requests waits for a machine that claims a round
/// trip of `rtt_ms`: [`PROBE_RTT_FACTOR`] times it, at least [`PROBE_WINDOW_MIN`], and at least
/// a quarter of the time the answers so far took (a host slow to deliver the fleet's answers
/// is slow to deliver the probes' too). Without a claim, half that time, at least
/// [`PROBE_WINDOW_UNKNOWN`].
pub fn window(rtt_ms: Option<u32>, elapsed: Duration) -> Duration {
    match rtt_ms {
        Some(ms) => (Duration::from_millis(ms.into()) * PROBE_RTT_FACTOR)
            .max(elapsed / 4)
            .max(PROBE_WINDOW_MIN),
        None => (elapsed / 2).max(PROBE_WINDOW_UNKNOWN),
    }
}

/// A machine to probe: its nkey, its index in the targets, and the round trip it claims.
pub(super) struct Silent<'a> {
    pub nkey: &'a str,
    pub index: usize,
    pub rtt_ms: Option<u32>,
}

/// One fan-out's probe.
pub(super) enum Probe {
    /// Not sent yet.
    Idle,
    /// Sent: the probed machines still silent by nkey (their index in the targets, and when
    /// their window ends), the controls not heard yet, when the server had every ping, the
    /// earliest a machine may be cut off (`None` while a control is not heard), the next cut,
    /// and the presence subscription the answers come on.
    Sent {
        probed: HashMap<String, (usize, Instant)>,
        controls: HashSet<String>,
        flushed: Instant,
        not_before: Option<Instant>,
        next_cut: Option<Instant>,
        presence: Subscriber,
    },
    /// Over (answered, timed out, or not possible): every silent machine was probed once.
    Done,
}

impl Probe {
    /// Probes `silent`, with `controls` (nkeys of machines that just replied): subscribes to
    /// presence first, so that no answer can come before the subscription (one connection
    /// keeps the order), then pings each on its own subject. Windows count from the flush,
    /// when the server has every ping. `elapsed` is the time since the requests went out.
    pub(super) async fn send<'a>(
        client: &Client,
        silent: impl Iterator<Item = Silent<'a>>,
        controls: impl Iterator<Item = &'a str>,
        elapsed: Duration,
        deadline: Instant,
    ) -> Result<Probe, FleetError> {
        let nats = |e: &dyn std::fmt::Display| FleetError::Nats(format!("probe: {e}"));
        let silent: Vec<Silent<'a>> = silent.collect();
        let controls: HashSet<String> = controls.map(str::to_owned).collect();
        // One wildcard subscription rather than one per machine: at most PROBE_MAX are asked,
        // and the windows are short, so the other machines' heartbeats heard meanwhile are few.
        let presence = tokio::time::timeout_at(deadline, client.subscribe(subject::PRESENCE_ALL))
            .await
            .map_err(|_| nats(&"no connection to subscribe on"))?
            .map_err(|e| nats(&e))?;
        let nkeys = silent
            .iter()
            .map(|m| m.nkey)
            .chain(controls.iter().map(String::as_str));
        for nkey in nkeys {
            tokio::time::timeout_at(
                deadline,
                client.publish(subject::ping_one(nkey), bytes::Bytes::new()),
            )
            .await
            .map_err(|_| nats(&"no connection to publish on"))?
            .map_err(|e| nats(&e))?;
        }
        super::flush_until(client, deadline).await?;
        let flushed = Instant::now();
        let probed: HashMap<String, (usize, Instant)> = silent
            .into_iter()
            .map(|m| {
                let cut = flushed + window(m.rtt_ms, elapsed);
                (m.nkey.to_owned(), (m.index, cut))
            })
            .collect();
        // Without controls (no machine replied yet) the claims alone decide.
        let not_before = controls.is_empty().then_some(flushed);
        let mut probe = Probe::Sent {
            probed,
            controls,
            flushed,
            not_before,
            next_cut: None,
            presence,
        };
        probe.schedule();
        Ok(probe)
    }

    /// Sets when the next machine is cut off: the earliest window's end, not before the
    /// controls allow; `Done` once no probed machine is left.
    fn schedule(&mut self) {
        let Probe::Sent {
            probed,
            not_before,
            next_cut,
            ..
        } = self
        else {
            return;
        };
        if probed.is_empty() {
            *self = Probe::Done;
            return;
        }
        *next_cut = not_before.and_then(|floor| {
            let earliest = probed.values().map(|(_, at)| *at).min()?;
            Some(earliest.max(floor))
        });
    }

    /// A presence message while probing: the machine it came from (by its subject, which only
    /// that machine may publish on) is alive, and is no longer cut off by the probe. The last
    /// control heard sets the earliest cut: twice the time the controls took.
    pub(super) fn alive(&mut self, presence_subject: &str) {
        let Probe::Sent {
            probed,
            controls,
            flushed,
            not_before,
            ..
        } = self
        else {
            return;
        };
        let Some(nkey) = subject::nkey_of(presence_subject) else {
            return;
        };
        let was_probed = probed.remove(nkey).is_some();
        let was_control = controls.remove(nkey);
        if was_control && controls.is_empty() {
            let now = Instant::now();
            *not_before = Some(now + (now - *flushed));
        }
        // Most presence messages on the wildcard are other machines' heartbeats (10,000 a
        // second at 50,000 machines): only a probed machine or a control moves the next cut,
        // and scheduling scans every probed machine.
        if was_probed || was_control {
            self.schedule();
        }
    }

    /// The probed machines cut off by `now`, silent still, by index in the targets. First makes
    /// sure every answer the server sent is counted: a flush (the server answers it after
    /// everything it sent before), then whatever the subscription already holds, so a busy
    /// client does not cut off a machine whose answer waits unread.
    pub(super) async fn cut(
        &mut self,
        client: &Client,
        now: Instant,
        deadline: Instant,
    ) -> Vec<usize> {
        if super::flush_until(client, deadline).await.is_err() {
            tracing::debug!("probe: no flush before cutting off the silent");
        }
        // One message at a time, not collected first: the wildcard subscription also holds the
        // fleet's heartbeats, up to async-nats' channel of 65,536 messages.
        loop {
            let heard = match self {
                Probe::Sent { presence, .. } => presence.next().now_or_never().flatten(),
                _ => None,
            };
            let Some(m) = heard else { break };
            self.alive(&m.subject);
        }
        let Probe::Sent {
            probed,
            not_before: Some(floor),
            ..
        } = self
        else {
            return Vec::new();
        };
        let floor = *floor;
        let mut cut = Vec::new();
        probed.retain(|_, (index, at)| {
            let over = (*at).max(floor) <= now;
            if over {
                cut.push(*index);
            }
            !over
        });
        self.schedule();
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_claimed_round_trip() {
        let ms = Duration::from_millis;
        // A near machine on a quiet host: the floor.
        assert_eq!(window(Some(1), ms(40)), PROBE_WINDOW_MIN);
        // A far one: three round trips, whatever the near ones' answers took.
        assert_eq!(window(Some(128), ms(40)), ms(384));
        // A slow fleet's answers widen it, and the pause that starts it.
        assert_eq!(quiet(ms(40)), PROBE_QUIET);
        assert_eq!(quiet(ms(800)), ms(100));
        assert_eq!(window(Some(1), ms(400)), ms(100));
        // No claim: the wide window.
        assert_eq!(window(None, ms(40)), PROBE_WINDOW_UNKNOWN);
        assert_eq!(window(None, ms(2000)), ms(1000));
        // Above the agent's answer gap, so a ping answered late by it is still in time.
        assert!(PROBE_WINDOW_MIN > Duration::from_millis(10));
    }
}
