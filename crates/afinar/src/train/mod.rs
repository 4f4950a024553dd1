//! THE explicit training loop, and the pieces it is made of.
//!
//! [`Trainer`] holds what every recipe needs, usable on its own: one
//! optimizer step from micro-batch losses (gradient accumulation, the
//! non-finite guard, clipping, AdamW, the schedule, the metrics log), best
//! tracking and early stopping on evaluations, resumable checkpoints and
//! exact resume. [`run_loop`] drives it over a fixed dataset for any
//! [`Objective`] (classification, SFT; next: reward models, DPO); a recipe
//! whose data is not fixed (PPO's rollouts, self-training's teacher
//! refresh) drives the same pieces itself.
//!
//! Structure after nanoGPT's `train.py`: one loop, visible, no callbacks
//! beyond the event sink. Seeds (Dodge et al. 2020): `seeds.init` draws new
//! weights, `seeds.data` the batch order, `seeds.dropout` the masks.

pub mod checkpoint;
pub mod run;

pub use crate::event::Event;
pub use run::RunWriter;

use crate::config::{OnNonFinite, Plan};
use crate::data::EpochOrder;
use crate::metrics;
use crate::nn::DropoutRng;
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::params::ParamStore;
use crate::{Error, Result};
use candle_core::Tensor;
use checkpoint::{Best, SeedState, Skipped, TrainerState};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct TrainOptions {
    pub run_dir: PathBuf,
    /// Set by a Ctrl-C handler: save a checkpoint and stop cleanly.
    pub stop: Arc<AtomicBool>,
    /// Continue the run in `run_dir` from its latest `checkpoint-<step>/`
    /// (the plan must be the one in its config.toml).
    pub resume: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub interrupted: bool,
    pub stopped_early: bool,
    pub wall_s: f64,
    pub train_rows: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    pub best_step: Option<usize>,
    pub best_validation: BTreeMap<String, f64>,
    /// Batches dropped by the non-finite guard (`train.on_non_finite = "skip"`).
    pub skipped_batches: Vec<checkpoint::Skipped>,
    /// The step this process started from (0, or the checkpoint resumed).
    pub resumed_from: Option<usize>,
    /// Test metrics of the best-on-validation weights (those saved in `model/`).
    pub test: Option<BTreeMap<String, f64>>,
}

/// sha256 over the training rows: a resume checks it is on the same data.
pub struct Fingerprint(sha2::Sha256);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    pub fn new() -> Self {
        use sha2::Digest;
        Fingerprint(sha2::Sha256::new())
    }
    pub fn bytes(&mut self, b: &[u8]) {
        use sha2::Digest;
        // Length-prefixed, so [a][bc] and [ab][c] differ.
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
    pub fn u32s(&mut self, v: &[u32]) {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    }
    pub fn i64s(&mut self, v: &[i64]) {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    }
    pub fn f32s(&mut self, v: &[f32]) {
        self.bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>());
    }
    pub fn finish(self) -> String {
        use sha2::Digest;
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Which held-out set to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Validation,
    Test,
}

/// What the loop trains: how a micro-batch becomes a loss, how the model is
/// evaluated and saved. The loop itself ([`run_loop`]) is the same for
/// every method.
pub trait Objective {
    /// Number of training rows (examples, or packed sequences).
    fn train_len(&self) -> usize;
    /// The mean loss of training rows `idx` (recorded for backward) and the
    /// number of tokens they hold.
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(Tensor, usize)>;
    /// Metrics on a held-out split (`loss` among them); None if there is none.
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>>;
    /// Save the current weights as the run's best model (`<run>/model/`, and
    /// `<run>/adapter/` for an adapter run).
    fn save(&self, store: &ParamStore) -> Result<()>;
    /// sha256 of the tokenised training rows (see [`Fingerprint`]).
    fn data_fingerprint(&self) -> String;
    /// Where training rows `idx` come from, for error messages.
    fn describe_rows(&self, idx: &[usize]) -> String {
        format!("training rows {idx:?}")
    }
    /// Metrics of the training batches since the last call (means over the
    /// step's micro-batches, asked after each step), logged on the steps
    /// the loss is logged as split "train" (DPO's `rewards/*`); None: none.
    fn train_metrics(&self) -> Option<BTreeMap<String, f64>> {
        None
    }
}

