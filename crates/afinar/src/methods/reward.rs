//! Reward models (TRL's `RewardTrainer`): a scalar head scores each
//! (prompt, completion); the Bradley-Terry loss asks the chosen completion
//! to score above the rejected one. In progress (issue 14): the batch loss
//! is here; the recipe (`task.type = "reward"`), `afinar score` and
//! encoders' text-pair input come next.
//!
//! A batch of B pairs runs as one batch of 2B right-padded sequences (the
//! chosen ones, then the rejected ones); a decoder's score is read at each
//! row's last non-padding token ([`SequenceModel::scores`]).

use super::preference::{pair_metrics, reward_loss};
use crate::data::preference::PairTokens;
use crate::data::sft::SftBatch;
use crate::heads::SequenceModel;
use crate::models::Inputs;
use crate::nn::DropoutRng;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// One reward-model micro-batch: the mean Bradley-Terry loss over its pairs
/// (recorded for backward; `margins`: one per pair, TRL's `margin` column)
/// and its metrics: `rewards/accuracies` (the pair accuracy),
/// `rewards/margins`, `rewards/chosen`, `rewards/rejected`, `loss`.
pub fn reward_batch(
    model: &SequenceModel,
    pairs: &[&PairTokens],
    pad_id: u32,
    margins: Option<&[f32]>,
    center_rewards_coefficient: Option<f64>,
    rng: Option<&DropoutRng>,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let n = pairs.len();
    let b: SftBatch = super::dpo::pair_batch(pairs, pad_id)?;
    let mask: Vec<f32> = b.attention_mask.iter().map(|&m| m as f32).collect();
    let x = Inputs::new(b.ids.clone(), mask, b.batch, b.seq_len)?;
    let scores = model.scores(&x, rng)?; // [2B]
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
