//! Exact resume (issue 6, part 1): a run killed with SIGKILL at random
//! moments and continued each time with `afinar train --resume RUN` ends
//! with the same metrics.jsonl (every logged loss, learning rate, gradient
//! norm and evaluation, bit for bit), the same results.json and the same
//! saved weights as the run never stopped, on CPU with the same thread count.
//!
//! `AFINAR_KILLS=N` sets the kills per run (default 6); `AFINAR_KILL_SEED`
//! replays the kill times of a failed run (the test prints its seed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn afinar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
}

fn kills() -> usize {
    std::env::var("AFINAR_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// SplitMix64: the kill delays.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

fn seed() -> u64 {
    let s = std::env::var("AFINAR_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("kill times: AFINAR_KILL_SEED={s}");
    s
}

fn spawn(args: &[&std::ffi::OsStr], log: &Path) -> Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    afinar()
        .args(args)
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
}

/// The metrics log without the wall-clock fields (names ending in `_s`).
fn curve(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: torn line {l:?}: {e}", run.display()));
            let o = v.as_object_mut().unwrap();
            // Wall-clock fields: elapsed_s, tokens_per_s, PPO's rollout_s ...
            o.retain(|k, _| !k.ends_with("_s"));
            v
        })
        .collect()
}

/// Every checkpoint folder a kill left is whole, and no temporary or
/// half-written file is visible under its final name.
fn check_folder(run: &Path) {
    let model = run.join("model");
    if model.exists() {
        let bytes = std::fs::read(model.join("model.safetensors")).expect("model/ without weights");
        safetensors::SafeTensors::deserialize(&bytes)
            .expect("model/model.safetensors half-written");
        let cfg = std::fs::read(model.join("config.json")).expect("model/ without config.json");
        serde_json::from_slice::<serde_json::Value>(&cfg).expect("model/config.json half-written");
    }
    if run.join("metrics.jsonl").exists() {
        let _ = curve(run); // every line whole
    }
    for e in std::fs::read_dir(run).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("checkpoint-") {
            assert!(step.parse::<usize>().is_ok(), "{name}");
            for f in [
                "trainer_state.json",
                "trainable.safetensors",
                "optimizer.safetensors",
            ] {
                assert!(e.path().join(f).is_file(), "{name}/{f} missing");
            }
            let st: serde_json::Value = serde_json::from_slice(
                &std::fs::read(e.path().join("trainer_state.json")).unwrap(),
            )
            .unwrap_or_else(|err| panic!("{name}/trainer_state.json: {err}"));
            assert_eq!(st["step"].as_u64().unwrap().to_string(), step);
        }
    }
}

/// Kill the run `n` times at random moments, resuming after each kill,
/// then let it finish. Returns (kills done, resumes that found a checkpoint).
fn killed_run(cfg: &Path, run: &Path, n: usize, max_delay_ms: u64) -> (usize, usize) {
    let mut rng = Rng(seed());
    let log = run.with_extension("log");
    let mut child = spawn(
        &[
            "train".as_ref(),
            cfg.as_os_str(),
            "--out".as_ref(),
            run.as_os_str(),
        ],
        &log,
    );
    let (mut done, mut finished) = (0, false);
    while done < n {
        std::thread::sleep(Duration::from_millis(30 + rng.below(max_delay_ms)));
        if child.try_wait().unwrap().is_some() {
            break; // it finished before the next kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        done += 1;
        if run.exists() {
            check_folder(run);
        }
        if run.join("results.json").is_file() {
            // Killed after its last write: the run is complete, nothing to resume.
            finished = true;
            break;
        }
        child = if run.join("config.toml").is_file() {
            spawn(
                &["train".as_ref(), "--resume".as_ref(), run.as_os_str()],
                &log,
            )
        } else {
            // Killed before it wrote its config: not a run yet, start it again.
            spawn(
                &[
                    "train".as_ref(),
                    cfg.as_os_str(),
                    "--out".as_ref(),
                    run.as_os_str(),
                ],
                &log,
            )
        };
    }
    let t0 = Instant::now();
    let text = if finished {
        std::fs::read_to_string(&log).unwrap()
    } else {
        let st = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(st.success(), "the last resume failed: {st}\n{text}");
        text
    };
    assert!(t0.elapsed() < Duration::from_secs(300));
    let resumes = text.matches("resumed from").count();
    eprintln!("{done} of {n} kills done, {resumes} resumes from a checkpoint");
    (done, resumes)
}

fn compare(reference: &Path, run: &Path) {
    let (a, b) = (curve(reference), curve(run));
    assert_eq!(a.len(), b.len(), "log lengths differ");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "metrics.jsonl line {} differs", i + 1);
    }
    let res = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p.join("results.json")).unwrap()).unwrap()
    };
    let (ra, rb) = (res(reference), res(run));
    for k in [
        "steps",
        "best_step",
        "best_validation",
        "test",
        "stopped_early",
    ] {
        assert_eq!(ra[k], rb[k], "results.json `{k}` differs");
    }
    let weights = |p: &Path| std::fs::read(p.join("model/model.safetensors")).unwrap();
    assert!(weights(reference) == weights(run), "model/ weights differ");
    for f in std::fs::read_dir(run).unwrap() {
        let n = f.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !n.contains(".tmp") && !n.contains(".old.") && n != ".afinar.lock",
            "left over: {n}"
        );
    }
}

