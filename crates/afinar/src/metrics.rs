//! Evaluation metrics: accuracy, macro-F1, MSE, Pearson, and which direction
//! of each is better.
//!
//! Semantics follow scikit-learn 1.5 (`sklearn.metrics.accuracy_score`,
//! `f1_score(average="macro", zero_division=0)`, `mean_squared_error`) and
//! `scipy.stats.pearsonr`, so numbers can be compared with a transformers
//! run. Sums are accumulated in f64 whatever the input type.

use crate::{Error, Result};
use std::collections::BTreeMap;

/// Named metric values of one evaluation, e.g. `{"eval_loss": 0.41, "accuracy": 0.87}`.
/// A `BTreeMap` so that logs and JSON list them in a stable order.
pub type Metrics = BTreeMap<String, f64>;

fn check_lengths(what: &str, pred: usize, gold: usize) -> Result<()> {
    if pred != gold {
        return Err(Error::Data(format!(
            "{what}: {pred} predictions but {gold} gold values"
        )));
    }
    if pred == 0 {
        return Err(Error::Data(format!("{what}: no examples")));
    }
    Ok(())
}

/// Fraction of predictions equal to the gold class.
/// Class probabilities of one row of logits (max subtracted first).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

pub fn accuracy(pred: &[usize], gold: &[usize]) -> Result<f64> {
    check_lengths("accuracy", pred.len(), gold.len())?;
    let right = pred.iter().zip(gold).filter(|(p, g)| p == g).count();
    Ok(right as f64 / pred.len() as f64)
}

/// Macro-averaged F1 over the classes that occur in `gold` or `pred`
/// (scikit-learn's default `labels`): a class that is neither predicted nor
/// gold is left out of the average, and a class with no true positives
/// scores 0 (`zero_division=0`). Class ids must be `< num_classes`.
pub fn macro_f1(pred: &[usize], gold: &[usize], num_classes: usize) -> Result<f64> {
    check_lengths("macro_f1", pred.len(), gold.len())?;
    if let Some(&c) = pred.iter().chain(gold).find(|&&c| c >= num_classes) {
        return Err(Error::Data(format!(
            "macro_f1: class id {c} out of range for {num_classes} classes"
        )));
    }
    // Per class: true positives, predicted count, gold count.
    let mut tp = vec![0usize; num_classes];
    let mut n_pred = vec![0usize; num_classes];
    let mut n_gold = vec![0usize; num_classes];
    for (&p, &g) in pred.iter().zip(gold) {
        n_pred[p] += 1;
        n_gold[g] += 1;
        if p == g {
            tp[p] += 1;
        }
    }
    let (mut sum, mut classes) = (0.0, 0usize);
    for c in 0..num_classes {
        if n_pred[c] + n_gold[c] == 0 {
            continue;
        }
        // F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn) = 2tp / (n_pred + n_gold);
        // the denominator is > 0 here, and tp = 0 gives 0 as zero_division=0 does.
        sum += 2.0 * tp[c] as f64 / (n_pred[c] + n_gold[c]) as f64;
        classes += 1;
    }
    Ok(sum / classes as f64)
}

/// Mean squared error. NaN in the inputs gives NaN (a diverged model should
/// look diverged, not good).
pub fn mse(pred: &[f32], gold: &[f32]) -> Result<f64> {
    check_lengths("mse", pred.len(), gold.len())?;
    let sum: f64 = pred
        .iter()
        .zip(gold)
        .map(|(&p, &g)| {
            let d = p as f64 - g as f64;
            d * d
        })
        .sum();
    Ok(sum / pred.len() as f64)
}

