//! The layers point down, and this test breaks when an import points up. From the bottom:
//! `book` (std, serde and its hashing and error crates only), `wire`, `bus`, `telemetry`,
//! `actors` and `query` (beside each other), then `cluster`, `control` and `node` above them. `bus` knows nothing of the
//! runtime; `telemetry` nothing of the actors, the cluster or the node (the HTTP port is the
//! node's); `actors` nothing of the cluster; nothing but `main.rs` imports the benchmark.
//! Checked on the source text, so it needs no build of its own: every `use` path and every
//! `crate::` path in a file counts, but for its test module (tests may reach up).

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (or `dir` itself when it is a file).
fn files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The crate-level modules a file names (`crate::bus::...` gives `bus`), and the external
/// crates its `use` lines start with, test modules included (a layer's tests obey it too).
fn imports(text: &str) -> (Vec<String>, Vec<String>) {
    let mut internal = Vec::new();
    let mut external = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        // `$crate::` inside macros is the same crate.
        let before = &text[..i];
        if before.ends_with('$') {
            continue;
        }
        let name: String = text[i + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            internal.push(name);
        }
    }
    for line in text.lines() {
        let line = line.trim_start();
        let Some(path) = line
            .strip_prefix("pub use ")
            .or_else(|| line.strip_prefix("use "))
        else {
            continue;
        };
        let first: String = path
            .trim_start_matches("::")
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !["crate", "super", "self"].contains(&first.as_str()) && !first.is_empty() {
            external.push(first);
        }
    }
    (internal, external)
}

/// The crates the package depends on (as Rust names them), and the standard ones: what a
/// `use` line's first segment must be to count as an external crate (anything else there is a
/// module or a type of the file's own, `use command::Op` in a `mod.rs`).
fn crates() -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let mut names: Vec<String> = ["std", "core", "alloc"].map(String::from).to_vec();
    let mut in_dependencies = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_dependencies = line.ends_with("dependencies]");
            continue;
        }
        if in_dependencies && let Some((name, _)) = line.split_once('=') {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.push(name.replace('-', "_"));
            }
        }
    }
    names
}

/// Every violation of `allowed_internal` / `allowed_external` in the files under `path`.
fn check(path: &str, allowed_internal: &[&str], allowed_external: Option<&[&str]>) -> Vec<String> {
    let crates = crates();
    let mut wrong = Vec::new();
    for file in files(&root().join(path)) {
        let text = std::fs::read_to_string(&file).expect("readable source");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let (internal, external) = imports(code);
        let shown = file
            .strip_prefix(root())
            .unwrap_or(&file)
            .display()
            .to_string();
        for name in internal {
            if !allowed_internal.contains(&name.as_str()) {
                wrong.push(format!("{shown} imports crate::{name}"));
            }
        }
        if let Some(allowed) = allowed_external {
            for name in external {
                if crates.contains(&name) && !allowed.contains(&name.as_str()) {
                    wrong.push(format!("{shown} uses the crate {name}"));
                }
            }
        }
    }
    wrong
}

const BOOK_CRATES: &[&str] = &[
    "std",
    "core",
    "alloc",
    "serde",
    "hashbrown",
    "foldhash",
    "thiserror",
];

#[test]
fn layers_only_point_down() {
    let mut wrong = Vec::new();
    wrong.extend(check("src/book", &["book"], Some(BOOK_CRATES)));
    wrong.extend(check("src/wire.rs", &["book", "wire"], None));
    wrong.extend(check("src/bus", &["book", "bus", "wire"], None));
    wrong.extend(check(
        "src/telemetry.rs",
        &["book", "bus", "wire", "telemetry", "COMMIT"],
        None,
    ));
    wrong.extend(check(
        "src/telemetry",
        &["book", "bus", "wire", "telemetry"],
        None,
    ));
    wrong.extend(check(
        "src/actors",
        &["book", "bus", "wire", "telemetry", "actors"],
        None,
    ));
    wrong.extend(check(
        "src/query",
        &["book", "bus", "wire", "telemetry", "query"],
        None,
    ));
    wrong.extend(check(
        "src/history",
        &[
            "book",
            "bus",
            "wire",
            "telemetry",
            "actors",
            "query",
            "config",
            "history",
        ],
        None,
    ));
    // Nothing but the command imports the benchmark.
    for dir in ["src", "tests", "benches"] {
        for file in files(&root().join(dir)) {
            let shown = file
                .strip_prefix(root())
                .unwrap_or(&file)
                .display()
                .to_string();
            if shown.starts_with("src/bench/")
                || ["src/main.rs", "src/lib.rs", "tests/engine/layers.rs"].contains(&shown.as_str())
            {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("readable source");
            if text.contains("crate::bench::")
                || text.contains("agora::bench::")
                || text.contains("use crate::bench")
            {
                wrong.push(format!("{shown} imports the benchmark (only main.rs may)"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up:\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn the_check_sees_a_wrong_import() {
    // What the check reads, on a made-up file: a book module reaching for the bus and tokio.
    let (internal, external) = imports(
        "use crate::bus::Subjects;\nuse tokio::sync::watch;\nuse super::num::Price;\nfn f() { $crate::x(); }\n",
    );
    assert_eq!(internal, ["bus"]);
    assert_eq!(external, ["tokio"]);
}
