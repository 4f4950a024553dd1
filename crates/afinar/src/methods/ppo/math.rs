//! PPO's arithmetic on rollouts, outside the graph: the KL estimators, the
//! per-token rewards, whitening, GAE, the clipping decisions of the policy
//! and value losses, and the adaptive KL coefficient. Per row, one value per
//! response token (the response holds its end-of-sequence token, if any).

use crate::config::KlEstimator;
use crate::{Error, Result};

/// Per-token KL estimates of the policy from the reference (Schulman,
/// "Approximating KL divergence"): k1 = log p - log q (unbiased, can be
/// negative), k3 = (q/p - 1) - log(q/p) (unbiased, never negative).
pub fn kl(logp: &[f32], ref_logp: &[f32], est: KlEstimator) -> Vec<f32> {
    logp.iter()
        .zip(ref_logp)
        .map(|(&p, &q)| {
            let logr = q - p;
            match est {
                KlEstimator::K1 => -logr,
                KlEstimator::K3 => logr.exp() - 1.0 - logr,
            }
        })
        .collect()
}

/// The per-token rewards of one response: `-kl_coef * kl` on every token,
/// plus the score on the last one.
pub fn token_rewards(kl: &[f32], kl_coef: f64, score: f32) -> Vec<f32> {
    let mut r: Vec<f32> = kl.iter().map(|&k| (-kl_coef * k as f64) as f32).collect();
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalised advantage estimation (Schulman et al. 2016) over one
/// response: `delta_t = r_t + gamma V_{t+1} - V_t` (V after the last token
/// is 0), `A_t = delta_t + gamma lam A_{t+1}`; returns `A_t + V_t`.
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lam: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0f32; n];
    let mut last = 0f64;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next - values[t] as f64;
        last = delta + gamma * lam * last;
        adv[t] = last as f32;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Whiten every token of every row together: `(x - mean) / sqrt(var +
/// 1e-8)` with the unbiased variance (TRL's `masked_whiten`); with
/// `shift_mean = false` the mean is added back (rewards keep their mean).
/// Fewer than two tokens have no variance: an error saying so.
pub fn whiten(rows: &mut [Vec<f32>], shift_mean: bool) -> Result<()> {
    let n: usize = rows.iter().map(|r| r.len()).sum();
    if n < 2 {
        return Err(Error::msg(format!(
            "ppo: whitening needs at least 2 response tokens in the batch, it has {n} (raise the rollout batch: train.batch_size x train.grad_accum x ppo.num_mini_batches)"
        )));
    }
    let mean = rows.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = rows
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let inv = 1.0 / (var + 1e-8).sqrt();
    for x in rows.iter_mut().flatten() {
        let w = (*x as f64 - mean) * inv;
        *x = if shift_mean { w } else { w + mean } as f32;
    }
    Ok(())
}

/// The clipped surrogate of one token, as a loss: `max(-A r, -A clip(r, 1
/// - eps, 1 + eps))`. Returns the loss, and whether the clipped term was
/// taken (strictly larger: then the loss does not depend on r, and the
/// token counts in `clipfrac`).
pub fn clipped_policy_loss(ratio: f64, adv: f64, eps: f64) -> (f64, bool) {
    let l1 = -adv * ratio;
    let l2 = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    if l2 > l1 {
        (l2, true)
    } else {
        (l1, false)
    }
}

/// The clipped value loss of one token (before the 0.5): `max((v - R)^2,
/// (clip(v, v_old - eps, v_old + eps) - R)^2)`, and whether the clipped
/// term was taken (then it does not depend on v).
pub fn clipped_value_loss(v: f64, v_old: f64, ret: f64, eps: f64) -> (f64, bool) {
    let l1 = (v - ret).powi(2);
    let l2 = (v.clamp(v_old - eps, v_old + eps) - ret).powi(2);
    if l2 > l1 {
        (l2, true)
    } else {
        (l1, false)
    }
}

/// The adaptive KL coefficient of Ziegler et al. 2019 (TRL's
/// `AdaptiveKLController`): after each batch of `n` rollouts with mean KL
/// `kl`, `coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon`.
pub fn adapt_kl_coef(coef: f64, kl: f64, target: f64, horizon: f64, n: usize) -> f64 {
    let err = (kl / target - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + err * n as f64 / horizon)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn gae_matches_hand_computed_values() {
        // gamma 0.9, lam 0.5; r = [0, 0, 1], V = [0.5, 0.2, 0.4].
        // delta2 = 1 - 0.4 = 0.6;            A2 = 0.6
        // delta1 = 0 + 0.9*0.4 - 0.2 = 0.16; A1 = 0.16 + 0.45*0.6 = 0.43
        // delta0 = 0 + 0.9*0.2 - 0.5 = -0.32; A0 = -0.32 + 0.45*0.43 = -0.1265
        let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 0.9, 0.5);
        close(&a, &[-0.1265, 0.43, 0.6], 1e-6);
        close(&r, &[0.3735, 0.63, 1.0], 1e-6);
        // gamma = lam = 1: the advantage is the reward-to-go minus V.
        let (a, _) = gae(&[1.0, 2.0, 3.0], &[0.0, 1.0, 0.0], 1.0, 1.0);
        close(&a, &[6.0, 4.0, 3.0], 1e-6);
        // lam = 0: one-step TD errors.
        let (a, _) = gae(&[1.0, 2.0], &[0.5, 0.25], 1.0, 0.0);
        close(&a, &[0.75, 1.75], 1e-6);
    }

    #[test]
    fn whitening_uses_every_token_and_the_unbiased_variance() {
        // Tokens 1, 2, 3, 6: mean 3, unbiased var (4+1+0+9)/3 = 14/3.
        let mut rows = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        whiten(&mut rows, true).unwrap();
        let s = (14.0f64 / 3.0 + 1e-8).sqrt();
        let want: Vec<f32> = [-2.0, -1.0, 0.0, 3.0]
            .iter()
            .map(|x| (x / s) as f32)
            .collect();
        close(&rows.concat(), &want, 1e-6);
        let mut kept = vec![vec![1.0, 2.0], vec![3.0, 6.0]];
        whiten(&mut kept, false).unwrap();
        let want: Vec<f32> = want.iter().map(|x| x + 3.0).collect();
        close(&kept.concat(), &want, 1e-6);
        let err = whiten(&mut [vec![1.0]], true).unwrap_err().to_string();
        assert!(err.contains("at least 2 response tokens"), "{err}");
    }

    #[test]
    fn kl_estimators() {
        // p = 0.5, q = 0.25: k1 = ln 2, k3 = (0.5 - 1) - ln 0.5 = ln 2 - 0.5.
        let (lp, lq) = (0.5f32.ln(), 0.25f32.ln());
        close(&kl(&[lp], &[lq], KlEstimator::K1), &[2f32.ln()], 1e-6);
        close(&kl(&[lp], &[lq], KlEstimator::K3), &[2f32.ln() - 0.5], 1e-6);
        // Same distribution: both 0; k3 never negative where k1 is.
        close(&kl(&[lp], &[lp], KlEstimator::K3), &[0.0], 0.0);
        assert!(kl(&[lq], &[lp], KlEstimator::K1)[0] < 0.0);
        assert!(kl(&[lq], &[lp], KlEstimator::K3)[0] > 0.0);
        // The score goes on the last token only.
        close(
            &token_rewards(&[0.5, -1.0, 2.0], 0.1, 3.0),
            &[-0.05, 0.1, 2.8],
            1e-6,
        );
    }

    #[test]
    fn clipped_objective_on_the_classic_cases() {
        let eps = 0.2;
        // Positive advantage, ratio 1.5: clipped at 1.2 (no incentive to go further).
        assert_eq!(clipped_policy_loss(1.5, 1.0, eps), (-1.2, true));
        // Positive advantage, ratio 0.5: the unclipped term (pessimistic), gradient kept.
        assert_eq!(clipped_policy_loss(0.5, 1.0, eps), (-0.5, false));
        // Negative advantage, ratio 1.5: the unclipped term, gradient kept.
        assert_eq!(clipped_policy_loss(1.5, -1.0, eps), (1.5, false));
        // Negative advantage, ratio 0.5: clipped at 0.8.
        assert_eq!(clipped_policy_loss(0.5, -1.0, eps), (0.8, true));
        // Inside the range: never clipped.
        assert_eq!(clipped_policy_loss(1.1, 2.0, eps), (-2.2, false));
        // Value: v far above v_old + eps and the return above v: clipped term larger.
        let (l, c) = clipped_value_loss(2.0, 0.0, 3.0, 0.2);
        assert!(c && (l - 7.84).abs() < 1e-12, "{l}");
        let (l, c) = clipped_value_loss(2.0, 0.0, 1.0, 0.2);
        assert!(!c && (l - 1.0).abs() < 1e-12, "{l}");
    }

    #[test]
    fn adaptive_kl_moves_towards_the_target_within_bounds() {
        assert!((adapt_kl_coef(0.1, 12.0, 6.0, 100.0, 10) - 0.1 * 1.02).abs() < 1e-12);
        assert!((adapt_kl_coef(0.1, 3.0, 6.0, 100.0, 10) - 0.1 * 0.98).abs() < 1e-12);
        assert!((adapt_kl_coef(0.1, 6.6, 6.0, 100.0, 10) - 0.1 * 1.01).abs() < 1e-12);
    }
}
