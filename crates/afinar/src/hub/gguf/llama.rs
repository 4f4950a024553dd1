//! The llama architecture in GGUF: tensor names to and from Hugging Face's,
//! `config.json` from the `llama.*` metadata, and the Q/K row permutation.
//!
//! Names follow llama.cpp's `convert_hf_to_gguf.py` / gguf-py `tensor_mapping.py`
//! (<https://github.com/ggml-org/llama.cpp/blob/b4600/gguf-py/gguf/tensor_mapping.py>).
//!
//! ## The Q/K permutation
//!
//! Hugging Face's llama applies RoPE with `rotate_half`: within a head of
//! `d = head_dim` rows, row `j` pairs with row `j + d/2`. ggml's RoPE rotates
//! adjacent pairs `(2j, 2j + 1)`. So the converter (`LlamaModel.permute`)
//! reorders the rows of `attn_q` (with `n_head`) and `attn_k` (with
//! `n_head_kv`): reshape `[n_head, 2, d/2, in]`, swap axes 1 and 2. Per head `h`,
//! for `i` in {0, 1} and `j` in `0..d/2`:
//!
//! ```text
//! gguf row  h*d + 2*j + i   =   hf row  h*d + i*d/2 + j
//! ```
//!
//! [`unpermute_qk`] undoes it (GGUF -> HF), [`permute_qk`] does it (HF -> GGUF,
//! for export). Rows move whole, so quantised rows are not requantised.

use super::quant::QTensor;
use super::{Gguf, GgufError, GgufResult};
use candle_core::Tensor;
use serde_json::json;

/// Architectures [`llama_config_from_gguf`] reads.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The Hugging Face name of a llama GGUF tensor (`blk.3.attn_q.weight` ->
/// `model.layers.3.self_attn.q_proj.weight`); None for names it does not know
/// (`rope_freqs.weight`, for instance).
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The inverse of [`hf_name`].
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

fn check_arch(g: &Gguf) -> GgufResult<()> {
    let arch = g.architecture()?;
    if !SUPPORTED_ARCHITECTURES.contains(&arch) {
        return Err(GgufError::UnsupportedArchitecture {
            path: g.path().to_path_buf(),
            found: arch.to_string(),
            supported: SUPPORTED_ARCHITECTURES.join(", "),
        });
    }
    Ok(())
}

/// An f32 metadata value as the shortest decimal that reads back as the same
/// f32 (`1e-5`, not `9.999999747378752e-06`), as transformers writes it.
fn f32_json(v: f32) -> serde_json::Value {
    let f: f64 = format!("{v}").parse().unwrap_or(v as f64);
    json!(f)
}

/// A Hugging Face `LlamaConfig` (`config.json`) from the `llama.*` metadata.
pub fn llama_config_from_gguf(g: &Gguf) -> GgufResult<serde_json::Value> {
    check_arch(g)?;
    let hidden = g.get_u32("llama.embedding_length")?;
    let heads = g.get_u32("llama.attention.head_count")?;
    let kv_heads = g.opt_u32("llama.attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0
        || !hidden.is_multiple_of(heads)
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
    {
        return Err(GgufError::Invalid {
            path: g.path().to_path_buf(),
            msg: format!(
                "llama: embedding_length {hidden}, head_count {heads}, head_count_kv {kv_heads} do not divide"
            ),
        });
    }
    let head_dim = g
        .opt_u32("llama.attention.key_length")?
        .unwrap_or(hidden / heads);
    let vocab = match g.opt_u32("llama.vocab_size")? {
        Some(v) => v as usize,
        None => match g.tensor_info("token_embd.weight") {
            Some(t) => t.shape()[0],
            None => g.get_array("tokenizer.ggml.tokens")?.len(),
        },
    };
    let mut cfg = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.get_u32("llama.feed_forward_length")?,
        "num_hidden_layers": g.get_u32("llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": f32_json(g.get_f32("llama.attention.layer_norm_rms_epsilon")?),
        "rope_theta": f32_json(g.opt_f32("llama.rope.freq_base")?.unwrap_or(10000.0)),
        "max_position_embeddings": g.get_u32("llama.context_length")?,
        "tie_word_embeddings": !g.has_tensor("output.weight"),
        "attention_bias": false,
        "mlp_bias": false,
        "rope_scaling": null,
        "torch_dtype": "float32",
    });
    let obj = cfg.as_object_mut().expect("an object");
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = g.opt_u32(key)? {
            obj.insert(field.into(), json!(id));
        }
    }
    if let Some(kind) = g.opt_str("llama.rope.scaling.type")? {
        if kind != "none" {
            let factor = g.get_f32("llama.rope.scaling.factor")?;
            obj.insert(
                "rope_scaling".into(),
                json!({"type": kind, "rope_type": kind, "factor": f32_json(factor)}),
            );
        }
    }
    Ok(cfg)
}

