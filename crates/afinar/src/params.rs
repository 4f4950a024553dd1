//! THE parameter selector and store: what trains is decided here, once.
//!
//! Every parameter lives in a [`ParamStore`] under its checkpoint name
//! (transformers' `BertForSequenceClassification` names: `bert.encoder...`,
//! `classifier.weight`). A [`Selector`] built from the run config decides by
//! path patterns which ones train: those become `candle_core::Var`s (they get
//! gradients and optimizer state); the rest stay plain tensors, which afinar's
//! ops never compute a gradient for. Weights kept quantised (a GGUF's Q4_0 /
//! Q4_1 / Q8_0 linears under `base_dtype = "quantized"`) sit beside them as
//! [`QTensor`]s: always frozen, counted, and read by `nn::qlinear`.

use crate::hub::gguf::QTensor;
use crate::nn::{Base, GradBuf, LayerNorm, Linear, LinearAdapter, RmsNorm, Weight};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use globset::{Glob, GlobMatcher};
use regex::Regex;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// One pattern over parameter names: a glob (`bert.encoder.layer.*.attention.*`)
/// or, prefixed `re:`, a regex that must match the whole name. A glob
/// without a wildcard that names a module (`features.3`, `classifier`)
/// matches every parameter under it, and a segment `A-B` of two numbers is
/// the range of modules `A` to `B` (`features.0-6`: the first seven stages
/// of a CNN).
#[derive(Debug, Clone)]
pub enum Pattern {
    /// The pattern as written, the glob, and the glob of what is under it.
    Glob(String, GlobMatcher, GlobMatcher),
    Regex(String, Regex),
}

/// `features.0-6.*` as the glob `features.{0,1,2,3,4,5,6}.*` (an error for
/// a range that runs backwards or is over 10,000 long).
fn expand_ranges(p: &str) -> Result<String> {
    let mut out = Vec::new();
    for seg in p.split('.') {
        let range = seg.split_once('-').and_then(|(a, b)| {
            let num = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
            (num(a) && num(b)).then(|| (a.parse::<usize>(), b.parse::<usize>()))
        });
        match range {
            Some((Ok(a), Ok(b))) if a <= b && b - a < 10_000 => {
                let alts: Vec<String> = (a..=b).map(|i| i.to_string()).collect();
                out.push(format!("{{{}}}", alts.join(",")));
            }
            Some(_) => {
                return Err(Error::msg(format!(
                    "bad parameter pattern `{p}`: the range `{seg}` must run from low to high"
                )))
            }
            None => out.push(seg.to_string()),
        }
    }
    Ok(out.join("."))
}

impl Pattern {
    pub fn parse(p: &str) -> Result<Self> {
        if let Some(re) = p.strip_prefix("re:") {
            let full = format!("^(?:{re})$");
            Regex::new(&full)
                .map(|r| Pattern::Regex(p.to_string(), r))
                .map_err(|e| Error::msg(format!("bad parameter regex `{p}`: {e}")))
        } else {
            let g = expand_ranges(p)?;
            let compile = |g: &str| {
                Glob::new(g)
                    .map(|g| g.compile_matcher())
                    .map_err(|e| Error::msg(format!("bad parameter pattern `{p}`: {e}")))
            };
            Ok(Pattern::Glob(
                p.to_string(),
                compile(&g)?,
                compile(&format!("{g}.*"))?,
            ))
        }
    }

    /// Matches the full name, or the name without the model prefix
    /// (`encoder.layer.5.*` matches `bert.encoder.layer.5.output.dense.weight`).
    pub fn matches(&self, name: &str, model_prefix: &str) -> bool {
        let short = name.strip_prefix(model_prefix).unwrap_or(name);
        match self {
            Pattern::Glob(_, g, under) => {
                g.is_match(name)
                    || g.is_match(short)
                    || under.is_match(name)
                    || under.is_match(short)
            }
            Pattern::Regex(_, r) => r.is_match(name) || r.is_match(short),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Pattern::Glob(s, ..) | Pattern::Regex(s, _) => s,
        }
    }
}

/// Which parameters train. Rules apply in order; the last matching rule wins.
#[derive(Debug, Clone)]
pub struct Selector {
    /// (pattern, trainable?)
    rules: Vec<(Pattern, bool)>,
    model_prefix: String,
}

