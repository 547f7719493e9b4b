//! Per-machine series of the systemd manager and of the cache itself, rendered at each scrape
//! (one or a few lines per machine): node_exporter's `system_running` and `version`, the system
//! state one-hot, and how old the machine's unsignalled values are.

use std::fmt::Write as _;

use super::{esc, family, Selection};
use crate::model::{Machine, SYSTEM_STATES};

pub(super) fn render(out: &mut String, machines: &[&Machine], now_ms: u64, sel: &Selection) {
    if sel.wants("cbus_systemd_system_running") {
        family(
            out,
            "cbus_systemd_system_running",
            "gauge",
            "1 when systemd's SystemState is running (`systemctl is-system-running`).",
        );
        for m in machines.iter().filter(|m| !m.system.state.is_empty()) {
            let running = u8::from(m.system.state == "running");
            let _ = writeln!(
                out,
                "cbus_systemd_system_running{{host=\"{}\"}} {running}",
                esc(&m.info.hostname)
            );
        }
    }
    if sel.wants("cbus_systemd_system_state") {
        family(
            out,
            "cbus_systemd_system_state",
            "gauge",
            "systemd's SystemState, one-hot over the states.",
        );
        for m in machines.iter().filter(|m| !m.system.state.is_empty()) {
            let host = esc(&m.info.hostname);
            for state in SYSTEM_STATES {
                let v = u8::from(m.system.state == state);
                let _ = writeln!(
                    out,
                    "cbus_systemd_system_state{{host=\"{host}\",state=\"{state}\"}} {v}"
                );
            }
        }
    }
    if sel.wants("cbus_systemd_version") {
        family(
            out,
            "cbus_systemd_version",
            "gauge",
            "systemd's version as a number (as node_exporter parses it); the label is the full one.",
        );
        for m in machines.iter().filter(|m| !m.system.version.is_empty()) {
            let _ = writeln!(
                out,
                "cbus_systemd_version{{host=\"{}\",version=\"{}\"}} {}",
                esc(&m.info.hostname),
                esc(&m.system.version),
                version_number(&m.system.version)
            );
        }
    }
    if !sel.wants("cbus_machine_cache_age_seconds") {
        return;
    }
    family(
        out,
        "cbus_machine_cache_age_seconds",
        "gauge",
        "Seconds since the machine's units were last read in full or refreshed; signalled changes arrive in between.",
    );
    for m in machines {
        if let Some(at) = m.synced_ms {
            let _ = writeln!(
                out,
                "cbus_machine_cache_age_seconds{{host=\"{}\"}} {:.3}",
                esc(&m.info.hostname),
                now_ms.saturating_sub(at) as f64 / 1000.0
            );
        }
    }
}

/// node_exporter's reading of a version: the first run of three or more digits, with the
/// fraction after it (`252.39-1~deb12u2` -> 252.39); 0 when there is none.
fn version_number(v: &str) -> f64 {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i - start >= 3 {
            let mut end = i;
            if end + 1 < b.len() && b[end] == b'.' && b[end + 1].is_ascii_digit() {
                end += 1;
                while end < b.len() && b[end].is_ascii_digit() {
                    end += 1;
                }
            }
            return v[start..end].parse().unwrap_or(0.0);
        }
        i = i.max(start + 1);
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::version_number;

    #[test]
    fn versions_parse_as_node_exporter_does() {
        assert_eq!(version_number("252.39-1~deb12u2"), 252.39);
        assert_eq!(version_number("systemd 255 (255.4-1ubuntu8)"), 255.0);
        assert_eq!(version_number("v12.3"), 0.0);
        assert_eq!(version_number("249."), 249.0);
        assert_eq!(version_number(""), 0.0);
    }
}
