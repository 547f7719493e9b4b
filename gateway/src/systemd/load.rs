//! Loading a machine's units: `Subscribe`, one `ListUnits`, then what ListUnits does not carry
//! (timestamps, restart counts, types, unit-file states, task, socket and timer counts, the
//! manager's state and version), read with targeted `get`s ([`super::props::reads`]).
//!
//! Machines to load are a set, not a queue: an agent that claims to restart a thousand times a
//! second (a hello with a new start time each) costs one pending entry, and one load of it at a
//! time; a reload asked for while it loads runs once after.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cbus_client::systemd;
use cbus_protocol::envelope::ErrorCode;
use cbus_protocol::presence::AgentState;
use tokio::sync::Semaphore;

use super::Units;
use crate::model::signal_mark;
use crate::requests::{ask, MachineResult};

/// Machines loaded at once.
const MACHINE_CONCURRENCY: usize = 8;

/// The pause before a machine whose units could not be listed (no answer, agent away) is
/// listed again: agents reconnect with jitter over a few seconds after a NATS restart.
const LIST_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// Machines to (re)load, or to read.
#[derive(Default)]
pub(super) struct Joins {
    state: Mutex<JoinState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct JoinState {
    pending: HashSet<String>,
    loading: HashSet<String>,
}

impl Joins {
    fn lock(&self) -> MutexGuard<'_, JoinState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn request(&self, nkey: String) {
        let mut s = self.lock();
        let wake = !s.loading.contains(&nkey);
        s.pending.insert(nkey);
        drop(s);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The pending machines that are not loading now; they are loading from here on.
    fn take_ready(&self) -> Vec<String> {
        let mut s = self.lock();
        let JoinState { pending, loading } = &mut *s;
        let ready: Vec<String> = pending
            .iter()
            .filter(|n| !loading.contains(*n))
            .cloned()
            .collect();
        for n in &ready {
            pending.remove(n);
            loading.insert(n.clone());
        }
        ready
    }

    fn done(&self, nkey: &str) {
        let mut s = self.lock();
        s.loading.remove(nkey);
        let again = s.pending.contains(nkey);
        drop(s);
        if again {
            self.wake.notify_one();
        }
    }
}

/// The two stages of a load, each a set of machines served at bounded concurrency: listing
/// (Subscribe + ListUnits: the units and their states) and reading (the targeted gets). A
/// machine's list never waits for other machines' reads: after a join storm every machine's
/// states are right as soon as it is listed, and the slower reads follow.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
    List,
    Read,
}

impl Units {
    /// Serves one stage: coalesces bursts and bounds concurrency.
    pub(super) async fn load_loop(self, stage: Stage) {
        let joins = match stage {
            Stage::List => Arc::clone(&self.joins),
            Stage::Read => Arc::clone(&self.full_reads),
        };
        let machines = Arc::new(Semaphore::new(MACHINE_CONCURRENCY));
        loop {
            joins.wake.notified().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            for nkey in joins.take_ready() {
                let Ok(permit) = machines.clone().acquire_owned().await else {
                    return;
                };
                let (this, joins) = (self.clone(), Arc::clone(&joins));
                tokio::spawn(async move {
                    match stage {
                        Stage::List => this.load_machine(&nkey).await,
                        Stage::Read => this.read_machine(&nkey, true).await,
                    }
                    drop(permit);
                    joins.done(&nkey);
                });
            }
        }
    }

    /// Subscribe + one ListUnits for one machine, then its reads are queued.
    async fn load_machine(&self, nkey: &str) {
        let Some(target) = self.store.target(nkey) else {
            return;
        };
        self.pending().forget_machine(nkey);
        let host = target.info.hostname.clone();
        // Without a subscriber systemd sends no unit signals on the system bus. The agent's
        // policy must allow this call (it only makes systemd emit signals).
        match ask(&self.fleet, &target, &systemd::subscribe(), self.timeout).await {
            MachineResult::Ok(_) => {}
            // Subscriptions belong to the agent's bus connection, which outlives our requests.
            MachineResult::Failed(e)
                if e.dbus_name.as_deref() == Some("org.freedesktop.systemd1.AlreadySubscribed") => {
            }
            other => {
                tracing::warn!(%host, outcome = ?other, "systemd Subscribe failed: unit changes made outside systemctl may arrive late (allow Manager.Subscribe in the agent policy)")
            }
        }
        // Signals applied after this are newer than the list.
        let mark = signal_mark();
        let list = match ask(&self.fleet, &target, &systemd::list_units(), self.timeout).await {
            MachineResult::Ok(s) => s.value,
            other => {
                tracing::info!(%host, outcome = ?other, "could not list units");
                if matches!(&other, MachineResult::TimedOut)
                    || matches!(&other, MachineResult::Failed(e)
                        if matches!(e.code, ErrorCode::Timeout | ErrorCode::Disconnected))
                {
                    self.list_again_later(nkey);
                }
                return;
            }
        };
        // A reply without its list changes nothing (an empty list would empty the machine).
        let Some(rows) = list.get(0) else {
            return;
        };
        let units = systemd::unit_rows(rows);
        tracing::info!(%host, units = units.len(), "units listed");
        self.store.replace_units(nkey, units, mark);
        self.full_reads.request(nkey.to_owned());
    }

    /// Lists a machine again after [`LIST_AGAIN_AFTER`] if it is still running: a list that
    /// could not be had (after a NATS restart the gateway is often back before the agents, or
    /// the agent timed out) would otherwise leave its units as they were until each unit's next
    /// signal. At most one list per machine per interval, for as long as it runs and fails.
    fn list_again_later(&self, nkey: &str) {
        let (joins, store, nkey) = (Arc::clone(&self.joins), self.store.clone(), nkey.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(LIST_AGAIN_AFTER).await;
            if store
                .target(&nkey)
                .is_some_and(|t| t.state == AgentState::Running)
            {
                joins.request(nkey);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_loads_once_at_a_time_however_often_it_is_asked() {
        let j = Joins::default();
        for _ in 0..1000 {
            j.request("A".into());
        }
        j.request("B".into());
        let mut first = j.take_ready();
        first.sort();
        assert_eq!(first, ["A", "B"]);
        j.request("A".into());
        assert!(j.take_ready().is_empty(), "A is loading");
        j.done("A");
        assert_eq!(
            j.take_ready(),
            ["A"],
            "asked again while loading: once more"
        );
        j.done("A");
        j.done("B");
        assert!(j.take_ready().is_empty());
    }
}
