//! The linear layer every model uses, by checkpoint path, with the adapter
//! that may wrap it (LoRA / DoRA / IA3, PEFT semantics: `adapters/`), and
//! LayerNorm. Moved here from the BERT model so every family shares them.
//!
//! The base weight is f32, or kept quantised (a GGUF's Q4_0 / Q4_1 / Q8_0,
//! frozen, QLoRA-style: Dettmers et al. 2023, <https://arxiv.org/abs/2305.14314>)
//! and dequantised tile by tile inside each matmul by [`nn::qlinear`]. LoRA and
//! IA3 wrap either; DoRA needs the weight's row norms and refuses a quantised base.

use crate::adapters::AdapterMeta;
use crate::hub::gguf::QTensor;
use crate::nn::{self, DropoutRng, Weight};
use crate::params::Path;
use crate::{Error, Result};
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

    /// The weight as a detached f32 tensor (a quantised one dequantised).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            // A bf16 frozen base on a GPU comes back as f32 too.
            Base::F32(w) => Ok(w.t.detach().to_dtype(candle_core::DType::F32)?),
            Base::Quantized(q) => crate::params::dequantize(q),
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

/// The error for DoRA on a quantised base weight.
pub fn dora_quantized_error(path: &str) -> Error {
    Error::msg(format!(
        "DoRA on a quantized base weight `{path}` is not supported: use base_dtype = \"f32\""
    ))
}

/// A linear layer by checkpoint path: `{path}.weight` [out, in], `{path}.bias` [out],
/// optionally wrapped by an adapter.
#[derive(Clone)]
pub struct Linear {
    pub weight: Base,
    pub bias: Option<Weight>,
    pub adapter: Option<Adapter>,
    /// Shared by every adapter of a model: off gives the base model.
    pub adapters_enabled: Arc<AtomicBool>,
    /// Set while adapters are merged into the weights: the adapter path is skipped.
    pub adapters_merged: Arc<AtomicBool>,
}

impl Linear {
    /// A trainable tensor of this layer (weight, bias or adapter), if any:
    /// what keeps a checkpointed layer in the graph ([`nn::checkpoint`]).
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        let mut ws: Vec<&Weight> = vec![];
        if let Base::F32(w) = &self.weight {
            ws.push(w);
        }
        ws.extend(self.bias.as_ref());
        match &self.adapter {
            Some(Adapter::Lora {
                a, b, magnitude, ..
            }) => {
                ws.extend([a, b]);
                ws.extend(magnitude.as_ref());
            }
            Some(Adapter::Ia3 { l, .. }) => ws.push(l),
            None => {}
        }
        ws.into_iter()
            .find(|w| w.is_trainable())
            .map(|w| w.t.clone())
    }

    /// `{path}.weight` [out, in] and `{path}.bias` [out].
    pub fn load(p: &Path, in_f: usize, out_f: usize) -> Result<Self> {
        Self::load_with(p, in_f, out_f, true)
    }

    /// With or without a bias (Llama's projections have none). A weight
    /// stored quantised stays quantised.
    pub fn load_with(p: &Path, in_f: usize, out_f: usize, bias: bool) -> Result<Self> {
        let weight = match p.get_quantized("weight") {
            Some(q) if q.shape() != [out_f, in_f] => {
                return Err(Error::Tensor {
                    name: p.name("weight"),
                    msg: format!(
                        "expected shape [{out_f}, {in_f}], found {:?} ({} quantised) in {}",
                        q.shape(),
                        q.ty(),
                        p.store.source
                    ),
                })
            }
            Some(q) => Base::Quantized(q),
            None => Base::F32(p.get(&[out_f, in_f], "weight")?),
        };
        let adapter = match p.store.adapters.get(p.prefix()) {
            Some(AdapterMeta::Lora { dora: true, .. }) if weight.is_quantized() => {
                return Err(dora_quantized_error(p.prefix()))
            }
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
            weight,
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
        let base = || self.weight.linear(x, self.bias.as_ref());
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
                if magnitude.is_none() {
                    // One fused op when only the adapter trains (frozen F32 base and bias).
                    if let Base::F32(w) = &self.weight {
                        if !w.is_trainable()
                            && !self.bias.as_ref().is_some_and(|b| b.is_trainable())
                        {
                            let drop = rng.filter(|_| *dropout > 0.0).map(|r| (*dropout, r.next()));
                            return Ok(nn::ops::lora_linear(
                                x,
                                w,
                                self.bias.as_ref(),
                                a,
                                b,
                                *scale,
                                drop,
                            )?);
                        }
                    }
                }
                let xd = maybe_dropout(x.clone(), *dropout, rng)?;
                let dropped = rng.is_some() && *dropout > 0.0;
                // [.., in] -> [.., r] -> [.., out]: B A is never formed.
                let lora = nn::linear(&nn::linear(&xd, a, None)?, b, None)?.affine(*scale, 0.0)?;
                match magnitude {
                    None => Ok((base()? + lora)?),
                    Some(m) => {
                        let w = self.weight.as_f32().ok_or_else(|| {
                            Error::msg("DoRA on a quantized base weight is not supported: use base_dtype = \"f32\"")
                        })?;
                        let norm = Arc::new(dora_norm(&w.t, &a.t, &b.t, *scale)?);
                        let bd = nn::linear(&xd, w, None)?;
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
            } => self
                .weight
                .linear(&nn::scale_last(x, l, None)?, self.bias.as_ref()),
        }
    }

    /// The weight with the adapter folded in (LoRA: W + s B A; DoRA:
    /// m / |W + s B A| * (W + s B A); IA3: W scaled along the right axis);
    /// the bias is unchanged except IA3 on outputs, which scales it too.
    /// A quantised base is dequantised to f32 first: the result is f32.
    pub fn merged(&self) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.weight.to_f32()?;
        let b = self
            .bias
            .as_ref()
            .map(|b| b.t.detach().to_dtype(candle_core::DType::F32))
            .transpose()?;
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
    pub fn trainable_tensor(&self) -> Option<Tensor> {
        [&self.weight, &self.bias]
            .into_iter()
            .find(|w| w.is_trainable())
            .map(|w| w.t.clone())
    }
}

