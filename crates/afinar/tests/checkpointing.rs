//! Activation checkpointing changes memory, not results: with dropout on, a
//! training forward + backward with `gradient_checkpointing` gives the loss
//! and the gradient of every trainable tensor of the run without it (the
//! recomputation replays the same dropout masks). Full fine-tuning and LoRA,
//! on the tiny BERT, Llama and GPT-2 fixtures.

mod common;

use common::{fixtures, rel_err_floor};

use afinar::adapters::{linear_modules, AdapterConfig};
use afinar::heads::{CausalLm, HeadConfig, Pooling, SequenceModel, TaskKind};
use afinar::models::load::{load_params, read_config};
use afinar::models::Inputs;
use afinar::nn::DropoutRng;
use afinar::params::{ParamStore, Selector};
use candle_core::{DType, Tensor};
use rand::SeedableRng;

fn lora(store: &mut ParamStore, targets: &[&str], keep: &[&str]) {
    let mut cfg = AdapterConfig::lora(targets, 4, 8.0);
    if let AdapterConfig::Lora(l) = &mut cfg {
        l.lora_dropout = 0.1;
    }
    let linears = linear_modules(store);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    cfg.apply(store, &linears, keep, &mut rng).unwrap();
}

/// (loss, every trainable gradient by name) of one training step.
fn compare(what: &str, run: &dyn Fn(bool) -> (f32, Vec<(String, Tensor)>)) {
    let (l0, g0) = run(false);
    let (l1, g1) = run(true);
    assert!(
        (l0 - l1).abs() <= 1e-6 * l0.abs().max(1.0),
        "{what}: loss {l0} vs {l1} with checkpointing"
    );
    assert_eq!(g0.len(), g1.len());
    assert!(!g0.is_empty());
    for ((n, a), (_, b)) in g0.iter().zip(&g1) {
        let e = rel_err_floor(b, a, 1e-6);
        assert!(
            e < 1e-5,
            "{what}: gradient of {n} differs with checkpointing (rel {e})"
        );
    }
}

fn grads(store: &ParamStore) -> Vec<(String, Tensor)> {
    store
        .trainable()
        .into_iter()
        .map(|(n, w)| {
            let g = w
                .grad_tensor()
                .unwrap()
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (n, g)
        })
        .collect()
}

fn decoder_step(case: &str, adapter: bool, ckpt: bool) -> (f32, Vec<(String, Tensor)>) {
    let dir = fixtures().join(case);
    let (mut cfg, _) = read_config(&dir).unwrap();
    cfg.set_dropout(Some(0.1), Some(0.1));
    let sel = if adapter {
        Selector::none()
    } else {
        Selector::all()
    };
    let mut store = load_params(&dir, &cfg, sel).unwrap();
    if adapter {
        let t: &[&str] = if case.starts_with("gpt2") {
            &["c_attn", "c_fc"]
        } else {
            &["q_proj", "v_proj", "down_proj"]
        };
        lora(&mut store, t, &["lm_head"]);
    }
    let mut model = CausalLm::build(&store, &cfg).unwrap();
    model.set_gradient_checkpointing(ckpt);
    let (b, t) = (2, 9);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| ((i * 7 + 3) % cfg.vocab_size()) as u32)
        .collect();
    let mut mask = vec![1.0f32; b * t];
    mask[b * t - 2..].fill(0.0);
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let inp = Inputs::new(ids, mask, b, t).unwrap();
    let rng = DropoutRng::new(11, 3);
    let h = model.forward(&inp, Some(&rng)).unwrap();
    let (loss, _) = model.lm_loss(&h, &labels).unwrap();
    loss.backward().unwrap();
    (loss.to_vec0::<f32>().unwrap(), grads(&store))
}

#[test]
fn decoders_same_loss_and_gradients_with_checkpointing() {
    for case in ["llama-tiny", "gpt2-tiny"] {
        for adapter in [false, true] {
            let what = format!("{case} {}", if adapter { "LoRA" } else { "full" });
            compare(&what, &|ck| decoder_step(case, adapter, ck));
        }
    }
}

fn bert_step(adapter: bool, ckpt: bool) -> (f32, Vec<(String, Tensor)>) {
    let dir = fixtures().join("bert-tiny");
    let (mut cfg, _) = read_config(&dir).unwrap();
    cfg.set_dropout(Some(0.1), Some(0.1));
    let sel = if adapter {
        Selector::none()
    } else {
        Selector::all()
    };
    let mut store = load_params(&dir, &cfg, sel).unwrap();
    if adapter {
        lora(&mut store, &["query", "value"], &["classifier"]);
    }
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Cls,
        num_labels: 3,
        dropout: 0.1,
    };
    let mut model = SequenceModel::new(&mut store, &cfg, &head, 0, None, 0).unwrap();
    model.set_gradient_checkpointing(ckpt);
    let (b, t) = (2, 6);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 5 % 90 + 1) as u32).collect();
    let mut mask = vec![1.0f32; b * t];
    mask[b * t - 2..].fill(0.0);
    let x = Inputs::new(ids, mask, b, t).unwrap();
    let rng = DropoutRng::new(5, 1);
    let logits = model.forward(&x, Some(&rng)).unwrap();
    let labels = afinar::heads::Targets::Classes(vec![0, 2]);
    let loss = model.loss(&logits, &labels).unwrap();
    loss.backward().unwrap();
    (
        loss.to_dtype(DType::F32).unwrap().to_vec0::<f32>().unwrap(),
        grads(&store),
    )
}

#[test]
fn bert_same_loss_and_gradients_with_checkpointing() {
    compare("bert-tiny full", &|ck| bert_step(false, ck));
    compare("bert-tiny LoRA", &|ck| bert_step(true, ck));
}
