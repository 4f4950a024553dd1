//! Adapters: LoRA (+ DoRA) and IA3 on any linear layer, with Hugging Face
//! PEFT's semantics and files (`adapter_config.json`,
//! `adapter_model.safetensors`), so adapters move between afinar and PEFT.
//!
//! Follows PEFT 0.21: `tuners/lora/{config,layer,dora}.py`,
//! `tuners/ia3/layer.py`, target matching of `tuners/tuners_utils.py`.
//! The base weights stay frozen: an adapter adds parameters under the
//! wrapped module's path (`{path}.lora_A.weight`, `{path}.ia3_l`, ...) that
//! are the only trainable ones besides `modules_to_save`.

pub mod peft;
pub mod prompt_tuning;

use crate::params::ParamStore;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `target_modules` as PEFT takes it: a list (exact name or `.name` suffix),
/// one string (a full-match regex), or `"all-linear"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    One(String),
}

impl Default for Targets {
    fn default() -> Self {
        Targets::List(vec![])
    }
}

/// `rank_pattern` / `alpha_pattern`: pattern -> value, in the order written.
/// PEFT takes the first pattern (in dict order) that matches a module, so the
/// order of the file or the TOML table is kept, not sorted.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Patterns<T>(pub Vec<(String, T)>);

impl<T> Patterns<T> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &(String, T)> {
        self.0.iter()
    }
}

impl<T: Serialize> Serialize for Patterns<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patterns<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Patterns<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of pattern = value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Patterns(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdapterType {
    Lora,
    Ia3,
    /// Soft-prompt embeddings prepended to the input (Lester et al. 2021;
    /// PEFT's PROMPT_TUNING); the whole base is frozen.
    #[serde(rename = "prompt_tuning")]
    PromptTuning,
}

fn d_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_init() -> String {
    "kaiming".into()
}

/// `[adapter]` of a run config (PEFT's `LoraConfig` / `IA3Config` names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    #[serde(rename = "type")]
    pub kind: AdapterType,
    #[serde(default = "d_r")]
    pub r: usize,
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub target_modules: Targets,
    #[serde(default)]
    pub exclude_modules: Vec<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub rank_pattern: Patterns<usize>,
    #[serde(default)]
    pub alpha_pattern: Patterns<f64>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    /// "kaiming" (PEFT's default, `true`) or "gaussian".
    #[serde(default = "d_init")]
    pub init_lora_weights: String,
    /// Modules trained fully and saved with the adapter (the new head).
    #[serde(default)]
    pub modules_to_save: Vec<String>,
    /// IA3: modules whose *input* is scaled (a subset of target_modules).
    #[serde(default)]
    pub feedforward_modules: Vec<String>,
    /// A target entry that matches nothing is an error unless this is set.
    #[serde(default)]
    pub allow_unmatched: bool,
    /// Prompt tuning: number of virtual tokens.
    #[serde(default)]
    pub num_virtual_tokens: usize,
    /// Prompt tuning: "random" (N(0, 1), as PEFT's nn.Embedding),
    /// "sample_vocab" (embeddings of random vocabulary tokens) or "text"
    /// (the embeddings of `prompt_tuning_init_text`, repeated to length).
    #[serde(default = "d_pt_init")]
    pub prompt_tuning_init: String,
    pub prompt_tuning_init_text: Option<String>,
    /// Prompt tuning: the model's shape, recorded in adapter_config.json as
    /// PEFT records it (filled in from the model; not for the run TOML).
    #[serde(default, skip_serializing)]
    pub token_dim: Option<usize>,
    #[serde(default, skip_serializing)]
    pub num_layers: Option<usize>,
    #[serde(default, skip_serializing)]
    pub num_attention_heads: Option<usize>,
    /// PEFT's flag for Conv1D bases (GPT-2), written into adapter_config.json
    /// (filled in from the model; not for the run TOML).
    #[serde(default, skip_serializing)]
    pub fan_in_fan_out: bool,
    /// The `adapter_config.json` this was read from, named in errors (not
    /// for the run TOML).
    #[serde(skip)]
    pub source: Option<std::path::PathBuf>,
}

fn d_pt_init() -> String {
    "random".into()
}

