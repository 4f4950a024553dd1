//! Export a Llama-family model to GGUF (F32, F16 or Q8_0 weights) so
//! llama.cpp and ollama users run a fine-tuned model: tensors under GGUF
//! names with the Q/K rows permuted back to llama.cpp's interleaved-RoPE
//! order, the `llama.*` hyper-parameters, and the byte-level BPE tokenizer
//! (vocab, merges, token types, special ids, chat template) as
//! `tokenizer.ggml.*`. Follows llama.cpp's `convert_hf_to_gguf.py` layout.

use crate::hub::gguf::llama::{gguf_name, permute_qk};
use crate::hub::gguf::quant::GgmlType;
use crate::hub::gguf::tokenizer::token_type;
use crate::hub::gguf::writer::{str_array, GgufWriter};
use crate::hub::gguf::GgufValue;
use crate::models::llama::LlamaConfig;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// What the exported weights are stored as (norms stay F32, as llama.cpp does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    Q8_0,
}

impl std::str::FromStr for ExportType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ExportType::F32),
            "f16" => Ok(ExportType::F16),
            "q8_0" => Ok(ExportType::Q8_0),
            other => Err(Error::msg(format!(
                "GGUF type `{other}` is not supported for export (f32, f16, q8_0)"
            ))),
        }
    }
}

impl ExportType {
    fn ggml(self) -> GgmlType {
        match self {
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::Q8_0 => GgmlType::Q8_0,
        }
    }
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q8_0 => 7,
        }
    }
}

/// The tokenizer as GGUF wants it, read from its tokenizer.json form.
struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
}

fn vocab_of(tok: &tokenizers::Tokenizer) -> Result<GgufVocab> {
    let json: serde_json::Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| Error::msg(format!("serialising the tokenizer: {e}")))?,
    )
    .map_err(|e| Error::msg(e.to_string()))?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(Error::msg(format!(
            "GGUF export: tokenizer model {} is not supported (byte-level BPE)",
            model["type"]
        )));
    }
    let size = tok.get_vocab_size(true);
    let mut tokens = vec![String::new(); size];
    let mut types = vec![token_type::NORMAL as i32; size];
    for (t, id) in tok.get_vocab(true) {
        if (id as usize) < size {
            tokens[id as usize] = t;
        }
    }
    for (id, added) in tok.get_added_tokens_decoder() {
        if (id as usize) < size {
            types[id as usize] = if added.special {
                token_type::CONTROL as i32
            } else {
                token_type::USER_DEFINED as i32
            };
        }
    }
    for (i, t) in tokens.iter_mut().enumerate() {
        if t.is_empty() {
            *t = format!("[PAD{i}]");
            types[i] = token_type::UNUSED as i32;
        }
    }
    let merges = model["merges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => {
                        Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(GgufVocab {
        tokens,
        types,
        merges,
    })
}

/// Special ids and the chat template of the exported tokenizer.
pub struct TokenizerMeta<'a> {
    pub tokenizer: &'a tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<&'a str>,
    /// `tokenizer.ggml.pre` (e.g. "smollm"; "gpt2" when unknown).
    pub pre: &'a str,
}

/// Write `tensors` (HF names, f32, afinar's [out, in] layout) of a Llama
/// model as a GGUF file at `path` (atomically).
pub fn write_llama_gguf(
    path: &Path,
    name: &str,
    cfg: &LlamaConfig,
    tensors: &BTreeMap<String, Tensor>,
    tok: &TokenizerMeta,
    ty: ExportType,
) -> Result<()> {
    let mut w = GgufWriter::new();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()))?;
    w.add_metadata("general.name", GgufValue::String(name.into()))?;
    w.add_metadata("general.file_type", GgufValue::U32(ty.file_type()))?;
    w.add_metadata("llama.context_length", u32v(cfg.max_position_embeddings))?;
    w.add_metadata("llama.embedding_length", u32v(cfg.hidden_size))?;
    w.add_metadata("llama.block_count", u32v(cfg.num_hidden_layers))?;
    w.add_metadata("llama.feed_forward_length", u32v(cfg.intermediate_size))?;
    w.add_metadata("llama.attention.head_count", u32v(cfg.num_attention_heads))?;
    w.add_metadata("llama.attention.head_count_kv", u32v(cfg.kv_heads()))?;
    w.add_metadata(
        "llama.attention.layer_norm_rms_epsilon",
        GgufValue::F32(cfg.rms_norm_eps as f32),
    )?;
    w.add_metadata("llama.rope.freq_base", GgufValue::F32(cfg.theta() as f32))?;
    w.add_metadata("llama.rope.dimension_count", u32v(cfg.head_dim()))?;
    w.add_metadata("llama.vocab_size", u32v(cfg.vocab_size))?;

    let v = vocab_of(tok.tokenizer)?;
    w.add_metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))?;
    w.add_metadata("tokenizer.ggml.pre", GgufValue::String(tok.pre.into()))?;
    w.add_metadata("tokenizer.ggml.tokens", str_array(&v.tokens))?;
    w.add_metadata(
        "tokenizer.ggml.token_type",
        GgufValue::Array(
            crate::hub::gguf::GgufValueType::I32,
            v.types.iter().map(|&t| GgufValue::I32(t)).collect(),
        ),
    )?;
    w.add_metadata("tokenizer.ggml.merges", str_array(&v.merges))?;
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos_id),
        ("tokenizer.ggml.eos_token_id", tok.eos_id),
        ("tokenizer.ggml.padding_token_id", tok.pad_id),
    ] {
        if let Some(id) = id {
            w.add_metadata(key, GgufValue::U32(id))?;
        }
    }
    w.add_metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))?;
    if let Some(t) = tok.chat_template {
        w.add_metadata("tokenizer.chat_template", GgufValue::String(t.into()))?;
    }

    for (hf, t) in tensors {
        if cfg.tie_word_embeddings && hf == "lm_head.weight" {
            continue;
        }
        let g = gguf_name(hf).ok_or_else(|| Error::Tensor {
            name: hf.clone(),
            msg: "has no GGUF (llama) name".into(),
        })?;
        let t = if hf.ends_with("self_attn.q_proj.weight") {
            permute_qk(t, cfg.num_attention_heads)?
        } else if hf.ends_with("self_attn.k_proj.weight") {
            permute_qk(t, cfg.kv_heads())?
        } else {
            t.clone()
        };
        let shape = t.dims().to_vec();
        let vals = t.flatten_all()?.to_vec1::<f32>()?;
        let tty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            ty.ggml()
        };
        w.add_f32(g, tty, &shape, &vals)?;
    }
    w.write(path)
}
