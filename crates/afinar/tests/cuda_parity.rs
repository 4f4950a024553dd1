//! CPU and CUDA give the same results (feature `cuda`, needs a GPU; run on
//! the lent GPU machine, see docs/cuda.md):
//! - every op, forward and backward (input and weight gradients), on random
//!   inputs with padding, packing segments, GQA, ignored targets and dropout;
//! - the decoder parity fixtures (transformers' golden logits, loss and the
//!   gradient of every parameter) through the CUDA path, f32, with the CPU's
//!   tolerances; in bf16 the loss within 2% and the gradients' direction;
//! - AdamW's fused update;
//! - LoRA SFT on llama-tiny: the same loss curve on both devices.
#![cfg(feature = "cuda")]

mod common;

use common::{fixtures, golden_grads, rel_err};

use afinar::heads::CausalLm;
use afinar::hub::checkpoint::Checkpoint;
use afinar::models::gpt2::is_conv1d;
use afinar::models::load::{load_params, read_config};
use afinar::models::Inputs;
use afinar::nn::{self, RopeTable, Weight};
use afinar::optim::{AdamW, AdamWConfig};
use afinar::params::Selector;
use candle_core::{DType, Device, Tensor, Var};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn gpu() -> Device {
    Device::new_cuda(0).expect("cuda_parity needs a CUDA device")
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (afinar::nn::dropout::uniform(seed, i as u64) - 0.5) * 2.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// cos(a, b) of two flattened tensors.
fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    (dot / (na * nb).max(1e-30)) as f32
}

