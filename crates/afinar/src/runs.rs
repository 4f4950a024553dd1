//! Finished runs read back and written out: `afinar predict` / `eval` load
//! a sequence classifier of any family (a run folder, an exported model
//! folder, or a PEFT adapter folder made by Python PEFT on a base model);
//! `afinar export` writes a run's merged model, its adapter, or (decoders)
//! a GGUF file, through `export`.

use crate::adapters::{peft, AdapterConfig, PeftTask};
use crate::config::Plan;
use crate::data::LabelMap;
use crate::export::{self, gguf::ExportType};
use crate::heads::{head_names, HeadConfig, Pooling, SequenceModel, TaskKind};
use crate::hub::checkpoint::Checkpoint;
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, LoadOpts, LoadedModel, ModelConfig};
use crate::params::{ParamStore, Selector};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A fine-tuned sequence model read back from a run folder or an exported
/// checkpoint.
pub struct RunModel {
    pub model: SequenceModel,
    pub store: ParamStore,
    pub tok: TextTokenizer,
    pub labels: Option<LabelMap>,
    pub cfg: ModelConfig,
    /// The folder the weights came from (`<run>/model`, or the adapter folder).
    pub dir: PathBuf,
    /// The run config, when `path` was a run folder.
    pub plan: Option<Plan>,
    /// The base model's `config.json`, and the truncation length.
    pub base_config: serde_json::Value,
    pub max_length: usize,
    /// The adapter, for an adapter run.
    pub adapter: Option<AdapterConfig>,
}

/// What a PEFT adapter folder made elsewhere does not say about itself.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The base model (a folder, a .gguf file or an asset name); default:
    /// the adapter's `base_model_name_or_path` when that is a folder, a file
    /// or a fetched asset.
    pub base: Option<String>,
    /// Class names in id order (default: the base config's `id2label` when
    /// it has as many labels, else `LABEL_<i>` as transformers names them).
    pub labels: Option<Vec<String>>,
    /// Truncation length (default: the base model's maximum).
    pub max_length: Option<usize>,
}

/// Load `path`: a run folder (uses `<run>/model`, or `<run>/adapter` on its
/// base for an adapter run) or an HF sequence-classification folder written
/// by afinar or transformers.
pub fn load_run(path: &Path) -> Result<RunModel> {
    load_run_with(path, &LoadOptions::default())
}

/// [`load_run`] that also takes a PEFT adapter folder written by Python
/// (`adapter_config.json` + `adapter_model.safetensors`, task SEQ_CLS) on
/// top of a base model.
pub fn load_run_with(path: &Path, opts: &LoadOptions) -> Result<RunModel> {
    if path.join(peft::CONFIG_FILE).is_file() && !path.join(peft::HEAD_META).is_file() {
        return load_peft_folder(path, opts);
    }
    // An adapter run (or an adapter folder afinar wrote): base + adapter, unmerged.
    let adapter_dir = if path.join("adapter").join(peft::HEAD_META).is_file() {
        Some(path.join("adapter"))
    } else if path.join(peft::HEAD_META).is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(ad) = adapter_dir {
        return load_adapter_run(&ad, run_plan(path)?);
    }
    load_merged(path)
}

/// Base + adapter, built as training built it: the head's weights (and
/// every adapter tensor) come from the adapter folder.
fn adapted_model(
    base: LoadedModel,
    ad: &Path,
    adapter_cfg: &AdapterConfig,
    head: &HeadConfig,
    labels: Option<LabelMap>,
    plan: Option<Plan>,
) -> Result<RunModel> {
    let mut base = base;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    SequenceModel::init_head(&mut base.store, &base.cfg, head, &mut rng)?;
    crate::adapters::attach(&mut base.store, adapter_cfg, PeftTask::SeqCls, &mut rng)?;
    peft::load_weights(&mut base.store, ad)?;
    let pad_id = base.tokenizer.pad_id();
    let mut rm = assemble(base, head, pad_id, labels, ad.to_path_buf(), plan)?;
    rm.adapter = Some(adapter_cfg.clone());
    Ok(rm)
}

