//! systemd's signals: unit PropertiesChanged, and the Manager's UnitNew, UnitRemoved and
//! Reloading.

use cbus_client::headers;
use cbus_client::systemd::{systemd_signal, ManagerSignal, PropertiesChanged};
use futures::StreamExt;
use serde_json::Value;

use super::props::unit_change;
use super::work::{Check, Fetch};
use super::Units;
use crate::nats::refused;
use crate::store::UnitAt;

impl Units {
    pub(super) async fn unit_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            if headers::get(h, headers::MEMBER) != Some(PropertiesChanged::MEMBER) {
                continue;
            }
            let nkey = match systemd_signal(&msg.subject, h) {
                Ok(nkey) => nkey,
                Err(e) => {
                    refused(&msg.subject, &e);
                    continue;
                }
            };
            let Some(path) = headers::get(h, headers::PATH) else {
                continue;
            };
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let Some(change) = PropertiesChanged::from_args(&args)
                .as_ref()
                .and_then(unit_change)
            else {
                continue;
            };
            match self.store.patch_unit_at(nkey, path, &change.changed) {
                UnitAt::Unit {
                    name: unit,
                    failed_changed,
                    unread,
                } => {
                    if failed_changed {
                        // running <-> degraded, which systemd does not signal.
                        self.enqueue_system(nkey);
                    }
                    if unread {
                        // Announced while in a state not read (UnitNew of an inactive unit).
                        self.enqueue_read(nkey, &unit);
                    }
                    self.enqueue_fetch(
                        change
                            .invalidated
                            .iter()
                            .map(|property| Fetch {
                                machine: nkey.to_owned(),
                                unit: unit.clone(),
                                path: path.to_owned(),
                                interface: change.interface,
                                property,
                            })
                            .collect(),
                    )
                }
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
            match p.checks.get_mut(&key) {
                None => self.enqueue_check(&mut p, key),
                // Its answer may predate this change (`Check::Changed`).
                Some(c @ Check::Queued) => *c = Check::Changed,
                Some(_) => {}
            }
        }
    }

    pub(super) async fn manager_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            let signal = match ManagerSignal::decode(h, &msg.payload) {
                Some(
                    s @ (ManagerSignal::UnitNew { .. }
                    | ManagerSignal::UnitRemoved { .. }
                    | ManagerSignal::Reloading { .. }),
                ) => s,
                Some(ManagerSignal::JobRemoved(_)) | None => continue,
            };
            let nkey = match systemd_signal(&msg.subject, h) {
                Ok(nkey) => nkey,
                Err(e) => {
                    refused(&msg.subject, &e);
                    continue;
                }
            };
            match signal {
                // Unit files may have appeared: names systemd had not found may exist now.
                ManagerSignal::Reloading { active: true } => self.pending().forget_machine(nkey),
                // Types, load and unit-file states (`systemctl enable` reloads) may have
                // changed, none of them signalled: the machine is read again, once however
                // many reloads come (`Joins`).
                ManagerSignal::Reloading { active: false } => {
                    self.pending().forget_machine(nkey);
                    self.reload(nkey.to_owned());
                }
                ManagerSignal::UnitNew { name, .. } => self.unit_new(nkey, &name),
                ManagerSignal::UnitRemoved { name, .. } => {
                    let key = (nkey.to_owned(), name);
                    if let Some(c) = self.pending().checks.get_mut(&key) {
                        *c = Check::Removed;
                    }
                    self.store.unit_removed(nkey, &key.1);
                }
                ManagerSignal::JobRemoved(_) => {}
            }
        }
    }
}
