//! What one scrape asks for, from `/metrics`' URL parameters: node_exporter's `collect[]` and
//! `exclude[]` by family, and a shard of the machines (`shards`, `shard`), so that a large
//! fleet's operator gives each Prometheus job only the series it needs, or splits the fleet over
//! several jobs or servers. Without parameters a scrape is what it always was: every family.

use super::{units, OWN_FAMILIES};

/// The families a scrape may name besides the unit families: the per-machine ones the gateway
/// writes itself ([`OWN_FAMILIES`]), the system families, and two groups whose families are not
/// fixed names: the gateway's own counters (`cbus_gateway_*`) and the agents' forwarded metrics.
pub(super) const SYSTEM: [&str; 3] = [
    "cbus_systemd_system_running",
    "cbus_systemd_system_state",
    "cbus_systemd_version",
];
pub(super) const GATEWAY: &str = "cbus_gateway";
/// Families served only when a scrape names them in collect[]: a scrape without parameters
/// stays what existing dashboards and rules were written against.
const OPT_IN: [&str; 1] = ["cbus_systemd_unit_active_state"];
pub(super) const AGENT_METRICS: &str = "agent_metrics";

/// A `/metrics` query that cannot be served: answered 400, so a typo in a scrape config shows
/// as a failing target rather than as series that silently went missing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("unknown family {0:?} (docs/metrics.md lists the names collect[] and exclude[] take)")]
    UnknownFamily(String),
    #[error("collect[] and exclude[] cannot be combined")]
    CollectAndExclude,
    #[error(
        "shards must be a number from 1 to 4096 and shard one from 0 to shards - 1, both given"
    )]
    BadShard,
    #[error("unknown parameter {0:?} (collect[], exclude[], shards, shard)")]
    UnknownParameter(String),
}

/// One scrape's choice of families and machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// `Some` lists the families wanted (collect[]); `None` is all but `excluded`.
    collect: Option<Vec<String>>,
    excluded: Vec<String>,
    /// (shard, shards): this scrape's machines are those whose nkey hashes to `shard`.
    shard: Option<(u64, u64)>,
}

impl Default for Selection {
    fn default() -> Self {
        Self::all()
    }
}

impl Selection {
    /// Every default family (all but the opt-in ones) of every machine: a scrape without
    /// parameters.
    pub fn all() -> Self {
        Selection {
            collect: None,
            excluded: Vec::new(),
            shard: None,
        }
    }

    /// Reads a URL query (`collect[]=a&collect[]=b&shards=4&shard=0`, percent-encoded or not).
    pub fn parse(query: Option<&str>) -> Result<Self, SelectError> {
        let mut collect = Vec::new();
        let mut excluded = Vec::new();
        let (mut shards, mut shard) = (None, None);
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "collect[]" | "exclude[]" => {
                    if !is_family(&value) {
                        return Err(SelectError::UnknownFamily(value.into_owned()));
                    }
                    let list = if key == "collect[]" {
                        &mut collect
                    } else {
                        &mut excluded
                    };
                    list.push(value.into_owned());
                }
                "shards" => shards = Some(value.parse::<u64>().map_err(|_| SelectError::BadShard)?),
                "shard" => shard = Some(value.parse::<u64>().map_err(|_| SelectError::BadShard)?),
                other => return Err(SelectError::UnknownParameter(other.to_owned())),
            }
        }
        if !collect.is_empty() && !excluded.is_empty() {
            return Err(SelectError::CollectAndExclude);
        }
        let shard = match (shard, shards) {
            (None, None) => None,
            (Some(i), Some(n)) if (1..=4096).contains(&n) && i < n => Some((i, n)),
            _ => return Err(SelectError::BadShard),
        };
        Ok(Selection {
            collect: (!collect.is_empty()).then_some(collect),
            excluded,
            shard,
        })
    }

    /// Whether the scrape wants this family (or group).
    pub fn wants(&self, family: &str) -> bool {
        match &self.collect {
            Some(list) => list.iter().any(|f| f == family),
            None => !OPT_IN.contains(&family) && !self.excluded.iter().any(|f| f == family),
        }
    }

    /// Whether the machine of this nkey is in the scrape's shard. The hash is FNV-1a, fixed,
    /// so a machine stays in its shard across gateways, restarts and versions.
    pub fn has_machine(&self, nkey: &str) -> bool {
        let Some((shard, shards)) = self.shard else {
            return true;
        };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in nkey.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h % shards == shard
    }

    /// Whether the gateway-wide series (its version, its own counters) belong to this scrape:
    /// the first shard's, so that the shards together hold every series exactly once.
    pub fn has_gateway(&self) -> bool {
        self.shard.is_none_or(|(shard, _)| shard == 0)
    }
}

