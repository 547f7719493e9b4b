//! The Prometheus alert rules and the Grafana dashboard in deploy/, checked with the real
//! promtool: the rules parse and their unit tests pass (deploy/prometheus/cbus.rules.test.yml:
//! an HA gateway pair fires one alert per machine, a machine is down only when no gateway sees
//! it, a unit failed on three machines is fleet-wide), and every dashboard query is valid PromQL
//! over metric names cbus serves.

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(rel)
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool (apt-get install prometheus, or ./dev deps)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Metric names cbus serves at the gateway's /metrics: its own families and the agents'
/// (forwarded with a `host` label), as the gateway's and the agent's code spell them.
fn served_names() -> Vec<String> {
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root.join("gateway/src"), &mut files);
    rust_files(&root.join("agent/src"), &mut files);
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut rest = text.as_str();
        while let Some(i) = rest.find("\"cbus_") {
            let name: String = rest[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
            rest = &rest[i + 1..];
        }
    }
    assert!(names.len() > 5, "no metric names found in the sources");
    names
}

#[test]
fn alert_rules_parse_and_their_unit_tests_pass() {
    let dir = deploy("prometheus");
    let checked = promtool(&["check", "rules", "cbus.rules.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "cbus.rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn dashboard_queries_are_promql_over_served_metrics() {
    let text = std::fs::read_to_string(deploy("grafana/cbus-fleet.json")).expect("dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    assert_eq!(dashboard["uid"], "cbus-fleet");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 8, "{exprs:?}");

    // Grafana's variables replaced as Grafana would, then each query checked by promtool as the
    // expression of a recording rule.
    let served = served_names();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$host", ".*");
        let mut rest = expr.as_str();
        while let Some(i) = rest.find("cbus_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                served.contains(&name),
                "the dashboard queries {name}, which cbus does not serve"
            );
            rest = &rest[i + name.len()..];
        }
        rules.push_str(&format!(
            "      - record: cbus:dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules).unwrap();
    let checked = promtool(&["check", "rules", "dashboard.rules.yml"], dir.path());
    assert!(
        checked.contains(&format!("{} rules found", exprs.len())),
        "{checked}"
    );
}
