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
    tok: TextTokenizer,
    labels: Option<LabelMap>,
    head: HeadConfig,
    max_length: usize,
    metrics: Mutex<std::fs::File>,
}

impl RunWriter {
    pub fn create(
        dir: &Path,
        plan: &Plan,
        base_config: &serde_json::Value,
        tok: &TextTokenizer,
        labels: Option<&LabelMap>,
        head: &HeadConfig,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        fsutil::write_atomic(&dir.join("config.toml"), plan.to_toml()?.as_bytes())?;
        let mpath = dir.join("metrics.jsonl");
        // Truncate: a folder may hold the log of a run that failed (a run
        // that finished is refused by the caller); its lines must not
        // prefix this run's.
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&mpath)
            .map_err(|e| Error::io(&mpath, e))?;
        Ok(RunWriter {
            dir: dir.to_path_buf(),
            base_config: base_config.clone(),
            tok: tok.clone(),
            labels: labels.cloned(),
            head: head.clone(),
            max_length: plan.config.model.max_length,
            metrics: Mutex::new(metrics),
        })
    }

    fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = self.metrics.lock().unwrap();
        writeln!(f, "{v}")
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))
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
    pub fn save_model(&self, store: &ParamStore, name: &str) -> Result<()> {
        save_hf_checkpoint(
            &self.dir.join(name),
            store,
            &self.base_config,
            &self.tok,
            self.labels.as_ref(),
            &self.head,
            self.max_length,
        )
    }

    pub fn finish(&self, report: &TrainReport) -> Result<()> {
        fsutil::write_json(&self.dir.join("results.json"), report)?;
        let text = std::fs::read_to_string(self.dir.join("metrics.jsonl"))
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        crate::plot::plot_run(&records, &self.dir.join("metrics.png"))
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
    store: &ParamStore,
    base: &serde_json::Value,
    tok: &TextTokenizer,
    labels: Option<&LabelMap>,
    head: &HeadConfig,
    max_length: usize,
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let res = (|| -> Result<()> {
        fsutil::write_json(
            &tmp.join("config.json"),
            &hf_config(base, labels, head, max_length),
        )?;
        write_safetensors(
            &tmp.join("model.safetensors"),
            store.iter().map(|(n, p)| (n.clone(), p.tensor.clone())),
        )?;
        tok.save(&tmp)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old.{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Write tensors as safetensors with `{"format": "pt"}` metadata (what
/// transformers expects), atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: impl Iterator<Item = (String, candle_core::Tensor)>,
) -> Result<()> {
    let tensors: Vec<(String, candle_core::Tensor)> = tensors
        .map(|(n, t)| Ok((n, t.contiguous()?)))
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
}

/// Load `path`: a run folder (uses `<run>/model`) or an HF checkpoint folder
/// written by afinar or transformers (`BertForSequenceClassification`).
pub fn load_run(path: &Path) -> Result<RunModel> {
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
    })
}
