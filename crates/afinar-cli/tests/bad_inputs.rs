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

/// `model.path` naming the weights file instead of the folder; a pickle
/// file there is refused as such (never unpickled).
#[test]
fn model_path_names_a_file() {
    let c = Case::new();
    let cfg = c.config_for_model(&fixture().join("model.safetensors"));
    c.train(&cfg, &[])
        .fails_with(&["model.safetensors: is a file: a model is a folder (config.json"]);
    c.no_run_folder();
    let pth = c.d().join("model.pth");
    // A legacy torch pickle stream: PROTO 2, then opcodes.
    std::fs::write(&pth, b"\x80\x02}q\x00.").unwrap();
    let cfg = c.config_for_model(&pth);
    c.train(&cfg, &[]).fails_with(&["model.pth", "pickle"]);
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
                "--set `freeze.preset=bottom_half`",
                "unknown variant `bottom_half`, expected one of `full`, `head_only`, `last_layers`",
                "in `freeze.preset`",
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
            &[
                "--set `data.format=parquet`",
                "unknown variant `parquet`, expected one of `json`, `jsonl`, `csv`, `tsv`",
                "in `data.format`",
            ],
        ),
        // Zero used to panic (`step % 0`) once training had started.
        ("train.eval_every=0", &["`train.eval_every`", "must be > 0"]),
        ("train.log_every=0", &["`train.log_every`", "must be > 0"]),
        ("train.save_every=0", &["`train.save_every`", "must be > 0"]),
        (
            "train.save_total_limit=0",
            &["`train.save_total_limit`", "must be > 0"],
        ),
        (
            "train.on_non_finite=\"ignore\"",
            &[
                "on_non_finite",
                "unknown variant `ignore`, expected `stop` or `skip`",
            ],
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
        "training stopped: loss is NaN at step 2 (epoch 0, batch 2 of the epoch), on ",
        "train.jsonl lines ",
        "train.lr = 1e30",
        "no checkpoint was saved",
        "train.on_non_finite = \"skip\" drops such batches",
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
        "already holds a finished run",
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

// ---------------------------------------------------------------- resume

/// A run stopped before it finished: the tiny run with its results removed
/// (its checkpoints and model/ stay, as after a kill).
fn unfinished_run(c: &Case) -> PathBuf {
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["train.epochs=2"]).ok();
    std::fs::remove_file(c.run().join("results.json")).unwrap();
    cfg
}

fn resume(c: &Case) -> Out {
    afinar_p(
        c.d(),
        &["train".as_ref(), "--resume".as_ref(), c.run().as_os_str()],
    )
}

/// The newest checkpoint folder of the run.
fn last_checkpoint(run: &Path) -> PathBuf {
    let mut cks: Vec<(usize, PathBuf)> = std::fs::read_dir(run)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("checkpoint-")
                .and_then(|s| s.parse().ok())
                .map(|s| (s, e.path()))
        })
        .collect();
    cks.sort();
    cks.pop().expect("no checkpoint").1
}

#[test]
fn train_into_a_folder_with_an_unfinished_run() {
    let c = Case::new();
    let cfg = unfinished_run(&c);
    c.train(&cfg, &[]).fails_with(&[
        "holds an unfinished run: continue it with `afinar train --resume",
        "or choose another --out",
    ]);
    assert!(
        c.run().join("model").is_dir(),
        "the unfinished run is untouched"
    );
}

#[test]
fn resume_a_finished_run() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["train.epochs=1"]).ok();
    let before = std::fs::read(c.run().join("results.json")).unwrap();
    resume(&c).fails_with(&[
        "--resume",
        "this run finished (results.json is there): nothing to resume",
    ]);
    assert_eq!(std::fs::read(c.run().join("results.json")).unwrap(), before);
}

