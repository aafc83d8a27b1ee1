//! The shape of the host, checked: which top-level module may import which.
//!
//! Every `crate::<module>` path in the host's sources (in `use` lines and inline), and every
//! `super::` path that leaves its top-level module, outside `#[cfg(test)]` code, is an edge.
//! The test fails on an edge missing from [`ALLOWED`] and on any cycle, so the data keeps
//! flowing one way. The table is also the host's map, in `lib.rs`'s module doc.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module and the modules it may import. The wiring (`app`, `cli`, the crate
/// root) and the benches' door (`bench`) may import anything and are not listed.
const ALLOWED: &[(&str, &[&str])] = &[
    // The trace model: shared types, nothing of the host.
    ("trace", &[]),
    ("clock", &["trace"]),
    ("config", &[]),
    // A codec used by receiver, plugin, decide and export.
    ("otlp", &["trace"]),
    // Told by every stage; tells none.
    ("telemetry", &[]),
    // The log under the buffer: appends, pins, the watermark, replay. Knows no stage.
    ("storage", &["config", "telemetry", "trace"]),
    // Metrics pass the buffer by: the receivers queue them for the exporter.
    (
        "receiver",
        &[
            "buffer",
            "config",
            "export",
            "otlp",
            "pipeline",
            "storage",
            "telemetry",
            "trace",
        ],
    ),
    // The buffer reads a root span's name, which its learned grace is kept under.
    ("buffer", &["config", "otlp", "trace"]),
    (
        "pipeline",
        &[
            "buffer",
            "clock",
            "decide",
            "export",
            "otlp",
            "storage",
            "telemetry",
            "trace",
        ],
    ),
    ("decide", &["config", "otlp", "trace"]),
    // The sandbox knows the trace model, the codec and the decision interface it implements.
    (
        "plugin",
        &["config", "decide", "otlp", "telemetry", "trace"],
    ),
    (
        "export",
        &["config", "otlp", "storage", "telemetry", "trace"],
    ),
    ("loadgen", &["export", "otlp"]),
];

const WIRING: &[&str] = &["app", "cli", "bench", "lib", "main", "layering"];

/// Drops `#[cfg(test)]` items (the attribute and the item or block after it) and comments.
fn without_tests_and_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let code = line.split("//").next().unwrap_or("");
        if code.trim() == "#[cfg(test)]" {
            // Skip the next item: up to its matching close brace, or its `;`.
            let mut depth = 0i32;
            let mut opened = false;
            for next in lines.by_ref() {
                let code = next.split("//").next().unwrap_or("");
                depth += code.matches('{').count() as i32;
                opened |= code.contains('{');
                depth -= code.matches('}').count() as i32;
                if (opened && depth <= 0) || (!opened && code.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The top-level modules named by `crate::` and crate-leaving `super::` paths in `source`,
/// a file `depth` modules below its top-level module (0 for `foo.rs` or `foo/mod.rs`).
fn imports(source: &str, depth: usize) -> BTreeSet<String> {
    let code = without_tests_and_comments(source);
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let named = |rest: &str, found: &mut BTreeSet<String>| {
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::x, b}`: each top-level name of the group, at brace depth 0.
            let mut level = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => level += 1,
                    '}' if level == 0 => break,
                    '}' => level -= 1,
                    ',' if level == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        let name = ident(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() && name != "self" {
                found.insert(name);
            }
        }
    };
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::` or part of a longer name
        }
        named(&code[at + "crate::".len()..], &mut found);
    }
    // Inline modules add depth: track `mod name {` blocks.
    let mut inline: Vec<i32> = Vec::new();
    let mut braces = 0i32;
    for line in code.lines() {
        let t = line.trim_start();
        let opens_mod = (t.starts_with("mod ") || t.starts_with("pub mod ") || t.contains(" mod "))
            && t.trim_end().ends_with('{');
        if opens_mod {
            inline.push(braces);
        }
        let mut rest = line;
        while let Some(at) = rest.find("super::") {
            let before = rest[..at].chars().next_back();
            let mut supers = 0;
            let mut tail = &rest[at..];
            while let Some(t) = tail.strip_prefix("super::") {
                supers += 1;
                tail = t;
            }
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && supers > depth + inline.len()
            {
                named(tail, &mut found);
            }
            rest = tail;
        }
        braces += line.matches('{').count() as i32;
        braces -= line.matches('}').count() as i32;
        while inline.last().is_some_and(|&d| braces <= d) {
            inline.pop();
        }
    }
    found
}

fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let parts: Vec<String> = (rel.iter())
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            let top = parts[0].clone();
            // `a/mod.rs` and `a.rs` are module `a` (depth 0); `a/b.rs` is `a::b` (depth 1).
            let depth = parts.len() - 1 - usize::from(parts.last().is_some_and(|p| p == "mod"));
            let source = std::fs::read_to_string(&path).expect("read a source file");
            let found = imports(&source, depth);
            let entry = edges.entry(top.clone()).or_default();
            entry.extend(found.into_iter().filter(|m| *m != top));
        }
    }
    edges
}

#[test]
fn modules_import_only_what_the_table_allows_and_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        if WIRING.contains(&from.as_str()) {
            continue;
        }
        let Some(may) = allowed.get(from.as_str()) else {
            wrong.push(format!("{from}: a top-level module missing from the table"));
            continue;
        };
        for to in tos {
            if !may.contains(&to.as_str()) {
                wrong.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports outside the table: {wrong:#?}");

    // No cycle among the stages (the wiring imports everything and nothing imports it).
    fn visit<'a>(
        m: &'a str,
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("import cycle: {}", path[at..].join(" -> ") + " -> " + m);
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for to in edges.get(m).into_iter().flatten() {
            if !WIRING.contains(&to.as_str()) {
                visit(to, edges, path, done);
            }
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if !WIRING.contains(&m.as_str()) {
            visit(m, &edges, &mut Vec::new(), &mut done);
        }
    }
}

#[test]
fn the_checker_sees_each_form_of_path() {
    let source = "use crate::a::X;\nuse crate::{b::Y, c};\nfn f() { crate::d::g(); }\n\
                  use super::e::Z;\n#[cfg(test)]\nmod tests {\n    use crate::hidden::T;\n}\n\
                  // crate::commented\n";
    let found = imports(source, 0);
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
    // One level down, `super::` stays inside the module; two levels leave it.
    assert!(imports("use super::x::Y;", 1).is_empty());
    assert_eq!(
        imports("use super::super::x::Y;", 1)
            .into_iter()
            .collect::<Vec<_>>(),
        ["x"]
    );
    // Inside an inline module, one more `super::` is needed to leave.
    assert!(imports("mod inner {\n    use super::y::Z;\n}\n", 0).is_empty());
}
