//! D-Bus objects that clients follow: introspection schema plus property values, kept current
//! by the object's PropertiesChanged signals.
//!
//! Objects are shared: however many clients follow the same (machine, destination, path,
//! interface), the gateway introspects and reads it once and holds one NATS subscription, on
//! the object's exact signal subject. Payload values are applied as they come; properties a
//! signal only invalidates are read back one by one with `get`, never with a GetAll (the loop
//! that drove systemd to 100% CPU in Cockpit #22393). The entry goes when its last client leaves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbus_client::fleet::{Fleet, Query};
use cbus_client::headers;
use cbus_client::systemd::PropertiesChanged;
use cbus_protocol::introspect::ObjectSchema;
use cbus_protocol::subject::SignalFilter;
use cbus_protocol::{ErrorBody, ErrorCode, Op, Request};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::changes::{Change, ObjectChange, ObjectChangeKind, ObjectKey, Router};
use crate::nats::{sent_by, signal_machine};
use crate::requests::{ask, get_query, MachineResult};
use crate::store::Store;

/// Invalidated properties of one object waiting to be read back, at most.
const MAX_INVALIDATED: usize = 256;

/// Invalidated (interface, property) pairs of one object and whether a reader is at work.
#[derive(Default)]
struct Invalidated {
    props: Mutex<BTreeSet<(String, String)>>,
    reading: AtomicBool,
}

