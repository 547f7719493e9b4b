//! systemd ingestion: the tasks that keep the units in the [`Store`] current.
//!
//! - unit PropertiesChanged (`dbus.signals.*.*.org.freedesktop.systemd1.unit.>`), applied from
//!   the payload, with a targeted `get` for followed properties that were only invalidated;
//! - systemd Manager `UnitNew`/`UnitRemoved`/`Reloading` (`dbus.signals.*.*.org.freedesktop.systemd1`);
//! - the loader ([`load`]): when a machine joins, restarts or its bus comes back, it asks systemd
//!   to emit signals (`Subscribe`; systemd only sends unit signals on the system bus while a
//!   client is subscribed), runs one `ListUnits`, and reads the timestamps and restart counts
//!   ListUnits does not carry with targeted `get`s at bounded concurrency. Never per scrape or
//!   per client.
//!
//! What systemd's D-Bus API is (Manager calls, ListUnits rows, unit names, variants, signal
//! subjects, which signals are systemd's) is `cbus_client::systemd`, shared with the CLI; this
//! module decides what the gateway follows and when it asks. Unit state is taken only from
//! signals whose sender owns `org.freedesktop.systemd1`, on the machine of the signal's subject
//! (`cbus_client::systemd::systemd_signal`); what is dropped is counted
//! (`cbus_gateway_dropped_total`).
//!
//! Reading a unit's object loads it (systemd loads units on access). A gateway that answered
//! UnitNew by reading the unit loaded it again after systemd unloaded it, for ever: one
//! `systemctl status nosuch.service` on a host made 3,000-5,000 signals/s (Cockpit #22393 is the
//! same loop). So a UnitNew only queues a check with `ListUnitsByPatterns`, which lists loaded
//! units and loads nothing; not-found units are remembered (bounded, for a while) and never
//! followed, one check per machine and unit is in flight at most, and all follow-up work goes
//! through one bounded queue served by one worker ([`work`]): a full queue drops and counts, it
//! never spawns a task per signal.

mod load;
mod props;
mod refresh;
mod signals;
mod work;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Fleet, Query};
use cbus_client::systemd::{get_property, manager_signals, unit_signals, MANAGER, MANAGER_PATH};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, Semaphore};

use crate::model::UnitProp;
use props::unit_prop;

use crate::nats::{subscribe, SubscribeError};
use crate::requests::{ask, MachineResult};
use crate::store::Store;
use load::Joins;
use work::{Pending, Work, WORK_QUEUE};

/// Property reads in flight at once, over all machines.
const GET_CONCURRENCY: usize = 32;
/// Reads in flight for the machine being refreshed (under the global bound too), so a refresh
/// never crowds out the loading of joining machines.
const REFRESH_CONCURRENCY: usize = 4;

/// The systemd follower's handles; cheap to clone.
#[derive(Clone)]
pub(crate) struct Units {
    fleet: Fleet,
    store: Store,
    joins: Arc<Joins>,
    /// Machines whose units were listed and are to be read ([`load::Stage::Read`]).
    full_reads: Arc<Joins>,
    gets: Arc<Semaphore>,
    timeout: Duration,
    work: mpsc::Sender<Work>,
    pending: Arc<Mutex<Pending>>,
    /// Interval of the refresh of what changes without signals; zero: never.
    refresh: Duration,
}

impl Units {
    /// Subscribes to systemd's signals and spawns the loader, the worker and the signal loops.
    pub(crate) async fn start(
        fleet: Fleet,
        store: Store,
        timeout: Duration,
        refresh: Duration,
    ) -> Result<Units, SubscribeError> {
        let client = fleet.client().clone();
        let subject = |what, s: Result<String, _>| {
            s.map_err(|source| SubscribeError::Subject { what, source })
        };
        let unit_signals =
            subscribe(&client, &subject("unit signals", unit_signals(None))?).await?;
        let manager_signals =
            subscribe(&client, &subject("manager signals", manager_signals(None))?).await?;
        let (work, work_rx) = mpsc::channel::<Work>(WORK_QUEUE);
        let units = Units {
            fleet,
            store,
            joins: Arc::default(),
            full_reads: Arc::default(),
            gets: Arc::new(Semaphore::new(GET_CONCURRENCY)),
            timeout,
            work,
            pending: Arc::default(),
            refresh,
        };
        tokio::spawn(units.clone().load_loop(load::Stage::List));
        tokio::spawn(units.clone().load_loop(load::Stage::Read));
        tokio::spawn(units.clone().refresh_loop());
        tokio::spawn(units.clone().work_loop(work_rx));
        tokio::spawn(units.clone().unit_signal_loop(unit_signals));
        tokio::spawn(units.clone().manager_signal_loop(manager_signals));
        Ok(units)
    }