/// The steps of a run over `train_len` rows as `plan.config.train` says
/// (`max_steps`, else epochs of batches grouped by gradient accumulation).
pub fn total_steps(plan: &Plan, train_len: usize) -> usize {
    let t = &plan.config.train;
    let micro_per_epoch = train_len.div_ceil(t.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(t.grad_accum);
    t.max_steps.unwrap_or(steps_per_epoch * t.epochs).max(1)
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The step's loss (micro-batch losses weighted by their share).
    pub loss: f64,
    pub lr: f64,
    /// Dropped by the non-finite guard (`on_non_finite = "skip"`).
    pub skipped: bool,
}

/// What an evaluation did.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalOutcome {
    /// A new best on the selection metric (the weights were saved).
    pub improved: bool,
    /// Early stopping says the run ends here.
    pub stop: bool,
}

/// The pieces of a training run, over one [`ParamStore`] and one run
/// folder: the optimizer, the loop state (what a checkpoint holds), the
/// best weights so far. Every recipe steps, evaluates and checkpoints
/// through it, so guards, logs and resume behave the same everywhere.
pub struct Trainer<'a> {
    plan: &'a Plan,
    store: &'a ParamStore,
    run: &'a RunWriter,
    pub opt: AdamW,
    pub state: TrainerState,
    best_weights: Option<BTreeMap<String, Tensor>>,
    warmup: usize,
    sel_metric: String,
    t0: Instant,
    tokens: usize,
    window: Instant,
    last_saved: Option<usize>,
    resumed_from: Option<usize>,
}

impl<'a> Trainer<'a> {
    /// A fresh run of `total_steps` optimizer steps over the trainable
    /// parameters of `store`. `train_rows` and `data_fingerprint` identify
    /// the data, so a resume on other data is refused. `t0`: when the run
    /// started (wall time in the log).
    pub fn new(
        plan: &'a Plan,
        store: &'a ParamStore,
        run: &'a RunWriter,
        total_steps: usize,
        train_rows: usize,
        data_fingerprint: String,
        t0: Instant,
    ) -> Result<Self> {
        let c = &plan.config;
        let t = &c.train;
        let opt = AdamW::new(
            store.trainable(),
            AdamWConfig {
                lr: t.lr,
                beta1: t.beta1,
                beta2: t.beta2,
                eps: t.eps,
                weight_decay: t.weight_decay,
            },
        )?;
        let warmup = t
            .warmup_steps
            .unwrap_or((t.warmup_ratio * total_steps as f64).ceil() as usize);
        let state = TrainerState {
            format: checkpoint::FORMAT,
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            optimizer_step: 0,
            best: None,
            bad_evals: 0,
            last_eval_step: None,
            loss_window: (0.0, 0),
            skipped: Vec::new(),
            metrics_len: 0,
            seeds: SeedState {
                init: c.seeds.init,
                data: c.seeds.data,
                dropout: c.seeds.dropout,
            },
            threads: rayon::current_num_threads(),
            train_rows,
            data_fingerprint,
            method: BTreeMap::new(),
        };
        Ok(Trainer {
            plan,
            store,
            run,
            opt,
            state,
            best_weights: None,
            warmup,
            sel_metric: plan.selection_metric(),
            t0,
            tokens: 0,
            window: Instant::now(),
            last_saved: None,
            resumed_from: None,
        })
    }

    pub fn done(&self) -> bool {
        self.state.step >= self.state.total_steps
    }

