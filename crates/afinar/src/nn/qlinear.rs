//! `x @ W^T + b` with `W` kept quantised (a GGUF [`QTensor`]: Q4_0, Q4_1,
//! Q8_0, F16, BF16 or F32) and dequantised one tile at a time inside the
//! matmul, as QLoRA keeps its 4-bit base (Dettmers et al. 2023,
//! <https://arxiv.org/abs/2305.14314>): the frozen base costs its quantised
//! bytes in memory, never a full f32 copy.
//!
//! Forward: tiles of W's rows (output features) are dequantised into a
//! per-thread f32 buffer and multiplied in parallel (rayon), each into its own
//! rows of `y^T`, transposed at the end. Backward returns only the input
//! gradient — the base is frozen, gradients flow on to the adapters around
//! it — `dx = dy @ W`, tiled over strips of W's columns (whole blocks) so
//! each strip owns its rows of `dx^T`. A trainable bias accumulates into
//! its [`GradBuf`](super::GradBuf) as in `nn::linear`.
//!
//! Limits: CPU, f32 activations only.

use super::custom_op::{
    apply, cerr, first_only, last_dim, needs_grad, output, tensor, with_f32, with_last_dim,
    CResult, Fwd, Grads, Input, Op,
};
use super::kernels::{self, Mat};
use super::linear::cpu::add_bias_grad;
use super::Weight;
use crate::hub::gguf::QTensor;
use crate::simd;
use candle_core::Tensor;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    /// The dequantised tile of the thread doing it (reused across calls).
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` on a per-thread f32 buffer of `n` values. `f` must not re-enter
/// rayon (it runs gemm with `Parallelism::None`), or another task on this
/// thread could ask for the same buffer.
fn with_tile<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    TILE.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < n {
            t.resize(n, 0.0);
        }
        f(&mut t[..n])
    })
}

/// Rows per forward tile: a few tiles per thread, 8 to 256 rows.
fn tile_rows(out_f: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    out_f
        .div_ceil(threads * 4)
        .next_multiple_of(8)
        .clamp(8, 256)
}

/// Columns per backward strip: whole blocks, at most ~1M dequantised values
/// per strip (a 49152-row embedding gets 32-column strips), and a few strips per thread.
fn strip_cols(in_f: usize, out_f: usize, block: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = in_f.div_ceil(threads * 4);
    let by_memory = (1 << 20) / out_f.max(1);
    by_threads
        .min(by_memory)
        .min(256)
        .next_multiple_of(block)
        .max(block)
}

/// `[n, in] -> [n, out]` with W dequantised tile by tile.
fn qmatmul_fwd(x: &[f32], n: usize, w: &QTensor, bias: Option<&[f32]>) -> Vec<f32> {
    let (out_f, in_f) = (w.rows(), w.cols());
    if n == 0 || out_f == 0 {
        return vec![0f32; n * out_f];
    }
    let tile = tile_rows(out_f);
    // y^T [out, n]: each tile owns rows r0 .. r0 + nr.
    let mut yt = vec![0f32; out_f * n];
    yt.par_chunks_mut(tile * n).enumerate().for_each(|(t, yc)| {
        let (r0, nr) = (t * tile, yc.len() / n);
        with_tile(nr * in_f, |wt| {
            w.dequantize_rows(r0, nr, wt); // [nr, in]
            kernels::matmul(
                yc,
                n,
                Mat::rm(wt, nr, in_f),
                Mat::rm(x, n, in_f).t(),
                1.0,
                false,
                Parallelism::None,
            );
        })
    });
    let mut y = vec![0f32; n * out_f];
    y.par_chunks_mut(out_f).enumerate().for_each(|(i, row)| {
        simd::run(
            #[inline(always)]
            || {
                for (o, v) in row.iter_mut().enumerate() {
                    *v = yt[o * n + i] + bias.map_or(0.0, |b| b[o]);
                }
            },
        )
    });
    y
}

/// `dx [n, in] = dy [n, out] @ W [out, in]`, W dequantised strip by strip of columns.
fn qmatmul_bwd_input(dy: &[f32], n: usize, w: &QTensor) -> Vec<f32> {
    let (out_f, in_f) = (w.rows(), w.cols());
    if n == 0 || in_f == 0 {
        return vec![0f32; n * in_f];
    }
    let block = w.ty().block_size().unwrap_or(1);
    let strip = strip_cols(in_f, out_f, block);
    // dx^T [in, n]: each strip owns rows c0 .. c0 + nc.
    let mut dxt = vec![0f32; in_f * n];
    dxt.par_chunks_mut(strip * n)
        .enumerate()
        .for_each(|(s, dc)| {
            let (c0, nc) = (s * strip, dc.len() / n);
            with_tile(out_f * nc, |ws| {
                w.dequantize_cols(c0, nc, ws); // [out, nc]
                kernels::matmul(
                    dc,
                    n,
                    Mat::rm(ws, out_f, nc).t(),
                    Mat::rm(dy, n, out_f).t(),
                    1.0,
                    false,
                    Parallelism::None,
                );
            })
        });
    let mut dx = vec![0f32; n * in_f];
    dx.par_chunks_mut(in_f).enumerate().for_each(|(i, row)| {
        simd::run(
            #[inline(always)]
            || {
                for (c, v) in row.iter_mut().enumerate() {
                    *v = dxt[c * n + i];
                }
            },
        )
    });
    dx
}

/// `x @ W^T + b` with `W` quantised. Its inputs are x and, when there is a
/// bias, b (one or two).
struct QLinearOp {
    w: Arc<QTensor>,
    b: Option<Weight>,
}

impl<const N: usize> Op<N> for QLinearOp {
    fn name(&self) -> &'static str {
        "afinar-qlinear"
    }
    fn cpu_fwd(&self, xs: [Input; N]) -> Fwd {
        let (out_f, in_f) = (self.w.rows(), self.w.cols());
        let k = last_dim(xs[0].dims(), "qlinear")?;
        if k != in_f {
            return Err(cerr(format!(
                "qlinear: input width {k} but the weight is [{out_f}, {in_f}]"
            )));
        }
        let x = xs[0].f32s("qlinear input")?;
        let b = xs.get(1).map(|b| b.f32s("qlinear bias")).transpose()?;
        if let Some(b) = b {
            if b.len() != out_f {
                return Err(cerr(format!(
                    "qlinear: bias [{}], weight [{out_f}, {in_f}]",
                    b.len()
                )));
            }
        }
        let y = qmatmul_fwd(x, x.len() / in_f.max(1), &self.w, b);
        output(y, with_last_dim(xs[0].dims(), out_f, "qlinear")?)
    }
    fn bwd(&self, xs: [&Tensor; N], _res: &Tensor, grad: &Tensor) -> Grads<N> {
        let x = xs[0];
        let out_f = self.w.rows();
        let dx = with_f32(grad, "qlinear grad", |g| {
            add_bias_grad(self.b.as_ref(), g, out_f);
            if !needs_grad(x) {
                return Ok(None);
            }
            let dx = qmatmul_bwd_input(g, g.len() / out_f.max(1), &self.w);
            Ok(Some(tensor(dx, x.shape())?))
        })?;
        Ok(first_only(dx))
    }
}

/// `x @ W^T + b` over the last dimension of `x` (`[.., in] -> [.., out]`) with
/// `W` (`[out, in]`) kept quantised. Backward gives `dx` only (W is frozen);
/// a trainable bias accumulates into its gradient buffer.
pub fn qlinear(x: &Tensor, w: &Arc<QTensor>, b: Option<&Weight>) -> CResult<Tensor> {
    let op = QLinearOp {
        w: w.clone(),
        b: b.cloned(),
    };
    match b {
        Some(b) => apply(op, [x, &b.t]),
        None => apply(op, [x]),
    }
}

/// A quantised matrix as an f32 `[rows, cols]` tensor (decoded exactly,
/// not rounded again).
pub fn dequantize(q: &QTensor) -> crate::Result<Tensor> {
    Ok(Tensor::from_vec(
        q.to_f32_vec(),
        (q.rows(), q.cols()),
        &candle_core::Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::gguf::GgmlType;
    use crate::testutil::{max_diff, uniform as randn};
    use candle_core::{Device, Var};

    /// qlinear equals dequantise-then-linear, forward and dx, for every type
    /// and for shapes that leave partial tiles and strips.
    #[test]
    fn qlinear_matches_dequantized_linear() {
        let dev = Device::Cpu;
        for (ty, out_f, in_f, seed) in [
            (GgmlType::Q4_1, 72, 96, 1),
            (GgmlType::Q4_0, 300, 64, 2),
            (GgmlType::Q8_0, 40, 160, 3),
            (GgmlType::F16, 33, 17, 4),
            (GgmlType::BF16, 8, 32, 5),
            (GgmlType::F32, 130, 96, 6),
        ] {
            let w =
                Arc::new(QTensor::from_f32(ty, [out_f, in_f], &randn(out_f * in_f, seed)).unwrap());
            let wf = Tensor::from_vec(w.to_f32_vec(), (out_f, in_f), &dev).unwrap();
            let b =
                Weight::frozen(Tensor::from_vec(randn(out_f, seed + 100), out_f, &dev).unwrap());
            let x = Var::from_vec(randn(2 * 5 * in_f, seed + 200), (2, 5, in_f), &dev).unwrap();
            let r =
                Tensor::from_vec(randn(2 * 5 * out_f, seed + 300), (2, 5, out_f), &dev).unwrap();
            for bias in [None, Some(&b)] {
                let y = qlinear(x.as_tensor(), &w, bias).unwrap();
                let y_ref =
                    crate::nn::linear(x.as_tensor(), &Weight::frozen(wf.clone()), bias).unwrap();
                assert_eq!(y.dims(), &[2, 5, out_f]);
                let d = max_diff(&y, &y_ref);
                assert!(d < 1e-5, "{ty} forward differs by {d}");
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let g_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (dx, dx_ref) = (g.get(&x).unwrap(), g_ref.get(&x).unwrap());
                let d = max_diff(dx, dx_ref);
                assert!(d < 1e-5, "{ty} dx differs by {d}");
            }
        }
    }

    #[test]
    fn qlinear_bias_grad_and_errors() {
        let dev = Device::Cpu;
        let w = Arc::new(QTensor::from_f32(GgmlType::Q8_0, [4, 32], &randn(128, 9)).unwrap());
        let b =
            Weight::trainable(&Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()).unwrap();
        // The input needs no gradient: only the bias gets one.
        let x = Tensor::from_vec(randn(3 * 32, 10), (3, 32), &dev).unwrap();
        let y = qlinear(&x, &w, Some(&b)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none());
        let gb = b.grad_tensor().unwrap().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gb, vec![3.0; 4]);
        let err = qlinear(
            &Tensor::zeros((2, 31), candle_core::DType::F32, &dev).unwrap(),
            &w,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("input width 31") && err.contains("[4, 32]"),
            "{err}"
        );
    }
}
