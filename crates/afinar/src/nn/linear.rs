//! The linear layer every model uses, and the one trait an adapter
//! implements to wrap it ([`LinearAdapter`]: LoRA / DoRA and IA3 in
//! `adapters/`, PEFT's semantics).
//!
//! The base weight is f32, or kept quantised (a GGUF's Q4_0 / Q4_1 / Q8_0,
//! frozen, QLoRA-style: Dettmers et al. 2023, <https://arxiv.org/abs/2305.14314>)
//! and dequantised tile by tile inside each matmul by [`nn::qlinear`]. A
//! layer is built from its parameters (`params::Path::linear` reads them
//! from the store by checkpoint path).
//!
//! Below the layer, the ops it runs on, each with a hand-written backward:
//! [`linear`] (`x W^T + b`: a frozen weight costs no gradient gemm, which
//! candle's matmul backward would compute anyway) and [`lora_linear`], a
//! LoRA-wrapped frozen linear as one graph node (Hu et al. 2021,
//! <https://arxiv.org/abs/2106.09685>; PEFT's `lora.Linear.forward`).

use super::custom_op::{
    apply, cerr, first_only, last_dim, needs_grad, output, tensor, with_f32, with_f32s,
    with_last_dim, CResult, Fwd, Grads, Input, Op,
};
use super::kernels::{self, Mat};
use crate::hub::gguf::QTensor;
use crate::nn::{self, DropoutRng, Weight};
use crate::Result;
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The base weight `[out, in]` of a linear layer.
#[derive(Clone)]
pub enum Base {
    /// f32, frozen or trainable.
    F32(Weight),
    /// Kept quantised: always frozen, no gradient is ever computed for it.
    Quantized(Arc<QTensor>),
}

impl Base {
    /// The f32 weight (None when quantised).
    pub fn as_f32(&self) -> Option<&Weight> {
        match self {
            Base::F32(w) => Some(w),
            Base::Quantized(_) => None,
        }
    }

    pub fn is_quantized(&self) -> bool {
        matches!(self, Base::Quantized(_))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Base::F32(w) => w.t.dims2()?,
            Base::Quantized(q) => (q.rows(), q.cols()),
        })
    }

    /// The weight as a detached f32 tensor (a quantised one dequantised).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            // A bf16 frozen base on a GPU comes back as f32 too.
            Base::F32(w) => Ok(w.t.detach().to_dtype(candle_core::DType::F32)?),
            Base::Quantized(q) => nn::qlinear::dequantize(q),
        }
    }

    /// `x W^T + b` over the last dimension.
    pub fn linear(&self, x: &Tensor, bias: Option<&Weight>) -> Result<Tensor> {
        Ok(match self {
            Base::F32(w) => nn::linear(x, w, bias)?,
            Base::Quantized(q) => nn::qlinear::qlinear(x, q, bias)?,
        })
    }
}

/// What wraps a linear layer: a delta on top of the base layer (habit 6),
/// that can be folded into the base weight and taken out again.
pub trait LinearAdapter: Send + Sync {
    /// The adapted layer's output for `x` `[.., in]` -> `[.., out]`
    /// (`rng` = Some in training: adapter dropout).
    fn forward(&self, layer: &Linear, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor>;
    /// The base weight `w` `[out, in]` and bias (f32, detached) with the
    /// adapter folded in, and what [`unmerge`](Self::unmerge) needs to take
    /// it out again (e.g. DoRA's row factors; None when the delta alone does).
    fn merge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)>;
    /// The inverse of [`merge`](Self::merge): the base weight and bias back
    /// from merged ones (`aux`: what merge returned).
    fn unmerge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        aux: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// The adapter's own parameters.
    fn weights(&self) -> Vec<&Weight>;
}

/// A linear layer, `x W^T + b`, optionally wrapped by an adapter.
#[derive(Clone)]
pub struct Linear {
    pub weight: Base,
    pub bias: Option<Weight>,
    pub adapter: Option<Arc<dyn LinearAdapter>>,
    /// Shared by every adapter of a model: off gives the base model.
    pub adapters_enabled: Arc<AtomicBool>,
    /// Set while adapters are merged into the weights: the adapter path is skipped.
    pub adapters_merged: Arc<AtomicBool>,
}

