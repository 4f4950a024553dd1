//! Ctrl-C during training finishes the step, saves a resumable
//! `checkpoint-<step>/` and exits with 130, leaving no temporary file;
//! `afinar train --resume` then finishes the run.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn sigint_saves_a_checkpoint_and_exits_130() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("long.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [train]\nepochs = 100000\nbatch_size = 8\nlr = 1e-3\neval_every = 50\nthreads = 1\n",
            fixtures,
            fixtures.join("train.jsonl")
        ),
    )
    .unwrap();
    let run = dir.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .arg("train")
        .arg(&cfg)
        .arg("--out")
        .arg(&run)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it is training (the first evaluation saved model/).
    let t0 = Instant::now();
    while !run.join("model").join("model.safetensors").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("continue with: afinar train --resume"),
        "{err}"
    );
    // The newest checkpoint is the step it stopped at, whole.
    let mut steps: Vec<usize> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse().ok())
        })
        .collect();
    steps.sort();
    let last = *steps.last().expect("no checkpoint-<step>/");
    let ck = run.join(format!("checkpoint-{last}"));
    for f in [
        "trainer_state.json",
        "trainable.safetensors",
        "optimizer.safetensors",
    ] {
        assert!(ck.join(f).is_file(), "checkpoint-{last}/{f} missing");
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], last);
    assert!(
        err.contains(&format!("interrupted at step {last}")),
        "{err}"
    );
    // Not finished: no results.json, and a new run into the folder is refused.
    assert!(!run.join("results.json").exists());
    let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .arg("train")
        .arg(&cfg)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("holds an unfinished run: continue it with `afinar train --resume"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !run.join(".afinar.lock").exists(),
        "the lock outlived its process"
    );
}

/// Gradient accumulation: 2 micro-batches of 8 give the same updates as one
/// batch of 16 (dropout off, same data order), so the loss curves agree.
#[test]
fn grad_accum_matches_the_full_batch() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny");
    let dir = tempfile::tempdir().unwrap();
    let losses = |bs: usize, accum: usize| -> Vec<f64> {
        let cfg = dir.path().join(format!("c{bs}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[model]\npath = {:?}\nmax_length = 32\nhidden_dropout_prob = 0.0\nattention_probs_dropout_prob = 0.0\n\
                 [task]\ndropout = 0.0\n[data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
                 [train]\nmax_steps = 8\nbatch_size = {bs}\ngrad_accum = {accum}\nlr = 1e-3\nlog_every = 1\nthreads = 1\n",
                fixtures,
                fixtures.join("train.jsonl")
            ),
        )
        .unwrap();
        let run = dir.path().join(format!("run{bs}"));
        let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
            .arg("train")
            .arg(&cfg)
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.get("split").is_none())
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    };
    let full = losses(16, 1);
    let accum = losses(8, 2);
    assert_eq!(full.len(), 8);
    assert_eq!(full.len(), accum.len());
    for (a, b) in full.iter().zip(&accum) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "full {full:?} vs accumulated {accum:?}"
        );
    }
    // And the curve moved: the test would pass trivially on a frozen model.
    assert!((full[0] - full[7]).abs() > 1e-3, "{full:?}");
}
