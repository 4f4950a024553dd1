//! THE explicit training loop: data -> batches -> forward -> loss ->
//! backward -> clip -> AdamW -> schedule, with evaluation every N steps,
//! early stopping, best-checkpoint keeping, Ctrl-C and non-finite guards.
//!
//! Structure after nanoGPT's `train.py`: one loop, visible, no callbacks
//! beyond a progress sink. Seeds (Dodge et al. 2020): `seeds.init` draws the
//! new head, `seeds.data` the batch order, `seeds.dropout` the masks.

pub mod checkpoint;
pub mod run;
pub mod sft;

use crate::config::Plan;
use crate::data::{self, Batch, DataSpec, EpochOrder, FieldPath, LabelMap, RawExample};
use crate::heads::{HeadConfig, Inputs, SequenceModel, Targets, TaskKind, HEAD_PATTERNS};
use crate::hub::tokenizer::TextTokenizer;
use crate::metrics;
use crate::models::{self, bert::BertConfig};
use crate::nn::DropoutRng;
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::params::{ParamStore, Preset, Selector};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use crate::event::Event;
pub use run::{load_run, RunModel};

pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Set by a Ctrl-C handler: save a checkpoint and stop cleanly.
    pub stop: Arc<AtomicBool>,
    /// Continue the run in `run_dir` from its latest `checkpoint-<step>/`
    /// (the plan must be the one in its config.toml).
    pub resume: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub interrupted: bool,
    pub stopped_early: bool,
    pub wall_s: f64,
    pub train_rows: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    pub best_step: Option<usize>,
    pub best_validation: BTreeMap<String, f64>,
    /// Batches dropped by the non-finite guard (`train.on_non_finite = "skip"`).
    pub skipped_batches: Vec<checkpoint::Skipped>,
    /// The step this process started from (0, or the checkpoint resumed).
    pub resumed_from: Option<usize>,
    /// Test metrics of the best-on-validation weights (those saved in `model/`).
    pub test: Option<BTreeMap<String, f64>>,
}

/// A tokenised example set.
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub types: Vec<Vec<u32>>,
    pub targets: Targets,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The padded model inputs and targets of rows `idx`.
    pub fn batch(&self, idx: &[usize], pad_id: u32) -> Result<(Inputs, Targets, usize)> {
        let rows: Vec<&[u32]> = idx.iter().map(|&i| self.ids[i].as_slice()).collect();
        let types: Vec<&[u32]> = idx.iter().map(|&i| self.types[i].as_slice()).collect();
        let b = Batch::collate(&rows, &types, pad_id)?;
        let tokens = b.num_tokens();
        let mask = b.attention_mask.iter().map(|&m| m as f32).collect();
        let inputs = Inputs::new(b.input_ids, b.type_ids, mask, b.batch, b.seq_len)?;
        let targets = match &self.targets {
            Targets::Classes(c) => Targets::Classes(idx.iter().map(|&i| c[i]).collect()),
            Targets::Values(v) => Targets::Values(idx.iter().map(|&i| v[i]).collect()),
        };
        Ok((inputs, targets, tokens))
    }
}

/// Tokenise examples and map their labels (classification: through `labels`).
pub fn encode(
    tok: &TextTokenizer,
    ex: &[RawExample],
    task: TaskKind,
    labels: Option<&LabelMap>,
    path: &Path,
) -> Result<Encoded> {
    let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let pairs: Option<Vec<Option<&str>>> = if ex.iter().any(|e| e.text_pair.is_some()) {
        Some(ex.iter().map(|e| e.text_pair.as_deref()).collect())
    } else {
        None
    };
    let enc = tok.encode_batch(&texts, pairs.as_deref())?;
    let (ids, types) = enc.into_iter().unzip();
    let targets = match task {
        TaskKind::Classification => {
            let lm = labels.ok_or_else(|| Error::msg("classification needs a label map"))?;
            Targets::Classes(lm.ids(ex, path)?.into_iter().map(|i| i as u32).collect())
        }
        TaskKind::Regression => Targets::Values(
            ex.iter()
                .map(|e| {
                    e.label
                        .as_ref()
                        .and_then(|l| l.as_f64())
                        .map(|v| v as f32)
                        .ok_or_else(|| Error::Line {
                            path: path.to_path_buf(),
                            line: e.line,
                            msg: match &e.label {
                                Some(l) => format!("regression label `{l}` is not a number"),
                                None => "no regression label".into(),
                            },
                        })
                })
                .collect::<Result<_>>()?,
        ),
    };
    Ok(Encoded {
        ids,
        types,
        targets,
    })
}

