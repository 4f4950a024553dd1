//! One way in: a model folder (safetensors, sharded or not, `config.json`,
//! tokenizer files) or a GGUF file becomes a [`LoadedModel`] — the family's
//! config, every tensor under its transformers task-model name in a
//! [`ParamStore`], and the tokenizer — for every family and every objective.
//!
//! Checkpoint layout quirks are fixed here, once: a bare `BertModel`'s keys
//! get the `bert.` prefix; GPT-2's `Conv1D` weights are transposed to
//! `[out, in]` (and a bare `GPT2Model` gets `transformer.`); a tied LM head
//! saved twice is dropped; a GGUF's names become HF names with llama.cpp's
//! Q/K row permutation undone (`hub/gguf/llama.rs`).

use super::{gpt2, ModelConfig};
use crate::hub::checkpoint::Checkpoint;
use crate::hub::tokenizer::TextTokenizer;
use crate::params::{ParamStore, Selector};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a model source was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    /// An HF folder: `config.json`, `model.safetensors` (or shards), tokenizer files.
    Safetensors,
    /// One `.gguf` file (llama.cpp): weights, config and tokenizer in its metadata.
    Gguf,
}

impl SourceFormat {
    /// The format a name says: a `.gguf` file, else a model folder.
    pub fn of_name(path: &Path) -> SourceFormat {
        if path.extension().is_some_and(|e| e == "gguf") {
            SourceFormat::Gguf
        } else {
            SourceFormat::Safetensors
        }
    }

    /// What `path` holds, told without reading any weight: a `.gguf` name
    /// or a file starting with the GGUF magic is GGUF, a folder is a
    /// safetensors model. None for a path that is not there (unless its
    /// name ends in `.gguf`) and for any other file (the loader refuses it).
    pub fn detect(path: &Path) -> Option<SourceFormat> {
        if is_gguf(path) {
            Some(SourceFormat::Gguf)
        } else if path.is_dir() {
            Some(SourceFormat::Safetensors)
        } else if !path.exists() && SourceFormat::of_name(path) == SourceFormat::Gguf {
            Some(SourceFormat::Gguf)
        } else {
            None
        }
    }

    /// How a source of this format is described in an error.
    pub fn what(self) -> &'static str {
        match self {
            SourceFormat::Safetensors => "a safetensors model folder",
            SourceFormat::Gguf => "a GGUF file",
        }
    }
}

/// The name as written in `model.format`.
impl std::fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceFormat::Safetensors => "safetensors",
            SourceFormat::Gguf => "gguf",
        })
    }
}

/// How [`load_model`] reads the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOpts {
    /// GGUF only: keep the linear layers' weights (q/k/v/o, gate/up/down
    /// projections) in the file's own types (Q4_0, Q4_1, Q8_0, F16, ...),
    /// frozen and dequantised per matmul; embeddings, norms and an untied
    /// LM head are still dequantised to f32. For adapter training
    /// (QLoRA-style) and inference: the selector must train none of them.
    pub quantized: bool,
    /// Truncation of sequence-task inputs (default: the model's positions).
    pub max_length: Option<usize>,
}

/// A model ready to build: config, weights and tokenizer.
pub struct LoadedModel {
    /// The folder or `.gguf` file.
    pub path: PathBuf,
    pub format: SourceFormat,
    pub cfg: ModelConfig,
    /// `config.json` (for a GGUF file: the HF config its metadata describes).
    pub raw_config: serde_json::Value,
    pub store: ParamStore,
    pub tokenizer: TextTokenizer,
}

/// Whether `path` is read as a GGUF file (a `.gguf` name or the `GGUF` magic).
pub fn is_gguf(path: &Path) -> bool {
    crate::hub::inspect::is_gguf_file(path)
}

/// A model is a folder or a GGUF file: any other file is refused (a
/// PyTorch pickle as such, never unpickled).
fn refuse_other_files(path: &Path) -> Result<()> {
    if path.is_file() {
        crate::hub::pickle::refuse(path)?;
        return Err(Error::file(
            path,
            "is a file: a model is a folder (config.json, model.safetensors, \
             tokenizer files) or a .gguf file",
        ));
    }
    Ok(())
}

/// Read and validate the `config.json` of a model folder.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, serde_json::Value)> {
    if !dir.exists() {
        return Err(Error::file(dir, "model folder does not exist"));
    }
    let file = dir.join(crate::hub::config::CONFIG_FILE);
    let raw = crate::hub::config::read_config_value(&file)?;
    Ok((ModelConfig::from_value(&raw, &file)?, raw))
}