    /// The dropout stream of the current step (counter-based: a resumed run
    /// draws the same masks).
    pub fn dropout(&self) -> DropoutRng {
        DropoutRng::new(self.plan.config.seeds.dropout, self.state.step as u64)
    }

    /// The learning rate of the current step.
    pub fn lr(&self) -> f64 {
        let t = &self.plan.config.train;
        lr_at(
            t.schedule,
            t.lr,
            self.state.step,
            self.warmup,
            self.state.total_steps,
        )
    }

    /// One optimizer step over `micro` micro-batches: `loss_of(i, rng)`
    /// gives micro-batch `i`'s mean loss (recorded for backward), its weight
    /// in the step (its share of the rows) and its token count. Backward
    /// runs after each micro-batch (gradients accumulate in the parameters'
    /// buffers); then the non-finite guard, clipping, AdamW, the schedule and
    /// the metrics log. `describe` names the step's rows for errors.
    pub fn step(
        &mut self,
        micro: usize,
        loss_of: &mut dyn FnMut(usize, &DropoutRng) -> Result<(Tensor, f64, usize)>,
        describe: &dyn Fn() -> String,
        on: &mut dyn FnMut(Event),
    ) -> Result<StepOutcome> {
        let t = &self.plan.config.train;
        let drop = self.dropout();
        let mut step_loss = 0f64;
        let mut bad: Option<String> = None;
        for i in 0..micro {
            let (loss, w, ntok) = loss_of(i, &drop)?;
            self.tokens += ntok;
            let lv = loss.to_vec0::<f32>()? as f64;
            if !lv.is_finite() {
                bad = Some(format!("loss is {lv}"));
                break;
            }
            step_loss += lv * w;
            // Parameter gradients accumulate in their buffers (see
            // nn::GradBuf); candle's store holds only activations' ones.
            let _ = (loss * w)?.backward()?;
        }
        let norm = match bad {
            Some(_) => f64::NAN,
            None => self.opt.grad_norm()?,
        };
        if bad.is_none() && !norm.is_finite() {
            bad = Some(format!("gradient norm is {norm}"));
        }
        let lr = self.lr();
        let st = &mut self.state;
        let skipped = bad.is_some();
        if let Some(what) = bad {
            let at = format!(
                "at step {} (epoch {}, batch {} of the epoch)",
                st.step + 1,
                st.epoch,
                st.batch_in_epoch + 1
            );
            match t.on_non_finite {
                OnNonFinite::Stop => {
                    let saved = match &st.best {
                        Some(b) => format!(
                            "the best checkpoint so far (step {}) is in {}",
                            b.step,
                            self.run.dir().join("model").display()
                        ),
                        None => "no checkpoint was saved (no evaluation had run yet)".into(),
                    };
                    return Err(Error::NonFinite(format!(
                        "{what} {at}, on {}, with train.lr = {:e}; {saved}; train.on_non_finite = \"skip\" drops such batches",
                        describe(),
                        t.lr
                    )));
                }
                OnNonFinite::Skip => {
                    self.opt.zero_grad();
                    let s = Skipped {
                        step: st.step + 1,
                        reason: what.clone(),
                        rows: describe(),
                    };
                    on(Event::Info(format!(
                        "skipped the batch {at}: {what}, on {}",
                        s.rows
                    )));
                    self.run.log_skipped(&s)?;
                    st.skipped.push(s);
                }
            }
        } else {
            let scale = if t.max_grad_norm > 0.0 && norm > t.max_grad_norm {
                t.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            self.opt.step(lr, scale)?;
            st.loss_window.0 += step_loss;
            st.loss_window.1 += 1;
        }
        st.optimizer_step = self.opt.step;
        st.step += 1;
        let elapsed = self.window.elapsed().as_secs_f64();
        let tps = self.tokens as f64 / elapsed.max(1e-9);
        on(Event::Step {
            step: st.step,
            total_steps: st.total_steps,
            epoch: st.epoch,
            loss: step_loss,
            lr,
            tokens_per_s: tps,
        });
        if (st.step % t.log_every == 0 || st.step == st.total_steps) && st.loss_window.1 > 0 {
            self.run.log_step(
                st.step,
                st.epoch,
                st.loss_window.0 / st.loss_window.1 as f64,
                lr,
                norm,
                tps,
                self.t0.elapsed().as_secs_f64(),
            )?;
            st.loss_window = (0.0, 0);
            self.tokens = 0;
            self.window = Instant::now();
        }
        Ok(StepOutcome {
            loss: step_loss,
            lr,
            skipped,
        })
    }

    /// Record a validation result `m`: a new best on the selection metric
    /// (by more than early stopping's `min_delta`) keeps the weights and
    /// saves them with `save_best`; otherwise early stopping counts it.
    pub fn record_validation(
        &mut self,
        m: BTreeMap<String, f64>,
        save_best: &dyn Fn(&ParamStore) -> Result<()>,
        on: &mut dyn FnMut(Event),
    ) -> Result<EvalOutcome> {
        let t = &self.plan.config.train;
        let sel = &self.sel_metric;
        let v = *m
            .get(sel)
            .ok_or_else(|| Error::msg(format!("metric {sel} not computed")))?;
        let min_delta = t.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
        let st = &mut self.state;
        let improved = match &st.best {
            None => true,
            Some(b) => metrics::is_better(sel, v, b.value) && (v - b.value).abs() > min_delta,
        };
        st.last_eval_step = Some(st.step);
        if improved {
            checkpoint::check_finite(
                self.store,
                &format!("{}", self.run.dir().join("model").display()),
            )?;
            st.best = Some(Best {
                value: v,
                step: st.step,
                metrics: m.clone(),
            });
            self.best_weights = Some(self.store.snapshot_trainable()?);
            save_best(self.store)?;
            st.bad_evals = 0;
        } else {
            st.bad_evals += 1;
        }
        self.run.log_eval(st.step, "validation", &m)?;
        on(Event::Eval {
            step: st.step,
            split: "validation".into(),
            metrics: m,
            best: improved,
        });
        let stop = self.early_stopped();
        let st = &self.state;
        if stop {
            on(Event::Info(format!(
                "early stopping at step {}: no improvement of {sel} in {} evaluations",
                st.step, st.bad_evals
            )));
        }
        Ok(EvalOutcome { improved, stop })
    }

    /// Write `checkpoint-<step>/` (weights, AdamW moments, the loop state)
    /// and rotate old ones out, never the best.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        let t = &self.plan.config.train;
        let st = &mut self.state;
        st.metrics_len = self.run.metrics_len()?;
        checkpoint::save(self.run.dir(), st, self.store, &self.opt)?;
        checkpoint::rotate(
            self.run.dir(),
            t.save_total_limit,
            st.best.as_ref().map(|b| b.step),
        )?;
        self.last_saved = Some(st.step);
        Ok(())
    }

