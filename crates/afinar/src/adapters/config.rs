//! `[adapter]` of a run config, as a tagged enum: one variant per method
//! with PEFT's field names (`LoraConfig`, `IA3Config`,
//! `PromptTuningConfig`). The TOML is read into one flat table first
//! (unknown keys refused with their line), then each method takes its own
//! fields and refuses another method's, naming the key.

use crate::modes::opt_mode;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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

impl std::fmt::Display for Targets {
    /// As written in the config: `["query", "value"]` or `"all-linear"`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::List(v) => write!(f, "{v:?}"),
            Targets::One(s) => write!(f, "{s:?}"),
        }
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

/// The adapter method: `type` of `[adapter]`.
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

/// `init_lora_weights`: how LoRA's A starts (B starts at 0 either way).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InitLoraWeights {
    /// Kaiming-uniform (a = sqrt 5), PEFT's `true`.
    #[default]
    Kaiming,
    /// N(0, 1/r).
    Gaussian,
}

/// `prompt_tuning_init`: where the soft prompt starts.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PromptTuningInit {
    /// N(0, 1), as PEFT's nn.Embedding.
    #[default]
    Random,
    /// The embeddings of random vocabulary tokens.
    SampleVocab,
    /// The embeddings of `prompt_tuning_init_text`, repeated to length.
    Text,
}

/// Which linear modules a LoRA / IA3 adapter wraps, and what trains fully
/// beside it (PEFT's `target_modules` matching).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targeting {
    pub target_modules: Targets,
    pub exclude_modules: Vec<String>,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Modules trained fully and saved with the adapter (the new head).
    pub modules_to_save: Vec<String>,
    /// A target entry that matches nothing is an error unless this is set.
    pub allow_unmatched: bool,
    /// PEFT's flag for Conv1D bases (GPT-2), written into
    /// adapter_config.json (set from the model, not from the run TOML).
    pub fan_in_fan_out: bool,
    /// The `adapter_config.json` this was read from, named in errors.
    pub source: Option<PathBuf>,
}

/// PEFT's `LoraConfig` (DoRA: `use_dora`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub targeting: Targeting,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub rank_pattern: Patterns<usize>,
    pub alpha_pattern: Patterns<f64>,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub init_lora_weights: InitLoraWeights,
}

/// PEFT's `IA3Config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Config {
    pub targeting: Targeting,
    /// Modules whose *input* is scaled (a subset of target_modules).
    pub feedforward_modules: Vec<String>,
}

/// PEFT's `PromptTuningConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    pub prompt_tuning_init: PromptTuningInit,
    pub prompt_tuning_init_text: Option<String>,
    /// The model's shape, recorded in adapter_config.json as PEFT records
    /// it (set from the model, not from the run TOML).
    pub token_dim: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
}

/// `[adapter]` of a run config: the method and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawAdapter", into = "RawAdapter")]
pub enum AdapterConfig {
    Lora(LoraConfig),
    Ia3(Ia3Config),
    PromptTuning(PromptTuningConfig),
}

/// PEFT's LoraConfig defaults (r 8, alpha 8, no target yet).
impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            targeting: Targeting::default(),
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            rank_pattern: Patterns::default(),
            alpha_pattern: Patterns::default(),
            use_rslora: false,
            use_dora: false,
            init_lora_weights: InitLoraWeights::Kaiming,
        }
    }
}

/// The flat `[adapter]` table as written: every method's keys, each optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdapter {
    #[serde(rename = "type", default, deserialize_with = "opt_mode")]
    kind: Option<AdapterType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_modules: Option<Targets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exclude_modules: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    layers_to_transform: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank_pattern: Option<Patterns<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alpha_pattern: Option<Patterns<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_rslora: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_dora: Option<bool>,
    #[serde(
        default,
        deserialize_with = "opt_mode",
        skip_serializing_if = "Option::is_none"
    )]
    init_lora_weights: Option<InitLoraWeights>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modules_to_save: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    feedforward_modules: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_unmatched: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_virtual_tokens: Option<usize>,
    #[serde(
        default,
        deserialize_with = "opt_mode",
        skip_serializing_if = "Option::is_none"
    )]
    prompt_tuning_init: Option<PromptTuningInit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tuning_init_text: Option<String>,
}

