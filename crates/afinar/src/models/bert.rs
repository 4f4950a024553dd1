//! BERT-family encoder with transformers' `BertModel` semantics: word +
//! position + token-type embeddings, post-LN layers, exact GELU, key-padding
//! attention mask, dropout that really drops in training.
//!
//! Follows transformers' `models/bert/modeling_bert.py` (v5.23) and candle's
//! `candle-transformers/src/models/bert.rs`, on afinar's differentiable ops.
//! Field names copy the checkpoint keys.

use crate::adapters::AdapterMeta;
use crate::nn::{self, DropoutRng, Weight};
use crate::params::Path;
use crate::{Error, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn default_pos() -> String {
    "absolute".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init() -> f64 {
    0.02
}

/// `config.json` of a BERT checkpoint (HF field names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f32,
    #[serde(default)]
    pub attention_probs_dropout_prob: f32,
    pub max_position_embeddings: usize,
    #[serde(default = "one")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_pos")]
    pub position_embedding_type: String,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub classifier_dropout: Option<f32>,
}

fn one() -> usize {
    1
}

impl BertConfig {
    /// Reject what this implementation does not do, naming the key.
    pub fn validate(&self, file: &std::path::Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::file(file, format!("`{key}`: {msg}")));
        if !matches!(self.hidden_act.as_str(), "gelu" | "relu") {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (gelu, relu)", self.hidden_act),
            );
        }
        if self.position_embedding_type != "absolute" {
            return bad(
                "position_embedding_type",
                format!(
                    "`{}` is not supported (absolute)",
                    self.position_embedding_type
                ),
            );
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by {} heads",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        Ok(())
    }
}

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
    pub fn load(p: &Path, in_f: usize, out_f: usize) -> Result<Self> {
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
            bias: Some(p.get(&[out_f], "bias")?),
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

fn maybe_dropout(x: Tensor, p: f32, rng: Option<&DropoutRng>) -> Result<Tensor> {
    match rng {
        Some(r) if p > 0.0 => Ok(nn::dropout(&x, p, r.next())?),
        _ => Ok(x),
    }
}

pub struct BertEmbeddings {
    word_embeddings: Weight,
    position_embeddings: Weight,
    token_type_embeddings: Weight,
    layer_norm: LayerNorm,
    dropout: f32,
    pad_token_id: u32,
}

impl BertEmbeddings {
    fn load(p: &Path, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(BertEmbeddings {
            word_embeddings: p.get(&[cfg.vocab_size, h], "word_embeddings.weight")?,
            position_embeddings: p.get(
                &[cfg.max_position_embeddings, h],
                "position_embeddings.weight",
            )?,
            token_type_embeddings: p
                .get(&[cfg.type_vocab_size, h], "token_type_embeddings.weight")?,
            layer_norm: LayerNorm::load(&p.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
            pad_token_id: cfg.pad_token_id,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        type_ids: &Tensor,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.word_embeddings.t.dim(1)?;
        let max_pos = self.position_embeddings.t.dim(0)?;
        if t > max_pos {
            return Err(Error::msg(format!(
                "sequence length {t} exceeds max_position_embeddings {max_pos}"
            )));
        }
        let words = nn::embedding(
            &self.word_embeddings,
            &input_ids.flatten_all()?,
            Some(self.pad_token_id),
        )?; // [B*T, H]
        let types = nn::embedding(&self.token_type_embeddings, &type_ids.flatten_all()?, None)?;
        // Positions 0..T through the embedding op: its gradient lands in place.
        let pos_ids = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let pos = nn::embedding(&self.position_embeddings, &pos_ids, None)?; // [T, H]
        let x = (words + types)?.reshape((b, t, h))?.broadcast_add(&pos)?;
        let x = self.layer_norm.forward(&x)?;
        maybe_dropout(x, self.dropout, rng)
    }
}

pub struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
    heads: usize,
    hidden_dropout: f32,
    attn_dropout: f32,
    gelu: bool,
}

impl BertLayer {
    fn load(p: &Path, cfg: &BertConfig) -> Result<Self> {
        let (h, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let att = p.pp("attention");
        Ok(BertLayer {
            query: Linear::load(&att.pp("self").pp("query"), h, h)?,
            key: Linear::load(&att.pp("self").pp("key"), h, h)?,
            value: Linear::load(&att.pp("self").pp("value"), h, h)?,
            attn_out: Linear::load(&att.pp("output").pp("dense"), h, h)?,
            attn_ln: LayerNorm::load(&att.pp("output").pp("LayerNorm"), h, eps)?,
            intermediate: Linear::load(&p.pp("intermediate").pp("dense"), h, f)?,
            output: Linear::load(&p.pp("output").pp("dense"), f, h)?,
            out_ln: LayerNorm::load(&p.pp("output").pp("LayerNorm"), h, eps)?,
            heads: cfg.num_attention_heads,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
            gelu: cfg.hidden_act == "gelu",
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        // [B, T, H] -> q, k, v [B, T, H]
        let q = self.query.forward_t(x, rng)?;
        let k = self.key.forward_t(x, rng)?;
        let v = self.value.forward_t(x, rng)?;
        let drop = rng
            .filter(|_| self.attn_dropout > 0.0)
            .map(|r| (self.attn_dropout, r.next()));
        let ctx = nn::attention(&q, &k, &v, mask.clone(), self.heads, drop)?; // [B, T, H]
        let a = maybe_dropout(
            self.attn_out.forward_t(&ctx, rng)?,
            self.hidden_dropout,
            rng,
        )?;
        let x = self.attn_ln.forward(&(a + x)?)?;
        let f = self.intermediate.forward_t(&x, rng)?; // [B, T, F]
        let f = if self.gelu { nn::gelu(&f)? } else { f.relu()? };
        let o = maybe_dropout(self.output.forward_t(&f, rng)?, self.hidden_dropout, rng)?;
        self.out_ln.forward(&(o + x)?)
    }
}

/// The encoder body (no pooler: the pooler belongs to the head).
pub struct Bert {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pub config: BertConfig,
}

impl Bert {
    /// `p` points at the body's root (`bert` in a classification checkpoint).
    pub fn load(p: &Path, cfg: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(&p.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(&p.pp("encoder").pp("layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            embeddings,
            layers,
            config: cfg.clone(),
        })
    }

    /// Hidden states of every layer: `[embeddings, layer 1, ..., layer N]`,
    /// each `[B, T, H]`. `attention_mask` is `[B * T]` (1 = token, 0 = padding);
    /// `dropout = None` is inference (no dropout), independent of freezing.
    pub fn forward_all(
        &self,
        input_ids: &Tensor,
        type_ids: &Tensor,
        attention_mask: &Arc<Vec<f32>>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Vec<Tensor>> {
        let mut x = self.embeddings.forward(input_ids, type_ids, dropout)?;
        let mut all = vec![x.clone()];
        for l in &self.layers {
            x = l.forward(&x, attention_mask, dropout)?;
            all.push(x.clone());
        }
        Ok(all)
    }

    /// The last hidden state `[B, T, H]`: every position (habit 3).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        type_ids: &Tensor,
        attention_mask: &Arc<Vec<f32>>,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let mut x = self.embeddings.forward(input_ids, type_ids, dropout)?;
        for l in &self.layers {
            x = l.forward(&x, attention_mask, dropout)?;
        }
        Ok(x)
    }
}

/// Mean over real tokens: `[B, T, H]` x mask `[B, T]` -> `[B, H]`.
pub fn mean_pool(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?; // [B, T, 1]
    let summed = x.broadcast_mul(&m)?.sum(1)?; // [B, H]
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // [B, 1]
    Ok(summed.broadcast_div(&count)?)
}
