//! `cbus get`, `cbus set` and `cbus getall`: properties of one object on every machine.

use cbus_protocol::codec;
use cbus_protocol::names;
use cbus_protocol::{Op, Request};
use serde_json::Value;

use super::{json_document, parse_value, print_keyed, print_values, Object};
use crate::error::{usage, Failure};
use crate::fanout::Context;
use crate::render::{self, Shape};

pub async fn get(ctx: &Context, obj: Object, property: &str) -> Result<(), Failure> {
    let (interface, member) = names::split_member(property).map_err(usage)?;
    let request = Request {
        interface,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(targets, &obj.query(Op::Get, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Single)
}

pub async fn set(
    ctx: &Context,
    obj: Object,
    property: &str,
    value: &str,
    sig: Option<String>,
) -> Result<(), Failure> {
    let (interface, member) = names::split_member(property).map_err(usage)?;
    let value = parse_value(value);
    if let Some(sig) = &sig {
        let s = codec::parse_single(sig).map_err(|e| Failure::Usage(format!("--sig: {e}")))?;
        codec::from_json(&value, &s).map_err(|e| Failure::Usage(format!("VALUE: {e}")))?;
    }
    let request = Request {
        interface,
        value: Some(value),
        signature: sig,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(targets, &obj.query(Op::Set, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Single)
}

/// The rows of a getall reply: (property, value) with `IFACE.` in front when all interfaces
/// were asked for.
fn property_rows(value: &Value, one_interface: bool) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut push = |prefix: &str, props: &Value| {
        for (name, v) in props.as_object().into_iter().flatten() {
            rows.push((
                format!("{prefix}{name}"),
                render::human(v, Some("v"), Shape::Single),
            ));
        }
    };
    if one_interface {
        push("", value);
    } else {
        for (iface, props) in value.as_object().into_iter().flatten() {
            push(&format!("{iface}."), props);
        }
    }
    rows
}

pub async fn get_all(ctx: &Context, obj: Object, interface: Option<String>) -> Result<(), Failure> {
    if let Some(i) = &interface {
        names::validate_interface(i).map_err(usage)?;
    }
    let one = interface.is_some();
    let request = Request {
        interface,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(targets, &obj.query(Op::GetAll, None, request))
        .await?;
    if let Some(done) = json_document(ctx, &asked) {
        return done;
    }
    print_keyed(ctx, &asked, ["HOST", "PROPERTY", "VALUE"], |value| {
        property_rows(value, one)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn getall_rows() {
        let v =
            json!({"org.a.B": {"X": {"t": "u", "v": 1}}, "org.a.C": {"Y": {"t": "s", "v": "y"}}});
        assert_eq!(
            property_rows(&v, false),
            vec![
                ("org.a.B.X".to_string(), "1".to_string()),
                ("org.a.C.Y".into(), "y".into())
            ]
        );
        let v = json!({"X": {"t": "ay", "v": "aGk="}});
        assert_eq!(
            property_rows(&v, true),
            vec![("X".to_string(), "hi".to_string())]
        );
    }
}