/// Run `f` on `inputs` (made Vars on `dev`) and `weights` (trainable on
/// `dev`); loss = sum(out * r). Returns out, the input grads, the weight grads.
fn run_op(
    dev: &Device,
    inputs: &[Tensor],
    weights: &[Tensor],
    f: &dyn Fn(&[Tensor], &[Weight]) -> Tensor,
) -> (Tensor, Vec<Tensor>, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let ws: Vec<Weight> = weights
        .iter()
        .map(|w| Weight::trainable(&w.to_device(dev).unwrap()).unwrap())
        .collect();
    let out = f(&xs, &ws);
    let r = randn(out.dims(), 99).to_device(dev).unwrap();
    let loss = (out.to_dtype(DType::F32).unwrap() * r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gx = xs
        .iter()
        .map(|x| {
            grads
                .get(x)
                .cloned()
                .unwrap_or_else(|| x.zeros_like().unwrap())
        })
        .collect();
    let gw = ws
        .iter()
        .map(|w| w.grad_tensor().unwrap().expect("a weight gradient"))
        .collect();
    (out, gx, gw)
}

fn same_on_both(
    name: &str,
    inputs: &[Tensor],
    weights: &[Tensor],
    tol: f32,
    f: &dyn Fn(&[Tensor], &[Weight]) -> Tensor,
) {
    let (oc, gxc, gwc) = run_op(&Device::Cpu, inputs, weights, f);
    let (og, gxg, gwg) = run_op(&gpu(), inputs, weights, f);
    let e = rel_err(&og, &oc);
    assert!(e < tol, "{name}: output rel err {e}");
    for (i, (a, b)) in gxg.iter().zip(&gxc).enumerate() {
        let e = rel_err(a, b);
        assert!(e < tol, "{name}: input {i} gradient rel err {e}");
    }
    for (i, (a, b)) in gwg.iter().zip(&gwc).enumerate() {
        let e = rel_err(a, b);
        assert!(e < tol, "{name}: weight {i} gradient rel err {e}");
    }
    eprintln!("{name}: CPU and CUDA agree (tolerance {tol})");
}

#[test]
fn ops_match_the_cpu() {
    let (b, t, h, kv, d) = (2usize, 7usize, 4usize, 2usize, 8usize);
    same_on_both(
        "linear+bias",
        &[randn(&[b, t, 16], 1)],
        &[randn(&[24, 16], 2), randn(&[24], 3)],
        1e-5,
        &|x, w| nn::linear(&x[0], &w[0], Some(&w[1])).unwrap(),
    );
    same_on_both(
        "rms_norm",
        &[randn(&[b, t, 16], 4)],
        &[randn(&[16], 5)],
        1e-5,
        &|x, w| nn::rms_norm(&x[0], &w[0], 1e-6).unwrap(),
    );
    same_on_both(
        "layer_norm",
        &[randn(&[b, t, 16], 6)],
        &[randn(&[16], 7), randn(&[16], 8)],
        1e-5,
        &|x, w| nn::layer_norm(&x[0], &w[0], &w[1], 1e-12).unwrap(),
    );
    same_on_both(
        "silu_mul",
        &[randn(&[b, t, 16], 9), randn(&[b, t, 16], 10)],
        &[],
        1e-5,
        &|x, _| nn::silu_mul(&x[0], &x[1]).unwrap(),
    );
    same_on_both(
        "gelu_tanh",
        &[randn(&[b, t, 16], 11)],
        &[],
        1e-5,
        &|x, _| nn::gelu_tanh(&x[0]).unwrap(),
    );
    same_on_both("gelu", &[randn(&[b, t, 16], 12)], &[], 1e-5, &|x, _| {
        nn::gelu(&x[0]).unwrap()
    });
    same_on_both("dropout", &[randn(&[b, t, 16], 13)], &[], 1e-6, &|x, _| {
        nn::dropout(&x[0], 0.3, 77).unwrap()
    });
    // Packed rows: positions restart at each example.
    let table = Arc::new(RopeTable::new(d, 10000.0, 64));
    let positions = Arc::new(vec![0u32, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6]);
    same_on_both("rope", &[randn(&[b, t, h * d], 14)], &[], 1e-5, &|x, _| {
        nn::rope(&x[0], &table, &positions, h).unwrap()
    });
    let key_mask = Arc::new(vec![
        1f32, 1., 1., 1., 1., 0., 0., 1., 1., 1., 1., 1., 1., 1.,
    ]);
    let segments = Some(Arc::new(vec![0u32, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]));
    let qkv = [
        randn(&[b, t, h * d], 15),
        randn(&[b, t, kv * d], 16),
        randn(&[b, t, kv * d], 17),
    ];
    for (name, drop) in [
        ("causal_attention", None),
        ("causal_attention+dropout", Some((0.2f32, 5u64))),
    ] {
        same_on_both(name, &qkv, &[], 1e-4, &|x, _| {
            nn::causal_attention(
                &x[0],
                &x[1],
                &x[2],
                h,
                kv,
                key_mask.clone(),
                segments.clone(),
                drop,
            )
            .unwrap()
        });
    }
    let qkv = [
        randn(&[b, t, h * d], 18),
        randn(&[b, t, h * d], 19),
        randn(&[b, t, h * d], 20),
    ];
    same_on_both("attention (bidirectional)", &qkv, &[], 1e-4, &|x, _| {
        nn::attention(&x[0], &x[1], &x[2], key_mask.clone(), h, None).unwrap()
    });
    let targets = Arc::new(vec![3i64, -100, 7, 0, 11, -100, 2, 5, 9, 1, -100, 4, 6, 8]);
    same_on_both(
        "lm_cross_entropy",
        &[randn(&[b * t, 16], 21)],
        &[randn(&[13, 16], 22)],
        1e-5,
        &|x, w| nn::lm_cross_entropy(&x[0], &w[0], targets.clone(), 4).unwrap(),
    );
    let ids = Tensor::new(&[3u32, 0, 7, 3, 12], &Device::Cpu).unwrap();
    same_on_both("embedding", &[], &[randn(&[13, 16], 23)], 1e-6, &|_, w| {
        nn::embedding(&w[0], &ids, None).unwrap()
    });
    same_on_both(
        "embedding+padding_idx",
        &[],
        &[randn(&[13, 16], 25)],
        1e-6,
        &|_, w| nn::embedding(&w[0], &ids, Some(0)).unwrap(),
    );
    let tg = Tensor::new(&[1u32, 0, 2, 2], &Device::Cpu).unwrap();
    same_on_both(
        "cross_entropy",
        &[randn(&[4, 3], 24)],
        &[],
        1e-5,
        &|x, _| nn::cross_entropy(&x[0], &tg).unwrap(),
    );
}

#[test]
fn adamw_matches_the_cpu() {
    let p0 = randn(&[300, 7], 30);
    let mut out = vec![];
    for dev in [Device::Cpu, gpu()] {
        let w = Weight::trainable(&p0.to_device(&dev).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), w.clone())],
            AdamWConfig {
                lr: 1e-2,
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        for s in 0..3 {
            w.grad
                .as_ref()
                .unwrap()
                .add_tensor(&randn(&[300, 7], 40 + s).to_device(&dev).unwrap())
                .unwrap();
            let norm = opt.grad_norm().unwrap();
            opt.step(1e-2, 1.0 / norm.max(1.0)).unwrap();
        }
        out.push(w.t.to_device(&Device::Cpu).unwrap());
    }
    let e = rel_err(&out[1], &out[0]);
    assert!(
        e < 1e-5,
        "adamw: parameters after 3 steps differ, rel err {e}"
    );
}

