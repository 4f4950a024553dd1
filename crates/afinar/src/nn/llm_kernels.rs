//! Raw f32 kernels for decoder-only language models (Llama family, GPT-2):
//! RMSNorm, rotary position embeddings, SwiGLU, tanh-GELU, causal grouped-
//! query attention (with padding and packed-sequence segments), attention
//! over a KV cache, and the chunked LM-head cross-entropy.
//!
//! The maths follows Hugging Face transformers (v4.4x):
//! `models/llama/modeling_llama.py` (`LlamaRMSNorm`, `LlamaRotaryEmbedding`,
//! `rotate_half`/`apply_rotary_pos_emb`, `LlamaMLP`, `repeat_kv` +
//! `eager_attention_forward`), `modeling_rope_utils.py`
//! (`_compute_default_rope_parameters`, `_compute_llama3_parameters`) and
//! `models/gpt2/modeling_gpt2.py` + `activations.py` (`NewGELUActivation`).
//!
//! Plain slices in, slices out, as `kernels.rs`; `llm_ops.rs` wraps them as
//! candle custom ops with hand-written backward. f32 only, CPU only.

use super::kernels::{fast_exp, matmul, parallelism, uniform, Mat};
use gemm::Parallelism;
use rayon::prelude::*;

/// Rows per rayon task for the row-wise kernels.
const ROW_CHUNK: usize = 64;
/// Elements per rayon task for the element-wise kernels.
const ELEM_CHUNK: usize = 8192;

/// Sum with 8 independent accumulators (a plain float sum is one add at a
/// time: the compiler may not reorder it).
#[inline]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Dot product with 8 independent accumulators.
#[inline]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// A raw pointer shared by parallel tasks that write disjoint parts of one
/// buffer (see each caller for why the parts are disjoint).
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32, usize);
// SAFETY: only used for disjoint writes from parallel tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn new(s: &mut [f32]) -> Self {
        SyncPtr(s.as_mut_ptr(), s.len())
    }
    /// SAFETY: the caller writes only the part of the buffer it owns.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `LlamaRMSNorm`: y = x / sqrt(mean(x^2) + eps) * w, per row of width `d`.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32]) {
    y.par_chunks_mut(d * ROW_CHUNK)
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let r = rms_rstd(xr, eps);
                for j in 0..d {
                    yr[j] = xr[j] * r * w[j];
                }
            }
        });
}

#[inline]
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
                // (dy * w) . x, eight lanes at a time.
                let mut acc = [0f32; 8];
                let (dc, wc, xc) = (dyr.chunks_exact(8), w.chunks_exact(8), xr.chunks_exact(8));
                let rest: f32 = (dc.remainder().iter().zip(wc.remainder()))
                    .zip(xc.remainder())
                    .map(|((a, b), c)| a * b * c)
                    .sum();
                for ((a, b), c) in dc.zip(wc).zip(xc) {
                    for i in 0..8 {
                        acc[i] += a[i] * b[i] * c[i];
                    }
                }
                let gx = acc.iter().sum::<f32>() + rest;
                let k = r * r * r * gx / d as f32;
                let dxr = &mut dxc[(row - r0) * d..(row - r0 + 1) * d];
                for j in 0..d {
                    dxr[j] = r * dyr[j] * w[j] - k * xr[j];
                }
            }
        }
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

// ---------------------------------------------------------------- RoPE

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
pub fn rope_check_positions(table: &RopeTable, positions: &[u32]) -> Option<u32> {
    positions
        .iter()
        .copied()
        .find(|&p| p as usize >= table.max_pos)
}

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
        });
}

