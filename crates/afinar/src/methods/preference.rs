//! What reward models and DPO share: the losses on per-sequence scores and
//! log-probabilities, with TRL's definitions and logged names
//! (`trl/trainer/reward_trainer.py`, `trl/trainer/dpo_trainer.py`).
//!
//! - Reward model (Bradley-Terry, Ouyang et al. 2022): `-logsigmoid(r_c -
//!   r_r - margin)`, plus `center_rewards_coefficient * mean((r_c + r_r)^2)`
//!   when set (Eisenstein et al. 2023), which keeps rewards centred on 0.
//! - DPO (Rafailov et al. 2023) on `h = (log pi(c) - log pi(r)) - (log
//!   ref(c) - log ref(r))`: `sigmoid` = `-logsigmoid(beta h)` (with TRL's
//!   `label_smoothing` eps: `(1 - eps) * -logsigmoid(beta h) + eps *
//!   -logsigmoid(-beta h)`), `hinge` = `relu(1 - beta h)`, `ipo` =
//!   `(h - 1 / (2 beta))^2` (Azar et al. 2023; TRL feeds IPO log-probs
//!   averaged over the completion's tokens, the others summed). The implicit
//!   rewards are `beta (log pi - log ref)` of each completion.
//!
//! Everything is candle ops on `[B]` tensors: the gradients reach the policy
//! (and the reward head) through the graph.

use crate::{Error, Result};
use candle_core::Tensor;

/// `-log(sigmoid(x))` = softplus(-x), stable for any x:
/// `max(-x, 0) + log(1 + e^{-|x|})`.
pub fn neg_log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.neg()?.relu()? + tail)?)
}

pub use crate::config::DpoLossType;

/// The log-probabilities of a batch of pairs: `[B]` each (summed over the
/// completion's tokens, or averaged for IPO).
pub struct PairLogps<'a> {
    pub policy_chosen: &'a Tensor,
    pub policy_rejected: &'a Tensor,
    pub ref_chosen: &'a Tensor,
    pub ref_rejected: &'a Tensor,
}

/// One DPO batch: the per-pair losses `[B]` (mean them for the step) and
/// the implicit rewards `[B]` (detached), as TRL's `dpo_loss` returns them.
pub struct DpoOut {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// TRL's `dpo_loss` for `kind`, `beta` > 0 and `label_smoothing` in [0, 0.5]
/// (sigmoid only).
pub fn dpo_loss(
    lp: &PairLogps,
    kind: DpoLossType,
    beta: f64,
    label_smoothing: f64,
) -> Result<DpoOut> {
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(Error::msg(format!(
            "dpo beta {beta} must be a positive number"
        )));
    }
    if !(0.0..=0.5).contains(&label_smoothing) {
        return Err(Error::msg(format!(
            "dpo label_smoothing {label_smoothing} must be in [0, 0.5]"
        )));
    }
    let pi = (lp.policy_chosen - lp.policy_rejected)?;
    let rf = (lp.ref_chosen - lp.ref_rejected)?;
    let h = (pi - rf)?;
    let losses = match kind {
        DpoLossType::Sigmoid => {
            let bh = (&h * beta)?;
            let main = neg_log_sigmoid(&bh)?;
            if label_smoothing > 0.0 {
                ((main * (1.0 - label_smoothing))?
                    + (neg_log_sigmoid(&bh.neg()?)? * label_smoothing)?)?
            } else {
                main
            }
        }
        DpoLossType::Hinge => ((&h * -beta)? + 1.0)?.relu()?,
        DpoLossType::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?,
    };
    let reward = |p: &Tensor, r: &Tensor| -> Result<Tensor> { Ok(((p - r)? * beta)?.detach()) };
    Ok(DpoOut {
        losses,
        chosen_rewards: reward(lp.policy_chosen, lp.ref_chosen)?,
        rejected_rewards: reward(lp.policy_rejected, lp.ref_rejected)?,
    })
}

/// The Bradley-Terry loss of a reward model on `[B]` scores of the chosen
/// and rejected completions, with an optional per-pair `margin` `[B]` and
/// TRL's `center_rewards_coefficient`: a scalar.
pub fn reward_loss(
    chosen: &Tensor,
    rejected: &Tensor,
    margin: Option<&Tensor>,
    center_rewards_coefficient: Option<f64>,
) -> Result<Tensor> {
    let mut d = (chosen - rejected)?;
    if let Some(m) = margin {
        d = (d - m)?;
    }
    let mut loss = neg_log_sigmoid(&d)?.mean_all()?;
    if let Some(c) = center_rewards_coefficient.filter(|c| *c != 0.0) {
        loss = (loss + ((chosen + rejected)?.sqr()?.mean_all()? * c)?)?;
    }
    Ok(loss)
}

