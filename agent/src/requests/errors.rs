//! Error mapping: D-Bus errors, resolution errors and bad input as reply errors.

use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Request};
use cbus_protocol::introspect::ResolveError;
use zbus::DBusError;

pub(super) fn invalid(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidArgument, message)
}

pub(super) fn internal(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InternalError, message)
}

pub(super) fn resolve_error(e: ResolveError) -> ErrorBody {
    let code = match e {
        ResolveError::NotFound { .. } => ErrorCode::NotFound,
        ResolveError::Ambiguous { .. } => ErrorCode::InvalidArgument,
    };
    ErrorBody::new(code, e.to_string())
}

pub(super) fn fdo_error(e: zbus::fdo::Error) -> ErrorBody {
    ErrorBody::from_dbus(e.name().to_string(), e.description().unwrap_or_default())
}

pub(super) fn dbus_error(e: zbus::Error) -> ErrorBody {
    match e {
        zbus::Error::MethodError(name, message, _) => {
            ErrorBody::from_dbus(name.to_string(), message.unwrap_or_default())
        }
        zbus::Error::FDO(fdo) => fdo_error(*fdo),
        zbus::Error::InputOutput(_) => ErrorBody::new(ErrorCode::Disconnected, e.to_string()),
        other => ErrorBody::new(ErrorCode::InternalError, other.to_string()),
    }
}

/// A request's interface, when it names one, must be a valid name (quoted in bounded form if not).
pub(super) fn check_interface(r: &Request) -> Result<(), ErrorBody> {
    match &r.interface {
        Some(iface) => cbus_protocol::names::validate_interface(iface)
            .map_err(|e| invalid(codec::name_error_text(&e))),
        None => Ok(()),
    }
}
