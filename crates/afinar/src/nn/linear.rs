//! The linear layer every model uses, by checkpoint path, with the adapter
//! that may wrap it (LoRA / DoRA / IA3, PEFT semantics: `adapters/`), and
//! LayerNorm. Moved here from the BERT model so every family shares them.

use crate::adapters::AdapterMeta;
use crate::nn::{self, DropoutRng, Weight};
use crate::params::Path;
use crate::Result;
use candle_core::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An adapter wrapped around a linear layer (see `adapters/`).
#[derive(Clone)]
pub enum Adapter {
    /// y = x W^T + b + s * B(A(dropout(x))); with `magnitude`, DoRA:
    /// y = m / ||W + s B A||_row (detached) * (x W^T + s B A x) + b.
    Lora {
        a: Weight,
        b: Weight,
        scale: f64,
        dropout: f32,
        magnitude: Option<Weight>,
    },
    /// y = (x W^T + b) * l, or for feed-forward modules y = (x * l) W^T + b.
    Ia3 { l: Weight, feedforward: bool },
}

/// A linear layer by checkpoint path: `{path}.weight` [out, in], `{path}.bias` [out],
/// optionally wrapped by an adapter.
#[derive(Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Weight>,
    pub adapter: Option<Adapter>,
    /// Shared by every adapter of a model: off gives the base model.
    pub adapters_enabled: Arc<AtomicBool>,
    /// Set while adapters are merged into the weights: the adapter path is skipped.
    pub adapters_merged: Arc<AtomicBool>,
}

impl Linear {
    /// `{path}.weight` [out, in] and `{path}.bias` [out].
    pub fn load(p: &Path, in_f: usize, out_f: usize) -> Result<Self> {
        Self::load_with(p, in_f, out_f, true)
    }

    /// With or without a bias (Llama's projections have none).
    pub fn load_with(p: &Path, in_f: usize, out_f: usize, bias: bool) -> Result<Self> {
        let adapter = match p.store.adapters.get(p.prefix()) {
            None => None,
            Some(AdapterMeta::Lora {
                r,
                scale,
                dropout,
                dora,
            }) => Some(Adapter::Lora {
                a: p.get(&[*r, in_f], "lora_A.weight")?,
                b: p.get(&[out_f, *r], "lora_B.weight")?,
                scale: *scale,
                dropout: *dropout,
                magnitude: if *dora {
                    Some(p.get(&[out_f], "lora_magnitude_vector")?)
                } else {
                    None
                },
            }),
            Some(AdapterMeta::Ia3 { feedforward }) => {
                let shape = if *feedforward { [1, in_f] } else { [out_f, 1] };
                Some(Adapter::Ia3 {
                    l: p.get(&shape, "ia3_l")?,
                    feedforward: *feedforward,
                })
            }
        };
        Ok(Linear {
            weight: p.get(&[out_f, in_f], "weight")?,
            bias: if bias {
                Some(p.get(&[out_f], "bias")?)
            } else {
                None
            },
            adapter,
            adapters_enabled: p.store.adapters_enabled.clone(),
            adapters_merged: p.store.adapters_merged.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    /// `rng` = Some in training (adapter dropout).
    pub fn forward_t(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let base = || -> Result<Tensor> { Ok(nn::linear(x, &self.weight, self.bias.as_ref())?) };
        let active = self.adapters_enabled.load(Ordering::Relaxed)
            && !self.adapters_merged.load(Ordering::Relaxed);
        let Some(adapter) = self.adapter.as_ref().filter(|_| active) else {
            return base();
        };
        match adapter {
            Adapter::Lora {
                a,
                b,
                scale,
                dropout,
                magnitude,
            } => {
                let xd = maybe_dropout(x.clone(), *dropout, rng)?;
                let dropped = rng.is_some() && *dropout > 0.0;
                // [.., in] -> [.., r] -> [.., out]: B A is never formed.
                let lora = nn::linear(&nn::linear(&xd, a, None)?, b, None)?.affine(*scale, 0.0)?;
                match magnitude {
                    None => Ok((base()? + lora)?),
                    Some(m) => {
                        let norm = Arc::new(dora_norm(&self.weight.t, &a.t, &b.t, *scale)?);
                        let bd = nn::linear(&xd, &self.weight, None)?;
                        let scaled = nn::scale_last(&(&bd + lora)?, m, Some(norm))?;
                        if dropped {
                            // PEFT: base(x) + (m/|W'| - 1) x_d W^T + m/|W'| s lora(x_d)
                            Ok(((base()? + scaled)? - bd)?)
                        } else {
                            match &self.bias {
                                Some(bias) => Ok(scaled.broadcast_add(&bias.t)?),
                                None => Ok(scaled),
                            }
                        }
                    }
                }
            }
            Adapter::Ia3 {
                l,
                feedforward: false,
            } => Ok(nn::scale_last(&base()?, l, None)?),
            Adapter::Ia3 {
                l,
                feedforward: true,
            } => Ok(nn::linear(
                &nn::scale_last(x, l, None)?,
                &self.weight,
                self.bias.as_ref(),
            )?),
        }
    }

    /// The weight with the adapter folded in (LoRA: W + s B A; DoRA:
    /// m / |W + s B A| * (W + s B A); IA3: W scaled along the right axis);
    /// the bias is unchanged except IA3 on outputs, which scales it too.
    pub fn merged(&self) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.weight.t.detach();
        let b = self.bias.as_ref().map(|b| b.t.detach());
        Ok(match &self.adapter {
            None => (w, b),
            Some(Adapter::Lora {
                a,
                b: bb,
                scale,
                magnitude,
                ..
            }) => {
                let wp = (&w + (bb.t.detach().matmul(&a.t.detach())? * *scale)?)?;
                match magnitude {
                    None => (wp, b),
                    Some(m) => {
                        let norm = wp.sqr()?.sum_keepdim(1)?.sqrt()?;
                        (
                            wp.broadcast_div(&norm)?
                                .broadcast_mul(&m.t.detach().unsqueeze(1)?)?,
                            b,
                        )
                    }
                }
            }
            Some(Adapter::Ia3 {
                l,
                feedforward: false,
            }) => {
                let l = l.t.detach(); // [out, 1]
                (
                    w.broadcast_mul(&l)?,
                    b.map(|b| b.mul(&l.flatten_all()?)).transpose()?,
                )
            }
            Some(Adapter::Ia3 {
                l,
                feedforward: true,
            }) => (w.broadcast_mul(&l.t.detach())?, b),
        })
    }
}

/// Row norms of W + s B A, detached (DoRA, as PEFT: the norm gets no gradient).
fn dora_norm(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Vec<f32>> {
    let wp = (w.detach() + (b.detach().matmul(&a.detach())? * scale)?)?;
    Ok(wp.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?)
}

#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Weight,
    pub bias: Weight,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(p: &Path, d: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: p.get(&[d], "weight")?,
            bias: p.get(&[d], "bias")?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(nn::layer_norm(x, &self.weight, &self.bias, self.eps)?)
    }
}

pub fn maybe_dropout(x: Tensor, p: f32, rng: Option<&DropoutRng>) -> Result<Tensor> {
    match rng {
        Some(r) if p > 0.0 => Ok(nn::dropout(&x, p, r.next())?),
        _ => Ok(x),
    }
}