// ---------------------------------------------------------------- SwiGLU

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `LlamaMLP`'s `act_fn(gate_proj(x)) * up_proj(x)` with SiLU: out = silu(g) * u.
pub fn silu_mul_fwd(g: &[f32], u: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)))
        .for_each(|(o, (g, u))| {
            for i in 0..o.len() {
                o[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        });
}

/// dg = dy u s (1 + g (1 - s)), du = dy g s with s = sigmoid(g).
pub fn silu_mul_bwd(
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    dg: Option<&mut [f32]>,
    du: Option<&mut [f32]>,
) {
    if let Some(dg) = dg {
        dg.par_chunks_mut(ELEM_CHUNK)
            .enumerate()
            .for_each(|(c, o)| {
                let b = c * ELEM_CHUNK;
                let (g, u, dy) = (&g[b..b + o.len()], &u[b..b + o.len()], &dy[b..b + o.len()]);
                for i in 0..o.len() {
                    let s = sigmoid(g[i]);
                    o[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
    }
    if let Some(du) = du {
        du.par_chunks_mut(ELEM_CHUNK)
            .enumerate()
            .for_each(|(c, o)| {
                let b = c * ELEM_CHUNK;
                let (g, dy) = (&g[b..b + o.len()], &dy[b..b + o.len()]);
                for i in 0..o.len() {
                    o[i] = dy[i] * g[i] * sigmoid(g[i]);
                }
            });
    }
}

// ---------------------------------------------------------------- GELU (tanh)

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// tanh(u) = 1 - 2 / (1 + e^{2u}); exact at the saturated ends because
/// fast_exp clamps instead of overflowing.
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (1.0 + fast_exp(2.0 * u))
}

/// GPT-2's `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let t = tanh_fast(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
    0.5 * x * (1.0 + t)
}

#[inline]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    let x2 = x * x;
    let t = tanh_fast(SQRT_2_OVER_PI * x * (1.0 + GELU_C * x2));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x2)
}

pub fn gelu_tanh_fwd(x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(o, x)| {
            for i in 0..o.len() {
                o[i] = gelu_tanh(x[i]);
            }
        });
}

pub fn gelu_tanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(ELEM_CHUNK)
        .enumerate()
        .for_each(|(c, o)| {
            let b = c * ELEM_CHUNK;
            let (x, dy) = (&x[b..b + o.len()], &dy[b..b + o.len()]);
            for i in 0..o.len() {
                o[i] = dy[i] * gelu_tanh_grad(x[i]);
            }
        });
}

// ---------------------------------------------------------------- causal attention

/// Shapes of one causal grouped-query attention call: q and the output are
/// `[b, t, heads * d]`, k and v `[b, t, kv_heads * d]` (heads side by side,
/// as the projections make them). Query head `h` reads kv head
/// `h / (heads / kv_heads)` (transformers' `repeat_kv`).
#[derive(Clone, Copy, Debug)]
pub struct CausalShape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

impl CausalShape {
    fn kv_of(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }
}

/// Which keys each query may see, besides causality: `key_mask[b * t + j]`
/// (0.0 = padding) and optional packed-example ids `segments[b * t + j]`
/// (a query sees only keys of its own segment).
#[derive(Clone, Copy)]
pub struct Visibility<'a> {
    pub key_mask: &'a [f32],
    pub segments: Option<&'a [u32]>,
}

/// Query rows per block: the scores of a block cover only keys
/// `0..block end`, so the causal upper triangle is (mostly) never computed
/// and the scratch is `ATT_BLOCK x t`, not `t x t`.
const ATT_BLOCK: usize = 64;

/// A `[rows, d]` view of head `h` (of `nh`) of batch `bi`, starting at row `r0`.
#[allow(clippy::too_many_arguments)]
fn head_rows(
    x: &[f32],
    t: usize,
    nh: usize,
    d: usize,
    bi: usize,
    h: usize,
    r0: usize,
    rows: usize,
) -> Mat<'_> {
    let c = nh * d;
    Mat {
        data: &x[bi * t * c + r0 * c + h * d..],
        rows,
        cols: d,
        rs: c as isize,
        cs: 1,
    }
}

/// Softmax of score rows `s` (`rows x kn`, row `i` is query `r0 + i` of
/// batch slice `vis`), in place: keys after the query, masked keys and keys
/// of another segment get probability exactly 0; a row with no visible key
/// becomes all 0. `m` is a scratch of `kn` floats.
fn causal_softmax_block(
    s: &mut [f32],
    kn: usize,
    r0: usize,
    key_mask: &[f32],
    seg: Option<&[u32]>,
    m: &mut [f32],
) {
    for (i, row) in s.chunks_mut(kn).enumerate() {
        let qi = r0 + i;
        let n = qi + 1; // keys 0..=qi
        match seg {
            Some(seg) => {
                let sq = seg[qi];
                for j in 0..n {
                    m[j] = if seg[j] == sq { key_mask[j] } else { 0.0 };
                }
            }
            None => m[..n].copy_from_slice(&key_mask[..n]),
        }
        let mut max = f32::NEG_INFINITY;
        for j in 0..n {
            if m[j] != 0.0 && row[j] > max {
                max = row[j];
            }
        }
        row[n..].fill(0.0);
        if max == f32::NEG_INFINITY {
            row[..n].fill(0.0);
            continue;
        }
        for j in 0..n {
            // Multiplying by the 0/1 mask keeps the loop branch-free.
            row[j] = fast_exp(row[j] - max) * m[j];
        }
        let inv = 1.0 / sum_lanes(&row[..n]);
        for v in row[..n].iter_mut() {
            *v *= inv;
        }
    }
}

