//! The `vmm` crate's module spine (ARCHITECTURE.md, "The spine"), checked from the source:
//! every `crate::…` and `super::…` path in `vmm/src` is an edge from the module that names it
//! to the module it names. Between top-level modules only the edges of [`ALLOWED`] may exist,
//! and between files no edge may close a cycle. The binaries (`main.rs`, `bin/`) reach the
//! library through `vmm::…` and only through [`BINARIES`].
//!
//! In the manner of rust-analyzer's architecture tests: a text scan, not a compiler pass.
//! `#[cfg(test)]` modules are left out (a test may reach anywhere), and so are comments.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it may use. `lib` only declares modules.
const ALLOWED: &[(&str, &[&str])] = &[
    ("lib", &[]),
    ("config", &[]),
    ("error", &[]),
    ("cli", &["config"]),
    ("machine", &["config", "error"]),
    ("build", &["config", "error", "machine"]),
    ("migration", &["config", "error", "machine"]),
    ("api", &["config", "error", "machine", "migration"]),
    (
        "run",
        &["api", "build", "config", "error", "machine", "migration"],
    ),
];

/// Binary → the library's top-level modules it may use.
const BINARIES: &[(&str, &[&str])] = &[
    ("main.rs", &["build", "cli", "error", "run"]),
    ("bin/vmm-ctl.rs", &["api", "migration"]),
];

/// A module path inside the crate: `["machine", "devices"]`; the crate root is empty.
type ModPath = Vec<String>;

/// Every library source file under `src`: its module path and its text.
fn library_modules(src: &Path) -> BTreeMap<ModPath, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                if p != src.join("bin") {
                    stack.push(p);
                }
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") || p == src.join("main.rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut path: ModPath = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            // A module file named `tests` is a `#[cfg(test)] mod tests;` (the crate's
            // convention): test code, left out like an inline test module.
            if path.last().is_some_and(|l| l == "tests") {
                continue;
            }
            if path.last().is_some_and(|l| l == "mod" || l == "lib") {
                path.pop();
            }
            out.insert(path, std::fs::read_to_string(&p).expect("read source"));
        }
    }
    out
}

/// The text that counts: no `#[cfg(test)]` module (from the first one to the end, where
/// they sit in this crate) and no line comments.
fn production_text(source: &str) -> String {
    let body = source.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths named after each `prefix` (`crate::` or `super::` or `vmm::`), with `{…}` groups
/// opened one level: `crate::machine::{devices::X, Machine}` gives `machine::devices::X` and
/// `machine::Machine`.
fn named_paths(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| ident(c) || c == ':') {
            continue;
        }
        let mut path = Vec::new();
        let mut s = rest;
        loop {
            let n = s.find(|c: char| !ident(c)).unwrap_or(s.len());
            if n == 0 {
                break;
            }
            path.push(s[..n].to_string());
            s = &s[n..];
            match s.strip_prefix("::") {
                Some(t) => s = t,
                None => break,
            }
        }
        if let Some(group) = s.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_item(&mut out, &path, &item);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            push_item(&mut out, &path, &item);
        } else if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

fn push_item(out: &mut Vec<Vec<String>>, base: &[String], item: &str) {
    let first: Vec<String> = item
        .trim()
        .split("::")
        .map(|s| {
            s.trim()
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .take_while(|s| !s.is_empty())
        .collect();
    let mut p = base.to_vec();
    p.extend(first);
    if !p.is_empty() {
        out.push(p);
    }
}

/// The longest known module that `path` (absolute in the crate) starts with.
fn resolve(path: &[String], known: &BTreeSet<ModPath>) -> ModPath {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains(p))
        .unwrap_or_default()
}

/// File-level edges `from → to` of the library (self edges left out).
fn edges(modules: &BTreeMap<ModPath, String>) -> BTreeSet<(ModPath, ModPath)> {
    let known: BTreeSet<ModPath> = modules.keys().cloned().collect();
    let mut out = BTreeSet::new();
    for (from, source) in modules {
        let text = production_text(source);
        let mut targets = Vec::new();
        for p in named_paths(&text, "crate::") {
            targets.push(resolve(&p, &known));
        }
        for p in named_paths(&text, "self::") {
            let mut abs = from.clone();
            abs.extend(p);
            targets.push(resolve(&abs, &known));
        }
        // A child module named bare (`use devices::DeviceManager;` in `machine/mod.rs`).
        for child in known
            .iter()
            .filter(|k| k.len() == from.len() + 1 && k.starts_with(from))
        {
            let name = &child[from.len()];
            for p in named_paths(&text, &format!("{name}::")) {
                let mut abs = child.clone();
                abs.extend(p);
                targets.push(resolve(&abs, &known));
            }
        }
        for p in named_paths(&text, "super::") {
            let mut abs: ModPath = from[..from.len().saturating_sub(1)].to_vec();
            abs.extend(p.into_iter().filter(|s| s != "super"));
            targets.push(resolve(&abs, &known));
        }
        for to in targets {
            if &to != from && !to.is_empty() {
                out.insert((from.clone(), to));
            }
        }
    }
    out
}

fn top(p: &ModPath) -> &str {
    p.first().map_or("lib", String::as_str)
}

/// Top-level edges outside [`ALLOWED`], as `from -> to (file -> file)` lines.
fn forbidden(edges: &BTreeSet<(ModPath, ModPath)>) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    edges
        .iter()
        .filter(|(f, t)| top(f) != top(t))
        .filter(|(f, t)| allowed.get(top(f)).is_none_or(|ok| !ok.contains(&top(t))))
        .map(|(f, t)| {
            format!(
                "{} -> {} ({} -> {})",
                top(f),
                top(t),
                f.join("::"),
                t.join("::")
            )
        })
        .collect()
}

