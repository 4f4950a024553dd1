//! RLHF with PPO (`task.type = "ppo"`), as TRL's last `PPOTrainer`
//! (`trl/experimental/ppo`, removed in 2026) and "The N Implementation
//! Details of RLHF with PPO" (Huang et al.) do it:
//!
//! 1. **Rollouts.** A batch of prompts (SFT's row formats: the turns before
//!    the answer) is answered by sampling from the policy through one KV
//!    cache (`generate::generate_batch`: temperature, top-k / top-p,
//!    `response_length` new tokens), each response cut after its first
//!    end-of-sequence token. Batches are laid out with explicit attention
//!    masks, so an end-of-sequence id that is also the pad id is still a
//!    token of the response.
//! 2. **Log-probabilities** of each response token under the policy (taken
//!    while sampling) and the reference (the policy with its adapters
//!    switched off, or a frozen copy for full fine-tuning), from the logits
//!    divided by the sampling temperature.
//! 3. **Rewards.** A score per response: a reward-model run's score, or a
//!    rule (exact match with the row's answer, a regex, a length target),
//!    minus `missing_eos_penalty` for a response without an end-of-sequence
//!    token. Per token: `-kl_coef * kl` (k1 or k3), the score added on the
//!    response's last token; `kl_coef` fixed or adaptive; rewards optionally
//!    whitened.
//! 4. **Values** from a separate value model (body + scalar `score` head at
//!    every position, TRL's design), kept in the same parameter store under
//!    `value_model.`; GAE with `gamma`, `lam`; advantages whitened over the
//!    batch; returns = advantages + values.
//! 5. **Update.** `num_ppo_epochs` passes over the rollouts in shuffled
//!    minibatches (`num_mini_batches`; micro-batches of `train.batch_size`
//!    accumulate): clipped ratio, clipped value loss,
//!    `loss = pg + vf_coef * vf`, clipping and AdamW as every run. Dropout
//!    is off in every model (TRL disables it: the first minibatch's ratio
//!    is then 1).
//!
//! Where this differs from TRL: the score sits on the response's last
//! token (TRL puts it one past the end-of-sequence token when the response
//! is shorter than `response_length`, and trains the value there too); the
//! learning-rate schedule runs over optimizer steps, not over rollout
//! batches; `approx_kl` is the mean over response tokens only.
//!
//! Resume: a checkpoint is written at a rollout boundary; the prompts, the
//! sampler's random streams (ChaCha8, one per row, keyed by `seeds.data`,
//! the rollout batch and the row) and the minibatch order are functions of
//! the step, and the adaptive KL coefficient is in the checkpoint's state,
//! so a resumed run continues exactly.

pub mod math;

use super::canonical;
use super::sft::{read_rows, scored, sft_format, Saver, Scored};
use crate::adapters::PeftTask;
use crate::config::{KlEstimator, Plan, PpoReward, PpoSection, ValueInit};
use crate::data::preference::{Truncation, Turns};
use crate::data::sft::SftExample;
use crate::data::{seeded_split, EpochOrder};
use crate::event::Event;
use crate::generate::{generate_batch, Continuation, GenerateConfig};
use crate::heads::CausalLm;
use crate::hub::chat_template::{ChatTemplate, Message, Role};
use crate::hub::tokenizer::TextTokenizer;
use crate::models::{self, Body, Inputs, LoadOpts, LoadedModel, ModelConfig};
use crate::nn::{self, Linear};
use crate::params::{ParamStore, Path as PPath, Selector};
use crate::runs::RunModel;
use crate::train::{Fingerprint, RunWriter, TrainOptions, TrainReport, Trainer};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Where the value model's parameters live in the run's store.
pub const VALUE_PREFIX: &str = "value_model";

/// PPO's value model: a decoder body and a scalar `score` head read at
/// every position (the weights of an `*ForSequenceClassification`).
pub struct ValueModel {
    body: Body,
    score: Linear,
}

impl ValueModel {
    /// The body under `prefix` in `store`, and `{prefix}.score.weight` `[1, C]`.
    pub fn build(store: &ParamStore, cfg: &ModelConfig, prefix: &str) -> Result<Self> {
        let root = PPath::root(store, prefix);
        Ok(ValueModel {
            body: Body::load(&root, cfg)?,
            score: root.pp("score").linear(cfg.hidden_size(), 1, false)?,
        })
    }

    /// The value at every position, `[B * T]`.
    pub fn forward(&self, x: &Inputs) -> Result<Tensor> {
        let h = self.body.forward(x, None)?;
        let (b, t, c) = h.dims3()?;
        Ok(self
            .score
            .forward(&h.reshape((b * t, c))?)?
            .reshape(b * t)?)
    }
}

/// One rollout batch: per row the query (prompt ids) and the response (up
/// to and including its first end-of-sequence token), and per response
/// token the policy's log-probability when it was sampled, the
/// reference's, and the value; one score per row (penalties included).
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    pub queries: Vec<Vec<u32>>,
    pub responses: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
    pub ref_logprobs: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub scores: Vec<f32>,
}

/// What PPO's update needs of the settings.
#[derive(Debug, Clone, Copy)]
pub struct PpoParams {
    pub temperature: f32,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub whiten_rewards: bool,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
}

