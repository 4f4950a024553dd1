//! Differentiable fused ops as candle custom ops, each with a hand-written
//! backward: linear (no weight gradient for a frozen weight), LayerNorm,
//! exact GELU, multi-head attention (probabilities recomputed in backward),
//! dropout (mask regenerated from a seed, never stored) and cross-entropy.
//!
//! candle 0.11's own fused `layer_norm`, `softmax_last_dim`, `sdpa`... record
//! no backward, and its matmul backward computes the gradient of a frozen
//! weight anyway; these ops replace them on afinar's training path.

use super::kernels::{self, AttnShape, Mat};
use super::Weight;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Arc;

pub(crate) type CResult<T> = candle_core::Result<T>;

pub(crate) fn cerr(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// The contiguous f32 slice behind a custom op's input.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        other => {
            return Err(cerr(format!(
                "{what}: expected f32, found {:?}",
                other.dtype()
            )))
        }
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(cerr(format!("{what}: input must be contiguous"))),
    }
}

/// The contiguous u32 slice behind a custom op's index input.
fn u32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        return Err(cerr(format!("{what}: expected u32, found {:?}", s.dtype())));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| cerr(format!("{what}: input must be contiguous")))?;
    Ok(&v[a..b])
}

/// Run `f` on the f32 data of a tensor (made contiguous first if needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> CResult<R>,
) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(f32s(s, l, what)?),
        _ => Err(cerr(format!("{what}: only the CPU backend has this op"))),
    }
}

pub(crate) fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `x.track_op()`: does this tensor need a gradient at all?
fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

// ------------------------------------------------------------------ linear

/// `x @ w^T + b`; the weight and bias gradients go to their grad buffers.
struct LinearOp {
    w: Weight,
    b: Option<Weight>,
}

impl LinearOp {
    fn fwd(
        &self,
        x: &[f32],
        xs: &[usize],
        w: &[f32],
        ws: &[usize],
        b: Option<&[f32]>,
    ) -> CResult<(CpuStorage, Shape)> {
        let (out_f, in_f) = (ws[0], ws[1]);
        let k = *xs.last().ok_or_else(|| cerr("linear: scalar input"))?;
        if k != in_f {
            return Err(cerr(format!(
                "linear: input width {k} but weight is [{out_f}, {in_f}]"
            )));
        }
        let n = x.len() / in_f;
        let mut y = vec![0f32; n * out_f];
        if let Some(b) = b {
            y.par_chunks_mut(out_f).for_each(|r| r.copy_from_slice(b));
        }
        kernels::matmul(
            &mut y,
            out_f,
            Mat::rm(x, n, in_f),
            Mat::rm(w, out_f, in_f).t(),
            1.0,
            b.is_some(),
            kernels::parallelism(),
        );
        let mut shape = xs.to_vec();
        *shape.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    /// dx goes back to candle; dW and db accumulate in place.
    fn backward(&self, x: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (out_f, in_f) = self.w.t.dims2()?;
        with_f32(grad, "linear grad", |g| {
            let n = g.len() / out_f;
            // The point of owning this op: a frozen weight costs no gemm.
            if let Some(buf) = &self.w.grad {
                with_f32(x, "linear input", |xv| {
                    buf.accumulate(out_f * in_f, false, |dw, overwrite| {
                        kernels::matmul(
                            dw,
                            in_f,
                            Mat::rm(g, n, out_f).t(),
                            Mat::rm(xv, n, in_f),
                            1.0,
                            !overwrite,
                            kernels::parallelism(),
                        );
                    });
                    Ok(())
                })?;
            }
            if let Some(Weight {
                grad: Some(buf), ..
            }) = &self.b
            {
                buf.add(&kernels::col_sums(g, out_f));
            }
            if !needs_grad(x) {
                return Ok(None);
            }
            with_f32(&self.w.t, "linear weight", |wv| {
                let mut dx = vec![0f32; n * in_f];
                kernels::matmul(
                    &mut dx,
                    in_f,
                    Mat::rm(g, n, out_f),
                    Mat::rm(wv, out_f, in_f),
                    1.0,
                    false,
                    kernels::parallelism(),
                );
                Ok(Some(tensor(dx, x.shape())?))
            })
        })
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "afinar-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.fwd(
            f32s(s1, l1, "linear input")?,
            l1.dims(),
            f32s(s2, l2, "linear weight")?,
            l2.dims(),
            None,
        )
    }
    fn bwd(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((self.backward(x, grad)?, None))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "afinar-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.fwd(
            f32s(s1, l1, "linear input")?,
            l1.dims(),
            f32s(s2, l2, "linear weight")?,
            l2.dims(),
            Some(f32s(s3, l3, "linear bias")?),
        )
    }
    fn bwd(
        &self,
        x: &Tensor,
        _w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((self.backward(x, grad)?, None, None))
    }
}

