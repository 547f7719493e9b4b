//! Rolling requests (`batch`, `max_fail` on start/stop/restart): the CLI's planner
//! (`cbus_client::systemd::rollout`, no I/O) driven here, so a browser's bulk restart rolls
//! the same way as `cbus restart --batch`: at most `batch` machines in flight as a running
//! counter, and no machine started once more have failed or been unreachable than `max_fail`
//! allows. Done server-side so that a page closed mid-way neither stops the rollout half-sent
//! nor needs one request per machine (a connection has at most 16 in flight).

use std::future::Future;
use std::time::Duration;

use cbus_client::fleet::AgentStatus;
use cbus_client::systemd::rollout::{Amount, Order, Rollout, Step};
use cbus_protocol::{ErrorBody, ErrorCode};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::requests::MachineResult;
use crate::store::Store;

/// The longest `hold_ms` a request may ask for.
const MAX_HOLD: Duration = Duration::from_secs(600);

/// How often a held unit's state is looked at in the cache (local memory, kept by signals:
/// nothing is asked of the machine).
const HOLD_TICK: Duration = Duration::from_millis(50);

/// A request's rolling options, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rolling {
    pub batch: Amount,
    pub max_fail: Amount,
    /// `None`: a machine is done when its agent answered the Manager call.
    pub hold: Option<Duration>,
    pub order: Order,
}

/// The request fields [`Rolling::parse`] reads.
pub(super) struct Options<'a> {
    pub batch: Option<&'a str>,
    pub max_fail: Option<&'a str>,
    pub hold_ms: Option<u64>,
    pub order: Option<&'a str>,
}

impl Rolling {
    /// From the request's `batch`, `max_fail`, `hold_ms` and `order` (the CLI's `--batch`,
    /// `--max-fail`, `--hold` and `--order`: `3`, `25%`, `label:zone`); `None` when none is
    /// given.
    pub(super) fn parse(o: Options<'_>) -> Result<Option<Rolling>, String> {
        let batch = match (o.batch, o.max_fail, o.hold_ms, o.order) {
            (None, None, None, None) => return Ok(None),
            (None, ..) => return Err("max_fail, hold_ms and order need batch".into()),
            (Some(b), ..) => Amount::parse_batch(b).map_err(|e| format!("batch: {e}"))?,
        };
        let max_fail = match o.max_fail {
            Some(m) => Amount::parse(m).map_err(|e| format!("max_fail: {e}"))?,
            None => Amount::Count(0),
        };
        let hold = o.hold_ms.map(Duration::from_millis);
        if hold.is_some_and(|h| h > MAX_HOLD) {
            return Err(format!("hold_ms: at most {}", MAX_HOLD.as_millis()));
        }
        let order = match o.order {
            Some(s) => Order::parse(s).map_err(|e| e.to_string())?,
            None => Order::Host,
        };
        Ok(Some(Rolling {
            batch,
            max_fail,
            hold,
            order,
        }))
    }

    /// Puts the machines in this rollout's order.
    pub(super) fn sort(&self, targets: &mut [AgentStatus]) {
        fn key<'a>(order: &Order, t: &'a AgentStatus) -> (bool, &'a str, &'a str) {
            let labels = &t.info.labels;
            order.key(&t.info.hostname, |k| labels.get(k).map(String::as_str))
        }
        targets.sort_by(|a, b| {
            key(&self.order, a)
                .cmp(&key(&self.order, b))
                .then_with(|| a.info.nkey.cmp(&b.info.nkey))
        });
    }
}

/// What a unit's state was before its job: the hold waits for a change from it.
pub(super) type Before = Option<(String, Option<u64>)>;

/// The unit's state and StateChangeTimestamp in the cache before the job is sent.
pub(super) fn before(store: &Store, nkey: &str, unit: &str) -> Before {
    store.unit_state(nkey, unit).map(|(_, a, since)| (a, since))
}

/// Whether `active` is the state a job leaves: `active` (or `reloading`) after a start or a
/// restart, `inactive` after a stop (the CLI's rule, docs/cli.md).
fn reached(active: &str, stop: bool) -> bool {
    if stop {
        active == "inactive"
    } else {
        matches!(active, "active" | "reloading")
    }
}