impl RawAdapter {
    /// The keys given that `kind` does not take. A key of another method
    /// holding the default that afinar before typed adapter configs wrote
    /// for it (every key, every method: `r = 8`, `feedforward_modules = []`,
    /// `num_virtual_tokens = 0`, ...) is not counted, so the `config.toml` of
    /// an older run folder still loads; any other value is refused.
    fn foreign_keys(&self, kind: AdapterType) -> Vec<&'static str> {
        fn set<T: PartialEq>(v: &Option<T>, old_default: T) -> bool {
            v.as_ref().is_some_and(|v| *v != old_default)
        }
        fn listed<T>(v: &Option<Vec<T>>) -> bool {
            v.as_ref().is_some_and(|v| !v.is_empty())
        }
        let lora_only = [
            ("r", set(&self.r, 8)),
            ("lora_alpha", set(&self.lora_alpha, 8.0)),
            ("lora_dropout", set(&self.lora_dropout, 0.0)),
            (
                "rank_pattern",
                self.rank_pattern.as_ref().is_some_and(|p| !p.is_empty()),
            ),
            (
                "alpha_pattern",
                self.alpha_pattern.as_ref().is_some_and(|p| !p.is_empty()),
            ),
            ("use_rslora", set(&self.use_rslora, false)),
            ("use_dora", set(&self.use_dora, false)),
            (
                "init_lora_weights",
                set(&self.init_lora_weights, InitLoraWeights::default()),
            ),
        ];
        let targeting = [
            (
                "target_modules",
                set(&self.target_modules, Targets::List(vec![])),
            ),
            ("exclude_modules", listed(&self.exclude_modules)),
            ("layers_to_transform", self.layers_to_transform.is_some()),
            ("modules_to_save", listed(&self.modules_to_save)),
            ("allow_unmatched", set(&self.allow_unmatched, false)),
        ];
        let ia3_only = [("feedforward_modules", listed(&self.feedforward_modules))];
        let prompt_only = [
            ("num_virtual_tokens", set(&self.num_virtual_tokens, 0)),
            (
                "prompt_tuning_init",
                set(&self.prompt_tuning_init, PromptTuningInit::default()),
            ),
            (
                "prompt_tuning_init_text",
                self.prompt_tuning_init_text.is_some(),
            ),
        ];
        let foreign: Vec<(&'static str, bool)> = match kind {
            AdapterType::Lora => [&ia3_only[..], &prompt_only[..]].concat(),
            AdapterType::Ia3 => [&lora_only[..], &prompt_only[..]].concat(),
            AdapterType::PromptTuning => [&lora_only[..], &ia3_only[..], &targeting[..]].concat(),
        };
        foreign
            .into_iter()
            .filter(|(_, given)| *given)
            .map(|(k, _)| k)
            .collect()
    }

    fn targeting(&self) -> Targeting {
        Targeting {
            target_modules: self.target_modules.clone().unwrap_or_default(),
            exclude_modules: self.exclude_modules.clone().unwrap_or_default(),
            layers_to_transform: self.layers_to_transform.clone(),
            modules_to_save: self.modules_to_save.clone().unwrap_or_default(),
            allow_unmatched: self.allow_unmatched.unwrap_or(false),
            fan_in_fan_out: false,
            source: None,
        }
    }
}

