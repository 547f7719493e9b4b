//! Unit rows for snapshots: the units of some machines whose names match, looked up by the
//! glob's literal prefix in each machine's sorted units rather than matched one by one.

use super::Store;
use crate::model::UnitRow;

impl Store {
    /// Units of the machines `keep_machine` accepts, whose names start with `prefix` (a range
    /// of each machine's sorted units) and `keep_unit` accepts.
    pub(crate) fn unit_rows(
        &self,
        keep_machine: impl Fn(&str) -> bool,
        prefix: &str,
        keep_unit: impl Fn(&str) -> bool,
    ) -> Vec<UnitRow> {
        let m = self.read();
        m.values()
            .filter(|m| keep_machine(&m.info.nkey))
            .flat_map(|machine| {
                machine
                    .units()
                    .range::<str, _>((
                        std::ops::Bound::Included(prefix),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(n, _)| n.starts_with(prefix))
                    .filter(|(n, _)| keep_unit(n))
                    .map(|(n, u)| machine.unit_row(n, u))
            })
            .collect()
    }
}
