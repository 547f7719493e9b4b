//! The six ops on D-Bus: get, set, getall, call, introspect and list-names.

use std::collections::HashMap;

use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Request, Success};
use cbus_protocol::subject::{Op, RequestSubject};
use cbus_protocol::token;
use serde_json::Value as Json;
use zvariant::{OwnedValue, StructureBuilder};

use super::errors::{check_interface, dbus_error, fdo_error, internal, invalid};
use super::guard::Audit;
use super::{Outcome, RequestServer, Start};

const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_MANAGER: &str = "org.freedesktop.systemd1.Manager";

impl RequestServer {
    pub(super) async fn write(
        &self,
        s: &RequestSubject,
        r: &Request,
        audit: &mut Audit,
    ) -> Outcome {
        let dest = s.destination.as_str();
        let path = s.path.as_str();
        let member = s.member.as_deref().unwrap_or_default();
        check_interface(r)?;
        if s.op == Op::Set {
            self.set(dest, path, r, member, audit).await
        } else {
            self.call(dest, path, r, member, audit).await
        }
    }

    pub(super) async fn read(&self, s: &RequestSubject, r: &Request) -> Outcome {
        let dest = s.destination.as_str();
        let path = s.path.as_str();
        let member = s.member.as_deref().unwrap_or_default();
        check_interface(r)?;
        if matches!(s.op, Op::Get | Op::GetAll | Op::Introspect) {
            self.refuse_unloaded_unit(dest, path).await?;
        }
        match s.op {
            Op::Get => self.get(dest, path, r, member).await,
            Op::GetAll => self.get_all(dest, path, r).await,
            Op::Set | Op::Call => Err(internal("a write reached the read path")),
            Op::Introspect => {
                let schema = self.schema(dest, path, true, Start::Never).await?;
                let value = serde_json::to_value(&*schema)
                    .map_err(|e| ErrorBody::new(ErrorCode::InternalError, e.to_string()))?;
                Ok(Success {
                    signature: None,
                    value,
                })
            }
            Op::ListNames => self.list_names().await,
        }
    }