impl Linear {
    /// A plain layer (no adapter; its switches are its own).
    pub fn new(weight: Base, bias: Option<Weight>) -> Self {
        Linear {
            weight,
            bias,
            adapter: None,
            adapters_enabled: Arc::new(AtomicBool::new(true)),
            adapters_merged: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A trainable tensor of this layer (weight, bias or adapter), if any:
    /// what keeps a checkpointed layer in the graph ([`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        let mut ws: Vec<&Weight> = vec![];
        if let Base::F32(w) = &self.weight {
            ws.push(w);
        }
        ws.extend(self.bias.as_ref());
        if let Some(a) = &self.adapter {
            ws.extend(a.weights());
        }
        ws.into_iter()
            .find(|w| w.is_trainable())
            .map(|w| w.t.clone())
    }

    /// The base layer alone, `x W^T + b`.
    pub fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.linear(x, self.bias.as_ref())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    /// The adapter, when there is one and it is on (enabled, not merged).
    fn active_adapter(&self) -> Option<&Arc<dyn LinearAdapter>> {
        let on = self.adapters_enabled.load(Ordering::Relaxed)
            && !self.adapters_merged.load(Ordering::Relaxed);
        self.adapter.as_ref().filter(|_| on)
    }

    /// `rng` = Some in training (adapter dropout).
    pub fn forward_t(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        match self.active_adapter() {
            Some(a) => a.forward(self, x, rng),
            None => self.base_forward(x),
        }
    }

    /// The weight and bias when the layer is a plain frozen f32 projection
    /// on the CPU (no active adapter, nothing of it trains): what a fused
    /// op may read directly ([`nn::gelu_dense`], [`nn::swiglu_down_residual`]).
    pub fn frozen_plain(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        let Base::F32(w) = &self.weight else {
            return None;
        };
        let frozen = !w.is_trainable() && self.bias.as_ref().is_none_or(|b| !b.is_trainable());
        let cpu_f32 = w.t.device().is_cpu() && w.t.dtype() == candle_core::DType::F32;
        (frozen && cpu_f32 && self.active_adapter().is_none())
            .then(|| (&w.t, self.bias.as_ref().map(|b| &b.t)))
    }

    /// The weight and bias with the adapter folded in (f32; a quantised
    /// base is dequantised first), and the adapter's unmerge data.
    pub fn merged(&self) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_f32()?;
        let b = self
            .bias
            .as_ref()
            .map(|b| b.t.detach().to_dtype(candle_core::DType::F32))
            .transpose()?;
        match &self.adapter {
            None => Ok((w, b, None)),
            Some(a) => a.merge(&w, b.as_ref()),
        }
    }
}

/// Dropout in training (`rng` = Some and `p` > 0), else `x` unchanged.
pub fn maybe_dropout(x: Tensor, p: f32, rng: Option<&DropoutRng>) -> Result<Tensor> {
    match rng {
        Some(r) if p > 0.0 => Ok(nn::dropout(&x, p, r.next())?),
        _ => Ok(x),
    }
}

// ------------------------------------------------------------------ the linear op

/// `x @ w^T + b`; the weight and bias gradients go to their grad buffers.
/// Its inputs are x, w and, when there is a bias, b (two or three).
struct LinearOp {
    w: Weight,
    b: Option<Weight>,
}

impl<const N: usize> Op<N> for LinearOp {
    fn name(&self) -> &'static str {
        "afinar-linear"
    }
    fn cpu_fwd(&self, xs: [Input; N]) -> Fwd {
        let (x, w) = (xs[0], xs[1]);
        let (out_f, in_f) = (w.dims()[0], w.dims()[1]);
        let k = last_dim(x.dims(), "linear")?;
        if k != in_f {
            return Err(cerr(format!(
                "linear: input width {k} but weight is [{out_f}, {in_f}]"
            )));
        }
        let b = xs.get(2).map(|b| b.f32s("linear bias")).transpose()?;
        let (x, w) = (x.f32s("linear input")?, w.f32s("linear weight")?);
        let y = cpu::x_wt(x, w, out_f, in_f, b, kernels::parallelism());
        output(y, with_last_dim(xs[0].dims(), out_f, "linear")?)
    }
    /// dx goes back to candle; dW and db accumulate in place.
    fn bwd(&self, xs: [&Tensor; N], _res: &Tensor, grad: &Tensor) -> Grads<N> {
        let x = xs[0];
        let (out_f, in_f) = self.w.t.dims2()?;
        let par = kernels::parallelism();
        let dx = with_f32(grad, "linear grad", |g| {
            let n = g.len() / out_f;
            // The point of owning this op: a frozen weight costs no gemm.
            if let Some(buf) = &self.w.grad {
                with_f32(x, "linear input", |xv| {
                    buf.add_product(Mat::rm(g, n, out_f).t(), Mat::rm(xv, n, in_f), 1.0, par);
                    Ok(())
                })?;
            }
            cpu::add_bias_grad(self.b.as_ref(), g, out_f);
            if !needs_grad(x) {
                return Ok(None);
            }
            with_f32(&self.w.t, "linear weight", |wv| {
                Ok(Some(tensor(cpu::g_w(g, wv, out_f, in_f, par), x.shape())?))
            })
        })?;
        Ok(first_only(dx))
    }
}

