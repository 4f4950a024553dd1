//! Reward models and DPO end to end on the tiny random checkpoints and the
//! pairs of `tests/fixtures/pairs-tiny` (scripts/make_pairs_tiny.py): every
//! DPO loss type from a fresh LoRA starts at its closed-form value and
//! falls; the three DPO references (adapters off, a frozen copy, log-probs
//! precomputed into the run folder) give the same run; reward models on the
//! three families save a `*ForSequenceClassification` with one label whose
//! scores `afinar score` and `afinar eval` report; `afinar pairs generate`
//! continues from its journal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn afinar(args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "afinar {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn config(dir: &Path, name: &str, model: &str, task: &str, pairs: &str, extra: &str) -> String {
    let f = fixtures();
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"{task}\"\n\
             [data]\ntrain = {:?}\nsplit = [0.7, 0.15, 0.15]\ngenerate_eval_rows = 2\n\
             [train]\nepochs = 3\nbatch_size = 8\nlr = 1e-2\neval_every = 5\nlog_every = 1\nthreads = 1\n{extra}\n",
            f.join(model),
            f.join("pairs-tiny").join(pairs)
        ),
    )
    .unwrap();
    p.display().to_string()
}

fn lines(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The losses logged for each step (the step's own line).
fn step_losses(run: &Path) -> Vec<f64> {
    lines(run)
        .iter()
        .filter(|v| v.get("lr").is_some())
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

const LORA: &str = "[adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n";

#[test]
fn dpo_losses_start_at_their_closed_form_and_fall() {
    let d = tempfile::tempdir().unwrap();
    for (kind, start) in [
        ("sigmoid", std::f64::consts::LN_2),
        ("hinge", 1.0),
        ("ipo", 25.0),
    ] {
        let cfg = config(
            d.path(),
            kind,
            "llama-tiny",
            "dpo",
            "chat.jsonl",
            &format!("{LORA}[dpo]\nbeta = 0.1\nloss_type = \"{kind}\"\n"),
        );
        let run = d.path().join(format!("run-{kind}"));
        afinar(&["train", &cfg, "--out", run.to_str().unwrap()]);
        let l = step_losses(&run);
        // Step 1's loss is computed before any update: the policy is its
        // reference (lora_B = 0).
        assert!(
            (l[0] - start).abs() < 1e-4,
            "{kind}: first loss {} vs {start}",
            l[0]
        );
        let tail: f64 = l[l.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(tail < l[0], "{kind}: loss did not fall: {l:?}");
        // TRL's metrics on every logged step.
        let train = lines(&run)
            .into_iter()
            .filter(|v| v["split"] == "train")
            .collect::<Vec<_>>();
        assert_eq!(
            train.len(),
            l.len(),
            "{kind}: one train metrics line per step"
        );
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            assert!(train[0][k].is_number(), "{kind}: {k} missing");
        }
        assert_eq!(
            train[0]["rewards/accuracies"], 0.0,
            "{kind}: no pair won at step 1"
        );
        let res: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
        for k in ["exact_match", "perplexity", "rewards/accuracies", "loss"] {
            assert!(res["test"][k].is_number(), "{kind}: test {k}: {res}");
        }
        assert!(run.join("adapter/adapter_config.json").is_file());
        assert!(run.join("model/model.safetensors").is_file());
    }
}

#[test]
fn dpo_references_agree() {
    // Full fine-tuning: a frozen copy of the model, or the reference
    // log-probabilities precomputed (no copy held): the same run, bit for bit.
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        "full",
        "gpt2-tiny",
        "dpo",
        "text.jsonl",
        "[dpo]\nbeta = 0.5\n",
    );
    let (copy, pre) = (d.path().join("copy"), d.path().join("pre"));
    afinar(&["train", &cfg, "--out", copy.to_str().unwrap()]);
    afinar(&[
        "train",
        &cfg,
        "--set",
        "dpo.precompute_ref_log_probs=true",
        "--out",
        pre.to_str().unwrap(),
    ]);
    assert!(pre.join("ref_logps.json").is_file());
    assert!(!copy.join("ref_logps.json").exists());
    let strip = |run: &Path| -> Vec<serde_json::Value> {
        lines(run)
            .into_iter()
            .map(|mut v| {
                let o = v.as_object_mut().unwrap();
                o.remove("elapsed_s");
                o.remove("tokens_per_s");
                v
            })
            .collect()
    };
    assert_eq!(strip(&copy), strip(&pre));
    // An adapter run: switching the adapter off, or precomputing, agree too.
    let cfg = config(d.path(), "lora", "llama-tiny", "dpo", "chat.jsonl", LORA);
    let (off, pre) = (d.path().join("off"), d.path().join("lora-pre"));
    afinar(&["train", &cfg, "--out", off.to_str().unwrap()]);
    afinar(&[
        "train",
        &cfg,
        "--set",
        "dpo.precompute_ref_log_probs=true",
        "--out",
        pre.to_str().unwrap(),
    ]);
    let (a, b) = (strip(&off), strip(&pre));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for (k, v) in x.as_object().unwrap() {
            let (p, q) = (v.as_f64(), y[k].as_f64());
            if let (Some(p), Some(q)) = (p, q) {
                assert!((p - q).abs() <= 1e-5 * p.abs().max(1.0), "{k}: {p} vs {q}");
            }
        }
    }
}

#[test]
fn reward_models_on_every_family() {
    let d = tempfile::tempdir().unwrap();
    for (name, model, pairs, extra, arch) in [
        (
            "llama-lora",
            "llama-tiny",
            "chat.jsonl",
            LORA,
            "LlamaForSequenceClassification",
        ),
        (
            "gpt2-full",
            "gpt2-tiny",
            "text.jsonl",
            "",
            "GPT2ForSequenceClassification",
        ),
        (
            "bert-full",
            "bert-tiny",
            "text.jsonl",
            "",
            "BertForSequenceClassification",
        ),
    ] {
        let cfg = config(
            d.path(),
            name,
            model,
            "reward",
            pairs,
            &format!("{extra}[reward]\ncenter_rewards_coefficient = 0.01\n"),
        );
        let run = d.path().join(name);
        afinar(&["train", &cfg, "--out", run.to_str().unwrap()]);
        let c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("model/config.json")).unwrap()).unwrap();
        assert_eq!(c["architectures"][0], arch, "{name}");
        assert_eq!(
            c["id2label"].as_object().unwrap().len(),
            1,
            "{name}: num_labels 1"
        );
        let res: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
        for k in [
            "accuracy",
            "margin",
            "reward_mean",
            "reward_min",
            "reward_max",
            "loss",
        ] {
            assert!(res["test"][k].is_number(), "{name}: test {k}: {res}");
        }
        // `afinar eval` of the run: its test split, the same numbers.
        let o = afinar(&["eval", run.to_str().unwrap()]);
        let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in ["accuracy", "loss", "margin"] {
            let (a, b) = (
                e["metrics"][k].as_f64().unwrap(),
                res["test"][k].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() < 1e-6,
                "{name}: eval {k} {a} vs train's test {b}"
            );
        }
        // `afinar score`: one reward per row; a pair's chosen and rejected
        // rows score as the pair accuracy says.
        let rows = d.path().join(format!("{name}-rows.jsonl"));
        let src = std::fs::read_to_string(fixtures().join("pairs-tiny").join(pairs)).unwrap();
        let mut out = String::new();
        for l in src.lines().take(6) {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["chosen", "rejected"] {
                out.push_str(
                    &serde_json::json!({"prompt": v["prompt"], "completion": v[k]}).to_string(),
                );
                out.push('\n');
            }
        }
        std::fs::write(&rows, out).unwrap();
        let o = afinar(&[
            "score",
            run.to_str().unwrap(),
            "--file",
            rows.to_str().unwrap(),
        ]);
        let scores: Vec<f64> = String::from_utf8(o.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(scores.len(), 12, "{name}");
        assert!(scores.iter().all(|s| s.is_finite()));
    }
}

