//! Adapters: LoRA (+ DoRA), IA3 and prompt tuning, with Hugging Face PEFT's
//! semantics and files (`adapter_config.json`, `adapter_model.safetensors`),
//! so adapters move between afinar and PEFT.
//!
//! One file per method, the same shape each: `lora.rs`, `ia3.rs`,
//! `prompt_tuning.rs`. LoRA and IA3 implement the linear layer's trait
//! (`nn::LinearAdapter`: forward around the base, merge, unmerge) and the
//! store's (`params::AdapterSpec`: their tensors, building the layer's
//! adapter); `config.rs` is the `[adapter]` tagged enum; `peft.rs` holds
//! every PEFT file name, key prefix and parameter suffix. Attaching
//! (`attach`) is done here once for every body: the base freezes,
//! `modules_to_save` train fully, targeted linear modules get the method's
//! parameters. Follows PEFT 0.21 (`tuners/tuners_utils.py` for matching).

pub mod config;
pub mod ia3;
pub mod lora;
pub mod peft;
pub mod prompt_tuning;

pub use config::{
    AdapterConfig, AdapterType, Ia3Config, InitLoraWeights, LoraConfig, Patterns,
    PromptTuningConfig, PromptTuningInit, Targeting, Targets,
};

use crate::nn::linear::Linear;
use crate::params::{AdapterSpec, ParamStore};
use crate::{Error, Result};
use candle_core::Tensor;
use regex::Regex;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The PEFT task types afinar reads and writes (`task_type` of
/// `adapter_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeftTask {
    /// A sequence head (PEFT's `PeftModelForSequenceClassification`).
    SeqCls,
    /// A decoder LM (`PeftModelForCausalLM`).
    CausalLm,
}

impl PeftTask {
    pub fn as_str(self) -> &'static str {
        match self {
            PeftTask::SeqCls => "SEQ_CLS",
            PeftTask::CausalLm => "CAUSAL_LM",
        }
    }

    /// The output layers: trained fully for SEQ_CLS (PEFT adds them to
    /// `modules_to_save`), never wrapped by `"all-linear"`.
    pub fn output_modules(self) -> &'static [&'static str] {
        match self {
            PeftTask::SeqCls => &["classifier", "score"],
            PeftTask::CausalLm => &["lm_head"],
        }
    }
}

/// PEFT's key match: `name == key` or `name` ends with `.key`.
pub fn matches_key(name: &str, key: &str) -> bool {
    name == key || name.ends_with(&format!(".{key}"))
}

/// The layer index in `...layer.<i>...` (PEFT's default layer patterns).
fn layer_index(name: &str) -> Option<usize> {
    let re = Regex::new(r"\.(?:layers|h|block|blocks|layer)\.(\d+)\.").unwrap();
    re.captures(&format!(".{name}."))
        .and_then(|c| c[1].parse().ok())
}

impl Targeting {
    /// Whether module `name` is wrapped (PEFT's matching);
    /// `all_linear_exclude`: the output layers `"all-linear"` leaves out.
    fn targeted(&self, name: &str, all_linear_exclude: &[&str]) -> Result<bool> {
        let hit = match &self.target_modules {
            Targets::One(s) if s == "all-linear" => {
                !all_linear_exclude.iter().any(|h| matches_key(name, h))
            }
            Targets::One(re) => Regex::new(&format!("^(?:{re})$"))
                .map_err(|e| Error::msg(format!("target_modules regex: {e}")))?
                .is_match(name),
            Targets::List(keys) => keys.iter().any(|k| matches_key(name, k)),
        };
        if !hit || self.exclude_modules.iter().any(|k| matches_key(name, k)) {
            return Ok(false);
        }
        if let Some(layers) = &self.layers_to_transform {
            return Ok(layer_index(name).is_some_and(|i| layers.contains(&i)));
        }
        Ok(true)
    }
}