#[test]
fn resume_a_missing_or_non_run_folder() {
    let c = Case::new();
    resume(&c).fails_with(&["--resume", "run: no such run folder"]);
    std::fs::create_dir(c.run()).unwrap();
    resume(&c).fails_with(&["--resume", "not a run folder (no config.toml)"]);
    assert_eq!(
        std::fs::read_dir(c.run()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn resume_with_other_arguments() {
    let c = Case::new();
    let cfg = unfinished_run(&c);
    let out = afinar_p(
        c.d(),
        &[
            "train".as_ref(),
            cfg.as_os_str(),
            "--resume".as_ref(),
            c.run().as_os_str(),
        ],
    );
    out.fails_with(&["--resume", "cannot be used with"]);
}

#[test]
fn resume_with_a_corrupt_trainer_state() {
    let c = Case::new();
    unfinished_run(&c);
    let st = last_checkpoint(&c.run()).join("trainer_state.json");
    std::fs::write(&st, "{\"format\": 1, \"step\": ").unwrap();
    resume(&c).fails_with(&["trainer_state.json: not JSON: EOF while parsing"]);
    std::fs::write(&st, "{\"format\": 2, \"step\": 3}").unwrap();
    resume(&c).fails_with(&["trainer_state.json: checkpoint format 2; this afinar reads format 1"]);
    assert!(!c.run().join("results.json").exists());
}

#[test]
fn resume_with_truncated_checkpoint_weights() {
    let c = Case::new();
    unfinished_run(&c);
    let w = last_checkpoint(&c.run()).join("trainable.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let out = resume(&c);
    out.fails_with(&["trainable.safetensors: truncated"]);
    c.snapshot("resume_truncated_weights", &out);
    assert!(!c.run().join("results.json").exists());
}

#[test]
fn resume_on_changed_training_data() {
    let c = Case::new();
    let data = c.d().join("d.jsonl");
    std::fs::copy(fixture().join("train.jsonl"), &data).unwrap();
    let cfg = write(c.d(), "run.toml", &tiny_config(&fixture(), &data));
    c.train(&cfg, &["train.epochs=2"]).ok();
    std::fs::remove_file(c.run().join("results.json")).unwrap();
    // One word of one row changes: same row count, other tokens.
    let text = std::fs::read_to_string(&data)
        .unwrap()
        .replacen("a", "e", 1);
    std::fs::write(&data, text).unwrap();
    let out = resume(&c);
    out.fails_with(&[
        "trainer_state.json: training data was 36 rows (sha256 ",
        "cannot resume on changed training data",
    ]);
    c.snapshot("resume_changed_data", &out);
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

// ================================================================ catalogue, part 2
// Issue 6 part 4: PEFT adapter folders, GGUF files, PyTorch pickles, CLI
// arguments, and more models, configs and data files. Helpers first.

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Case {
    /// `afinar ARGS` in the case's folder.
    fn cli(&self, args: &[&str]) -> Out {
        afinar(self.d(), args)
    }
    /// Nothing but the inputs the test wrote is left in the case's folder.
    #[track_caller]
    fn only(&self, names: &[&str]) {
        assert_no_tmp(self.d());
        let mut left: Vec<String> = std::fs::read_dir(self.d())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        want.sort();
        assert_eq!(left, want, "files written by a failed command");
    }
}

/// Rewrite the safetensors file `path` through `edit` (name, dtype, shape, bytes).
fn rewrite_st_file(
    path: &Path,
    edit: impl FnOnce(
        Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    use safetensors::tensor::{SafeTensors, TensorView};
    let bytes = std::fs::read(path).unwrap();
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
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

// ---------------------------------------------------------------- PEFT adapter folders

/// A copy of the PEFT-made LoRA adapter (r = 4 on query, value of bert-tiny) in `<tmp>/ad`.
fn peft_adapter(c: &Case) -> PathBuf {
    let from = fixture().join("../peft/lora-tiny");
    let to = c.d().join("ad");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

fn edit_adapter_config(ad: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = ad.join("adapter_config.json");
    let mut v = read_json(&p);
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `afinar predict AD --base <bert-tiny> --text hi`: fails, prints no prediction.
fn predict_adapter(c: &Case, ad: &Path) -> Out {
    let out = c.cli(&["predict", &s(ad), "--base", &s(&fixture()), "--text", "hi"]);
    assert!(
        out.stdout.is_empty(),
        "a prediction was printed: {}",
        out.stdout
    );
    out
}

const QUERY_B: &str = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight";

#[test]
fn adapter_config_broken_or_of_an_unknown_type() {
    let c = Case::new();
    let ad = peft_adapter(&c);
    std::fs::write(ad.join("adapter_config.json"), "{\"peft_type\": \"LORA\", ").unwrap();
    predict_adapter(&c, &ad).fails_with(&["ad/adapter_config.json", "EOF while parsing", "line 1"]);
    let ad = peft_adapter(&c);
    edit_adapter_config(&ad, |v| v["peft_type"] = "LOHA".into());
    let out = predict_adapter(&c, &ad);
    out.fails_with(&[
        "ad/adapter_config.json",
        "peft_type \"LOHA\" is not supported (LORA, IA3, PROMPT_TUNING)",
    ]);
    c.snapshot("adapter_unknown_peft_type", &out);
    edit_adapter_config(&ad, |v| {
        v.as_object_mut().unwrap().remove("peft_type");
    });
    predict_adapter(&c, &ad).fails_with(&["peft_type missing is not supported"]);
    c.only(&["ad"]);
}

#[test]
fn adapter_target_modules_not_in_the_base_model() {
    let c = Case::new();
    let ad = peft_adapter(&c);
    edit_adapter_config(&ad, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "v_proj"])
    });
    let out = predict_adapter(&c, &ad);
    out.fails_with(&[
        "adapter <TMP>/ad/adapter_config.json"
            .replace("<TMP>", &s(c.d()))
            .as_str(),
        "target_modules [\"q_proj\", \"v_proj\"] wrap no linear module of this model",
        "bert.encoder.layer.0.attention.self.query",
    ]);
    c.snapshot("adapter_target_modules_not_found", &out);
}

#[test]
fn adapter_rank_disagrees_with_its_weights() {
    let c = Case::new();
    let ad = peft_adapter(&c);
    edit_adapter_config(&ad, |v| v["r"] = 8.into());
    predict_adapter(&c, &ad).fails_with(&[
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "shape [4, 32] in",
        "ad/adapter_model.safetensors",
        "is [8, 32] (another r, or another base model?)",
    ]);
}

#[test]
fn adapter_weights_missing_misshapen_or_incomplete() {
    let c = Case::new();
    let ad = peft_adapter(&c);
    std::fs::remove_file(ad.join("adapter_model.safetensors")).unwrap();
    predict_adapter(&c, &ad)
        .fails_with(&["ad: no adapter_model.safetensors: the adapter has no weights"]);

    let ad = peft_adapter(&c);
    rewrite_st_file(&ad.join("adapter_model.safetensors"), |mut ts| {
        for t in ts.iter_mut() {
            if t.0 == QUERY_B {
                t.2 = vec![16, 8]; // was [32, 4]: same bytes
            }
        }
        ts
    });
    let out = predict_adapter(&c, &ad);
    out.fails_with(&[QUERY_B, "shape [16, 8] in", "is [32, 4]"]);
    c.snapshot("adapter_tensor_with_wrong_shape", &out);

    // PEFT would warn and keep B = 0 (a silent no-op adapter); afinar refuses.
    let ad = peft_adapter(&c);
    rewrite_st_file(&ad.join("adapter_model.safetensors"), |ts| {
        ts.into_iter().filter(|t| t.0 != QUERY_B).collect()
    });
    predict_adapter(&c, &ad).fails_with(&[
        "ad/adapter_model.safetensors",
        "1 adapter tensor(s) that adapter_config.json implies are missing",
        QUERY_B,
    ]);
    c.only(&["ad"]);
}

#[test]
fn adapter_base_model_not_found() {
    let c = Case::new();
    let ad = peft_adapter(&c);
    c.cli(&[
        "predict",
        &s(&ad),
        "--base",
        &s(&c.d().join("nothing")),
        "--text",
        "hi",
    ])
    .fails_with(&[
        "--base",
        "nothing: neither a model folder nor a fetched asset",
    ]);
    edit_adapter_config(&ad, |v| {
        v["base_model_name_or_path"] = "org/unknown-model".into()
    });
    c.cli(&["predict", &s(&ad), "--text", "hi"]).fails_with(&[
        "ad/adapter_config.json",
        "the adapter's base model `org/unknown-model`",
        "pass --base",
    ]);
    c.only(&["ad"]);
}

// ---------------------------------------------------------------- GGUF files

/// The tiny Llama as an f32 GGUF file `<tmp>/name`.
fn llama_gguf(c: &Case, name: &str) -> PathBuf {
    use afinar::export::gguf::{write_llama_gguf, ExportType, TokenizerMeta};
    use afinar::models::{load_model, LoadOpts, ModelConfig};
    let src = load_model(
        &fixture().join("../llama-tiny"),
        afinar::params::Selector::none(),
        LoadOpts::default(),
    )
    .unwrap();
    let ModelConfig::Llama(cfg) = &src.cfg else {
        panic!("llama-tiny is a Llama")
    };
    let tensors = src
        .store
        .iter()
        .map(|(n, p)| (n.clone(), p.tensor.clone()))
        .collect();
    let meta = TokenizerMeta {
        tokenizer: src.tokenizer.raw(),
        bos_id: src.tokenizer.specials.as_ref().and_then(|s| s.bos_id),
        eos_id: Some(2),
        pad_id: Some(0),
        chat_template: None,
        pre: "gpt2",
    };
    let p = c.d().join(name);
    write_llama_gguf(&p, "t", cfg, &tensors, &meta, ExportType::F32).unwrap();
    p
}

/// `afinar generate FILE --prompt a` and `afinar inspect FILE`: both fail with `needles`.
fn generate_and_inspect_fail(c: &Case, file: &Path, needles: &[&str]) -> Out {
    let out = c.cli(&[
        "generate",
        &s(file),
        "--prompt",
        "a",
        "--max-new-tokens",
        "2",
    ]);
    out.fails_with(needles);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    c.cli(&["inspect", &s(file)]).fails_with(needles);
    out
}

#[test]
fn gguf_bad_magic_version_and_truncation() {
    let c = Case::new();
    let good = llama_gguf(&c, "good.gguf");
    let bytes = std::fs::read(&good).unwrap();
    let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        let p = c.d().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let p = variant("magic.gguf", &|b| b[..4].copy_from_slice(b"GGML"));
    let out = generate_and_inspect_fail(
        &c,
        &p,
        &["magic.gguf: not a GGUF file: starts with [47, 47, 4d, 4c], expected \"GGUF\""],
    );
    c.snapshot("gguf_bad_magic", &out);
    let p = variant("v1.gguf", &|b| b[4..8].copy_from_slice(&1u32.to_le_bytes()));
    generate_and_inspect_fail(
        &c,
        &p,
        &["v1.gguf: GGUF version 1 is not supported (supported: 2, 3, little-endian)"],
    );
    let p = variant("be.gguf", &|b| b[4..8].copy_from_slice(&3u32.to_be_bytes()));
    generate_and_inspect_fail(
        &c,
        &p,
        &["be.gguf: GGUF version 50331648 (a big-endian file)"],
    );
    // Cut inside the metadata, and inside the tensor data.
    let p = variant("head.gguf", &|b| b.truncate(40));
    generate_and_inspect_fail(
        &c,
        &p,
        &[
            "head.gguf: truncated: metadata entry 0 of",
            "but the file has 40 bytes",
        ],
    );
    let n = bytes.len();
    let p = variant("tail.gguf", &|b| b.truncate(n - 1000));
    generate_and_inspect_fail(
        &c,
        &p,
        &["tail.gguf: truncated: tensor `", "data needs bytes"],
    );
    // Nothing but the inputs.
    let mut names = vec![
        "good.gguf",
        "magic.gguf",
        "v1.gguf",
        "be.gguf",
        "head.gguf",
        "tail.gguf",
    ];
    names.sort();
    c.only(&names);
}

#[test]
fn gguf_of_an_unsupported_type_or_architecture() {
    let c = Case::new();
    let p = llama_gguf(&c, "q5.gguf");
    // Retype `token_embd.weight` [160, 64] from F32 (0) to Q5_0 (6), which
    // afinar cannot dequantise; its info is name, n_dims, ne[0..2], type.
    let mut b = std::fs::read(&p).unwrap();
    let name = b"token_embd.weight";
    let mut key = (name.len() as u64).to_le_bytes().to_vec();
    key.extend_from_slice(name);
    let at = b
        .windows(key.len())
        .position(|w| w == key.as_slice())
        .expect("tensor info");
    let ty = at + key.len() + 4 + 2 * 8;
    assert_eq!(b[ty..ty + 4], 0u32.to_le_bytes());
    b[ty..ty + 4].copy_from_slice(&6u32.to_le_bytes());
    std::fs::write(&p, b).unwrap();
    let out = c.cli(&["generate", &s(&p), "--prompt", "a"]);
    out.fails_with(&[
        "q5.gguf: tensor token_embd.weight has type Q5_0, supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
    ]);
    c.snapshot("gguf_unsupported_type", &out);
    // `inspect` lists what it cannot load.
    let table = c.cli(&["inspect", &s(&p)]);
    table.ok();
    assert!(
        table.stdout.contains("token_embd.weight") && table.stdout.contains("Q5_0"),
        "{}",
        table.stdout
    );

    use afinar::hub::gguf::{GgmlType, GgufValue, GgufWriter};
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("mamba".into()))
        .unwrap();
    w.add_f32("token_embd.weight", GgmlType::F32, &[2, 4], &[0.0; 8])
        .unwrap();
    let mamba = c.d().join("mamba.gguf");
    w.write(&mamba).unwrap();
    c.cli(&["generate", &s(&mamba), "--prompt", "a"])
        .fails_with(&["mamba.gguf: general.architecture is `mamba`, supported: llama"]);
    c.only(&["q5.gguf", "mamba.gguf"]);
}

// ---------------------------------------------------------------- PyTorch pickle checkpoints

/// A pickle that runs `touch <marker>` when unpickled (protocol 2:
/// `PROTO 2`, `GLOBAL os system`, `MARK`, the argument, `TUPLE`, `REDUCE`).
fn evil_pickle(marker: &Path) -> Vec<u8> {
    let mut b = b"\x80\x02cos\nsystem\n(S'touch ".to_vec();
    b.extend_from_slice(s(marker).as_bytes());
    b.extend_from_slice(b"'\ntR.");
    b
}

#[test]
fn pytorch_pickle_files_are_refused_unread() {
    let c = Case::new();
    let marker = c.d().join("pwned");
    let pth = c.d().join("model.pth");
    std::fs::write(&pth, evil_pickle(&marker)).unwrap();
    let refused = [
        "a PyTorch pickle checkpoint: afinar does not read pickle files as text models, because loading one can run arbitrary code",
        "convert it to safetensors",
    ];
    // `inspect` reads .pth state dicts weights-only: this one asks for
    // `os.system`, which is refused by name, unexecuted.
    let out = c.cli(&["inspect", &s(&pth)]);
    out.fails_with(&[
        "model.pth",
        "global `os.system` is not allowed: a weights-only load resolves only OrderedDict",
        "(this file is not a plain state dict)",
    ]);
    c.snapshot("pickle_refused", &out);
    c.cli(&["generate", &s(&pth), "--prompt", "a"])
        .fails_with(&refused);
    // torch.save's zip format, under the usual name, broken.
    let bin = c.d().join("pytorch_model.bin");
    std::fs::write(&bin, b"PK\x03\x04archive/data.pklPK").unwrap();
    c.cli(&["inspect", &s(&bin)])
        .fails_with(&["pytorch_model.bin", "not a readable zip"]);
    // An SFT run whose model.path is the pickle.
    let cfg =
        sft_config(&c, &sft_rows(None)).replace(&q(&fixture().join("../llama-tiny")), &q(&pth));
    let cfg = write(c.d(), "sft.toml", &cfg);
    c.train(&cfg, &[]).fails_with(&refused);
    c.no_run_folder();
    // An image run reads .pth state dicts, weights-only: refused by name.
    let img = image_config(&c, &pth, "");
    c.train(&img, &[])
        .fails_with(&["model.pth", "global `os.system` is not allowed"]);
    c.no_run_folder();
    assert!(!marker.exists(), "the pickle ran");
    c.only(&[
        "model.pth",
        "pytorch_model.bin",
        "sft.toml",
        "sft.jsonl",
        "img.toml",
        "images",
    ]);
}

/// Class folders `a` and `b` of two 8x8 PNG images each under `<d>/images`.
fn image_folder(d: &Path) -> PathBuf {
    let root = d.join("images");
    for (class, v) in [("a", 40u8), ("b", 200u8)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..2u8 {
            let mut bytes = Vec::new();
            {
                let mut enc = png::Encoder::new(&mut bytes, 8, 8);
                enc.set_color(png::ColorType::Grayscale);
                enc.set_depth(png::BitDepth::Eight);
                let mut w = enc.write_header().unwrap();
                w.write_image_data(&[v.wrapping_add(i * 7); 64]).unwrap();
            }
            std::fs::write(root.join(class).join(format!("{i}.png")), bytes).unwrap();
        }
    }
    root
}

/// An image classification config on the tiny MobileNetV2 `model` and
/// the class folders of [`image_folder`].
fn image_config(c: &Case, model: &Path, extra: &str) -> PathBuf {
    let data = image_folder(c.d());
    write(
        c.d(),
        "img.toml",
        &format!(
            "[model]\npath = {}\n[task]\ntype = \"image_classification\"\n\
             [data]\ntrain = {}\nvalidation = {}\n[image]\nsize = 32\n\
             [train]\nmax_steps = 1\nbatch_size = 2\nlr = 1e-3\nthreads = 1\n{extra}",
            q(model),
            q(&data),
            q(&data)
        ),
    )
}

#[test]
fn image_predict_and_eval_inputs_that_do_not_fit() {
    let c = Case::new();
    let cfg = image_config(&c, &tiny_cnn(), "");
    c.train(&cfg, &[]).ok();
    let run = s(&c.run());
    c.cli(&["predict", &run, "--text", "hi"])
        .fails_with(&["is an image model: give --image FILE (PNG or JPEG; repeat for several)"]);
    let junk = write(c.d(), "junk.png", "not a png");
    c.cli(&["predict", &run, "--image", &s(&junk)])
        .fails_with(&["junk.png", "not a PNG or JPEG image"]);
    let idx = write(c.d(), "im.idx", "x");
    c.cli(&["eval", &run, "--data", &s(&idx)]).fails_with(&[
        "im.idx",
        "is an IDX image file: give its label file with --data-labels",
    ]);
}

fn tiny_cnn() -> PathBuf {
    fixture().join("../mobilenet/tiny.pth")
}

#[test]
fn image_configs_that_do_not_fit() {
    let c = Case::new();
    let cfg = image_config(&c, &tiny_cnn(), "");
    for (sets, needles) in [
        (
            &["data.text=\"text\""][..],
            &["`data.text`: is for text data; images come from IDX files or class folders"][..],
        ),
        (
            &["freeze.preset=\"last_layers\"", "freeze.last_layers=2"],
            &["`freeze.preset`: \"last_layers\" is for transformer layers"],
        ),
        (
            &["freeze.first_layers=20"],
            &["freeze.first_layers = 20 but the model has 19 layers"],
        ),
        (
            &["freeze.frozen=[\"features.9-3\"]"],
            &["the range `9-3` must run from low to high"],
        ),
        (
            &["freeze.frozen=[\"feature.3\"]"],
            &["`freeze` patterns match no parameter: [\"feature.3\"]"],
        ),
        (&["image.size=4"], &["`image.size`: 4 is not in [8, 1024]"]),
        (
            &["image.std=[0.2, 0.0, 0.2]"],
            &["`image.std`: [0.2, 0.0, 0.2]: each must be > 0"],
        ),
        (
            &["data.train_labels=\"x\""],
            &["`data.train_labels`: `data.train` is a folder of class folders"],
        ),
        (
            &["freeze.batch_norm=\"frozen\""],
            &["unknown variant `frozen`"],
        ),
    ] {
        c.train(&cfg, sets).fails_with(needles);
        c.no_run_folder();
    }
    // Image settings on a text run.
    let text = c.config_for_model(&fixture());
    c.train(&text, &["image.size=32"])
        .fails_with(&["`image`: is for task.type = \"image_classification\""]);
    c.no_run_folder();
    // An IDX image file without its labels; labels that do not fit.
    let idx = c.d().join("im.idx");
    let mut b = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4];
    b.extend([7u8; 32]);
    std::fs::write(&idx, &b).unwrap();
    let set = format!("data.train={}", q(&idx));
    c.train(&cfg, &[&set]).fails_with(&[
        "`data.train_labels`: `data.train` =",
        "is a file (IDX images): give its label file",
    ]);
    let lab = c.d().join("lab.idx");
    std::fs::write(&lab, [0u8, 0, 8, 1, 0, 0, 0, 3, 0, 1, 0]).unwrap();
    let setl = format!("data.train_labels={}", q(&lab));
    c.train(&cfg, &[&set, &setl])
        .fails_with(&["lab.idx: 3 labels for the 2 images of"]);
    std::fs::write(&lab, [0u8, 0, 8, 1, 0, 0, 0, 2, 0]).unwrap();
    c.train(&cfg, &[&set, &setl])
        .fails_with(&["lab.idx: IDX dimensions [2] need 2 bytes of data, the file holds 1"]);
    c.no_run_folder();
    // A JPEG that is not one, in a class folder.
    std::fs::write(c.d().join("images/a/broken.jpg"), b"\xff\xd8\xff\xe0junk").unwrap();
    c.train(&cfg, &[])
        .fails_with(&["images/a/broken.jpg", "JPEG"]);
    c.no_run_folder();
    std::fs::remove_file(c.d().join("images/a/broken.jpg")).unwrap();
    // A state dict that is not a MobileNetV2 (the pth reader's fixture).
    let other = fixture().join("../pth/tiny-zip.pth");
    let cfg2 = image_config(&c, &other, "");
    c.train(&cfg2, &[]).fails_with(&[
        "tiny-zip.pth",
        "is not a torchvision MobileNetV2 state dict",
    ]);
    c.no_run_folder();
}

#[test]
fn model_folder_with_only_pickle_weights() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    std::fs::remove_file(m.join("model.safetensors")).unwrap();
    std::fs::write(
        m.join("pytorch_model.bin"),
        evil_pickle(&c.d().join("pwned")),
    )
    .unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[]).fails_with(&[
        "m: no model.safetensors or model.safetensors.index.json in this folder",
        "found PyTorch pickle weights, which afinar never loads since unpickling can run arbitrary code: convert them to safetensors",
        "pytorch_model.bin",
    ]);
    c.no_run_folder();
    c.cli(&["inspect", &s(&m)])
        .fails_with(&["found PyTorch pickle weights"]);
    assert!(!c.d().join("pwned").exists());
}

// ---------------------------------------------------------------- more models

#[test]
fn index_naming_a_shard_outside_the_model_folder() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    let outside = c.d().join("outside.safetensors");
    std::fs::rename(m.join("model.safetensors"), &outside).unwrap();
    let names: Vec<String> = tensors(&outside).into_keys().collect();
    for shard in ["../outside.safetensors".to_string(), s(&outside)] {
        let map: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|n| (n.clone(), shard.clone().into()))
            .collect();
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let cfg = c.config_for_model(&m);
        let out = c.train(&cfg, &[]);
        out.fails_with(&[
            "m/model.safetensors.index.json",
            &format!("refusing shard `{shard}` in the weight map"),
            "(no `..`, no absolute path)",
        ]);
        c.no_run_folder();
        if shard.starts_with("..") {
            c.snapshot("index_shard_outside_the_folder", &out);
        }
        c.cli(&["inspect", &s(&m)]).fails_with(&["refusing shard"]);
    }
}

