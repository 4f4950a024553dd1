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

    /// The CPU kernels' view of one call on `q, k, v` (scale 1/sqrt(D)).
    fn call<'a>(&'a self, sh: CausalShape, [q, k, v]: [&'a [f32]; 3]) -> cpu::Call<'a> {
        cpu::Call {
            q,
            k,
            v,
            vis: self.vis(),
            sh,
            scale: 1.0 / (sh.d as f32).sqrt(),
            dropout: self.dropout,
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
        self.call(sh, [q, k, v]).forward(&mut out);
        output(out, qi.shape())
    }
    fn bwd(&self, [q, k, v]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let sh = self.shape(q.dims(), k.dims(), v.dims())?;
        let names = ["q", "k", "v", "causal_attention grad"];
        with_f32s([q, k, v, grad], names, |[qv, kv, vv, g]| {
            let n = qv.len();
            let mut dq = vec![0f32; n];
            // Per query head, summed into kv heads below.
            let mut dkh = vec![0f32; n];
            let mut dvh = vec![0f32; n];
            self.call(sh, [qv, kv, vv])
                .backward(g, &mut dq, &mut dkh, &mut dvh);
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
///
/// `dropout`: `Some((p, seed))` drops attention probabilities (GPT-2's
/// `attn_pdrop`; the mask is regenerated from the seed in backward, never
/// stored). `None` or `p = 0` is no dropout.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
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
/// [`ATT_BLOCK`](cpu::ATT_BLOCK) query rows. `cache.rs` shares the blocks
/// and their softmax.
pub(super) mod cpu {
    use super::super::cpu::{masked_softmax, Heads};
    use crate::nn::dropout::{drop_in_place, reuse_dropout_mask};
    use crate::nn::kernels::{dot_lanes, matmul, Mat, SyncPtr, ROW_CHUNK};
    use crate::simd;
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
        /// The layouts of q (and the output) and of k and v.
        fn layouts(&self) -> (Heads, Heads) {
            let (t, d) = (self.t, self.d);
            (
                Heads {
                    t,
                    nh: self.heads,
                    d,
                },
                Heads {
                    t,
                    nh: self.kv_heads,
                    d,
                },
            )
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

    impl<'a> Visibility<'a> {
        /// The `t` keys of batch row `bi`.
        fn batch(self, bi: usize, t: usize) -> Visibility<'a> {
            let keys = bi * t..(bi + 1) * t;
            Visibility {
                key_mask: &self.key_mask[keys.clone()],
                segments: self.segments.map(|s| &s[keys]),
            }
        }
    }

    /// Query rows per block: the scores of a block cover only keys
    /// `0..block end`, so the causal upper triangle is (mostly) never computed
    /// and the scratch is `ATT_BLOCK x t`, not `t x t`.
    pub const ATT_BLOCK: usize = 64;

    /// A block of query rows: rows `r0..r0 + rows` of q, at positions
    /// `pos..pos + rows` among the keys, so they see keys `0..kn()`.
    #[derive(Clone, Copy)]
    pub struct Block {
        pub r0: usize,
        pub rows: usize,
        pub pos: usize,
    }

    impl Block {
        pub fn kn(&self) -> usize {
            self.pos + self.rows
        }
    }

    /// The blocks of `t` query rows that follow `past` keys (a KV cache's).
    pub fn blocks(t: usize, past: usize) -> impl Iterator<Item = Block> {
        (0..t).step_by(ATT_BLOCK).map(move |r0| Block {
            r0,
            rows: ATT_BLOCK.min(t - r0),
            pos: past + r0,
        })
    }

    /// Softmax of a block's score rows `s` (`rows x kn`) in place: keys after
    /// the query, masked keys and keys of another segment get probability
    /// exactly 0; a row with no visible key becomes all 0. `m` is a scratch
    /// of `kn` floats.
    #[inline(always)]
    pub fn causal_softmax_block(s: &mut [f32], blk: Block, vis: Visibility, m: &mut [f32]) {
        for (i, row) in s.chunks_mut(blk.kn()).enumerate() {
            let qi = blk.pos + i;
            let n = qi + 1; // keys 0..=qi
            match vis.segments {
                Some(seg) => {
                    let sq = seg[qi];
                    for j in 0..n {
                        m[j] = if seg[j] == sq { vis.key_mask[j] } else { 0.0 };
                    }
                }
                None => m[..n].copy_from_slice(&vis.key_mask[..n]),
            }
            row[n..].fill(0.0);
            masked_softmax(&mut row[..n], &m[..n]);
        }
    }

    /// Attention-probability dropout on a block: element (i, j) of head `bh`
    /// is element `(bh * t + i) * t + j` of the dropout stream, so backward
    /// replays it.
    #[inline(always)]
    fn dropout_block(p_mat: &mut [f32], blk: Block, t: usize, bh: usize, p: f32, seed: u64) {
        for (i, row) in p_mat.chunks_mut(blk.kn()).enumerate() {
            drop_in_place(row, p, seed, ((bh * t + blk.r0 + i) * t) as u64);
        }
    }

    /// One causal attention call: the activations, which keys each query
    /// sees, the shapes, the score scale and the dropout (`Some((p,
    /// seed))`, GPT-2's `attn_pdrop`).
    pub struct Call<'a> {
        pub q: &'a [f32],
        pub k: &'a [f32],
        pub v: &'a [f32],
        pub vis: Visibility<'a>,
        pub sh: CausalShape,
        pub scale: f32,
        pub dropout: Option<(f32, u64)>,
    }

    impl Call<'_> {
        /// Forward causal GQA attention into `out`.
        pub fn forward(&self, out: &mut [f32]) {
            let (q, k, v, vis) = (self.q, self.k, self.v, self.vis);
            let (sh, scale, dropout) = (self.sh, self.scale, self.dropout);
            let (t, heads) = (sh.t, sh.heads);
            let (qh, kvh) = sh.layouts();
            // Each (batch, head) task writes its own column block of `out`.
            let optr = SyncPtr::new(out);
            let bt = ATT_BLOCK.min(t);
            (0..sh.b * heads).into_par_iter().for_each_init(
                || (vec![0f32; bt * t], vec![0f32; t]),
                |(s, m), bh| {
                    simd::run(
                        #[inline(always)]
                        || {
                            let (bi, h) = (bh / heads, bh % heads);
                            let kh = sh.kv_of(h);
                            let vis = vis.batch(bi, t);
                            // SAFETY: this task writes only column block `h` of batch `bi`.
                            let o = unsafe { optr.slice() };
                            for blk in blocks(t, 0) {
                                let (rows, kn) = (blk.rows, blk.kn());
                                let s = &mut s[..rows * kn];
                                let qm = qh.rows(q, bi, h, blk.r0, rows);
                                let kmat = kvh.rows(k, bi, kh, 0, kn);
                                matmul(s, kn, qm, kmat.t(), scale, false, Parallelism::None);
                                causal_softmax_block(s, blk, vis, m);
                                if let Some((p, seed)) = dropout {
                                    dropout_block(s, blk, t, bh, p, seed);
                                }
                                let vmat = kvh.rows(v, bi, kh, 0, kn);
                                let o = &mut o[qh.offset(bi, h, blk.r0)..];
                                matmul(
                                    o,
                                    qh.c(),
                                    Mat::rm(s, rows, kn),
                                    vmat,
                                    1.0,
                                    false,
                                    Parallelism::None,
                                );
                            }
                        },
                    )
                },
            );
        }

        /// Backward of [`Call::forward`] given `dout`, recomputing the
        /// probabilities block by block. `dk`/`dv` are per *query* head
        /// (`[b, t, heads * d]`, zeroed by the caller) so that tasks never share a
        /// buffer; `reduce_kv_heads` sums them into the kv heads.
        pub fn backward(
            &self,
            dout: &[f32],
            dq: &mut [f32],
            dk_per_head: &mut [f32],
            dv_per_head: &mut [f32],
        ) {
            let (q, k, v, vis) = (self.q, self.k, self.v, self.vis);
            let (sh, scale, dropout) = (self.sh, self.scale, self.dropout);
            let (t, heads) = (sh.t, sh.heads);
            let (qh, kvh) = sh.layouts();
            let c = qh.c();
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
                    simd::run(
                        #[inline(always)]
                        || {
                            let (bi, h) = (bh / heads, bh % heads);
                            let kh = sh.kv_of(h);
                            let vis = vis.batch(bi, t);
                            // SAFETY: this task writes only column block `h` of batch `bi`
                            // of each of the three buffers (all laid out as q).
                            let (dqs, dks, dvs) =
                                unsafe { (dq_p.slice(), dk_p.slice(), dv_p.slice()) };
                            let col = qh.offset(bi, h, 0);
                            for blk in blocks(t, 0) {
                                let (r0, rows, kn) = (blk.r0, blk.rows, blk.kn());
                                let (p, pd, dp) = (
                                    &mut p[..rows * kn],
                                    &mut pd[..rows * kn],
                                    &mut dp[..rows * kn],
                                );
                                let qm = qh.rows(q, bi, h, r0, rows);
                                let dom = qh.rows(dout, bi, h, r0, rows);
                                let kmat = kvh.rows(k, bi, kh, 0, kn);
                                let vmat = kvh.rows(v, bi, kh, 0, kn);
                                matmul(p, kn, qm, kmat.t(), scale, false, Parallelism::None);
                                causal_softmax_block(p, blk, vis, m);
                                // pd: the probabilities that multiplied V in forward.
                                let pv: &[f32] = match dropout {
                                    Some((pr, seed)) => {
                                        pd.copy_from_slice(p);
                                        dropout_block(pd, blk, t, bh, pr, seed);
                                        pd
                                    }
                                    None => p,
                                };
                                // dV[0..kn] += Pd^T dO
                                let pvt = Mat::rm(pv, rows, kn).t();
                                matmul(&mut dvs[col..], c, pvt, dom, 1.0, true, Parallelism::None);
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
                                let ds = Mat::rm(dp, rows, kn);
                                let dqs = &mut dqs[col + r0 * c..];
                                matmul(dqs, c, ds, kmat, 1.0, false, Parallelism::None);
                                matmul(
                                    &mut dks[col..],
                                    c,
                                    ds.t(),
                                    qm,
                                    1.0,
                                    true,
                                    Parallelism::None,
                                );
                            }
                        },
                    )
                },
            );
        }
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
                simd::run(
                    #[inline(always)]
                    || {
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
                    },
                )
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
                causal_attention(
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
            None,
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
        let e = causal_attention(&q, &kv, &kv, 3, 2, m.clone(), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 query heads") && e.contains("2 kv heads"),
            "{e}"
        );
        let e = causal_attention(&q, &kv, &kv, 4, 1, m.clone(), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 3, 2]") && e.contains("[1, 3, 4]"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, Arc::new(vec![1.0; 2]), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_mask has 2"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, m, Some(Arc::new(vec![0; 4])), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("segments has 4"), "{e}");
    }
}
