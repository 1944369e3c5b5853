//! The layer rule of `src/lib.rs`: a top-level module uses only modules on its own layer or
//! below, and no two modules import each other (directly or around a circle).
//! `cargo test --test layering -- --nocapture` prints the module graph it read;
//! `LAYERING_SRC=/other/checkout/src` reads another tree (e.g. an older commit) instead.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top to bottom, as drawn in src/lib.rs.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["batch"],
    &["serve", "train", "eval", "synth"],
    &["engine"],
    &["generate", "model"],
    &["preprocess", "options"],
    &["config", "device", "cuda", "fsutil", "parallel"],
];

fn layer(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

fn layer_of(m: &str) -> usize {
    layer(m).unwrap_or_else(|| panic!("module {m} is on no layer: add it to src/lib.rs and LAYERS"))
}

/// Code without `//` comments (doc comments mention other modules freely).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level modules named after `crate::` (also inside `use crate::{a, b::c}`).
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        if let Some(inner) = rest.strip_prefix('{') {
            // The group ends at its matching brace.
            let mut depth = 0;
            let end = inner
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => return true,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    false
                })
                .map_or(inner.len(), |(i, _)| i);
            // Top-level names of the group: split on commas outside nested braces.
            let mut depth = 0;
            let mut item = String::new();
            for c in inner[..end].chars().chain([',']) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let name: String = item
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if !name.is_empty() {
                            out.insert(name);
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// module → modules it uses, read from src/.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::env::var("LAYERING_SRC")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let entry = g.entry(top.clone()).or_default();
        for u in uses(&text) {
            if u != top {
                entry.insert(u);
            }
        }
    }
    g
}

#[test]
fn modules_only_use_their_layer_or_below() {
    let g = graph();
    let shown = |m: &str| layer(m).map_or("?".to_string(), |l| l.to_string());
    for (m, deps) in &g {
        let deps: Vec<String> = deps.iter().map(|d| format!("{d}({})", shown(d))).collect();
        println!("{m:>10} ({}) -> {}", shown(m), deps.join(", "));
    }
    let mut wrong = vec![];
    for (m, deps) in &g {
        for d in deps {
            if layer_of(d) < layer_of(m) {
                wrong.push(format!("{m} -> {d}"));
            }
        }
    }
    assert!(wrong.is_empty(), "imports that point up: {wrong:?}");
}

#[test]
fn no_import_cycles_between_top_level_modules() {
    let g = graph();
    // Modules that reach each other form a cycle (a strongly connected set); list each once.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for d in g.get(&m).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut cycles = BTreeSet::new();
    for (m, r) in &reaches {
        if r.contains(*m) {
            let members: Vec<&str> = reaches
                .iter()
                .filter(|(o, ro)| r.contains(**o) && ro.contains(*m))
                .map(|(o, _)| o.as_str())
                .collect();
            cycles.insert(members.join(" <-> "));
        }
    }
    for c in &cycles {
        println!("cycle: {c}");
    }
    assert!(cycles.is_empty(), "import cycles: {cycles:?}");
}

#[test]
fn the_reader_sees_grouped_and_plain_imports() {
    let t = "use crate::{a::b, c, d::{e, f}};\nlet x = crate::g::h(); // crate::zzz\n";
    let got: Vec<_> = uses(&code(t)).into_iter().collect();
    assert_eq!(got, ["a", "c", "d", "g"]);
}

#[test]
fn the_doors_never_touch_tch() {
    // HTTP handlers and the CLI's commands go through the engine (or a lower layer's API).
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("eval/cli.rs")];
    rust_files(&src.join("cli"), &mut files);
    rust_files(&src.join("serve"), &mut files);
    for f in files {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        // `tch::` as a path of its own, not the end of e.g. `watch::`.
        let direct = text.match_indices("tch::").any(|(i, _)| {
            !text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        });
        assert!(!direct, "{} uses tch directly", f.display());
    }
}