fn i64s(g: &Checkpoint, n: &str) -> Vec<i64> {
    g.load(n)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

/// The decoder parity fixtures through the CUDA path (full fine-tuning: every
/// parameter trains and is checked).
fn golden_on_gpu(case: &str, dtype: DType) {
    let dir = fixtures().join(case);
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let (cfg, _) = read_config(&dir).unwrap();
    let mut store = load_params(&dir, &cfg, Selector::all()).unwrap();
    store.to_device(&gpu(), dtype).unwrap();
    let model = CausalLm::build(&store, &cfg).unwrap();
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
    // Trainable weights are f32 masters; the activations follow the embedding's dtype.
    let hidden = model.forward(&inp, None).unwrap();
    let want_loss = g.load_f32("loss").unwrap().to_vec1::<f32>().unwrap()[0];
    let (loss, _) = model.lm_loss(&hidden, &labels).unwrap();
    let got = loss.to_dtype(DType::F32).unwrap().to_vec0::<f32>().unwrap();
    let f32 = dtype == DType::F32;
    if f32 {
        let logits = model.logits(&hidden).unwrap().reshape((b, t, ())).unwrap();
        let e = rel_err(&logits, &g.load_f32("logits").unwrap());
        assert!(e < 1e-4, "{case} cuda: logits rel err {e}");
        assert!(
            (got - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0),
            "{case} cuda: loss {got} vs {want_loss}"
        );
    } else {
        assert!(
            (got - want_loss).abs() < 2e-2 * want_loss.abs(),
            "{case} cuda bf16: loss {got} vs {want_loss}"
        );
    }
    loss.backward().unwrap();
    let mut checked = 0;
    let mut worst = (1f32, String::new());
    for (p, got, want) in golden_grads(&g, &store, &format!("{case} cuda")) {
        if f32 {
            let e = rel_err(&got, &want);
            assert!(e < 1e-3, "{case} cuda: gradient of {p}: rel err {e}");
        } else {
            let c = cosine(&got, &want);
            if c < worst.0 {
                worst = (c, p.to_string());
            }
        }
        checked += 1;
    }
    assert_eq!(
        checked,
        store.trainable().len(),
        "{case}: every trainable tensor has a golden gradient"
    );
    if !f32 {
        // bf16 activations: the gradient directions agree.
        assert!(
            worst.0 > 0.98,
            "{case} cuda bf16: gradient of {} has cosine {}",
            worst.1,
            worst.0
        );
        eprintln!(
            "{case} bf16: loss {got} vs {want_loss}; worst gradient cosine {} ({})",
            worst.0, worst.1
        );
    }
}

#[test]
fn decoder_fixtures_on_cuda_f32() {
    for case in ["llama-tiny", "llama-tiny-tied", "gpt2-tiny"] {
        golden_on_gpu(case, DType::F32);
    }
}

#[test]
fn decoder_fixtures_on_cuda_bf16() {
    for case in ["llama-tiny", "llama-tiny-tied", "gpt2-tiny"] {
        golden_on_gpu(case, DType::BF16);
    }
}

/// LoRA SFT steps on llama-tiny: the loss curve on the GPU (f32) is the CPU's.
#[test]
fn lora_training_curve_matches_the_cpu() {
    use afinar::adapters::{linear_modules, AdapterConfig};
    use rand::SeedableRng;
    let dir = fixtures().join("llama-tiny");
    let (cfg, _) = read_config(&dir).unwrap();
    let mut curves = vec![];
    for dev in [Device::Cpu, gpu()] {
        let mut store = load_params(&dir, &cfg, Selector::none()).unwrap();
        let mut lora = AdapterConfig::lora(&["q_proj", "v_proj", "down_proj"], 4, 8.0);
        if let AdapterConfig::Lora(l) = &mut lora {
            l.lora_dropout = 0.1;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let linears = linear_modules(&store);
        lora.apply(&mut store, &linears, &["lm_head"], &mut rng)
            .unwrap();
        if !dev.is_cpu() {
            store.to_device(&dev, DType::F32).unwrap();
        }
        let model = CausalLm::build(&store, &cfg).unwrap();
        let mut opt = AdamW::new(
            store.trainable(),
            AdamWConfig {
                lr: 1e-2,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let (b, t) = (2, 9);
        let ids: Vec<u32> = (0..b * t)
            .map(|i| ((i * 7 + 3) % cfg.vocab_size()) as u32)
            .collect();
        let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let mut curve = vec![];
        for s in 0..5 {
            let inp = Inputs::new(ids.clone(), vec![1.0; b * t], b, t).unwrap();
            let drop = nn::DropoutRng::new(3, s);
            let hidden = model.forward(&inp, Some(&drop)).unwrap();
            let (loss, _) = model.lm_loss(&hidden, &labels).unwrap();
            curve.push(loss.to_dtype(DType::F32).unwrap().to_vec0::<f32>().unwrap());
            loss.backward().unwrap();
            opt.step(1e-2, 1.0).unwrap();
        }
        curves.push(curve);
    }
    eprintln!(
        "LoRA curve CPU {:?}\nLoRA curve GPU {:?}",
        curves[0], curves[1]
    );
    for (a, b) in curves[0].iter().zip(&curves[1]) {
        assert!(
            (a - b).abs() < 1e-4 * a.abs().max(1.0),
            "loss curves differ: {:?} vs {:?}",
            curves[0],
            curves[1]
        );
    }
}