    /// Stopped by Ctrl-C: the current step's checkpoint (unless written),
    /// and how to continue.
    pub fn save_interrupted(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        if !self.saved_now() {
            self.save_checkpoint()?;
        }
        let dir = self.run.dir();
        on(Event::Info(format!(
            "interrupted at step {}: checkpoint saved to {}; continue with `afinar train --resume {}`",
            self.state.step,
            checkpoint::path(dir, self.state.step).display(),
            dir.display()
        )));
        Ok(())
    }

    /// Whether the current step's checkpoint is written already.
    pub fn saved_now(&self) -> bool {
        self.last_saved == Some(self.state.step)
    }

    /// Early stopping has ended the run: the last evaluation made
    /// `patience` in a row without improvement. Part of the saved state, so
    /// a run killed after that evaluation's checkpoint stops again on resume.
    pub fn early_stopped(&self) -> bool {
        let t = &self.plan.config.train;
        t.early_stopping
            .as_ref()
            .is_some_and(|es| self.state.bad_evals >= es.patience)
    }

    /// Whether a checkpoint is due after this step: every `save_every`
    /// steps, or (by default) after each evaluation.
    pub fn checkpoint_due(&self, evaluated: bool) -> bool {
        match self.plan.config.train.save_every {
            Some(n) => self.state.step % n == 0,
            None => evaluated,
        }
    }

