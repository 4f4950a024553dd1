//! DPO (Rafailov et al. 2023) as TRL's `DPOTrainer` computes it — the loss
//! of a batch of preference pairs. In progress (issue 14): the batch loss
//! and its reference are here; the recipe (`task.type = "dpo"`), evaluation
//! and the CLI come next.
//!
//! A batch of B pairs runs as one batch of 2B sequences (the chosen ones,
//! then the rejected ones, right-padded) through the policy; each
//! completion's log-probability comes from the fused per-token head
//! ([`CausalLm::completion_logps`]). The reference is the same model with
//! its adapters disabled (no copy: LoRA / IA3 / prompt-free adapter runs),
//! or log-probabilities computed beforehand (`precompute_ref_log_probs`).

use super::preference::{dpo_loss, pair_metrics, DpoLossType, PairLogps};
use crate::data::preference::PairTokens;
use crate::data::sft::{pad_batch, SftBatch};
use crate::heads::CausalLm;
use crate::models::Inputs;
use crate::nn::DropoutRng;
use crate::params::ParamStore;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::sync::atomic::Ordering;

/// Where the reference log-probabilities come from.
pub enum Reference<'a> {
    /// The policy itself with every adapter of `store` switched off.
    AdaptersDisabled(&'a ParamStore),
    /// Computed once beforehand: `(chosen, rejected)` per pair of the batch.
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
/// first), summed or averaged (IPO).
fn logps(lm: &CausalLm, b: &SftBatch, average: bool, rng: Option<&DropoutRng>) -> Result<Tensor> {
    let hidden = lm.forward(&Inputs::from_sft_batch(b)?, rng)?;
    Ok(lm.completion_logps(&hidden, &b.labels, average)?.0)
}

/// The reference log-probabilities of a pair batch, `(chosen [B], rejected [B])`,
/// outside the graph.
pub fn reference_logps(
    lm: &CausalLm,
    reference: &Reference,
    b: &SftBatch,
    kind: DpoLossType,
) -> Result<(Tensor, Tensor)> {
    let n = b.batch / 2;
    match reference {
        Reference::AdaptersDisabled(store) => {
            /// Switches the adapters back on however the forward ends.
            struct On<'s>(&'s ParamStore);
            impl Drop for On<'_> {
                fn drop(&mut self) {
                    self.0.adapters_enabled.store(true, Ordering::Relaxed);
                }
            }
            store.adapters_enabled.store(false, Ordering::Relaxed);
            let _on = On(store);
            let all = logps(lm, b, kind.averages_log_probs(), None)?.detach();
            Ok((all.narrow(0, 0, n)?, all.narrow(0, n, n)?))
        }
        Reference::Precomputed(v) => {
            if v.len() != n {
                return Err(Error::msg(format!(
                    "dpo: {} precomputed reference pairs for a batch of {n}",
                    v.len()
                )));
            }
            let c: Vec<f32> = v.iter().map(|p| p.0).collect();
            let r: Vec<f32> = v.iter().map(|p| p.1).collect();
            Ok((
                Tensor::from_vec(c, n, &Device::Cpu)?,
                Tensor::from_vec(r, n, &Device::Cpu)?,
            ))
        }
    }
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
    let (ref_c, ref_r) = reference_logps(policy, reference, &b, kind)?;
    let all = logps(policy, &b, kind.averages_log_probs(), rng)?;
    let (pc, pr) = (all.narrow(0, 0, n)?, all.narrow(0, n, n)?);
    let lp = PairLogps {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: &ref_c,
        ref_rejected: &ref_r,
    };
    let out = dpo_loss(&lp, kind, beta, label_smoothing)?;
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
