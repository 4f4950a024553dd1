//! What the `gemm` crate reaches alone on W1's matmul shapes (MiniLM-L6,
//! batch 16 x 128 = 2048 rows), through afinar's `kernels::matmul`: GFLOP/s
//! per shape, to set against `fma_peak` and the share a whole step reaches.
//! `wt`: the right operand is a `[out, in]` weight read transposed (x W^T).
//!
//! cargo run --release -p afinar --example gemm_probe -- --threads 2

mod common;
use afinar::nn::kernels::{matmul, parallelism, Mat};
use common::arg;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    afinar::init_threads(Some(
        arg(&args, "--threads", "2").parse().expect("--threads N"),
    ));
    let shapes = [
        (2048usize, 384usize, 1536usize, true), // intermediate.dense
        (2048, 1536, 384, true),                // output.dense
        (2048, 384, 384, true),                 // query / key / value / attention output
        (2048, 384, 1536, false),               // an input gradient (g W)
        (384, 2048, 1536, false),               // a weight gradient (g^T x)
    ];
    for (m, k, n, wt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let bm = if wt {
            Mat::rm(&b, n, k).t()
        } else {
            Mat::rm(&b, k, n)
        };
        let mut run = || matmul(&mut c, n, Mat::rm(&a, m, k), bm, 1.0, false, parallelism());
        for _ in 0..3 {
            run();
        }
        let (t, reps) = (Instant::now(), 20);
        for _ in 0..reps {
            run();
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        let gflops = 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "{}",
            serde_json::json!({"m": m, "k": k, "n": n, "weight_transposed": wt, "ms": s * 1e3, "gflops": gflops})
        );
    }
}
