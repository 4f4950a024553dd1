//! What every decoder-only LM shares: the inputs of one batch (positions,
//! padding, packed segments), the KV cache of generation, the causal-LM loss
//! (labels shifted left inside, as transformers' `ForCausalLMLoss`), and
//! loading a checkpoint folder of any supported family into a
//! [`ParamStore`].

use super::gpt2::{self, Gpt2, Gpt2Config};
use super::llama::{Llama, LlamaConfig};
use crate::hub::checkpoint::Checkpoint;
use crate::nn::{self, DropoutRng, Weight};
use crate::params::{ParamStore, Path, Selector};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Token ids and masks of one batch for a decoder.
#[derive(Clone)]
pub struct DecoderInputs {
    pub ids: Tensor, // [B, T] u32
    pub b: usize,
    pub t: usize,
    /// Position id per token [B * T] (restarting per packed example).
    pub positions: Arc<Vec<u32>>,
    /// 1.0 for a real token, 0.0 for padding [B * T].
    pub key_mask: Arc<Vec<f32>>,
    /// Packed example id per token [B * T]: attention never crosses examples.
    pub segments: Option<Arc<Vec<u32>>>,
}

impl DecoderInputs {
    /// Right-padded rows: positions 0..T per row.
    pub fn new(ids: Vec<u32>, mask: Vec<f32>, b: usize, t: usize) -> Result<Self> {
        if ids.len() != b * t || mask.len() != b * t {
            return Err(Error::msg(format!(
                "decoder inputs: {} ids and {} mask entries for [B={b}, T={t}]",
                ids.len(),
                mask.len()
            )));
        }
        let positions = (0..b).flat_map(|_| 0..t as u32).collect();
        Ok(DecoderInputs {
            ids: Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
            b,
            t,
            positions: Arc::new(positions),
            key_mask: Arc::new(mask),
            segments: None,
        })
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
            mask.extend(std::iter::repeat(1.0).take(p));
            mask.extend_from_slice(&self.key_mask[r * t..(r + 1) * t]);
            if let (Some(s), Some(src)) = (seg.as_mut(), self.segments.as_ref()) {
                let first = src[r * t];
                s.extend(std::iter::repeat(first).take(p));
                s.extend_from_slice(&src[r * t..(r + 1) * t]);
            }
        }
        Ok(DecoderInputs {
            ids: self.ids.clone(),
            b,
            t: tt,
            positions: Arc::new(pos),
            key_mask: Arc::new(mask),
            segments: seg.map(Arc::new),
        })
    }
}

/// Keys and values of the positions seen so far, per layer and batch row:
/// `layers[l].0[row]` is `[len, kv_heads * head_dim]` row-major.
#[derive(Default)]
pub struct KvCache {
    pub layers: Vec<(Vec<Vec<f32>>, Vec<Vec<f32>>)>,
    pub len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// Ready the cache of an `n`-layer model for `tn` new positions of `b`
    /// rows; returns their position ids `[b * tn]` (continuing the cache).
    pub fn begin(&mut self, n: usize, b: usize, tn: usize) -> Arc<Vec<u32>> {
        self.ensure_layers(n, b);
        let t_past = self.len as u32;
        Arc::new((0..b).flat_map(|_| t_past..t_past + tn as u32).collect())
    }

    pub fn ensure_layers(&mut self, n: usize, b: usize) {
        if self.layers.len() != n {
            self.layers = (0..n)
                .map(|_| (vec![Vec::new(); b], vec![Vec::new(); b]))
                .collect();
        }
    }
}