/// The freezing shorthands of the run config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preset {
    #[default]
    /// Everything trains.
    Full,
    /// Only the task head (pooler + classifier) trains.
    HeadOnly,
    /// The last N encoder layers and the head train.
    LastLayers(usize),
}

/// Where a model's parts are, by parameter name: what the freezing rules
/// refer to. Each model family gives its own (`models::layout`).
#[derive(Debug, Clone)]
pub struct Layout {
    /// The body's prefix with its dot (`bert.`, `model.`, `transformer.`):
    /// user patterns may leave it out.
    pub prefix: String,
    /// Glob of each transformer layer's parameters, in order.
    pub layers: Vec<String>,
    /// Globs of the input embeddings.
    pub embeddings: Vec<String>,
    /// Globs of the new task head (always trains, unless frozen by a pattern).
    pub head: Vec<String>,
}

/// The `[freeze]` section of a run, as rules.
#[derive(Debug, Clone, Default)]
pub struct FreezeRules {
    pub preset: Preset,
    /// Freeze the input embeddings.
    pub embeddings: bool,
    /// Freeze the first N layers.
    pub first_layers: usize,
    /// Extra patterns (glob, or `re:` regex) to freeze / to train; applied last.
    pub frozen: Vec<String>,
    pub trainable: Vec<String>,
}

impl Selector {
    /// The selector of `rules` on a model laid out as `layout`.
    pub fn new(rules: &FreezeRules, layout: &Layout) -> Result<Self> {
        let num_layers = layout.layers.len();
        let mut out = Vec::new();
        let p = |s: &str| Pattern::parse(s);
        match rules.preset {
            Preset::Full => out.push((p("*")?, true)),
            Preset::HeadOnly => out.push((p("*")?, false)),
            Preset::LastLayers(n) => {
                if n > num_layers {
                    return Err(Error::msg(format!(
                        "freeze.last_layers = {n} but the model has {num_layers} layers"
                    )));
                }
                out.push((p("*")?, false));
                for l in &layout.layers[num_layers - n..] {
                    out.push((p(l)?, true));
                }
            }
        }
        for h in &layout.head {
            // The new head always trains (unless `frozen` says otherwise below).
            out.push((p(h)?, true));
        }
        if rules.embeddings {
            for e in &layout.embeddings {
                out.push((p(e)?, false));
            }
        }
        if rules.first_layers > num_layers {
            return Err(Error::msg(format!(
                "freeze.first_layers = {} but the model has {num_layers} layers",
                rules.first_layers
            )));
        }
        for l in &layout.layers[..rules.first_layers] {
            out.push((p(l)?, false));
        }
        for f in &rules.frozen {
            out.push((p(f)?, false));
        }
        for t in &rules.trainable {
            out.push((p(t)?, true));
        }
        Ok(Selector {
            rules: out,
            model_prefix: layout.prefix.clone(),
        })
    }

    /// Everything trains (used by tests and `full`).
    pub fn all() -> Self {
        Selector {
            rules: vec![(Pattern::parse("*").unwrap(), true)],
            model_prefix: String::new(),
        }
    }

    /// Nothing trains (inference).
    pub fn none() -> Self {
        Selector {
            rules: vec![],
            model_prefix: String::new(),
        }
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        let mut t = false;
        for (pat, train) in &self.rules {
            if pat.matches(name, &self.model_prefix) {
                t = *train;
            }
        }
        t
    }

    /// Patterns the user wrote that match no parameter: almost always a typo.
    pub fn unmatched_user_patterns<'a>(
        &self,
        names: impl Iterator<Item = &'a str> + Clone,
        user: &[String],
    ) -> Vec<String> {
        user.iter()
            .filter(|u| {
                let pat = match Pattern::parse(u) {
                    Ok(p) => p,
                    Err(_) => return true,
                };
                !names.clone().any(|n| pat.matches(n, &self.model_prefix))
            })
            .cloned()
            .collect()
    }
}

/// A parameter: the tensor, and when it trains its `Var` and gradient buffer.
#[derive(Clone)]
pub struct Param {
    pub tensor: Tensor,
    pub var: Option<Var>,
    pub grad: Option<Arc<GradBuf>>,
}

impl Param {
    /// What the ops take: the value and where its gradient goes.
    pub fn weight(&self) -> Weight {
        Weight {
            t: self.tensor.clone(),
            grad: self.grad.clone(),
        }
    }
}

