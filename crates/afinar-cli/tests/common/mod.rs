//! Helpers shared by the CLI integration tests: run the `afinar` binary,
//! write run configs into temp folders (absolute paths to the fixtures),
//! check that a failure left nothing half-written, and compare error texts
//! with the snapshots in `tests/snapshots/` (paths normalised).
//!
//! `UPDATE_SNAPSHOTS=1 cargo test --release -p afinar-cli` rewrites them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The fetched asset `name`, or a skip (a failure under CI): the rule in
/// `afinar::hub::assets::testing`.
#[allow(unused_imports)]
pub use afinar::hub::assets::testing::real_asset;

/// The tiny random BERT checkpoint (config, weights, tokenizer) and its data.
pub fn fixture() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny");
    std::fs::canonicalize(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What one `afinar` invocation did.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// A failure (exit 1) whose stderr has an `error:` line and every one of
    /// `needles`; no panic, no backtrace.
    #[track_caller]
    pub fn fails_with(&self, needles: &[&str]) -> &Self {
        // `SHOW_ERRORS=FILE cargo test ...` appends every checked error to
        // FILE (how the table in docs/bad-inputs.md was written).
        if let Some(p) = std::env::var_os("SHOW_ERRORS") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            writeln!(
                f,
                "{}: {}",
                std::thread::current().name().unwrap_or("?"),
                self.error_text().trim_end()
            )
            .unwrap();
        }
        assert_eq!(
            self.code, 1,
            "expected exit 1\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains("error: "),
            "no `error:` line in stderr:\n{}",
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "the binary panicked:\n{}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                self.stderr
            );
        }
        self
    }

    /// stderr from the first `error:` line on (the progress lines before it vary).
    pub fn error_text(&self) -> String {
        match self.stderr.find("error: ") {
            Some(i) => self.stderr[i..].to_string(),
            None => String::new(),
        }
    }
}

/// Run `afinar ARGS` in `cwd`.
pub fn afinar(cwd: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("spawn afinar");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `afinar` with string-like arguments (paths).
pub fn afinar_p<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Out {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    afinar(cwd, &refs)
}

/// A TOML string literal for a path.
pub fn q(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The tiny run: 36/12/12 rows, 100 steps of batch 8, one thread.
/// `model` is the checkpoint folder, `data` the training file.
pub fn tiny_config(model: &Path, data: &Path) -> String {
    format!(
        r#"[model]
path = {}
max_length = 32

[data]
train = {}
text = "text"
label = "label"
split = [0.6, 0.2, 0.2]

[train]
epochs = 20
batch_size = 8
lr = 1e-3
eval_every = 10
threads = 1
"#,
        q(model),
        q(data)
    )
}

/// Write `text` to `dir/name` and return the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Write the tiny config (fixture model and JSONL data) into `dir`.
pub fn tiny_config_file(dir: &Path) -> PathBuf {
    let f = fixture();
    write(dir, "tiny.toml", &tiny_config(&f, &f.join("train.jsonl")))
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

/// Nothing half-written under `dir`: no `*.tmp*` file or folder.
#[track_caller]
pub fn assert_no_tmp(dir: &Path) {
    let tmp: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().contains(".tmp"))
                .unwrap_or(false)
        })
        .collect();
    assert!(tmp.is_empty(), "temporary files left behind: {tmp:?}");
}

/// After a failed `train --out run`: no temp files anywhere, and `run`
/// holds no model and no results.
#[track_caller]
pub fn assert_no_run(dir: &Path, run: &Path) {
    assert_no_tmp(dir);
    assert!(
        !run.join("model").exists(),
        "{}/model was written",
        run.display()
    );
    assert!(
        !run.join("results.json").exists(),
        "{}/results.json was written",
        run.display()
    );
}

/// The names of the lines of `metrics.jsonl`, parsed (panics on a bad line).
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics.jsonl:{}: {e}: {l}", i + 1))
        })
        .collect()
}

pub fn read_json(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Replace the machine-specific paths in `text`: `tmp` -> `<TMP>`, the
/// fixture folder -> `<FIXTURE>`.
pub fn normalise(text: &str, tmp: &Path) -> String {
    let mut t = text.to_string();
    // The canonical form first: it may be longer than the given one.
    if let Ok(c) = std::fs::canonicalize(tmp) {
        t = t.replace(&c.display().to_string(), "<TMP>");
    }
    t = t.replace(&tmp.display().to_string(), "<TMP>");
    t.replace(&fixture().display().to_string(), "<FIXTURE>")
}

/// Compare `actual` with `tests/snapshots/<name>.txt`; `UPDATE_SNAPSHOTS=1`
/// writes it instead.
#[track_caller]
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run with UPDATE_SNAPSHOTS=1 to write it. Actual:\n{actual}",
            path.display()
        )
    });
    assert_eq!(
        expected,
        actual,
        "snapshot {} differs (UPDATE_SNAPSHOTS=1 rewrites it)",
        path.display()
    );
}

/// Copy the fixture checkpoint (config, weights, tokenizer; not the golden
/// files) into `dir/name`.
pub fn copy_model(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
    to
}

/// Rewrite `dir/model.safetensors` through `edit`, which gets
/// (name, dtype, shape, bytes) of every tensor and returns the new list.
pub fn rewrite_safetensors(
    dir: &Path,
    edit: impl FnOnce(
        Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    use safetensors::tensor::{SafeTensors, TensorView};
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let edited = edit(tensors);
    let views: Vec<(String, TensorView)> = edited
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let out = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(&path, out).unwrap();
}

/// Every tensor of a safetensors file: name -> (shape, bytes).
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::tensor::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// `afinar train CFG [--set S]... --out RUN`: its raw output, for the caller
/// to read the status and stderr.
pub fn train_out(cfg: &Path, run: &Path, sets: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_afinar"));
    cmd.arg("train").arg(cfg);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.arg("--out").arg(run).output().expect("spawn afinar")
}