/// After a job was accepted: waits until the unit reached the job's state (a restart, or a
/// unit not already there, must show a state change after `before`), then until it stayed
/// there, unchanged, for `hold`. Judged from the gateway's cache, which systemd's signals
/// keep; a machine whose unit never gets there by `deadline` times out.
pub(super) async fn hold(
    store: &Store,
    nkey: &str,
    unit: &str,
    (stop, restart): (bool, bool),
    before: Before,
    hold: Duration,
    deadline: Instant,
) -> MachineResult {
    let state = || store.unit_state(nkey, unit).map(|(_, a, since)| (a, since));
    let must_change = restart || !before.as_ref().is_some_and(|(a, _)| reached(a, stop));
    let since = loop {
        match state() {
            Some((a, since))
                if reached(&a, stop)
                    && (!must_change || Some(&(a.clone(), since)) != before.as_ref()) =>
            {
                break since
            }
            _ if Instant::now() >= deadline => return MachineResult::TimedOut,
            _ => tokio::time::sleep(HOLD_TICK).await,
        }
    };
    let until = Instant::now() + hold;
    while Instant::now() < until {
        tokio::time::sleep(HOLD_TICK.min(until - Instant::now())).await;
        match state() {
            Some((a, s)) if reached(&a, stop) && s == since => {}
            now => {
                let now = now.map_or_else(|| "gone".to_owned(), |(a, _)| a);
                return MachineResult::Failed(ErrorBody::new(
                    ErrorCode::InternalError,
                    format!("{unit} left its state during the hold: now {now}"),
                ));
            }
        }
    }
    MachineResult::Ok(cbus_protocol::Success {
        signature: None,
        value: serde_json::json!({ "held_ms": hold.as_millis() as u64 }),
    })
}

/// The step a machine's result counts as: an agent that is not connected or did not answer
/// is unreachable, as in the CLI.
fn step_of(r: &MachineResult) -> Step {
    match r {
        MachineResult::Ok(_) => Step::Done,
        MachineResult::TimedOut => Step::Unreachable,
        MachineResult::Failed(e) if e.code == ErrorCode::Disconnected => Step::Unreachable,
        MachineResult::Failed(_) => Step::Failed,
    }
}

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ended {
    pub not_started: usize,
    pub halted: bool,
}

/// Asks machines `0..total` by the plan: each [`Driver::next`] starts what the plan allows
/// and yields the next machine's result as it ends.
pub(super) struct Driver<F, Fut> {
    plan: Rollout,
    running: FuturesUnordered<Asked<Fut>>,
    ask: F,
}

/// One machine being asked, with its index.
pub(super) struct Asked<Fut> {
    i: usize,
    fut: std::pin::Pin<Box<Fut>>,
}

impl<Fut: Future<Output = MachineResult>> Future for Asked<Fut> {
    type Output = (usize, MachineResult);
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let i = self.i;
        self.fut.as_mut().poll(cx).map(|r| (i, r))
    }
}

impl<F, Fut> Driver<F, Fut>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = MachineResult>,
{
    pub(super) fn new(total: usize, rolling: &Rolling, ask: F) -> Self {
        Driver {
            plan: Rollout::new(total, rolling.batch, rolling.max_fail),
            running: FuturesUnordered::new(),
            ask,
        }
    }

    /// The next machine's result; `None` when the rollout is over (all asked, or halted and
    /// those in flight ended).
    pub(super) async fn next(&mut self) -> Option<(usize, MachineResult)> {
        while let Some(i) = self.plan.start_next() {
            let fut = Box::pin((self.ask)(i));
            self.running.push(Asked { i, fut });
        }
        let (i, result) = self.running.next().await?;
        self.plan.finish(i, step_of(&result));
        Some((i, result))
    }

