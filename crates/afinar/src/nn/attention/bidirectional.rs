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
    /// The shapes of a call: q `[B, Tq, C]`, k and v `[B, Tk, C]` with
    /// `Tq <= Tk` (the queries are the first `Tq` positions).
    fn shape(&self, q: &[usize], k: &[usize], v: &[usize]) -> CResult<AttnShape> {
        let ([b, tq, c], [kb, tk, kc]) = (q, k) else {
            return Err(cerr(format!(
                "attention: q/k/v must be [B, T, C], found q {q:?}, k {k:?}"
            )));
        };
        if k != v || b != kb || c != kc || tq > tk {
            return Err(cerr(format!(
                "attention: q {q:?}, k {k:?}, v {v:?} do not fit (k and v alike; q the first positions of the same batch and width)"
            )));
        }
        if c % self.heads != 0 {
            return Err(cerr(format!(
                "attention: width {c} is not divisible by {} heads",
                self.heads
            )));
        }
        if self.key_mask.len() != b * tk {
            return Err(cerr(format!(
                "attention: mask has {} entries for [B={b}, T={tk}]",
                self.key_mask.len()
            )));
        }
        Ok(AttnShape {
            b: *b,
            tq: *tq,
            t: *tk,
            h: self.heads,
            d: c / self.heads,
        })
    }

    /// The CPU kernels' view of one call on `q, k, v`.
    fn call<'a>(&'a self, sh: AttnShape, [q, k, v]: [&'a [f32]; 3]) -> cpu::Call<'a> {
        cpu::Call {
            q,
            k,
            v,
            key_mask: &self.key_mask,
            sh,
            scale: self.scale,
            dropout: self.dropout,
        }
    }
}

impl Op<3> for AttentionOp {
    fn name(&self) -> &'static str {
        "afinar-attention"
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
        let names = ["q", "k", "v", "attention grad"];
        with_f32s([q, k, v, grad], names, |[qv, kv, vv, g]| {
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; qv.len()],
                vec![0f32; kv.len()],
                vec![0f32; kv.len()],
            );
            self.call(sh, [qv, kv, vv])
                .backward(g, &mut dq, &mut dk, &mut dv);
            Ok([
                Some(tensor(dq, q.shape())?),
                Some(tensor(dk, k.shape())?),
                Some(tensor(dv, v.shape())?),
            ])
        })
    }
}

