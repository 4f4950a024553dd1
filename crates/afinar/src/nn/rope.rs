//! Rotary position embeddings (Su et al. 2021, RoFormer,
//! <https://arxiv.org/abs/2104.09864>) in transformers' `rotate_half` layout,
//! with hand-written backward: the rotation's transpose is its inverse, so
//! the gradient is rotated back by the same angles. Tables and positions
//! follow transformers (v4.4x) `models/llama/modeling_llama.py`
//! (`LlamaRotaryEmbedding`, `rotate_half` / `apply_rotary_pos_emb`) and
//! `modeling_rope_utils.py` (`_compute_default_rope_parameters`,
//! `_compute_llama3_parameters`).

use super::custom_op::{apply, cerr, output, tensor, with_f32, CResult, Fwd, Grads, Input, Op};
use candle_core::Tensor;
use std::sync::Arc;

/// Rotary embedding tables: `cos[p * half + i]`, `sin[p * half + i]` for
/// position `p < max_pos` and frequency `i < head_dim / 2`. The angles are
/// computed in f64 and stored as f32 (transformers computes them in f32,
/// which differs by ~1e-7 * position radians).
#[derive(Debug, Clone)]
pub struct RopeTable {
    head_dim: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// HF default rope: `inv_freq[i] = theta^(-2i / head_dim)`.
    pub fn new(head_dim: usize, theta: f64, max_pos: usize) -> RopeTable {
        Self::from_inv_freq(head_dim, &default_inv_freq(head_dim, theta), max_pos, 1.0)
    }

    /// Llama 3.x `rope_type = "llama3"` scaling
    /// (`modeling_rope_utils._compute_llama3_parameters`): long wavelengths
    /// are divided by `factor`, short ones kept, the band between blended.
    pub fn llama3(
        head_dim: usize,
        theta: f64,
        max_pos: usize,
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_pos: usize,
    ) -> RopeTable {
        let old = original_max_pos as f64;
        let low_wavelen = old / low_freq_factor;
        let high_wavelen = old / high_freq_factor;
        let inv: Vec<f64> = default_inv_freq(head_dim, theta)
            .into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let s =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - s) * f / factor + s * f
                }
            })
            .collect();
        Self::from_inv_freq(head_dim, &inv, max_pos, 1.0)
    }

    /// Tables from explicit inverse frequencies (`head_dim / 2` of them) and
    /// an amplitude (`attention_scaling` of the scaled rope variants; 1.0 for
    /// default and llama3).
    pub fn from_inv_freq(
        head_dim: usize,
        inv_freq: &[f64],
        max_pos: usize,
        attention_scaling: f64,
    ) -> RopeTable {
        assert!(
            head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} must be even"
        );
        let half = head_dim / 2;
        assert_eq!(inv_freq.len(), half, "rope: need head_dim / 2 frequencies");
        let mut cos = vec![0f32; max_pos * half];
        let mut sin = vec![0f32; max_pos * half];
        for p in 0..max_pos {
            for i in 0..half {
                let a = p as f64 * inv_freq[i];
                cos[p * half + i] = (a.cos() * attention_scaling) as f32;
                sin[p * half + i] = (a.sin() * attention_scaling) as f32;
            }
        }
        RopeTable {
            head_dim,
            max_pos,
            cos,
            sin,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn max_pos(&self) -> usize {
        self.max_pos
    }
    /// The whole (cos, sin) tables, `max_pos x head_dim / 2` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }
    /// (cos, sin) rows of `head_dim / 2` for position `p`.
    pub fn row(&self, p: usize) -> (&[f32], &[f32]) {
        let h = self.head_dim / 2;
        (&self.cos[p * h..(p + 1) * h], &self.sin[p * h..(p + 1) * h])
    }
}

fn default_inv_freq(head_dim: usize, theta: f64) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| theta.powf(-((2 * i) as f64) / head_dim as f64))
        .collect()
}

