//! The generic D-Bus commands: get, set, getall, invoke, introspect, names.
//!
//! Each validates its arguments with `protocol::names` and `protocol::codec` before connecting
//! (a typo is exit 2 without touching the network), sends one query to every target through
//! `cbus_client::fleet`, and renders one row per machine, or per machine and property. One
//! module per command family: [`properties`] (get, set, getall), [`methods`] (invoke),
//! [`introspect`] and [`bus_names`]; what they share (the target object, value rendering and
//! parsing) is here.

mod bus_names;
mod introspect;
mod methods;
mod properties;

pub use bus_names::names;
pub use introspect::introspect;
pub use methods::invoke;
pub use properties::{get, get_all, set};

use cbus_client::fleet::{Outcome, Query};
use cbus_protocol::codec;
use cbus_protocol::names;
use cbus_protocol::{Op, Request};
use serde_json::Value;

use crate::error::{usage, Failure};
use crate::fanout::{verdict, Asked, Context};
use crate::output;
use crate::render::{self, Format, Shape};

/// Where a query goes.
pub struct Object {
    pub dest: String,
    pub path: String,
}

impl Object {
    pub fn new(dest: String, path: String) -> Result<Self, Failure> {
        names::validate_bus_name(&dest).map_err(usage)?;
        names::validate_object_path(&path).map_err(usage)?;
        Ok(Object { dest, path })
    }

    fn query(&self, op: Op, member: Option<String>, request: Request) -> Query {
        Query {
            destination: self.dest.clone(),
            path: self.path.clone(),
            op,
            member,
            request,
        }
    }
}

/// In JSON mode the plain fan-out document is a command's whole output: prints it and gives
/// the verdict; `None` in the other formats.
fn json_document(ctx: &Context, asked: &Asked) -> Option<Result<(), Failure>> {
    if ctx.format != Format::Json {
        return None;
    }
    let doc = render::json_document(&asked.outcomes, asked.elapsed, ctx.timeout);
    Some(output::line(&doc.to_string()).and_then(|()| verdict(&asked.outcomes, ctx.timeout)))
}

/// HOST KEY VALUE rows: the (key, value) pairs `rows_of` finds in each machine's successful
/// value, or `-` and the problem; then the verdict.
fn print_keyed(
    ctx: &Context,
    asked: &Asked,
    header: [&str; 3],
    rows_of: impl Fn(&Value) -> Vec<(String, String)>,
) -> Result<(), Failure> {
    let mut rows = Vec::new();
    for o in &asked.outcomes {
        let host = &o.agent.info.hostname;
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                if let Ok(s) = &r.result {
                    for (key, value) in rows_of(&s.value) {
                        rows.push(vec![host.clone(), key, value]);
                    }
                }
            }
            other => rows.push(vec![
                host.clone(),
                "-".into(),
                render::problem(other, ctx.timeout).unwrap_or_default(),
            ]),
        }
    }
    output::print(&render::rows(ctx.format, &header, &rows))?;
    count_outcomes(ctx, asked, rows.len());
    verdict(&asked.outcomes, ctx.timeout)
}

/// When the rows came out grouped, one stderr line counts the machines by outcome.
fn count_outcomes(ctx: &Context, asked: &Asked, rows: usize) {
    if render::is_grouped(ctx.format, rows) {
        eprintln!("{}", render::outcome_counts(&asked.outcomes));
    }
}

/// HOST VALUE rows, simple lines or the JSON document; then the verdict.
fn print_values(ctx: &Context, asked: &Asked, shape: Shape) -> Result<(), Failure> {
    if let Some(done) = json_document(ctx, asked) {
        return done;
    }
    let rows: Vec<Vec<String>> = asked
        .outcomes
        .iter()
        .map(|o| {
            vec![
                o.agent.info.hostname.clone(),
                value_text(ctx, &o.outcome, shape),
            ]
        })
        .collect();
    output::print(&render::rows(ctx.format, &["HOST", "VALUE"], &rows))?;
    count_outcomes(ctx, asked, rows.len());
    verdict(&asked.outcomes, ctx.timeout)
}

fn value_text(ctx: &Context, o: &Outcome, shape: Shape) -> String {
    match o {
        Outcome::Replied(r) => match &r.result {
            Ok(s) => render::human(&s.value, s.signature.as_deref(), shape),
            Err(_) => render::problem(o, ctx.timeout).unwrap_or_default(),
        },
        other => render::problem(other, ctx.timeout).unwrap_or_default(),
    }
}
/// A VALUE argument: JSON, or a bare word that is not JSON taken as a string.
pub fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}
/// Parses ARGS_JSON, and checks it against --sig when given.
pub fn parse_args(args: Option<&str>, sig: Option<&str>) -> Result<Option<Value>, Failure> {
    let args = match args {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text).map_err(|e| {
                Failure::Usage(format!(
                    "ARGS_JSON is not JSON ({e}); give a JSON array, e.g. '[\"nginx.service\",\"replace\"]'"
                ))
            })?;
            if !v.is_array() {
                return Err(Failure::Usage(
                    "ARGS_JSON must be a JSON array, e.g. '[\"nginx.service\",\"replace\"]'".into(),
                ));
            }
            Some(v)
        }
    };
    if let Some(sig) = sig {
        let sigs =
            codec::parse_arguments(sig).map_err(|e| Failure::Usage(format!("--sig: {e}")))?;
        codec::args_from_json(args.as_ref().unwrap_or(&Value::Null), &sigs).map_err(usage)?;
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_and_args_are_checked_locally() {
        assert_eq!(parse_value("hello"), json!("hello"));
        assert_eq!(parse_value("42"), json!(42));
        assert_eq!(parse_value("[1,2]"), json!([1, 2]));
        assert_eq!(
            parse_value("{\"t\":\"s\",\"v\":\"x\"}"),
            json!({"t": "s", "v": "x"})
        );
        assert!(parse_args(Some("[1,"), None).is_err());
        assert!(parse_args(Some("{}"), None).is_err());
        assert!(parse_args(Some("[1,\"x\"]"), Some("ii")).is_err());
        assert!(parse_args(Some("[1]"), Some("ii")).is_err());
        assert!(parse_args(None, Some("s")).is_err());
        assert!(parse_args(Some("[1,2]"), Some("i(")).is_err());
        assert_eq!(
            parse_args(Some("[1,2]"), Some("ii")).unwrap(),
            Some(json!([1, 2]))
        );
        assert_eq!(parse_args(None, Some("")).unwrap(), None);
        assert!(Object::new("not a name".into(), "/x".into()).is_err());
        assert!(Object::new("a.b".into(), "x/y".into()).is_err());
    }
}
