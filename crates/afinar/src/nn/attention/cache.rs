//! Causal attention of new queries against a KV cache, for generation:
//! no autograd, scale 1/sqrt(D), grouped-query heads, optional key padding
//! (left-padded prompts of a batch). Shares the causal kernel's block
//! softmax, so a cached step gives the rows that full causal attention
//! would (a test says so).

use super::causal::cpu::{blocks, causal_softmax_block, Visibility, ATT_BLOCK};
use super::cpu::Heads;
use crate::nn::kernels::{matmul, parallelism, Mat, SyncPtr};
use crate::simd;
use gemm::Parallelism;
use rayon::prelude::*;

/// Shapes of one cached step: `t_new` new queries per batch row
/// (`[b, t_new, heads * d]`, positions `t_total - t_new .. t_total`) against
/// `t_total` cached keys and values (`[b, t_total, kv_heads * d]`, the new
/// ones included).
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    pub b: usize,
    pub t_new: usize,
    pub t_total: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

/// Causal attention of `t_new` new queries against a KV cache, for
/// generation (no autograd): `q` is `[b, t_new, heads * d]` for positions
/// `t_total - t_new .. t_total`, the caches `[b, t_total, kv_heads * d]`,
/// `out` as `q`. Scale 1/sqrt(d). `key_mask` `[b * t_total]` (0.0 =
/// padding, e.g. left-padded prompts of a batch), or None: every key
/// visible. A query with no visible key gets 0.
pub fn attention_with_cache(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    key_mask: Option<&[f32]>,
    sh: CacheShape,
    out: &mut [f32],
) {
    let CacheShape {
        b,
        t_new,
        t_total,
        heads,
        kv_heads,
        d,
    } = sh;
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
    let scale = 1.0 / (d as f32).sqrt();
    let past = t_total - t_new;
    let (qh, kvh) = (
        Heads {
            t: t_new,
            nh: heads,
            d,
        },
        Heads {
            t: t_total,
            nh: kv_heads,
            d,
        },
    );
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
            simd::run(
                #[inline(always)]
                || {
                    let (bi, h) = (bh / heads, bh % heads);
                    let kh = h / group;
                    let key_mask = match key_mask {
                        Some(mk) => &mk[bi * t_total..(bi + 1) * t_total],
                        None => &ones[..],
                    };
                    let vis = Visibility {
                        key_mask,
                        segments: None,
                    };
                    // SAFETY: this task writes only column block `h` of batch `bi`.
                    let o = unsafe { optr.slice() };
                    for blk in blocks(t_new, past) {
                        let (rows, kn) = (blk.rows, blk.kn());
                        let s = &mut s[..rows * kn];
                        let qm = qh.rows(q, bi, h, blk.r0, rows);
                        let kmat = kvh.rows(k_cache, bi, kh, 0, kn);
                        matmul(s, kn, qm, kmat.t(), scale, false, par);
                        causal_softmax_block(s, blk, vis, m);
                        let vmat = kvh.rows(v_cache, bi, kh, 0, kn);
                        let o = &mut o[qh.offset(bi, h, blk.r0)..];
                        matmul(o, qh.c(), Mat::rm(s, rows, kn), vmat, 1.0, false, par);
                    }
                },
            )
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::causal_attention;
    use crate::nn::testing::{flat, max_abs_diff, randn};
    use std::sync::Arc;

    #[test]
    fn attention_with_cache_equals_causal_attention_last_rows() {
        let (b, t, heads, kv, d) = (2, 6, 4, 2, 8);
        let q = randn(&[b, t, heads * d], 60);
        let k = randn(&[b, t, kv * d], 61);
        let v = randn(&[b, t, kv * d], 62);
        let mut mask = vec![1f32; b * t];
        // Batch 1 left-padded by two tokens (batched generation).
        mask[t] = 0.0;
        mask[t + 1] = 0.0;
        let (kf, vf) = (flat(&k), flat(&v));
        for (key_mask, masked) in [(vec![1f32; b * t], false), (mask, true)] {
            let full = causal_attention(
                &q,
                &k,
                &v,
                heads,
                kv,
                Arc::new(key_mask.clone()),
                None,
                None,
            )
            .unwrap();
            for t_new in [1, 2, t] {
                let qn = flat(&q.narrow(1, t - t_new, t_new).unwrap());
                let mut out = vec![0f32; qn.len()];
                let sh = CacheShape {
                    b,
                    t_new,
                    t_total: t,
                    heads,
                    kv_heads: kv,
                    d,
                };
                let m = masked.then_some(key_mask.as_slice());
                attention_with_cache(&qn, &kf, &vf, m, sh, &mut out);
                let want = flat(&full.narrow(1, t - t_new, t_new).unwrap());
                let diff = max_abs_diff(&out, &want);
                assert!(diff < 1e-6, "t_new {t_new}, masked {masked}: diff {diff}");
            }
        }
    }
}