impl TryFrom<RawAdapter> for AdapterConfig {
    type Error = String;
    fn try_from(raw: RawAdapter) -> std::result::Result<Self, String> {
        let kind = raw
            .kind
            .ok_or("missing field `type` (lora, ia3, prompt_tuning)")?;
        let foreign = raw.foreign_keys(kind);
        if let Some(k) = foreign.first() {
            let name = match kind {
                AdapterType::Lora => "a lora",
                AdapterType::Ia3 => "an ia3",
                AdapterType::PromptTuning => "a prompt_tuning",
            };
            return Err(format!("`{k}` is not an option of {name} adapter"));
        }
        let d = LoraConfig::default();
        Ok(match kind {
            AdapterType::Lora => AdapterConfig::Lora(LoraConfig {
                targeting: raw.targeting(),
                r: raw.r.unwrap_or(d.r),
                lora_alpha: raw.lora_alpha.unwrap_or(d.lora_alpha),
                lora_dropout: raw.lora_dropout.unwrap_or(0.0),
                rank_pattern: raw.rank_pattern.unwrap_or_default(),
                alpha_pattern: raw.alpha_pattern.unwrap_or_default(),
                use_rslora: raw.use_rslora.unwrap_or(false),
                use_dora: raw.use_dora.unwrap_or(false),
                init_lora_weights: raw.init_lora_weights.unwrap_or_default(),
            }),
            AdapterType::Ia3 => AdapterConfig::Ia3(Ia3Config {
                targeting: raw.targeting(),
                feedforward_modules: raw.feedforward_modules.unwrap_or_default(),
            }),
            AdapterType::PromptTuning => AdapterConfig::PromptTuning(PromptTuningConfig {
                num_virtual_tokens: raw.num_virtual_tokens.unwrap_or(0),
                prompt_tuning_init: raw.prompt_tuning_init.unwrap_or_default(),
                prompt_tuning_init_text: raw.prompt_tuning_init_text,
                token_dim: None,
                num_layers: None,
                num_attention_heads: None,
            }),
        })
    }
}

impl From<AdapterConfig> for RawAdapter {
    fn from(c: AdapterConfig) -> Self {
        let targeting = |t: Targeting| RawAdapter {
            target_modules: Some(t.target_modules),
            exclude_modules: Some(t.exclude_modules).filter(|v| !v.is_empty()),
            layers_to_transform: t.layers_to_transform,
            modules_to_save: Some(t.modules_to_save).filter(|v| !v.is_empty()),
            allow_unmatched: Some(t.allow_unmatched).filter(|b| *b),
            ..Default::default()
        };
        match c {
            AdapterConfig::Lora(l) => RawAdapter {
                kind: Some(AdapterType::Lora),
                r: Some(l.r),
                lora_alpha: Some(l.lora_alpha),
                lora_dropout: Some(l.lora_dropout),
                rank_pattern: Some(l.rank_pattern).filter(|p| !p.is_empty()),
                alpha_pattern: Some(l.alpha_pattern).filter(|p| !p.is_empty()),
                use_rslora: Some(l.use_rslora),
                use_dora: Some(l.use_dora),
                init_lora_weights: Some(l.init_lora_weights),
                ..targeting(l.targeting)
            },
            AdapterConfig::Ia3(i) => RawAdapter {
                kind: Some(AdapterType::Ia3),
                feedforward_modules: Some(i.feedforward_modules),
                ..targeting(i.targeting)
            },
            AdapterConfig::PromptTuning(p) => RawAdapter {
                kind: Some(AdapterType::PromptTuning),
                num_virtual_tokens: Some(p.num_virtual_tokens),
                prompt_tuning_init: Some(p.prompt_tuning_init),
                prompt_tuning_init_text: p.prompt_tuning_init_text,
                ..Default::default()
            },
        }
    }
}

impl AdapterConfig {
    /// LoRA with rank `r` and `lora_alpha` on `targets` (PEFT's other
    /// defaults: no dropout, kaiming init).
    pub fn lora(targets: &[&str], r: usize, lora_alpha: f64) -> Self {
        AdapterConfig::Lora(LoraConfig {
            targeting: Targeting {
                target_modules: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
                ..Default::default()
            },
            r,
            lora_alpha,
            ..Default::default()
        })
    }