/// Where the base model lives, resolved from `[model]`; a hub download
/// reports its progress to `on`.
pub fn resolve_model_dir(plan: &Plan, on: &mut dyn FnMut(Event)) -> Result<PathBuf> {
    let m = &plan.config.model;
    if let Some(a) = &m.asset {
        return crate::hub::assets::resolve_asset_path(a);
    }
    if let Some(p) = &m.path {
        if p.is_file() {
            crate::hub::pickle::refuse(p)?;
            return Err(Error::file(
                p,
                "is a file: `model.path` names the model folder (config.json, model.safetensors, tokenizer files)",
            ));
        }
        if !p.is_dir() {
            return Err(Error::file(
                p,
                "model folder does not exist (config `model.path`)",
            ));
        }
        return Ok(p.clone());
    }
    let id = m.hub.as_deref().expect("validated: one model source");
    let cache = crate::hub::assets::cache_dir()?;
    crate::hub::hf::download_model(
        id,
        m.revision.as_deref(),
        &crate::hub::hf::default_hub_cache(&cache),
        on,
    )
}

/// A data path from the config: a file, or `asset:NAME`.
pub fn resolve_data_path(spec: &str) -> Result<PathBuf> {
    match spec.strip_prefix("asset:") {
        Some(name) => crate::hub::assets::resolve_asset_path(name),
        None => {
            let p = PathBuf::from(spec);
            if !p.is_file() {
                return Err(Error::file(&p, "data file does not exist"));
            }
            Ok(p)
        }
    }
}

/// The three example sets of a plan (train / validation / test).
pub struct Splits {
    pub train: (Vec<RawExample>, PathBuf),
    pub validation: (Vec<RawExample>, PathBuf),
    pub test: Option<(Vec<RawExample>, PathBuf)>,
}

pub fn data_spec(plan: &Plan) -> Result<(DataSpec, Option<data::Format>)> {
    let d = &plan.config.data;
    let cfg = |key: &str, e: Error| Error::Config {
        path: plan.config_path.clone(),
        msg: format!("`data.{key}`: {e}"),
    };
    let spec = DataSpec {
        text: FieldPath::parse(&d.text).map_err(|e| cfg("text", e))?,
        text_pair: d
            .text_pair
            .as_deref()
            .map(FieldPath::parse)
            .transpose()
            .map_err(|e| cfg("text_pair", e))?,
        label: Some(FieldPath::parse(&d.label).map_err(|e| cfg("label", e))?),
    };
    let format = d
        .format
        .as_deref()
        .map(|f| match f {
            "jsonl" | "json" => Ok(data::Format::Jsonl),
            "csv" => Ok(data::Format::Csv),
            "tsv" => Ok(data::Format::Tsv),
            other => Err(Error::Config {
                path: plan.config_path.clone(),
                msg: format!("`data.format`: `{other}` is not jsonl, csv or tsv"),
            }),
        })
        .transpose()?;
    Ok((spec, format))
}

/// Read the data files and apply the seeded split.
pub fn load_splits(plan: &Plan) -> Result<Splits> {
    let d = &plan.config.data;
    let (spec, format) = data_spec(plan)?;
    let read = |s: &str| -> Result<(Vec<RawExample>, PathBuf)> {
        let p = resolve_data_path(s)?;
        Ok((data::read_examples(&p, &spec, format)?, p))
    };
    let (all, train_path) = read(&d.train)?;
    let (train, mut validation, mut test) = match d.split {
        Some(ratios) => {
            let s = data::seeded_split(all.len(), ratios, d.split_seed)?;
            let pick = |ix: &[usize]| ix.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
            (
                pick(&s.train),
                Some(pick(&s.validation)),
                Some(pick(&s.test)),
            )
        }
        None => (all, None, None),
    };
    let mut val_path = train_path.clone();
    if let Some(v) = &d.validation {
        let (ex, p) = read(v)?;
        validation = Some(ex);
        val_path = p;
    }
    let mut test_path = train_path.clone();
    if let Some(t) = &d.test {
        let (ex, p) = read(t)?;
        test = Some(ex);
        test_path = p;
    }
    if train.is_empty() {
        return Err(Error::Data(format!(
            "{}: the training split is empty",
            train_path.display()
        )));
    }
    let validation = validation.filter(|v| !v.is_empty()).ok_or_else(|| {
        Error::Data(format!(
            "{}: the validation split is empty",
            val_path.display()
        ))
    })?;
    Ok(Splits {
        train: (train, train_path),
        validation: (validation, val_path),
        test: test.filter(|t| !t.is_empty()).map(|t| (t, test_path)),
    })
}

