//! Preference losses on real decoder bodies.
//!
//! DPO's batch loss with a fresh LoRA adapter: at
//! step 0 the policy is its reference (the adapters' B factors are zero),
//! so TRL's losses take their closed-form start values (sigmoid ln 2, IPO
//! 1/(4 beta^2), hinge 1) with no pair won; the gradient reaches the
//! adapter; a precomputed reference gives the same numbers as switching the
//! adapters off. The reward model's batch loss (2B padded rows, scores
//! at the last real token) equals Bradley-Terry on each sequence scored
//! alone, and reaches the scalar head.

mod common;

use afinar::adapters::{linear_modules, AdapterConfig};
use afinar::data::preference::PairTokens;
use afinar::data::sft::SftTokens;
use afinar::heads::CausalLm;
use afinar::methods::dpo::{dpo_batch, pair_batch, reference_logps, Reference};
use afinar::methods::preference::DpoLossType;
use afinar::models::load::{load_params, read_config};
use afinar::models::ModelConfig;
use afinar::params::{ParamStore, Selector};
use common::fixtures;
use rand::SeedableRng;

fn seq(prompt: &[u32], completion: &[u32]) -> SftTokens {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| if i < prompt.len() { -100 } else { id as i64 })
        .collect();
    SftTokens {
        line: 0,
        ids,
        labels,
    }
}

/// Two pairs sharing nothing, completions of different lengths.
fn two_pairs() -> [PairTokens; 2] {
    [
        PairTokens {
            line: 1,
            chosen: seq(&[5, 6, 7], &[8, 9]),
            rejected: seq(&[5, 6, 7], &[10, 11, 12]),
        },
        PairTokens {
            line: 2,
            chosen: seq(&[20, 21], &[22]),
            rejected: seq(&[20, 21], &[23, 24]),
        },
    ]
}

/// A tiny fixture checkpoint, dropout off, `sel` training.
fn tiny(case: &str, sel: Selector) -> (ModelConfig, ParamStore) {
    let dir = fixtures().join(case);
    let (mut cfg, _) = read_config(&dir).unwrap();
    cfg.set_dropout(Some(0.0), Some(0.0));
    let store = load_params(&dir, &cfg, sel).unwrap();
    (cfg, store)
}

#[test]
fn dpo_starts_at_the_closed_form_values_and_trains_the_adapter() {
    for case in ["llama-tiny", "gpt2-tiny"] {
        let (cfg, mut store) = tiny(case, Selector::none());
        let targets: &[&str] = if case == "gpt2-tiny" {
            &["c_attn"]
        } else {
            &["q_proj", "v_proj"]
        };
        let lora = AdapterConfig::lora(targets, 4, 8.0);
        let linears = linear_modules(&store);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        lora.apply(&mut store, &linears, &["lm_head"], &mut rng)
            .unwrap();
        let lm = CausalLm::build(&store, &cfg).unwrap();
        let pairs = two_pairs();
        let refs: Vec<&PairTokens> = pairs.iter().collect();
        let beta = 0.1;
        let reference = Reference::AdaptersDisabled(&store);
        for (kind, want) in [
            (DpoLossType::Sigmoid, std::f64::consts::LN_2),
            (DpoLossType::Ipo, 1.0 / (4.0 * beta * beta)),
            (DpoLossType::Hinge, 1.0),
        ] {
            let (loss, m) = dpo_batch(&lm, &reference, &refs, 0, kind, beta, 0.0, None).unwrap();
            let get = |k: &str| m.iter().find(|(n, _)| *n == k).unwrap().1;
            let l = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (l - want).abs() < 1e-4 * want.max(1.0),
                "{case} {kind:?}: loss {l}"
            );
            assert_eq!(get("rewards/accuracies"), 0.0, "{case} {kind:?}");
            assert!(get("rewards/margins").abs() < 1e-6, "{case} {kind:?}");
            assert!(get("logps/chosen") < 0.0 && get("logps/rejected") < 0.0);
            if kind == DpoLossType::Sigmoid {
                let _ = loss.backward().unwrap();
                let grads: Vec<(String, f32)> = store
                    .trainable()
                    .into_iter()
                    .map(|(n, w)| {
                        let g = w
                            .grad_tensor()
                            .unwrap()
                            .unwrap_or_else(|| panic!("{n}: no gradient"));
                        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert!(g.iter().all(|v| v.is_finite()), "{n}");
                        (n, g.iter().map(|v| v.abs()).fold(0f32, f32::max))
                    })
                    .collect();
                // B starts at zero: its gradient is the one that moves first.
                assert!(
                    grads.iter().any(|(n, g)| n.contains("lora_B") && *g > 0.0),
                    "{case}: {grads:?}"
                );
            }
        }
        // A precomputed reference gives the same loss as the adapters switched off.
        let b = pair_batch(&refs, 0).unwrap();
        let (rc, rr) = reference_logps(&lm, &reference, &b).unwrap();
        let pre: Vec<(f32, f32)> = rc
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .zip(rr.to_vec1::<f32>().unwrap())
            .collect();
        let (a, _) = dpo_batch(
            &lm,
            &Reference::Precomputed(&pre),
            &refs,
            0,
            DpoLossType::Sigmoid,
            beta,
            0.0,
            None,
        )
        .unwrap();
        assert!((a.to_scalar::<f32>().unwrap() - std::f32::consts::LN_2).abs() < 1e-4);
        // The adapters are on again after the reference pass.
        assert!(store
            .adapters_enabled
            .load(std::sync::atomic::Ordering::Relaxed));
        assert!(dpo_batch(
            &lm,
            &Reference::Precomputed(&pre[..1]),
            &refs,
            0,
            DpoLossType::Sigmoid,
            beta,
            0.0,
            None
        )
        .is_err());
    }
}

