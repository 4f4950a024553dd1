//! DPO (Rafailov et al. 2023; `task.type = "dpo"`) as TRL's `DPOTrainer`
//! computes it: the policy's log-probabilities of the chosen and rejected
//! completions against a reference's, with the `sigmoid`, `hinge` and `ipo`
//! losses and TRL's logged metrics (`rewards/*`, `logps/*`).
//!
//! A batch of B pairs runs as one batch of 2B sequences (the chosen ones,
//! then the rejected ones, right-padded) through the policy; each
//! completion's log-probability comes from the fused per-token head
//! ([`CausalLm::completion_logps`]). The reference is the same model with
//! its adapters switched off (adapter runs: no copy), a frozen copy of the
//! base (full fine-tuning), or log-probabilities computed once before the
//! first step (`dpo.precompute_ref_log_probs`: kept in the run folder as
//! `ref_logps.json`, reused on resume; full fine-tuning then holds no copy).
//! Dropout is off unless the config sets it (TRL's `disable_dropout`).
//!
//! Validation: the DPO loss and metrics on held-out pairs. Test: the same,
//! the perplexity of the chosen completions and exact match of greedy
//! answers against the chosen completion, on the test pairs and on each
//! held-out task, before and after training. `model/` and `adapter/` are
//! written as SFT writes them.

