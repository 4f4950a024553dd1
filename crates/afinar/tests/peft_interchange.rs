//! Adapters against the real PEFT: folders written by PEFT 0.21.2
//! (`scripts/reference/golden_peft.py`) load in afinar and reproduce PEFT's
//! logits (adapter on, off, merged); a fresh adapter leaves the base model's
//! outputs unchanged; afinar's written adapter reads back identically.

mod common;

use common::{fixtures, golden_inputs as inputs, max_abs as max_diff};

use afinar::adapters::{merged_state, peft, AdapterConfig, Ia3Config, Targeting, Targets};
use afinar::heads::{HeadConfig, Pooling, SequenceModel, TaskKind};
use afinar::hub::checkpoint::Checkpoint;
use afinar::models::load::{load_params, read_config};
use afinar::params::{ParamStore, Selector};
use candle_core::Tensor;
use std::path::Path;
use std::sync::atomic::Ordering;

/// The tiny base with the classifier of the bert-tiny golden file.
fn base_store(model_dir: &Path, classifier: (Tensor, Tensor)) -> ParamStore {
    let (cfg, _) = read_config(model_dir).unwrap();
    let mut store = load_params(model_dir, &cfg, Selector::none()).unwrap();
    store.insert("classifier.weight", classifier.0).unwrap();
    store.insert("classifier.bias", classifier.1).unwrap();
    store
}

fn build(
    model_dir: &Path,
    classifier: (Tensor, Tensor),
    ad: Option<&AdapterConfig>,
) -> (ParamStore, SequenceModel) {
    let (mut cfg, _) = read_config(model_dir).unwrap();
    cfg.set_dropout(Some(0.0), Some(0.0));
    let mut store = base_store(model_dir, classifier);
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Cls,
        num_labels: 2,
        dropout: 0.0,
    };
    let model = SequenceModel::new(&mut store, &cfg, &head, 0, ad, 0).unwrap();
    (store, model)
}

fn check_case(case: &str, model_dir: &Path, classifier: (Tensor, Tensor)) {
    let dir = fixtures().join("peft").join(case);
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let (cfg, _) = peft::read_config(&dir).unwrap();
    let (mut store, model) = build(model_dir, classifier.clone(), Some(&cfg));
    let n = peft::load_weights(&mut store, &dir).unwrap();
    assert!(n > 0);
    let x = inputs(&g);
    let d = max_diff(
        &model.forward(&x, None).unwrap(),
        &g.load_f32("logits").unwrap(),
    );
    assert!(d < 1e-4, "{case}: adapted logits differ from PEFT by {d}");
    // Disabled adapters give the base model. (PEFT's `disable_adapter` also
    // swaps `modules_to_save` back to the original classifier; afinar's
    // switch covers the adapters only, so compare against the base built
    // with the adapted classifier.)
    store.adapters_enabled.store(false, Ordering::Relaxed);
    let off = model.forward(&x, None).unwrap();
    store.adapters_enabled.store(true, Ordering::Relaxed);
    let cls = (
        store
            .iter()
            .find(|(n, _)| *n == "classifier.weight")
            .unwrap()
            .1
            .tensor
            .copy()
            .unwrap(),
        store
            .iter()
            .find(|(n, _)| *n == "classifier.bias")
            .unwrap()
            .1
            .tensor
            .copy()
            .unwrap(),
    );
    let (_, base) = build(model_dir, cls, None);
    let d = max_diff(&off, &base.forward(&x, None).unwrap());
    assert!(
        d < 1e-6,
        "{case}: disabled adapter differs from the base by {d}"
    );
    // Merge in place: the same outputs from the merged weights alone; unmerge
    // restores every base weight within 1e-6.
    let before: Vec<(String, Tensor)> = store
        .iter()
        .filter(|(_, p)| p.var.is_none())
        .map(|(n, p)| (n.clone(), p.tensor.copy().unwrap()))
        .collect();
    let adapted = model.forward(&x, None).unwrap();
    let cache = afinar::adapters::merge(&store).unwrap();
    let d = max_diff(&model.forward(&x, None).unwrap(), &adapted);
    assert!(d < 1e-4, "{case}: merged-in-place logits differ by {d}");
    assert!(
        afinar::adapters::merge(&store).is_err(),
        "double merge must fail"
    );
    afinar::adapters::unmerge(&store, &cache).unwrap();
    for (n, t) in &before {
        let now = &store.iter().find(|(k, _)| *k == n).unwrap().1.tensor;
        let d = max_diff(now, t);
        assert!(d <= 1e-6, "{case}: {n} after unmerge differs by {d}");
    }
    let d = max_diff(&model.forward(&x, None).unwrap(), &adapted);
    assert!(d < 1e-5, "{case}: after unmerge logits differ by {d}");

    // Merged: a plain model from the merged weights gives PEFT's merged logits.
    let merged = merged_state(&store).unwrap();
    let (cfgb, _) = read_config(model_dir).unwrap();
    let mut plain = ParamStore::new(Selector::none(), "merged");
    for (k, v) in merged {
        plain.insert(&k, v).unwrap();
    }
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Cls,
        num_labels: 2,
        dropout: 0.0,
    };
    let mut cfgb = cfgb;
    cfgb.set_dropout(Some(0.0), None);
    let pm = SequenceModel::new(&mut plain, &cfgb, &head, 0, None, 0).unwrap();
    let d = max_diff(
        &pm.forward(&x, None).unwrap(),
        &g.load_f32("merged_logits").unwrap(),
    );
    assert!(d < 1e-4, "{case}: merged logits differ from PEFT by {d}");

    // Written by afinar, read back by afinar: the same logits.
    let out = tempfile::tempdir().unwrap();
    peft::save(
        out.path(),
        &store,
        &cfg,
        "tests/fixtures/bert-tiny",
        "SEQ_CLS",
    )
    .unwrap();
    let (cfg2, _) = peft::read_config(out.path()).unwrap();
    let (mut store2, model2) = build(model_dir, classifier, Some(&cfg2));
    peft::load_weights(&mut store2, out.path()).unwrap();
    let d = max_diff(
        &model2.forward(&x, None).unwrap(),
        &g.load_f32("logits").unwrap(),
    );
    assert!(d < 1e-5, "{case}: afinar round trip differs by {d}");
}

