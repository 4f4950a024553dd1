//! Image classification with a CNN (`task.type = "image_classification"`):
//! torchvision's MobileNetV2 from a PyTorch `.pth` state dict (read by
//! `hub::pth`, never unpickled) or an afinar model folder, a new
//! `classifier.1` for the data's classes, trained fully, by stages
//! (`freeze.first_layers`, `features.0-6`) or head only, with the frozen
//! stages' batch norm in eval mode unless `freeze.batch_norm = "train"`.
//!
//! Data: IDX files (+ their label files) or class folders of PNG / JPEG
//! (`data/image.rs`), turned into inputs by `[image]`. The saved `model/`
//! is `model.safetensors` under torchvision's keys (buffers included,
//! `num_batches_tracked` as int64) and a `config.json`:
//! `torchvision.models.mobilenet_v2(num_classes=N).load_state_dict(...)`
//! takes it as it is (scripts/reference/mobilenet_load_saved.py).

use crate::config::{FreezePreset, FrozenBatchNorm, Plan};
use crate::data::image::{self, ImageSet, RawImage, Transform};
use crate::event::Event;
use crate::metrics;
use crate::models::mobilenet_v2::{self as mnv2, FrozenBn, MobileNetV2, MobileNetV2Config};
use crate::nn::DropoutRng;
use crate::params::{FreezeRules, Layout, ParamStore, Preset, Selector};
use crate::train::{run_loop, Fingerprint, Objective, RunWriter, Split, TrainOptions, TrainReport};
use crate::{fsutil, Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The file of a saved model's weights.
pub const WEIGHTS: &str = "model.safetensors";

/// Where the parts of a MobileNetV2 are, for `[freeze]`: the stages
/// `features.0` .. `features.18` are its layers, `classifier` the new head.
pub fn layout() -> Layout {
    Layout {
        prefix: String::new(),
        layers: (0..mnv2::STAGES)
            .map(|i| format!("features.{i}.*"))
            .collect(),
        embeddings: vec![],
        head: vec!["classifier.*".into()],
    }
}

/// The selector of a plan's `[freeze]` on a MobileNetV2.
pub fn selector(plan: &Plan) -> Result<Selector> {
    let f = &plan.config.freeze;
    let rules = FreezeRules {
        preset: match f.preset {
            FreezePreset::HeadOnly => Preset::HeadOnly,
            _ => Preset::Full,
        },
        embeddings: false,
        first_layers: f.first_layers,
        frozen: f.frozen.clone(),
        trainable: f.trainable.clone(),
    };
    Selector::new(&rules, &layout()).map_err(|e| Error::Config {
        path: plan.config_path.clone(),
        msg: format!(
            "`freeze`: {e} (a MobileNetV2 has {} stages, features.0-18)",
            mnv2::STAGES
        ),
    })
}

/// A CNN's tensors as read from its file: parameters and buffers.
pub struct Weights {
    pub tensors: Vec<(String, Tensor)>,
    /// The model folder's `config.json`, if it was a folder.
    pub config: Option<serde_json::Value>,
    pub source: PathBuf,
}

/// Read a MobileNetV2: a `.pth` state dict (weights only, `hub::pth`) or a
/// folder with `model.safetensors` and a `config.json` of `model_type`
/// "mobilenet_v2".
pub fn read_weights(path: &Path) -> Result<Weights> {
    let (tensors, config) = if path.is_dir() {
        let cfg_file = path.join("config.json");
        let raw = crate::hub::config::read_config_value(&cfg_file)?;
        if raw["model_type"].as_str() != Some("mobilenet_v2") {
            return Err(Error::file(
                &cfg_file,
                format!(
                    "`model_type` {} is not an image model (\"mobilenet_v2\")",
                    raw["model_type"]
                ),
            ));
        }
        let ck = crate::hub::checkpoint::Checkpoint::open(path.join(WEIGHTS))?;
        let t = ck
            .names()
            .into_iter()
            .map(|n| {
                // num_batches_tracked is int64 (torch's dtype).
                let t = if n.ends_with(".num_batches_tracked") {
                    ck.load(&n)?.to_dtype(DType::F32)?
                } else {
                    ck.load_f32(&n)?
                };
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        (t, Some(raw))
    } else {
        let t = crate::hub::pth::read(path)?
            .into_iter()
            .map(|(n, t)| {
                let v = t.to_f32();
                Ok((n, Tensor::from_vec(v, t.shape.as_slice(), &Device::Cpu)?))
            })
            .collect::<Result<Vec<_>>>()?;
        (t, None)
    };
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    if !mnv2::looks_like(&names) {
        return Err(Error::file(
            path,
            format!(
                "is not a torchvision MobileNetV2 state dict (no features.0.0.weight / \
                 features.18.0.weight among its {} tensors, e.g. {:?})",
                names.len(),
                names.iter().take(3).collect::<Vec<_>>()
            ),
        ));
    }
    Ok(Weights {
        tensors,
        config,
        source: path.to_path_buf(),
    })
}

/// A MobileNetV2 over a store, with `num_classes` outputs: the file's
/// tensors (trainable as `sel` says), a new `classifier.1` when the file's
/// has another number of classes (torchvision's init: N(0, 0.01), zero
/// bias, from `init_seed`).
pub fn build(
    w: Weights,
    sel: Selector,
    num_classes: usize,
    bn: FrozenBn,
    init_seed: u64,
    on: &mut dyn FnMut(Event),
) -> Result<(ParamStore, MobileNetV2)> {
    let mut store = ParamStore::new(sel, w.source.display().to_string());
    for (n, t) in w.tensors {
        if mnv2::is_buffer(&n) {
            store.insert_buffer(&n, t)?;
        } else {
            store.insert(&n, t)?;
        }
    }
    let last = store
        .dims("features.18.0.weight")
        .map(|d| d[0])
        .unwrap_or_default();
    match store.dims("classifier.1.weight") {
        Some(d) if d == [num_classes, last] => {}
        old => {
            if let Some(d) = old {
                on(Event::Info(format!(
                    "classifier.1 {d:?} of {} replaced by a new head of {num_classes} classes",
                    w.source.display()
                )));
            }
            store.remove("classifier.1.weight");
            store.remove("classifier.1.bias");
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(init_seed);
            let wt = crate::params::normal_init(&[num_classes, last], 0.01, &mut rng)?;
            store.insert("classifier.1.weight", wt)?;
            store.insert(
                "classifier.1.bias",
                Tensor::zeros(num_classes, DType::F32, &Device::Cpu)?,
            )?;
        }
    }
    let dims = |n: &str| store.dims(n);
    let mut cfg = mnv2::config_of(&dims, num_classes, &store.source)?;
    if let Some(raw) = &w.config {
        if let Some(d) = raw["dropout"].as_f64() {
            cfg.dropout = d as f32;
        }
    }
    let model = MobileNetV2::load(&store, &cfg, bn)?;
    let unused = store.unused();
    if !unused.is_empty() {
        return Err(Error::Tensor {
            name: unused[0].clone(),
            msg: format!(
                "in {} but not part of a torchvision MobileNetV2 ({} such tensors)",
                store.source,
                unused.len()
            ),
        });
    }
    Ok((store, model))
}

/// The start-up line's batch-norm part: how many layers keep their statistics.
pub fn bn_summary(model: &MobileNetV2) -> String {
    let bns = model.batch_norms();
    let frozen = bns.iter().filter(|b| b.frozen_stats()).count();
    format!(
        "batch norm: {frozen} of {} layers frozen (running statistics), {} take batch statistics in training",
        bns.len(),
        bns.len() - frozen
    )
}

/// A path of the data section: a file or folder, or `asset:NAME[/sub]`.
fn resolve(spec: &str) -> Result<PathBuf> {
    let p = match spec.strip_prefix("asset:") {
        Some(rest) => {
            let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
            crate::hub::assets::resolve_asset_path(name)?.join(sub)
        }
        None => PathBuf::from(spec),
    };
    if !p.exists() {
        return Err(Error::file(&p, "image data file or folder does not exist"));
    }
    Ok(p)
}

/// An image set: a folder of class folders, or an IDX image file and its
/// label file. `classes`: the training set's (other sets must use them).
pub fn read_set(
    spec: &str,
    labels: Option<&str>,
    key: &str,
    names: Option<&[String]>,
    classes: Option<&[String]>,
    config: &Path,
) -> Result<ImageSet> {
    let p = resolve(spec)?;
    if p.is_dir() {
        if labels.is_some() {
            return Err(Error::Config {
                path: config.to_path_buf(),
                msg: format!("`data.{key}_labels`: `data.{key}` is a folder of class folders, which labels its images"),
            });
        }
        return image::read_folder(&p, classes.or(names));
    }
    let Some(l) = labels else {
        return Err(Error::Config {
            path: config.to_path_buf(),
            msg: format!(
                "`data.{key}_labels`: `data.{key}` = \"{spec}\" is a file (IDX images): give its label file"
            ),
        });
    };
    let set = image::read_idx(&p, &resolve(l)?, names.or(classes))?;
    if let Some(c) = classes {
        if set.classes.len() > c.len() {
            return Err(Error::file(
                &p,
                format!(
                    "has labels up to {}, the training set {} classes",
                    set.classes.len() - 1,
                    c.len()
                ),
            ));
        }
    }
    Ok(set)
}

/// The three sets of a plan.
pub struct ImageSplits {
    pub train: ImageSet,
    pub validation: ImageSet,
    pub test: Option<ImageSet>,
}

pub fn load_splits(plan: &Plan) -> Result<ImageSplits> {
    let d = &plan.config.data;
    let cp = &plan.config_path;
    let names = d.label_names.as_deref();
    let all = read_set(
        &d.train,
        d.train_labels.as_deref(),
        "train",
        names,
        None,
        cp,
    )?;
    let classes = all.classes.clone();
    let base = crate::data::sample_rows(all.len(), d.max_rows, d.split_seed);
    let (train, mut validation, mut test) = match d.split {
        Some(r) => {
            let s = crate::data::seeded_split(base.len(), r, d.split_seed)?;
            let part =
                |ix: Vec<usize>| all.select(&ix.into_iter().map(|i| base[i]).collect::<Vec<_>>());
            (part(s.train), Some(part(s.validation)), Some(part(s.test)))
        }
        None => (all.select(&base), None, None),
    };
    if let Some(v) = &d.validation {
        validation = Some(read_set(
            v,
            d.validation_labels.as_deref(),
            "validation",
            names,
            Some(&classes),
            cp,
        )?);
    }
    if let Some(t) = &d.test {
        test = Some(read_set(
            t,
            d.test_labels.as_deref(),
            "test",
            names,
            Some(&classes),
            cp,
        )?);
    }
    if train.is_empty() {
        return Err(Error::Data(format!(
            "{}: the training split is empty",
            all.path.display()
        )));
    }
    let validation = validation.filter(|v| !v.is_empty()).ok_or_else(|| {
        Error::Data(format!(
            "{}: the validation split is empty",
            all.path.display()
        ))
    })?;
    Ok(ImageSplits {
        train,
        validation,
        test: test.filter(|t| !t.is_empty()),
    })
}

/// Evaluate on a set: loss, accuracy, macro-F1, and every row's logits.
pub fn evaluate(
    model: &MobileNetV2,
    set: &ImageSet,
    tf: &Transform,
    batch_size: usize,
) -> Result<(BTreeMap<String, f64>, Vec<Vec<f32>>)> {
    let mut logits_all = Vec::with_capacity(set.len());
    let mut loss_sum = 0f64;
    let idx: Vec<usize> = (0..set.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let x = inputs(set, chunk, tf, None)?;
        let logits = model.forward(&x, None)?;
        let t = targets(set, chunk)?;
        loss_sum +=
            crate::nn::cross_entropy(&logits, &t)?.to_vec0::<f32>()? as f64 * chunk.len() as f64;
        logits_all.extend(logits.to_vec2::<f32>()?);
    }
    let pred: Vec<usize> = logits_all
        .iter()
        .map(|r| super::classify::argmax(r))
        .collect();
    let gold: Vec<usize> = set.labels.iter().map(|&g| g as usize).collect();
    let mut m = BTreeMap::new();
    m.insert("loss".to_string(), loss_sum / set.len().max(1) as f64);
    m.insert("accuracy".into(), metrics::accuracy(&pred, &gold)?);
    m.insert(
        "macro_f1".into(),
        metrics::macro_f1(&pred, &gold, model.cfg.num_classes)?,
    );
    Ok((m, logits_all))
}

/// The model inputs `[B, size, size, 3]` of rows `idx`.
fn inputs(set: &ImageSet, idx: &[usize], tf: &Transform, aug: Option<&[u64]>) -> Result<Tensor> {
    let imgs: Vec<&RawImage> = idx.iter().map(|&i| &set.images[i]).collect();
    batch_tensor(tf, &imgs, aug)
}

/// `images` as model inputs `[B, size, size, 3]`.
fn batch_tensor(tf: &Transform, images: &[&RawImage], aug: Option<&[u64]>) -> Result<Tensor> {
    let s = tf.size;
    Ok(Tensor::from_vec(
        tf.batch(images, aug),
        (images.len(), s, s, 3),
        &Device::Cpu,
    )?)
}

fn targets(set: &ImageSet, idx: &[usize]) -> Result<Tensor> {
    let t: Vec<u32> = idx.iter().map(|&i| set.labels[i]).collect();
    Ok(Tensor::from_vec(t, idx.len(), &Device::Cpu)?)
}

/// What a run saves as `model/`.
pub struct Saver {
    pub dir: PathBuf,
    pub cfg: MobileNetV2Config,
    pub classes: Vec<String>,
    pub tf: Transform,
}

impl Saver {
    pub fn config_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.cfg).unwrap_or_default();
        let id2label: BTreeMap<String, String> = self
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c.clone()))
            .collect();
        let label2id: BTreeMap<String, usize> = self
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        v["architectures"] = serde_json::json!(["MobileNetV2"]);
        v["id2label"] = serde_json::json!(id2label);
        v["label2id"] = serde_json::json!(label2id);
        v["image_size"] = serde_json::json!(self.tf.size);
        v["image_mean"] = serde_json::json!(self.tf.mean);
        v["image_std"] = serde_json::json!(self.tf.std);
        v
    }

    /// `model/` (written under a temporary name, then renamed).
    pub fn save(&self, store: &ParamStore) -> Result<()> {
        let tensors = store
            .f32_state()?
            .into_iter()
            .map(|(n, t)| {
                // torch's num_batches_tracked is int64.
                let t = if n.ends_with(".num_batches_tracked") {
                    t.to_dtype(DType::I64)?
                } else {
                    t
                };
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = serde_json::to_vec_pretty(&self.config_json())
            .map_err(|e| Error::msg(e.to_string()))?;
        fsutil::write_dir_atomic(&self.dir.join("model"), |tmp| {
            crate::hub::checkpoint::write_safetensors(&tmp.join(WEIGHTS), tensors.into_iter())?;
            fsutil::write_atomic(&tmp.join("config.json"), &cfg)
        })
    }
}

/// Image classification as an [`Objective`].
struct ImageClassify<'a> {
    model: &'a MobileNetV2,
    splits: &'a ImageSplits,
    tf: Transform,
    eval_bs: usize,
    saver: Saver,
}