    pub(super) fn ended(&self) -> Ended {
        Ended {
            not_started: self.plan.count(Step::NotStarted),
            halted: self.plan.halted(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbus_protocol::{ErrorBody, Success};

    #[test]
    fn options_parse_as_the_cli_flags() {
        let opts = |batch, max_fail, hold_ms, order| Options {
            batch,
            max_fail,
            hold_ms,
            order,
        };
        assert_eq!(Rolling::parse(opts(None, None, None, None)), Ok(None));
        assert!(Rolling::parse(opts(None, Some("1"), None, None)).is_err());
        assert!(Rolling::parse(opts(None, None, Some(10), None)).is_err());
        assert!(Rolling::parse(opts(Some("0"), None, None, None)).is_err());
        assert!(Rolling::parse(opts(Some("x"), None, None, None)).is_err());
        assert!(Rolling::parse(opts(Some("1"), None, Some(3_600_000), None)).is_err());
        assert!(Rolling::parse(opts(Some("1"), None, None, Some("zone"))).is_err());
        assert_eq!(
            Rolling::parse(opts(Some("25%"), Some("2"), Some(1500), Some("label:zone"))),
            Ok(Some(Rolling {
                batch: Amount::Percent(25),
                max_fail: Amount::Count(2),
                hold: Some(Duration::from_millis(1500)),
                order: Order::Label("zone".into()),
            }))
        );
    }

    #[tokio::test]
    async fn a_failure_beyond_max_fail_stops_new_machines() {
        let rolling = Rolling {
            batch: Amount::Count(1),
            max_fail: Amount::Count(0),
            hold: None,
            order: Order::Host,
        };
        // Machine 1 fails: 0 and 1 ran, 2..5 never started.
        let mut d = Driver::new(5, &rolling, |i| async move {
            if i == 1 {
                MachineResult::Failed(ErrorBody::new(ErrorCode::InternalError, "boom"))
            } else {
                MachineResult::Ok(Success {
                    signature: None,
                    value: serde_json::Value::Null,
                })
            }
        });
        let mut asked = Vec::new();
        while let Some((i, _)) = d.next().await {
            asked.push(i);
        }
        assert_eq!(asked, vec![0, 1]);
        assert_eq!(
            d.ended(),
            Ended {
                not_started: 3,
                halted: true
            }
        );
    }

    /// A machine "A" whose unit `u.service` is `active` since `since`.
    fn fleet_with_unit(active: &str, since: u64) -> Store {
        use cbus_client::systemd::Unit as Listed;
        use cbus_protocol::presence::{now_ms, PresenceKind};
        let (store, _) = crate::store::tests::store();
        store.presence(
            crate::store::tests::ev(PresenceKind::Hello, "A", 1),
            now_ms(),
        );
        let unit = Listed {
            name: "u.service".into(),
            load: "loaded".into(),
            active: active.into(),
            sub: "running".into(),
            path: "/org/freedesktop/systemd1/unit/u_2eservice".into(),
            ..Default::default()
        };
        store.replace_units("A", vec![unit], crate::model::signal_mark());
        change(&store, active, since);
        store
    }

    /// What a PropertiesChanged from systemd does to the cache.
    fn change(store: &Store, active: &str, since: u64) {
        use crate::model::UnitProp;
        let props = vec![
            UnitProp::ActiveState(active.into()),
            UnitProp::StateChangeTimestamp(Some(since)),
        ];
        store.patch_units(
            "A",
            &[("u.service".into(), props)],
            crate::model::signal_mark(),
        );
    }

    const RESTART: (bool, bool) = (false, true);

    #[tokio::test]
    async fn a_restart_is_held_once_the_unit_is_active_again_and_stays() {
        let store = fleet_with_unit("active", 100);
        let before = before(&store, "A", "u.service");
        let deadline = Instant::now() + Duration::from_secs(5);
        let hold_ms = Duration::from_millis(200);
        let later = {
            let store = store.clone();
            async move {
                // Still the old `active` at first: not counted until the restart shows.
                tokio::time::sleep(Duration::from_millis(150)).await;
                change(&store, "activating", 200);
                change(&store, "active", 300);
            }
        };
        let (r, ()) = tokio::join!(
            hold(&store, "A", "u.service", RESTART, before, hold_ms, deadline),
            later
        );
        assert!(matches!(r, MachineResult::Ok(_)), "{r:?}");
    }

    #[tokio::test]
    async fn a_unit_that_fails_during_the_hold_fails_the_machine() {
        let store = fleet_with_unit("inactive", 100);
        let before = before(&store, "A", "u.service");
        let deadline = Instant::now() + Duration::from_secs(5);
        change(&store, "active", 200);
        let later = {
            let store = store.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                change(&store, "failed", 300);
            }
        };
        let start = (false, false);
        let (r, ()) = tokio::join!(
            hold(
                &store,
                "A",
                "u.service",
                start,
                before,
                Duration::from_secs(2),
                deadline
            ),
            later
        );
        match r {
            MachineResult::Failed(e) => assert!(e.message.contains("now failed"), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_restart_never_seen_times_out() {
        let store = fleet_with_unit("active", 100);
        let before = before(&store, "A", "u.service");
        let deadline = Instant::now() + Duration::from_millis(300);
        let r = hold(
            &store,
            "A",
            "u.service",
            RESTART,
            before,
            Duration::ZERO,
            deadline,
        )
        .await;
        assert!(matches!(r, MachineResult::TimedOut), "{r:?}");
    }
}