    /// Continue from the latest checkpoint of the run folder, after checking
    /// that it belongs to this run (same data, same length, same seeds):
    /// weights, AdamW moments, loop state and best weights come back, and
    /// `metrics.jsonl` is cut back to the checkpoint.
    pub fn resume(&mut self, on: &mut dyn FnMut(Event)) -> Result<()> {
        let fresh = &self.state;
        let store = self.store;
        let run_dir = self.run.dir();
        let Some((_, dir)) = checkpoint::list(run_dir)?.pop() else {
            return Err(Error::file(
                run_dir,
                "no checkpoint-<step>/ folder with trainer_state.json: nothing to resume (the run stopped before its first checkpoint; start it again)",
            ));
        };
        let ck = checkpoint::load(&dir)?;
        let st = ck.state;
        let sp = dir.join(checkpoint::STATE_FILE);
        let mismatch = |what: &str, was: String, now: String| {
            Error::file(
                &sp,
                format!("{what} was {was} when the checkpoint was written, it is {now} now: cannot resume on changed {what}"),
            )
        };
        if st.data_fingerprint != fresh.data_fingerprint || st.train_rows != fresh.train_rows {
            return Err(mismatch(
                "training data",
                format!(
                    "{} rows (sha256 {})",
                    st.train_rows,
                    &st.data_fingerprint[..st.data_fingerprint.len().min(12)]
                ),
                format!(
                    "{} rows (sha256 {})",
                    fresh.train_rows,
                    &fresh.data_fingerprint[..fresh.data_fingerprint.len().min(12)]
                ),
            ));
        }
        if st.total_steps != fresh.total_steps {
            return Err(mismatch(
                "the step count",
                st.total_steps.to_string(),
                fresh.total_steps.to_string(),
            ));
        }
        if st.seeds != fresh.seeds {
            return Err(mismatch(
                "seeds",
                format!("{:?}", st.seeds),
                format!("{:?}", fresh.seeds),
            ));
        }
        checkpoint::restore_weights(store, &ck.weights, &dir.join(checkpoint::WEIGHTS_FILE))?;
        self.opt.load_state(st.optimizer_step, &ck.optimizer)?;
        let best = match &st.best {
            None => None,
            Some(b) if b.step == st.step => Some(store.snapshot_trainable()?),
            Some(b) => {
                let bdir = checkpoint::path(run_dir, b.step);
                let f = bdir.join(checkpoint::WEIGHTS_FILE);
                if !f.is_file() {
                    return Err(Error::file(
                        &f,
                        format!("the best weights (step {}) are missing: the best checkpoint must stay beside the one resumed", b.step),
                    ));
                }
                let w = checkpoint::read_tensors(&f)?;
                let mut out = BTreeMap::new();
                for (name, p) in store.training_state() {
                    let t = w.get(&name).ok_or_else(|| Error::Tensor {
                        name: name.clone(),
                        msg: format!("missing from {}", f.display()),
                    })?;
                    out.insert(name, t.to_dtype(p.dtype())?.to_device(p.device())?);
                }
                Some(out)
            }
        };
        self.run.truncate_metrics(st.metrics_len)?;
        if st.threads != fresh.threads {
            on(Event::Warning(format!(
                "the checkpoint was written with {} threads, this process has {}: the loss curve may differ in its last digits (set train.threads)",
                st.threads, fresh.threads
            )));
        }
        on(Event::Info(format!(
            "resumed from {}: step {} of {}, epoch {}, batch {} of the epoch",
            dir.display(),
            st.step,
            st.total_steps,
            st.epoch,
            st.batch_in_epoch
        )));
        self.resumed_from = Some(st.step);
        self.state = st;
        self.best_weights = best;
        Ok(())
    }

