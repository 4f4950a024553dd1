//! PPO on real decoder bodies (the tiny fixture checkpoints).
//!
//! Batched rollouts through one KV cache give what one prompt at a time
//! gives (greedy: the same ids; sampled: each row its own stream, whatever
//! the other rows), and the log-probabilities taken while sampling are
//! those a full forward computes. PPO's loss starts at ratio 1, and its
//! gradient reaches the policy and the value model. The golden step: TRL's
//! last PPO trainer (`scripts/reference/golden_ppo.py`) on fixed rollouts,
//! loss and gradients. Training: a rule reward that pays for one token is
//! learned in a few dozen rollout batches; a very large `kl_coef` keeps the
//! policy at its reference.

mod common;

use afinar::config::{KlEstimator, Plan};
use afinar::generate::{generate, generate_batch, GenerateConfig};
use afinar::heads::CausalLm;
use afinar::hub::checkpoint::Checkpoint;
use afinar::methods::ppo::{
    advantages, ppo_loss, response_logps, row_rng, PpoParams, Rollouts, ValueModel, VALUE_PREFIX,
};
use afinar::models::load::{load_params, read_config};
use afinar::models::ModelConfig;
use afinar::params::{ParamStore, Selector};
use afinar::train::TrainOptions;
use common::fixtures;
use std::collections::BTreeMap;

fn tiny(case: &str, sel: Selector) -> (ModelConfig, ParamStore) {
    let dir = fixtures().join(case);
    let (mut cfg, _) = read_config(&dir).unwrap();
    cfg.set_dropout(Some(0.0), Some(0.0));
    let store = load_params(&dir, &cfg, sel).unwrap();
    (cfg, store)
}

const PROMPTS: [&[u32]; 3] = [
    &[5, 40, 41],
    &[1, 60, 61, 62, 63, 64, 65],
    &[70, 71, 72, 73, 74],
];

