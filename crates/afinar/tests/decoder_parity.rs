//! Decoder parity with transformers + torch: tiny random Llama (GQA,
//! untied), Llama (tied, rope_theta 1e5) and GPT-2 checkpoints and their
//! golden logits, loss and parameter gradients, made by
//! `scripts/reference/golden_decoders.py`. Logits within 1e-4, gradients
//! within 1e-3 relative.

mod common;

use common::{assert_golden_grads, fixtures, i64s, rel_err};

use afinar::heads::CausalLm;
use afinar::hub::checkpoint::Checkpoint;
use afinar::models::load::{load_params, read_config};
use afinar::models::{check_unused, load_model, other_heads, Inputs, LoadOpts, ModelConfig};
use afinar::params::Selector;
use candle_core::Tensor;
use std::path::PathBuf;

fn check(case: &str) {
    let dir = fixtures().join(case);
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let (cfg, _) = read_config(&dir).unwrap();
    let mut store = load_params(&dir, &cfg, Selector::all()).unwrap();
    let model = CausalLm::build(&store, &cfg).unwrap();
    check_unused(&mut store, other_heads(cfg.family(), true), &mut |_| {}).unwrap();

    let (b, t) = g.load("input_ids").unwrap().dims2().unwrap();
    let ids: Vec<u32> = i64s(&g, "input_ids")
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mask: Vec<f32> = i64s(&g, "attention_mask")
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let labels = i64s(&g, "labels");
    let inp = Inputs::new(ids, mask, b, t).unwrap();

    let hidden = model.forward(&inp, None).unwrap();
    let logits = model.logits(&hidden).unwrap().reshape((b, t, ())).unwrap();
    let e = rel_err(&logits, &g.load_f32("logits").unwrap());
    assert!(e < 1e-4, "{case}: logits rel err {e}");

    let (loss, n) = model.lm_loss(&hidden, &labels).unwrap();
    let want = g.load_f32("loss").unwrap().to_vec1::<f32>().unwrap()[0];
    let got = loss.to_vec0::<f32>().unwrap();
    assert!(
        (got - want).abs() < 1e-4 * want.abs().max(1.0),
        "{case}: loss {got} vs {want}"
    );
    assert!(n > 0);

    loss.backward().unwrap();
    assert_golden_grads(&g, &store, case, 1e-3);
}

#[test]
fn llama_tiny_logits_loss_gradients() {
    check("llama-tiny");
}

#[test]
fn llama_tiny_tied_logits_loss_gradients() {
    check("llama-tiny-tied");
}

#[test]
fn gpt2_tiny_logits_loss_gradients() {
    check("gpt2-tiny");
}