/// Append the new keys/values to `cache` and attend the new queries to every
/// cached position (causal). q [B, Tn, Hq*D], k/v [B, Tn, Hkv*D].
#[allow(clippy::too_many_arguments)]
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut (Vec<Vec<f32>>, Vec<Vec<f32>>),
    b: usize,
    tn: usize,
    t_past: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
) -> Result<Tensor> {
    let kvd = kv_heads * d;
    // On a GPU the new token's q/k/v come over to the CPU cache (generation
    // only: there is no GPU kernel for the cached path yet).
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    };
    let (kf, vf, qf) = (host(k)?, host(v)?, host(q)?);
    let t_total = t_past + tn;
    let mut kc = Vec::with_capacity(b * t_total * kvd);
    let mut vc = Vec::with_capacity(b * t_total * kvd);
    for r in 0..b {
        cache.0[r].extend_from_slice(&kf[r * tn * kvd..(r + 1) * tn * kvd]);
        cache.1[r].extend_from_slice(&vf[r * tn * kvd..(r + 1) * tn * kvd]);
        if cache.0[r].len() != t_total * kvd {
            return Err(Error::msg(
                "KV cache length out of step with the positions".to_string(),
            ));
        }
        kc.extend_from_slice(&cache.0[r]);
        vc.extend_from_slice(&cache.1[r]);
    }
    let mut out = vec![0f32; b * tn * heads * d];
    nn::attention_with_cache(&qf, &kc, &vc, b, tn, t_total, heads, kv_heads, d, &mut out);
    let out = Tensor::from_vec(out, (b, tn, heads * d), &Device::Cpu)?;
    Ok(out.to_device(q.device())?.to_dtype(q.dtype())?)
}

/// A decoder's `config.json`, by `model_type`.
#[derive(Debug, Clone)]
pub enum DecoderConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
}

/// Families read as Llama (same layers, same key names).
pub const LLAMA_TYPES: &[&str] = &["llama", "mistral", "qwen2", "smollm", "smollm2"];

impl DecoderConfig {
    pub fn from_value(raw: &serde_json::Value, file: &std::path::Path) -> Result<Self> {
        let mt = raw["model_type"].as_str().unwrap_or_default();
        if LLAMA_TYPES.contains(&mt) {
            let c: LlamaConfig = crate::hub::config::from_value_in(raw, file)?;
            c.validate(file)?;
            Ok(DecoderConfig::Llama(c))
        } else if mt == "gpt2" {
            let c: Gpt2Config = crate::hub::config::from_value_in(raw, file)?;
            c.validate(file)?;
            Ok(DecoderConfig::Gpt2(c))
        } else {
            Err(Error::file(
                file,
                format!(
                    "`model_type` {mt:?} is not a supported decoder ({}, gpt2)",
                    LLAMA_TYPES.join(", ")
                ),
            ))
        }
    }
    pub fn hidden_size(&self) -> usize {
        match self {
            DecoderConfig::Llama(c) => c.hidden_size,
            DecoderConfig::Gpt2(c) => c.n_embd,
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            DecoderConfig::Llama(c) => c.vocab_size,
            DecoderConfig::Gpt2(c) => c.vocab_size,
        }
    }
    pub fn max_positions(&self) -> usize {
        match self {
            DecoderConfig::Llama(c) => c.max_position_embeddings,
            DecoderConfig::Gpt2(c) => c.n_positions,
        }
    }
    pub fn initializer_range(&self) -> f64 {
        match self {
            DecoderConfig::Llama(c) => c.initializer_range,
            DecoderConfig::Gpt2(c) => c.initializer_range,
        }
    }
    /// Set dropout probabilities (training config overrides).
    pub fn set_dropout(&mut self, hidden: Option<f32>, attention: Option<f32>) {
        match self {
            DecoderConfig::Llama(c) => {
                if let Some(a) = attention {
                    c.attention_dropout = a;
                }
            }
            DecoderConfig::Gpt2(c) => {
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

/// Read and validate `config.json` of a decoder checkpoint folder.
pub fn read_decoder_config(dir: &std::path::Path) -> Result<(DecoderConfig, serde_json::Value)> {
    if !dir.exists() {
        return Err(Error::file(dir, "model folder does not exist"));
    }
    let file = dir.join("config.json");
    let raw = crate::hub::config::read_config_value(&file)?;
    Ok((DecoderConfig::from_value(&raw, &file)?, raw))
}

/// Buffers some checkpoints carry that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("attn.bias")
            && name.starts_with("transformer.h.")
            && !name.contains("c_attn")
        || name.ends_with("attn.masked_bias")
}

/// Load a decoder checkpoint folder into a store under transformers'
/// `*ForCausalLM` names (GPT-2's `Conv1D` weights transposed to `[out, in]`;
/// a bare `GPT2Model` checkpoint gets the `transformer.` prefix).
pub fn load_decoder_params(
    dir: &std::path::Path,
    cfg: &DecoderConfig,
    selector: Selector,
) -> Result<ParamStore> {
    let ckpt = Checkpoint::open(dir)?;
    let mut store = ParamStore::new(selector, ckpt.path().display().to_string());
    let gpt2 = matches!(cfg, DecoderConfig::Gpt2(_));
    let bare_gpt2 = gpt2 && !ckpt.names().iter().any(|n| n.starts_with("transformer."));
    for name in ckpt.names() {
        if is_buffer(&name) {
            continue;
        }
        let key = if bare_gpt2 && name != "lm_head.weight" {
            format!("transformer.{name}")
        } else {
            name.clone()
        };
        let t = ckpt.load_f32(&name)?;
        let t = if gpt2 && gpt2::is_conv1d(&key) {
            t.t()?.contiguous()?
        } else {
            t
        };
        store.insert(&key, t)?;
    }
    // A tied head saved twice (some exports do): the model uses the embedding.
    let tied = match cfg {
        DecoderConfig::Llama(c) => c.tie_word_embeddings,
        DecoderConfig::Gpt2(_) => true,
    };
    if tied && store.contains("lm_head.weight") {
        store.remove("lm_head.weight");
    }
    Ok(store)
}

/// A decoder-only language model of any supported family.
pub enum Decoder {
    Llama(Llama),
    Gpt2(Gpt2),
}

impl Decoder {
    /// Recompute each layer in backward instead of keeping its activations.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        match self {
            Decoder::Llama(m) => m.gradient_checkpointing = on,
            Decoder::Gpt2(m) => m.gradient_checkpointing = on,
        }
    }

    pub fn load(store: &ParamStore, cfg: &DecoderConfig) -> Result<Self> {
        let p = Path::root(store, "");
        Ok(match cfg {
            DecoderConfig::Llama(c) => Decoder::Llama(Llama::load(&p, c)?),
            DecoderConfig::Gpt2(c) => Decoder::Gpt2(Gpt2::load(&p, c)?),
        })
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            Decoder::Llama(m) => m.config.hidden_size,
            Decoder::Gpt2(m) => m.config.n_embd,
        }
    }