/// The config of a model folder or GGUF file, without loading its weights
/// (what a selector needs before the load).
pub fn peek_config(path: &Path) -> Result<(ModelConfig, serde_json::Value)> {
    if is_gguf(path) {
        let g = crate::hub::gguf::Gguf::open(path)?;
        let raw = crate::hub::gguf::llama::llama_config_from_gguf(&g)?;
        return Ok((ModelConfig::from_value(&raw, path)?, raw));
    }
    refuse_other_files(path)?;
    read_config(path)
}

/// Load a model folder or GGUF file: config, weights (trainable as
/// `selector` says) and tokenizer.
pub fn load_model(path: &Path, selector: Selector, opts: LoadOpts) -> Result<LoadedModel> {
    if is_gguf(path) {
        return load_gguf(path, selector, opts);
    }
    refuse_other_files(path)?;
    if opts.quantized {
        return Err(Error::file(
            path,
            "quantized loading needs a .gguf file (safetensors weights load as f32)",
        ));
    }
    let (cfg, raw) = read_config(path)?;
    let store = load_params(path, &cfg, selector)?;
    let max_length = opts
        .max_length
        .unwrap_or(cfg.max_positions())
        .min(cfg.max_positions());
    let mut tokenizer = TextTokenizer::from_dir(path, max_length)?;
    if cfg.family().is_decoder() {
        tokenizer.read_lm_specials(path, &raw)?;
    }
    Ok(LoadedModel {
        path: path.to_path_buf(),
        format: SourceFormat::Safetensors,
        cfg,
        raw_config: raw,
        store,
        tokenizer,
    })
}

/// Buffers some checkpoints carry that are not parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("position_ids")
        || name.ends_with("rotary_emb.inv_freq")
        || name.ends_with("attn.bias")
            && name.starts_with("transformer.h.")
            && !name.contains("c_attn")
        || name.ends_with("attn.bias") && name.starts_with("h.") && !name.contains("c_attn")
        || name.ends_with("attn.masked_bias")
}