use super::canonical;
use super::preference::{dpo_loss, load_pair_splits, pair_metrics, DpoLossType, PairLogps};
use super::reward::{accumulate, describe, drain, template_of};
use super::sft::{exact_match, Saver, Scored};
use crate::adapters::PeftTask;
use crate::config::{DpoSection, Plan};
use crate::data::preference::{encode_pairs, PairTokens, PreferencePair, Turns};
use crate::data::sft::{pad_batch, SftBatch, SftEncoder, SftExample, IGNORE_INDEX};
use crate::event::Event;
use crate::fsutil;
use crate::heads::CausalLm;
use crate::hub::chat_template::ChatTemplate;
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, Inputs, LoadOpts, LoadedModel};
use crate::nn::DropoutRng;
use crate::params::{ParamStore, Selector};
use crate::train::{run_loop, Fingerprint, Objective, RunWriter, Split, TrainOptions, TrainReport};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Where the reference log-probabilities come from.
pub enum Reference<'a> {
    /// The policy itself with every adapter of `store` switched off.
    AdaptersDisabled(&'a ParamStore),
    /// A frozen copy of the model as loaded (full fine-tuning).
    Model(&'a CausalLm),
    /// Computed once beforehand: `(chosen, rejected)` per pair of the batch,
    /// summed over the completion's tokens (IPO's average is taken here).
    Precomputed(&'a [(f32, f32)]),
}

/// The 2B-row batch of B pairs: chosen sequences, then rejected ones.
pub fn pair_batch(pairs: &[&PairTokens], pad_id: u32) -> Result<SftBatch> {
    let rows: Vec<_> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    pad_batch(&rows, pad_id)
}

/// The completion log-probabilities `[2B]` of a pair batch (chosen rows
/// first), summed or averaged (IPO), and each row's token count.
fn logps(
    lm: &CausalLm,
    b: &SftBatch,
    average: bool,
    rng: Option<&DropoutRng>,
) -> Result<(Tensor, Vec<usize>)> {
    let hidden = lm.forward(&Inputs::from_sft_batch(b)?, rng)?;
    lm.completion_logps(&hidden, &b.labels, average)
}

/// Each row's completion token count (the labels shifted as the loss does).
fn counts(b: &SftBatch) -> Vec<usize> {
    b.labels
        .chunks(b.seq_len)
        .map(|r| r.iter().skip(1).filter(|&&y| y != IGNORE_INDEX).count())
        .collect()
}

/// The reference log-probabilities of a pair batch, `(chosen [B], rejected [B])`,
/// summed over each completion, outside the graph.
pub fn reference_logps(
    lm: &CausalLm,
    reference: &Reference,
    b: &SftBatch,
) -> Result<(Tensor, Tensor)> {
    let n = b.batch / 2;
    let all = match reference {
        Reference::AdaptersDisabled(store) => store
            .with_adapters_off(|| logps(lm, b, false, None))?
            .0
            .detach(),
        Reference::Model(r) => logps(r, b, false, None)?.0.detach(),
        Reference::Precomputed(v) => {
            if v.len() != n {
                return Err(Error::msg(format!(
                    "dpo: {} precomputed reference pairs for a batch of {n}",
                    v.len()
                )));
            }
            let sums: Vec<f32> = v.iter().map(|p| p.0).chain(v.iter().map(|p| p.1)).collect();
            Tensor::from_vec(sums, 2 * n, &Device::Cpu)?
        }
    };
    Ok((all.narrow(0, 0, n)?, all.narrow(0, n, n)?))
}

/// TRL's DPO loss of summed log-probabilities `[policy chosen, policy
/// rejected, ref chosen, ref rejected]` (`[B]` each; `counts`: the 2B rows'
/// completion tokens, chosen first). IPO compares the log-ratios averaged
/// over each completion's tokens; the implicit rewards are `beta` times the
/// summed log-ratios for every loss type, as TRL logs them.
fn loss_of(
    lp: &[&Tensor; 4],
    counts: &[usize],
    kind: DpoLossType,
    beta: f64,
    label_smoothing: f64,
) -> Result<super::preference::DpoOut> {
    let n = lp[0].elem_count();
    let per = |k: &[usize]| -> Result<Tensor> {
        let inv: Vec<f32> = k.iter().map(|&c| 1.0 / c.max(1) as f32).collect();
        Ok(Tensor::from_vec(inv, k.len(), lp[0].device())?)
    };
    let scaled: Vec<Tensor> = if kind.averages_log_probs() {
        let (ic, ir) = (per(&counts[..n])?, per(&counts[n..])?);
        vec![
            lp[0].broadcast_mul(&ic)?,
            lp[1].broadcast_mul(&ir)?,
            lp[2].broadcast_mul(&ic)?,
            lp[3].broadcast_mul(&ir)?,
        ]
    } else {
        lp.iter().map(|t| (*t).clone()).collect()
    };
    let mut out = dpo_loss(
        &PairLogps {
            policy_chosen: &scaled[0],
            policy_rejected: &scaled[1],
            ref_chosen: &scaled[2],
            ref_rejected: &scaled[3],
        },
        kind,
        beta,
        label_smoothing,
    )?;
    if kind.averages_log_probs() {
        out.chosen_rewards = ((lp[0] - lp[2])? * beta)?.detach();
        out.rejected_rewards = ((lp[1] - lp[3])? * beta)?.detach();
    }
    Ok(out)
}

/// One DPO micro-batch: the mean loss over its pairs (recorded for
/// backward) and TRL's metrics (`rewards/*`, `logps/*`, and `loss`).
#[allow(clippy::too_many_arguments)]
pub fn dpo_batch(
    policy: &CausalLm,
    reference: &Reference,
    pairs: &[&PairTokens],
    pad_id: u32,
    kind: DpoLossType,
    beta: f64,
    label_smoothing: f64,
    rng: Option<&DropoutRng>,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let b = pair_batch(pairs, pad_id)?;
    let n = pairs.len();
    let (ref_c, ref_r) = reference_logps(policy, reference, &b)?;
    let (all, cnt) = logps(policy, &b, false, rng)?;
    let (pc, pr) = (all.narrow(0, 0, n)?, all.narrow(0, n, n)?);
    let out = loss_of(
        &[&pc, &pr, &ref_c, &ref_r],
        &cnt,
        kind,
        beta,
        label_smoothing,
    )?;
    let loss = out.losses.mean_all()?;
    let mut m = pair_metrics(
        &out.chosen_rewards,
        &out.rejected_rewards,
        Some((&pc.detach(), &pr.detach())),
    )?;
    m.push((
        "loss",
        loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? as f64,
    ));
    Ok((loss, m))
}

/// The summed completion log-probabilities `(chosen, rejected)` of every
/// pair of `pairs` under `lm` as it is now (with `reference`'s switch, if
/// any), in batches of `bs`, and each pair's completion token counts.
#[allow(clippy::type_complexity)]
fn set_logps(
    lm: &CausalLm,
    reference: Option<&Reference>,
    pairs: &[PairTokens],
    pad_id: u32,
    bs: usize,
) -> Result<(Vec<(f32, f32)>, Vec<(usize, usize)>)> {
    let mut out = vec![(0f32, 0f32); pairs.len()];
    let mut cnt = vec![(0usize, 0usize); pairs.len()];
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| pairs[i].chosen.len().max(pairs[i].rejected.len()));
    for chunk in order.chunks(bs.max(1)) {
        let refs: Vec<&PairTokens> = chunk.iter().map(|&i| &pairs[i]).collect();
        let b = pair_batch(&refs, pad_id)?;
        let n = chunk.len();
        let (c, r) = match reference {
            Some(rf) => reference_logps(lm, rf, &b)?,
            None => {
                let all = logps(lm, &b, false, None)?.0.detach();
                (all.narrow(0, 0, n)?, all.narrow(0, n, n)?)
            }
        };
        let (c, r) = (c.to_vec1::<f32>()?, r.to_vec1::<f32>()?);
        let k = counts(&b);
        for (j, &i) in chunk.iter().enumerate() {
            out[i] = (c[j], r[j]);
            cnt[i] = (k[j], k[n + j]);
        }
    }
    Ok((out, cnt))
}

/// A set of pairs to evaluate on: tokens, the rows scored by generation,
/// and the reference's summed log-probabilities when precomputed.
pub struct EvalPairs {
    pub name: String,
    pub pairs: Vec<PairTokens>,
    scored: Vec<Scored>,
    reference: Option<Vec<(f32, f32)>>,
}

/// DPO's metrics on a whole set: the mean loss, TRL's `rewards/*` and
/// `logps/*`, and `perplexity` of the chosen completions (per token).
pub fn evaluate_set(
    policy: &CausalLm,
    reference: &Reference,
    set: &EvalPairs,
    pad_id: u32,
    bs: usize,
    dpo: &DpoSection,
) -> Result<BTreeMap<String, f64>> {
    let (pol, cnt) = set_logps(policy, None, &set.pairs, pad_id, bs)?;
    let rf = match (&set.reference, reference) {
        (Some(v), _) => v.clone(),
        (None, Reference::Precomputed(_)) => {
            return Err(Error::msg(format!(
                "dpo: no reference log-probabilities for {}",
                set.name
            )))
        }
        (None, r) => set_logps(policy, Some(r), &set.pairs, pad_id, bs)?.0,
    };
    let n = pol.len();
    let col = |v: &[(f32, f32)], first: bool| -> Result<Tensor> {
        let x: Vec<f32> = v.iter().map(|p| if first { p.0 } else { p.1 }).collect();
        Ok(Tensor::from_vec(x, n, &Device::Cpu)?)
    };
    let (pc, pr, rc, rr) = (
        col(&pol, true)?,
        col(&pol, false)?,
        col(&rf, true)?,
        col(&rf, false)?,
    );
    let k: Vec<usize> = cnt
        .iter()
        .map(|k| k.0)
        .chain(cnt.iter().map(|k| k.1))
        .collect();
    let out = loss_of(
        &[&pc, &pr, &rc, &rr],
        &k,
        dpo.loss_type,
        dpo.beta,
        dpo.label_smoothing,
    )?;
    let mut m: BTreeMap<String, f64> =
        pair_metrics(&out.chosen_rewards, &out.rejected_rewards, Some((&pc, &pr)))?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    m.insert(
        "loss".into(),
        out.losses.mean_all()?.to_scalar::<f32>()? as f64,
    );
    let nll: f64 = pol.iter().map(|p| -p.0 as f64).sum();
    let tokens: usize = cnt.iter().map(|k| k.0).sum();
    m.insert("perplexity".into(), (nll / tokens.max(1) as f64).exp());
    Ok(m)
}

/// A generation-scored row of a pair: the prompt, and the chosen
/// completion as the expected answer.
fn scored(p: &PreferencePair) -> Option<Scored> {
    match (&p.prompt, &p.chosen) {
        (Turns::Chat(m), Turns::Chat(c)) => Some(Scored {
            prompt: SftExample::Chat(m.clone()),
            answer: c
                .iter()
                .map(|m| m.content.as_str())
                .collect::<String>()
                .trim()
                .to_string(),
        }),
        (Turns::Text(p), Turns::Text(c)) => Some(Scored {
            prompt: SftExample::PromptCompletion {
                prompt: p.clone(),
                completion: String::new(),
            },
            answer: c.trim().to_string(),
        }),
        _ => None,
    }
}

/// DPO as an [`Objective`].
struct Dpo<'a> {
    policy: &'a CausalLm,
    reference: Reference<'a>,
    /// Precomputed reference log-probabilities of the training pairs.
    train_ref: Option<&'a [(f32, f32)]>,
    train: &'a [PairTokens],
    train_path: std::path::PathBuf,
    validation: &'a EvalPairs,
    tests: &'a [EvalPairs],
    tok: &'a TextTokenizer,
    template: Option<&'a ChatTemplate>,
    max_positions: usize,
    eval_bs: usize,
    dpo: &'a DpoSection,
    saver: Saver<'a>,
    seen: RefCell<(BTreeMap<String, f64>, usize)>,
}

