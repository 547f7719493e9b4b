//! Answering requests: get, set, getall, call, introspect and list-names.
//!
//! Each request runs in its own task, bounded by a semaphore, with a per-call timeout, so one
//! slow D-Bus peer cannot hold up the others. Every outcome, including a malformed subject or
//! body, is a reply in the shared envelope: the requester always learns what went wrong.
//! Missing interfaces and signatures are filled from introspection ([`crate::schema_cache`]); an
//! ambiguous member is an error listing the candidates, never a guess (the original guessed).
//!
//! Reads stay reads. A method call to a name that is not running would start its service (bus
//! activation), so reads (get, getall, introspect, read-listed calls, and the introspection that
//! looks a member up) are sent with NO_AUTO_START; only a set or call the policy allows may
//! start a service. systemd loads a unit when its object is read, and a client reacting to the
//! resulting UnitNew by reading it again loops forever, so a read of a unit object that systemd
//! has not loaded and that has no unit file is answered not-found (asking `GetUnit` and
//! `GetUnitFileState`, which never load).
//!
//! Every remote set and call, allowed or denied, is logged at info on the target
//! `cbus_agent::audit`: requester (a claim of the requester's, from `Cbus-Requester`), op,
//! destination, path, interface, member, the arguments' size and a digest (never their text),
//! the policy's verdict and the result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Message};
use cbus_client::headers;
use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Reply, Request, Success};
use cbus_protocol::introspect::{MethodSchema, ObjectSchema, PropertySchema, ResolveError};
use cbus_protocol::subject::{self, Op, RequestSubject};
use cbus_protocol::token;
use futures::StreamExt;
use serde_json::Value as Json;
use sha2::Digest as _;
use tokio::sync::{RwLock, Semaphore};
use zbus::{Connection, DBusError};
use zvariant::{OwnedValue, StructureBuilder};

use crate::bus::BusKind;
use crate::metrics::Metrics;
use crate::policy::{Action, Policy, Verdict};
use crate::schema_cache::SchemaCache;

const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// Whether a D-Bus call may start the destination's service if it is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Reads: NO_AUTO_START.
    Never,
    /// A set or call the policy allows.
    Allowed,
}

type Outcome = Result<Success, ErrorBody>;

/// Serves requests for one agent.
pub struct RequestServer {
    pub nkey: String,
    pub hostname: String,
    pub client: Client,
    pub bus: BusKind,
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub call_timeout: Duration,
    pub max_request_bytes: usize,
    pub calls: Semaphore,
    /// Requests accepted but not answered yet (waiting for a call slot or running); more are
    /// refused at once, so a request flood cannot grow the agent's memory.
    pending: Arc<Semaphore>,
    conn: RwLock<Option<Connection>>,
    schemas: SchemaCache,
}

