//! One way out: what a run writes for other tools, for every family and
//! objective. HF model folders (`config.json` with the transformers class,
//! `model.safetensors`, the tokenizer files) that transformers'
//! `AutoModelFor*` loads; PEFT adapter folders that
//! `PeftModel.from_pretrained` loads; GGUF files for llama.cpp (`gguf.rs`).
//! Every folder is assembled under a temporary name and swapped in whole.

pub mod gguf;

pub use crate::fsutil::write_dir_atomic;
pub use crate::hub::checkpoint::write_safetensors;

use crate::adapters::{peft, AdapterConfig, PeftTask};
use crate::heads::{HeadConfig, TaskKind};
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{gpt2, Family};
use crate::params::ParamStore;
use crate::{fsutil, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Every weight of `store` as a plain f32 checkpoint: adapters merged in
/// (LoRA, DoRA, IA3 folded into the base weights), weights kept quantised
/// dequantised, a bf16 base back in f32.
pub fn model_tensors(store: &ParamStore) -> Result<BTreeMap<String, Tensor>> {
    if store.adapters.is_empty() {
        store.f32_state()
    } else {
        crate::adapters::merged_state(store)
    }
}

/// transformers' class name stem of a `config.json`'s `model_type`.
fn arch_stem(base: &Value, family: Family) -> &'static str {
    match (family, base["model_type"].as_str()) {
        (Family::Bert, _) => "Bert",
        (Family::Gpt2, _) => "GPT2",
        (Family::Llama, Some("mistral")) => "Mistral",
        (Family::Llama, Some("qwen2")) => "Qwen2",
        (Family::Llama, _) => "Llama",
    }
}

/// The `config.json` of a sequence classifier / regressor: the base config
/// with the family's `*ForSequenceClassification` class, `id2label` /
/// `label2id`, `problem_type`, the pad id a decoder's head skips
/// (transformers refuses batches without one), and afinar's own head
/// settings under `afinar`.
pub fn seq_cls_config(
    base: &Value,
    family: Family,
    labels: Option<&[String]>,
    head: &HeadConfig,
    pad_id: u32,
    max_length: usize,
) -> Value {
    let mut c = base.clone();
    c["architectures"] = json!([format!(
        "{}ForSequenceClassification",
        arch_stem(base, family)
    )]);
    match (head.task, labels) {
        (TaskKind::Classification, Some(l)) => {
            let id2label: serde_json::Map<String, Value> = l
                .iter()
                .enumerate()
                .map(|(i, s)| (i.to_string(), json!(s)))
                .collect();
            let label2id: serde_json::Map<String, Value> = l
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), json!(i)))
                .collect();
            c["id2label"] = Value::Object(id2label);
            c["label2id"] = Value::Object(label2id);
            c["problem_type"] = json!("single_label_classification");
        }
        (TaskKind::Scalar, _) => {
            // A reward model's score (TRL's RewardTrainer): one output, no
            // problem type of its own.
            c["id2label"] = json!({"0": "LABEL_0"});
            c["label2id"] = json!({"LABEL_0": 0});
        }
        _ => {
            c["id2label"] = json!({"0": "LABEL_0"});
            c["label2id"] = json!({"LABEL_0": 0});
            c["problem_type"] = json!("regression");
        }
    }
    if family == Family::Bert {
        // f32 -> f64 would print 0.10000000149011612.
        c["classifier_dropout"] = json!((head.dropout as f64 * 1e6).round() / 1e6);
    } else {
        c["pad_token_id"] = json!(pad_id);
        c["torch_dtype"] = json!("float32");
    }
    c["afinar"] = json!({ "pooling": head.pooling, "task": head.task, "max_length": max_length });
    c
}

/// The `config.json` of a causal LM: the base config, its class named when
/// it names none, f32 weights.
pub fn causal_lm_config(base: &Value, family: Family) -> Value {
    let mut c = base.clone();
    if c.get("architectures").is_none() {
        c["architectures"] = json!([match family {
            Family::Gpt2 => "GPT2LMHeadModel".to_string(),
            _ => format!("{}ForCausalLM", arch_stem(base, family)),
        }]);
    }
    c["torch_dtype"] = json!("float32");
    c
}

/// Write an HF model folder `dir` (replaced whole): `config.json`,
/// `model.safetensors` (GPT-2's `Conv1D` weights back to `[in, out]`) and
/// the tokenizer's files.
pub fn write_model_folder(
    dir: &Path,
    tensors: BTreeMap<String, Tensor>,
    config: &Value,
    family: Family,
    tok: &TextTokenizer,
) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            if family == Family::Gpt2 && gpt2::is_conv1d(&n) {
                Ok((n, t.t()?.contiguous()?))
            } else {
                Ok((n, t))
            }
        })
        .collect::<Result<_>>()?;
    write_dir_atomic(dir, |tmp| {
        fsutil::write_json(&tmp.join(crate::hub::config::CONFIG_FILE), config)?;
        write_safetensors(&tmp.join("model.safetensors"), tensors.into_iter())?;
        tok.save(tmp)
    })
}

/// Write a PEFT adapter folder `dir` (replaced whole):
/// `adapter_config.json` and `adapter_model.safetensors` as PEFT writes
/// them (the trainable parameters of `store`: the adapter and
/// `modules_to_save`), and afinar's note `note_file` with what PEFT's files
/// do not say.
pub fn write_adapter_folder(
    dir: &Path,
    store: &ParamStore,
    cfg: &AdapterConfig,
    base: &Path,
    task: PeftTask,
    note_file: &str,
    note: &Value,
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        peft::save(tmp, store, cfg, &base.display().to_string(), task.as_str())?;
        fsutil::write_json(&tmp.join(note_file), note)
    })
}