impl PpoParams {
    pub fn of(p: &PpoSection, kl_coef: f64) -> Self {
        PpoParams {
            temperature: p.temperature,
            kl_coef,
            kl_estimator: p.kl_estimator,
            whiten_rewards: p.whiten_rewards,
            gamma: p.gamma,
            lam: p.lam,
            cliprange: p.cliprange,
            cliprange_value: p.cliprange_value,
            vf_coef: p.vf_coef,
        }
    }
}

/// The rollouts' per-token advantages and returns, and the KL estimates.
#[derive(Debug, Clone)]
pub struct Advantages {
    pub advantages: Vec<Vec<f32>>,
    pub returns: Vec<Vec<f32>>,
    /// Per row: sum of k1, sum of k3, sum of the KL penalty.
    pub kl_k1: Vec<f64>,
    pub kl_k3: Vec<f64>,
    pub non_score: Vec<f64>,
}

/// Per-token rewards (KL penalty + score), optional reward whitening, GAE,
/// and advantages whitened over the batch.
pub fn advantages(r: &Rollouts, p: &PpoParams) -> Result<Advantages> {
    let n = r.responses.len();
    let mut rewards = Vec::with_capacity(n);
    let (mut k1, mut k3, mut ns) = (vec![], vec![], vec![]);
    for i in 0..n {
        let (lp, rp) = (&r.logprobs[i], &r.ref_logprobs[i]);
        let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
        let (e1, e3) = (
            math::kl(lp, rp, KlEstimator::K1),
            math::kl(lp, rp, KlEstimator::K3),
        );
        let (s1, s3) = (sum(&e1), sum(&e3));
        let (kl, s) = match p.kl_estimator {
            KlEstimator::K1 => (e1, s1),
            KlEstimator::K3 => (e3, s3),
        };
        k1.push(s1);
        k3.push(s3);
        ns.push(-p.kl_coef * s);
        rewards.push(math::token_rewards(&kl, p.kl_coef, r.scores[i]));
    }
    if p.whiten_rewards {
        math::whiten(&mut rewards, false)?;
    }
    let (mut adv, mut ret) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (rw, v) in rewards.iter().zip(&r.values) {
        let (a, g) = math::gae(rw, v, p.gamma, p.lam);
        adv.push(a);
        ret.push(g);
    }
    math::whiten(&mut adv, true)?;
    Ok(Advantages {
        advantages: adv,
        returns: ret,
        kl_k1: k1,
        kl_k3: k3,
        non_score: ns,
    })
}

/// Rows `rows` of (query ++ response), right-padded with `pad`, with their
/// attention mask; and for each response token in row order, its flat
/// index in `[B * T]` of the position that predicts it.
fn layout(
    queries: &[Vec<u32>],
    responses: &[Vec<u32>],
    rows: &[usize],
    pad: u32,
) -> Result<(Inputs, Vec<u32>, Vec<i64>)> {
    let t = rows
        .iter()
        .map(|&i| queries[i].len() + responses[i].len())
        .max()
        .unwrap_or(0);
    let b = rows.len();
    let (mut ids, mut mask) = (vec![pad; b * t], vec![0f32; b * t]);
    let mut targets = vec![-100i64; b * t];
    let mut at = Vec::new();
    for (bi, &i) in rows.iter().enumerate() {
        let (q, r) = (&queries[i], &responses[i]);
        for (j, &id) in q.iter().chain(r.iter()).enumerate() {
            ids[bi * t + j] = id;
            mask[bi * t + j] = 1.0;
        }
        for (j, &id) in r.iter().enumerate() {
            let p = bi * t + q.len() + j - 1;
            targets[p] = id as i64;
            at.push(p as u32);
        }
    }
    Ok((Inputs::new(ids, mask, b, t)?, at, targets))
}

/// The log-probability of every response token of rows `rows` (in row
/// order) under `lm`, from its logits divided by `temperature`: recorded
/// for backward.
pub fn response_logps(
    lm: &CausalLm,
    r: &Rollouts,
    rows: &[usize],
    pad: u32,
    temperature: f32,
) -> Result<Tensor> {
    let (inp, at, targets) = layout(&r.queries, &r.responses, rows, pad)?;
    let hidden = lm.forward(&inp, None)?;
    let (b, t, c) = hidden.dims3()?;
    let h = (hidden.reshape((b * t, c))? * (1.0 / temperature as f64))?;
    let nll = nn::lm_token_nll(&h, lm.lm_head(), Arc::new(targets), 256)?;
    let idx = Tensor::from_vec(at.clone(), at.len(), &Device::Cpu)?;
    Ok(nll.index_select(&idx, 0)?.neg()?)
}

/// The value of every response token of rows `rows` (in row order): the
/// value model read at the position before the token.
pub fn response_values(v: &ValueModel, r: &Rollouts, rows: &[usize], pad: u32) -> Result<Tensor> {
    let (inp, at, _) = layout(&r.queries, &r.responses, rows, pad)?;
    let all = v.forward(&inp)?;
    let idx = Tensor::from_vec(at.clone(), at.len(), &Device::Cpu)?;
    Ok(all.index_select(&idx, 0)?)
}

/// The statistics of one micro-batch's loss.
#[derive(Debug, Clone, Default)]
pub struct MicroStats {
    pub policy_loss: f64,
    pub value_loss: f64,
    pub clipfrac: f64,
    pub value_clipfrac: f64,
    pub approx_kl: f64,
    pub ratio: f64,
    pub tokens: usize,
}

