//! COSINE's pieces (Yu et al., NAACL 2021, "Fine-Tuning Pre-trained
//! Language Model with Weak Supervision: A Contrastive-Regularized
//! Self-Training Approach", Sections 3.1-3.3; WRENCH's
//! `wrench/endmodel/cosine.py` for the constants):
//!
//! - [`teacher_targets`]: from the teacher's class probabilities `p`, the
//!   soft labels sharpened as DEC's target distribution (Xie et al. 2016):
//!   `y_ic ∝ p_ic^2 / f_c`, `f_c = Σ_j p_jc` over every row, each row
//!   renormalised; the confidence weight `w = 1 - H(y)/log C` of each row
//!   (the paper's Eq. 9 takes it on the soft label; WRENCH on `p` for the
//!   selection), and the rows kept (`w > xi`);
//! - [`distill_loss`]: `1/B Σ_i w_i KL(y_i || softmax(z_i))`;
//! - [`confidence_reg`]: `1/B Σ_i KL(u || softmax(z_i))`, u uniform (the
//!   paper's R2, which keeps the student from growing overconfident);
//! - [`contrastive_reg`]: over every pair of rows of the batch, with
//!   `d = mean_k (v_ik - v_jk)^2` of the **student's** features `v` and
//!   `W = 1` when the pseudo-labels (argmax of `y`) agree:
//!   `1/P Σ_pairs ½ [W d + (1 - W) max(0, gamma - sqrt(d))^2]`. The official
//!   code computes this on the teacher's features, where it has no gradient;
//!   WRENCH moved it to the student's, as here.
//!
//! Losses are candle ops with backward (exp, log, sums, sqrt, relu); the
//! soft labels and weights are constants.

use candle_core::{DType, Tensor, D};

/// The teacher's labels for a period of self-training.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherTargets {
    /// Confidence weight of every row (`1 - H(p)/log C`).
    pub weights: Vec<f32>,
    /// Rows with `weight > xi`, ascending.
    pub kept: Vec<usize>,
    /// Soft label of each kept row (same order as `kept`).
    pub soft: Vec<Vec<f32>>,
}

/// Entropy (nats) of a distribution; `0 log 0 = 0`.
pub fn entropy(p: &[f32]) -> f64 {
    p.iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| -(x as f64) * (x as f64).ln())
        .sum()
}

/// Sharpened soft labels, their confidence weights and the rows kept, from
/// the teacher's probabilities `probs` (one row per training row).
pub fn teacher_targets(probs: &[Vec<f32>], xi: f64) -> TeacherTargets {
    let c = probs.first().map_or(0, |r| r.len());
    let log_c = (c.max(2) as f64).ln();
    // DEC's target distribution, with the soft class frequencies of every row.
    let mut f = vec![0f64; c];
    for p in probs {
        for (k, &x) in p.iter().enumerate() {
            f[k] += x as f64;
        }
    }
    let sharp: Vec<Vec<f32>> = probs
        .iter()
        .map(|p| {
            let t: Vec<f64> = p
                .iter()
                .zip(&f)
                .map(|(&x, &fk)| (x as f64) * (x as f64) / fk.max(1e-12) + 1e-10)
                .collect();
            let s: f64 = t.iter().sum();
            t.iter().map(|&v| (v / s) as f32).collect()
        })
        .collect();
    let weights: Vec<f32> = sharp
        .iter()
        .map(|y| (1.0 - entropy(y) / log_c) as f32)
        .collect();
    let kept: Vec<usize> = (0..probs.len())
        .filter(|&i| weights[i] as f64 > xi)
        .collect();
    let soft = kept.iter().map(|&i| sharp[i].clone()).collect();
    TeacherTargets {
        weights,
        kept,
        soft,
    }
}

/// Row-wise log-softmax `[B, C]`, from ops that record their backward.
pub fn log_softmax(z: &Tensor) -> candle_core::Result<Tensor> {
    let m = z.max_keepdim(D::Minus1)?.detach();
    let s = z.broadcast_sub(&m)?;
    let lse = s.exp()?.sum_keepdim(D::Minus1)?.log()?;
    s.broadcast_sub(&lse)
}

