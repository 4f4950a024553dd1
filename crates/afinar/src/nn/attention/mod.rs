//! Scaled dot-product attention (Vaswani et al. 2017,
//! <https://arxiv.org/abs/1706.03762>) with hand-written backward, one file
//! per variant:
//! - `bidirectional.rs`: [`attention`], BERT's: every query sees every key
//!   that is not padding;
//! - `causal.rs`: [`causal_attention`], the
//!   decoder's: causal, grouped-query heads, padding, packed-sequence
//!   segments, GPT-2's attention dropout;
//! - `cache.rs`: [`attention_with_cache`],
//!   new queries against a KV cache, for generation (no autograd).
//!
//! On the CPU each variant has its own kernel (BERT's scores are `T x T` per
//! head; the causal kernel works in blocks of query rows and never computes
//! most of the upper triangle); both recompute the probabilities in
//! backward. On a GPU both trainable variants go through one entry (the
//! `cuda` module below): cuBLAS batched GEMMs around one fused masked
//! softmax kernel, not a flash kernel. Dropout masks come from
//! [`crate::nn::dropout::uniform`], so CPU and GPU drop the same elements.

mod bidirectional;
mod cache;
mod causal;

pub use bidirectional::attention;
pub use cache::{attention_with_cache, CacheShape};
pub use causal::causal_attention;

/// What the CPU kernels of the variants (and the cache's) share: views of
/// one head of the activations, and the masked softmax of a row of scores.
mod cpu {
    use crate::nn::kernels::{fast_exp, sum_lanes, Mat, LANES};

    /// The layout of q, k, v and the outputs: `[b, t, nh * d]` row-major,
    /// the `nh` heads side by side (as the projections make them).
    #[derive(Clone, Copy, Debug)]
    pub struct Heads {
        pub t: usize,
        pub nh: usize,
        pub d: usize,
    }

    impl Heads {
        /// The width of a row (all heads).
        pub fn c(&self) -> usize {
            self.nh * self.d
        }

        /// Where row `r0` of head `h` of batch `bi` starts.
        pub fn offset(&self, bi: usize, h: usize, r0: usize) -> usize {
            let c = self.c();
            bi * self.t * c + r0 * c + h * self.d
        }