impl AdapterConfig {
    /// Add the adapter's parameters for every targeted linear module of the
    /// store (`linears`: module path, out, in) and record how each is
    /// wrapped (`store.adapters`). New parameters are initialised as PEFT
    /// does, so the adapted model starts equal to the base. Returns notes
    /// for the user (ambiguous patterns, targets that matched nothing when
    /// that is allowed).
    pub fn apply(
        &self,
        store: &mut ParamStore,
        linears: &[(String, usize, usize)],
        output_modules: &[&str],
        rng: &mut dyn rand::RngCore,
    ) -> Result<Vec<String>> {
        self.validate()?;
        let Some(t) = self.targeting() else {
            return Err(Error::msg(
                "adapter: prompt tuning wraps no linear module (it is applied to the input embeddings of a decoder)",
            ));
        };
        let mut notes = Vec::new();
        let mut wrapped = Vec::new();
        for (path, out_f, in_f) in linears {
            if t.modules_to_save.iter().any(|m| matches_key(path, m))
                || !t.targeted(path, output_modules)?
            {
                continue;
            }
            let spec: Arc<dyn AdapterSpec> = match self {
                AdapterConfig::Lora(c) => {
                    let (spec, n) = c.init(store, (path, *out_f, *in_f), rng)?;
                    notes.extend(n);
                    Arc::new(spec)
                }
                AdapterConfig::Ia3(c) => Arc::new(c.init(store, (path, *out_f, *in_f))?),
                AdapterConfig::PromptTuning(_) => unreachable!("no targeting"),
            };
            store.adapters.insert(path.clone(), spec);
            wrapped.push(path.clone());
        }
        // PEFT accepts a list where only some entries match (peft#1959);
        // afinar names the ones that matched nothing.
        if let Targets::List(keys) = &t.target_modules {
            let unmatched: Vec<&String> = keys
                .iter()
                .filter(|k| !linears.iter().any(|(p, _, _)| matches_key(p, k)))
                .collect();
            if !unmatched.is_empty() {
                let sample: Vec<&str> =
                    linears.iter().take(8).map(|(p, _, _)| p.as_str()).collect();
                if !t.allow_unmatched {
                    return Err(Error::msg(format!(
                        "{}: target_modules {unmatched:?} match no linear module (set allow_unmatched = true to ignore); modules look like {sample:?}",
                        self.what()
                    )));
                }
                if !wrapped.is_empty() {
                    notes.push(format!(
                        "{}: target_modules {unmatched:?} match no linear module (allow_unmatched = true)",
                        self.what()
                    ));
                }
            }
        }
        if wrapped.is_empty() {
            let sample: Vec<&str> = linears.iter().take(8).map(|(p, _, _)| p.as_str()).collect();
            return Err(Error::msg(format!(
                "{}: target_modules {} wrap no linear module of this model (another base model?); its linear modules look like {sample:?}",
                self.what(),
                t.target_modules
            )));
        }
        Ok(notes)
    }
}

/// Attach LoRA / IA3 adapter `cfg` to a model's store, the same way for
/// every body: the whole base freezes; `modules_to_save` train fully (for
/// SEQ_CLS PEFT adds the head, `classifier` / `score`); the adapter's
/// parameters are added to every targeted linear module (prompt tuning:
/// [`prompt_tuning::attach`]). New weights draw from `rng`. Returns notes
/// for the user.
pub fn attach(
    store: &mut ParamStore,
    cfg: &AdapterConfig,
    task: PeftTask,
    rng: &mut dyn rand::RngCore,
) -> Result<Vec<String>> {
    store.freeze_all();
    let mut to_save: Vec<String> = cfg.modules_to_save().to_vec();
    if task == PeftTask::SeqCls {
        for m in task.output_modules() {
            if !to_save.iter().any(|x| x == m) {
                to_save.push(m.to_string());
            }
        }
    }
    let linears = linear_modules(store);
    for (path, _, _) in &linears {
        if to_save.iter().any(|m| matches_key(path, m)) {
            store.make_trainable(&format!("{path}.weight"))?;
            store.make_trainable(&format!("{path}.bias"))?;
        }
    }
    let mut cfg = cfg.clone();
    if let Some(t) = cfg.targeting_mut() {
        t.modules_to_save = to_save;
    }
    cfg.apply(store, &linears, task.output_modules(), rng)
}

/// Linear modules of a store: every 2-d `{path}.weight` outside the
/// embeddings, f32 or kept quantised, in name order.
pub fn linear_modules(store: &ParamStore) -> Vec<(String, usize, usize)> {
    let f32s = store.iter().map(|(n, p)| (n, p.tensor.dims().to_vec()));
    let quantized = store.quantized().map(|(n, q)| (n, q.shape().to_vec()));
    // Name order across both maps (the LoRA init draws from one RNG in this order).
    let mut all: Vec<(&String, Vec<usize>)> = f32s.chain(quantized).collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    all.into_iter()
        .filter_map(|(n, d)| {
            let path = n.strip_suffix(".weight")?;
            // Embedding tables are 2-D too, but not linear layers.
            let embedding = path.contains("embeddings")
                || path.ends_with("embed_tokens")
                || path.ends_with(".wte")
                || path.ends_with(".wpe");
            (d.len() == 2 && !embedding && !peft::is_adapter_tensor(n))
                .then(|| (path.to_string(), d[0], d[1]))
        })
        .collect()
}

/// Every base parameter with the adapters folded in (LoRA: W + s B A; DoRA:
/// magnitude-rescaled rows; IA3: W and, on outputs, the bias scaled): a plain
/// f32 checkpoint that transformers loads without PEFT. Weights kept
/// quantised are dequantised (then merged, where adapted).
pub fn merged_state(store: &ParamStore) -> Result<BTreeMap<String, Tensor>> {
    if store
        .adapters_merged
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(Error::msg(
            "adapters are merged in place already: unmerge first",
        ));
    }
    let mut out = BTreeMap::new();
    for (name, p) in store.iter() {
        if !peft::is_adapter_tensor(name) {
            // f32 also for a bf16 base trained on a GPU
            out.insert(
                name.clone(),
                p.tensor.detach().to_dtype(candle_core::DType::F32)?,
            );
        }
    }
    for (name, q) in store.quantized() {
        // Adapted ones are dequantised by `merged` below.
        let adapted = name
            .strip_suffix(".weight")
            .is_some_and(|p| store.adapters.contains_key(p));
        if !adapted {
            out.insert(name.clone(), crate::params::dequantize(q)?);
        }
    }
    for path in store.adapters.keys() {
        let (mw, mb, _) = adapted_linear(store, path)?.merged()?;
        out.insert(format!("{path}.weight"), mw);
        if let Some(b) = mb {
            out.insert(format!("{path}.bias"), b);
        }
    }
    Ok(out)
}

