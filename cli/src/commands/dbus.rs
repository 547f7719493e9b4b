//! The generic D-Bus commands: get, set, getall, invoke, introspect, names.
//!
//! Each validates its arguments with `protocol::names` and `protocol::codec` before connecting
//! (a typo is exit 2 without touching the network), sends one query to every target through
//! `cbus_client::fleet`, and renders one row per machine, or per machine and property.

use cbus_client::fleet::{Outcome, Query};
use cbus_protocol::codec;
use cbus_protocol::introspect::{Access, ArgSchema, ObjectSchema};
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

/// HOST VALUE rows, simple lines or the JSON document; then the verdict.
fn print_values(ctx: &Context, asked: &Asked, shape: Shape) -> Result<(), Failure> {
    if ctx.format == Format::Json {
        output::line(
            &render::json_document(&asked.outcomes, asked.elapsed, ctx.timeout).to_string(),
        )?;
    } else {
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
    }
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

pub async fn get(ctx: &Context, obj: Object, property: &str) -> Result<(), Failure> {
    let (interface, member) = names::split_member(property).map_err(usage)?;
    let request = Request {
        interface,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(&targets, &obj.query(Op::Get, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Single)
}

/// A VALUE argument: JSON, or a bare word that is not JSON taken as a string.
pub fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
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
        .ask(&targets, &obj.query(Op::Set, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Single)
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

pub async fn invoke(
    ctx: &Context,
    obj: Object,
    method: &str,
    args: Option<&str>,
    sig: Option<String>,
) -> Result<(), Failure> {
    let (interface, member) = names::split_member(method).map_err(usage)?;
    let args = parse_args(args, sig.as_deref())?;
    let request = Request {
        interface,
        args,
        signature: sig,
        ..Default::default()
    };
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(&targets, &obj.query(Op::Call, Some(member), request))
        .await?;
    print_values(ctx, &asked, Shape::Results)
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
        .ask(&targets, &obj.query(Op::GetAll, None, request))
        .await?;
    if ctx.format == Format::Json {
        output::line(
            &render::json_document(&asked.outcomes, asked.elapsed, ctx.timeout).to_string(),
        )?;
        return verdict(&asked.outcomes, ctx.timeout);
    }
    let mut rows = Vec::new();
    for o in &asked.outcomes {
        let host = &o.agent.info.hostname;
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                if let Ok(s) = &r.result {
                    for (name, value) in property_rows(&s.value, one) {
                        rows.push(vec![host.clone(), name, value]);
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
    output::print(&render::rows(
        ctx.format,
        &["HOST", "PROPERTY", "VALUE"],
        &rows,
    ))?;
    verdict(&asked.outcomes, ctx.timeout)
}

pub async fn introspect(ctx: &Context, obj: Object, xml: bool) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(
            &targets,
            &obj.query(Op::Introspect, None, Request::default()),
        )
        .await?;
    if ctx.format == Format::Json {
        output::line(
            &render::json_document(&asked.outcomes, asked.elapsed, ctx.timeout).to_string(),
        )?;
        return verdict(&asked.outcomes, ctx.timeout);
    }
    // Machines usually agree: each distinct schema is printed once, with the hosts that have it.
    let mut groups: Vec<(ObjectSchema, Vec<String>)> = Vec::new();
    let mut problems = Vec::new();
    for o in &asked.outcomes {
        let host = o.agent.info.hostname.clone();
        let schema = match &o.outcome {
            Outcome::Replied(r) => match &r.result {
                Ok(s) => serde_json::from_value::<ObjectSchema>(s.value.clone())
                    .map_err(|e| format!("malformed introspection reply: {e}")),
                Err(_) => Err(render::problem(&o.outcome, ctx.timeout).unwrap_or_default()),
            },
            other => Err(render::problem(other, ctx.timeout).unwrap_or_default()),
        };
        match schema {
            Ok(schema) => match groups.iter_mut().find(|(s, _)| *s == schema) {
                Some((_, hosts)) => hosts.push(host),
                None => groups.push((schema, vec![host])),
            },
            Err(p) => problems.push((host, p)),
        }
    }
    let mut text = String::new();
    if ctx.format == Format::Simple {
        for o in &asked.outcomes {
            let host = &o.agent.info.hostname;
            if let Some((schema, _)) = groups.iter().find(|(_, h)| h.contains(host)) {
                text.push_str(&render::simple(&simple_schema(host, schema)));
            }
        }
        for (host, p) in &problems {
            text.push_str(&render::simple(&[vec![
                host.clone(),
                "error".into(),
                p.clone(),
            ]]));
        }
    } else {
        for (i, (schema, hosts)) in groups.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            if xml {
                text.push_str(&format!("<!-- {} -->\n{}\n", on_hosts(hosts), schema.xml));
            } else {
                text.push_str(&help_page(&obj, schema, hosts));
            }
        }
        for (host, p) in &problems {
            text.push_str(&format!(
                "{}: {}\n",
                render::sanitize(host),
                render::sanitize(p)
            ));
        }
    }
    output::print(&text)?;
    verdict(&asked.outcomes, ctx.timeout)
}

fn on_hosts(hosts: &[String]) -> String {
    let clean: Vec<String> = hosts.iter().map(|h| render::sanitize(h)).collect();
    if clean.len() <= 6 {
        format!("on {}", clean.join(", "))
    } else {
        format!(
            "on {} machines ({}, ...)",
            clean.len(),
            clean[..3].join(", ")
        )
    }
}

fn args_text(args: &[ArgSchema]) -> String {
    args.iter()
        .map(|a| match &a.name {
            Some(n) => format!("{} {n}", a.ty),
            None => a.ty.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn access_text(a: Access) -> &'static str {
    match a {
        Access::Read => "read",
        Access::Write => "write",
        Access::ReadWrite => "readwrite",
    }
}

/// A type for humans: basic types with their name (`u (uint32)`), containers as their
/// signature, which says more than any name.
fn type_text(sig: &str) -> String {
    match codec::parse_single(sig) {
        Ok(s) if sig.len() == 1 => format!("{sig} ({})", codec::type_name(&s)),
        _ => sig.to_owned(),
    }
}

/// The help page of an object, generated from its introspection like SManager's `help`:
/// every interface with its methods (in -> out), properties (type, access) and signals, the
/// children to browse into, and the commands that use them.
pub fn help_page(obj: &Object, schema: &ObjectSchema, hosts: &[String]) -> String {
    let mut out = format!("{} {}  ({})\n", obj.dest, obj.path, on_hosts(hosts));
    for i in &schema.interfaces {
        out.push_str(&format!("\ninterface {}\n", render::sanitize(&i.name)));
        if !i.methods.is_empty() {
            out.push_str("  methods:\n");
            for m in &i.methods {
                let outs = if m.outputs.is_empty() {
                    String::new()
                } else {
                    format!(" -> ({})", args_text(&m.outputs))
                };
                out.push_str(&render::sanitize(&format!(
                    "    {}({}){outs}",
                    m.name,
                    args_text(&m.inputs)
                )));
                out.push('\n');
            }
        }
        if !i.properties.is_empty() {
            out.push_str("  properties:\n");
            let width = i.properties.iter().map(|p| p.name.len()).max().unwrap_or(0);
            let types: Vec<String> = i.properties.iter().map(|p| type_text(&p.ty)).collect();
            let twidth = types.iter().map(|t| t.chars().count()).max().unwrap_or(0);
            for (p, ty) in i.properties.iter().zip(&types) {
                out.push_str(&render::sanitize(&format!(
                    "    {:width$}  {:twidth$}  {}",
                    p.name,
                    ty,
                    access_text(p.access)
                )));
                out.push('\n');
            }
        }
        if !i.signals.is_empty() {
            out.push_str("  signals:\n");
            for s in &i.signals {
                out.push_str(&render::sanitize(&format!(
                    "    {}({})",
                    s.name,
                    args_text(&s.args)
                )));
                out.push('\n');
            }
        }
    }
    if !schema.children.is_empty() {
        out.push_str("\nchildren:\n");
        for c in &schema.children {
            let path = if obj.path == "/" {
                format!("/{c}")
            } else {
                format!("{}/{c}", obj.path)
            };
            out.push_str(&format!("  {}\n", render::sanitize(&path)));
        }
    }
    // Usage lines with real members of this object, so the page is also a cheat sheet.
    let own = schema
        .interfaces
        .iter()
        .find(|i| !i.name.starts_with("org.freedesktop.DBus."))
        .or(schema.interfaces.first());
    if let Some(i) = own {
        let mut usage = Vec::new();
        if let Some(p) = i.properties.iter().find(|p| p.access.readable()) {
            usage.push(format!(
                "cbus get {} {} {}.{}",
                obj.dest, obj.path, i.name, p.name
            ));
        }
        if let Some(m) = i.methods.first() {
            let example: Vec<&str> = m.inputs.iter().map(|a| placeholder(&a.ty)).collect();
            usage.push(format!(
                "cbus invoke {} {} {}.{} '[{}]'",
                obj.dest,
                obj.path,
                i.name,
                m.name,
                example.join(", ")
            ));
        }
        if !usage.is_empty() {
            out.push_str("\nusage:\n");
            for u in usage {
                out.push_str(&format!("  {}\n", render::sanitize(&u)));
            }
        }
    }
    out
}

fn placeholder(sig: &str) -> &'static str {
    match sig.chars().next() {
        Some('s') | Some('o') | Some('g') => "\"...\"",
        Some('b') => "false",
        Some('x') | Some('t') => "\"0\"",
        Some('a') if sig.starts_with("a{") => "{}",
        Some('a') | Some('(') => "[]",
        Some('v') => "{\"t\":\"s\",\"v\":\"...\"}",
        _ => "0",
    }
}

/// `-s` form of a schema: host, kind, IFACE.NAME, then the signature(s) or access.
fn simple_schema(host: &str, schema: &ObjectSchema) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for i in &schema.interfaces {
        for m in &i.methods {
            let outs: String = m.outputs.iter().map(|a| a.ty.as_str()).collect();
            rows.push(vec![
                host.into(),
                "method".into(),
                format!("{}.{}", i.name, m.name),
                m.in_signature(),
                outs,
            ]);
        }
        for p in &i.properties {
            rows.push(vec![
                host.into(),
                "property".into(),
                format!("{}.{}", i.name, p.name),
                p.ty.clone(),
                access_text(p.access).into(),
            ]);
        }
        for s in &i.signals {
            let sig: String = s.args.iter().map(|a| a.ty.as_str()).collect();
            rows.push(vec![
                host.into(),
                "signal".into(),
                format!("{}.{}", i.name, s.name),
                sig,
            ]);
        }
    }
    for c in &schema.children {
        rows.push(vec![host.into(), "child".into(), c.clone()]);
    }
    rows
}

pub async fn names(ctx: &Context, all: bool) -> Result<(), Failure> {
    let obj = Object::new(
        "org.freedesktop.DBus".into(),
        "/org/freedesktop/DBus".into(),
    )?;
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(
            &targets,
            &obj.query(Op::ListNames, None, Request::default()),
        )
        .await?;
    if ctx.format == Format::Json {
        output::line(
            &render::json_document(&asked.outcomes, asked.elapsed, ctx.timeout).to_string(),
        )?;
        return verdict(&asked.outcomes, ctx.timeout);
    }
    let mut rows = Vec::new();
    for o in &asked.outcomes {
        let host = &o.agent.info.hostname;
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                if let Ok(s) = &r.result {
                    for (name, owner) in s.value.as_object().into_iter().flatten() {
                        if all || !name.starts_with(':') {
                            rows.push(vec![
                                host.clone(),
                                name.clone(),
                                render::human(owner, Some("s"), Shape::Single),
                            ]);
                        }
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
    output::print(&render::rows(ctx.format, &["HOST", "NAME", "OWNER"], &rows))?;
    verdict(&asked.outcomes, ctx.timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const XML: &str = r#"<node>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="out"/></method>
  </interface>
  <interface name="org.cbus.Test1">
    <method name="Add"><arg name="a" type="i" direction="in"/><arg name="b" type="i" direction="in"/><arg type="i" direction="out"/></method>
    <property name="Count" type="u" access="readwrite"/>
    <property name="Name" type="s" access="read"/>
    <signal name="Tick"><arg name="n" type="u"/></signal>
  </interface>
  <node name="child1"/>
</node>"#;

    #[test]
    fn help_page_lists_everything_and_usage() {
        let schema = ObjectSchema::from_xml(XML).unwrap();
        let obj = Object::new("org.cbus.Test".into(), "/org/cbus/Test".into()).unwrap();
        let page = help_page(&obj, &schema, &["a".into(), "b".into()]);
        let expected = "\
org.cbus.Test /org/cbus/Test  (on a, b)

interface org.freedesktop.DBus.Properties
  methods:
    Get(s, s) -> (v)

interface org.cbus.Test1
  methods:
    Add(i a, i b) -> (i)
  properties:
    Count  u (uint32)  readwrite
    Name   s (string)  read
  signals:
    Tick(u n)

children:
  /org/cbus/Test/child1

usage:
  cbus get org.cbus.Test /org/cbus/Test org.cbus.Test1.Count
  cbus invoke org.cbus.Test /org/cbus/Test org.cbus.Test1.Add '[0, 0]'
";
        assert_eq!(page, expected);
        let simple = simple_schema("h", &schema);
        assert!(simple.contains(&vec![
            "h".to_string(),
            "method".into(),
            "org.cbus.Test1.Add".into(),
            "ii".into(),
            "i".into()
        ]));
        assert!(simple.contains(&vec!["h".to_string(), "child".into(), "child1".into()]));
    }

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
