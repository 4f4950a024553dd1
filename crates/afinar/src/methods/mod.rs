//! Methods: what a batch becomes as a loss, and the recipe that sets a run
//! up — model, head, adapter, data — and hands the objective to the loop
//! (`train::run_loop`). One file per method:
//!
//! - `classify`: sequence classification and regression with a new head on
//!   any body (BERT, Llama family, GPT-2);
//! - `sft`: instruction SFT of a decoder LM on chat or prompt/completion rows;
//! - `preference`: what reward models and DPO share: the losses
//!   (Bradley-Terry, DPO's sigmoid / hinge / IPO), TRL's pair metrics, a
//!   plan's pairs;
//! - `reward`: a reward model (scalar head, any body) on preference pairs;
//! - `dpo`: DPO of a decoder LM on preference pairs;
//! - `image`: image classification with a CNN (MobileNetV2) and a new head;
//! - `ppo`: RLHF with PPO: a policy, its reference, a value model and a
//!   reward (a reward-model run or a rule).
//!
//! `adding-an-objective.md` in `docs/` is the checklist for the next ones.

pub mod classify;
pub mod cosine;
pub mod dpo;
pub mod image;
pub mod pairs;
pub mod ppo;
pub mod preference;
pub mod reward;
pub mod sft;

use crate::adapters::{AdapterConfig, AdapterType, PeftTask};
use crate::config::{FreezePreset, Plan, TaskType};
use crate::event::Event;
use crate::models::{Family, ModelConfig};
use crate::params::{FreezeRules, ParamStore, Preset, Selector};
use crate::train::{TrainOptions, TrainReport};
use crate::{Error, Result};

/// Train as `plan` says, writing the run folder: the one entry point.
pub fn train(plan: &Plan, opts: &TrainOptions, on: &mut dyn FnMut(Event)) -> Result<TrainReport> {
    match plan.config.task.kind {
        TaskType::Classification | TaskType::Regression => classify::train(plan, opts, on),
        TaskType::Sft => sft::train(plan, opts, on),
        TaskType::Reward => reward::train(plan, opts, on),
        TaskType::Dpo => dpo::train(plan, opts, on),
        TaskType::Ppo => ppo::train(plan, opts, on),
        TaskType::ImageClassification => image::train(plan, opts, on),
    }
}

/// The selector of a plan's `[freeze]` section on a model laid out as
/// `cfg`, with a new head under `head` (patterns that always train).
pub fn selector(plan: &Plan, cfg: &ModelConfig, head: &[&str]) -> Result<Selector> {
    let f = &plan.config.freeze;
    // `Plan::validate` checked that `last_layers` is given with its preset.
    let preset = match f.preset {
        FreezePreset::Full => Preset::Full,
        FreezePreset::HeadOnly => Preset::HeadOnly,
        FreezePreset::LastLayers => Preset::LastLayers(f.last_layers.unwrap_or(0)),
    };
    let rules = FreezeRules {
        preset,
        embeddings: f.embeddings,
        first_layers: f.first_layers,
        frozen: f.frozen.clone(),
        trainable: f.trainable.clone(),
    };
    Selector::new(&rules, &crate::models::layout(cfg, head)).map_err(|e| Error::Config {
        path: plan.config_path.clone(),
        msg: format!("`freeze`: {e}"),
    })
}

/// Attach the plan's `[adapter]` (LoRA, DoRA, IA3) to `store`, the same way
/// for every family: GPT-2's `Conv1D` layers get PEFT's `fan_in_fan_out`
/// mark. Returns the adapter config as the run saves it. Prompt tuning is
/// attached by SFT (it needs the tokenizer).
pub fn attach_adapter(
    plan: &Plan,
    store: &mut ParamStore,
    family: Family,
    task: PeftTask,
    rng: &mut dyn rand::RngCore,
    on: &mut dyn FnMut(Event),
) -> Result<Option<AdapterConfig>> {
    let Some(ad) = &plan.config.adapter else {
        return Ok(None);
    };
    let mut ad = ad.clone();
    if let (Some(t), Family::Gpt2) = (ad.targeting_mut(), family) {
        t.fan_in_fan_out = true; // PEFT's marker for GPT-2's Conv1D layers
    }
    if ad.kind() != AdapterType::PromptTuning {
        for note in crate::adapters::attach(store, &ad, task, rng)? {
            on(Event::Warning(note));
        }
        on(Event::Info(format!(
            "adapter: {:?} on {} modules",
            ad.kind(),
            store.adapters.len()
        )));
    }
    Ok(Some(ad))
}

/// A decoder LM method (`task`: "sft", "dpo", "ppo") refuses a BERT encoder.
pub fn require_decoder(
    plan: &Plan,
    family: Family,
    model: &std::path::Path,
    task: &str,
) -> Result<()> {
    if family.is_decoder() {
        return Ok(());
    }
    Err(Error::Config {
        path: plan.config_path.clone(),
        msg: format!(
            "`task.type` = \"{task}\" trains a decoder LM, but {} is a BERT encoder",
            model.display()
        ),
    })
}

/// The canonical path of the base model (recorded beside an adapter).
pub fn canonical(p: &std::path::Path) -> std::path::PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}
