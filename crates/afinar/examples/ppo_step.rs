//! Benchmark: PPO's two phases on a decoder LM with LoRA r=8 on q_proj /
//! v_proj in the policy and in the value model (the same weights, a zero
//! `score` head, in the store under `value_model.`), f32, as a PPO run
//! holds them. The batch is bench/pytorch_ppo.py's (`--make-batch`): the
//! prompt ids, fixed responses and fixed old log-probabilities, values,
//! advantages and returns. Prints one JSON line like bench/pytorch_ppo.py.
//!
//! - `--phase rollout`: `methods::ppo::rollout` of the batch's prompts:
//!   sampling `--response-length` tokens through one KV cache
//!   (temperature 0.7, no end-of-sequence id: every response has the full
//!   length), the reference's log-probabilities (adapters off) and the
//!   values (a length rule scores, at no cost);
//! - `--phase generate`: the sampling alone;
//! - `--phase update`: one optimizer step on `--micro` rollouts: PPO's
//!   loss (`methods::ppo::ppo_loss`), backward, grad norm, AdamW.
//!
//! cargo run --release -p afinar --example ppo_step -- --model DIR --batch-file B.json --phase rollout

use afinar::adapters::{linear_modules, AdapterConfig};
use afinar::data::sft::SftExample;
use afinar::generate::GenerateConfig;
use afinar::heads::CausalLm;
use afinar::methods::ppo::{
    ppo_loss, rollout, Actors, Advantages, PpoParams, Prompt, Rewarder, Rollouts, ValueModel,
    VALUE_PREFIX,
};
use afinar::models::{load_model, LoadOpts};
use afinar::optim::{AdamW, AdamWConfig};
use afinar::params::Selector;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{arg, peak_rss_mb, rss_mb};