/// `x @ w^T + b` over the last dimension of `x` ([.., in] -> [.., out]).
/// A frozen weight or bias costs no gradient computation; trainable ones
/// accumulate into their gradient buffers.
pub fn linear(x: &Tensor, w: &Weight, b: Option<&Weight>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::linear(x, w, b);
    }
    let x = x.contiguous()?;
    let op = LinearOp {
        w: w.clone(),
        b: b.cloned(),
    };
    match b {
        Some(b) => x.apply_op3_arc(
            &w.t.contiguous()?,
            &b.t.contiguous()?,
            Arc::new(Box::new(op)),
        ),
        None => x.apply_op2_arc(&w.t.contiguous()?, Arc::new(Box::new(op))),
    }
}

// ------------------------------------------------------------------ LoRA linear

/// A LoRA-wrapped frozen linear as one op (PEFT's `Linear.forward`):
/// y = x W^T + b + s * (drop(x) A^T) B^T, the adapter's sum folded into the
/// last GEMM (beta = 1). Backward: gh = s g B, dB += s g^T h, dA += gh^T
/// drop(x), dx = g W + drop(gh A) (the dropout mask regenerated from its
/// seed, never stored). One graph node instead of five saves candle's
/// per-node gradient passes (a memset and an add each) and its
/// single-threaded elementwise ops.
struct LoraLinearOp {
    w: Weight,
    b: Option<Weight>,
    a: Weight,
    bw: Weight,
    scale: f32,
    dropout: Option<(f32, u64)>,
    /// drop(x) from the forward, for the backward (with dropout only; as
    /// torch keeps the dropout's output for the A product).
    xd: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LoraLinearOp {
    fn dims(&self) -> CResult<(usize, usize, usize)> {
        let (out_f, in_f) = self.w.t.dims2()?;
        let r = self.a.t.dim(0)?;
        Ok((out_f, in_f, r))
    }
    /// drop(x) (x itself without dropout).
    fn dropped(&self, x: &[f32]) -> Option<Vec<f32>> {
        self.dropout.map(|(p, seed)| {
            let mut xd = vec![0f32; x.len()];
            kernels::dropout(x, p, seed, &mut xd);
            xd
        })
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "afinar-lora-linear"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (out_f, in_f, r) = self.dims()?;
        let x = f32s(s1, l1, "lora input")?;
        let a = f32s(s2, l2, "lora_A")?;
        let bw = f32s(s3, l3, "lora_B")?;
        if l1.dims().last() != Some(&in_f) || a.len() != r * in_f || bw.len() != out_f * r {
            return Err(cerr(format!(
                "lora linear: input {:?}, weight [{out_f}, {in_f}], lora_A {:?}, lora_B {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let n = x.len() / in_f;
        let par = kernels::parallelism();
        let mut y = vec![0f32; n * out_f];
        if let Some(b) = &self.b {
            with_f32(&b.t, "linear bias", |b| {
                y.par_chunks_mut(out_f).for_each(|r| r.copy_from_slice(b));
                Ok(())
            })?;
        }
        with_f32(&self.w.t, "linear weight", |w| {
            kernels::matmul(
                &mut y,
                out_f,
                Mat::rm(x, n, in_f),
                Mat::rm(w, out_f, in_f).t(),
                1.0,
                self.b.is_some(),
                par,
            );
            Ok(())
        })?;
        let xd = self.dropped(x);
        let mut h = vec![0f32; n * r];
        kernels::matmul(
            &mut h,
            r,
            Mat::rm(xd.as_deref().unwrap_or(x), n, in_f),
            Mat::rm(a, r, in_f).t(),
            1.0,
            false,
            par,
        );
        *self.xd.lock().unwrap() = xd;
        kernels::matmul(
            &mut y,
            out_f,
            Mat::rm(&h, n, r),
            Mat::rm(bw, out_f, r).t(),
            self.scale,
            true,
            par,
        );
        let mut shape = l1.dims().to_vec();
        *shape.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f, r) = self.dims()?;
        let par = kernels::parallelism();
        let dx = with_f32(grad, "lora grad", |g| {
            with_f32(x, "lora input", |xv| {
                with_f32(a, "lora_A", |av| {
                    with_f32(bw, "lora_B", |bv| {
                        let n = g.len() / out_f;
                        // drop(x) kept by the forward (regenerated if the op runs backward twice)
                        let kept = self.xd.lock().unwrap().take();
                        let xd = kept.or_else(|| self.dropped(xv));
                        let xd = xd.as_deref().unwrap_or(xv);
                        // h = drop(x) A^T, recomputed ([n, r]: cheap)
                        let mut h = vec![0f32; n * r];
                        kernels::matmul(
                            &mut h,
                            r,
                            Mat::rm(xd, n, in_f),
                            Mat::rm(av, r, in_f).t(),
                            1.0,
                            false,
                            par,
                        );
                        // gh = s g B  [n, r]
                        let mut gh = vec![0f32; n * r];
                        kernels::matmul(
                            &mut gh,
                            r,
                            Mat::rm(g, n, out_f),
                            Mat::rm(bv, out_f, r),
                            self.scale,
                            false,
                            par,
                        );
                        if let Some(buf) = &self.bw.grad {
                            buf.accumulate(out_f * r, false, |d, overwrite| {
                                kernels::matmul(
                                    d,
                                    r,
                                    Mat::rm(g, n, out_f).t(),
                                    Mat::rm(&h, n, r),
                                    self.scale,
                                    !overwrite,
                                    par,
                                )
                            });
                        }
                        if let Some(buf) = &self.a.grad {
                            buf.accumulate(r * in_f, false, |d, overwrite| {
                                kernels::matmul(
                                    d,
                                    in_f,
                                    Mat::rm(&gh, n, r).t(),
                                    Mat::rm(xd, n, in_f),
                                    1.0,
                                    !overwrite,
                                    par,
                                )
                            });
                        }
                        if !needs_grad(x) {
                            return Ok(None);
                        }
                        let mut dx = vec![0f32; n * in_f];
                        with_f32(&self.w.t, "linear weight", |w| {
                            kernels::matmul(
                                &mut dx,
                                in_f,
                                Mat::rm(g, n, out_f),
                                Mat::rm(w, out_f, in_f),
                                1.0,
                                false,
                                par,
                            );
                            Ok(())
                        })?;
                        match self.dropout {
                            None => kernels::matmul(
                                &mut dx,
                                in_f,
                                Mat::rm(&gh, n, r),
                                Mat::rm(av, r, in_f),
                                1.0,
                                true,
                                par,
                            ),
                            Some((p, seed)) => {
                                let mut dl = vec![0f32; n * in_f];
                                kernels::matmul(
                                    &mut dl,
                                    in_f,
                                    Mat::rm(&gh, n, r),
                                    Mat::rm(av, r, in_f),
                                    1.0,
                                    false,
                                    par,
                                );
                                let mut dld = vec![0f32; n * in_f];
                                kernels::dropout(&dl, p, seed, &mut dld);
                                dx.par_chunks_mut(4096).zip(dld.par_chunks(4096)).for_each(
                                    |(d, l)| {
                                        for (d, l) in d.iter_mut().zip(l) {
                                            *d += l;
                                        }
                                    },
                                );
                            }
                        }
                        Ok(Some(tensor(dx, x.shape())?))
                    })
                })
            })
        })?;
        Ok((dx, None, None))
    }
}

/// A frozen linear (`w`, optional frozen bias) wrapped by LoRA `a` `[r, in]`,
/// `bw` `[out, r]` with scale `s` and adapter dropout `(p, seed)`: one op
/// (forward and backward as [`LoraLinearOp`]).
pub fn lora_linear(
    x: &Tensor,
    w: &Weight,
    b: Option<&Weight>,
    a: &Weight,
    bw: &Weight,
    scale: f64,
    dropout: Option<(f32, u64)>,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::lora_linear(x, w, b, a, bw, scale, dropout);
    }
    let op = LoraLinearOp {
        w: w.clone(),
        b: b.cloned(),
        a: a.clone(),
        bw: bw.clone(),
        scale: scale as f32,
        dropout,
        xd: std::sync::Mutex::new(None),
    };
    x.contiguous()?.apply_op3_arc(
        &a.t.contiguous()?,
        &bw.t.contiguous()?,
        Arc::new(Box::new(op)),
    )
}

// ------------------------------------------------------------------ GELU

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "afinar-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s, l, "gelu")?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(yc, xc)| {
                for (o, v) in yc.iter_mut().zip(xc) {
                    *o = kernels::gelu(*v);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        with_f32(x, "gelu input", |xv| {
            with_f32(grad, "gelu grad", |g| {
                let mut dx = vec![0f32; xv.len()];
                dx.par_chunks_mut(4096).enumerate().for_each(|(c, dc)| {
                    let o = c * 4096;
                    for (j, d) in dc.iter_mut().enumerate() {
                        *d = g[o + j] * kernels::gelu_grad(xv[o + j]);
                    }
                });
                Ok(Some(tensor(dx, x.shape())?))
            })
        })
    }
}

/// Exact (erf) GELU, as BERT's `hidden_act = "gelu"`.
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::gelu(x, 1);
    }
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(GeluOp)))
}

