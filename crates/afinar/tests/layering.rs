//! The library's layers, bottom to top (`docs/design.md` draws them): a
//! module may use the modules below it, never one above it, so there are
//! no import circles. This test reads every source file of
//! `crates/afinar/src` (code only: comments and `#[cfg(test)]` modules are
//! skipped, tests may use any layer) and fails naming the file, the line
//! and both layers when a module reaches upwards; it also fails when a
//! top-level module of `lib.rs` has no place in the list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bottom to top. Items of `lib.rs` itself (`Error`, `Result`, `device`,
/// `candle_core`) are the root: every layer may use them.
const LAYERS: &[&str] = &[
    "testutil",     // unit-test helpers (cfg(test) only)
    "error",        // typed errors
    "simd",         // the vector level of the CPU kernels, chosen at run time
    "event",        // what the library reports instead of printing
    "fsutil",       // atomic writes
    "mem_guard",    // the memory bound of untrusted renders
    "modes",        // typed modes of config files (serde helpers)
    "metrics",      // accuracy, F1, MSE, Pearson
    "plot",         // metrics.png
    "hub",  // files and sources: safetensors, GGUF, tokenizers, chat templates, assets, the hub
    "data", // rows, fields, labels, splits, batches, SFT rendering
    "weak", // labelling rules (keywords, regexes, lexicons, SpamAssassin's), mails, the label model
    "nn",   // ops with backward, layers (Linear + LinearAdapter, norms)
    "params", // the parameter store, the selector, loading layers by path
    "optim", // AdamW, schedules
    "adapters", // LoRA/DoRA, IA3, prompt tuning, PEFT files
    "models", // bodies: BERT, Llama family, GPT-2; one loader
    "heads", // sequence heads on any body, the LM head
    "generate", // sampling with a KV cache
    "config", // the run TOML, validated into a plan
    "export", // one way out: HF folders, PEFT folders, GGUF
    "train", // the loop and its pieces: step, guard, best, resume, run folder
    "runs", // finished runs read back, `afinar export`
    "methods", // objectives + recipes: classify, sft
    "fuzz_targets", // the fuzz targets' bodies (test harness)
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rank(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| *l == m)
}

/// The top-level module a file belongs to (`src/hub/gguf/llama.rs` -> `hub`).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file: `//` comments removed, and cut at its `#[cfg(test)]`
/// module (the convention here: unit tests close the file).
fn code(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|n| n.trim_start().starts_with("mod "))
        {
            break;
        }
        let code = match line.find("//") {
            Some(c) => &line[..c],
            None => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

/// Top-level modules named by `crate::X` paths and `use crate::{X, Y::..}` groups.
fn used_modules(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            let mut depth = 0;
            let mut item = String::new();
            for c in group[..end].chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(item.trim().split("::").next().unwrap().to_string());
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            if !item.trim().is_empty() {
                out.push(item.trim().split("::").next().unwrap().to_string());
            }
        } else {
            let ident: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(ident);
        }
        rest = after;
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_has_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(m) = line.trim().strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(
                rank(m).is_some(),
                "lib.rs: module `{m}` has no place in tests/layering.rs LAYERS (and docs/design.md)"
            );
        }
    }
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut upward: Vec<String> = Vec::new();
    let mut edges: BTreeMap<(String, String), usize> = BTreeMap::new();
    for f in &files {
        if f.file_name().is_some_and(|n| n == "tests.rs") || f.ends_with("src/lib.rs") {
            continue;
        }
        let me = module_of(f);
        let Some(my_rank) = rank(&me) else {
            panic!("{}: module `{me}` has no layer", f.display());
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in code(&text) {
            for used in used_modules(&line) {
                let Some(r) = rank(&used) else { continue };
                if used != me {
                    *edges.entry((me.clone(), used.clone())).or_default() += 1;
                }
                if r > my_rank {
                    upward.push(format!(
                        "{}:{n}: `{me}` (layer {my_rank}) uses `{used}` (layer {r}, above it): {}",
                        f.strip_prefix(src()).unwrap().display(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "{} upward imports:\n{}",
        upward.len(),
        upward.join("\n")
    );
    // The scan sees the imports it should (a broken scanner passes vacuously).
    for (a, b) in [
        ("models", "params"),
        ("methods", "train"),
        ("hub", "fsutil"),
    ] {
        assert!(
            edges.contains_key(&(a.to_string(), b.to_string())),
            "the scan found no `{a}` -> `{b}` import"
        );
    }
}

#[test]
fn the_scanner_sees_paths_and_groups() {
    assert_eq!(
        used_modules("use crate::{adapters::peft, Error, hub::{a, b}};"),
        vec!["adapters", "Error", "hub"]
    );
    assert_eq!(
        used_modules("let x = crate::models::load(crate::nn::x);"),
        vec!["models", "nn"]
    );
    let c = code("use crate::a; // crate::b\n#[cfg(test)]\nmod tests {\nuse crate::z;\n}");
    assert_eq!(c.len(), 1);
    assert_eq!(used_modules(&c[0].1), vec!["a"]);
}