    pub fn lm_head(&self) -> &Weight {
        match self {
            Decoder::Llama(m) => m.lm_head(),
            Decoder::Gpt2(m) => m.lm_head(),
        }
    }

    pub fn embed_weight(&self) -> &Weight {
        match self {
            Decoder::Llama(m) => m.embed_weight(),
            Decoder::Gpt2(m) => m.embed_weight(),
        }
    }

    /// Token embeddings `[B, T, C]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Decoder::Llama(m) => m.embed(ids),
            Decoder::Gpt2(m) => m.embed(ids),
        }
    }

    /// Final hidden states `[B, T, C]` of input embeddings `[B, T, C]`.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        inp: &DecoderInputs,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        match self {
            Decoder::Llama(m) => m.forward_embeds(x, inp, rng),
            Decoder::Gpt2(m) => m.forward_embeds(x, inp, rng),
        }
    }

    /// Final hidden states `[B, T, C]` of a batch (every position).
    pub fn forward(&self, inp: &DecoderInputs, rng: Option<&DropoutRng>) -> Result<Tensor> {
        self.forward_embeds(&self.embed(&inp.ids)?, inp, rng)
    }

    /// Hidden states of new tokens after the cached ones (inference).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Decoder::Llama(m) => m.forward_cached(ids, cache),
            Decoder::Gpt2(m) => m.forward_cached(ids, cache),
        }
    }

    /// [`Self::forward_cached`] from input embeddings `[B, Tn, C]`.
    pub fn forward_cached_embeds(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            Decoder::Llama(m) => m.forward_cached_embeds(x, cache),
            Decoder::Gpt2(m) => m.forward_cached_embeds(x, cache),
        }
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
        inp: &DecoderInputs,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let Some(prompt) = prompt else {
            return self.forward(inp, rng);
        };
        let p = prompt.t.dim(0)?;
        let x = self.embed(&inp.ids)?; // [B, T, C]
        let (b, t, c) = x.dims3()?;
        let pe = Self::prompt_embeds(prompt)?
            .unsqueeze(0)?
            .broadcast_as((b, p, c))?;
        let x = Tensor::cat(&[&pe, &x], 1)?; // [B, P + T, C]
        let hidden = self.forward_embeds(&x, &inp.with_prefix(p)?, rng)?;
        Ok(hidden.narrow(1, p, t)?)
    }

    /// Logits `[N, V]` of hidden states `[.., C]` (inference).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let c = self.hidden_size();
        let h = hidden.reshape(((), c))?;
        Ok(nn::lm_logits(&h, &self.lm_head().t)?)
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
        let loss = nn::lm_cross_entropy(&h, self.lm_head(), Arc::new(targets), 256)?;
        Ok((loss, n))
    }
}

