//! Resumable checkpoints: everything the loop needs to continue a run
//! exactly where it stopped, as transformers' `checkpoint-<step>/` folders.
//!
//! ```text
//! runs/<name>/checkpoint-<step>/
//!   trainer_state.json       step, epoch and batch position, best metric,
//!                            early-stopping count, loss window, skipped
//!                            batches, seeds, metrics.jsonl length, data
//!                            fingerprint
//!   trainable.safetensors    every trainable tensor and buffer (batch norm's
//!                            running statistics) (f32, the ParamStore's names)
//!   optimizer.safetensors    AdamW moments: `<name>.exp_avg`, `<name>.exp_avg_sq`
//! ```
//!
//! Frozen weights are not copied: they come from the base model, which the
//! run config names. The random streams of a run are counter-based (data
//! order: ChaCha8 from `seeds.data` and the epoch; dropout: a hash of
//! `seeds.dropout`, the step and the element), so the step and the epoch
//! position *are* their states: nothing else has to be saved for the run to
//! draw the same batches and the same dropout masks after a resume.
//!
//! A checkpoint folder is assembled under a temporary name and swapped in
//! whole ([`crate::fsutil::write_dir_atomic`]); a run killed at any moment
//! leaves complete checkpoints only. Old ones are rotated out
//! (`train.save_total_limit`), never the best.

use crate::nn::Weight;
use crate::optim::AdamW;
use crate::params::ParamStore;
use crate::{fsutil, Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const WEIGHTS_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PREFIX: &str = "checkpoint-";
/// Bumped when the state's meaning changes; older checkpoints are refused.
pub const FORMAT: u32 = 1;

/// The best evaluation so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Best {
    pub value: f64,
    pub step: usize,
    pub metrics: BTreeMap<String, f64>,
}

/// A batch the non-finite guard dropped (`train.on_non_finite = "skip"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Skipped {
    /// The optimizer step the batch was for (1-based).
    pub step: usize,
    pub reason: String,
    /// Where its rows come from (file lines, or row indices).
    pub rows: String,
}

/// The loop's whole state between two optimizer steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub format: u32,
    /// Optimizer steps done (skipped batches count: they consume a step).
    pub step: usize,
    pub total_steps: usize,
    /// The epoch the next batch comes from, and how many of its
    /// optimizer-step groups of micro-batches are already used.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// AdamW's own step count (steps minus skipped ones).
    pub optimizer_step: u64,
    pub best: Option<Best>,
    /// Evaluations without improvement, for early stopping.
    pub bad_evals: usize,
    pub last_eval_step: Option<usize>,
    /// Loss sum and step count since the last logged line.
    pub loss_window: (f64, usize),
    pub skipped: Vec<Skipped>,
    /// Bytes of metrics.jsonl that belong to the steps done: a resume cuts
    /// the file back to this length before it logs again.
    pub metrics_len: u64,
    pub seeds: SeedState,
    /// Rayon threads of the process that wrote it: bit-identical resume
    /// needs the same count.
    pub threads: usize,
    pub train_rows: usize,
    /// sha256 of the tokenised training rows and targets: the data order
    /// and position mean nothing on other data.
    pub data_fingerprint: String,
    /// A method's own loop state (PPO's adaptive KL coefficient).
    #[serde(default)]
    pub method: std::collections::BTreeMap<String, f64>,
}

/// The random streams and where they stand.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeedState {
    pub init: u64,
    /// Data order: ChaCha8 from this seed and the epoch (see `epoch`).
    pub data: u64,
    /// Dropout: keyed by this seed and the step (see `step`).
    pub dropout: u64,
}

fn dir_step(name: &str) -> Option<usize> {
    let n = name.strip_prefix(PREFIX)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The checkpoint folder of `step` in `run_dir`.
pub fn path(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step}"))
}

/// `(step, folder)` of every checkpoint in `run_dir` (folders named
/// `checkpoint-<step>` holding a state file), oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(run_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(run_dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = dir_step(&name) {
            if e.path().join(STATE_FILE).is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Refuse to write weights that hold a NaN or an Inf.
pub fn check_finite(store: &ParamStore, what: &str) -> Result<()> {
    for (name, w) in store.trainable() {
        if let Some(bad) = first_non_finite(&w)? {
            return Err(Error::NonFinite(format!(
                "parameter `{name}` holds {bad}: not writing {what}"
            )));
        }
    }
    Ok(())
}

fn first_non_finite(w: &Weight) -> Result<Option<f32>> {
    let v =
        w.t.flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
    Ok(v.into_iter().find(|x| !x.is_finite()))
}

