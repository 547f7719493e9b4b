//! The refresh of what systemd changes without a signal: a service's TasksCurrent, a socket's
//! connection counts and the manager's SystemState (the rest is signalled, or constant until a
//! daemon-reload, which reloads the machine).
//!
//! Every `--systemd-refresh` the running machines are refreshed one after the other, each with
//! a few reads in flight ([`REFRESH_CONCURRENCY`]), only of units in a pinned state
//! ([`super::props::reads`]): the cost is bounded whatever the fleet's size, and a round of a
//! large fleet simply takes longer. How old each machine's values are is exported
//! (`cbus_machine_cache_age_seconds`).

use cbus_client::systemd::get_property;
use cbus_protocol::presence::now_ms;
use tokio::time::MissedTickBehavior;

use super::props::reads;
use super::Units;
use crate::model::signal_mark;

/// Reads in flight for the machine being refreshed (under the global bound too), so a refresh
/// never crowds out the loading of joining machines.
const REFRESH_CONCURRENCY: usize = 4;

impl Units {
    pub(super) async fn refresh_loop(self) {
        if self.refresh.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.refresh);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick is now: machines were just loaded.
        tick.tick().await;
        loop {
            tick.tick().await;
            for nkey in self.store.running_nkeys() {
                self.refresh_machine(&nkey).await;
            }
        }
    }

    async fn refresh_machine(&self, nkey: &str) {
        let (Some(target), Some(units)) = (self.store.target(nkey), self.store.loaded_units(nkey))
        else {
            return; // not loaded yet: its load reads everything
        };
        let mark = signal_mark();
        let mut queries = Vec::new();
        for (name, path, active) in units {
            for (iface, prop) in reads(&name, &active, false) {
                queries.push((name.clone(), get_property(&path, iface, prop)));
            }
        }
        self.read_system(&target, false).await;
        let patches = self
            .read_units(&target, queries, REFRESH_CONCURRENCY, false)
            .await;
        self.store.patch_units(nkey, &patches, mark);
        self.store.synced(nkey, now_ms());
    }
}