/// Pearson correlation coefficient.
///
/// NaN-safe where scipy is not: when either side has zero variance (e.g. a
/// model that predicts a constant, common early in training) the coefficient
/// is undefined and this returns 0.0 instead of NaN, so "best checkpoint"
/// comparisons keep working. NaN in the inputs still gives NaN.
pub fn pearson(pred: &[f32], gold: &[f32]) -> Result<f64> {
    check_lengths("pearson", pred.len(), gold.len())?;
    let n = pred.len() as f64;
    // Two passes (mean, then centred sums): the one-pass formula cancels
    // badly when the values are large next to their spread.
    let mp = pred.iter().map(|&x| x as f64).sum::<f64>() / n;
    let mg = gold.iter().map(|&x| x as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&p, &g) in pred.iter().zip(gold) {
        let (dx, dy) = (p as f64 - mp, g as f64 - mg);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return Ok(0.0);
    }
    // Rounding can push |r| a hair past 1.
    Ok((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// Whether a metric is better low or high.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Minimize,
    Maximize,
}

/// The direction of a metric by its name: losses and errors (`loss`,
/// `eval_loss`, `mse`, `rmse`, `mae`, `perplexity`, anything ending in
/// `loss` or `error`) are minimised; everything else (`accuracy`, `f1`,
/// `macro_f1`, `pearson`, ...) is maximised. An `eval_` prefix is ignored.
pub fn direction(name: &str) -> Direction {
    let base = name.strip_prefix("eval_").unwrap_or(name);
    const MINIMISED: [&str; 6] = ["loss", "mse", "rmse", "mae", "perplexity", "ppl"];
    if MINIMISED.contains(&base) || base.ends_with("loss") || base.ends_with("error") {
        Direction::Minimize
    } else {
        Direction::Maximize
    }
}

/// Whether `new` improves on `old` for metric `name` (strictly: a tie is not
/// better, so the earliest best checkpoint is kept). A NaN `new` is never
/// better; anything that is not NaN beats a NaN `old`.
pub fn is_better(name: &str, new: f64, old: f64) -> bool {
    if new.is_nan() {
        return false;
    }
    if old.is_nan() {
        return true;
    }
    match direction(name) {
        Direction::Minimize => new < old,
        Direction::Maximize => new > old,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&[0, 1, 2, 1], &[0, 2, 2, 1]).unwrap(), 0.75);
        assert!(accuracy(&[0, 1], &[0])
            .unwrap_err()
            .to_string()
            .contains("2 predictions but 1"));
        assert!(accuracy(&[], &[]).is_err());
    }

    #[test]
    fn macro_f1_matches_sklearn_by_hand() {
        // gold = [0,0,1,1,2,2], pred = [0,1,1,1,0,2]
        // class 0: tp=1, pred=2, gold=2 -> P=1/2 R=1/2 F1=1/2
        // class 1: tp=2, pred=3, gold=2 -> P=2/3 R=1   F1=0.8
        // class 2: tp=1, pred=1, gold=2 -> P=1   R=1/2 F1=2/3
        // sklearn f1_score(average="macro") = (0.5 + 0.8 + 2/3) / 3 = 0.6555...
        let f = macro_f1(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 2], 3).unwrap();
        assert!(close(f, (0.5 + 0.8 + 2.0 / 3.0) / 3.0), "{f}");

        // Class 3 exists in the label map but never occurs: skipped, not a 0.
        let f4 = macro_f1(&[0, 1, 1, 1, 0, 2], &[0, 0, 1, 1, 2, 2], 4).unwrap();
        assert!(close(f, f4));

        // Class 2 predicted but never gold: counts with F1 = 0 (zero_division=0).
        // gold = [0,0,1,1], pred = [0,2,1,1]: class 0 F1 = 2/3, class 1 F1 = 1, class 2 F1 = 0.
        let f = macro_f1(&[0, 2, 1, 1], &[0, 0, 1, 1], 3).unwrap();
        assert!(close(f, (2.0 / 3.0 + 1.0 + 0.0) / 3.0), "{f}");

        assert_eq!(macro_f1(&[1, 0], &[1, 0], 2).unwrap(), 1.0);
        assert!(macro_f1(&[0, 5], &[0, 1], 3)
            .unwrap_err()
            .to_string()
            .contains("class id 5"));
    }

    #[test]
    fn mse_and_pearson() {
        // ((1-2)^2 + (2-2)^2 + (3-5)^2) / 3 = 5/3
        assert!(close(
            mse(&[1.0, 2.0, 3.0], &[2.0, 2.0, 5.0]).unwrap(),
            5.0 / 3.0
        ));
        // x = [1,2,3], y = [2,2,5]: mx=2, my=3; dx=[-1,0,1], dy=[-1,-1,2]
        // sxy = 1 + 0 + 2 = 3, sxx = 2, syy = 6 -> r = 3 / sqrt(12) = 0.8660...
        let r = pearson(&[1.0, 2.0, 3.0], &[2.0, 2.0, 5.0]).unwrap();
        assert!(close(r, 3.0 / 12f64.sqrt()), "{r}");
        assert!(close(
            pearson(&[1.0, 2.0, 3.0], &[6.0, 4.0, 2.0]).unwrap(),
            -1.0
        ));
        // Zero variance: 0, not NaN.
        assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).unwrap(), 0.0);
        assert_eq!(pearson(&[1.0, 2.0], &[4.0, 4.0]).unwrap(), 0.0);
        assert!(mse(&[f32::NAN], &[1.0]).unwrap().is_nan());
    }

    #[test]
    fn directions() {
        assert!(is_better("loss", 0.5, 0.6));
        assert!(is_better("eval_loss", 0.5, 0.6));
        assert!(is_better("mse", 0.1, 0.2));
        assert!(!is_better("eval_mse", 0.3, 0.2));
        assert!(is_better("accuracy", 0.9, 0.8));
        assert!(is_better("eval_f1", 0.9, 0.8));
        assert!(is_better("macro_f1", 0.9, 0.8));
        assert!(is_better("pearson", 0.5, 0.1));
        assert!(
            !is_better("accuracy", 0.8, 0.8),
            "ties are not improvements"
        );
        assert!(!is_better("loss", f64::NAN, 1.0));
        assert!(is_better("loss", 3.0, f64::NAN));
        assert_eq!(direction("perplexity"), Direction::Minimize);
        assert_eq!(direction("eval_accuracy"), Direction::Maximize);
    }
}
