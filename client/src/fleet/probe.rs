//! Liveness probes: telling a frozen machine from a slow one while a fan-out waits.
//!
//! Without them the only way to stop waiting for a silent machine is the grace after the
//! others' answers ([`super::grace_after`]): at least a second, because a live machine on a
//! loaded host can lag by a few hundred milliseconds and cutting it off is a wrong report. A
//! frozen machine (a SIGSTOPped agent, a hung host) cost every query that second, and at
//! 50,000 machines twice the slowest answer (9 s, docs/benchmarks.md).
//!
//! So once the answers stop coming ([`PROBE_QUIET`] without one), the fan-out pings each
//! machine still silent on its own subject (`dbus.ping.<nkey>`). A live agent answers on its
//! own presence subject at once, even while its D-Bus call is slow (pings have their own
//! task); a frozen one cannot. Silent to the probe within the window ([`window`]): it is cut
//! off then, reported as silent to the probe too. Alive: the grace applies as before, so an
//! agent that answers probes but never the request (a compromised one) holds a query no
//! longer than it could without probes. This is Salt's `find_job` idea (ask whether the job
//! is still running before giving up on a minion), with a presence answer that only the
//! machine itself may publish (docs/security.md), so nobody can vouch for another.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::{Client, Subscriber};
use tokio::time::Instant;

use cbus_protocol::subject;

use super::FleetError;

/// How long no answer must come before the silent are probed: answers of a healthy fleet
/// arrive in one burst (1,000 machines within ~40 ms on 2 cores), so a pause this long means
/// the rest are slow or stuck.
pub const PROBE_QUIET: Duration = Duration::from_millis(100);
/// The shortest wait for a probe's answer: an agent answers a ping within a few milliseconds,
/// but coalesces answers to one per 100 ms (`cbus-agent`'s `PING_ANSWER_GAP`), and a loaded
/// host adds a few hundred.
pub const PROBE_WINDOW_MIN: Duration = Duration::from_millis(300);
/// At most this many machines are probed, in one round: more silent machines than this is a
/// fan-out still under way (or a fleet-wide outage), which the grace handles; a probe per
/// machine would only add to the load.
pub const PROBE_MAX: usize = 1_000;

/// How long a probe sent `elapsed` after the requests waits for its answers: half the time the
/// answers so far took, at least [`PROBE_WINDOW_MIN`]. A host slow enough to take seconds to
/// deliver the fleet's answers is slow to deliver the probes' too.
pub fn window(elapsed: Duration) -> Duration {
    (elapsed / 2).max(PROBE_WINDOW_MIN)
}

/// One fan-out's probe round.
pub(super) enum Probe {
    /// Not sent yet.
    Idle,
    /// Sent at `at`: the probed machines by nkey (their index in the targets), and the
    /// presence subscription their answers come on.
    Sent {
        at: Instant,
        window: Duration,
        probed: HashMap<String, usize>,
        presence: Subscriber,
    },
    /// Over (answered, timed out, or not possible): no second round.
    Done,
}

impl Probe {
    /// Probes `silent` (each machine's nkey and its index in the targets): subscribes to their
    /// presence first, so that no answer can come before the subscription (one connection keeps
    /// the order), then pings each on its own subject. `elapsed` is the time since the requests
    /// went out.
    pub(super) async fn send(
        client: &Client,
        silent: impl Iterator<Item = (&str, usize)>,
        elapsed: Duration,
        deadline: Instant,
    ) -> Result<Probe, FleetError> {
        let nats = |e: &dyn std::fmt::Display| FleetError::Nats(format!("probe: {e}"));
        let probed: HashMap<String, usize> = silent.map(|(nkey, i)| (nkey.to_owned(), i)).collect();
        // One wildcard subscription rather than one per machine: at most PROBE_MAX are asked,
        // and the window is short, so the other machines' heartbeats heard meanwhile are few.
        let presence = tokio::time::timeout_at(deadline, client.subscribe(subject::PRESENCE_ALL))
            .await
            .map_err(|_| nats(&"no connection to subscribe on"))?
            .map_err(|e| nats(&e))?;
        for nkey in probed.keys() {
            tokio::time::timeout_at(
                deadline,
                client.publish(subject::ping_one(nkey), bytes::Bytes::new()),
            )
            .await
            .map_err(|_| nats(&"no connection to publish on"))?
            .map_err(|e| nats(&e))?;
        }
        super::flush_until(client, deadline).await?;
        Ok(Probe::Sent {
            at: Instant::now(),
            window: window(elapsed),
            probed,
            presence,
        })
    }
}
