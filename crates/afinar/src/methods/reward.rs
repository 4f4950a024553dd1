//! Reward models (`task.type = "reward"`, TRL's `RewardTrainer`): a scalar
//! head on any body scores each (prompt, completion); the Bradley-Terry
//! loss asks the chosen completion to score above the rejected one, plus
//! TRL's `center_rewards_coefficient` term.
//!
//! A batch of B pairs runs as one batch of 2B right-padded sequences (the
//! chosen ones, then the rejected ones). A decoder reads prompt +
//! completion as SFT renders it (chat template, or text + eos) and scores
//! it at the last non-padding token; an encoder (BERT) reads (prompt,
//! completion) as a text pair, a cross-encoder, scored from the pooled
//! [CLS]. Metrics: pair accuracy (`accuracy`), mean margin (`margin`),
//! mean / min / max reward, and TRL's `rewards/*` names.
//!
//! `model/` is the family's `*ForSequenceClassification` folder with
//! `num_labels = 1` (transformers gives the same scores); an adapter run
//! also writes `adapter/` (PEFT, task_type SEQ_CLS). `afinar score` prints
//! the reward of (prompt, completion) rows.

use super::canonical;
use super::classify::{head_config, inputs_of, Saver};
use super::preference::{load_pair_splits, pair_metrics, reward_loss};
use crate::adapters::PeftTask;
use crate::config::Plan;
use crate::data::preference::{encode_completion, PairTokens, PreferenceRows, Truncation, Turns};
use crate::data::sft::SftEncoder;
use crate::event::Event;
use crate::heads::{head_patterns, SequenceModel, TaskKind};
use crate::hub::chat_template::ChatTemplate;
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, Family, LoadOpts};
use crate::nn::DropoutRng;
use crate::params::ParamStore;
use crate::train::{run_loop, Fingerprint, Objective, RunWriter, Split, TrainOptions, TrainReport};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

/// One sequence a reward model scores: token ids and type ids.
#[derive(Debug, Clone)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
}

/// A pair as a reward model reads it, and the line it came from.
#[derive(Debug, Clone)]
pub struct RewardPair {
    pub line: usize,
    pub chosen: Seq,
    pub rejected: Seq,
}

impl From<&PairTokens> for RewardPair {
    fn from(p: &PairTokens) -> Self {
        let seq = |ids: &[u32]| Seq {
            ids: ids.to_vec(),
            types: vec![0; ids.len()],
        };
        RewardPair {
            line: p.line,
            chosen: seq(&p.chosen.ids),
            rejected: seq(&p.rejected.ids),
        }
    }
}

/// The model inputs of `rows` (right-padded with `pad_id`).
fn inputs(rows: &[&Seq], pad_id: u32) -> Result<crate::models::Inputs> {
    let ids: Vec<&[u32]> = rows.iter().map(|s| s.ids.as_slice()).collect();
    let types: Vec<&[u32]> = rows.iter().map(|s| s.types.as_slice()).collect();
    Ok(inputs_of(&ids, &types, pad_id)?.0)
}

/// One reward-model micro-batch: the mean Bradley-Terry loss over its pairs
/// (recorded for backward; `margins`: one per pair, TRL's `margin` column)
/// and its metrics: `rewards/accuracies` (the pair accuracy),
/// `rewards/margins`, `rewards/chosen`, `rewards/rejected`, `loss`.
pub fn reward_batch(
    model: &SequenceModel,
    pairs: &[&RewardPair],
    pad_id: u32,
    margins: Option<&[f32]>,
    center_rewards_coefficient: Option<f64>,
    rng: Option<&DropoutRng>,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let n = pairs.len();
    let rows: Vec<&Seq> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let scores = model.scores(&inputs(&rows, pad_id)?, rng)?; // [2B]
    let (c, r) = (scores.narrow(0, 0, n)?, scores.narrow(0, n, n)?);
    let margin = match margins {
        Some(m) if m.len() != n => {
            return Err(Error::msg(format!(
                "reward: {} margins for {n} pairs",
                m.len()
            )))
        }
        Some(m) => Some(Tensor::from_vec(m.to_vec(), n, &Device::Cpu)?),
        None => None,
    };
    let loss = reward_loss(&c, &r, margin.as_ref(), center_rewards_coefficient)?;
    let mut m = pair_metrics(&c.detach(), &r.detach(), None)?;
    m.push(("loss", loss.to_scalar::<f32>()? as f64));
    Ok((loss, m))
}