/// PPO's loss on rollout rows `rows` (recorded for backward): the clipped
/// surrogate averaged over their response tokens, plus `vf_coef` times
/// half the clipped value loss averaged the same way.
pub fn ppo_loss(
    policy: &CausalLm,
    value: &ValueModel,
    r: &Rollouts,
    adv: &Advantages,
    rows: &[usize],
    pad: u32,
    p: &PpoParams,
) -> Result<(Tensor, MicroStats)> {
    let cat = |v: &[Vec<f32>]| -> Vec<f32> { rows.iter().flat_map(|&i| v[i].clone()).collect() };
    let (old, a, ret, v_old) = (
        cat(&r.logprobs),
        cat(&adv.advantages),
        cat(&adv.returns),
        cat(&r.values),
    );
    let n = old.len();
    if n == 0 {
        return Err(Error::msg("ppo: a micro-batch without response tokens"));
    }
    let new = response_logps(policy, r, rows, pad, p.temperature)?;
    let diff = (&new - Tensor::from_vec(old.clone(), n, &Device::Cpu)?)?;
    let ratio = diff.exp()?;
    let rv = ratio.to_vec1::<f32>()?;
    let dv = diff.to_vec1::<f32>()?;
    // The clipped branch does not depend on the ratio: its tokens add a
    // constant, the others -A * ratio.
    let (mut w, mut konst, mut clipped) = (vec![0f32; n], 0f64, 0usize);
    let mut pg = 0f64;
    for k in 0..n {
        let (l, c) = math::clipped_policy_loss(rv[k] as f64, a[k] as f64, p.cliprange);
        pg += l;
        if c {
            konst += l;
            clipped += 1;
        } else {
            w[k] = -a[k] / n as f32;
        }
    }
    let pg_loss =
        ((&ratio * Tensor::from_vec(w, n, &Device::Cpu)?)?.sum_all()? + konst / n as f64)?;
    let vpred = response_values(value, r, rows, pad)?;
    let vv = vpred.to_vec1::<f32>()?;
    let (mut m, mut vk, mut vclip, mut vf) = (vec![0f32; n], 0f64, 0usize, 0f64);
    for k in 0..n {
        let (l, c) = math::clipped_value_loss(
            vv[k] as f64,
            v_old[k] as f64,
            ret[k] as f64,
            p.cliprange_value,
        );
        vf += l;
        if c {
            vk += l;
            vclip += 1;
        } else {
            m[k] = 1.0;
        }
    }
    let sq = (&vpred - Tensor::from_vec(ret, n, &Device::Cpu)?)?.sqr()?;
    let vf_loss =
        (((sq * Tensor::from_vec(m, n, &Device::Cpu)?)?.sum_all()? + vk)? * (0.5 / n as f64))?;
    let loss = (pg_loss + (vf_loss * p.vf_coef)?)?;
    let stats = MicroStats {
        policy_loss: pg / n as f64,
        value_loss: 0.5 * vf / n as f64,
        clipfrac: clipped as f64 / n as f64,
        value_clipfrac: vclip as f64 / n as f64,
        approx_kl: 0.5 * dv.iter().map(|&d| (d as f64).powi(2)).sum::<f64>() / n as f64,
        ratio: rv.iter().map(|&x| x as f64).sum::<f64>() / n as f64,
        tokens: n,
    };
    Ok((loss, stats))
}

/// The reference's log-probabilities of rollout rows `rows`, per row.
pub fn reference_logps(
    policy: &CausalLm,
    reference: Option<&CausalLm>,
    store: &ParamStore,
    r: &Rollouts,
    rows: &[usize],
    pad: u32,
    temperature: f32,
) -> Result<Vec<Vec<f32>>> {
    let flat = match reference {
        Some(m) => response_logps(m, r, rows, pad, temperature)?,
        None => store.with_adapters_off(|| response_logps(policy, r, rows, pad, temperature))?,
    };
    split_rows(&flat.detach().to_vec1::<f32>()?, r, rows)
}

/// Values per row of the flat `[sum of response lengths]` vector `v`.
fn split_rows(v: &[f32], r: &Rollouts, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut k = 0;
    for &i in rows {
        let n = r.responses[i].len();
        out.push(
            v.get(k..k + n)
                .ok_or_else(|| Error::msg("ppo: fewer values than response tokens"))?
                .to_vec(),
        );
        k += n;
    }
    Ok(out)
}

/// A prompt to answer: its ids, the turns (for a reward model), the
/// expected answer (exact match) and where it came from.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub turns: SftExample,
    pub answer: String,
}

/// What scores a response.
pub enum Rewarder {
    ExactMatch,
    Regex(Box<regex::Regex>),
    Length(usize),
    /// A reward-model run and its chat template.
    Model(Box<(RunModel, Option<ChatTemplate>)>),
}

