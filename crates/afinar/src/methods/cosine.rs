//! Weak supervision with COSINE (`task.weak`, Yu et al., NAACL 2021): a
//! classifier trained from labelling rules instead of labels.
//!
//! - The rules of `[weak]` vote on every row; the label model (majority or
//!   weighted vote) labels the rows it can (ties and unvoted rows abstain).
//!   The analysis (`weak::analyse`) is printed and saved in
//!   `<run>/weak/analysis.json` (`afinar weak analyse` gives it alone).
//! - **Stage 1** (`task.weak = "stage1"`, or the first half of "cosine"):
//!   the ordinary classification loop on the covered rows with the label
//!   model's labels, early-stopped on the labelled validation split
//!   (`train.*`). In a "cosine" run it lives in `<run>/stage1/`, a complete
//!   run folder of its own.
//! - **Stage 2** (`task.weak = "cosine"`): self-training over every
//!   training row, covered or not, from stage 1's best weights with a fresh
//!   optimizer (`weak.steps`, `weak.lr`). Every `weak.teacher_update` (T3)
//!   steps the model becomes the teacher: its probabilities over all rows
//!   give confidence weights, the rows kept (`weak.threshold`, xi) and their
//!   sharpened soft labels (`cosine::math`); the loss is the weighted
//!   distillation + `lambda` x confidence regulariser + `mu` x contrastive
//!   regulariser on the student's features. The model is evaluated at the
//!   start (stage 1's weights are the first best, as WRENCH does) and every
//!   `train.eval_every` steps; the best on validation is kept and tested.
//!   The teacher's probabilities of each period are saved
//!   (`<run>/teacher/period-<k>.json`), so a resumed run uses the same
//!   teacher.

pub mod math;

