//! BERT's multi-head attention (transformers' `BertSelfAttention`,
//! `models/bert/modeling_bert.py`): bidirectional, with key padding and
//! dropout on the probabilities. The backward recomputes the probabilities:
//! nothing `T x T` is kept between forward and backward.

use crate::nn::custom_op::{
    apply, cerr, output, tensor, with_f32s, CResult, Fwd, Grads, Input, Op,
};
use candle_core::Tensor;
use cpu::AttnShape;
use std::sync::Arc;

struct AttentionOp {
    key_mask: Arc<Vec<f32>>,
    heads: usize,
    scale: f32,
    dropout: Option<(f32, u64)>,
}

impl AttentionOp {
    fn shape(&self, dims: &[usize]) -> CResult<AttnShape> {
        let [b, t, c] = dims else {
            return Err(cerr(format!(
                "attention: q/k/v must be [B, T, C], found {dims:?}"
            )));
        };
        if c % self.heads != 0 {
            return Err(cerr(format!(
                "attention: width {c} is not divisible by {} heads",
                self.heads
            )));
        }
        if self.key_mask.len() != b * t {
            return Err(cerr(format!(
                "attention: mask has {} entries for [B={b}, T={t}]",
                self.key_mask.len()
            )));
        }
        Ok(AttnShape {
            b: *b,
            t: *t,
            h: self.heads,
            d: c / self.heads,
        })
    }
}

impl Op<3> for AttentionOp {
    fn name(&self) -> &'static str {
        "afinar-attention"
    }
    fn cpu_fwd(&self, [qi, ki, vi]: [Input; 3]) -> Fwd {
        let sh = self.shape(qi.dims())?;
        if ki.dims() != qi.dims() || vi.dims() != qi.dims() {
            return Err(cerr(format!(
                "attention: q {:?}, k {:?}, v {:?} differ",
                qi.dims(),
                ki.dims(),
                vi.dims()
            )));
        }
        let (q, k, v) = (qi.f32s("q")?, ki.f32s("k")?, vi.f32s("v")?);
        let mut out = vec![0f32; q.len()];
        cpu::attention_fwd(
            q,
            k,
            v,
            &self.key_mask,
            sh,
            self.scale,
            self.dropout,
            &mut out,
        );
        output(out, qi.shape())
    }
    fn bwd(&self, [q, k, v]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let sh = self.shape(q.dims())?;
        let names = ["q", "k", "v", "attention grad"];
        with_f32s([q, k, v, grad], names, |[qv, kv, vv, g]| {
            let n = qv.len();
            let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            cpu::attention_bwd(
                qv,
                kv,
                vv,
                &self.key_mask,
                sh,
                self.scale,
                self.dropout,
                g,
                &mut dq,
                &mut dk,
                &mut dv,
            );
            let s = q.shape();
            Ok([
                Some(tensor(dq, s)?),
                Some(tensor(dk, s)?),
                Some(tensor(dv, s)?),
            ])
        })
    }
}

/// Multi-head scaled dot-product attention over `[B, T, C]` projections.
/// `key_mask` is `[B * T]`, 1.0 for tokens to attend to, 0.0 for padding.
/// `dropout = Some((p, seed))` drops attention probabilities (training).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_mask: Arc<Vec<f32>>,
    heads: usize,
    dropout: Option<(f32, u64)>,
) -> CResult<Tensor> {
    let c = q.dim(2)?;
    let scale = 1.0 / ((c / heads) as f32).sqrt();
    let dropout = dropout.filter(|(p, _)| *p > 0.0);
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let (b, t, _) = q.dims3()?;
        if key_mask.len() != b * t || k.dims() != q.dims() || v.dims() != q.dims() {
            return Err(cerr(format!(
                "attention: q {:?}, k {:?}, v {:?} with {} mask entries",
                q.dims(),
                k.dims(),
                v.dims(),
                key_mask.len()
            )));
        }
        let args = super::cuda::AttnArgs {
            b,
            t,
            heads,
            kv_heads: heads,
            d: c / heads,
            causal: false,
            key_mask: &key_mask,
            segments: None,
            dropout,
        };
        return super::cuda::attention(q, k, v, args);
    }
    let op = AttentionOp {
        key_mask,
        heads,
        scale,
        dropout,
    };
    apply(op, [q, k, v])
}