/// All parameters of a model by checkpoint name.
pub struct ParamStore {
    params: BTreeMap<String, Param>,
    /// Frozen weights kept quantised, by checkpoint name (`[rows, cols]` = HF `[out, in]`).
    quantized: BTreeMap<String, Arc<QTensor>>,
    used: RefCell<BTreeSet<String>>,
    selector: Selector,
    /// Where the tensors came from, for error messages.
    pub source: String,
    /// Linear modules wrapped by an adapter, by module path (`adapters/`
    /// attaches them; [`Path::linear`] builds them into the layer).
    pub adapters: BTreeMap<String, Arc<dyn AdapterSpec>>,
    /// The adapters' on/off switch (off: the base model, e.g. a DPO reference).
    pub adapters_enabled: Arc<std::sync::atomic::AtomicBool>,
    /// Set while the adapters are merged into the base weights.
    pub adapters_merged: Arc<std::sync::atomic::AtomicBool>,
    /// State that is not a parameter but changes in training (batch norm's
    /// running statistics, torch's buffers): never trained, never counted
    /// as parameters, but kept with the best weights, in checkpoints and in
    /// the saved model.
    buffers: BTreeMap<String, Var>,
}

impl ParamStore {
    pub fn new(selector: Selector, source: impl Into<String>) -> Self {
        ParamStore {
            params: BTreeMap::new(),
            quantized: BTreeMap::new(),
            used: RefCell::new(BTreeSet::new()),
            selector,
            source: source.into(),
            adapters: BTreeMap::new(),
            adapters_enabled: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            adapters_merged: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            buffers: BTreeMap::new(),
        }
    }

    /// Add a buffer (f32) under `name`.
    pub fn insert_buffer(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let var = Var::from_tensor(&tensor.to_dtype(DType::F32)?.detach())?;
        self.buffers.insert(name.to_string(), var);
        Ok(())
    }

