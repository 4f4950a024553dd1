//! Llama-family decoder (Llama, Mistral, Qwen2, SmolLM): RMSNorm, RoPE in
//! HF's rotate-half layout, grouped-query attention, SwiGLU MLP, tied or
//! untied LM head.
//!
//! Follows transformers' `models/llama/modeling_llama.py` (v5.23) on
//! afinar's differentiable ops. Field names copy the checkpoint keys
//! (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...), so adapters
//! target `q_proj`, `v_proj`, ... as in PEFT.

use super::{Inputs, KvCache};
use crate::nn::{self, DropoutRng, Linear, RmsNorm, RopeTable, Weight};
use crate::params::Path;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

fn d_eps() -> f64 {
    1e-6
}
fn d_theta() -> f64 {
    10000.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_init() -> f64 {
    0.02
}

/// `config.json` of a Llama-family checkpoint (HF field names).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta`; 5.x writes `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (Qwen2 has them on q/k/v without writing this key).
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attention_dropout: f32,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
            .unwrap_or_else(d_theta)
    }
    /// q/k/v biases: `attention_bias`, or Qwen2's always-on q/k/v biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }
    pub fn o_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false)
    }

    /// Reject what this implementation does not do, naming the key.
    pub fn validate(&self, file: &std::path::Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::file(file, format!("`{key}`: {msg}")));
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!("`{}` is not supported (silu)", self.hidden_act),
            );
        }
        let h = self.num_attention_heads;
        if h == 0 || self.kv_heads() == 0 || h % self.kv_heads() != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    h,
                    self.kv_heads()
                ),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad(
                "head_dim",
                format!("{} is odd: RoPE needs pairs", self.head_dim()),
            );
        }
        let rope_type = |v: &serde_json::Value| -> Option<String> {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|t| t.as_str())
                .map(String::from)
        };
        for (key, v) in [
            ("rope_scaling", &self.rope_scaling),
            ("rope_parameters", &self.rope_parameters),
        ] {
            if let Some(t) = v.as_ref().filter(|v| !v.is_null()).and_then(rope_type) {
                if t != "default" {
                    return bad(key, format!("rope_type `{t}` is not supported (default)"));
                }
            }
        }
        Ok(())
    }
}

pub struct LlamaLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    attention_dropout: f32,
}

