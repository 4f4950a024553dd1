//! The loop driven by a toy objective, without the CLI or a model: linear
//! regression of y = 3 x0 - 2 x1 + 0.5 with one `nn::linear` (so gradients
//! land in the parameters' buffers as in every model). Checks that the
//! loop learns, keeps the best weights, stops early, writes its run folder,
//! guards non-finite losses, and resumes an interrupted run to the same
//! bits; and that [`Trainer`]'s pieces work on their own (a recipe that is
//! not a fixed dataset).

use super::*;
use crate::nn::{self, Weight};
use crate::params::{ParamStore, Selector};
use candle_core::{Device, Tensor};
use std::cell::Cell;

/// Rows `i` of a deterministic data set: x in [-1, 1]^2.
fn rows(n: usize, offset: usize) -> (Vec<[f32; 2]>, Vec<f32>) {
    let x: Vec<[f32; 2]> = (0..n)
        .map(|i| {
            let h = crate::data::splitmix64((i + offset) as u64);
            let a = (h & 0xffff) as f32 / 32768.0 - 1.0;
            let b = ((h >> 16) & 0xffff) as f32 / 32768.0 - 1.0;
            [a, b]
        })
        .collect();
    let y = x.iter().map(|v| 3.0 * v[0] - 2.0 * v[1] + 0.5).collect();
    (x, y)
}

struct Toy {
    w: Weight,
    b: Weight,
    train: (Vec<[f32; 2]>, Vec<f32>),
    val: (Vec<[f32; 2]>, Vec<f32>),
    saves: Cell<usize>,
    /// Return a NaN loss at this call of `loss` (the non-finite guard).
    nan_at: Option<usize>,
    calls: Cell<usize>,
    /// Ask the loop to stop (as Ctrl-C does) at this call of `loss`.
    stop_at: Option<(usize, Arc<AtomicBool>)>,
}

impl Toy {
    fn new(store: &ParamStore) -> Self {
        Toy {
            w: store.get("w", &[1, 2]).unwrap(),
            b: store.get("b", &[1]).unwrap(),
            train: rows(64, 0),
            val: rows(16, 1000),
            saves: Cell::new(0),
            nan_at: None,
            calls: Cell::new(0),
            stop_at: None,
        }
    }

    fn mse(&self, data: &(Vec<[f32; 2]>, Vec<f32>), idx: &[usize]) -> Result<Tensor> {
        let x: Vec<f32> = idx.iter().flat_map(|&i| data.0[i]).collect();
        let y: Vec<f32> = idx.iter().map(|&i| data.1[i]).collect();
        let x = Tensor::from_vec(x, (idx.len(), 2), &Device::Cpu)?;
        let y = Tensor::from_vec(y, (idx.len(), 1), &Device::Cpu)?;
        let pred = nn::linear(&x, &self.w, Some(&self.b))?; // [B, 1]
        Ok((pred - y)?.sqr()?.mean_all()?)
    }
}

impl Objective for Toy {
    fn train_len(&self) -> usize {
        self.train.0.len()
    }
    fn loss(&self, idx: &[usize], _drop: &DropoutRng) -> Result<(Tensor, usize)> {
        let n = self.calls.get();
        self.calls.set(n + 1);
        if let Some((at, flag)) = &self.stop_at {
            if n == *at {
                flag.store(true, Ordering::SeqCst);
            }
        }
        let loss = self.mse(&self.train, idx)?;
        if self.nan_at == Some(n) {
            return Ok(((loss * f64::NAN)?, idx.len()));
        }
        Ok((loss, idx.len()))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        let idx: Vec<usize> = (0..self.val.0.len()).collect();
        let loss = self.mse(&self.val, &idx)?.to_vec0::<f32>()? as f64;
        let _ = split;
        Ok(Some([("loss".to_string(), loss)].into()))
    }
    fn save(&self, _store: &ParamStore) -> Result<()> {
        self.saves.set(self.saves.get() + 1);
        Ok(())
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
        f.f32s(&self.train.1);
        f.finish()
    }
}