    /// The buffer `name`, checked against `shape` (marks it used).
    pub fn buffer(&self, name: &str, shape: &[usize]) -> Result<Var> {
        let v = self.buffers.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: format!("missing from {}", self.source),
        })?;
        if v.as_tensor().dims() != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "expected shape {:?}, found {:?} in {}",
                    shape,
                    v.as_tensor().dims(),
                    self.source
                ),
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(v.clone())
    }

    /// (name, value) of every buffer, in name order.
    pub fn buffers(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.buffers.iter().map(|(n, v)| (n, v.as_tensor()))
    }

    /// What changes in training, by name: the trainable parameters and the
    /// buffers (what a checkpoint and the best weights keep).
    pub fn training_state(&self) -> Vec<(String, Tensor)> {
        self.trainable()
            .into_iter()
            .map(|(n, w)| (n, w.t))
            .chain(
                self.buffers
                    .iter()
                    .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
            )
            .collect()
    }

    /// Add a tensor under `name`; it becomes a `Var` if the selector says it trains.
    pub fn insert(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let tensor = tensor.to_dtype(DType::F32)?;
        let param = if self.selector.is_trainable(name) {
            let var = Var::from_tensor(&tensor)?;
            Param {
                tensor: var.as_tensor().clone(),
                var: Some(var),
                grad: Some(Arc::new(GradBuf::new())),
            }
        } else {
            Param {
                tensor: tensor.detach(),
                var: None,
                grad: None,
            }
        };
        self.params.insert(name.to_string(), param);
        Ok(())
    }

    /// Add a trainable tensor whatever the selector says (adapter weights).
    pub fn insert_trainable(&mut self, name: &str, tensor: Tensor) -> Result<()> {
        let var = Var::from_tensor(&tensor.to_dtype(DType::F32)?)?;
        self.params.insert(
            name.to_string(),
            Param {
                tensor: var.as_tensor().clone(),
                var: Some(var),
                grad: Some(Arc::new(GradBuf::new())),
            },
        );
        Ok(())
    }

    /// Add a frozen weight kept quantised (replacing an f32 one of the same name).
    pub fn insert_quantized(&mut self, name: &str, q: Arc<QTensor>) {
        self.params.remove(name);
        self.quantized.insert(name.to_string(), q);
    }

    /// The quantised weight `name`, if it is stored quantised (marks it used).
    pub fn get_quantized(&self, name: &str) -> Option<Arc<QTensor>> {
        let q = self.quantized.get(name)?;
        self.used.borrow_mut().insert(name.to_string());
        Some(q.clone())
    }

    pub fn is_quantized(&self, name: &str) -> bool {
        self.quantized.contains_key(name)
    }

    /// (name, tensor) of every weight kept quantised, in name order.
    pub fn quantized(&self) -> impl Iterator<Item = (&String, &Arc<QTensor>)> {
        self.quantized.iter()
    }

    /// The shape of `name`, f32 or quantised.
    pub fn dims(&self, name: &str) -> Option<Vec<usize>> {
        match self.params.get(name) {
            Some(p) => Some(p.tensor.dims().to_vec()),
            None => self.quantized.get(name).map(|q| q.shape().to_vec()),
        }
    }

    /// Every parameter as an f32 tensor, quantised ones dequantised (a plain
    /// checkpoint to save; the quantised bytes are decoded exactly, not rounded again).
    pub fn f32_state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out: BTreeMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, p)| Ok((n.clone(), p.tensor.detach().to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        for (n, q) in &self.quantized {
            out.insert(n.clone(), dequantize(q)?);
        }
        for (n, v) in &self.buffers {
            out.insert(n.clone(), v.as_tensor().detach());
        }
        Ok(out)
    }

    /// Freeze everything (adapter training: only what is added after trains).
    pub fn freeze_all(&mut self) {
        for p in self.params.values_mut() {
            p.var = None;
            p.grad = None;
            p.tensor = p.tensor.detach();
        }
    }

    /// Move every parameter to `dev`: trainable ones stay f32 (master
    /// weights, updated in f32), frozen ones become `frozen_dtype` (bf16
    /// halves the memory and doubles the matmul speed of a frozen base;
    /// it also turns on bf16 compute, [`crate::nn::set_autocast_bf16`]).
    /// Call it after the adapters are applied and before the model is built.
    pub fn to_device(&mut self, dev: &candle_core::Device, frozen_dtype: DType) -> Result<()> {
        if let Some(name) = self.quantized.keys().next() {
            return Err(Error::Tensor {
                name: name.clone(),
                msg: format!(
                    "is kept quantised; a quantised base cannot move to {dev:?}: use base_dtype = \"f32\""
                ),
            });
        }
        for p in self.params.values_mut() {
            if p.var.is_some() {
                let var = Var::from_tensor(&p.tensor.detach().to_device(dev)?)?;
                p.tensor = var.as_tensor().clone();
                p.var = Some(var);
            } else {
                p.tensor = p.tensor.to_device(dev)?.to_dtype(frozen_dtype)?.detach();
            }
        }
        crate::nn::set_autocast_bf16(frozen_dtype == DType::BF16);
        Ok(())
    }

    /// Make `name` trainable (PEFT's `modules_to_save`). A quantised weight
    /// is dequantised to f32 first: what trains fully is f32.
    pub fn make_trainable(&mut self, name: &str) -> Result<()> {
        if let Some(q) = self.quantized.remove(name) {
            return self.insert_trainable(name, dequantize(&q)?);
        }
        if let Some(p) = self.params.get(name) {
            let t = p.tensor.clone();
            self.insert_trainable(name, t)?;
        }
        Ok(())
    }

    /// Run `f` with every adapter switched off (the base model: a DPO or
    /// PPO reference), switched back on however `f` ends.
    pub fn with_adapters_off<T>(&self, f: impl FnOnce() -> T) -> T {
        struct On<'s>(&'s ParamStore);
        impl Drop for On<'_> {
            fn drop(&mut self) {
                self.0
                    .adapters_enabled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.adapters_enabled
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _on = On(self);
        f()
    }

    /// Move every parameter of `other` in under `prefix.` (a second model
    /// in the same store: PPO's value model), trainable as it was there.
    pub fn absorb(&mut self, other: ParamStore, prefix: &str) -> Result<()> {
        if let Some(name) = other.quantized.keys().next() {
            return Err(Error::Tensor {
                name: name.clone(),
                msg: format!(
                    "is kept quantised in {}: a model moved into another store must be f32",
                    other.source
                ),
            });
        }
        if !other.adapters.is_empty() {
            return Err(Error::msg(
                "absorb: attach adapters after moving a model in",
            ));
        }
        for (name, p) in other.params {
            self.params.insert(format!("{prefix}.{name}"), p);
        }
        for (name, v) in other.buffers {
            self.buffers.insert(format!("{prefix}.{name}"), v);
        }
        Ok(())
    }

    /// A store of the parameters (and adapters) whose names `keep` accepts,
    /// sharing their tensors and the adapter switches: a part of the store
    /// to save on its own (PPO's policy without its value model).
    pub fn view(&self, keep: impl Fn(&str) -> bool) -> ParamStore {
        ParamStore {
            params: self
                .params
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, p)| (n.clone(), p.clone()))
                .collect(),
            quantized: self
                .quantized
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, q)| (n.clone(), q.clone()))
                .collect(),
            used: RefCell::new(BTreeSet::new()),
            selector: self.selector.clone(),
            source: self.source.clone(),
            adapters: self
                .adapters
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, a)| (n.clone(), a.clone()))
                .collect(),
            adapters_enabled: self.adapters_enabled.clone(),
            adapters_merged: self.adapters_merged.clone(),
            buffers: self
                .buffers
                .iter()
                .filter(|(n, _)| keep(n))
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.params.contains_key(name)
    }

    /// The parameter `name`, checked against `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        let p = self.params.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: match self.quantized.get(name) {
                Some(q) => format!(
                    "is kept quantised ({} {:?}) in {}, but is read here as f32: use base_dtype = \"f32\"",
                    q.ty(),
                    q.shape(),
                    self.source
                ),
                None => format!("missing from {}", self.source),
            },
        })?;
        if p.tensor.dims() != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                msg: format!(
                    "expected shape {:?}, found {:?} in {}",
                    shape,
                    p.tensor.dims(),
                    self.source
                ),
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(p.weight())
    }

    /// The tensor `name` if present, else a fresh one from `init` (a new head).
    pub fn get_or_init(
        &mut self,
        name: &str,
        shape: &[usize],
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Weight> {
        if !self.params.contains_key(name) {
            let t = init()?;
            debug_assert_eq!(t.dims(), shape);
            self.insert(name, t)?;
        }
        self.get(name, shape)
    }

    /// Names loaded but never asked for by the model.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.params
            .keys()
            .chain(self.quantized.keys())
            .chain(self.buffers.keys())
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    pub fn remove(&mut self, name: &str) {
        self.params.remove(name);
        self.quantized.remove(name);
        self.buffers.remove(name);
    }

    /// (name, var) of every trainable parameter, in name order.
    pub fn trainable(&self) -> Vec<(String, Weight)> {
        self.params
            .iter()
            .filter(|(_, p)| p.var.is_some())
            .map(|(n, p)| (n.clone(), p.weight()))
            .collect()
    }

    /// The accumulated gradient of `name` (None: frozen, or nothing written).
    pub fn grad(&self, name: &str) -> Result<Option<Tensor>> {
        match self.params.get(name) {
            Some(p) => Ok(p.weight().grad_tensor()?),
            None => Ok(None),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Param)> {
        self.params.iter()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> + Clone {
        self.params.keys().map(|s| s.as_str())
    }

    /// (trainable, total) element counts; quantised weights count by their
    /// shape (frozen).
    pub fn counts(&self) -> (usize, usize) {
        let mut t = 0;
        let mut all = self.quantized_count();
        for p in self.params.values() {
            let n = p.tensor.elem_count();
            all += n;
            if p.var.is_some() {
                t += n;
            }
        }
        (t, all)
    }

    /// Elements of the weights kept quantised.
    pub fn quantized_count(&self) -> usize {
        self.quantized.values().map(|q| q.rows() * q.cols()).sum()
    }

    /// PEFT's `print_trainable_parameters` line (and how many frozen
    /// parameters are kept quantised, when any are).
    pub fn summary(&self) -> String {
        let (t, all) = self.counts();
        let frozen = all - t;
        let q = self.quantized_count();
        let quant = if q > 0 {
            let bytes: usize = self.quantized.values().map(|q| q.bytes().len()).sum();
            format!(
                " || quantized params: {q} in {} tensors ({:.1} MiB)",
                self.quantized.len(),
                bytes as f64 / (1 << 20) as f64
            )
        } else {
            String::new()
        };
        format!(
            "trainable params: {t} || frozen params: {frozen} || all params: {all} || trainable%: {:.4}{quant}",
            100.0 * t as f64 / all.max(1) as f64
        )
    }

    /// Overwrite the values of every parameter (and buffer) present in
    /// `values` (same shapes).
    pub fn copy_values_from(&self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, t) in values {
            if let Some(v) = self.buffers.get(name) {
                v.set(t)?;
                continue;
            }
            if let Some(p) = self.params.get(name) {
                match &p.var {
                    Some(v) => v.set(t)?,
                    None => {
                        return Err(Error::msg(format!("cannot overwrite frozen tensor {name}")));
                    }
                }
            }
        }
        Ok(())
    }

    /// A snapshot of every trainable value and buffer (for keeping the
    /// best weights).
    pub fn snapshot_trainable(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (n, p) in &self.params {
            if let Some(v) = &p.var {
                out.insert(n.clone(), v.as_tensor().copy()?);
            }
        }
        for (n, v) in &self.buffers {
            out.insert(n.clone(), v.as_tensor().copy()?);
        }
        Ok(out)
    }
}

pub use crate::nn::qlinear::dequantize;

/// How an adapter wraps one linear module. The store keeps one per wrapped
/// module path (`adapters::attach` puts them there); [`Path::linear`]
/// builds the layer's [`LinearAdapter`] from the module's parameters.
pub trait AdapterSpec: Send + Sync + std::fmt::Debug {
    /// The method, for messages ("LoRA", "DoRA", "IA3").
    fn method(&self) -> &'static str;
    /// The parameters it adds under the module's path (PEFT's names, e.g.
    /// `lora_A.weight`): what an adapter file must hold for the module.
    fn tensor_names(&self) -> Vec<&'static str>;
    /// The layer's adapter, from the module's parameters (`p` points at
    /// the module; `base` is its weight `[out, in]`).
    fn build(&self, p: &Path, base: &Base) -> Result<Arc<dyn LinearAdapter>>;
}

/// A path prefix into a [`ParamStore`], as candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct Path<'a> {
    pub store: &'a ParamStore,
    prefix: String,
}