// ------------------------------------------------------------------ LayerNorm

struct LayerNormOp {
    eps: f32,
    w: Weight,
    b: Weight,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "afinar-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "layer_norm input")?;
        let g = f32s(s2, l2, "layer_norm weight")?;
        let b = f32s(s3, l3, "layer_norm bias")?;
        let d = g.len();
        if l1.dims().last() != Some(&d) || b.len() != d {
            return Err(cerr(format!(
                "layer_norm: input {:?}, weight [{d}], bias [{}]",
                l1.dims(),
                b.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        kernels::layer_norm_fwd(x, g, b, self.eps, d, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = g.elem_count();
        let want_params = self.w.grad.is_some() || self.b.grad.is_some();
        with_f32(x, "layer_norm input", |xv| {
            with_f32(g, "layer_norm weight", |gv| {
                with_f32(grad, "layer_norm grad", |dy| {
                    let mut dx = if needs_grad(x) {
                        Some(vec![0f32; xv.len()])
                    } else {
                        None
                    };
                    let (dg, db) = kernels::layer_norm_bwd(
                        xv,
                        gv,
                        dy,
                        self.eps,
                        d,
                        dx.as_deref_mut(),
                        want_params,
                    );
                    if let Some(buf) = &self.w.grad {
                        buf.add(&dg);
                    }
                    if let Some(buf) = &self.b.grad {
                        buf.add(&db);
                    }
                    Ok((dx.map(|v| tensor(v, x.shape())).transpose()?, None, None))
                })
            })
        })
    }
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Weight, bias: &Weight, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::layer_norm(x, weight, bias, eps as f32);
    }
    x.contiguous()?.apply_op3_arc(
        &weight.t.contiguous()?,
        &bias.t.contiguous()?,
        Arc::new(Box::new(LayerNormOp {
            eps: eps as f32,
            w: weight.clone(),
            b: bias.clone(),
        })),
    )
}

// ------------------------------------------------------------------ dropout

struct DropoutOp {
    p: f32,
    seed: u64,
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "afinar-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s, l, "dropout")?;
        let mut y = vec![0f32; x.len()];
        kernels::dropout(x, self.p, self.seed, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        with_f32(grad, "dropout grad", |g| {
            let mut dx = vec![0f32; g.len()];
            kernels::dropout(g, self.p, self.seed, &mut dx);
            Ok(Some(tensor(dx, x.shape())?))
        })
    }
}

/// Inverted dropout with a mask drawn from `seed` (same seed, same mask).
/// `p = 0` is the identity; `p` must be in [0, 1).
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Err(cerr(format!("dropout probability {p} must be < 1")));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::dropout(x, p, seed);
    }
    x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(DropoutOp { p, seed })))
}

