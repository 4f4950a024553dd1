//! Model bodies, one file per family (BERT-type encoders; Llama-family and
//! GPT-2 decoders), behind one [`Body`]: token inputs in, the last hidden
//! state of every position out (habit 3). Heads (`heads/`) sit on any body.
//!
//! A body's parameters live in the [`ParamStore`] under the names its
//! transformers class gives them inside a task model: `bert.*` in
//! `BertForSequenceClassification`, `model.*` in `LlamaForCausalLM` and
//! `LlamaForSequenceClassification`, `transformer.*` in `GPT2LMHeadModel`
//! and `GPT2ForSequenceClassification` ([`Family::prefix`]). Loading
//! (`load.rs`) puts every checkpoint's keys under those names, so the same
//! store serves a classification head, an LM head or (next) a reward head.

pub mod bert;
pub mod gpt2;
pub mod kv_cache;
pub mod llama;
pub mod load;
pub mod mobilenet_v2;

pub use kv_cache::KvCache;
pub use load::{load_model, LoadOpts, LoadedModel, SourceFormat};

use crate::nn::{DropoutRng, Weight};
use crate::params::{ParamStore, Path};
use crate::{Error, Result};
use bert::{Bert, BertConfig};
use candle_core::{Device, Tensor};
use gpt2::{Gpt2, Gpt2Config};
use llama::{Llama, LlamaConfig};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A model family: what a `config.json`'s `model_type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT-type encoders (all-MiniLM, BERT): bidirectional, absolute positions.
    Bert,
    /// Llama-family decoders (Llama, Mistral, Qwen2, SmolLM).
    Llama,
    /// GPT-2.
    Gpt2,
}

/// `model_type`s read as Llama (same layers, same key names).
pub const LLAMA_TYPES: &[&str] = &["llama", "mistral", "qwen2", "smollm", "smollm2"];

impl Family {
    /// The body's key prefix inside a transformers task model.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Llama => "model",
            Family::Gpt2 => "transformer",
        }
    }

    /// Decoder-only (causal) families: an LM head, generation, SFT.
    pub fn is_decoder(self) -> bool {
        !matches!(self, Family::Bert)
    }

    /// Glob of the parameters of transformer layer `i` (freezing by layer).
    pub fn layer_pattern(self, i: usize) -> String {
        match self {
            Family::Bert => format!("bert.encoder.layer.{i}.*"),
            Family::Llama => format!("model.layers.{i}.*"),
            Family::Gpt2 => format!("transformer.h.{i}.*"),
        }
    }

    /// Globs of the input embeddings (`freeze.embeddings`).
    pub fn embedding_patterns(self) -> &'static [&'static str] {
        match self {
            Family::Bert => &["bert.embeddings.*"],
            Family::Llama => &["model.embed_tokens.*"],
            Family::Gpt2 => &["transformer.wte.*", "transformer.wpe.*"],
        }
    }
}