impl<'a> Path<'a> {
    pub fn root(store: &'a ParamStore, prefix: &str) -> Self {
        Path {
            store,
            prefix: prefix.trim_end_matches('.').to_string(),
        }
    }
    pub fn pp(&self, seg: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            seg.to_string()
        } else {
            format!("{}.{seg}", self.prefix)
        };
        Path {
            store: self.store,
            prefix,
        }
    }
    /// The module path this points at.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The linear layer at this path: `weight` `[out, in]` (f32, or as
    /// stored quantised), `bias` `[out]` if `bias`, and the adapter the
    /// store keeps for this module, if any.
    pub fn linear(&self, in_f: usize, out_f: usize, bias: bool) -> Result<Linear> {
        let weight = match self.get_quantized("weight") {
            Some(q) if q.shape() != [out_f, in_f] => {
                return Err(Error::Tensor {
                    name: self.name("weight"),
                    msg: format!(
                        "expected shape [{out_f}, {in_f}], found {:?} ({} quantised) in {}",
                        q.shape(),
                        q.ty(),
                        self.store.source
                    ),
                })
            }
            Some(q) => Base::Quantized(q),
            None => Base::F32(self.get(&[out_f, in_f], "weight")?),
        };
        let adapter = match self.store.adapters.get(self.prefix()) {
            Some(spec) => Some(spec.build(self, &weight)?),
            None => None,
        };
        Ok(Linear {
            weight,
            bias: if bias {
                Some(self.get(&[out_f], "bias")?)
            } else {
                None
            },
            adapter,
            adapters_enabled: self.store.adapters_enabled.clone(),
            adapters_merged: self.store.adapters_merged.clone(),
        })
    }

    /// The LayerNorm at this path: `weight` and `bias` `[d]`.
    pub fn layer_norm(&self, d: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&[d], "weight")?,
            bias: self.get(&[d], "bias")?,
            eps,
        })
    }

    /// The RMSNorm at this path: `weight` `[d]`.
    pub fn rms_norm(&self, d: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: self.get(&[d], "weight")?,
            eps,
        })
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }
    pub fn get(&self, shape: &[usize], leaf: &str) -> Result<Weight> {
        self.store.get(&self.name(leaf), shape)
    }
    /// `leaf` if it is stored quantised.
    pub fn get_quantized(&self, leaf: &str) -> Option<Arc<QTensor>> {
        self.store.get_quantized(&self.name(leaf))
    }
}