    /// (Re)loads a machine's units: it joined, restarted, came back, or signals were lost.
    pub(crate) fn reload(&self, nkey: String) {
        self.joins.request(nkey);
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what signals do not bring of every unit of a loaded machine (`full`: after its
    /// list), or what changes without a signal (a refresh), and the manager's state.
    async fn read_machine(&self, nkey: &str, full: bool) {
        let (Some(target), Some(units)) = (self.store.target(nkey), self.store.loaded_units(nkey))
        else {
            return; // not listed yet: its load reads everything
        };
        // Signals applied after this are newer than the reads.
        let mark = crate::model::signal_mark();
        self.read_system(&target, full).await;
        let concurrency = if full {
            GET_CONCURRENCY
        } else {
            REFRESH_CONCURRENCY
        };
        let patches = self
            .read_units(&target, queries(units, full), concurrency, full)
            .await;
        self.store.patch_units(nkey, &patches, mark);
        self.store.synced(nkey, cbus_protocol::presence::now_ms());
        tracing::debug!(host = %target.info.hostname, units = patches.len(), full, "units read");
    }

    /// Reads properties of a machine's units ((unit, query) pairs) at bounded concurrency, as
    /// patches for the store; failed reads are left out. `full`: the queries are all of
    /// [`props::reads`]`(.., true)` for each unit, which is marked as read in full.
    async fn read_units(
        &self,
        target: &AgentStatus,
        queries: Vec<(String, Query)>,
        concurrency: usize,
        full: bool,
    ) -> Vec<(String, Vec<UnitProp>)> {
        let mut by_unit: BTreeMap<String, Vec<UnitProp>> = BTreeMap::new();
        let mut results = stream::iter(queries)
            .map(|(unit, q)| async move { (unit, self.get(target, q).await) })
            .buffer_unordered(concurrency);
        while let Some((unit, r)) = results.next().await {
            if let Some(prop) = r.and_then(|(k, v)| unit_prop(&k, &v)) {
                by_unit.entry(unit).or_default().push(prop);
            }
        }
        if full {
            for props in by_unit.values_mut() {
                props.push(UnitProp::FullyRead);
            }
        }
        by_unit.into_iter().collect()
    }

    /// Reads the manager's SystemState (which changes without a signal) and, with `version`,
    /// its Version (constant while it runs).
    async fn read_system(&self, target: &AgentStatus, version: bool) {
        let props: &[&str] = if version {
            &["SystemState", "Version"]
        } else {
            &["SystemState"]
        };
        for prop in props {
            let q = get_property(MANAGER_PATH, MANAGER, prop);
            let Some((name, v)) = self.get(target, q).await else {
                continue;
            };
            let text = props::word(&v);
            self.store
                .set_system(&target.info.nkey, |s| match name.as_str() {
                    "Version" => s.version = text,
                    _ => s.state = text,
                });
        }
    }

    /// Reads one property under the global bound.
    async fn get(&self, target: &AgentStatus, query: Query) -> Option<(String, Value)> {
        let _permit = self.gets.acquire().await.ok()?;
        let name = query.member.clone()?;
        match ask(&self.fleet, target, &query, self.timeout).await {
            MachineResult::Ok(s) => Some((name, s.value)),
            other => {
                tracing::debug!(host = %target.info.hostname, property = %name, outcome = ?other, "property read failed");
                None
            }
        }
    }
}

/// The gets of [`props::reads`] for units given as (name, object path, active state).
fn queries(units: Vec<(String, String, String)>, full: bool) -> Vec<(String, Query)> {
    let mut q = Vec::new();
    for (name, path, active) in units {
        for (iface, prop) in props::reads(&name, &active, full) {
            q.push((name.clone(), get_property(&path, iface, prop)));
        }
    }
    q
}