/// `x @ w^T + b` over the last dimension of `x` ([.., in] -> [.., out]).
/// A frozen weight or bias costs no gradient computation; trainable ones
/// accumulate into their gradient buffers.
pub fn linear(x: &Tensor, w: &Weight, b: Option<&Weight>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::linear(x, w, b);
    }
    let op = LinearOp {
        w: w.clone(),
        b: b.cloned(),
    };
    match b {
        Some(b) => apply(op, [x, &w.t, &b.t]),
        None => apply(op, [x, &w.t]),
    }
}

// ------------------------------------------------------------------ the LoRA linear op

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
            super::dropout::cpu::apply_mask(x, p, seed, &mut xd);
            xd
        })
    }
}

impl Op<3> for LoraLinearOp {
    fn name(&self) -> &'static str {
        "afinar-lora-linear"
    }
    fn cpu_fwd(&self, [xi, ai, bi]: [Input; 3]) -> Fwd {
        let (out_f, in_f, r) = self.dims()?;
        let (x, a) = (xi.f32s("lora input")?, ai.f32s("lora_A")?);
        let bw = bi.f32s("lora_B")?;
        if xi.dims().last() != Some(&in_f) || a.len() != r * in_f || bw.len() != out_f * r {
            return Err(cerr(format!(
                "lora linear: input {:?}, weight [{out_f}, {in_f}], lora_A {:?}, lora_B {:?}",
                xi.dims(),
                ai.dims(),
                bi.dims()
            )));
        }
        let n = x.len() / in_f;
        let par = kernels::parallelism();
        let mut y = with_f32(&self.w.t, "linear weight", |w| match &self.b {
            Some(b) => with_f32(&b.t, "linear bias", |b| {
                Ok(cpu::x_wt(x, w, out_f, in_f, Some(b), par))
            }),
            None => Ok(cpu::x_wt(x, w, out_f, in_f, None, par)),
        })?;
        let xd = self.dropped(x);
        let h = cpu::x_wt(xd.as_deref().unwrap_or(x), a, r, in_f, None, par);
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
        output(y, with_last_dim(xi.dims(), out_f, "lora linear")?)
    }
    fn bwd(&self, [x, a, bw]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let (out_f, in_f, r) = self.dims()?;
        let par = kernels::parallelism();
        let names = ["lora grad", "lora input", "lora_A", "lora_B"];
        let dx = with_f32s([grad, x, a, bw], names, |[g, xv, av, bv]| {
            let n = g.len() / out_f;
            // drop(x) kept by the forward (regenerated if the op runs backward twice)
            let kept = self.xd.lock().unwrap().take();
            let xd = kept.or_else(|| self.dropped(xv));
            let xd = xd.as_deref().unwrap_or(xv);
            // h = drop(x) A^T, recomputed ([n, r]: cheap)
            let h = cpu::x_wt(xd, av, r, in_f, None, par);
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
                buf.add_product(Mat::rm(g, n, out_f).t(), Mat::rm(&h, n, r), self.scale, par);
            }
            if let Some(buf) = &self.a.grad {
                buf.add_product(Mat::rm(&gh, n, r).t(), Mat::rm(xd, n, in_f), 1.0, par);
            }
            if !needs_grad(x) {
                return Ok(None);
            }
            let mut dx = with_f32(&self.w.t, "linear weight", |w| {
                Ok(cpu::g_w(g, w, out_f, in_f, par))
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
                    let dl = cpu::g_w(&gh, av, r, in_f, par);
                    super::dropout::cpu::apply_mask_add(&dl, p, seed, &mut dx);
                }
            }
            Ok(Some(tensor(dx, x.shape())?))
        })?;
        Ok([dx, None, None])
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
        return cuda::lora_linear(x, w, b, a, bw, scale, dropout);
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
    apply(op, [x, &a.t, &bw.t])
}