/// Attention-probability dropout on a block: element (i, j) of head `bh`
/// is kept with probability 1 - p, from a counter so backward replays it.
fn dropout_block(p_mat: &mut [f32], kn: usize, t: usize, r0: usize, bh: usize, p: f32, seed: u64) {
    let scale = 1.0 / (1.0 - p);
    for (i, row) in p_mat.chunks_mut(kn).enumerate() {
        let base = ((bh * t + r0 + i) * t) as u64;
        for (j, v) in row.iter_mut().enumerate() {
            *v = if uniform(seed, base + j as u64) >= p {
                *v * scale
            } else {
                0.0
            };
        }
    }
}

/// Forward causal GQA attention. `dropout = Some((p, seed))` drops
/// attention probabilities (GPT-2's `attn_pdrop`).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    vis: Visibility,
    sh: CausalShape,
    scale: f32,
    dropout: Option<(f32, u64)>,
    out: &mut [f32],
) {
    let CausalShape {
        b: _,
        t,
        heads,
        kv_heads,
        d,
    } = sh;
    let c = heads * d;
    // Each (batch, head) task writes its own column block of `out`.
    let optr = SyncPtr::new(out);
    let bt = ATT_BLOCK.min(t);
    (0..sh.b * heads).into_par_iter().for_each_init(
        || (vec![0f32; bt * t], vec![0f32; t]),
        |(s, m), bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let kh = sh.kv_of(h);
            let km = &vis.key_mask[bi * t..(bi + 1) * t];
            let seg = vis.segments.map(|s| &s[bi * t..(bi + 1) * t]);
            // SAFETY: this task writes only column block `h` of batch `bi`.
            let o = unsafe { optr.slice() };
            for r0 in (0..t).step_by(ATT_BLOCK) {
                let rows = ATT_BLOCK.min(t - r0);
                let kn = r0 + rows;
                let s = &mut s[..rows * kn];
                let qm = head_rows(q, t, heads, d, bi, h, r0, rows);
                let kmat = head_rows(k, t, kv_heads, d, bi, kh, 0, kn);
                let vmat = head_rows(v, t, kv_heads, d, bi, kh, 0, kn);
                matmul(s, kn, qm, kmat.t(), scale, false, Parallelism::None);
                causal_softmax_block(s, kn, r0, km, seg, m);
                if let Some((p, seed)) = dropout {
                    dropout_block(s, kn, t, r0, bh, p, seed);
                }
                let off = bi * t * c + r0 * c + h * d;
                matmul(
                    &mut o[off..],
                    c,
                    Mat::rm(s, rows, kn),
                    vmat,
                    1.0,
                    false,
                    Parallelism::None,
                );
            }
        },
    );
}