    /// Answers not-found for a read of a systemd unit object whose unit is not loaded and could
    /// only load as not-found: systemd would load it for the read (UnitNew), unload it soon
    /// after (UnitRemoved), and a client following those signals would read it again, without
    /// end. `GetUnit` and `GetUnitFileState` never load anything. A unit that has a unit file is
    /// read as before (systemd loads it from its file and collects it again): systemd unloads
    /// every stopped unit within a second, so refusing those would make every stopped service
    /// unreadable.
    pub(super) async fn refuse_unloaded_unit(
        &self,
        dest: &str,
        path: &str,
    ) -> Result<(), ErrorBody> {
        if !path.starts_with(token::SYSTEMD_UNIT_PATH_PREFIX) {
            return Ok(());
        }
        if dest != SYSTEMD && !(dest.starts_with(':') && self.is_systemd(dest).await) {
            return Ok(());
        }
        let Some(unit) = token::systemd_unit_of_path(path) else {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!("{} is not a unit object path", codec::quote(path)),
            ));
        };
        let args = (unit.as_str(),);
        let ask = |member: &'static str| {
            self.dbus_call(
                dest,
                "/org/freedesktop/systemd1",
                Some(SYSTEMD_MANAGER),
                member,
                &args,
                Start::Never,
            )
        };
        match ask("GetUnit").await {
            Ok(_) => return Ok(()),
            Err(e) if e.dbus_name.as_deref() == Some("org.freedesktop.systemd1.NoSuchUnit") => {}
            Err(e) => return Err(e),
        }
        match ask("GetUnitFileState").await {
            Ok(_) => Ok(()),
            Err(e) => Err(ErrorBody {
                code: ErrorCode::NotFound,
                message: format!(
                    "unit {} is not loaded and has no unit file; cbus does not read it (systemd \
                     would load it as not-found)",
                    codec::quote(&unit)
                ),
                ..e
            }),
        }
    }

    /// Whether the unique name `dest` is the owner of `org.freedesktop.systemd1`.
    pub(super) async fn is_systemd(&self, dest: &str) -> bool {
        let Ok(conn) = self.conn().await else {
            return false;
        };
        let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else {
            return false;
        };
        let Ok(name) = zbus::names::BusName::try_from(SYSTEMD) else {
            return false;
        };
        dbus.get_name_owner(name)
            .await
            .is_ok_and(|owner| owner.as_str() == dest)
    }

    pub(super) async fn get(&self, dest: &str, path: &str, r: &Request, member: &str) -> Outcome {
        let iface = match &r.interface {
            Some(i) => i.clone(),
            None => {
                self.resolve_property(dest, path, None, member, Start::Never)
                    .await?
                    .0
            }
        };
        let reply = self
            .dbus_call(
                dest,
                path,
                Some(PROPERTIES),
                "Get",
                &(iface.as_str(), member),
                Start::Never,
            )
            .await?;
        let value: OwnedValue = reply.body().deserialize().map_err(dbus_error)?;
        Ok(Success {
            signature: Some(value.value_signature().to_string()),
            value: codec::to_json(&value).map_err(|e| internal(e.to_string()))?,
        })
    }

    pub(super) async fn set(
        &self,
        dest: &str,
        path: &str,
        r: &Request,
        member: &str,
        audit: &mut Audit,
    ) -> Outcome {
        let json = r
            .value
            .as_ref()
            .ok_or_else(|| invalid("set needs a \"value\""))?;
        let start = self.lookup_start(Op::Set, dest, r.interface.as_deref(), member);
        let (iface, sig) = match (&r.interface, &r.signature) {
            (Some(i), Some(s)) => (i.clone(), s.clone()),
            _ => {
                let (iface, prop) = self
                    .resolve_property(dest, path, r.interface.as_deref(), member, start)
                    .await?;
                if !prop.access.writable() {
                    return Err(ErrorBody::new(
                        ErrorCode::AccessDenied,
                        format!("property {iface}.{member} is read-only"),
                    ));
                }
                let sig = r.signature.clone().unwrap_or(prop.ty);
                (iface, sig)
            }
        };
        audit.interface = Some(iface.clone());
        let sig = codec::parse_single(&sig).map_err(|e| invalid(e.to_string()))?;
        let value = codec::from_json(json, &sig).map_err(|e| invalid(format!("value: {e}")))?;
        let start = self.check_policy(
            Op::Set,
            dest,
            &iface,
            member,
            std::slice::from_ref(&value),
            audit,
        )?;
        self.dbus_call(
            dest,
            path,
            Some(PROPERTIES),
            "Set",
            &(iface.as_str(), member, value),
            start,
        )
        .await?;
        Ok(Success {
            signature: None,
            value: Json::Null,
        })
    }

    pub(super) async fn get_all(&self, dest: &str, path: &str, r: &Request) -> Outcome {
        let props_json = |props: HashMap<String, OwnedValue>| -> Result<Json, ErrorBody> {
            let mut obj = serde_json::Map::new();
            for (name, value) in props {
                obj.insert(
                    name,
                    codec::variant_to_json(&value).map_err(|e| internal(e.to_string()))?,
                );
            }
            Ok(Json::Object(obj))
        };
        if let Some(iface) = &r.interface {
            let reply = self
                .dbus_call(
                    dest,
                    path,
                    Some(PROPERTIES),
                    "GetAll",
                    &(iface.as_str(),),
                    Start::Never,
                )
                .await?;
            let props: HashMap<String, OwnedValue> =
                reply.body().deserialize().map_err(dbus_error)?;
            return Ok(Success {
                signature: Some("a{sv}".into()),
                value: props_json(props)?,
            });
        }
        let schema = self.schema(dest, path, false, Start::Never).await?;
        let mut all = serde_json::Map::new();
        for iface in schema
            .interfaces
            .iter()
            .filter(|i| !i.properties.is_empty())
        {
            let reply = self
                .dbus_call(
                    dest,
                    path,
                    Some(PROPERTIES),
                    "GetAll",
                    &(iface.name.as_str(),),
                    Start::Never,
                )
                .await?;
            let props: HashMap<String, OwnedValue> =
                reply.body().deserialize().map_err(dbus_error)?;
            all.insert(iface.name.clone(), props_json(props)?);
        }
        Ok(Success {
            signature: Some("a{sa{sv}}".into()),
            value: Json::Object(all),
        })
    }

    pub(super) async fn call(
        &self,
        dest: &str,
        path: &str,
        r: &Request,
        member: &str,
        audit: &mut Audit,
    ) -> Outcome {
        // Resolve by introspection unless both interface and signature are given; an object
        // that cannot be introspected can still be called when the caller names both.
        let start = self.lookup_start(Op::Call, dest, r.interface.as_deref(), member);
        let (iface, sig) = match (&r.interface, &r.signature) {
            (Some(i), Some(s)) => (i.clone(), s.clone()),
            _ => {
                let (iface, method) = self
                    .resolve_method(dest, path, r.interface.as_deref(), member, start)
                    .await?;
                let sig = r.signature.clone().unwrap_or_else(|| method.in_signature());
                (iface, sig)
            }
        };
        audit.interface = Some(iface.clone());
        let sigs = codec::parse_arguments(&sig).map_err(|e| invalid(e.to_string()))?;
        let empty = Json::Array(Vec::new());
        let args = codec::args_from_json(r.args.as_ref().unwrap_or(&empty), &sigs)
            .map_err(|e| invalid(e.to_string()))?;
        let start = self.check_policy(Op::Call, dest, &iface, member, &args, audit)?;
        let reply = if args.is_empty() {
            self.dbus_call(dest, path, Some(&iface), member, &(), start)
                .await?
        } else {
            let mut builder = StructureBuilder::new();
            for a in args {
                builder = builder.append_field(a);
            }
            let body = builder.build().map_err(|e| invalid(e.to_string()))?;
            self.dbus_call(dest, path, Some(&iface), member, &body, start)
                .await?
        };
        let (signature, values) =
            crate::body::arguments(&reply).map_err(|e| internal(e.to_string()))?;
        Ok(Success {
            signature: Some(signature),
            value: codec::args_to_json(&values).map_err(|e| internal(e.to_string()))?,
        })
    }

    pub(super) async fn list_names(&self) -> Outcome {
        let conn = self.conn().await?;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.map_err(dbus_error)?;
        let names = dbus.list_names().await.map_err(fdo_error)?;
        let owners = futures::future::join_all(names.iter().map(|name| {
            let dbus = &dbus;
            async move {
                if name.starts_with(':') {
                    Some(name.to_string())
                } else {
                    // None: released in between.
                    dbus.get_name_owner(name.as_ref())
                        .await
                        .ok()
                        .map(|o| o.to_string())
                }
            }
        }))
        .await;
        let mut obj = serde_json::Map::new();
        for (name, owner) in names.iter().zip(owners) {
            if let Some(owner) = owner {
                obj.insert(name.to_string(), Json::String(owner));
            }
        }
        Ok(Success {
            signature: Some("a{ss}".into()),
            value: Json::Object(obj),
        })
    }
}
