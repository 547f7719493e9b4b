//! Turning results into tables, simple lines and JSON documents.
//!
//! Human output is for reading: strings bare, variants as their value, byte arrays as text when
//! they are printable, 64-bit integers as plain digits. It is also untrusted: hostnames, values
//! and error messages come from remote machines, so every cell is stripped of control characters
//! before it reaches a terminal (no escape-sequence injection, one line per row). JSON output
//! keeps the codec's typed form untouched, so scripts can round-trip values into `cbus set`.

use std::time::Duration;

use base64::Engine as _;
use cbus_client::fleet::{Maintenance, Outcome, TargetOutcome};
use cbus_protocol::codec;
use cbus_protocol::{ErrorBody, ErrorCode};
use serde_json::{json, Map, Value};
use zvariant::Signature;

use crate::status::Status;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Simple,
    /// `--group`: identical answers folded, dshbak-style ([`grouped`]).
    Grouped,
}

/// Past this many rows a table on a terminal is folded as with `--group`: ten thousand lines
/// of `active` say less than one line that counts them.
pub const AUTO_GROUP_ROWS: usize = 50;

/// Machines listed by name in a group; larger groups name the first few.
const GROUP_NAMES: usize = 20;

/// What a reply's value is: one value (get, a property), or a method's results (call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Single,
    Results,
}

/// A value for humans, given its D-Bus signature when known.
pub fn human(value: &Value, signature: Option<&str>, shape: Shape) -> String {
    let sigs = signature.and_then(|s| codec::parse_arguments(s).ok());
    let cleaned = match (shape, value, sigs.as_deref()) {
        (Shape::Results, Value::Array(items), Some(sigs)) if items.len() == sigs.len() => {
            let mut cleaned: Vec<Value> = items
                .iter()
                .zip(sigs)
                .map(|(v, s)| clean(v, Some(s)))
                .collect();
            match cleaned.len() {
                0 => return "ok".into(),
                1 => cleaned.remove(0),
                _ => Value::Array(cleaned),
            }
        }
        (Shape::Results, Value::Array(items), None) if items.len() == 1 => clean(&items[0], None),
        (Shape::Single, v, Some([sig])) => clean(v, Some(sig)),
        (_, v, _) => clean(v, None),
    };
    match cleaned {
        Value::String(s) => s,
        Value::Null => "ok".into(),
        other => other.to_string(),
    }
}

/// The value with variants unwrapped and printable byte arrays decoded, following the signature
/// where there is one (and the variants' own signatures inside).
pub fn clean(value: &Value, sig: Option<&Signature>) -> Value {
    if let Some((t, inner)) = codec::as_variant(value) {
        let inner_sig = codec::parse_single(t).ok();
        return clean(inner, inner_sig.as_ref());
    }
    match (sig, value) {
        (Some(Signature::Array(child)), Value::String(b64))
            if matches!(child.signature(), Signature::U8) =>
        {
            Value::String(bytes_text(b64).unwrap_or_else(|| b64.clone()))
        }
        (Some(Signature::Array(child)), Value::Array(items)) => Value::Array(
            items
                .iter()
                .map(|v| clean(v, Some(child.signature())))
                .collect(),
        ),
        (Some(Signature::Dict { value: vs, .. }), Value::Object(map)) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), clean(v, Some(vs.signature()))))
                .collect::<Map<_, _>>(),
        ),
        (Some(Signature::Structure(fields)), Value::Array(items)) => Value::Array(
            items
                .iter()
                .zip(fields.iter())
                .map(|(v, s)| clean(v, Some(s)))
                .collect(),
        ),
        (_, Value::Array(items)) => Value::Array(items.iter().map(|v| clean(v, None)).collect()),
        (_, Value::Object(map)) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), clean(v, None)))
                .collect::<Map<_, _>>(),
        ),
        (_, other) => other.clone(),
    }
}

/// A base64 byte array as text, when it is printable UTF-8 (one trailing NUL allowed, as in
/// C strings that services export as `ay`).
fn bytes_text(b64: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    let body = bytes.strip_suffix(&[0]).unwrap_or(&bytes);
    let text = std::str::from_utf8(body).ok()?;
    (!text.is_empty()
        && text
            .chars()
            .all(|c| !c.is_control() || c == '\n' || c == '\t'))
    .then(|| text.to_owned())
}

/// One terminal-safe line: control characters (newlines, escape sequences) shown escaped.
pub fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// How long a machine has been silent, for humans: `17s`, `1.5s`, `4m`.
pub fn silence(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 600 {
        format!("{secs}s")
    } else if secs < 36_000 {
        format!("{}m", secs / 60)
    } else {
        format!("{}h", secs / 3600)
    }
}

/// `unresponsive (silent 17s)`.
pub fn unresponsive(silent: Duration) -> String {
    format!("unresponsive (silent {})", silence(silent))
}