/// The scores of `rows`, in batches of `bs` (no graph kept).
pub fn score_rows(
    model: &SequenceModel,
    rows: &[&Seq],
    pad_id: u32,
    bs: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(bs.max(1)) {
        out.extend(
            model
                .scores(&inputs(chunk, pad_id)?, None)?
                .detach()
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// A reward model's metrics on a set of pairs: `loss` (Bradley-Terry,
/// with the centring term when set), `accuracy` (pair accuracy), `margin`
/// (mean chosen - rejected), `reward_mean` / `reward_min` / `reward_max`
/// over every scored completion, and TRL's `rewards/*` names.
pub fn evaluate(
    model: &SequenceModel,
    pairs: &[RewardPair],
    pad_id: u32,
    bs: usize,
    center_rewards_coefficient: Option<f64>,
) -> Result<BTreeMap<String, f64>> {
    if pairs.is_empty() {
        return Err(Error::Data("no pairs to evaluate".into()));
    }
    // Sort by length so each batch pads little.
    let rows: Vec<&Seq> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i].ids.len());
    let sorted: Vec<&Seq> = order.iter().map(|&i| rows[i]).collect();
    let s = score_rows(model, &sorted, pad_id, bs)?;
    let mut scores = vec![0f32; rows.len()];
    for (k, &i) in order.iter().enumerate() {
        scores[i] = s[k];
    }
    let n = pairs.len();
    let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu);
    let (c, r) = (t(&scores[..n])?, t(&scores[n..])?);
    let loss = reward_loss(&c, &r, None, center_rewards_coefficient)?.to_scalar::<f32>()? as f64;
    let mut m: BTreeMap<String, f64> = pair_metrics(&c, &r, None)?
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    m.insert("loss".into(), loss);
    m.insert("accuracy".into(), m["rewards/accuracies"]);
    m.insert("margin".into(), m["rewards/margins"]);
    let all = scores.iter().map(|&x| x as f64);
    m.insert(
        "reward_mean".into(),
        all.clone().sum::<f64>() / scores.len() as f64,
    );
    m.insert(
        "reward_min".into(),
        all.clone().fold(f64::INFINITY, f64::min),
    );
    m.insert("reward_max".into(), all.fold(f64::NEG_INFINITY, f64::max));
    Ok(m)
}

/// How a reward model turns (prompt, completion) into tokens: a decoder as
/// SFT renders it, an encoder as a text pair.
pub struct PairEncoder<'a> {
    pub family: Family,
    pub tok: &'a TextTokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub max_length: usize,
    pub truncation: Truncation,
}