fn rows(v: &serde_json::Value, key: &str, n: usize, r: usize) -> Vec<Vec<f32>> {
    v[key].as_array().unwrap()[..n]
        .iter()
        .map(|row| {
            row.as_array().unwrap()[..r]
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn main() -> afinar::Result<()> {
    let base_rss = rss_mb();
    let args: Vec<String> = std::env::args().collect();
    let model_path = std::path::PathBuf::from(arg(&args, "--model", ""));
    let batch_file = arg(&args, "--batch-file", "");
    let phase = arg(&args, "--phase", "rollout");
    let resp_len: usize = arg(&args, "--response-length", "48").parse().unwrap();
    let micro: usize = arg(&args, "--micro", "8").parse().unwrap();
    let steps: usize = arg(&args, "--steps", "3").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap();
    afinar::keep_freed_memory();
    afinar::init_threads(Some(threads));
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&batch_file).expect("--batch-file")).unwrap();
    let queries: Vec<Vec<u32>> = v["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            q.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let n = queries.len();

    let mut src = load_model(&model_path, Selector::none(), LoadOpts::default())?;
    let mut vsrc = load_model(&model_path, Selector::none(), LoadOpts::default())?;
    let h = vsrc.cfg.hidden_size();
    vsrc.store.remove("lm_head.weight");
    vsrc.store.insert(
        "score.weight",
        Tensor::zeros((1, h), DType::F32, &Device::Cpu)?,
    )?;
    src.store.absorb(vsrc.store, VALUE_PREFIX)?;
    let lora = AdapterConfig::lora(&["q_proj", "v_proj"], 8, 16.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let linears = linear_modules(&src.store);
    lora.apply(&mut src.store, &linears, &["lm_head"], &mut rng)?;
    src.store
        .make_trainable(&format!("{VALUE_PREFIX}.score.weight"))?;
    let policy = CausalLm::build(&src.store, &src.cfg)?;
    let value = ValueModel::build(&src.store, &vsrc.cfg, VALUE_PREFIX)?;
    let pad = src.tokenizer.pad_id();
    let rewarder = Rewarder::Length(resp_len);
    let actors = Actors {
        policy: &policy,
        reference: None,
        value: &value,
        store: &src.store,
        tok: &src.tokenizer,
        max_positions: src.cfg.max_positions(),
        rewarder: &rewarder,
    };
    let mut times = Vec::new();
    let mut tokens = 0;
    if phase == "generate" {
        // The sampling alone (no reference, no values): where a rollout's time goes.
        let ids: Vec<&[u32]> = queries.iter().map(|q| q.as_slice()).collect();
        let g = GenerateConfig {
            max_new_tokens: resp_len,
            temperature: 0.7,
            ..Default::default()
        };
        for s in 0..steps + 1 {
            let mut rngs: Vec<_> = (0..n)
                .map(|i| afinar::methods::ppo::row_rng(1, s as u64, i as u64))
                .collect();
            let t0 = Instant::now();
            let c = afinar::generate::generate_batch(
                &policy,
                &ids,
                src.cfg.max_positions(),
                &g,
                &mut rngs,
            )?;
            let dt = t0.elapsed().as_secs_f64();
            tokens = c.iter().map(|x| x.ids.len()).sum();
            if s > 0 {
                times.push(dt);
            }
        }
    } else if phase == "rollout" {
        let prompts: Vec<Prompt> = queries
            .iter()
            .map(|q| Prompt {
                ids: q.clone(),
                turns: SftExample::PromptCompletion {
                    prompt: String::new(),
                    completion: String::new(),
                },
                answer: String::new(),
            })
            .collect();
        let refs: Vec<&Prompt> = prompts.iter().collect();
        let g = GenerateConfig {
            max_new_tokens: resp_len,
            temperature: 0.7,
            ..Default::default()
        };
        for s in 0..steps + 1 {
            let t0 = Instant::now();
            let (r, _, _) = rollout(&actors, &refs, &g, n, 1, s as u64, None)?;
            let dt = t0.elapsed().as_secs_f64();
            tokens = r.responses.iter().map(|x| x.len()).sum();
            assert_eq!(tokens, n * resp_len);
            if s == 0 {
                eprintln!("first rollout (warm-up) {dt:.3} s");
            } else {
                times.push(dt);
            }
        }
    } else {
        let resp: Vec<Vec<u32>> = rows(&v, "responses", micro, resp_len)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u32).collect())
            .collect();
        let r = Rollouts {
            queries: queries[..micro].to_vec(),
            responses: resp,
            logprobs: rows(&v, "logprobs", micro, resp_len),
            values: rows(&v, "values", micro, resp_len),
            ..Default::default()
        };
        let adv = Advantages {
            advantages: rows(&v, "advantages", micro, resp_len),
            returns: rows(&v, "returns", micro, resp_len),
            kl_k1: vec![],
            kl_k3: vec![],
            non_score: vec![],
        };
        let p = PpoParams {
            temperature: 0.7,
            kl_coef: 0.05,
            kl_estimator: afinar::config::KlEstimator::K1,
            whiten_rewards: false,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
        };
        let mut opt = AdamW::new(
            src.store.trainable(),
            AdamWConfig {
                lr: 1e-5,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
        )?;
        let rows_idx: Vec<usize> = (0..micro).collect();
        tokens = r
            .queries
            .iter()
            .map(|q| q.len())
            .max()
            .unwrap_or(0)
            .saturating_add(resp_len)
            * micro;
        for s in 0..steps + 1 {
            let t0 = Instant::now();
            let (loss, _) = ppo_loss(&policy, &value, &r, &adv, &rows_idx, pad, &p)?;
            loss.backward()?;
            let norm = opt.grad_norm()?;
            opt.step(1e-5, if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 })?;
            let dt = t0.elapsed().as_secs_f64();
            if s == 0 {
                eprintln!(
                    "first update (warm-up) {dt:.3} s, loss {:.4}",
                    loss.to_scalar::<f32>()?
                );
            } else {
                times.push(dt);
            }
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({"impl": "afinar", "phase": phase, "median_s": median, "steps": times,
            "tokens": tokens, "tokens_per_s": tokens as f64 / median, "peak_rss_mb": peak_rss_mb(),
            "base_rss_mb": base_rss, "simd": afinar::simd::level().name(), "threads": threads})
    );
    Ok(())
}
