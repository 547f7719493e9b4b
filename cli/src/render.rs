//! Turning results into tables, JSON or simple lines.

use cbus_protocol::fleet::{Outcome, TargetOutcome};
use serde_json::{json, Value};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Simple,
}

/// A value for humans: strings bare, variants as their content, byte arrays as text when they
/// are printable, everything else as compact JSON.
pub fn human(value: &Value, signature: Option<&str>) -> String {
    match (value, signature) {
        (Value::String(s), Some("ay")) => {
            use base64::Engine as _;
            match base64::engine::general_purpose::STANDARD.decode(s) {
                Ok(bytes)
                    if !bytes.is_empty()
                        && bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') =>
                {
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                _ => s.clone(),
            }
        }
        (Value::String(s), _) => s.clone(),
        (Value::Object(o), _) if o.len() == 2 && o.contains_key("t") && o.contains_key("v") => {
            human(&o["v"], o["t"].as_str())
        }
        (Value::Array(items), Some(sig)) if items.len() == 1 && sig.len() == 1 => {
            human(&items[0], Some(sig))
        }
        (Value::Null, _) => "ok".into(),
        (other, _) => other.to_string(),
    }
}

/// The status word of an outcome.
pub fn status(o: &Outcome) -> &'static str {
    match o {
        Outcome::Replied(r) if r.result.is_ok() => "ok",
        Outcome::Replied(_) => "error",
        Outcome::NoResponders => "not-connected",
        Outcome::TimedOut => "timed-out",
        Outcome::Stopped => "stopped",
    }
}

/// One line of explanation for an outcome that is not a value.
pub fn problem(o: &Outcome) -> Option<String> {
    match o {
        Outcome::Replied(r) => r.result.as_ref().err().map(|e| format!("error: {e}")),
        Outcome::NoResponders => Some("not connected (agent is not subscribed to NATS)".into()),
        Outcome::TimedOut => Some("timed out".into()),
        Outcome::Stopped => Some("stopped (agent said goodbye)".into()),
    }
}

/// The JSON document for a list of outcomes: every machine's result or error, and a summary.
pub fn json_document(outcomes: &[TargetOutcome]) -> Value {
    let results: Vec<Value> = outcomes
        .iter()
        .map(|t| {
            let mut v = json!({
                "host": t.agent.info.hostname,
                "nkey": t.agent.info.nkey,
                "status": status(&t.outcome),
            });
            if let Outcome::Replied(r) = &t.outcome {
                match &r.result {
                    Ok(s) => {
                        v["ok"] = json!(true);
                        if let Some(sig) = &s.signature {
                            v["signature"] = json!(sig);
                        }
                        v["value"] = s.value.clone();
                    }
                    Err(e) => {
                        v["ok"] = json!(false);
                        v["error"] = serde_json::to_value(e).unwrap_or(Value::Null);
                    }
                }
            } else {
                v["ok"] = json!(false);
            }
            v
        })
        .collect();
    json!({"results": results, "summary": cbus_protocol::fleet::summarize(outcomes)})
}

/// A table with a header row, columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i < last {
                out.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// "3s ago" from a Unix-ms timestamp.
pub fn ago(ms: u64) -> String {
    let secs = cbus_protocol::presence::now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_values() {
        assert_eq!(human(&json!("active"), Some("s")), "active");
        assert_eq!(human(&json!({"t": "u", "v": 3}), Some("v")), "3");
        assert_eq!(human(&json!("aGk="), Some("ay")), "hi");
        assert_eq!(human(&json!("AAE="), Some("ay")), "AAE=");
        assert_eq!(human(&json!(["x"]), Some("s")), "x");
        assert_eq!(human(&json!([1, 2]), Some("ii")), "[1,2]");
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
    }
}
