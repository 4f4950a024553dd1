//! Benchmark: one DPO step of a decoder LM with LoRA (r=8 on q_proj/v_proj,
//! the reference = the base with the adapter switched off, sigmoid loss,
//! beta 0.1, f32) on a fixed batch of pairs: step = reference forward +
//! policy forward + backward + grad norm + AdamW. The batch is the one
//! TRL's collator made (bench/dpo.py writes it: `input_ids` and
//! `completion_mask` rows, chosen rows first, unpadded), so both sides see
//! the same tokens. Prints one JSON line like bench/pytorch_dpo.py.
//!
//! cargo run --release -p afinar --example dpo_step -- --model DIR --batch-file B.json --steps 3 --threads 2

use afinar::adapters::{linear_modules, AdapterConfig};
use afinar::data::preference::PairTokens;
use afinar::data::sft::SftTokens;
use afinar::heads::CausalLm;
use afinar::methods::dpo::{dpo_batch, Reference};
use afinar::methods::preference::DpoLossType;
use afinar::models::{load_model, LoadOpts};
use afinar::nn::DropoutRng;
use afinar::optim::{AdamW, AdamWConfig};
use afinar::params::Selector;
use rand::SeedableRng;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{arg, peak_rss_mb, rss_mb};

fn main() -> afinar::Result<()> {
    let base_rss = rss_mb();
    let args: Vec<String> = std::env::args().collect();
    let model_path = std::path::PathBuf::from(arg(&args, "--model", ""));
    let batch_file = arg(&args, "--batch-file", "");
    let steps: usize = arg(&args, "--steps", "3").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap();
    afinar::keep_freed_memory();
    afinar::init_threads(Some(threads));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&batch_file).expect("--batch-file")).unwrap();
    let rows: Vec<SftTokens> = v["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["completion_mask"].as_array().unwrap())
        .map(|(ids, m)| {
            let ids: Vec<u32> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let labels = ids
                .iter()
                .zip(m.as_array().unwrap())
                .map(|(&id, m)| {
                    if m.as_u64() == Some(1) {
                        id as i64
                    } else {
                        -100
                    }
                })
                .collect();
            SftTokens {
                line: 0,
                ids,
                labels,
            }
        })
        .collect();
    let n = rows.len() / 2;
    let pairs: Vec<PairTokens> = (0..n)
        .map(|i| PairTokens {
            line: i + 1,
            chosen: rows[i].clone(),
            rejected: rows[n + i].clone(),
        })
        .collect();
    let tokens: usize = rows.iter().map(|r| r.ids.len()).sum();
    let mut src = load_model(&model_path, Selector::none(), LoadOpts::default())?;
    let pad = src.tokenizer.pad_id();
    let lora = AdapterConfig::lora(&["q_proj", "v_proj"], 8, 16.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let linears = linear_modules(&src.store);
    lora.apply(&mut src.store, &linears, &["lm_head"], &mut rng)?;
    let model = CausalLm::build(&src.store, &src.cfg)?;
    let mut opt = AdamW::new(
        src.store.trainable(),
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let refs: Vec<&PairTokens> = pairs.iter().collect();
    let mut times = Vec::new();
    for s in 0..steps + 1 {
        let t0 = Instant::now();
        let drop = DropoutRng::new(1, s as u64);
        let (loss, _) = dpo_batch(
            &model,
            &Reference::AdaptersDisabled(&src.store),
            &refs,
            pad,
            DpoLossType::Sigmoid,
            0.1,
            0.0,
            Some(&drop),
        )?;
        loss.backward()?;
        let _ = opt.grad_norm()?;
        opt.step(1e-4, 1.0)?;
        if s == 0 {
            eprintln!(
                "first step (warm-up) {:.3} s, loss {:.4}",
                t0.elapsed().as_secs_f64(),
                loss.to_scalar::<f32>()?
            );
        } else {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({"impl": "afinar", "median_s": median, "steps": times,
            "tokens_per_s": tokens as f64 / median, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss,
            "simd": afinar::simd::level().name(), "threads": threads, "pairs": n, "tokens": tokens})
    );
    Ok(())
}
