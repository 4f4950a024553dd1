//! Normalisation layers over the last dimension: LayerNorm (BERT, GPT-2)
//! and RMSNorm (the Llama family), on afinar's fused ops with backward
//! (`nn::layer_norm`, `nn::rms_norm`). Built from their parameters
//! (`params::Path::layer_norm` / `rms_norm` read them by checkpoint path).

use crate::nn::{self, Weight};
use crate::Result;
use candle_core::Tensor;

/// `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Weight,
    pub bias: Weight,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }

    /// A trainable tensor of the layer, if any (see [`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        [&self.weight, &self.bias]
            .into_iter()
            .find(|w| w.is_trainable())
            .map(|w| w.t.clone())
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Weight,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The weight, if it trains (see [`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        self.weight.is_trainable().then(|| self.weight.t.clone())
    }
}