/// Backward of `causal_attention_fwd`, recomputing the probabilities block
/// by block. `dk`/`dv` are per *query* head (`[b, t, heads * d]`, zeroed by
/// the caller) so that tasks never share a buffer; `reduce_kv_heads` sums
/// them into the kv heads.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    vis: Visibility,
    sh: CausalShape,
    scale: f32,
    dropout: Option<(f32, u64)>,
    dout: &[f32],
    dq: &mut [f32],
    dk_per_head: &mut [f32],
    dv_per_head: &mut [f32],
) {
    let CausalShape {
        b: _,
        t,
        heads,
        kv_heads,
        d,
    } = sh;
    let c = heads * d;
    let (dq_p, dk_p, dv_p) = (
        SyncPtr::new(dq),
        SyncPtr::new(dk_per_head),
        SyncPtr::new(dv_per_head),
    );
    let bt = ATT_BLOCK.min(t);
    (0..sh.b * heads).into_par_iter().for_each_init(
        || {
            (
                vec![0f32; bt * t],
                vec![0f32; bt * t],
                vec![0f32; bt * t],
                vec![0f32; t],
            )
        },
        |(p, pd, dp, m), bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let kh = sh.kv_of(h);
            let km = &vis.key_mask[bi * t..(bi + 1) * t];
            let seg = vis.segments.map(|s| &s[bi * t..(bi + 1) * t]);
            // SAFETY: this task writes only column block `h` of batch `bi`
            // of each of the three buffers (all laid out as q).
            let (dqs, dks, dvs) = unsafe { (dq_p.slice(), dk_p.slice(), dv_p.slice()) };
            let col = bi * t * c + h * d;
            for r0 in (0..t).step_by(ATT_BLOCK) {
                let rows = ATT_BLOCK.min(t - r0);
                let kn = r0 + rows;
                let (p, pd, dp) = (
                    &mut p[..rows * kn],
                    &mut pd[..rows * kn],
                    &mut dp[..rows * kn],
                );
                let qm = head_rows(q, t, heads, d, bi, h, r0, rows);
                let dom = head_rows(dout, t, heads, d, bi, h, r0, rows);
                let kmat = head_rows(k, t, kv_heads, d, bi, kh, 0, kn);
                let vmat = head_rows(v, t, kv_heads, d, bi, kh, 0, kn);
                matmul(p, kn, qm, kmat.t(), scale, false, Parallelism::None);
                causal_softmax_block(p, kn, r0, km, seg, m);
                // pd: the probabilities that multiplied V in forward.
                let pv: &[f32] = match dropout {
                    Some((pr, seed)) => {
                        pd.copy_from_slice(p);
                        dropout_block(pd, kn, t, r0, bh, pr, seed);
                        pd
                    }
                    None => p,
                };
                // dV[0..kn] += Pd^T dO
                matmul(
                    &mut dvs[col..],
                    c,
                    Mat::rm(pv, rows, kn).t(),
                    dom,
                    1.0,
                    true,
                    Parallelism::None,
                );
                // dPd = dO V^T
                matmul(dp, kn, dom, vmat.t(), 1.0, false, Parallelism::None);
                if let Some((pr, _)) = dropout {
                    super::kernels::reuse_dropout_mask(dp, pv, pr);
                }
                // dS = P * (dP - rowsum(dP * P)) * scale
                for (pr, dr) in p.chunks(kn).zip(dp.chunks_mut(kn)) {
                    let dot = dot_lanes(pr, dr);
                    for j in 0..kn {
                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                    }
                }
                // dQ[r0..] = dS K ; dK[0..kn] += dS^T Q
                matmul(
                    &mut dqs[col + r0 * c..],
                    c,
                    Mat::rm(dp, rows, kn),
                    kmat,
                    1.0,
                    false,
                    Parallelism::None,
                );
                matmul(
                    &mut dks[col..],
                    c,
                    Mat::rm(dp, rows, kn).t(),
                    qm,
                    1.0,
                    true,
                    Parallelism::None,
                );
            }
        },
    );
}

/// Sum per-query-head gradients `[b, t, heads * d]` into the kv heads:
/// `out[.., kh * d + i] = sum over h in group kh of src[.., h * d + i]`.
pub fn reduce_kv_heads(src: &[f32], sh: CausalShape, out: &mut [f32]) {
    let CausalShape {
        heads, kv_heads, d, ..
    } = sh;
    let group = heads / kv_heads;
    let (c, ck) = (heads * d, kv_heads * d);
    out.par_chunks_mut(ck * ROW_CHUNK)
        .zip(src.par_chunks(c * ROW_CHUNK))
        .for_each(|(oc, sc)| {
            for (orow, srow) in oc.chunks_mut(ck).zip(sc.chunks(c)) {
                for kh in 0..kv_heads {
                    let o = &mut orow[kh * d..(kh + 1) * d];
                    o.copy_from_slice(&srow[kh * group * d..(kh * group + 1) * d]);
                    for g in 1..group {
                        let s = &srow[(kh * group + g) * d..(kh * group + g + 1) * d];
                        for i in 0..d {
                            o[i] += s[i];
                        }
                    }
                }
            }
        });
}

/// Causal attention of `t_new` new queries against a KV cache, for
/// generation (no autograd): `q` is `[b, t_new, heads * d]` for positions
/// `t_total - t_new .. t_total`, the caches `[b, t_total, kv_heads * d]`,
/// `out` as `q`. Scale 1/sqrt(d); no padding (see
/// [`attention_with_cache_masked`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_with_cache(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    b: usize,
    t_new: usize,
    t_total: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    attention_with_cache_masked(
        q, k_cache, v_cache, None, b, t_new, t_total, heads, kv_heads, d, out,
    )
}

