//! Shared strings for the fleet model: a unit's name, description, states, type and unit-file
//! state are [`Text`]s, one allocation shared by every unit that says the same thing.
//!
//! Why: a gateway following 10,000 machines x 200 units holds 2,000,000 units, and almost all
//! of their words repeat — the same few states (`loaded`, `active`, `running`, `enabled`,
//! `simple`), and on every machine the same unit names and descriptions. As separate `String`s
//! they were about ten allocations per unit, most of the gateway's memory (issue #14:
//! 1,927 MiB at that size). Interned, each distinct word is allocated once and each unit holds
//! pointers.
//!
//! What is shared comes from the machines, and any machine may be compromised and send
//! millions of distinct words. So the [`Interner`] is bounded in entries and in bytes, and
//! shares nothing longer than [`MAX_SHARED_LEN`]: past a bound a word gets its own allocation
//! (correct, just not shared), and the table never grows. Words no unit holds any more are
//! dropped from the table when it is full (at most once per quarter of its entries of misses,
//! so a full table of live words costs no more than a lookup per miss, amortised).

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use serde::{Serialize, Serializer};

/// Entries of the process-wide table ([`shared`]).
pub(crate) const MAX_ENTRIES: usize = 64 * 1024;
/// Bytes of the process-wide table: its words plus [`ENTRY_OVERHEAD`] per entry.
pub(crate) const MAX_BYTES: usize = 16 * 1024 * 1024;
/// Longer words are never shared (a description is a line; a longer one is an outlier, and a
/// hostile one should not use up the table's bytes in a few entries).
pub(crate) const MAX_SHARED_LEN: usize = 1024;
/// What an entry costs besides its word, as [`Interner::bytes`] counts it: the reference
/// counts of its allocation and the table's pointer to it.
pub(crate) const ENTRY_OVERHEAD: usize = 32;

/// An immutable string, cheap to clone, maybe shared with every other `Text` of the same
/// words ([`Interner`]). Compares, orders and hashes as its `str`, so a map keyed by `Text`
/// is looked up (and ranged) by `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text(Arc<str>);

