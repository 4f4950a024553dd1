//! Benchmark: one training step of torchvision's MobileNetV2 (the ImageNet
//! weights, a new 10-class head), batch B of S x S images; step = forward +
//! cross-entropy + backward + global grad norm + AdamW. `--mode full` trains
//! everything (batch statistics); `--mode head` only `classifier.1` (the
//! features frozen, their batch norm on running statistics). Inputs are the
//! same pseudo-random values as bench/pytorch_mobilenet.py. Prints one JSON
//! line; bench/mobilenet.py puts the two sides together.
//!
//! cargo run --release -p afinar --example mobilenet_step -- --model PTH --batch 32 --size 96 --steps 5 --threads 2 --mode full

use afinar::methods::image::{build, read_weights};
use afinar::models::mobilenet_v2::FrozenBn;
use afinar::nn::DropoutRng;
use afinar::optim::{AdamW, AdamWConfig};
use afinar::params::{FreezeRules, Preset, Selector};
use candle_core::{Device, Tensor};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{arg, peak_rss_mb, rss_mb};

fn main() -> afinar::Result<()> {
    let base_rss = rss_mb();
    let args: Vec<String> = std::env::args().collect();
    let model_path = std::path::PathBuf::from(arg(&args, "--model", ""));
    let b: usize = arg(&args, "--batch", "32").parse().unwrap();
    let s: usize = arg(&args, "--size", "96").parse().unwrap();
    let steps: usize = arg(&args, "--steps", "5").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap();
    let mode = arg(&args, "--mode", "full");
    afinar::keep_freed_memory();
    afinar::init_threads(Some(threads));
    let preset = match mode.as_str() {
        "full" => Preset::Full,
        "head" => Preset::HeadOnly,
        other => panic!("--mode {other}: full or head"),
    };
    let rules = FreezeRules {
        preset,
        ..Default::default()
    };
    let sel = Selector::new(&rules, &afinar::methods::image::layout())?;
    let w = read_weights(&model_path)?;
    let (store, model) = build(w, sel, 10, FrozenBn::Eval, 0, &mut |_| {})?;
    let mut opt = AdamW::new(
        store.trainable(),
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    // The same pseudo-random inputs as bench/pytorch_mobilenet.py: an LCG
    // in [-2, 2) laid out NCHW, handed over channels last.
    let mut st = 12345u64;
    let nchw: Vec<f32> = (0..b * 3 * s * s)
        .map(|_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((st >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    let x = Tensor::from_vec(nchw, (b, 3, s, s), &Device::Cpu)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let y = Tensor::from_vec(
        (0..b as u32).map(|i| i % 10).collect::<Vec<_>>(),
        b,
        &Device::Cpu,
    )?;
    let mut times = Vec::new();
    let mut phases = (0.0, 0.0, 0.0);
    for step in 0..steps + 1 {
        let t0 = Instant::now();
        let drop = DropoutRng::new(1, step as u64);
        let logits = model.forward(&x, Some(&drop))?;
        let loss = afinar::nn::cross_entropy(&logits, &y)?;
        let t1 = Instant::now();
        loss.backward()?;
        let t2 = Instant::now();
        let _ = opt.grad_norm()?;
        opt.step(1e-4, 1.0)?;
        let t3 = Instant::now();
        if step == 0 {
            eprintln!(
                "first step (warm-up) {:.3} s, loss {:.4}",
                t0.elapsed().as_secs_f64(),
                loss.to_scalar::<f32>()?
            );
        } else {
            times.push((t3 - t0).as_secs_f64());
            phases.0 += (t1 - t0).as_secs_f64() / steps as f64;
            phases.1 += (t2 - t1).as_secs_f64() / steps as f64;
            phases.2 += (t3 - t2).as_secs_f64() / steps as f64;
        }
    }
    eprintln!(
        "mean phases: forward+loss {:.1} ms, backward {:.1} ms, grad-norm+AdamW {:.1} ms",
        phases.0 * 1e3,
        phases.1 * 1e3,
        phases.2 * 1e3
    );
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({"impl": "afinar", "mode": mode, "median_s": median, "steps": times,
            "images_per_s": b as f64 / median, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
            "simd": afinar::simd::level().name(), "threads": threads, "batch": b, "size": s})
    );
    Ok(())
}