use super::classify::{self, Classify, Encoded, SplitSources, Splits};
use crate::config::{Plan, WeakMode};
use crate::data::{EpochOrder, LabelMap, LabelValue, RawExample};
use crate::event::Event;
use crate::heads::{SequenceModel, Targets, TaskKind};
use crate::params::ParamStore;
use crate::train::{
    checkpoint, run_loop, Fingerprint, RunWriter, Split, TrainOptions, TrainReport, Trainer,
};
use crate::weak::{self, RuleSet, SplitAnalysis, Votes};
use crate::{fsutil, Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// The data of a weak run: rows, gold labels of the labelled splits, the
/// rules' votes and the label model's training labels.
pub struct WeakData {
    pub splits: Splits,
    pub labels: LabelMap,
    pub rules: RuleSet,
    /// Votes on train, validation, test.
    pub votes: Vec<Votes>,
    /// The label model's label of each training row (None: abstain).
    pub train_labels: Vec<Option<usize>>,
    pub analysis: Vec<SplitAnalysis>,
}

/// The rule specs of `[weak]`, each with the file it comes from.
fn rule_specs(plan: &Plan) -> Result<Vec<(weak::RuleSpec, PathBuf)>> {
    let w = plan.config.weak.as_ref().ok_or_else(|| Error::Config {
        path: plan.config_path.clone(),
        msg: "no [weak] section: weak supervision needs rules".into(),
    })?;
    let mut out = Vec::new();
    // `Plan::load` anchored relative paths at the config file.
    for f in &w.rules {
        let p = PathBuf::from(f);
        for r in weak::read_rule_file(&p)? {
            out.push((r, p.clone()));
        }
    }
    for r in &w.rule {
        out.push((r.clone(), plan.config_path.clone()));
    }
    Ok(out)
}

fn gold(ex: &[RawExample], labels: &LabelMap, path: &Path) -> Result<Vec<usize>> {
    labels.ids(ex, path)
}

/// Read the data and the rules, vote, aggregate and analyse.
pub fn prepare(plan: &Plan, on: &mut dyn FnMut(Event)) -> Result<WeakData> {
    let w = plan.config.weak.as_ref().ok_or_else(|| Error::Config {
        path: plan.config_path.clone(),
        msg: "no [weak] section: weak supervision needs rules".into(),
    })?;
    let t0 = Instant::now();
    let sources: SplitSources = classify::load_sources(plan)?;
    let splits = Splits {
        train: classify::examples_of(plan, &sources.train)?,
        validation: classify::examples_of(plan, &sources.validation)?,
        test: sources
            .test
            .as_ref()
            .map(|t| classify::examples_of(plan, t))
            .transpose()?,
    };
    // The labelled splits fix the label set; training labels are not read.
    let mut gold_labels: Vec<&LabelValue> = Vec::new();
    for (ex, _) in std::iter::once(&splits.validation).chain(splits.test.as_ref()) {
        gold_labels.extend(ex.iter().filter_map(|e| e.label.as_ref()));
    }
    let labels = LabelMap::from_labels(gold_labels)?;
    let rules = RuleSet::build(
        &rule_specs(plan)?,
        w.spamassassin
            .as_ref()
            .map(|s| (s, plan.config_path.as_path())),
        labels.id2label(),
    )?;
    on(Event::Info(format!(
        "weak: {} rules{}, labels {:?}",
        rules.rules.len(),
        if rules.skipped.is_empty() {
            String::new()
        } else {
            format!(
                " ({} SpamAssassin rules skipped, listed in the analysis)",
                rules.skipped.len()
            )
        },
        labels.id2label()
    )));
    let mut votes = vec![rules.votes(&sources.train.records, &sources.train.idx)?];
    votes.push(rules.votes(&sources.validation.records, &sources.validation.idx)?);
    if let Some(t) = &sources.test {
        votes.push(rules.votes(&t.records, &t.idx)?);
    }
    let g_val = gold(&splits.validation.0, &labels, &splits.validation.1)?;
    let g_test = splits
        .test
        .as_ref()
        .map(|(ex, p)| gold(ex, &labels, p))
        .transpose()?;
    let fallback = match &w.fallback {
        Some(f) => Some(
            labels
                .id(&LabelValue::Str(f.clone()))
                .map_err(|_| Error::Config {
                    path: plan.config_path.clone(),
                    msg: format!(
                        "`weak.fallback`: `{f}` is not a label (labels: {:?})",
                        labels.id2label()
                    ),
                })?,
        ),
        None => {
            let mut n = vec![0usize; labels.len()];
            for &g in &g_val {
                n[g] += 1;
            }
            (0..n.len()).max_by_key(|&i| (n[i], std::cmp::Reverse(i)))
        }
    };
    let lm = aggregator(plan, w, &rules, &labels)?;
    let mut analysis = vec![weak::analyse(
        "train", &rules, &votes[0], None, lm, fallback,
    )?];
    analysis.push(weak::analyse(
        "validation",
        &rules,
        &votes[1],
        Some(&g_val),
        lm,
        fallback,
    )?);
    if let (Some(v), Some(g)) = (votes.get(2), g_test.as_deref()) {
        analysis.push(weak::analyse("test", &rules, v, Some(g), lm, fallback)?);
    }
    let train_labels = weak::aggregate(&votes[0], &rules.rules, labels.len(), lm);
    on(Event::Info(format!(
        "weak: rules applied to {} rows in {:.1} s; the label model ({:?}) labels {} of {} training rows",
        votes.iter().map(|v| v.len()).sum::<usize>(),
        t0.elapsed().as_secs_f64(),
        lm.model,
        train_labels.iter().filter(|l| l.is_some()).count(),
        train_labels.len()
    )));
    Ok(WeakData {
        splits,
        labels,
        rules,
        votes,
        train_labels,
        analysis,
    })
}

/// The label model of `[weak]` with its parameters.
fn aggregator(
    plan: &Plan,
    w: &crate::config::WeakSection,
    rules: &RuleSet,
    labels: &LabelMap,
) -> Result<weak::Aggregator> {
    let cfg = |msg: String| Error::Config {
        path: plan.config_path.clone(),
        msg,
    };
    if w.label_model != weak::LabelModel::Score {
        if w.score_label.is_some() || w.score_at_least.is_some() || w.score_at_most.is_some() {
            return Err(cfg("`weak.score_*` are for label_model = \"score\"".into()));
        }
        return Ok(w.label_model.into());
    }
    if labels.len() != 2 {
        return Err(cfg(format!(
            "`weak.label_model` = \"score\" is for two labels; the data has {:?}",
            labels.id2label()
        )));
    }
    let name = w
        .score_label
        .clone()
        .or_else(|| {
            w.spamassassin
                .as_ref()
                .map(|s| s.spam.clone().unwrap_or_else(|| "spam".into()))
        })
        .ok_or_else(|| cfg("`weak.score_label`: which label do positive weights vote?".into()))?;
    let label = labels.id(&LabelValue::Str(name.clone())).map_err(|_| {
        cfg(format!(
            "`weak.score_label`: `{name}` is not a label (labels: {:?})",
            labels.id2label()
        ))
    })?;
    let at_least = w.score_at_least.or(rules.required_score).unwrap_or(5.0);
    let at_most = w.score_at_most.unwrap_or(0.0);
    if !(at_most < at_least) {
        return Err(cfg(format!(
            "`weak.score_at_most` ({at_most}) must be below `weak.score_at_least` ({at_least})"
        )));
    }
    Ok(weak::Aggregator {
        model: weak::LabelModel::Score,
        score: Some(weak::ScoreRule {
            label,
            at_least,
            at_most,
        }),
    })
}

impl WeakData {
    /// The analysis as JSON (what `analysis.json` holds).
    pub fn to_json(&self, plan: &Plan) -> serde_json::Value {
        let w = plan.config.weak.as_ref();
        serde_json::json!({
            "labels": self.labels.id2label(),
            "label_model": w.map(|w| w.label_model),
            "rules": self.rules.rules.len(),
            "rule_files": w.map(|w| &w.rules),
            "spamassassin_files": self.rules.cf_files,
            "skipped": self.rules.skipped,
            "splits": self.analysis,
        })
    }

    /// The printed table.
    pub fn render(&self) -> String {
        weak::render(&self.analysis, &self.rules, 40)
    }

    /// Save `analysis.json` and `analysis.txt` into `dir`.
    pub fn save(&self, plan: &Plan, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(&self.to_json(plan))
            .map_err(|e| Error::msg(e.to_string()))?;
        fsutil::write_atomic(&dir.join("analysis.json"), json.as_bytes())?;
        fsutil::write_atomic(&dir.join("analysis.txt"), self.render().as_bytes())
    }
}

/// Train as `plan` says with `task.weak` set.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let w = c
        .weak
        .as_ref()
        .ok_or_else(|| Error::msg("task.weak needs [weak]"))?;
    let data = prepare(plan, on)?;
    let n_labels = data.labels.len();
    let (cl, model) = classify::load_classifier(plan, TaskKind::Classification, n_labels, on)?;
    let (tok, store) = (&cl.tok, &cl.store);

    // ---- encoded sets: every training row, the covered ones, validation, test
    let (ids, types) = classify::tokenise(tok, &data.splits.train.0)?;
    let covered: Vec<usize> = (0..ids.len())
        .filter(|&i| data.train_labels[i].is_some())
        .collect();
    if covered.is_empty() {
        return Err(Error::Data(format!(
            "{}: the rules label none of the {} training rows: nothing to train stage 1 on",
            data.splits.train.1.display(),
            ids.len()
        )));
    }
    let stage1_set = Encoded {
        ids: covered.iter().map(|&i| ids[i].clone()).collect(),
        types: covered.iter().map(|&i| types[i].clone()).collect(),
        targets: Targets::Classes(
            covered
                .iter()
                .map(|&i| data.train_labels[i].unwrap_or(0) as u32)
                .collect(),
        ),
    };
    let all_set = Encoded {
        ids,
        types,
        targets: Targets::Classes(vec![0; data.splits.train.0.len()]),
    };
    let enc = |(ex, p): &(Vec<RawExample>, PathBuf)| {
        classify::encode(&tok, ex, TaskKind::Classification, Some(&data.labels), p)
    };
    let val_set = enc(&data.splits.validation)?;
    let test_set = data.splits.test.as_ref().map(enc).transpose()?;
    on(Event::Info(format!(
        "data: {} train rows ({} labelled by the rules) / {} validation / {} test",
        all_set.len(),
        stage1_set.len(),
        val_set.len(),
        test_set.as_ref().map_or(0, |t| t.len())
    )));
    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    data.save(plan, &opts.run_dir.join("weak"))?;
    on(Event::Info(format!(
        "weak: rule analysis in {}\n{}",
        opts.run_dir.join("weak").join("analysis.txt").display(),
        data.render()
    )));
    let train_lines: Vec<usize> = data.splits.train.0.iter().map(|e| e.line).collect();
    let saver = |dir: &Path| cl.saver(dir, Some(data.labels.clone()));
    let eval_bs = c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2);
    let stage1 = |dir: &Path, run1: &RunWriter, opts1: &TrainOptions, on: &mut dyn FnMut(Event)| {
        let obj = Classify {
            model: &model,
            train: &stage1_set,
            train_lines: covered.iter().map(|&i| train_lines[i]).collect(),
            train_path: data.splits.train.1.clone(),
            validation: &val_set,
            test: test_set.as_ref(),
            pad_id: tok.pad_id(),
            eval_bs,
            saver: saver(dir),
        };
        run_loop(plan, opts1, store, &obj, run1, t0, on)
    };
    if c.task.weak == WeakMode::Stage1 {
        return stage1(&opts.run_dir, &run, opts, on);
    }

    // ---- stage 1 in <run>/stage1/, unless a resumed run finished it
    let dir1 = opts.run_dir.join("stage1");
    let done1 = opts.resume && dir1.join("results.json").is_file();
    if done1 {
        let best = best_checkpoint(&dir1)?;
        let f = best.join(checkpoint::WEIGHTS_FILE);
        checkpoint::restore_weights(store, &checkpoint::read_tensors(&f)?, &f)?;
        on(Event::Info(format!(
            "stage 1: finished; its best weights from {}",
            best.display()
        )));
    } else {
        on(Event::Info(format!(
            "stage 1: {} rows labelled by the rules, in {}",
            stage1_set.len(),
            dir1.display()
        )));
        let resume1 = opts.resume && !checkpoint::list(&dir1)?.is_empty();
        let opts1 = TrainOptions {
            run_dir: dir1.clone(),
            stop: opts.stop.clone(),
            resume: resume1,
        };
        let run1 = RunWriter::create(&dir1, plan, resume1)?;
        let mut rep = stage1(&dir1, &run1, &opts1, on)?;
        if rep.interrupted {
            rep.run_dir = opts.run_dir.clone();
            return Ok(rep);
        }
    }

    // ---- stage 2: self-training over every row
    let mut plan2 = plan.clone();
    plan2.config.train.max_steps = Some(w.steps.max(1));
    if let Some(lr) = w.lr {
        plan2.config.train.lr = lr;
    }
    let total = w.steps.max(1);
    let mut fp = Fingerprint::new();
    for (a, b) in all_set.ids.iter().zip(&all_set.types) {
        fp.u32s(a);
        fp.u32s(b);
    }
    let mut tr = Trainer::new(&plan2, store, &run, total, all_set.len(), fp.finish(), t0)?;
    let obj_eval = Classify {
        model: &model,
        train: &all_set,
        train_lines: train_lines.clone(),
        train_path: data.splits.train.1.clone(),
        validation: &val_set,
        test: test_set.as_ref(),
        pad_id: tok.pad_id(),
        eval_bs,
        saver: saver(&opts.run_dir),
    };
    let save_best = |s: &ParamStore| crate::train::Objective::save(&obj_eval, s);
    let validate =
        |tr: &mut Trainer, on: &mut dyn FnMut(Event)| -> Result<crate::train::EvalOutcome> {
            let m = crate::train::Objective::evaluate(&obj_eval, Split::Validation)?
                .ok_or_else(|| Error::msg("no validation set"))?;
            tr.record_validation(m, &save_best, on)
        };
    if opts.resume && !checkpoint::list(&opts.run_dir)?.is_empty() {
        tr.resume(on)?;
    } else {
        run.truncate_metrics(0)?;
        if let Some(m) = stage1_test(&dir1)? {
            run.log_eval(0, "test_stage1", &m)?;
        }
        validate(&mut tr, on)?;
        tr.save_checkpoint()?;
    }
    on(Event::Start {
        total_steps: total,
        step: tr.state.step,
    });
    let t3 = w.teacher_update;
    let per_step = c.train.batch_size * c.train.grad_accum;
    let teacher_dir = opts.run_dir.join("teacher");
    let mut teacher: Option<(usize, math::TeacherTargets)> = None;
    let (mut interrupted, mut stopped) = (false, tr.early_stopped());
    let mut stats: Vec<[f64; 3]> = Vec::new();
    while !stopped && !tr.done() {
        if opts.stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step = tr.state.step;
        let period = step / t3;
        if teacher.as_ref().map(|t| t.0) != Some(period) {
            let probs = teacher_probs(
                &teacher_dir,
                period,
                step,
                &model,
                &all_set,
                tok.pad_id(),
                eval_bs,
            )?;
            let tt = math::teacher_targets(&probs, w.threshold);
            let mean_w =
                tt.weights.iter().map(|&x| x as f64).sum::<f64>() / tt.weights.len().max(1) as f64;
            on(Event::Info(format!(
                "teacher at step {step} (period {period}): {} of {} rows kept (weight > {}), mean weight {mean_w:.3}",
                tt.kept.len(),
                tt.weights.len(),
                w.threshold
            )));
            teacher = Some((period, tt));
        }
        let tt = &teacher.as_ref().expect("set above").1;
        if tt.kept.is_empty() {
            on(Event::Info(format!(
                "stage 2 stops at step {step}: every row's confidence weight is at most {}",
                w.threshold
            )));
            break;
        }
        // This step's rows: positions (step - period*T3)*per_step.. of the
        // period's seeded orders of the kept rows.
        let kn = tt.kept.len();
        let within = step - period * t3;
        let mut order: Option<(usize, Vec<usize>)> = None;
        let mut ks = Vec::with_capacity(per_step);
        for j in 0..per_step {
            let pos = within * per_step + j;
            let cycle = pos / kn;
            if order.as_ref().is_none_or(|o| o.0 != cycle) {
                let o = EpochOrder::new(
                    kn,
                    c.seeds.data ^ 0xC051_4E00,
                    ((period as u64) << 24) | cycle as u64,
                );
                order = Some((cycle, o.indices));
            }
            ks.push(order.as_ref().expect("set above").1[pos % kn]);
        }
        let micros: Vec<&[usize]> = ks.chunks(c.train.batch_size).collect();
        let n_micro = micros.len();
        let mut step_stats = [0f64; 3];
        tr.step(
            n_micro,
            &mut |i, drop| {
                let mk = micros[i];
                let rows: Vec<usize> = mk.iter().map(|&k| tt.kept[k]).collect();
                let soft: Vec<Vec<f32>> = mk.iter().map(|&k| tt.soft[k].clone()).collect();
                let wts: Vec<f32> = rows.iter().map(|&r| tt.weights[r]).collect();
                let pseudo: Vec<usize> = soft.iter().map(|s| classify::argmax(s)).collect();
                let (inputs, _, ntok) = all_set.batch(&rows, tok.pad_id())?;
                let (feat, logits) = model.forward_features(&inputs, Some(drop))?;
                let ld = math::distill_loss(&logits, &soft, &wts)?;
                let lc = math::confidence_reg(&logits)?;
                let lr = math::contrastive_reg(&feat, &pseudo, w.margin)?;
                let share = mk.len() as f64 / ks.len() as f64;
                for (k, t) in [&ld, &lc, &lr].iter().enumerate() {
                    step_stats[k] += share * t.to_scalar::<f32>()? as f64;
                }
                let loss = ((ld + (lc * w.lambda)?)? + (lr * w.mu)?)?;
                Ok((loss, share, ntok))
            },
            &|| {
                let rows: Vec<usize> = ks.iter().map(|&k| train_lines[tt.kept[k]]).collect();
                format!("{} lines {rows:?}", data.splits.train.1.display())
            },
            on,
        )?;
        stats.push(step_stats);
        let t = &c.train;
        if tr.state.step % t.log_every == 0 || tr.done() {
            let n = stats.len().max(1) as f64;
            let mean = |k: usize| stats.iter().map(|s| s[k]).sum::<f64>() / n;
            let m: BTreeMap<String, f64> = [
                ("distill", mean(0)),
                ("confidence_reg", mean(1)),
                ("contrastive_reg", mean(2)),
                ("kept_share", kn as f64 / all_set.len() as f64),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            run.log_eval(tr.state.step, "train", &m)?;
            stats.clear();
        }
        let mut evaluated = None;
        if t.eval_every.is_some_and(|e| tr.state.step % e == 0) || tr.done() {
            evaluated = Some(validate(&mut tr, on)?);
        }
        let outcome = evaluated.unwrap_or_default();
        if outcome.improved || tr.checkpoint_due(evaluated.is_some()) {
            tr.save_checkpoint()?;
        }
        stopped = outcome.stop;
    }
    if interrupted {
        tr.save_interrupted(on)?;
        return tr.finish(true, false, None, on);
    }
    if tr.state.last_eval_step != Some(tr.state.step) {
        let _ = validate(&mut tr, on)?;
        if !tr.saved_now() {
            tr.save_checkpoint()?;
        }
    }
    tr.restore_best()?;
    let mut test = None;
    if let Some(m) = crate::train::Objective::evaluate(&obj_eval, Split::Test)? {
        tr.record_test("test", &m, on)?;
        test = Some(m);
    }
    tr.finish(false, stopped, test, on)
}