/// The first position in `positions` that is >= the table's `max_pos`.
fn rope_check_positions(table: &RopeTable, positions: &[u32]) -> Option<u32> {
    positions
        .iter()
        .copied()
        .find(|&p| p as usize >= table.max_pos)
}

// ------------------------------------------------------------------ the op

struct RopeOp {
    table: Arc<RopeTable>,
    positions: Arc<Vec<u32>>,
    heads: usize,
}

impl RopeOp {
    fn check(&self, dims: &[usize]) -> CResult<()> {
        let d = self.table.head_dim();
        let [b, t, c] = dims else {
            return Err(cerr(format!(
                "rope: x must be [B, T, heads * D], found {dims:?}"
            )));
        };
        if *c != self.heads * d {
            return Err(cerr(format!(
                "rope: width {c} is not {} heads x head_dim {d}",
                self.heads
            )));
        }
        if self.positions.len() != b * t {
            return Err(cerr(format!(
                "rope: {} positions for [B={b}, T={t}]",
                self.positions.len()
            )));
        }
        if let Some(p) = rope_check_positions(&self.table, &self.positions) {
            return Err(cerr(format!(
                "rope: position {p} >= max_pos {} of the rope table",
                self.table.max_pos()
            )));
        }
        Ok(())
    }
}

impl Op<1> for RopeOp {
    fn name(&self) -> &'static str {
        "afinar-rope"
    }
    fn cpu_fwd(&self, [x]: [Input; 1]) -> Fwd {
        self.check(x.dims())?;
        let xv = x.f32s("rope input")?;
        let mut y = vec![0f32; xv.len()];
        cpu::rope_apply(xv, &self.table, &self.positions, self.heads, false, &mut y);
        output(y, x.shape())
    }
    fn bwd(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        // A rotation's transpose is its inverse: rotate the gradient back.
        with_f32(grad, "rope grad", |g| {
            let mut dx = vec![0f32; g.len()];
            cpu::rope_apply(g, &self.table, &self.positions, self.heads, true, &mut dx);
            Ok([Some(tensor(dx, x.shape())?)])
        })
    }
}

/// Rotary position embedding in transformers' `rotate_half` layout, applied
/// to every head of x `[B, T, heads * D]` (D = the table's head_dim);
/// `positions[b * T + t]` is the position id of each token (packing restarts
/// them per example). A position >= the table's `max_pos` is an error.
pub fn rope(
    x: &Tensor,
    table: &Arc<RopeTable>,
    positions: &Arc<Vec<u32>>,
    heads: usize,
) -> CResult<Tensor> {
    let op = RopeOp {
        table: table.clone(),
        positions: positions.clone(),
        heads,
    };
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        op.check(x.dims())?;
        return cuda::rope(x, table, positions, heads);
    }
    apply(op, [x])
}

/// The CPU kernel.
mod cpu {
    use super::RopeTable;
    use crate::nn::kernels::ROW_CHUNK;
    use crate::simd;
    use rayon::prelude::*;

    /// Rotate every head of every row of `x` (`[rows, heads * head_dim]`, row
    /// `r` at position `positions[r]`) in the `rotate_half` layout:
    /// out[i] = x[i] cos - x[i+h] sin ; out[i+h] = x[i+h] cos + x[i] sin.
    /// `inverse` rotates by the negative angle (the backward: the rotation's
    /// transpose). Positions must have been checked against the table.
    pub fn rope_apply(
        x: &[f32],
        table: &RopeTable,
        positions: &[u32],
        heads: usize,
        inverse: bool,
        out: &mut [f32],
    ) {
        let d = table.head_dim;
        let half = d / 2;
        let c = heads * d;
        let sgn = if inverse { -1.0f32 } else { 1.0 };
        out.par_chunks_mut(c * ROW_CHUNK)
            .zip(x.par_chunks(c * ROW_CHUNK))
            .enumerate()
            .for_each(|(ci, (oc, xc))| {
                simd::run(
                    #[inline(always)]
                    || {
                        for (r, (orow, xrow)) in oc.chunks_mut(c).zip(xc.chunks(c)).enumerate() {
                            let (cos, sin) = table.row(positions[ci * ROW_CHUNK + r] as usize);
                            for (oh, xh) in orow.chunks_mut(d).zip(xrow.chunks(d)) {
                                let (o1, o2) = oh.split_at_mut(half);
                                let (x1, x2) = xh.split_at(half);
                                for i in 0..half {
                                    let s = sgn * sin[i];
                                    o1[i] = x1[i] * cos[i] - x2[i] * s;
                                    o2[i] = x2[i] * cos[i] + x1[i] * s;
                                }
                            }
                        }
                    },
                )
            });
    }
}