/// A prompt or completion as one text (an encoder's input): chat turns'
/// contents, one per line.
fn flat(t: &Turns) -> String {
    match t {
        Turns::Text(s) => s.clone(),
        Turns::Chat(m) => m
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

impl PairEncoder<'_> {
    fn sft(&self) -> SftEncoder<'_> {
        SftEncoder {
            tokenizer: self.tok.raw(),
            template: self.template,
            eos_id: self.tok.eos_ids().first().copied(),
            max_length: self.max_length,
            overflow: Default::default(),
        }
    }

    /// The sequence of one (prompt, completion), cut to `max_length` as the
    /// truncation mode says (None: left out, `skip`), and whether it was cut
    /// (an encoder's text pair: whether it reached `max_length`, where the
    /// tokenizer cuts).
    pub fn encode(&self, prompt: &Turns, completion: &Turns) -> Result<Option<(Seq, bool)>> {
        if self.family.is_decoder() {
            let t = encode_completion(&self.sft(), prompt, completion)?;
            let mut ids = t.ids;
            let n = ids.len();
            if n > self.max_length {
                match self.truncation {
                    Truncation::Error => {
                        return Err(Error::Data(format!(
                            "prompt + completion is {n} tokens, longer than max_length {} \
                             (data.truncation_mode = \"keep_start\" or \"keep_end\" cuts it, \"skip\" leaves it out)",
                            self.max_length
                        )))
                    }
                    Truncation::Skip => return Ok(None),
                    Truncation::KeepStart => ids.truncate(self.max_length),
                    Truncation::KeepEnd => ids = ids[n - self.max_length..].to_vec(),
                }
            }
            let types = vec![0; ids.len()];
            Ok(Some((Seq { ids, types }, n > self.max_length)))
        } else {
            // The tokenizer cuts a text pair to max_length (longest first).
            let (p, c) = (flat(prompt), flat(completion));
            let mut e = self
                .tok
                .encode_batch(&[p.as_str()], Some(&[Some(c.as_str())]))?;
            let (ids, types) = e.remove(0);
            let cut = ids.len() >= self.max_length;
            Ok(Some((Seq { ids, types }, cut)))
        }
    }

    /// Every pair of `rows`; errors name `file:line`. Logs what was cut or left out.
    pub fn encode_rows(&self, rows: &PreferenceRows) -> Result<(Vec<RewardPair>, String)> {
        let (mut out, mut cut, mut skipped) = (Vec::new(), 0usize, 0usize);
        for p in &rows.rows {
            let at = |e: Error| Error::Line {
                path: rows.path.clone(),
                line: p.line,
                msg: e.to_string(),
            };
            let c = self.encode(&p.prompt, &p.chosen).map_err(at)?;
            let r = self.encode(&p.prompt, &p.rejected).map_err(at)?;
            let (Some((c, cut_c)), Some((r, cut_r))) = (c, r) else {
                skipped += 1;
                continue;
            };
            cut += usize::from(cut_c || cut_r);
            out.push(RewardPair {
                line: p.line,
                chosen: c,
                rejected: r,
            });
        }
        let how = if self.family.is_decoder() {
            format!("truncation {:?}", self.truncation)
        } else {
            "text pairs reaching it, cut by the tokenizer's longest_first".into()
        };
        let note = format!(
            "{} pairs, {} kept, {cut} cut to max_length {} ({how}), {skipped} skipped",
            rows.rows.len(),
            out.len(),
            self.max_length
        );
        Ok((out, note))
    }
}

/// A reward model as an [`Objective`].
struct Reward<'a> {
    model: &'a SequenceModel,
    train: &'a [RewardPair],
    train_path: std::path::PathBuf,
    validation: &'a [RewardPair],
    tests: &'a [(String, Vec<RewardPair>)],
    pad_id: u32,
    eval_bs: usize,
    center: Option<f64>,
    saver: Saver,
    /// Training metrics since the last log line: sums and a count.
    seen: RefCell<(BTreeMap<String, f64>, usize)>,
}

impl Objective for Reward<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(Tensor, usize)> {
        let pairs: Vec<&RewardPair> = idx.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| p.chosen.ids.len() + p.rejected.ids.len())
            .sum();
        let (loss, m) = reward_batch(
            self.model,
            &pairs,
            self.pad_id,
            None,
            self.center,
            Some(drop),
        )?;
        accumulate(&self.seen, &m);
        Ok((loss, tokens))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        let ev = |p: &[RewardPair]| evaluate(self.model, p, self.pad_id, self.eval_bs, self.center);
        match split {
            Split::Validation => Ok(Some(ev(self.validation)?)),
            Split::Test => {
                if self.tests.is_empty() {
                    return Ok(None);
                }
                let mut m = BTreeMap::new();
                for (name, pairs) in self.tests {
                    for (k, v) in ev(pairs)? {
                        let key = if name == "test" {
                            k
                        } else {
                            format!("{name}_{k}")
                        };
                        m.insert(key, v);
                    }
                }
                Ok(Some(m))
            }
        }
    }
    fn save(&self, store: &ParamStore) -> Result<()> {
        self.saver.save(store)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
        for p in self.train {
            for s in [&p.chosen, &p.rejected] {
                f.u32s(&s.ids);
                f.u32s(&s.types);
            }
        }
        f.finish()
    }
    fn describe_rows(&self, idx: &[usize]) -> String {
        describe(&self.train_path, idx.iter().map(|&i| self.train[i].line))
    }
    fn train_metrics(&self) -> Option<BTreeMap<String, f64>> {
        drain(&self.seen)
    }
}

