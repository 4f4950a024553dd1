//! Losses with hand-written backward: the mean cross-entropy of a few
//! classes (the classification heads; torch's `nn.CrossEntropyLoss`), and
//! the LM head fused with cross-entropy: logits exist only a chunk of rows
//! at a time, in forward and again in backward (never all `[N, V]`), as
//! transformers' `loss_utils.ForCausalLMLoss` minus the shift (targets here
//! are already aligned with their rows: the caller shifts labels by one).
//! [`lm_logits`] gives the plain logits for generation and evaluation.

use super::custom_op::{
    apply, cerr, first_only, last_dim, output, tensor, with_f32, with_f32s, with_last_dim, CResult,
    Fwd, Grads, Input, Op,
};
use super::linear::cpu::x_wt;
use super::Weight;
use candle_core::{DType, Tensor};
use std::sync::Arc;

// ------------------------------------------------------------------ cross-entropy

struct CrossEntropyOp;

impl Op<2> for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "afinar-cross-entropy"
    }
    fn cpu_fwd(&self, [li, ti]: [Input; 2]) -> Fwd {
        let logits = li.f32s("logits")?;
        let t = ti.u32s("cross_entropy targets")?;
        let c = *li.dims().last().unwrap();
        let n = logits.len() / c;
        if t.len() != n {
            return Err(cerr(format!(
                "cross_entropy: {n} rows of logits, {} targets",
                t.len()
            )));
        }
        let mut total = 0f64;
        for (row, &y) in logits.chunks(c).zip(t) {
            if y as usize >= c {
                return Err(cerr(format!("cross_entropy: target {y} >= {c} classes")));
            }
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            total += (lse - row[y as usize]) as f64;
        }
        output(vec![(total / n as f64) as f32], ())
    }
    fn bwd(&self, [logits, targets]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let g = grad.to_dtype(DType::F32)?.to_vec0::<f32>()?;
        let t = targets.to_vec1::<u32>()?;
        let c = logits.dim(logits.rank() - 1)?;
        let d = with_f32(logits, "logits", |lv| {
            let n = lv.len() / c;
            let mut d = vec![0f32; lv.len()];
            for ((row, drow), &y) in lv.chunks(c).zip(d.chunks_mut(c)).zip(&t) {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                for j in 0..c {
                    drow[j] = (row[j] - max).exp() / sum * g / n as f32;
                }
                drow[y as usize] -= g / n as f32;
            }
            tensor(d, logits.shape())
        })?;
        Ok([Some(d), None])
    }
}

/// Mean cross-entropy of `[N, C]` logits against `[N]` u32 class ids.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> CResult<Tensor> {
    if !logits.device().is_cpu() {
        // A few classes: candle's differentiable ops are enough here.
        let l = logits.to_dtype(DType::F32)?;
        let n = l.dim(0)?;
        let max = l.max_keepdim(1)?.detach();
        let z = l.broadcast_sub(&max)?;
        let lse = z.exp()?.sum_keepdim(1)?.log()?;
        let t = targets
            .to_device(l.device())?
            .to_dtype(DType::U32)?
            .reshape((n, 1))?;
        let picked = z.gather(&t, 1)?;
        return (lse - picked)?.mean_all();
    }
    apply(CrossEntropyOp, [logits, &targets.to_dtype(DType::U32)?])
}

// ------------------------------------------------------------------ LM head + cross-entropy

struct LmCrossEntropyOp {
    w: Weight,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
}

impl LmCrossEntropyOp {
    fn dims(&self, h: &[usize], w: &[usize]) -> CResult<(usize, usize, usize)> {
        let ([n, c], [v, cw]) = (h, w) else {
            return Err(cerr(format!(
                "lm_cross_entropy: hidden must be [N, C] and weight [V, C], found {h:?} and {w:?}"
            )));
        };
        if c != cw {
            return Err(cerr(format!(
                "lm_cross_entropy: hidden {h:?} but weight {w:?} (widths differ)"
            )));
        }
        if self.targets.len() != *n {
            return Err(cerr(format!(
                "lm_cross_entropy: {n} rows of hidden, {} targets",
                self.targets.len()
            )));
        }
        Ok((*n, *c, *v))
    }