fn is_family(name: &str) -> bool {
    OWN_FAMILIES.contains(&name)
        || SYSTEM.contains(&name)
        || units::FAMILIES.iter().any(|(f, _, _)| *f == name)
        || name == GATEWAY
        || name == AGENT_METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_parameters_is_everything() {
        let s = Selection::parse(None).unwrap();
        assert_eq!(s, Selection::all());
        assert!(s.wants("cbus_systemd_unit_state") && s.wants(AGENT_METRICS));
        assert!(!s.wants("cbus_systemd_unit_active_state"), "opt-in");
        assert!(s.has_machine("UX") && s.has_gateway());
        assert_eq!(Selection::parse(Some("")).unwrap(), Selection::all());
    }

    #[test]
    fn collect_and_exclude_by_family() {
        let s = Selection::parse(Some(
            "collect[]=cbus_systemd_unit_active_state&collect%5B%5D=cbus_agent_up",
        ))
        .unwrap();
        assert!(s.wants("cbus_systemd_unit_active_state") && s.wants("cbus_agent_up"));
        assert!(!s.wants("cbus_systemd_unit_state") && !s.wants(GATEWAY));
        let s = Selection::parse(Some("exclude[]=cbus_systemd_unit_state")).unwrap();
        assert!(!s.wants("cbus_systemd_unit_state") && s.wants("cbus_systemd_unit_info"));
        assert!(!s.wants("cbus_systemd_unit_active_state"), "still opt-in");
        assert_eq!(
            Selection::parse(Some("collect[]=cbus_systemd_unit_stat")),
            Err(SelectError::UnknownFamily("cbus_systemd_unit_stat".into()))
        );
        assert_eq!(
            Selection::parse(Some("collect[]=cbus_agent_up&exclude[]=agent_metrics")),
            Err(SelectError::CollectAndExclude)
        );
        assert_eq!(
            Selection::parse(Some("collect=cbus_agent_up")),
            Err(SelectError::UnknownParameter("collect".into()))
        );
    }

    #[test]
    fn shards_split_the_machines_once() {
        for bad in [
            "shards=4",
            "shard=0",
            "shards=4&shard=4",
            "shards=0&shard=0",
            "shards=x&shard=0",
        ] {
            assert_eq!(
                Selection::parse(Some(bad)),
                Err(SelectError::BadShard),
                "{bad}"
            );
        }
        let shards: Vec<Selection> = (0..4)
            .map(|i| Selection::parse(Some(&format!("shards=4&shard={i}"))).unwrap())
            .collect();
        let mut per_shard = [0; 4];
        for m in 0..1000 {
            let nkey = format!("UMACHINE{m:05}");
            let owners: Vec<usize> = (0..4).filter(|i| shards[*i].has_machine(&nkey)).collect();
            assert_eq!(owners.len(), 1, "{nkey} in {owners:?}");
            per_shard[owners[0]] += 1;
        }
        // The hash spreads them: no shard far from a quarter.
        assert!(
            per_shard.iter().all(|n| (200..300).contains(n)),
            "{per_shard:?}"
        );
        assert!(shards[0].has_gateway() && !shards[1].has_gateway());
    }
}
