//! Keeps the gateway's shape: no import cycle between its modules, and no module of more than
//! 500 lines of code (tests aside). `src/lib.rs` says which module may use which.
//!
//! A module counts with everything inside it, and only siblings are compared: `ws::session`
//! using `ws::writer` is an edge between `session` and `writer`; `ws::session` using `store` is
//! an edge between `ws` and `store`. A child using its parent's items (or the parent its
//! children's) is how Rust modules work and is no edge. Test code (from a top-level
//! `#[cfg(test)]` on) does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const MAX_CODE_LINES: usize = 500;

/// module path (`["ws", "session"]`; `[]` for the crate root) -> its code, tests left out.
fn modules() -> BTreeMap<Vec<String>, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .expect("under src")
                .with_extension("");
            let mut name: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            match name.last().map(String::as_str) {
                Some("main") if name.len() == 1 => continue, // the binary, not the library
                Some("lib") if name.len() == 1 => name.clear(),
                Some("mod") => {
                    name.pop();
                }
                _ => {}
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            let code: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("#[cfg(test)]"))
                .collect();
            out.insert(name, code.join("\n"));
        }
    }
    out
}

/// The longest prefix of `path` that is a module.
fn resolve(path: &[String], known: &BTreeMap<Vec<String>, String>) -> Vec<String> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains_key(p))
        .unwrap_or_default()
}

/// The modules `code` (of module `from`) names with `crate::a::b` or `super::a`.
fn uses(
    from: &[String],
    code: &str,
    known: &BTreeMap<Vec<String>, String>,
) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        for (prefix, base) in [
            ("crate::", Vec::new()),
            ("super::", from[..from.len().saturating_sub(1)].to_vec()),
        ] {
            for (i, _) in line.match_indices(prefix) {
                let rest = &line[i + prefix.len()..];
                let mut path = base.clone();
                for seg in rest.split("::") {
                    let ident: String = seg
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if ident.is_empty() || ident == "self" {
                        break;
                    }
                    path.push(ident.clone());
                    if ident.len() != seg.len() {
                        break;
                    }
                }
                out.insert(resolve(&path, known));
            }
        }
    }
    out
}

/// Edges between siblings: (parent, from child, to child).
fn sibling_edges(
    known: &BTreeMap<Vec<String>, String>,
) -> BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> {
    let mut groups: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, code) in known {
        for to in uses(from, code, known) {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // self, parent or child
            }
            groups
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    groups
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_owned());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_import_cycles() {
    let known = modules();
    assert!(known.len() > 20, "found only {:?}", known.keys());
    let groups = sibling_edges(&known);
    assert!(
        groups
            .get(&Vec::new())
            .is_some_and(|g| g.contains_key("ws")),
        "the ws module's uses were not found: {groups:?}"
    );
    for (parent, graph) in &groups {
        eprintln!("crate::{}: {graph:?}", parent.join("::"));
        if let Some(cycle) = find_cycle(graph) {
            panic!(
                "import cycle in crate::{}: {}",
                parent.join("::"),
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_cycle_check_finds_cycles() {
    let graph = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "a"]);
}

#[test]
fn modules_stay_small() {
    for (name, code) in modules() {
        let lines = code.lines().count();
        assert!(
            lines <= MAX_CODE_LINES,
            "crate::{} has {lines} lines of code (tests aside); split it by concern",
            name.join("::")
        );
    }
}
