//! systemd shortcuts: the same fan-out with systemd's objects and methods filled in.
//!
//! - `units [PATTERN]`: one `ListUnits` (or `ListUnitsByPatterns`) per machine. SINCE (the last
//!   state change) is not in that reply; it costs one more `Get StateChangeTimestamp` per unit,
//!   so it is fetched only when a PATTERN is given and matches at most [`MAX_SINCE_UNITS`]
//!   distinct units, and shown as `-` otherwise.
//! - `status UNIT...`: `GetAll` on the unit's `org.freedesktop.systemd1.Unit` interface plus
//!   `MainPID` from `...Service` for services, both fanned out at once.
//! - `start|stop|restart|reload UNIT...`: `StartUnit` etc. with mode `replace` on every machine,
//!   then (unless `--no-block`) wait until each machine's job is gone, and report the job result
//!   and the final ActiveState/SubState. Jobs are followed two ways at once: systemd's
//!   `JobRemoved` signal forwarded by the agent (subscribed before the jobs are queued, so none
//!   is missed; it carries the result: done, failed, canceled...) and a poll of each job object
//!   every second (a job object disappears when the job ends), which covers a signal the agent
//!   dropped or a NATS user without permission to subscribe to signals. A machine that stops
//!   answering during the wait is reported, not waited for.
//!
//! A `JobRemoved` is a claim that any local user can make (`busctl emit`), so it is taken only
//! when the agent saw its sender own `org.freedesktop.systemd1` (`systemd::systemd_signal`), and
//! only for the machine named by the `<nkey>` token of its subject (what NATS permissions
//! guarantee; the `NKey` header is the publisher's word). Others are ignored and counted.
//!
//! The whole command, job wait included, ends by its deadline (`--timeout` plus
//! `--job-timeout`): a poll in flight is cut off by it, and a connection lost during the wait
//! that does not come back by then ends the command with `disconnected`.
//!
//! - `start|stop|restart|reload UNIT --batch N|P%`: a rolling operation ([`rolling`]), planned
//!   by `cbus_client::systemd::rollout`.
//!
//! One module per command family: [`units`], [`status`], the jobs of `start|stop|...`
//! ([`jobs`], waiting for them in [`wait`]), and rolling operations ([`rolling`]).

mod jobs;
mod rolling;
mod status;
mod units;
mod wait;

pub use jobs::action;
pub use status::status;
pub use units::units;

use std::time::Duration;

use cbus_client::fleet::Outcome;
use serde_json::{json, Value};

use crate::render;

pub const MAX_SINCE_UNITS: usize = 100;
/// Concurrent fan-outs when one command needs one per unit or per job.
pub(super) const CONCURRENCY: usize = 16;
/// How often pending jobs are polled.
pub(super) const POLL_EVERY: Duration = Duration::from_secs(1);
/// A machine silent to polls for this long during a job wait is reported, not waited for. It is
/// longer than the client needs to notice a frozen server (three ping intervals), so that a
/// server's silence is reported as `disconnected` rather than blamed on the machines.
pub(super) const SILENCE_LIMIT: Duration = Duration::from_secs(5);

pub(super) fn ok_value(o: &Outcome) -> Option<&Value> {
    match o {
        Outcome::Replied(r) => r.result.as_ref().ok().map(|s| &s.value),
        _ => None,
    }
}

pub(super) fn since_cells(us: Option<u64>) -> (String, String, Value) {
    match us.filter(|u| *u > 0) {
        Some(us) => (
            render::ago(us / 1000),
            render::timestamp_us(us).unwrap_or_else(|| "-".into()),
            json!(render::timestamp_us(us)),
        ),
        None => ("-".into(), "-".into(), Value::Null),
    }
}