/// Evaluate `model` on a set: loss and the task's metrics.
pub fn evaluate(
    model: &SequenceModel,
    set: &Encoded,
    pad_id: u32,
    batch_size: usize,
) -> Result<(BTreeMap<String, f64>, Vec<Vec<f32>>)> {
    // Length-sorted batches: far less padding, same metrics.
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by_key(|&i| set.ids[i].len());
    let mut logits_all: Vec<Vec<f32>> = vec![Vec::new(); set.len()];
    let mut loss_sum = 0f64;
    for chunk in order.chunks(batch_size.max(1)) {
        let (inputs, targets, _) = set.batch(chunk, pad_id)?;
        let logits = model.forward(&inputs, None)?;
        let loss = model.loss(&logits, &targets)?.to_vec0::<f32>()? as f64;
        loss_sum += loss * chunk.len() as f64;
        for (row, &i) in logits.to_vec2::<f32>()?.into_iter().zip(chunk) {
            logits_all[i] = row;
        }
    }
    let mut m = BTreeMap::new();
    m.insert("loss".to_string(), loss_sum / set.len().max(1) as f64);
    match &set.targets {
        Targets::Classes(gold) => {
            let pred: Vec<usize> = logits_all.iter().map(|r| argmax(r)).collect();
            let gold: Vec<usize> = gold.iter().map(|&g| g as usize).collect();
            let n = model.head.num_labels;
            m.insert("accuracy".into(), metrics::accuracy(&pred, &gold)?);
            m.insert("macro_f1".into(), metrics::macro_f1(&pred, &gold, n)?);
        }
        Targets::Values(gold) => {
            let pred: Vec<f32> = logits_all.iter().map(|r| r[0]).collect();
            m.insert("mse".into(), metrics::mse(&pred, gold)?);
            m.insert("pearson".into(), metrics::pearson(&pred, gold)?);
        }
    }
    Ok((m, logits_all))
}

pub fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// The selector of a plan's `[freeze]` section.
pub fn selector(plan: &Plan, cfg: &BertConfig) -> Result<Selector> {
    let f = &plan.config.freeze;
    let preset = match f.preset.as_str() {
        "full" => Preset::Full,
        "head_only" => Preset::HeadOnly,
        _ => Preset::LastLayers(f.last_layers.unwrap_or(0)),
    };
    Selector::new(
        preset,
        cfg.num_hidden_layers,
        f.embeddings,
        f.first_layers,
        &f.frozen,
        &f.trainable,
        "bert.",
        HEAD_PATTERNS,
    )
    .map_err(|e| Error::Config {
        path: plan.config_path.clone(),
        msg: format!("`freeze`: {e}"),
    })
}