impl Objective for ImageClassify<'_> {
    fn train_len(&self) -> usize {
        self.splits.train.len()
    }
    fn loss(&self, idx: &[usize], drop: &DropoutRng) -> Result<(Tensor, usize)> {
        // The crop and flip of each image: from the step's random stream
        // (counter-based, so a resumed run draws the same) and the row.
        let base = drop.next();
        let seeds: Vec<u64> = idx
            .iter()
            .map(|&i| crate::data::splitmix64(base ^ crate::data::splitmix64(i as u64)))
            .collect();
        let set = &self.splits.train;
        let x = inputs(set, idx, &self.tf, Some(&seeds))?; // [B, s, s, 3]
        let logits = self.model.forward(&x, Some(drop))?; // [B, classes]
        let loss = crate::nn::cross_entropy(&logits, &targets(set, idx)?)?;
        Ok((loss, idx.len()))
    }
    fn evaluate(&self, split: Split) -> Result<Option<BTreeMap<String, f64>>> {
        let set = match split {
            Split::Validation => &self.splits.validation,
            Split::Test => match &self.splits.test {
                Some(t) => t,
                None => return Ok(None),
            },
        };
        Ok(Some(evaluate(self.model, set, &self.tf, self.eval_bs)?.0))
    }
    fn save(&self, store: &ParamStore) -> Result<()> {
        self.saver.save(store)
    }
    fn data_fingerprint(&self) -> String {
        let mut f = Fingerprint::new();
        let set = &self.splits.train;
        for im in &set.images {
            f.u32s(&[im.h as u32, im.w as u32, im.c as u32]);
            f.bytes(&im.data);
        }
        f.u32s(&set.labels);
        f.finish()
    }
    fn describe_rows(&self, idx: &[usize]) -> String {
        format!("images {idx:?} of {}", self.splits.train.path.display())
    }
}