/// The wrapped linear module at `path`, as the model loads it.
fn adapted_linear(store: &ParamStore, path: &str) -> Result<Linear> {
    let (o, i) = match store.dims(&format!("{path}.weight")).as_deref() {
        Some(&[o, i]) => (o, i),
        Some(d) => {
            return Err(Error::msg(format!(
                "adapter on `{path}` but `{path}.weight` is {d:?}, not 2-D"
            )))
        }
        None => {
            return Err(Error::msg(format!(
                "adapter on `{path}` but no `{path}.weight`"
            )))
        }
    };
    let bias = store.contains(&format!("{path}.bias"));
    crate::params::Path::root(store, path).linear(i, o, bias)
}

/// The f32 base weight of an adapted linear (merging in place needs one).
fn f32_weight<'a>(lin: &'a Linear, path: &str) -> Result<&'a crate::nn::Weight> {
    lin.weight.as_f32().ok_or_else(|| {
        Error::msg(format!(
            "cannot merge in place into the quantized base weight `{path}.weight`"
        ))
    })
}

/// Overwrite a tensor's values in place (a frozen base weight when merging).
struct Assign<'a>(&'a [f32]);

impl candle_core::InplaceOp1 for Assign<'_> {
    fn name(&self) -> &'static str {
        "afinar-assign"
    }
    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(v) = s else {
            return Err(candle_core::Error::Msg("assign: f32 only".into()));
        };
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("assign: contiguous only".into()))?;
        v[a..b].copy_from_slice(self.0);
        Ok(())
    }
}

fn assign(t: &Tensor, values: &Tensor) -> Result<()> {
    let v = values.flatten_all()?.to_vec1::<f32>()?;
    t.inplace_op1(&Assign(&v))?;
    Ok(())
}

/// Fold every adapter into its base weight, in place, as PEFT's `merge`:
/// afterwards the model computes with the merged weights alone (the
/// adapter path is skipped). Returns what [`unmerge`] needs (DoRA's row
/// factors, as PEFT caches them).
pub fn merge(store: &ParamStore) -> Result<MergeCache> {
    use std::sync::atomic::Ordering;
    if store.adapters_merged.load(Ordering::SeqCst) {
        return Err(Error::msg("adapters are already merged"));
    }
    // Checked before anything is written: a merge is all or nothing.
    if let Some(path) = store
        .adapters
        .keys()
        .find(|p| store.is_quantized(&format!("{p}.weight")))
    {
        return Err(Error::msg(format!(
            "cannot merge in place into the quantized base weight `{path}.weight`: \
             merged_state() gives merged f32 weights, or load with base_dtype = \"f32\""
        )));
    }
    let mut cache = MergeCache::default();
    for path in store.adapters.keys() {
        let lin = adapted_linear(store, path)?;
        let (mw, mb, aux) = lin.merged()?;
        if let Some(aux) = aux {
            cache.aux.insert(path.clone(), aux);
        }
        assign(&f32_weight(&lin, path)?.t, &mw)?;
        if let (Some(b), Some(mb)) = (&lin.bias, mb) {
            assign(&b.t, &mb)?;
        }
    }
    store.adapters_merged.store(true, Ordering::SeqCst);
    Ok(cache)
}

/// What [`merge`] kept for [`unmerge`], by module path (DoRA's row factors).
#[derive(Default)]
pub struct MergeCache {
    aux: BTreeMap<String, Tensor>,
}

/// Undo [`merge`] by inverting it (LoRA: W = W' - s B A; DoRA: W = W' / f -
/// s B A; IA3: divide by l): the base comes back to float rounding.
pub fn unmerge(store: &ParamStore, cache: &MergeCache) -> Result<()> {
    use std::sync::atomic::Ordering;
    if !store.adapters_merged.load(Ordering::SeqCst) {
        return Err(Error::msg("adapters are not merged"));
    }
    for path in store.adapters.keys() {
        let lin = adapted_linear(store, path)?;
        let Some(a) = &lin.adapter else { continue };
        let wt = &f32_weight(&lin, path)?.t;
        let b = lin.bias.as_ref().map(|b| b.t.detach());
        let (w0, b0) = a.unmerge(&wt.detach(), b.as_ref(), cache.aux.get(path))?;
        assign(wt, &w0)?;
        if let (Some(bias), Some(b0)) = (&lin.bias, b0) {
            assign(&bias.t, &b0)?;
        }
    }
    store.adapters_merged.store(false, Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests;
