//! Follow-up work on units, through one bounded queue served by one worker: checking a unit
//! systemd announced (UnitNew) without loading it, and reading back properties a signal only
//! invalidated.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cbus_client::systemd::{self, get_property};
use futures::stream::{self, StreamExt};
use tokio::sync::mpsc;

use super::props::unit_prop;
use super::Units;
use crate::model::{is_readable, signal_mark};
use crate::requests::{ask, MachineResult};
use crate::stats::{self, Dropped};

/// Follow-up work queued at most. A busy fleet makes a few per second; 1,024 is minutes of
/// that, and a few hundred KB at most.
pub(super) const WORK_QUEUE: usize = 1024;
/// Work items the worker runs at once (each one round trip to one machine).
const WORK_CONCURRENCY: usize = 8;
/// Unit names systemd said it does not have, remembered at most, over all machines.
const NOT_FOUND_MAX: usize = 4096;
/// How long such a name is not asked about again (a daemon-reload forgets them at once).
const NOT_FOUND_TTL: Duration = Duration::from_secs(60);

/// A property read the worker should make because a signal only invalidated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fetch {
    pub machine: String,
    pub unit: String,
    pub path: String,
    pub interface: &'static str,
    pub property: &'static str,
}

/// What the worker does.
pub(super) enum Work {
    /// A UnitNew: ask systemd, without loading the unit, whether it is loaded and found.
    CheckUnit { nkey: String, name: String },
    /// Properties a systemd signal only invalidated.
    Fetch(Vec<Fetch>),
    /// The manager's SystemState, which may have changed with a unit's failure.
    System { nkey: String },
    /// A unit never read in full that reached a readable state.
    Read { nkey: String, name: String },
}

/// What happened to a unit since its check was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    Queued,
    /// UnitRemoved came: the answer may be stale; drop it.
    Removed,
    /// UnitNew came again after a UnitRemoved: check once more when this one is done.
    Renewed,
    /// A change of the unit was signalled while it was checked (a service that started and
    /// failed at once): the answer may predate it, so the unit is followed with it and checked
    /// once more. Signals after that patch the followed unit, so this ends.
    Changed,
}

#[derive(Default)]
pub(super) struct Pending {
    /// (nkey, unit) -> state, for checks queued or in flight: at most one per unit.
    pub checks: HashMap<(String, String), Check>,
    /// (nkey, unit) -> when systemd said it has no such unit.
    pub not_found: HashMap<(String, String), Instant>,
    /// (nkey, unit) of full reads queued or in flight: at most one per unit.
    pub reads: HashSet<(String, String)>,
}

impl Pending {
    fn remember_not_found(&mut self, key: (String, String)) {
        if self.not_found.len() >= NOT_FOUND_MAX {
            self.not_found.retain(|_, t| t.elapsed() < NOT_FOUND_TTL);
        }
        if self.not_found.len() >= NOT_FOUND_MAX {
            // Still full of fresh names (someone reads made-up units fast): forget one; the
            // worst case is one more check for it, never a load.
            if let Some(k) = self.not_found.keys().next().cloned() {
                self.not_found.remove(&k);
            }
        }
        self.not_found.insert(key, Instant::now());
    }

    fn known_not_found(&self, key: &(String, String)) -> bool {
        self.not_found
            .get(key)
            .is_some_and(|t| t.elapsed() < NOT_FOUND_TTL)
    }

    pub(super) fn forget_machine(&mut self, nkey: &str) {
        self.not_found.retain(|(n, _), _| n != nkey);
    }
}

impl Units {
    /// Queues a check of a unit systemd just loaded, unless one is queued already or systemd
    /// recently said it has no such unit.
    pub(super) fn unit_new(&self, nkey: &str, name: &str) {
        if !self.store.wants_unit(nkey, name) {
            return;
        }
        let key = (nkey.to_owned(), name.to_owned());
        let mut p = self.pending();
        if p.known_not_found(&key) {
            return;
        }
        if let Some(c) = p.checks.get_mut(&key) {
            if *c == Check::Removed {
                *c = Check::Renewed;
            }
            return;
        }
        self.enqueue_check(&mut p, key);
    }

    pub(super) fn enqueue_check(&self, p: &mut Pending, key: (String, String)) {
        let work = Work::CheckUnit {
            nkey: key.0.clone(),
            name: key.1.clone(),
        };
        match self.work.try_send(work) {
            Ok(()) => {
                p.checks.insert(key, Check::Queued);
            }
            Err(_) => stats::dropped(Dropped::WorkQueueFull),
        }
    }

    /// Queues a read of the machine's SystemState.
    pub(super) fn enqueue_system(&self, nkey: &str) {
        let work = Work::System {
            nkey: nkey.to_owned(),
        };
        if self.work.try_send(work).is_err() {
            stats::dropped(Dropped::WorkQueueFull);
        }
    }

