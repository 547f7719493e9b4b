//! Introspection results, kept so that a request without interface or signature does not cost an
//! extra D-Bus round trip each time.
//!
//! Two levels: whole objects by destination + path (needed to resolve a member when the
//! interface is not given), and single interfaces by destination + interface (enough when the
//! interface is given: systemd has thousands of unit objects sharing a few interfaces, so a call
//! on a new unit reuses what an earlier unit taught). Entries expire after a TTL and everything
//! about a destination is dropped when its name changes owner (the service restarted and may
//! have changed). Both maps are bounded: a peer cannot grow the agent's memory by asking about
//! many paths.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cbus_protocol::introspect::ObjectSchema;

/// How long an entry is trusted when no owner change dropped it earlier.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Objects kept at most (interfaces: a quarter of it).
pub const DEFAULT_MAX_OBJECTS: usize = 4096;

type Key = (String, String);

struct Bounded<V> {
    entries: HashMap<Key, (Instant, V)>,
    max: usize,
}

impl<V: Clone> Bounded<V> {
    fn new(max: usize) -> Self {
        Bounded {
            entries: HashMap::new(),
            max: max.max(1),
        }
    }

    fn get(&self, key: &Key, ttl: Duration) -> Option<V> {
        self.entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < ttl)
            .map(|(_, v)| v.clone())
    }

    fn insert(&mut self, key: Key, value: V, ttl: Duration) {
        if self.entries.len() >= self.max && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if self.entries.len() >= self.max {
                if let Some(oldest) = oldest_key(&self.entries) {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(key, (Instant::now(), value));
    }

    fn forget(&mut self, destination: &str) {
        self.entries.retain(|(dest, _), _| dest != destination);
    }
}

fn oldest_key<K: Clone + Eq + Hash, V>(map: &HashMap<K, (Instant, V)>) -> Option<K> {
    map.iter()
        .min_by_key(|(_, (at, _))| *at)
        .map(|(k, _)| k.clone())
}

/// The cache; cheap to share behind an `Arc`.
pub struct SchemaCache {
    ttl: Duration,
    objects: Mutex<Bounded<Arc<ObjectSchema>>>,
    /// One-interface schemas (no XML), so `find_method(Some(iface), ..)` works on them.
    interfaces: Mutex<Bounded<Arc<ObjectSchema>>>,
}

impl Default for SchemaCache {
    fn default() -> Self {
        SchemaCache::new(DEFAULT_TTL, DEFAULT_MAX_OBJECTS)
    }
}

impl SchemaCache {
    pub fn new(ttl: Duration, max_objects: usize) -> Self {
        SchemaCache {
            ttl,
            objects: Mutex::new(Bounded::new(max_objects)),
            interfaces: Mutex::new(Bounded::new(max_objects / 4)),
        }
    }

    /// The cached schema of an object.
    pub fn object(&self, destination: &str, path: &str) -> Option<Arc<ObjectSchema>> {
        let key = (destination.to_owned(), path.to_owned());
        self.objects.lock().ok()?.get(&key, self.ttl)
    }

    /// The cached schema of one interface of a destination, from any of its objects.
    pub fn interface(&self, destination: &str, interface: &str) -> Option<Arc<ObjectSchema>> {
        let key = (destination.to_owned(), interface.to_owned());
        self.interfaces.lock().ok()?.get(&key, self.ttl)
    }

    /// Remembers an object's schema, and each of its interfaces.
    pub fn insert(&self, destination: &str, path: &str, schema: Arc<ObjectSchema>) {
        if let Ok(mut ifaces) = self.interfaces.lock() {
            for iface in &schema.interfaces {
                let one = ObjectSchema {
                    xml: String::new(),
                    interfaces: vec![iface.clone()],
                    children: Vec::new(),
                };
                ifaces.insert(
                    (destination.to_owned(), iface.name.clone()),
                    Arc::new(one),
                    self.ttl,
                );
            }
        }
        if let Ok(mut objects) = self.objects.lock() {
            objects.insert((destination.to_owned(), path.to_owned()), schema, self.ttl);
        }
    }

    /// Drops everything about a destination (its owner changed or went away).
    pub fn forget(&self, destination: &str) {
        if let Ok(mut o) = self.objects.lock() {
            o.forget(destination);
        }
        if let Ok(mut i) = self.interfaces.lock() {
            i.forget(destination);
        }
    }

    /// Number of cached objects and interfaces.
    pub fn len(&self) -> (usize, usize) {
        let o = self.objects.lock().map(|m| m.entries.len()).unwrap_or(0);
        let i = self.interfaces.lock().map(|m| m.entries.len()).unwrap_or(0);
        (o, i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<node>
      <interface name="a.B"><method name="M"><arg type="s" direction="in"/></method></interface>
      <interface name="a.C"><property name="P" type="u" access="read"/></interface>
    </node>"#;

    fn schema() -> Arc<ObjectSchema> {
        Arc::new(ObjectSchema::from_xml(XML).unwrap())
    }

    #[test]
    fn objects_and_interfaces_and_forget() {
        let c = SchemaCache::default();
        c.insert("org.x", "/a", schema());
        assert!(c.object("org.x", "/a").is_some());
        assert!(c.object("org.x", "/b").is_none());
        let b = c.interface("org.x", "a.B").unwrap();
        assert_eq!(
            b.find_method(Some("a.B"), "M").unwrap().item.in_signature(),
            "s"
        );
        assert!(c.interface("org.x", "a.C").is_some());
        c.insert("org.y", "/a", schema());
        c.forget("org.x");
        assert!(c.object("org.x", "/a").is_none());
        assert!(c.interface("org.x", "a.B").is_none());
        assert!(c.object("org.y", "/a").is_some());
    }

    #[test]
    fn expires_and_stays_bounded() {
        let c = SchemaCache::new(Duration::from_millis(30), 8);
        for i in 0..100 {
            c.insert("org.x", &format!("/p{i}"), schema());
        }
        let (objects, interfaces) = c.len();
        assert!(objects <= 8 && interfaces <= 2, "{objects} {interfaces}");
        assert!(c.object("org.x", "/p99").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.object("org.x", "/p99").is_none());
    }
}
