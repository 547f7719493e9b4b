//! A real Prometheus server scraping a gateway's `/metrics` in several ways, one after the other
//! in the same run (a fresh server and TSDB for each, so one's memory and series do not weigh on
//! the next): the figure is Prometheus's own scrape duration (`lastScrapeDuration`: the HTTP
//! read, the parse and the append of every sample, as `scrape_duration_seconds`).

use std::time::{Duration, Instant};

use cbus_tests::gateway::{http_get, rss_kib, scrape_job, Prometheus};
use serde_json::Value;

use crate::{ms, summary};

/// One way of scraping: a row of the table, with the Prometheus jobs it takes.
pub struct Config {
    pub label: &'static str,
    /// (job name, URL query of `/metrics`, without `?`).
    pub jobs: Vec<(String, String)>,
    /// How long to wait for `scrapes` scrapes of every job.
    pub limit: Duration,
}

/// A Prometheus server scraping `target` every `interval` with `jobs`.
fn prometheus(target: u16, interval: Duration, jobs: &[(String, String)]) -> Prometheus {
    let yml: String = jobs
        .iter()
        .map(|(job, query)| scrape_job(job, query, &[target]))
        .collect();
    Prometheus::start(interval, &yml)
}

/// Every active target's last scrape: (job, when, duration in s, health, error).
fn last_scrapes(prom: u16) -> Vec<(String, String, f64, String, String)> {
    let Some(text) = http_get(prom, "/api/v1/targets?state=active") else {
        return Vec::new();
    };
    let Ok(doc) = serde_json::from_str::<Value>(&text) else {
        return Vec::new();
    };
    let Some(targets) = doc["data"]["activeTargets"].as_array() else {
        return Vec::new();
    };
    targets
        .iter()
        .filter_map(|t| {
            Some((
                t["labels"]["job"].as_str()?.to_owned(),
                t["lastScrape"].as_str()?.to_owned(),
                t["lastScrapeDuration"].as_f64()?,
                t["health"].as_str()?.to_owned(),
                t["lastError"].as_str().unwrap_or("").to_owned(),
            ))
        })
        .collect()
}

/// A value of Prometheus's own metrics (`/metrics` of the server).
fn own_metric(prom: u16, name: &str) -> f64 {
    http_get(prom, "/metrics")
        .and_then(|t| cbus_tests::gateway::sample(&t, name))
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SC_CLK_TCK is 100 on Linux.
    ticks / 100.0
}

/// Scrapes the gateway on `port` in each way of `configs`, `scrapes` times each, and prints a
/// table row per job. With `CBUS_BENCH_PPROF_DIR` set, a 10 s CPU profile of Prometheus is taken
/// there during each way's later scrapes (`<label>.pprof`, Go's pprof format).
pub async fn scrape(port: u16, configs: &[Config], scrapes: usize) {
    println!("| way | job | bytes | series | first scrape | later scrapes: median (p95), n | Prometheus CPU s per scrape | Prometheus RSS | head series | load |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for config in configs {
        let mut sizes = Vec::new();
        for (_, query) in &config.jobs {
            let path = if query.is_empty() {
                "/metrics".to_owned()
            } else {
                format!("/metrics?{query}")
            };
            let text = http_get(port, &path).expect("GET /metrics");
            let series = text.lines().filter(|l| !l.starts_with('#')).count();
            sizes.push((text.len(), series));
        }
        let prom = prometheus(port, Duration::from_secs(10), &config.jobs);
        let (prom_port, pid) = (prom.port, prom.pid());
        let mut seen: Vec<Vec<(String, f64)>> = vec![Vec::new(); config.jobs.len()];
        let mut last_error = String::new();
        let mut cpu_at_first = None;
        let mut profiled = false;
        let deadline = Instant::now() + config.limit;
        while seen.iter().any(|s| s.len() < scrapes) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            for (job, when, secs, health, error) in last_scrapes(prom_port) {
                let Some(i) = config.jobs.iter().position(|(j, _)| *j == job) else {
                    continue;
                };
                if health == "up" && !seen[i].iter().any(|(w, _)| *w == when) {
                    seen[i].push((when, secs));
                } else if health == "down" {
                    last_error = error;
                }
            }
            if cpu_at_first.is_none() && seen.iter().all(|s| !s.is_empty()) {
                cpu_at_first = Some((cpu_secs(pid), seen.iter().map(Vec::len).sum::<usize>()));
            }
            if let (Some(dir), false) = (std::env::var_os("CBUS_BENCH_PPROF_DIR"), profiled) {
                if seen.iter().all(|s| s.len() >= 2) {
                    profiled = true;
                    let file = std::path::Path::new(&dir).join(format!("{}.pprof", config.label));
                    let url =
                        format!("http://127.0.0.1:{prom_port}/debug/pprof/profile?seconds=10");
                    let _ = tokio::process::Command::new("curl")
                        .args(["-s", "-o"])
                        .arg(&file)
                        .arg(url)
                        .status()
                        .await;
                }
            }
        }
        let cpu_now = cpu_secs(pid);
        let total: usize = seen.iter().map(Vec::len).sum();
        let cpu_per_scrape = cpu_at_first
            .filter(|(_, n)| total > *n)
            .map(|(c, n)| (cpu_now - c) / (total - n) as f64);
        let head = own_metric(prom_port, "prometheus_tsdb_head_series");
        let rss = rss_kib(pid) as f64 / 1024.0;
        drop(prom);
        assert!(
            seen.iter().all(|s| !s.is_empty()),
            "Prometheus never scraped every job of {}: {last_error}",
            config.label
        );
        for (i, (job, _)) in config.jobs.iter().enumerate() {
            let first = seen[i][0].1;
            let later: Vec<Duration> = seen[i][1..]
                .iter()
                .map(|(_, s)| Duration::from_secs_f64(*s))
                .collect();
            let later = if later.is_empty() {
                "none within the limit".to_owned()
            } else {
                let n = later.len();
                let (m, p) = summary(later);
                format!("{:.0} ms ({:.0}), {n}", ms(m), ms(p))
            };
            println!(
                "| {} | {job} | {} | {} | {:.0} ms | {later} | {} | {rss:.0} MiB | {head:.0} | {} |",
                config.label,
                sizes[i].0,
                sizes[i].1,
                first * 1000.0,
                cpu_per_scrape.map_or("-".to_owned(), |c| format!("{c:.2}")),
                crate::loadavg()
            );
        }
    }
}