/// The sequence model from a loaded store that holds its head, checked for
/// unused tensors (a pretraining head is dropped).
fn assemble(
    loaded: LoadedModel,
    head: &HeadConfig,
    pad_id: u32,
    labels: Option<LabelMap>,
    dir: PathBuf,
    plan: Option<Plan>,
) -> Result<RunModel> {
    let LoadedModel {
        cfg,
        raw_config,
        mut store,
        tokenizer,
        ..
    } = loaded;
    let model = SequenceModel::build(&store, &cfg, head, pad_id)?;
    models::check_unused(
        &mut store,
        models::other_heads(cfg.family(), false),
        &mut |_| {},
    )?;
    Ok(RunModel {
        model,
        store,
        max_length: tokenizer.max_length(),
        tok: tokenizer,
        labels,
        cfg,
        dir,
        plan,
        base_config: raw_config,
        adapter: None,
    })
}

/// Base model + PEFT adapter folder written by an afinar run.
fn load_adapter_run(ad: &Path, plan: Option<Plan>) -> Result<RunModel> {
    let meta_path = ad.join(peft::HEAD_META);
    let meta = crate::hub::config::read_config_value(&meta_path)?;
    let base_dir = PathBuf::from(
        meta["base_model_dir"]
            .as_str()
            .ok_or_else(|| Error::file(&meta_path, "no `base_model_dir`"))?,
    );
    let head: HeadConfig = serde_json::from_value(meta["head"].clone())
        .map_err(|e| Error::file(&meta_path, format!("`head`: {e}")))?;
    let labels = match meta["id2label"].as_array() {
        Some(a) => Some(LabelMap::from_config(
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
        )?),
        None => None,
    };
    let max_length = meta["max_length"].as_u64().unwrap_or(512) as usize;
    let (adapter_cfg, _) = peft::read_config(ad)?;
    let base = models::load_model(
        &base_dir,
        Selector::none(),
        LoadOpts {
            quantized: false,
            max_length: Some(max_length),
        },
    )?;
    let head = HeadConfig {
        dropout: 0.0,
        ..head
    };
    adapted_model(base, ad, &adapter_cfg, &head, labels, plan)
}

/// The base model of a PEFT adapter: `--base` (folder, file or asset), or
/// `base_model_name_or_path` (folder, file, or the hub id of a fetched asset).
fn peft_base(ad: &Path, raw: &serde_json::Value, base: Option<&str>) -> Result<PathBuf> {
    let named = raw["base_model_name_or_path"].as_str().unwrap_or_default();
    let resolve = |b: &str| -> Result<PathBuf> {
        let p = PathBuf::from(b);
        if p.exists() {
            return Ok(p);
        }
        if let Some(a) = crate::hub::assets::asset_for_hub_id(b) {
            return crate::hub::assets::resolve_asset_path(a.name);
        }
        crate::hub::assets::resolve_asset_path(b)
    };
    match base {
        Some(b) => resolve(b).map_err(|e| {
            Error::msg(format!("--base {b}: neither a model folder nor a fetched asset ({e})"))
        }),
        None => resolve(named).map_err(|_| {
            Error::file(
                ad.join(peft::CONFIG_FILE),
                format!(
                    "the adapter's base model `{named}` (base_model_name_or_path) is not a folder or a fetched asset here: pass --base MODEL_DIR_OR_ASSET"
                ),
            )
        }),
    }
}

/// A PEFT sequence-classification adapter made by Python PEFT, on a base
/// model of any family.
fn load_peft_folder(ad: &Path, opts: &LoadOptions) -> Result<RunModel> {
    let (adapter_cfg, raw) = peft::read_config(ad)?;
    let cfg_file = ad.join(peft::CONFIG_FILE);
    match raw["task_type"].as_str() {
        Some("SEQ_CLS") => {}
        other => {
            let t = other.map_or("missing".to_string(), |t| format!("{t:?}"));
            return Err(Error::file(
                &cfg_file,
                format!("task_type {t}: afinar predicts with SEQ_CLS adapters"),
            ));
        }
    }
    let base_path = peft_base(ad, &raw, opts.base.as_deref())?;
    let base = models::load_model(
        &base_path,
        Selector::none(),
        LoadOpts {
            quantized: false,
            max_length: opts.max_length,
        },
    )?;
    let family = base.cfg.family();
    // The new head travels in the adapter file (modules_to_save): its rows
    // are the number of labels.
    let weights = Checkpoint::open(ad.join(peft::WEIGHTS_FILE))?;
    let out = head_names(family).out;
    let key = format!("base_model.model.{out}.weight");
    let num_labels = weights
        .info(&key)
        .map(|i| i.shape[0])
        .ok_or_else(|| Error::Tensor {
            name: key.clone(),
            msg: format!(
                "missing from {}: the head must be saved with the adapter (modules_to_save = [\"{out}\"])",
                ad.join(peft::WEIGHTS_FILE).display()
            ),
        })?;
    let task = if num_labels == 1 {
        TaskKind::Regression
    } else {
        TaskKind::Classification
    };
    let labels = match task {
        TaskKind::Regression | TaskKind::Scalar => None,
        TaskKind::Classification => Some(LabelMap::from_config(match &opts.labels {
            Some(l) if l.len() != num_labels => {
                return Err(Error::msg(format!(
                    "--labels gives {} names but the adapter's {out} has {num_labels} rows",
                    l.len()
                )))
            }
            Some(l) => l.clone(),
            None => {
                let from_base: Option<Vec<String>> = base.raw_config["id2label"]
                    .as_object()
                    .filter(|m| m.len() == num_labels)
                    .and_then(|m| {
                        (0..num_labels)
                            .map(|i| m.get(&i.to_string())?.as_str().map(String::from))
                            .collect()
                    });
                from_base.unwrap_or_else(|| (0..num_labels).map(|i| format!("LABEL_{i}")).collect())
            }
        })?),
    };
    let head = HeadConfig {
        task,
        pooling: Pooling::default_for(family),
        num_labels,
        dropout: 0.0,
    };
    adapted_model(base, ad, &adapter_cfg, &head, labels, None)
}