/// The run never stopped; returns how long it took.
fn reference(cfg: &Path, out: &Path) -> Duration {
    let t0 = Instant::now();
    let o = afinar()
        .args([
            "train".as_ref(),
            cfg.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("uninterrupted run: {:.2} s", t0.elapsed().as_secs_f64());
    t0.elapsed()
}

/// Kill delays up to the run's length shared among the kills, so
/// that they spread over the whole run (each life also pays the start-up).
fn max_delay_ms(run_time: Duration) -> u64 {
    (run_time.as_millis() as u64 / kills().max(1) as u64).clamp(150, 1500)
}

/// Run `cfg` once uninterrupted, then kill and resume it; the two must
/// end the same (and so must their adapters, for an adapter run).
fn kill_resume_and_compare(cfg: &Path, adapter: bool) {
    let d = cfg.parent().unwrap();
    let t = reference(cfg, &d.join("ref"));
    let run = d.join("run");
    let (k, r) = killed_run(cfg, &run, kills(), max_delay_ms(t));
    assert!(
        k >= 1 && r >= 1,
        "{k} kills, {r} resumes: the test killed nothing"
    );
    compare(&d.join("ref"), &run);
    if adapter {
        let bytes = |p: &Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
        assert!(bytes(&d.join("ref")) == bytes(&run), "adapters differ");
    }
}

/// BERT classification, full fine-tuning with dropout, two threads: a
/// checkpoint every 3 steps, evaluation every 5, the last 2 kept.
#[test]
fn killed_classification_run_resumes_to_the_same_curve() {
    let f = fixtures().join("bert-tiny");
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [train]\nepochs = {}\nbatch_size = 4\nlr = 1e-3\nwarmup_ratio = 0.1\neval_every = 5\nsave_every = 3\nlog_every = 1\nthreads = 2\n",
            f,
            f.join("train.jsonl"),
            10 * kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, false);
}

/// Llama SFT with LoRA (dropout 0.1) on packed rows, gradient accumulation.
#[test]
fn killed_lora_sft_run_resumes_to_the_same_curve() {
    let f = fixtures();
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"sft\"\n\
             [data]\ntrain = {:?}\nmessages = \"input\"\nresponse = \"ideal\"\nsplit = [0.7, 0.15, 0.15]\npacking = true\n\
             [train]\nepochs = {}\nbatch_size = 2\ngrad_accum = 2\nlr = 1e-2\neval_every = 7\nsave_every = 2\nsave_total_limit = 1\nlog_every = 3\nthreads = 2\n\
             [adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
            f.join("llama-tiny"),
            f.join("sft-tiny/train.jsonl"),
            7 * kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, true);
}

/// BERT with a LoRA adapter (dropout 0.1) and a new head, evaluated at each
/// epoch's end (no `eval_every`: checkpoints follow the evaluations) with
/// early stopping on accuracy: the early-stopping count and the best
/// weights survive the kills too, and the run stops at the same step.
#[test]
fn killed_lora_run_with_early_stopping_resumes_to_the_same_end() {
    let f = fixtures().join("bert-tiny");
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("l.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [train]\nepochs = {}\nbatch_size = 2\nlr = 2e-3\nschedule = \"cosine\"\nlog_every = 2\nthreads = 2\n\
             [train.early_stopping]\nmetric = \"loss\"\npatience = 4\nmin_delta = 1e-4\n\
             [adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"query\", \"value\"]\nmodules_to_save = [\"classifier\"]\n",
            f,
            f.join("train.jsonl"),
            15 * kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, true);
}

/// GPT-2 DPO, full fine-tuning with the reference's log-probabilities
/// precomputed (`ref_logps.json`, read back by every resume instead of a
/// frozen copy), gradient accumulation.
#[test]
fn killed_dpo_run_resumes_to_the_same_curve() {
    let f = fixtures();
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("dpo.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"dpo\"\n\
             [data]\ntrain = {:?}\nsplit = [0.7, 0.15, 0.15]\ngenerate_eval_rows = 2\n\
             [train]\nepochs = {}\nbatch_size = 4\ngrad_accum = 2\nlr = 1e-3\neval_every = 5\nsave_every = 2\nlog_every = 1\nthreads = 2\n\
             [dpo]\nbeta = 0.2\nprecompute_ref_log_probs = true\n",
            f.join("gpt2-tiny"),
            f.join("pairs-tiny/chat.jsonl"),
            4 * kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, false);
}

