//! The run folder: what a training run writes and what `eval` / `predict`
//! read back.
//!
//! ```text
//! runs/<name>/
//!   config.toml      the resolved run config
//!   metrics.jsonl    one line per logged step and per evaluation
//!   metrics.png      loss and eval curves
//!   model/           best-on-validation weights as an HF checkpoint
//!                    (config.json with BertForSequenceClassification,
//!                    id2label; model.safetensors; tokenizer files)
//!   results.json     the final report (test metrics of model/)
//! ```
//! Every file is written to a temporary name and renamed; a checkpoint
//! folder is assembled beside its final name and swapped in whole.

use super::TrainReport;
use crate::config::Plan;
use crate::data::LabelMap;
use crate::heads::{HeadConfig, Pooling, SequenceModel, TaskKind};
use crate::hub::checkpoint::Checkpoint;
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, bert::BertConfig};
use crate::params::{ParamStore, Selector};
use crate::{fsutil, Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct RunWriter {
    dir: PathBuf,
    base_config: serde_json::Value,
    /// Sequence runs: what `save_model` writes beside the weights.
    tok: Option<TextTokenizer>,
    labels: Option<LabelMap>,
    head: Option<HeadConfig>,
    max_length: usize,
    metrics: Mutex<std::fs::File>,
    /// Adapter runs: the adapter config and the base model's folder.
    pub adapter: Option<(crate::adapters::AdapterConfig, PathBuf)>,
    /// Held while this process writes the folder (removed on drop).
    _lock: RunLock,
}

/// The lock file of a run folder: `.afinar.lock`, holding the writer's pid.
pub const LOCK_FILE: &str = ".afinar.lock";

/// One process writes a run folder at a time. The lock file is created
/// atomically (`create_new`); a lock left by a process that no longer runs
/// (killed with SIGKILL, a crashed machine) is taken over.
struct RunLock {
    path: PathBuf,
}

impl RunLock {
    fn take(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let me = std::process::id();
                    let start = start_time(me).unwrap_or_default();
                    writeln!(f, "{me} {start}").map_err(|e| Error::io(&path, e))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // "<pid> <start time>": a pid alone could be reused by
                    // another process after the writer died (a reboot).
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut it = holder.split_whitespace();
                    let pid = it.next().and_then(|p| p.parse::<u32>().ok());
                    let started = it.next().and_then(|s| s.parse::<u64>().ok());
                    let alive = pid.is_some_and(|p| match (start_time(p), started) {
                        (Some(now), Some(then)) => now == then,
                        (Some(_), None) => true,
                        (None, _) => Path::new(&format!("/proc/{p}")).exists(),
                    });
                    if alive {
                        return Err(Error::file(
                            dir,
                            format!(
                                "run folder is in use by process {} (lock file {LOCK_FILE}): choose another --out, or wait for that run to end",
                                pid.unwrap_or(0)
                            ),
                        ));
                    }
                    // Stale: its writer is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::file(
            dir,
            format!("could not take the lock file {LOCK_FILE}: another process keeps taking it"),
        ))
    }
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`, in clock
/// ticks since boot); None where there is no such process or no /proc.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl RunWriter {
    pub fn create(
        dir: &Path,
        plan: &Plan,
        base_config: &serde_json::Value,
        tok: &TextTokenizer,
        labels: Option<&LabelMap>,
        head: &HeadConfig,
        resume: bool,
    ) -> Result<Self> {
        let mut w = Self::create_log(dir, plan, resume)?;
        w.base_config = base_config.clone();
        w.tok = Some(tok.clone());
        w.labels = labels.cloned();
        w.head = Some(head.clone());
        Ok(w)
    }

    /// The run folder with its config and metrics log only (methods that
    /// save their models themselves, e.g. SFT). `resume`: the folder holds
    /// the run being continued; its log is kept (the loop cuts it back to
    /// its checkpoint) and what a killed writer left half-done is removed.
    pub fn create_log(dir: &Path, plan: &Plan, resume: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = RunLock::take(dir)?;
        // Temporaries of a writer that was killed (this process holds the
        // lock, so their owner is gone).
        fsutil::remove_stale_temporaries(dir)?;
        let mpath = dir.join("metrics.jsonl");
        let metrics = if resume {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&mpath)
                .map_err(|e| Error::io(&mpath, e))?
        } else {
            fsutil::write_atomic(&dir.join("config.toml"), plan.to_toml()?.as_bytes())?;
            // Truncate: a folder may hold the log of a run that failed (a run
            // that finished is refused by the caller); its lines must not
            // prefix this run's.
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&mpath)
                .map_err(|e| Error::io(&mpath, e))?
        };
        Ok(RunWriter {
            dir: dir.to_path_buf(),
            base_config: serde_json::Value::Null,
            tok: None,
            labels: None,
            head: None,
            max_length: plan.config.model.max_length,
            metrics: Mutex::new(metrics),
            adapter: None,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = self.metrics.lock().unwrap();
        // One write per line: a kill leaves whole lines (and a resume cuts
        // the log back to its checkpoint anyway).
        let line = format!("{v}\n");
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))
    }

    /// The log's length, made durable (recorded in a checkpoint).
    pub fn metrics_len(&self) -> Result<u64> {
        let f = self.metrics.lock().unwrap();
        let p = self.dir.join("metrics.jsonl");
        f.sync_data().map_err(|e| Error::io(&p, e))?;
        Ok(f.metadata().map_err(|e| Error::io(&p, e))?.len())
    }

    /// Cut the log back to `len` bytes: the lines of steps a resume replays.
    pub fn truncate_metrics(&self, len: u64) -> Result<()> {
        let f = self.metrics.lock().unwrap();
        let p = self.dir.join("metrics.jsonl");
        let have = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        if have < len {
            return Err(Error::file(
                &p,
                format!("holds {have} bytes but the checkpoint recorded {len}: the log was cut or replaced"),
            ));
        }
        f.set_len(len).map_err(|e| Error::io(&p, e))
    }

    pub fn log_skipped(&self, s: &super::checkpoint::Skipped) -> Result<()> {
        self.append(serde_json::json!({
            "step": s.step, "skipped": s.reason, "rows": s.rows,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn log_step(
        &self,
        step: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    ) -> Result<()> {
        self.append(serde_json::json!({
            "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s,
        }))
    }

    pub fn log_eval(&self, step: usize, split: &str, m: &BTreeMap<String, f64>) -> Result<()> {
        let mut v = serde_json::json!({ "step": step, "split": split });
        for (k, x) in m {
            let key = if k == "loss" {
                "eval_loss".to_string()
            } else {
                k.clone()
            };
            v[key] = serde_json::json!(x);
        }
        self.append(v)
    }

    /// Save the current weights as an HF checkpoint in `<run>/<name>/`.
    /// Save the current weights: `<run>/<name>/` as an HF checkpoint (the
    /// adapters merged in), and for an adapter run also `<run>/adapter/`
    /// (PEFT's files) when `name` is the best model.
    pub fn save_model(&self, store: &ParamStore, name: &str) -> Result<()> {
        let (Some(tok), Some(head)) = (&self.tok, &self.head) else {
            return Err(Error::msg("save_model: not a sequence-classification run"));
        };
        let tensors: BTreeMap<String, candle_core::Tensor> = if store.adapters.is_empty() {
            store
                .iter()
                .map(|(n, p)| (n.clone(), p.tensor.clone()))
                .collect()
        } else {
            crate::adapters::merged_state(store)?
        };
        if let (Some((cfg, base_dir)), "model") = (&self.adapter, name) {
            let meta = serde_json::json!({
                "base_model_dir": base_dir,
                "id2label": self.labels.as_ref().map(|l| l.id2label().to_vec()),
                "head": head,
                "max_length": self.max_length,
            });
            write_dir_atomic(&self.dir.join("adapter"), |tmp| {
                crate::adapters::peft::save(
                    tmp,
                    store,
                    cfg,
                    &base_dir.display().to_string(),
                    "SEQ_CLS",
                )?;
                fsutil::write_json(&tmp.join(ADAPTER_META), &meta)
            })?;
        }
        save_hf_checkpoint(
            &self.dir.join(name),
            &tensors,
            &self.base_config,
            tok,
            self.labels.as_ref(),
            head,
            self.max_length,
        )
    }

    /// The plot, then `results.json` last: its presence marks the run
    /// finished (a kill before it leaves a run that `--resume` finishes).
    pub fn finish(&self, report: &TrainReport) -> Result<()> {
        let text = std::fs::read_to_string(self.dir.join("metrics.jsonl"))
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let plotted = crate::plot::plot_run(&records, &self.dir.join("metrics.png"));
        fsutil::write_json(&self.dir.join("results.json"), report)?;
        plotted
    }
}

/// transformers' config of the fine-tuned model: the base config plus the
/// class, labels and problem type, and afinar's own head settings.
fn hf_config(
    base: &serde_json::Value,
    labels: Option<&LabelMap>,
    head: &HeadConfig,
    max_length: usize,
) -> serde_json::Value {
    let mut c = base.clone();
    c["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    match (head.task, labels) {
        (TaskKind::Classification, Some(l)) => {
            let id2label: serde_json::Map<String, serde_json::Value> = l
                .id2label()
                .iter()
                .enumerate()
                .map(|(i, s)| (i.to_string(), serde_json::json!(s)))
                .collect();
            let label2id: serde_json::Map<String, serde_json::Value> = l
                .id2label()
                .iter()
                .enumerate()
                .map(|(i, s)| (s.clone(), serde_json::json!(i)))
                .collect();
            c["id2label"] = serde_json::Value::Object(id2label);
            c["label2id"] = serde_json::Value::Object(label2id);
            c["problem_type"] = serde_json::json!("single_label_classification");
        }
        _ => {
            c["id2label"] = serde_json::json!({"0": "LABEL_0"});
            c["label2id"] = serde_json::json!({"LABEL_0": 0});
            c["problem_type"] = serde_json::json!("regression");
        }
    }
    // f32 -> f64 would print 0.10000000149011612.
    c["classifier_dropout"] = serde_json::json!((head.dropout as f64 * 1e6).round() / 1e6);
    c["afinar"] =
        serde_json::json!({ "pooling": head.pooling, "task": head.task, "max_length": max_length });
    c
}

/// Write `store` as an HF checkpoint folder `dir`, assembled in a temporary
/// folder and renamed into place (an existing `dir` is replaced whole).
pub fn save_hf_checkpoint(
    dir: &Path,
    tensors: &BTreeMap<String, candle_core::Tensor>,
    base: &serde_json::Value,
    tok: &TextTokenizer,
    labels: Option<&LabelMap>,
    head: &HeadConfig,
    max_length: usize,
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        fsutil::write_json(
            &tmp.join("config.json"),
            &hf_config(base, labels, head, max_length),
        )?;
        write_safetensors(
            &tmp.join("model.safetensors"),
            tensors.iter().map(|(n, t)| (n.clone(), t.clone())),
        )?;
        tok.save(tmp)
    })
}

pub use crate::fsutil::write_dir_atomic;

/// afinar's own notes beside a PEFT adapter: what PEFT's files do not say.
pub const ADAPTER_META: &str = "afinar_head.json";

/// Write tensors as safetensors with `{"format": "pt"}` metadata (what
/// transformers expects), atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: impl Iterator<Item = (String, candle_core::Tensor)>,
) -> Result<()> {
    let tensors: Vec<(String, candle_core::Tensor)> = tensors
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| Error::file(path, e.to_string()))?;
    fsutil::write_atomic(path, &bytes)
}

/// A fine-tuned model read back from a run folder or an exported checkpoint.
pub struct RunModel {
    pub model: SequenceModel,
    pub store: ParamStore,
    pub tok: TextTokenizer,
    pub labels: Option<LabelMap>,
    pub dir: PathBuf,
    /// The run config, when `path` was a run folder.
    pub plan: Option<Plan>,
    /// The base model's `config.json`, and the truncation length.
    pub base_config: serde_json::Value,
    pub max_length: usize,
    /// The adapter, for an adapter run.
    pub adapter: Option<crate::adapters::AdapterConfig>,
}

/// Load `path`: a run folder (uses `<run>/model`) or an HF checkpoint folder
/// written by afinar or transformers (`BertForSequenceClassification`).
pub fn load_run(path: &Path) -> Result<RunModel> {
    load_run_with(path, &LoadOptions::default())
}

/// What a PEFT adapter folder made elsewhere does not say about itself.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The base model (a folder or an asset name); default: the adapter's
    /// `base_model_name_or_path` when that is a folder or a fetched asset.
    pub base: Option<String>,
    /// Class names in id order (default: the base config's `id2label` when
    /// it has as many labels, else `LABEL_<i>` as transformers names them).
    pub labels: Option<Vec<String>>,
    /// Truncation length (default: the base model's maximum).
    pub max_length: Option<usize>,
}

/// [`load_run`] that also takes a PEFT adapter folder written by Python
/// (`adapter_config.json` + `adapter_model.safetensors`, task SEQ_CLS) on
/// top of a base model.
pub fn load_run_with(path: &Path, opts: &LoadOptions) -> Result<RunModel> {
    if path.join(crate::adapters::peft::CONFIG_FILE).is_file() && !path.join(ADAPTER_META).is_file()
    {
        return load_peft_folder(path, opts);
    }
    // An adapter run (or an adapter folder afinar wrote): base + adapter, unmerged.
    let adapter_dir = if path.join("adapter").join(ADAPTER_META).is_file() {
        Some(path.join("adapter"))
    } else if path.join(ADAPTER_META).is_file() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(ad) = adapter_dir {
        let plan = Plan::load(&path.join("config.toml"), &[]).ok();
        return load_adapter_run(&ad, plan);
    }
    load_merged(path)
}

/// Base model + PEFT adapter folder written by an afinar run.
fn load_adapter_run(ad: &Path, plan: Option<Plan>) -> Result<RunModel> {
    let meta_path = ad.join(ADAPTER_META);
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
    let (cfg, base_config) = models::read_bert_config(&base_dir)?;
    let (adapter_cfg, _) = crate::adapters::peft::read_config(ad)?;
    let mut store = models::load_bert_params(&base_dir, Selector::none())?;
    let head = HeadConfig {
        dropout: 0.0,
        ..head
    };
    let model = SequenceModel::build_with_adapter(&mut store, &cfg, &head, 0, Some(&adapter_cfg))?;
    crate::adapters::peft::load_weights(&mut store, ad)?;
    models::check_unused(&mut store, &mut |_| {})?;
    let tok = TextTokenizer::from_dir(&base_dir, max_length.min(cfg.max_position_embeddings))?;
    Ok(RunModel {
        model,
        store,
        tok,
        labels,
        dir: ad.to_path_buf(),
        plan,
        base_config,
        max_length,
        adapter: Some(adapter_cfg),
    })
}

/// The base model folder of a PEFT adapter: `--base` (folder or asset), or
/// `base_model_name_or_path` (folder, or the hub id of a fetched asset).
fn peft_base_dir(ad: &Path, raw: &serde_json::Value, base: Option<&str>) -> Result<PathBuf> {
    let named = raw["base_model_name_or_path"].as_str().unwrap_or_default();
    let resolve = |b: &str| -> Result<PathBuf> {
        let p = PathBuf::from(b);
        if p.is_dir() {
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
                ad.join(crate::adapters::peft::CONFIG_FILE),
                format!(
                    "the adapter's base model `{named}` (base_model_name_or_path) is not a folder or a fetched asset here: pass --base MODEL_DIR_OR_ASSET"
                ),
            )
        }),
    }
}

/// A PEFT sequence-classification adapter made by Python PEFT on a BERT base.
fn load_peft_folder(ad: &Path, opts: &LoadOptions) -> Result<RunModel> {
    let (adapter_cfg, raw) = crate::adapters::peft::read_config(ad)?;
    let cfg_file = ad.join(crate::adapters::peft::CONFIG_FILE);
    match raw["task_type"].as_str() {
        Some("SEQ_CLS") => {}
        other => {
            let t = other.map_or("missing".to_string(), |t| format!("{t:?}"));
            return Err(Error::file(
                &cfg_file,
                format!("task_type {t}: afinar predicts with SEQ_CLS adapters on encoders"),
            ));
        }
    }
    let base_dir = peft_base_dir(ad, &raw, opts.base.as_deref())?;
    let (cfg, base_config) = models::read_bert_config(&base_dir)?;
    // The new head travels in the adapter file (modules_to_save): its rows
    // are the number of labels.
    let weights = Checkpoint::open(ad.join(crate::adapters::peft::WEIGHTS_FILE))?;
    let key = "base_model.model.classifier.weight";
    let num_labels = weights
        .info(key)
        .map(|i| i.shape[0])
        .ok_or_else(|| Error::Tensor {
            name: key.into(),
            msg: format!(
                "missing from {}: the classifier head must be saved with the adapter (modules_to_save = [\"classifier\"])",
                ad.join(crate::adapters::peft::WEIGHTS_FILE).display()
            ),
        })?;
    let task = if num_labels == 1 {
        TaskKind::Regression
    } else {
        TaskKind::Classification
    };
    let labels = match task {
        TaskKind::Regression => None,
        TaskKind::Classification => Some(LabelMap::from_config(match &opts.labels {
            Some(l) if l.len() != num_labels => {
                return Err(Error::msg(format!(
                    "--labels gives {} names but the adapter's classifier has {num_labels} rows",
                    l.len()
                )))
            }
            Some(l) => l.clone(),
            None => {
                let from_base: Option<Vec<String>> = base_config["id2label"]
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
    let max_length = opts
        .max_length
        .unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings);
    let head = HeadConfig {
        task,
        pooling: Pooling::Cls,
        num_labels,
        dropout: 0.0,
    };
    let mut store = models::load_bert_params(&base_dir, Selector::none())?;
    let model = SequenceModel::build_with_adapter(&mut store, &cfg, &head, 0, Some(&adapter_cfg))?;
    crate::adapters::peft::load_weights(&mut store, ad)?;
    models::check_unused(&mut store, &mut |_| {})?;
    let tok = TextTokenizer::from_dir(&base_dir, max_length)?;
    Ok(RunModel {
        model,
        store,
        tok,
        labels,
        dir: ad.to_path_buf(),
        plan: None,
        base_config,
        max_length,
        adapter: Some(adapter_cfg),
    })
}

fn load_merged(path: &Path) -> Result<RunModel> {
    let (dir, plan) = if path.join("model").join("config.json").is_file() {
        let plan = Plan::load(&path.join("config.toml"), &[]).ok();
        (path.join("model"), plan)
    } else {
        (path.to_path_buf(), None)
    };
    if !dir.join("config.json").is_file() {
        return Err(Error::file(
            path,
            "not a run folder or model folder (no model/config.json or config.json)",
        ));
    }
    let (cfg, raw): (BertConfig, serde_json::Value) = models::read_bert_config(&dir)?;
    let afinar = &raw["afinar"];
    let task = match raw["problem_type"].as_str() {
        Some("regression") => TaskKind::Regression,
        _ => TaskKind::Classification,
    };
    let labels = match task {
        TaskKind::Classification => {
            let map = raw["id2label"].as_object().ok_or_else(|| {
                Error::file(
                    dir.join("config.json"),
                    "`id2label` missing: not a sequence classifier",
                )
            })?;
            let mut pairs: Vec<(usize, String)> = map
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.parse::<usize>().map_err(|_| {
                            Error::file(
                                dir.join("config.json"),
                                format!("id2label key `{k}` is not an integer"),
                            )
                        })?,
                        v.as_str().unwrap_or_default().to_string(),
                    ))
                })
                .collect::<Result<_>>()?;
            pairs.sort();
            Some(LabelMap::from_config(
                pairs.into_iter().map(|p| p.1).collect(),
            )?)
        }
        TaskKind::Regression => None,
    };
    let pooling: Pooling =
        serde_json::from_value(afinar["pooling"].clone()).unwrap_or(Pooling::Cls);
    let max_length = afinar["max_length"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(cfg.max_position_embeddings);
    let head = HeadConfig {
        task,
        pooling,
        num_labels: labels.as_ref().map_or(1, |l| l.len()),
        dropout: 0.0,
    };
    let mut store = models::load_bert_params(&dir, Selector::none())?;
    for k in ["classifier.weight", "classifier.bias"] {
        if !store.contains(k) {
            return Err(Error::Tensor {
                name: k.into(),
                msg: format!(
                    "missing from {}: not a fine-tuned classifier",
                    dir.display()
                ),
            });
        }
    }
    let model = SequenceModel::build(&mut store, &cfg, &head, 0)?;
    models::check_unused(&mut store, &mut |_| {})?;
    let tok = TextTokenizer::from_dir(&dir, max_length.min(cfg.max_position_embeddings))?;
    Ok(RunModel {
        model,
        store,
        tok,
        labels,
        dir,
        plan,
        base_config: raw,
        max_length,
        adapter: None,
    })
}

/// `afinar export`: a run (or model folder) as a merged HF checkpoint that
/// transformers loads, and/or its adapter alone as a PEFT folder.
pub fn export(run: &Path, merged: Option<&Path>, adapter: Option<&Path>) -> Result<()> {
    let rm = load_run(run)?;
    if let Some(out) = merged {
        let tensors: BTreeMap<String, candle_core::Tensor> = if rm.store.adapters.is_empty() {
            rm.store
                .iter()
                .map(|(n, p)| (n.clone(), p.tensor.clone()))
                .collect()
        } else {
            crate::adapters::merged_state(&rm.store)?
        };
        save_hf_checkpoint(
            out,
            &tensors,
            &rm.base_config,
            &rm.tok,
            rm.labels.as_ref(),
            &rm.model.head,
            rm.max_length,
        )?;
    }
    if let Some(out) = adapter {
        rm.adapter.as_ref().ok_or_else(|| {
            Error::file(run, "not an adapter run: nothing to export with --adapter")
        })?;
        let src = &rm.dir;
        write_dir_atomic(out, |tmp| {
            for f in [
                crate::adapters::peft::CONFIG_FILE,
                crate::adapters::peft::WEIGHTS_FILE,
                ADAPTER_META,
            ] {
                std::fs::copy(src.join(f), tmp.join(f)).map_err(|e| Error::io(src.join(f), e))?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_stale_when_its_process_is_gone_or_its_pid_reused() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join(LOCK_FILE);
        let me = std::process::id();
        let start = start_time(me).expect("/proc");
        // Held by this very process: refused, naming the pid.
        std::fs::write(&lock, format!("{me} {start}\n")).unwrap();
        let e = RunLock::take(d.path()).err().unwrap().to_string();
        assert!(e.contains(&format!("in use by process {me}")), "{e}");
        // The same pid with another start time: a new process reusing the
        // pid of a dead writer. Taken over.
        std::fs::write(&lock, format!("{me} {}\n", start + 1)).unwrap();
        let l = RunLock::take(d.path()).unwrap();
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(text, format!("{me} {start}\n"));
        drop(l);
        assert!(!lock.exists(), "removed on drop");
    }
}