/// The class names of a sequence classifier's `config.json`, in id order.
fn config_labels(raw: &serde_json::Value, file: &Path) -> Result<LabelMap> {
    let map = raw["id2label"]
        .as_object()
        .ok_or_else(|| Error::file(file, "`id2label` missing: not a sequence classifier"))?;
    let mut pairs: Vec<(usize, String)> = map
        .iter()
        .map(|(k, v)| {
            Ok((
                k.parse::<usize>().map_err(|_| {
                    Error::file(file, format!("id2label key `{k}` is not an integer"))
                })?,
                v.as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    pairs.sort();
    LabelMap::from_config(pairs.into_iter().map(|p| p.1).collect())
}

/// The config a run folder saved (`None` for a folder without one); one
/// that does not load is an error naming the file, key and line.
fn run_plan(path: &Path) -> Result<Option<Plan>> {
    let config = path.join("config.toml");
    config
        .is_file()
        .then(|| Plan::load(&config, &[]))
        .transpose()
}

fn load_merged(path: &Path) -> Result<RunModel> {
    let (dir, plan) = if path.join("model").join("config.json").is_file() {
        (path.join("model"), run_plan(path)?)
    } else {
        (path.to_path_buf(), None)
    };
    if !dir.join("config.json").is_file() {
        return Err(Error::file(
            path,
            "not a run folder or model folder (no model/config.json or config.json)",
        ));
    }
    let (cfg, raw) = models::load::read_config(&dir)?;
    let family = cfg.family();
    let afinar = &raw["afinar"];
    // afinar's own note first (a scalar head is saved as regression).
    let task = serde_json::from_value(afinar["task"].clone()).unwrap_or(
        match raw["problem_type"].as_str() {
            Some("regression") => TaskKind::Regression,
            _ => TaskKind::Classification,
        },
    );
    let labels = match task {
        TaskKind::Classification => Some(config_labels(&raw, &dir.join("config.json"))?),
        TaskKind::Regression | TaskKind::Scalar => None,
    };
    let pooling: Pooling =
        serde_json::from_value(afinar["pooling"].clone()).unwrap_or(Pooling::default_for(family));
    let max_length = afinar["max_length"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(cfg.max_positions());
    let head = HeadConfig {
        task,
        pooling,
        num_labels: labels.as_ref().map_or(1, |l| l.len()),
        dropout: 0.0,
    };
    let loaded = models::load_model(
        &dir,
        Selector::none(),
        LoadOpts {
            quantized: false,
            max_length: Some(max_length),
        },
    )?;
    let names = head_names(family);
    let mut wanted = vec![format!("{}.weight", names.out)];
    if names.out_bias {
        wanted.push(format!("{}.bias", names.out));
    }
    for k in wanted {
        if !loaded.store.contains(&k) {
            return Err(Error::Tensor {
                name: k,
                msg: format!(
                    "missing from {}: not a fine-tuned sequence classifier",
                    dir.display()
                ),
            });
        }
    }
    // A decoder's head skips transformers' pad_token_id.
    let pad_id = crate::hub::tokenizer::ids_of(&raw["pad_token_id"])
        .first()
        .copied()
        .filter(|_| family.is_decoder())
        .unwrap_or(loaded.tokenizer.pad_id());
    assemble(loaded, &head, pad_id, labels, dir, plan)
}

/// What `afinar export` reads from a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// A sequence classifier / regressor (any family).
    Classifier,
    /// A decoder LM (SFT run, model folder or GGUF file).
    Lm,
}

/// A run folder, model folder or GGUF file: a classifier or an LM?
pub fn kind_of(path: &Path) -> RunKind {
    let dir = model_of(path);
    if models::SourceFormat::detect(&dir) == Some(models::SourceFormat::Gguf)
        || path.join(peft::LM_META).is_file()
    {
        return RunKind::Lm;
    }
    if path.join(peft::HEAD_META).is_file() || path.join("adapter").join(peft::HEAD_META).is_file()
    {
        return RunKind::Classifier;
    }
    let raw = crate::hub::config::read_config_value(&dir.join("config.json")).ok();
    let seq_cls = raw.as_ref().is_some_and(|v| {
        v["architectures"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x.as_str()
                    .is_some_and(|s| s.ends_with("ForSequenceClassification"))
            })
        })
    });
    let decoder = raw
        .as_ref()
        .and_then(|v| ModelConfig::from_value(v, &dir).ok())
        .is_some_and(|c| c.family().is_decoder());
    if decoder && !seq_cls {
        RunKind::Lm
    } else {
        RunKind::Classifier
    }
}

/// `afinar export` of a classifier run (or model folder): a merged HF
/// checkpoint that transformers loads, and/or its adapter alone as a PEFT
/// folder.
pub fn export_classifier(run: &Path, merged: Option<&Path>, adapter: Option<&Path>) -> Result<()> {
    let rm = load_run(run)?;
    if let Some(out) = merged {
        let config = export::seq_cls_config(
            &rm.base_config,
            rm.cfg.family(),
            rm.labels.as_ref().map(|l| l.id2label()),
            &rm.model.head,
            rm.model.pad_id,
            rm.max_length,
        );
        export::write_model_folder(
            out,
            export::model_tensors(&rm.store)?,
            &config,
            rm.cfg.family(),
            &rm.tok,
        )?;
    }
    if let Some(out) = adapter {
        rm.adapter.as_ref().ok_or_else(|| {
            Error::file(run, "not an adapter run: nothing to export with --adapter")
        })?;
        copy_folder(&rm.dir, out)?;
    }
    Ok(())
}

/// Copy the files of folder `src` into folder `out` (replaced whole).
fn copy_folder(src: &Path, out: &Path) -> Result<()> {
    export::write_dir_atomic(out, |tmp| {
        for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
            let e = e.map_err(|e| Error::io(src, e))?;
            if e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::copy(e.path(), tmp.join(e.file_name()))
                    .map_err(|er| Error::io(e.path(), er))?;
            }
        }
        Ok(())
    })
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
    crate::adapters::peft::HEAD_META,
    crate::adapters::peft::LM_META,
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