/// The CUDA entry (kernel `rope_*` in `cuda_kernels.cu`); the tables and
/// positions are uploaded once per forward pass.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{
        attach, blocks, cuda_dev, empty, launch, ptr, sfx, upload, upload_with, Timer, A,
    };
    use crate::nn::custom_op::CResult;
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    fn rope_apply(
        x: &Tensor,
        tables: &(Tensor, Tensor),
        pos: &Tensor,
        heads: usize,
        hd: usize,
        sgn: f32,
    ) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let dt = x.dtype();
        let s = sfx(dt, "rope")?;
        let x = x.contiguous()?;
        let rows = x.elem_count() / (heads * hd);
        let y = empty(x.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("rope_{s}"),
            (blocks(rows * heads * hd / 2), 1),
            256,
            &[
                A::P(ptr(&x)?),
                A::P(ptr(&y)?),
                A::P(ptr(&tables.0)?),
                A::P(ptr(&tables.1)?),
                A::P(ptr(pos)?),
                A::L(rows as i64),
                A::I(heads as i32),
                A::I(hd as i32),
                A::F(sgn),
            ],
        )?;
        Ok(y)
    }

    pub(super) fn rope(
        x: &Tensor,
        table: &Arc<super::RopeTable>,
        positions: &Arc<Vec<u32>>,
        heads: usize,
    ) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let _t = Timer::start("afinar-cuda-rope", "forward", &dev);
        let hd = table.head_dim();
        // cos then sin, uploaded once per table.
        let both = upload_with(table, &dev, |t| {
            let (c, sn) = t.tables();
            let v: Vec<f32> = c.iter().chain(sn).copied().collect();
            Tensor::from_vec(v, 2 * c.len(), &Device::Cuda(dev.clone()))
        })?;
        let half = both.elem_count() / 2;
        let (cos, sin) = (both.narrow(0, 0, half)?, both.narrow(0, half, half)?);
        let tables = (cos, sin);
        let pos = upload(positions, &dev)?;
        let xd = x.detach();
        let y = rope_apply(&xd, &tables, &pos, heads, hd, 1.0)?;
        attach("afinar-cuda-rope", &[x], y, move |g| {
            Ok(vec![Some(rope_apply(g, &tables, &pos, heads, hd, -1.0)?)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, max_abs_diff, rand_vec, randn};

    fn rope_ref(x: &[f64], pos: &[u32], heads: usize, d: usize, theta: f64) -> Vec<f64> {
        let half = d / 2;
        let mut y = vec![0.0; x.len()];
        for (row, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let o = row * heads * d + h * d;
                for i in 0..half {
                    let a = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                    let (x1, x2) = (x[o + i], x[o + i + half]);
                    y[o + i] = x1 * a.cos() - x2 * a.sin();
                    y[o + i + half] = x2 * a.cos() + x1 * a.sin();
                }
            }
        }
        y
    }

    #[test]
    fn rope_matches_reference_and_grads() {
        let (b, t, d, theta) = (2, 5, 8, 10_000.0);
        let table = Arc::new(RopeTable::new(d, theta, 16));
        let pos = Arc::new(vec![7u32, 0, 3, 3, 15, 1, 2, 9, 4, 0]);
        for heads in [4, 2] {
            let x = randn(&[b, t, heads * d], 10 + heads as u64);
            let (tb, p) = (table.clone(), pos.clone());
            check(
                &[x],
                &move |a| rope(&a[0].t, &tb, &p, heads).unwrap(),
                &|a| rope_ref(&a[0], &pos, heads, d, theta),
                1,
            );
        }
        // Another theta (Llama 3's 500000) and head_dim.
        let table = Arc::new(RopeTable::new(16, 500_000.0, 64));
        let pos = Arc::new((0..6u32).map(|i| i * 11).collect::<Vec<_>>());
        let x = randn(&[1, 6, 3 * 16], 12);
        let (tb, p) = (table.clone(), pos.clone());
        check(
            &[x],
            &move |a| rope(&a[0].t, &tb, &p, 3).unwrap(),
            &|a| rope_ref(&a[0], &pos, 3, 16, 500_000.0),
            1,
        );
    }

    #[test]
    fn rope_inverse_norm_relative_position_and_errors() {
        let (d, heads) = (8, 2);
        let table = RopeTable::new(d, 10_000.0, 32);
        let x = rand_vec(3 * heads * d, 20, 1.0);
        let pos = [5u32, 17, 31];
        let mut y = vec![0f32; x.len()];
        let mut back = vec![0f32; x.len()];
        cpu::rope_apply(&x, &table, &pos, heads, false, &mut y);
        cpu::rope_apply(&y, &table, &pos, heads, true, &mut back);
        assert!(max_abs_diff(&x, &back) < 1e-6, "inverse rotation");
        for (xh, yh) in x.chunks(d).zip(y.chunks(d)) {
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(xh) - n(yh)).abs() < 1e-5, "rotation keeps the norm");
        }
        // <rope(q, m), rope(k, n)> depends on m - n only.
        let (q, k) = (rand_vec(d, 21, 1.0), rand_vec(d, 22, 1.0));
        let score = |m: u32, n: u32| {
            let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
            cpu::rope_apply(&q, &table, &[m], 1, false, &mut a);
            cpu::rope_apply(&k, &table, &[n], 1, false, &mut b);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(9, 4) - score(25, 20)).abs() < 1e-5);
        assert!((score(3, 3) - q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()).abs() < 1e-5);
        // The tables are theta^(-2i/D) angles.
        let (cos, sin) = table.row(3);
        let a = 3.0 * 10_000f64.powf(-2.0 / 8.0);
        assert!((cos[1] as f64 - a.cos()).abs() < 1e-7 && (sin[1] as f64 - a.sin()).abs() < 1e-7);
        // A position past the table names both.
        let t = Arc::new(table);
        let xs = randn(&[1, 2, heads * d], 23);
        let e = rope(&xs, &t, &Arc::new(vec![3, 32]), heads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 32") && e.contains("max_pos 32"), "{e}");
        let e = rope(&xs, &t, &Arc::new(vec![3]), heads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 positions"), "{e}");
    }

    #[test]
    fn rope_llama3_scaling_bands() {
        // Llama 3.1: factor 8, low 1, high 4, original context 8192.
        let (d, theta) = (128, 500_000.0);
        let plain = RopeTable::new(d, theta, 2);
        let scaled = RopeTable::llama3(d, theta, 2, 8.0, 1.0, 4.0, 8192);
        let angle = |t: &RopeTable, i: usize| {
            let (c, s) = t.row(1);
            (s[i] as f64).atan2(c[i] as f64)
        };
        // Short wavelengths (high frequencies) are kept ...
        assert!((angle(&plain, 0) - angle(&scaled, 0)).abs() < 1e-6);
        // ... long ones (wavelength > 8192) are slowed down by the factor.
        let last = d / 2 - 1;
        assert!((angle(&plain, last) / 8.0 - angle(&scaled, last)).abs() < 1e-9);
        // In between: bounded by both.
        for i in 0..d / 2 {
            let (p, s) = (angle(&plain, i), angle(&scaled, i));
            assert!(s <= p + 1e-7 && s >= p / 8.0 - 1e-9, "band {i}: {s} vs {p}");
        }
    }
}
