//! THE explicit training loop: data -> batches -> forward -> loss ->
//! backward -> clip -> AdamW -> schedule, with evaluation every N steps,
//! early stopping, best-checkpoint keeping, Ctrl-C and non-finite guards.
//!
//! Structure after nanoGPT's `train.py`: one loop, visible, no callbacks
//! beyond a progress sink. Seeds (Dodge et al. 2020): `seeds.init` draws the
//! new head, `seeds.data` the batch order, `seeds.dropout` the masks.

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

pub use run::{load_run, RunModel};

/// What the loop tells its caller (the CLI draws a progress bar from it).
#[derive(Debug, Clone)]
pub enum Event {
    Info(String),
    Start {
        total_steps: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
    },
    Eval {
        step: usize,
        split: String,
        metrics: BTreeMap<String, f64>,
        best: bool,
    },
}

pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Set by a Ctrl-C handler: save a checkpoint and stop cleanly.
    pub stop: Arc<AtomicBool>,
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

/// Where the base model lives, resolved from `[model]`.
pub fn resolve_model_dir(plan: &Plan) -> Result<PathBuf> {
    let m = &plan.config.model;
    if let Some(a) = &m.asset {
        return crate::hub::assets::resolve_asset_path(a);
    }
    if let Some(p) = &m.path {
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
    let model_dir = resolve_model_dir(plan)?;
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
    let mut run = run::RunWriter::create(run_dir, plan, &raw_cfg, &tok, labels.as_ref(), &head)?;
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
    /// Save the current weights as `<run>/<name>/` (`model`, `checkpoint-last`).
    fn save(&self, store: &ParamStore, name: &str) -> Result<()>;
}

/// The one training loop: batches in seeded order -> loss -> backward (with
/// gradient accumulation) -> clip -> AdamW -> schedule; evaluation every N
/// steps with best-weights keeping and early stopping; Ctrl-C saves and
/// stops; a non-finite loss or gradient stops with a clear error.
pub fn run_loop(
    plan: &Plan,
    opts: &TrainOptions,
    store: &ParamStore,
    obj: &dyn Objective,
    run: &run::RunWriter,
    t0: Instant,
    on: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let c = &plan.config;
    let run_dir = &opts.run_dir;
    let (n_train, n_all) = store.counts();
    let params = store.trainable();
    let t = &c.train;
    let mut opt = AdamW::new(
        params.clone(),
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
    on(Event::Start { total_steps });

    let mut step = 0usize;
    let mut best: Option<(f64, usize, BTreeMap<String, f64>)> = None;
    let mut best_weights: Option<BTreeMap<String, candle_core::Tensor>> = None;
    let mut bad_evals = 0usize;
    let (mut interrupted, mut stopped_early) = (false, false);
    let mut tokens = 0usize;
    let mut window = Instant::now();
    let mut loss_window = (0f64, 0usize);

    let do_eval = |step: usize,
                   best: &mut Option<(f64, usize, BTreeMap<String, f64>)>,
                   best_weights: &mut Option<BTreeMap<String, candle_core::Tensor>>,
                   on: &mut dyn FnMut(Event)|
     -> Result<bool> {
        let m = obj
            .evaluate(Split::Validation)?
            .ok_or_else(|| Error::msg("no validation set"))?;
        let v = *m
            .get(&sel_metric)
            .ok_or_else(|| Error::msg(format!("metric {sel_metric} not computed")))?;
        let min_delta = t.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
        let improved = match best {
            None => true,
            Some((b, _, _)) => metrics::is_better(&sel_metric, v, *b) && (v - *b).abs() > min_delta,
        };
        if improved {
            *best = Some((v, step, m.clone()));
            *best_weights = Some(store.snapshot_trainable()?);
            obj.save(store, "model")?;
        }
        run.log_eval(step, "validation", &m)?;
        on(Event::Eval {
            step,
            split: "validation".into(),
            metrics: m,
            best: improved,
        });
        Ok(improved)
    };

    'outer: for epoch in 0.. {
        if step >= total_steps {
            break;
        }
        let order = EpochOrder::new(train_len, c.seeds.data, epoch as u64);
        let micro: Vec<&[usize]> = order.batches(t.batch_size)?.collect();
        for group in micro.chunks(t.grad_accum) {
            if opts.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break 'outer;
            }
            let drop = DropoutRng::new(c.seeds.dropout, step as u64);
            let mut step_loss = 0f64;
            let group_rows: usize = group.iter().map(|g| g.len()).sum();
            for idx in group {
                let (loss, ntok) = obj.loss(idx, &drop)?;
                tokens += ntok;
                let lv = loss.to_vec0::<f32>()? as f64;
                if !lv.is_finite() {
                    let saved = match &best {
                        Some((_, s, _)) => format!(
                            "the best checkpoint so far (step {s}) is in {}",
                            run_dir.join("model").display()
                        ),
                        None => "no checkpoint was saved (no evaluation had run yet)".into(),
                    };
                    return Err(Error::NonFinite(format!(
                        "loss is {lv} at step {} (epoch {epoch}), with train.lr = {:e}; {saved}",
                        step + 1,
                        t.lr
                    )));
                }
                // Weight each micro-batch by its share of rows.
                let w = idx.len() as f64 / group_rows as f64;
                step_loss += lv * w;
                // Parameter gradients accumulate in their buffers (see
                // nn::GradBuf); candle's store holds only activations' ones.
                let _ = (loss * w)?.backward()?;
            }
            let norm = opt.grad_norm()?;
            if !norm.is_finite() {
                return Err(Error::NonFinite(format!(
                    "gradient norm is {norm} at step {}",
                    step + 1
                )));
            }
            let scale = if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
                t.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let lr = lr_at(t.schedule, t.lr, step, warmup, total_steps);
            opt.step(lr, scale)?;
            step += 1;
            loss_window.0 += step_loss;
            loss_window.1 += 1;
            let elapsed = window.elapsed().as_secs_f64();
            let tps = tokens as f64 / elapsed.max(1e-9);
            on(Event::Step {
                step,
                total_steps,
                epoch,
                loss: step_loss,
                lr,
                tokens_per_s: tps,
            });
            if step % t.log_every == 0 || step == total_steps {
                run.log_step(
                    step,
                    epoch,
                    loss_window.0 / loss_window.1 as f64,
                    lr,
                    norm,
                    tps,
                    t0.elapsed().as_secs_f64(),
                )?;
                loss_window = (0.0, 0);
                tokens = 0;
                window = Instant::now();
            }
            let eval_now = t.eval_every.is_some_and(|e| step % e == 0);
            if eval_now {
                if do_eval(step, &mut best, &mut best_weights, on)? {
                    bad_evals = 0;
                } else {
                    bad_evals += 1;
                    if t.early_stopping
                        .as_ref()
                        .is_some_and(|es| bad_evals >= es.patience)
                    {
                        stopped_early = true;
                        on(Event::Info(format!("early stopping at step {step}: no improvement of {sel_metric} in {bad_evals} evaluations")));
                        break 'outer;
                    }
                }
            }
            if step >= total_steps {
                break 'outer;
            }
        }
        // Without `eval_every`, evaluate at each epoch end.
        if t.eval_every.is_none() {
            if do_eval(step, &mut best, &mut best_weights, on)? {
                bad_evals = 0;
            } else {
                bad_evals += 1;
            }
        }
    }
    if interrupted {
        obj.save(store, "checkpoint-last")?;
        on(Event::Info(format!(
            "interrupted at step {step}: checkpoint saved to {}",
            run_dir.join("checkpoint-last").display()
        )));
    } else if !stopped_early && t.eval_every.is_some_and(|e| step % e != 0) {
        // The steps after the last periodic evaluation count too.
        do_eval(step, &mut best, &mut best_weights, on)?;
    }

    // ---- test with the best-on-validation weights (the ones in model/)
    let mut test = None;
    if !interrupted {
        if let Some(w) = &best_weights {
            store.copy_values_from(w)?;
        }
        if let Some(m) = obj.evaluate(Split::Test)? {
            run.log_eval(step, "test", &m)?;
            on(Event::Eval {
                step,
                split: "test".into(),
                metrics: m.clone(),
                best: false,
            });
            test = Some(m);
        }
    }
    let report = TrainReport {
        run_dir: run_dir.clone(),
        steps: step,
        interrupted,
        stopped_early,
        wall_s: t0.elapsed().as_secs_f64(),
        train_rows: train_len,
        trainable_params: n_train,
        total_params: n_all,
        best_step: best.as_ref().map(|b| b.1),
        best_validation: best.map(|b| b.2).unwrap_or_default(),
        test,
    };
    run.finish(&report)?;
    Ok(report)
}