/// Train an image classifier as `plan` says.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    let t0 = Instant::now();
    let c = &plan.config;
    let splits = load_splits(plan)?;
    let classes = splits.train.classes.clone();
    let model_path = c.model.source().resolve(on)?;
    let weights = read_weights(&model_path)?;
    let sel = selector(plan)?;
    let names: Vec<&str> = weights.tensors.iter().map(|(n, _)| n.as_str()).collect();
    let unmatched = sel.unmatched_user_patterns(
        names.iter().copied().chain(["classifier.1.weight"]),
        &[c.freeze.frozen.clone(), c.freeze.trainable.clone()].concat(),
    );
    if !unmatched.is_empty() {
        return Err(Error::Config {
            path: plan.config_path.clone(),
            msg: format!("`freeze` patterns match no parameter: {unmatched:?}"),
        });
    }
    let bn = match c.freeze.batch_norm {
        FrozenBatchNorm::Eval => FrozenBn::Eval,
        FrozenBatchNorm::Train => FrozenBn::Train,
    };
    let (store, model) = build(weights, sel, classes.len(), bn, c.seeds.init, on)?;
    on(Event::Info(format!(
        "{}; {}",
        store.summary(),
        bn_summary(&model)
    )));
    let tf = c.image.clone().unwrap_or_default().transform();
    on(Event::Info(format!(
        "data: {} train / {} validation / {} test images, {} classes {:?}; inputs {}x{}",
        splits.train.len(),
        splits.validation.len(),
        splits.test.as_ref().map_or(0, |t| t.len()),
        classes.len(),
        classes,
        tf.size,
        tf.size
    )));
    let run = RunWriter::create(&opts.run_dir, plan, opts.resume)?;
    let obj = ImageClassify {
        model: &model,
        splits: &splits,
        eval_bs: c.train.eval_batch_size.unwrap_or(c.train.batch_size * 2),
        saver: Saver {
            dir: opts.run_dir.clone(),
            cfg: model.cfg.clone(),
            classes,
            tf: tf.clone(),
        },
        tf,
    };
    run_loop(plan, opts, &store, &obj, &run, t0, on)
}

