//! The bad-input catalogue (docs/bad-inputs.md): each case runs the
//! `afinar` binary on one broken input and checks that it exits 1, that
//! stderr names what and where (file, line, key, tensor, expected vs
//! actual), and that nothing half-written is left behind (no `*.tmp*`, no
//! `model/` where none should be). A few error texts are snapshots in
//! `tests/snapshots/` with paths normalised.

mod common;

use common::*;
use std::path::{Path, PathBuf};

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn d(&self) -> &Path {
        self.dir.path()
    }
    fn run(&self) -> PathBuf {
        self.d().join("run")
    }
    /// `afinar train CFG [--set S]... --out <tmp>/run`
    fn train(&self, cfg: &Path, set: &[&str]) -> Out {
        let mut args: Vec<String> = vec!["train".into(), cfg.display().to_string()];
        for s in set {
            args.push("--set".into());
            args.push(s.to_string());
        }
        args.push("--out".into());
        args.push(self.run().display().to_string());
        afinar_p(self.d(), &args)
    }
    /// The tiny config with `model.path` = `model`.
    fn config_for_model(&self, model: &Path) -> PathBuf {
        write(
            self.d(),
            "run.toml",
            &tiny_config(model, &fixture().join("train.jsonl")),
        )
    }
    /// The tiny config with `data.train` = a file of `rows`.
    fn config_for_data(&self, name: &str, rows: &[u8]) -> PathBuf {
        let data = self.d().join(name);
        std::fs::write(&data, rows).unwrap();
        write(self.d(), "run.toml", &tiny_config(&fixture(), &data))
    }
    /// A failed train must leave no run (and, failing before training, no folder at all).
    #[track_caller]
    fn no_run_folder(&self) {
        assert_no_run(self.d(), &self.run());
        assert!(!self.run().exists(), "run folder created");
    }
    fn snapshot(&self, name: &str, out: &Out) {
        assert_snapshot(name, &normalise(&out.error_text(), self.d()));
    }
}

/// The fixture's JSONL lines, with `extra` inserted as line 4.
fn rows_with(extra: &[u8]) -> Vec<u8> {
    let text = std::fs::read(fixture().join("train.jsonl")).unwrap();
    let mut lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    lines.insert(3, extra);
    let mut out = lines.join(&b'\n');
    out.push(b'\n');
    out
}

// ---------------------------------------------------------------- model

#[test]
fn missing_model_folder() {
    let c = Case::new();
    let cfg = c.config_for_model(&c.d().join("no-such-model"));
    c.train(&cfg, &[])
        .fails_with(&["no-such-model", "model folder does not exist", "model.path"]);
    c.no_run_folder();
}

#[test]
fn model_folder_without_weights() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[]).fails_with(&[
        "m: no model.safetensors",
        "files: [\"config.json\", \"tokenizer.json\", \"vocab.txt\"]",
    ]);
    c.no_run_folder();
}

#[test]
fn truncated_safetensors() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.join("model.safetensors"))
        .unwrap();
    f.set_len(50_000).unwrap();
    drop(f);
    let cfg = c.config_for_model(&m);
    let out = c.train(&cfg, &[]);
    out.fails_with(&["m/model.safetensors", "truncated", "file is 50000 bytes"]);
    c.snapshot("truncated_safetensors", &out);
    c.no_run_folder();
    // `inspect` says the same.
    afinar_p(c.d(), &[Path::new("inspect"), &m]).fails_with(&["m/model.safetensors", "truncated"]);
}

#[test]
fn corrupt_safetensors_header() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    let mut bytes = std::fs::read(m.join("model.safetensors")).unwrap();
    // The header length stays; the JSON after it does not parse.
    bytes[8..20].copy_from_slice(b"{\"a\": garbag");
    std::fs::write(m.join("model.safetensors"), bytes).unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[])
        .fails_with(&["m/model.safetensors", "corrupt safetensors header"]);
    c.no_run_folder();
}

