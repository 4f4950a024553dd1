//! Sequence classification and regression (`task.type = "classification"`
//! / `"regression"`): a new head on a pretrained body of any family
//! (`heads::SequenceModel`), cross-entropy or MSE, accuracy / macro-F1 or
//! MSE / Pearson on held-out rows. The whole model, the layers `[freeze]`
//! leaves, or an adapter (+ the head, PEFT's `modules_to_save`) train.
//!
//! The saved `model/` is the family's `*ForSequenceClassification` folder
//! (transformers loads it with the same logits); an adapter run also writes
//! `adapter/` as PEFT does (task_type SEQ_CLS).

use super::canonical;
use crate::adapters::{peft, AdapterConfig, PeftTask};
use crate::config::Plan;
use crate::data::{self, Batch, DataSpec, FieldPath, LabelMap, RawExample};
use crate::event::Event;
use crate::export;
use crate::heads::{head_patterns, HeadConfig, Pooling, SequenceModel, Targets, TaskKind};
use crate::hub::tokenizer::TextTokenizer;
use crate::metrics;
use crate::models::{self, Family, Inputs, LoadOpts, ModelConfig};
use crate::nn::DropoutRng;
use crate::params::ParamStore;
use crate::train::{run_loop, Fingerprint, Objective, RunWriter, Split, TrainOptions, TrainReport};
use crate::{Error, Result};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
        let (inputs, tokens) = inputs_of(&rows, &types, pad_id)?;
        let targets = match &self.targets {
            Targets::Classes(c) => Targets::Classes(idx.iter().map(|&i| c[i]).collect()),
            Targets::Values(v) => Targets::Values(idx.iter().map(|&i| v[i]).collect()),
        };
        Ok((inputs, targets, tokens))
    }
}

/// Right-padded model inputs of token rows (and their type ids), and the
/// number of real tokens.
pub fn inputs_of(rows: &[&[u32]], types: &[&[u32]], pad_id: u32) -> Result<(Inputs, usize)> {
    let b = Batch::collate(rows, types, pad_id)?;
    let tokens = b.num_tokens();
    let mask = b.attention_mask.iter().map(|&m| m as f32).collect();
    let inputs = Inputs::new(b.input_ids, mask, b.batch, b.seq_len)?.with_type_ids(b.type_ids)?;
    Ok((inputs, tokens))
}

/// Token ids and type ids of examples (text, and text pair when any has one).
pub fn tokenise(tok: &TextTokenizer, ex: &[RawExample]) -> Result<(Vec<Vec<u32>>, Vec<Vec<u32>>)> {
    let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let pairs: Option<Vec<Option<&str>>> = ex
        .iter()
        .any(|e| e.text_pair.is_some())
        .then(|| ex.iter().map(|e| e.text_pair.as_deref()).collect());
    Ok(tok
        .encode_batch(&texts, pairs.as_deref())?
        .into_iter()
        .unzip())
}