#[test]
fn pairs_generate_continues_from_its_journal() {
    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("llama-tiny");
    let data = fixtures().join("sft-tiny/train.jsonl");
    let gen = |out: &Path| {
        let o = afinar(&[
            "pairs",
            "generate",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--max-rows-per-file",
            "12",
            "--max-new-tokens",
            "4",
            "--out",
            out.to_str().unwrap(),
        ]);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let a = d.path().join("a.jsonl");
    let ra = gen(&a);
    assert_eq!(ra["rows"], 12);
    assert!(
        !d.path().join("a.jsonl.partial.jsonl").exists(),
        "journal left behind"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&a)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len() as u64, ra["pairs"].as_u64().unwrap());
    // A journal from a stopped run: its answer is kept, the rest generated.
    let first = &rows[0];
    let b = d.path().join("b.jsonl");
    std::fs::write(
        d.path().join("b.jsonl.partial.jsonl"),
        format!(
            "{}\n",
            serde_json::json!({"task": first["task"], "line": first["source_line"], "answer": "zzz"})
        ),
    )
    .unwrap();
    let rb = gen(&b);
    assert_eq!(rb["resumed"], 1);
    let rows_b: Vec<serde_json::Value> = std::fs::read_to_string(&b)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows_b[0]["rejected"][0]["content"], "zzz");
    assert_eq!(rows_b[1..], rows[1..]);
}
