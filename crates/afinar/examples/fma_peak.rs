//! The FMA throughput this machine reaches, for bench/ to state the share
//! of peak each side of a benchmark reaches: `--threads N` threads, each
//! running independent chains of fused multiply-adds (enough chains to hide
//! the FMA latency) for `--secs` seconds, at each vector width the CPU has
//! (AVX-512: 16 f32 lanes, AVX2: 8). Prints one JSON line:
//! `{"threads": N, "avx512_gflops": .., "avx2_gflops": .., "cpu": ..}`
//! (a width the CPU lacks is null). One FMA = 2 flops.
//!
//! cargo run --release -p afinar --example fma_peak -- --threads 2 --secs 2

mod common;
use common::arg;
use std::time::Instant;

/// Chains per thread: 2 FMA ports x 4-cycle latency need 8; 12 leave margin.
const CHAINS: usize = 12;
/// FMAs per chain between two clock reads.
const INNER: usize = 1 << 16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, INNER};
    use std::arch::x86_64::*;

    /// `INNER * CHAINS` FMAs on 16-lane registers; returns a value that
    /// depends on all of them (so nothing is optimised away).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn burst512(seed: f32) -> f32 {
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        for _ in 0..INNER {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm512_setzero_ps();
        for x in acc {
            s = _mm512_add_ps(s, x);
        }
        _mm512_reduce_add_ps(s)
    }

    /// The same on 8-lane (AVX2) registers.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn burst256(seed: f32) -> f32 {
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        for _ in 0..INNER {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = _mm256_setzero_ps();
        for x in acc {
            s = _mm256_add_ps(s, x);
        }
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

/// GFLOP/s of `threads` threads each calling `burst` (which does
/// `CHAINS * INNER` FMAs of `lanes` lanes) for `secs` seconds.
fn measure(threads: usize, secs: f64, lanes: usize, burst: unsafe fn(f32) -> f32) -> f64 {
    let t0 = Instant::now();
    let total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    let (mut n, mut sink) = (0usize, 0f32);
                    while t0.elapsed().as_secs_f64() < secs {
                        // SAFETY: `burst` is only passed when the CPU has its features.
                        sink += unsafe { burst(i as f32 + sink * 1e-30) };
                        n += 1;
                    }
                    std::hint::black_box(sink);
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let flops = total as f64 * (CHAINS * INNER * lanes * 2) as f64;
    flops / t0.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = arg(&args, "--threads", "2").parse().expect("--threads N");
    let secs: f64 = arg(&args, "--secs", "2").parse().expect("--secs S");
    let (mut v512, mut v256) = (None, None);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            v256 = Some(measure(threads, secs, 8, x86::burst256));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            v512 = Some(measure(threads, secs, 16, x86::burst512));
        }
    }
    println!(
        "{}",
        serde_json::json!({"threads": threads, "secs": secs, "avx512_gflops": v512, "avx2_gflops": v256})
    );
}
