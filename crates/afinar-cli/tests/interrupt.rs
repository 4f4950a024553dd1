//! Ctrl-C during training finishes the step, saves `checkpoint-last/` and
//! exits with 130, leaving no temporary file.

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_afinar")).arg("train").arg(&cfg).arg("--out").arg(&run).spawn().unwrap();
    // Wait until it is training (the first evaluation saved model/).
    let t0 = Instant::now();
    while !run.join("model").join("model.safetensors").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "training never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(run.join("checkpoint-last").join(f).is_file(), "checkpoint-last/{f} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
