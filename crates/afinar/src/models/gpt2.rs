//! GPT-2 decoder: learned positions, pre-LN blocks, fused q/k/v projection
//! (`attn.c_attn`), tanh GELU ("gelu_new"), LM head tied to `wte`.
//!
//! Follows transformers' `models/gpt2/modeling_gpt2.py` (v5.23). The
//! checkpoint stores its `Conv1D` weights as `[in, out]`; the loader
//! (`load::load_params`) transposes them once to afinar's `[out,
//! in]` so every linear (and every adapter on it) has one layout, and export
//! transposes them back. Names copy the checkpoint keys.

use super::{Inputs, KvCache};
use crate::nn::{self, maybe_dropout, DropoutRng, LayerNorm, Linear, Weight};
use crate::params::Path;
use crate::{Error, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

fn d_eps() -> f64 {
    1e-5
}
fn d_act() -> String {
    "gelu_new".into()
}
fn d_drop() -> f32 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_init() -> f64 {
    0.02
}

/// `config.json` of a GPT-2 checkpoint (HF field names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "d_act")]
    pub activation_function: String,
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_drop")]
    pub resid_pdrop: f32,
    #[serde(default = "d_drop")]
    pub embd_pdrop: f32,
    #[serde(default = "d_drop")]
    pub attn_pdrop: f32,
    #[serde(default = "d_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

impl Gpt2Config {
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
    pub fn validate(&self, file: &std::path::Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::file(file, format!("`{key}`: {msg}")));
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast"
        ) {
            return bad(
                "activation_function",
                format!("`{}` is not supported (gelu_new)", self.activation_function),
            );
        }
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return bad(
                "n_head",
                format!(
                    "n_embd {} is not divisible by {} heads",
                    self.n_embd, self.n_head
                ),
            );
        }
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx {
            return bad(
                "scale_attn_by_inverse_layer_idx",
                "only the standard 1/sqrt(head_dim) attention scale is supported".into(),
            );
        }
        if !self.tie_word_embeddings {
            return bad(
                "tie_word_embeddings",
                "an untied GPT-2 head is not supported".into(),
            );
        }
        Ok(())
    }
}

/// Names of the `Conv1D` weights stored `[in, out]` in a GPT-2 checkpoint.
pub fn is_conv1d(name: &str) -> bool {
    name.starts_with("transformer.h.")
        && (name.ends_with("attn.c_attn.weight")
            || name.ends_with("attn.c_proj.weight")
            || name.ends_with("mlp.c_fc.weight")
            || name.ends_with("mlp.c_proj.weight"))
}

pub struct Gpt2Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    heads: usize,
    c: usize,
    resid_pdrop: f32,
    attn_pdrop: f32,
}

impl Gpt2Block {
    fn load(p: &Path, cfg: &Gpt2Config) -> Result<Self> {
        let (c, f, eps) = (cfg.n_embd, cfg.inner(), cfg.layer_norm_epsilon);
        Ok(Gpt2Block {
            ln_1: p.pp("ln_1").layer_norm(c, eps)?,
            c_attn: p.pp("attn").pp("c_attn").linear(c, 3 * c, true)?,
            attn_proj: p.pp("attn").pp("c_proj").linear(c, c, true)?,
            ln_2: p.pp("ln_2").layer_norm(c, eps)?,
            c_fc: p.pp("mlp").pp("c_fc").linear(c, f, true)?,
            mlp_proj: p.pp("mlp").pp("c_proj").linear(f, c, true)?,
            heads: cfg.n_head,
            c,
            resid_pdrop: cfg.resid_pdrop,
            attn_pdrop: cfg.attn_pdrop,
        })
    }

    fn split_qkv(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = self.c;
        Ok((
            qkv.narrow(D::Minus1, 0, c)?.contiguous()?,
            qkv.narrow(D::Minus1, c, c)?.contiguous()?,
            qkv.narrow(D::Minus1, 2 * c, c)?.contiguous()?,
        ))
    }

    fn mlp(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let hn = self.ln_2.forward(x)?;
        let f = nn::gelu_tanh(&self.c_fc.forward_t(&hn, rng)?)?;
        maybe_dropout(self.mlp_proj.forward_t(&f, rng)?, self.resid_pdrop, rng)
    }

    fn anchor(&self) -> Option<Tensor> {
        [&self.c_attn, &self.attn_proj, &self.c_fc, &self.mlp_proj]
            .iter()
            .find_map(|l| l.trainable_tensor())
            .or_else(|| self.ln_1.trainable_tensor())
            .or_else(|| self.ln_2.trainable_tensor())
    }

