//! Causal grouped-query attention for decoder-only models, with padding,
//! packed-sequence segments and dropout on the probabilities, following
//! transformers (v4.4x) `models/llama/modeling_llama.py`
//! (`eager_attention_forward` with `repeat_kv`; Ainslie et al. 2023 for the
//! grouped-query heads, <https://arxiv.org/abs/2305.13245>) and GPT-2's
//! `attn_pdrop`. The backward recomputes the probabilities block by block.

use crate::nn::custom_op::{
    apply, cerr, output, tensor, with_f32s, CResult, Fwd, Grads, Input, Op,
};
use candle_core::Tensor;
use cpu::{CausalShape, Visibility};
use std::sync::Arc;

struct CausalAttentionOp {
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
    dropout: Option<(f32, u64)>,
}

impl CausalAttentionOp {
    fn shape(&self, q: &[usize], k: &[usize], v: &[usize]) -> CResult<CausalShape> {
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let [b, t, c] = q else {
            return Err(cerr(format!(
                "causal_attention: q must be [B, T, heads * D], found {q:?}"
            )));
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(cerr(format!(
                "causal_attention: {heads} query heads are not a multiple of {kv_heads} kv heads"
            )));
        }
        if c % heads != 0 {
            return Err(cerr(format!(
                "causal_attention: q width {c} is not divisible by {heads} heads"
            )));
        }
        let d = c / heads;
        let kv = [*b, *t, kv_heads * d];
        if k != kv || v != kv {
            return Err(cerr(format!(
                "causal_attention: q {q:?} with {heads} heads (D={d}) needs k and v {kv:?} for {kv_heads} kv heads, found k {k:?}, v {v:?}"
            )));
        }
        if self.key_mask.len() != b * t {
            return Err(cerr(format!(
                "causal_attention: key_mask has {} entries for [B={b}, T={t}]",
                self.key_mask.len()
            )));
        }
        if let Some(s) = &self.segments {
            if s.len() != b * t {
                return Err(cerr(format!(
                    "causal_attention: segments has {} entries for [B={b}, T={t}]",
                    s.len()
                )));
            }
        }
        Ok(CausalShape {
            b: *b,
            t: *t,
            heads,
            kv_heads,
            d,
        })
    }
    fn vis(&self) -> Visibility<'_> {
        Visibility {
            key_mask: &self.key_mask,
            segments: self.segments.as_ref().map(|s| s.as_slice()),
        }
    }
}

impl Op<3> for CausalAttentionOp {
    fn name(&self) -> &'static str {
        "afinar-causal-attention"
    }
    fn cpu_fwd(&self, [qi, ki, vi]: [Input; 3]) -> Fwd {
        let sh = self.shape(qi.dims(), ki.dims(), vi.dims())?;
        let (q, k, v) = (qi.f32s("q")?, ki.f32s("k")?, vi.f32s("v")?);
        let mut out = vec![0f32; q.len()];
        let scale = 1.0 / (sh.d as f32).sqrt();
        cpu::causal_attention_fwd(q, k, v, self.vis(), sh, scale, self.dropout, &mut out);
        output(out, qi.shape())
    }
    fn bwd(&self, [q, k, v]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let sh = self.shape(q.dims(), k.dims(), v.dims())?;
        let scale = 1.0 / (sh.d as f32).sqrt();
        let names = ["q", "k", "v", "causal_attention grad"];
        with_f32s([q, k, v, grad], names, |[qv, kv, vv, g]| {
            let n = qv.len();
            let mut dq = vec![0f32; n];
            // Per query head, summed into kv heads below.
            let mut dkh = vec![0f32; n];
            let mut dvh = vec![0f32; n];
            cpu::causal_attention_bwd(
                qv,
                kv,
                vv,
                self.vis(),
                sh,
                scale,
                self.dropout,
                g,
                &mut dq,
                &mut dkh,
                &mut dvh,
            );
            let (dk, dv) = if sh.kv_heads == sh.heads {
                (dkh, dvh)
            } else {
                let mut dk = vec![0f32; kv.len()];
                let mut dv = vec![0f32; kv.len()];
                cpu::reduce_kv_heads(&dkh, sh, &mut dk);
                cpu::reduce_kv_heads(&dvh, sh, &mut dv);
                (dk, dv)
            };
            Ok([
                Some(tensor(dq, q.shape())?),
                Some(tensor(dk, k.shape())?),
                Some(tensor(dv, v.shape())?),
            ])
        })
    }
}

/// Causal grouped-query attention, scale 1/sqrt(D): q `[B, T, heads * D]`,
/// k and v `[B, T, kv_heads * D]` (query head h reads kv head
/// `h / (heads / kv_heads)`). Query i sees key j iff j <= i,
/// `key_mask[b * T + j] != 0` and, with `segments` (packed examples), the two
/// tokens' segment ids are equal. A query with no visible key outputs 0.
/// Returns `[B, T, heads * D]`; the backward recomputes the probabilities.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
) -> CResult<Tensor> {
    causal_attention_dropout(q, k, v, heads, kv_heads, key_mask, segments, None)
}