/// Export a decoder LM run: `merged` (HF folder, adapters merged), `adapter`
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
        if !ad.join(peft::CONFIG_FILE).is_file() {
            return Err(Error::file(
                run,
                "not an adapter run: no adapter/adapter_config.json",
            ));
        }
        copy_folder(&ad, out)?;
    }
    if merged.is_none() && gguf.is_none() {
        return Ok(());
    }
    let src = models::load_model(&src_path, Selector::none(), LoadOpts::default())?;
    let family = src.cfg.family();
    if let Some(out) = merged {
        export::write_model_folder(
            out,
            export::model_tensors(&src.store)?,
            &export::causal_lm_config(&src.raw_config, family),
            family,
            &src.tokenizer,
        )?;
    }
    if let Some((out, ty)) = gguf {
        let ModelConfig::Llama(cfg) = &src.cfg else {
            return Err(Error::msg(format!(
                "{}: GGUF export is for Llama-family models (this is {family:?})",
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
        let tok = &src.tokenizer;
        let meta = export::gguf::TokenizerMeta {
            tokenizer: tok.raw(),
            bos_id: tok.specials.as_ref().and_then(|s| s.bos_id),
            eos_id: tok.eos_ids().first().copied(),
            pad_id: Some(tok.pad_id()),
            chat_template: tok.chat_template(),
            pre: pre_name(tok.raw()),
        };
        export::gguf::write_llama_gguf(out, &name, cfg, &tensors, &meta, ty)?;
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