#[test]
fn tensor_with_wrong_shape() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    rewrite_safetensors(&m, |mut ts| {
        for t in ts.iter_mut() {
            if t.0 == "encoder.layer.1.attention.self.query.weight" {
                t.2 = vec![16, 64]; // was [32, 32]: same bytes
            }
        }
        ts
    });
    let cfg = c.config_for_model(&m);
    let out = c.train(&cfg, &[]);
    out.fails_with(&[
        "encoder.layer.1.attention.self.query.weight",
        "expected shape [32, 32], found [16, 64]",
    ]);
    c.snapshot("tensor_with_wrong_shape", &out);
    c.no_run_folder();
}

#[test]
fn checkpoint_missing_a_tensor() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    rewrite_safetensors(&m, |ts| {
        ts.into_iter()
            .filter(|t| t.0 != "encoder.layer.0.output.dense.weight")
            .collect()
    });
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[])
        .fails_with(&["encoder.layer.0.output.dense.weight", "missing"]);
    c.no_run_folder();
}

#[test]
fn checkpoint_with_an_unexpected_tensor() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    rewrite_safetensors(&m, |mut ts| {
        ts.push((
            "encoder.layer.7.output.dense.weight".into(),
            safetensors::Dtype::F32,
            vec![2],
            vec![0; 8],
        ));
        ts
    });
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[]).fails_with(&[
        "m/model.safetensors",
        "unexpected tensors",
        "encoder.layer.7.output.dense.weight",
    ]);
    c.no_run_folder();
}

#[test]
fn malformed_model_config_json() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    std::fs::write(m.join("config.json"), "{\n  \"hidden_size\": 32,\n").unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[]).fails_with(&["m/config.json", "line"]);
    c.no_run_folder();
}

#[test]
fn model_folder_without_tokenizer() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    std::fs::remove_file(m.join("tokenizer.json")).unwrap();
    std::fs::remove_file(m.join("vocab.txt")).unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[])
        .fails_with(&["m/tokenizer.json", "not found", "vocab.txt"]);
    c.no_run_folder();
}

// ---------------------------------------------------------------- config

#[test]
fn missing_config_file() {
    let c = Case::new();
    c.train(&c.d().join("nope.toml"), &[])
        .fails_with(&["nope.toml", "No such file"]);
    c.no_run_folder();
}

#[test]
fn unknown_config_key() {
    let c = Case::new();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl"))
        .replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 3e-5");
    let cfg = write(c.d(), "run.toml", &text);
    let out = c.train(&cfg, &[]);
    out.fails_with(&[
        "run.toml",
        "line 15",
        "unknown field `learning_rate`",
        "`lr`",
    ]);
    c.snapshot("unknown_config_key", &out);
    c.no_run_folder();
}

#[test]
fn toml_syntax_error() {
    let c = Case::new();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl"))
        .replace("batch_size = 8", "batch_size = ");
    let cfg = write(c.d(), "run.toml", &text);
    c.train(&cfg, &[])
        .fails_with(&["run.toml", "line 13, column 14"]);
    c.no_run_folder();
}

#[test]
fn gpu_settings_that_do_not_fit_the_run() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["train.device=gpu"]).fails_with(&[
        "tiny.toml",
        "`train.device`",
        "\"gpu\" is not a device",
        "\"cuda:N\"",
    ]);
    // The tiny run is a classification run: the GPU path trains decoder SFT.
    c.train(&cfg, &["train.device=cuda"])
        .fails_with(&["`train.device`", "decoder SFT runs"]);
    c.train(&cfg, &["model.base_dtype=bf16"])
        .fails_with(&["`model.base_dtype`", "\"bf16\" is for GPU runs"]);
    c.no_run_folder();
}

#[test]
fn unknown_set_key() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    let out = c.train(&cfg, &["train.lrr=1e-4"]);
    out.fails_with(&[
        "tiny.toml",
        "--set `train.lrr=1e-4`",
        "unknown field `lrr`",
        "in `train`",
    ]);
    c.snapshot("unknown_set_key", &out);
    c.no_run_folder();
    c.train(&cfg, &["nosection.x=1"])
        .fails_with(&["--set `nosection.x=1`", "unknown field `nosection`"]);
    c.train(&cfg, &["train.lr"])
        .fails_with(&["--set `train.lr`", "expected KEY=VALUE"]);
    c.train(&cfg, &["train.lr.x=1"])
        .fails_with(&["--set `train.lr.x`", "`lr` is not a table"]);
    c.train(&cfg, &["train.lr=fast"]).fails_with(&[
        "--set `train.lr=fast`",
        "invalid type: string \"fast\", expected f64",
        "in `train.lr`",
    ]);
    c.no_run_folder();
}

