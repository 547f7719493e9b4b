//! Rolling requests (`batch`, `max_fail` on start/stop/restart): the CLI's planner
//! (`cbus_client::systemd::rollout`, no I/O) driven here, so a browser's bulk restart rolls
//! the same way as `cbus restart --batch`: at most `batch` machines in flight as a running
//! counter, and no machine started once more have failed or been unreachable than `max_fail`
//! allows. Done server-side so that a page closed mid-way neither stops the rollout half-sent
//! nor needs one request per machine (a connection has at most 16 in flight).

use std::future::Future;

use cbus_client::systemd::rollout::{Amount, Rollout, Step};
use cbus_protocol::ErrorCode;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::requests::MachineResult;

/// A request's rolling options, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rolling {
    pub batch: Amount,
    pub max_fail: Amount,
}

impl Rolling {
    /// From the request's `batch` and `max_fail` (the CLI's `--batch` and `--max-fail`
    /// syntax: `3`, `25%`); `None` when neither is given.
    pub(super) fn parse(
        batch: Option<&str>,
        max_fail: Option<&str>,
    ) -> Result<Option<Rolling>, String> {
        let batch = match (batch, max_fail) {
            (None, None) => return Ok(None),
            (None, Some(_)) => return Err("max_fail needs batch".into()),
            (Some(b), _) => Amount::parse_batch(b).map_err(|e| format!("batch: {e}"))?,
        };
        let max_fail = match max_fail {
            Some(m) => Amount::parse(m).map_err(|e| format!("max_fail: {e}"))?,
            None => Amount::Count(0),
        };
        Ok(Some(Rolling { batch, max_fail }))
    }
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
    pub(super) fn new(total: usize, rolling: Rolling, ask: F) -> Self {
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
        assert_eq!(Rolling::parse(None, None), Ok(None));
        assert!(Rolling::parse(None, Some("1")).is_err());
        assert!(Rolling::parse(Some("0"), None).is_err());
        assert!(Rolling::parse(Some("x"), None).is_err());
        assert_eq!(
            Rolling::parse(Some("25%"), Some("2")),
            Ok(Some(Rolling {
                batch: Amount::Percent(25),
                max_fail: Amount::Count(2)
            }))
        );
    }

    #[tokio::test]
    async fn a_failure_beyond_max_fail_stops_new_machines() {
        let rolling = Rolling {
            batch: Amount::Count(1),
            max_fail: Amount::Count(0),
        };
        // Machine 1 fails: 0 and 1 ran, 2..5 never started.
        let mut d = Driver::new(5, rolling, |i| async move {
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
}