impl Text {
    /// Shared through the process-wide table ([`shared`]) where it has room.
    pub fn new(s: &str) -> Text {
        shared().intern(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` and `other` are one allocation (shared), not only equal.
    #[cfg(test)]
    pub(crate) fn shares(&self, other: &Text) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Default for Text {
    fn default() -> Text {
        static EMPTY: OnceLock<Text> = OnceLock::new();
        EMPTY.get_or_init(|| Text(Arc::from(""))).clone()
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Text {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text::new(s)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Text {
        Text::new(&s)
    }
}

impl From<&String> for Text {
    fn from(s: &String) -> Text {
        Text::new(s)
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Text {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Text> for str {
    fn eq(&self, other: &Text) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Text> for &str {
    fn eq(&self, other: &Text) -> bool {
        **self == *other.0
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl Serialize for Text {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// A bounded table of shared words.
#[derive(Debug)]
pub(crate) struct Interner {
    table: Mutex<Table>,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Table {
    words: HashSet<Arc<str>>,
    /// The words' bytes plus [`ENTRY_OVERHEAD`] each.
    bytes: usize,
    /// Words not shared because the table was full, counted modulo a quarter of its entries:
    /// a miss sweeps the table when this is 0.
    misses: usize,
    /// Sweeps so far.
    sweeps: u64,
}

impl Table {
    fn has_room(&self, len: usize, max_entries: usize, max_bytes: usize) -> bool {
        self.words.len() < max_entries
            && self.bytes.saturating_add(len + ENTRY_OVERHEAD) <= max_bytes
    }

    /// Drops the words only the table holds.
    fn sweep(&mut self) {
        self.sweeps += 1;
        let mut freed = 0;
        self.words.retain(|w| {
            let keep = Arc::strong_count(w) > 1;
            if !keep {
                freed += w.len() + ENTRY_OVERHEAD;
            }
            keep
        });
        self.bytes -= freed;
        // A table that lost most of its words gives its memory back too.
        if self.words.capacity() > 4 * self.words.len().max(64) {
            self.words.shrink_to_fit();
        }
    }
}

impl Interner {
    /// A table of at most `max_entries` words and `max_bytes` bytes (as [`Interner::bytes`]
    /// counts them).
    pub(crate) fn new(max_entries: usize, max_bytes: usize) -> Interner {
        Interner {
            table: Mutex::default(),
            max_entries,
            max_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every change leaves the table consistent, so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `s` as a [`Text`]: the table's if it has it, added if there is room, else on its own.
    pub(crate) fn intern(&self, s: &str) -> Text {
        if s.len() > MAX_SHARED_LEN {
            return Text(Arc::from(s));
        }
        let mut t = self.lock();
        if let Some(w) = t.words.get(s) {
            return Text(Arc::clone(w));
        }
        if !t.has_room(s.len(), self.max_entries, self.max_bytes) {
            // Sweep on the first miss, then once every quarter of the table's entries of
            // misses: a table full of words still in use costs no more than that.
            if t.misses == 0 {
                t.sweep();
            }
            t.misses = (t.misses + 1) % (self.max_entries / 4).max(1);
            if !t.has_room(s.len(), self.max_entries, self.max_bytes) {
                return Text(Arc::from(s));
            }
        }
        let w: Arc<str> = Arc::from(s);
        t.bytes += s.len() + ENTRY_OVERHEAD;
        t.words.insert(Arc::clone(&w));
        Text(w)
    }

    /// Words in the table.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().words.len()
    }

    /// The table's words' bytes plus [`ENTRY_OVERHEAD`] per word.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// The process-wide table, [`MAX_ENTRIES`] words and [`MAX_BYTES`] bytes.
pub(crate) fn shared() -> &'static Interner {
    static SHARED: OnceLock<Interner> = OnceLock::new();
    SHARED.get_or_init(|| Interner::new(MAX_ENTRIES, MAX_BYTES))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    impl Interner {
        fn sweeps(&self) -> u64 {
            self.lock().sweeps
        }

        fn capacity(&self) -> usize {
            self.lock().words.capacity()
        }
    }

    const CAP: usize = 100;

    fn word(i: usize) -> String {
        format!("word-{i:08}")
    }

    #[test]
    fn equal_words_share_one_allocation() {
        let t = Interner::new(CAP, 1 << 20);
        let a = t.intern("active");
        let b = t.intern(&String::from("active"));
        assert!(a.shares(&b));
        assert_eq!(a, b);
        assert_eq!(t.len(), 1);
        assert_eq!(t.bytes(), "active".len() + ENTRY_OVERHEAD);
        assert!(!a.shares(&t.intern("inactive")));
    }

    #[test]
    fn a_flood_of_distinct_words_stops_sharing_at_the_cap() {
        let t = Interner::new(CAP, 1 << 20);
        // Every word held, as units would hold them: nothing can be swept.
        let held: Vec<Text> = (0..100_000).map(|i| t.intern(&word(i))).collect();
        assert_eq!(t.len(), CAP, "the table stops at its entries");
        assert!(t.capacity() < 4 * CAP, "and so does its memory");
        for (i, w) in held.iter().enumerate() {
            assert_eq!(*w, word(i), "every word is still itself");
        }
        // The first ones are shared, the later ones on their own.
        assert!(held[0].shares(&t.intern(&word(0))));
        assert!(held[CAP - 1].shares(&t.intern(&word(CAP - 1))));
        let late = t.intern(&word(CAP));
        assert_eq!(late, held[CAP]);
        assert!(!late.shares(&held[CAP]));
        // A full table of live words is swept once per quarter of its entries of misses, not
        // on every miss.
        let misses = (100_000 - CAP) as u64 + 2;
        assert!(
            t.sweeps() <= misses / (CAP as u64 / 4) + 1,
            "{} sweeps for {misses} misses",
            t.sweeps()
        );
    }

    #[test]
    fn the_bytes_are_bounded_too() {
        let max = 4096;
        let t = Interner::new(usize::MAX, max);
        let long = |i: usize| format!("{i:0>200}");
        let held: Vec<Text> = (0..10_000).map(|i| t.intern(&long(i))).collect();
        assert!(t.bytes() <= max, "{} bytes", t.bytes());
        assert_eq!(t.len(), max / (200 + ENTRY_OVERHEAD));
        assert!(!held[9_999].shares(&t.intern(&long(9_999))));
        assert_eq!(held[9_999], long(9_999));
    }

    #[test]
    fn words_nobody_holds_make_room_again() {
        let t = Interner::new(CAP, 1 << 20);
        let flood: Vec<Text> = (0..CAP).map(|i| t.intern(&word(i))).collect();
        assert_eq!(t.len(), CAP);
        drop(flood);
        // The next miss sweeps the words only the table held.
        let a = t.intern("running");
        assert!(a.shares(&t.intern("running")));
        assert_eq!(t.len(), 1);
        assert_eq!(t.bytes(), "running".len() + ENTRY_OVERHEAD);
    }

    #[test]
    fn long_words_are_never_shared() {
        let t = Interner::new(CAP, 1 << 20);
        let long = "x".repeat(MAX_SHARED_LEN + 1);
        let a = t.intern(&long);
        assert!(!a.shares(&t.intern(&long)));
        assert_eq!(a, long);
        assert_eq!(t.len(), 0);
        let edge = "y".repeat(MAX_SHARED_LEN);
        assert!(t.intern(&edge).shares(&t.intern(&edge)));
    }

    #[test]
    fn odd_input_is_only_text() {
        let t = Interner::new(2, 1 << 20);
        for w in ["", "\0", "\u{1F600} é", "a\"b\\c\n", "  "] {
            assert_eq!(t.intern(w), w);
        }
        let zero = Interner::new(0, 0);
        assert_eq!(zero.intern("loaded"), "loaded");
        assert_eq!(zero.len(), 0);
    }

    #[test]
    fn threads_share_the_table() {
        let t = Arc::new(Interner::new(CAP, 1 << 20));
        let words: Vec<Vec<Text>> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || (0..50).map(|i| t.intern(&word(i))).collect())
            })
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(t.len(), 50);
        for w in &words[1..] {
            assert!(w.iter().zip(&words[0]).all(|(a, b)| a.shares(b)));
        }
    }

    #[test]
    fn text_is_its_str() {
        let mut units = BTreeMap::new();
        for n in ["b.service", "a.service", "ab.service", "c.timer"] {
            units.insert(Text::from(n), ());
        }
        let range: Vec<&str> = units
            .range::<str, _>((std::ops::Bound::Included("a"), std::ops::Bound::Unbounded))
            .take_while(|(n, _)| n.starts_with('a'))
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(range, ["a.service", "ab.service"]);
        assert!(units.contains_key("c.timer"));
        let t = Text::from("failed");
        assert_eq!(t, "failed");
        assert_eq!("failed", t);
        assert_ne!(t, "active");
        assert_eq!(t, String::from("failed"));
        assert_eq!(Text::default(), "");
        assert_eq!(format!("{t} {t:?}"), "failed \"failed\"");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"failed\"");
        assert!(Text::new("loaded").shares(&Text::from(String::from("loaded"))));
    }
}