/// `1/B Σ_i w_i KL(y_i || softmax(z_i))`: `z` `[B, C]` logits, `soft`
/// `[B][C]` targets, `w` `[B]` weights.
pub fn distill_loss(z: &Tensor, soft: &[Vec<f32>], w: &[f32]) -> candle_core::Result<Tensor> {
    let (b, c) = z.dims2()?;
    let dev = z.device();
    let y: Vec<f32> = soft.iter().flatten().copied().collect();
    let y = Tensor::from_vec(y, (b, c), dev)?;
    // Σ_c y log y: a constant, kept so the value is the KL itself.
    let ylogy: f32 = soft
        .iter()
        .zip(w)
        .map(|(r, &wi)| {
            wi * r
                .iter()
                .filter(|&&v| v > 0.0)
                .map(|&v| v * v.ln())
                .sum::<f32>()
        })
        .sum();
    let wt = Tensor::from_slice(w, (b, 1), dev)?;
    let cross = (log_softmax(z)? * y)?.broadcast_mul(&wt)?.sum_all()?;
    (cross.neg()? + ylogy as f64)? / b as f64
}

/// `1/B Σ_i KL(u || softmax(z_i)) = 1/B Σ_i (-1/C Σ_c log p_ic - log C)`.
pub fn confidence_reg(z: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = z.dims2()?;
    let s = log_softmax(z)?.sum_all()?;
    (s / -((b * c) as f64))? - (c as f64).ln()
}

