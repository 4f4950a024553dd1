//! Batch normalisation over the channels of channels-last activations
//! (Ioffe & Szegedy 2015, <https://arxiv.org/abs/1502.03167>; torch's
//! `nn.BatchNorm2d`, <https://pytorch.org/docs/2.5/generated/torch.nn.BatchNorm2d.html>),
//! optionally fused with ReLU6, and global average pooling.
//!
//! Two sources of statistics, chosen per call, not by the weights being
//! frozen (habit 5):
//! - **batch**: the mean and biased variance of this batch normalise it; the
//!   running statistics move towards the batch's (`momentum`, the variance
//!   unbiased, `num_batches_tracked` counted), exactly as torch in `train()`;
//!   backward goes through the statistics;
//! - **running**: the stored statistics normalise (torch's `eval()`, and a
//!   frozen stage's layers unless `freeze.batch_norm = "train"`); backward is
//!   a per-channel scale.
//!
//! The channel is the last dimension; every other one is a row (`[B, H, W,
//! C]` and `[B, C]` alike). Sums over rows are taken per chunk in f32 and
//! added in f64. A trainable weight / bias accumulates its gradient into its
//! buffer; with ReLU6 fused, the gradient passes where the output is inside
//! (0, 6), which is where the input to the clamp was.

use super::custom_op::{apply, cerr, first_only, needs_grad, output, tensor, with_f32s};
use super::custom_op::{CResult, Fwd, Grads, Input, Op};
use super::Weight;
use crate::simd;
use candle_core::{Tensor, Var};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Rows per task of the channel sums.
const ROWS: usize = 512;

/// A batch-norm layer's stored statistics (torch's buffers).
#[derive(Clone, Debug)]
pub struct RunningStats {
    pub mean: Var,
    pub var: Var,
    /// `num_batches_tracked` (counted as f32 here; written back as int64).
    pub count: Var,
}

/// `nn.BatchNorm2d` with its affine weight and bias.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub weight: Weight,
    pub bias: Weight,
    pub stats: RunningStats,
    pub eps: f64,
    pub momentum: f64,
    /// Use batch statistics (and update the running ones) when training.
    /// False for the layers of a frozen stage: they run as in `eval()`.
    pub batch_stats: bool,
}

impl BatchNorm {
    /// Normalise `x` (`[.., C]`), then ReLU6 if `relu6`. `train`: the
    /// model is training (batch statistics, when this layer takes them).
    pub fn forward(&self, x: &Tensor, train: bool, relu6: bool) -> crate::Result<Tensor> {
        Ok(batch_norm(
            x,
            &self.weight,
            &self.bias,
            &self.stats,
            train && self.batch_stats,
            self.momentum,
            self.eps,
            relu6,
        )?)
    }

    /// Whether this layer's statistics stay frozen when the model trains.
    pub fn frozen_stats(&self) -> bool {
        !self.batch_stats
    }
}

/// The statistics a forward used, kept for its backward (and, with batch
/// statistics, for the running-statistics update).
#[derive(Default)]
struct Used {
    mean: Vec<f32>,
    /// Biased variance of the batch (batch statistics only).
    var: Vec<f32>,
    invstd: Vec<f32>,
    rows: usize,
}

struct BatchNormOp {
    eps: f32,
    relu6: bool,
    /// Running statistics to normalise with; None: the batch's.
    running: Option<(Vec<f32>, Vec<f32>)>,
    w: Weight,
    b: Weight,
    used: Arc<Mutex<Used>>,
}

