//! LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) on a linear layer, as
//! PEFT 0.21 `tuners/lora/{layer,dora}.py`:
//!
//! - LoRA: `y = x W^T + b + s B(A(dropout(x)))`, s = alpha / r (rsLoRA:
//!   alpha / sqrt r); A `[r, in]` kaiming-uniform (a = sqrt 5) or N(0, 1/r),
//!   B `[out, r]` zeros, so the adapted layer starts equal to the base.
//! - DoRA: `y = m / ||W + s B A||_row * (x W^T + s B A x) + b`, the norm
//!   detached (no gradient), m `[out]` starting at the base's row norms;
//!   with dropout, PEFT's `base(x) + (m/|W'| - 1) x_d W^T + m/|W'| s lora(x_d)`.
//!
//! Parameters live under the module's path with PEFT's names
//! (`peft::LORA_A`, `peft::LORA_B`, `peft::LORA_MAGNITUDE`).

use super::config::{InitLoraWeights, LoraConfig, Patterns};
use super::peft::{LORA_A, LORA_B, LORA_MAGNITUDE};
use crate::nn::{self, Base, DropoutRng, Linear, LinearAdapter, Weight};
use crate::params::{AdapterSpec, ParamStore, Path};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use regex::Regex;
use std::sync::Arc;

/// How LoRA wraps one module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub scale: f64,
    pub dropout: f32,
    pub dora: bool,
}

/// The error for DoRA on a quantised base weight.
pub fn dora_quantized_error(path: &str) -> Error {
    Error::msg(format!(
        "DoRA on a quantized base weight `{path}` is not supported: use base_dtype = \"f32\""
    ))
}

impl AdapterSpec for LoraSpec {
    fn method(&self) -> &'static str {
        if self.dora {
            "DoRA"
        } else {
            "LoRA"
        }
    }

    fn tensor_names(&self) -> Vec<&'static str> {
        let mut v = vec![LORA_A, LORA_B];
        if self.dora {
            v.push(LORA_MAGNITUDE);
        }
        v
    }

    fn build(&self, p: &Path, base: &Base) -> Result<Arc<dyn LinearAdapter>> {
        let (out_f, in_f) = base.dims()?;
        if self.dora && base.is_quantized() {
            return Err(dora_quantized_error(p.prefix()));
        }
        Ok(Arc::new(Lora {
            a: p.get(&[self.r, in_f], LORA_A)?,
            b: p.get(&[out_f, self.r], LORA_B)?,
            scale: self.scale,
            dropout: self.dropout,
            magnitude: if self.dora {
                Some(p.get(&[out_f], LORA_MAGNITUDE)?)
            } else {
                None
            },
        }))
    }
}

/// PEFT's `get_pattern_key`: the first pattern `p` (in the order written)
/// with `(.*\.)?p$` matching.
pub(crate) fn pattern_value<T: Copy>(patterns: &Patterns<T>, name: &str) -> Result<Option<T>> {
    for (p, v) in patterns.iter() {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{p})$"))
            .map_err(|e| Error::msg(format!("bad pattern `{p}`: {e}")))?;
        if re.is_match(name) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// Several patterns with different values matching one module: the first
/// one written wins (as in PEFT), but `adapter_config.json` is written with
/// sorted keys (as PEFT writes it), so a reload may pick another one.
fn ambiguity<T: Copy + PartialEq + std::fmt::Display>(
    what: &str,
    patterns: &Patterns<T>,
    name: &str,
) -> Option<String> {
    let hits: Vec<&(String, T)> = patterns
        .iter()
        .filter(|(p, _)| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).is_ok_and(|re| re.is_match(name))
        })
        .collect();
    if hits.len() > 1 && hits.iter().any(|(_, v)| *v != hits[0].1) {
        let list: Vec<String> = hits.iter().map(|(p, v)| format!("`{p}` = {v}")).collect();
        return Some(format!(
            "{what}: {} all match `{name}`; the first one is used here, but the saved adapter_config.json sorts them",
            list.join(", ")
        ));
    }
    None
}

impl LoraConfig {
    /// Add LoRA's parameters for module `path` (`[out, in]`) to `store`,
    /// initialised as PEFT does, and return how it wraps the module (and
    /// any note on how its rank and alpha were chosen).
    pub(crate) fn init(
        &self,
        store: &mut ParamStore,
        (path, out_f, in_f): (&str, usize, usize),
        rng: &mut dyn rand::RngCore,
    ) -> Result<(LoraSpec, Vec<String>)> {
        let notes: Vec<String> = [
            ambiguity("rank_pattern", &self.rank_pattern, path),
            ambiguity("alpha_pattern", &self.alpha_pattern, path),
        ]
        .into_iter()
        .flatten()
        .collect();
        let r = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let a = match self.init_lora_weights {
            InitLoraWeights::Gaussian => {
                crate::params::normal_init(&[r, in_f], 1.0 / r as f64, rng)?
            }
            InitLoraWeights::Kaiming => {
                let bound = 1.0 / (in_f as f64).sqrt();
                let v: Vec<f32> = (0..r * in_f)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect();
                Tensor::from_vec(v, (r, in_f), &Device::Cpu)?
            }
        };
        store.insert_trainable(&format!("{path}.{LORA_A}"), a)?;
        store.insert_trainable(
            &format!("{path}.{LORA_B}"),
            Tensor::zeros((out_f, r), candle_core::DType::F32, &Device::Cpu)?,
        )?;
        if self.use_dora {
            if store.is_quantized(&format!("{path}.weight")) {
                return Err(dora_quantized_error(path));
            }
            let w = store.get(&format!("{path}.weight"), &[out_f, in_f])?;
            let norms = w.t.sqr()?.sum(1)?.sqrt()?;
            store.insert_trainable(&format!("{path}.{LORA_MAGNITUDE}"), norms)?;
        }
        let spec = LoraSpec {
            r,
            scale,
            dropout: self.lora_dropout,
            dora: self.use_dora,
        };
        Ok((spec, notes))
    }
}