/// [`attention_with_cache`] with a key mask `[b * t_total]` (0.0 = padding,
/// e.g. left-padded prompts of a batch). A query with no visible key gets 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_with_cache_masked(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: Option<&[f32]>,
    b: usize,
    t_new: usize,
    t_total: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    out: &mut [f32],
) {
    assert!(
        t_new <= t_total,
        "attention_with_cache: t_new {t_new} > t_total {t_total}"
    );
    assert!(
        kv_heads > 0 && heads.is_multiple_of(kv_heads),
        "attention_with_cache: {heads} heads, {kv_heads} kv heads"
    );
    assert_eq!(q.len(), b * t_new * heads * d, "attention_with_cache: q");
    assert_eq!(out.len(), q.len(), "attention_with_cache: out");
    assert_eq!(
        k_cache.len(),
        b * t_total * kv_heads * d,
        "attention_with_cache: k_cache"
    );
    assert_eq!(
        v_cache.len(),
        k_cache.len(),
        "attention_with_cache: v_cache"
    );
    if let Some(m) = key_mask {
        assert_eq!(m.len(), b * t_total, "attention_with_cache: key_mask");
    }
    let group = heads / kv_heads;
    let c = heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let past = t_total - t_new;
    let ones = vec![1f32; if key_mask.is_some() { 0 } else { t_total }];
    let optr = SyncPtr::new(out);
    // Few (b, head) tasks during decoding: let gemm split further when the
    // tasks alone cannot fill the pool.
    let par = if b * heads >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        parallelism()
    };
    let bt = ATT_BLOCK.min(t_new.max(1));
    (0..b * heads).into_par_iter().for_each_init(
        || (vec![0f32; bt * t_total], vec![0f32; t_total]),
        |(s, m), bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let kh = h / group;
            let km = match key_mask {
                Some(mk) => &mk[bi * t_total..(bi + 1) * t_total],
                None => &ones[..],
            };
            // SAFETY: this task writes only column block `h` of batch `bi`.
            let o = unsafe { optr.slice() };
            for r0 in (0..t_new).step_by(ATT_BLOCK) {
                let rows = ATT_BLOCK.min(t_new - r0);
                let kn = past + r0 + rows;
                let s = &mut s[..rows * kn];
                let qm = head_rows(q, t_new, heads, d, bi, h, r0, rows);
                let kmat = head_rows(k_cache, t_total, kv_heads, d, bi, kh, 0, kn);
                let vmat = head_rows(v_cache, t_total, kv_heads, d, bi, kh, 0, kn);
                matmul(s, kn, qm, kmat.t(), scale, false, par);
                causal_softmax_block(s, kn, past + r0, km, None, m);
                let off = bi * t_new * c + r0 * c + h * d;
                matmul(
                    &mut o[off..],
                    c,
                    Mat::rm(s, rows, kn),
                    vmat,
                    1.0,
                    false,
                    par,
                );
            }
        },
    );
}

// ---------------------------------------------------------------- LM head + cross-entropy

/// `transformers`' default `ignore_index` (`CrossEntropyLoss(ignore_index=-100)`).
pub const IGNORE_INDEX: i64 = -100;

/// Rows of `hidden` (`[n, c]`) listed in `rows`, copied contiguous into `dst`.
fn gather_rows(hidden: &[f32], c: usize, rows: &[usize], dst: &mut [f32]) {
    dst.par_chunks_mut(c)
        .zip(rows.par_iter())
        .for_each(|(d, &r)| {
            d.copy_from_slice(&hidden[r * c..(r + 1) * c]);
        });
}

/// Log-sum-exp of each row of `logits` (`rows x v`).
fn row_lse(logits: &[f32], v: usize, out: &mut [f32]) {
    out.par_iter_mut()
        .zip(logits.par_chunks(v))
        .for_each(|(o, row)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut acc = [0f32; 8];
            let ch = row.chunks_exact(8);
            let rest: f32 = ch.remainder().iter().map(|x| fast_exp(x - max)).sum();
            for cch in ch {
                for i in 0..8 {
                    acc[i] += fast_exp(cch[i] - max);
                }
            }
            *o = max + (acc.iter().sum::<f32>() + rest).ln();
        });
}