/// The CPU kernels: one rayon task per (batch, head), each writing its own
/// column block of the outputs.
mod cpu {
    use crate::nn::dropout::{reuse_dropout_mask, uniform};
    use crate::nn::kernels::{fast_exp, matmul, sum_lanes, Mat, SyncPtr};
    use gemm::Parallelism;
    use rayon::prelude::*;

    /// Shapes of one multi-head attention call: q, k, v and the output are
    /// `[b, t, h * d]` row-major (heads side by side, as a linear layer makes
    /// them); `key_mask[b * t + j]` is 0.0 for a key to ignore.
    #[derive(Clone, Copy, Debug)]
    pub struct AttnShape {
        pub b: usize,
        pub t: usize,
        pub h: usize,
        pub d: usize,
    }

    impl AttnShape {
        pub fn c(&self) -> usize {
            self.h * self.d
        }
    }

    /// Softmax(q k^T * scale + mask) per row of `s` (t x t), in place; masked
    /// keys get probability exactly 0 (a row with no visible key becomes 0).
    /// `mask` is 1.0 / 0.0 per key: multiplying by it keeps the loop branch-free.
    fn masked_softmax_rows(s: &mut [f32], t: usize, mask: &[f32]) {
        for row in s.chunks_mut(t) {
            let mut max = f32::NEG_INFINITY;
            for j in 0..t {
                if mask[j] != 0.0 && row[j] > max {
                    max = row[j];
                }
            }
            if max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
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

    fn head_view(x: &[f32], sh: AttnShape, bi: usize, hi: usize) -> Mat<'_> {
        let c = sh.c();
        let off = bi * sh.t * c + hi * sh.d;
        Mat {
            data: &x[off..],
            rows: sh.t,
            cols: sh.d,
            rs: c as isize,
            cs: 1,
        }
    }

    fn apply_dropout_rows(p_mat: &mut [f32], p: f32, seed: u64, base: u64) {
        let scale = 1.0 / (1.0 - p);
        for (j, v) in p_mat.iter_mut().enumerate() {
            *v = if uniform(seed, base + j as u64) >= p {
                *v * scale
            } else {
                0.0
            };
        }
    }

    /// Forward multi-head attention (BERT: bidirectional with key padding).
    /// `dropout` = Some((p, seed)) drops attention probabilities.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_fwd(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: &[f32],
        sh: AttnShape,
        scale: f32,
        dropout: Option<(f32, u64)>,
        out: &mut [f32],
    ) {
        let (t, c, d) = (sh.t, sh.c(), sh.d);
        // Each (batch, head) task writes its own column block of `out`; the
        // blocks are disjoint so the raw pointer is shared safely.
        let out_ptr = SyncPtr::new(out);
        (0..sh.b * sh.h).into_par_iter().for_each_init(
            || vec![0f32; t * t],
            |s, bh| {
                let (bi, hi) = (bh / sh.h, bh % sh.h);
                let qm = head_view(q, sh, bi, hi);
                let km = head_view(k, sh, bi, hi);
                let vm = head_view(v, sh, bi, hi);
                matmul(s, t, qm, km.t(), scale, false, Parallelism::None);
                masked_softmax_rows(s, t, &key_mask[bi * t..(bi + 1) * t]);
                if let Some((p, seed)) = dropout {
                    apply_dropout_rows(s, p, seed, (bh * t * t) as u64);
                }
                // SAFETY: see above; the view starts at this head's block.
                let o = unsafe { out_ptr.slice() };
                let off = bi * t * c + hi * d;
                matmul(
                    &mut o[off..],
                    c,
                    Mat::rm(s, t, t),
                    vm,
                    1.0,
                    false,
                    Parallelism::None,
                );
            },
        );
    }

