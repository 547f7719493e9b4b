//! Operators' maintenance marks on the machines ([`Machine::maintenance`]): set from the
//! gateway's watch of the `cbus-maintenance` bucket, kept for machines not seen yet until they
//! appear.

use std::collections::HashMap;
use std::sync::MutexGuard;

use cbus_client::fleet::Maintenance;
use cbus_protocol::presence::now_ms;

use super::Store;
use crate::changes::Change;
#[cfg(doc)]
use crate::model::Machine;

/// The most maintenance marks kept for machines not seen yet (a fleet's worth).
const EARLY_MARKS_MAX: usize = 100_000;

impl Store {
    pub(super) fn early_marks(&self) -> MutexGuard<'_, HashMap<String, Maintenance>> {
        self.early_marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or with `None` clears) a machine's maintenance mark.
    pub(crate) fn set_maintenance(&self, nkey: &str, mark: Option<Maintenance>) {
        let now = now_ms();
        let mut m = self.write();
        let Some(machine) = m.get_mut(nkey) else {
            let mut early = self.early_marks();
            match mark {
                // Bounded: only operators write marks, but a bucket full of marks for machines
                // that never come must not grow the gateway without end.
                Some(mark) if early.len() < EARLY_MARKS_MAX => {
                    early.insert(nkey.to_owned(), mark);
                }
                Some(_) => tracing::warn!(nkey, "too many marks of unknown machines; ignored"),
                None => {
                    early.remove(nkey);
                }
            }
            return;
        };
        machine.mark = mark;
        machine.reported_maintenance = machine.maintenance(now).is_some();
        self.emit(Change::Machine(machine.row(now)));
    }
}