/// Train as `plan` says, writing the run folder. The one entry point.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    if plan.config.task.kind == crate::config::TaskType::Sft {
        return sft::train_sft(plan, opts, on);
    }
    let t0 = Instant::now();
    let c = &plan.config;
    let run_dir = &opts.run_dir;
    let model_dir = resolve_model_dir(plan, on)?;
    let (mut bert_cfg, raw_cfg) = models::read_bert_config(&model_dir)?;
    if let Some(p) = c.model.hidden_dropout_prob {
        bert_cfg.hidden_dropout_prob = p;
    }
    if let Some(p) = c.model.attention_probs_dropout_prob {
        bert_cfg.attention_probs_dropout_prob = p;
    }
    let sel = selector(plan, &bert_cfg)?;
    let tok = TextTokenizer::from_dir(
        &model_dir,
        c.model.max_length.min(bert_cfg.max_position_embeddings),
    )?;

    // ---- data
    let splits = load_splits(plan)?;
    let task = c
        .task
        .kind
        .head()
        .ok_or_else(|| Error::msg("not a sequence task"))?;
    let labels = match task {
        TaskKind::Classification => {
            Some(LabelMap::from_examples(&splits.train.0, &splits.train.1)?)
        }
        TaskKind::Regression => None,
    };
    let train_set = encode(
        &tok,
        &splits.train.0,
        task,
        labels.as_ref(),
        &splits.train.1,
    )?;
    let val_set = encode(
        &tok,
        &splits.validation.0,
        task,
        labels.as_ref(),
        &splits.validation.1,
    )?;
    let test_set = splits
        .test
        .as_ref()
        .map(|(ex, p)| encode(&tok, ex, task, labels.as_ref(), p))
        .transpose()?;
    on(Event::Info(format!(
        "data: {} train / {} validation / {} test rows{}",
        train_set.len(),
        val_set.len(),
        test_set.as_ref().map_or(0, |t| t.len()),
        labels
            .as_ref()
            .map(|l| format!(", labels {:?}", l.id2label()))
            .unwrap_or_default()
    )));

    // ---- model
    let mut store = models::load_bert_params(&model_dir, sel.clone())?;
    let unmatched = sel.unmatched_user_patterns(
        store.names().chain(HEAD_PATTERNS.iter().copied()),
        &[c.freeze.frozen.clone(), c.freeze.trainable.clone()].concat(),
    );
    if !unmatched.is_empty() {
        return Err(Error::Config {
            path: plan.config_path.clone(),
            msg: format!("`freeze` patterns match no parameter: {unmatched:?}"),
        });
    }
    let head = HeadConfig {
        task,
        pooling: c.task.pooling,
        num_labels: labels.as_ref().map_or(1, |l| l.len()),
        dropout: c
            .task
            .dropout
            .or(bert_cfg.classifier_dropout)
            .unwrap_or(bert_cfg.hidden_dropout_prob),
    };
    let mut model = SequenceModel::build_with_adapter(
        &mut store,
        &bert_cfg,
        &head,
        c.seeds.init,
        c.adapter.as_ref(),
    )?;
    model.bert.gradient_checkpointing = c.train.gradient_checkpointing;
    models::check_unused(&mut store, &mut |w| {
        on(Event::Info(format!("warning: {w}")))
    })?;
    on(Event::Info(store.summary()));

    // ---- run folder
    let mut run = run::RunWriter::create(
        run_dir,
        plan,
        &raw_cfg,
        &tok,
        labels.as_ref(),
        &head,
        opts.resume,
    )?;
    if let Some(ad) = &c.adapter {
        let base = std::fs::canonicalize(&model_dir).unwrap_or(model_dir.clone());
        run.adapter = Some((ad.clone(), base));
        on(Event::Info(format!(
            "adapter: {:?} on {} modules",
            ad.kind,
            store.adapters.len()
        )));
    }

    let obj = Classify {
        model: &model,
        train: &train_set,
        train_lines: splits.train.0.iter().map(|e| e.line).collect(),
        train_path: splits.train.1.clone(),
        validation: &val_set,
        test: test_set.as_ref(),
        pad_id: tok.pad_id(),
        eval_bs: c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2),
        run: &run,
    };
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}

/// Sequence classification / regression as an [`Objective`].
struct Classify<'a> {
    model: &'a SequenceModel,
    train: &'a Encoded,
    /// File line of each training row (for error messages).
    train_lines: Vec<usize>,
    train_path: PathBuf,
    validation: &'a Encoded,
    test: Option<&'a Encoded>,
    pad_id: u32,
    eval_bs: usize,
    run: &'a run::RunWriter,
}

