//! Sequence classification on decoder bodies through the `afinar` binary:
//! the tiny random Llama and GPT-2 causal-LM fixtures get a new `score`
//! head (their LM head is dropped with a warning), train on the toy
//! sentiment rows fully, with LoRA (q, v + `score` in `modules_to_save`)
//! or with layers frozen; the run folder holds the family's
//! `*ForSequenceClassification` model (and PEFT's SEQ_CLS adapter), which
//! `predict`, `eval` and `export` read back with the same logits.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    fixture().parent().unwrap().to_path_buf()
}

/// The tiny classification run on decoder `model` (a fixture folder name),
/// with `extra` TOML appended; trained into `dir/run`.
fn train(dir: &Path, model: &str, extra: &str) -> (PathBuf, Out) {
    let text = tiny_config(&fixtures().join(model), &fixture().join("train.jsonl")) + extra;
    let cfg = write(dir, "dec.toml", &text);
    let run = dir.join("run");
    let out = afinar_p(dir, &[Path::new("train"), &cfg, Path::new("--out"), &run]);
    (run, out)
}

/// `afinar predict PATH --file rows` -> logits per row.
fn predict(dir: &Path, path: &Path, extra: &[&str]) -> Vec<Vec<f64>> {
    let rows = write(
        dir,
        "rows.jsonl",
        "{\"text\": \"the movie was great\"}\n{\"text\": \"a dull and boring film\"}\n{\"text\": \"fine\"}\n",
    );
    let mut args: Vec<String> = vec![
        "predict".into(),
        path.display().to_string(),
        "--file".into(),
        rows.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = afinar_p(dir, &args);
    out.ok();
    out.stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[track_caller]
fn close(a: &[Vec<f64>], b: &[Vec<f64>], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= tol, "{x:?} vs {y:?}");
        }
    }
}

#[test]
fn llama_full_fine_tuning_with_a_new_score_head() {
    let d = tempfile::tempdir().unwrap();
    let (run, out) = train(d.path(), "llama-tiny", "");
    out.ok();
    assert!(
        out.stderr
            .contains("warning: ignoring 1 tensors of a pretraining head (e.g. lm_head.weight)"),
        "{}",
        out.stderr
    );
    let cfg = read_json(&run.join("model/config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["LlamaForSequenceClassification"])
    );
    assert_eq!(cfg["pad_token_id"], 0);
    assert_eq!(cfg["afinar"]["pooling"], "last");
    let t = tensors(&run.join("model/model.safetensors"));
    assert_eq!(t["score.weight"].0, vec![2, 64]);
    assert!(!t.contains_key("score.bias") && !t.contains_key("lm_head.weight"));
    assert!(t.contains_key("model.layers.1.mlp.down_proj.weight"));
    let results = read_json(&run.join("results.json"));
    let acc = results["test"]["accuracy"].as_f64().unwrap();
    assert!(
        acc >= 0.75,
        "the tiny Llama classifier did not learn: {acc}"
    );
    // The run folder and its model/ folder predict the same.
    let a = predict(d.path(), &run, &[]);
    let b = predict(d.path(), &run.join("model"), &[]);
    close(&a, &b, 0.0);
    // eval on the run's own test split reproduces results.json.
    let e = afinar_p(d.path(), &[Path::new("eval"), &run]);
    e.ok();
    let v: serde_json::Value = serde_json::from_str(&e.stdout).unwrap();
    assert_eq!(v["metrics"]["accuracy"], results["test"]["accuracy"]);
}

#[test]
fn gpt2_classifier_writes_conv1d_weights_as_transformers_does() {
    let d = tempfile::tempdir().unwrap();
    let (run, out) = train(d.path(), "gpt2-tiny", "");
    out.ok();
    let cfg = read_json(&run.join("model/config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["GPT2ForSequenceClassification"])
    );
    let t = tensors(&run.join("model/model.safetensors"));
    // Conv1D: [in, out] on disk.
    assert_eq!(t["transformer.h.0.attn.c_attn.weight"].0, vec![32, 96]);
    assert_eq!(t["score.weight"].0, vec![2, 32]);
    let a = predict(d.path(), &run, &[]);
    let b = predict(d.path(), &run.join("model"), &[]);
    close(&a, &b, 0.0);
}

#[test]
fn llama_lora_writes_a_seq_cls_adapter_that_predicts_as_the_merged_model() {
    let d = tempfile::tempdir().unwrap();
    let extra = "\n[adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";
    let (run, out) = train(d.path(), "llama-tiny", extra);
    out.ok();
    let (t, all, _) = trainable(&out.stderr);
    // LoRA A/B on 2 layers x (q, v) + the score head [2, 64].
    let lora = 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4);
    assert_eq!(t, lora + 2 * 64, "{}", out.stderr);
    assert!(all > 20 * t);
    let ac = read_json(&run.join("adapter/adapter_config.json"));
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(ac["peft_type"], "LORA");
    let w = tensors(&run.join("adapter/adapter_model.safetensors"));
    assert!(
        w.contains_key("base_model.model.score.weight"),
        "{:?}",
        w.keys()
    );
    assert!(w.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    // The adapter on its base (unmerged) and model/ (merged) predict the same.
    let a = predict(d.path(), &run, &[]);
    let b = predict(d.path(), &run.join("model"), &[]);
    close(&a, &b, 1e-5);
    // export --adapter gives the PEFT folder alone; --merged the model.
    let out_ad = d.path().join("ad");
    let out_m = d.path().join("merged");
    afinar_p(
        d.path(),
        &[
            Path::new("export"),
            &run,
            Path::new("--adapter"),
            &out_ad,
            Path::new("--merged"),
            &out_m,
        ],
    )
    .ok();
    assert!(out_ad.join("adapter_config.json").is_file());
    close(&predict(d.path(), &out_m, &[]), &b, 1e-6);
}

#[test]
fn decoder_layers_freeze_by_index() {
    let d = tempfile::tempdir().unwrap();
    let (_, out) = train(
        d.path(),
        "llama-tiny",
        "\n[freeze]\npreset = \"last_layers\"\nlast_layers = 1\nembeddings = true\n",
    );
    out.ok();
    let (t, _, _) = trainable(&out.stderr);
    // Layer 1 of llama-tiny (hidden 64, 4 heads / 2 KV heads of 16,
    // intermediate 96) + the score head.
    let layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (64 * 96) + 2 * 64;
    assert_eq!(t, layer + 2 * 64, "{}", out.stderr);
    let d = tempfile::tempdir().unwrap();
    let (run, out) = train(
        d.path(),
        "llama-tiny",
        "\n[task]\ntype = \"classification\"\npooling = \"cls\"\n",
    );
    out.fails_with(&["`task.pooling`", "\"cls\" reads BERT's pooler"]);
    assert_no_run(d.path(), &run);
}

/// `(trainable, all, %)` from the start-up summary line.
fn trainable(stderr: &str) -> (usize, usize, f64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("trainable params:"))
        .unwrap_or_else(|| panic!("no summary line: {stderr}"));
    let num = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (
        num("trainable params:") as usize,
        num("all params:") as usize,
        num("trainable%:"),
    )
}