    /// The block, checkpointed in training when `on` (see [`nn::checkpoint`]).
    fn forward_ckpt(
        self: &Arc<Self>,
        x: &Tensor,
        inp: &Inputs,
        rng: Option<&DropoutRng>,
        on: bool,
    ) -> Result<Tensor> {
        if !on || rng.is_none() {
            return self.forward(x, inp, rng);
        }
        let (l, i) = (self.clone(), inp.clone());
        nn::checkpoint(
            x,
            self.anchor().as_ref(),
            rng,
            Arc::new(move |x, d| l.forward(x, &i, d)),
        )
    }

    fn forward(&self, x: &Tensor, inp: &Inputs, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let (q, k, v) = self.split_qkv(&self.c_attn.forward_t(&self.ln_1.forward(x)?, rng)?)?;
        let ctx = inp.causal_attention(&q, &k, &v, self.heads, self.heads, self.attn_pdrop, rng)?;
        let a = maybe_dropout(self.attn_proj.forward_t(&ctx, rng)?, self.resid_pdrop, rng)?;
        let x = (x + a)?;
        Ok((&x + self.mlp(&x, rng)?)?)
    }

    fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut (Vec<Vec<f32>>, Vec<Vec<f32>>),
        pads: &[usize],
        t_past: usize,
    ) -> Result<Tensor> {
        let (b, tn, _) = x.dims3()?;
        let (q, k, v) = self.split_qkv(&self.c_attn.forward(&self.ln_1.forward(x)?)?)?;
        let d = self.c / self.heads;
        let ctx = super::kv_cache::cached_attention(
            &q, &k, &v, cache, pads, b, tn, t_past, self.heads, self.heads, d,
        )?;
        let x = x.add(&self.attn_proj.forward(&ctx)?)?;
        Ok((&x + self.mlp(&x, None)?)?)
    }
}

pub struct Gpt2 {
    wte: Weight,
    wpe: Weight,
    blocks: Vec<Arc<Gpt2Block>>,
    /// Recompute each block in backward (training only): [`nn::checkpoint`].
    pub gradient_checkpointing: bool,
    ln_f: LayerNorm,
    embd_pdrop: f32,
    pub config: Gpt2Config,
}

impl Gpt2 {
    /// `p` is the store's root: `transformer.*`.
    pub fn load(p: &Path, cfg: &Gpt2Config) -> Result<Self> {
        let t = p.pp("transformer");
        let c = cfg.n_embd;
        Ok(Gpt2 {
            wte: t.get(&[cfg.vocab_size, c], "wte.weight")?,
            wpe: t.get(&[cfg.n_positions, c], "wpe.weight")?,
            blocks: (0..cfg.n_layer)
                .map(|i| Gpt2Block::load(&t.pp("h").pp(i), cfg).map(Arc::new))
                .collect::<Result<Vec<_>>>()?,
            ln_f: t.pp("ln_f").layer_norm(c, cfg.layer_norm_epsilon)?,
            embd_pdrop: cfg.embd_pdrop,
            config: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    pub fn embed_weight(&self) -> &Weight {
        &self.wte
    }

    fn add_positions(&self, x: &Tensor, positions: &Arc<Vec<u32>>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        if let Some(&p) = positions.iter().max() {
            if p as usize >= self.config.n_positions {
                return Err(Error::msg(format!(
                    "position {p} exceeds GPT-2's n_positions {}",
                    self.config.n_positions
                )));
            }
        }
        let ids = Tensor::from_slice(positions.as_slice(), b * t, x.device())?;
        let pos = nn::embedding(&self.wpe, &ids, None)?.reshape((b, t, c))?;
        Ok((x + pos)?)
    }

    pub fn forward_embeds(&self, x: &Tensor, i: &Inputs, d: Option<&DropoutRng>) -> Result<Tensor> {
        let mut x = maybe_dropout(self.add_positions(x, &i.positions)?, self.embd_pdrop, d)?;
        for blk in &self.blocks {
            x = blk.forward_ckpt(&x, i, d, self.gradient_checkpointing)?;
        }
        self.ln_f.forward(&x)
    }

    /// Final hidden states of new positions after `cache` (generation),
    /// from input embeddings `[B, Tn, C]` (a soft prompt, then token
    /// embeddings).
    pub fn forward_cached_embeds(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (positions, t_past, tn) = cache.begin_step(self.blocks.len(), x)?;
        let mut x = self.add_positions(x, &positions)?;
        let pads = &cache.pads;
        for (blk, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = blk.forward_cached(&x, c, pads, t_past)?;
        }
        cache.end_step(tn);
        self.ln_f.forward(&x)
    }
}
