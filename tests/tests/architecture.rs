//! The layout stays readable: inside mesh-node and mesh-gateway, no module reaches back into one
//! that reaches it (no circle in the graph of `crate::<module>` references between top-level
//! modules), and the gateway uses only what mesh-node exports on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`transport/hello.rs` -> `transport`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// Top-level module -> the top-level modules its code names as `crate::<module>`.
fn graph(crate_dir: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = repo().join(crate_dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read");
        // Only code: not comments, not the tests at the bottom of a file (they may reach anywhere).
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or("")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .map(|l| format!("{l}\n"))
            .collect();
        let targets = edges.entry(from.clone()).or_default();
        for part in code.split("crate::").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                targets.insert(name);
            }
        }
        // `use crate::{a, b::c}` lists.
        for part in code.split("use crate::{").skip(1) {
            let list = part.split("};").next().unwrap_or("");
            for item in list.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name != from && modules.contains(&name) {
                    targets.insert(name);
                }
            }
        }
    }
    edges
}

/// A circle in `edges`, if there is one, as the modules along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(c) = visit(node, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn mesh_node_modules_form_no_circle() {
    let edges = graph("mesh-node");
    assert!(edges.contains_key("transport") && edges.contains_key("server"));
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "mesh-node modules reach each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn mesh_gateway_modules_form_no_circle() {
    let edges = graph("mesh-gateway");
    assert!(edges.contains_key("control") && edges.contains_key("http"));
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "mesh-gateway modules reach each other in a circle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_checker_sees_a_circle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("c".into());
    edges.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&edges).map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_owned())
    );
}

/// The gateway builds on mesh-node's exported API only: no crate-private helpers, no CLI module.
#[test]
fn the_gateway_does_not_reach_into_the_node() {
    let src = repo().join("mesh-gateway/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for forbidden in [
            "mesh_node::cli",
            "mesh_node::node::lock",
            "mesh_node::config::Kind",
        ] {
            assert!(
                !text.contains(forbidden),
                "{} uses {forbidden}",
                file.display()
            );
        }
    }
}