// ------------------------------------------------------------------ attention

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

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "afinar-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let sh = self.shape(l1.dims())?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            return Err(cerr(format!(
                "attention: q {:?}, k {:?}, v {:?} differ",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )));
        }
        let (q, k, v) = (f32s(s1, l1, "q")?, f32s(s2, l2, "k")?, f32s(s3, l3, "v")?);
        let mut out = vec![0f32; q.len()];
        kernels::attention_fwd(
            q,
            k,
            v,
            &self.key_mask,
            sh,
            self.scale,
            self.dropout,
            &mut out,
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sh = self.shape(q.dims())?;
        with_f32(q, "q", |qv| {
            with_f32(k, "k", |kv| {
                with_f32(v, "v", |vv| {
                    with_f32(grad, "attention grad", |g| {
                        let n = qv.len();
                        let (mut dq, mut dk, mut dv) =
                            (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
                        kernels::attention_bwd(
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
                        Ok((
                            Some(tensor(dq, s)?),
                            Some(tensor(dk, s)?),
                            Some(tensor(dv, s)?),
                        ))
                    })
                })
            })
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
    q.contiguous()?.apply_op3_arc(
        &k.contiguous()?,
        &v.contiguous()?,
        Arc::new(Box::new(AttentionOp {
            key_mask,
            heads,
            scale,
            dropout,
        })),
    )
}

// ------------------------------------------------------------------ embedding

struct EmbeddingOp {
    padding_idx: Option<u32>,
    w: Weight,
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "afinar-embedding"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let w = f32s(s1, l1, "embedding weight")?;
        let ids = u32s(s2, l2, "embedding ids")?;
        let [v, h] = l1.dims() else {
            return Err(cerr("embedding weight must be 2-d"));
        };
        let mut out = vec![0f32; ids.len() * h];
        for (o, &id) in out.chunks_mut(*h).zip(ids) {
            if id as usize >= *v {
                return Err(cerr(format!(
                    "token id {id} is out of range for a vocabulary of {v}"
                )));
            }
            o.copy_from_slice(&w[id as usize * h..(id as usize + 1) * h]);
        }
        let mut shape = l2.dims().to_vec();
        shape.push(*h);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let Some(buf) = &self.w.grad else {
            return Ok((None, None));
        };
        let (v, h) = w.dims2()?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        with_f32(grad, "embedding grad", |g| {
            buf.accumulate(v * h, true, |dw, _| {
                for (row, &id) in g.chunks(h).zip(&ids) {
                    // As torch's `padding_idx`: the padding row never learns.
                    if Some(id) == self.padding_idx {
                        continue;
                    }
                    for (d, x) in dw[id as usize * h..(id as usize + 1) * h]
                        .iter_mut()
                        .zip(row)
                    {
                        *d += x;
                    }
                }
            });
            Ok((None, None))
        })
    }
}

/// Rows of `weight` `[V, H]` for `ids` (any shape, u32) -> `[..ids, H]`.
/// The gradient skips `padding_idx`, as `nn.Embedding(padding_idx=...)`.
pub fn embedding(weight: &Weight, ids: &Tensor, padding_idx: Option<u32>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if weight.t.device().is_cuda() {
        return super::cuda::embedding(weight, ids, padding_idx);
    }
    let op = EmbeddingOp {
        padding_idx,
        w: weight.clone(),
    };
    weight.t.contiguous()?.apply_op2_arc(
        &ids.to_dtype(DType::U32)?.contiguous()?,
        Arc::new(Box::new(op)),
    )
}

// ------------------------------------------------------------------ scale last dim

/// `y * (v / div)` along the last dimension: IA3's learned vectors and
/// DoRA's magnitude over the (detached) weight norm. `v`'s gradient goes to
/// its buffer; `div` is a constant (no gradient).
struct ScaleLastOp {
    v: Weight,
    div: Option<Arc<Vec<f32>>>,
}

impl ScaleLastOp {
    fn factors(&self, v: &[f32]) -> Vec<f32> {
        match &self.div {
            Some(d) => v.iter().zip(d.iter()).map(|(a, b)| a / b).collect(),
            None => v.to_vec(),
        }
    }
}

impl CustomOp2 for ScaleLastOp {
    fn name(&self) -> &'static str {
        "afinar-scale-last"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = f32s(s1, l1, "scale input")?;
        let v = f32s(s2, l2, "scale vector")?;
        let d = *l1
            .dims()
            .last()
            .ok_or_else(|| cerr("scale: scalar input"))?;
        if v.len() != d {
            return Err(cerr(format!(
                "scale: vector of {} for rows of {d}",
                v.len()
            )));
        }
        let f = self.factors(v);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .for_each(|(o, r)| {
                for j in 0..d {
                    o[j] = r[j] * f[j];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        y: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = v.elem_count();
        with_f32(v, "scale vector", |vv| {
            let f = self.factors(vv);
            with_f32(grad, "scale grad", |g| {
                if let Some(buf) = &self.v.grad {
                    with_f32(y, "scale input", |yv| {
                        // d v_j = sum_rows(g * y)_j / div_j
                        let mut dv = vec![0f32; d];
                        for (gr, yr) in g.chunks(d).zip(yv.chunks(d)) {
                            for j in 0..d {
                                dv[j] += gr[j] * yr[j];
                            }
                        }
                        if let Some(div) = &self.div {
                            for (x, q) in dv.iter_mut().zip(div.iter()) {
                                *x /= q;
                            }
                        }
                        buf.add(&dv);
                        Ok(())
                    })?;
                }
                if !needs_grad(y) {
                    return Ok((None, None));
                }
                let mut dy = vec![0f32; g.len()];
                dy.par_chunks_mut(d)
                    .zip(g.par_chunks(d))
                    .for_each(|(o, r)| {
                        for j in 0..d {
                            o[j] = r[j] * f[j];
                        }
                    });
                Ok((Some(tensor(dy, y.shape())?), None))
            })
        })
    }
}

/// `y * (v / div)` over the last dimension; `v` (`[d]` elements, any shape)
/// may be trainable, `div` is a constant.
pub fn scale_last(y: &Tensor, v: &Weight, div: Option<Arc<Vec<f32>>>) -> CResult<Tensor> {
    if !y.device().is_cpu() {
        return Err(cerr(
            "IA3 / DoRA scaling has no GPU kernel yet: train IA3 and DoRA on the CPU",
        ));
    }
    let op = ScaleLastOp { v: v.clone(), div };
    y.contiguous()?
        .apply_op2_arc(&v.t.contiguous()?, Arc::new(Box::new(op)))
}

// ------------------------------------------------------------------ cross-entropy

struct CrossEntropyOp;

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "afinar-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let logits = f32s(s1, l1, "logits")?;
        let t = u32s(s2, l2, "cross_entropy targets")?;
        let c = *l1.dims().last().unwrap();
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
        Ok((
            CpuStorage::F32(vec![(total / n as f64) as f32]),
            Shape::from(()),
        ))
    }
    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F32)?.to_vec0::<f32>()?;
        let t = targets.to_vec1::<u32>()?;
        let c = logits.dim(logits.rank() - 1)?;
        with_f32(logits, "logits", |lv| {
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
            Ok((Some(tensor(d, logits.shape())?), None))
        })
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
    logits.contiguous()?.apply_op2_arc(
        &targets.to_dtype(DType::U32)?.contiguous()?,
        Arc::new(Box::new(CrossEntropyOp)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (kernels::uniform(seed, i as u64) - 0.5) * 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Checks d(sum(f(x) * r))/dx of every argument against central
    /// differences. Arguments are handed to `f` as trainable [`Weight`]s: ops
    /// that take plain tensors use `.t` (their gradient comes back through
    /// candle), ops that take weights accumulate into the buffers.
    fn check_grads(vals: &[Tensor], f: &dyn Fn(&[Weight]) -> Tensor, tol: f32) {
        let ws: Vec<Weight> = vals.iter().map(|v| Weight::trainable(v).unwrap()).collect();
        let out = f(&ws);
        let r = randn(out.dims(), 99);
        let loss = (out * &r).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (vi, w) in ws.iter().enumerate() {
            let g = match grads.get(&w.t) {
                Some(g) => g.clone(),
                None => w.grad_tensor().unwrap().expect("gradient present"),
            };
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let base = vals[vi].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let h = 1e-2f32;
            for i in (0..base.len()).step_by((base.len() / 7).max(1)) {
                let eval = |delta: f32| -> f32 {
                    let mut p = base.clone();
                    p[i] += delta;
                    let mut args: Vec<Weight> =
                        vals.iter().map(|v| Weight::frozen(v.clone())).collect();
                    args[vi] = Weight::frozen(
                        Tensor::from_vec(p, vals[vi].shape(), &Device::Cpu).unwrap(),
                    );
                    (f(&args) * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_vec0::<f32>()
                        .unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() <= tol * (1.0 + fd.abs()),
                    "arg {vi} elem {i}: fd {fd} vs analytic {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn linear_grads_match_finite_differences() {
        let vals = [randn(&[2, 3, 5], 1), randn(&[4, 5], 2), randn(&[4], 3)];
        check_grads(
            &vals,
            &|w| linear(&w[0].t, &w[1], Some(&w[2])).unwrap(),
            2e-2,
        );
    }

    #[test]
    fn frozen_weight_gets_no_gradient_and_trainable_accumulates() {
        let x = Var::from_tensor(&randn(&[3, 5], 1)).unwrap();
        let frozen = Weight::frozen(randn(&[4, 5], 2));
        let y = linear(x.as_tensor(), &frozen, None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&frozen.t).is_none());
        // A trainable weight: two backward passes add up in its buffer.
        let w = Weight::trainable(&randn(&[4, 5], 2)).unwrap();
        let once = {
            let y = linear(x.as_tensor(), &w, None).unwrap();
            let _ = y.sum_all().unwrap().backward().unwrap();
            w.grad_tensor().unwrap().unwrap()
        };
        let y = linear(x.as_tensor(), &w, None).unwrap();
        let _ = y.sum_all().unwrap().backward().unwrap();
        let twice = w.grad_tensor().unwrap().unwrap();
        let diff = ((once * 2.0).unwrap() - twice)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_vec0::<f32>()
            .unwrap();
        assert!(diff < 1e-5);
        w.grad.as_ref().unwrap().clear();
        assert!(w.grad_tensor().unwrap().is_none());
    }

    #[test]
    fn layer_norm_gelu_dropout_embedding_grads() {
        let x = randn(&[4, 6], 4);
        let vals = [x.clone(), (randn(&[6], 5) + 1.0).unwrap(), randn(&[6], 6)];
        check_grads(
            &vals,
            &|w| layer_norm(&w[0].t, &w[1], &w[2], 1e-5).unwrap(),
            2e-2,
        );
        check_grads(&[x.clone()], &|w| gelu(&w[0].t).unwrap(), 2e-2);
        check_grads(&[x.clone()], &|w| dropout(&w[0].t, 0.3, 11).unwrap(), 2e-2);
        let ids = Tensor::new(&[1u32, 3, 0, 1], &Device::Cpu).unwrap();
        check_grads(
            &[x.clone()],
            &|w| embedding(&w[0], &ids, Some(2)).unwrap(),
            2e-2,
        );
        let v = (randn(&[6], 8) + 1.5).unwrap();
        check_grads(
            &[x.clone(), v.clone()],
            &|w| scale_last(&w[0].t, &w[1], None).unwrap(),
            2e-2,
        );
        let div = Arc::new(vec![0.5f32, 2.0, 1.0, 3.0, 0.7, 1.1]);
        check_grads(
            &[x, v],
            &move |w| scale_last(&w[0].t, &w[1], Some(div.clone())).unwrap(),
            2e-2,
        );
    }

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
}