/// A model's `config.json`, by family (HF field names).
#[derive(Debug, Clone)]
pub enum ModelConfig {
    Bert(BertConfig),
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

impl ModelConfig {
    /// Parse and validate a `config.json` (`file` names it in errors). A
    /// config without `model_type` is read as BERT (old BERT exports omit it).
    pub fn from_value(raw: &serde_json::Value, file: &std::path::Path) -> Result<Self> {
        let mt = raw["model_type"].as_str().unwrap_or("bert");
        let cfg = if mt == "bert" {
            let c: BertConfig = crate::hub::config::from_value_in(raw, file)?;
            c.validate(file)?;
            ModelConfig::Bert(c)
        } else if LLAMA_TYPES.contains(&mt) {
            let c: LlamaConfig = crate::hub::config::from_value_in(raw, file)?;
            c.validate(file)?;
            ModelConfig::Llama(c)
        } else if mt == "gpt2" {
            let c: Gpt2Config = crate::hub::config::from_value_in(raw, file)?;
            c.validate(file)?;
            ModelConfig::Gpt2(c)
        } else {
            return Err(Error::file(
                file,
                format!(
                    "`model_type` {mt:?} is not a supported model (bert, {}, gpt2)",
                    LLAMA_TYPES.join(", ")
                ),
            ));
        };
        Ok(cfg)
    }

    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Bert(_) => Family::Bert,
            ModelConfig::Llama(_) => Family::Llama,
            ModelConfig::Gpt2(_) => Family::Gpt2,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.hidden_size,
            ModelConfig::Llama(c) => c.hidden_size,
            ModelConfig::Gpt2(c) => c.n_embd,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.vocab_size,
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Gpt2(c) => c.n_layer,
        }
    }

    pub fn num_heads(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.num_attention_heads,
            ModelConfig::Llama(c) => c.num_attention_heads,
            ModelConfig::Gpt2(c) => c.n_head,
        }
    }

    /// The longest sequence the positions allow.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Bert(c) => c.max_position_embeddings,
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.n_positions,
        }
    }

    /// The std of transformers' normal init of new linear layers (a new head).
    pub fn initializer_range(&self) -> f64 {
        match self {
            ModelConfig::Bert(c) => c.initializer_range,
            ModelConfig::Llama(c) => c.initializer_range,
            ModelConfig::Gpt2(c) => c.initializer_range,
        }
    }

    /// Whether the LM head is the input embedding (no `lm_head.weight`).
    pub fn tied_lm_head(&self) -> bool {
        match self {
            ModelConfig::Bert(_) => false,
            ModelConfig::Llama(c) => c.tie_word_embeddings,
            ModelConfig::Gpt2(_) => true,
        }
    }

    /// The dropout a new sequence head puts before its output layer, as the
    /// transformers class does: BERT's `classifier_dropout` (else its hidden
    /// dropout); the decoders' `*ForSequenceClassification` have none.
    pub fn head_dropout(&self) -> f32 {
        match self {
            ModelConfig::Bert(c) => c.classifier_dropout.unwrap_or(c.hidden_dropout_prob),
            ModelConfig::Llama(_) | ModelConfig::Gpt2(_) => 0.0,
        }
    }

    /// Override the checkpoint's dropout probabilities (run config), each
    /// family under its own names: hidden = BERT's `hidden_dropout_prob`,
    /// GPT-2's `resid_pdrop` and `embd_pdrop` (Llama has none);
    /// attention = `attention_probs_dropout_prob`, `attention_dropout`, `attn_pdrop`.
    pub fn set_dropout(&mut self, hidden: Option<f32>, attention: Option<f32>) {
        match self {
            ModelConfig::Bert(c) => {
                if let Some(h) = hidden {
                    c.hidden_dropout_prob = h;
                }
                if let Some(a) = attention {
                    c.attention_probs_dropout_prob = a;
                }
            }
            ModelConfig::Llama(c) => {
                if let Some(a) = attention {
                    c.attention_dropout = a;
                }
            }
            ModelConfig::Gpt2(c) => {
                if let Some(h) = hidden {
                    c.resid_pdrop = h;
                    c.embd_pdrop = h;
                }
                if let Some(a) = attention {
                    c.attn_pdrop = a;
                }
            }
        }
    }
}

/// Token ids and masks of one batch, for any body.
#[derive(Clone)]
pub struct Inputs {
    pub ids: Tensor, // [B, T] u32
    /// Segment ids of BERT's token-type embedding `[B, T]` (None: all 0).
    pub type_ids: Option<Tensor>,
    pub b: usize,
    pub t: usize,
    /// Position id per token [B * T] (decoders; restarting per packed example).
    pub positions: Arc<Vec<u32>>,
    /// 1.0 for a real token, 0.0 for padding [B * T].
    pub key_mask: Arc<Vec<f32>>,
    /// Packed example id per token [B * T]: attention never crosses examples.
    pub segments: Option<Arc<Vec<u32>>>,
}

impl Inputs {
    /// Right-padded rows: positions 0..T per row.
    pub fn new(ids: Vec<u32>, mask: Vec<f32>, b: usize, t: usize) -> Result<Self> {
        if ids.len() != b * t || mask.len() != b * t {
            return Err(Error::msg(format!(
                "inputs: {} ids and {} mask entries for [B={b}, T={t}]",
                ids.len(),
                mask.len()
            )));
        }
        let positions = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok(Inputs {
            ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
            type_ids: None,
            b,
            t,
            positions: Arc::new(positions),
            key_mask: Arc::new(mask),
            segments: None,
        })
    }

    /// With BERT's token-type (segment) ids `[B * T]`.
    pub fn with_type_ids(mut self, types: Vec<u32>) -> Result<Self> {
        if types.len() != self.b * self.t {
            return Err(Error::msg(format!(
                "inputs: {} type ids for [B={}, T={}]",
                types.len(),
                self.b,
                self.t
            )));
        }
        self.type_ids = Some(Tensor::from_vec(types, (self.b, self.t), &Device::Cpu)?);
        Ok(self)
    }

    /// The inputs of an SFT-shaped batch (padded or packed rows; also the
    /// 2B rows of a batch of preference pairs).
    pub fn from_sft_batch(b: &crate::data::sft::SftBatch) -> Result<Self> {
        let mask: Vec<f32> = b.attention_mask.iter().map(|&m| m as f32).collect();
        Self::packed(
            b.ids.clone(),
            mask,
            b.positions.clone(),
            b.segments.clone(),
            b.batch,
            b.seq_len,
        )
    }