#[test]
fn invalid_values() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    for (set, needles) in [
        (
            "train.lr=0",
            &["tiny.toml", "`train.lr`", "0 must be > 0"][..],
        ),
        ("train.lr=-1e-3", &["`train.lr`", "-0.001 must be > 0"]),
        ("train.lr=nan", &["`train.lr`", "NaN must be > 0"]),
        (
            "data.split=[0.5, 0.5, 0.5]",
            &["`data.split`", "[0.5, 0.5, 0.5]", "sum to 1"],
        ),
        ("data.split=[1.2, -0.1, -0.1]", &["`data.split`", ">= 0"]),
        (
            "data.split=[nan, 0.5, 0.5]",
            &["`data.split`", "NaN", "finite"],
        ),
        (
            "freeze.preset=bottom_half",
            &[
                "`freeze.preset`",
                "`bottom_half` is not one of full, head_only, last_layers",
            ],
        ),
        (
            "freeze.preset=last_layers",
            &["`freeze.last_layers`", "needs last_layers = N"],
        ),
        ("train.batch_size=0", &["`train.batch_size`", "must be > 0"]),
        ("train.beta1=1.0", &["`train.beta1`", "not in [0, 1)"]),
        ("train.eps=0", &["`train.eps`", "must be > 0"]),
        (
            "train.weight_decay=-0.1",
            &["`train.weight_decay`", "must be >= 0"],
        ),
        (
            "train.warmup_ratio=2",
            &["`train.warmup_ratio`", "not in [0, 1]"],
        ),
        ("task.dropout=1.5", &["`task.dropout`", "not in [0, 1)"]),
        ("model.max_length=1", &["`model.max_length`", "too small"]),
        (
            "model.asset=all-minilm-l6-v2",
            &["`model`", "exactly one of"],
        ),
        (
            "data.format=parquet",
            &["`data.format`", "`parquet` is not jsonl, csv or tsv"],
        ),
    ] {
        let out = c.train(&cfg, &[set]);
        out.fails_with(needles);
        c.no_run_folder();
    }
}

#[test]
fn freeze_pattern_matching_no_parameter() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["freeze.frozen=[\"bert.encoder.layers.*\"]"])
        .fails_with(&[
            "tiny.toml",
            "`freeze` patterns match no parameter",
            "bert.encoder.layers.*",
        ]);
    c.no_run_folder();
    c.train(&cfg, &["freeze.trainable=[\"re:^decoder\\\\.\"]"])
        .fails_with(&["`freeze` patterns match no parameter", "re:^decoder"]);
    c.no_run_folder();
}

// ---------------------------------------------------------------- data

#[test]
fn missing_data_file() {
    let c = Case::new();
    let cfg = write(
        c.d(),
        "run.toml",
        &tiny_config(&fixture(), &c.d().join("gone.jsonl")),
    );
    c.train(&cfg, &[])
        .fails_with(&["gone.jsonl", "data file does not exist"]);
    c.no_run_folder();
}

#[test]
fn malformed_jsonl_line() {
    let c = Case::new();
    let cfg = c.config_for_data("d.jsonl", &rows_with(b"{\"text\": \"oops\", \"label\": "));
    let out = c.train(&cfg, &[]);
    out.fails_with(&["d.jsonl:4:", "invalid JSON"]);
    c.snapshot("malformed_jsonl_line", &out);
    c.no_run_folder();
}

#[test]
fn jsonl_row_not_an_object() {
    let c = Case::new();
    let cfg = c.config_for_data("d.jsonl", &rows_with(b"[\"oops\", \"pos\"]"));
    c.train(&cfg, &[])
        .fails_with(&["d.jsonl:4:", "expected a JSON object, found"]);
    c.no_run_folder();
}

#[test]
fn row_missing_the_text_field() {
    let c = Case::new();
    let cfg = c.config_for_data(
        "d.jsonl",
        &rows_with(b"{\"txt\": \"oops\", \"label\": \"pos\"}"),
    );
    c.train(&cfg, &[]).fails_with(&[
        "d.jsonl:4:",
        "text field `text`",
        "not found",
        "keys: label, txt",
    ]);
    c.no_run_folder();
}

