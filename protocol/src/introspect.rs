//! A JSON schema of an object, parsed from D-Bus introspection XML.
//!
//! Agents send it with the raw XML so that the CLI can print a help page and the gateway can send
//! a schema with a snapshot, without either parsing XML. It also drives argument typing: a member
//! without an explicit signature takes its signature from here.

use serde::{Deserialize, Serialize};

use crate::error::CodecError;

/// What an `introspect` reply's value holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSchema {
    pub xml: String,
    pub interfaces: Vec<InterfaceSchema>,
    /// Names of child nodes (relative), for browsing.
    pub children: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceSchema {
    pub name: String,
    pub methods: Vec<MethodSchema>,
    pub properties: Vec<PropertySchema>,
    pub signals: Vec<SignalSchema>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgSchema {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub ty: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodSchema {
    pub name: String,
    #[serde(rename = "in")]
    pub inputs: Vec<ArgSchema>,
    #[serde(rename = "out")]
    pub outputs: Vec<ArgSchema>,
}

impl MethodSchema {
    /// The in-signature, e.g. `ss`.
    pub fn in_signature(&self) -> String {
        self.inputs.iter().map(|a| a.ty.as_str()).collect()
    }
}

/// Whether a property can be read, written, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

impl Access {
    pub fn readable(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    pub fn writable(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropertySchema {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub access: Access,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalSchema {
    pub name: String,
    pub args: Vec<ArgSchema>,
}

/// A member found by [`ObjectSchema::find_method`] or [`ObjectSchema::find_property`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<'a, T> {
    pub interface: &'a str,
    pub item: &'a T,
}

/// Why a member could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no {kind} {member:?} on this object{}", on_interface(.interface))]
    NotFound {
        kind: &'static str,
        member: String,
        interface: Option<String>,
    },
    #[error("{kind} {member:?} is ambiguous: it exists on {}; name the interface (IFACE.{member})", .candidates.join(", "))]
    Ambiguous {
        kind: &'static str,
        member: String,
        candidates: Vec<String>,
    },
}

fn on_interface(interface: &Option<String>) -> String {
    interface
        .as_ref()
        .map(|i| format!(" in interface {i}"))
        .unwrap_or_default()
}

impl ObjectSchema {
    /// Parses introspection XML.
    pub fn from_xml(xml: &str) -> Result<Self, CodecError> {
        let node = zbus_xml::Node::from_reader(xml.as_bytes())
            .map_err(|e| CodecError::new(format!("invalid introspection XML: {e}")))?;
        let args = |args: &[zbus_xml::Arg], want_out: bool| -> Vec<ArgSchema> {
            args.iter()
                .filter(|a| {
                    let is_out = matches!(a.direction(), Some(zbus_xml::ArgDirection::Out));
                    is_out == want_out
                })
                .map(|a| ArgSchema {
                    name: a.name().map(str::to_owned),
                    ty: a.ty().to_string(),
                })
                .collect()
        };
        let interfaces = node
            .interfaces()
            .iter()
            .map(|i| InterfaceSchema {
                name: i.name().to_string(),
                methods: i
                    .methods()
                    .iter()
                    .map(|m| MethodSchema {
                        name: m.name().to_string(),
                        inputs: args(m.args(), false),
                        outputs: args(m.args(), true),
                    })
                    .collect(),
                properties: i
                    .properties()
                    .iter()
                    .map(|p| PropertySchema {
                        name: p.name().to_string(),
                        ty: p.ty().to_string(),
                        access: match p.access() {
                            zbus_xml::PropertyAccess::Read => Access::Read,
                            zbus_xml::PropertyAccess::Write => Access::Write,
                            zbus_xml::PropertyAccess::ReadWrite => Access::ReadWrite,
                        },
                    })
                    .collect(),
                signals: i
                    .signals()
                    .iter()
                    .map(|s| SignalSchema {
                        name: s.name().to_string(),
                        // Signal args have no direction; all count as "in" for the filter above.
                        args: args(s.args(), false),
                    })
                    .collect(),
            })
            .collect();
        let children = node
            .nodes()
            .iter()
            .filter_map(|n| n.name().map(str::to_owned))
            .collect();
        Ok(ObjectSchema {
            xml: xml.to_owned(),
            interfaces,
            children,
        })
    }

    /// Finds a method by name, in `interface` when given, else in every interface; more than one
    /// match is an error listing the candidates, never a guess.
    pub fn find_method(
        &self,
        interface: Option<&str>,
        member: &str,
    ) -> Result<Found<'_, MethodSchema>, ResolveError> {
        self.find(interface, member, "method", |i| &i.methods, |m| &m.name)
    }

    /// Finds a property by name, like [`ObjectSchema::find_method`].
    pub fn find_property(
        &self,
        interface: Option<&str>,
        member: &str,
    ) -> Result<Found<'_, PropertySchema>, ResolveError> {
        self.find(
            interface,
            member,
            "property",
            |i| &i.properties,
            |p| &p.name,
        )
    }

    fn find<'a, T>(
        &'a self,
        interface: Option<&str>,
        member: &str,
        kind: &'static str,
        items: impl Fn(&'a InterfaceSchema) -> &'a Vec<T>,
        name: impl Fn(&T) -> &String,
    ) -> Result<Found<'a, T>, ResolveError> {
        let mut found: Vec<Found<'a, T>> = self
            .interfaces
            .iter()
            .filter(|i| interface.is_none_or(|want| i.name == want))
            .flat_map(|i| {
                items(i)
                    .iter()
                    .filter(|item| name(item) == member)
                    .map(move |item| Found {
                        interface: i.name.as_str(),
                        item,
                    })
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(ResolveError::NotFound {
                kind,
                member: member.to_owned(),
                interface: interface.map(str::to_owned),
            }),
            _ => Err(ResolveError::Ambiguous {
                kind,
                member: member.to_owned(),
                candidates: found.iter().map(|f| f.interface.to_owned()).collect(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.cbus.Test1">
    <method name="Add"><arg name="a" type="i" direction="in"/><arg name="b" type="i" direction="in"/><arg type="i" direction="out"/></method>
    <method name="Ping"><arg type="s" direction="out"/></method>
    <property name="Count" type="u" access="readwrite"/>
    <signal name="Tick"><arg name="n" type="u"/></signal>
  </interface>
  <interface name="org.cbus.Test2">
    <method name="Ping"><arg type="s" direction="out"/></method>
  </interface>
  <node name="child1"/>
</node>"#;

    #[test]
    fn parses_and_resolves() {
        let s = ObjectSchema::from_xml(XML).unwrap();
        assert_eq!(s.children, vec!["child1"]);
        let add = s.find_method(None, "Add").unwrap();
        assert_eq!(add.interface, "org.cbus.Test1");
        assert_eq!(add.item.in_signature(), "ii");
        assert_eq!(add.item.outputs.len(), 1);
        assert!(matches!(
            s.find_method(None, "Ping"),
            Err(ResolveError::Ambiguous { .. })
        ));
        let err = s.find_method(None, "Ping").unwrap_err().to_string();
        assert!(err.contains("org.cbus.Test1, org.cbus.Test2"), "{err}");
        assert_eq!(
            s.find_method(Some("org.cbus.Test2"), "Ping")
                .unwrap()
                .interface,
            "org.cbus.Test2"
        );
        let p = s.find_property(None, "Count").unwrap();
        assert!(p.item.access.writable());
        assert_eq!(s.interfaces[0].signals[0].args[0].ty, "u");
        assert!(matches!(
            s.find_property(None, "Nope"),
            Err(ResolveError::NotFound { .. })
        ));
        assert!(ObjectSchema::from_xml("<node><interface").is_err());
    }
}