/// Write `checkpoint-<state.step>/` (replacing one of the same step).
pub fn save(
    run_dir: &Path,
    state: &TrainerState,
    store: &ParamStore,
    opt: &AdamW,
) -> Result<PathBuf> {
    let dir = path(run_dir, state.step);
    check_finite(store, &format!("{}", dir.display()))?;
    let weights: Vec<(String, Tensor)> = store
        .training_state()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<_>>()?;
    let mut moments = Vec::new();
    for (n, m, v) in opt.state()? {
        moments.push((format!("{n}.exp_avg"), m));
        moments.push((format!("{n}.exp_avg_sq"), v));
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::msg(e.to_string()))?;
    fsutil::write_dir_atomic(&dir, |tmp| {
        crate::hub::checkpoint::write_safetensors(&tmp.join(WEIGHTS_FILE), weights.into_iter())?;
        crate::hub::checkpoint::write_safetensors(&tmp.join(OPTIMIZER_FILE), moments.into_iter())?;
        fsutil::write_atomic(&tmp.join(STATE_FILE), &json)
    })?;
    Ok(dir)
}

/// Remove all but the last `keep` checkpoints, never `protect` (the best).
/// A folder is renamed aside before it is deleted, so a kill in the middle
/// leaves no half-deleted checkpoint that looks whole.
pub fn rotate(run_dir: &Path, keep: usize, protect: Option<usize>) -> Result<Vec<usize>> {
    let all = list(run_dir)?;
    let n = all.len();
    let mut removed = Vec::new();
    for (i, (step, dir)) in all.into_iter().enumerate() {
        if i + keep >= n || Some(step) == protect {
            continue;
        }
        let aside = run_dir.join(format!(".{PREFIX}{step}.old.{}", std::process::id()));
        std::fs::rename(&dir, &aside).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
        removed.push(step);
    }
    Ok(removed)
}

/// A checkpoint read back.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, (Tensor, Tensor)>,
}

/// Every tensor of a safetensors file, read by afinar's checked reader
/// (a truncated or corrupt file is an error naming the file and tensor).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::file(path, "missing from the checkpoint"));
    }
    let ck = crate::hub::checkpoint::Checkpoint::open(path)?;
    ck.names()
        .into_iter()
        .map(|n| {
            let t = ck.load_f32(&n)?;
            Ok((n, t))
        })
        .collect()
}

/// Read the state file alone.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("not JSON: {e}")))?;
    match v["format"].as_u64() {
        Some(f) if f == FORMAT as u64 => {}
        Some(f) => {
            return Err(Error::file(
                &p,
                format!("checkpoint format {f}; this afinar reads format {FORMAT}"),
            ))
        }
        None => {
            return Err(Error::file(
                &p,
                "no `format` number: not an afinar checkpoint state",
            ))
        }
    }
    serde_json::from_value(v).map_err(|e| Error::file(&p, e.to_string()))
}

/// Read a whole checkpoint folder.
pub fn load(dir: &Path) -> Result<Loaded> {
    let state = read_state(dir)?;
    let weights = read_tensors(&dir.join(WEIGHTS_FILE))?;
    let moments = read_tensors(&dir.join(OPTIMIZER_FILE))?;
    let mut optimizer = HashMap::new();
    for (k, m) in &moments {
        if let Some(n) = k.strip_suffix(".exp_avg") {
            let vk = format!("{n}.exp_avg_sq");
            let v = moments.get(&vk).ok_or_else(|| Error::Tensor {
                name: vk.clone(),
                msg: format!("missing from {}", dir.join(OPTIMIZER_FILE).display()),
            })?;
            optimizer.insert(n.to_string(), (m.clone(), v.clone()));
        }
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        weights,
        optimizer,
    })
}