#[test]
fn row_missing_the_label_field() {
    let c = Case::new();
    let cfg = c.config_for_data("d.jsonl", &rows_with(b"{\"text\": \"oops\"}"));
    c.train(&cfg, &[])
        .fails_with(&["d.jsonl:4:", "label field `label`", "not found"]);
    c.no_run_folder();
}

#[test]
fn csv_column_missing_and_short_row() {
    let c = Case::new();
    let csv = std::fs::read_to_string(fixture().join("train.csv")).unwrap();
    let cfg = c.config_for_data(
        "d.csv",
        csv.replacen("text,label", "sentence,label", 1).as_bytes(),
    );
    c.train(&cfg, &[]).fails_with(&[
        "d.csv:1:",
        "column `text` not found in the header",
        "sentence, label",
    ]);
    c.no_run_folder();

    let mut lines: Vec<&str> = csv.lines().collect();
    lines.insert(3, "a row without a label");
    let cfg = c.config_for_data("d.csv", (lines.join("\n") + "\n").as_bytes());
    c.train(&cfg, &[])
        .fails_with(&["d.csv:4:", "row has 1 field(s) but the header has 2"]);
    c.no_run_folder();
}

#[test]
fn empty_dataset() {
    let c = Case::new();
    let cfg = c.config_for_data("empty.jsonl", b"");
    c.train(&cfg, &[])
        .fails_with(&["empty.jsonl", "empty dataset: no rows"]);
    c.no_run_folder();
    let cfg = c.config_for_data("blank.jsonl", b"\n  \n\n");
    c.train(&cfg, &[])
        .fails_with(&["blank.jsonl", "empty dataset: no rows"]);
    c.no_run_folder();
    let cfg = c.config_for_data("header.csv", b"text,label\n");
    c.train(&cfg, &[])
        .fails_with(&["header.csv", "empty dataset: no rows"]);
    c.no_run_folder();
}

#[test]
fn too_few_rows_for_a_validation_split() {
    let c = Case::new();
    let cfg = c.config_for_data(
        "two.jsonl",
        b"{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n",
    );
    c.train(&cfg, &[])
        .fails_with(&["two.jsonl", "split is empty"]);
    c.no_run_folder();
}

#[test]
fn non_utf8_text_in_a_data_file() {
    let c = Case::new();
    // Latin-1 "café": 0xE9 is not UTF-8.
    let cfg = c.config_for_data(
        "latin1.jsonl",
        &rows_with(b"{\"text\": \"caf\xe9 was bad\", \"label\": \"neg\"}"),
    );
    c.train(&cfg, &[]).fails_with(&[
        "latin1.jsonl:4:",
        "invalid UTF-8 at byte 14",
        "UTF-8 encoded",
    ]);
    c.no_run_folder();

    let mut csv = std::fs::read(fixture().join("train.csv")).unwrap();
    csv.extend_from_slice(b"caf\xe9 was bad,neg\n");
    let cfg = c.config_for_data("latin1.csv", &csv);
    c.train(&cfg, &[])
        .fails_with(&["latin1.csv:62:", "invalid UTF-8 in column `text`"]);
    c.no_run_folder();
}

#[test]
fn regression_label_not_a_number() {
    let c = Case::new();
    // Numeric labels, but line 4 says "high".
    let text = std::fs::read_to_string(fixture().join("train.jsonl")).unwrap();
    let mut rows = String::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let y = if i == 3 {
            serde_json::json!("high")
        } else {
            serde_json::json!(i as f64 / 60.0)
        };
        rows.push_str(&serde_json::json!({"text": v["text"], "label": y}).to_string());
        rows.push('\n');
    }
    let cfg = c.config_for_data("d.jsonl", rows.as_bytes());
    c.train(&cfg, &["task.type=regression"])
        .fails_with(&["d.jsonl:4:", "regression label `high` is not a number"]);
    c.no_run_folder();
}

// ---------------------------------------------------------------- training

