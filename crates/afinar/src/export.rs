//! Exports of a decoder run (or any decoder folder / GGUF file): the merged
//! HF checkpoint, the PEFT adapter folder, and GGUF for llama.cpp / ollama.
//! (Sequence-classification runs export through `train::run::export`.)

use crate::hub::gguf::export::{write_llama_gguf, ExportType, TokenizerMeta};
use crate::models::decoder::{load_lm, DecoderConfig};
use crate::params::Selector;
use crate::train::run::write_dir_atomic;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Is `path` a decoder run folder (or a decoder model folder / GGUF file)?
pub fn is_decoder(path: &Path) -> bool {
    let dir = model_of(path);
    if dir.extension().is_some_and(|e| e == "gguf") {
        return true;
    }
    crate::hub::config::read_config_value(&dir.join("config.json"))
        .ok()
        .and_then(|v| v["model_type"].as_str().map(String::from))
        .is_some_and(|t| crate::models::decoder::LLAMA_TYPES.contains(&t.as_str()) || t == "gpt2")
}

/// `<run>/model` for a run folder, else the path itself.
fn model_of(path: &Path) -> PathBuf {
    if path.join("model").join("config.json").is_file() {
        path.join("model")
    } else {
        path.to_path_buf()
    }
}

/// llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer: SmolLM's
/// family splits digits one by one, GPT-2's does not.
fn pre_name(tok: &tokenizers::Tokenizer) -> &'static str {
    let json = tok.to_string(false).unwrap_or_default();
    if json.contains("\"Digits\"") {
        "smollm"
    } else {
        "gpt2"
    }
}

/// Export a decoder run: `merged` (HF folder, adapters merged), `adapter`
/// (the run's PEFT folder), `gguf` (a `.gguf` file of the merged model).
pub fn export_lm(
    run: &Path,
    merged: Option<&Path>,
    adapter: Option<&Path>,
    gguf: Option<(&Path, ExportType)>,
) -> Result<()> {
    let src_path = model_of(run);
    if let Some(out) = adapter {
        let ad = run.join("adapter");
        if !ad.join(crate::adapters::peft::CONFIG_FILE).is_file() {
            return Err(Error::file(
                run,
                "not an adapter run: no adapter/adapter_config.json",
            ));
        }
        write_dir_atomic(out, |tmp| {
            for e in std::fs::read_dir(&ad).map_err(|e| Error::io(&ad, e))? {
                let e = e.map_err(|e| Error::io(&ad, e))?;
                std::fs::copy(e.path(), tmp.join(e.file_name()))
                    .map_err(|er| Error::io(e.path(), er))?;
            }
            Ok(())
        })?;
    }
    if merged.is_none() && gguf.is_none() {
        return Ok(());
    }
    let src = load_lm(&src_path, Selector::none())?;
    if let Some(out) = merged {
        crate::train::sft::save_lm(out, &src.store, &src)?;
    }
    if let Some((out, ty)) = gguf {
        let DecoderConfig::Llama(cfg) = &src.cfg else {
            return Err(Error::msg(format!(
                "{}: GGUF export is for Llama-family models (this is GPT-2)",
                src_path.display()
            )));
        };
        if out.extension().is_none_or(|e| e != "gguf") {
            return Err(Error::file(out, "the GGUF output must end in .gguf"));
        }
        let tensors = src
            .store
            .iter()
            .map(|(n, p)| (n.clone(), p.tensor.clone()))
            .collect();
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "afinar".into());
        let meta = TokenizerMeta {
            tokenizer: &src.tokenizer,
            bos_id: src.bos_id,
            eos_id: src.eos_ids.first().copied(),
            pad_id: Some(src.pad_id),
            chat_template: src.chat_template.as_deref(),
            pre: pre_name(&src.tokenizer),
        };
        write_llama_gguf(out, &name, cfg, &tensors, &meta, ty)?;
    }
    Ok(())
}