    pub fn kind(&self) -> AdapterType {
        match self {
            AdapterConfig::Lora(_) => AdapterType::Lora,
            AdapterConfig::Ia3(_) => AdapterType::Ia3,
            AdapterConfig::PromptTuning(_) => AdapterType::PromptTuning,
        }
    }

    /// Which modules it wraps (None: prompt tuning wraps none).
    pub fn targeting(&self) -> Option<&Targeting> {
        match self {
            AdapterConfig::Lora(c) => Some(&c.targeting),
            AdapterConfig::Ia3(c) => Some(&c.targeting),
            AdapterConfig::PromptTuning(_) => None,
        }
    }

    pub fn targeting_mut(&mut self) -> Option<&mut Targeting> {
        match self {
            AdapterConfig::Lora(c) => Some(&mut c.targeting),
            AdapterConfig::Ia3(c) => Some(&mut c.targeting),
            AdapterConfig::PromptTuning(_) => None,
        }
    }

    /// Modules trained fully beside the adapter.
    pub fn modules_to_save(&self) -> &[String] {
        self.targeting().map_or(&[], |t| &t.modules_to_save)
    }

    pub fn uses_dora(&self) -> bool {
        matches!(self, AdapterConfig::Lora(c) if c.use_dora)
    }

    /// "adapter" or "adapter <its adapter_config.json>", to begin an error.
    pub(crate) fn what(&self) -> String {
        match self.targeting().and_then(|t| t.source.as_ref()) {
            Some(p) => format!("adapter {}", p.display()),
            None => "adapter".into(),
        }
    }

    /// Check the values (the message begins "adapter: ", naming the key).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::msg(format!("adapter: {m}")));
        match self {
            AdapterConfig::Lora(c) => {
                if c.r == 0 {
                    return bad("`r` must be > 0".into());
                }
                if !(c.lora_alpha > 0.0) {
                    return bad(format!("`lora_alpha` must be > 0, got {}", c.lora_alpha));
                }
                if !(0.0..1.0).contains(&c.lora_dropout) {
                    return bad(format!(
                        "`lora_dropout` {} is not in [0, 1)",
                        c.lora_dropout
                    ));
                }
                for (k, v) in c.rank_pattern.iter() {
                    if *v == 0 {
                        return bad(format!("rank_pattern `{k}` = 0: r must be > 0"));
                    }
                }
                for (k, v) in c.alpha_pattern.iter() {
                    if !(*v > 0.0) {
                        return bad(format!("alpha_pattern `{k}` = {v}: lora_alpha must be > 0"));
                    }
                }
            }
            AdapterConfig::Ia3(c) => {
                if let Targets::List(t) = &c.targeting.target_modules {
                    for f in &c.feedforward_modules {
                        if !t.contains(f) {
                            return bad(format!("feedforward module `{f}` is not in target_modules (PEFT requires a subset)"));
                        }
                    }
                }
            }
            AdapterConfig::PromptTuning(c) => {
                if c.num_virtual_tokens == 0 {
                    return bad("prompt tuning needs `num_virtual_tokens` > 0".into());
                }
                if c.prompt_tuning_init == PromptTuningInit::Text
                    && c.prompt_tuning_init_text
                        .as_deref()
                        .is_none_or(|t| t.is_empty())
                {
                    return bad(
                        "prompt_tuning_init = \"text\" needs `prompt_tuning_init_text`".into(),
                    );
                }
                return Ok(());
            }
        }
        let t = self.targeting().expect("LoRA and IA3 target modules");
        if matches!(&t.target_modules, Targets::List(v) if v.is_empty()) {
            return bad("`target_modules` is empty".into());
        }
        Ok(())
    }
}
