//! Sequence classification on decoder bodies against transformers: tiny
//! random `LlamaForSequenceClassification` (classification and regression)
//! and `GPT2ForSequenceClassification` checkpoints with their golden
//! logits, loss and the gradient of every parameter
//! (`scripts/reference/golden_seqcls.py`): logits within 1e-4, gradients
//! within 1e-3 relative. A LoRA adapter written by PEFT for SEQ_CLS (q, v,
//! `score` in `modules_to_save`) gives PEFT's logits on, off and merged.
//! The real SmolLM2-135M-Instruct (GGUF) with a fixed `score` gives the
//! logits transformers computes from the same file, within 1e-4.

mod common;

use common::{assert_golden_grads, fixtures, golden_inputs as inputs, max_abs};

use afinar::heads::{HeadConfig, Pooling, SequenceModel, Targets, TaskKind};
use afinar::hub::checkpoint::Checkpoint;
use afinar::models::load::{load_params, read_config};
use afinar::models::{check_unused, other_heads};
use afinar::params::Selector;
use candle_core::Tensor;

/// Logits, loss and every gradient of a tiny decoder classifier / regressor
/// trained fully (every parameter trainable, eval mode: no dropout).
fn check(case: &str, task: TaskKind) {
    let dir = fixtures().join(case);
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let (cfg, raw) = read_config(&dir).unwrap();
    let pad = raw["pad_token_id"].as_u64().expect("pad_token_id") as u32;
    let mut store = load_params(&dir, &cfg, Selector::all()).unwrap();
    let num_labels = raw["id2label"].as_object().unwrap().len();
    let head = HeadConfig {
        task,
        pooling: Pooling::default_for(cfg.family()),
        num_labels,
        dropout: 0.0,
    };
    assert_eq!(head.pooling, Pooling::Last);
    let model = SequenceModel::new(&mut store, &cfg, &head, 0, None, pad).unwrap();
    check_unused(&mut store, other_heads(cfg.family(), false), &mut |_| {}).unwrap();
    let x = inputs(&g);
    let logits = model.forward(&x, None).unwrap();
    let e = max_abs(&logits, &g.load_f32("logits").unwrap());
    assert!(e < 1e-4, "{case}: logits differ by {e}");
    let targets = match task {
        TaskKind::Classification => Targets::Classes(
            g.load("labels")
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|v| v as u32)
                .collect(),
        ),
        TaskKind::Regression => Targets::Values(g.load_f32("labels").unwrap().to_vec1().unwrap()),
        TaskKind::Scalar => unreachable!("no scalar goldens"),
    };
    let loss = model.loss(&logits, &targets).unwrap();
    let want = g.load_f32("loss").unwrap().to_vec1::<f32>().unwrap()[0];
    let got = loss.to_vec0::<f32>().unwrap();
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{case}: loss {got} vs {want}"
    );
    loss.backward().unwrap();
    assert_golden_grads(&g, &store, case, 1e-3);
}

#[test]
fn llama_seqcls_logits_loss_gradients_match_transformers() {
    check("llama-tiny-seqcls", TaskKind::Classification);
}

#[test]
fn llama_regression_logits_loss_gradients_match_transformers() {
    check("llama-tiny-seqreg", TaskKind::Regression);
}

#[test]
fn gpt2_seqcls_logits_loss_gradients_match_transformers() {
    check("gpt2-tiny-seqcls", TaskKind::Classification);
}

