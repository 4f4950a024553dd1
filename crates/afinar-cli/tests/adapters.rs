//! Adapter runs end to end on the tiny fixture: train LoRA / DoRA / IA3,
//! predict from the run (base + adapter, unmerged) and from the merged
//! export with the same outputs, export the PEFT folder, and bad adapter
//! configs fail before any weight loads.

mod common;

use common::train_out;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny")
}

fn config(dir: &Path, adapter: &str) -> PathBuf {
    let f = fixtures();
    let p = dir.join("run.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [train]\nepochs = 10\nbatch_size = 8\nlr = 5e-3\neval_every = 10\nthreads = 1\n[adapter]\n{adapter}\n",
            f,
            f.join("train.jsonl")
        ),
    )
    .unwrap();
    p
}

fn afinar(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap()
}

fn logits(out: &std::process::Output) -> Vec<Vec<f64>> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn adapter_runs_predict_the_same_unmerged_and_merged() {
    for (name, adapter) in [
        ("lora", "type = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"query\", \"value\"]"),
        ("dora", "type = \"lora\"\nuse_dora = true\nr = 4\nlora_alpha = 8\ntarget_modules = [\"query\", \"value\"]"),
        ("ia3", "type = \"ia3\"\ntarget_modules = [\"key\", \"value\", \"output.dense\"]\nfeedforward_modules = [\"output.dense\"]"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), adapter);
        let run = d.path().join("run");
        let o = train_out(&cfg, &run, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {err}");
        assert!(err.contains("trainable%"), "{name}: no trainable line");
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            assert!(run.join("adapter").join(f).is_file(), "{name}: adapter/{f}");
        }
        let merged = d.path().join("merged");
        let ad = d.path().join("ad");
        let o = afinar(&["export".as_ref(), run.as_os_str(), "--merged".as_ref(), merged.as_os_str(), "--adapter".as_ref(), ad.as_os_str()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let file = fixtures().join("train.jsonl");
        let a = logits(&afinar(&["predict".as_ref(), run.as_os_str(), "--file".as_ref(), file.as_os_str()]));
        let b = logits(&afinar(&["predict".as_ref(), merged.as_os_str(), "--file".as_ref(), file.as_os_str()]));
        let c = logits(&afinar(&["predict".as_ref(), ad.as_os_str(), "--file".as_ref(), file.as_os_str()]));
        assert_eq!(a.len(), 60);
        for ((x, y), z) in a.iter().zip(&b).zip(&c) {
            for ((p, q), r) in x.iter().zip(y).zip(z) {
                assert!((p - q).abs() < 1e-4, "{name}: unmerged {p} vs merged {q}");
                assert_eq!(p, r, "{name}: exported adapter folder differs");
            }
        }
        // Training moved the adapter away from its identity init
        // (LoRA B = 0, IA3 l = 1).
        let ck = afinar::hub::checkpoint::Checkpoint::open(run.join("adapter/adapter_model.safetensors")).unwrap();
        let moved = ck.names().iter().any(|k| {
            let v = ck.load_f32(k).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k.contains("lora_B") && v.iter().any(|x| *x != 0.0)) || (k.ends_with("ia3_l") && v.iter().any(|x| *x != 1.0))
        });
        assert!(moved, "{name}: adapter still at its init");
    }
}

#[test]
fn bad_adapter_configs_fail_naming_the_problem() {
    for (adapter, want) in [
        (
            "type = \"lora\"\nr = 0\ntarget_modules = [\"query\"]",
            "`r` must be > 0",
        ),
        (
            "type = \"lora\"\nlora_alpha = -1.0\ntarget_modules = [\"query\"]",
            "lora_alpha",
        ),
        (
            "type = \"lora\"\ntarget_modules = [\"query\", \"q_proj\"]",
            "q_proj",
        ),
        (
            "type = \"ia3\"\ntarget_modules = [\"key\"]\nfeedforward_modules = [\"output.dense\"]",
            "subset",
        ),
        (
            "type = \"ia3\"\nuse_dora = true\ntarget_modules = [\"key\"]",
            "use_dora",
        ),
        ("type = \"loha\"\ntarget_modules = [\"query\"]", "loha"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path(), adapter);
        let run = d.path().join("run");
        let o = train_out(&cfg, &run, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(want),
            "{adapter}: {err}"
        );
        assert!(!run.join("adapter").exists() && !run.join("model").exists());
    }
    let d = tempfile::tempdir().unwrap();
    let o = afinar(&[
        "export".as_ref(),
        d.path().as_os_str(),
        "--merged".as_ref(),
        d.path().join("x").as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(1) && err.contains("not a run folder or model folder"),
        "{err}"
    );
    assert!(!d.path().join("x").exists());
}

/// An adapter folder written by Python PEFT (no afinar notes beside it):
/// `predict --base` reproduces PEFT's logits, for LoRA, DoRA and IA3.
#[test]
fn predict_from_a_peft_made_adapter_folder() {
    let peft = fixtures().join("../peft");
    let d = tempfile::tempdir().unwrap();
    let rows = d.path().join("rows.jsonl");
    std::fs::write(
        &rows,
        "{\"text\": \"the movie was really good\"}\n\
         {\"text\": \"i think the food was awful , we will never eat there again\"}\n\
         {\"text\": \"the show was great\", \"text_pair\": \"we liked it\"}\n",
    )
    .unwrap();
    for case in ["lora-tiny", "dora-tiny", "ia3-tiny"] {
        let dir = peft.join(case);
        let g = safetensors::SafeTensors::deserialize(Box::leak(
            std::fs::read(dir.join("golden.safetensors"))
                .unwrap()
                .into_boxed_slice(),
        ))
        .unwrap();
        let t = g.tensor("logits").unwrap();
        let want: Vec<f32> = t
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got = logits(&afinar(&[
            "predict".as_ref(),
            dir.as_os_str(),
            "--base".as_ref(),
            fixtures().as_os_str(),
            "--labels".as_ref(),
            "neg,pos".as_ref(),
            "--file".as_ref(),
            rows.as_os_str(),
        ]));
        let got: Vec<f64> = got.into_iter().flatten().collect();
        assert_eq!(got.len(), want.len(), "{case}");
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - *b as f64).abs() < 1e-4,
                "{case}: {got:?} vs PEFT {want:?}"
            );
        }
    }
    // Without --base, the adapter's base_model_name_or_path (a relative path
    // that does not exist from here) is named in the error.
    let o = afinar(&[
        "predict".as_ref(),
        peft.join("lora-tiny").as_os_str(),
        "--text".as_ref(),
        "x".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--base") && err.contains("tests/fixtures/bert-tiny"),
        "{err}"
    );
    // --labels must name one class per classifier row.
    let o = afinar(&[
        "predict".as_ref(),
        peft.join("lora-tiny").as_os_str(),
        "--base".as_ref(),
        fixtures().as_os_str(),
        "--labels".as_ref(),
        "a,b,c".as_ref(),
        "--text".as_ref(),
        "x".as_ref(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("3 names") && err.contains("2 rows"),
        "{err}"
    );
}
