//! The module graph's layering, checked on the source so that it stays
//! true: no two files of a crate name each other (a circle of two), and
//! the client's command modules call the library modules below them, never
//! each other.
//!
//! A file names another by a `crate::…` or `super::…` path in its code
//! (comments and its `#[cfg(test)] mod tests` block do not count); a file
//! and its own parent or child module are one unit, not a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside its crate: `["store", "sqlite", "writer"]`.
type Module = Vec<String>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Every `.rs` file below `src` (generated code aside), by module path:
/// `lib.rs`, `main.rs` and `mod.rs` name their folder.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, prefix: &Module, found: &mut BTreeMap<Module, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("a readable source folder")
            .map(|entry| entry.expect("a readable entry").path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .expect("UTF-8 file names")
                .to_owned();
            if path.is_dir() {
                if name != "generated" {
                    let mut inner = prefix.clone();
                    inner.push(name);
                    walk(&path, &inner, found);
                }
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut module = prefix.clone();
                if !matches!(stem, "lib" | "main" | "mod") {
                    module.push(stem.to_owned());
                }
                found.insert(module, path);
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(src, &Vec::new(), &mut found);
    found
}

/// A file's code: without comment lines, and without its unit tests.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(start) => &text[..start],
        None => text,
    };
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths after each `anchor` (`crate::` or `super::`) in `code`, one
/// level of braces spread: `crate::{a::b, c}` names `a::b` and `c`.
fn paths_after(code: &str, anchor: &str) -> Vec<Vec<String>> {
    fn path(text: &str) -> Vec<String> {
        let mut segments = Vec::new();
        let mut rest = text;
        loop {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            segments.push(rest[..end].to_owned());
            match rest[end..].strip_prefix("::") {
                Some(next) => rest = next,
                None => break,
            }
        }
        segments
    }
    let mut found = Vec::new();
    for (index, _) in code.match_indices(anchor) {
        let preceded_by_ident = code[..index]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if preceded_by_ident {
            continue;
        }
        let rest = &code[index + anchor.len()..];
        match rest.strip_prefix('{') {
            Some(list) => {
                let list = &list[..list.find('}').unwrap_or(list.len())];
                found.extend(list.split(',').map(|item| path(item.trim())));
            }
            None => found.push(path(rest)),
        }
    }
    found
}

/// What each file of the crate at `src` names, as pairs of modules.
fn edges(src: &Path) -> BTreeSet<(Module, Module)> {
    let files = modules(src);
    let resolve = |path: &[String]| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|prefix| files.contains_key(prefix))
    };
    let related = |a: &Module, b: &Module| a.starts_with(b) || b.starts_with(a);
    let mut edges = BTreeSet::new();
    for (module, file) in &files {
        let code = code(&std::fs::read_to_string(file).expect("a readable source file"));
        let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
        let named = paths_after(&code, "crate::").into_iter().chain(
            paths_after(&code, "super::")
                .into_iter()
                .map(|path| parent.iter().cloned().chain(path).collect()),
        );
        for path in named {
            if let Some(target) = resolve(&path)
                && !related(module, &target)
            {
                edges.insert((module.clone(), target));
            }
        }
    }
    edges
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut crates: Vec<_> = std::fs::read_dir(workspace().join("crates"))
        .expect("the crates folder")
        .map(|entry| entry.expect("a readable entry").path())
        .filter(|path| path.join("src").is_dir())
        .map(|path| {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .expect("UTF-8 crate folders")
                .to_owned();
            (name, path.join("src"))
        })
        .collect();
    crates.sort();
    crates
}

#[test]
fn no_two_files_of_a_crate_name_each_other() {
    let mut circles = Vec::new();
    let mut checked = 0;
    for (name, src) in crates() {
        let edges = edges(&src);
        checked += edges.len();
        for (from, to) in &edges {
            if from < to && edges.contains(&(to.clone(), from.clone())) {
                circles.push(format!("{name}: {} <-> {}", from.join("/"), to.join("/")));
            }
        }
    }
    // The scan found the imports it is meant to judge.
    assert!(checked > 100, "only {checked} imports found");
    assert!(
        circles.is_empty(),
        "files that import each other:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_clients_commands_never_call_each_other() {
    let src = workspace().join("crates/quicnprotochat-client/src");
    let edges = edges(&src);
    let is_command = |module: &Module| module.len() == 2 && module[0] == "commands";
    let across: Vec<String> = edges
        .iter()
        .filter(|(from, to)| is_command(from) && is_command(to))
        .map(|(from, to)| format!("{} -> {}", from.join("/"), to.join("/")))
        .collect();
    assert!(
        edges.iter().any(|(from, _)| is_command(from)),
        "no command module imports anything: the scan is broken"
    );
    assert!(
        across.is_empty(),
        "command modules importing each other:\n{}",
        across.join("\n")
    );
}

#[test]
fn the_scan_sees_imports_in_braces_and_through_super() {
    let text = "use crate::{store::Store, api};\nuse super::reads::Read;\n// crate::ignored\n";
    let code = code(text);
    assert_eq!(
        paths_after(&code, "crate::"),
        vec![
            vec!["store".to_owned(), "Store".to_owned()],
            vec!["api".to_owned()]
        ]
    );
    assert_eq!(
        paths_after(&code, "super::"),
        vec![vec!["reads".to_owned(), "Read".to_owned()]]
    );
}
