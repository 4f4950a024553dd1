//! Benchmark: one LoRA SFT step of a decoder LM (SmolLM2-135M by default:
//! LoRA r=8 on q_proj/v_proj, batch B x seq T of token ids, loss on every
//! token, f32); step = forward + backward + AdamW. Prints one JSON line like
//! bench/pytorch_sft.py so bench/sft.py puts them side by side.
//!
//! cargo run --release -p afinar --example sft_step -- --model DIR_OR_GGUF --batch 2 --seq 512 --steps 3 --threads 2
//!
//! On a GPU (built with `--features cuda`): `--device cuda --dtype bf16`: the
//! frozen base in bf16, the LoRA weights f32 master copies cast to bf16 in
//! the products, the loss in f32 (what PyTorch autocast + PEFT does).

use afinar::adapters::{linear_modules, AdapterConfig};
use afinar::heads::CausalLm;
use afinar::models::{load_model, Inputs, LoadOpts};
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
    let b: usize = arg(&args, "--batch", "2").parse().unwrap();
    let t: usize = arg(&args, "--seq", "512").parse().unwrap();
    let steps: usize = arg(&args, "--steps", "3").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap();
    let device = match arg(&args, "--device", "cpu").as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => panic!("--device {other}: cpu or cuda"),
    };
    let dtype = match arg(&args, "--dtype", "f32").as_str() {
        "f32" => candle_core::DType::F32,
        "bf16" => candle_core::DType::BF16,
        other => panic!("--dtype {other}: f32 or bf16"),
    };
    afinar::keep_freed_memory();
    afinar::init_threads(Some(threads));
    let mut src = load_model(&model_path, Selector::none(), LoadOpts::default())?;
    let lora = AdapterConfig::lora(&["q_proj", "v_proj"], 8, 16.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let linears = linear_modules(&src.store);
    lora.apply(&mut src.store, &linears, &["lm_head"], &mut rng)?;
    if !device.is_cpu() {
        src.store.to_device(&device, dtype)?;
    }
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
    // The same pseudo-random ids as bench/pytorch_sft.py (an LCG over the vocabulary).
    let vocab = src.cfg.vocab_size() as u64;
    let mut x = 12345u64;
    let ids: Vec<u32> = (0..b * t)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab) as u32
        })
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    // AFINAR_CUDA_PROFILE=1: phase and per-op times of the last step (synchronized: slower).
    let profile = std::env::var_os("AFINAR_CUDA_PROFILE").is_some();
    let mut times = Vec::new();
    for s in 0..steps + 1 {
        #[cfg(feature = "cuda")]
        if profile && s == steps {
            let _ = afinar::nn::cuda::profile_report(); // only the last step is reported
        }
        let t0 = Instant::now();
        let inp = Inputs::new(ids.clone(), vec![1.0; b * t], b, t)?;
        let drop = DropoutRng::new(1, s as u64);
        let ids_t = inp.ids.to_device(&device)?;
        let inp = Inputs { ids: ids_t, ..inp };
        let hidden = model.forward(&inp, Some(&drop))?;
        let (loss, _) = model.lm_loss(&hidden, &labels)?;
        device.synchronize()?;
        let t1 = Instant::now();
        loss.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        let _ = opt.grad_norm()?;
        opt.step(1e-4, 1.0)?;
        device.synchronize()?;
        if profile && s == steps {
            eprintln!(
                "last step: forward+loss {:.1} ms, backward {:.1} ms, grad-norm+AdamW {:.1} ms",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                t2.elapsed().as_secs_f64() * 1e3
            );
            #[cfg(feature = "cuda")]
            eprintln!("{}", afinar::nn::cuda::profile_report());
        }
        if s == 0 {
            eprintln!(
                "first step (warm-up) {:.3} s, loss {:.4}",
                t0.elapsed().as_secs_f64(),
                loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?
            );
        }
        if s >= 1 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = sorted[sorted.len() / 2];
    println!(
        "{}",
        serde_json::json!({"impl": "afinar", "median_s": median, "steps": times,
            "tokens_per_s": (b * t) as f64 / median, "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss, "simd": afinar::simd::level().name(), "threads": threads,
            "batch": b, "seq": t, "device": format!("{device:?}"), "dtype": format!("{dtype:?}"),
            "gpu_used_mb_at_end": gpu_used_mb()})
    );
    Ok(())
}

/// Device memory in use at the end (MiB, nvidia-smi; candle keeps freed blocks in the driver pool, so close to the peak). 0 on the CPU.
fn gpu_used_mb() -> f64 {
    #[cfg(feature = "cuda")]
    {
        if let Ok(out) = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
            .output()
        {
            if let Ok(v) = String::from_utf8_lossy(&out.stdout).trim().parse::<f64>() {
                return v;
            }
        }
    }
    0.0
}
