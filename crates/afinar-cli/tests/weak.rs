//! Weak supervision from the command line (issue 16): `afinar weak
//! analyse` on rules written for the tiny sentiment rows, and a COSINE run
//! (stage 1 on the rules' labels, stage 2 self-training) end to end on the
//! tiny BERT, with what it leaves in its run folder.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Rules for the tiny rows: `good`/`great` vote pos, `bad`/`awful` neg;
/// `never` votes neg too (right on "never again" rows, wrong on others).
fn rules(d: &Path) -> PathBuf {
    write(
        d,
        "rules.toml",
        r#"
[[rule]]
name = "praise"
kind = "keywords"
words = ["good", "great"]
label = "pos"

[[rule]]
name = "blame"
kind = "keywords"
words = ["bad", "awful"]
label = "neg"
weight = 2.0

[[rule]]
name = "never"
kind = "regex"
pattern = "(?i)\\bnever\\b"
label = "neg"
"#,
    )
}

fn config(d: &Path, extra: &str) -> PathBuf {
    rules(d);
    let f = fixture();
    write(
        d,
        "weak.toml",
        &format!(
            "[model]\npath = {:?}\nmax_length = 32\n[task]\nweak = \"cosine\"\n\
             [data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [weak]\nrules = [\"rules.toml\"]\nsteps = 12\nteacher_update = 5\nthreshold = 0.0\n\
             [train]\nepochs = 2\nbatch_size = 8\nlr = 1e-3\neval_every = 4\nlog_every = 2\nthreads = 1\n{extra}",
            f,
            f.join("train.jsonl"),
        ),
    )
}

/// `afinar train CFG [--set S]... --out <d>/run`: the run folder and what it printed.
fn train(d: &Path, cfg: &Path, sets: &[&str]) -> (PathBuf, Out) {
    let run = d.join("run");
    let mut args = vec!["train".to_string(), cfg.display().to_string()];
    for s in sets {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args.push("--out".into());
    args.push(run.display().to_string());
    (run, afinar_p(d, &args))
}

#[test]
fn analyse_prints_and_saves_the_rules_numbers() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let out_dir = d.path().join("analysis");
    let o = afinar_p(
        d.path(),
        &[
            "weak".into(),
            "analyse".into(),
            cfg.display().to_string(),
            "--out".into(),
            out_dir.display().to_string(),
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    let text = o.stdout.clone();
    for needle in [
        "3 rules",
        "validation",
        "praise",
        "blame",
        "never",
        "coverage",
        "conflicts",
    ] {
        assert!(text.contains(needle), "`{needle}` not in:\n{text}");
    }
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("analysis.json")).unwrap()).unwrap();
    assert_eq!(a["labels"], serde_json::json!(["neg", "pos"]));
    let splits = a["splits"].as_array().unwrap();
    assert_eq!(splits.len(), 3); // train, validation, test
    let val = &splits[1];
    assert_eq!(val["split"], "validation");
    // Every rule of these rows is mostly right, and the vote is too.
    for r in val["rules"].as_array().unwrap() {
        let acc = r["accuracy"].as_f64().unwrap();
        assert!(acc > 0.5, "{r}");
    }
    assert!(
        val["vote"]["accuracy_covered"].as_f64().unwrap() > 0.8,
        "{val}"
    );
    assert!(out_dir.join("analysis.txt").is_file());
}

#[test]
fn a_cosine_run_trains_both_stages() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "[seeds]\ninit = 3\n");
    let (run, o) = train(d.path(), &cfg, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // Stage 1 is a run folder of its own, finished, with its test numbers.
    let r1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("stage1/results.json")).unwrap()).unwrap();
    assert!(r1["test"]["accuracy"].is_number(), "{r1}");
    // Stage 2: 12 steps, teachers at steps 0, 5, 10 (saved), the stage-1
    // test copied into the log, self-training metrics logged.
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["steps"], 12, "{res}");
    for k in 0..3 {
        let f = run.join(format!("teacher/period-{k}.json"));
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        assert_eq!(t["step"], 5 * k);
        let probs = t["probs"].as_array().unwrap();
        assert_eq!(probs.len(), 36); // every training row, covered or not
        let p: Vec<f64> = probs[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{p:?}");
    }
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["split"], "test_stage1");
    assert_eq!(lines[0]["accuracy"], r1["test"]["accuracy"]);
    // Stage 2 starts from stage 1's best weights: its first validation is
    // stage 1's best.
    assert_eq!(lines[1]["split"], "validation");
    assert_eq!(lines[1]["step"], 0);
    assert_eq!(lines[1]["accuracy"], r1["best_validation"]["accuracy"]);
    let train: Vec<&serde_json::Value> = lines.iter().filter(|l| l["split"] == "train").collect();
    assert!(!train.is_empty());
    for t in &train {
        for k in ["distill", "confidence_reg", "contrastive_reg", "kept_share"] {
            assert!(t[k].as_f64().is_some_and(f64::is_finite), "{k}: {t}");
        }
    }
    assert!(lines.iter().any(|l| l["split"] == "test"));
    assert!(run.join("model/model.safetensors").is_file());
    assert!(run.join("weak/analysis.json").is_file());
    assert!(o.stderr.contains("teacher at step 5"), "{}", o.stderr);
}

#[test]
fn stage1_only_runs_in_the_run_folder() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), "");
    let (run, o) = train(d.path(), &cfg, &["task.weak=\"stage1\""]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(run.join("results.json").is_file());
    assert!(!run.join("stage1").exists() && !run.join("teacher").exists());
    // The rules label the rows with a rule word: fewer than the 36 training rows.
    assert!(o.stderr.contains("labelled by the rules"), "{}", o.stderr);
}

/// Any body and head of the house: COSINE on a Llama decoder (its
/// sequence head reads the last token) with a LoRA adapter; the adapter
/// and the merged model are saved from stage 2's best weights.
#[test]
fn cosine_on_a_decoder_with_lora() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(
        d.path(),
        "[adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
    );
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{:?}", fixture()),
        &format!("{:?}", fixture().join("../llama-tiny")),
    );
    std::fs::write(&cfg, text).unwrap();
    let (run, o) = train(d.path(), &cfg, &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("adapter: Lora"), "{}", o.stderr);
    for f in [
        "adapter/adapter_model.safetensors",
        "model/model.safetensors",
        "stage1/adapter/adapter_config.json",
    ] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let res: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(res["steps"], 12, "{res}");
}