fn plan(extra: &str) -> Plan {
    let text = format!(
        "[model]\npath = \"unused\"\n[data]\ntrain = \"unused\"\ntext = \"x\"\nlabel = \"y\"\nsplit = [0.8, 0.1, 0.1]\n\
         [task]\ntype = \"regression\"\n[train]\nbatch_size = 8\neval_every = 8\nlog_every = 4\n\
         max_grad_norm = 0.0\nthreads = 1\n{extra}"
    );
    Plan::from_str(&text, std::path::Path::new("toy.toml"), &[]).unwrap()
}

fn store() -> ParamStore {
    let mut s = ParamStore::new(Selector::all(), "toy");
    s.insert(
        "w",
        Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    s.insert(
        "b",
        Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    s
}

fn opts(dir: &std::path::Path, resume: bool) -> TrainOptions {
    TrainOptions {
        run_dir: dir.to_path_buf(),
        stop: Arc::new(AtomicBool::new(false)),
        resume,
    }
}

/// `metrics.jsonl` without its wall-clock fields (elapsed, tokens per second).
fn log_without_times(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("elapsed_s");
            o.remove("tokens_per_s");
            v
        })
        .collect()
}

fn weights(s: &ParamStore) -> Vec<f32> {
    ["w", "b"]
        .iter()
        .flat_map(|n| {
            s.snapshot_trainable().unwrap()[*n]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

fn train(p: &Plan, st: &ParamStore, obj: &Toy, o: &TrainOptions) -> Result<TrainReport> {
    let run = RunWriter::create(&o.run_dir, p, o.resume)?;
    run_loop(p, o, st, obj, &run, Instant::now(), &mut |_| {})
}

#[test]
fn the_loop_learns_a_toy_objective_and_writes_its_run() {
    let d = tempfile::tempdir().unwrap();
    let p = plan("lr = 0.3\nepochs = 10");
    let st = store();
    let obj = Toy::new(&st);
    let before = obj.evaluate(Split::Validation).unwrap().unwrap()["loss"];
    let r = train(&p, &st, &obj, &opts(d.path(), false)).unwrap();
    assert_eq!(r.steps, 10 * 8, "10 epochs of 8 batches");
    let best = r.best_validation["loss"];
    assert!(
        best < before * 1e-3,
        "validation MSE {before} -> {best}: did not learn"
    );
    let w = weights(&st);
    assert!(
        (w[0] - 3.0).abs() < 0.05 && (w[1] + 2.0).abs() < 0.05 && (w[2] - 0.5).abs() < 0.05,
        "{w:?}"
    );
    assert!(obj.saves.get() >= 1 && r.best_step.is_some());
    assert!(r.test.is_some(), "test metrics of the best weights");
    for f in ["config.toml", "metrics.jsonl", "results.json"] {
        assert!(d.path().join(f).is_file(), "{f}");
    }
    assert!(!checkpoint::list(d.path()).unwrap().is_empty());
    let log = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 20);
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving() {
    let d = tempfile::tempdir().unwrap();
    // A learning rate of 1e-9 never improves on the first evaluation by 1e-3.
    let p = plan("lr = 1e-9\nepochs = 6\nearly_stopping = { metric = \"loss\", patience = 2, min_delta = 1e-3 }");
    let st = store();
    let obj = Toy::new(&st);
    let r = train(&p, &st, &obj, &opts(d.path(), false)).unwrap();
    assert!(r.stopped_early, "{r:?}");
    assert_eq!(
        r.steps,
        3 * 8,
        "best at the first evaluation, then 2 without"
    );
    assert_eq!(r.best_step, Some(8));
    // Killed after the stopping evaluation's checkpoint, before its last
    // write (results.json): the resumed run stops there again.
    let log = log_without_times(d.path());
    std::fs::remove_file(d.path().join("results.json")).unwrap();
    let st = store();
    let obj = Toy::new(&st);
    let r = train(&p, &st, &obj, &opts(d.path(), true)).unwrap();
    assert_eq!(r.resumed_from, Some(24), "{r:?}");
    assert!(r.stopped_early && r.steps == 24, "{r:?}");
    assert_eq!(r.best_step, Some(8));
    assert_eq!(
        log_without_times(d.path()),
        log,
        "metrics.jsonl after resume"
    );
}

#[test]
fn a_non_finite_loss_stops_or_skips_naming_the_rows() {
    let d = tempfile::tempdir().unwrap();
    let st = store();
    let mut obj = Toy::new(&st);
    obj.nan_at = Some(5);
    let e = train(
        &plan("lr = 0.3\nepochs = 10"),
        &st,
        &obj,
        &opts(d.path(), false),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("loss is NaN at step 6") && e.contains("training rows ["),
        "{e}"
    );
    let d = tempfile::tempdir().unwrap();
    let st = store();
    let mut obj = Toy::new(&st);
    obj.nan_at = Some(5);
    let p = plan("lr = 0.3\nepochs = 10\non_non_finite = \"skip\"");
    let r = train(&p, &st, &obj, &opts(d.path(), false)).unwrap();
    assert_eq!(r.skipped_batches.len(), 1);
    assert_eq!(r.skipped_batches[0].step, 6);
    assert!(r.best_validation["loss"] < 1e-3);
}

#[test]
fn an_interrupted_run_resumes_to_the_same_bits() {
    let p = plan("lr = 0.3\nepochs = 4");
    let reference = {
        let d = tempfile::tempdir().unwrap();
        let st = store();
        let obj = Toy::new(&st);
        train(&p, &st, &obj, &opts(d.path(), false)).unwrap();
        (weights(&st), log_without_times(d.path()))
    };
    let d = tempfile::tempdir().unwrap();
    let o = opts(d.path(), false);
    {
        let st = store();
        let mut obj = Toy::new(&st);
        obj.stop_at = Some((21, o.stop.clone()));
        let r = train(&p, &st, &obj, &o).unwrap();
        assert!(r.interrupted && r.steps == 22, "{r:?}");
        assert!(!d.path().join("results.json").exists());
    }
    // A new process: fresh weights, continued from the checkpoint.
    let st = store();
    let obj = Toy::new(&st);
    let r = train(&p, &st, &obj, &opts(d.path(), true)).unwrap();
    assert_eq!(r.resumed_from, Some(22));
    assert_eq!(weights(&st), reference.0, "weights after resume");
    assert_eq!(
        log_without_times(d.path()),
        reference.1,
        "metrics.jsonl after resume"
    );
}

/// A recipe that is not a fixed dataset (here: a fresh batch drawn each
/// step, as PPO's rollouts) drives the Trainer's pieces itself.
#[test]
fn the_trainer_pieces_work_without_run_loop() {
    let d = tempfile::tempdir().unwrap();
    let p = plan("lr = 0.3");
    let st = store();
    let obj = Toy::new(&st);
    let run = RunWriter::create(d.path(), &p, false).unwrap();
    let before = obj.evaluate(Split::Validation).unwrap().unwrap()["loss"];
    let mut tr = Trainer::new(
        &p,
        &st,
        &run,
        60,
        64,
        obj.data_fingerprint(),
        Instant::now(),
    )
    .unwrap();
    let mut on = |_| {};
    while !tr.done() {
        let s = tr.state.step;
        // "Rollouts": two micro-batches drawn from the step number.
        let batches: Vec<Vec<usize>> = (0..2)
            .map(|k| (0..8).map(|i| (s * 16 + k * 8 + i) % 64).collect())
            .collect();
        tr.step(
            2,
            &mut |i, drop| {
                let (l, n) = obj.loss(&batches[i], drop)?;
                Ok((l, 0.5, n))
            },
            &|| format!("rollout {s}"),
            &mut on,
        )
        .unwrap();
        if tr.state.step % 10 == 0 {
            let m = obj.evaluate(Split::Validation).unwrap().unwrap();
            let out = tr.record_validation(m, &|s| obj.save(s), &mut on).unwrap();
            if out.improved {
                tr.save_checkpoint().unwrap();
            }
        }
    }
    tr.restore_best().unwrap();
    let r = tr.finish(false, false, None, &mut on).unwrap();
    assert_eq!(r.steps, 60);
    assert!(r.best_step.is_some());
    let best = r.best_validation["loss"];
    assert!(best < before / 10.0, "validation MSE {before} -> {best}");
    let kept = checkpoint::list(d.path()).unwrap().len();
    assert!((1..=2).contains(&kept), "save_total_limit 2: {kept} kept");
    assert!(d.path().join("results.json").is_file());
}