impl Rewarder {
    fn name(&self) -> &'static str {
        match self {
            Rewarder::ExactMatch => "exact match with the answer",
            Rewarder::Regex(_) => "regex",
            Rewarder::Length(_) => "length target",
            Rewarder::Model(_) => "reward model",
        }
    }

    /// The score of each (prompt, response text, response length).
    pub fn score(&self, items: &[(&Prompt, String, usize)]) -> Result<Vec<f32>> {
        Ok(match self {
            Rewarder::ExactMatch => items
                .iter()
                .map(|(p, t, _)| (t.trim() == p.answer) as u8 as f32)
                .collect(),
            Rewarder::Regex(re) => items
                .iter()
                .map(|(_, t, _)| re.is_match(t) as u8 as f32)
                .collect(),
            Rewarder::Length(target) => items
                .iter()
                .map(|(_, _, n)| -((*n as f32 - *target as f32).abs() / *target as f32))
                .collect(),
            Rewarder::Model(m) => {
                let (rm, template) = &**m;
                let enc = super::reward::PairEncoder {
                    family: rm.cfg.family(),
                    tok: &rm.tok,
                    template: template.as_ref(),
                    max_length: rm.max_length,
                    truncation: Truncation::KeepStart,
                };
                let mut seqs = Vec::with_capacity(items.len());
                for (p, text, _) in items {
                    let (prompt, completion) = match &p.turns {
                        SftExample::Chat(m) => (
                            Turns::Chat(m.clone()),
                            Turns::Chat(vec![Message::new(Role::Assistant, text.trim())]),
                        ),
                        SftExample::PromptCompletion { prompt, .. } => {
                            (Turns::Text(prompt.clone()), Turns::Text(text.clone()))
                        }
                    };
                    let s = enc
                        .encode(&prompt, &completion)?
                        .ok_or_else(|| Error::msg("ppo: the reward model left a response out"))?;
                    seqs.push(s.0);
                }
                let rows: Vec<&super::reward::Seq> = seqs.iter().collect();
                super::reward::score_rows(&rm.model, &rows, rm.tok.pad_id(), 16)?
            }
        })
    }
}

/// The models of a PPO run, and what sampling needs.
pub struct Actors<'a> {
    pub policy: &'a CausalLm,
    /// A frozen copy (full fine-tuning); None: the policy's adapters off.
    pub reference: Option<&'a CausalLm>,
    pub value: &'a ValueModel,
    pub store: &'a ParamStore,
    pub tok: &'a TextTokenizer,
    pub max_positions: usize,
    pub rewarder: &'a Rewarder,
}

/// One row's random stream: ChaCha8 keyed by the seed, the rollout batch
/// and the row (SplitMix64 of the three), independent of batch layout.
pub fn row_rng(seed: u64, batch: u64, row: u64) -> ChaCha8Rng {
    let mut z =
        seed ^ batch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ row.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

/// Answers to `prompts` (sampled, or greedy at temperature 0), in chunks of
/// `bs`, row `i` drawing from `row_rng(seed, batch, i)`.
fn answer(
    a: &Actors,
    prompts: &[&Prompt],
    g: &GenerateConfig,
    bs: usize,
    seed: u64,
    batch: u64,
) -> Result<Vec<Continuation>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (c, chunk) in prompts.chunks(bs.max(1)).enumerate() {
        let ids: Vec<&[u32]> = chunk.iter().map(|p| p.ids.as_slice()).collect();
        let mut rngs: Vec<ChaCha8Rng> = (0..chunk.len())
            .map(|j| row_rng(seed, batch, (c * bs + j) as u64))
            .collect();
        out.extend(generate_batch(
            a.policy,
            &ids,
            a.max_positions,
            g,
            &mut rngs,
        )?);
    }
    Ok(out)
}

/// The text of a response (its end-of-sequence token and special tokens dropped).
fn text_of(tok: &TextTokenizer, c: &Continuation) -> Result<String> {
    let ids = if c.eos {
        &c.ids[..c.ids.len() - 1]
    } else {
        &c.ids[..]
    };
    tok.decode(ids, true)
}

/// A rollout batch for `prompts`: sampled responses and their
/// log-probabilities, the reference's, the values, the scores (minus the
/// missing-EOS penalty); and per row the sampling entropy (mean over its
/// tokens) and whether it ended with an end-of-sequence token.
#[allow(clippy::too_many_arguments)]
pub fn rollout(
    a: &Actors,
    prompts: &[&Prompt],
    g: &GenerateConfig,
    bs: usize,
    seed: u64,
    batch: u64,
    missing_eos_penalty: Option<f64>,
) -> Result<(Rollouts, Vec<f32>, Vec<bool>)> {
    let conts = answer(a, prompts, g, bs, seed, batch)?;
    let mut r = Rollouts::default();
    let mut items = Vec::with_capacity(prompts.len());
    let (mut entropy, mut eos) = (vec![], vec![]);
    for (p, c) in prompts.iter().zip(&conts) {
        r.queries.push(p.ids.clone());
        r.responses.push(c.ids.clone());
        r.logprobs.push(c.logprobs.clone());
        entropy.push(c.entropy.iter().sum::<f32>() / c.entropy.len().max(1) as f32);
        eos.push(c.eos);
        items.push((*p, text_of(a.tok, c)?, c.ids.len()));
    }
    let mut scores = a.rewarder.score(&items)?;
    if let Some(pen) = missing_eos_penalty {
        for (s, &e) in scores.iter_mut().zip(&eos) {
            if !e {
                *s -= pen as f32;
            }
        }
    }
    r.scores = scores;
    let pad = a.tok.pad_id();
    let all: Vec<usize> = (0..prompts.len()).collect();
    for rows in all.chunks(bs.max(1)) {
        r.ref_logprobs.extend(reference_logps(
            a.policy,
            a.reference,
            a.store,
            &r,
            rows,
            pad,
            g.temperature.max(f32::MIN_POSITIVE),
        )?);
        let v = response_values(a.value, &r, rows, pad)?.to_vec1::<f32>()?;
        r.values.extend(split_rows(&v, &r, rows)?);
    }
    Ok((r, entropy, eos))
}

