//! `cbus introspect`: an object's schema on every machine, grouped where machines agree, as a
//! help page or the XML.

use cbus_client::fleet::Outcome;
use cbus_protocol::codec;
use cbus_protocol::introspect::{Access, ArgSchema, ObjectSchema};
use cbus_protocol::{Op, Request};

use super::{json_document, Object};
use crate::error::Failure;
use crate::fanout::{verdict, Context};
use crate::output;
use crate::render::{self, Format};

pub async fn introspect(ctx: &Context, obj: Object, xml: bool) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let asked = ctx
        .ask(
            targets,
            &obj.query(Op::Introspect, None, Request::default()),
        )
        .await?;
    if let Some(done) = json_document(ctx, &asked) {
        return done;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