impl Op<3> for BatchNormOp {
    fn name(&self) -> &'static str {
        "afinar-batch-norm"
    }
    fn cpu_fwd(&self, [xi, gi, bi]: [Input; 3]) -> Fwd {
        let x = xi.f32s("batch_norm input")?;
        let g = gi.f32s("batch_norm weight")?;
        let b = bi.f32s("batch_norm bias")?;
        let c = g.len();
        if xi.dims().last() != Some(&c) || b.len() != c {
            return Err(cerr(format!(
                "batch_norm: input {:?} (channels last), weight [{c}], bias [{}]",
                xi.dims(),
                b.len()
            )));
        }
        let rows = x.len() / c.max(1);
        let (mean, var) = match &self.running {
            Some((m, v)) => (m.clone(), v.clone()),
            None => {
                if rows < 2 {
                    return Err(cerr(format!(
                        "batch_norm: batch statistics need more than one value per channel, \
                         input {:?}",
                        xi.dims()
                    )));
                }
                cpu::moments(x, c)
            }
        };
        let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let y = cpu::normalise(x, &mean, &invstd, g, b, self.relu6);
        *self.used.lock().unwrap() = Used {
            mean,
            var,
            invstd,
            rows,
        };
        output(y, xi.shape())
    }
    fn bwd(&self, [x, g, _b]: [&Tensor; 3], res: &Tensor, grad: &Tensor) -> Grads<3> {
        let used = self.used.lock().unwrap();
        let names = [
            "batch_norm input",
            "batch_norm weight",
            "batch_norm output",
            "batch_norm grad",
        ];
        let want_x = needs_grad(x);
        let train = self.running.is_none();
        let dx = with_f32s([x, g, res, grad], names, |[xv, gv, y, dy]| {
            let c = gv.len();
            let mask = self.relu6.then_some(y);
            // Channel sums: what dγ/dβ are, and what dx needs with batch statistics.
            let need_sums = train && want_x || self.w.grad.is_some() || self.b.grad.is_some();
            let (sdy, sdyx) = if need_sums {
                cpu::grad_sums(xv, dy, mask, &used.mean, &used.invstd, c)
            } else {
                (vec![0.0; c], vec![0.0; c])
            };
            if let Some(buf) = &self.w.grad {
                buf.add(&sdyx.iter().map(|&v| v as f32).collect::<Vec<_>>());
            }
            if let Some(buf) = &self.b.grad {
                buf.add(&sdy.iter().map(|&v| v as f32).collect::<Vec<_>>());
            }
            if !want_x {
                return Ok(None);
            }
            let st = cpu::Stats {
                mean: &used.mean,
                invstd: &used.invstd,
            };
            let dx = cpu::input_grad(xv, dy, mask, gv, st, train.then_some((&sdy, &sdyx)));
            Ok(Some(tensor(dx, x.shape())?))
        })?;
        Ok(first_only(dx))
    }
}

/// Batch norm of `x` over its last dimension, then ReLU6 if `relu6`:
/// batch statistics when `batch` (the running ones updated in place),
/// else the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    weight: &Weight,
    bias: &Weight,
    stats: &RunningStats,
    batch: bool,
    momentum: f64,
    eps: f64,
    relu6: bool,
) -> CResult<Tensor> {
    let vec = |v: &Var| v.as_tensor().flatten_all()?.to_vec1::<f32>();
    let running = if batch {
        None
    } else {
        Some((vec(&stats.mean)?, vec(&stats.var)?))
    };
    let used = Arc::new(Mutex::new(Used::default()));
    let op = BatchNormOp {
        eps: eps as f32,
        relu6,
        running,
        w: weight.clone(),
        b: bias.clone(),
        used: used.clone(),
    };
    let y = apply(op, [x, &weight.t, &bias.t])?;
    if batch {
        let u = used.lock().unwrap();
        update_running(stats, &u.mean, &u.var, u.rows, momentum)?;
    }
    Ok(y)
}