    /// Backward of `attention_fwd`, recomputing the probabilities (nothing
    /// T x T is kept between forward and backward).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_bwd(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        key_mask: &[f32],
        sh: AttnShape,
        scale: f32,
        dropout: Option<(f32, u64)>,
        dout: &[f32],
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (t, c, d) = (sh.t, sh.c(), sh.d);
        let ptrs = (SyncPtr::new(dq), SyncPtr::new(dk), SyncPtr::new(dv));
        (0..sh.b * sh.h).into_par_iter().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t * t]),
            |(p, pd, dp), bh| {
                let (bi, hi) = (bh / sh.h, bh % sh.h);
                let qm = head_view(q, sh, bi, hi);
                let km = head_view(k, sh, bi, hi);
                let vm = head_view(v, sh, bi, hi);
                let dom = head_view(dout, sh, bi, hi);
                let mask = &key_mask[bi * t..(bi + 1) * t];
                matmul(p, t, qm, km.t(), scale, false, Parallelism::None);
                masked_softmax_rows(p, t, mask);
                // pd = dropped probabilities (what multiplied V in forward).
                pd.copy_from_slice(p);
                if let Some((pr, seed)) = dropout {
                    apply_dropout_rows(pd, pr, seed, (bh * t * t) as u64);
                }
                let off = bi * t * c + hi * d;
                // SAFETY: disjoint column blocks per (batch, head), as in forward.
                let (dqs, dks, dvs) = unsafe { (ptrs.0.slice(), ptrs.1.slice(), ptrs.2.slice()) };
                // dV = Pd^T dO
                matmul(
                    &mut dvs[off..],
                    c,
                    Mat::rm(pd, t, t).t(),
                    dom,
                    1.0,
                    false,
                    Parallelism::None,
                );
                // dPd = dO V^T
                matmul(dp, t, dom, vm.t(), 1.0, false, Parallelism::None);
                if let Some((pr, _)) = dropout {
                    // d(P) = d(Pd) * mask / (1 - p)
                    reuse_dropout_mask(dp, pd, pr);
                }
                // dS = P * (dP - rowsum(dP * P)), times the score scale.
                for i in 0..t {
                    let pr = &p[i * t..(i + 1) * t];
                    let dr = &mut dp[i * t..(i + 1) * t];
                    let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                    for j in 0..t {
                        dr[j] = pr[j] * (dr[j] - dot) * scale;
                    }
                }
                // dQ = dS K ; dK = dS^T Q
                matmul(
                    &mut dqs[off..],
                    c,
                    Mat::rm(dp, t, t),
                    km,
                    1.0,
                    false,
                    Parallelism::None,
                );
                matmul(
                    &mut dks[off..],
                    c,
                    Mat::rm(dp, t, t).t(),
                    qm,
                    1.0,
                    false,
                    Parallelism::None,
                );
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, randn};
    use candle_core::Device;

    #[test]
    fn attention_grads_with_mask_and_dropout() {
        let (b, t, c) = (2, 5, 8);
        let vals = [
            randn(&[b, t, c], 7),
            randn(&[b, t, c], 8),
            randn(&[b, t, c], 9),
        ];
        let mut mask = vec![1f32; b * t];
        mask[t + 3] = 0.0;
        mask[t + 4] = 0.0;
        let mask = Arc::new(mask);
        for dropout in [None, Some((0.2f32, 5u64))] {
            let m = mask.clone();
            check_grads(
                &vals,
                &move |w| attention(&w[0].t, &w[1].t, &w[2].t, m.clone(), 2, dropout).unwrap(),
                2e-2,
            );
        }
    }

    #[test]
    fn attention_matches_composed_reference() {
        let (b, t, h, d) = (2, 4, 2, 3);
        let c = h * d;
        let (q, k, v) = (
            randn(&[b, t, c], 1),
            randn(&[b, t, c], 2),
            randn(&[b, t, c], 3),
        );
        let mut mask = vec![1f32; b * t];
        mask[t + 3] = 0.0;
        let got = attention(&q, &k, &v, Arc::new(mask.clone()), h, None).unwrap();
        // Reference with candle's own (non-fused) ops.
        let split = |x: &Tensor| {
            x.reshape((b, t, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (split(&q), split(&k), split(&v));
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let add: Vec<f32> = mask
            .iter()
            .map(|m| if *m == 0.0 { -1e9 } else { 0.0 })
            .collect();
        let add = Tensor::from_vec(add, (b, 1, 1, t), &Device::Cpu).unwrap();
        let s = s.broadcast_add(&add).unwrap();
        let e = s
            .broadcast_sub(&s.max_keepdim(3).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
        let want = p
            .matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, c))
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_vec0::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "diff {diff}");
    }
}