    /// Put the best-on-validation weights back (those saved in `model/`).
    pub fn restore_best(&self) -> Result<()> {
        if let Some(w) = &self.best_weights {
            self.store.copy_values_from(w)?;
        }
        Ok(())
    }

    /// Log the test metrics of the best weights.
    pub fn record_test(
        &self,
        split: &str,
        m: &BTreeMap<String, f64>,
        on: &mut dyn FnMut(Event),
    ) -> Result<()> {
        self.run.log_eval(self.state.step, split, m)?;
        on(Event::Eval {
            step: self.state.step,
            split: split.into(),
            metrics: m.clone(),
            best: false,
        });
        Ok(())
    }

    /// The run's report; unless `interrupted`, `results.json` (and the plot)
    /// are written, marking the run finished.
    pub fn finish(
        self,
        interrupted: bool,
        stopped_early: bool,
        test: Option<BTreeMap<String, f64>>,
        on: &mut dyn FnMut(Event),
    ) -> Result<TrainReport> {
        let st = self.state;
        if !st.skipped.is_empty() {
            on(Event::Info(format!(
                "{} batch{} skipped by the non-finite guard (listed in results.json)",
                st.skipped.len(),
                if st.skipped.len() == 1 { "" } else { "es" }
            )));
        }
        let (n_train, n_all) = self.store.counts();
        let report = TrainReport {
            run_dir: self.run.dir().to_path_buf(),
            steps: st.step,
            interrupted,
            stopped_early,
            wall_s: self.t0.elapsed().as_secs_f64(),
            train_rows: st.train_rows,
            trainable_params: n_train,
            total_params: n_all,
            best_step: st.best.as_ref().map(|b| b.step),
            best_validation: st.best.map(|b| b.metrics).unwrap_or_default(),
            skipped_batches: st.skipped,
            resumed_from: self.resumed_from,
            test,
        };
        // An interrupted run is not finished: no results.json, so that
        // `--resume` continues it.
        if !interrupted {
            self.run.finish(&report)?;
        }
        Ok(report)
    }
}

/// Log the test metrics of the model as loaded (`test_before`, step 0), for
/// methods that report before / after (SFT, DPO).
pub fn test_before(obj: &dyn Objective, run: &RunWriter, on: &mut dyn FnMut(Event)) -> Result<()> {
    if let Some(m) = obj.evaluate(Split::Test)? {
        log_test_before(run, m, on)?;
    }
    Ok(())
}

/// Log `m` as the test metrics before training (split `test_before`, step 0).
pub fn log_test_before(
    run: &RunWriter,
    m: BTreeMap<String, f64>,
    on: &mut dyn FnMut(Event),
) -> Result<()> {
    run.log_eval(0, "test_before", &m)?;
    on(Event::Eval {
        step: 0,
        split: "test_before".into(),
        metrics: m,
        best: false,
    });
    Ok(())
}