    /// Packed rows: several examples per row, each with its own positions
    /// and segment id.
    pub fn packed(
        ids: Vec<u32>,
        mask: Vec<f32>,
        positions: Vec<u32>,
        segments: Vec<u32>,
        b: usize,
        t: usize,
    ) -> Result<Self> {
        let mut x = Self::new(ids, mask, b, t)?;
        if positions.len() != b * t || segments.len() != b * t {
            return Err(Error::msg(
                "packed inputs: positions / segments length".to_string(),
            ));
        }
        x.positions = Arc::new(positions);
        x.segments = Some(Arc::new(segments));
        Ok(x)
    }

    /// Causal self-attention of this batch: q `[B, T, heads * D]`, k and v
    /// `[B, T, kv_heads * D]` (grouped-query when fewer), padding and packed
    /// segments masked; attention dropout `p` in training (`rng` = Some).
    #[allow(clippy::too_many_arguments)]
    pub fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        p: f32,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let drop = rng.filter(|_| p > 0.0).map(|r| (p, r.next()));
        Ok(crate::nn::causal_attention(
            q,
            k,
            v,
            heads,
            kv_heads,
            self.key_mask.clone(),
            self.segments.clone(),
            drop,
        )?)
    }

    /// The padding mask as a `[B, T]` tensor (mean pooling).
    pub fn mask_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            self.key_mask.as_slice(),
            (self.b, self.t),
            &Device::Cpu,
        )?)
    }

    /// The same tokens with `p` virtual tokens in front of every row (prompt
    /// tuning): positions shift by `p`, the virtual tokens are visible.
    pub fn with_prefix(&self, p: usize) -> Result<Self> {
        let (b, t) = (self.b, self.t);
        let tt = t + p;
        let mut pos = Vec::with_capacity(b * tt);
        let mut mask = Vec::with_capacity(b * tt);
        let mut seg = self.segments.as_ref().map(|_| Vec::with_capacity(b * tt));
        for r in 0..b {
            pos.extend(0..p as u32);
            pos.extend(
                self.positions[r * t..(r + 1) * t]
                    .iter()
                    .map(|x| x + p as u32),
            );
            mask.extend(std::iter::repeat_n(1.0, p));
            mask.extend_from_slice(&self.key_mask[r * t..(r + 1) * t]);
            if let (Some(s), Some(src)) = (seg.as_mut(), self.segments.as_ref()) {
                let first = src[r * t];
                s.extend(std::iter::repeat_n(first, p));
                s.extend_from_slice(&src[r * t..(r + 1) * t]);
            }
        }
        Ok(Inputs {
            ids: self.ids.clone(),
            type_ids: None,
            b,
            t: tt,
            positions: Arc::new(pos),
            key_mask: Arc::new(mask),
            segments: seg.map(Arc::new),
        })
    }
}

/// A model body of any family: embeddings and transformer layers (with the
/// decoders' final norm), no task head.
pub enum Body {
    Bert(Bert),
    Llama(Llama),
    Gpt2(Gpt2),
}

impl Body {
    /// Build the body from the store (`p` = the store's root; the body reads
    /// its family's prefix, [`Family::prefix`]).
    pub fn load(p: &Path, cfg: &ModelConfig) -> Result<Self> {
        Ok(match cfg {
            ModelConfig::Bert(c) => Body::Bert(Bert::load(&p.pp("bert"), c)?),
            ModelConfig::Llama(c) => Body::Llama(Llama::load(p, c)?),
            ModelConfig::Gpt2(c) => Body::Gpt2(Gpt2::load(p, c)?),
        })
    }

    pub fn family(&self) -> Family {
        match self {
            Body::Bert(_) => Family::Bert,
            Body::Llama(_) => Family::Llama,
            Body::Gpt2(_) => Family::Gpt2,
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Body::Bert(m) => m.config.hidden_size,
            Body::Llama(m) => m.config.hidden_size,
            Body::Gpt2(m) => m.config.n_embd,
        }
    }

