//! The non-finite guard (issue 6, part 3): a NaN or Inf in the loss or the
//! gradients is caught at the step it happens. `train.on_non_finite =
//! "stop"` (the default, see bad_inputs.rs `nan_loss_*`) ends the run naming
//! the step and the rows; `"skip"` drops the batch, counts it, logs it and
//! goes on. Weights holding a NaN or Inf are never written.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny")
}

/// Regression rows of the fixture's texts; line 1 has the label 1e30,
/// whose square is inf in f32.
fn poisoned_rows(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(fixture().join("train.jsonl")).unwrap();
    let mut rows = String::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let y = match (i, v["label"].as_str()) {
            (0, _) => 1e30,
            (_, Some("pos")) => 1.0,
            _ => 0.0,
        };
        rows.push_str(&serde_json::json!({"text": v["text"], "label": y}).to_string());
        rows.push('\n');
    }
    let p = dir.join("d.jsonl");
    std::fs::write(&p, rows).unwrap();
    p
}

fn config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let p = dir.join("c.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[task]\ntype = \"regression\"\n\
             [data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [train]\nepochs = 2\nbatch_size = 1\nlr = 1e-3\neval_every = 10\nlog_every = 1\nthreads = 1\n{extra}\n",
            fixture(),
            data
        ),
    )
    .unwrap();
    p
}

fn train(cfg: &Path, run: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .arg("train")
        .arg(cfg)
        .arg("--out")
        .arg(run)
        .output()
        .unwrap()
}

#[test]
fn skip_drops_the_poisoned_batch_and_counts_it() {
    let d = tempfile::tempdir().unwrap();
    let data = poisoned_rows(d.path());
    let run = d.path().join("run");
    let o = train(&config(d.path(), &data, "on_non_finite = \"skip\""), &run);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    // The row is in the training split, seen once per epoch.
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    let skipped = res["skipped_batches"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{res}");
    for s in skipped {
        assert_eq!(s["reason"], "loss is inf", "{s}");
        assert!(
            s["rows"].as_str().unwrap().ends_with("d.jsonl line 1"),
            "{s}"
        );
    }
    assert!(err.contains("skipped the batch at step"), "{err}");
    assert!(
        err.contains("2 batches skipped by the non-finite guard"),
        "{err}"
    );
    // The log names them too, every other step trained, and the result is finite.
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skip_steps: Vec<u64> = lines
        .iter()
        .filter(|v| v.get("skipped").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        skip_steps,
        skipped
            .iter()
            .map(|s| s["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    );
    let trained = lines.iter().filter(|v| v.get("loss").is_some()).count();
    assert_eq!(trained as u64, res["steps"].as_u64().unwrap() - 2);
    assert!(res["test"]["mse"].as_f64().unwrap().is_finite(), "{res}");
}

#[test]
fn stop_names_the_step_and_the_rows() {
    let d = tempfile::tempdir().unwrap();
    let data = poisoned_rows(d.path());
    let run = d.path().join("run");
    let o = train(&config(d.path(), &data, ""), &run);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("training stopped: loss is inf at step"),
        "{err}"
    );
    assert!(err.contains("batch"), "{err}");
    assert!(err.contains("d.jsonl line 1"), "{err}");
    assert!(err.contains("train.on_non_finite = \"skip\""), "{err}");
    assert!(!run.join("results.json").exists());
}

/// lr = 1e39 is inf in f32: the first update makes every weight NaN (a
/// finite loss and gradient before it), every later loss is NaN and
/// skipped, and nothing non-finite reaches the disk: the run stops at its
/// first save naming the parameter.
#[test]
fn broken_weights_are_never_written() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let cfg = config(
        d.path(),
        &fixture().join("train.jsonl"),
        "on_non_finite = \"skip\"",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("regression", "classification")
        .replace("lr = 1e-3", "lr = 1e39");
    std::fs::write(&cfg, text).unwrap();
    let o = train(&cfg, &run);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("skipped the batch at step 2"), "{err}");
    assert!(err.contains("holds NaN: not writing"), "{err}");
    assert!(!run.join("model").exists(), "non-finite weights written");
    let cks: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("checkpoint") || n.contains(".tmp"))
        .collect();
    assert!(cks.is_empty(), "{cks:?}");
}

/// PPO whose learning rate blows the weights up after its first step: the
/// next loss is not finite, and the run stops naming the step and the
/// rollout batch's prompts; no model with NaN weights is written.
#[test]
fn ppo_stops_at_the_first_non_finite_loss_naming_the_rollouts() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture().join("..");
    let cfg = d.path().join("ppo.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"ppo\"\n\
             [data]\ntrain = {:?}\nmessages = \"input\"\nresponse = \"ideal\"\nsplit = [0.8, 0.1, 0.1]\n\
             [train]\nbatch_size = 4\nlr = 1e30\nmax_grad_norm = 0\nthreads = 1\n\
             [ppo]\nreward = \"regex\"\nreward_regex = \"a\"\nresponse_length = 4\ntotal_episodes = 16\n",
            fx.join("llama-tiny"),
            fx.join("sft-tiny/train.jsonl"),
        ),
    )
    .unwrap();
    let run = d.path().join("run");
    let o = train(&cfg, &run);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("at step 2"), "{err}");
    assert!(
        err.contains("rollout batch 0: prompts of training rows ["),
        "{err}"
    );
    assert!(!run.join("model").exists(), "a model was written");
}