/// The indices of the rows whose target is not ignored; errors name the
/// first target outside `[0, vocab)` that is not `IGNORE_INDEX`.
pub fn lm_valid_rows(targets: &[i64], vocab: usize) -> Result<Vec<usize>, String> {
    let mut rows = Vec::with_capacity(targets.len());
    for (i, &y) in targets.iter().enumerate() {
        if y == IGNORE_INDEX {
            continue;
        }
        if y < 0 || y as usize >= vocab {
            return Err(format!(
                "lm_cross_entropy: target {y} at row {i} is outside the vocabulary of {vocab} (and not the ignore index {IGNORE_INDEX})"
            ));
        }
        rows.push(i);
    }
    Ok(rows)
}

/// Sum over the valid rows of (logsumexp(h W^T) - (h W^T)[target]), chunked
/// by `chunk_rows` valid rows (logits never exceed `chunk_rows x v`).
/// Returns the sum (not the mean) in f64.
pub fn lm_ce_fwd(
    hidden: &[f32],
    w: &[f32],
    targets: &[i64],
    valid: &[usize],
    c: usize,
    v: usize,
    chunk_rows: usize,
) -> f64 {
    let cr = chunk_rows.max(1).min(valid.len().max(1));
    let mut hc = vec![0f32; cr * c];
    let mut logits = vec![0f32; cr * v];
    let mut lse = vec![0f32; cr];
    let mut total = 0f64;
    for rows in valid.chunks(cr) {
        let m = rows.len();
        gather_rows(hidden, c, rows, &mut hc[..m * c]);
        matmul(
            &mut logits[..m * v],
            v,
            Mat::rm(&hc, m, c),
            Mat::rm(w, v, c).t(),
            1.0,
            false,
            parallelism(),
        );
        row_lse(&logits[..m * v], v, &mut lse[..m]);
        for (i, &r) in rows.iter().enumerate() {
            total += (lse[i] - logits[i * v + targets[r] as usize]) as f64;
        }
    }
    total
}

/// Backward of the summed loss times `g` (`g` already includes 1/n_valid):
/// per chunk, dlogits = (softmax - onehot) g; dhidden rows (if asked, zero
/// for ignored rows, fully overwritten) = dlogits W; dW (if asked) +=
/// dlogits^T h_chunk, overwriting on the first chunk when `dw_overwrite`.
#[allow(clippy::too_many_arguments)]
pub fn lm_ce_bwd(
    hidden: &[f32],
    w: &[f32],
    targets: &[i64],
    valid: &[usize],
    c: usize,
    v: usize,
    chunk_rows: usize,
    g: f32,
    mut dhidden: Option<&mut [f32]>,
    mut dw: Option<(&mut [f32], bool)>,
) {
    if let Some(dh) = dhidden.as_deref_mut() {
        dh.fill(0.0);
    }
    if valid.is_empty() {
        if let Some((dw, true)) = dw {
            dw.fill(0.0);
        }
        return;
    }
    let cr = chunk_rows.max(1).min(valid.len());
    let mut hc = vec![0f32; cr * c];
    let mut logits = vec![0f32; cr * v];
    let mut dhc = vec![0f32; if dhidden.is_some() { cr * c } else { 0 }];
    for (ci, rows) in valid.chunks(cr).enumerate() {
        let m = rows.len();
        gather_rows(hidden, c, rows, &mut hc[..m * c]);
        let lg = &mut logits[..m * v];
        matmul(
            lg,
            v,
            Mat::rm(&hc, m, c),
            Mat::rm(w, v, c).t(),
            1.0,
            false,
            parallelism(),
        );
        // dlogits = (softmax - onehot) * g, in place.
        lg.par_chunks_mut(v)
            .zip(rows.par_iter())
            .for_each(|(row, &r)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for x in row.iter_mut() {
                    *x = fast_exp(*x - max);
                }
                let k = g / sum_lanes(row);
                for x in row.iter_mut() {
                    *x *= k;
                }
                row[targets[r] as usize] -= g;
            });
        if let Some(dh) = dhidden.as_deref_mut() {
            matmul(
                &mut dhc[..m * c],
                c,
                Mat::rm(lg, m, v),
                Mat::rm(w, v, c),
                1.0,
                false,
                parallelism(),
            );
            for (i, &r) in rows.iter().enumerate() {
                dh[r * c..(r + 1) * c].copy_from_slice(&dhc[i * c..(i + 1) * c]);
            }
        }
        if let Some((dw, overwrite)) = dw.as_mut() {
            let acc = !(*overwrite && ci == 0);
            matmul(
                dw,
                c,
                Mat::rm(lg, m, v).t(),
                Mat::rm(&hc, m, c),
                1.0,
                acc,
                parallelism(),
            );
        }
    }
}
