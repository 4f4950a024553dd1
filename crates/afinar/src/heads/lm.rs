//! The language-model head on a decoder body (transformers'
//! `LlamaForCausalLM`, `GPT2LMHeadModel`): logits over the vocabulary from
//! `lm_head.weight`, or from the input embedding when the head is tied, and
//! the causal-LM loss with the labels shifted left inside (transformers'
//! `ForCausalLMLoss`). A soft prompt (prompt tuning) can go in front of
//! every input.

use crate::models::{Body, Inputs, ModelConfig};
use crate::nn::{self, DropoutRng, Weight};
use crate::params::{ParamStore, Path};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// A decoder body with its LM head.
pub struct CausalLm {
    pub body: Body,
    lm_head: Weight,
}

impl CausalLm {
    /// The body and `lm_head.weight` `[V, C]` (tied: the token embedding).
    pub fn build(store: &ParamStore, cfg: &ModelConfig) -> Result<Self> {
        if !cfg.family().is_decoder() {
            return Err(Error::msg(
                "a language-model head needs a decoder (Llama family, GPT-2); BERT is an encoder",
            ));
        }
        let root = Path::root(store, "");
        let body = Body::load(&root, cfg)?;
        let lm_head = if cfg.tied_lm_head() {
            body.embed_weight().clone()
        } else {
            root.get(&[cfg.vocab_size(), cfg.hidden_size()], "lm_head.weight")?
        };
        Ok(CausalLm { body, lm_head })
    }

    pub fn lm_head(&self) -> &Weight {
        &self.lm_head
    }

    pub fn hidden_size(&self) -> usize {
        self.body.hidden_size()
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.body.set_gradient_checkpointing(on)
    }

    /// Final hidden states `[B, T, C]` of a batch (every position).
    pub fn forward(&self, x: &Inputs, rng: Option<&DropoutRng>) -> Result<Tensor> {
        self.body.forward(x, rng)
    }

    /// The soft prompt `[P, C]` as embeddings (through the embedding op, so
    /// its gradient lands in the prompt's buffer).
    pub fn prompt_embeds(prompt: &Weight) -> Result<Tensor> {
        let p = prompt.t.dim(0)?;
        let ids = Tensor::arange(0u32, p as u32, &Device::Cpu)?;
        Ok(nn::embedding(prompt, &ids, None)?)
    }

    /// Final hidden states `[B, T, C]` of the batch's own positions, with an
    /// optional soft prompt `[P, C]` in front of every row (prompt tuning:
    /// the prompt's positions are computed and dropped).
    pub fn forward_prompted(
        &self,
        prompt: Option<&Weight>,
        x: &Inputs,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let Some(prompt) = prompt else {
            return self.forward(x, rng);
        };
        let p = prompt.t.dim(0)?;
        let emb = self.body.embed(&x.ids)?; // [B, T, C]
        let (b, t, c) = emb.dims3()?;
        let pe = Self::prompt_embeds(prompt)?
            .unsqueeze(0)?
            .broadcast_as((b, p, c))?;
        let emb = Tensor::cat(&[&pe, &emb], 1)?; // [B, P + T, C]
        let hidden = self.body.forward_embeds(&emb, &x.with_prefix(p)?, rng)?;
        Ok(hidden.narrow(1, p, t)?)
    }

    /// Logits `[N, V]` of hidden states `[.., C]` (inference).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.reshape(((), self.hidden_size()))?;
        Ok(nn::lm_logits(&h, &self.lm_head.t)?)
    }

    /// Mean next-token cross-entropy of `hidden` `[B, T, C]` against
    /// `labels` `[B * T]` (-100 = ignored), shifted left inside: position t
    /// predicts label t + 1, as transformers' causal-LM loss. Returns the
    /// loss and the number of predicted tokens.
    pub fn lm_loss(&self, hidden: &Tensor, labels: &[i64]) -> Result<(Tensor, usize)> {
        let (b, t, c) = hidden.dims3()?;
        if labels.len() != b * t {
            return Err(Error::msg(format!(
                "lm_loss: {} labels for [B={b}, T={t}]",
                labels.len()
            )));
        }
        let targets: Vec<i64> = (0..b * t)
            .map(|i| if i % t + 1 < t { labels[i + 1] } else { -100 })
            .collect();
        let n = targets.iter().filter(|&&y| y >= 0).count();
        let h = hidden.reshape((b * t, c))?;
        let loss = nn::lm_cross_entropy(&h, &self.lm_head, Arc::new(targets), 256)?;
        Ok((loss, n))
    }
}
