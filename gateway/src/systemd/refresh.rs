//! The refresh of what systemd changes without a signal: a service's TasksCurrent, a socket's
//! connection counts and the manager's SystemState (the rest is signalled, or constant until a
//! daemon-reload, which reloads the machine).
//!
//! Every `--systemd-refresh` the running machines are refreshed one after the other, each with
//! a few reads in flight ([`super::REFRESH_CONCURRENCY`]), only of units in a pinned state
//! ([`super::props::reads`]): the cost is bounded whatever the fleet's size, and a round of a
//! large fleet simply takes longer. How old each machine's values are is exported
//! (`cbus_machine_cache_age_seconds`).

use tokio::time::MissedTickBehavior;

use super::Units;

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
                self.read_machine(&nkey, false).await;
            }
        }
    }
}