#[test]
fn model_config_json_with_a_wrong_type() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    let text = std::fs::read_to_string(m.join("config.json")).unwrap();
    assert!(text.contains("\"hidden_size\": 32,"));
    std::fs::write(
        m.join("config.json"),
        text.replace("\"hidden_size\": 32,", "\"hidden_size\": \"32\","),
    )
    .unwrap();
    let cfg = c.config_for_model(&m);
    let out = c.train(&cfg, &[]);
    out.fails_with(&[
        "m/config.json:",
        "`\"hidden_size\": \"32\",`: invalid type: string \"32\", expected usize",
    ]);
    c.snapshot("model_config_wrong_type", &out);
    c.no_run_folder();
}

#[test]
fn tokenizer_json_corrupt() {
    let c = Case::new();
    let m = copy_model(c.d(), "m");
    std::fs::write(
        m.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": ",
    )
    .unwrap();
    let cfg = c.config_for_model(&m);
    c.train(&cfg, &[]).fails_with(&[
        "m/tokenizer.json",
        "cannot load tokenizer",
        "EOF while parsing",
    ]);
    c.no_run_folder();
}

// ---------------------------------------------------------------- more configs

#[test]
fn config_value_of_the_wrong_type_in_the_file() {
    let c = Case::new();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl"))
        .replace("epochs = 20", "epochs = \"two\"");
    let cfg = write(c.d(), "run.toml", &text);
    let out = c.train(&cfg, &[]);
    out.fails_with(&[
        "run.toml",
        "line 12, column 10",
        "epochs = \"two\"",
        "invalid type: string \"two\", expected usize",
    ]);
    c.snapshot("config_wrong_type", &out);
    c.no_run_folder();
}