impl RequestServer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        nkey: String,
        hostname: String,
        client: Client,
        bus: BusKind,
        policy: Policy,
        metrics: Arc<Metrics>,
        call_timeout: Duration,
        max_request_bytes: usize,
        max_concurrent_calls: usize,
    ) -> Self {
        RequestServer {
            nkey,
            hostname,
            client,
            bus,
            policy,
            metrics,
            call_timeout,
            max_request_bytes,
            calls: Semaphore::new(max_concurrent_calls.max(1)),
            pending: Arc::new(Semaphore::new(
                max_concurrent_calls.max(1).saturating_mul(16).max(256),
            )),
            conn: RwLock::new(None),
            schemas: SchemaCache::default(),
        }
    }

    /// Subscribes to this agent's targeted subjects and to broadcasts (queue group = nkey, so a
    /// machine answers a broadcast once), and serves until the NATS client is closed.
    pub async fn serve(self: Arc<Self>) -> Result<(), async_nats::SubscribeError> {
        let targeted = self
            .client
            .subscribe(subject::agent_requests(&self.nkey))
            .await?;
        let broadcast = self
            .client
            .queue_subscribe(subject::BROADCAST_ALL, self.nkey.clone())
            .await?;
        let mut messages = futures::stream::select(targeted, broadcast);
        while let Some(msg) = messages.next().await {
            let server = self.clone();
            match self.pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        server.handle(msg).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move { server.refuse_busy(msg).await });
                }
            }
        }
        Ok(())
    }

    /// Drops cached introspection of a destination whose owner changed.
    pub fn forget(&self, destination: &str) {
        self.schemas.forget(destination);
    }

    /// Answers without queueing: too many requests are waiting already.
    async fn refuse_busy(&self, msg: Message) {
        let Some(reply_to) = msg.reply else { return };
        self.metrics
            .requests
            .with_label_values(&["busy", "error"])
            .inc();
        tracing::debug!(subject = %codec::quote(&msg.subject), "agent busy; request refused");
        let reply = Reply {
            nkey: self.nkey.clone(),
            hostname: self.hostname.clone(),
            result: Err(ErrorBody::new(
                ErrorCode::Timeout,
                "agent busy: too many requests waiting for D-Bus; try again",
            )),
        };
        self.send_reply(reply_to, reply).await;
    }

    /// Publishes a reply; one that NATS would refuse as too large becomes an error reply, so
    /// the requester learns why instead of timing out.
    async fn send_reply(&self, reply_to: async_nats::Subject, reply: Reply) {
        let mut payload = reply.to_payload();
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() > max {
            tracing::warn!(
                len = payload.len(),
                max,
                "reply larger than NATS max_payload"
            );
            payload = Reply {
                nkey: reply.nkey,
                hostname: reply.hostname,
                result: Err(ErrorBody::new(
                    ErrorCode::InternalError,
                    format!(
                        "reply of {} bytes exceeds the NATS server's max_payload of {max}",
                        payload.len()
                    ),
                )),
            }
            .to_payload();
        }
        if let Err(e) = self.client.publish(reply_to, payload).await {
            tracing::warn!(error = %e, "cannot publish reply");
        }
    }

    async fn handle(self: Arc<Self>, msg: Message) {
        let Some(reply_to) = msg.reply.clone() else {
            tracing::debug!(subject = %codec::quote(&msg.subject), "request without reply subject ignored");
            return;
        };
        let (op, outcome) = self.answer(&msg).await;
        let label = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics
            .requests
            .with_label_values(&[op.map(Op::as_str).unwrap_or("invalid"), label])
            .inc();
        match &outcome {
            // Malformed requests are the requester's bug: visible in the agent's log too.
            Err(e) if e.code == ErrorCode::InvalidArgument => {
                tracing::info!(subject = %codec::quote(&msg.subject), error = %e, "invalid request")
            }
            Err(e) => {
                tracing::debug!(subject = %codec::quote(&msg.subject), error = %e, "request failed")
            }
            Ok(_) => {}
        }
        let reply = Reply {
            nkey: self.nkey.clone(),
            hostname: self.hostname.clone(),
            result: outcome,
        };
        self.send_reply(reply_to, reply).await;
    }

    async fn answer(self: &Arc<Self>, msg: &Message) -> (Option<Op>, Outcome) {
        if msg.payload.len() > self.max_request_bytes {
            return (
                None,
                Err(invalid(format!(
                    "request of {} bytes is larger than the agent's limit of {}",
                    msg.payload.len(),
                    self.max_request_bytes
                ))),
            );
        }
        let subject = match RequestSubject::parse(&msg.subject) {
            Ok(s) => s,
            Err(e) => return (None, Err(invalid(e.to_string()))),
        };
        let op = Some(subject.op);
        let request = match Request::from_payload(&msg.payload) {
            Ok(r) => r,
            Err(e) => return (op, Err(invalid(format!("invalid request body: {e}")))),
        };
        if let Err(e) = request.check_for(subject.op) {
            return (op, Err(invalid(e)));
        }
        let requester = headers::get(msg.headers.as_ref(), headers::REQUESTER)
            .unwrap_or("unknown")
            .to_owned();
        let timeout = request
            .timeout_ms
            .map(Duration::from_millis)
            .map_or(self.call_timeout, |t| t.min(self.call_timeout));
        // The timeout covers waiting for a call slot too, so a queued request gets an answer.
        // A call that started keeps its slot until D-Bus answers (or the connection's method
        // timeout, a little above --call-timeout, ends it) even when the requester was already
        // told "timeout": the slots bound the calls the bus sees, not just the ones we wait for
        // (dbus-daemon refuses new calls beyond its per-connection pending-reply limit).
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = self.clone();
        let subject2 = subject.clone();
        tokio::spawn(async move {
            let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, server.calls.acquire()).await
            else {
                // Timed out waiting (the requester is told below) or shutting down; a set or
                // call that never ran is still in the audit log.
                if matches!(subject2.op, Op::Set | Op::Call) {
                    let audit = Audit {
                        interface: request.interface.clone(),
                        verdict: None,
                    };
                    let timeout = ErrorBody::new(ErrorCode::Timeout, "no D-Bus call slot in time");
                    audit.log(&subject2, &request, &requester, &Err(timeout));
                }
                return;
            };
            let outcome = server.dispatch(&subject2, &request, &requester).await;
            let _ = tx.send(outcome);
        });
        let outcome = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!("D-Bus call did not finish within {timeout:?}"),
            )),
        };
        self.metrics
            .call_seconds
            .with_label_values(&[subject.op.as_str()])
            .observe(started.elapsed().as_secs_f64());
        (op, outcome)
    }

    async fn dispatch(&self, s: &RequestSubject, r: &Request, requester: &str) -> Outcome {
        match s.op {
            Op::Set | Op::Call => {
                let mut audit = Audit {
                    interface: r.interface.clone(),
                    verdict: None,
                };
                let outcome = self.write(s, r, &mut audit).await;
                audit.log(s, r, requester, &outcome);
                outcome
            }
            _ => self.read(s, r).await,
        }
    }

    async fn write(&self, s: &RequestSubject, r: &Request, audit: &mut Audit) -> Outcome {
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

    async fn read(&self, s: &RequestSubject, r: &Request) -> Outcome {
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
    async fn refuse_unloaded_unit(&self, dest: &str, path: &str) -> Result<(), ErrorBody> {
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
    async fn is_systemd(&self, dest: &str) -> bool {
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

    async fn get(&self, dest: &str, path: &str, r: &Request, member: &str) -> Outcome {
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

    async fn set(
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

    async fn get_all(&self, dest: &str, path: &str, r: &Request) -> Outcome {
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

    async fn call(
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

    async fn list_names(&self) -> Outcome {
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

    /// Whether looking a member up for a set or call may start the destination's service: only
    /// when the policy could allow the write, so a denied call never activates anything.
    fn lookup_start(&self, op: Op, dest: &str, iface: Option<&str>, member: &str) -> Start {
        if self.policy.may_allow(op, dest, iface, member) {
            Start::Allowed
        } else {
            Start::Never
        }
    }

    /// The policy's verdict on a set or call with its arguments (converted already, so argument
    /// patterns see exactly what D-Bus will). Read-listed calls are sent as reads.
    fn check_policy(
        &self,
        op: Op,
        dest: &str,
        iface: &str,
        member: &str,
        args: &[zvariant::Value<'_>],
        audit: &mut Audit,
    ) -> Result<Start, ErrorBody> {
        let texts: Vec<Option<&str>> = args
            .iter()
            .map(|v| match v {
                zvariant::Value::Str(s) => Some(s.as_str()),
                zvariant::Value::ObjectPath(p) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        let verdict = self.policy.check(&Action {
            op,
            destination: dest,
            interface: iface,
            member,
            args: &texts,
        });
        let result = match &verdict {
            Verdict::Read => Ok(Start::Never),
            Verdict::Allowed => Ok(Start::Allowed),
            Verdict::Denied(why) => Err(ErrorBody::new(
                ErrorCode::AccessDenied,
                format!(
                    "the agent's policy does not allow {op} of {iface}.{member} on {dest} ({why})"
                ),
            )),
        };
        audit.verdict = Some(verdict);
        result
    }

    /// Introspection of an object, cached unless `fresh`.
    async fn schema(
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
    async fn resolve_method(
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
    async fn resolve_property(
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

    async fn conn(&self) -> Result<Connection, ErrorBody> {
        if let Some(c) = self.conn.read().await.clone() {
            return Ok(c);
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.clone() {
            return Ok(c);
        }
        match self
            .bus
            .connect_with(false, Some(self.call_timeout + Duration::from_secs(1)))
            .await
        {
            Ok(c) => {
                self.metrics.bus_connected.set(1);
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.metrics.bus_connected.set(0);
                Err(ErrorBody::new(
                    ErrorCode::Disconnected,
                    format!("cannot connect to D-Bus ({:?}): {e}", self.bus),
                ))
            }
        }
    }

    async fn dbus_call<B>(
        &self,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        body: &B,
        start: Start,
    ) -> Result<zbus::Message, ErrorBody>
    where
        B: serde::Serialize + zvariant::DynamicType,
    {
        let conn = self.conn().await?;
        let result = match start {
            Start::Allowed => {
                conn.call_method(Some(dest), path, iface, member, body)
                    .await
            }
            Start::Never => {
                self.call_no_auto_start(&conn, dest, path, iface, member, body)
                    .await
            }
        };
        match result {
            Ok(m) => Ok(m),
            Err(zbus::Error::InputOutput(e)) if e.kind() == std::io::ErrorKind::TimedOut => Err(
                ErrorBody::new(ErrorCode::Timeout, "D-Bus peer did not reply in time"),
            ),
            Err(e @ (zbus::Error::InputOutput(_) | zbus::Error::Handshake(_))) => {
                // The bus went away: reconnect on the next request.
                *self.conn.write().await = None;
                self.metrics.bus_connected.set(0);
                Err(ErrorBody::new(ErrorCode::Disconnected, e.to_string()))
            }
            Err(e) => Err(dbus_error(e)),
        }
    }
}

impl RequestServer {
    /// A method call with NO_AUTO_START: a destination that is not running answers
    /// ServiceUnknown instead of being started. zbus offers flags only on typed proxy calls,
    /// which do not hand out the reply message, so the call is built and its reply awaited here
    /// (bounded like the connection's own method timeout).
    async fn call_no_auto_start<B>(
        &self,
        conn: &Connection,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        body: &B,
    ) -> zbus::Result<zbus::Message>
    where
        B: serde::Serialize + zvariant::DynamicType,
    {
        let mut builder = zbus::Message::method_call(path, member)?
            .destination(dest)?
            .with_flags(zbus::message::Flags::NoAutoStart)?;
        if let Some(i) = iface {
            builder = builder.interface(i)?;
        }
        let msg = builder.build(body)?;
        let serial = msg.primary_header().serial_num();
        // Listening before sending, so the reply cannot slip by.
        let mut replies = zbus::MessageStream::from(conn);
        conn.send(&msg).await?;
        let wait = async {
            while let Some(m) = replies.next().await {
                let m = m?;
                if m.header().reply_serial() != Some(serial) {
                    continue;
                }
                match m.message_type() {
                    zbus::message::Type::MethodReturn => return Ok(m),
                    zbus::message::Type::Error => return Err(zbus::Error::from(m)),
                    _ => {}
                }
            }
            Err(zbus::Error::InputOutput(Arc::new(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "D-Bus connection closed",
            ))))
        };
        match tokio::time::timeout(self.call_timeout + Duration::from_secs(1), wait).await {
            Ok(r) => r,
            Err(_) => Err(zbus::Error::InputOutput(Arc::new(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))),
        }
    }
}

/// What the audit log says of one set or call.
struct Audit {
    /// The interface as resolved (or as requested, when resolving failed).
    interface: Option<String>,
    /// `None` when the request failed before the policy was asked (bad arguments...).
    verdict: Option<Verdict>,
}

impl Audit {
    /// One line per remote set or call, allowed or not. Arguments are described by size and
    /// digest only: they may hold secrets (a password property), and they are the requester's
    /// text, of any size.
    fn log(&self, s: &RequestSubject, r: &Request, requester: &str, outcome: &Outcome) {
        let args = if s.op == Op::Set { &r.value } else { &r.args };
        let bytes = args
            .as_ref()
            .map(|a| serde_json::to_vec(a).unwrap_or_default())
            .unwrap_or_default();
        let digest = hex16(&sha2::Sha256::digest(&bytes));
        let policy = match &self.verdict {
            None => "not-reached",
            Some(Verdict::Read) => "read",
            Some(Verdict::Allowed) => "allowed",
            Some(Verdict::Denied(_)) => "denied",
        };
        let result = match outcome {
            Ok(_) => "ok",
            Err(e) => e.code.as_str(),
        };
        tracing::info!(
            target: "cbus_agent::audit",
            requester = %codec::quote(requester),
            op = %s.op,
            destination = %s.destination,
            path = %s.path,
            interface = self.interface.as_deref().unwrap_or("-"),
            member = s.member.as_deref().unwrap_or("-"),
            args_bytes = bytes.len(),
            args_sha256 = %digest,
            policy,
            result,
            "remote {}",
            s.op
        );
    }
}

/// The first 8 bytes of a digest as 16 hex digits.
fn hex16(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn invalid(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidArgument, message)
}

fn internal(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::InternalError, message)
}

fn resolve_error(e: ResolveError) -> ErrorBody {
    let code = match e {
        ResolveError::NotFound { .. } => ErrorCode::NotFound,
        ResolveError::Ambiguous { .. } => ErrorCode::InvalidArgument,
    };
    ErrorBody::new(code, e.to_string())
}

fn fdo_error(e: zbus::fdo::Error) -> ErrorBody {
    ErrorBody::from_dbus(e.name().to_string(), e.description().unwrap_or_default())
}

fn dbus_error(e: zbus::Error) -> ErrorBody {
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
fn check_interface(r: &Request) -> Result<(), ErrorBody> {
    match &r.interface {
        Some(iface) => cbus_protocol::names::validate_interface(iface)
            .map_err(|e| invalid(codec::name_error_text(&e))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_short() {
        assert_eq!(hex16(&sha2::Sha256::digest(b"")), "e3b0c44298fc1c14");
    }
}