#[test]
fn batched_rollouts_equal_one_prompt_at_a_time() {
    for case in ["llama-tiny", "gpt2-tiny"] {
        let (cfg, store) = tiny(case, Selector::none());
        let lm = CausalLm::build(&store, &cfg).unwrap();
        let max_pos = cfg.max_positions();
        let greedy = GenerateConfig {
            max_new_tokens: 8,
            ..Default::default()
        };
        let mut rngs: Vec<_> = (0..3).map(|i| row_rng(7, 0, i)).collect();
        let batch = generate_batch(&lm, &PROMPTS, max_pos, &greedy, &mut rngs).unwrap();
        for (p, b) in PROMPTS.iter().zip(&batch) {
            let one = generate(
                &lm,
                None,
                p,
                max_pos,
                &greedy,
                &|_| Ok(String::new()),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(one.ids, b.ids, "{case}: greedy, prompt {p:?}");
        }
        // Sampled: a row's continuation does not depend on the other rows.
        let sample = GenerateConfig {
            max_new_tokens: 8,
            temperature: 0.7,
            eos_ids: vec![2],
            ..Default::default()
        };
        let mut rngs: Vec<_> = (0..3).map(|i| row_rng(7, 3, i)).collect();
        let batch = generate_batch(&lm, &PROMPTS, max_pos, &sample, &mut rngs).unwrap();
        for (i, p) in PROMPTS.iter().enumerate() {
            let mut rng = vec![row_rng(7, 3, i as u64)];
            let one = generate_batch(&lm, &[p], max_pos, &sample, &mut rng).unwrap();
            assert_eq!(one[0].ids, batch[i].ids, "{case}: sampled row {i}");
            for (a, b) in one[0].logprobs.iter().zip(&batch[i].logprobs) {
                assert!((a - b).abs() < 1e-4, "{case}: row {i}: {a} vs {b}");
            }
        }
        // The log-probabilities taken while sampling are a full forward's.
        let r = Rollouts {
            queries: PROMPTS.iter().map(|p| p.to_vec()).collect(),
            responses: batch.iter().map(|c| c.ids.clone()).collect(),
            logprobs: batch.iter().map(|c| c.logprobs.clone()).collect(),
            ..Default::default()
        };
        let full = response_logps(&lm, &r, &[0, 1, 2], 0, 0.7)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let taken: Vec<f32> = r.logprobs.concat();
        assert_eq!(full.len(), taken.len());
        for (a, b) in full.iter().zip(&taken) {
            assert!((a - b).abs() < 1e-4, "{case}: {a} vs {b}");
        }
        assert!(taken.iter().all(|&x| x < 0.0 && x.is_finite()));
    }
}

/// The policy (trained whole) and the value model (llama-tiny-seqreg, a
/// scalar head) in one store, as a PPO run holds them.
fn policy_and_value() -> (ModelConfig, ModelConfig, ParamStore) {
    let (cfg, mut store) = tiny("llama-tiny", Selector::all());
    let (vcfg, vstore) = tiny("llama-tiny-seqreg", Selector::all());
    store.absorb(vstore, VALUE_PREFIX).unwrap();
    (cfg, vcfg, store)
}

fn params() -> PpoParams {
    PpoParams {
        temperature: 0.7,
        kl_coef: 0.05,
        kl_estimator: KlEstimator::K1,
        whiten_rewards: false,
        gamma: 1.0,
        lam: 0.95,
        cliprange: 0.2,
        cliprange_value: 0.2,
        vf_coef: 0.1,
    }
}

#[test]
fn ppo_loss_starts_at_ratio_one_and_reaches_policy_and_value() {
    let (cfg, vcfg, store) = policy_and_value();
    let lm = CausalLm::build(&store, &cfg).unwrap();
    let value = ValueModel::build(&store, &vcfg, VALUE_PREFIX).unwrap();
    let sample = GenerateConfig {
        max_new_tokens: 6,
        temperature: 0.7,
        eos_ids: vec![2],
        ..Default::default()
    };
    let mut rngs: Vec<_> = (0..3).map(|i| row_rng(1, 0, i)).collect();
    let conts = generate_batch(&lm, &PROMPTS, cfg.max_positions(), &sample, &mut rngs).unwrap();
    let mut r = Rollouts {
        queries: PROMPTS.iter().map(|p| p.to_vec()).collect(),
        responses: conts.iter().map(|c| c.ids.clone()).collect(),
        logprobs: conts.iter().map(|c| c.logprobs.clone()).collect(),
        scores: vec![1.0, -0.5, 0.25],
        ..Default::default()
    };
    r.ref_logprobs = r.logprobs.clone();
    let rows = [0usize, 1, 2];
    let v = afinar::methods::ppo::response_values(&value, &r, &rows, 0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut k = 0;
    for resp in &r.responses {
        r.values.push(v[k..k + resp.len()].to_vec());
        k += resp.len();
    }
    let adv = advantages(&r, &params()).unwrap();
    let (loss, s) = ppo_loss(&lm, &value, &r, &adv, &rows, 0, &params()).unwrap();
    assert!(s.approx_kl < 1e-9, "{s:?}");
    assert!((s.ratio - 1.0).abs() < 1e-5, "{s:?}");
    assert_eq!(s.clipfrac, 0.0);
    // Whitened advantages have mean 0: the surrogate starts at about 0.
    assert!(s.policy_loss.abs() < 1e-5, "{s:?}");
    assert!(s.value_loss > 0.0, "{s:?}");
    let _ = loss.backward().unwrap();
    let grad = |name: &str| -> f32 {
        let w = store
            .trainable()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        let g = w
            .grad_tensor()
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        g.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.abs())
            .fold(0., f32::max)
    };
    for name in [
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "value_model.score.weight",
        "value_model.model.layers.1.mlp.down_proj.weight",
    ] {
        assert!(grad(name) > 0.0, "{name}: zero gradient");
    }
}

/// Tensor `name` of a golden file, flattened.
fn f32s(g: &Checkpoint, name: &str) -> Vec<f32> {
    g.load(name)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Per-row values of a golden `[B, R]` tensor.
fn rows_of(g: &Checkpoint, name: &str) -> Vec<Vec<f32>> {
    let t = g
        .load(name)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let (b, r) = t.dims2().unwrap();
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (0..b).map(|i| v[i * r..(i + 1) * r].to_vec()).collect()
}

#[test]
fn a_ppo_step_matches_trl() {
    let dir = fixtures().join("ppo");
    let g = Checkpoint::open(dir.join("golden.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let (cfg, vcfg, store) = policy_and_value();
    let lm = CausalLm::build(&store, &cfg).unwrap();
    let value = ValueModel::build(&store, &vcfg, VALUE_PREFIX).unwrap();
    let ctx = meta["context_length"].as_u64().unwrap() as usize;
    let pad = meta["pad_token_id"].as_u64().unwrap() as u32;
    let qr = rows_of(&g, "query_responses");
    let r = Rollouts {
        // TRL's queries are left-padded: afinar's are the real tokens.
        queries: qr
            .iter()
            .map(|row| {
                row[..ctx]
                    .iter()
                    .map(|&x| x as u32)
                    .filter(|&x| x != pad)
                    .collect()
            })
            .collect(),
        responses: qr
            .iter()
            .map(|row| row[ctx..].iter().map(|&x| x as u32).collect())
            .collect(),
        logprobs: rows_of(&g, "logprobs"),
        ref_logprobs: rows_of(&g, "ref_logprobs"),
        values: rows_of(&g, "values"),
        scores: f32s(&g, "scores"),
    };
    let mut p = params();
    p.temperature = meta["temperature"].as_f64().unwrap() as f32;
    p.kl_coef = meta["kl_coef"].as_f64().unwrap();
    let adv = advantages(&r, &p).unwrap();
    let close = |name: &str, got: &[f32], want: &[f32], tol: f32| {
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs().max(1.0),
                "{name}[{i}]: {a} vs TRL {b}"
            );
        }
    };
    close(
        "advantages",
        &adv.advantages.concat(),
        &f32s(&g, "advantages"),
        1e-4,
    );
    close("returns", &adv.returns.concat(), &f32s(&g, "returns"), 1e-4);
    let mb: Vec<usize> = meta["micro_batch"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let (loss, s) = ppo_loss(&lm, &value, &r, &adv, &mb, pad, &p).unwrap();
    let want = |k: &str| meta[k].as_f64().unwrap();
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (l - want("loss")).abs() < 1e-4,
        "loss {l} vs TRL {}",
        want("loss")
    );
    assert!((s.policy_loss - want("pg_loss")).abs() < 1e-4, "{s:?}");
    assert!((s.value_loss - want("vf_loss")).abs() < 1e-4, "{s:?}");
    assert!((s.clipfrac - want("pg_clipfrac")).abs() < 1e-6, "{s:?}");
    assert!(
        (s.value_clipfrac - want("vf_clipfrac")).abs() < 1e-6,
        "{s:?}"
    );
    assert!(
        s.clipfrac > 0.0 && s.value_clipfrac > 0.0,
        "the golden clips some tokens: {s:?}"
    );
    let _ = loss.backward().unwrap();
    let mut checked = 0;
    for (name, w) in store.trainable() {
        let key = format!("grad.{name}");
        let Ok(want) = g.load(&key) else { continue };
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = w
            .grad_tensor()
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().map(|x| x.abs()).fold(0f32, f32::max).max(1e-6);
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= 1e-3 * scale.max(1.0),
            "{name}: max diff {diff} (scale {scale})"
        );
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} gradients compared");
}

/// A PPO run of llama-tiny on the tiny SFT rows, written to a temporary
/// folder; `extra` is appended to the config. Returns the train lines
/// and the test metrics.
fn run_ppo(extra: &str, lr: f64) -> (Vec<BTreeMap<String, f64>>, BTreeMap<String, f64>) {
    let (lines, test, _) = run_ppo_logged(extra, lr);
    (lines, test)
}

/// [`run_ppo`], with the run's log lines.
fn run_ppo_logged(
    extra: &str,
    lr: f64,
) -> (
    Vec<BTreeMap<String, f64>>,
    BTreeMap<String, f64>,
    Vec<String>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"
[model]
path = "{model}"
max_length = 64

[task]
type = "ppo"

[data]
train = "{data}"
messages = "input"
response = "ideal"
split = [0.8, 0.1, 0.1]
generate_eval_rows = 8

[train]
batch_size = 8
lr = {lr}
weight_decay = 0.0
schedule = "constant"
max_grad_norm = 1.0
threads = 1
log_every = 1

[seeds]
init = 1
data = 2
dropout = 3
{extra}
"#,
        model = fixtures().join("llama-tiny").display(),
        data = fixtures().join("sft-tiny/train.jsonl").display(),
        lr = lr,
    );
    let path = tmp.path().join("ppo.toml");
    std::fs::write(&path, cfg).unwrap();
    let plan = Plan::load(&path, &[]).unwrap();
    let opts = TrainOptions {
        run_dir: tmp.path().join("run"),
        stop: Default::default(),
        resume: false,
    };
    let mut log = Vec::new();
    let rep = afinar::methods::train(&plan, &opts, &mut |e| {
        if let afinar::train::Event::Info(m) = e {
            log.push(m)
        }
    })
    .unwrap();
    let lines: Vec<BTreeMap<String, f64>> =
        std::fs::read_to_string(opts.run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["split"] == "train")
            .map(|v| {
                v.as_object()
                    .unwrap()
                    .iter()
                    .filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f)))
                    .collect()
            })
            .collect();
    (lines, rep.test.unwrap_or_default(), log)
}