/// [`causal_attention`] with dropout on the attention probabilities
/// (`Some((p, seed))`, GPT-2's `attn_pdrop`; the mask is regenerated from
/// the seed in backward, never stored). `None` or `p = 0` is no dropout.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
    dropout: Option<(f32, u64)>,
) -> CResult<Tensor> {
    if let Some((p, _)) = dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(cerr(format!(
                "attention dropout probability {p} must be in [0, 1)"
            )));
        }
    }
    let dropout = dropout.filter(|(p, _)| *p > 0.0);
    let op = CausalAttentionOp {
        heads,
        kv_heads,
        key_mask,
        segments,
        dropout,
    };
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let sh = op.shape(q.dims(), k.dims(), v.dims())?;
        let args = super::cuda::AttnArgs {
            b: sh.b,
            t: sh.t,
            heads,
            kv_heads,
            d: sh.d,
            causal: true,
            key_mask: &op.key_mask,
            segments: op.segments.as_ref(),
            dropout,
        };
        return super::cuda::attention(q, k, v, args);
    }
    apply(op, [q, k, v])
}

/// The CPU kernels: one rayon task per (batch, query head), over blocks of
/// [`ATT_BLOCK`](cpu::ATT_BLOCK) query rows. `cache.rs` shares the block
/// softmax and the head views.
pub(super) mod cpu {
    use crate::nn::dropout::{reuse_dropout_mask, uniform};
    use crate::nn::kernels::{dot_lanes, fast_exp, matmul, sum_lanes, Mat, SyncPtr, ROW_CHUNK};
    use gemm::Parallelism;
    use rayon::prelude::*;

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
    pub const ATT_BLOCK: usize = 64;