    /// What the kernels read: hidden `[N, c]`, weight `[v, c]` and the
    /// `valid` rows of this op's targets.
    fn rows<'a>(
        &'a self,
        hidden: &'a [f32],
        w: &'a [f32],
        valid: &'a [usize],
        c: usize,
        v: usize,
    ) -> cpu::LmRows<'a> {
        cpu::LmRows {
            hidden,
            w,
            targets: &self.targets,
            valid,
            c,
            v,
            chunk_rows: self.chunk_rows,
        }
    }
}

impl Op<2> for LmCrossEntropyOp {
    fn name(&self) -> &'static str {
        "afinar-lm-cross-entropy"
    }
    fn cpu_fwd(&self, [hi, wi]: [Input; 2]) -> Fwd {
        let (_, c, v) = self.dims(hi.dims(), wi.dims())?;
        let h = hi.f32s("lm_cross_entropy hidden")?;
        let w = wi.f32s("lm_cross_entropy weight")?;
        let valid = cpu::lm_valid_rows(&self.targets, v).map_err(cerr)?;
        let loss = if valid.is_empty() {
            0.0
        } else {
            self.rows(h, w, &valid, c, v).fwd() / valid.len() as f64
        };
        output(vec![loss as f32], ())
    }
    fn bwd(&self, [hidden, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_vec0::<f32>()?;
        // The mean's gradient: g / n_valid on every counted row.
        let names = ["lm_cross_entropy hidden", "lm_cross_entropy weight"];
        self.backward(hidden, w, names, |valid| {
            cpu::RowGrad::All(if valid.is_empty() {
                0.0
            } else {
                g / valid.len() as f32
            })
        })
    }
}

impl LmCrossEntropyOp {
    /// The gradients of hidden (returned) and of a trainable head (into its
    /// buffer) given each counted row's loss gradient (`row_grad` of the
    /// valid rows). `names` name the inputs in errors.
    fn backward<'g>(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        names: [&str; 2],
        row_grad: impl FnOnce(&[usize]) -> cpu::RowGrad<'g>,
    ) -> Grads<2> {
        let (_, c, v) = self.dims(hidden.dims(), w.dims())?;
        let want_h = hidden.track_op();
        if !want_h && self.w.grad.is_none() {
            return Ok([None, None]);
        }
        let valid = cpu::lm_valid_rows(&self.targets, v).map_err(cerr)?;
        let g = row_grad(&valid);
        let dh = with_f32s([hidden, w], names, |[hv, wv]| {
            let mut dh = want_h.then(|| vec![0f32; hv.len()]);
            let rows = self.rows(hv, wv, &valid, c, v);
            match &self.w.grad {
                // zero_first: with no valid row nothing is written, and
                // the gradient is zero rather than stale.
                Some(buf) => buf.accumulate(v * c, valid.is_empty(), |dw, overwrite| {
                    rows.bwd(g, dh.as_deref_mut(), Some((dw, overwrite)))
                }),
                None => rows.bwd(g, dh.as_deref_mut(), None),
            }
            dh.map(|d| tensor(d, hidden.shape())).transpose()
        })?;
        Ok(first_only(dh))
    }
}

// ------------------------------------------------------------------ LM head + per-token NLL

/// [`lm_token_nll`]'s op: the LM head and the per-row negative
/// log-likelihood of the target, fused like [`LmCrossEntropyOp`].
struct LmTokenNllOp(LmCrossEntropyOp);

impl Op<2> for LmTokenNllOp {
    fn name(&self) -> &'static str {
        "afinar-lm-token-nll"
    }
    fn cpu_fwd(&self, [hi, wi]: [Input; 2]) -> Fwd {
        let (n, c, v) = self.0.dims(hi.dims(), wi.dims())?;
        let h = hi.f32s("lm_token_nll hidden")?;
        let w = wi.f32s("lm_token_nll weight")?;
        let valid = cpu::lm_valid_rows(&self.0.targets, v).map_err(cerr)?;
        let mut nll = vec![0f32; n];
        if !valid.is_empty() {
            self.0.rows(h, w, &valid, c, v).fwd_rows(&mut nll);
        }
        output(nll, n)
    }
    fn bwd(&self, [hidden, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let names = ["lm_token_nll hidden", "lm_token_nll weight"];
        self.0
            .backward(hidden, w, names, |_| cpu::RowGrad::Rows(&g))
    }
}