        /// A `[rows, d]` view of head `h` of batch `bi`, from row `r0`.
        pub fn rows<'a>(
            &self,
            x: &'a [f32],
            bi: usize,
            h: usize,
            r0: usize,
            rows: usize,
        ) -> Mat<'a> {
            Mat {
                data: &x[self.offset(bi, h, r0)..],
                rows,
                cols: self.d,
                rs: self.c() as isize,
                cs: 1,
            }
        }
    }

    /// Softmax of one row of scores in place, over the keys whose `mask`
    /// entry is 1.0 (0.0: not visible): a key not visible gets probability
    /// exactly 0, and a row with no visible key becomes all 0. Multiplying
    /// by the 0/1 mask keeps the loop branch-free.
    #[inline(always)]
    pub fn masked_softmax(row: &mut [f32], mask: &[f32]) {
        // The largest visible score, over LANES lanes, branch-free.
        let n = row.len().min(mask.len());
        let (row_, mask) = (&row[..n], &mask[..n]);
        let vis = |v: f32, m: f32| if m != 0.0 { v } else { f32::NEG_INFINITY };
        let mut acc = [f32::NEG_INFINITY; LANES];
        let full = n - n % LANES;
        for j0 in (0..full).step_by(LANES) {
            for i in 0..LANES {
                let v = vis(row_[j0 + i], mask[j0 + i]);
                acc[i] = if v > acc[i] { v } else { acc[i] };
            }
        }
        let mut max = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for j in full..n {
            let v = vis(row_[j], mask[j]);
            max = if v > max { v } else { max };
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        for (v, m) in row.iter_mut().zip(mask) {
            *v = fast_exp(*v - max) * m;
        }
        let inv = 1.0 / sum_lanes(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// The CUDA entry of both trainable variants (kernels `attn_softmax_*`,
/// `softmax_bwd_*` and `swap12_*` in `cuda_kernels.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{
        attach_storage, blocks, cuda_dev, empty, empty_st, launch, ptr, sfx, sptr, upload, Timer, A,
    };
    use crate::nn::custom_op::{cerr, CResult};
    use crate::nn::dropout::cuda::apply as dropout_apply;
    use candle_core::{Shape, Tensor};
    use std::sync::Arc;

    /// [B, X, Y, D] -> [B, Y, X, D] (tokens-first <-> heads-first) into `out`.
    fn swap12_into(x: &Tensor, dims: (usize, usize, usize, usize), out: u64) -> CResult<()> {
        let dev = cuda_dev(x)?;
        let s = sfx(x.dtype(), "swap12")?;
        let x = x.contiguous()?;
        let (b, xn, yn, d) = dims;
        if x.elem_count() != b * xn * yn * d {
            return Err(cerr(format!("swap12: {:?} is not {dims:?}", x.dims())));
        }
        launch(
            &dev,
            &format!("swap12_{s}"),
            (blocks(x.elem_count()), 1),
            256,
            &[
                A::P(ptr(&x)?),
                A::P(out),
                A::L(b as i64),
                A::I(xn as i32),
                A::I(yn as i32),
                A::I(d as i32),
            ],
        )
    }

    fn swap12(x: &Tensor, dims: (usize, usize, usize, usize)) -> CResult<Tensor> {
        let (b, xn, yn, d) = dims;
        let out = empty((b, yn, xn, d), x.dtype(), &cuda_dev(x)?)?;
        swap12_into(x, dims, ptr(&out)?)?;
        Ok(out)
    }

    /// What an attention call needs besides q, k, v.
    pub(super) struct AttnArgs<'a> {
        pub b: usize,
        pub t: usize,
        pub heads: usize,
        pub kv_heads: usize,
        pub d: usize,
        pub causal: bool,
        pub key_mask: &'a Arc<Vec<f32>>,
        pub segments: Option<&'a Arc<Vec<u32>>>,
        pub dropout: Option<(f32, u64)>,
    }

    /// Multi-head attention, q `[B, T, H*D]`, k/v `[B, T, KV*D]`. The G = H / KV
    /// query heads of a kv head are stacked as rows, so K and V are never copied
    /// per query head: S = Q_g K^T `[B, KV, G*T, T]` (cuBLAS), P = masked
    /// softmax(S / sqrt(D)) (one kernel), O = P V (cuBLAS). Backward: dP = dO V^T,
    /// dV = P^T dO and dK = dS^T Q_g (the sum over a group's query heads happens
    /// inside the GEMM), dS = the softmax backward (one kernel), dQ = dS K.
    pub(super) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, a: AttnArgs) -> CResult<Tensor> {
        let dev = cuda_dev(q)?;
        let _t = Timer::start("afinar-cuda-attention", "forward", &dev);
        let dt = q.dtype();
        let s = sfx(dt, "attention")?;
        let AttnArgs {
            b,
            t,
            heads,
            kv_heads,
            d,
            causal,
            ..
        } = a;
        let g = heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        // [B, T, H, D] -> [B, H, T, D] = [B, KV, G*T, D]
        let qg = swap12(&q.detach(), (b, t, heads, d))?.reshape((b, kv_heads, g * t, d))?;
        let heads_first = |x: &Tensor| swap12(&x.detach(), (b, t, kv_heads, d));
        let (kh, vh) = (heads_first(k)?, heads_first(v)?); // [B, KV, T, D]
        let scores = qg.matmul(&kh.t()?)?; // [B, KV, G*T, T]
        let km = upload(a.key_mask, &dev)?;
        let seg = a.segments.map(|s| upload(s, &dev)).transpose()?;
        let p = empty(scores.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("attn_softmax_{s}"),
            ((g * t).div_ceil(4) as u32, (b * kv_heads) as u32),
            128,
            &[
                A::P(ptr(&scores)?),
                A::P(ptr(&p)?),
                A::P(ptr(&km)?),
                A::P(match &seg {
                    Some(s) => ptr(s)?,
                    None => 0,
                }),
                A::I(kv_heads as i32),
                A::I(t as i32),
                A::I((g * t) as i32),
                A::F(scale),
                A::I(causal as i32),
            ],
        )?;
        drop(scores);
        let dropout = a.dropout;
        // The CPU's dropout index of probability (h, i, j) is (h*T + i)*T + j:
        // the flat index of this layout too.
        let pd = match dropout {
            Some((pr, seed)) => dropout_apply(&p, pr, seed)?,
            None => p.clone(),
        };
        let o = pd.matmul(&vh)?; // [B, KV, G*T, D] = [B, H, T, D]
        let out = empty_st(b * t * heads * d, dt, &dev)?;
        swap12_into(&o, (b, heads, t, d), sptr(&out))?;
        drop(o);
        let shape = Shape::from((b, t, heads * d));
        attach_storage("afinar-cuda-attention", &[q, k, v], out, shape, move |go| {
            let go = swap12(go, (b, t, heads, d))?.reshape((b, kv_heads, g * t, d))?;
            let dpd = go.matmul(&vh.t()?)?; // [B, KV, G*T, T]
            let dvh = pd.t()?.matmul(&go)?; // [B, KV, T, D]
            let dp = match dropout {
                Some((pr, seed)) => dropout_apply(&dpd, pr, seed)?,
                None => dpd,
            };
            let ds = empty(dp.shape(), dt, &dev)?;
            let rows = b * heads * t;
            launch(
                &dev,
                &format!("softmax_bwd_{s}"),
                (rows.div_ceil(4) as u32, 1),
                128,
                &[
                    A::P(ptr(&p)?),
                    A::P(ptr(&dp)?),
                    A::P(ptr(&ds)?),
                    A::L(rows as i64),
                    A::I(t as i32),
                    A::F(scale),
                ],
            )?;
            let dqg = ds.matmul(&kh)?; // [B, KV, G*T, D]
            let dkh = ds.t()?.matmul(&qg)?; // [B, KV, T, D]
            let tokens_first = |x: Tensor, n: usize| -> CResult<Tensor> {
                swap12(&x, (b, n, t, d))?.reshape((b, t, n * d))
            };
            Ok(vec![
                Some(tokens_first(dqg, heads)?),
                Some(tokens_first(dkh, kv_heads)?),
                Some(tokens_first(dvh, kv_heads)?),
            ])
        })
    }
}