/// Every tensor of a checkpoint folder under the family's task-model names.
pub fn load_params(dir: &Path, cfg: &ModelConfig, selector: Selector) -> Result<ParamStore> {
    let ckpt = Checkpoint::open(dir)?;
    let names = ckpt.names();
    let mut store = ParamStore::new(selector, ckpt.path().display().to_string());
    let family = cfg.family();
    let prefix = format!("{}.", family.prefix());
    // A bare body checkpoint (BertModel, GPT2Model) has no body prefix.
    let bare = match family {
        super::Family::Bert => !names.iter().any(|n| n.starts_with(&prefix)),
        super::Family::Gpt2 => !names.iter().any(|n| n.starts_with(&prefix)),
        super::Family::Llama => false,
    };
    // Keys that stay as they are in a bare checkpoint: heads beside the body.
    let own_key = |n: &str| match family {
        super::Family::Bert => n.starts_with("cls."),
        _ => n == "lm_head.weight" || n.starts_with("score."),
    };
    for name in &names {
        if is_buffer(name) {
            continue;
        }
        let key = if bare && !own_key(name) {
            format!("{prefix}{name}")
        } else {
            name.clone()
        };
        let t = ckpt.load_f32(name)?;
        let t = if family == super::Family::Gpt2 && gpt2::is_conv1d(&key) {
            t.t()?.contiguous()?
        } else {
            t
        };
        store.insert(&key, t)?;
    }
    // A tied head saved twice (some exports do): the model uses the embedding.
    if cfg.tied_lm_head() && store.contains("lm_head.weight") {
        store.remove("lm_head.weight");
    }
    Ok(store)
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

/// A llama GGUF's config (HF `config.json` from the metadata) and weights
/// under HF names: f32, or with `opts.quantized` the projections kept as the
/// file stores them (Q/K rows restored to HF order). Refuses a quantised
/// weight that `selector` would train.
pub fn gguf_params(
    g: &crate::hub::gguf::Gguf,
    selector: Selector,
    opts: LoadOpts,
) -> Result<(ModelConfig, serde_json::Value, ParamStore)> {
    use crate::hub::gguf::llama;
    let path = g.path();
    let raw = llama::llama_config_from_gguf(g)?;
    let cfg = ModelConfig::from_value(&raw, path)?;
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
    if cfg.tied_lm_head() {
        store.remove("lm_head.weight");
    }
    Ok((cfg, raw, store))
}

fn load_gguf(path: &Path, selector: Selector, opts: LoadOpts) -> Result<LoadedModel> {
    use crate::hub::gguf::{self, Gguf};
    let g = Gguf::open(path)?;
    let (cfg, raw, store) = gguf_params(&g, selector, opts)?;
    let max_length = opts
        .max_length
        .unwrap_or(cfg.max_positions())
        .min(cfg.max_positions());
    let tokenizer = gguf::tokenizer::tokenizer_from_gguf(&g)?.text_tokenizer(path, max_length)?;
    Ok(LoadedModel {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        cfg,
        raw_config: raw,
        store,
        tokenizer,
    })
}

/// A base model with an adapter folder on top: the adapter's parameters are
/// in `model.store` (LoRA / IA3, unmerged) or, for prompt tuning, `prompt`
/// holds the soft prompt `[P, C]` to put in front of every input.
pub struct AdaptedModel {
    pub model: LoadedModel,
    pub prompt: Option<candle_core::Tensor>,
    pub adapter: crate::adapters::AdapterConfig,
}

/// The base of an adapter folder: `base` if given, else afinar's note
/// (`afinar_lm.json` / `afinar_head.json`), else PEFT's
/// `base_model_name_or_path` (a path, or the hub id of a fetched asset).
pub fn adapter_base(ad: &Path, raw: &serde_json::Value, base: Option<&Path>) -> Result<PathBuf> {
    use crate::adapters::peft;
    if let Some(b) = base {
        return Ok(b.to_path_buf());
    }
    for (note, key) in [
        (peft::LM_META, "base_model_path"),
        (peft::HEAD_META, "base_model_dir"),
    ] {
        let note = ad.join(note);
        if note.is_file() {
            if let Some(p) = crate::hub::config::read_config_value(&note)?[key].as_str() {
                return Ok(p.into());
            }
        }
    }
    let named = raw["base_model_name_or_path"].as_str().unwrap_or_default();
    let p = PathBuf::from(named);
    if p.exists() {
        return Ok(p);
    }
    match crate::hub::assets::asset_for_hub_id(named) {
        Some(a) => crate::hub::assets::resolve_asset_path(a.name),
        None => Err(Error::file(
            ad.join(peft::CONFIG_FILE),
            format!("the adapter's base model `{named}` is not a folder, file or fetched asset here: pass the base model"),
        )),
    }
}

/// Load the base model of the causal-LM adapter folder `ad` with the
/// adapter applied (unmerged).
pub fn load_lm_adapter(ad: &Path, base: Option<&Path>, opts: LoadOpts) -> Result<AdaptedModel> {
    use crate::adapters::{peft, prompt_tuning, AdapterConfig};
    let (cfg, raw) = peft::read_config(ad)?;
    match raw["task_type"].as_str() {
        Some("CAUSAL_LM") | None => {}
        Some(other) => {
            return Err(Error::file(
                ad.join(peft::CONFIG_FILE),
                format!("task_type {other}: a decoder LM adapter must be CAUSAL_LM"),
            ))
        }
    }
    let base = adapter_base(ad, &raw, base)?;
    let mut model = load_model(&base, Selector::none(), opts)?;
    let mut prompt = None;
    if let AdapterConfig::PromptTuning(pt) = &cfg {
        let dim = model.cfg.hidden_size();
        let n = pt.num_virtual_tokens;
        if let Some(d) = pt.token_dim.filter(|&d| d != dim) {
            return Err(Error::file(
                ad.join(peft::CONFIG_FILE),
                format!(
                    "token_dim {d} but the base model's hidden size is {dim} (another base model?)"
                ),
            ));
        }
        let file = ad.join(peft::WEIGHTS_FILE);
        let ckpt = Checkpoint::open(&file)?;
        let t = ckpt.load_f32(prompt_tuning::KEY)?;
        if t.dims() != [n, dim] {
            return Err(Error::Tensor {
                name: prompt_tuning::KEY.into(),
                msg: format!(
                    "shape {:?} in {}, expected [{n}, {dim}] (num_virtual_tokens, the base's hidden size)",
                    t.dims(),
                    file.display(),
                ),
            });
        }
        if let Some(other) = ckpt.names().into_iter().find(|n| n != prompt_tuning::KEY) {
            return Err(Error::file(
                &file,
                format!("unexpected tensor `{other}` in a prompt-tuning adapter"),
            ));
        }
        model.store.insert(prompt_tuning::KEY, t)?;
        prompt = Some(model.store.get(prompt_tuning::KEY, &[n, dim])?.t);
    } else {
        let linears = crate::adapters::linear_modules(&model.store);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        cfg.apply(&mut model.store, &linears, &["lm_head"], &mut rng)?;
        peft::load_weights(&mut model.store, ad)?;
    }
    Ok(AdaptedModel {
        model,
        prompt,
        adapter: cfg,
    })
}