/// COSINE weak supervision (issue 16): stage 1 in its own run folder, then
/// self-training whose teacher of each period is saved; killed anywhere
/// (in either stage, between them, at a teacher refresh) it ends with the
/// same curves, results and weights in both folders.
#[test]
fn killed_cosine_run_resumes_to_the_same_curve() {
    let f = fixtures().join("bert-tiny");
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("rules.toml"),
        "[[rule]]\nname = \"praise\"\nkind = \"keywords\"\nwords = [\"good\", \"great\"]\nlabel = \"pos\"\n\
         [[rule]]\nname = \"blame\"\nkind = \"keywords\"\nwords = [\"bad\", \"awful\", \"never\"]\nlabel = \"neg\"\n",
    )
    .unwrap();
    let cfg = d.path().join("w.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 32\n[task]\nweak = \"cosine\"\n\
             [data]\ntrain = {:?}\ntext = \"text\"\nlabel = \"label\"\nsplit = [0.6, 0.2, 0.2]\n\
             [weak]\nrules = [\"rules.toml\"]\nsteps = {}\nteacher_update = 7\nthreshold = 0.0\n\
             [train]\nepochs = {}\nbatch_size = 4\nlr = 1e-3\nwarmup_ratio = 0.1\neval_every = 5\nsave_every = 3\nlog_every = 1\nthreads = 2\n",
            f,
            f.join("train.jsonl"),
            12 * kills(),
            kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, false);
    compare(&d.path().join("ref/stage1"), &d.path().join("run/stage1"));
    for k in 0..(12 * kills()).div_ceil(7) {
        let t = |p: &str| {
            std::fs::read(d.path().join(p).join(format!("teacher/period-{k}.json"))).unwrap()
        };
        assert!(t("ref") == t("run"), "teacher of period {k} differs");
    }
}

/// A Llama reward model with LoRA (dropout 0.1) and the scalar head.
#[test]
fn killed_reward_run_resumes_to_the_same_curve() {
    let f = fixtures();
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("rm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"reward\"\n\
             [data]\ntrain = {:?}\nsplit = [0.7, 0.15, 0.15]\n\
             [train]\nepochs = {}\nbatch_size = 4\nlr = 1e-2\neval_every = 5\nsave_every = 3\nlog_every = 2\nthreads = 2\n\
             [reward]\ncenter_rewards_coefficient = 0.01\n\
             [adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
            f.join("llama-tiny"),
            f.join("pairs-tiny/text.jsonl"),
            4 * kills()
        ),
    )
    .unwrap();
    kill_resume_and_compare(&cfg, true);
}

/// The config of a PPO run of llama-tiny on the tiny SFT rows (a regex
/// reward; sampled rollouts), `extra` appended.
fn ppo_config(d: &Path, batches: usize, extra: &str) -> PathBuf {
    let f = fixtures();
    let cfg = d.join("ppo.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = {:?}\nmax_length = 64\n[task]\ntype = \"ppo\"\n\
             [data]\ntrain = {:?}\nmessages = \"input\"\nresponse = \"ideal\"\nsplit = [0.8, 0.1, 0.1]\ngenerate_eval_rows = 4\n\
             [train]\nbatch_size = 4\ngrad_accum = 2\nlr = 1e-3\neval_every = 3\nsave_every = 1\nlog_every = 1\nthreads = 2\n\
             [ppo]\nreward = \"regex\"\nreward_regex = \"[a-e]\"\nresponse_length = 6\ntemperature = 0.9\ntop_k = 50\n\
             num_ppo_epochs = 2\nnum_mini_batches = 2\ntotal_episodes = {}\nmissing_eos_penalty = 0.5\n{extra}",
            f.join("llama-tiny"),
            f.join("sft-tiny/train.jsonl"),
            16 * batches,
        ),
    )
    .unwrap();
    cfg
}

/// PPO with LoRA (reference: the adapter switched off) and the adaptive KL
/// coefficient, whose value lives in the checkpoint: sampled rollouts, the
/// minibatch order and the coefficient continue exactly.
#[test]
fn killed_lora_ppo_run_resumes_to_the_same_curve() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ppo_config(
        d.path(),
        3 * kills(),
        "adap_kl_ctrl = true\ntarget = 0.5\nhorizon = 50\n\
         [adapter]\ntype = \"lora\"\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\n",
    );
    kill_resume_and_compare(&cfg, true);
}

/// PPO of the whole model (reference: a frozen copy), k3 KL penalty and
/// whitened rewards.
#[test]
fn killed_full_ppo_run_resumes_to_the_same_curve() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ppo_config(
        d.path(),
        3 * kills(),
        "kl_estimator = \"k3\"\nwhiten_rewards = true\n",
    );
    kill_resume_and_compare(&cfg, false);
}
