//! Model families, one file each (BERT-type encoders, Llama-family and GPT-2
//! decoders), and loading a checkpoint folder into a [`ParamStore`].

pub mod bert;
pub mod decoder;
pub mod gpt2;
pub mod llama;

use crate::hub::checkpoint::Checkpoint;
use crate::params::{ParamStore, Selector};
use crate::{Error, Result};
use std::path::Path;

/// Buffers that checkpoints carry but that are not parameters.
const IGNORED_SUFFIXES: &[&str] = &["position_ids"];
/// Pretraining heads that a fine-tuning model does not use (warned, not an error).
const OTHER_HEADS: &[&str] = &["cls.", "bert.cls."];

/// Read and validate `config.json` of a BERT checkpoint folder.
pub fn read_bert_config(dir: &Path) -> Result<(bert::BertConfig, serde_json::Value)> {
    let file = dir.join("config.json");
    if !dir.exists() {
        return Err(Error::file(dir, "model folder does not exist"));
    }
    let raw = crate::hub::config::read_config_value(&file)?;
    let cfg: bert::BertConfig = crate::hub::config::from_value_in(&raw, &file)?;
    cfg.validate(&file)?;
    Ok((cfg, raw))
}

/// Load every tensor of a checkpoint under `BertForSequenceClassification`
/// names: a bare `BertModel` checkpoint's keys get the `bert.` prefix.
pub fn load_bert_params(dir: &Path, selector: Selector) -> Result<ParamStore> {
    let ckpt = Checkpoint::open(dir)?;
    let names = ckpt.names();
    let prefixed = names.iter().any(|n| n.starts_with("bert."));
    let mut store = ParamStore::new(selector, ckpt.path().display().to_string());
    for name in &names {
        if IGNORED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let key = if prefixed || OTHER_HEADS.iter().any(|p| name.starts_with(p)) {
            name.clone()
        } else {
            format!("bert.{name}")
        };
        store.insert(&key, ckpt.load_f32(name)?)?;
    }
    Ok(store)
}

/// After the model took what it needs: drop other pretraining heads (with a
/// warning) and fail on any other tensor the model did not use.
pub fn check_unused(store: &mut ParamStore, warn: &mut dyn FnMut(String)) -> Result<()> {
    let unused = store.unused();
    let (other, unexpected): (Vec<_>, Vec<_>) = unused
        .into_iter()
        .partition(|n| OTHER_HEADS.iter().any(|p| n.starts_with(p)));
    if !other.is_empty() {
        warn(format!(
            "ignoring {} tensors of a pretraining head (e.g. {})",
            other.len(),
            other[0]
        ));
        for n in &other {
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
