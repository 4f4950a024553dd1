//! Gated tests on the real assets (all-MiniLM-L6-v2 + sarcasm headlines,
//! SmolLM2): they run after `afinar fetch` (scripts/test.sh does it); when the
//! assets are not in the cache they skip, saying so, or fail under CI
//! (`common::real_asset`).

mod common;

use std::path::Path;
use std::process::Command;

/// 80 steps of full fine-tuning of the real MiniLM on sarcasm headlines learn
/// far above chance, and the exported model predicts.
#[test]
fn real_minilm_learns_sarcasm_in_80_steps() {
    if common::real_asset("all-minilm-l6-v2").is_none() || common::real_asset("sarcasm").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .current_dir(&root)
        .args([
            "train",
            "configs/minilm-sarcasm-quick.toml",
            "--set",
            "train.max_steps=80",
            "--set",
            "train.eval_every=80",
            "--out",
        ])
        .arg(&run)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "train failed: {stderr}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let acc = results["test"]["accuracy"].as_f64().unwrap();
    assert!(acc > 0.75, "test accuracy after 80 steps: {acc}");
    assert_eq!(results["steps"].as_u64(), Some(80));
    let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(["predict"])
        .arg(&run)
        .args(["--text", "area man wins lifetime supply of disappointment"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["label"] == "0" || v["label"] == "1");
}

/// SmolLM2-135M-Instruct from its Q4_1 GGUF (Q/K rows un-permuted, tokenizer
/// from the metadata): the greedy continuation of "The capital of France is"
/// names Paris, and the chat template path answers the question too; with
/// `--quantized` (projections kept Q4_1, dequantised per matmul) the text is the same.
#[test]
fn smollm2_gguf_greedy_says_paris() {
    if common::real_asset("smollm2-135m-instruct").is_none() {
        return;
    }
    for chat in [false, true] {
        let prompt = if chat {
            "What is the capital of France?"
        } else {
            "The capital of France is"
        };
        let mut texts = Vec::new();
        for quantized in [false, true] {
            let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
                .args([
                    "generate",
                    "smollm2-135m-instruct",
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    "12",
                ])
                .args(chat.then_some("--chat"))
                .args(quantized.then_some("--quantized"))
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout).to_string();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(
                out.contains("Paris"),
                "chat {chat}, quantized {quantized}: greedy continuation {out:?}"
            );
            texts.push(out);
        }
        assert_eq!(
            texts[0], texts[1],
            "chat {chat}: f32 and --quantized differ"
        );
    }
}
