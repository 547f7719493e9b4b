//! Resolution: a member's interface and signature, from introspection (cached per object, and
//! per interface for a destination).

use std::sync::Arc;

use cbus_protocol::envelope::ErrorBody;
use cbus_protocol::introspect::{MethodSchema, ObjectSchema, PropertySchema};

use super::errors::{dbus_error, internal, resolve_error};
use super::{RequestServer, Start};

const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";

impl RequestServer {
    /// Introspection of an object, cached unless `fresh`.
    pub(super) async fn schema(
        &self,
        dest: &str,
        path: &str,
        fresh: bool,
        start: Start,
    ) -> Result<Arc<ObjectSchema>, ErrorBody> {
        if !fresh {
            if let Some(s) = self.schemas.object(dest, path) {
                return Ok(s);
            }
        }
        let reply = self
            .dbus_call(dest, path, Some(INTROSPECTABLE), "Introspect", &(), start)
            .await?;
        let xml: String = reply.body().deserialize().map_err(dbus_error)?;
        let schema = Arc::new(ObjectSchema::from_xml(&xml).map_err(|e| internal(e.to_string()))?);
        self.schemas.insert(dest, path, schema.clone());
        Ok(schema)
    }

    /// The interface and schema of a method; with a known interface the destination's
    /// interface cache answers without introspecting this object.
    pub(super) async fn resolve_method(
        &self,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        start: Start,
    ) -> Result<(String, MethodSchema), ErrorBody> {
        if let Some(known) = iface.and_then(|i| self.schemas.interface(dest, i)) {
            if let Ok(found) = known.find_method(iface, member) {
                return Ok((found.interface.to_owned(), found.item.clone()));
            }
        }
        let schema = self.schema(dest, path, false, start).await?;
        let found = schema.find_method(iface, member).map_err(resolve_error)?;
        Ok((found.interface.to_owned(), found.item.clone()))
    }

    /// Like [`Self::resolve_method`], for a property.
    pub(super) async fn resolve_property(
        &self,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        start: Start,
    ) -> Result<(String, PropertySchema), ErrorBody> {
        if let Some(known) = iface.and_then(|i| self.schemas.interface(dest, i)) {
            if let Ok(found) = known.find_property(iface, member) {
                return Ok((found.interface.to_owned(), found.item.clone()));
            }
        }
        let schema = self.schema(dest, path, false, start).await?;
        let found = schema.find_property(iface, member).map_err(resolve_error)?;
        Ok((found.interface.to_owned(), found.item.clone()))
    }
}