/// A typed mode (`freeze.preset`, `data.overflow`, `data.format`,
/// `train.device`, `model.format`, `init_lora_weights`,
/// `prompt_tuning_init`) with a value it does not take, in the file or by
/// `--set`: refused before any weight is read, naming the key, the file
/// (and its line) and the valid values.
#[test]
fn config_mode_with_a_wrong_value() {
    let c = Case::new();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl"))
        .replace("[train]", "[freeze]\npreset = \"bottom_half\"\n\n[train]");
    let cfg = write(c.d(), "run.toml", &text);
    let out = c.train(&cfg, &[]);
    out.fails_with(&[
        "run.toml",
        "line 12, column 10",
        "preset = \"bottom_half\"",
        "unknown variant `bottom_half`, expected one of `full`, `head_only`, `last_layers`",
        "in `freeze.preset`",
    ]);
    c.snapshot("config_mode_wrong_value", &out);
    c.no_run_folder();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl"))
        .replace("threads = 1", "threads = 1\ndevice = 0");
    let cfg = write(c.d(), "run.toml", &text);
    c.train(&cfg, &[]).fails_with(&[
        "run.toml",
        "line 17, column 10",
        "invalid type: integer `0`, expected \"cpu\", \"cuda\" or \"cuda:N\"",
        "in `train.device`",
    ]);
    c.no_run_folder();
    let cfg = tiny_config_file(c.d());
    let lora = ["adapter.type=lora", "adapter.target_modules=[\"query\"]"];
    let prompt = ["adapter.type=prompt_tuning", "adapter.num_virtual_tokens=4"];
    for (set, needles) in [
        (
            &["data.overflow=wrap"][..],
            &[
                "tiny.toml",
                "--set `data.overflow=wrap`",
                "unknown variant `wrap`, expected one of `truncate`, `error`, `skip`",
                "in `data.overflow`",
            ][..],
        ),
        (
            &["train.device=cuda:x"],
            &[
                "--set `train.device=cuda:x`",
                "\"cuda:x\" is not a device: use \"cpu\", \"cuda\" or \"cuda:N\"",
                "in `train.device`",
            ],
        ),
        (
            &["model.format=onnx"],
            &[
                "--set `model.format=onnx`",
                "unknown variant `onnx`, expected `safetensors` or `gguf`",
                "in `model.format`",
            ],
        ),
        (
            &[lora[0], lora[1], "adapter.init_lora_weights=true"],
            &[
                "--set `adapter.init_lora_weights=true`",
                "invalid type: boolean `true`, expected `kaiming` or `gaussian`",
                "in `adapter.init_lora_weights`",
            ],
        ),
        (
            &[prompt[0], prompt[1], "adapter.prompt_tuning_init=TEXT"],
            &[
                "--set `adapter.prompt_tuning_init=TEXT`",
                "unknown variant `TEXT`, expected one of `random`, `sample_vocab`, `text`",
                "in `adapter.prompt_tuning_init`",
            ],
        ),
    ] {
        c.train(&cfg, set).fails_with(needles);
        c.no_run_folder();
    }
}

/// `model.format` that is not what `model.path` holds names both.
#[test]
fn model_format_that_does_not_match_the_model() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    c.train(&cfg, &["model.format=gguf"]).fails_with(&[
        "tiny.toml",
        "`model.format`: \"gguf\" does not match `model.path` = ",
        "bert-tiny\", a safetensors model folder",
    ]);
    c.no_run_folder();
    let gguf = c.d().join("weights");
    std::fs::copy(llama_gguf(&c, "m.gguf"), &gguf).unwrap();
    let cfg = write(
        c.d(),
        "run.toml",
        &tiny_config(&gguf, &fixture().join("train.jsonl")),
    );
    c.train(&cfg, &["model.format=safetensors"]).fails_with(&[
        "run.toml",
        "`model.format`: \"safetensors\" does not match `model.path` = ",
        "weights\", a GGUF file",
    ]);
    c.no_run_folder();
}