/// Greedy answers to a prompt set: mean score (`reward`), `exact_match`
/// (rows with an answer), mean response length and share ending in EOS;
/// with `kl_sample`, also the KL to the reference (k1 and k3 summed over
/// each response, mean over prompts) on answers sampled at that config.
fn evaluate_set(
    a: &Actors,
    prompts: &[Prompt],
    bs: usize,
    greedy: &GenerateConfig,
    kl_sample: Option<(&GenerateConfig, u64)>,
) -> Result<BTreeMap<String, f64>> {
    let refs: Vec<&Prompt> = prompts.iter().collect();
    let conts = answer(a, &refs, greedy, bs, 0, 0)?;
    let mut items = Vec::with_capacity(refs.len());
    for (p, c) in refs.iter().zip(&conts) {
        items.push((*p, text_of(a.tok, c)?, c.ids.len()));
    }
    let scores = a.rewarder.score(&items)?;
    let n = refs.len().max(1) as f64;
    let mut m = BTreeMap::new();
    m.insert(
        "reward".into(),
        scores.iter().map(|&s| s as f64).sum::<f64>() / n,
    );
    let with_answer: Vec<_> = items
        .iter()
        .filter(|(p, _, _)| !p.answer.is_empty())
        .collect();
    if !with_answer.is_empty() {
        let hits = with_answer
            .iter()
            .filter(|(p, t, _)| t.trim() == p.answer)
            .count();
        m.insert("exact_match".into(), hits as f64 / with_answer.len() as f64);
    }
    m.insert(
        "response_length".into(),
        conts.iter().map(|c| c.ids.len() as f64).sum::<f64>() / n,
    );
    m.insert(
        "eos_share".into(),
        conts.iter().filter(|c| c.eos).count() as f64 / n,
    );
    if let Some((g, seed)) = kl_sample {
        let conts = answer(a, &refs, g, bs, seed, u64::MAX)?;
        let mut r = Rollouts::default();
        for (p, c) in refs.iter().zip(&conts) {
            r.queries.push(p.ids.clone());
            r.responses.push(c.ids.clone());
            r.logprobs.push(c.logprobs.clone());
        }
        let all: Vec<usize> = (0..refs.len()).collect();
        let (mut k1, mut k3) = (0f64, 0f64);
        for rows in all.chunks(bs.max(1)) {
            let rl = reference_logps(
                a.policy,
                a.reference,
                a.store,
                &r,
                rows,
                a.tok.pad_id(),
                g.temperature,
            )?;
            for (j, &i) in rows.iter().enumerate() {
                let s = |e| {
                    math::kl(&r.logprobs[i], &rl[j], e)
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>()
                };
                k1 += s(KlEstimator::K1);
                k3 += s(KlEstimator::K3);
            }
        }
        m.insert("kl".into(), k1 / n);
        m.insert("kl_k3".into(), k3 / n);
    }
    Ok(m)
}

/// The prompts of `rows` (SFT examples: the turns before the answer), and
/// how many were left out for a prompt too long to answer within
/// `max_prompt` tokens.
fn prompts_of(
    rows: &[SftExample],
    tok: &TextTokenizer,
    template: Option<&ChatTemplate>,
    max_prompt: usize,
) -> Result<(Vec<Prompt>, usize)> {
    let (mut out, mut long) = (Vec::new(), 0);
    for ex in rows {
        let Some(Scored { prompt, answer }) = scored(ex) else {
            continue;
        };
        let text = match &prompt {
            SftExample::Chat(m) => template
                .ok_or_else(|| Error::msg("chat rows need a chat template"))?
                .render(m, true)?,
            SftExample::PromptCompletion { prompt, .. } => prompt.clone(),
        };
        let ids = tok.encode_raw(&text, false)?;
        if ids.is_empty() || ids.len() > max_prompt {
            long += 1;
            continue;
        }
        out.push(Prompt {
            ids,
            turns: prompt,
            answer,
        });
    }
    Ok((out, long))
}

fn fingerprint(prompts: &[Prompt]) -> String {
    let mut f = Fingerprint::new();
    for p in prompts {
        f.u32s(&p.ids);
        f.bytes(p.answer.as_bytes());
    }
    f.finish()
}