/// The pooled token is the rightmost one that is not the pad id, as
/// transformers picks it (by id, not by the attention mask).
#[test]
fn last_token_pooling_follows_the_pad_id() {
    let ids = Tensor::new(
        &[[5u32, 6, 7, 0], [5, 0, 7, 0], [0, 0, 0, 0]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(afinar::heads::last_tokens(&ids, 0).unwrap(), vec![2, 2, 0]);
    let g = Checkpoint::open(fixtures().join("llama-tiny-seqcls/golden.safetensors")).unwrap();
    let x = inputs(&g);
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-tiny-seqcls/golden.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<usize> = golden["pooled_index"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(afinar::heads::last_tokens(&x.ids, 0).unwrap(), want);
}

/// PEFT's own SEQ_CLS LoRA adapter on the tiny Llama classifier, read by
/// afinar's `predict` path (`runs::load_run_with`): the logits with the
/// adapter, without it, and merged, as PEFT computed them.
#[test]
fn peft_llama_seqcls_lora_loads_with_pefts_logits() {
    use afinar::runs::{load_run_with, LoadOptions};
    let dir = fixtures().join("peft/lora-llama-seqcls");
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let base = fixtures().join("llama-tiny-seqcls");
    let rm = load_run_with(
        &dir,
        &LoadOptions {
            base: Some(base.display().to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        rm.labels.as_ref().unwrap().id2label(),
        &["neg".to_string(), "neu".into(), "pos".into()],
        "labels from the base's id2label"
    );
    let x = inputs(&g);
    let on = rm.model.forward(&x, None).unwrap();
    let e = max_abs(&on, &g.load_f32("logits").unwrap());
    assert!(e < 1e-4, "adapter logits differ from PEFT's by {e}");
    rm.store
        .adapters_enabled
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The base's own score (PEFT's modules_to_save keeps it beside the copy):
    // afinar trains the head in place, so "off" here is base + trained head.
    let off = rm.model.forward(&x, None).unwrap();
    rm.store
        .adapters_enabled
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // The same: the base body with the adapter's trained score, built alone.
    let (cfg, _) = read_config(&base).unwrap();
    let mut bs = load_params(&base, &cfg, Selector::none()).unwrap();
    let saved = Checkpoint::open(dir.join("adapter_model.safetensors")).unwrap();
    bs.insert(
        "score.weight",
        saved.load_f32("base_model.model.score.weight").unwrap(),
    )
    .unwrap();
    let bm = SequenceModel::new(&mut bs, &cfg, &rm.model.head, 0, None, 0).unwrap();
    let e = max_abs(&off, &bm.forward(&x, None).unwrap());
    assert!(e < 1e-6, "adapter off is not the base body: {e}");
    assert!(
        max_abs(&off, &on) > 1e-3,
        "disabling the adapter changes nothing"
    );
    // Merged: a plain model from the merged weights gives PEFT's merged logits.
    let merged = afinar::export::model_tensors(&rm.store).unwrap();
    let mut plain = afinar::params::ParamStore::new(Selector::none(), "merged");
    for (k, v) in merged {
        plain.insert(&k, v).unwrap();
    }
    let pm = SequenceModel::new(&mut plain, &rm.cfg, &rm.model.head, 0, None, 0).unwrap();
    let e = max_abs(
        &pm.forward(&x, None).unwrap(),
        &g.load_f32("merged_logits").unwrap(),
    );
    assert!(e < 1e-4, "merged logits differ from PEFT's by {e}");
}

/// The real SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) with a fixed
/// `score`: afinar's tokens and logits equal transformers' on four sarcasm
/// headlines (gated: needs `afinar fetch`; under CI a missing asset fails).
#[test]
fn smollm2_real_seqcls_logits_match_transformers() {
    use afinar::models::{load_model, LoadOpts};
    let Some(path) = common::real_asset("smollm2-135m-instruct") else {
        return;
    };
    let fx = fixtures().join("smollm2");
    let g = Checkpoint::open(fx.join("seqcls_reference.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("seqcls_reference.json")).unwrap())
            .unwrap();
    let mut m = load_model(&path, Selector::none(), LoadOpts::default()).unwrap();
    let pad = meta["pad_token_id"].as_u64().unwrap() as u32;
    assert_eq!(m.tokenizer.pad_id(), pad, "pad id as transformers reads it");
    // Tokens: the same ids as transformers' tokenizer from the same file.
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let enc = m.tokenizer.encode_batch(&texts, None).unwrap();
    for (i, (ids, _)) in enc.iter().enumerate() {
        let want: Vec<u32> = meta["ids"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, &want, "row {i}: {}", texts[i]);
    }
    m.store
        .insert("score.weight", g.load_f32("score.weight").unwrap())
        .unwrap();
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Last,
        num_labels: 2,
        dropout: 0.0,
    };
    let model = SequenceModel::new(&mut m.store, &m.cfg, &head, 0, None, pad).unwrap();
    let x = inputs(&g);
    let logits = model.forward(&x, None).unwrap();
    let e = max_abs(&logits, &g.load_f32("logits").unwrap());
    eprintln!("SmolLM2 sequence-classification logits: max abs diff {e:.2e}");
    assert!(e < 1e-4, "logits differ from transformers' by {e}");
}