/// Put checkpointed values into the trainable parameters of `store`: every
/// trainable tensor must be there with its shape, and nothing else.
pub fn restore_weights(
    store: &ParamStore,
    weights: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let trainable = store.training_state();
    let mut values = BTreeMap::new();
    for (name, w) in &trainable {
        let t = weights.get(name).ok_or_else(|| Error::Tensor {
            name: name.clone(),
            msg: format!(
                "trainable here but missing from {}: the checkpoint was written by another config",
                file.display()
            ),
        })?;
        if t.dims() != w.dims() {
            return Err(Error::Tensor {
                name: name.clone(),
                msg: format!(
                    "shape {:?} in {}, the model has {:?}",
                    t.dims(),
                    file.display(),
                    w.dims()
                ),
            });
        }
        values.insert(name.clone(), t.to_dtype(w.dtype())?.to_device(w.device())?);
    }
    if let Some(extra) = weights.keys().find(|k| !values.contains_key(*k)) {
        return Err(Error::Tensor {
            name: extra.clone(),
            msg: format!(
                "in {} but not trainable in this run: the checkpoint was written by another config",
                file.display()
            ),
        });
    }
    store.copy_values_from(&values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainerState {
        TrainerState {
            format: FORMAT,
            step,
            total_steps: 10,
            epoch: 0,
            batch_in_epoch: step,
            optimizer_step: step as u64,
            best: None,
            bad_evals: 0,
            last_eval_step: None,
            loss_window: (0.1 + 0.2, 2),
            skipped: vec![],
            metrics_len: 0,
            seeds: SeedState {
                init: 1,
                data: 2,
                dropout: 3,
            },
            threads: 1,
            train_rows: 4,
            data_fingerprint: "x".into(),
            method: [("kl_coef".to_string(), 0.05)].into(),
        }
    }

    #[test]
    fn save_load_rotate_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let mut store = ParamStore::new(crate::params::Selector::all(), "test");
        let w0 = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &candle_core::Device::Cpu).unwrap();
        store.insert_trainable("a.weight", w0.clone()).unwrap();
        let w = store.get("a.weight", &[2, 2]).unwrap();
        w.grad.as_ref().unwrap().add(&[0.5, -1.0, 2.0, 0.0]);
        let mut opt = AdamW::new(store.trainable(), Default::default()).unwrap();
        opt.step(0.1, 1.0).unwrap();
        let mut st = state(3);
        st.best = Some(Best {
            value: 0.1 + 0.2,
            step: 3,
            metrics: [("loss".to_string(), 1.0 / 3.0)].into(),
        });
        save(d.path(), &st, &store, &opt).unwrap();
        let ck = load(&path(d.path(), 3)).unwrap();
        assert_eq!(ck.state, st, "f64s survive JSON bit for bit");
        // The values round-trip into a fresh store and optimizer.
        let mut store2 = ParamStore::new(crate::params::Selector::all(), "test");
        store2.insert_trainable("a.weight", w0).unwrap();
        let _ = store2.get("a.weight", &[2, 2]).unwrap();
        restore_weights(&store2, &ck.weights, &ck.dir).unwrap();
        let a = store.trainable()[0]
            .1
            .t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = store2.trainable()[0]
            .1
            .t
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let mut opt2 = AdamW::new(store2.trainable(), Default::default()).unwrap();
        opt2.load_state(ck.state.optimizer_step, &ck.optimizer)
            .unwrap();
        let (s1, s2) = (opt.state().unwrap(), opt2.state().unwrap());
        for ((_, m1, v1), (_, m2, v2)) in s1.iter().zip(&s2) {
            assert_eq!(
                m1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                m2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            assert_eq!(
                v1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                v2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        assert_eq!(opt2.step, st.optimizer_step);

        // Rotation keeps the last 2 and the protected one.
        for s in [4, 5, 6] {
            save(d.path(), &state(s), &store, &opt).unwrap();
        }
        assert_eq!(rotate(d.path(), 2, Some(3)).unwrap(), vec![4]);
        let left: Vec<usize> = list(d.path()).unwrap().into_iter().map(|x| x.0).collect();
        assert_eq!(left, vec![3, 5, 6]);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            3,
            "nothing left aside"
        );
        // A folder without a state file is not a checkpoint.
        std::fs::create_dir(d.path().join("checkpoint-9")).unwrap();
        assert_eq!(list(d.path()).unwrap().last().unwrap().0, 6);
    }

    #[test]
    fn non_finite_weights_are_never_written() {
        let d = tempfile::tempdir().unwrap();
        let mut store = ParamStore::new(crate::params::Selector::all(), "test");
        let t = Tensor::new(&[1.0f32, f32::NAN], &candle_core::Device::Cpu).unwrap();
        store.insert_trainable("b.bias", t).unwrap();
        let _ = store.get("b.bias", &[2]).unwrap();
        let opt = AdamW::new(store.trainable(), Default::default()).unwrap();
        let e = save(d.path(), &state(1), &store, &opt)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`b.bias` holds NaN"), "{e}");
        assert!(list(d.path()).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn restore_names_missing_and_misshapen_tensors() {
        let mut store = ParamStore::new(crate::params::Selector::all(), "test");
        store
            .insert_trainable(
                "c.weight",
                Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
        let _ = store.get("c.weight", &[2, 3]).unwrap();
        let f = Path::new("ck/trainable.safetensors");
        let e = restore_weights(&store, &HashMap::new(), f)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.weight") && e.contains("missing from ck/trainable.safetensors"),
            "{e}"
        );
        let bad: HashMap<String, Tensor> = [(
            "c.weight".to_string(),
            Tensor::zeros((3, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
        )]
        .into();
        let e = restore_weights(&store, &bad, f).unwrap_err().to_string();
        assert!(e.contains("shape [3, 2]") && e.contains("[2, 3]"), "{e}");
    }
}