/// Train a decoder policy with PPO as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let d = &c.data;
    let t = &c.train;
    let ppo = c.ppo.clone().unwrap_or_default();
    let model_path = c.model.source().resolve(on)?;
    let full = c.adapter.is_none();
    let load = |path: &std::path::Path, sel: Selector| {
        models::load_model(
            path,
            sel,
            LoadOpts {
                quantized: c.model.base_dtype == crate::config::BaseDtype::Quantized,
                max_length: None,
            },
        )
    };
    let sel = || {
        if full {
            Selector::all()
        } else {
            Selector::none()
        }
    };
    let LoadedModel {
        mut cfg,
        raw_config,
        mut store,
        tokenizer: tok,
        ..
    } = load(&model_path, sel())?;
    let family = cfg.family();
    super::require_decoder(plan, family, &model_path, "ppo")?;
    // TRL disables dropout in every PPO model.
    cfg.set_dropout(Some(0.0), Some(0.0));
    let max_len = c.model.max_length.min(cfg.max_positions());
    if ppo.response_length >= max_len {
        return Err(Error::Config {
            path: plan.config_path.clone(),
            msg: format!(
                "`ppo.response_length` = {} leaves no room for a prompt in model.max_length = {max_len}",
                ppo.response_length
            ),
        });
    }
    let template = super::reward::template_of(&tok)?;

    // ---- the reward
    let rewarder = match ppo.reward {
        PpoReward::ExactMatch => Rewarder::ExactMatch,
        PpoReward::Regex => Rewarder::Regex(Box::new(
            regex::Regex::new(ppo.reward_regex.as_deref().unwrap_or_default())
                .map_err(|e| Error::msg(e.to_string()))?,
        )),
        PpoReward::Length => Rewarder::Length(ppo.target_length.unwrap_or(1)),
        PpoReward::Model => {
            let p = ppo.reward_model.clone().unwrap_or_default();
            let rm = crate::runs::load_run(&p).map_err(|e| Error::Config {
                path: plan.config_path.clone(),
                msg: format!("`ppo.reward_model` = {:?}: {e}", p.display().to_string()),
            })?;
            if rm.model.head.num_labels != 1 {
                return Err(Error::Config {
                    path: plan.config_path.clone(),
                    msg: format!(
                        "`ppo.reward_model` = {:?} has {} outputs: a reward model has one (a run with task.type = \"reward\")",
                        p.display().to_string(),
                        rm.model.head.num_labels
                    ),
                });
            }
            let tmpl = super::reward::template_of(&rm.tok)?;
            Rewarder::Model(Box::new((rm, tmpl)))
        }
    };
    on(Event::Info(format!("reward: {}", rewarder.name())));

    // ---- prompts
    let format = sft_format(plan)?;
    let files = crate::data::resolve_files(&d.train)?;
    let tasks = read_rows(&files, &format, d.max_rows_per_file, d.split_seed)?;
    let all: Vec<SftExample> = tasks.iter().flat_map(|(_, e)| e.iter().cloned()).collect();
    let sp = seeded_split(all.len(), d.split.unwrap_or([1.0, 0.0, 0.0]), d.split_seed)?;
    let max_prompt = max_len - ppo.response_length;
    let pick = |idx: &[usize]| idx.iter().map(|&i| all[i].clone()).collect::<Vec<_>>();
    let mut make = |rows: &[SftExample], what: &str| -> Result<Vec<Prompt>> {
        let (p, long) = prompts_of(rows, &tok, template.as_ref(), max_prompt)?;
        on(Event::Info(format!(
            "data ({what}): {} prompts{}",
            p.len(),
            if long > 0 {
                format!(", {long} left out (longer than max_length - response_length = {max_prompt} tokens, or without an answer turn)")
            } else {
                String::new()
            }
        )));
        Ok(p)
    };
    let train_p = make(&pick(&sp.train), "train")?;
    if train_p.is_empty() {
        return Err(Error::Data(format!("{}: no training prompts", d.train)));
    }
    let read_file = |spec: &str| -> Result<Vec<SftExample>> {
        Ok(read_rows(
            &crate::data::resolve_files(spec)?,
            &format,
            None,
            d.split_seed,
        )?
        .into_iter()
        .flat_map(|(_, e)| e)
        .collect())
    };
    let n_gen = d.generate_eval_rows.unwrap_or(50);
    let val_rows = match &d.validation {
        Some(v) => read_file(v)?,
        None => pick(&sp.validation),
    };
    let mut val_p = make(&val_rows, "validation")?;
    val_p.truncate(n_gen.max(1));
    if val_p.is_empty() {
        return Err(Error::Data("the validation split holds no prompts".into()));
    }
    let test_rows = match &d.test {
        Some(f) => read_file(f)?,
        None => pick(&sp.test),
    };
    let mut tests: Vec<(String, Vec<Prompt>)> = Vec::new();
    let mut tp = make(&test_rows, "test")?;
    tp.truncate(n_gen);
    if !tp.is_empty() {
        tests.push(("test".into(), tp));
    }
    for (task, ex) in super::sft::heldout_rows(plan, &format)? {
        let mut p = make(&ex, &format!("held-out task {task}"))?;
        p.truncate(n_gen);
        tests.push((format!("heldout_{task}"), p));
    }

    // ---- value model, in the store under `value_model.`
    let value_init = ppo.value_init.unwrap_or(match &rewarder {
        Rewarder::Model(m)
            if m.0.cfg.family() == family && m.0.cfg.vocab_size() == cfg.vocab_size() =>
        {
            ValueInit::RewardModel
        }
        _ => ValueInit::Zero,
    });
    let (value_src, why) = match (&rewarder, value_init) {
        (Rewarder::Model(m), ValueInit::RewardModel) => {
            let rm = &m.0;
            if rm.cfg.family() != family || rm.cfg.vocab_size() != cfg.vocab_size() {
                return Err(Error::Config {
                    path: plan.config_path.clone(),
                    msg: format!(
                        "`ppo.value_init` = \"reward_model\": the reward model ({:?}, vocabulary {}) does not read the policy's tokens ({:?}, vocabulary {}); use \"zero\"",
                        rm.cfg.family(),
                        rm.cfg.vocab_size(),
                        family,
                        cfg.vocab_size()
                    ),
                });
            }
            let dir = ppo.reward_model.clone().unwrap_or_default();
            let m = if dir.join("model").is_dir() {
                dir.join("model")
            } else {
                dir
            };
            (m, "the reward model's weights and score head (TRL's recipe: the value starts as a score of the whole response)")
        }
        _ => (
            model_path.clone(),
            "the policy's base weights with a zero score head (no reward model to start from: every value starts at 0)",
        ),
    };
    let vload = load(&value_src, sel())?;
    let mut vstore = vload.store;
    let mut vcfg = vload.cfg;
    vcfg.set_dropout(Some(0.0), Some(0.0));
    let h = vcfg.hidden_size();
    if !vstore.contains("score.weight") {
        vstore.insert(
            "score.weight",
            Tensor::zeros((1, h), candle_core::DType::F32, &Device::Cpu)?,
        )?;
    }
    // The value model reads hidden states: no LM head.
    vstore.remove("lm_head.weight");
    store.absorb(vstore, VALUE_PREFIX)?;
    on(Event::Info(format!(
        "value model: {} ({})",
        value_src.display(),
        why
    )));

    // ---- adapter (on policy and value model alike), reference
    let mut rng = ChaCha8Rng::seed_from_u64(c.seeds.init);
    let adapter_cfg =
        super::attach_adapter(plan, &mut store, family, PeftTask::CausalLm, &mut rng, on)?;
    let score_name = format!("{VALUE_PREFIX}.score.weight");
    store.make_trainable(&score_name)?;
    let policy = CausalLm::build(&store, &cfg)?;
    let value = ValueModel::build(&store, &vcfg, VALUE_PREFIX)?;
    on(Event::Info(store.summary()));
    let frozen = if full {
        let LoadedModel { store: s, .. } = load(&model_path, Selector::none())?;
        Some(s)
    } else {
        None
    };
    let frozen_lm = frozen
        .as_ref()
        .map(|s| CausalLm::build(s, &cfg))
        .transpose()?;
    on(Event::Info(match &frozen_lm {
        Some(_) => "reference: a frozen copy of the model as loaded".into(),
        None => "reference: the base model (adapters switched off)".into(),
    }));
    let actors = Actors {
        policy: &policy,
        reference: frozen_lm.as_ref(),
        value: &value,
        store: &store,
        tok: &tok,
        max_positions: cfg.max_positions(),
        rewarder: &rewarder,
    };

    // ---- the schedule: rollout batches of R prompts, E x M optimizer steps each
    let micro = t.batch_size;
    let mini = micro * t.grad_accum;
    let per_batch = mini * ppo.num_mini_batches;
    let episodes = ppo.total_episodes.unwrap_or(t.epochs * train_p.len());
    let batches = episodes.div_ceil(per_batch).max(1);
    let steps_per_batch = ppo.num_ppo_epochs * ppo.num_mini_batches;
    let total = batches * steps_per_batch;
    on(Event::Info(format!(
        "ppo: {batches} rollout batches of {per_batch} prompts ({episodes} episodes), {} epochs x {} minibatches of {mini} each: {total} optimizer steps",
        ppo.num_ppo_epochs, ppo.num_mini_batches
    )));
    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let mut tr = Trainer::new(
        plan,
        &store,
        &run,
        total,
        train_p.len(),
        fingerprint(&train_p),
        t0,
    )?;
    if opts.resume {
        tr.resume(on)?;
    }
    let mut kl_coef = tr
        .state
        .method
        .get("kl_coef")
        .copied()
        .unwrap_or(ppo.kl_coef);
    let eos_ids = tok.eos_ids().to_vec();
    let sample = GenerateConfig {
        max_new_tokens: ppo.response_length,
        temperature: ppo.temperature,
        top_k: ppo.top_k,
        top_p: ppo.top_p,
        eos_ids: eos_ids.clone(),
        ..Default::default()
    };
    let greedy = GenerateConfig {
        max_new_tokens: ppo.response_length,
        eos_ids,
        ..Default::default()
    };
    let eval_bs = t.eval_batch_size.unwrap_or(micro * 2);
    let saver = Saver {
        dir: opts.run_dir.clone(),
        base: canonical(&model_path),
        family,
        base_config: &raw_config,
        tok: &tok,
        adapter: adapter_cfg.as_ref(),
        task: "ppo",
    };
    let save_best = |s: &ParamStore| saver.save(&s.view(|n| !n.starts_with(VALUE_PREFIX)));
    let test_all = |kl: bool| -> Result<BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        for (name, set) in &tests {
            let ks = kl.then_some((&sample, c.seeds.data));
            for (k, v) in evaluate_set(&actors, set, eval_bs, &greedy, ks)? {
                let key = if name == "test" {
                    k
                } else {
                    format!("{name}_{k}")
                };
                m.insert(key, v);
            }
        }
        Ok(m)
    };
    if !opts.resume && !tests.is_empty() {
        crate::train::log_test_before(&run, test_all(false)?, on)?;
    }
    on(Event::Start {
        total_steps: total,
        step: tr.state.step,
    });
    let params = |kl_coef| PpoParams::of(&ppo, kl_coef);
    let (mut interrupted, mut stopped) = (false, tr.early_stopped());
    let mut batch = tr.state.step / steps_per_batch;
    let order_of = |e: usize| EpochOrder::new(train_p.len(), c.seeds.data, e as u64);
    while !stopped && batch < batches {
        if opts.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        // The prompts of this batch: episodes batch*R .. (batch+1)*R of
        // the seeded epoch orders.
        let mut rows = Vec::with_capacity(per_batch);
        let mut cur: Option<(usize, Vec<usize>)> = None;
        for ep in batch * per_batch..(batch + 1) * per_batch {
            let (e, pos) = (ep / train_p.len(), ep % train_p.len());
            if cur.as_ref().is_none_or(|(ce, _)| *ce != e) {
                cur = Some((e, order_of(e).indices));
            }
            rows.push(cur.as_ref().map(|(_, o)| o[pos]).unwrap_or(0));
        }
        let prompts: Vec<&Prompt> = rows.iter().map(|&i| &train_p[i]).collect();
        let tr0 = Instant::now();
        let (r, entropy, eos) = rollout(
            &actors,
            &prompts,
            &sample,
            micro.max(eval_bs),
            c.seeds.data,
            batch as u64,
            ppo.missing_eos_penalty,
        )?;
        let rollout_s = tr0.elapsed().as_secs_f64();
        let new_tokens: usize = r.responses.iter().map(|x| x.len()).sum();
        if let Some(i) = r.scores.iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite(format!(
                "the reward of rollout {i} of batch {batch} (step {}) is {}, on the prompt of training row {}",
                tr.state.step, r.scores[i], rows[i]
            )));
        }
        let p = params(kl_coef);
        let adv = advantages(&r, &p)?;
        let tu = Instant::now();
        let mut st: Vec<MicroStats> = Vec::new();
        for e in 0..ppo.num_ppo_epochs {
            let perm = EpochOrder::new(
                per_batch,
                c.seeds.data ^ 0x5050_4f5f_6d69_6e69,
                (batch * ppo.num_ppo_epochs + e) as u64,
            )
            .indices;
            for mb in perm.chunks(mini) {
                let micros: Vec<&[usize]> = mb.chunks(micro).collect();
                let k = micros.len();
                tr.step(
                    k,
                    &mut |i, _| {
                        let (loss, s) =
                            ppo_loss(&policy, &value, &r, &adv, micros[i], tok.pad_id(), &p)?;
                        let n = s.tokens;
                        st.push(s);
                        Ok((loss, 1.0 / k as f64, n))
                    },
                    &|| {
                        format!(
                            "rollout batch {batch}: prompts of training rows {:?}",
                            mb.iter().map(|&j| rows[j]).collect::<Vec<_>>()
                        )
                    },
                    on,
                )?;
            }
        }
        let update_s = tu.elapsed().as_secs_f64();
        batch += 1;
        tr.state.epoch = batch * per_batch / train_p.len();
        // ---- the batch's metrics
        let n = r.scores.len() as f64;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let sm = |f: &dyn Fn(&MicroStats) -> f64| mean(&st.iter().map(f).collect::<Vec<_>>());
        let score = r.scores.iter().map(|&x| x as f64).sum::<f64>() / n;
        let kl1 = mean(&adv.kl_k1);
        let mut m: BTreeMap<String, f64> = [
            ("score", score),
            ("kl", kl1),
            ("kl_k3", mean(&adv.kl_k3)),
            ("non_score_reward", mean(&adv.non_score)),
            ("rlhf_reward", score + mean(&adv.non_score)),
            (
                "entropy",
                entropy.iter().map(|&x| x as f64).sum::<f64>() / n,
            ),
            ("approx_kl", sm(&|s| s.approx_kl)),
            ("clipfrac", sm(&|s| s.clipfrac)),
            ("value_clipfrac", sm(&|s| s.value_clipfrac)),
            ("policy_loss", sm(&|s| s.policy_loss)),
            ("value_loss", sm(&|s| s.value_loss)),
            ("ratio", sm(&|s| s.ratio)),
            ("response_length", new_tokens as f64 / n),
            ("eos_share", eos.iter().filter(|&&x| x).count() as f64 / n),
            ("kl_coef", kl_coef),
            (
                "rollout_tokens_per_s",
                new_tokens as f64 / rollout_s.max(1e-9),
            ),
            ("rollout_s", rollout_s),
            ("update_s", update_s),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        m.insert("episodes".into(), (batch * per_batch) as f64);
        if ppo.adap_kl_ctrl {
            kl_coef = math::adapt_kl_coef(kl_coef, kl1, ppo.target, ppo.horizon, per_batch);
        }
        tr.state.method.insert("kl_coef".into(), kl_coef);
        // One line per rollout batch (they are few; `train.log_every` counts
        // optimizer steps).
        run.log_eval(tr.state.step, "train", &m)?;
        on(Event::Info(format!(
            "rollout batch {batch}/{batches}: score {score:.3}, kl {kl1:.3}, response {:.1} tokens, eos {:.2}, rollout {rollout_s:.1} s, update {update_s:.1} s",
            new_tokens as f64 / n,
            m["eos_share"]
        )));
        // ---- evaluation and checkpoints, counted in rollout batches
        let epoch_end =
            (batch * per_batch) / train_p.len() != ((batch - 1) * per_batch) / train_p.len();
        let eval_due = match t.eval_every {
            Some(k) => batch.is_multiple_of(k),
            None => epoch_end,
        } || batch == batches;
        let mut evaluated = None;
        if eval_due {
            let vm = evaluate_set(&actors, &val_p, eval_bs, &greedy, None)?;
            evaluated = Some(tr.record_validation(vm, &save_best, on)?);
        }
        let outcome = evaluated.unwrap_or_default();
        let save_due = match t.save_every {
            Some(k) => batch.is_multiple_of(k),
            None => evaluated.is_some(),
        };
        if outcome.improved || save_due {
            tr.save_checkpoint()?;
        }
        stopped = outcome.stop;
    }
    if interrupted {
        tr.save_interrupted(on)?;
    }
    let mut test = None;
    if !interrupted && !tests.is_empty() {
        tr.restore_best()?;
        let m = test_all(true)?;
        tr.record_test("test", &m, on)?;
        test = Some(m);
    }
    tr.finish(interrupted, stopped, test, on)
}