#[test]
fn reward_batch_scores_each_sequence_at_its_last_token() {
    use afinar::heads::{HeadConfig, Pooling, SequenceModel, TaskKind};
    use afinar::methods::preference::reward_loss;
    use afinar::methods::reward::{reward_batch, RewardPair};
    use afinar::models::Inputs;
    for case in ["llama-tiny", "gpt2-tiny"] {
        let (cfg, mut store) = tiny(case, Selector::all());
        let head = HeadConfig {
            task: TaskKind::Scalar,
            pooling: Pooling::Last,
            num_labels: 1,
            dropout: 0.0,
        };
        let model = SequenceModel::new(&mut store, &cfg, &head, 3, None, 0).unwrap();
        let pairs = two_pairs();
        let rp: Vec<RewardPair> = pairs.iter().map(RewardPair::from).collect();
        let refs: Vec<&RewardPair> = rp.iter().collect();
        let (loss, m) =
            reward_batch(&model, &refs, 0, Some(&[0.5, 0.0]), Some(0.01), None).unwrap();
        // Each sequence scored alone, unpadded.
        let score = |s: &SftTokens| {
            let x = Inputs::new(s.ids.clone(), vec![1.0; s.ids.len()], 1, s.ids.len()).unwrap();
            model.scores(&x, None).unwrap().to_vec1::<f32>().unwrap()[0]
        };
        let c: Vec<f32> = pairs.iter().map(|p| score(&p.chosen)).collect();
        let r: Vec<f32> = pairs.iter().map(|p| score(&p.rejected)).collect();
        let t = |v: &[f32]| candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap();
        let want = reward_loss(&t(&c), &t(&r), Some(&t(&[0.5, 0.0])), Some(0.01)).unwrap();
        let (got, want) = (
            loss.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!((got - want).abs() < 1e-5, "{case}: {got} vs {want}");
        let acc = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / 2.0;
        assert_eq!(
            m.iter()
                .find(|(n, _)| *n == "rewards/accuracies")
                .unwrap()
                .1,
            acc
        );
        let _ = loss.backward().unwrap();
        let head_grad = store
            .trainable()
            .into_iter()
            .filter(|(n, _)| n.starts_with("score.") || n.starts_with("classifier."))
            .map(|(_, w)| {
                w.grad_tensor()
                    .unwrap()
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0f32, f32::max);
        assert!(
            head_grad > 0.0 && head_grad.is_finite(),
            "{case}: head gradient {head_grad}"
        );
    }
}

// ---- golden fixtures from TRL 1.16 (scripts/reference/golden_preference.py)

use afinar::hub::checkpoint::Checkpoint;
use common::{assert_golden_grads, i64s, rel_err};

fn golden(name: &str) -> (Checkpoint, serde_json::Value) {
    let dir = fixtures().join("preference");
    let g = Checkpoint::open(&dir.join(format!("{name}.safetensors"))).unwrap();
    let meta =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    (g, meta)
}

/// The golden batch's rows, unpadded: `(ids, type ids, completion mask)`.
fn golden_rows(g: &Checkpoint) -> Vec<(Vec<u32>, Vec<u32>, Vec<i64>)> {
    let (b, t) = g.load("input_ids").unwrap().dims2().unwrap();
    let ids = i64s(g, "input_ids");
    let mask = i64s(g, "attention_mask");
    let types = g
        .contains("token_type_ids")
        .then(|| i64s(g, "token_type_ids"));
    let comp = g
        .contains("completion_mask")
        .then(|| i64s(g, "completion_mask"));
    (0..b)
        .map(|r| {
            let row = r * t..(r + 1) * t;
            let n = mask[row.clone()].iter().filter(|&&m| m == 1).count();
            let take = |v: &[i64]| v[row.start..row.start + n].to_vec();
            (
                take(&ids).into_iter().map(|x| x as u32).collect(),
                types.as_ref().map_or(vec![0; n], |v| {
                    take(v).into_iter().map(|x| x as u32).collect()
                }),
                comp.as_ref().map_or(vec![0; n], |v| take(v)),
            )
        })
        .collect()
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    let e = (got - want).abs() / want.abs().max(1.0);
    assert!(
        e < tol,
        "{what}: afinar {got} vs TRL {want} (rel err {e:e})"
    );
}

/// DPO's sigmoid, hinge and IPO losses of TRL's DPOTrainer, their logged
/// metrics and every parameter's gradient, on TRL's own tokens with the
/// reference log-probabilities TRL precomputed (from a perturbed copy, so
/// no loss sits at its start value); and afinar's own encoding of the same
/// text pairs gives TRL's tokens.
#[test]
fn dpo_matches_trl() {
    use afinar::data::preference::{encode_pair, PreferencePair, Turns};
    use afinar::data::sft::SftEncoder;
    use afinar::hub::tokenizer::TextTokenizer;
    for model in ["llama-tiny", "gpt2-tiny"] {
        for (kind, name) in [
            (DpoLossType::Sigmoid, "sigmoid"),
            (DpoLossType::Hinge, "hinge"),
            (DpoLossType::Ipo, "ipo"),
        ] {
            let case = format!("dpo-{model}-{name}");
            let (g, meta) = golden(&case);
            let (cfg, store) = tiny(model, Selector::all());
            let lm = CausalLm::build(&store, &cfg).unwrap();
            let rows = golden_rows(&g);
            let n = rows.len() / 2;
            let toks = |(ids, _, comp): &(Vec<u32>, Vec<u32>, Vec<i64>)| SftTokens {
                line: 0,
                ids: ids.clone(),
                labels: ids
                    .iter()
                    .zip(comp)
                    .map(|(&id, &c)| if c == 1 { id as i64 } else { -100 })
                    .collect(),
            };
            let pairs: Vec<PairTokens> = (0..n)
                .map(|i| PairTokens {
                    line: i + 1,
                    chosen: toks(&rows[i]),
                    rejected: toks(&rows[n + i]),
                })
                .collect();
            let rc = g
                .load_f32("ref_chosen_logps")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rr = g
                .load_f32("ref_rejected_logps")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let reference: Vec<(f32, f32)> = rc.into_iter().zip(rr).collect();
            let refs: Vec<&PairTokens> = pairs.iter().collect();
            let (loss, m) = dpo_batch(
                &lm,
                &Reference::Precomputed(&reference),
                &refs,
                0,
                kind,
                0.1,
                0.0,
                None,
            )
            .unwrap();
            let want = g.load_f32("loss").unwrap().to_vec1::<f32>().unwrap()[0] as f64;
            close(
                loss.to_scalar::<f32>().unwrap() as f64,
                want,
                1e-4,
                &format!("{case}: loss"),
            );
            for (k, v) in &m {
                if let Some(w) = meta["metrics"][*k].as_f64() {
                    close(*v, w, 1e-4, &format!("{case}: {k}"));
                }
            }
            let _ = loss.backward().unwrap();
            assert_golden_grads(&g, &store, &case, 1e-3);

            // afinar's encoding of the pairs (text: prompt, completion, eos).
            let tok = TextTokenizer::from_dir(fixtures().join(model), 64).unwrap();
            let tc: serde_json::Value = serde_json::from_slice(
                &std::fs::read(fixtures().join(model).join("tokenizer_config.json")).unwrap(),
            )
            .unwrap();
            let eos = tok.token_to_id(tc["eos_token"].as_str().unwrap());
            let enc = SftEncoder {
                tokenizer: tok.raw(),
                template: None,
                eos_id: eos,
                max_length: 64,
                overflow: Default::default(),
            };
            for (i, p) in meta["pairs"].as_array().unwrap().iter().enumerate() {
                let s = |k: &str| Turns::Text(p[k].as_str().unwrap().to_string());
                let ours = encode_pair(
                    &enc,
                    &PreferencePair {
                        line: i + 1,
                        prompt: s("prompt"),
                        chosen: s("chosen"),
                        rejected: s("rejected"),
                    },
                )
                .unwrap();
                assert_eq!(
                    ours.chosen.ids, pairs[i].chosen.ids,
                    "{case}: pair {i} chosen tokens"
                );
                assert_eq!(
                    ours.chosen.labels, pairs[i].chosen.labels,
                    "{case}: pair {i} chosen mask"
                );
                assert_eq!(
                    ours.rejected.ids, pairs[i].rejected.ids,
                    "{case}: pair {i} rejected tokens"
                );
            }
        }
    }
}

/// TRL's RewardTrainer loss (Bradley-Terry + center_rewards_coefficient
/// 0.01), the rewards and every gradient, for a Llama reward model (last
/// real token) and a BERT cross-encoder (pooled [CLS] of the text pair).
#[test]
fn reward_model_matches_trl() {
    use afinar::heads::{HeadConfig, Pooling, SequenceModel, TaskKind};
    use afinar::methods::reward::{reward_batch, RewardPair, Seq};
    for (case, model, pooling, pad) in [
        (
            "reward-llama-tiny-seqreg",
            "llama-tiny-seqreg",
            Pooling::Last,
            0u32,
        ),
        ("reward-bert-tiny", "bert-tiny", Pooling::Cls, 0),
    ] {
        let (g, _) = golden(case);
        let (cfg, mut store) = tiny(model, Selector::all());
        for (k, v) in [
            ("head.classifier.weight", "classifier.weight"),
            ("head.classifier.bias", "classifier.bias"),
        ] {
            if g.contains(k) {
                store.insert_trainable(v, g.load_f32(k).unwrap()).unwrap();
            }
        }
        let head = HeadConfig {
            task: TaskKind::Scalar,
            pooling,
            num_labels: 1,
            dropout: 0.0,
        };
        let sm = SequenceModel::new(&mut store, &cfg, &head, 0, None, pad).unwrap();
        let rows = golden_rows(&g);
        let n = rows.len() / 2;
        let seq = |(ids, types, _): &(Vec<u32>, Vec<u32>, Vec<i64>)| Seq {
            ids: ids.clone(),
            types: types.clone(),
        };
        let pairs: Vec<RewardPair> = (0..n)
            .map(|i| RewardPair {
                line: i + 1,
                chosen: seq(&rows[i]),
                rejected: seq(&rows[n + i]),
            })
            .collect();
        let refs: Vec<&RewardPair> = pairs.iter().collect();
        let (loss, _) = reward_batch(&sm, &refs, pad, None, Some(0.01), None).unwrap();
        let want = g.load_f32("loss").unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        close(
            loss.to_scalar::<f32>().unwrap() as f64,
            want,
            1e-4,
            &format!("{case}: loss"),
        );
        let rows_all: Vec<&Seq> = pairs
            .iter()
            .map(|p| &p.chosen)
            .chain(pairs.iter().map(|p| &p.rejected))
            .collect();
        let scores = afinar::methods::reward::score_rows(&sm, &rows_all, pad, 8).unwrap();
        let scores =
            candle_core::Tensor::new(scores.as_slice(), &candle_core::Device::Cpu).unwrap();
        let e = rel_err(&scores, &g.load_f32("rewards").unwrap());
        assert!(e < 1e-4, "{case}: rewards rel err {e}");
        let _ = loss.backward().unwrap();
        assert_golden_grads(&g, &store, case, 1e-3);
    }
}
