//! The scalar head (a reward / value head: one score per sequence, no loss
//! of its own) on every body: BERT, Llama, GPT-2. A Bradley-Terry loss on a
//! preference pair built from its scores reaches every trainable tensor
//! (body and `score` / `classifier`) with a finite, non-zero gradient
//! (offsets shared by every sequence get exactly zero: a difference of
//! scores cancels them).

mod common;

use common::fixtures;

use afinar::heads::{HeadConfig, Pooling, SequenceModel, Targets, TaskKind};
use afinar::models::load::{load_params, read_config};
use afinar::models::{check_unused, other_heads, Inputs};
use afinar::params::Selector;

#[test]
fn a_scalar_head_scores_sequences_on_every_body() {
    for case in ["bert-tiny", "llama-tiny", "gpt2-tiny"] {
        let dir = fixtures().join(case);
        let (mut cfg, _) = read_config(&dir).unwrap();
        cfg.set_dropout(Some(0.0), Some(0.0));
        let mut store = load_params(&dir, &cfg, Selector::all()).unwrap();
        let head = HeadConfig {
            task: TaskKind::Scalar,
            pooling: Pooling::default_for(cfg.family()),
            num_labels: 1,
            dropout: 0.0,
        };
        let model = SequenceModel::new(&mut store, &cfg, &head, 3, None, 0).unwrap();
        // The pretraining head (llama-tiny's untied lm_head) is dropped.
        check_unused(&mut store, other_heads(cfg.family(), false), &mut |_| {}).unwrap();
        // Two pairs (chosen, rejected), right-padded with the pad id 0.
        let (b, t) = (4, 6);
        let ids: Vec<u32> = (0..b * t)
            .map(|i| {
                if i % t >= t - i / t {
                    0
                } else {
                    (i * 7 % 90 + 1) as u32
                }
            })
            .collect();
        let mask = ids.iter().map(|&i| (i != 0) as u8 as f32).collect();
        let x = Inputs::new(ids, mask, b, t)
            .and_then(|x| x.with_type_ids(vec![0; b * t]))
            .unwrap();
        let s = model.scores(&x, None).unwrap();
        assert_eq!(s.dims(), &[b], "{case}");
        // Bradley-Terry: -log sigmoid(s_chosen - s_rejected), rows 0/2 chosen.
        let chosen = s.narrow(0, 0, 1).unwrap();
        let chosen = candle_core::Tensor::cat(&[&chosen, &s.narrow(0, 2, 1).unwrap()], 0).unwrap();
        let rejected = s.narrow(0, 1, 1).unwrap();
        let rejected =
            candle_core::Tensor::cat(&[&rejected, &s.narrow(0, 3, 1).unwrap()], 0).unwrap();
        let margin = (chosen - rejected).unwrap();
        // log(1 + exp(-m)) = softplus(-m)
        let loss = (margin.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap()
            .mean_all()
            .unwrap();
        loss.backward().unwrap();
        let trainable = store.trainable();
        assert!(trainable
            .iter()
            .any(|(n, _)| n == "score.weight" || n == "classifier.weight"));
        for (name, _) in trainable {
            if name.starts_with("bert.pooler") && head.pooling != Pooling::Cls {
                continue;
            }
            let g = store
                .grad(&name)
                .unwrap()
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{case}: {name}");
            // A score difference does not see an offset shared by every
            // sequence: the output bias (BERT), and GPT-2's final LayerNorm
            // bias, which reaches the bias-free `score` as w . b.
            if name == "classifier.bias" || name == "transformer.ln_f.bias" {
                assert!(v.iter().all(|x| *x == 0.0), "{case}: {name} {v:?}");
            } else {
                assert!(
                    v.iter().any(|x| *x != 0.0),
                    "{case}: {name} has a zero gradient"
                );
            }
        }
        // No loss of its own: the objective gives it.
        let e = model
            .loss(
                &model.forward(&x, None).unwrap(),
                &Targets::Values(vec![0.0; b]),
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("scalar head has no loss"), "{e}");
    }
}

/// A head that pools [CLS] reads the first position only, so BERT's last
/// layer computes its query, attention output and feed-forward for that row
/// alone (`Body::forward_first`): the same hidden state as the first row of
/// the full forward, and the same gradient in every trainable tensor, with
/// padding in the batch.
#[test]
fn bert_first_position_path_matches_the_full_forward() {
    use afinar::models::Body;
    use afinar::params::Path;
    let dir = fixtures().join("bert-tiny");
    let (mut cfg, _) = read_config(&dir).unwrap();
    cfg.set_dropout(Some(0.0), Some(0.0));
    let store = load_params(&dir, &cfg, Selector::all()).unwrap();
    let body = Body::load(&Path::root(&store, ""), &cfg).unwrap();
    let (b, t) = (3, 7);
    let ids: Vec<u32> = (0..b * t)
        .map(|i| {
            if i >= 2 * t + 5 {
                0
            } else {
                (i * 11 % 90 + 1) as u32
            }
        })
        .collect();
    let mask = ids.iter().map(|&i| (i != 0) as u8 as f32).collect();
    let x = Inputs::new(ids, mask, b, t).unwrap();
    let r = candle_core::Tensor::from_vec(
        (0..b * cfg.hidden_size())
            .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
            .collect::<Vec<f32>>(),
        (b, 1, cfg.hidden_size()),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut runs = Vec::new();
    for first in [false, true] {
        for (_, w) in store.trainable() {
            w.grad.as_ref().expect("trains").clear();
        }
        let h = if first {
            body.forward_first(&x, None)
                .unwrap()
                .expect("BERT on the CPU has the path")
        } else {
            body.forward(&x, None).unwrap().narrow(1, 0, 1).unwrap()
        };
        assert_eq!(h.dims(), &[b, 1, cfg.hidden_size()]);
        let loss = (h.clone() * &r).unwrap().sum_all().unwrap();
        let _ = loss.backward().unwrap();
        let grads: Vec<(String, Vec<f32>)> = store
            .trainable()
            .into_iter()
            // The body's tensors (the pooler belongs to the head).
            .filter(|(n, _)| n.starts_with("bert.") && !n.starts_with("bert.pooler."))
            .map(|(n, w)| {
                let g = w
                    .grad_tensor()
                    .unwrap()
                    .unwrap_or_else(|| panic!("{n}: no gradient"));
                (n, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            })
            .collect();
        runs.push((h.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads));
    }
    assert!(
        runs[0].1.len() >= 20,
        "{} body tensors compared",
        runs[0].1.len()
    );
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&runs[0].0, &runs[1].0) < 1e-5, "hidden states differ");
    for ((n, a), (_, b)) in runs[0].1.iter().zip(&runs[1].1) {
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!(
            diff(a, b) <= 1e-5 * scale,
            "{n}: gradients differ by {}",
            diff(a, b)
        );
    }
}

/// A completion's log-probability (DPO's input) on a real decoder body:
/// per row, minus the LM loss times its counted tokens (the same shift and
/// mask), summed or averaged.
#[test]
fn completion_logps_match_the_lm_loss_per_row() {
    use afinar::heads::CausalLm;
    for case in ["llama-tiny", "gpt2-tiny"] {
        let dir = fixtures().join(case);
        let (mut cfg, _) = read_config(&dir).unwrap();
        cfg.set_dropout(Some(0.0), Some(0.0));
        let store = load_params(&dir, &cfg, Selector::all()).unwrap();
        let lm = CausalLm::build(&store, &cfg).unwrap();
        let (b, t) = (2, 6);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 13 % 90 + 1) as u32).collect();
        // Row 0: the last 3 tokens are the completion; row 1: the last 4.
        let labels: Vec<i64> = (0..b * t)
            .map(|i| {
                if i % t >= t - 3 - i / t {
                    ids[i] as i64
                } else {
                    -100
                }
            })
            .collect();
        let x = Inputs::new(ids.clone(), vec![1.0; b * t], b, t).unwrap();
        let hidden = lm.forward(&x, None).unwrap();
        let (sum, counted) = lm.completion_logps(&hidden, &labels, false).unwrap();
        let (avg, _) = lm.completion_logps(&hidden, &labels, true).unwrap();
        assert_eq!(counted, [3, 4], "{case}");
        let (sum, avg) = (sum.to_vec1::<f32>().unwrap(), avg.to_vec1::<f32>().unwrap());
        for r in 0..b {
            let row = Inputs::new(ids[r * t..(r + 1) * t].to_vec(), vec![1.0; t], 1, t).unwrap();
            let h = lm.forward(&row, None).unwrap();
            let (loss, n) = lm.lm_loss(&h, &labels[r * t..(r + 1) * t]).unwrap();
            let want = -loss.to_scalar::<f32>().unwrap() * n as f32;
            assert!(
                (sum[r] - want).abs() < 1e-4 * (1.0 + want.abs()),
                "{case} row {r}: {} vs {want}",
                sum[r]
            );
            assert!((avg[r] - want / n as f32).abs() < 1e-4, "{case} row {r}");
        }
    }
}