impl Dpo<'_> {
    fn eval(&self, set: &EvalPairs, generate: bool) -> Result<BTreeMap<String, f64>> {
        let pad = self.tok.pad_id();
        let mut m = evaluate_set(
            self.policy,
            &self.reference,
            set,
            pad,
            self.eval_bs,
            self.dpo,
        )?;
        if generate && !set.scored.is_empty() {
            let em = exact_match(
                self.policy,
                None,
                self.tok,
                self.max_positions,
                self.template,
                &set.scored,
                48,
            )?;
            m.insert("exact_match".into(), em);
        }
        Ok(m)
    }
}

impl Objective for Dpo<'_> {
    fn train_len(&self) -> usize {
        self.train.len()
    }
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(Tensor, usize)> {
        let pairs: Vec<&PairTokens> = idx.iter().map(|&i| &self.train[i]).collect();
        let tokens = pairs
            .iter()
            .map(|p| p.chosen.len() + p.rejected.len())
            .sum();
        let pre: Vec<(f32, f32)>;
        let reference = match self.train_ref {
            Some(all) => {
                pre = idx.iter().map(|&i| all[i]).collect();
                Reference::Precomputed(&pre)
            }
            None => match &self.reference {
                Reference::AdaptersDisabled(s) => Reference::AdaptersDisabled(s),
                Reference::Model(m) => Reference::Model(m),
                Reference::Precomputed(_) => {
                    return Err(Error::msg("dpo: precomputed reference without values"))
                }
            },
        };
        let (loss, m) = dpo_batch(
            self.policy,
            &reference,
            &pairs,
            self.tok.pad_id(),
            self.dpo.loss_type,
            self.dpo.beta,
            self.dpo.label_smoothing,
            Some(drop),
        )?;
        accumulate(&self.seen, &m);
        Ok((loss, tokens))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        match split {
            Split::Validation => Ok(Some(self.eval(self.validation, false)?)),
            Split::Test => {
                if self.tests.is_empty() {
                    return Ok(None);
                }
                let mut m = BTreeMap::new();
                for set in self.tests {
                    for (k, v) in self.eval(set, true)? {
                        let key = if set.name == "test" {
                            k
                        } else {
                            format!("{}_{k}", set.name)
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
        fingerprint(self.train)
    }
    fn describe_rows(&self, idx: &[usize]) -> String {
        describe(&self.train_path, idx.iter().map(|&i| self.train[i].line))
    }
    fn train_metrics(&self) -> Option<BTreeMap<String, f64>> {
        drain(&self.seen)
    }
}

fn fingerprint(pairs: &[PairTokens]) -> String {
    let mut f = Fingerprint::new();
    for p in pairs {
        for s in [&p.chosen, &p.rejected] {
            f.u32s(&s.ids);
            f.i64s(&s.labels);
        }
    }
    f.finish()
}

/// `ref_logps.json` in the run folder: the reference's summed
/// log-probabilities of each set, keyed by the set's name, with the
/// fingerprint of the tokens they were computed on.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefLogps {
    sets: BTreeMap<String, (String, Vec<(f32, f32)>)>,
}

/// The reference log-probabilities of every set, read from the run folder
/// when they are there for the same tokens (resume), else computed with
/// `reference` and written there.
#[allow(clippy::too_many_arguments)]
fn precompute(
    path: &Path,
    resume: bool,
    policy: &CausalLm,
    reference: Option<&Reference>,
    sets: &[(&str, &[PairTokens])],
    pad_id: u32,
    bs: usize,
    on: &mut dyn FnMut(Event),
) -> Result<BTreeMap<String, Vec<(f32, f32)>>> {
    let mut have: BTreeMap<String, (String, Vec<(f32, f32)>)> = BTreeMap::new();
    if resume && path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        have = serde_json::from_str::<RefLogps>(&text)
            .map_err(|e| {
                Error::file(
                    &path,
                    format!("not afinar's reference log-probabilities: {e}"),
                )
            })?
            .sets;
    }
    let mut out = BTreeMap::new();
    let mut computed = false;
    for (name, pairs) in sets {
        let fp = fingerprint(pairs);
        match have.get(*name) {
            Some((f, v)) if *f == fp && v.len() == pairs.len() => {
                out.insert(name.to_string(), v.clone());
            }
            _ => {
                let reference = reference.ok_or_else(|| {
                    Error::file(
                        path,
                        format!(
                            "holds no reference log-probabilities for these {name} pairs, and a resumed full fine-tuning run has no reference to compute them with"
                        ),
                    )
                })?;
                let t = Instant::now();
                let v = set_logps(policy, Some(reference), pairs, pad_id, bs)?.0;
                on(Event::Info(format!(
                    "reference log-probabilities of {} {name} pairs computed in {:.1} s",
                    pairs.len(),
                    t.elapsed().as_secs_f64()
                )));
                have.insert(name.to_string(), (fp, v.clone()));
                out.insert(name.to_string(), v);
                computed = true;
            }
        }
    }
    if computed {
        fsutil::write_json(path, &RefLogps { sets: have })?;
    } else {
        on(Event::Info(format!(
            "reference log-probabilities read from {}",
            path.display()
        )));
    }
    Ok(out)
}

/// Train a decoder with DPO as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let d = &c.data;
    let dpo = c.dpo.clone().unwrap_or_default();
    let model_path = c.model.source().resolve(on)?;
    let full = c.adapter.is_none();
    let load = |sel: Selector| {
        models::load_model(
            &model_path,
            sel,
            LoadOpts {
                quantized: c.model.base_dtype == crate::config::BaseDtype::Quantized,
                max_length: None,
            },
        )
    };
    let LoadedModel {
        mut cfg,
        raw_config,
        mut store,
        tokenizer: tok,
        ..
    } = load(if full {
        Selector::all()
    } else {
        Selector::none()
    })?;
    let family = cfg.family();
    super::require_decoder(plan, family, &model_path, "dpo")?;
    // TRL's `disable_dropout`: off unless the config sets it.
    cfg.set_dropout(
        c.model.hidden_dropout_prob.or(Some(0.0)),
        c.model.attention_probs_dropout_prob.or(Some(0.0)),
    );
    let max_len = c.model.max_length.min(cfg.max_positions());
    let template = template_of(&tok)?;
    let enc = SftEncoder {
        tokenizer: tok.raw(),
        template: template.as_ref(),
        eos_id: tok.eos_ids().first().copied(),
        max_length: max_len,
        overflow: Default::default(),
    };
    let mode = d.truncation_mode.unwrap_or_default();

    // ---- data
    let splits = load_pair_splits(plan)?;
    let n_gen = d.generate_eval_rows.unwrap_or(50);
    let mut encode =
        |rows: &crate::data::preference::PreferenceRows, name: &str| -> Result<EvalPairs> {
            let (pairs, stats) = encode_pairs(&enc, rows, mode)?;
            on(Event::Info(format!("data ({name}): {stats} ({mode:?})")));
            let lines: std::collections::HashSet<usize> = pairs.iter().map(|p| p.line).collect();
            Ok(EvalPairs {
                name: name.to_string(),
                pairs,
                scored: rows
                    .rows
                    .iter()
                    .filter(|p| lines.contains(&p.line))
                    .filter_map(scored)
                    .take(n_gen)
                    .collect(),
                reference: None,
            })
        };
    let train_set = encode(&splits.train, "train")?.pairs;
    if train_set.is_empty() {
        return Err(Error::Data(format!("{}: no training pairs", d.train)));
    }
    let mut val = encode(&splits.validation, "validation")?;
    val.scored.clear();
    let mut tests = Vec::new();
    if let Some(t) = &splits.test {
        tests.push(encode(t, "test")?);
    }
    for (name, rows) in &splits.heldout {
        tests.push(encode(rows, name)?);
    }

    // ---- policy (+ adapter) and reference
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(c.seeds.init);
    let adapter_cfg =
        super::attach_adapter(plan, &mut store, family, PeftTask::CausalLm, &mut rng, on)?;
    let mut policy = CausalLm::build(&store, &cfg)?;
    policy.set_gradient_checkpointing(c.train.gradient_checkpointing);
    models::check_unused(&mut store, models::other_heads(family, true), &mut |w| {
        on(Event::Warning(w))
    })?;
    on(Event::Info(store.summary()));
    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let pre_path = opts.run_dir.join("ref_logps.json");
    // Full fine-tuning with precomputed log-probabilities holds no copy: the
    // model before its first step is the reference (a resume reads them).
    let precomputed_only =
        full && dpo.precompute_ref_log_probs && (!opts.resume || pre_path.exists());
    let frozen = if full && !precomputed_only {
        let LoadedModel { store: frozen, .. } = load(Selector::none())?;
        Some(frozen)
    } else {
        None
    };
    let frozen_lm = frozen
        .as_ref()
        .map(|s| CausalLm::build(s, &cfg))
        .transpose()?;
    let reference = match (&frozen_lm, full) {
        (Some(lm), _) => {
            on(Event::Info(
                "reference: a frozen copy of the model as loaded".into(),
            ));
            Reference::Model(lm)
        }
        (None, false) => {
            on(Event::Info(
                "reference: the base model (adapters switched off)".into(),
            ));
            Reference::AdaptersDisabled(&store)
        }
        (None, true) => {
            on(Event::Info(
                "reference: the model as loaded, log-probabilities precomputed".into(),
            ));
            Reference::Precomputed(&[])
        }
    };
    let eval_bs = c.train.eval_batch_size.unwrap_or(c.train.batch_size);
    let mut train_ref = None;
    let pad = tok.pad_id();
    if dpo.precompute_ref_log_probs {
        let mut sets: Vec<(&str, &[PairTokens])> =
            vec![("train", &train_set), ("validation", &val.pairs)];
        for t in &tests {
            sets.push((t.name.as_str(), &t.pairs));
        }
        // Before the first step, the policy without adapters is the reference.
        let compute_with = match &reference {
            Reference::Precomputed(_) if !opts.resume => Some(Reference::AdaptersDisabled(&store)),
            Reference::Precomputed(_) => None,
            Reference::AdaptersDisabled(s) => Some(Reference::AdaptersDisabled(s)),
            Reference::Model(m) => Some(Reference::Model(m)),
        };
        let mut pre = precompute(
            &pre_path,
            opts.resume,
            &policy,
            compute_with.as_ref(),
            &sets,
            pad,
            eval_bs,
            on,
        )?;
        train_ref = pre.remove("train");
        val.reference = pre.remove("validation");
        for t in tests.iter_mut() {
            t.reference = pre.remove(&t.name);
        }
    }
    let obj = Dpo {
        policy: &policy,
        reference,
        train_ref: train_ref.as_deref(),
        train: &train_set,
        train_path: splits.train.path.clone(),
        validation: &val,
        tests: &tests,
        tok: &tok,
        template: template.as_ref(),
        max_positions: cfg.max_positions(),
        eval_bs,
        dpo: &dpo,
        saver: Saver {
            dir: opts.run_dir.clone(),
            base: canonical(&model_path),
            family,
            base_config: &raw_config,
            tok: &tok,
            adapter: adapter_cfg.as_ref(),
            task: "dpo",
        },
        seen: RefCell::new(Default::default()),
    };
    // Before training: the same test metrics of the model as loaded (a
    // resumed run has them).
    if n_gen > 0 && !opts.resume {
        crate::train::test_before(&obj, &run, on)?;
    }
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}

/// `afinar eval` of a DPO run: DPO's metrics, the chosen completions'
/// perplexity and exact match of greedy answers (up to
/// `data.generate_eval_rows`) on the pairs of `data` (or of the run's test
/// split): the policy is `<run>/model`, the reference the run's base model.
pub fn eval_run(
    run_dir: &Path,
    plan: &Plan,
    data: Option<&Path>,
    on: &mut dyn FnMut(Event),
) -> Result<(usize, BTreeMap<String, f64>)> {
    let c = &plan.config;
    let d = &c.data;
    let rows = super::preference::pairs_to_evaluate(plan, data)?;
    let opts = LoadOpts {
        quantized: false,
        max_length: None,
    };
    let pol = models::load_model(&run_dir.join("model"), Selector::none(), opts.clone())?;
    let base = models::load_model(&c.model.source().resolve(on)?, Selector::none(), opts)?;
    let (policy, reference) = (
        CausalLm::build(&pol.store, &pol.cfg)?,
        CausalLm::build(&base.store, &base.cfg)?,
    );
    let tok = &pol.tokenizer;
    let template = template_of(tok)?;
    let enc = SftEncoder {
        tokenizer: tok.raw(),
        template: template.as_ref(),
        eos_id: tok.eos_ids().first().copied(),
        max_length: c.model.max_length.min(pol.cfg.max_positions()),
        overflow: Default::default(),
    };
    let (pairs, stats) = encode_pairs(&enc, &rows, d.truncation_mode.unwrap_or_default())?;
    on(Event::Info(format!("data: {stats}")));
    let lines: std::collections::HashSet<usize> = pairs.iter().map(|p| p.line).collect();
    let set = EvalPairs {
        name: "eval".into(),
        scored: rows
            .rows
            .iter()
            .filter(|p| lines.contains(&p.line))
            .filter_map(scored)
            .take(d.generate_eval_rows.unwrap_or(50))
            .collect(),
        pairs,
        reference: None,
    };
    let dpo = c.dpo.clone().unwrap_or_default();
    let bs = c.train.eval_batch_size.unwrap_or(c.train.batch_size);
    let mut m = evaluate_set(
        &policy,
        &Reference::Model(&reference),
        &set,
        tok.pad_id(),
        bs,
        &dpo,
    )?;
    if !set.scored.is_empty() {
        let em = exact_match(
            &policy,
            None,
            tok,
            pol.cfg.max_positions(),
            template.as_ref(),
            &set.scored,
            48,
        )?;
        m.insert("exact_match".into(), em);
    }
    Ok((set.pairs.len(), m))
}