/// Move the running statistics towards a batch's (mean, biased variance
/// over `rows` values): torch keeps the unbiased variance; the count goes up.
pub(crate) fn update_running(
    stats: &RunningStats,
    mean: &[f32],
    var: &[f32],
    rows: usize,
    momentum: f64,
) -> CResult<()> {
    let vec = |v: &Var| v.as_tensor().flatten_all()?.to_vec1::<f32>();
    let m = momentum as f32;
    let n = rows as f32;
    let new_mean: Vec<f32> = vec(&stats.mean)?
        .iter()
        .zip(mean)
        .map(|(o, b)| (1.0 - m) * o + m * b)
        .collect();
    let new_var: Vec<f32> = vec(&stats.var)?
        .iter()
        .zip(var)
        .map(|(o, b)| (1.0 - m) * o + m * b * n / (n - 1.0))
        .collect();
    let shape = stats.mean.as_tensor().shape().clone();
    stats.mean.set(&tensor(new_mean, shape.clone())?)?;
    stats.var.set(&tensor(new_var, shape)?)?;
    let count = stats.count.as_tensor().to_dtype(candle_core::DType::F32)?;
    stats.count.set(&(count + 1.0)?)?;
    Ok(())
}

struct AvgPoolOp;

impl Op<1> for AvgPoolOp {
    fn name(&self) -> &'static str {
        "afinar-global-avg-pool"
    }
    fn cpu_fwd(&self, [xi]: [Input; 1]) -> Fwd {
        let x = xi.f32s("avg_pool input")?;
        let &[b, h, w, c] = xi.dims() else {
            return Err(cerr(format!(
                "global average pooling: input must be [B, H, W, C], found {:?}",
                xi.dims()
            )));
        };
        let hw = h * w;
        let mut y = vec![0f32; b * c];
        for (bi, out) in y.chunks_mut(c.max(1)).enumerate() {
            for p in 0..hw {
                for (o, v) in out.iter_mut().zip(&x[(bi * hw + p) * c..][..c]) {
                    *o += v;
                }
            }
            out.iter_mut().for_each(|o| *o /= hw as f32);
        }
        output(y, (b, c))
    }
    fn bwd(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        let [b, h, w, c] = x.dims() else {
            return Err(cerr("global average pooling: input must be [B, H, W, C]"));
        };
        let (hw, c) = (h * w, *c);
        let dx = with_f32s([grad], ["avg_pool grad"], |[dy]| {
            let mut dx = vec![0f32; b * hw * c];
            for (i, px) in dx.chunks_mut(c.max(1)).enumerate() {
                let row = &dy[(i / hw) * c..][..c];
                for (d, g) in px.iter_mut().zip(row) {
                    *d = g / hw as f32;
                }
            }
            tensor(dx, x.shape())
        })?;
        Ok([Some(dx)])
    }
}

/// The mean over height and width: `[B, H, W, C]` to `[B, C]`
/// (torchvision's `adaptive_avg_pool2d(x, (1, 1))` then flatten).
pub fn global_avg_pool(x: &Tensor) -> CResult<Tensor> {
    apply(AvgPoolOp, [x])
}

pub(crate) mod cpu {
    use super::*;
    use crate::nn::kernels;
    use std::mem::MaybeUninit;