/// A decoder LM ready to use: weights, config and tokenizer, from an HF
/// folder (safetensors + `tokenizer.json` + `tokenizer_config.json`) or a
/// GGUF file (weights dequantised to f32, or the linears kept quantised with
/// [`LoadOpts::quantized`]; tokenizer and chat template from its metadata).
pub struct LmSource {
    pub path: std::path::PathBuf,
    pub cfg: DecoderConfig,
    /// `config.json` (for a GGUF file: the HF config its metadata describes).
    pub raw_config: serde_json::Value,
    pub store: ParamStore,
    pub tokenizer: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    /// "safetensors" or "gguf".
    pub format: &'static str,
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_str(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(String::from)
        .or_else(|| v.get("content")?.as_str().map(String::from))
}

/// How [`load_lm_with`] reads the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOpts {
    /// GGUF only: keep the linear layers' weights (q/k/v/o, gate/up/down
    /// projections) in the file's own types (Q4_0, Q4_1, Q8_0, F16, ...),
    /// frozen and dequantised per matmul; embeddings, norms and an untied
    /// LM head are still dequantised to f32. For adapter training
    /// (QLoRA-style) and inference: the selector must train none of them.
    pub quantized: bool,
}

/// Whether `path` is read as a GGUF file (a `.gguf` name or the `GGUF` magic).
pub fn is_gguf(path: &std::path::Path) -> bool {
    crate::hub::inspect::is_gguf_file(path)
}

/// Load a decoder from a folder or a `.gguf` file (every weight as f32).
pub fn load_lm(path: &std::path::Path, selector: Selector) -> Result<LmSource> {
    load_lm_with(path, selector, LoadOpts::default())
}

/// [`load_lm`] with options (a GGUF's linear weights kept quantised).
pub fn load_lm_with(
    path: &std::path::Path,
    selector: Selector,
    opts: LoadOpts,
) -> Result<LmSource> {
    if is_gguf(path) {
        return load_lm_gguf(path, selector, opts);
    }
    if path.is_file() {
        crate::hub::pickle::refuse(path)?;
        return Err(Error::file(
            path,
            "a file, but not a .gguf one: give a GGUF file, or the model folder \
             (config.json, model.safetensors, tokenizer.json)",
        ));
    }
    if opts.quantized {
        return Err(Error::file(
            path,
            "quantized loading needs a .gguf file (safetensors weights load as f32)",
        ));
    }
    let (cfg, raw) = read_decoder_config(path)?;
    let store = load_decoder_params(path, &cfg, selector)?;
    let tok_file = path.join("tokenizer.json");
    if !tok_file.is_file() {
        return Err(Error::file(path, "no tokenizer.json in the model folder"));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_file)
        .map_err(|e| Error::file(&tok_file, format!("cannot read the tokenizer: {e}")))?;
    let tc_file = path.join("tokenizer_config.json");
    let tc = if tc_file.is_file() {
        crate::hub::config::read_config_value(&tc_file)?
    } else {
        serde_json::Value::Null
    };
    // transformers 5 keeps the template in chat_template.jinja; 4.x in
    // tokenizer_config.json (a string, or a list of named templates).
    let jinja = path.join("chat_template.jinja");
    let chat_template = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
    } else {
        match &tc["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(a) => a
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| a.first())
                .and_then(|t| t["template"].as_str().map(String::from)),
            _ => None,
        }
    };
    let bos_token = token_str(&tc["bos_token"]).unwrap_or_default();
    let eos_token = token_str(&tc["eos_token"]).unwrap_or_default();
    let gen = path.join("generation_config.json");
    let mut eos_ids = ids_of(&raw["eos_token_id"]);
    if gen.is_file() {
        for id in ids_of(&crate::hub::config::read_config_value(&gen)?["eos_token_id"]) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
    }
    if let Some(id) = tokenizer.token_to_id(&eos_token) {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let bos_id = ids_of(&raw["bos_token_id"]).first().copied();
    let pad_id = ids_of(&raw["pad_token_id"])
        .first()
        .copied()
        .or(eos_ids.first().copied())
        .unwrap_or(0);
    Ok(LmSource {
        path: path.to_path_buf(),
        cfg,
        raw_config: raw,
        store,
        tokenizer,
        bos_id,
        eos_ids,
        pad_id,
        chat_template,
        bos_token,
        eos_token,
        format: "safetensors",
    })
}