fn tiny_classifier() -> (Tensor, Tensor) {
    let g = Checkpoint::open(fixtures().join("bert-tiny/golden.safetensors")).unwrap();
    (
        g.load_f32("classifier.weight").unwrap(),
        g.load_f32("classifier.bias").unwrap(),
    )
}

#[test]
fn peft_lora_tiny() {
    check_case(
        "lora-tiny",
        &fixtures().join("bert-tiny"),
        tiny_classifier(),
    );
}

#[test]
fn peft_lora_rslora_patterns_layers_tiny() {
    check_case(
        "lora-tiny-rslora-patterns",
        &fixtures().join("bert-tiny"),
        tiny_classifier(),
    );
}

#[test]
fn peft_dora_tiny() {
    check_case(
        "dora-tiny",
        &fixtures().join("bert-tiny"),
        tiny_classifier(),
    );
}

#[test]
fn peft_ia3_tiny() {
    check_case("ia3-tiny", &fixtures().join("bert-tiny"), tiny_classifier());
}

#[test]
fn fresh_adapters_leave_the_base_outputs_unchanged() {
    let g = Checkpoint::open(fixtures().join("bert-tiny/golden.safetensors")).unwrap();
    let x = inputs(&g);
    let (_, base) = build(&fixtures().join("bert-tiny"), tiny_classifier(), None);
    let want = base.forward(&x, None).unwrap();
    let lora = |dora: bool| {
        let mut c = AdapterConfig::lora(&[], 4, 8.0);
        if let AdapterConfig::Lora(l) = &mut c {
            l.targeting.target_modules = Targets::One("all-linear".into());
            l.use_dora = dora;
        }
        c
    };
    let ia3 = AdapterConfig::Ia3(Ia3Config {
        targeting: Targeting {
            target_modules: Targets::List(vec![
                "key".into(),
                "value".into(),
                "output.dense".into(),
            ]),
            ..Default::default()
        },
        feedforward_modules: vec!["output.dense".into()],
    });
    for ad in [lora(false), lora(true), ia3] {
        let (store, m) = build(&fixtures().join("bert-tiny"), tiny_classifier(), Some(&ad));
        let d = max_diff(&m.forward(&x, None).unwrap(), &want);
        assert!(
            d < 1e-6,
            "{:?} dora={}: step-0 output differs by {d}",
            ad.kind(),
            ad.uses_dora()
        );
        let (t, all) = store.counts();
        assert!(t < all / 4, "{t} of {all} trainable");
        // The base is frozen: only adapter weights and the classifier train.
        for (name, p) in store.iter() {
            let adapter = name.contains("lora_")
                || name.ends_with("ia3_l")
                || name.starts_with("classifier.");
            assert_eq!(p.var.is_some(), adapter, "{name}");
        }
    }
}

#[test]
fn unmatched_targets_and_bad_files_are_errors() {
    let ad = AdapterConfig::lora(&["query", "q_proj"], 4, 8.0);
    let dir = fixtures().join("bert-tiny");
    let (cfg, _) = read_config(&dir).unwrap();
    let mut store = base_store(&dir, tiny_classifier());
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Cls,
        num_labels: 2,
        dropout: 0.0,
    };
    let e = SequenceModel::new(&mut store, &cfg, &head, 0, Some(&ad), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("q_proj") && e.contains("attention.self.query"),
        "{e}"
    );
    // r = 0, alpha <= 0
    for (r, alpha) in [(0, 8.0), (4, 0.0)] {
        assert!(AdapterConfig::lora(&["query"], r, alpha)
            .validate()
            .is_err());
    }
    // An adapter folder without weights / config, and an adapter of another rank.
    let tmp = tempfile::tempdir().unwrap();
    let e = peft::read_config(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    let src = fixtures().join("peft/lora-tiny");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfgtext = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"r\": 4", "\"r\": 2");
    std::fs::write(tmp.path().join("adapter_config.json"), cfgtext).unwrap();
    let (c2, _) = peft::read_config(tmp.path()).unwrap();
    let (mut s2, _) = build(&dir, tiny_classifier(), Some(&c2));
    let e = peft::load_weights(&mut s2, tmp.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A") && e.contains("[4, 32]") && e.contains("[2, 32]"),
        "{e}"
    );
    let bad_type = std::fs::read_to_string(src.join("adapter_config.json"))
        .unwrap()
        .replace("\"LORA\"", "\"LOHA\"");
    std::fs::write(tmp.path().join("adapter_config.json"), bad_type).unwrap();
    let e = peft::read_config(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("LOHA"), "{e}");
}

/// Real all-MiniLM-L6-v2 + a PEFT LoRA (r=8, query/value) adapter (gated:
/// needs `afinar fetch`).
#[test]
fn peft_lora_real_minilm() {
    let Some(dir) = common::real_asset("all-minilm-l6-v2") else {
        return;
    };
    let g = Checkpoint::open(fixtures().join("peft/lora-minilm/golden.safetensors")).unwrap();
    let cls = (
        g.load_f32("base.classifier.weight").unwrap(),
        g.load_f32("base.classifier.bias").unwrap(),
    );
    check_case("lora-minilm", &dir, cls);
}