/// A head or objective the model's family cannot take: BERT's [CLS] pooler
/// on a decoder, a decoder's last-token pooling on BERT, SFT on an encoder.
/// Refused before the run folder is made.
#[test]
fn head_or_task_the_model_family_cannot_take() {
    let c = Case::new();
    let llama = fixture().join("../llama-tiny");
    let dec = c.config_for_model(&llama);
    c.train(&dec, &["task.pooling=\"cls\""])
        .fails_with(&["run.toml", "`task.pooling`: \"cls\" reads BERT's pooler over the first token; a decoder's sequence head pools \"last\" (or \"mean\")"]);
    c.no_run_folder();
    let bert = c.config_for_model(&fixture());
    c.train(&bert, &["task.pooling=\"last\""]).fails_with(&[
        "`task.pooling`: \"last\" is the decoders' pooling; BERT pools \"cls\" (or \"mean\")",
    ]);
    c.no_run_folder();
    let msgs = write(c.d(), "chat.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n");
    let set_sft = [
        "task.type=\"sft\"".to_string(),
        format!("data.train={}", toml_str(&msgs.display().to_string())),
        "data.messages=\"messages\"".into(),
        "data.text=\"\"".into(),
        "data.label=\"\"".into(),
    ];
    let set_sft: Vec<&str> = set_sft.iter().map(|s| s.as_str()).collect();
    c.train(&bert, &set_sft).fails_with(&[
        "`task.type` = \"sft\" trains a decoder LM, but",
        "bert-tiny is a BERT encoder",
    ]);
    c.no_run_folder();
}

#[test]
fn config_keys_that_conflict() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    for (set, needles) in [
        (
            &["adapter.type=\"lora\"", "adapter.target_modules=[\"query\"]", "freeze.preset=head_only"][..],
            &["tiny.toml", "`freeze`: an adapter freezes the whole base: leave [freeze] out"][..],
        ),
        (
            &["model.base_dtype=\"quantized\""],
            &["`model.base_dtype`: \"quantized\" needs a GGUF model"],
        ),
        (
            &["task.type=\"sft\""],
            &["`data`: SFT needs `messages` (chat rows) or `prompt` + `completion`"],
        ),
        (
            &["data.packing=true"],
            &["`data`: `messages`, `prompt` and `packing` are for task.type = \"sft\""],
        ),
        (
            &["adapter.type=\"lora\"", "adapter.r=0", "adapter.target_modules=[\"query\"]"],
            &["tiny.toml", "adapter: `r` must be > 0"],
        ),
        (
            &["train.early_stopping={metric = \"bleu\", patience = 2}"],
            &["`train.early_stopping.metric`: `bleu` is not one of [\"loss\", \"accuracy\", \"macro_f1\"]"],
        ),
        (
            &["task.type=\"sft\"", "data.messages=\"messages\"", "data.format=\"csv\""],
            &["tiny.toml", "`data.format`: SFT reads JSONL rows (\"jsonl\"); \"csv\" and \"tsv\" are for classification and regression"],
        ),
        (&["train.threads=0"], &["`train.threads`: must be > 0"]),
        (
            &["adapter.type=\"lora\"", "adapter.target_modules=[\"query\"]", "adapter.num_virtual_tokens=4"],
            &["tiny.toml", "`num_virtual_tokens` is not an option of a lora adapter"],
        ),
        (
            &["train.warmup_steps=5", "train.warmup_ratio=0.1"],
            &["`train.warmup_steps`: conflicts with `train.warmup_ratio` = 0.1: give one of them"],
        ),
    ] {
        c.train(&cfg, set).fails_with(needles);
        c.no_run_folder();
    }
}

/// `data.validation` (or `data.test`) given as a file while `data.split` still
/// keeps a share of `data.train` for that part: the split's rows would be read
/// and dropped. Refused before any weight is loaded, naming both keys, the
/// file and the split to write; the split written as told then trains.
#[test]
fn a_split_part_also_given_as_a_file() {
    let c = Case::new();
    let cfg = tiny_config_file(c.d());
    let rows = fixture().join("train.jsonl");
    let val = format!("data.validation={}", q(&rows));
    let test = format!("data.test={}", q(&rows));
    let file = rows.display().to_string();
    for (set, needles) in [
        (
            &[val.as_str()][..],
            &[
                "tiny.toml",
                "`data.split`: [0.6, 0.2, 0.2] keeps 0.2 of `data.train` for validation",
                "`data.validation` = ",
                &file,
                "Write `split = [0.8, 0.0, 0.2]` (the validation ratio 0) or leave `data.validation` out",
            ][..],
        ),
        (
            &[test.as_str()],
            &[
                "`data.split`: [0.6, 0.2, 0.2] keeps 0.2 of `data.train` for test",
                "`data.test` = ",
                &file,
                "Write `split = [0.8, 0.2, 0.0]` (the test ratio 0) or leave `data.test` out",
            ],
        ),
        (
            &[val.as_str(), test.as_str()],
            &["for validation", "Write `split = [1.0, 0.0, 0.0]`"],
        ),
        (
            &[test.as_str(), "data.split=[0.7, 0.0, 0.3]"],
            &["[0.7, 0.0, 0.3] keeps 0.3 of `data.train` for test", "Write `split = [1.0, 0.0, 0.0]`"],
        ),
    ] {
        c.train(&cfg, set).fails_with(needles);
        c.no_run_folder();
    }
    // As the message says: the validation ratio 0 with the file.
    c.train(
        &cfg,
        &[&val, "data.split=[0.8, 0.0, 0.2]", "train.max_steps=2"],
    )
    .ok();
    assert!(c.run().join("results.json").is_file());
}

/// `model.hub` is the one way a run reaches the network: with the endpoint
/// closed, the error says so; a revision that would leave the cache is
/// refused before any request.
#[test]
fn hub_model_unreachable_or_with_a_bad_revision() {
    let c = Case::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = tiny_config(&fixture(), &fixture().join("train.jsonl")).replace(
        &format!("path = {}", q(&fixture())),
        "hub = \"org/tiny-bert\"",
    );
    let cfg = write(c.d(), "run.toml", &text);
    let run = |set: &[&str]| {
        let mut args = vec!["train".to_string(), s(&cfg), "--out".into(), s(&c.run())];
        for x in set {
            args.push("--set".into());
            args.push(x.to_string());
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_afinar"))
            .args(&args)
            .current_dir(c.d())
            .env("AFINAR_CACHE", c.d().join("cache"))
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{port}"))
            .env_remove("HF_TOKEN")
            // ureq would send even 127.0.0.1 to a proxy.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
            .unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    run(&[]).fails_with(&[
        "hub model org/tiny-bert@main: config.json: cannot reach",
        "set HF_ENDPOINT for a mirror",
    ]);
    c.no_run_folder();
    run(&["model.revision=\"../../../x\""]).fails_with(&[
        "`../../../x` is not a revision (a branch, tag or commit sha; no `..`, no absolute path)",
    ]);
    c.no_run_folder();
    assert!(!c.d().join("x").exists());
}

// ---------------------------------------------------------------- more data files

#[test]
fn classification_label_of_the_wrong_type() {
    let c = Case::new();
    let cfg = c.config_for_data(
        "d.jsonl",
        &rows_with(b"{\"text\": \"oops\", \"label\": {\"name\": \"pos\"}}"),
    );
    c.train(&cfg, &[]).fails_with(&[
        "d.jsonl:4:",
        "label field `label` must be a string or a number, found an object",
    ]);
    c.no_run_folder();
}

/// 20 chat rows, with `bad` as line 4 when given.
fn sft_rows(bad: Option<&str>) -> String {
    let mut rows: Vec<String> = (0..20)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("q{i}")},
                {"role": "assistant", "content": format!("a{i}")},
            ]})
            .to_string()
        })
        .collect();
    if let Some(b) = bad {
        rows.insert(3, b.to_string());
    }
    rows.join("\n") + "\n"
}

/// An SFT config on the tiny Llama reading `<tmp>/sft.jsonl` (written from `rows`).
fn sft_config(c: &Case, rows: &str) -> String {
    let data = write(c.d(), "sft.jsonl", rows);
    format!(
        "[model]\npath = {}\nmax_length = 64\n[task]\ntype = \"sft\"\n\
         [data]\ntrain = {}\nmessages = \"messages\"\nsplit = [0.7, 0.15, 0.15]\n\
         [train]\nepochs = 1\nbatch_size = 8\nlr = 1e-2\nthreads = 1\n",
        q(&fixture().join("../llama-tiny")),
        q(&data)
    )
}