impl LlamaLayer {
    fn load(p: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let (h, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let (nq, nkv, d) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let att = p.pp("self_attn");
        let mlp = p.pp("mlp");
        let qkv_b = cfg.qkv_bias();
        Ok(LlamaLayer {
            q_proj: att.pp("q_proj").linear(h, nq * d, qkv_b)?,
            k_proj: att.pp("k_proj").linear(h, nkv * d, qkv_b)?,
            v_proj: att.pp("v_proj").linear(h, nkv * d, qkv_b)?,
            o_proj: att.pp("o_proj").linear(nq * d, h, cfg.o_bias())?,
            gate_proj: mlp.pp("gate_proj").linear(h, f, cfg.mlp_bias)?,
            up_proj: mlp.pp("up_proj").linear(h, f, cfg.mlp_bias)?,
            down_proj: mlp.pp("down_proj").linear(f, h, cfg.mlp_bias)?,
            input_layernorm: p.pp("input_layernorm").rms_norm(h, eps)?,
            post_attention_layernorm: p.pp("post_attention_layernorm").rms_norm(h, eps)?,
            heads: nq,
            kv_heads: nkv,
            head_dim: d,
            attention_dropout: cfg.attention_dropout,
        })
    }

    fn mlp(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let g = self.gate_proj.forward_t(x, rng)?; // [B, T, F]
        let u = self.up_proj.forward_t(x, rng)?;
        self.down_proj.forward_t(&nn::silu_mul(&g, &u)?, rng)
    }

    fn anchor(&self) -> Option<Tensor> {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
        .iter()
        .find_map(|l| l.trainable_tensor())
        .or_else(|| {
            [&self.input_layernorm, &self.post_attention_layernorm]
                .iter()
                .find(|n| n.weight.is_trainable())
                .map(|n| n.weight.t.clone())
        })
    }

    /// The layer, checkpointed in training when `on` (see [`nn::checkpoint`]).
    fn forward_ckpt(
        self: &Arc<Self>,
        x: &Tensor,
        inp: &Inputs,
        rope: &Arc<RopeTable>,
        rng: Option<&DropoutRng>,
        on: bool,
    ) -> Result<Tensor> {
        if !on || rng.is_none() {
            return self.forward(x, inp, rope, rng);
        }
        let (l, i, r) = (self.clone(), inp.clone(), rope.clone());
        nn::checkpoint(
            x,
            self.anchor().as_ref(),
            rng,
            Arc::new(move |x, d| l.forward(x, &i, &r, d)),
        )
    }

    fn forward(
        &self,
        x: &Tensor,
        inp: &Inputs,
        rope: &Arc<RopeTable>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let hn = self.input_layernorm.forward(x)?;
        let q = self.q_proj.forward_t(&hn, rng)?; // [B, T, Hq*D]
        let k = self.k_proj.forward_t(&hn, rng)?; // [B, T, Hkv*D]
        let v = self.v_proj.forward_t(&hn, rng)?;
        let q = nn::rope(&q, rope, &inp.positions, self.heads)?;
        let k = nn::rope(&k, rope, &inp.positions, self.kv_heads)?;
        let (h, kvh, p) = (self.heads, self.kv_heads, self.attention_dropout);
        let ctx = inp.causal_attention(&q, &k, &v, h, kvh, p, rng)?; // [B, T, Hq*D]
        let x = x.add(&self.o_proj.forward_t(&ctx, rng)?)?;
        let hn = self.post_attention_layernorm.forward(&x)?;
        let g = self.gate_proj.forward_t(&hn, rng)?; // [B, T, F]
        let u = self.up_proj.forward_t(&hn, rng)?;
        match self.down_proj.frozen_plain() {
            // One op: the [B, T, F] product is not kept for backward.
            Some((w, None)) => Ok(nn::swiglu_down_residual(&g, &u, w, &x)?),
            _ => Ok((&x + self.down_proj.forward_t(&nn::silu_mul(&g, &u)?, rng)?)?),
        }
    }

    /// Inference with a KV cache: `x` [B, Tn, C] are the new positions.
    fn forward_cached(
        &self,
        x: &Tensor,
        positions: &Arc<Vec<u32>>,
        rope: &Arc<RopeTable>,
        cache: &mut (Vec<Vec<f32>>, Vec<Vec<f32>>),
        pads: &[usize],
        t_past: usize,
    ) -> Result<Tensor> {
        let (b, tn, _) = x.dims3()?;
        let hn = self.input_layernorm.forward(x)?;
        let q = nn::rope(&self.q_proj.forward(&hn)?, rope, positions, self.heads)?;
        let k = nn::rope(&self.k_proj.forward(&hn)?, rope, positions, self.kv_heads)?;
        let v = self.v_proj.forward(&hn)?;
        let ctx = super::kv_cache::cached_attention(
            &q,
            &k,
            &v,
            cache,
            pads,
            b,
            tn,
            t_past,
            self.heads,
            self.kv_heads,
            self.head_dim,
        )?;
        let x = x.add(&self.o_proj.forward(&ctx)?)?;
        let hn = self.post_attention_layernorm.forward(&x)?;
        Ok((&x + self.mlp(&hn, None)?)?)
    }
}

/// The decoder body (`LlamaModel`): embeddings, layers, final norm. The LM
/// head belongs to `heads::CausalLm`, the sequence head to `heads::SequenceModel`.
pub struct Llama {
    embed_tokens: Weight,
    layers: Vec<Arc<LlamaLayer>>,
    /// Recompute each layer in backward (training only): [`nn::checkpoint`].
    pub gradient_checkpointing: bool,
    norm: RmsNorm,
    rope: Arc<RopeTable>,
    pub config: LlamaConfig,
}

impl Llama {
    /// `p` is the store's root: the body is `model.*`.
    pub fn load(p: &Path, cfg: &LlamaConfig) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let m = p.pp("model");
        let embed_tokens = m.get(&[v, h], "embed_tokens.weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(&m.pp("layers").pp(i), cfg).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let norm = m.pp("norm").rms_norm(h, cfg.rms_norm_eps)?;
        Ok(Llama {
            gradient_checkpointing: false,
            embed_tokens,
            layers,
            norm,
            rope: Arc::new(RopeTable::new(
                cfg.head_dim(),
                cfg.theta(),
                cfg.max_position_embeddings,
            )),
            config: cfg.clone(),
        })
    }

    pub fn embed_weight(&self) -> &Weight {
        &self.embed_tokens
    }

    /// The final hidden states `[B, T, C]` (after the last norm) of input
    /// embeddings `x` `[B, T, C]` (token embeddings, or a soft prompt
    /// prepended to them). `rng` = Some in training.
    pub fn forward_embeds(&self, x: &Tensor, i: &Inputs, d: Option<&DropoutRng>) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward_ckpt(&x, i, &self.rope, d, self.gradient_checkpointing)?;
        }
        self.norm.forward(&x)
    }

    /// Final hidden states of new positions after `cache` (generation),
    /// from input embeddings `[B, Tn, C]` (a soft prompt, then token
    /// embeddings).
    pub fn forward_cached_embeds(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (positions, t_past, tn) = cache.begin_step(self.layers.len(), x)?;
        let mut x = x.clone();
        let pads = &cache.pads;
        for (l, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = l.forward_cached(&x, &positions, &self.rope, c, pads, t_past)?;
        }
        cache.end_step(tn);
        self.norm.forward(&x)
    }
}