/// The one training loop over a fixed dataset: batches in seeded order ->
/// loss -> backward (with gradient accumulation) -> clip -> AdamW ->
/// schedule; evaluation every N steps (or at each epoch end) with
/// best-weights keeping and early stopping; resumable checkpoints; Ctrl-C
/// saves one and stops; a non-finite loss or gradient stops the run, or
/// skips the batch. Ends with the test metrics of the best weights.
pub fn run_loop(
    plan: &Plan,
    opts: &TrainOptions,
    store: &ParamStore,
    obj: &dyn Objective,
    run: &RunWriter,
    t0: Instant,
    on: &mut dyn FnMut(Event),
) -> Result<TrainReport> {
    let t = &plan.config.train;
    let train_len = obj.train_len();
    let total = total_steps(plan, train_len);
    let mut tr = Trainer::new(
        plan,
        store,
        run,
        total,
        train_len,
        obj.data_fingerprint(),
        t0,
    )?;
    if opts.resume {
        tr.resume(on)?;
    }
    on(Event::Start {
        total_steps: total,
        step: tr.state.step,
    });
    let save_best = |s: &ParamStore| obj.save(s);
    let validate = |tr: &mut Trainer, on: &mut dyn FnMut(Event)| -> Result<EvalOutcome> {
        let m = obj
            .evaluate(Split::Validation)?
            .ok_or_else(|| Error::msg("no validation set"))?;
        tr.record_validation(m, &save_best, on)
    };

    // A resumed run whose last evaluation stopped it goes straight to the end.
    let (mut interrupted, mut stopped_early) = (false, tr.early_stopped());
    'outer: while !stopped_early && !tr.done() {
        let order = EpochOrder::new(train_len, plan.config.seeds.data, tr.state.epoch as u64);
        let micro: Vec<&[usize]> = order.batches(t.batch_size)?.collect();
        let groups: Vec<&[&[usize]]> = micro.chunks(t.grad_accum).collect();
        if tr.state.batch_in_epoch >= groups.len() {
            return Err(Error::msg(format!(
                "checkpoint position: batch {} of epoch {} holds only {} batches",
                tr.state.batch_in_epoch,
                tr.state.epoch,
                groups.len()
            )));
        }
        for group in &groups[tr.state.batch_in_epoch..] {
            if opts.stop.load(Ordering::SeqCst) {
                interrupted = true;
                break 'outer;
            }
            let group_rows: usize = group.iter().map(|g| g.len()).sum();
            let describe = || {
                let rows: Vec<usize> = group.iter().flat_map(|g| g.iter().copied()).collect();
                obj.describe_rows(&rows)
            };
            tr.step(
                group.len(),
                &mut |i, drop| {
                    let (loss, ntok) = obj.loss(group[i], drop)?;
                    // Weight each micro-batch by its share of rows.
                    Ok((loss, group[i].len() as f64 / group_rows as f64, ntok))
                },
                &describe,
                on,
            )?;
            tr.state.batch_in_epoch += 1;
            // Each step's own batches (a resumed run logs the same lines).
            let step_metrics = obj.train_metrics();
            if tr.state.step % t.log_every == 0 || tr.done() {
                if let Some(m) = step_metrics {
                    run.log_eval(tr.state.step, "train", &m)?;
                }
            }
            let mut evaluated = None;
            if t.eval_every.is_some_and(|e| tr.state.step % e == 0) {
                evaluated = Some(validate(&mut tr, on)?);
            }
            let epoch_end = tr.state.batch_in_epoch == groups.len();
            if epoch_end {
                tr.state.epoch += 1;
                tr.state.batch_in_epoch = 0;
                // Without `eval_every`, evaluate at each epoch end.
                if t.eval_every.is_none() {
                    evaluated = Some(validate(&mut tr, on)?);
                }
            }
            let outcome = evaluated.unwrap_or_default();
            if outcome.improved || tr.checkpoint_due(evaluated.is_some()) {
                tr.save_checkpoint()?;
            }
            if outcome.stop {
                stopped_early = true;
                break 'outer;
            }
            if tr.done() || epoch_end {
                continue 'outer;
            }
        }
    }
    if interrupted {
        tr.save_interrupted(on)?;
    } else if !stopped_early && tr.state.last_eval_step != Some(tr.state.step) {
        // The steps after the last evaluation count too.
        let _ = validate(&mut tr, on)?;
        if !tr.saved_now() {
            tr.save_checkpoint()?;
        }
    }

    // ---- test with the best-on-validation weights (the ones in model/)
    let mut test = None;
    if !interrupted {
        tr.restore_best()?;
        if let Some(m) = obj.evaluate(Split::Test)? {
            tr.record_test("test", &m, on)?;
            test = Some(m);
        }
    }
    tr.finish(interrupted, stopped_early, test, on)
}

#[cfg(test)]
mod tests;