#[test]
fn chat_rows_with_bad_roles_or_messages() {
    let c = Case::new();
    for (row, needles) in [
        (
            r#"{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
            &["sft.jsonl:4: `messages[0]`: unknown role `robot` (allowed: system, user, assistant)"][..],
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            &["sft.jsonl:4: chat has no assistant turn, so nothing to learn (roles: [user])"],
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}"#,
            &["sft.jsonl:4: `messages[0]`.content must be a string, found a number"],
        ),
        (
            r#"{"messages": "hello"}"#,
            &["sft.jsonl:4: field `messages` must be a list of messages, found a string"],
        ),
    ] {
        let cfg = write(c.d(), "sft.toml", &sft_config(&c, &sft_rows(Some(row))));
        let out = c.train(&cfg, &[]);
        out.fails_with(needles);
        if row.contains("robot") {
            c.snapshot("chat_row_unknown_role", &out);
        }
        c.no_run_folder();
    }
    // prompt + completion rows: line 4 lacks its completion.
    let rows: String = (0..20)
        .map(|i| {
            if i == 3 {
                "{\"prompt\": \"p3\"}\n".to_string()
            } else {
                format!("{{\"prompt\": \"p{i}\", \"completion\": \"c{i}\"}}\n")
            }
        })
        .collect();
    let text = sft_config(&c, &rows).replace(
        "messages = \"messages\"",
        "prompt = \"prompt\"\ncompletion = \"completion\"",
    );
    let cfg = write(c.d(), "sft.toml", &text);
    c.train(&cfg, &[])
        .fails_with(&["sft.jsonl:4:", "`completion`", "not found"]);
    c.no_run_folder();
}

// ---------------------------------------------------------------- CLI arguments

#[test]
fn command_line_usage_errors() {
    let c = Case::new();
    // clap's usage errors exit 1 like every other error, with its usage text.
    c.cli(&["trian", "x.toml"])
        .fails_with(&["unrecognized subcommand 'trian'", "Usage: afinar <COMMAND>"]);
    c.cli(&["generate", "some-model"]).fails_with(&[
        "the following required arguments were not provided",
        "--prompt <PROMPT>",
    ]);
    c.cli(&["predict", "run", "--text", "a", "--file", "b.jsonl"])
        .fails_with(&["the argument '--text <TEXT>' cannot be used with '--file <FILE>'"]);
    // --help is not an error.
    let h = c.cli(&["--help"]);
    h.ok();
    assert!(h.stdout.contains("Usage: afinar"));
    c.only(&[]);
}

#[test]
fn simd_level_env_that_cannot_be() {
    // AFINAR_SIMD forces the vector level of the CPU kernels (simd):
    // an unknown name is an error before any work, naming the variable.
    let c = Case::new();
    let out = |v: &str| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_afinar"))
            .args(["inspect", &s(&fixture())])
            .current_dir(c.d())
            .env("AFINAR_SIMD", v)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = out("avx1024");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "error: AFINAR_SIMD=\"avx1024\": expected one of avx512, avx2, baseline, auto"
        ),
        "{err}"
    );
    // Every level this CPU has runs (baseline always does).
    let (code, err) = out("baseline");
    assert_eq!(code, Some(0), "{err}");
    c.only(&[]);
}

#[test]
fn predict_with_neither_text_nor_file() {
    let c = Case::new();
    let out = c.cli(&["predict", &s(&fixture())]);
    out.fails_with(&["give --text TEXT or --file FILE (JSONL rows with a `text` field)"]);
    c.snapshot("predict_without_input", &out);
}

#[test]
fn export_arguments_checked_before_anything_is_written() {
    let c = Case::new();
    let run = trained(&c);
    let before = std::fs::read(run.join("results.json")).unwrap();
    let r = s(&run);
    let out = c.cli(&["export", &r]);
    out.fails_with(&["give --merged OUT, --adapter OUT and/or --gguf OUT.gguf"]);
    c.snapshot("export_without_outputs", &out);
    c.cli(&["export", &r, "--gguf", "m.gguf", "--gguf-type", "q4_k"])
        .fails_with(&[
            "--gguf-type: GGUF type `q4_k` is not supported for export (f32, f16, q8_0)",
        ]);
    c.cli(&["export", &s(&c.d().join("gone")), "--merged", "m"])
        .fails_with(&["gone: no such run folder"]);
    c.cli(&["export", &r, "--gguf", "m.gguf"])
        .fails_with(&["--gguf is for decoder LMs", "run is a sequence classifier"]);
    c.cli(&["export", &r, "--adapter", "ad"])
        .fails_with(&["run: not an adapter run: nothing to export with --adapter"]);
    c.only(&["run", "tiny.toml"]);
    assert_eq!(std::fs::read(run.join("results.json")).unwrap(), before);
}

/// `export --merged OUT` replaces OUT whole: never the run itself, a file,
/// or a folder holding anything an export does not write.
#[test]
fn export_onto_the_run_a_file_or_a_foreign_folder() {
    let c = Case::new();
    let run = trained(&c);
    let r = s(&run);
    let listing = |p: &Path| {
        let mut v: Vec<String> = walk(p).iter().map(|x| s(x)).collect();
        v.sort();
        v
    };
    let before = listing(&run);
    let out = c.cli(&["export", &r, "--merged", &r]);
    out.fails_with(&[
        "run: is (or holds) the run folder",
        "exporting there would replace it; choose another folder",
    ]);
    c.snapshot("export_onto_the_run", &out);
    c.cli(&["export", &r, "--adapter", &s(c.d())])
        .fails_with(&["is (or holds) the run folder"]);
    let cfg = c.d().join("tiny.toml");
    let cfg_text = std::fs::read(&cfg).unwrap();
    c.cli(&["export", &r, "--merged", &s(&cfg)])
        .fails_with(&["tiny.toml: exists and is not a folder"]);
    let mine = c.d().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.md"), "keep me").unwrap();
    c.cli(&["export", &r, "--merged", &s(&mine)]).fails_with(&[
        "mine: holds files an export does not write ([\"notes.md\"])",
        "choose a new or empty one",
    ]);
    c.cli(&["export", &r, "--gguf", &s(&cfg)])
        .fails_with(&["tiny.toml: the GGUF output must end in .gguf"]);
    assert_eq!(listing(&run), before, "the run folder changed");
    assert_eq!(std::fs::read(&cfg).unwrap(), cfg_text);
    assert_eq!(std::fs::read(mine.join("notes.md")).unwrap(), b"keep me");
    c.only(&["run", "tiny.toml", "mine"]);
    // An earlier export is replaced.
    c.cli(&["export", &r, "--merged", &s(&c.d().join("out"))])
        .ok();
    c.cli(&["export", &r, "--merged", &s(&c.d().join("out"))])
        .ok();
    assert!(c.d().join("out/model.safetensors").is_file());
}

#[test]
fn generate_and_eval_arguments_out_of_range() {
    let c = Case::new();
    let llama = s(&fixture().join("../llama-tiny"));
    for (flag, needle) in [
        ("--top-p=2", "top_p 2 must be in (0, 1]"),
        ("--temperature=-1", "temperature -1 must be >= 0"),
        ("--top-k=0", "top_k must be > 0"),
    ] {
        let out = c.cli(&["generate", &llama, "--prompt", "a", flag]);
        out.fails_with(&[needle]);
        assert!(out.stdout.is_empty());
    }
    c.cli(&["generate", &s(&c.d().join("nothing")), "--prompt", "a"])
        .fails_with(&[
            "nothing` is neither a file, a folder nor an asset name",
            "caused by: unknown asset",
        ]);
    c.cli(&["generate", &s(&fixture()), "--prompt", "a"])
        .fails_with(&["config.json: `model_type` \"bert\" is not a supported decoder"]);
    let run = trained(&c);
    let data = write(c.d(), "rows.txt", "{\"text\": \"a\", \"label\": \"pos\"}\n");
    c.cli(&["eval", &s(&run), "--data", &s(&data)]).fails_with(&[
        "rows.txt: cannot tell the data format from the extension (expected .jsonl, .json, .csv or .tsv)",
    ]);
}

/// docs/bad-inputs.md and this file agree: every test here is a row there,
/// and every row names a test here.
#[test]
fn the_catalogue_lists_every_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../../docs/bad-inputs.md")).unwrap();
    let src = std::fs::read_to_string(root.join("tests/bad_inputs.rs")).unwrap();
    let mut tests = std::collections::BTreeSet::new();
    let mut lines = src.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim() == "#[test]" {
            let next = lines.peek().map(|n| n.trim()).unwrap_or_default();
            if let Some(name) = next.strip_prefix("fn ").and_then(|n| n.split('(').next()) {
                tests.insert(name.to_string());
            }
        }
    }
    tests.remove("the_catalogue_lists_every_test");
    let mut rows = std::collections::BTreeSet::new();
    for l in doc
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Input |"))
    {
        let name = l
            .trim_end()
            .strip_suffix("` |")
            .and_then(|h| h.rsplit_once("| `"))
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| panic!("a row without its test: {l}"));
        rows.insert(name);
    }
    let unlisted: Vec<_> = tests.difference(&rows).collect();
    let unknown: Vec<_> = rows.difference(&tests).collect();
    assert!(
        unlisted.is_empty() && unknown.is_empty(),
        "tests without a row in docs/bad-inputs.md: {unlisted:?}; rows naming no test: {unknown:?}"
    );
    assert!(rows.len() >= 30, "{} cases", rows.len());
}