/// A cycle of file-level edges, if any, as `a -> b -> … -> a`.
fn cycle(edges: &BTreeSet<(ModPath, ModPath)>) -> Option<String> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (f, t) in edges {
        next.entry(f).or_default().push(t);
    }
    // 0: not seen, 1: on the current path, 2: done.
    let mut state: BTreeMap<&ModPath, u8> = BTreeMap::new();
    fn visit<'a>(
        n: &'a ModPath,
        next: &BTreeMap<&'a ModPath, Vec<&'a ModPath>>,
        state: &mut BTreeMap<&'a ModPath, u8>,
        path: &mut Vec<&'a ModPath>,
    ) -> Option<String> {
        state.insert(n, 1);
        path.push(n);
        for &m in next.get(n).map_or(&[][..], Vec::as_slice) {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|p| *p == m).unwrap_or(0);
                    let mut names: Vec<String> = path[at..].iter().map(|p| p.join("::")).collect();
                    names.push(m.join("::"));
                    return Some(names.join(" -> "));
                }
                0 => {
                    if let Some(c) = visit(m, next, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let nodes: Vec<&ModPath> = next.keys().copied().collect();
    for n in nodes {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, &next, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_vmm_crate_keeps_its_spine() {
    let modules = library_modules(&src_dir());
    let tops: BTreeSet<&str> = modules.keys().map(top).collect();
    let listed: BTreeSet<&str> = ALLOWED.iter().map(|(m, _)| *m).collect();
    assert_eq!(
        tops, listed,
        "every top-level module has a row in ALLOWED (and every row a module)"
    );
    let e = edges(&modules);
    assert!(
        e.iter()
            .any(|(f, t)| top(f) == "build" && top(t) == "machine"),
        "the scan finds the edges that exist"
    );
    let bad = forbidden(&e);
    assert!(
        bad.is_empty(),
        "edges outside the spine:\n{}",
        bad.join("\n")
    );
    if let Some(c) = cycle(&e) {
        panic!("an import cycle between files: {c}");
    }
}

#[test]
fn the_binaries_use_only_their_entry_points() {
    let allowed: BTreeMap<&str, &[&str]> = BINARIES.iter().copied().collect();
    for (file, ok) in &allowed {
        let text = production_text(
            &std::fs::read_to_string(src_dir().join(file)).expect("read binary source"),
        );
        let used: BTreeSet<String> = named_paths(&text, "vmm::")
            .into_iter()
            .filter_map(|p| p.first().cloned())
            .collect();
        let bad: Vec<&String> = used.iter().filter(|m| !ok.contains(&m.as_str())).collect();
        assert!(bad.is_empty(), "{file} uses vmm::{bad:?}");
    }
    let cli_users: Vec<String> = library_modules(&src_dir())
        .iter()
        .filter(|(p, s)| {
            top(p) != "cli"
                && !named_paths(&production_text(s), "crate::")
                    .iter()
                    .all(|n| n.first().is_none_or(|f| f != "cli"))
        })
        .map(|(p, _)| p.join("::"))
        .collect();
    assert!(cli_users.is_empty(), "only main.rs uses cli: {cli_users:?}");
}

/// The scan itself: a planted edge outside the table, and a planted cycle, are found.
#[test]
fn a_planted_edge_or_cycle_is_caught() {
    let m = |p: &str| -> ModPath { p.split("::").map(String::from).collect() };
    let mut modules = BTreeMap::new();
    modules.insert(m("machine"), "use devices::X;\npub mod vcpu;\n".to_string());
    modules.insert(
        m("machine::vcpu"),
        "use crate::config::{Address, VmConfig};\n// use crate::api::Nope;\n".to_string(),
    );
    modules.insert(m("config"), String::new());
    modules.insert(m("api"), String::new());
    let e = edges(&modules);
    assert_eq!(
        e,
        BTreeSet::from([(m("machine::vcpu"), m("config"))]),
        "comments name no edge"
    );
    assert!(forbidden(&e).is_empty());
    assert!(cycle(&e).is_none());

    modules.insert(
        m("machine::vcpu"),
        "fn f() { crate::api::start(); }\n#[cfg(test)]\nmod tests { use crate::run::X; }\n"
            .to_string(),
    );
    let bad = forbidden(&edges(&modules));
    assert_eq!(
        bad,
        vec!["machine -> api (machine::vcpu -> api)".to_string()]
    );

    modules.insert(m("machine::vcpu"), "use super::Machine;\n".to_string());
    for parent in [
        "use self::vcpu::Y;",
        "pub fn g() { vcpu::h() }",
        "use crate::machine::vcpu::W;",
        "use crate::machine::{vcpu::W, X};",
    ] {
        modules.insert(m("machine"), format!("use ::vcpu::NotAChild;\n{parent}\n"));
        assert_eq!(
            cycle(&edges(&modules)).as_deref(),
            Some("machine -> machine::vcpu -> machine"),
            "{parent}"
        );
    }
    modules.insert(m("machine"), "use ::vcpu::NotAChild;\n".to_string());
    assert!(cycle(&edges(&modules)).is_none());
}
