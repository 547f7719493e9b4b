//! systemd's signals: unit PropertiesChanged, and the Manager's UnitNew, UnitRemoved and
//! Reloading.

use async_nats::HeaderMap;
use cbus_client::headers;
use futures::StreamExt;
use serde_json::Value;

use super::bus::{self, SYSTEMD};
use super::work::{Check, Fetch};
use super::Units;
use crate::nats::signal_machine;
use crate::stats::{self, Dropped};
use crate::store::UnitAt;

/// Whether a signal that would change unit state comes from systemd; counts those that don't.
fn from_systemd(h: Option<&HeaderMap>) -> bool {
    let ok = headers::sender_owns(h, SYSTEMD);
    if !ok {
        stats::dropped(Dropped::NotFromSystemd);
    }
    ok
}

impl Units {
    pub(super) async fn unit_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            if headers::get(h, headers::MEMBER) != Some("PropertiesChanged") {
                continue;
            }
            let Some(nkey) = signal_machine(&msg.subject, h) else {
                continue;
            };
            if !from_systemd(h) {
                continue;
            }
            let Some(path) = headers::get(h, headers::PATH) else {
                continue;
            };
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let Some(signal) = bus::properties_changed(&args) else {
                continue;
            };
            match self.store.patch_unit_at(nkey, path, &signal.changed) {
                UnitAt::Unit(unit) => self.enqueue_fetch(
                    signal
                        .invalidated
                        .iter()
                        .map(|property| Fetch {
                            machine: nkey.to_owned(),
                            unit: unit.clone(),
                            path: path.to_owned(),
                            interface: signal.interface,
                            property,
                        })
                        .collect(),
                ),
                UnitAt::Unfollowed => self.unfollowed(nkey, path),
                UnitAt::Ignored => {}
            }
        }
    }

    /// systemd reports a change of a unit the store does not follow: it is loaded now (e.g.
    /// found since it was last checked). Checking loads nothing.
    fn unfollowed(&self, nkey: &str, path: &str) {
        let Some(name) = cbus_protocol::token::systemd_unit_of_path(path) else {
            return;
        };
        if self.store.wants_unit(nkey, &name) {
            let key = (nkey.to_owned(), name);
            let mut p = self.pending();
            p.not_found.remove(&key);
            if !p.checks.contains_key(&key) {
                self.enqueue_check(&mut p, key);
            }
        }
    }

    pub(super) async fn manager_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            let Some(nkey) = signal_machine(&msg.subject, h) else {
                continue;
            };
            let member = headers::get(h, headers::MEMBER);
            if !matches!(member, Some("UnitNew" | "UnitRemoved" | "Reloading")) {
                continue;
            }
            if !from_systemd(h) {
                continue;
            }
            if member == Some("Reloading") {
                // Unit files may have appeared: names systemd had not found may exist now.
                self.pending().forget_machine(nkey);
                continue;
            }
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let Some(name) = args.get(0).and_then(Value::as_str) else {
                continue;
            };
            match member {
                Some("UnitNew") => self.unit_new(nkey, name),
                Some("UnitRemoved") => {
                    let key = (nkey.to_owned(), name.to_owned());
                    if let Some(c) = self.pending().checks.get_mut(&key) {
                        *c = Check::Removed;
                    }
                    self.store.unit_removed(nkey, name);
                }
                _ => {}
            }
        }
    }
}