// ================================================================ preference pairs (issue 14)

/// 20 good chat pairs, with `bad` as line 4.
fn pair_rows(bad: Option<&str>) -> String {
    let mut rows: Vec<String> = (0..20)
        .map(|i| {
            serde_json::json!({
                "prompt": [{"role": "user", "content": format!("q{i}")}],
                "chosen": [{"role": "assistant", "content": format!("a{i}")}],
                "rejected": [{"role": "assistant", "content": format!("b{i}")}],
            })
            .to_string()
        })
        .collect();
    if let Some(b) = bad {
        rows.insert(3, b.to_string());
    }
    rows.join("\n") + "\n"
}

/// A `task` run ("dpo" / "reward") on the tiny Llama reading `<tmp>/pairs.jsonl`.
fn pair_config(c: &Case, task: &str, rows: &str, extra: &str) -> PathBuf {
    let data = write(c.d(), "pairs.jsonl", rows);
    write(
        c.d(),
        "pref.toml",
        &format!(
            "[model]\npath = {}\nmax_length = 64\n[task]\ntype = \"{task}\"\n\
             [data]\ntrain = {}\nsplit = [0.7, 0.15, 0.15]\ngenerate_eval_rows = 0\n\
             [train]\nepochs = 1\nbatch_size = 8\nlr = 1e-2\nthreads = 1\n{extra}",
            q(&fixture().join("../llama-tiny")),
            q(&data)
        ),
    )
}

#[test]
fn pair_rows_that_cannot_be_compared() {
    let c = Case::new();
    for (row, needles) in [
        (
            r#"{"prompt": "p", "rejected": "r"}"#,
            &["pairs.jsonl:4: chosen field `chosen`: key `chosen` not found in the record (keys: prompt, rejected)"][..],
        ),
        (
            r#"{"prompt": "p", "chosen": "c"}"#,
            &["pairs.jsonl:4: rejected field `rejected`: key `rejected` not found"],
        ),
        (
            r#"{"prompt": "p", "chosen": " same", "rejected": " same"}"#,
            &["pairs.jsonl:4: chosen and rejected are identical (`chosen`, `rejected`): nothing to prefer"],
        ),
        (
            r#"{"prompt": "p", "chosen": "  ", "rejected": "r"}"#,
            &["pairs.jsonl:4: empty chosen completion (`chosen`): nothing to score"],
        ),
        (
            r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}"#,
            &["pairs.jsonl:4: `chosen[0]` is a user turn: a chosen completion holds the assistant's turns only"],
        ),
        (
            r#"{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}"#,
            &["pairs.jsonl:4: prompt is a string, chosen messages, rejected a string: one row uses one kind"],
        ),
    ] {
        for task in ["dpo", "reward"] {
            let cfg = pair_config(&c, task, &pair_rows(Some(row)), "");
            c.train(&cfg, &[]).fails_with(needles);
            c.no_run_folder();
        }
    }
}