/// The error of an outcome that is not a value: the agent's, or one standing for silence.
pub fn outcome_error(o: &Outcome, timeout: Duration) -> Option<ErrorBody> {
    match o {
        Outcome::Replied(r) => r.result.as_ref().err().cloned(),
        Outcome::NoResponders => Some(ErrorBody::new(
            ErrorCode::Disconnected,
            "not connected: no agent is listening for this machine on NATS",
        )),
        Outcome::TimedOut {
            waited,
            after_grace: true,
            probed,
        } => Some(ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "no answer within {} (the others had answered; {})",
                duration(*waited),
                if *probed {
                    "silent to a liveness probe too"
                } else {
                    "grace ended"
                }
            ),
        )),
        Outcome::TimedOut { .. } => Some(ErrorBody::new(
            ErrorCode::Timeout,
            format!("no answer within {}", duration(timeout)),
        )),
        Outcome::Stopped => Some(ErrorBody::new(
            ErrorCode::Disconnected,
            "stopped: the agent said goodbye",
        )),
        Outcome::Unresponsive { silent } => {
            Some(ErrorBody::new(ErrorCode::Timeout, unresponsive(*silent)))
        }
        Outcome::Maintenance(mark) => Some(ErrorBody::new(
            ErrorCode::Disconnected,
            maintenance(mark, cbus_protocol::presence::now_ms()),
        )),
    }
}

/// `maintenance (kernel update; 1h12m left; by alice@laptop)`: why a machine was not asked.
pub fn maintenance(mark: &Maintenance, now_ms: u64) -> String {
    let mut parts = Vec::new();
    if let Some(reason) = &mark.reason {
        parts.push(reason.clone());
    }
    match mark.until_ms {
        Some(until) => parts.push(format!(
            "{} left",
            silence(Duration::from_millis(until.saturating_sub(now_ms)))
        )),
        None => parts.push("until cleared".into()),
    }
    if !mark.by.is_empty() {
        parts.push(format!("by {}", mark.by));
    }
    format!("maintenance ({})", parts.join("; "))
}

/// One line explaining an outcome that is not a value.
pub fn problem(o: &Outcome, timeout: Duration) -> Option<String> {
    let e = outcome_error(o, timeout)?;
    Some(match o {
        Outcome::Replied(_) => format!("error: {e}"),
        _ => e.message,
    })
}

/// `5s`, `1.5s`, `250ms`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// One machine's entry in a JSON document: host, nkey, status, ok, and value or error.
pub fn json_result(t: &TargetOutcome, timeout: Duration) -> Value {
    let mut v = json!({
        "host": t.agent.info.hostname,
        "nkey": t.agent.info.nkey,
        "status": Status::of(&t.outcome),
    });
    match &t.outcome {
        Outcome::Replied(r) if r.result.is_ok() => {
            v["ok"] = json!(true);
            if let Ok(s) = &r.result {
                if let Some(sig) = &s.signature {
                    v["signature"] = json!(sig);
                }
                v["value"] = s.value.clone();
            }
        }
        other => {
            v["ok"] = json!(false);
            v["error"] = json!(outcome_error(other, timeout));
            if let Outcome::Unresponsive { silent } = other {
                v["silent_ms"] = json!(silent.as_millis() as u64);
            }
            if let Outcome::Maintenance(mark) = other {
                v["maintenance"] = json!(mark);
            }
        }
    }
    v
}

/// Counts per status, the machines that did not succeed, and how long the fan-out took.
pub fn summary(outcomes: &[TargetOutcome], elapsed: Duration, timeout: Duration) -> Value {
    let mut counts = Map::new();
    for status in Status::FAN_OUT {
        counts.insert(status.as_str().into(), json!(0));
    }
    let mut not_ok = Vec::new();
    for o in outcomes {
        let s = Status::of(&o.outcome);
        if let Some(n) = counts.get_mut(s.as_str()) {
            *n = json!(n.as_u64().unwrap_or(0) + 1);
        }
        if !s.is_ok() {
            not_ok.push(
                json!({"host": o.agent.info.hostname, "nkey": o.agent.info.nkey, "status": s}),
            );
        }
    }
    counts.insert("targets".into(), json!(outcomes.len()));
    counts.insert("not_ok".into(), Value::Array(not_ok));
    counts.insert("elapsed_ms".into(), json!(elapsed.as_millis() as u64));
    counts.insert("timeout_ms".into(), json!(timeout.as_millis() as u64));
    Value::Object(counts)
}

/// The JSON document of a plain fan-out: every machine's result, and a summary.
pub fn json_document(outcomes: &[TargetOutcome], elapsed: Duration, timeout: Duration) -> Value {
    let results: Vec<Value> = outcomes.iter().map(|t| json_result(t, timeout)).collect();
    json!({"results": results, "summary": summary(outcomes, elapsed, timeout)})
}