/// PEFT's LoraConfig defaults (r 8, alpha 8, no target yet).
impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig {
            kind: AdapterType::Lora,
            r: d_r(),
            lora_alpha: d_alpha(),
            lora_dropout: 0.0,
            target_modules: Targets::List(vec![]),
            exclude_modules: vec![],
            layers_to_transform: None,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: d_init(),
            modules_to_save: vec![],
            feedforward_modules: vec![],
            allow_unmatched: false,
            num_virtual_tokens: 0,
            prompt_tuning_init: d_pt_init(),
            prompt_tuning_init_text: None,
            token_dim: None,
            num_layers: None,
            num_attention_heads: None,
            fan_in_fan_out: false,
            source: None,
        }
    }
}

impl std::fmt::Display for Targets {
    /// As written in the config: `["query", "value"]` or `"all-linear"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::List(v) => write!(f, "{v:?}"),
            Targets::One(s) => write!(f, "{s:?}"),
        }
    }
}

/// What wraps one linear module.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterMeta {
    Lora {
        r: usize,
        scale: f64,
        dropout: f32,
        dora: bool,
    },
    Ia3 {
        feedforward: bool,
    },
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

/// PEFT's `get_pattern_key`: the first pattern `p` (in the order written)
/// with `(.*\.)?p$` matching.
fn pattern_value<T: Copy>(patterns: &Patterns<T>, name: &str) -> Result<Option<T>> {
    for (p, v) in patterns.iter() {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{p})$"))
            .map_err(|e| Error::msg(format!("bad pattern `{p}`: {e}")))?;
        if re.is_match(name) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

/// Several patterns with different values matching one module: the first
/// one written wins (as in PEFT), but `adapter_config.json` is written with
/// sorted keys (as PEFT writes it), so a reload may pick another one.
fn warn_ambiguous<T: Copy + PartialEq + std::fmt::Display>(
    what: &str,
    patterns: &Patterns<T>,
    name: &str,
) {
    let hits: Vec<&(String, T)> = patterns
        .iter()
        .filter(|(p, _)| {
            Regex::new(&format!(r"^(?:.*\.)?(?:{p})$")).is_ok_and(|re| re.is_match(name))
        })
        .collect();
    if hits.len() > 1 && hits.iter().any(|(_, v)| *v != hits[0].1) {
        let list: Vec<String> = hits.iter().map(|(p, v)| format!("`{p}` = {v}")).collect();
        eprintln!(
            "warning: {what}: {} all match `{name}`; the first one is used here, but the saved adapter_config.json sorts them",
            list.join(", ")
        );
    }
}

impl AdapterConfig {
    /// "adapter" or "adapter <its adapter_config.json>", to begin an error.
    fn what(&self) -> String {
        match &self.source {
            Some(p) => format!("adapter {}", p.display()),
            None => "adapter".into(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("adapter: {m}")));
        if self.kind == AdapterType::Lora {
            if self.r == 0 {
                return bad("`r` must be > 0".into());
            }
            if !(self.lora_alpha > 0.0) {
                return bad(format!("`lora_alpha` must be > 0, got {}", self.lora_alpha));
            }
            if !(0.0..1.0).contains(&self.lora_dropout) {
                return bad(format!(
                    "`lora_dropout` {} is not in [0, 1)",
                    self.lora_dropout
                ));
            }
            for (k, v) in self.rank_pattern.iter() {
                if *v == 0 {
                    return bad(format!("rank_pattern `{k}` = 0: r must be > 0"));
                }
            }
            for (k, v) in self.alpha_pattern.iter() {
                if !(*v > 0.0) {
                    return bad(format!("alpha_pattern `{k}` = {v}: lora_alpha must be > 0"));
                }
            }
            if !matches!(self.init_lora_weights.as_str(), "kaiming" | "gaussian") {
                return bad(format!(
                    "`init_lora_weights` = `{}` (kaiming, gaussian)",
                    self.init_lora_weights
                ));
            }
        }
        if self.kind == AdapterType::Ia3 {
            if self.use_dora {
                return bad("`use_dora` is a LoRA option".into());
            }
            if let Targets::List(t) = &self.target_modules {
                for f in &self.feedforward_modules {
                    if !t.contains(f) {
                        return bad(format!("feedforward module `{f}` is not in target_modules (PEFT requires a subset)"));
                    }
                }
            }
        }
        if self.kind == AdapterType::PromptTuning {
            if self.num_virtual_tokens == 0 {
                return bad("prompt tuning needs `num_virtual_tokens` > 0".into());
            }
            match self.prompt_tuning_init.to_ascii_lowercase().as_str() {
                "random" | "sample_vocab" => {}
                "text" => {
                    if self
                        .prompt_tuning_init_text
                        .as_deref()
                        .is_none_or(|t| t.is_empty())
                    {
                        return bad(
                            "prompt_tuning_init = \"text\" needs `prompt_tuning_init_text`".into(),
                        );
                    }
                }
                other => {
                    return bad(format!(
                        "`prompt_tuning_init` = `{other}` (random, sample_vocab, text)"
                    ))
                }
            }
            if !matches!(&self.target_modules, Targets::List(v) if v.is_empty()) {
                return bad("prompt tuning wraps no module: leave `target_modules` out".into());
            }
            return Ok(());
        }
        if self.num_virtual_tokens != 0 {
            return bad("`num_virtual_tokens` is a prompt-tuning option".into());
        }
        if matches!(&self.target_modules, Targets::List(v) if v.is_empty()) {
            return bad("`target_modules` is empty".into());
        }
        Ok(())
    }

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

    /// Add the adapter's parameters for every targeted linear module of the
    /// store (`linears`: module path, out, in) and record how each is
    /// wrapped. New parameters are initialised as PEFT does (LoRA: A
    /// kaiming-uniform(a = sqrt 5) or N(0, 1/r), B = 0; DoRA magnitude = the
    /// base weight's row norms; IA3 = 1), so the adapted model starts equal
    /// to the base.
    pub fn apply(
        &self,
        store: &mut ParamStore,
        linears: &[(String, usize, usize)],
        head: &[&str],
        rng: &mut impl Rng,
    ) -> Result<Vec<String>> {
        self.validate()?;
        if self.kind == AdapterType::PromptTuning {
            return Err(Error::msg(
                "adapter: prompt tuning wraps no linear module (it is applied to the input embeddings of a decoder)",
            ));
        }
        let mut wrapped = Vec::new();
        for (path, out_f, in_f) in linears {
            if self.modules_to_save.iter().any(|m| matches_key(path, m))
                || !self.targeted(path, head)?
            {
                continue;
            }
            let meta = match self.kind {
                AdapterType::Lora => {
                    warn_ambiguous("rank_pattern", &self.rank_pattern, path);
                    warn_ambiguous("alpha_pattern", &self.alpha_pattern, path);
                    let r = pattern_value(&self.rank_pattern, path)?.unwrap_or(self.r);
                    let alpha =
                        pattern_value(&self.alpha_pattern, path)?.unwrap_or(self.lora_alpha);
                    let scale = if self.use_rslora {
                        alpha / (r as f64).sqrt()
                    } else {
                        alpha / r as f64
                    };
                    let a = match self.init_lora_weights.as_str() {
                        "gaussian" => crate::params::normal_init(&[r, *in_f], 1.0 / r as f64, rng)?,
                        _ => {
                            let bound = 1.0 / (*in_f as f64).sqrt();
                            let v: Vec<f32> = (0..r * in_f)
                                .map(|_| rng.gen_range(-bound..bound) as f32)
                                .collect();
                            Tensor::from_vec(v, (r, *in_f), &Device::Cpu)?
                        }
                    };
                    store.insert_trainable(&format!("{path}.lora_A.weight"), a)?;
                    store.insert_trainable(
                        &format!("{path}.lora_B.weight"),
                        Tensor::zeros((*out_f, r), candle_core::DType::F32, &Device::Cpu)?,
                    )?;
                    if self.use_dora {
                        if store.is_quantized(&format!("{path}.weight")) {
                            return Err(crate::nn::linear::dora_quantized_error(path));
                        }
                        let w = store.get(&format!("{path}.weight"), &[*out_f, *in_f])?;
                        let norms = w.t.sqr()?.sum(1)?.sqrt()?;
                        store.insert_trainable(&format!("{path}.lora_magnitude_vector"), norms)?;
                    }
                    AdapterMeta::Lora {
                        r,
                        scale,
                        dropout: self.lora_dropout,
                        dora: self.use_dora,
                    }
                }
                AdapterType::PromptTuning => unreachable!("refused above"),
                AdapterType::Ia3 => {
                    let ff = self
                        .feedforward_modules
                        .iter()
                        .any(|m| matches_key(path, m));
                    let shape = if ff { (1, *in_f) } else { (*out_f, 1) };
                    store.insert_trainable(
                        &format!("{path}.ia3_l"),
                        Tensor::ones(shape, candle_core::DType::F32, &Device::Cpu)?,
                    )?;
                    AdapterMeta::Ia3 { feedforward: ff }
                }
            };
            store.adapters.insert(path.clone(), meta);
            wrapped.push(path.clone());
        }
        // PEFT accepts a list where only some entries match (peft#1959);
        // afinar names the ones that matched nothing.
        if let Targets::List(keys) = &self.target_modules {
            let unmatched: Vec<&String> = keys
                .iter()
                .filter(|k| !linears.iter().any(|(p, _, _)| matches_key(p, k)))
                .collect();
            if !unmatched.is_empty() {
                let sample: Vec<&str> =
                    linears.iter().take(8).map(|(p, _, _)| p.as_str()).collect();
                if !self.allow_unmatched {
                    return Err(Error::msg(format!(
                        "{}: target_modules {unmatched:?} match no linear module (set allow_unmatched = true to ignore); modules look like {sample:?}",
                        self.what()
                    )));
                }
                if !wrapped.is_empty() {
                    eprintln!(
                        "warning: {}: target_modules {unmatched:?} match no linear module (allow_unmatched = true)",
                        self.what()
                    );
                }
            }
        }
        if wrapped.is_empty() {
            let sample: Vec<&str> = linears.iter().take(8).map(|(p, _, _)| p.as_str()).collect();
            return Err(Error::msg(format!(
                "{}: target_modules {} wrap no linear module of this model (another base model?); its linear modules look like {sample:?}",
                self.what(),
                self.target_modules
            )));
        }
        Ok(wrapped)
    }
}

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

/// Attach adapter `cfg` to a model's store, the same way for every body:
/// the whole base freezes; `modules_to_save` train fully (for SEQ_CLS PEFT
/// adds the head, `classifier` / `score`); the adapter's parameters are
/// added to every targeted linear module (prompt tuning is attached to the
/// input embeddings by its caller). New weights draw from `rng`.
pub fn attach(
    store: &mut ParamStore,
    cfg: &AdapterConfig,
    task: PeftTask,
    rng: &mut impl Rng,
) -> Result<Vec<String>> {
    store.freeze_all();
    let mut ad = cfg.clone();
    if task == PeftTask::SeqCls {
        for m in task.output_modules() {
            if !ad.modules_to_save.iter().any(|x| x == m) {
                ad.modules_to_save.push(m.to_string());
            }
        }
    }
    let linears = linear_modules(store);
    for (path, _, _) in &linears {
        if ad.modules_to_save.iter().any(|m| matches_key(path, m)) {
            store.make_trainable(&format!("{path}.weight"))?;
            store.make_trainable(&format!("{path}.bias"))?;
        }
    }
    ad.apply(store, &linears, task.output_modules(), rng)
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
            (d.len() == 2 && !embedding && !n.contains(".lora_"))
                .then(|| (path.to_string(), d[0], d[1]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_key_matching_and_layers() {
        assert!(matches_key(
            "bert.encoder.layer.0.attention.self.query",
            "query"
        ));
        assert!(matches_key(
            "bert.encoder.layer.0.attention.output.dense",
            "output.dense"
        ));
        assert!(!matches_key(
            "bert.encoder.layer.0.attention.self.query",
            "uery"
        ));
        assert_eq!(layer_index("bert.encoder.layer.11.output.dense"), Some(11));
        assert_eq!(layer_index("classifier"), None);
        // The first pattern written wins, as in PEFT (not the sorted first).
        #[derive(Deserialize)]
        struct T {
            p: Patterns<usize>,
        }
        let o: T = toml::from_str("[p]\nz = 1\nvalue = 2\n").unwrap();
        assert_eq!(o.p.0[0].0, "z", "TOML document order is kept");
        let v = "bert.encoder.layer.0.attention.self.value";
        let j: Patterns<usize> =
            serde_json::from_str(r#"{"value": 4, "layer.0.attention.self.value": 5}"#).unwrap();
        assert_eq!(pattern_value(&j, v).unwrap(), Some(4));
        let j: Patterns<usize> =
            serde_json::from_str(r#"{"layer.0.attention.self.value": 5, "value": 4}"#).unwrap();
        assert_eq!(pattern_value(&j, v).unwrap(), Some(5));
        let p = Patterns(vec![("value".to_string(), 2usize)]);
        assert_eq!(
            pattern_value(&p, "bert.encoder.layer.0.attention.self.value").unwrap(),
            Some(2)
        );
        assert_eq!(
            pattern_value(&p, "bert.encoder.layer.0.attention.self.query").unwrap(),
            None
        );
    }
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
        let is_adapter = name.contains(".lora_A.")
            || name.contains(".lora_B.")
            || name.ends_with(".lora_magnitude_vector")
            || name.ends_with(".ia3_l");
        if !is_adapter {
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
        let (mw, mb) = adapted_linear(store, path)?.merged()?;
        out.insert(format!("{path}.weight"), mw);
        if let Some(b) = mb {
            out.insert(format!("{path}.bias"), b);
        }
    }
    Ok(out)
}

/// The wrapped linear module at `path`, as the model loads it.
fn adapted_linear(store: &ParamStore, path: &str) -> Result<crate::nn::linear::Linear> {
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
    crate::nn::linear::Linear::load_with(&crate::params::Path::root(store, path), i, o, bias)
}

/// The f32 base weight of an adapted linear (merging in place needs one).
fn f32_weight<'a>(lin: &'a crate::nn::linear::Linear, path: &str) -> Result<&'a crate::nn::Weight> {
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
/// adapter path is skipped). Returns what [`unmerge`] needs (DoRA's
/// row factors, as PEFT caches them).
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
        let (mw, mb) = lin.merged()?;
        if let Some(crate::nn::linear::Adapter::Lora {
            magnitude: Some(m), ..
        }) = &lin.adapter
        {
            // factor = m / |W + s B A|, per row (mw = factor * (W + s B A)).
            let (wpre, _) = crate::nn::linear::Linear {
                adapter: lin.adapter.clone().map(|a| match a {
                    crate::nn::linear::Adapter::Lora {
                        a,
                        b,
                        scale,
                        dropout,
                        ..
                    } => crate::nn::linear::Adapter::Lora {
                        a,
                        b,
                        scale,
                        dropout,
                        magnitude: None,
                    },
                    other => other,
                }),
                ..lin.clone()
            }
            .merged()?;
            let norm = wpre.sqr()?.sum(1)?.sqrt()?;
            cache
                .dora_factor
                .insert(path.clone(), (m.t.detach() / norm)?);
        }
        assign(&f32_weight(&lin, path)?.t, &mw)?;
        if let (Some(b), Some(mb)) = (&lin.bias, mb) {
            assign(&b.t, &mb)?;
        }
    }
    store.adapters_merged.store(true, Ordering::SeqCst);
    Ok(cache)
}

/// DoRA's cached row factors from [`merge`].
#[derive(Default)]
pub struct MergeCache {
    dora_factor: BTreeMap<String, Tensor>,
}

/// Undo [`merge`] by inverting it (W = W' - s B A; DoRA: W = W' / f - s B A;
/// IA3: divide by l): the base comes back to float rounding.
pub fn unmerge(store: &ParamStore, cache: &MergeCache) -> Result<()> {
    use crate::nn::linear::Adapter;
    use std::sync::atomic::Ordering;
    if !store.adapters_merged.load(Ordering::SeqCst) {
        return Err(Error::msg("adapters are not merged"));
    }
    for path in store.adapters.keys() {
        let lin = adapted_linear(store, path)?;
        let wt = &f32_weight(&lin, path)?.t;
        let w = wt.detach();
        match &lin.adapter {
            Some(Adapter::Lora {
                a,
                b,
                scale,
                magnitude,
                ..
            }) => {
                let delta = (b.t.detach().matmul(&a.t.detach())? * *scale)?;
                let w0 = match magnitude {
                    None => (&w - delta)?,
                    Some(_) => {
                        let f = cache.dora_factor.get(path).ok_or_else(|| {
                            Error::msg(format!("no DoRA factor cached for {path}"))
                        })?;
                        (w.broadcast_div(&f.unsqueeze(1)?)? - delta)?
                    }
                };
                assign(wt, &w0)?;
            }
            Some(Adapter::Ia3 {
                l,
                feedforward: false,
            }) => {
                let l = l.t.detach();
                assign(wt, &w.broadcast_div(&l)?)?;
                if let Some(bias) = &lin.bias {
                    assign(&bias.t, &bias.t.detach().div(&l.flatten_all()?)?)?;
                }
            }
            Some(Adapter::Ia3 {
                l,
                feedforward: true,
            }) => assign(wt, &w.broadcast_div(&l.t.detach())?)?,
            None => {}
        }
    }
    store.adapters_merged.store(false, Ordering::SeqCst);
    Ok(())
}