pub fn maybe_dropout(x: Tensor, p: f32, rng: Option<&DropoutRng>) -> Result<Tensor> {
    match rng {
        Some(r) if p > 0.0 => Ok(nn::dropout(&x, p, r.next())?),
        _ => Ok(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::gguf::GgmlType;
    use crate::params::{ParamStore, Selector};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
    }

    fn t(v: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    const OUT: usize = 48;
    const IN: usize = 64;
    const R: usize = 4;

    /// Two stores with the same `m` linear (bias frozen) and adapter: one
    /// with the quantised weight, one with its exact f32 dequantisation.
    fn stores(ty: GgmlType, meta: AdapterMeta) -> (ParamStore, ParamStore) {
        let q = Arc::new(QTensor::from_f32(ty, [OUT, IN], &randn(OUT * IN, 1)).unwrap());
        let wf = crate::params::dequantize(&q).unwrap();
        let mut sq = ParamStore::new(Selector::none(), "quantized");
        let mut sf = ParamStore::new(Selector::none(), "f32");
        sq.insert_quantized("m.weight", q);
        sf.insert("m.weight", wf).unwrap();
        for s in [&mut sq, &mut sf] {
            s.insert("m.bias", t(randn(OUT, 2), &[OUT])).unwrap();
            match &meta {
                AdapterMeta::Lora { r, dora, .. } => {
                    s.insert_trainable("m.lora_A.weight", t(randn(r * IN, 3), &[*r, IN]))
                        .unwrap();
                    // B != 0 (not PEFT's init) so the LoRA path changes the output.
                    s.insert_trainable("m.lora_B.weight", t(randn(OUT * r, 4), &[OUT, *r]))
                        .unwrap();
                    if *dora {
                        s.insert_trainable("m.lora_magnitude_vector", t(randn(OUT, 5), &[OUT]))
                            .unwrap();
                    }
                }
                AdapterMeta::Ia3 { feedforward } => {
                    let shape = if *feedforward { [1, IN] } else { [OUT, 1] };
                    let n = shape[0] * shape[1];
                    s.insert_trainable("m.ia3_l", t(randn(n, 6), &shape))
                        .unwrap();
                }
            }
            s.adapters.insert("m".into(), meta.clone());
        }
        (sq, sf)
    }

    fn load(s: &ParamStore) -> Result<Linear> {
        Linear::load_with(&Path::root(s, "m"), IN, OUT, true)
    }

    /// Forward, dx and every adapter gradient of the quantised layer equal
    /// those of the f32 layer with the dequantised weight; the quantised
    /// base has no gradient anywhere.
    fn check_equal(ty: GgmlType, meta: AdapterMeta) {
        let (sq, sf) = stores(ty, meta.clone());
        let (lq, lf) = (load(&sq).unwrap(), load(&sf).unwrap());
        assert!(lq.weight.is_quantized() && !lf.weight.is_quantized());
        let x = Var::from_vec(randn(2 * 3 * IN, 7), (2, 3, IN), &Device::Cpu).unwrap();
        let r = t(randn(2 * 3 * OUT, 8), &[2, 3, OUT]);
        let yq = lq.forward(x.as_tensor()).unwrap();
        let yf = lf.forward(x.as_tensor()).unwrap();
        let d = max_diff(&yq, &yf);
        assert!(d < 1e-4, "{ty} {meta:?}: forward differs by {d}");
        let gq = (yq * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_diff(gq.get(&x).unwrap(), gf.get(&x).unwrap());
        assert!(d < 1e-4, "{ty} {meta:?}: dx differs by {d}");
        let trainable: Vec<String> = sq.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(!trainable.is_empty() && !trainable.contains(&"m.weight".to_string()));
        for name in &trainable {
            let a = sq.grad(name).unwrap().expect("adapter gradient");
            let b = sf.grad(name).unwrap().expect("adapter gradient");
            // Relative to the gradient's size (sums over every position).
            let scale = max_diff(&b, &b.zeros_like().unwrap()).max(1.0);
            let d = max_diff(&a, &b);
            assert!(
                d < 1e-4 * scale,
                "{ty} {meta:?}: {name} gradient differs by {d}"
            );
        }
        // The base: no gradient buffer on the quantised side at all.
        assert!(sq.grad("m.weight").unwrap().is_none());
        assert!(sq.unused().is_empty(), "{:?}", sq.unused());
        // merged() dequantises and folds: the same f32 weight as the f32 layer's.
        let ((mq, bq), (mf, bf)) = (lq.merged().unwrap(), lf.merged().unwrap());
        assert!(max_diff(&mq, &mf) < 1e-5);
        assert!(max_diff(&bq.unwrap(), &bf.unwrap()) < 1e-6);
    }

    #[test]
    fn quantized_base_lora_matches_f32() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
            check_equal(
                ty,
                AdapterMeta::Lora {
                    r: R,
                    scale: 2.0,
                    dropout: 0.0,
                    dora: false,
                },
            );
        }
    }

    #[test]
    fn quantized_base_ia3_matches_f32() {
        for feedforward in [false, true] {
            check_equal(GgmlType::Q4_1, AdapterMeta::Ia3 { feedforward });
        }
    }

    #[test]
    fn quantized_base_refuses_dora_shape_and_in_place_merge() {
        let (sq, _) = stores(
            GgmlType::Q8_0,
            AdapterMeta::Lora {
                r: R,
                scale: 1.0,
                dropout: 0.0,
                dora: true,
            },
        );
        let e = load(&sq).err().unwrap().to_string();
        assert_eq!(
            e,
            "DoRA on a quantized base weight `m` is not supported: use base_dtype = \"f32\""
        );
        let (sq, _) = stores(
            GgmlType::Q8_0,
            AdapterMeta::Lora {
                r: R,
                scale: 1.0,
                dropout: 0.0,
                dora: false,
            },
        );
        let e = Linear::load_with(&Path::root(&sq, "m"), IN, OUT + 1, true)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("m.weight") && e.contains("[49, 64]") && e.contains("[48, 64]"),
            "{e}"
        );
        let e = crate::adapters::merge(&sq).err().unwrap().to_string();
        assert!(e.contains("quantized base weight `m.weight`"), "{e}");
        // An f32 read of a quantised weight says why it fails.
        let e = sq.get("m.weight", &[OUT, IN]).unwrap_err().to_string();
        assert!(e.contains("quantised") && e.contains("base_dtype"), "{e}");
    }

    #[test]
    fn quantized_weights_count_list_and_save_as_f32() {
        let (sq, _) = stores(
            GgmlType::Q4_1,
            AdapterMeta::Lora {
                r: R,
                scale: 1.0,
                dropout: 0.0,
                dora: false,
            },
        );
        // weight (quantised) + bias + A + B
        let all = OUT * IN + OUT + R * IN + OUT * R;
        assert_eq!(sq.counts(), (R * IN + OUT * R, all));
        let s = sq.summary();
        assert!(
            s.contains(&format!("all params: {all}"))
                && s.contains("quantized params: 3072 in 1 tensors"),
            "{s}"
        );
        assert_eq!(
            crate::adapters::linear_modules(&sq),
            vec![("m".to_string(), OUT, IN)]
        );
        assert_eq!(
            sq.unused(),
            vec!["m.bias", "m.lora_A.weight", "m.lora_B.weight", "m.weight"]
        );
        let merged = crate::adapters::merged_state(&sq).unwrap();
        assert_eq!(merged["m.weight"].dims(), &[OUT, IN]);
        assert!(!merged.contains_key("m.lora_A.weight"));
        // modules_to_save on a quantised weight trains it as f32.
        let mut sq = sq;
        sq.make_trainable("m.weight").unwrap();
        assert!(
            !sq.is_quantized("m.weight") && sq.trainable().iter().any(|(n, _)| n == "m.weight")
        );
    }
}