    /// The statistics a forward normalised with.
    #[derive(Clone, Copy)]
    pub(crate) struct Stats<'a> {
        pub mean: &'a [f32],
        pub invstd: &'a [f32],
    }

    /// Rows summed in f32 before they are added into the f64 sums: a
    /// channel whose values are large and nearly equal (an image's
    /// background) loses its mean in a long f32 sum, and with a small
    /// variance that error is the normalised value's.
    const BLOCK: usize = 16;

    /// Per-channel sums of `f(row, acc)` over the rows: f32 within blocks
    /// of [`BLOCK`] rows, f64 across them; chunks of rows in parallel.
    fn channel_sums<const K: usize>(
        rows: usize,
        c: usize,
        f: impl Fn(usize, &mut [Vec<f32>; K]) + Sync,
    ) -> [Vec<f64>; K] {
        let parts: Vec<[Vec<f64>; K]> = (0..rows.div_ceil(ROWS))
            .into_par_iter()
            .map(|k| {
                let mut acc: [Vec<f32>; K] = std::array::from_fn(|_| vec![0f32; c]);
                let mut wide: [Vec<f64>; K] = std::array::from_fn(|_| vec![0f64; c]);
                let end = ((k + 1) * ROWS).min(rows);
                let mut r0 = k * ROWS;
                while r0 < end {
                    let r1 = (r0 + BLOCK).min(end);
                    simd::run(
                        #[inline(always)]
                        || {
                            for r in r0..r1 {
                                f(r, &mut acc);
                            }
                        },
                    );
                    for (w, a) in wide.iter_mut().zip(acc.iter_mut()) {
                        for (s, v) in w.iter_mut().zip(a.iter_mut()) {
                            *s += *v as f64;
                            *v = 0.0;
                        }
                    }
                    r0 = r1;
                }
                wide
            })
            .collect();
        let mut out: [Vec<f64>; K] = std::array::from_fn(|_| vec![0f64; c]);
        for p in parts {
            for (o, a) in out.iter_mut().zip(p) {
                for (s, v) in o.iter_mut().zip(a) {
                    *s += v;
                }
            }
        }
        out
    }

    /// Mean and biased variance per channel: the mean of the values less
    /// the first row's (small when they are nearly equal), then the
    /// variance around the mean (not E[x²] - E[x]²).
    pub(crate) fn moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
        let rows = x.len() / c;
        let pivot = &x[..c];
        let [s] = channel_sums::<1>(
            rows,
            c,
            #[inline(always)]
            |r, [a]| {
                let xr = &x[r * c..(r + 1) * c];
                for i in 0..c {
                    a[i] += xr[i] - pivot[i];
                }
            },
        );
        let mean: Vec<f32> = (0..c)
            .map(|i| (pivot[i] as f64 + s[i] / rows as f64) as f32)
            .collect();
        let [q] = channel_sums::<1>(
            rows,
            c,
            #[inline(always)]
            |r, [a]| {
                let xr = &x[r * c..(r + 1) * c];
                for i in 0..c {
                    let d = xr[i] - mean[i];
                    a[i] += d * d;
                }
            },
        );
        let var = q.iter().map(|v| (v / rows as f64) as f32).collect();
        (mean, var)
    }

    pub(crate) fn normalise(
        x: &[f32],
        mean: &[f32],
        invstd: &[f32],
        g: &[f32],
        b: &[f32],
        relu6: bool,
    ) -> Vec<f32> {
        let c = g.len();
        let scale: Vec<f32> = g.iter().zip(invstd).map(|(g, s)| g * s).collect();
        let (lo, hi) = if relu6 {
            (0.0, 6.0)
        } else {
            (f32::NEG_INFINITY, f32::INFINITY)
        };
        // SAFETY: every row of every chunk is written.
        unsafe {
            kernels::map_rows(
                x,
                c,
                #[inline(always)]
                |xr, yr| {
                    for i in 0..c {
                        // (x - mean) first: with a small variance, x * scale and
                        // mean * scale are large and nearly cancel (a ReLU6 mask
                        // at the edge of 0 flipped over whole image backgrounds).
                        let z = (xr[i] - mean[i]) * scale[i] + b[i];
                        yr[i] = MaybeUninit::new(z.max(lo).min(hi));
                    }
                },
            )
        }
    }

    /// The ReLU6 mask of an output value: 1 inside (0, 6), else 0.
    #[inline(always)]
    fn inside(y: f32) -> f32 {
        ((y > 0.0) & (y < 6.0)) as u8 as f32
    }

    /// Σ dy and Σ dy·x̂ per channel (dy masked by the ReLU6 output).
    pub(crate) fn grad_sums(
        x: &[f32],
        dy: &[f32],
        y: Option<&[f32]>,
        mean: &[f32],
        invstd: &[f32],
        c: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let rows = x.len() / c;
        let [sdy, sdyx] = match y {
            Some(y) => channel_sums::<2>(
                rows,
                c,
                #[inline(always)]
                |r, [a, b]| {
                    let o = r * c;
                    let (xr, gr, yr) = (&x[o..o + c], &dy[o..o + c], &y[o..o + c]);
                    for i in 0..c {
                        let g = gr[i] * inside(yr[i]);
                        a[i] += g;
                        b[i] += g * (xr[i] - mean[i]) * invstd[i];
                    }
                },
            ),
            None => channel_sums::<2>(
                rows,
                c,
                #[inline(always)]
                |r, [a, b]| {
                    let o = r * c;
                    let (xr, gr) = (&x[o..o + c], &dy[o..o + c]);
                    for i in 0..c {
                        a[i] += gr[i];
                        b[i] += gr[i] * (xr[i] - mean[i]) * invstd[i];
                    }
                },
            ),
        };
        (sdy, sdyx)
    }

    /// dx: with batch statistics `γ σ⁻¹ (dy - Σdy/N - x̂ Σdy·x̂/N)`, with
    /// running ones `γ σ⁻¹ dy`.
    pub(crate) fn input_grad(
        x: &[f32],
        dy: &[f32],
        y: Option<&[f32]>,
        g: &[f32],
        used: Stats,
        sums: Option<(&Vec<f64>, &Vec<f64>)>,
    ) -> Vec<f32> {
        let c = g.len();
        let n = (x.len() / c) as f64;
        let scale: Vec<f32> = g.iter().zip(used.invstd).map(|(g, s)| g * s).collect();
        let (a, b): (Vec<f32>, Vec<f32>) = match sums {
            Some((sdy, sdyx)) => (
                sdy.iter().map(|v| (v / n) as f32).collect(),
                sdyx.iter().map(|v| (v / n) as f32).collect(),
            ),
            None => (vec![0.0; c], vec![0.0; c]),
        };
        let (mean, invstd) = (used.mean, used.invstd);
        // SAFETY: the chunks cover the output and every element is written.
        unsafe {
            kernels::new_filled(x.len(), |out| {
                out.par_chunks_mut(ROWS * c)
                    .enumerate()
                    .for_each(|(k, oc)| {
                        simd::run(
                            #[inline(always)]
                            || {
                                for (ri, d) in oc.chunks_exact_mut(c).enumerate() {
                                    let o = (k * ROWS + ri) * c;
                                    let (xr, gr) = (&x[o..o + c], &dy[o..o + c]);
                                    match y {
                                        Some(y) => {
                                            let yr = &y[o..o + c];
                                            for i in 0..c {
                                                let xh = (xr[i] - mean[i]) * invstd[i];
                                                let gi = gr[i] * inside(yr[i]);
                                                d[i] = MaybeUninit::new(
                                                    scale[i] * (gi - a[i] - xh * b[i]),
                                                );
                                            }
                                        }
                                        None => {
                                            for i in 0..c {
                                                let xh = (xr[i] - mean[i]) * invstd[i];
                                                d[i] = MaybeUninit::new(
                                                    scale[i] * (gr[i] - a[i] - xh * b[i]),
                                                );
                                            }
                                        }
                                    }
                                }
                            },
                        )
                    })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, f64s, randn};
    use candle_core::Device;

    fn stats(c: usize, mean: f32, var: f32) -> RunningStats {
        let v = |x: f32| Var::from_vec(vec![x; c], c, &Device::Cpu).unwrap();
        RunningStats {
            mean: v(mean),
            var: v(var),
            count: Var::from_vec(vec![0f32], (), &Device::Cpu).unwrap(),
        }
    }

    /// Batch norm in f64 over the rows of `[rows, c]`.
    fn reference(
        x: &[f64],
        g: &[f64],
        b: &[f64],
        running: Option<(f64, f64)>,
        relu6: bool,
    ) -> Vec<f64> {
        let c = g.len();
        let rows = x.len() / c;
        let mut y = vec![0f64; x.len()];
        for i in 0..c {
            let (mean, var) = running.unwrap_or_else(|| {
                let m = (0..rows).map(|r| x[r * c + i]).sum::<f64>() / rows as f64;
                let v = (0..rows).map(|r| (x[r * c + i] - m).powi(2)).sum::<f64>() / rows as f64;
                (m, v)
            });
            for r in 0..rows {
                let z = (x[r * c + i] - mean) / (var + 1e-5).sqrt() * g[i] + b[i];
                y[r * c + i] = if relu6 { z.clamp(0.0, 6.0) } else { z };
            }
        }
        y
    }

    fn case(batch: bool, relu6: bool) {
        let x = (randn(&[2, 3, 4, 5], 1) * 3.0).unwrap();
        let g = (randn(&[5], 2) * 2.0).unwrap();
        let b = (randn(&[5], 3) + 1.5).unwrap();
        let st = stats(5, 0.3, 2.0);
        let running = (!batch).then_some((0.3f32 as f64, 2.0f32 as f64));
        check(
            &[x, g, b],
            &|a| batch_norm(&a[0].t, &a[1], &a[2], &st, batch, 0.1, 1e-5, relu6).unwrap(),
            &|a| reference(&a[0], &a[1], &a[2], running, relu6),
            1,
        );
    }

    #[test]
    fn batch_statistics_over_many_row_chunks() {
        // 2 x 24 x 24 rows: several chunks of the parallel sums.
        let x = (randn(&[2, 24, 24, 3], 4) * 2.0).unwrap();
        let g = (randn(&[3], 5) + 1.5).unwrap();
        let b = randn(&[3], 6);
        let st = stats(3, 0.0, 1.0);
        check(
            &[x, g, b],
            &|a| batch_norm(&a[0].t, &a[1], &a[2], &st, true, 0.1, 1e-5, true).unwrap(),
            &|a| reference(&a[0], &a[1], &a[2], None, true),
            37,
        );
    }

    #[test]
    fn batch_statistics_forward_and_backward() {
        case(true, false);
        case(true, true);
    }

    #[test]
    fn running_statistics_forward_and_backward() {
        case(false, false);
        case(false, true);
    }

    #[test]
    fn running_statistics_move_with_momentum_unbiased() {
        let x = randn(&[6, 2], 7);
        let xs = f64s(&x);
        let st = stats(2, 0.5, 1.5);
        let w = Weight::frozen(Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).unwrap());
        let b = Weight::frozen(Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap());
        batch_norm(&x, &w, &b, &st, true, 0.1, 1e-5, false).unwrap();
        let mean = f64s(st.mean.as_tensor());
        let var = f64s(st.var.as_tensor());
        for i in 0..2 {
            let col: Vec<f64> = (0..6).map(|r| xs[r * 2 + i]).collect();
            let m = col.iter().sum::<f64>() / 6.0;
            let v = col.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 5.0;
            assert!((mean[i] - (0.9 * 0.5 + 0.1 * m)).abs() < 1e-6);
            assert!((var[i] - (0.9 * 1.5 + 0.1 * v)).abs() < 1e-6);
        }
        assert_eq!(f64s(st.count.as_tensor()), vec![1.0]);
        // Running statistics are read, not written.
        batch_norm(&x, &w, &b, &st, false, 0.1, 1e-5, false).unwrap();
        assert_eq!(f64s(st.mean.as_tensor()), mean);
        assert_eq!(f64s(st.count.as_tensor()), vec![1.0]);
    }

    #[test]
    fn global_average_pooling_forward_and_backward() {
        let x = randn(&[2, 3, 2, 4], 5);
        check(
            &[x],
            &|a| global_avg_pool(&a[0].t).unwrap(),
            &|a| {
                let mut y = vec![0f64; 8];
                for b in 0..2 {
                    for p in 0..6 {
                        for c in 0..4 {
                            y[b * 4 + c] += a[0][(b * 6 + p) * 4 + c] / 6.0;
                        }
                    }
                }
                y
            },
            1,
        );
    }
}