/// The LM head and the per-token loss fused: `[N]`, row `i` being
/// `-log_softmax(hidden[i] @ weight^T)[targets[i]]` (0 where the target is
/// `-100`), hidden `[N, C]`, weight `[V, C]`. What DPO sums over a
/// completion's tokens (`-sum` = its log-probability); logits exist only
/// `chunk_rows` rows at a time, as in [`lm_cross_entropy`]. CPU only for
/// now: another device is an error.
pub fn lm_token_nll(
    hidden: &Tensor,
    weight: &Weight,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
) -> CResult<Tensor> {
    if !hidden.device().is_cpu() {
        return Err(cerr("lm_token_nll: CPU only (no CUDA kernel yet)"));
    }
    let op = LmTokenNllOp(LmCrossEntropyOp {
        w: weight.clone(),
        targets,
        chunk_rows: chunk_rows.max(1),
    });
    apply(op, [hidden, &weight.t])
}

/// The LM head and the loss fused: mean over rows with `targets[i] != -100`
/// of `-log_softmax(hidden[i] @ weight^T)[targets[i]]`, hidden `[N, C]`,
/// weight `[V, C]` (the tied embedding or `lm_head`), a scalar (0 when every
/// target is ignored, with zero gradients). Targets are aligned with rows:
/// shift labels before calling. Logits exist only `chunk_rows` (non-ignored)
/// rows at a time, in forward and again in backward; a trainable weight's
/// gradient accumulates into its buffer.
pub fn lm_cross_entropy(
    hidden: &Tensor,
    weight: &Weight,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        let op = LmCrossEntropyOp {
            w: weight.clone(),
            targets: targets.clone(),
            chunk_rows,
        };
        let (_, _, v) = op.dims(hidden.dims(), weight.t.dims())?;
        let valid = cpu::lm_valid_rows(&targets, v).map_err(cerr)?;
        return cuda::lm_cross_entropy(hidden, weight, &targets, &valid);
    }
    let op = LmCrossEntropyOp {
        w: weight.clone(),
        targets,
        chunk_rows: chunk_rows.max(1),
    };
    apply(op, [hidden, &weight.t])
}

