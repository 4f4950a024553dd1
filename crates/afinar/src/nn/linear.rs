//! The linear layer every model uses, and the one trait an adapter
//! implements to wrap it ([`LinearAdapter`]: LoRA / DoRA and IA3 in
//! `adapters/`, PEFT's semantics).
//!
//! The base weight is f32, or kept quantised (a GGUF's Q4_0 / Q4_1 / Q8_0,
//! frozen, QLoRA-style: Dettmers et al. 2023, <https://arxiv.org/abs/2305.14314>)
//! and dequantised tile by tile inside each matmul by [`nn::qlinear`]. A
//! layer is built from its parameters (`params::Path::linear` reads them
//! from the store by checkpoint path).

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

    /// `rng` = Some in training (adapter dropout).
    pub fn forward_t(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let active = self.adapters_enabled.load(Ordering::Relaxed)
            && !self.adapters_merged.load(Ordering::Relaxed);
        match self.adapter.as_ref().filter(|_| active) {
            Some(a) => a.forward(self, x, rng),
            None => self.base_forward(x),
        }
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