/// lr = 1e30 overflows the first AdamW step: the next loss is NaN. Training
/// stops with the step, the lr, and where (whether) a checkpoint was saved.
#[test]
fn nan_loss_stops_training() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    let out = c.train(&cfg, &["train.lr=1e30"]);
    out.fails_with(&[
        "training stopped: loss is NaN at step 2",
        "train.lr = 1e30",
        "no checkpoint was saved",
    ]);
    c.snapshot("nan_loss", &out);
    // The folder keeps the log of the failed run, but no model or results.
    assert_no_run(c.d(), &c.run());
    assert!(c.run().join("config.toml").is_file());

    // A rerun into the same folder starts a fresh log, not one appended to the failed run's.
    let out = c.train(&cfg, &["train.log_every=1", "train.epochs=1"]);
    out.ok();
    let m = metrics(&c.run());
    assert_eq!(m[0]["step"], 1, "{m:?}");
    // Step 1 of a linear schedule without warmup runs at the configured lr.
    assert_eq!(m[0]["lr"].as_f64().unwrap(), 1e-3);
}

/// After some evaluations, a NaN names the best checkpoint kept in model/.
#[test]
fn nan_loss_after_a_checkpoint_names_it() {
    let c = Case::new();
    // A regression label of 1e30 squares to inf in the loss; it sits in the
    // training split, so it is hit within the first epochs, after step 1's eval.
    let text = std::fs::read_to_string(fixture().join("train.jsonl")).unwrap();
    let mut rows = String::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let y = if i == 0 {
            1e30
        } else if v["label"] == "pos" {
            1.0
        } else {
            0.0
        };
        rows.push_str(&serde_json::json!({"text": v["text"], "label": y}).to_string());
        rows.push('\n');
    }
    let cfg = c.config_for_data("d.jsonl", rows.as_bytes());
    let out = c.train(
        &cfg,
        &[
            "task.type=regression",
            "train.eval_every=1",
            "train.batch_size=1",
        ],
    );
    out.fails_with(&[
        "training stopped: loss is inf",
        "the best checkpoint so far (step",
        "run/model",
    ]);
    assert_no_tmp(c.d());
    assert!(c.run().join("model/model.safetensors").is_file());
    assert!(!c.run().join("results.json").exists());
}

#[test]
fn train_into_a_folder_that_holds_a_run() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["train.epochs=1"]).ok();
    let before = std::fs::read(c.run().join("results.json")).unwrap();
    c.train(&cfg, &["train.epochs=1"]).fails_with(&[
        "run folder",
        "already holds a run",
        "choose another --out",
    ]);
    assert_eq!(std::fs::read(c.run().join("results.json")).unwrap(), before);
    assert_no_tmp(c.d());
}

#[test]
fn run_folder_in_use_by_another_process() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    std::fs::create_dir_all(c.run()).unwrap();
    let lock = c.run().join(".afinar.lock");
    // A live writer: this test process.
    std::fs::write(&lock, format!("{}\n", std::process::id())).unwrap();
    c.train(&cfg, &["train.epochs=1"]).fails_with(&[
        "run",
        "in use by process",
        &std::process::id().to_string(),
        ".afinar.lock",
    ]);
    assert!(!c.run().join("results.json").exists() && !c.run().join("model").exists());
    assert!(lock.exists(), "the other writer's lock stays");
    // A writer that is gone (killed): its lock is taken over, the run goes on.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(&lock, format!("{dead}\n")).unwrap();
    c.train(&cfg, &["train.epochs=1"]).ok();
    assert!(c.run().join("results.json").exists());
    assert!(!lock.exists(), "the lock is removed when the run ends");
    assert_no_tmp(c.d());
}

// ---------------------------------------------------------------- eval / predict / inspect

/// A trained run for the eval/predict cases.
fn trained(c: &Case) -> PathBuf {
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["train.epochs=2"]).ok();
    c.run()
}

#[test]
fn eval_label_unseen_in_training() {
    let c = Case::new();
    let run = trained(&c);
    let data = write(
        c.d(),
        "new.jsonl",
        "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"so so\", \"label\": \"neutral\"}\n",
    );
    let out = afinar_p(
        c.d(),
        &[Path::new("eval"), &run, Path::new("--data"), &data],
    );
    out.fails_with(&[
        "new.jsonl:2:",
        "label `neutral` was not seen in the training set",
        "known labels: neg, pos",
    ]);
    c.snapshot("eval_label_unseen", &out);
    assert!(out.stdout.is_empty());
}

