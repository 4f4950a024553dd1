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

/// The log-probability of each sequence's completion `[B]` from per-token
/// negative log-likelihoods `[B * T]` ([`nn::lm_token_nll`], 0 on
/// tokens outside the completion): minus their sum per row, or (IPO) minus
/// their mean over the row's `counted` completion tokens. A row with no
/// completion token is an error naming it (TRL would divide by zero).
pub fn sequence_logps(
    nll: &Tensor,
    b: usize,
    t: usize,
    counted: &[usize],
    average: bool,
) -> Result<Tensor> {
    if nll.elem_count() != b * t || counted.len() != b {
        return Err(Error::msg(format!(
            "sequence_logps: {} token losses and {} counts for [B={b}, T={t}]",
            nll.elem_count(),
            counted.len()
        )));
    }
    if let Some(i) = counted.iter().position(|&n| n == 0) {
        return Err(Error::msg(format!(
            "sequence_logps: row {i} has no completion token (truncated away?)"
        )));
    }
    let sum = nll.reshape((b, t))?.sum(1)?.neg()?;
    if !average {
        return Ok(sum);
    }
    let inv: Vec<f32> = counted.iter().map(|&n| 1.0 / n as f32).collect();
    Ok((sum * Tensor::from_vec(inv, b, nll.device())?)?)
}

/// The targets of `labels` `[B * T]` shifted left within each row: position
/// t predicts label t + 1 (transformers' causal-LM shift), the last -100.
fn shifted(labels: &[i64], b: usize, t: usize, what: &str) -> Result<Vec<i64>> {
    if labels.len() != b * t {
        return Err(Error::msg(format!(
            "{what}: {} labels for [B={b}, T={t}]",
            labels.len()
        )));
    }
    Ok((0..b * t)
        .map(|i| if i % t + 1 < t { labels[i + 1] } else { -100 })
        .collect())
}

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
        let targets = shifted(labels, b, t, "lm_loss")?;
        let n = targets.iter().filter(|&&y| y >= 0).count();
        let h = hidden.reshape((b * t, c))?;
        let loss = nn::lm_cross_entropy(&h, &self.lm_head, Arc::new(targets), 256)?;
        Ok((loss, n))
    }

    /// The log-probability of each row's labelled tokens `[B]` (a
    /// completion's, for DPO): labels `[B * T]` as in [`Self::lm_loss`]
    /// (shifted inside; -100 = not counted), summed per row, or averaged
    /// over the row's counted tokens when `average` (IPO). Also returns the
    /// counts.
    pub fn completion_logps(
        &self,
        hidden: &Tensor,
        labels: &[i64],
        average: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let (b, t, c) = hidden.dims3()?;
        let targets = shifted(labels, b, t, "completion_logps")?;
        let counted: Vec<usize> = targets
            .chunks(t)
            .map(|r| r.iter().filter(|&&y| y >= 0).count())
            .collect();
        let h = hidden.reshape((b * t, c))?;
        let nll = nn::lm_token_nll(&h, &self.lm_head, Arc::new(targets), 256)?;
        Ok((sequence_logps(&nll, b, t, &counted, average)?, counted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nn::testing::{flat, max_abs_diff};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn sequence_log_probs_sum_or_average_the_completion() {
        // Two rows of 4 tokens; completion tokens carry their nll, others 0.
        let nll = t(&[0.0, 0.5, 1.5, 0.0, 0.0, 0.0, 2.0, 0.0]);
        let s = sequence_logps(&nll, 2, 4, &[2, 1], false).unwrap();
        assert!(max_abs_diff(&flat(&s), &[-2.0, -2.0]) < 1e-6);
        let a = sequence_logps(&nll, 2, 4, &[2, 1], true).unwrap();
        assert!(max_abs_diff(&flat(&a), &[-1.0, -2.0]) < 1e-6);
        let err = sequence_logps(&nll, 2, 4, &[2, 0], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1 has no completion token"), "{err}");
        assert!(sequence_logps(&nll, 2, 3, &[2, 1], false).is_err());
    }
}