/// Multi-head scaled dot-product attention over `[B, T, C]` projections.
/// `key_mask` is `[B * T]`, 1.0 for tokens to attend to, 0.0 for padding.
/// `dropout = Some((p, seed))` drops attention probabilities (training).
/// On the CPU `q` may hold only the first `Tq <= T` positions (`[B, Tq,
/// C]`, a head that reads the first token): the result is those rows of
/// the full attention, dropout included (element (i, j) of a head's
/// probabilities is the same stream element either way).
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
        // (The CUDA path takes full queries only: q, k, v alike.)
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
    use super::super::cpu::{masked_softmax, Heads};
    use crate::nn::dropout::{drop_in_place, reuse_dropout_mask};
    use crate::nn::kernels::{dot_lanes, matmul, Mat, SyncPtr};
    use crate::simd;
    use gemm::Parallelism;
    use rayon::prelude::*;

    /// Shapes of one multi-head attention call: k and v are `[b, t, h * d]`
    /// row-major (heads side by side, as a linear layer makes them), q and
    /// the output `[b, tq, h * d]`, the first `tq <= t` positions;
    /// `key_mask[b * t + j]` is 0.0 for a key to ignore.
    #[derive(Clone, Copy, Debug)]
    pub struct AttnShape {
        pub b: usize,
        pub tq: usize,
        pub t: usize,
        pub h: usize,
        pub d: usize,
    }

    impl AttnShape {
        /// The layout of k and v.
        fn heads(&self) -> Heads {
            Heads {
                t: self.t,
                nh: self.h,
                d: self.d,
            }
        }
        /// The layout of q, the output and their gradients.
        fn q_heads(&self) -> Heads {
            Heads {
                t: self.tq,
                ..self.heads()
            }
        }
    }

    /// The probabilities of one (batch, head) into `p` (`tq x t`): softmax(q
    /// k^T * scale) over the keys that are not padding (`mask`).
    #[inline(always)]
    fn probs(p: &mut [f32], qm: Mat, km: Mat, mask: &[f32], scale: f32) {
        let t = km.rows;
        matmul(p, t, qm, km.t(), scale, false, Parallelism::None);
        for row in p.chunks_mut(t) {
            masked_softmax(row, mask);
        }
    }

    /// One attention call: the activations, the key mask (`[b * t]`), the
    /// shapes, the score scale and the dropout (`Some((p, seed))`).
    pub struct Call<'a> {
        pub q: &'a [f32],
        pub k: &'a [f32],
        pub v: &'a [f32],
        pub key_mask: &'a [f32],
        pub sh: AttnShape,
        pub scale: f32,
        pub dropout: Option<(f32, u64)>,
    }

    impl Call<'_> {
        /// Forward multi-head attention (BERT: bidirectional with key padding)
        /// into `out`.
        pub fn forward(&self, out: &mut [f32]) {
            let (q, k, v, key_mask) = (self.q, self.k, self.v, self.key_mask);
            let (sh, scale, dropout) = (self.sh, self.scale, self.dropout);
            let (t, tq, hs, qs) = (sh.t, sh.tq, sh.heads(), sh.q_heads());
            // Each (batch, head) task writes its own column block of `out`; the
            // blocks are disjoint so the raw pointer is shared safely.
            let out_ptr = SyncPtr::new(out);
            (0..sh.b * sh.h).into_par_iter().for_each_init(
                || vec![0f32; tq * t],
                |s, bh| {
                    simd::run(
                        #[inline(always)]
                        || {
                            let (bi, hi) = (bh / sh.h, bh % sh.h);
                            let (qm, km) = (qs.rows(q, bi, hi, 0, tq), hs.rows(k, bi, hi, 0, t));
                            probs(s, qm, km, &key_mask[bi * t..(bi + 1) * t], scale);
                            // Element (i, j) of head bh is element (bh * t + i) * t + j of
                            // the dropout stream, as in the causal kernel; query row i is
                            // position i, so the first tq rows are a prefix of it.
                            if let Some((p, seed)) = dropout {
                                drop_in_place(s, p, seed, (bh * t * t) as u64);
                            }
                            // SAFETY: see above; the view starts at this head's block.
                            let o = unsafe { &mut out_ptr.slice()[qs.offset(bi, hi, 0)..] };
                            let vm = hs.rows(v, bi, hi, 0, t);
                            matmul(
                                o,
                                qs.c(),
                                Mat::rm(s, tq, t),
                                vm,
                                1.0,
                                false,
                                Parallelism::None,
                            );
                        },
                    )
                },
            );
        }

        /// Backward of [`Call::forward`] given `dout`, recomputing the
        /// probabilities (nothing T x T is kept between forward and backward).
        pub fn backward(&self, dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
            let (q, k, v, key_mask) = (self.q, self.k, self.v, self.key_mask);
            let (sh, scale, dropout) = (self.sh, self.scale, self.dropout);
            let (t, tq, hs, qs) = (sh.t, sh.tq, sh.heads(), sh.q_heads());
            let c = hs.c();
            let ptrs = (SyncPtr::new(dq), SyncPtr::new(dk), SyncPtr::new(dv));
            (0..sh.b * sh.h).into_par_iter().for_each_init(
                || (vec![0f32; tq * t], vec![0f32; tq * t], vec![0f32; tq * t]),
                |(p, pd, dp), bh| {
                    simd::run(
                        #[inline(always)]
                        || {
                            let (bi, hi) = (bh / sh.h, bh % sh.h);
                            let (qm, km) = (qs.rows(q, bi, hi, 0, tq), hs.rows(k, bi, hi, 0, t));
                            let (vm, dom) =
                                (hs.rows(v, bi, hi, 0, t), qs.rows(dout, bi, hi, 0, tq));
                            let mask = &key_mask[bi * t..(bi + 1) * t];
                            probs(p, qm, km, mask, scale);
                            // pv: the probabilities that multiplied V in forward.
                            let pv: &[f32] = match dropout {
                                Some((pr, seed)) => {
                                    pd.copy_from_slice(p);
                                    drop_in_place(pd, pr, seed, (bh * t * t) as u64);
                                    pd
                                }
                                None => p,
                            };
                            let (qoff, koff) = (qs.offset(bi, hi, 0), hs.offset(bi, hi, 0));
                            // SAFETY: disjoint column blocks per (batch, head), as in forward.
                            let (dqs, dks, dvs) =
                                unsafe { (ptrs.0.slice(), ptrs.1.slice(), ptrs.2.slice()) };
                            // dV = Pv^T dO
                            let pvt = Mat::rm(pv, tq, t).t();
                            matmul(&mut dvs[koff..], c, pvt, dom, 1.0, false, Parallelism::None);
                            // dPv = dO V^T
                            matmul(dp, t, dom, vm.t(), 1.0, false, Parallelism::None);
                            if let Some((pr, _)) = dropout {
                                // d(P) = d(Pv) * mask / (1 - p)
                                reuse_dropout_mask(dp, pv, pr);
                            }
                            // dS = P * (dP - rowsum(dP * P)), times the score scale.
                            for i in 0..tq {
                                let pr = &p[i * t..(i + 1) * t];
                                let dr = &mut dp[i * t..(i + 1) * t];
                                let dot = dot_lanes(pr, dr);
                                for j in 0..t {
                                    dr[j] = pr[j] * (dr[j] - dot) * scale;
                                }
                            }
                            // dQ = dS K ; dK = dS^T Q
                            let ds = Mat::rm(dp, tq, t);
                            matmul(&mut dqs[qoff..], c, ds, km, 1.0, false, Parallelism::None);
                            matmul(
                                &mut dks[koff..],
                                c,
                                ds.t(),
                                qm,
                                1.0,
                                false,
                                Parallelism::None,
                            );
                        },
                    )
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, flat, max_abs_diff, randn};
    use crate::nn::Weight;
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

    /// Queries for the first positions only (a head that reads the first
    /// token): the same rows, dropout included, and the same gradients as
    /// the full attention with a gradient on those rows alone.
    #[test]
    fn attention_of_the_first_positions_is_a_prefix_of_the_full() {
        let (b, t, tq, c, h) = (2, 9, 2, 8, 2);
        let vals = [
            randn(&[b, t, c], 1),
            randn(&[b, t, c], 2),
            randn(&[b, t, c], 3),
        ];
        let mut mask = vec![1f32; b * t];
        mask[t + 7] = 0.0;
        mask[t + 8] = 0.0;
        let mask = Arc::new(mask);
        let r = randn(&[b, tq, c], 4);
        for dropout in [None, Some((0.3f32, 5u64))] {
            let run = |prefix: bool| {
                let ws: Vec<Weight> = vals.iter().map(|v| Weight::trainable(v).unwrap()).collect();
                let q = if prefix {
                    ws[0].t.narrow(1, 0, tq).unwrap().contiguous().unwrap()
                } else {
                    ws[0].t.clone()
                };
                let out = attention(&q, &ws[1].t, &ws[2].t, mask.clone(), h, dropout).unwrap();
                let rows = out.narrow(1, 0, tq).unwrap();
                let g = (rows.clone() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grads: Vec<Vec<f32>> = ws.iter().map(|w| flat(g.get(&w.t).unwrap())).collect();
                (flat(&rows), grads)
            };
            let (full, gf) = run(false);
            let (pre, gp) = run(true);
            assert!(
                max_abs_diff(&full, &pre) < 1e-6,
                "rows differ ({dropout:?})"
            );
            for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
                assert!(
                    max_abs_diff(a, b) < 1e-6,
                    "gradient of input {i} differs ({dropout:?})"
                );
            }
        }
        // And the shapes that cannot be: more queries than keys, another width.
        let q = randn(&[b, t + 1, c], 5);
        let err = attention(&q, &vals[1], &vals[2], mask.clone(), h, None).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let check_grads_prefix = |w: &[Weight]| {
            let q = w[0].t.narrow(1, 0, tq).unwrap().contiguous().unwrap();
            attention(&q, &w[1].t, &w[2].t, mask.clone(), h, Some((0.2, 6))).unwrap()
        };
        check_grads(&vals, &check_grads_prefix, 2e-2);
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
        let diff = crate::testutil::max_diff(&got, &want);
        assert!(diff < 1e-5, "diff {diff}");
    }
}