/// The contrastive regulariser over every pair of rows of `feat` `[B, H]`
/// (the student's features), pairs agreeing when `pseudo` labels do.
/// Zero for a batch of one row.
pub fn contrastive_reg(
    feat: &Tensor,
    pseudo: &[usize],
    margin: f64,
) -> candle_core::Result<Tensor> {
    let (b, h) = feat.dims2()?;
    let dev = feat.device();
    if b < 2 {
        return Tensor::zeros((), DType::F32, dev);
    }
    let diff = feat.unsqueeze(1)?.broadcast_sub(&feat.unsqueeze(0)?)?; // [B, B, H]
    let d = (diff.sqr()?.sum(D::Minus1)? / h as f64)?; // [B, B]
    let mut agree = vec![0f32; b * b];
    let mut pair = vec![0f32; b * b];
    for i in 0..b {
        for j in i + 1..b {
            pair[i * b + j] = 1.0;
            agree[i * b + j] = f32::from(pseudo[i] == pseudo[j]);
        }
    }
    let n_pairs = (b * (b - 1) / 2) as f64;
    let agree = Tensor::from_vec(agree, (b, b), dev)?;
    let pair = Tensor::from_vec(pair, (b, b), dev)?;
    let disagree = (&pair - &agree)?;
    let dist = (d.clone() + 1e-9)?.sqrt()?;
    let push = (dist.neg()? + margin)?.relu()?.sqr()?;
    let l = ((d * agree)? + (push * disagree)?)?;
    l.sum_all()? * (0.5 / n_pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn weights_keep_and_sharpen_by_hand() {
        // Two classes: p = (0.9, 0.1), (0.5, 0.5), (0.2, 0.8); f = (1.6, 1.4).
        let probs = vec![vec![0.9, 0.1], vec![0.5, 0.5], vec![0.2, 0.8]];
        let y = |a: f64, b: f64| {
            let (u, v) = (a * a / 1.6, b * b / 1.4);
            (u / (u + v), v / (u + v))
        };
        let h = |p: f64| -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let w = |p: f64| 1.0 - h(p) / 2f64.ln();
        let (y0, _) = y(0.9, 0.1); // 0.9861
        let (y1, _) = y(0.5, 0.5); // 0.4667: the rarer class gains
        let (_, y2) = y(0.2, 0.8); // 0.9481
        let t = teacher_targets(&probs, 0.5);
        close(t.weights[0] as f64, w(y0), 1e-6);
        close(t.weights[1] as f64, w(y1), 1e-6);
        close(t.weights[2] as f64, w(y2), 1e-6);
        // Sharpening: more confident than the teacher, weights from y.
        assert!(y0 > 0.9 && y2 > 0.8 && w(y0) > w(0.9));
        assert_eq!(t.kept, [0, 2]); // w = 0.894, 0.003, 0.706
        close(t.soft[0][0] as f64, y0, 1e-6);
        close(t.soft[1][1] as f64, y2, 1e-6);
        assert_eq!(teacher_targets(&probs, 0.8).kept, [0]);
        assert!(teacher_targets(&probs, 0.9).kept.is_empty());
    }

    #[test]
    fn distillation_and_confidence_values_and_gradients() {
        let dev = Device::Cpu;
        let z = Var::from_vec(vec![1.0f32, 0.0, 0.0, 2.0], (2, 2), &dev).unwrap();
        let soft = vec![vec![0.8, 0.2], vec![0.1, 0.9]];
        let w = [0.5f32, 1.0];
        let p = |a: f64, b: f64| {
            let e = (a.exp(), b.exp());
            (e.0 / (e.0 + e.1), e.1 / (e.0 + e.1))
        };
        let (p00, p01) = p(1.0, 0.0);
        let (p10, p11) = p(0.0, 2.0);
        let kl = |y: (f64, f64), q: (f64, f64)| y.0 * (y.0 / q.0).ln() + y.1 * (y.1 / q.1).ln();
        let want = (0.5 * kl((0.8, 0.2), (p00, p01)) + kl((0.1, 0.9), (p10, p11))) / 2.0;
        let l = distill_loss(z.as_tensor(), &soft, &w).unwrap();
        close(l.to_scalar::<f32>().unwrap() as f64, want, 1e-6);
        // d/dz_ic = w_i (p_ic - y_ic) / B
        let g = l.backward().unwrap();
        let gz = g.get(&z).unwrap().to_vec2::<f32>().unwrap();
        close(gz[0][0] as f64, 0.5 * (p00 - 0.8) / 2.0, 1e-6);
        close(gz[1][1] as f64, (p11 - 0.9) / 2.0, 1e-6);

        let r = confidence_reg(z.as_tensor()).unwrap();
        let want = ((-0.5 * (p00.ln() + p01.ln()) - 2f64.ln())
            + (-0.5 * (p10.ln() + p11.ln()) - 2f64.ln()))
            / 2.0;
        close(r.to_scalar::<f32>().unwrap() as f64, want, 1e-6);
        // d/dz_ic = (p_ic - 1/C) / B: it pulls towards uniform.
        let g = r.backward().unwrap();
        let gz = g.get(&z).unwrap().to_vec2::<f32>().unwrap();
        close(gz[0][0] as f64, (p00 - 0.5) / 2.0, 1e-6);
        close(gz[1][0] as f64, (p10 - 0.5) / 2.0, 1e-6);
        // A uniform prediction has no confidence penalty.
        let u = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        close(
            confidence_reg(&u).unwrap().to_scalar::<f32>().unwrap() as f64,
            0.0,
            1e-6,
        );
    }

    /// The contrastive term's value by hand, and its gradient reaching the
    /// student's features (the tensor passed in), checked against finite
    /// differences.
    #[test]
    fn contrastive_value_and_gradient_reach_the_student_features() {
        let dev = Device::Cpu;
        // Three rows, two features; rows 0 and 1 agree, row 2 differs.
        let v = vec![0.0f32, 0.0, 0.6, 0.0, 0.0, 0.8];
        let feat = Var::from_vec(v.clone(), (3, 2), &dev).unwrap();
        let pseudo = [0, 0, 1];
        let margin = 1.0;
        let by_hand = |v: &[f32]| -> f64 {
            let d = |i: usize, j: usize| {
                (0..2)
                    .map(|k| ((v[i * 2 + k] - v[j * 2 + k]) as f64).powi(2))
                    .sum::<f64>()
                    / 2.0
            };
            let push = |d: f64| (margin - (d + 1e-9).sqrt()).max(0.0).powi(2);
            // (0,1) agree; (0,2), (1,2) disagree.
            0.5 * (d(0, 1) + push(d(0, 2)) + push(d(1, 2))) / 3.0
        };
        let l = contrastive_reg(feat.as_tensor(), &pseudo, margin).unwrap();
        close(l.to_scalar::<f32>().unwrap() as f64, by_hand(&v), 1e-6);
        let g = l.backward().unwrap();
        let gf = g
            .get(&feat)
            .expect("the contrastive term reaches the features");
        let gf: Vec<f32> = gf.flatten_all().unwrap().to_vec1().unwrap();
        assert!(gf.iter().any(|&x| x.abs() > 1e-3), "{gf:?}");
        for k in 0..6 {
            let eps = 1e-3f32;
            let mut a = v.clone();
            a[k] += eps;
            let mut b = v.clone();
            b[k] -= eps;
            let fd = (by_hand(&a) - by_hand(&b)) / (2.0 * eps as f64);
            close(gf[k] as f64, fd, 2e-3);
        }
        // Identical pseudo-labels only pull; one row gives zero.
        let one = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
        close(
            contrastive_reg(&one, &[0], 1.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64,
            0.0,
            0.0,
        );
    }
}