    /// A `[rows, d]` view of head `h` (of `nh`) of batch `bi`, starting at row `r0`.
    #[allow(clippy::too_many_arguments)]
    pub fn head_rows(
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
    pub fn causal_softmax_block(
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
    fn dropout_block(
        p_mat: &mut [f32],
        kn: usize,
        t: usize,
        r0: usize,
        bh: usize,
        p: f32,
        seed: u64,
    ) {
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
                        reuse_dropout_mask(dp, pv, pr);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::dropout::uniform;
    use crate::nn::rope::{rope, RopeTable};
    use crate::nn::testing::{check, flat, max_abs_diff, randn};

    struct AttnCase {
        b: usize,
        t: usize,
        heads: usize,
        kv: usize,
        d: usize,
        mask: Vec<f32>,
        segments: Option<Vec<u32>>,
        dropout: Option<(f32, u64)>,
    }

    /// Naive causal GQA attention in f64, straight from the definition.
    fn attention_ref(c: &AttnCase, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
        let (b, t, heads, kv, d) = (c.b, c.t, c.heads, c.kv, c.d);
        let group = heads / kv;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0; b * t * heads * d];
        for bi in 0..b {
            for h in 0..heads {
                let kh = h / group;
                for i in 0..t {
                    let qo = (bi * t + i) * heads * d + h * d;
                    let visible = |j: usize| {
                        j <= i
                            && c.mask[bi * t + j] != 0.0
                            && c.segments
                                .as_ref()
                                .is_none_or(|s| s[bi * t + j] == s[bi * t + i])
                    };
                    let scores: Vec<Option<f64>> = (0..t)
                        .map(|j| {
                            visible(j).then(|| {
                                let ko = (bi * t + j) * kv * d + kh * d;
                                (0..d).map(|e| q[qo + e] * k[ko + e]).sum::<f64>() * scale
                            })
                        })
                        .collect();
                    let max = scores
                        .iter()
                        .flatten()
                        .cloned()
                        .fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let z: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                    for (j, s) in scores.iter().enumerate() {
                        let Some(s) = s else { continue };
                        let mut p = (s - max).exp() / z;
                        if let Some((pr, seed)) = c.dropout {
                            let idx = (((bi * heads + h) * t + i) * t + j) as u64;
                            p = if uniform(seed, idx) >= pr {
                                p / (1.0 - pr as f64)
                            } else {
                                0.0
                            };
                        }
                        let vo = (bi * t + j) * kv * d + kh * d;
                        for e in 0..d {
                            out[qo + e] += p * v[vo + e];
                        }
                    }
                }
            }
        }
        out
    }

    fn attention_case_check(c: AttnCase, stride: usize) {
        let q = randn(&[c.b, c.t, c.heads * c.d], 40);
        let k = randn(&[c.b, c.t, c.kv * c.d], 41);
        let v = randn(&[c.b, c.t, c.kv * c.d], 42);
        let mask = Arc::new(c.mask.clone());
        let seg = c.segments.clone().map(Arc::new);
        let (heads, kv, dropout) = (c.heads, c.kv, c.dropout);
        check(
            &[q, k, v],
            &move |a| {
                causal_attention_dropout(
                    &a[0].t,
                    &a[1].t,
                    &a[2].t,
                    heads,
                    kv,
                    mask.clone(),
                    seg.clone(),
                    dropout,
                )
                .unwrap()
            },
            &|a| attention_ref(&c, &a[0], &a[1], &a[2]),
            stride,
        );
    }

    #[test]
    fn causal_attention_grads_gqa_mask_segments_dropout() {
        let (b, t, d) = (2, 5, 8);
        // Batch 0: its first key is padding (query 0 sees nothing: output 0);
        // batch 1: right padding.
        let mut mask = vec![1f32; b * t];
        mask[0] = 0.0;
        mask[t + 3] = 0.0;
        mask[t + 4] = 0.0;
        let segments = vec![0u32, 0, 1, 1, 1, 0, 0, 0, 1, 1];
        let ones = vec![1f32; b * t];
        // Plain multi-head.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 4,
                d,
                mask: ones.clone(),
                segments: None,
                dropout: None,
            },
            1,
        );
        // GQA with padding.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 2,
                d,
                mask: mask.clone(),
                segments: None,
                dropout: None,
            },
            1,
        );
        // Multi-query with padding and packed segments.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 1,
                d,
                mask: mask.clone(),
                segments: Some(segments.clone()),
                dropout: None,
            },
            1,
        );
        // Attention dropout (GPT-2), GQA, segments.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 2,
                d,
                mask,
                segments: Some(segments),
                dropout: Some((0.3, 17)),
            },
            1,
        );
    }

    #[test]
    fn causal_attention_grads_across_row_blocks() {
        // T over the 64-row block size: several blocks, keys shared across them.
        let (b, t) = (1, 70);
        let mut mask = vec![1f32; b * t];
        mask[66] = 0.0;
        let segments: Vec<u32> = (0..t as u32).map(|i| u32::from(i >= 40)).collect();
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 2,
                kv: 1,
                d: 4,
                mask,
                segments: Some(segments),
                dropout: Some((0.1, 3)),
            },
            13,
        );
    }

    #[test]
    fn causal_attention_packed_row_equals_separate_examples() {
        // One packed row of two examples (3 and 4 tokens), rope positions
        // restarting at the second, versus each example run alone.
        let (heads, kv, d) = (4, 2, 8);
        let lens = [3usize, 4];
        let t: usize = lens.iter().sum();
        let table = Arc::new(RopeTable::new(d, 10_000.0, 16));
        let q = randn(&[1, t, heads * d], 50);
        let k = randn(&[1, t, kv * d], 51);
        let v = randn(&[1, t, kv * d], 52);
        let packed_pos = Arc::new(vec![0u32, 1, 2, 0, 1, 2, 3]);
        let segments = Arc::new(vec![0u32, 0, 0, 1, 1, 1, 1]);
        let packed = causal_attention(
            &rope(&q, &table, &packed_pos, heads).unwrap(),
            &rope(&k, &table, &packed_pos, kv).unwrap(),
            &v,
            heads,
            kv,
            Arc::new(vec![1.0; t]),
            Some(segments),
        )
        .unwrap();
        let mut start = 0;
        for len in lens {
            let pos = Arc::new((0..len as u32).collect::<Vec<_>>());
            let part = |x: &Tensor| x.narrow(1, start, len).unwrap();
            let alone = causal_attention(
                &rope(&part(&q), &table, &pos, heads).unwrap(),
                &rope(&part(&k), &table, &pos, kv).unwrap(),
                &part(&v),
                heads,
                kv,
                Arc::new(vec![1.0; len]),
                None,
            )
            .unwrap();
            let diff = max_abs_diff(&flat(&part(&packed)), &flat(&alone));
            assert!(diff < 1e-6, "example at {start}: diff {diff}");
            start += len;
        }
    }

    #[test]
    fn causal_attention_shape_errors() {
        let q = randn(&[1, 3, 8], 1);
        let kv = randn(&[1, 3, 4], 2);
        let m = Arc::new(vec![1f32; 3]);
        let e = causal_attention(&q, &kv, &kv, 3, 2, m.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 query heads") && e.contains("2 kv heads"),
            "{e}"
        );
        let e = causal_attention(&q, &kv, &kv, 4, 1, m.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 3, 2]") && e.contains("[1, 3, 4]"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, Arc::new(vec![1.0; 2]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_mask has 2"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, m, Some(Arc::new(vec![0; 4])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("segments has 4"), "{e}");
    }
}