/// A saved image model (`<run>/model/` or a model folder), ready to predict.
pub struct SavedModel {
    pub model: MobileNetV2,
    pub store: ParamStore,
    pub classes: Vec<String>,
    pub tf: Transform,
}

/// Whether `dir` (a run folder or a model folder) holds an image model.
pub fn is_image_model(dir: &Path) -> bool {
    let f = model_dir(dir).join("config.json");
    std::fs::read_to_string(f)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["model_type"] == "mobilenet_v2")
}

fn model_dir(dir: &Path) -> PathBuf {
    if dir.join("model").join("config.json").is_file() {
        dir.join("model")
    } else {
        dir.to_path_buf()
    }
}

/// Load a saved image model for inference.
pub fn load_saved(dir: &Path) -> Result<SavedModel> {
    let dir = model_dir(dir);
    let w = read_weights(&dir)?;
    let raw = w.config.clone().unwrap_or_default();
    let file = dir.join("config.json");
    let n = raw["num_classes"]
        .as_u64()
        .ok_or_else(|| Error::file(&file, "no `num_classes`"))? as usize;
    let classes: Vec<String> = (0..n)
        .map(|i| {
            raw["id2label"][i.to_string()]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| i.to_string())
        })
        .collect();
    let f3 = |k: &str, d: [f32; 3]| -> [f32; 3] {
        let v: Vec<f32> = raw[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_f64())
                    .map(|x| x as f32)
                    .collect()
            })
            .unwrap_or_default();
        v.try_into().unwrap_or(d)
    };
    let size = raw["image_size"].as_u64().unwrap_or(224) as usize;
    let tf = Transform {
        size,
        mean: f3("image_mean", image::IMAGENET_MEAN),
        std: f3("image_std", image::IMAGENET_STD),
        crop_padding: 0,
        flip: false,
    };
    let (store, model) = build(w, Selector::none(), n, FrozenBn::Eval, 0, &mut |_| {})?;
    Ok(SavedModel {
        model,
        store,
        classes,
        tf,
    })
}