/// Plain logits `hidden @ weight^T`: hidden `[.., C]`, weight `[V, C]` ->
/// `[.., V]`. Inference only: the result records no gradient.
pub fn lm_logits(hidden: &Tensor, weight: &Tensor) -> CResult<Tensor> {
    let (v, c) = weight.dims2()?;
    let hc = last_dim(hidden.dims(), "lm_logits")?;
    if hc != c {
        return Err(cerr(format!(
            "lm_logits: hidden {:?} but weight [{v}, {c}]",
            hidden.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        return cuda::lm_logits(hidden, weight);
    }
    let names = ["lm_logits hidden", "lm_logits weight"];
    let out = with_f32s([hidden, weight], names, |[h, w]| {
        Ok(x_wt(h, w, v, c, None, super::kernels::parallelism()))
    })?;
    tensor(out, with_last_dim(hidden.dims(), v, "lm_logits")?)
}

/// The CPU kernels of the fused LM loss: rows gathered a chunk at a time,
/// their logits by one gemm, log-sum-exp over eight lanes.
mod cpu {
    use crate::data::sft::IGNORE_INDEX;
    use crate::nn::kernels::{
        fast_exp, matmul, max_lanes, parallelism, reduce_lanes, sum_lanes, Mat, LANES,
    };
    use crate::simd;
    use rayon::prelude::*;

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
                *o = simd::run(
                    #[inline(always)]
                    || {
                        let max = max_lanes(row);
                        let mut acc = [0f32; LANES];
                        let ch = row.chunks_exact(LANES);
                        let rest: f32 = ch.remainder().iter().map(|x| fast_exp(x - max)).sum();
                        for cch in ch {
                            for i in 0..LANES {
                                acc[i] += fast_exp(cch[i] - max);
                            }
                        }
                        max + (reduce_lanes(acc) + rest).ln()
                    },
                )
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

    /// The gradient of each row's loss in a backward: one factor for all
    /// (the mean loss), or one per row (per-token log-probabilities).
    #[derive(Clone, Copy)]
    pub enum RowGrad<'a> {
        All(f32),
        Rows(&'a [f32]),
    }

    impl RowGrad<'_> {
        #[inline]
        fn at(&self, r: usize) -> f32 {
            match self {
                RowGrad::All(g) => *g,
                RowGrad::Rows(g) => g[r],
            }
        }
    }

    /// The rows of one fused loss: hidden `[n, c]`, the head `w` `[v, c]`,
    /// a target per row and the rows whose target counts (`valid`), taken
    /// `chunk_rows` valid rows at a time (logits never exceed
    /// `chunk_rows x v`).
    pub struct LmRows<'a> {
        pub hidden: &'a [f32],
        pub w: &'a [f32],
        pub targets: &'a [i64],
        pub valid: &'a [usize],
        pub c: usize,
        pub v: usize,
        pub chunk_rows: usize,
    }

    impl LmRows<'_> {
        /// The chunks of valid rows, each with its rows gathered
        /// contiguous into `hc` and its logits `hc W^T` in `logits`.
        fn chunks(&self, cr: usize, mut f: impl FnMut(usize, &[usize], &[f32], &mut [f32])) {
            let (c, v) = (self.c, self.v);
            let mut hc = vec![0f32; cr * c];
            let mut logits = vec![0f32; cr * v];
            for (ci, rows) in self.valid.chunks(cr).enumerate() {
                let m = rows.len();
                gather_rows(self.hidden, c, rows, &mut hc[..m * c]);
                matmul(
                    &mut logits[..m * v],
                    v,
                    Mat::rm(&hc, m, c),
                    Mat::rm(self.w, v, c).t(),
                    1.0,
                    false,
                    parallelism(),
                );
                f(ci, rows, &hc[..m * c], &mut logits[..m * v]);
            }
        }

        /// Sum over the valid rows of (logsumexp(h W^T) - (h W^T)[target]),
        /// in f64 (the sum, not the mean).
        pub fn fwd(&self) -> f64 {
            let mut total = 0f64;
            self.each_nll(|_, nll| total += nll as f64);
            total
        }

        /// `nll[r]` = logsumexp(h_r W^T) - (h_r W^T)[target_r] for each
        /// valid row `r` (`nll` has a slot per row; others are left as they are).
        pub fn fwd_rows(&self, nll: &mut [f32]) {
            self.each_nll(|r, x| nll[r] = x);
        }

        fn each_nll(&self, mut put: impl FnMut(usize, f32)) {
            let cr = self.chunk_rows.max(1).min(self.valid.len().max(1));
            let v = self.v;
            let mut lse = vec![0f32; cr];
            self.chunks(cr, |_, rows, _, logits| {
                let m = rows.len();
                row_lse(logits, v, &mut lse[..m]);
                for (i, &r) in rows.iter().enumerate() {
                    put(r, lse[i] - logits[i * v + self.targets[r] as usize]);
                }
            });
        }

        /// Backward of the summed loss times `g` (`g` already includes
        /// 1/n_valid): per chunk, dlogits = (softmax - onehot) g; dhidden
        /// rows (if asked, zero for ignored rows, fully overwritten) =
        /// dlogits W; dW (if asked) += dlogits^T h_chunk, overwriting on
        /// the first chunk when `dw_overwrite`.
        pub fn bwd(
            &self,
            g: RowGrad,
            mut dhidden: Option<&mut [f32]>,
            mut dw: Option<(&mut [f32], bool)>,
        ) {
            if let Some(dh) = dhidden.as_deref_mut() {
                dh.fill(0.0);
            }
            if self.valid.is_empty() {
                if let Some((dw, true)) = dw {
                    dw.fill(0.0);
                }
                return;
            }
            let (c, v, targets) = (self.c, self.v, self.targets);
            let cr = self.chunk_rows.max(1).min(self.valid.len());
            let mut dhc = vec![0f32; if dhidden.is_some() { cr * c } else { 0 }];
            self.chunks(cr, |ci, rows, hc, lg| {
                let m = rows.len();
                // dlogits = (softmax - onehot) * g, in place.
                lg.par_chunks_mut(v)
                    .zip(rows.par_iter())
                    .for_each(|(row, &r)| {
                        let g = g.at(r);
                        simd::run(
                            #[inline(always)]
                            || {
                                let max = max_lanes(row);
                                for x in row.iter_mut() {
                                    *x = fast_exp(*x - max);
                                }
                                let k = g / sum_lanes(row);
                                for x in row.iter_mut() {
                                    *x *= k;
                                }
                            },
                        );
                        row[targets[r] as usize] -= g;
                    });
                if let Some(dh) = dhidden.as_deref_mut() {
                    matmul(
                        &mut dhc[..m * c],
                        c,
                        Mat::rm(lg, m, v),
                        Mat::rm(self.w, v, c),
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
                        Mat::rm(hc, m, c),
                        1.0,
                        acc,
                        parallelism(),
                    );
                }
            });
        }
    }
}