/// A table with a header row, columns padded to the widest cell; cells are sanitized.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| sanitize(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i < last {
                let w = widths.get(i).copied().unwrap_or(0);
                out.push_str(&" ".repeat(w.saturating_sub(c.chars().count()) + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Tab-separated lines, one per row; cells are sanitized (so a tab inside a value cannot shift
/// columns).
pub fn simple(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().map(|c| sanitize(c)).collect();
        out.push_str(&cells.join("\t"));
        out.push('\n');
    }
    out
}

/// Rows as a table, simple lines or groups, by format (JSON is handled by each command). A
/// table of more than [`AUTO_GROUP_ROWS`] rows on a terminal is grouped.
pub fn rows(format: Format, header: &[&str], rows: &[Vec<String>]) -> String {
    match format {
        Format::Simple => simple(rows),
        _ if is_grouped(format, rows.len()) => grouped(rows),
        _ => table(header, rows),
    }
}

/// Whether `rows` rows in `format` come out grouped: `--group`, or a table of more than
/// [`AUTO_GROUP_ROWS`] on a terminal.
pub fn is_grouped(format: Format, rows: usize) -> bool {
    match format {
        Format::Grouped => true,
        Format::Table => {
            rows > AUTO_GROUP_ROWS && std::io::IsTerminal::is_terminal(&std::io::stdout())
        }
        _ => false,
    }
}

/// `12345` as `12,345`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Rows of `[host, cells...]` folded by identical cells, largest group first (ties in order of
/// first appearance): `active: 9,990 machines` and `failed: 10: web-17, web-204, ...`. Groups of
/// at most [`GROUP_NAMES`] machines name them all; larger ones name the first few.
pub fn grouped(rows: &[Vec<String>]) -> String {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for row in rows {
        let Some((host, cells)) = row.split_first() else {
            continue;
        };
        let key = cells
            .iter()
            .map(|c| sanitize(c))
            .collect::<Vec<_>>()
            .join("  ");
        let i = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(sanitize(host));
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.1.len()));
    let mut out = String::new();
    for (key, hosts) in &groups {
        let n = hosts.len();
        let noun = if n == 1 { "machine" } else { "machines" };
        let names = if n <= GROUP_NAMES {
            hosts.join(", ")
        } else {
            format!("{}, ...", hosts[..5].join(", "))
        };
        out.push_str(&format!("{key}: {} {noun}: {names}\n", thousands(n)));
    }
    out
}

/// One stderr line counting machines by outcome: `10,000 machines: 9,990 ok, 10 timed-out`.
pub fn outcome_counts(outcomes: &[TargetOutcome]) -> String {
    let mut counts: Vec<(Status, usize)> = Vec::new();
    for o in outcomes {
        let s = Status::of(&o.outcome);
        match counts.iter_mut().find(|(c, _)| *c == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let parts: Vec<String> = counts
        .iter()
        .map(|(s, n)| format!("{} {}", thousands(*n), s.as_str()))
        .collect();
    format!(
        "{} {}: {}",
        thousands(outcomes.len()),
        if outcomes.len() == 1 {
            "machine"
        } else {
            "machines"
        },
        parts.join(", ")
    )
}

/// "3s ago" from a Unix-ms timestamp.
pub fn ago(ms: u64) -> String {
    ago_at(ms, cbus_protocol::presence::now_ms())
}

fn ago_at(ms: u64, now: u64) -> String {
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// RFC 3339 (UTC, seconds) of a Unix-µs timestamp as systemd keeps them; `None` for 0 (never).
pub fn timestamp_us(us: u64) -> Option<String> {
    if us == 0 {
        return None;
    }
    let t = time::OffsetDateTime::from_unix_timestamp((us / 1_000_000) as i64).ok()?;
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&f).ok()
}

/// RFC 3339 (UTC, milliseconds) of a Unix-ms timestamp, for the audit trail.
pub fn timestamp_ms(ms: u64) -> String {
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&f).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// `HH:MM:SS.mmm` (UTC) of a Unix-ms timestamp, for monitor lines.
pub fn clock_ms(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_times() {
        assert_eq!(timestamp_ms(1_763_800_000_123), "2025-11-22T08:26:40.123Z");
    }

    #[test]
    fn human_values() {
        assert_eq!(human(&json!("active"), Some("s"), Shape::Single), "active");
        assert_eq!(
            human(&json!({"t": "u", "v": 3}), Some("v"), Shape::Single),
            "3"
        );
        assert_eq!(human(&json!("aGk="), Some("ay"), Shape::Single), "hi");
        // A C string exported as ay, NUL-terminated.
        assert_eq!(
            human(&json!("L3Vzci9iaW4A"), Some("ay"), Shape::Single),
            "/usr/bin"
        );
        // Not printable: stays base64.
        assert_eq!(human(&json!("AAE="), Some("ay"), Shape::Single), "AAE=");
        assert_eq!(
            human(&json!("18446744073709551615"), Some("t"), Shape::Single),
            "18446744073709551615"
        );
        // An array property with one element is not mistaken for a method's single result.
        assert_eq!(human(&json!(["x"]), Some("as"), Shape::Single), "[\"x\"]");
        assert_eq!(human(&json!(["x"]), Some("s"), Shape::Results), "x");
        assert_eq!(human(&json!([1, 2]), Some("ii"), Shape::Results), "[1,2]");
        assert_eq!(human(&json!([]), Some(""), Shape::Results), "ok");
        assert_eq!(human(&Value::Null, None, Shape::Single), "ok");
        // Variants nested in a dict are shown as their values, bytes inside decoded.
        assert_eq!(
            human(
                &json!({"a": {"t": "s", "v": "x"}, "b": {"t": "ay", "v": "aGk="}}),
                Some("a{sv}"),
                Shape::Single
            ),
            r#"{"a":"x","b":"hi"}"#
        );
        assert_eq!(
            human(&json!([["x", 1, true]]), Some("(sib)"), Shape::Results),
            r#"["x",1,true]"#
        );
    }

    #[test]
    fn untrusted_text_is_one_safe_line() {
        assert_eq!(sanitize("a\nb\tc\x1b[31m"), "a\\nb\\tc\\u{1b}[31m");
        assert_eq!(sanitize("plain"), "plain");
        assert_eq!(simple(&[vec!["h".into(), "a\tb".into()]]), "h\ta\\tb\n");
    }

    #[test]
    fn groups_fold_identical_answers_largest_first() {
        let mut rows: Vec<Vec<String>> = (0..30)
            .map(|i| vec![format!("web-{i}"), "active".to_owned()])
            .collect();
        rows.insert(3, vec!["web-x".into(), "failed".into()]);
        rows.push(vec!["web-y".into(), "failed".into()]);
        assert_eq!(
            grouped(&rows),
            "active: 30 machines: web-0, web-1, web-2, web-3, web-4, ...\n\
             failed: 2 machines: web-x, web-y\n"
        );
        assert_eq!(thousands(9990), "9,990");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(12), "12");
        assert_eq!(
            grouped(&[vec!["a\x1b[31m".into(), "x\ny".into()]]),
            "x\\ny: 1 machine: a\\u{1b}[31m\n"
        );
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["HOST", "VALUE"],
            &[
                vec!["a".into(), "1".into()],
                vec!["long".into(), "2".into()],
            ],
        );
        assert_eq!(t, "HOST  VALUE\na     1\nlong  2\n");
        // Short rows do not panic.
        let t = table(&["A", "B"], &[vec!["x".into()]]);
        assert_eq!(t, "A  B\nx\n");
    }

    #[test]
    fn times() {
        assert_eq!(ago_at(1_000, 4_500), "3s ago");
        assert_eq!(ago_at(0, 7_200_000), "2h ago");
        assert_eq!(ago_at(5_000, 1_000), "0s ago");
        assert_eq!(timestamp_us(0), None);
        assert_eq!(
            timestamp_us(1_700_000_000_123_456).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(clock_ms(3_723_004), "01:02:03.004");
        assert_eq!(duration(Duration::from_secs(5)), "5s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn outcome_errors_name_the_silence() {
        let t = Duration::from_secs(5);
        let full = Outcome::TimedOut {
            waited: Duration::from_millis(4_990),
            after_grace: false,
            probed: false,
        };
        assert_eq!(outcome_error(&full, t).unwrap().code, ErrorCode::Timeout);
        assert_eq!(problem(&full, t).unwrap(), "no answer within 5s");
        let cut = Outcome::TimedOut {
            waited: Duration::from_millis(300),
            after_grace: true,
            probed: false,
        };
        assert_eq!(
            problem(&cut, t).unwrap(),
            "no answer within 300ms (the others had answered; grace ended)"
        );
        let stuck = Outcome::TimedOut {
            waited: Duration::from_millis(450),
            after_grace: true,
            probed: true,
        };
        assert_eq!(
            problem(&stuck, t).unwrap(),
            "no answer within 450ms (the others had answered; silent to a liveness probe too)"
        );
        let frozen = Outcome::Unresponsive {
            silent: Duration::from_millis(17_400),
        };
        assert_eq!(Status::of(&frozen), Status::Unresponsive);
        assert_eq!(problem(&frozen, t).unwrap(), "unresponsive (silent 17s)");
        assert_eq!(
            problem(
                &Outcome::Unresponsive {
                    silent: Duration::from_millis(1_600)
                },
                t
            )
            .unwrap(),
            "unresponsive (silent 1.6s)"
        );
    }
}