/// Add one micro-batch's metrics to the running sums.
pub(crate) fn accumulate(seen: &RefCell<(BTreeMap<String, f64>, usize)>, m: &[(&str, f64)]) {
    let mut s = seen.borrow_mut();
    // The step's own line carries the loss.
    for (k, v) in m.iter().filter(|(k, _)| *k != "loss") {
        *s.0.entry(k.to_string()).or_insert(0.0) += v;
    }
    s.1 += 1;
}

/// The means of the metrics summed since the last call.
pub(crate) fn drain(
    seen: &RefCell<(BTreeMap<String, f64>, usize)>,
) -> Option<BTreeMap<String, f64>> {
    let (sums, n) = std::mem::take(&mut *seen.borrow_mut());
    (n > 0).then(|| sums.into_iter().map(|(k, v)| (k, v / n as f64)).collect())
}

/// "FILE lines 3, 7" for the pairs at `lines`.
pub(crate) fn describe(path: &std::path::Path, lines: impl Iterator<Item = usize>) -> String {
    let mut l: Vec<usize> = lines.collect();
    l.sort_unstable();
    format!(
        "pairs at {} line{} {}",
        path.display(),
        if l.len() == 1 { "" } else { "s" },
        l.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The chat template a tokenizer carries, if any.
pub fn template_of(tok: &TextTokenizer) -> Result<Option<ChatTemplate>> {
    let specials = tok.specials.clone().unwrap_or_default();
    specials
        .chat_template
        .as_deref()
        .map(|t| ChatTemplate::new(t, &specials.bos_token, &specials.eos_token))
        .transpose()
}

/// Train a reward model as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let model_path = c.model.source().resolve(on)?;
    let (mut cfg, _) = models::load::peek_config(&model_path)?;
    // TRL's `disable_dropout`: off unless the config sets it.
    cfg.set_dropout(
        c.model.hidden_dropout_prob.or(Some(0.0)),
        c.model.attention_probs_dropout_prob.or(Some(0.0)),
    );
    let family = cfg.family();
    let head_pats = head_patterns(family);
    let sel = super::selector(plan, &cfg, head_pats)?;
    let loaded = models::load_model(
        &model_path,
        sel,
        LoadOpts {
            quantized: false,
            max_length: Some(c.model.max_length),
        },
    )?;
    let (raw_cfg, tok, mut store) = (loaded.raw_config, loaded.tokenizer, loaded.store);
    let max_length = c.model.max_length.min(cfg.max_positions());

    // ---- data
    let splits = load_pair_splits(plan)?;
    let template = template_of(&tok)?;
    let enc = PairEncoder {
        family,
        tok: &tok,
        template: template.as_ref(),
        max_length,
        // TRL's RewardTrainer leaves out pairs over max_length.
        truncation: c.data.truncation_mode.unwrap_or(Truncation::Skip),
    };
    let mut encode = |rows: &PreferenceRows, what: &str| -> Result<Vec<RewardPair>> {
        let (p, note) = enc.encode_rows(rows)?;
        on(Event::Info(format!("data ({what}): {note}")));
        Ok(p)
    };
    let train_set = encode(&splits.train, "train")?;
    if train_set.is_empty() {
        return Err(Error::Data(format!("{}: no training pairs", c.data.train)));
    }
    let val_set = encode(&splits.validation, "validation")?;
    let mut tests = Vec::new();
    if let Some(t) = &splits.test {
        tests.push(("test".to_string(), encode(t, "test")?));
    }
    for (name, rows) in &splits.heldout {
        tests.push((name.clone(), encode(rows, name)?));
    }

    // ---- model: body + scalar head (+ adapter)
    let head = head_config(plan, &cfg, TaskKind::Scalar, 1)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
    SequenceModel::init_head(&mut store, &cfg, &head, &mut rng)?;
    let adapter = super::attach_adapter(plan, &mut store, family, PeftTask::SeqCls, &mut rng, on)?;
    let mut model = SequenceModel::build(&store, &cfg, &head, tok.pad_id())?;
    model.set_gradient_checkpointing(c.train.gradient_checkpointing);
    models::check_unused(&mut store, models::other_heads(family, false), &mut |w| {
        on(Event::Warning(w))
    })?;
    on(Event::Info(store.summary()));

    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let obj = Reward {
        model: &model,
        train: &train_set,
        train_path: splits.train.path.clone(),
        validation: &val_set,
        tests: &tests,
        pad_id: tok.pad_id(),
        eval_bs: c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2),
        center: c.reward.as_ref().and_then(|r| r.center_rewards_coefficient),
        saver: Saver {
            dir: opts.run_dir.clone(),
            family,
            base_config: raw_cfg,
            tok: tok.clone(),
            labels: None,
            head,
            max_length,
            adapter: adapter.map(|a| (a, canonical(&model_path))),
        },
        seen: RefCell::new(Default::default()),
    };
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}