/// The CUDA entries (kernels `ce_fwd_*` / `ce_bwd_*` in `cuda_kernels.cu`
/// around cuBLAS products).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{add_grad, attach, cast, cuda_dev, empty, launch, ptr, sfx, Timer, A};
    use crate::nn::custom_op::CResult;
    use crate::nn::Weight;
    use candle_core::{DType, Device, Tensor};
    use std::sync::Arc;

    /// Mean cross-entropy of the LM head over the `valid` rows of `h` `[N, C]`,
    /// in chunks of rows whose logits take at most 256 MiB; backward recomputes
    /// each chunk's logits (never all `[N, V]` at once).
    pub(super) fn lm_cross_entropy(
        h: &Tensor,
        w: &Weight,
        targets: &Arc<Vec<i64>>,
        valid: &[usize],
    ) -> CResult<Tensor> {
        let dev = cuda_dev(h)?;
        let _t = Timer::start("afinar-cuda-lm-cross-entropy", "forward", &dev);
        let cdev = Device::Cuda(dev.clone());
        let dt = h.dtype();
        let s = sfx(dt, "lm_cross_entropy")?;
        let (n, c) = h.dims2()?;
        let (v, _) = w.t.dims2()?;
        let wc = cast(&w.t, dt)?;
        let hd = h.detach();
        let nv = valid.len();
        let chunk = ((256usize << 20) / (v * dt.size_in_bytes())).clamp(1, nv.max(1));
        let mut chunks = Vec::new();
        let mut total = Tensor::zeros((), DType::F32, &cdev)?;
        for rows in valid.chunks(chunk) {
            let m = rows.len();
            let idx =
                Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), m, &cdev)?;
            let tg = Tensor::from_vec(
                rows.iter().map(|&r| targets[r]).collect::<Vec<_>>(),
                m,
                &cdev,
            )?;
            let logits = hd.index_select(&idx, 0)?.matmul(&wc.t()?)?;
            let lse = empty(m, DType::F32, &dev)?;
            let loss = empty(m, DType::F32, &dev)?;
            launch(
                &dev,
                &format!("ce_fwd_{s}"),
                (m as u32, 1),
                1024,
                &[
                    A::P(ptr(&logits)?),
                    A::P(ptr(&tg)?),
                    A::P(ptr(&lse)?),
                    A::P(ptr(&loss)?),
                    A::I(v as i32),
                ],
            )?;
            total = (total + loss.sum_all()?)?;
            chunks.push((idx, tg, lse));
        }
        let loss = if nv == 0 { total } else { (total / nv as f64)? };
        let want_h = h.track_op();
        let wg = w.clone();
        attach("afinar-cuda-lm-cross-entropy", &[h, &w.t], loss, move |g| {
            if nv == 0 || (!want_h && wg.grad.is_none()) {
                return Ok(vec![None]);
            }
            let gs = g.to_dtype(DType::F32)?.to_vec0::<f32>()? / nv as f32;
            let mut dh = want_h
                .then(|| Tensor::zeros((n, c), dt, &cdev))
                .transpose()?;
            for (idx, tg, lse) in &chunks {
                let m = idx.elem_count();
                let hc = hd.index_select(idx, 0)?;
                let dl = hc.matmul(&wc.t()?)?; // logits, then their gradient in place
                launch(
                    &dev,
                    &format!("ce_bwd_{s}"),
                    (m as u32, 1),
                    1024,
                    &[
                        A::P(ptr(&dl)?),
                        A::P(ptr(lse)?),
                        A::P(ptr(tg)?),
                        A::I(v as i32),
                        A::F(gs),
                    ],
                )?;
                if let Some(dh) = dh.as_mut() {
                    let dhc = dl.matmul(&wc)?;
                    *dh = if m == n {
                        dhc
                    } else {
                        dh.index_add(idx, &dhc, 0)?
                    };
                }
                if wg.grad.is_some() {
                    add_grad(&wg, &dl.t()?.matmul(&hc)?)?;
                }
            }
            Ok(vec![dh])
        })
    }

    /// Logits `[.., V]` of hidden `[.., C]` (generation, evaluation).
    pub(super) fn lm_logits(h: &Tensor, w: &Tensor) -> CResult<Tensor> {
        let dt = h.dtype();
        h.broadcast_matmul(&cast(w, dt)?.t()?)?.to_dtype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, check_grads, flat, max_abs_diff, randn};
    use candle_core::{Device, Var};

    /// Per-token NLL of the fused head against candle's composed ops
    /// (logits, log-softmax, gather): values, and the gradients of hidden
    /// and a trainable head under a per-row weighting, ignored rows 0; the
    /// mean loss is the mean of the per-token ones.
    #[test]
    fn lm_token_nll_matches_composed_ops() {
        let (n, c, v) = (7, 6, 11);
        let hidden = randn(&[n, c], 21);
        let w = randn(&[v, c], 22);
        let targets: Vec<i64> = vec![3, -100, 0, 10, 5, -100, 7];
        let r = randn(&[n], 23);
        // Composed reference.
        let hv = Var::from_tensor(&hidden).unwrap();
        let wv = Var::from_tensor(&w).unwrap();
        let logits = hv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap();
        let max = logits.max_keepdim(1).unwrap().detach();
        let z = logits.broadcast_sub(&max).unwrap();
        let lse = z.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
        let idx: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
        let idx = Tensor::from_vec(idx, (n, 1), &Device::Cpu).unwrap();
        let keep: Vec<f32> = targets.iter().map(|&t| (t >= 0) as u8 as f32).collect();
        let keep = Tensor::from_vec(keep, n, &Device::Cpu).unwrap();
        let want = ((lse - z.gather(&idx, 1).unwrap())
            .unwrap()
            .squeeze(1)
            .unwrap()
            * &keep)
            .unwrap();
        let g = (want.clone() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (want_dh, want_dw) = (
            flat(g.get(hv.as_tensor()).unwrap()),
            flat(g.get(wv.as_tensor()).unwrap()),
        );
        // Fused.
        let ww = Weight::trainable(&w).unwrap();
        let hw = Weight::trainable(&hidden).unwrap();
        let got = lm_token_nll(&hw.t, &ww, Arc::new(targets.clone()), 3).unwrap();
        assert_eq!(got.dims(), &[n]);
        assert!(max_abs_diff(&flat(&got), &flat(&want)) < 1e-5);
        assert_eq!(flat(&got)[1], 0.0);
        let g = (got.clone() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(&flat(g.get(&hw.t).unwrap()), &want_dh) < 1e-5);
        assert!(max_abs_diff(&flat(&ww.grad_tensor().unwrap().unwrap()), &want_dw) < 1e-5);
        // The mean of the per-token losses over counted rows is lm_cross_entropy.
        let mean = lm_cross_entropy(&hidden, &Weight::frozen(w.clone()), Arc::new(targets), 3)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((flat(&got).iter().sum::<f32>() / 5.0 - mean).abs() < 1e-5);
    }

    #[test]
    fn cross_entropy_value_and_grad() {
        let logits = Var::from_tensor(&randn(&[3, 4], 12)).unwrap();
        let targets = Tensor::new(&[0u32, 3, 1], &Device::Cpu).unwrap();
        let loss = cross_entropy(logits.as_tensor(), &targets)
            .unwrap()
            .to_vec0::<f32>()
            .unwrap();
        let l = logits.as_tensor().to_vec2::<f32>().unwrap();
        let want: f32 = [0usize, 3, 1]
            .iter()
            .zip(&l)
            .map(|(&y, row)| row.iter().map(|v| v.exp()).sum::<f32>().ln() - row[y])
            .sum::<f32>()
            / 3.0;
        assert!((loss - want).abs() < 1e-5);
        let t2 = targets.clone();
        check_grads(
            &[logits.as_tensor().clone()],
            &move |w| cross_entropy(&w[0].t, &t2).unwrap(),
            2e-2,
        );
    }

    fn lm_ce_ref(h: &[f64], w: &[f64], targets: &[i64], c: usize) -> f64 {
        let v = w.len() / c;
        let (mut total, mut n) = (0.0, 0usize);
        for (row, &y) in h.chunks(c).zip(targets) {
            if y == -100 {
                continue;
            }
            let logits: Vec<f64> = (0..v)
                .map(|o| (0..c).map(|e| row[e] * w[o * c + e]).sum())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            total += lse - logits[y as usize];
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            total / n as f64
        }
    }

    // ---------------------------------------------------------- LM head + cross-entropy

    /// The unfused loss with candle's own ops (autograd included): logits,
    /// log-softmax, the target's entry, mean over non-ignored rows.
    fn unfused_lm_loss(h: &Tensor, w: &Tensor, targets: &[i64]) -> Tensor {
        let logits = h.matmul(&w.t().unwrap()).unwrap(); // [N, V]
        let max = logits.max_keepdim(1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        let logp = shifted.broadcast_sub(&lse).unwrap();
        let v = w.dim(0).unwrap();
        let mut onehot = vec![0f32; targets.len() * v];
        for (i, &y) in targets.iter().enumerate() {
            if y != -100 {
                onehot[i * v + y as usize] = 1.0;
            }
        }
        let n_valid = targets.iter().filter(|&&y| y != -100).count().max(1);
        let onehot = Tensor::from_vec(onehot, (targets.len(), v), &Device::Cpu).unwrap();
        ((logp * onehot).unwrap().sum_all().unwrap() * (-1.0 / n_valid as f64)).unwrap()
    }

    #[test]
    fn lm_cross_entropy_equals_unfused_loss_and_grads() {
        let (n, c, v) = (7, 6, 11);
        let h0 = (randn(&[n, c], 70) * 2.0).unwrap();
        let w0 = randn(&[v, c], 71);
        let targets = vec![3i64, -100, 0, 10, -100, 5, 5];
        // Reference: candle autograd through the unfused ops.
        let (hv, wv) = (
            Var::from_tensor(&h0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let want = unfused_lm_loss(hv.as_tensor(), wv.as_tensor(), &targets);
        let grads = want.backward().unwrap();
        let (want_dh, want_dw) = (
            flat(grads.get(hv.as_tensor()).unwrap()),
            flat(grads.get(wv.as_tensor()).unwrap()),
        );
        let want = want.to_vec0::<f32>().unwrap();
        // chunk_rows: one row, not dividing the 5 valid rows, exactly, more than N.
        for chunk in [1, 2, 3, 5, 100] {
            let h = Var::from_tensor(&h0).unwrap();
            let w = Weight::trainable(&w0).unwrap();
            let loss =
                lm_cross_entropy(h.as_tensor(), &w, Arc::new(targets.clone()), chunk).unwrap();
            let got = loss.to_vec0::<f32>().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "chunk {chunk}: loss {got} vs {want}"
            );
            let grads = loss.backward().unwrap();
            let dh = flat(grads.get(h.as_tensor()).unwrap());
            let dw = flat(&w.grad_tensor().unwrap().unwrap());
            assert!(max_abs_diff(&dh, &want_dh) < 1e-6, "chunk {chunk}: dhidden");
            assert!(max_abs_diff(&dw, &want_dw) < 1e-6, "chunk {chunk}: dweight");
            // Ignored rows get exactly zero gradient.
            assert!(dh[c..2 * c]
                .iter()
                .chain(&dh[4 * c..5 * c])
                .all(|x| *x == 0.0));
        }
        // And against finite differences of an f64 reference.
        let t = Arc::new(targets.clone());
        let tr = targets.clone();
        check(
            &[h0, w0],
            &move |a| {
                lm_cross_entropy(&a[0].t, &a[1], t.clone(), 3)
                    .unwrap()
                    .reshape(1)
                    .unwrap()
            },
            &|a| vec![lm_ce_ref(&a[0], &a[1], &tr, c)],
            1,
        );
    }

    #[test]
    fn lm_cross_entropy_ignored_frozen_accumulating_and_errors() {
        let (n, c, v) = (4, 5, 9);
        let h0 = randn(&[n, c], 80);
        let w0 = randn(&[v, c], 81);
        // Every target ignored: loss 0, zero gradients (written, not stale).
        let h = Var::from_tensor(&h0).unwrap();
        let w = Weight::trainable(&w0).unwrap();
        w.grad.as_ref().unwrap().add(&vec![5.0; v * c]);
        w.grad.as_ref().unwrap().clear();
        let loss = lm_cross_entropy(h.as_tensor(), &w, Arc::new(vec![-100; n]), 2).unwrap();
        assert_eq!(loss.to_vec0::<f32>().unwrap(), 0.0);
        let grads = loss.backward().unwrap();
        assert!(flat(grads.get(h.as_tensor()).unwrap())
            .iter()
            .all(|x| *x == 0.0));
        assert!(flat(&w.grad_tensor().unwrap().unwrap())
            .iter()
            .all(|x| *x == 0.0));
        // Frozen weight: dhidden only.
        let targets = Arc::new(vec![1i64, 8, -100, 0]);
        let frozen = Weight::frozen(w0.clone());
        let loss = lm_cross_entropy(h.as_tensor(), &frozen, targets.clone(), 3).unwrap();
        let grads = loss.backward().unwrap();
        let dh_frozen = flat(grads.get(h.as_tensor()).unwrap());
        // Trainable weight, constant hidden: dW only; twice accumulates.
        let w = Weight::trainable(&w0).unwrap();
        let run = || {
            let loss = lm_cross_entropy(&h0, &w, targets.clone(), 3).unwrap();
            let _ = loss.backward().unwrap();
            flat(&w.grad_tensor().unwrap().unwrap())
        };
        let once = run();
        let twice = run();
        let doubled: Vec<f32> = once.iter().map(|x| 2.0 * x).collect();
        assert!(max_abs_diff(&twice, &doubled) < 1e-6);
        // The frozen case's dhidden equals the unfused one.
        let hv = Var::from_tensor(&h0).unwrap();
        let want = unfused_lm_loss(hv.as_tensor(), &w0, &targets);
        let want_dh = flat(want.backward().unwrap().get(hv.as_tensor()).unwrap());
        assert!(max_abs_diff(&dh_frozen, &want_dh) < 1e-6);
        // Errors: a target outside the vocabulary, a length mismatch.
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0, 9, 0, 0]), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target 9") && e.contains("vocabulary of 9"),
            "{e}"
        );
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0, -1, 0, 0]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target -1"), "{e}");
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0; 3]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 rows") && e.contains("3 targets"), "{e}");
    }

    #[test]
    fn lm_logits_matches_matmul() {
        let h = randn(&[2, 3, 5], 90);
        let w = randn(&[7, 5], 91);
        let got = lm_logits(&h, &w).unwrap();
        assert_eq!(got.dims(), &[2, 3, 7]);
        let want = h.reshape((6, 5)).unwrap().matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs_diff(&flat(&got), &flat(&want)) < 1e-6);
        assert_eq!(got.dtype(), DType::F32);
    }
}