#[test]
fn eval_missing_data_file_and_run() {
    let c = Case::new();
    let run = trained(&c);
    let out = afinar_p(
        c.d(),
        &[
            Path::new("eval"),
            &run,
            Path::new("--data"),
            &c.d().join("gone.jsonl"),
        ],
    );
    out.fails_with(&["gone.jsonl", "No such file"]);
    // The io error is printed once, not again as its own cause.
    assert_eq!(
        out.stderr.matches("No such file").count(),
        1,
        "{}",
        out.stderr
    );
    afinar_p(c.d(), &[Path::new("eval"), &c.d().join("nope")])
        .fails_with(&["nope", "not a run folder or model folder"]);
}

#[test]
fn predict_missing_run_folder() {
    let c = Case::new();
    let out = afinar_p(
        c.d(),
        &[
            Path::new("predict"),
            &c.d().join("no-run"),
            Path::new("--text"),
            Path::new("hi"),
        ],
    );
    out.fails_with(&[
        "no-run",
        "not a run folder or model folder (no model/config.json or config.json)",
    ]);
    c.snapshot("predict_missing_run", &out);
}

#[test]
fn predict_bad_input_file_writes_no_output() {
    let c = Case::new();
    let run = trained(&c);
    let output = c.d().join("preds.jsonl");
    for (rows, needles) in [
        (
            "{\"text\": \"a\"}\n{\"txt\": \"b\"}\n",
            &["in.jsonl:2:", "no string field `text`"][..],
        ),
        (
            "{\"text\": \"a\"}\n{\"text\": \n",
            &["in.jsonl:2:", "malformed JSON"],
        ),
        ("\n\n", &["in.jsonl", "no rows"]),
    ] {
        let input = write(c.d(), "in.jsonl", rows);
        afinar_p(
            c.d(),
            &[
                Path::new("predict"),
                &run,
                Path::new("--file"),
                &input,
                Path::new("--output"),
                &output,
            ],
        )
        .fails_with(needles);
        assert!(!output.exists());
        assert_no_tmp(c.d());
    }
    let mut bytes = b"{\"text\": \"a\"}\n{\"text\": \"caf".to_vec();
    bytes.extend_from_slice(b"\xe9\"}\n");
    std::fs::write(c.d().join("in.jsonl"), bytes).unwrap();
    afinar_p(
        c.d(),
        &[
            Path::new("predict"),
            &run,
            Path::new("--file"),
            &c.d().join("in.jsonl"),
        ],
    )
    .fails_with(&["in.jsonl:2:", "not UTF-8"]);
    afinar_p(
        c.d(),
        &[
            Path::new("predict"),
            &run,
            Path::new("--file"),
            &c.d().join("gone.jsonl"),
        ],
    )
    .fails_with(&["gone.jsonl", "No such file"]);
}

#[test]
fn predict_on_a_base_checkpoint_without_a_head() {
    let c = Case::new();
    afinar_p(
        c.d(),
        &[
            Path::new("predict"),
            &fixture(),
            Path::new("--text"),
            Path::new("hi"),
        ],
    )
    .fails_with(&[
        "config.json",
        "`id2label` missing: not a sequence classifier",
    ]);
}

#[test]
fn inspect_a_file_that_is_not_safetensors() {
    let c = Case::new();
    // Fixed content: the snapshot must not depend on where the repo lives.
    let cfg = write(
        c.d(),
        "tiny.toml",
        "[model]\npath = \"a model folder somewhere\"\nmax_length = 32\n",
    );
    let out = afinar_p(c.d(), &[Path::new("inspect"), &cfg]);
    out.fails_with(&[
        "tiny.toml",
        "truncated or not safetensors",
        "header length says",
    ]);
    c.snapshot("inspect_not_safetensors", &out);
    let tiny = write(c.d(), "short.safetensors", "abc");
    afinar_p(c.d(), &[Path::new("inspect"), &tiny]).fails_with(&["short.safetensors", "bytes"]);
    afinar_p(c.d(), &[Path::new("inspect"), &c.d().join("nothing")])
        .fails_with(&["nothing", "no such checkpoint file or folder"]);
}