/// The CPU kernels the linear ops (and `qlinear.rs`, `loss.rs`) share: the
/// two products of a linear layer and its bias gradient.
pub(super) mod cpu {
    use crate::nn::kernels::{self, col_sums, Mat};
    use crate::nn::Weight;
    use gemm::Parallelism;

    /// Up to this many rows, `x_wt` multiplies as `w @ x^T` and transposes
    /// back: with few rows (a decoding step: one per sequence) gemm runs the
    /// weight as its left operand 1.5-2.5x faster on 576-1536 wide layers
    /// (16 rows, AVX-512; `examples/gemm_decode_probe.rs`), and the
    /// transpose of `n x out` values costs little next to it.
    pub const FEW_ROWS: usize = 64;

    /// `x [n, in] @ w [out, in]^T (+ b)`: the bias is copied into every row
    /// first and the gemm adds the product to it (beta = 1), so the bias
    /// costs no pass of its own.
    pub fn x_wt(
        x: &[f32],
        w: &[f32],
        out_f: usize,
        in_f: usize,
        b: Option<&[f32]>,
        par: Parallelism,
    ) -> Vec<f32> {
        let n = x.len() / in_f;
        if n > 1 && n <= FEW_ROWS {
            let t = kernels::matmul_new(
                Mat::rm(w, out_f, in_f),
                Mat::rm(x, n, in_f).t(),
                1.0,
                None,
                par,
            ); // [out, n]
            let mut y = Vec::with_capacity(n * out_f);
            for i in 0..n {
                match b {
                    Some(b) => y.extend((0..out_f).map(|j| t[j * n + i] + b[j])),
                    None => y.extend((0..out_f).map(|j| t[j * n + i])),
                }
            }
            return y;
        }
        kernels::matmul_new(
            Mat::rm(x, n, in_f),
            Mat::rm(w, out_f, in_f).t(),
            1.0,
            b,
            par,
        )
    }

    /// `g [n, out] @ w [out, in]`: the input gradient of `x_wt`.
    pub fn g_w(g: &[f32], w: &[f32], out_f: usize, in_f: usize, par: Parallelism) -> Vec<f32> {
        let n = g.len() / out_f;
        kernels::matmul_new(
            Mat::rm(g, n, out_f),
            Mat::rm(w, out_f, in_f),
            1.0,
            None,
            par,
        )
    }

    /// A trainable bias's gradient: the column sums of `g` (`[n, out]`).
    pub fn add_bias_grad(b: Option<&Weight>, g: &[f32], out_f: usize) {
        if let Some(Weight {
            grad: Some(buf), ..
        }) = b
        {
            buf.add(&col_sums(g, out_f));
        }
    }
}