    /// Queues a full read of a unit, unless one is queued already.
    pub(super) fn enqueue_read(&self, nkey: &str, name: &str) {
        let key = (nkey.to_owned(), name.to_owned());
        let mut p = self.pending();
        if p.reads.contains(&key) {
            return;
        }
        let work = Work::Read {
            nkey: key.0.clone(),
            name: key.1.clone(),
        };
        match self.work.try_send(work) {
            Ok(()) => {
                p.reads.insert(key);
            }
            Err(_) => stats::dropped(Dropped::WorkQueueFull),
        }
    }

    /// Queues reads of invalidated properties.
    pub(super) fn enqueue_fetch(&self, fetch: Vec<Fetch>) {
        if !fetch.is_empty() && self.work.try_send(Work::Fetch(fetch)).is_err() {
            stats::dropped(Dropped::WorkQueueFull);
        }
    }

    /// Runs queued work, [`WORK_CONCURRENCY`] items at a time; the queue stays bounded because
    /// nothing is taken from it while that many are running.
    pub(super) async fn work_loop(self, rx: mpsc::Receiver<Work>) {
        let items = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
        items
            .for_each_concurrent(WORK_CONCURRENCY, |w| {
                let this = self.clone();
                async move {
                    match w {
                        Work::CheckUnit { nkey, name } => this.check_unit(nkey, name).await,
                        Work::Fetch(f) => this.fetch(f).await,
                        Work::Read { nkey, name } => {
                            this.read_unit(&nkey, &name).await;
                            this.pending().reads.remove(&(nkey, name));
                        }
                        Work::System { nkey } => {
                            if let Some(target) = this.store.target(&nkey) {
                                this.read_system(&target, false).await;
                            }
                        }
                    }
                }
            })
            .await;
    }

    async fn fetch(self, fetch: Vec<Fetch>) {
        let Some(first) = fetch.first() else {
            return;
        };
        let Some(target) = self.store.target(&first.machine) else {
            return;
        };
        let mark = signal_mark();
        let mut patches = Vec::new();
        for f in &fetch {
            let q = get_property(&f.path, f.interface, f.property);
            if let Some(prop) = self
                .get(&target, q)
                .await
                .and_then(|(k, v)| unit_prop(&k, &v))
            {
                patches.push((f.unit.clone(), vec![prop]));
            }
        }
        self.store.patch_units(&first.machine, &patches, mark);
    }

    /// Asks systemd about a unit it announced, without loading it (ListUnitsByPatterns lists
    /// loaded units only), and follows it if it is loaded and found.
    async fn check_unit(self, nkey: String, name: String) {
        stats::unit_checked();
        let key = (nkey, name);
        let row = match self.store.target(&key.0) {
            None => None,
            Some(target) => {
                let q = systemd::list_unit(&key.1);
                let _permit = self.gets.acquire().await;
                match ask(&self.fleet, &target, &q, self.timeout).await {
                    MachineResult::Ok(s) => Some(
                        systemd::units_of_reply(&s.value)
                            .into_iter()
                            .find(|u| u.name == key.1),
                    ),
                    other => {
                        tracing::debug!(unit = %key.1, outcome = ?other, "unit check failed");
                        None
                    }
                }
            }
        };
        let state = self.pending().checks.remove(&key);
        let Some(row) = row else {
            return; // the check failed: the next UnitNew or reload tries again
        };
        if row.as_ref().is_some_and(|u| u.is_not_found()) {
            // Whatever happened since, systemd had no such unit when asked.
            self.pending().remember_not_found(key);
            return;
        }
        let again = match state {
            Some(Check::Queued) => false,
            Some(Check::Changed) => true,
            Some(Check::Renewed) => {
                // Loaded again after it was removed: this answer may predate that.
                let mut p = self.pending();
                self.enqueue_check(&mut p, key);
                return;
            }
            Some(Check::Removed) | None => return,
        };
        // Not loaded (any more): nothing to follow until systemd loads it again (UnitNew).
        let Some(row) = row else {
            return;
        };
        if !self.store.add_unit(&key.0, row) {
            return;
        }
        if again {
            let mut p = self.pending();
            self.enqueue_check(&mut p, key.clone());
        }
        let (nkey, name) = key;
        self.read_unit(&nkey, &name).await;
    }

    /// Reads a followed unit in full if it is in a state where that loads nothing.
    async fn read_unit(&self, nkey: &str, name: &str) {
        let (Some(target), Some((path, active, _))) =
            (self.store.target(nkey), self.store.unit_state(nkey, name))
        else {
            return;
        };
        // Reading an object loads its unit: only units systemd cannot unload meanwhile are read.
        if !is_readable(&active) {
            return;
        }
        let mark = signal_mark();
        let queries = super::queries(vec![(name.to_owned(), path, active)], true);
        let patches = self.read_units(&target, queries, 1, true).await;
        self.store.patch_units(nkey, &patches, mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_are_bounded() {
        let mut p = Pending::default();
        for i in 0..NOT_FOUND_MAX + 10 {
            p.remember_not_found(("U".into(), format!("u{i}.service")));
        }
        assert_eq!(p.not_found.len(), NOT_FOUND_MAX);
        assert!(p.known_not_found(&("U".into(), format!("u{}.service", NOT_FOUND_MAX + 9))));
        p.forget_machine("U");
        assert!(p.not_found.is_empty());
    }
}