#[test]
fn pairs_over_max_length() {
    let c = Case::new();
    let long = serde_json::json!({
        "prompt": [{"role": "user", "content": "x".repeat(200)}],
        "chosen": [{"role": "assistant", "content": "c"}],
        "rejected": [{"role": "assistant", "content": "r"}],
    })
    .to_string();
    let rows = pair_rows(Some(&long));
    // "error": the line, its length and the way out.
    let cfg = pair_config(&c, "dpo", &rows, "");
    c.train(&cfg, &["data.truncation_mode=error"]).fails_with(&[
        "pairs.jsonl:4: prompt + completion is",
        "longer than max_length 64",
        "data.truncation_mode = \"keep_start\" or \"keep_end\" cuts it, \"skip\" leaves it out",
    ]);
    c.no_run_folder();
    c.train(&cfg, &["data.truncation_mode=keep_middle"])
        .fails_with(&["`keep_middle`", "keep_start", "keep_end", "skip", "error"]);
    c.no_run_folder();
    // The modes that go on count what they did in the log. keep_start cuts
    // the completion away (the prompt alone is 200 tokens): the pair goes.
    for (task, mode, needle) in [
        (
            "dpo",
            "keep_start",
            "1 truncated to max_length, 1 skipped (KeepStart)",
        ),
        (
            "dpo",
            "keep_end",
            "1 truncated to max_length, 0 skipped (KeepEnd)",
        ),
        ("dpo", "skip", "0 truncated to max_length, 1 skipped (Skip)"),
        ("reward", "skip", "1 skipped"),
        (
            "reward",
            "keep_end",
            "1 cut to max_length 64 (truncation KeepEnd), 0 skipped",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = pair_config(&c, task, &rows, "");
        let out = afinar_p(
            c.d(),
            &[
                "train".to_string(),
                cfg.display().to_string(),
                "--set".into(),
                format!("data.truncation_mode={mode}"),
                "--set".into(),
                "train.max_steps=1".into(),
                "--out".into(),
                d.path().join("run").display().to_string(),
            ],
        );
        assert_eq!(out.code, 0, "{task} {mode}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{task} {mode}: {}", out.stderr);
    }
}

#[test]
fn preference_configs_that_do_not_fit() {
    let c = Case::new();
    let rows = pair_rows(None);
    // A reward model learns from pairs, not labels.
    let cfg = pair_config(&c, "reward", &rows, "");
    c.train(&cfg, &["data.label=label"]).fails_with(&[
        "pref.toml",
        "`data.label`: a reward model learns from preference pairs (`prompt`, `chosen`, `rejected` fields), not labels",
    ]);
    c.train(&cfg, &["dpo.beta=0.2"])
        .fails_with(&["`dpo`: the [dpo] section is for task.type = \"dpo\""]);
    c.train(&cfg, &["reward.center_rewards_coefficient=-1"])
        .fails_with(&["`reward.center_rewards_coefficient`: -1 must be >= 0"]);
    let cfg = pair_config(&c, "dpo", &rows, "");
    c.train(&cfg, &["dpo.beta=0"])
        .fails_with(&["`dpo.beta`: 0 must be > 0"]);
    c.train(&cfg, &["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"])
        .fails_with(&["`dpo.label_smoothing`: is for loss_type = \"sigmoid\""]);
    c.train(&cfg, &["dpo.loss_type=kto"])
        .fails_with(&["`kto`", "sigmoid", "hinge", "ipo"]);
    // A quantized base trained whole leaves DPO no reference.
    c.train(&cfg, &["model.base_dtype=quantized"]).fails_with(&[
        "`model.base_dtype`: DPO's reference cannot be built",
        "Use \"f32\" for full fine-tuning, or add an [adapter]",
    ]);
    // Pair fields on a classification run.
    let tiny = tiny_config_file(c.d());
    c.train(&tiny, &["data.chosen=c"]).fails_with(&[
        "`data`: `chosen`, `rejected` and `truncation_mode` are for preference pairs",
    ]);
    // DPO trains a decoder.
    decoder_task_on_bert(&c, &cfg, "dpo");
}

/// `cfg` (a run on the tiny Llama) pointed at the tiny BERT: a decoder
/// task (`task`) refuses it.
fn decoder_task_on_bert(c: &Case, cfg: &Path, task: &str) {
    let bert = write(
        c.d(),
        "bert.toml",
        &std::fs::read_to_string(cfg)
            .unwrap()
            .replace("../llama-tiny", "."),
    );
    c.train(&bert, &[]).fails_with(&[
        &format!("`task.type` = \"{task}\" trains a decoder LM, but"),
        "is a BERT encoder",
    ]);
    c.no_run_folder();
}

/// A PPO run on the tiny Llama reading the tiny SFT rows.
fn ppo_config(c: &Case, extra: &str) -> PathBuf {
    write(
        c.d(),
        "ppo.toml",
        &format!(
            "[model]\npath = {}\nmax_length = 64\n[task]\ntype = \"ppo\"\n\
             [data]\ntrain = {}\nmessages = \"input\"\nresponse = \"ideal\"\nsplit = [0.8, 0.1, 0.1]\n\
             [train]\nbatch_size = 4\nlr = 1e-3\nthreads = 1\n[ppo]\nresponse_length = 8\n{extra}",
            q(&fixture().join("../llama-tiny")),
            q(&fixture().join("../sft-tiny/train.jsonl"))
        ),
    )
}

#[test]
fn ppo_configs_that_do_not_fit() {
    let c = Case::new();
    let cfg = ppo_config(&c, "");
    for (sets, needles) in [
        (
            &["ppo.reward=model"][..],
            &[
                "ppo.toml",
                "`ppo.reward_model`: reward = \"model\" needs the folder of a reward-model run",
            ][..],
        ),
        (
            &["ppo.reward=regex", "ppo.reward_regex=(unclosed"],
            &["`ppo.reward_regex`: \"(unclosed\" is not a regex"],
        ),
        (
            &["ppo.target_length=10"],
            &["`ppo.target_length`: is for reward = \"length\" (reward is \"exact_match\")"],
        ),
        (
            &["ppo.value_init=reward_model"],
            &["`ppo.value_init`: \"reward_model\" needs reward = \"model\""],
        ),
        (&["ppo.cliprange=0"], &["`ppo.cliprange`: 0 must be > 0"]),
        (&["ppo.lam=1.5"], &["`ppo.lam`: 1.5 is not in [0, 1]"]),
        (
            &["ppo.num_ppo_epochs=0"],
            &["`ppo.num_ppo_epochs`: must be > 0"],
        ),
        (
            &["ppo.kl_estimator=k2"],
            &["unknown variant `k2`, expected `k1` or `k3`"],
        ),
        (
            &["train.max_steps=10"],
            &["`train.max_steps`: PPO counts its work in rollouts: set `ppo.total_episodes`"],
        ),
        (
            &["ppo.response_length=64"],
            &["`ppo.response_length` = 64 leaves no room for a prompt in model.max_length = 64"],
        ),
    ] {
        c.train(&cfg, sets).fails_with(needles);
        c.no_run_folder();
    }
    // The reward model must be a reward model: a missing folder, a classifier.
    c.train(&cfg, &["ppo.reward=model", "ppo.reward_model=no-such-run"])
        .fails_with(&["`ppo.reward_model` = \"no-such-run\":"]);
    c.no_run_folder();
    let seqcls = fixture().join("../llama-tiny-seqcls");
    c.train(
        &cfg,
        &[
            "ppo.reward=model",
            &format!("ppo.reward_model={}", seqcls.display()),
        ],
    )
    .fails_with(&["has 3 outputs: a reward model has one (a run with task.type = \"reward\")"]);
    c.no_run_folder();
    // [ppo] on another task; PPO on a BERT encoder.
    let tiny = tiny_config_file(c.d());
    c.train(&tiny, &["ppo.kl_coef=0.1"])
        .fails_with(&["`ppo`: the [ppo] section is for task.type = \"ppo\""]);
    decoder_task_on_bert(&c, &cfg, "ppo");
}

#[test]
fn eval_a_language_model_run() {
    let c = Case::new();
    // A PPO run folder: its config.toml says what it is.
    let run = c.d().join("ppo-run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::copy(ppo_config(&c, ""), run.join("config.toml")).unwrap();
    afinar_p(c.d(), &[Path::new("eval"), &run]).fails_with(&[
        "ppo-run: a PPO run is a language model: `afinar eval` reads classifier, reward-model and DPO runs",
        "ppo-run/results.json",
        "`afinar generate",
    ]);
}

#[test]
fn pairs_and_score_arguments() {
    let c = Case::new();
    // An item whose ideal letter is not an option names its line.
    let item = |ideal: &str| {
        serde_json::json!({"input": [{"role": "user", "content": "Q?\nA. one\nB. two"}], "ideal": ideal})
            .to_string()
    };
    write(
        c.d(),
        "mc.jsonl",
        &format!("{}\n{}\n", item("A"), item("E")),
    );
    c.cli(&[
        "pairs",
        "from-choices",
        "--data",
        "mc.jsonl",
        "--out",
        "p.jsonl",
    ])
    .fails_with(&["mc.jsonl:2: `ideal` \"E\" is not one of the options \"AB\""]);
    assert!(!c.d().join("p.jsonl").exists());
    // `score` needs a reward model: a classifier run is refused.
    let cfg = tiny_config_file(c.d());
    let out = c.train(&cfg, &["train.max_steps=1"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    write(
        c.d(),
        "rows.jsonl",
        "{\"prompt\": \"p\", \"completion\": \"c\"}\n",
    );
    c.cli(&["score", &s(&c.run()), "--file", "rows.jsonl"])
        .fails_with(&["not a reward model (its head is Classification"]);
}

/// A COSINE config on the tiny rows: `rules.toml` (written here) votes pos
/// for good / great, neg for bad / awful; `extra` appended.
fn weak_config(c: &Case, rules: &str, extra: &str) -> PathBuf {
    write(c.d(), "rules.toml", rules);
    let f = fixture();
    write(
        c.d(),
        "weak.toml",
        &format!(
            "{}[task]\nweak = \"cosine\"\n{extra}",
            tiny_config(&f, &f.join("train.jsonl"))
        ),
    )
}

const TINY_RULES: &str = "[[rule]]\nname = \"praise\"\nkind = \"keywords\"\nwords = [\"good\", \"great\"]\nlabel = \"pos\"\n\
                          [[rule]]\nname = \"blame\"\nkind = \"keywords\"\nwords = [\"bad\", \"awful\"]\nlabel = \"neg\"\n";

#[test]
fn weak_configs_that_do_not_fit() {
    let c = Case::new();
    // task.weak without rules; [weak] with no rule; values out of range.
    let no_section = weak_config(&c, TINY_RULES, "");
    c.train(&no_section, &[]).fails_with(&[
        "weak.toml",
        "`task.weak`: needs a [weak] section with the rules",
    ]);
    c.no_run_folder();
    let cfg = weak_config(&c, TINY_RULES, "[weak]\nrules = [\"rules.toml\"]\n");
    for (sets, needles) in [
        (
            &["weak.rules=[]"][..],
            &["`weak.rules`: no rule: give rule files"][..],
        ),
        (
            &["weak.threshold=1.5"],
            &["`weak.threshold`: 1.5 is not in [0, 1)"],
        ),
        (
            &["weak.teacher_update=0"],
            &["`weak.teacher_update`: must be at least 1"],
        ),
        (&["weak.mu=-1"], &["`weak.mu`: -1 must be >= 0"]),
        (&["weak.label_model=\"vote\""], &["unknown variant `vote`"]),
        (
            &["task.type=\"regression\""],
            &["`task.weak`: weak supervision trains a classifier"],
        ),
        (
            &[
                "weak.label_model=\"score\"",
                "weak.score_label=\"pos\"",
                "weak.score_at_least=0",
                "weak.score_at_most=1",
            ],
            &["`weak.score_at_most` (1) must be below `weak.score_at_least` (0)"],
        ),
        (
            &["weak.score_at_least=2"],
            &["`weak.score_*` are for label_model = \"score\""],
        ),
    ] {
        c.train(&cfg, sets).fails_with(needles);
        c.no_run_folder();
    }
    // A missing rule file; a rule file with a typo; a rule voting a label
    // the data does not have; a lexicon condition that is not one.
    c.train(&cfg, &["weak.rules=[\"nope.toml\"]"])
        .fails_with(&["nope.toml"]);
    c.no_run_folder();
    for (rules, needles) in [
        (
            "[[rule]]\nname = \"r\"\nkind = \"keywords\"\nword = [\"good\"]\nlabel = \"pos\"\n",
            &["rules.toml", "unknown field `word`"][..],
        ),
        (
            "[[rule]]\nname = \"r\"\nkind = \"keywords\"\nwords = [\"good\"]\nlabel = \"positive\"\n",
            &["rules.toml", "rule `r` votes `positive`, which is not a label of the data (labels: [\"neg\", \"pos\"])"],
        ),
        (
            "[[rule]]\nname = \"r\"\nkind = \"regex\"\nlabel = \"pos\"\n",
            &["rules.toml", "rule `r`: a `regex` rule needs `pattern`"],
        ),
        (
            "[[rule]]\nname = \"lex\"\nkind = \"lexicon\"\nfile = \"lex.txt\"\nthresholds = { pos = \"=> 1\" }\n",
            &["rule `lex`: `thresholds.pos`: `=> 1`: expected a comparison"],
        ),
    ] {
        write(c.d(), "rules.toml", rules);
        write(c.d(), "lex.txt", "good\t3\nbad\t-3\n");
        c.train(&cfg, &[]).fails_with(needles);
        c.no_run_folder();
    }
    // `afinar weak analyse` on a config without rules.
    let tiny = tiny_config_file(c.d());
    c.cli(&["weak", "analyse", &s(&tiny)])
        .fails_with(&["tiny.toml: no [weak] section: nothing to analyse"]);
}