/// The CUDA entries: cuBLAS through candle's matmul.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{add_grad, attach, cast, cuda_dev, Timer};
    use crate::nn::custom_op::{cerr, CResult};
    use crate::nn::dropout::cuda::apply as dropout_apply;
    use crate::nn::Weight;
    use candle_core::{DType, Tensor};

    /// `x @ w^T + b` with cuBLAS; dW only for a trainable weight.
    pub(super) fn linear(x: &Tensor, w: &Weight, b: Option<&Weight>) -> CResult<Tensor> {
        let _t = Timer::start("afinar-cuda-linear", "forward", &cuda_dev(x)?);
        let dt = x.dtype();
        let (out_f, in_f) = w.t.dims2()?;
        let n = x.elem_count() / in_f.max(1);
        let x2 = x.detach().reshape((n, in_f))?;
        let wc = cast(&w.t, dt)?;
        let mut y = x2.matmul(&wc.t()?)?;
        if let Some(b) = b {
            y = y.broadcast_add(&cast(&b.t, dt)?)?;
        }
        let mut shape = x.dims().to_vec();
        *shape
            .last_mut()
            .ok_or_else(|| cerr("linear: scalar input"))? = out_f;
        let y = y.reshape(shape)?;
        let want_dx = x.track_op();
        let xshape = x.shape().clone();
        let (w, b) = (w.clone(), b.cloned());
        let mut args = vec![x, &w.t];
        let bt = b.as_ref().map(|b| b.t.clone());
        if let Some(bt) = &bt {
            args.push(bt);
        }
        let (wg, bg) = (w.clone(), b.clone());
        attach("afinar-cuda-linear", &args, y, move |g| {
            let g2 = g.reshape((n, out_f))?;
            if wg.grad.is_some() {
                add_grad(&wg, &g2.t()?.matmul(&x2)?)?;
            }
            if let Some(bw) = &bg {
                if bw.grad.is_some() {
                    add_grad(bw, &g2.to_dtype(DType::F32)?.sum(0)?)?;
                }
            }
            let dx = if want_dx {
                Some(g2.matmul(&wc)?.reshape(xshape.clone())?)
            } else {
                None
            };
            Ok(vec![dx])
        })
    }

    /// A LoRA-wrapped frozen linear as one graph node:
    /// y = x W^T + b + s * (drop(x) A^T) B^T. Backward: dB = s g^T h,
    /// dA = (s g B)^T drop(x), dx = g W + drop(s g B A) (h = drop(x) A^T). One
    /// node instead of five (two linears, the scale, the sum) saves candle's
    /// per-node gradient bookkeeping; the products are the same.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_linear(
        x: &Tensor,
        w: &Weight,
        bias: Option<&Weight>,
        a: &Weight,
        bw: &Weight,
        scale: f64,
        dropout: Option<(f32, u64)>,
    ) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let _t = Timer::start("afinar-cuda-lora-linear", "forward", &dev);
        let dt = x.dtype();
        let (out_f, in_f) = w.t.dims2()?;
        let n = x.elem_count() / in_f.max(1);
        let x2 = x.detach().reshape((n, in_f))?.contiguous()?;
        let xd2 = match dropout {
            Some((p, seed)) => dropout_apply(&x2, p, seed)?,
            None => x2.clone(),
        };
        let (wc, ac, bc) = (cast(&w.t, dt)?, cast(&a.t, dt)?, cast(&bw.t, dt)?);
        let h = xd2.matmul(&ac.t()?)?; // [n, r]
        let mut y = x2.matmul(&wc.t()?)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&cast(&b.t, dt)?)?;
        }
        let y = (y + h.matmul(&bc.t()?)?.affine(scale, 0.0)?)?;
        let mut shape = x.dims().to_vec();
        *shape
            .last_mut()
            .ok_or_else(|| cerr("lora_linear: scalar input"))? = out_f;
        let y = y.reshape(shape)?;
        let want_dx = x.track_op();
        let xshape = x.shape().clone();
        let (ag, bg) = (a.clone(), bw.clone());
        attach("afinar-cuda-lora-linear", &[x, &a.t, &bw.t], y, move |g| {
            let g2 = g.reshape((n, out_f))?;
            let gs = g2.affine(scale, 0.0)?;
            if bg.grad.is_some() {
                add_grad(&bg, &gs.t()?.matmul(&h)?)?;
            }
            let gh = gs.matmul(&bc)?; // [n, r]
            if ag.grad.is_some() {
                add_grad(&ag, &gh.t()?.matmul(&xd2)?)?;
            }
            if !want_dx {
                return Ok(vec![None]);
            }
            let dl = gh.matmul(&ac)?;
            let dl = match dropout {
                Some((p, seed)) => dropout_apply(&dl, p, seed)?,
                None => dl,
            };
            Ok(vec![Some((g2.matmul(&wc)? + dl)?.reshape(xshape.clone())?)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, randn};
    use candle_core::Var;

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
    fn frozen_weight_passes_the_input_gradient_and_trainable_accumulates() {
        let x = Var::from_tensor(&randn(&[3, 5], 1)).unwrap();
        let frozen = Weight::frozen(randn(&[4, 5], 2));
        let y = linear(x.as_tensor(), &frozen, None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
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
        let diff = crate::testutil::max_diff(&(once * 2.0).unwrap(), &twice);
        assert!(diff < 1e-5);
        w.grad.as_ref().unwrap().clear();
        assert!(w.grad_tensor().unwrap().is_none());
    }

    #[test]
    fn lora_linear_grads_match_finite_differences() {
        // x, lora_A and lora_B are checked; the frozen base and bias get no
        // gradient (the op never computes one).
        let vals = [
            randn(&[2, 3, 5], 21),
            randn(&[2, 5], 22),
            randn(&[4, 2], 23),
        ];
        let (w, b) = (
            Weight::frozen(randn(&[4, 5], 24)),
            Weight::frozen(randn(&[4], 25)),
        );
        for dropout in [None, Some((0.3f32, 7u64))] {
            let (w, b) = (w.clone(), b.clone());
            check_grads(
                &vals,
                &move |a| lora_linear(&a[0].t, &w, Some(&b), &a[1], &a[2], 2.0, dropout).unwrap(),
                2e-2,
            );
        }
    }
}