#[test]
fn a_rule_reward_for_one_token_is_learned_and_a_large_kl_coef_holds_the_policy() {
    // The reward pays for the letter "x" anywhere in a 4-token response
    // (about 4 in 160 by chance for the random tiny model).
    let ppo = |kl: f64| {
        format!(
            "\n[ppo]\nreward = \"regex\"\nreward_regex = \"x\"\nresponse_length = 4\ntemperature = 1.0\nnum_ppo_epochs = 2\ntotal_episodes = 320\nkl_coef = {kl}\n"
        )
    };
    let (lines, test) = run_ppo(&ppo(0.0), 1e-3);
    assert_eq!(lines.len(), 40, "one train line per rollout batch");
    let mean =
        |l: &[BTreeMap<String, f64>], k: &str| l.iter().map(|m| m[k]).sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&lines[..5], "score"), mean(&lines[35..], "score"));
    assert!(first < 0.2 && last > 0.6, "score {first} -> {last}");
    assert!(
        test["reward"] > 0.5,
        "greedy answers after training: {test:?}"
    );
    assert!(test["kl"] > 0.5, "{test:?}");
    // KL of the policy from its reference on the last 5 rollout batches
    // (k1 summed over each response, 40 responses).
    let free_kl = mean(&lines[35..], "kl");
    // With kl_coef = 100 the KL penalty outweighs the reward: the policy
    // stays near its reference (whitened advantages and AdamW keep the
    // step size, so it does not stay exactly there).
    let (lines, _) = run_ppo(&ppo(100.0), 1e-3);
    let (score, kl) = (mean(&lines[35..], "score"), mean(&lines[35..], "kl"));
    assert!(score < 0.2, "score {score}");
    assert!(kl < 0.1 * free_kl, "kl {kl} vs {free_kl} without penalty");
}