/// LoRA (DoRA with `magnitude`) on one layer.
pub struct Lora {
    pub a: Weight,
    pub b: Weight,
    pub scale: f64,
    pub dropout: f32,
    pub magnitude: Option<Weight>,
}

impl Lora {
    /// W + s B A (f32, detached).
    fn delta_added(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w + (self.b.t.detach().matmul(&self.a.t.detach())? * self.scale)?)?)
    }
}

/// Row norms of W + s B A, detached (DoRA, as PEFT: the norm gets no gradient).
fn dora_norm(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let wp = (w.detach() + (b.detach().matmul(&a.detach())? * scale)?)?;
    Ok(wp.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?)
}

impl LinearAdapter for Lora {
    fn forward(&self, layer: &Linear, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let (a, b, scale, dropout) = (&self.a, &self.b, self.scale, self.dropout);
        if self.magnitude.is_none() {
            // One fused op when only the adapter trains (frozen F32 base and bias).
            if let Base::F32(w) = &layer.weight {
                if !w.is_trainable() && !layer.bias.as_ref().is_some_and(|b| b.is_trainable()) {
                    let drop = rng.filter(|_| dropout > 0.0).map(|r| (dropout, r.next()));
                    return Ok(nn::lora_linear(
                        x,
                        w,
                        layer.bias.as_ref(),
                        a,
                        b,
                        scale,
                        drop,
                    )?);
                }
            }
        }
        let xd = nn::maybe_dropout(x.clone(), dropout, rng)?;
        let dropped = rng.is_some() && dropout > 0.0;
        // [.., in] -> [.., r] -> [.., out]: B A is never formed.
        let lora = nn::linear(&nn::linear(&xd, a, None)?, b, None)?.affine(scale, 0.0)?;
        match &self.magnitude {
            None => Ok((layer.base_forward(x)? + lora)?),
            Some(m) => {
                let w = layer.weight.as_f32().ok_or_else(|| {
                    Error::msg("DoRA on a quantized base weight is not supported: use base_dtype = \"f32\"")
                })?;
                let norm = Arc::new(dora_norm(&w.t, &a.t, &b.t, scale)?);
                let bd = nn::linear(&xd, w, None)?;
                let scaled = nn::scale_last(&(&bd + lora)?, m, Some(norm))?;
                if dropped {
                    // PEFT: base(x) + (m/|W'| - 1) x_d W^T + m/|W'| s lora(x_d)
                    Ok(((layer.base_forward(x)? + scaled)? - bd)?)
                } else {
                    match &layer.bias {
                        Some(bias) => Ok(scaled.broadcast_add(&bias.t)?),
                        None => Ok(scaled),
                    }
                }
            }
        }
    }

    /// LoRA: W + s B A; DoRA: m / |W + s B A| * (W + s B A), the row
    /// factors m / |W + s B A| kept for unmerge (as PEFT caches them).
    fn merge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let wp = self.delta_added(w)?;
        let b = b.cloned();
        match &self.magnitude {
            None => Ok((wp, b, None)),
            Some(m) => {
                let norm = wp.sqr()?.sum_keepdim(1)?.sqrt()?;
                let merged = wp
                    .broadcast_div(&norm)?
                    .broadcast_mul(&m.t.detach().unsqueeze(1)?)?;
                let factor = (m.t.detach() / norm.squeeze(1)?)?;
                Ok((merged, b, Some(factor)))
            }
        }
    }

    /// W = W' - s B A; DoRA: W = W' / f - s B A.
    fn unmerge(
        &self,
        w: &Tensor,
        b: Option<&Tensor>,
        aux: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let delta = (self.b.t.detach().matmul(&self.a.t.detach())? * self.scale)?;
        let w0 = match (&self.magnitude, aux) {
            (None, _) => (w - delta)?,
            (Some(_), Some(f)) => (w.broadcast_div(&f.unsqueeze(1)?)? - delta)?,
            (Some(_), None) => return Err(Error::msg("DoRA unmerge without its row factors")),
        };
        Ok((w0, b.cloned()))
    }

    fn weights(&self) -> Vec<&Weight> {
        let mut v = vec![&self.a, &self.b];
        v.extend(self.magnitude.as_ref());
        v
    }
}