impl SavedModel {
    /// Class probabilities of images.
    pub fn predict(&self, images: &[RawImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for chunk in images.chunks(64) {
            let refs: Vec<&RawImage> = chunk.iter().collect();
            let logits = self
                .model
                .forward(&batch_tensor(&self.tf, &refs, None)?, None)?;
            out.extend(logits.to_vec2::<f32>()?.iter().map(|r| metrics::softmax(r)));
        }
        Ok(out)
    }

    /// Metrics on a labelled set.
    pub fn evaluate(&self, set: &ImageSet) -> Result<BTreeMap<String, f64>> {
        Ok(evaluate(&self.model, set, &self.tf, 64)?.0)
    }
}

/// `afinar eval` of an image run or model folder: on `data` (a class
/// folder, or an IDX image file with `labels`), else the run's test split.
/// Returns the data's path, its number of images and the metrics.
pub fn eval_run(
    dir: &Path,
    data: Option<&Path>,
    labels: Option<&Path>,
) -> Result<(PathBuf, usize, BTreeMap<String, f64>)> {
    let saved = load_saved(dir)?;
    let set = match data {
        Some(p) if p.is_dir() => {
            if labels.is_some() {
                return Err(Error::file(
                    p,
                    "is a folder of class folders: it needs no --data-labels",
                ));
            }
            image::read_folder(p, Some(&saved.classes))?
        }
        Some(p) => {
            let l = labels.ok_or_else(|| {
                Error::file(
                    p,
                    "is an IDX image file: give its label file with --data-labels",
                )
            })?;
            image::read_idx(p, l, Some(&saved.classes))?
        }
        None => {
            let cfg = dir.join("config.toml");
            if !cfg.is_file() {
                return Err(Error::file(
                    dir,
                    "is a model folder: give --data (images) to evaluate it",
                ));
            }
            let plan = Plan::load(&cfg, &[])?;
            load_splits(&plan)?.test.ok_or_else(|| {
                Error::file(&cfg, "the run's config has no test split: give --data")
            })?
        }
    };
    let m = saved.evaluate(&set)?;
    Ok((set.path.clone(), set.len(), m))
}

/// `afinar predict` of image files: per file its class probabilities, in
/// the model's class order.
pub fn predict_files(dir: &Path, files: &[PathBuf]) -> Result<(Vec<String>, Vec<Vec<f32>>)> {
    let saved = load_saved(dir)?;
    let images = files
        .iter()
        .map(|f| image::decode_file(f))
        .collect::<Result<Vec<_>>>()?;
    Ok((saved.classes.clone(), saved.predict(&images)?))
}