/// N(0, std) initialisation from a seeded RNG (transformers' `initializer_range`).
pub fn normal_init(
    shape: &[usize],
    std: f64,
    rng: &mut (impl rand::Rng + ?Sized),
) -> Result<Tensor> {
    use rand_distr::{Distribution, Normal};
    let n: usize = shape.iter().product();
    let dist = Normal::new(0.0f64, std).map_err(|e| Error::msg(e.to_string()))?;
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng) as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_and_ranges_match_what_is_under_them() {
        let p = Pattern::parse("features.0-6").unwrap();
        for n in ["features.0.0.weight", "features.6.conv.1.0.weight"] {
            assert!(p.matches(n, ""), "{n}");
        }
        for n in [
            "features.7.conv.0.0.weight",
            "features.16.conv.2.weight",
            "classifier.1.weight",
        ] {
            assert!(!p.matches(n, ""), "{n}");
        }
        let p = Pattern::parse("classifier").unwrap();
        assert!(p.matches("classifier.1.bias", ""));
        assert!(!p.matches("classifier2.weight", ""));
        let e = Pattern::parse("features.6-0").unwrap_err().to_string();
        assert!(e.contains("`6-0` must run from low to high"), "{e}");
    }

    fn names() -> Vec<String> {
        let mut v = vec!["bert.embeddings.word_embeddings.weight".to_string()];
        for i in 0..6 {
            v.push(format!(
                "bert.encoder.layer.{i}.attention.self.query.weight"
            ));
        }
        v.push("bert.pooler.dense.weight".into());
        v.push("classifier.weight".into());
        v
    }

    fn trainable(sel: &Selector) -> Vec<String> {
        names()
            .into_iter()
            .filter(|n| sel.is_trainable(n))
            .collect()
    }

    /// BERT's layout, as `models::layout` gives it (6 layers).
    fn bert() -> Layout {
        Layout {
            prefix: "bert.".into(),
            layers: (0..6)
                .map(|i| format!("bert.encoder.layer.{i}.*"))
                .collect(),
            embeddings: vec!["bert.embeddings.*".into()],
            head: vec!["bert.pooler.*".into(), "classifier.*".into()],
        }
    }

    fn preset(p: Preset) -> FreezeRules {
        FreezeRules {
            preset: p,
            ..Default::default()
        }
    }

    #[test]
    fn presets() {
        let full = Selector::new(&preset(Preset::Full), &bert()).unwrap();
        assert_eq!(trainable(&full).len(), names().len());
        let head = Selector::new(&preset(Preset::HeadOnly), &bert()).unwrap();
        assert_eq!(
            trainable(&head),
            vec!["bert.pooler.dense.weight", "classifier.weight"]
        );
        let last2 = Selector::new(&preset(Preset::LastLayers(2)), &bert()).unwrap();
        let t = trainable(&last2);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(
            t.iter().any(|n| n.contains("layer.4.")) && t.iter().any(|n| n.contains("layer.5."))
        );
        assert!(Selector::new(&preset(Preset::LastLayers(7)), &bert()).is_err());
    }

    #[test]
    fn shorthands_and_patterns_short_and_regex() {
        let rules = FreezeRules {
            preset: Preset::Full,
            embeddings: true,
            first_layers: 2,
            frozen: vec!["encoder.layer.5.*".into()],
            trainable: vec![],
        };
        let s = Selector::new(&rules, &bert()).unwrap();
        let t = trainable(&s);
        assert!(!t.iter().any(|n| n.contains("embeddings")
            || n.contains("layer.0.")
            || n.contains("layer.1.")
            || n.contains("layer.5.")));
        assert!(t.iter().any(|n| n.contains("layer.2.")));
        let rules = FreezeRules {
            preset: Preset::HeadOnly,
            trainable: vec!["re:bert\\.encoder\\.layer\\.[34]\\..*".into()],
            ..Default::default()
        };
        let r = Selector::new(&rules, &bert()).unwrap();
        assert_eq!(trainable(&r).len(), 4);
        let n = names();
        let un = r.unmatched_user_patterns(
            n.iter().map(|s| s.as_str()),
            &["encoder.layr.*".into(), "classifier.*".into()],
        );
        assert_eq!(un, vec!["encoder.layr.*".to_string()]);
    }

    #[test]
    fn store_shape_errors_name_the_tensor() {
        let mut st = ParamStore::new(Selector::all(), "test");
        st.insert(
            "a.weight",
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let e = st.get("a.weight", &[3, 2]).unwrap_err().to_string();
        assert!(
            e.contains("a.weight") && e.contains("[3, 2]") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = st.get("b", &[1]).unwrap_err().to_string();
        assert!(e.contains("`b`") && e.contains("missing"), "{e}");
    }
}