/// The checkpoint of a finished run's best step.
fn best_checkpoint(dir: &Path) -> Result<PathBuf> {
    let f = dir.join("results.json");
    let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&f, e.to_string()))?;
    let step = v["best_step"]
        .as_u64()
        .ok_or_else(|| Error::file(&f, "no `best_step`: stage 1 never evaluated"))?;
    let p = checkpoint::path(dir, step as usize);
    if !p.join(checkpoint::WEIGHTS_FILE).is_file() {
        return Err(Error::file(&p, "stage 1's best checkpoint is missing"));
    }
    Ok(p)
}

/// Stage 1's test metrics (from its results.json), if it has them.
fn stage1_test(dir: &Path) -> Result<Option<BTreeMap<String, f64>>> {
    let f = dir.join("results.json");
    if !f.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&f, e.to_string()))?;
    Ok(serde_json::from_value(v["test"].clone()).ok())
}

/// The teacher's class probabilities over every training row for
/// `period`: read back from `<dir>/period-<k>.json` when a (resumed) run
/// computed them already, else computed with the current weights (no
/// dropout) and saved.
fn teacher_probs(
    dir: &Path,
    period: usize,
    step: usize,
    model: &SequenceModel,
    set: &Encoded,
    pad: u32,
    bs: usize,
) -> Result<Vec<Vec<f32>>> {
    let f = dir.join(format!("period-{period}.json"));
    if f.is_file() {
        let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
        let v: TeacherFile =
            serde_json::from_str(&text).map_err(|e| Error::file(&f, e.to_string()))?;
        if v.probs.len() != set.len() {
            return Err(Error::file(
                &f,
                format!("{} rows, the training set has {}", v.probs.len(), set.len()),
            ));
        }
        return Ok(v.probs);
    }
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.sort_by_key(|&i| set.ids[i].len());
    let mut probs = vec![Vec::new(); set.len()];
    for chunk in order.chunks(bs.max(1)) {
        let (inputs, _, _) = set.batch(chunk, pad)?;
        let logits = model.forward(&inputs, None)?.to_vec2::<f32>()?;
        for (row, &i) in logits.into_iter().zip(chunk) {
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&x| ((x - m) as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            probs[i] = e.iter().map(|&x| (x / s) as f32).collect();
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let body = serde_json::to_string(&TeacherFile {
        period,
        step,
        probs,
    })
    .map_err(|e| Error::msg(e.to_string()))?;
    fsutil::write_atomic(&f, body.as_bytes())?;
    let v: TeacherFile = serde_json::from_str(&body).map_err(|e| Error::file(&f, e.to_string()))?;
    // What a resumed run reads back: the same numbers.
    Ok(v.probs)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TeacherFile {
    period: usize,
    step: usize,
    probs: Vec<Vec<f32>>,
}
