//! The crate's modules form layers: no module reaches, through `crate::` or `super::` paths,
//! a module that reaches back to it. Reads the crate's own sources (comments, test code at the
//! end of a file after `#[cfg(test)]`, and the crate root are left out: tests may sit above
//! anything, and the root only declares and re-exports).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file relative to `src` (`api/mod.rs` → `api`,
/// `api/feed.rs` → `api::feed`).
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The modules `text` (the code of module `module`) refers to.
fn references(module: &str, text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let parent = module.rsplit_once("::").map_or("", |(p, _)| p).to_string();
    let mut found = BTreeSet::new();
    for (prefix, base) in [("crate::", String::new()), ("super::", parent)] {
        for (at, _) in text.match_indices(prefix) {
            // `$crate::` and `hangar_store::` are not ours.
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let rest = &text[at + prefix.len()..];
            let segments: Vec<&str> = rest
                .split("::")
                .map(|s| {
                    let end = s
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(s.len());
                    &s[..end]
                })
                .take_while(|s| !s.is_empty())
                .collect();
            // The longest known module the path names.
            let mut target = known.contains(&base).then(|| base.clone());
            let mut path = base.clone();
            for seg in segments {
                path = if path.is_empty() {
                    seg.to_string()
                } else {
                    format!("{path}::{seg}")
                };
                if known.contains(&path) {
                    target = Some(path.clone());
                }
            }
            if let Some(t) = target
                && t != module
            {
                found.insert(t);
            }
        }
    }
    found
}

#[test]
fn no_module_imports_a_module_that_imports_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut code = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if rel.starts_with("tests") || rel == Path::new("lib.rs") || rel.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let text = match text.find("#[cfg(test)]") {
            Some(at) => &text[..at],
            None => &text,
        };
        // Code only: a doc link is not an import.
        let text: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        code.insert(module_of(rel), text);
    }
    let known: BTreeSet<String> = code.keys().cloned().collect();
    assert!(known.contains("scheduler") && known.contains("api::feed"));
    let graph: BTreeMap<String, BTreeSet<String>> = code
        .iter()
        .map(|(m, text)| (m.clone(), references(m, text, &known)))
        .collect();

    // A depth-first search for a back edge; report the whole circle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut circle = stack[at..].to_vec();
            circle.push(m.to_string());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(circle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", circle.join(" -> "));
        }
    }
    // The composition root is at the top: nothing imports it.
    for (m, refs) in &graph {
        assert!(!refs.contains("scheduler"), "{m} imports the scheduler");
    }
}

#[test]
fn the_checker_finds_a_circle() {
    let known: BTreeSet<String> = ["a", "b", "api", "api::x"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        references(
            "a",
            "use crate::b::Thing; $crate::a::x; hangar_store::b",
            &known
        ),
        BTreeSet::from(["b".to_string()])
    );
    assert_eq!(
        references("api::x", "use super::Handles; crate::api::x::y", &known),
        BTreeSet::from(["api".to_string()])
    );
}