/// A llama GGUF's config (HF `config.json` from the metadata) and weights
/// under HF names: f32, or with `opts.quantized` the projections kept as the
/// file stores them (Q/K rows restored to HF order). Refuses a quantised
/// weight that `selector` would train.
pub fn gguf_params(
    g: &crate::hub::gguf::Gguf,
    selector: Selector,
    opts: LoadOpts,
) -> Result<(DecoderConfig, serde_json::Value, ParamStore)> {
    use crate::hub::gguf::llama;
    let path = g.path();
    let raw = llama::llama_config_from_gguf(g)?;
    let cfg = DecoderConfig::from_value(&raw, path)?;
    let quantize = |hf: &str| {
        opts.quantized
            && hf.starts_with("model.layers.")
            && QUANTIZED_LINEARS.iter().any(|s| hf.ends_with(s))
    };
    let mut store = ParamStore::new(selector.clone(), path.display().to_string());
    for (hf, _) in llama::llama_tensor_names(g) {
        if quantize(&hf) {
            if selector.is_trainable(&hf) {
                return Err(Error::file(
                    path,
                    format!(
                        "`{hf}` would train, but quantized weights are frozen: full fine-tuning \
                         needs base_dtype = \"f32\" (or train an [adapter] on the quantized base)"
                    ),
                ));
            }
            // Q/K rows back in HF order; whole rows move, nothing is requantised.
            store.insert_quantized(&hf, Arc::new(llama::llama_qtensor(g, &hf)?));
        } else {
            store.insert(&hf, llama::llama_tensor_f32(g, &hf)?)?;
        }
    }
    if matches!(&cfg, DecoderConfig::Llama(c) if c.tie_word_embeddings) {
        store.remove("lm_head.weight");
    }
    Ok((cfg, raw, store))
}

/// The projections a quantised load keeps quantised (`{path}.weight` suffixes).
const QUANTIZED_LINEARS: &[&str] = &[
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
];

