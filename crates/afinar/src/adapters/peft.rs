//! PEFT's adapter files, read and written as PEFT 0.21 does:
//! `adapter_config.json` (sorted keys) and `adapter_model.safetensors`
//! (`{"format": "pt"}` metadata; keys `base_model.model.<module path>.lora_A.weight`
//! `[r, in]`, `.lora_B.weight` `[out, r]`, `.lora_magnitude_vector` `[out]`,
//! `.ia3_l` `[out, 1]` or `[1, in]` for feed-forward modules, and the
//! `modules_to_save` under their own path, e.g. `base_model.model.classifier.weight`;
//! a soft prompt is `prompt_embeddings`). Every PEFT file name, key prefix
//! and parameter name is here, and only here.

use super::config::{
    AdapterConfig, AdapterType, Ia3Config, InitLoraWeights, LoraConfig, Patterns,
    PromptTuningConfig, PromptTuningInit, Targeting, Targets,
};
use crate::hub::checkpoint::Checkpoint;
use crate::params::ParamStore;
use crate::{fsutil, Error, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// afinar's note beside a sequence-head adapter: what PEFT's files do not
/// say (the base folder, the labels, the head settings, the truncation).
pub const HEAD_META: &str = "afinar_head.json";
/// afinar's note beside a causal-LM adapter: where its base is.
pub const LM_META: &str = "afinar_lm.json";
/// The prefix of every module's key in `adapter_model.safetensors`.
pub const PREFIX: &str = "base_model.model.";
/// LoRA's down projection `[r, in]`, under the module's path.
pub const LORA_A: &str = "lora_A.weight";
/// LoRA's up projection `[out, r]`.
pub const LORA_B: &str = "lora_B.weight";
/// DoRA's magnitude `[out]`.
pub const LORA_MAGNITUDE: &str = "lora_magnitude_vector";
/// IA3's scaling vector.
pub const IA3_L: &str = "ia3_l";
/// Prompt tuning's soft prompt (a key of its own, without [`PREFIX`]).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Whether `name` is an adapter's own parameter (not a base weight).
pub fn is_adapter_tensor(name: &str) -> bool {
    name == PROMPT_EMBEDDINGS
        || [LORA_A, LORA_B, LORA_MAGNITUDE, IA3_L]
            .iter()
            .any(|s| name.ends_with(&format!(".{s}")))
}

/// Read `adapter_config.json` into afinar's adapter config (+ the raw JSON).
pub fn read_config(dir: &Path) -> Result<(AdapterConfig, Value)> {
    let file = dir.join(CONFIG_FILE);
    if !dir.is_dir() {
        return Err(Error::file(dir, "adapter folder does not exist"));
    }
    if !file.is_file() {
        return Err(Error::file(
            dir,
            format!("no {CONFIG_FILE}: not a PEFT adapter folder"),
        ));
    }
    if !dir.join(WEIGHTS_FILE).is_file() {
        return Err(Error::file(
            dir,
            format!("no {WEIGHTS_FILE}: the adapter has no weights"),
        ));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    config_from_json(&file, &text)
}

/// [`read_config`] on the text of an `adapter_config.json`; `file` names it in errors.
pub fn config_from_json(file: &Path, text: &str) -> Result<(AdapterConfig, Value)> {
    let raw: Value = serde_json::from_str(text).map_err(|e| Error::Config {
        path: file.to_path_buf(),
        msg: e.to_string(),
    })?;
    let err = |m: String| Error::file(file, m);
    let kind = match raw["peft_type"].as_str() {
        Some("LORA") => AdapterType::Lora,
        Some("IA3") => AdapterType::Ia3,
        Some("PROMPT_TUNING") => AdapterType::PromptTuning,
        _ => {
            let found = match &raw["peft_type"] {
                Value::Null => "missing".to_string(),
                v => v.to_string(),
            };
            return Err(err(format!(
                "peft_type {found} is not supported (LORA, IA3, PROMPT_TUNING)"
            )));
        }
    };
    if kind == AdapterType::PromptTuning {
        return read_prompt_tuning(&raw, file).map(|c| (c, raw.clone()));
    }
    // Only bias = "none" is implemented: a PEFT adapter that trained biases
    // would load silently wrong.
    if let Some(b) = raw["bias"].as_str().filter(|b| *b != "none") {
        return Err(err(format!(
            "bias = \"{b}\" is not supported (only \"none\")"
        )));
    }
    if raw["lora_bias"].as_bool() == Some(true) {
        return Err(err("lora_bias = true is not supported".into()));
    }
    // fan_in_fan_out = true marks a GPT-2 Conv1D base (weights stored
    // [in, out]); PEFT's lora_A / lora_B / ia3_l shapes are the same as for
    // a Linear, and afinar holds every base weight as [out, in]: nothing to do.
    let strings = |k: &str| -> Vec<String> {
        match &raw[k] {
            Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => vec![],
        }
    };
    let target_modules = match &raw["target_modules"] {
        Value::String(s) => Targets::One(s.clone()),
        Value::Array(_) => Targets::List(strings("target_modules")),
        other => {
            return Err(err(format!(
                "target_modules {other} is neither a list nor a string"
            )))
        }
    };
    let layers_to_transform = match &raw["layers_to_transform"] {
        Value::Null => None,
        Value::Number(n) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as usize)
                .collect(),
        ),
        other => return Err(err(format!("layers_to_transform {other}"))),
    };
    let mut modules_to_save = strings("modules_to_save");
    modules_to_save.dedup();
    let targeting = Targeting {
        target_modules,
        exclude_modules: strings("exclude_modules"),
        layers_to_transform,
        modules_to_save,
        // A PEFT file names what PEFT matched; entries for other models
        // (PEFT adds `score` for SEQ_CLS) are not an error here.
        allow_unmatched: true,
        fan_in_fan_out: raw["fan_in_fan_out"].as_bool().unwrap_or(false),
        source: Some(file.to_path_buf()),
    };
    let cfg = match kind {
        AdapterType::Lora => {
            // The patterns in the order of the file (serde_json's Value sorts keys).
            #[derive(serde::Deserialize, Default)]
            struct Ordered {
                #[serde(default)]
                rank_pattern: Option<Patterns<usize>>,
                #[serde(default)]
                alpha_pattern: Option<Patterns<f64>>,
            }
            let ordered: Ordered = serde_json::from_str(text)
                .map_err(|e| err(format!("rank_pattern / alpha_pattern: {e}")))?;
            AdapterConfig::Lora(LoraConfig {
                targeting,
                r: raw["r"].as_u64().unwrap_or(8) as usize,
                lora_alpha: raw["lora_alpha"].as_f64().unwrap_or(8.0),
                lora_dropout: raw["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
                rank_pattern: ordered.rank_pattern.unwrap_or_default(),
                alpha_pattern: ordered.alpha_pattern.unwrap_or_default(),
                use_rslora: raw["use_rslora"].as_bool().unwrap_or(false),
                use_dora: raw["use_dora"].as_bool().unwrap_or(false),
                init_lora_weights: if raw["init_lora_weights"] == "gaussian" {
                    InitLoraWeights::Gaussian
                } else {
                    InitLoraWeights::Kaiming
                },
            })
        }
        _ => AdapterConfig::Ia3(Ia3Config {
            targeting,
            feedforward_modules: strings("feedforward_modules"),
        }),
    };
    cfg.validate().map_err(|e| err(e.to_string()))?;
    Ok((cfg, raw))
}

/// PEFT's PromptTuningConfig: the soft prompt is one tensor,
/// `prompt_embeddings` `[num_virtual_tokens, token_dim]`.
fn read_prompt_tuning(raw: &Value, file: &Path) -> Result<AdapterConfig> {
    let err = |m: String| Error::file(file, m);
    let n = raw["num_virtual_tokens"]
        .as_u64()
        .ok_or_else(|| err("PROMPT_TUNING without `num_virtual_tokens`".into()))?
        as usize;
    match raw["num_transformer_submodules"].as_u64() {
        None | Some(1) => {}
        Some(k) => {
            return Err(err(format!(
                "num_transformer_submodules = {k}: only decoder-only models (1) are supported"
            )))
        }
    }
    let init = raw["prompt_tuning_init"].as_str().unwrap_or("RANDOM");
    let prompt_tuning_init = match init.to_ascii_uppercase().as_str() {
        "RANDOM" => PromptTuningInit::Random,
        "SAMPLE_VOCAB" => PromptTuningInit::SampleVocab,
        "TEXT" => PromptTuningInit::Text,
        other => {
            return Err(err(format!(
                "prompt_tuning_init {other:?} is not supported (RANDOM, SAMPLE_VOCAB, TEXT)"
            )))
        }
    };
    let cfg = AdapterConfig::PromptTuning(PromptTuningConfig {
        num_virtual_tokens: n,
        prompt_tuning_init,
        prompt_tuning_init_text: raw["prompt_tuning_init_text"].as_str().map(String::from),
        token_dim: raw["token_dim"].as_u64().map(|v| v as usize),
        num_layers: raw["num_layers"].as_u64().map(|v| v as usize),
        num_attention_heads: raw["num_attention_heads"].as_u64().map(|v| v as usize),
    });
    cfg.validate().map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

/// Overwrite the adapter's parameters (and `modules_to_save`) in `store`
/// with the file's. A key that matches nothing in the model, or a shape
/// that differs, is an error naming both.
pub fn load_weights(store: &mut ParamStore, dir: &Path) -> Result<usize> {
    let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
    let mut values = BTreeMap::new();
    let mut unknown = Vec::new();
    for key in ckpt.names() {
        let name = key.strip_prefix(PREFIX).unwrap_or(&key).to_string();
        let t = ckpt.load_f32(&key)?;
        match store.iter().find(|(n, _)| **n == name) {
            None => unknown.push(key),
            Some((_, p)) => {
                if p.tensor.dims() != t.dims() {
                    return Err(Error::Tensor {
                        name: key,
                        msg: format!(
                            "shape {:?} in {} but the model's `{name}` is {:?} (another r, or another base model?)",
                            t.dims(),
                            dir.join(WEIGHTS_FILE).display(),
                            p.tensor.dims()
                        ),
                    });
                }
                values.insert(name, t);
            }
        }
    }
    if !unknown.is_empty() {
        return Err(Error::file(
            dir.join(WEIGHTS_FILE),
            format!("tensors that match no module of the base model: {unknown:?}"),
        ));
    }
    // Every wrapped module needs its adapter tensors: PEFT only warns and
    // keeps the init (B = 0, a silent no-op adapter).
    let mut absent = Vec::new();
    for (path, spec) in &store.adapters {
        for w in spec.tensor_names() {
            let name = format!("{path}.{w}");
            if !values.contains_key(&name) {
                absent.push(format!("{PREFIX}{name}"));
            }
        }
    }
    if !absent.is_empty() {
        let n = absent.len();
        absent.truncate(4);
        return Err(Error::file(
            dir.join(WEIGHTS_FILE),
            format!(
                "{n} adapter tensor(s) that adapter_config.json implies are missing, e.g. {absent:?} (a partial file, or a config for another adapter?)"
            ),
        ));
    }
    let n = values.len();
    store.copy_values_from(&values)?;
    Ok(n)
}

/// Write `dir/adapter_config.json` and `dir/adapter_model.safetensors` for
/// the trainable parameters of `store` (adapter weights + modules_to_save).
pub fn save(
    dir: &Path,
    store: &ParamStore,
    cfg: &AdapterConfig,
    base_model: &str,
    task_type: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut c = BTreeMap::new();
    c.insert("base_model_name_or_path", json!(base_model));
    c.insert("task_type", json!(task_type));
    c.insert("inference_mode", json!(true));
    c.insert("revision", Value::Null);
    let targeting = |c: &mut BTreeMap<&str, Value>, t: &Targeting| {
        let or_null = |v: &Vec<String>| {
            if v.is_empty() {
                Value::Null
            } else {
                json!(v)
            }
        };
        c.insert(
            "target_modules",
            match &t.target_modules {
                Targets::One(s) => json!(s),
                Targets::List(v) => json!(v),
            },
        );
        c.insert("modules_to_save", or_null(&t.modules_to_save));
        c.insert("exclude_modules", or_null(&t.exclude_modules));
        c.insert("layers_to_transform", json!(t.layers_to_transform));
        c.insert("layers_pattern", Value::Null);
        c.insert("fan_in_fan_out", json!(t.fan_in_fan_out));
    };
    match cfg {
        AdapterConfig::Lora(l) => {
            targeting(&mut c, &l.targeting);
            c.insert("peft_type", json!("LORA"));
            c.insert("r", json!(l.r));
            c.insert("lora_alpha", json!(l.lora_alpha));
            // The shortest decimal of the f32 (0.05, not 0.05000000074505806).
            c.insert(
                "lora_dropout",
                json!(format!("{}", l.lora_dropout).parse::<f64>().unwrap_or(0.0)),
            );
            c.insert("bias", json!("none"));
            c.insert("use_rslora", json!(l.use_rslora));
            c.insert("use_dora", json!(l.use_dora));
            c.insert("rank_pattern", json!(l.rank_pattern));
            c.insert("alpha_pattern", json!(l.alpha_pattern));
            c.insert(
                "init_lora_weights",
                match l.init_lora_weights {
                    InitLoraWeights::Gaussian => json!("gaussian"),
                    InitLoraWeights::Kaiming => json!(true),
                },
            );
        }
        AdapterConfig::Ia3(i) => {
            targeting(&mut c, &i.targeting);
            c.insert("peft_type", json!("IA3"));
            c.insert("feedforward_modules", json!(i.feedforward_modules));
            c.insert("init_ia3_weights", json!(true));
        }
        AdapterConfig::PromptTuning(p) => {
            // PEFT's PromptTuningConfig fields (LoRA's do not apply).
            c.insert("peft_type", json!("PROMPT_TUNING"));
            c.insert("num_virtual_tokens", json!(p.num_virtual_tokens));
            c.insert("token_dim", json!(p.token_dim));
            c.insert("num_transformer_submodules", json!(1));
            c.insert("num_attention_heads", json!(p.num_attention_heads));
            c.insert("num_layers", json!(p.num_layers));
            c.insert(
                "prompt_tuning_init",
                json!(match p.prompt_tuning_init {
                    PromptTuningInit::Random => "RANDOM",
                    PromptTuningInit::SampleVocab => "SAMPLE_VOCAB",
                    PromptTuningInit::Text => "TEXT",
                }),
            );
            c.insert("prompt_tuning_init_text", json!(p.prompt_tuning_init_text));
            c.insert("tokenizer_name_or_path", json!(base_model));
            c.insert("tokenizer_kwargs", Value::Null);
            c.insert("modules_to_save", Value::Null);
        }
    }
    fsutil::write_json(&dir.join(CONFIG_FILE), &c)?;
    // PEFT saves the soft prompt under its own name, without the model prefix.
    let tensors = store.iter().filter(|(_, p)| p.var.is_some()).map(|(n, p)| {
        let key = if n == PROMPT_EMBEDDINGS {
            n.clone()
        } else {
            format!("{PREFIX}{n}")
        };
        (key, p.tensor.clone())
    });
    crate::hub::checkpoint::write_safetensors(&dir.join(WEIGHTS_FILE), tensors)
}