/// `afinar eval` of a reward run: its metrics on the pairs of `data` (or
/// of its test split), with the weights in `<run>/model`.
pub fn eval_run(
    rm: &crate::runs::RunModel,
    plan: &Plan,
    data: Option<&std::path::Path>,
) -> Result<(usize, BTreeMap<String, f64>)> {
    let rows = super::preference::pairs_to_evaluate(plan, data)?;
    let template = template_of(&rm.tok)?;
    let enc = PairEncoder {
        family: rm.cfg.family(),
        tok: &rm.tok,
        template: template.as_ref(),
        max_length: rm.max_length,
        truncation: plan.config.data.truncation_mode.unwrap_or(Truncation::Skip),
    };
    let (pairs, _) = enc.encode_rows(&rows)?;
    let center = plan
        .config
        .reward
        .as_ref()
        .and_then(|r| r.center_rewards_coefficient);
    Ok((
        pairs.len(),
        evaluate(&rm.model, &pairs, rm.tok.pad_id(), 16, center)?,
    ))
}

/// The reward of each (prompt, completion) row of a JSONL file (fields
/// `prompt` and `completion`, each a string or chat messages), with its line.
pub fn score_file(
    rm: &crate::runs::RunModel,
    path: &std::path::Path,
    truncation: Truncation,
) -> Result<Vec<(usize, f32)>> {
    let recs = crate::data::read_records(path, Some(crate::data::Format::Jsonl))?;
    let template = template_of(&rm.tok)?;
    // Scoring leaves no row out: a row over max_length is an error then.
    let truncation = match truncation {
        Truncation::Skip => Truncation::Error,
        t => t,
    };
    let enc = PairEncoder {
        family: rm.cfg.family(),
        tok: &rm.tok,
        template: template.as_ref(),
        max_length: rm.max_length,
        truncation,
    };
    let mut seqs = Vec::with_capacity(recs.rows.len());
    for rec in &recs.rows {
        let at = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line: rec.line,
            msg,
        };
        let field = |name: &str| -> Result<Turns> {
            let fp = crate::data::FieldPath::parse(name)?;
            let v = rec.lookup(&fp).map_err(|e| at(format!("`{name}`: {e}")))?;
            match v {
                serde_json::Value::String(s) => Ok(Turns::Text(s.clone())),
                serde_json::Value::Array(_) => Ok(Turns::Chat(
                    crate::data::sft::parse_messages(v, &fp).map_err(&at)?,
                )),
                _ => Err(at(format!(
                    "`{name}` must be a string or a list of messages"
                ))),
            }
        };
        let (p, c) = (field("prompt")?, field("completion")?);
        let s = enc
            .encode(&p, &c)
            .map_err(|e| at(e.to_string()))?
            .ok_or_else(|| at("longer than max_length".into()))?;
        seqs.push((rec.line, s.0));
    }
    let rows: Vec<&Seq> = seqs.iter().map(|(_, s)| s).collect();
    let scores = score_rows(&rm.model, &rows, rm.tok.pad_id(), 16)?;
    Ok(seqs.iter().map(|(l, _)| *l).zip(scores).collect())
}
