//! Normalisation layers over the last dimension: LayerNorm (BERT, GPT-2)
//! and RMSNorm (the Llama family), on afinar's fused ops with backward
//! (`nn::layer_norm`, `nn::rms_norm`). Built from their parameters
//! (`params::Path::layer_norm` / `rms_norm` read them by checkpoint path).
//!
//! Below the layers, the two ops. LayerNorm (Ba et al. 2016,
//! <https://arxiv.org/abs/1607.06450>; torch's `nn.LayerNorm`) recomputes
//! its row statistics in backward and reduces dγ/dβ per chunk of rows;
//! RMSNorm (Zhang & Sennrich 2019, <https://arxiv.org/abs/1910.07467>) is
//! transformers' `LlamaRMSNorm` (`models/llama/modeling_llama.py`). A
//! trainable weight or bias accumulates its gradient, summed over rows,
//! into its buffer; a frozen one costs nothing.

use super::custom_op::{
    apply, cerr, first_only, last_dim, needs_grad, output, tensor, with_f32s, CResult, Fwd, Grads,
    Input, Op,
};
use crate::nn::{self, Weight};
use crate::Result;
use candle_core::Tensor;

/// `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Weight,
    pub bias: Weight,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }

    /// A trainable tensor of the layer, if any (see [`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        [&self.weight, &self.bias]
            .into_iter()
            .find(|w| w.is_trainable())
            .map(|w| w.t.clone())
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Weight,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The weight, if it trains (see [`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        self.weight.is_trainable().then(|| self.weight.t.clone())
    }
}

// ------------------------------------------------------------------ the LayerNorm op

struct LayerNormOp {
    eps: f32,
    w: Weight,
    b: Weight,
}

impl Op<3> for LayerNormOp {
    fn name(&self) -> &'static str {
        "afinar-layer-norm"
    }
    fn cpu_fwd(&self, [xi, gi, bi]: [Input; 3]) -> Fwd {
        let x = xi.f32s("layer_norm input")?;
        let g = gi.f32s("layer_norm weight")?;
        let b = bi.f32s("layer_norm bias")?;
        let d = g.len();
        if xi.dims().last() != Some(&d) || b.len() != d {
            return Err(cerr(format!(
                "layer_norm: input {:?}, weight [{d}], bias [{}]",
                xi.dims(),
                b.len()
            )));
        }
        output(cpu::layer_norm_fwd(x, g, b, self.eps, d), xi.shape())
    }
    fn bwd(&self, [x, g, _b]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let d = g.elem_count();
        let want_params = self.w.grad.is_some() || self.b.grad.is_some();
        let names = ["layer_norm input", "layer_norm weight", "layer_norm grad"];
        let dx = with_f32s([x, g, grad], names, |[xv, gv, dy]| {
            let mut dx = needs_grad(x).then(|| vec![0f32; xv.len()]);
            let (dg, db) =
                cpu::layer_norm_bwd(xv, gv, dy, self.eps, d, dx.as_deref_mut(), want_params);
            if let Some(buf) = &self.w.grad {
                buf.add(&dg);
            }
            if let Some(buf) = &self.b.grad {
                buf.add(&db);
            }
            dx.map(|v| tensor(v, x.shape())).transpose()
        })?;
        Ok(first_only(dx))
    }
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Weight, bias: &Weight, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::layer_norm(x, weight, bias, eps as f32);
    }
    let op = LayerNormOp {
        eps: eps as f32,
        w: weight.clone(),
        b: bias.clone(),
    };
    apply(op, [x, &weight.t, &bias.t])
}

// ------------------------------------------------------------------ the RMSNorm op

struct RmsNormOp {
    eps: f32,
    w: Weight,
}

impl Op<2> for RmsNormOp {
    fn name(&self) -> &'static str {
        "afinar-rms-norm"
    }
    fn cpu_fwd(&self, [xi, wi]: [Input; 2]) -> Fwd {
        let x = xi.f32s("rms_norm input")?;
        let w = wi.f32s("rms_norm weight")?;
        let d = w.len();
        if last_dim(xi.dims(), "rms_norm")? != d {
            return Err(cerr(format!(
                "rms_norm: input {:?} but weight [{d}]",
                xi.dims()
            )));
        }
        output(cpu::rms_norm_fwd(x, w, self.eps, d), xi.shape())
    }
    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let d = w.elem_count();
        let want_dx = needs_grad(x);
        let want_w = self.w.grad.is_some();
        if !want_dx && !want_w {
            return Ok([None, None]);
        }
        let names = ["rms_norm input", "rms_norm weight", "rms_norm grad"];
        let dx = with_f32s([x, w, grad], names, |[xv, wv, dy]| {
            let mut dx = want_dx.then(|| vec![0f32; xv.len()]);
            let dw = cpu::rms_norm_bwd(xv, wv, dy, self.eps, d, dx.as_deref_mut(), want_w);
            if let Some(buf) = &self.w.grad {
                buf.add(&dw);
            }
            dx.map(|v| tensor(v, x.shape())).transpose()
        })?;
        Ok(first_only(dx))
    }
}

/// `LlamaRMSNorm` over the last dimension: `x / sqrt(mean(x^2) + eps) * w`,
/// x `[.., C]`, weight `[C]`. A trainable weight accumulates its gradient
/// (summed over rows) into its buffer.
pub fn rms_norm(x: &Tensor, weight: &Weight, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::rms_norm(x, weight, eps as f32);
    }
    let op = RmsNormOp {
        eps: eps as f32,
        w: weight.clone(),
    };
    apply(op, [x, &weight.t])
}

/// The CPU kernels: one pass per row, rows in chunks of [`ROW_CHUNK`] per
/// rayon task.
///
/// [`ROW_CHUNK`]: crate::nn::kernels::ROW_CHUNK
mod cpu {
    use crate::nn::kernels::{dot_lanes, map_rows, reduce_lanes, sum_lanes, LANES, ROW_CHUNK};
    use crate::simd;
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    // ------------------------------------------------------------ LayerNorm

    /// y = (x - mean) / sqrt(var + eps) * gamma + beta, per row of width `d`.
    pub fn layer_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, d: usize) -> Vec<f32> {
        // SAFETY: every element of each row is written.
        unsafe {
            map_rows(
                x,
                d,
                #[inline(always)]
                |xr, yr| {
                    let (mean, rstd) = row_stats(xr, eps);
                    for j in 0..d {
                        yr[j] = MaybeUninit::new((xr[j] - mean) * rstd * gamma[j] + beta[j]);
                    }
                },
            )
        }
    }

    #[inline(always)]
    fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
        let d = xr.len() as f32;
        let mean = sum_lanes(xr) / d;
        let mut acc = [0f32; LANES];
        let chunks = xr.chunks_exact(LANES);
        let mut var: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += (c[i] - mean) * (c[i] - mean);
            }
        }
        var = (var + reduce_lanes(acc)) / d;
        (mean, 1.0 / (var + eps).sqrt())
    }

    /// Backward of LayerNorm, recomputing the row statistics from `x`.
    /// Writes dx (if given); returns (dgamma, dbeta) summed over rows.
    pub fn layer_norm_bwd(
        x: &[f32],
        gamma: &[f32],
        dy: &[f32],
        eps: f32,
        d: usize,
        mut dx: Option<&mut [f32]>,
        want_params: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let rows = x.len() / d;
        let chunks = rows.div_ceil(ROW_CHUNK);
        // Per-chunk partial sums of dgamma/dbeta, reduced after: no locks.
        let work = |c: usize, dxc: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
            let mut dg = if want_params {
                vec![0f32; d]
            } else {
                Vec::new()
            };
            let mut db = if want_params {
                vec![0f32; d]
            } else {
                Vec::new()
            };
            let r0 = c * ROW_CHUNK;
            let r1 = (r0 + ROW_CHUNK).min(rows);
            let mut dxc = dxc;
            let inv_d = 1.0 / d as f32;
            simd::run(
                #[inline(always)]
                || {
                    for r in r0..r1 {
                        let xr = &x[r * d..(r + 1) * d];
                        let dyr = &dy[r * d..(r + 1) * d];
                        let (mean, rstd) = row_stats(xr, eps);
                        if want_params {
                            for j in 0..d {
                                let xhat = (xr[j] - mean) * rstd;
                                dg[j] += dyr[j] * xhat;
                                db[j] += dyr[j];
                            }
                        }
                        let Some(dxc) = dxc.as_deref_mut() else {
                            continue;
                        };
                        // sum(g) and sum(g * xhat) with g = dy * gamma, in lanes.
                        let (mut ag, mut agx) = ([0f32; LANES], [0f32; LANES]);
                        let full = d - d % LANES;
                        for j0 in (0..full).step_by(LANES) {
                            for i in 0..LANES {
                                let j = j0 + i;
                                let g = dyr[j] * gamma[j];
                                ag[i] += g;
                                agx[i] += g * ((xr[j] - mean) * rstd);
                            }
                        }
                        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                        for j in full..d {
                            let g = dyr[j] * gamma[j];
                            sum_g += g;
                            sum_gx += g * ((xr[j] - mean) * rstd);
                        }
                        let (sum_g, sum_gx) =
                            (reduce_lanes(ag) + sum_g, reduce_lanes(agx) + sum_gx);
                        let dxr = &mut dxc[(r - r0) * d..(r - r0 + 1) * d];
                        for j in 0..d {
                            let xhat = (xr[j] - mean) * rstd;
                            let g = dyr[j] * gamma[j];
                            dxr[j] = rstd * (g - inv_d * sum_g - xhat * inv_d * sum_gx);
                        }
                    }
                },
            );
            (dg, db)
        };
        let partials: Vec<(Vec<f32>, Vec<f32>)> = match dx.as_deref_mut() {
            Some(dx) => dx
                .par_chunks_mut(d * ROW_CHUNK)
                .enumerate()
                .map(|(c, dxc)| work(c, Some(dxc)))
                .collect(),
            None => (0..chunks).into_par_iter().map(|c| work(c, None)).collect(),
        };
        let mut dg = vec![0f32; if want_params { d } else { 0 }];
        let mut db = vec![0f32; if want_params { d } else { 0 }];
        if want_params {
            for (g, b) in partials {
                for j in 0..d {
                    dg[j] += g[j];
                    db[j] += b[j];
                }
            }
        }
        (dg, db)
    }

    // ------------------------------------------------------------ RMSNorm

    /// `LlamaRMSNorm`: y = x / sqrt(mean(x^2) + eps) * w, per row of width `d`.
    pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, d: usize) -> Vec<f32> {
        // SAFETY: every element of each row is written.
        unsafe {
            map_rows(
                x,
                d,
                #[inline(always)]
                |xr, yr| {
                    let r = rms_rstd(xr, eps);
                    for j in 0..d {
                        yr[j] = MaybeUninit::new(xr[j] * r * w[j]);
                    }
                },
            )
        }
    }

    #[inline(always)]
    fn rms_rstd(xr: &[f32], eps: f32) -> f32 {
        1.0 / (dot_lanes(xr, xr) / xr.len() as f32 + eps).sqrt()
    }

    /// Backward of RMSNorm, recomputing 1/rms from `x`. Writes dx (if given);
    /// returns dw summed over rows (empty unless `want_w`).
    ///
    /// With r = (mean(x^2) + eps)^-1/2 and g = dy * w:
    /// dx = r g - x r^3 (g . x) / d ;  dw = sum over rows of dy * x * r.
    pub fn rms_norm_bwd(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        eps: f32,
        d: usize,
        dx: Option<&mut [f32]>,
        want_w: bool,
    ) -> Vec<f32> {
        let rows = x.len() / d;
        let work = |c: usize, mut dxc: Option<&mut [f32]>| -> Vec<f32> {
            let mut dw = if want_w { vec![0f32; d] } else { Vec::new() };
            let r0 = c * ROW_CHUNK;
            let r1 = (r0 + ROW_CHUNK).min(rows);
            simd::run(
                #[inline(always)]
                || {
                    for row in r0..r1 {
                        let xr = &x[row * d..(row + 1) * d];
                        let dyr = &dy[row * d..(row + 1) * d];
                        let r = rms_rstd(xr, eps);
                        if want_w {
                            for j in 0..d {
                                dw[j] += dyr[j] * xr[j] * r;
                            }
                        }
                        if let Some(dxc) = dxc.as_deref_mut() {
                            // (dy * w) . x, in lanes.
                            let mut acc = [0f32; LANES];
                            let (dc, wc, xc) = (
                                dyr.chunks_exact(LANES),
                                w.chunks_exact(LANES),
                                xr.chunks_exact(LANES),
                            );
                            let rest: f32 = (dc.remainder().iter().zip(wc.remainder()))
                                .zip(xc.remainder())
                                .map(|((a, b), c)| a * b * c)
                                .sum();
                            for ((a, b), c) in dc.zip(wc).zip(xc) {
                                for i in 0..LANES {
                                    acc[i] += a[i] * b[i] * c[i];
                                }
                            }
                            let gx = reduce_lanes(acc) + rest;
                            let k = r * r * r * gx / d as f32;
                            let dxr = &mut dxc[(row - r0) * d..(row - r0 + 1) * d];
                            for j in 0..d {
                                dxr[j] = r * dyr[j] * w[j] - k * xr[j];
                            }
                        }
                    }
                },
            );
            dw
        };
        let partials: Vec<Vec<f32>> = match dx {
            Some(dx) => dx
                .par_chunks_mut(d * ROW_CHUNK)
                .enumerate()
                .map(|(c, dxc)| work(c, Some(dxc)))
                .collect(),
            None => (0..rows.div_ceil(ROW_CHUNK))
                .into_par_iter()
                .map(|c| work(c, None))
                .collect(),
        };
        let mut dw = vec![0f32; if want_w { d } else { 0 }];
        for p in partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
        dw
    }
}

/// The CUDA entries (kernels `rms_*` and `ln_*` in `cuda_kernels.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{
        add_grad, attach, attach_storage, cast, cuda_dev, empty, empty_st, launch, ptr, sfx, sptr,
        Timer, A,
    };
    use crate::nn::custom_op::{cerr, CResult};
    use crate::nn::Weight;
    use candle_core::{DType, Tensor};

    pub(super) fn rms_norm(x: &Tensor, w: &Weight, eps: f32) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let _t = Timer::start("afinar-cuda-rms-norm", "forward", &dev);
        let x = x.contiguous()?;
        let dt = x.dtype();
        let s = sfx(dt, "rms_norm")?;
        let d = *x
            .dims()
            .last()
            .ok_or_else(|| cerr("rms_norm: scalar input"))?;
        let rows = x.elem_count() / d;
        let wc = cast(&w.t, dt)?;
        let y = empty_st(x.elem_count(), dt, &dev)?;
        let rstd = empty(rows, DType::F32, &dev)?;
        let xd = x.detach();
        launch(
            &dev,
            &format!("rms_fwd_{s}"),
            (rows as u32, 1),
            256,
            &[
                A::P(ptr(&xd)?),
                A::P(ptr(&wc)?),
                A::P(sptr(&y)),
                A::P(ptr(&rstd)?),
                A::I(d as i32),
                A::F(eps),
            ],
        )?;
        let want_dx = x.track_op();
        let wg = w.clone();
        let shape = x.shape().clone();
        attach_storage("afinar-cuda-rms-norm", &[&x, &w.t], y, shape, move |g| {
            let g = g.contiguous()?;
            if wg.grad.is_some() {
                // dw = sum over rows of dy * x * rstd
                let xh = xd
                    .to_dtype(DType::F32)?
                    .reshape((rows, d))?
                    .broadcast_mul(&rstd.reshape((rows, 1))?)?;
                let dw = (g.to_dtype(DType::F32)?.reshape((rows, d))? * xh)?.sum(0)?;
                add_grad(&wg, &dw)?;
            }
            if !want_dx {
                return Ok(vec![None]);
            }
            let dx = empty(xd.shape(), dt, &dev)?;
            launch(
                &dev,
                &format!("rms_bwd_{s}"),
                (rows as u32, 1),
                256,
                &[
                    A::P(ptr(&xd)?),
                    A::P(ptr(&wc)?),
                    A::P(ptr(&g)?),
                    A::P(ptr(&rstd)?),
                    A::P(ptr(&dx)?),
                    A::I(d as i32),
                ],
            )?;
            Ok(vec![Some(dx)])
        })
    }

    pub(super) fn layer_norm(x: &Tensor, w: &Weight, b: &Weight, eps: f32) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let _t = Timer::start("afinar-cuda-layer-norm", "forward", &dev);
        let x = x.contiguous()?;
        let dt = x.dtype();
        let s = sfx(dt, "layer_norm")?;
        let d = *x
            .dims()
            .last()
            .ok_or_else(|| cerr("layer_norm: scalar input"))?;
        let rows = x.elem_count() / d;
        let (wc, bc) = (cast(&w.t, dt)?, cast(&b.t, dt)?);
        let y = empty(x.shape(), dt, &dev)?;
        let mean = empty(rows, DType::F32, &dev)?;
        let rstd = empty(rows, DType::F32, &dev)?;
        let xd = x.detach();
        launch(
            &dev,
            &format!("ln_fwd_{s}"),
            (rows as u32, 1),
            256,
            &[
                A::P(ptr(&xd)?),
                A::P(ptr(&wc)?),
                A::P(ptr(&bc)?),
                A::P(ptr(&y)?),
                A::P(ptr(&mean)?),
                A::P(ptr(&rstd)?),
                A::I(d as i32),
                A::F(eps),
            ],
        )?;
        let want_dx = x.track_op();
        let (wg, bg) = (w.clone(), b.clone());
        attach("afinar-cuda-layer-norm", &[&x, &w.t, &b.t], y, move |g| {
            let g = g.contiguous()?;
            if wg.grad.is_some() || bg.grad.is_some() {
                let g32 = g.to_dtype(DType::F32)?.reshape((rows, d))?;
                if bg.grad.is_some() {
                    add_grad(&bg, &g32.sum(0)?)?;
                }
                if wg.grad.is_some() {
                    let xh = xd
                        .to_dtype(DType::F32)?
                        .reshape((rows, d))?
                        .broadcast_sub(&mean.reshape((rows, 1))?)?
                        .broadcast_mul(&rstd.reshape((rows, 1))?)?;
                    add_grad(&wg, &(g32 * xh)?.sum(0)?)?;
                }
            }
            if !want_dx {
                return Ok(vec![None]);
            }
            let dx = empty(xd.shape(), dt, &dev)?;
            launch(
                &dev,
                &format!("ln_bwd_{s}"),
                (rows as u32, 1),
                256,
                &[
                    A::P(ptr(&xd)?),
                    A::P(ptr(&wc)?),
                    A::P(ptr(&g)?),
                    A::P(ptr(&mean)?),
                    A::P(ptr(&rstd)?),
                    A::P(ptr(&dx)?),
                    A::I(d as i32),
                ],
            )?;
            Ok(vec![Some(dx)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, check_grads, flat, max_abs_diff, randn};
    use candle_core::Var;

    #[test]
    fn layer_norm_grads_match_finite_differences() {
        let x = randn(&[4, 6], 4);
        let vals = [x, (randn(&[6], 5) + 1.0).unwrap(), randn(&[6], 6)];
        check_grads(
            &vals,
            &|w| layer_norm(&w[0].t, &w[1], &w[2], 1e-5).unwrap(),
            2e-2,
        );
    }

    fn rms_norm_ref(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let d = w.len();
        let mut y = vec![0.0; x.len()];
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for j in 0..d {
                yr[j] = xr[j] * r * w[j];
            }
        }
        y
    }

    #[test]
    fn rms_norm_matches_reference_and_grads() {
        let x = (randn(&[2, 3, 8], 1) * 3.0).unwrap();
        let w = (randn(&[8], 2) + 1.0).unwrap();
        let eps = 1e-6;
        check(
            &[x, w],
            &|a| rms_norm(&a[0].t, &a[1], eps).unwrap(),
            &|a| rms_norm_ref(&a[0], &a[1], eps),
            1,
        );
        // A row wider than one 8-lane block plus a remainder.
        let x = randn(&[3, 21], 3);
        let w = (randn(&[21], 4) + 1.0).unwrap();
        check(
            &[x, w],
            &|a| rms_norm(&a[0].t, &a[1], 1e-5).unwrap(),
            &|a| rms_norm_ref(&a[0], &a[1], 1e-5),
            1,
        );
    }

    #[test]
    fn rms_norm_weight_grad_accumulates_and_frozen_passes_dx() {
        let x = Var::from_tensor(&randn(&[4, 8], 5)).unwrap();
        let w0 = (randn(&[8], 6) + 1.0).unwrap();
        // Frozen (a plain tensor: nothing to record a gradient in): x gets one.
        let frozen = Weight::frozen(w0.clone());
        let y = rms_norm(x.as_tensor(), &frozen, 1e-6).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        // Trainable: two backward passes add up in the buffer.
        let w = Weight::trainable(&w0).unwrap();
        let run = || {
            let y = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
            let grads = (y * randn(&[4, 8], 7))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                grads.get(&w.t).is_none(),
                "dw goes to the buffer, not to candle"
            );
            flat(&w.grad_tensor().unwrap().unwrap())
        };
        let once = run();
        let twice = run();
        let doubled: Vec<f32> = once.iter().map(|v| 2.0 * v).collect();
        assert!(max_abs_diff(&twice, &doubled) < 1e-5);
        // Only the weight trains (x is a constant): same dw, no dx work.
        w.grad.as_ref().unwrap().clear();
        let y = rms_norm(&x.as_tensor().detach(), &w, 1e-6).unwrap();
        let _ = (y * randn(&[4, 8], 7))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(&flat(&w.grad_tensor().unwrap().unwrap()), &once) < 1e-6);
        // A weight of the wrong width is an error naming both shapes.
        let bad = Weight::frozen(randn(&[7], 1));
        let e = rms_norm(x.as_tensor(), &bad, 1e-6).unwrap_err().to_string();
        assert!(e.contains("[4, 8]") && e.contains("[7]"), "{e}");
    }
}