    /// Recompute each layer in backward instead of keeping its activations.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        match self {
            Body::Bert(m) => m.gradient_checkpointing = on,
            Body::Llama(m) => m.gradient_checkpointing = on,
            Body::Gpt2(m) => m.gradient_checkpointing = on,
        }
    }

    /// The input token embedding table `[V, C]`.
    pub fn embed_weight(&self) -> &Weight {
        match self {
            Body::Bert(m) => m.embed_weight(),
            Body::Llama(m) => m.embed_weight(),
            Body::Gpt2(m) => m.embed_weight(),
        }
    }

    /// The last hidden state `[B, T, C]` of every position. `rng` = Some in
    /// training (dropout), independent of what is frozen.
    pub fn forward(&self, x: &Inputs, rng: Option<&DropoutRng>) -> Result<Tensor> {
        match self {
            Body::Bert(m) => m.forward_inputs(x, rng),
            _ => self.forward_embeds(&self.embed(&x.ids)?, x, rng),
        }
    }

    /// The last hidden state of the first position alone, `[B, 1, C]`,
    /// where the body computes it for less than [`Self::forward`] (BERT on
    /// the CPU: [`Bert::forward_first`]); `None` elsewhere.
    pub fn forward_first(&self, x: &Inputs, rng: Option<&DropoutRng>) -> Result<Option<Tensor>> {
        match self {
            Body::Bert(m) => m.forward_first(x, rng),
            _ => Ok(None),
        }
    }

    fn decoder_only(&self, what: &str) -> Error {
        Error::msg(format!(
            "{what}: BERT is an encoder; this needs a decoder (Llama family, GPT-2)"
        ))
    }

    /// Token embeddings `[B, T, C]` of a decoder (positions are added in
    /// the body), through the embedding op so a trainable table gets its
    /// gradient.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        if let Body::Bert(_) = self {
            return Err(self.decoder_only("embed"));
        }
        let (b, t) = ids.dims2()?;
        let x = crate::nn::embedding(self.embed_weight(), &ids.flatten_all()?, None)?;
        Ok(x.reshape((b, t, self.hidden_size()))?)
    }

    /// Final hidden states `[B, T, C]` of input embeddings `[B, T, C]` (a
    /// soft prompt can be prepended to the token embeddings).
    pub fn forward_embeds(
        &self,
        emb: &Tensor,
        x: &Inputs,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        match self {
            Body::Bert(_) => Err(self.decoder_only("forward_embeds")),
            Body::Llama(m) => m.forward_embeds(emb, x, rng),
            Body::Gpt2(m) => m.forward_embeds(emb, x, rng),
        }
    }

    /// Hidden states of new tokens after the cached ones (generation).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_cached_embeds(&self.embed(ids)?, cache)
    }

    /// [`Self::forward_cached`] from input embeddings `[B, Tn, C]`.
    pub fn forward_cached_embeds(&self, emb: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Body::Bert(_) => Err(self.decoder_only("forward_cached")),
            Body::Llama(m) => m.forward_cached_embeds(emb, cache),
            Body::Gpt2(m) => m.forward_cached_embeds(emb, cache),
        }
    }
}

/// Where `cfg`'s parts are by name, with a task head under `head`: what
/// `[freeze]` rules refer to.
pub fn layout(cfg: &ModelConfig, head: &[&str]) -> crate::params::Layout {
    let f = cfg.family();
    crate::params::Layout {
        prefix: format!("{}.", f.prefix()),
        layers: (0..cfg.num_layers()).map(|i| f.layer_pattern(i)).collect(),
        embeddings: f
            .embedding_patterns()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        head: head.iter().map(|s| s.to_string()).collect(),
    }
}

/// Checkpoint tensors that a task model does not use and that are dropped
/// with a warning rather than refused: the pretraining heads (BERT's `cls.`
/// MLM/NSP heads; a decoder's untied `lm_head` under a sequence head).
pub fn other_heads(family: Family, lm_head_used: bool) -> &'static [&'static str] {
    match (family, lm_head_used) {
        (Family::Bert, _) => &["cls.", "bert.cls."],
        (_, false) => &["lm_head."],
        (_, true) => &[],
    }
}

/// After the model took what it needs: drop the tensors of `other` heads
/// (with a warning) and fail on any other tensor the model did not use.
pub fn check_unused(
    store: &mut ParamStore,
    other: &[&str],
    warn: &mut dyn FnMut(String),
) -> Result<()> {
    let unused = store.unused();
    let (dropped, unexpected): (Vec<_>, Vec<_>) = unused
        .into_iter()
        .partition(|n| other.iter().any(|p| n.starts_with(p)));
    if !dropped.is_empty() {
        warn(format!(
            "ignoring {} tensors of a pretraining head (e.g. {})",
            dropped.len(),
            dropped[0]
        ));
        for n in &dropped {
            store.remove(n);
        }
    }
    if !unexpected.is_empty() {
        return Err(Error::UnexpectedTensors {
            path: store.source.clone().into(),
            names: unexpected,
        });
    }
    Ok(())
}