fn load_lm_gguf(path: &std::path::Path, selector: Selector, opts: LoadOpts) -> Result<LmSource> {
    use crate::hub::gguf::{self, Gguf};
    let g = Gguf::open(path)?;
    let (cfg, raw, store) = gguf_params(&g, selector, opts)?;
    let t = gguf::tokenizer::tokenizer_from_gguf(&g)?;
    let tok_str = |id: Option<u32>| {
        id.and_then(|i| t.tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let mut eos_ids: Vec<u32> = t.eos_id.into_iter().collect();
    // ChatML templates end a turn with <|im_end|>: generation stops there too.
    if let Some(id) = t.tokenizer.token_to_id("<|im_end|>") {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    Ok(LmSource {
        path: path.to_path_buf(),
        cfg,
        raw_config: raw,
        store,
        bos_id: t.bos_id,
        pad_id: t.pad_id.or(t.eos_id).unwrap_or(0),
        bos_token: tok_str(t.bos_id),
        eos_token: tok_str(t.eos_id),
        eos_ids,
        chat_template: t.chat_template.clone(),
        tokenizer: t.tokenizer,
        format: "gguf",
    })
}

/// A decoder with an adapter folder on top: the adapter's parameters are in
/// `src.store` (LoRA / IA3, unmerged) or, for prompt tuning, `prompt` holds
/// the soft prompt `[P, C]` to put in front of every input.
pub struct AdaptedLm {
    pub src: LmSource,
    pub prompt: Option<Tensor>,
    pub adapter: crate::adapters::AdapterConfig,
}

/// The base of an adapter folder: `base` if given, else afinar's note
/// (`afinar_lm.json`), else PEFT's `base_model_name_or_path` (a path, or the
/// hub id of a fetched asset).
fn adapter_base(
    ad: &std::path::Path,
    raw: &serde_json::Value,
    base: Option<&std::path::Path>,
) -> Result<std::path::PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    let note = ad.join(crate::train::sft::LM_META);
    if note.is_file() {
        if let Some(p) = crate::hub::config::read_config_value(&note)?["base_model_path"].as_str() {
            return Ok(p.into());
        }
    }
    let named = raw["base_model_name_or_path"].as_str().unwrap_or_default();
    let p = std::path::PathBuf::from(named);
    if p.exists() {
        return Ok(p);
    }
    match crate::hub::assets::asset_for_hub_id(named) {
        Some(a) => crate::hub::assets::resolve_asset_path(a.name),
        None => Err(Error::file(
            ad.join(crate::adapters::peft::CONFIG_FILE),
            format!("the adapter's base model `{named}` is not a folder, file or fetched asset here: pass the base model"),
        )),
    }
}

/// Load the base model of adapter folder `ad` with the adapter applied.
pub fn load_lm_adapter(
    ad: &std::path::Path,
    base: Option<&std::path::Path>,
    opts: LoadOpts,
) -> Result<AdaptedLm> {
    use crate::adapters::{prompt_tuning, AdapterType};
    let (cfg, raw) = crate::adapters::peft::read_config(ad)?;
    match raw["task_type"].as_str() {
        Some("CAUSAL_LM") | None => {}
        Some(other) => {
            return Err(Error::file(
                ad.join(crate::adapters::peft::CONFIG_FILE),
                format!("task_type {other}: a decoder LM adapter must be CAUSAL_LM"),
            ))
        }
    }
    let base = adapter_base(ad, &raw, base)?;
    let mut src = load_lm_with(&base, Selector::none(), opts)?;
    let mut prompt = None;
    if cfg.kind == AdapterType::PromptTuning {
        let dim = src.cfg.hidden_size();
        if let Some(d) = cfg.token_dim.filter(|&d| d != dim) {
            return Err(Error::file(
                ad.join(crate::adapters::peft::CONFIG_FILE),
                format!(
                    "token_dim {d} but the base model's hidden size is {dim} (another base model?)"
                ),
            ));
        }
        let file = ad.join(crate::adapters::peft::WEIGHTS_FILE);
        let ckpt = Checkpoint::open(&file)?;
        let t = ckpt.load_f32(prompt_tuning::KEY)?;
        if t.dims() != [cfg.num_virtual_tokens, dim] {
            return Err(Error::Tensor {
                name: prompt_tuning::KEY.into(),
                msg: format!(
                    "shape {:?} in {}, expected [{}, {dim}] (num_virtual_tokens, the base's hidden size)",
                    t.dims(),
                    file.display(),
                    cfg.num_virtual_tokens
                ),
            });
        }
        if let Some(other) = ckpt.names().into_iter().find(|n| n != prompt_tuning::KEY) {
            return Err(Error::file(
                &file,
                format!("unexpected tensor `{other}` in a prompt-tuning adapter"),
            ));
        }
        src.store.insert(prompt_tuning::KEY, t)?;
        prompt = Some(
            src.store
                .get(prompt_tuning::KEY, &[cfg.num_virtual_tokens, dim])?
                .t,
        );
    } else {
        let linears = crate::adapters::linear_modules(&src.store);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        cfg.apply(&mut src.store, &linears, &["lm_head"], &mut rng)?;
        crate::adapters::peft::load_weights(&mut src.store, ad)?;
    }
    Ok(AdaptedLm {
        src,
        prompt,
        adapter: cfg,
    })
}