impl Invalidated {
    fn take(&self) -> BTreeSet<(String, String)> {
        std::mem::take(&mut *self.props.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn is_empty(&self) -> bool {
        self.props
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

/// What a snapshot of an object holds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ObjectState {
    /// The introspection schema (raw XML left out).
    pub schema: ObjectSchema,
    /// interface -> property -> `{"t": signature, "v": value}`
    pub properties: BTreeMap<String, Map<String, Value>>,
}

enum Loaded {
    Loading,
    Ready(ObjectState),
    Failed(ErrorBody),
}

struct Entry {
    refs: usize,
    loaded: Loaded,
    follower: tokio::task::AbortHandle,
}

/// The followed objects; cheap to clone.
#[derive(Clone)]
pub(crate) struct Objects {
    inner: Arc<Mutex<HashMap<ObjectKey, Entry>>>,
    fleet: Fleet,
    store: Store,
    changes: Router,
    timeout: Duration,
}

impl Objects {
    pub(crate) fn new(fleet: Fleet, store: Store, changes: Router, timeout: Duration) -> Objects {
        Objects {
            inner: Arc::new(Mutex::new(HashMap::new())),
            fleet,
            store,
            changes,
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts following `key` (or counts one more client). A [`ObjectChangeKind::Reset`] change
    /// follows once the object is loaded.
    pub(crate) fn acquire(&self, key: &ObjectKey) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(key) {
            e.refs += 1;
            return;
        }
        let this = self.clone();
        let k = key.clone();
        let task = tokio::spawn(async move { this.follow(k).await });
        map.insert(
            key.clone(),
            Entry {
                refs: 1,
                loaded: Loaded::Loading,
                follower: task.abort_handle(),
            },
        );
    }

    /// One client less; the last one stops following.
    pub(crate) fn release(&self, key: &ObjectKey) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(key) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 {
                e.follower.abort();
                map.remove(key);
            }
        }
    }

    /// The current state: `None` while loading.
    pub(crate) fn state(&self, key: &ObjectKey) -> Option<Result<ObjectState, ErrorBody>> {
        match &self.lock().get(key)?.loaded {
            Loaded::Loading => None,
            Loaded::Ready(s) => Some(Ok(s.clone())),
            Loaded::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// Subscribes to the object's signals, then loads it, then applies signals until aborted.
    async fn follow(self, key: ObjectKey) {
        let filter = SignalFilter {
            nkey: Some(key.machine.clone()),
            sender: None,
            path_prefix: Some(key.path.clone()),
        };
        let sub = match filter.subjects() {
            Ok(subjects) => match subjects.into_iter().next() {
                Some(s) => self.fleet.client().subscribe(s).await.ok(),
                None => None,
            },
            Err(_) => None,
        };
        let loaded = self.load(&key).await;
        if let Some(e) = self.lock().get_mut(&key) {
            e.loaded = match loaded {
                Ok(s) => Loaded::Ready(s),
                Err(err) => Loaded::Failed(err),
            };
        }
        self.changes.publish(Change::Object(ObjectChange {
            key: key.clone(),
            kind: ObjectChangeKind::Reset,
        }));
        let Some(mut sub) = sub else {
            return;
        };
        // One reader per object drains what signals invalidate: a chatty object costs one read
        // per property, never a task per signal.
        let invalid = Arc::new(Invalidated::default());
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            if headers::get(h, headers::MEMBER) != Some(PropertiesChanged::MEMBER)
                || headers::get(h, headers::PATH) != Some(key.path.as_str())
            {
                continue;
            }
            // Anyone on the bus may emit a PropertiesChanged on any path: only the object's
            // owner (its unique name, or a sender that owns the well-known name) counts.
            if !sent_by(h, &key.dest) || signal_machine(&msg.subject, h).is_none() {
                continue;
            }
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let Some(PropertiesChanged {
                interface: iface,
                changed,
                invalidated,
            }) = PropertiesChanged::from_args(&args)
            else {
                continue;
            };
            if key.interface.as_deref().is_some_and(|i| i != iface) {
                continue;
            }
            self.apply(&key, &iface, changed);
            if invalidated.is_empty() {
                continue;
            }
            {
                let mut set = invalid.props.lock().unwrap_or_else(|e| e.into_inner());
                for p in invalidated {
                    if set.len() >= MAX_INVALIDATED {
                        break;
                    }
                    set.insert((iface.to_owned(), p));
                }
            }
            if !invalid.reading.swap(true, Ordering::AcqRel) {
                let this = self.clone();
                let key = key.clone();
                let invalid = invalid.clone();
                tokio::spawn(async move { this.drain_invalidated(&key, &invalid).await });
            }
        }
    }

    fn apply(&self, key: &ObjectKey, iface: &str, changed: Map<String, Value>) {
        if changed.is_empty() {
            return;
        }
        if let Some(Entry {
            loaded: Loaded::Ready(state),
            ..
        }) = self.lock().get_mut(key)
        {
            let props = state.properties.entry(iface.to_owned()).or_default();
            for (k, v) in &changed {
                props.insert(k.clone(), v.clone());
            }
        }
        self.changes.publish(Change::Object(ObjectChange {
            key: key.clone(),
            kind: ObjectChangeKind::Props {
                interface: iface.to_owned(),
                changed,
            },
        }));
    }

    /// Reads back invalidated properties until none are left.
    async fn drain_invalidated(&self, key: &ObjectKey, invalid: &Invalidated) {
        loop {
            let batch = invalid.take();
            if batch.is_empty() {
                invalid.reading.store(false, Ordering::Release);
                // More may have come between the take and the store; then go on, unless
                // another reader took over.
                if invalid.is_empty() || invalid.reading.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            let mut by_iface: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (iface, prop) in batch {
                by_iface.entry(iface).or_default().push(prop);
            }
            for (iface, props) in by_iface {
                self.refetch(key, &iface, props).await;
            }
        }
    }

    /// Reads back properties a signal invalidated, one `get` each.
    async fn refetch(&self, key: &ObjectKey, iface: &str, props: Vec<String>) {
        let Some(target) = self.store.target(&key.machine) else {
            return;
        };
        let mut changed = Map::new();
        for p in props {
            let q = get_query(&key.dest, &key.path, Some(iface), &p);
            if let MachineResult::Ok(s) = ask(&self.fleet, &target, &q, self.timeout).await {
                let mut tv = Map::new();
                tv.insert("t".into(), s.signature.unwrap_or_default().into());
                tv.insert("v".into(), s.value);
                changed.insert(p, Value::Object(tv));
            }
        }
        self.apply(key, iface, changed);
    }

    /// Introspects the object and reads its properties (one getall).
    async fn load(&self, key: &ObjectKey) -> Result<ObjectState, ErrorBody> {
        let target = self.store.target(&key.machine).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!("no machine {} is known", key.machine),
            )
        })?;
        let introspect = Query {
            destination: key.dest.clone(),
            path: key.path.clone(),
            op: Op::Introspect,
            member: None,
            request: Request::default(),
        };
        let mut schema: ObjectSchema =
            match ask(&self.fleet, &target, &introspect, self.timeout).await {
                MachineResult::Ok(s) => serde_json::from_value(s.value).map_err(|e| {
                    ErrorBody::new(
                        ErrorCode::InternalError,
                        format!("malformed introspection: {e}"),
                    )
                })?,
                MachineResult::Failed(e) => return Err(e),
                MachineResult::TimedOut => {
                    return Err(ErrorBody::new(
                        ErrorCode::Timeout,
                        "introspection timed out",
                    ))
                }
            };
        schema.xml.clear();
        if let Some(i) = &key.interface {
            schema.interfaces.retain(|x| &x.name == i);
            if schema.interfaces.is_empty() {
                return Err(ErrorBody::new(
                    ErrorCode::NotFound,
                    format!("the object has no interface {i}"),
                ));
            }
        }
        let has_props = schema.interfaces.iter().any(|i| !i.properties.is_empty());
        let mut properties = BTreeMap::new();
        if has_props {
            let getall = Query {
                destination: key.dest.clone(),
                path: key.path.clone(),
                op: Op::GetAll,
                member: None,
                request: Request {
                    interface: key.interface.clone(),
                    ..Default::default()
                },
            };
            match ask(&self.fleet, &target, &getall, self.timeout).await {
                MachineResult::Ok(s) => {
                    let obj = s.value.as_object().cloned().unwrap_or_default();
                    match &key.interface {
                        Some(i) => {
                            properties.insert(i.clone(), obj);
                        }
                        None => {
                            for (iface, props) in obj {
                                properties
                                    .insert(iface, props.as_object().cloned().unwrap_or_default());
                            }
                        }
                    }
                }
                MachineResult::Failed(e) => return Err(e),
                MachineResult::TimedOut => {
                    return Err(ErrorBody::new(
                        ErrorCode::Timeout,
                        "reading properties timed out",
                    ))
                }
            }
        }
        Ok(ObjectState { schema, properties })
    }
}