#[test]
fn a_reward_model_run_scores_and_starts_the_value_model() {
    // llama-tiny-seqreg: a LlamaForSequenceClassification with one output,
    // as a reward-model run's model/ is; the value model starts from it.
    let rm = fixtures().join("llama-tiny-seqreg");
    let extra = format!(
        "\n[ppo]\nreward = \"model\"\nreward_model = {:?}\nresponse_length = 4\ntotal_episodes = 32\n",
        rm.display().to_string()
    );
    let (lines, test, log) = run_ppo_logged(&extra, 1e-3);
    assert_eq!(lines.len(), 4);
    let v = log.iter().find(|l| l.starts_with("value model:")).unwrap();
    assert!(
        v.contains("llama-tiny-seqreg") && v.contains("the reward model's weights"),
        "{v}"
    );
    assert!(
        lines
            .iter()
            .all(|m| m["score"].is_finite() && m["score"] != 0.0),
        "{lines:?}"
    );
    assert!(test["reward"].is_finite(), "{test:?}");
    // Its scores, directly: an empty response (an immediate end-of-sequence
    // token) is scored too.
    let run = afinar::runs::load_run(&rm).unwrap();
    let tmpl = afinar::methods::reward::template_of(&run.tok).unwrap();
    let rewarder = afinar::methods::ppo::Rewarder::Model(Box::new((run, tmpl)));
    let p = afinar::methods::ppo::Prompt {
        ids: vec![5, 6],
        turns: afinar::data::sft::SftExample::Chat(vec![afinar::hub::chat_template::Message::new(
            afinar::hub::chat_template::Role::User,
            "abc",
        )]),
        answer: String::new(),
    };
    let s = rewarder
        .score(&[(&p, "cba".into(), 3), (&p, String::new(), 1)])
        .unwrap();
    assert!(s.iter().all(|x| x.is_finite()) && s[0] != s[1], "{s:?}");
}