impl Objective for Classify<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(candle_core::Tensor, usize)> {
        let (inputs, targets, ntok) = self.train.batch(idx, self.pad_id)?;
        let logits = self.model.forward(&inputs, Some(drop))?;
        Ok((self.model.loss(&logits, &targets)?, ntok))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        let set = match split {
            Split::Validation => self.validation,
            Split::Test => match self.test {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        Ok(Some(
            evaluate(self.model, set, self.pad_id, self.eval_bs)?.0,
        ))
    }
    fn save(&self, store: &ParamStore, name: &str) -> Result<()> {
        self.run.save_model(store, name)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
        for (ids, types) in self.train.ids.iter().zip(&self.train.types) {
            f.u32s(ids);
            f.u32s(types);
        }
        match &self.train.targets {
            Targets::Classes(c) => f.u32s(c),
            Targets::Values(v) => {
                f.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())
            }
        }
        f.finish()
    }
    fn describe_rows(&self, idx: &[usize]) -> String {
        let mut lines: Vec<usize> = idx.iter().map(|&i| self.train_lines[i]).collect();
        lines.sort_unstable();
        format!(
            "{} line{} {}",
            self.train_path.display(),
            if lines.len() == 1 { "" } else { "s" },
            lines
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// sha256 over the training rows: a resume checks it is on the same data.
pub struct Fingerprint(sha2::Sha256);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    pub fn new() -> Self {
        use sha2::Digest;
        Fingerprint(sha2::Sha256::new())
    }
    pub fn bytes(&mut self, b: &[u8]) {
        use sha2::Digest;
        // Length-prefixed, so [a][bc] and [ab][c] differ.
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    pub fn u32s(&mut self, v: &[u32]) {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    }
    pub fn i64s(&mut self, v: &[i64]) {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    }
    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Which held-out set to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Validation,
    Test,
}

/// What the loop trains: how a micro-batch becomes a loss, how the model is
/// evaluated and saved. The loop itself (below) is the same for every method.
pub trait Objective {
    /// Number of training rows (examples, or packed sequences).
    fn train_len(&self) -> usize;
    /// The mean loss of training rows `idx` (recorded for backward) and the
    /// number of tokens they hold.
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(candle_core::Tensor, usize)>;
    /// Metrics on a held-out split (`loss` among them); None if there is none.
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>>;
    /// Save the current weights as the run's best model (`<run>/model/`, and
    /// `<run>/adapter/` for an adapter run).
    fn save(&self, store: &ParamStore, name: &str) -> Result<()>;
    /// sha256 of the tokenised training rows (see [`Fingerprint`]).
    fn data_fingerprint(&self) -> String;
    /// Where training rows `idx` come from, for error messages.
    fn describe_rows(&self, idx: &[usize]) -> String {
        format!("training rows {idx:?}")
    }
}

/// The one training loop: batches in seeded order -> loss -> backward (with
/// gradient accumulation) -> clip -> AdamW -> schedule; evaluation every N
/// steps (or at each epoch end) with best-weights keeping and early
/// stopping; resumable checkpoints (`checkpoint.rs`); Ctrl-C saves one and
/// stops; a non-finite loss or gradient stops the run, or skips the batch.
pub fn run_loop(
    plan: &Plan,
    opts: &TrainOptions,
    store: &ParamStore,
    obj: &dyn Objective,
    run: &run::RunWriter,
    t0: Instant,
    on: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    use checkpoint::{Best, SeedState, Skipped, TrainerState};
    let c = &plan.config;
    let run_dir = &opts.run_dir;
    let (n_train, n_all) = store.counts();
    let t = &c.train;
    let mut opt = AdamW::new(
        store.trainable(),
        AdamWConfig {
            lr: t.lr,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
    )?;
    let train_len = obj.train_len();
    let micro_per_epoch = train_len.div_ceil(t.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(t.grad_accum);
    let total_steps = t.max_steps.unwrap_or(steps_per_epoch * t.epochs).max(1);
    let warmup = t
        .warmup_steps
        .unwrap_or((t.warmup_ratio * total_steps as f64).ceil() as usize);
    let sel_metric = plan.selection_metric();

    let mut st = TrainerState {
        format: checkpoint::FORMAT,
        step: 0,
        total_steps,
        epoch: 0,
        batch_in_epoch: 0,
        optimizer_step: 0,
        best: None,
        bad_evals: 0,
        last_eval_step: None,
        loss_window: (0.0, 0),
        skipped: Vec::new(),
        metrics_len: 0,
        seeds: SeedState {
            init: c.seeds.init,
            data: c.seeds.data,
            dropout: c.seeds.dropout,
        },
        threads: rayon::current_num_threads(),
        train_rows: train_len,
        data_fingerprint: obj.data_fingerprint(),
    };
    let mut best_weights: Option<BTreeMap<String, candle_core::Tensor>> = None;
    let mut resumed_from = None;
    if opts.resume {
        let (state, best) = resume(&st, store, &mut opt, run, on)?;
        resumed_from = Some(state.step);
        st = state;
        best_weights = best;
    }
    on(Event::Start {
        total_steps,
        step: st.step,
    });

    let (mut interrupted, mut stopped_early) = (false, false);
    let mut tokens = 0usize;
    let mut window = Instant::now();
    let mut last_saved: Option<usize> = None;

    // Evaluate on validation: keep the best weights (and write them to
    // model/), count evaluations without improvement. Returns whether
    // early stopping ends the run.
    let do_eval = |st: &mut TrainerState,
                   best_weights: &mut Option<BTreeMap<String, candle_core::Tensor>>,
                   on: &mut dyn FnMut(Event)|
     -> Result<(bool, bool)> {
        let m = obj
            .evaluate(Split::Validation)?
            .ok_or_else(|| Error::msg("no validation set"))?;
        let v = *m
            .get(&sel_metric)
            .ok_or_else(|| Error::msg(format!("metric {sel_metric} not computed")))?;
        let min_delta = t.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
        let improved = match &st.best {
            None => true,
            Some(b) => {
                metrics::is_better(&sel_metric, v, b.value) && (v - b.value).abs() > min_delta
            }
        };
        st.last_eval_step = Some(st.step);
        if improved {
            checkpoint::check_finite(store, &format!("{}", run_dir.join("model").display()))?;
            st.best = Some(Best {
                value: v,
                step: st.step,
                metrics: m.clone(),
            });
            *best_weights = Some(store.snapshot_trainable()?);
            obj.save(store, "model")?;
            st.bad_evals = 0;
        } else {
            st.bad_evals += 1;
        }
        run.log_eval(st.step, "validation", &m)?;
        on(Event::Eval {
            step: st.step,
            split: "validation".into(),
            metrics: m,
            best: improved,
        });
        let stop = !improved
            && t.early_stopping
                .as_ref()
                .is_some_and(|es| st.bad_evals >= es.patience);
        if stop {
            on(Event::Info(format!(
                "early stopping at step {}: no improvement of {sel_metric} in {} evaluations",
                st.step, st.bad_evals
            )));
        }
        Ok((improved, stop))
    };
    let save_ck = |st: &mut TrainerState, opt: &AdamW| -> Result<()> {
        st.metrics_len = run.metrics_len()?;
        checkpoint::save(run_dir, st, store, opt)?;
        checkpoint::rotate(
            run_dir,
            t.save_total_limit,
            st.best.as_ref().map(|b| b.step),
        )?;
        Ok(())
    };

    'outer: while st.step < total_steps {
        let order = EpochOrder::new(train_len, c.seeds.data, st.epoch as u64);
        let micro: Vec<&[usize]> = order.batches(t.batch_size)?.collect();
        let groups: Vec<&[&[usize]]> = micro.chunks(t.grad_accum).collect();
        if st.batch_in_epoch >= groups.len() {
            return Err(Error::msg(format!(
                "checkpoint position: batch {} of epoch {} holds only {} batches",
                st.batch_in_epoch,
                st.epoch,
                groups.len()
            )));
        }
        for group in &groups[st.batch_in_epoch..] {
            if opts.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break 'outer;
            }
            let drop = DropoutRng::new(c.seeds.dropout, st.step as u64);
            let mut step_loss = 0f64;
            let group_rows: usize = group.iter().map(|g| g.len()).sum();
            let mut bad: Option<String> = None;
            for idx in group.iter() {
                let (loss, ntok) = obj.loss(idx, &drop)?;
                tokens += ntok;
                let lv = loss.to_vec0::<f32>()? as f64;
                if !lv.is_finite() {
                    bad = Some(format!("loss is {lv}"));
                    break;
                }
                // Weight each micro-batch by its share of rows.
                let w = idx.len() as f64 / group_rows as f64;
                step_loss += lv * w;
                // Parameter gradients accumulate in their buffers (see
                // nn::GradBuf); candle's store holds only activations' ones.
                let _ = (loss * w)?.backward()?;
            }
            let norm = match bad {
                Some(_) => f64::NAN,
                None => opt.grad_norm()?,
            };
            if bad.is_none() && !norm.is_finite() {
                bad = Some(format!("gradient norm is {norm}"));
            }
            let lr = lr_at(t.schedule, t.lr, st.step, warmup, total_steps);
            if let Some(what) = bad {
                let rows: Vec<usize> = group.iter().flat_map(|g| g.iter().copied()).collect();
                let at = format!(
                    "at step {} (epoch {}, batch {} of the epoch)",
                    st.step + 1,
                    st.epoch,
                    st.batch_in_epoch + 1
                );
                match t.on_non_finite {
                    crate::config::OnNonFinite::Stop => {
                        let saved = match &st.best {
                            Some(b) => format!(
                                "the best checkpoint so far (step {}) is in {}",
                                b.step,
                                run_dir.join("model").display()
                            ),
                            None => "no checkpoint was saved (no evaluation had run yet)".into(),
                        };
                        return Err(Error::NonFinite(format!(
                            "{what} {at}, on {}, with train.lr = {:e}; {saved}; train.on_non_finite = \"skip\" drops such batches",
                            obj.describe_rows(&rows),
                            t.lr
                        )));
                    }
                    crate::config::OnNonFinite::Skip => {
                        opt.zero_grad();
                        let s = Skipped {
                            step: st.step + 1,
                            reason: what.clone(),
                            rows: obj.describe_rows(&rows),
                        };
                        on(Event::Info(format!(
                            "skipped the batch {at}: {what}, on {}",
                            s.rows
                        )));
                        run.log_skipped(&s)?;
                        st.skipped.push(s);
                    }
                }
            } else {
                let scale = if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
                    t.max_grad_norm / (norm + 1e-6)
                } else {
                    1.0
                };
                opt.step(lr, scale)?;
                st.loss_window.0 += step_loss;
                st.loss_window.1 += 1;
            }
            st.optimizer_step = opt.step;
            st.step += 1;
            st.batch_in_epoch += 1;
            let elapsed = window.elapsed().as_secs_f64();
            let tps = tokens as f64 / elapsed.max(1e-9);
            on(Event::Step {
                step: st.step,
                total_steps,
                epoch: st.epoch,
                loss: step_loss,
                lr,
                tokens_per_s: tps,
            });
            if (st.step % t.log_every == 0 || st.step == total_steps) && st.loss_window.1 > 0 {
                run.log_step(
                    st.step,
                    st.epoch,
                    st.loss_window.0 / st.loss_window.1 as f64,
                    lr,
                    norm,
                    tps,
                    t0.elapsed().as_secs_f64(),
                )?;
                st.loss_window = (0.0, 0);
                tokens = 0;
                window = Instant::now();
            }
            let mut evaluated = None;
            if t.eval_every.is_some_and(|e| st.step % e == 0) {
                evaluated = Some(do_eval(&mut st, &mut best_weights, on)?);
            }
            let epoch_end = st.batch_in_epoch == groups.len();
            if epoch_end {
                st.epoch += 1;
                st.batch_in_epoch = 0;
                // Without `eval_every`, evaluate at each epoch end.
                if t.eval_every.is_none() {
                    evaluated = Some(do_eval(&mut st, &mut best_weights, on)?);
                }
            }
            let (improved, stop) = evaluated.unwrap_or((false, false));
            let due = match t.save_every {
                Some(n) => st.step % n == 0,
                None => evaluated.is_some(),
            };
            if improved || due {
                save_ck(&mut st, &opt)?;
                last_saved = Some(st.step);
            }
            if stop {
                stopped_early = true;
                break 'outer;
            }
            if st.step >= total_steps || epoch_end {
                continue 'outer;
            }
        }
    }
    if interrupted {
        if last_saved != Some(st.step) {
            save_ck(&mut st, &opt)?;
        }
        on(Event::Info(format!(
            "interrupted at step {}: checkpoint saved to {}; continue with `afinar train --resume {}`",
            st.step,
            checkpoint::path(run_dir, st.step).display(),
            run_dir.display()
        )));
    } else if !stopped_early && st.last_eval_step != Some(st.step) {
        // The steps after the last evaluation count too.
        let _ = do_eval(&mut st, &mut best_weights, on)?;
        if last_saved != Some(st.step) {
            save_ck(&mut st, &opt)?;
        }
    }

    // ---- test with the best-on-validation weights (the ones in model/)
    let mut test = None;
    if !interrupted {
        if let Some(w) = &best_weights {
            store.copy_values_from(w)?;
        }
        if let Some(m) = obj.evaluate(Split::Test)? {
            run.log_eval(st.step, "test", &m)?;
            on(Event::Eval {
                step: st.step,
                split: "test".into(),
                metrics: m.clone(),
                best: false,
            });
            test = Some(m);
        }
    }
    if !st.skipped.is_empty() {
        on(Event::Info(format!(
            "{} batch{} skipped by the non-finite guard (listed in results.json)",
            st.skipped.len(),
            if st.skipped.len() == 1 { "" } else { "es" }
        )));
    }
    let report = TrainReport {
        run_dir: run_dir.clone(),
        steps: st.step,
        interrupted,
        stopped_early,
        wall_s: t0.elapsed().as_secs_f64(),
        train_rows: train_len,
        trainable_params: n_train,
        total_params: n_all,
        best_step: st.best.as_ref().map(|b| b.step),
        best_validation: st.best.map(|b| b.metrics).unwrap_or_default(),
        skipped_batches: st.skipped,
        resumed_from,
        test,
    };
    // An interrupted run is not finished: no results.json, so that
    // `--resume` continues it.
    if !interrupted {
        run.finish(&report)?;
    }
    Ok(report)
}

/// Load the latest checkpoint of the run folder into `store` and `opt`,
/// after checking that it belongs to this run (same data, same length).
/// Returns its state and the best weights so far.
#[allow(clippy::type_complexity)]
fn resume(
    fresh: &checkpoint::TrainerState,
    store: &ParamStore,
    opt: &mut AdamW,
    run: &run::RunWriter,
    on: &mut dyn FnMut(Event),
) -> Result<(
    checkpoint::TrainerState,
    Option<BTreeMap<String, candle_core::Tensor>>,
)> {
    let run_dir = run.dir();
    let Some((_, dir)) = checkpoint::list(run_dir)?.pop() else {
        return Err(Error::file(
            run_dir,
            "no checkpoint-<step>/ folder with trainer_state.json: nothing to resume (the run stopped before its first checkpoint; start it again)",
        ));
    };
    let ck = checkpoint::load(&dir)?;
    let st = ck.state;
    let sp = dir.join(checkpoint::STATE_FILE);
    let mismatch = |what: &str, was: String, now: String| {
        Error::file(
            &sp,
            format!("{what} was {was} when the checkpoint was written, it is {now} now: cannot resume on changed {what}"),
        )
    };
    if st.data_fingerprint != fresh.data_fingerprint || st.train_rows != fresh.train_rows {
        return Err(mismatch(
            "training data",
            format!(
                "{} rows (sha256 {})",
                st.train_rows,
                &st.data_fingerprint[..st.data_fingerprint.len().min(12)]
            ),
            format!(
                "{} rows (sha256 {})",
                fresh.train_rows,
                &fresh.data_fingerprint[..fresh.data_fingerprint.len().min(12)]
            ),
        ));
    }
    if st.total_steps != fresh.total_steps {
        return Err(mismatch(
            "the step count",
            st.total_steps.to_string(),
            fresh.total_steps.to_string(),
        ));
    }
    if st.seeds != fresh.seeds {
        return Err(mismatch(
            "seeds",
            format!("{:?}", st.seeds),
            format!("{:?}", fresh.seeds),
        ));
    }
    checkpoint::restore_weights(store, &ck.weights, &dir.join(checkpoint::WEIGHTS_FILE))?;
    opt.load_state(st.optimizer_step, &ck.optimizer)?;
    let best = match &st.best {
        None => None,
        Some(b) if b.step == st.step => Some(store.snapshot_trainable()?),
        Some(b) => {
            let bdir = checkpoint::path(run_dir, b.step);
            let f = bdir.join(checkpoint::WEIGHTS_FILE);
            if !f.is_file() {
                return Err(Error::file(
                    &f,
                    format!("the best weights (step {}) are missing: the best checkpoint must stay beside the one resumed", b.step),
                ));
            }
            let w = checkpoint::read_tensors(&f)?;
            let mut out = BTreeMap::new();
            for (name, p) in store.trainable() {
                let t = w.get(&name).ok_or_else(|| Error::Tensor {
                    name: name.clone(),
                    msg: format!("missing from {}", f.display()),
                })?;
                out.insert(name, t.to_dtype(p.t.dtype())?.to_device(p.t.device())?);
            }
            Some(out)
        }
    };
    run.truncate_metrics(st.metrics_len)?;
    if st.threads != fresh.threads {
        on(Event::Info(format!(
            "warning: the checkpoint was written with {} threads, this process has {}: the loss curve may differ in its last digits (set train.threads)",
            st.threads, fresh.threads
        )));
    }
    on(Event::Info(format!(
        "resumed from {}: step {} of {}, epoch {}, batch {} of the epoch",
        dir.display(),
        st.step,
        st.total_steps,
        st.epoch,
        st.batch_in_epoch
    )));
    Ok((st, best))
}
