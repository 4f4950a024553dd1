//! Benchmark workload W1 (bench/README.md): MiniLM-L6 shape, batch 16 x seq
//! 128, f32; one step = forward + backward + AdamW. Prints one JSON line like
//! bench/pytorch_w1.py so bench/w1.sh can put them side by side.
//!
//! cargo run --release -p afinar --example w1 -- --mode full|last2|infer --steps N --threads 2 [--model DIR]

use afinar::heads::{head_patterns, HeadConfig, Pooling, SequenceModel, Targets, TaskKind};
use afinar::models::load::{load_params, read_config};
use afinar::models::{layout, Family, Inputs, ModelConfig};
use afinar::nn::DropoutRng;
use afinar::optim::{AdamW, AdamWConfig};
use afinar::params::{FreezeRules, Preset, Selector};
use std::time::Instant;

// glibc's malloc returns large freed blocks to the OS and page-faults them
// back in on the next step; mimalloc keeps them (a tenth of a step here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{arg, peak_rss_mb, rss_mb};

fn main() -> afinar::Result<()> {
    let base_rss = rss_mb();
    let args: Vec<String> = std::env::args().collect();
    let mode = arg(&args, "--mode", "full");
    // "full-ckpt", "lora-ckpt": the same with activation checkpointing per layer.
    let (mode, ckpt) = match mode.strip_suffix("-ckpt") {
        Some(m) => (m.to_string(), true),
        None => (mode, false),
    };
    let steps: usize = arg(&args, "--steps", "5").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap();
    let dir = match args.iter().position(|a| a == "--model") {
        Some(i) => std::path::PathBuf::from(&args[i + 1]),
        None => afinar::hub::assets::resolve_asset_path("all-minilm-l6-v2")?,
    };
    afinar::keep_freed_memory();
    afinar::init_threads(Some(threads));
    let (cfg, _) = read_config(&dir)?;
    let ModelConfig::Bert(bert) = &cfg else {
        panic!("W1 is a BERT workload")
    };
    let preset = match mode.as_str() {
        "full" => Preset::Full,
        "last2" => Preset::LastLayers(2),
        "infer" | "lora" => Preset::HeadOnly,
        m => panic!("unknown mode {m}"),
    };
    let sel = if mode == "infer" || mode == "lora" {
        Selector::none()
    } else {
        let rules = FreezeRules {
            preset,
            ..Default::default()
        };
        Selector::new(&rules, &layout(&cfg, head_patterns(Family::Bert)))?
    };
    let mut store = load_params(&dir, &cfg, sel)?;
    let head = HeadConfig {
        task: TaskKind::Classification,
        pooling: Pooling::Cls,
        num_labels: 2,
        dropout: bert.hidden_dropout_prob,
    };
    // LoRA as PEFT's default for sequence classification: r=8, alpha 16,
    // dropout 0.1 on query and value, the classifier trained fully.
    let lora: afinar::adapters::AdapterConfig = toml::from_str(
        "type = \"lora\"\nr = 8\nlora_alpha = 16.0\nlora_dropout = 0.1\ntarget_modules = [\"query\", \"value\"]",
    )
    .expect("valid adapter config");
    let adapter = (mode == "lora").then_some(&lora);
    let mut model = SequenceModel::new(&mut store, &cfg, &head, 0, adapter, 0)?;
    model.set_gradient_checkpointing(ckpt);
    let b: usize = arg(&args, "--batch", "16").parse().unwrap();
    let t: usize = arg(&args, "--seq", "128").parse().unwrap();
    let ids: Vec<u32> = (0..b * t)
        .map(|i| (afinar::data::splitmix64(i as u64) % cfg.vocab_size() as u64) as u32)
        .collect();
    let x = Inputs::new(ids, vec![1.0; b * t], b, t)?.with_type_ids(vec![0; b * t])?;
    let targets = Targets::Classes((0..b as u32).map(|i| i % 2).collect());
    let mut opt = AdamW::new(
        store.trainable(),
        AdamWConfig {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let mut times = Vec::new();
    for s in 0..steps + 2 {
        let t0 = Instant::now();
        if mode == "infer" {
            let _ = model.forward(&x, None)?.to_vec2::<f32>()?;
        } else {
            let rng = DropoutRng::new(1, s as u64);
            let loss = model.loss(&model.forward(&x, Some(&rng))?, &targets)?;
            let t1 = Instant::now();
            loss.backward()?;
            let t2 = Instant::now();
            let _ = opt.grad_norm()?;
            opt.step(1e-5, 1.0)?;
            if std::env::var("W1_PHASES").is_ok() {
                eprintln!(
                    "fwd {:.3} bwd {:.3} opt {:.3}",
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64(),
                    t2.elapsed().as_secs_f64()
                );
            }
        }
        if s >= 2 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({"impl": "afinar", "mode": mode, "median_s": median, "steps": times, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss, "threads": threads, "simd": afinar::simd::level().name()})
    );
    Ok(())
}