/// The metrics TRL logs for a batch of pairs, by TRL's names: DPO's
/// `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (the share of
/// pairs whose chosen reward is strictly higher), `rewards/margins`, and
/// `logps/chosen`, `logps/rejected` when policy log-probs are given; a reward
/// model's pair accuracy is `rewards/accuracies` of its scores.
pub fn pair_metrics(
    chosen_rewards: &Tensor,
    rejected_rewards: &Tensor,
    logps: Option<(&Tensor, &Tensor)>,
) -> Result<Vec<(&'static str, f64)>> {
    let v = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?)
    };
    let mean = |x: &[f32]| x.iter().map(|v| *v as f64).sum::<f64>() / x.len().max(1) as f64;
    let (c, r) = (v(chosen_rewards)?, v(rejected_rewards)?);
    if c.len() != r.len() || c.is_empty() {
        return Err(Error::msg(format!(
            "pair metrics: {} chosen and {} rejected rewards",
            c.len(),
            r.len()
        )));
    }
    let acc = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / c.len() as f64;
    let margins: Vec<f32> = c.iter().zip(&r).map(|(a, b)| a - b).collect();
    let mut out = vec![
        ("rewards/chosen", mean(&c)),
        ("rewards/rejected", mean(&r)),
        ("rewards/accuracies", acc),
        ("rewards/margins", mean(&margins)),
    ];
    if let Some((pc, pr)) = logps {
        out.push(("logps/chosen", mean(&v(pc)?)));
        out.push(("logps/rejected", mean(&v(pr)?)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{flat, max_abs_diff};
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// The closed-form case: beta * h = [0, 1, 2].
    #[test]
    fn dpo_losses_in_closed_form() {
        let (pc, pr) = (t(&[-0.5, -10.0, -1.0]), t(&[-0.1, -30.0, -21.0]));
        let (rc, rr) = (t(&[-0.5, -10.1, -0.1]), t(&[-0.1, -20.1, -0.1]));
        let lp = PairLogps {
            policy_chosen: &pc,
            policy_rejected: &pr,
            ref_chosen: &rc,
            ref_rejected: &rr,
        };
        let s = dpo_loss(&lp, DpoLossType::Sigmoid, 0.1, 0.0).unwrap();
        assert!(
            max_abs_diff(&flat(&s.losses), &[0.6931, 0.3133, 0.1269]) <= 1e-4,
            "{:?}",
            flat(&s.losses)
        );
        let h = dpo_loss(&lp, DpoLossType::Hinge, 0.1, 0.0).unwrap();
        assert!(
            max_abs_diff(&flat(&h.losses), &[1.0, 0.0, 0.0]) <= 1e-5,
            "{:?}",
            flat(&h.losses)
        );
        // IPO: (h - 1/(2 beta))^2 with h = [0, 10, 20] and 1/(2 beta) = 5.
        let i = dpo_loss(&lp, DpoLossType::Ipo, 0.1, 0.0).unwrap();
        assert!(
            max_abs_diff(&flat(&i.losses), &[25.0, 25.0, 225.0]) <= 1e-3,
            "{:?}",
            flat(&i.losses)
        );
        // Implicit rewards beta (pi - ref): chosen [0, 0.01, -0.09], rejected [0, -0.99, -2.09].
        assert!(max_abs_diff(&flat(&s.chosen_rewards), &[0.0, 0.01, -0.09]) <= 1e-5);
        assert!(max_abs_diff(&flat(&s.rejected_rewards), &[0.0, -0.99, -2.09]) <= 1e-5);
        let m = pair_metrics(&s.chosen_rewards, &s.rejected_rewards, Some((&pc, &pr))).unwrap();
        let get = |k: &str| m.iter().find(|(n, _)| *n == k).unwrap().1;
        assert!((get("rewards/accuracies") - 2.0 / 3.0).abs() < 1e-9);
        assert!((get("rewards/margins") - 1.0).abs() < 1e-5);
        assert!((get("logps/rejected") - (-51.1 / 3.0)).abs() < 1e-4);
        // Label smoothing 0.1 on row 0 (h = 0) is still ln 2.
        let ls = dpo_loss(&lp, DpoLossType::Sigmoid, 0.1, 0.1).unwrap();
        assert!((flat(&ls.losses)[0] - std::f32::consts::LN_2).abs() < 1e-5);
    }

    /// At step 0 the policy is the reference: sigmoid ln 2, IPO 1/(4 beta^2),
    /// hinge 1, no pair counted as won.
    #[test]
    fn dpo_at_step_zero() {
        let (c, r) = (t(&[-3.0, -7.5]), t(&[-4.0, -2.0]));
        let lp = PairLogps {
            policy_chosen: &c,
            policy_rejected: &r,
            ref_chosen: &c,
            ref_rejected: &r,
        };
        let beta = 0.2;
        let want = [
            (DpoLossType::Sigmoid, std::f32::consts::LN_2),
            (DpoLossType::Ipo, (1.0 / (4.0 * beta * beta)) as f32),
            (DpoLossType::Hinge, 1.0),
        ];
        for (kind, w) in want {
            let o = dpo_loss(&lp, kind, beta, 0.0).unwrap();
            assert!(
                max_abs_diff(&flat(&o.losses), &[w, w]) <= 1e-4,
                "{kind:?}: {:?}",
                flat(&o.losses)
            );
            let m = pair_metrics(&o.chosen_rewards, &o.rejected_rewards, None).unwrap();
            assert_eq!(
                m.iter()
                    .find(|(n, _)| *n == "rewards/accuracies")
                    .unwrap()
                    .1,
                0.0
            );
        }
        assert!(dpo_loss(&lp, DpoLossType::Sigmoid, 0.0, 0.0).is_err());
        assert!(dpo_loss(&lp, DpoLossType::Sigmoid, 0.1, 0.7).is_err());
    }

    /// d loss / d policy log-probs against central differences, each type.
    #[test]
    fn dpo_gradients_match_finite_differences() {
        let base = [-2.0f32, -5.0, -0.3];
        let (pr, rc, rr) = (
            t(&[-4.0, -1.0, -0.2]),
            t(&[-2.5, -4.0, -0.1]),
            t(&[-3.0, -1.5, -0.4]),
        );
        for kind in [DpoLossType::Sigmoid, DpoLossType::Hinge, DpoLossType::Ipo] {
            let f = |pc: &Tensor| {
                let lp = PairLogps {
                    policy_chosen: pc,
                    policy_rejected: &pr,
                    ref_chosen: &rc,
                    ref_rejected: &rr,
                };
                dpo_loss(&lp, kind, 0.3, 0.05)
                    .unwrap()
                    .losses
                    .sum_all()
                    .unwrap()
            };
            let v = Var::new(&base[..], &Device::Cpu).unwrap();
            let g = f(v.as_tensor()).backward().unwrap();
            let g = flat(g.get(v.as_tensor()).unwrap());
            for i in 0..base.len() {
                let at = |d: f32| {
                    let mut x = base;
                    x[i] += d;
                    f(&t(&x)).to_scalar::<f32>().unwrap()
                };
                let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
                assert!(
                    (fd - g[i]).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{kind:?} [{i}]: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn bradley_terry_reward_loss_in_closed_form() {
        let (c, r) = (t(&[1.0, 0.0]), t(&[0.0, 1.0]));
        // -logsigmoid([1, -1]) = [0.3133, 1.3133], mean 0.8133.
        let l = reward_loss(&c, &r, None, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 0.81326).abs() < 1e-4, "{l}");
        // + 0.01 * mean((c + r)^2) = + 0.01.
        let l = reward_loss(&c, &r, None, Some(0.01))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 0.82326).abs() < 1e-4, "{l}");
        // A margin of 1 on both pairs: -logsigmoid([0, -2]) = [0.6931, 2.1269].
        let m = t(&[1.0, 1.0]);
        let l = reward_loss(&c, &r, Some(&m), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 1.41003).abs() < 1e-4, "{l}");
        // Stable far out: no inf / nan at |x| = 200.
        let big = neg_log_sigmoid(&t(&[200.0, -200.0])).unwrap();
        assert!(
            max_abs_diff(&flat(&big), &[0.0, 200.0]) <= 1e-3,
            "{:?}",
            flat(&big)
        );
    }
}

// ---- the data of a preference run (reward model or DPO)

use crate::config::Plan;
use crate::data::preference::{read_pairs, PreferenceFormat, PreferencePair, PreferenceRows};
use crate::data::{resolve_files, seeded_split, FieldPath};
use std::path::PathBuf;

/// Where a plan's pairs keep their three fields (`data.prompt`,
/// `data.chosen`, `data.rejected`; TRL's names by default).
pub fn pair_format(plan: &Plan) -> Result<PreferenceFormat> {
    let d = &plan.config.data;
    let fp = |key: &str, v: &Option<String>, default: &str| {
        FieldPath::parse(v.as_deref().unwrap_or(default)).map_err(|e| Error::Config {
            path: plan.config_path.clone(),
            msg: format!("`data.{key}`: {e}"),
        })
    };
    Ok(PreferenceFormat {
        prompt: fp("prompt", &d.prompt, "prompt")?,
        chosen: fp("chosen", &d.chosen, "chosen")?,
        rejected: fp("rejected", &d.rejected, "rejected")?,
    })
}

/// The pairs of a plan: train / validation / test (a seeded split of
/// `data.train` by row, or files), and each held-out task file of
/// `data.heldout_tasks` whole (named `heldout_<file stem>`).
pub struct PairSplits {
    pub train: PreferenceRows,
    pub validation: PreferenceRows,
    pub test: Option<PreferenceRows>,
    pub heldout: Vec<(String, PreferenceRows)>,
}

fn read_all(spec: &str, format: &PreferenceFormat) -> Result<Vec<PreferenceRows>> {
    let files = resolve_files(spec)?;
    files
        .iter()
        .map(|f| read_pairs(f, format, Some(crate::data::Format::Jsonl)))
        .collect()
}

/// One set of rows from every file of `spec` (each pair keeps its line).
fn read_joined(spec: &str, format: &PreferenceFormat) -> Result<PreferenceRows> {
    let parts = read_all(spec, format)?;
    let path = match parts.as_slice() {
        [one] => one.path.clone(),
        _ => PathBuf::from(spec),
    };
    Ok(PreferenceRows {
        path,
        rows: parts.into_iter().flat_map(|p| p.rows).collect(),
    })
}

pub fn load_pair_splits(plan: &Plan) -> Result<PairSplits> {
    let d = &plan.config.data;
    let format = pair_format(plan)?;
    let all = read_joined(&d.train, &format)?;
    if all.rows.is_empty() {
        return Err(Error::Data(format!("{}: no preference pairs", d.train)));
    }
    let sp = seeded_split(
        all.rows.len(),
        d.split.unwrap_or([1.0, 0.0, 0.0]),
        d.split_seed,
    )?;
    let pick = |idx: &[usize]| PreferenceRows {
        path: all.path.clone(),
        rows: idx
            .iter()
            .map(|&i| all.rows[i].clone())
            .collect::<Vec<PreferencePair>>(),
    };
    let validation = match &d.validation {
        Some(v) => read_joined(v, &format)?,
        None => pick(&sp.validation),
    };
    if validation.rows.is_empty() {
        return Err(Error::Data("the validation split holds no pairs".into()));
    }
    let test = match &d.test {
        Some(t) => Some(read_joined(t, &format)?),
        None if !sp.test.is_empty() => Some(pick(&sp.test)),
        None => None,
    };
    let mut heldout = Vec::new();
    if let Some(h) = &d.heldout_tasks {
        for rows in read_all(h, &format)? {
            let stem = rows
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default();
            heldout.push((format!("heldout_{stem}"), rows));
        }
    }
    Ok(PairSplits {
        train: pick(&sp.train),
        validation,
        test,
        heldout,
    })
}

/// The pairs `afinar eval` reads for a run of `plan`: those of the file
/// `data` (with the run's field names), or the run's test split.
pub fn pairs_to_evaluate(plan: &Plan, data: Option<&std::path::Path>) -> Result<PreferenceRows> {
    match data {
        Some(p) => read_pairs(p, &pair_format(plan)?, Some(crate::data::Format::Jsonl)),
        None => load_pair_splits(plan)?.test.ok_or_else(|| {
            Error::Data("the run's config has no test split: give --data FILE".into())
        }),
    }
}

/// A set's scores or log-probabilities, `(chosen, rejected)` per pair, as
/// the metrics of [`pair_metrics`] (means over the set).
pub fn set_metrics(
    rewards: &[(f32, f32)],
    logps: Option<&[(f32, f32)]>,
) -> Result<Vec<(&'static str, f64)>> {
    let n = rewards.len();
    let t = |v: Vec<f32>| Tensor::from_vec(v, n, &candle_core::Device::Cpu);
    let c = t(rewards.iter().map(|p| p.0).collect())?;
    let r = t(rewards.iter().map(|p| p.1).collect())?;
    match logps {
        Some(l) => {
            let lc = t(l.iter().map(|p| p.0).collect())?;
            let lr = t(l.iter().map(|p| p.1).collect())?;
            pair_metrics(&c, &r, Some((&lc, &lr)))
        }
        None => pair_metrics(&c, &r, None),
    }
}
