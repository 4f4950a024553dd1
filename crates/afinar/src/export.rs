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

/// The files an export folder holds (a merged checkpoint or an adapter):
/// an existing folder with only these is an earlier export, replaced whole.
const EXPORT_FILES: &[&str] = &[
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "chat_template.jinja",
    crate::hub::tokenizer::TOKENIZER_FILE,
    "tokenizer_config.json",
    crate::hub::tokenizer::VOCAB_FILE,
    "special_tokens_map.json",
    crate::adapters::peft::CONFIG_FILE,
    crate::adapters::peft::WEIGHTS_FILE,
    crate::train::run::ADAPTER_META,
    crate::train::sft::LM_META,
];

/// Where `afinar export` may write `out` (a folder, replaced whole) for
/// `run`: a new or empty folder, or an earlier export. Refused, with
/// nothing written: an existing file, the run folder itself or a folder
/// holding it, and a folder with anything an export does not write.
pub fn check_output_folder(run: &Path, out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::file(
            out,
            "exists and is not a folder: export writes a folder here (choose a new one)",
        ));
    }
    if !out.exists() {
        return Ok(());
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (run_c, out_c) = (canon(run), canon(out));
    if run_c.starts_with(&out_c) {
        return Err(Error::file(
            out,
            format!(
                "is (or holds) the run folder {}: exporting there would replace it; choose another folder",
                run.display()
            ),
        ));
    }
    let mut others = Vec::new();
    for e in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let e = e.map_err(|e| Error::io(out, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if !(is_file && EXPORT_FILES.contains(&name.as_str())) {
            others.push(name);
        }
    }
    if !others.is_empty() {
        others.sort();
        others.truncate(5);
        return Err(Error::file(
            out,
            format!(
                "holds files an export does not write ({others:?}): export replaces the whole folder, so choose a new or empty one"
            ),
        ));
    }
    Ok(())
}

/// Where `afinar export --gguf` may write `out`: a new `.gguf` file or an
/// earlier GGUF export; never a folder or another kind of file.
pub fn check_output_gguf(out: &Path) -> Result<()> {
    if out.extension().is_none_or(|e| e != "gguf") {
        return Err(Error::file(out, "the GGUF output must end in .gguf"));
    }
    if out.is_dir() {
        return Err(Error::file(out, "is a folder: --gguf writes one file"));
    }
    if out.exists() && !crate::hub::inspect::has_gguf_magic(out) {
        return Err(Error::file(
            out,
            "exists and is not a GGUF file: not overwritten",
        ));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_targets_that_would_destroy_something_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("runs/r");
        std::fs::create_dir_all(run.join("model")).unwrap();
        std::fs::write(run.join("results.json"), "{}").unwrap();
        // New, empty, or an earlier export: fine.
        check_output_folder(&run, &d.path().join("new")).unwrap();
        std::fs::create_dir(d.path().join("empty")).unwrap();
        check_output_folder(&run, &d.path().join("empty")).unwrap();
        let old = d.path().join("old");
        std::fs::create_dir(&old).unwrap();
        for f in ["config.json", "model.safetensors", "vocab.txt"] {
            std::fs::write(old.join(f), "x").unwrap();
        }
        check_output_folder(&run, &old).unwrap();
        // The run itself, a folder holding it, a file, a folder with other things.
        for (out, want) in [
            (run.clone(), "is (or holds) the run folder"),
            (d.path().join("runs"), "is (or holds) the run folder"),
            (run.join("results.json"), "exists and is not a folder"),
            (d.path().to_path_buf(), "is (or holds) the run folder"),
        ] {
            let err = check_output_folder(&run, &out).unwrap_err().to_string();
            assert!(err.contains(want), "{}: {err}", out.display());
        }
        std::fs::write(old.join("notes.md"), "mine").unwrap();
        let err = check_output_folder(&run, &old).unwrap_err().to_string();
        assert!(
            err.contains("notes.md") && err.contains("new or empty"),
            "{err}"
        );

        check_output_gguf(&d.path().join("m.gguf")).unwrap();
        let err = check_output_gguf(&d.path().join("m.bin"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must end in .gguf"), "{err}");
        std::fs::write(d.path().join("t.gguf"), "not gguf").unwrap();
        let err = check_output_gguf(&d.path().join("t.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        std::fs::write(d.path().join("g.gguf"), b"GGUF\x03\0\0\0").unwrap();
        check_output_gguf(&d.path().join("g.gguf")).unwrap();
    }
}