/// Generation's path (prefill, then one token at a time through the KV
/// cache) gives the logits of the full forward pass at every position.
#[test]
fn kv_cache_steps_equal_the_full_forward() {
    use afinar::models::KvCache;
    for case in ["llama-tiny", "llama-tiny-tied", "gpt2-tiny"] {
        let dir = fixtures().join(case);
        let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
        let (cfg, _) = read_config(&dir).unwrap();
        let store = load_params(&dir, &cfg, Selector::none()).unwrap();
        let model = CausalLm::build(&store, &cfg).unwrap();
        let t = g.load("input_ids").unwrap().dim(1).unwrap();
        let row0: Vec<u32> = i64s(&g, "input_ids")[..t]
            .iter()
            .map(|&v| v as u32)
            .collect();
        let full = model
            .logits(
                &model
                    .forward(
                        &Inputs::new(row0.clone(), vec![1.0; t], 1, t).unwrap(),
                        None,
                    )
                    .unwrap(),
            )
            .unwrap();
        let mut cache = KvCache::new();
        let mut rows = vec![model
            .logits(
                &model
                    .body
                    .forward_cached(
                        &Tensor::from_slice(&row0[..5], (1, 5), &candle_core::Device::Cpu).unwrap(),
                        &mut cache,
                    )
                    .unwrap(),
            )
            .unwrap()];
        for &id in &row0[5..] {
            let h = model
                .body
                .forward_cached(
                    &Tensor::from_slice(&[id], (1, 1), &candle_core::Device::Cpu).unwrap(),
                    &mut cache,
                )
                .unwrap();
            rows.push(model.logits(&h).unwrap());
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        let e = rel_err(&stepped, &full);
        assert!(e < 1e-5, "{case}: cached vs full logits rel err {e}");
    }
}

/// A Llama exported to GGUF (F32 / F16 / Q8_0, Q/K rows permuted for
/// llama.cpp) loads back through afinar's GGUF reader (rows un-permuted)
/// with the golden logits, within each format's rounding.
#[test]
fn llama_gguf_export_reloads_with_the_same_logits() {
    use afinar::export::gguf::{write_llama_gguf, ExportType, TokenizerMeta};
    for case in ["llama-tiny", "llama-tiny-tied"] {
        let dir = fixtures().join(case);
        let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
        let src = load_model(&dir, Selector::none(), LoadOpts::default()).unwrap();
        let ModelConfig::Llama(cfg) = &src.cfg else {
            panic!("llama")
        };
        let tensors: std::collections::BTreeMap<String, Tensor> = src
            .store
            .iter()
            .map(|(n, p)| (n.clone(), p.tensor.clone()))
            .collect();
        let (b, t) = g.load("input_ids").unwrap().dims2().unwrap();
        let ids: Vec<u32> = i64s(&g, "input_ids")
            .into_iter()
            .map(|v| v as u32)
            .collect();
        let mask: Vec<f32> = i64s(&g, "attention_mask")
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let want = g.load_f32("logits").unwrap();
        for (ty, tol) in [
            (ExportType::F32, 1e-4),
            (ExportType::F16, 5e-3),
            (ExportType::Q8_0, 3e-2),
        ] {
            let out = tempfile::tempdir().unwrap();
            let path = out.path().join("m.gguf");
            let tok = &src.tokenizer;
            let meta = TokenizerMeta {
                tokenizer: tok.raw(),
                bos_id: tok.specials.as_ref().and_then(|s| s.bos_id),
                eos_id: tok.eos_ids().first().copied(),
                pad_id: Some(tok.pad_id()),
                chat_template: tok.chat_template(),
                pre: "gpt2",
            };
            write_llama_gguf(&path, case, cfg, &tensors, &meta, ty).unwrap();
            let back = load_model(&path, Selector::none(), LoadOpts::default()).unwrap();
            assert_eq!(
                back.tokenizer.chat_template(),
                src.tokenizer.chat_template(),
                "{case}"
            );
            let model = CausalLm::build(&back.store, &back.cfg).unwrap();
            let inp = Inputs::new(ids.clone(), mask.clone(), b, t).unwrap();
            let logits = model
                .logits(&model.forward(&inp, None).unwrap())
                .unwrap()
                .reshape((b, t, ()))
                .unwrap();
            let e = rel_err(&logits, &want);
            assert!(
                e < tol,
                "{case} {ty:?}: logits rel err {e} (tolerance {tol})"
            );
            eprintln!("{case} {ty:?}: logits rel err {e:.2e}");
        }
    }
}

/// Prompt tuning against PEFT: a PROMPT_TUNING adapter written by PEFT 0.21.2
/// (`scripts/reference/golden_prompt_tuning.py`) reproduces PEFT's logits;
/// afinar's own written adapter reads back identically, and with
/// `AFINAR_PT_OUT=dir` it is left there with afinar's logits for the
/// script's `--check` (PEFT loading afinar's adapter).
#[test]
fn prompt_tuning_matches_peft_both_ways() {
    use afinar::adapters::{peft, prompt_tuning, AdapterConfig, AdapterType, PromptTuningConfig};
    use afinar::models::load::load_lm_adapter;
    use afinar::nn::Weight;
    let base = fixtures().join("llama-tiny");
    let g = Checkpoint::open(base.join("golden.safetensors")).unwrap();
    let (b, t) = g.load("input_ids").unwrap().dims2().unwrap();
    let ids: Vec<u32> = i64s(&g, "input_ids")
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mask: Vec<f32> = i64s(&g, "attention_mask")
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let inp = Inputs::new(ids, mask, b, t).unwrap();

    // PEFT -> afinar.
    let dir = fixtures().join("peft/prompt-tiny");
    let a = load_lm_adapter(&dir, Some(&base), LoadOpts::default()).unwrap();
    assert_eq!(a.adapter.kind(), AdapterType::PromptTuning);
    let model = CausalLm::build(&a.model.store, &a.model.cfg).unwrap();
    let prompt = Weight::frozen(a.prompt.clone().unwrap());
    let logits = model
        .logits(&model.forward_prompted(Some(&prompt), &inp, None).unwrap())
        .unwrap()
        .reshape((b, t, ()))
        .unwrap();
    let want = Checkpoint::open(dir.join("golden.safetensors"))
        .unwrap()
        .load_f32("logits")
        .unwrap();
    let e = rel_err(&logits, &want);
    assert!(e < 1e-4, "PEFT prompt-tuning logits rel err {e}");

    // afinar -> file -> afinar (and PEFT, through the script).
    let keep = std::env::var("AFINAR_PT_OUT").ok().map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let out = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let mut src = load_model(&base, Selector::none(), LoadOpts::default()).unwrap();
    let v: Vec<f32> = (0..5 * 64)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.6)
        .collect();
    src.store
        .insert_trainable(
            prompt_tuning::KEY,
            Tensor::from_vec(v, (5, 64), &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap();
    let cfg = AdapterConfig::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: 5,
        prompt_tuning_init: Default::default(),
        prompt_tuning_init_text: None,
        token_dim: Some(64),
        num_layers: Some(2),
        num_attention_heads: Some(4),
    });
    peft::save(
        &out.join("adapter"),
        &src.store,
        &cfg,
        "tests/fixtures/llama-tiny",
        "CAUSAL_LM",
    )
    .unwrap();
    let model = CausalLm::build(&src.store, &src.cfg).unwrap();
    let w = src.store.get(prompt_tuning::KEY, &[5, 64]).unwrap();
    let mine = model
        .logits(&model.forward_prompted(Some(&w), &inp, None).unwrap())
        .unwrap()
        .reshape((b, t, ()))
        .unwrap();
    let back = load_lm_adapter(&out.join("adapter"), Some(&base), LoadOpts::default()).unwrap();
    let m2 = CausalLm::build(&back.model.store, &back.model.cfg).unwrap();
    let again = m2
        .logits(
            &m2.forward_prompted(Some(&Weight::frozen(back.prompt.unwrap())), &inp, None)
                .unwrap(),
        )
        .unwrap()
        .reshape((b, t, ()))
        .unwrap();
    assert!(rel_err(&again, &mine) < 1e-6);
    if keep.is_some() {
        let m = mine.contiguous().unwrap();
        afinar::export::write_safetensors(
            &out.join("afinar_logits.safetensors"),
            std::iter::once(("logits".to_string(), m)),
        )
        .unwrap();
    }
}