/// `perm[hf_row] = gguf_row` for a `rows x _` Q or K weight of `n_head` heads.
pub fn qk_permutation(rows: usize, n_head: usize) -> crate::Result<Vec<usize>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(crate::Error::msg(format!(
            "Q/K permutation: {rows} rows are not {n_head} heads of an even size"
        )));
    }
    let d = rows / n_head;
    let half = d / 2;
    let mut perm = vec![0; rows];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                perm[h * d + i * half + j] = h * d + 2 * j + i;
            }
        }
    }
    Ok(perm)
}

/// The inverse permutation.
fn invert(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// GGUF row order -> HF row order of an f32 Q/K weight `[rows, cols]`.
pub fn unpermute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("unpermute_qk: {rows} rows are not {n_head} heads of an even size");
    }
    // [n_head, d/2, 2, cols] -> [n_head, 2, d/2, cols]
    w.reshape((n_head, rows / n_head / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// HF row order -> GGUF row order (llama.cpp's `permute`), for export.
pub fn permute_qk(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("permute_qk: {rows} rows are not {n_head} heads of an even size");
    }
    // [n_head, 2, d/2, cols] -> [n_head, d/2, 2, cols]
    w.reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// [`unpermute_qk`] for a quantised weight: whole rows move, no requantisation.
pub fn unpermute_qk_q(w: &QTensor, n_head: usize) -> crate::Result<QTensor> {
    w.permute_rows(&qk_permutation(w.rows(), n_head)?)
}

/// [`permute_qk`] for a quantised weight.
pub fn permute_qk_q(w: &QTensor, n_head: usize) -> crate::Result<QTensor> {
    w.permute_rows(&invert(&qk_permutation(w.rows(), n_head)?))
}

/// The heads a Q or K weight is permuted with, from its HF name (None for others).
fn qk_heads(g: &Gguf, hf: &str) -> GgufResult<Option<usize>> {
    if hf.ends_with("self_attn.q_proj.weight") {
        return Ok(Some(g.get_u32("llama.attention.head_count")? as usize));
    }
    if hf.ends_with("self_attn.k_proj.weight") {
        let heads = g.get_u32("llama.attention.head_count")?;
        return Ok(Some(
            g.opt_u32("llama.attention.head_count_kv")?.unwrap_or(heads) as usize,
        ));
    }
    Ok(None)
}

fn tensor_err(g: &Gguf, name: &str, e: impl std::fmt::Display) -> GgufError {
    GgufError::Tensor {
        path: g.path().to_path_buf(),
        tensor: name.to_string(),
        msg: e.to_string(),
    }
}

fn gguf_name_or_err(g: &Gguf, hf: &str) -> GgufResult<String> {
    gguf_name(hf).ok_or_else(|| tensor_err(g, hf, "not a llama tensor name"))
}

/// A llama weight by its Hugging Face name, kept quantised, Q/K rows restored
/// to HF order. Embeddings and norms come as they are (`[rows, cols]` / `[1, n]`).
pub fn llama_qtensor(g: &Gguf, hf: &str) -> GgufResult<QTensor> {
    check_arch(g)?;
    let name = gguf_name_or_err(g, hf)?;
    let q = g.qtensor(&name)?;
    match qk_heads(g, hf)? {
        Some(n) => unpermute_qk_q(&q, n).map_err(|e| tensor_err(g, &name, e)),
        None => Ok(q),
    }
}

/// A llama weight by its Hugging Face name, dequantised, in HF shape and row order.
pub fn llama_tensor_f32(g: &Gguf, hf: &str) -> GgufResult<Tensor> {
    check_arch(g)?;
    let name = gguf_name_or_err(g, hf)?;
    let t = g.tensor_f32(&name)?;
    match qk_heads(g, hf)? {
        Some(n) => unpermute_qk(&t, n).map_err(|e| tensor_err(g, &name, e)),
        None => Ok(t),
    }
}

/// (HF name, GGUF name) of every tensor in the file that has an HF name.
pub fn llama_tensor_names(g: &Gguf) -> Vec<(String, String)> {
    g.tensor_infos()
        .iter()
        .filter_map(|t| hf_name(&t.name).map(|h| (h, t.name.clone())))
        .collect()
}