/// Tokenise examples and map their labels (classification: through `labels`).
pub fn encode(
    tok: &TextTokenizer,
    ex: &[RawExample],
    task: TaskKind,
    labels: Option<&LabelMap>,
    path: &Path,
) -> Result<Encoded> {
    let (ids, types) = tokenise(tok, ex)?;
    let targets = match task {
        TaskKind::Classification => {
            let lm = labels.ok_or_else(|| Error::msg("classification needs a label map"))?;
            Targets::Classes(lm.ids(ex, path)?.into_iter().map(|i| i as u32).collect())
        }
        TaskKind::Scalar => {
            return Err(Error::msg(
                "a scalar head has no targets in the data: its objective scores it",
            ))
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

/// The three example sets of a plan (train / validation / test).
pub struct Splits {
    pub train: (Vec<RawExample>, PathBuf),
    pub validation: (Vec<RawExample>, PathBuf),
    pub test: Option<(Vec<RawExample>, PathBuf)>,
}

/// The fields a plan reads from each row, and the file format it names.
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
    Ok((spec, d.format))
}

/// The rows of a data file that make one split.
#[derive(Clone)]
pub struct SplitRows {
    pub records: std::sync::Arc<data::Records>,
    /// Row indices into `records.rows`, in order.
    pub idx: Vec<usize>,
}

/// The rows of the three splits, before they become examples (weak
/// supervision's rules read other fields of them).
pub struct SplitSources {
    pub train: SplitRows,
    pub validation: SplitRows,
    pub test: Option<SplitRows>,
}

/// Read the data files and apply the seeded split, keeping the rows.
pub fn load_sources(plan: &Plan) -> Result<SplitSources> {
    let d = &plan.config.data;
    let read = |s: &str| -> Result<std::sync::Arc<data::Records>> {
        let p = data::resolve_file(s)?;
        Ok(std::sync::Arc::new(data::read_records(&p, d.format)?))
    };
    let all = read(&d.train)?;
    let whole = |r: &std::sync::Arc<data::Records>| SplitRows {
        records: r.clone(),
        idx: (0..r.rows.len()).collect(),
    };
    // `data.max_rows`: a seeded sample of the file's rows, in file order.
    let base = data::sample_rows(all.rows.len(), d.max_rows, d.split_seed);
    let (train, mut validation, mut test) = match d.split {
        Some(ratios) => {
            let s = data::seeded_split(base.len(), ratios, d.split_seed)?;
            let part = |ix: Vec<usize>| SplitRows {
                records: all.clone(),
                idx: ix.into_iter().map(|i| base[i]).collect(),
            };
            (part(s.train), Some(part(s.validation)), Some(part(s.test)))
        }
        None => (
            SplitRows {
                records: all.clone(),
                idx: base,
            },
            None,
            None,
        ),
    };
    if let Some(v) = &d.validation {
        validation = Some(whole(&read(v)?));
    }
    if let Some(t) = &d.test {
        test = Some(whole(&read(t)?));
    }
    if train.idx.is_empty() {
        return Err(Error::Data(format!(
            "{}: the training split is empty",
            all.path.display()
        )));
    }
    let validation = validation.filter(|v| !v.idx.is_empty()).ok_or_else(|| {
        Error::Data(format!(
            "{}: the validation split is empty",
            d.validation
                .as_deref()
                .map_or(all.path.clone(), PathBuf::from)
                .display()
        ))
    })?;
    Ok(SplitSources {
        train,
        validation,
        test: test.filter(|t| !t.idx.is_empty()),
    })
}

/// The examples of a split's rows; with `data.mail` the text is the mail's
/// subject and body text.
pub fn examples_of(plan: &Plan, rows: &SplitRows) -> Result<(Vec<RawExample>, PathBuf)> {
    let (spec, _) = data_spec(plan)?;
    let all = data::examples_from_records(&rows.records, &spec)?;
    let mut ex: Vec<RawExample> = rows.idx.iter().map(|&i| all[i].clone()).collect();
    if plan.config.data.mail {
        for e in &mut ex {
            e.text = crate::weak::mail::Mail::parse(&e.text).model_text();
        }
    }
    Ok((ex, rows.records.path.clone()))
}

/// Read the data files and apply the seeded split.
pub fn load_splits(plan: &Plan) -> Result<Splits> {
    let s = load_sources(plan)?;
    Ok(Splits {
        train: examples_of(plan, &s.train)?,
        validation: examples_of(plan, &s.validation)?,
        test: s.test.as_ref().map(|t| examples_of(plan, t)).transpose()?,
    })
}

/// Evaluate `model` on a set: loss and the task's metrics, and every row's
/// logits.
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

/// The head a plan asks for on a model of `cfg`.
pub fn head_config(
    plan: &Plan,
    cfg: &ModelConfig,
    task: TaskKind,
    num_labels: usize,
) -> Result<HeadConfig> {
    let c = &plan.config;
    let family = cfg.family();
    let pooling = c.task.pooling.unwrap_or(Pooling::default_for(family));
    pooling.check(family).map_err(|e| Error::Config {
        path: plan.config_path.clone(),
        msg: format!("`task.pooling`: {e}"),
    })?;
    Ok(HeadConfig {
        task,
        pooling,
        num_labels,
        dropout: c.task.dropout.unwrap_or(cfg.head_dropout()),
    })
}

/// What a classification run saves as its model.
pub struct Saver {
    pub dir: PathBuf,
    pub family: Family,
    pub base_config: serde_json::Value,
    pub tok: TextTokenizer,
    pub labels: Option<LabelMap>,
    pub head: HeadConfig,
    pub max_length: usize,
    /// Adapter runs: the adapter config and the base model (folder or file).
    pub adapter: Option<(AdapterConfig, PathBuf)>,
}

impl Saver {
    /// `<run>/model/` as the family's `*ForSequenceClassification` folder
    /// (adapters merged in), and for an adapter run `<run>/adapter/` (PEFT).
    pub fn save(&self, store: &ParamStore) -> Result<()> {
        let id2label = self.labels.as_ref().map(|l| l.id2label().to_vec());
        if let Some((cfg, base)) = &self.adapter {
            let note = serde_json::json!({
                "base_model_dir": base,
                "id2label": id2label,
                "head": self.head,
                "max_length": self.max_length,
            });
            export::write_adapter_folder(
                &self.dir.join("adapter"),
                store,
                cfg,
                base,
                PeftTask::SeqCls,
                peft::HEAD_META,
                &note,
            )?;
        }
        let config = export::seq_cls_config(
            &self.base_config,
            self.family,
            id2label.as_deref(),
            &self.head,
            self.tok.pad_id(),
            self.max_length,
        );
        export::write_model_folder(
            &self.dir.join("model"),
            export::model_tensors(store)?,
            &config,
            self.family,
            &self.tok,
        )
    }
}

/// Sequence classification / regression as an [`Objective`].
pub(crate) struct Classify<'a> {
    pub(crate) model: &'a SequenceModel,
    pub(crate) train: &'a Encoded,
    /// File line of each training row (for error messages).
    pub(crate) train_lines: Vec<usize>,
    pub(crate) train_path: PathBuf,
    pub(crate) validation: &'a Encoded,
    pub(crate) test: Option<&'a Encoded>,
    pub(crate) pad_id: u32,
    pub(crate) eval_bs: usize,
    pub(crate) saver: Saver,
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
    fn save(&self, store: &ParamStore) -> Result<()> {
        self.saver.save(store)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
        for (ids, types) in self.train.ids.iter().zip(&self.train.types) {
            f.u32s(ids);
            f.u32s(types);
        }
        match &self.train.targets {
            Targets::Classes(c) => f.u32s(c),
            Targets::Values(v) => f.f32s(v),
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

/// A loaded body with its new head (and adapter), ready to build a
/// [`SequenceModel`] over `store` (then [`check_unused`] says what the
/// model did not read).
pub(crate) struct Classifier {
    pub model_path: PathBuf,
    pub family: Family,
    pub raw_cfg: serde_json::Value,
    pub tok: TextTokenizer,
    pub store: ParamStore,
    pub head: HeadConfig,
    pub adapter: Option<AdapterConfig>,
}

/// Load the plan's model and put a new head of `num_labels` outputs on it
/// (`seeds.init`), with the plan's freezing and adapter.
pub(crate) fn load_classifier(
    plan: &Plan,
    task: TaskKind,
    num_labels: usize,
    on: &mut dyn FnMut(Event),
) -> Result<(Classifier, SequenceModel)> {
    let c = &plan.config;
    let model_path = c.model.source().resolve(on)?;
    let (mut cfg, _) = models::load::peek_config(&model_path)?;
    cfg.set_dropout(
        c.model.hidden_dropout_prob,
        c.model.attention_probs_dropout_prob,
    );
    let family = cfg.family();
    let head_pats = head_patterns(family);
    let sel = super::selector(plan, &cfg, head_pats)?;
    let loaded = models::load_model(
        &model_path,
        sel.clone(),
        LoadOpts {
            quantized: false,
            max_length: Some(c.model.max_length),
        },
    )?;
    let (raw_cfg, tok, mut store) = (loaded.raw_config, loaded.tokenizer, loaded.store);
    let unmatched = sel.unmatched_user_patterns(
        store.names().chain(head_pats.iter().copied()),
        &[c.freeze.frozen.clone(), c.freeze.trainable.clone()].concat(),
    );
    if !unmatched.is_empty() {
        return Err(Error::Config {
            path: plan.config_path.clone(),
            msg: format!("`freeze` patterns match no parameter: {unmatched:?}"),
        });
    }
    let head = head_config(plan, &cfg, task, num_labels)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
    SequenceModel::init_head(&mut store, &cfg, &head, &mut rng)?;
    let adapter = super::attach_adapter(plan, &mut store, family, PeftTask::SeqCls, &mut rng, on)?;
    let mut model = SequenceModel::build(&store, &cfg, &head, tok.pad_id())?;
    model.set_gradient_checkpointing(c.train.gradient_checkpointing);
    // The checkpoint's tensors the model did not read are an error
    // (another family's head is a warning).
    models::check_unused(&mut store, models::other_heads(family, false), &mut |w| {
        on(Event::Warning(w))
    })?;
    on(Event::Info(store.summary()));
    let cl = Classifier {
        model_path,
        family,
        raw_cfg,
        tok,
        store,
        head,
        adapter,
    };
    Ok((cl, model))
}

impl Classifier {
    /// What saves this classifier's `model/` (and `adapter/`) into `dir`.
    pub(crate) fn saver(&self, dir: &Path, labels: Option<LabelMap>) -> Saver {
        Saver {
            dir: dir.to_path_buf(),
            family: self.family,
            base_config: self.raw_cfg.clone(),
            tok: self.tok.clone(),
            labels,
            head: self.head.clone(),
            max_length: self.tok.max_length(),
            adapter: self
                .adapter
                .clone()
                .map(|a| (a, canonical(&self.model_path))),
        }
    }
}

/// Train a sequence classifier / regressor as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    if c.task.weak != crate::config::WeakMode::Off {
        return super::cosine::train(plan, opts, on);
    }
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
        TaskKind::Regression | TaskKind::Scalar => None,
    };
    // ---- model: body + new head (+ adapter)
    let (cl, model) = load_classifier(plan, task, labels.as_ref().map_or(1, |l| l.len()), on)?;
    let tok = &cl.tok;
    let enc = |(ex, p): &(Vec<RawExample>, PathBuf)| encode(tok, ex, task, labels.as_ref(), p);
    let train_set = enc(&splits.train)?;
    let val_set = enc(&splits.validation)?;
    let test_set = splits.test.as_ref().map(enc).transpose()?;
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

    // ---- run folder
    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let obj = Classify {
        model: &model,
        train: &train_set,
        train_lines: splits.train.0.iter().map(|e| e.line).collect(),
        train_path: splits.train.1.clone(),
        validation: &val_set,
        test: test_set.as_ref(),
        pad_id: tok.pad_id(),
        eval_bs: c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2),
        saver: cl.saver(&opts.run_dir, labels),
    };
    run_loop(plan, opts, &cl.store, &obj, &run, t0, on)
}
