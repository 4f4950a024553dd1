//! IA3 (Liu et al. 2022) on a linear layer, as PEFT 0.21
//! `tuners/ia3/layer.py`: a learned vector `l` scales the layer's output,
//! `y = (x W^T + b) * l` with `l` `[out, 1]`, or for feed-forward modules
//! its input, `y = (x * l) W^T + b` with `l` `[1, in]`; `l` starts at 1, so
//! the adapted layer starts equal to the base. Its parameter lives under the
//! module's path as `peft::IA3_L`.

use super::config::Ia3Config;
use super::matches_key;
use super::peft::IA3_L;
use crate::nn::{self, Base, DropoutRng, Linear, LinearAdapter, Weight};
use crate::params::{AdapterSpec, ParamStore, Path};
use crate::Result;
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// How IA3 wraps one module.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Spec {
    /// Scales the input (a feed-forward module) instead of the output.
    pub feedforward: bool,
}

impl Ia3Spec {
    fn shape(&self, in_f: usize, out_f: usize) -> (usize, usize) {
        if self.feedforward {
            (1, in_f)
        } else {
            (out_f, 1)
        }
    }
}

impl AdapterSpec for Ia3Spec {
    fn method(&self) -> &'static str {
        "IA3"
    }

    fn tensor_names(&self) -> Vec<&'static str> {
        vec![IA3_L]
    }

    fn build(&self, p: &Path, base: &Base) -> Result<Arc<dyn LinearAdapter>> {
        let (out_f, in_f) = base.dims()?;
        Ok(Arc::new(Ia3 {
            l: {
                let (r, c) = self.shape(in_f, out_f);
                p.get(&[r, c], IA3_L)?
            },
            feedforward: self.feedforward,
        }))
    }
}

impl Ia3Config {
    /// Add IA3's vector for module `path` (`[out, in]`) to `store`, at 1.
    pub(crate) fn init(&self, store: &mut ParamStore, m: (&str, usize, usize)) -> Result<Ia3Spec> {
        let (path, out_f, in_f) = m;
        let spec = Ia3Spec {
            feedforward: self
                .feedforward_modules
                .iter()
                .any(|m| matches_key(path, m)),
        };
        store.insert_trainable(
            &format!("{path}.{IA3_L}"),
            Tensor::ones(
                spec.shape(in_f, out_f),
                candle_core::DType::F32,
                &Device::Cpu,
            )?,
        )?;
        Ok(spec)
    }
}

/// IA3 on one layer.
pub struct Ia3 {
    pub l: Weight,
    pub feedforward: bool,
}

impl LinearAdapter for Ia3 {
    fn forward(&self, layer: &Linear, x: &Tensor, _rng: Option<&DropoutRng>) -> Result<Tensor> {
        if self.feedforward {
            layer
                .weight
                .linear(&nn::scale_last(x, &self.l, None)?, layer.bias.as_ref())
        } else {
            Ok(nn::scale_last(&layer.base_forward(x)?, &self.l, None)?)
        }
    }

    /// W scaled along the right axis; on outputs the bias too.
    fn merge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let l = self.l.t.detach();
        if self.feedforward {
            return Ok((w.broadcast_mul(&l)?, b.cloned(), None));
        }
        // l: [out, 1]
        let b = b.map(|b| b.mul(&l.flatten_all()?)).transpose()?;
        Ok((w.broadcast_mul(&l)?, b, None))
    }

    /// Divide by l again.
    fn unmerge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        _aux: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let l = self.l.t.detach();
        if self.feedforward {
            return Ok((w.broadcast_div(&l)?, b.cloned()));
        }
        let b = b.map(|b| b.div(&l.flatten_all()?)).transpose()?;
        Ok((w.broadcast_div(&l)?, b))
    }

    fn weights(&self) -> Vec<&Weight> {
        vec![&self.l]
    }
}
