//! BERT-family encoder with transformers' `BertModel` semantics: word +
//! position + token-type embeddings, post-LN layers, exact GELU, key-padding
//! attention mask, dropout that really drops in training.
//!
//! Follows transformers' `models/bert/modeling_bert.py` (v5.23) and candle's
//! `candle-transformers/src/models/bert.rs`, on afinar's differentiable ops.
//! Field names copy the checkpoint keys.

use super::Inputs;
use crate::nn::{self, maybe_dropout, DropoutRng, LayerNorm, Linear, Weight};
use crate::params::Path;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
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
            layer_norm: p.pp("LayerNorm").layer_norm(h, cfg.layer_norm_eps)?,
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
            query: att.pp("self").pp("query").linear(h, h, true)?,
            key: att.pp("self").pp("key").linear(h, h, true)?,
            value: att.pp("self").pp("value").linear(h, h, true)?,
            attn_out: att.pp("output").pp("dense").linear(h, h, true)?,
            attn_ln: att.pp("output").pp("LayerNorm").layer_norm(h, eps)?,
            intermediate: p.pp("intermediate").pp("dense").linear(h, f, true)?,
            output: p.pp("output").pp("dense").linear(f, h, true)?,
            out_ln: p.pp("output").pp("LayerNorm").layer_norm(h, eps)?,
            heads: cfg.num_attention_heads,
            hidden_dropout: cfg.hidden_dropout_prob,
            attn_dropout: cfg.attention_probs_dropout_prob,
            gelu: cfg.hidden_act == "gelu",
        })
    }

    /// A trainable tensor of the layer (for [`nn::checkpoint`]).
    fn anchor(&self) -> Option<Tensor> {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ]
        .iter()
        .find_map(|l| l.trainable_tensor())
        .or_else(|| self.attn_ln.trainable_tensor())
        .or_else(|| self.out_ln.trainable_tensor())
    }

    /// The layer, checkpointed in training when `on` (see [`nn::checkpoint`]).
    fn forward_ckpt(
        self: &Arc<Self>,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        rng: Option<&DropoutRng>,
        on: bool,
    ) -> Result<Tensor> {
        if !on || rng.is_none() {
            return self.forward(x, mask, rng);
        }
        let (l, m) = (self.clone(), mask.clone());
        nn::checkpoint(
            x,
            self.anchor().as_ref(),
            rng,
            Arc::new(move |x, r| l.forward(x, &m, r)),
        )
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        self.block(x, x, mask, rng)
    }

    /// [`Self::forward`] for the first position alone, `[B, 1, H]`: the keys
    /// and values of every position, the query, attention output and
    /// feed-forward of the first only (what a head that reads the first
    /// token needs from the last layer). The same numbers as the first row
    /// of `forward` (dropout masks in training are drawn over the rows
    /// computed, so they differ from the full path's).
    fn forward_first(
        &self,
        x: &Tensor,
        mask: &Arc<Vec<f32>>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        self.block(x, &x.narrow(1, 0, 1)?.contiguous()?, mask, rng)
    }

    /// The layer on `x` `[B, T, H]` for the query rows `xq` (`x` itself, or
    /// its first positions): `[B, Tq, H]`.
    fn block(
        &self,
        x: &Tensor,
        xq: &Tensor,
        mask: &Arc<Vec<f32>>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        // [B, T, H] -> q [B, Tq, H], k, v [B, T, H]
        let q = self.query.forward_t(xq, rng)?;
        let k = self.key.forward_t(x, rng)?;
        let v = self.value.forward_t(x, rng)?;
        let drop = rng
            .filter(|_| self.attn_dropout > 0.0)
            .map(|r| (self.attn_dropout, r.next()));
        let ctx = nn::attention(&q, &k, &v, mask.clone(), self.heads, drop)?; // [B, Tq, H]
        let a = maybe_dropout(
            self.attn_out.forward_t(&ctx, rng)?,
            self.hidden_dropout,
            rng,
        )?;
        let x = self.attn_ln.forward(&(a + xq)?)?;
        let f = self.intermediate.forward_t(&x, rng)?; // [B, Tq, F]
        let o = match self.output.frozen_plain().filter(|_| self.gelu) {
            // One op: the [B, Tq, F] activation is not kept for backward.
            Some((w, b)) => nn::gelu_dense(&f, w, b)?,
            None => {
                let f = if self.gelu { nn::gelu(&f)? } else { f.relu()? };
                self.output.forward_t(&f, rng)?
            }
        };
        let o = maybe_dropout(o, self.hidden_dropout, rng)?;
        self.out_ln.forward(&(o + x)?)
    }
}

/// The encoder body (no pooler: the pooler belongs to the head).
pub struct Bert {
    embeddings: BertEmbeddings,
    layers: Vec<Arc<BertLayer>>,
    pub config: BertConfig,
    /// Recompute each layer in backward instead of keeping its activations
    /// (transformers' `gradient_checkpointing`); training only.
    pub gradient_checkpointing: bool,
}

impl Bert {
    /// `p` points at the body's root (`bert` in a classification checkpoint).
    pub fn load(p: &Path, cfg: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(&p.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(&p.pp("encoder").pp("layer").pp(i), cfg).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            embeddings,
            layers,
            config: cfg.clone(),
            gradient_checkpointing: false,
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
            x = l.forward_ckpt(&x, attention_mask, dropout, self.gradient_checkpointing)?;
            all.push(x.clone());
        }
        Ok(all)
    }

    /// The word embedding table `[V, H]`.
    pub fn embed_weight(&self) -> &Weight {
        &self.embeddings.word_embeddings
    }

    /// [`Self::forward`] of a batch of [`Inputs`] (type ids default to 0).
    pub fn forward_inputs(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.forward(&x.ids, &Self::type_ids(x)?, &x.key_mask, dropout)
    }

    /// A batch's token-type ids, 0 where it has none.
    fn type_ids(x: &Inputs) -> Result<Tensor> {
        Ok(match &x.type_ids {
            Some(t) => t.clone(),
            None => x.ids.zeros_like()?,
        })
    }

    /// The last hidden state of the first position alone, `[B, 1, H]`, on
    /// the CPU (`None` on another device: use [`Self::forward`]): what a
    /// head that pools the first token ([CLS]) reads. The last layer
    /// computes its query, attention output and feed-forward for that row
    /// only (a sixth of MiniLM-L6's matmul flops); every other layer, and
    /// the keys and values of the last, see every position. The same
    /// numbers as `forward(..).narrow(1, 0, 1)` in eval mode.
    pub fn forward_first(
        &self,
        x: &Inputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<Option<Tensor>> {
        if !x.ids.device().is_cpu() {
            return Ok(None);
        }
        let types = Self::type_ids(x)?;
        let Some((last, rest)) = self.layers.split_last() else {
            return Ok(None);
        };
        let mut h = self.embeddings.forward(&x.ids, &types, dropout)?;
        for l in rest {
            h = l.forward_ckpt(&h, &x.key_mask, dropout, self.gradient_checkpointing)?;
        }
        Ok(Some(last.forward_first(&h, &x.key_mask, dropout)?))
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
            x = l.forward_ckpt(&x, attention_mask, dropout, self.gradient_checkpointing)?;
        }
        Ok(x)
    }
}
