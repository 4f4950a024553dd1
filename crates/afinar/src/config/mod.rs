//! One TOML file per run: raw serde types (`deny_unknown_fields`, HF-style
//! names) validated into a [`Plan`] before any weight is loaded, so a typo
//! fails in milliseconds naming the key and the file.

mod modes;

pub(crate) use crate::modes::{mode, opt_mode};
pub use modes::DeviceSpec;

use crate::data::sft::Overflow;
use crate::data::Format;
use crate::heads::{Pooling, TaskKind};
use crate::models::SourceFormat;
use crate::optim::Schedule;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub task: TaskSection,
    pub data: DataSection,
    #[serde(default)]
    pub freeze: FreezeSection,
    pub train: TrainSection,
    #[serde(default)]
    pub seeds: SeedSection,
    /// Train an adapter (LoRA / DoRA / IA3) instead of the base weights.
    pub adapter: Option<crate::adapters::AdapterConfig>,
    /// `task.type = "dpo"`: TRL's `DPOConfig` options.
    pub dpo: Option<DpoSection>,
    /// `task.type = "reward"`: TRL's `RewardConfig` options.
    pub reward: Option<RewardSection>,
    /// `task.type = "ppo"`: TRL's `PPOConfig` options, and the reward.
    pub ppo: Option<PpoSection>,
    /// Weak supervision (`task.weak`): the labelling rules, the label model
    /// and COSINE's self-training settings.
    pub weak: Option<WeakSection>,
    /// `task.type = "image_classification"`: how images become inputs.
    pub image: Option<ImageSection>,
}

/// How images become a CNN's inputs (`data/image.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Side of the square input, pixels (images are resized to it).
    #[serde(default = "d_image_size")]
    pub size: usize,
    /// Per-channel mean and std of the normalisation (default ImageNet's).
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    /// Training augmentation: random crop of the image padded by this many
    /// pixels (default size / 8; 0 turns it off) ...
    pub crop_padding: Option<usize>,
    /// ... and a random horizontal flip.
    #[serde(default = "d_true")]
    pub flip: bool,
}
fn d_image_size() -> usize {
    224
}
fn d_true() -> bool {
    true
}
impl Default for ImageSection {
    fn default() -> Self {
        ImageSection {
            size: d_image_size(),
            mean: None,
            std: None,
            crop_padding: None,
            flip: true,
        }
    }
}

impl ImageSection {
    pub fn transform(&self) -> crate::data::image::Transform {
        use crate::data::image::{IMAGENET_MEAN, IMAGENET_STD};
        crate::data::image::Transform {
            size: self.size,
            mean: self.mean.unwrap_or(IMAGENET_MEAN),
            std: self.std.unwrap_or(IMAGENET_STD),
            crop_padding: self.crop_padding.unwrap_or(self.size / 8),
            flip: self.flip,
        }
    }
}

/// `task.weak`: how a classification run gets its training labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeakMode {
    /// The data's own labels (ordinary supervised training).
    #[default]
    Off,
    /// COSINE's stage 1: train on the rows the rules cover, labelled by the
    /// label model, early-stopped on the labelled validation split.
    Stage1,
    /// Stage 1, then COSINE's contrastive self-training over every training
    /// row (Yu et al. 2021).
    Cosine,
}

/// `[weak]`: rules, label model, COSINE.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeakSection {
    /// Rule files (TOML, `[[rule]]` tables), relative to the config file.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Rules written in the run config itself.
    #[serde(default)]
    pub rule: Vec<crate::weak::RuleSpec>,
    /// SpamAssassin's rules over a field holding whole mails.
    pub spamassassin: Option<crate::weak::SpamAssassinSpec>,
    /// "weighted" (default: the rules' weights) | "majority".
    #[serde(default, deserialize_with = "mode")]
    pub label_model: crate::weak::LabelModel,
    /// `label_model = "score"`: the label positive weights vote (default:
    /// `[weak.spamassassin]`'s spam label).
    pub score_label: Option<String>,
    /// `label_model = "score"`: from this total a row gets `score_label`
    /// (default: SpamAssassin's `required_score`, 5).
    pub score_at_least: Option<f64>,
    /// `label_model = "score"`: up to this total a row gets the other label
    /// (default 0: no rule fired); in between, the label model abstains.
    pub score_at_most: Option<f64>,
    /// The label an abstain counts as when the vote is scored on every
    /// row; default: the most common label of the validation split.
    pub fallback: Option<String>,
    /// COSINE stage 2: optimizer steps of self-training.
    #[serde(default = "d_weak_steps")]
    pub steps: usize,
    /// Stage 2's learning rate (default `train.lr`).
    pub lr: Option<f64>,
    /// T3: the student becomes the teacher every this many steps.
    #[serde(default = "d_teacher_update")]
    pub teacher_update: usize,
    /// xi: rows whose confidence weight `1 - H(p)/log C` is not above this are left out.
    #[serde(default = "d_weak_threshold")]
    pub threshold: f64,
    /// gamma: the contrastive regulariser's margin.
    #[serde(default = "d_one_f")]
    pub margin: f64,
    /// lambda: weight of the confidence regulariser `KL(uniform || p)`.
    #[serde(default = "d_weak_lambda")]
    pub lambda: f64,
    /// mu: weight of the contrastive regulariser.
    #[serde(default = "d_one_f")]
    pub mu: f64,
}
fn d_weak_steps() -> usize {
    300
}
fn d_teacher_update() -> usize {
    50
}
fn d_weak_threshold() -> f64 {
    0.7
}
fn d_weak_lambda() -> f64 {
    0.1
}
fn d_one_f() -> f64 {
    1.0
}

/// What pays a PPO rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PpoReward {
    /// 1 when the response, trimmed, equals the row's answer (`ideal`), else 0.
    #[default]
    ExactMatch,
    /// 1 when `reward_regex` matches the response, else 0.
    Regex,
    /// `-|tokens - target_length| / target_length` (0 at the target).
    Length,
    /// The score of a reward-model run (`reward_model`).
    Model,
}

/// How the KL penalty estimates the KL divergence per token (Schulman's
/// "Approximating KL divergence"): k1 = log p - log q, k3 = (r - 1) - log r
/// with r = q / p.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    #[default]
    K1,
    K3,
}

/// Where the value model starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueInit {
    /// The reward model's weights, score head included (TRL's recipe).
    RewardModel,
    /// The policy's base weights with a zero score head.
    Zero,
}

/// `[ppo]`: TRL's `PPOConfig` names and defaults where they exist (the last
/// TRL PPO trainer, `trl/experimental/ppo`), the adaptive KL controller of
/// TRL's older PPO (`adap_kl_ctrl`, `target`, `horizon`), and the reward.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSection {
    #[serde(default, deserialize_with = "mode")]
    pub reward: PpoReward,
    /// A reward-model run folder (`reward = "model"`).
    pub reward_model: Option<PathBuf>,
    /// `reward = "regex"`: the pattern (Rust `regex` syntax).
    pub reward_regex: Option<String>,
    /// `reward = "length"`: the target response length in tokens.
    pub target_length: Option<usize>,
    /// Default: "reward_model" when the reward model is a decoder with the
    /// policy's vocabulary, else "zero".
    #[serde(default, deserialize_with = "opt_mode")]
    pub value_init: Option<ValueInit>,
    #[serde(default = "d_ppo_epochs")]
    pub num_ppo_epochs: usize,
    #[serde(default = "d_one_usize")]
    pub num_mini_batches: usize,
    /// Prompts in all (rollouts); default: `train.epochs` passes over them.
    pub total_episodes: Option<usize>,
    #[serde(default = "d_response_length")]
    pub response_length: usize,
    #[serde(default = "d_temperature")]
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// Subtracted from the score of a response without an end-of-sequence token.
    pub missing_eos_penalty: Option<f64>,
    #[serde(default = "d_kl_coef")]
    pub kl_coef: f64,
    #[serde(default, deserialize_with = "mode")]
    pub kl_estimator: KlEstimator,
    /// Adapt `kl_coef` towards a KL of `target` (Ziegler et al. 2019).
    #[serde(default)]
    pub adap_kl_ctrl: bool,
    #[serde(default = "d_kl_target")]
    pub target: f64,
    #[serde(default = "d_kl_horizon")]
    pub horizon: f64,
    #[serde(default)]
    pub whiten_rewards: bool,
    #[serde(default = "d_cliprange")]
    pub cliprange: f64,
    #[serde(default = "d_cliprange")]
    pub cliprange_value: f64,
    #[serde(default = "d_vf_coef")]
    pub vf_coef: f64,
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    #[serde(default = "d_lam")]
    pub lam: f64,
}
fn d_ppo_epochs() -> usize {
    4
}
fn d_one_usize() -> usize {
    1
}
fn d_response_length() -> usize {
    53
}
fn d_temperature() -> f32 {
    0.7
}
fn d_kl_coef() -> f64 {
    0.05
}
fn d_kl_target() -> f64 {
    6.0
}
fn d_kl_horizon() -> f64 {
    10000.0
}
fn d_cliprange() -> f64 {
    0.2
}
fn d_vf_coef() -> f64 {
    0.1
}
fn d_gamma() -> f64 {
    1.0
}
fn d_lam() -> f64 {
    0.95
}
impl Default for PpoSection {
    fn default() -> Self {
        toml::from_str("").expect("the [ppo] defaults")
    }
}

/// TRL's DPO loss types (`DPOConfig.loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
}

impl DpoLossType {
    /// IPO compares log-probabilities averaged over the completion's tokens
    /// (TRL), the others summed.
    pub fn averages_log_probs(self) -> bool {
        self == DpoLossType::Ipo
    }
}

/// `[dpo]`: the names and defaults of TRL's `DPOConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    #[serde(default = "d_beta")]
    pub beta: f64,
    #[serde(default, deserialize_with = "mode")]
    pub loss_type: DpoLossType,
    /// Sigmoid loss only (cDPO): the assumed share of flipped labels, in [0, 0.5].
    #[serde(default)]
    pub label_smoothing: f64,
    /// Compute the reference log-probabilities of the training pairs once,
    /// before the first step (kept in the run folder, reused on resume);
    /// no reference forward per step, and for full fine-tuning no copy of
    /// the model is held.
    #[serde(default)]
    pub precompute_ref_log_probs: bool,
}
fn d_beta() -> f64 {
    0.1
}
impl Default for DpoSection {
    fn default() -> Self {
        DpoSection {
            beta: d_beta(),
            loss_type: DpoLossType::Sigmoid,
            label_smoothing: 0.0,
            precompute_ref_log_probs: false,
        }
    }
}

/// `[reward]`: TRL's `RewardConfig` options.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// Adds `coefficient * mean((r_chosen + r_rejected)^2)` to the loss,
    /// keeping rewards centred on 0 (Eisenstein et al. 2023).
    pub center_rewards_coefficient: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A pinned asset from `afinar fetch` (e.g. "all-minilm-l6-v2").
    pub asset: Option<String>,
    /// A local HF checkpoint folder.
    pub path: Option<PathBuf>,
    /// A hub model id ("org/name"), downloaded on first use.
    pub hub: Option<String>,
    pub revision: Option<String>,
    #[serde(default = "d_max_length")]
    pub max_length: usize,
    /// Override the checkpoint's dropout probabilities (HF config names).
    pub hidden_dropout_prob: Option<f32>,
    pub attention_probs_dropout_prob: Option<f32>,
    /// How a GGUF model's linear weights are held: "f32" (dequantised once
    /// at load) or "quantized" (kept in the file's own types, Q4_0 / Q4_1 /
    /// Q8_0 ..., frozen and dequantised per matmul; QLoRA-style adapter
    /// training on a quantised base). GGUF sources and adapter runs only.
    #[serde(default, deserialize_with = "mode")]
    pub base_dtype: BaseDtype,
    /// "safetensors" (a model folder) or "gguf" (one llama.cpp file); by
    /// default what the source holds. When given, it must agree with it.
    #[serde(default, deserialize_with = "opt_mode")]
    pub format: Option<SourceFormat>,
}
fn d_max_length() -> usize {
    128
}

impl ModelSection {
    /// Where the model comes from (validated: exactly one source is given).
    pub fn source(&self) -> crate::hub::source::ModelSource {
        use crate::hub::source::ModelSource;
        match (&self.asset, &self.path, &self.hub) {
            (Some(a), _, _) => ModelSource::Asset(a.clone()),
            (None, Some(p), _) => ModelSource::Path(p.clone()),
            (None, None, h) => ModelSource::Hub {
                id: h.clone().unwrap_or_default(),
                revision: self.revision.clone(),
            },
        }
    }

    /// What the source holds, as far as it can be told before loading: a
    /// path's file or folder, an asset's registered file, a hub model's
    /// folder (the hub client downloads safetensors only). None when it
    /// cannot be told (a path not there yet, an unknown asset).
    pub fn held_format(&self) -> Option<SourceFormat> {
        match (&self.asset, &self.path, &self.hub) {
            (Some(a), _, _) => crate::hub::assets::asset(a)
                .ok()
                .map(|a| SourceFormat::of_name(Path::new(a.path))),
            (None, Some(p), _) => SourceFormat::detect(p),
            (None, None, _) => Some(SourceFormat::Safetensors),
        }
    }

    /// The source's format: `model.format`, else what the source holds,
    /// else a model folder.
    pub fn format(&self) -> SourceFormat {
        self.format
            .or_else(|| self.held_format())
            .unwrap_or(SourceFormat::Safetensors)
    }
}

/// `model.base_dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    #[default]
    F32,
    Quantized,
    /// bf16 frozen base on a GPU (train.device = "cuda"): bf16 compute, f32
    /// trainable weights and loss.
    Bf16,
}

/// What a run trains: a sequence-level head on an encoder, or a decoder LM
/// on instructions (supervised fine-tuning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    Classification,
    Regression,
    /// Instruction SFT of a decoder: loss on assistant / completion tokens.
    Sft,
    /// A reward model: a scalar head trained on preference pairs
    /// (Bradley-Terry), TRL's `RewardTrainer`.
    Reward,
    /// Direct preference optimisation of a decoder on preference pairs,
    /// TRL's `DPOTrainer`.
    Dpo,
    /// RLHF with PPO: a decoder policy against a reward, with a KL penalty
    /// to its reference and a value model (TRL's last `PPOTrainer`).
    Ppo,
    /// Image classification with a CNN (MobileNetV2) and a new head, on
    /// images from IDX files or class folders (`[image]` says how they
    /// become inputs).
    ImageClassification,
}

impl TaskType {
    /// The head of a sequence task (None for SFT).
    pub fn head(self) -> Option<TaskKind> {
        match self {
            TaskType::Classification => Some(TaskKind::Classification),
            TaskType::Regression => Some(TaskKind::Regression),
            TaskType::Sft
            | TaskType::Reward
            | TaskType::Dpo
            | TaskType::Ppo
            | TaskType::ImageClassification => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    #[serde(rename = "type", default = "d_task", deserialize_with = "mode")]
    pub kind: TaskType,
    /// How the head pools the body's states; default: what the family's
    /// transformers class does ("cls" for BERT, "last" for decoders).
    #[serde(default, deserialize_with = "opt_mode")]
    pub pooling: Option<Pooling>,
    /// Dropout before the classifier; default: the model's hidden dropout.
    pub dropout: Option<f32>,
    /// Classification: labels from rules (`[weak]`): "stage1" | "cosine";
    /// "off" (default): the data's labels.
    #[serde(default, deserialize_with = "mode")]
    pub weak: WeakMode,
}
fn d_task() -> TaskType {
    TaskType::Classification
}
impl Default for TaskSection {
    fn default() -> Self {
        TaskSection {
            kind: d_task(),
            pooling: None,
            dropout: None,
            weak: WeakMode::Off,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A path, or `asset:NAME` for a fetched data asset.
    pub train: String,
    pub validation: Option<String>,
    pub test: Option<String>,
    /// "jsonl" (or "json") | "csv" | "tsv"; default from the file extension.
    #[serde(default, deserialize_with = "opt_mode")]
    pub format: Option<Format>,
    /// Field path of the text (`input[-1].content`, `sentence1`).
    #[serde(default)]
    pub text: String,
    pub text_pair: Option<String>,
    #[serde(default)]
    pub label: String,
    /// SFT: field of the chat `messages` (a list of {role, content}).
    pub messages: Option<String>,
    /// SFT: field of the answer appended as the assistant turn (OpenAI
    /// evals' `ideal`; a list takes its first entry).
    pub response: Option<String>,
    /// SFT without a chat template: prompt and completion fields; reward
    /// and DPO runs: the pair's prompt field (default `prompt`).
    pub prompt: Option<String>,
    pub completion: Option<String>,
    /// Reward and DPO runs: the preferred and the rejected completion's
    /// fields (default `chosen`, `rejected`).
    pub chosen: Option<String>,
    pub rejected: Option<String>,
    /// Reward and DPO runs: a pair whose prompt + completion is longer than
    /// `model.max_length`: "keep_start" (tokens cut from the end; DPO's
    /// default, as TRL's DPOTrainer), "keep_end" (cut from the start), "skip"
    /// (left out; a reward model's default, as TRL's RewardTrainer) or
    /// "error"; the counts are logged.
    #[serde(default, deserialize_with = "opt_mode")]
    pub truncation_mode: Option<crate::data::preference::Truncation>,
    /// SFT: pack short examples into full `max_length` rows.
    #[serde(default)]
    pub packing: bool,
    /// SFT: rows longer than max_length: "truncate" (default) | "error" | "skip".
    #[serde(default, deserialize_with = "opt_mode")]
    pub overflow: Option<Overflow>,
    /// A seeded sample (`split_seed`) of at most this many rows of the
    /// `train` file, taken before `split` (a smaller experiment on a large set).
    pub max_rows: Option<usize>,
    /// The text field holds whole mails (RFC 5322, as the SpamAssassin
    /// corpus): the model reads the subject and the decoded body text, not
    /// the headers; rules still read the whole mail.
    #[serde(default)]
    pub mail: bool,
    /// At most this many rows from each training file (a folder's tasks mixed evenly).
    pub max_rows_per_file: Option<usize>,
    /// SFT: whole tasks held out from training (a file or folder), scored
    /// at the end to measure generalisation to unseen tasks.
    pub heldout_tasks: Option<String>,
    /// SFT: rows of each held-out set scored by greedy generation (exact match).
    pub generate_eval_rows: Option<usize>,
    /// Image tasks with IDX files: the label files of `train`,
    /// `validation`, `test` (a class-folder set needs none).
    pub train_labels: Option<String>,
    pub validation_labels: Option<String>,
    pub test_labels: Option<String>,
    /// Image tasks with IDX files: the class names, by label id.
    pub label_names: Option<Vec<String>>,
    /// train / validation / test ratios of a seeded split of `train`, for
    /// the parts not given as files: a part given as a file (`validation`,
    /// `test`) has ratio 0 here (`[0.9, 0.0, 0.1]`), else the config is refused.
    pub split: Option<[f64; 3]>,
    #[serde(default = "d_seed")]
    pub split_seed: u64,
}

/// `freeze.preset`: what trains before `embeddings`, `first_layers` and the
/// patterns apply. `last_layers` takes its count from `freeze.last_layers`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezePreset {
    /// Every parameter trains.
    #[default]
    Full,
    /// Only the new head trains.
    HeadOnly,
    /// The head and the last `freeze.last_layers` layers train.
    LastLayers,
}

impl FreezePreset {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            FreezePreset::Full => "full",
            FreezePreset::HeadOnly => "head_only",
            FreezePreset::LastLayers => "last_layers",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeSection {
    #[serde(default, deserialize_with = "mode")]
    pub preset: FreezePreset,
    /// With preset "last_layers": how many of the last encoder layers train.
    pub last_layers: Option<usize>,
    /// Freeze the embeddings.
    #[serde(default)]
    pub embeddings: bool,
    /// Freeze the first N encoder layers.
    #[serde(default)]
    pub first_layers: usize,
    /// Extra patterns (glob, or `re:` regex) to freeze / to train; applied last.
    #[serde(default)]
    pub frozen: Vec<String>,
    #[serde(default)]
    pub trainable: Vec<String>,
    /// CNNs: the batch-norm layers of frozen stages keep their running
    /// statistics ("eval", the default) or take batch statistics and update
    /// them ("train").
    #[serde(default, deserialize_with = "mode")]
    pub batch_norm: FrozenBatchNorm,
}

/// `freeze.batch_norm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrozenBatchNorm {
    #[default]
    Eval,
    Train,
}
impl Default for FreezeSection {
    fn default() -> Self {
        FreezeSection {
            preset: FreezePreset::Full,
            last_layers: None,
            embeddings: false,
            first_layers: 0,
            frozen: vec![],
            trainable: vec![],
            batch_norm: FrozenBatchNorm::Eval,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    pub metric: String,
    pub patience: usize,
    #[serde(default)]
    pub min_delta: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    pub max_steps: Option<usize>,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    pub eval_batch_size: Option<usize>,
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub beta1: f64,
    #[serde(default = "d_b2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default = "d_schedule", deserialize_with = "mode")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_ratio: f64,
    pub warmup_steps: Option<usize>,
    /// Global-norm clipping; 0 turns it off.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    /// Evaluate on validation every N optimizer steps (and at each epoch end).
    pub eval_every: Option<usize>,
    pub early_stopping: Option<EarlyStopping>,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// Threads for the CPU kernels (default: all cores).
    pub threads: Option<usize>,
    /// "cpu" (default), "cuda" or "cuda:N" (a build with the cuda feature;
    /// decoder SFT runs).
    #[serde(default)]
    pub device: DeviceSpec,
    /// Recompute each layer's activations in backward instead of keeping
    /// them (transformers' `gradient_checkpointing`): less memory, one extra
    /// forward per step.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Write a resumable checkpoint (`checkpoint-<step>/`) every N optimizer
    /// steps (transformers' `save_steps`). Default: at each evaluation.
    /// A checkpoint is also written whenever validation improves.
    pub save_every: Option<usize>,
    /// Keep the last N `checkpoint-<step>/` folders (transformers'
    /// `save_total_limit`); the best one is never removed.
    #[serde(default = "d_save_total_limit")]
    pub save_total_limit: usize,
    /// A NaN or Inf in the loss or the gradients: `"stop"` (the default)
    /// ends the run with an error naming the step and the rows, `"skip"`
    /// drops the batch (no update; counted in results.json).
    #[serde(default, deserialize_with = "mode")]
    pub on_non_finite: OnNonFinite,
}

/// What the loop does with a non-finite loss or gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    #[default]
    Stop,
    Skip,
}
fn d_save_total_limit() -> usize {
    2
}
fn d_epochs() -> usize {
    1
}
fn d_batch() -> usize {
    32
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_schedule() -> Schedule {
    Schedule::Linear
}
fn d_clip() -> f64 {
    1.0
}
fn d_one() -> usize {
    1
}
fn d_log_every() -> usize {
    10
}
fn d_seed() -> u64 {
    42
}

/// Dodge et al. 2020: weight initialisation and data order each move results;
/// each has its own seed so a user varies one and fixes the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSection {
    #[serde(default = "d_seed")]
    pub init: u64,
    #[serde(default = "d_seed")]
    pub data: u64,
    #[serde(default = "d_seed")]
    pub dropout: u64,
}
impl Default for SeedSection {
    fn default() -> Self {
        SeedSection {
            init: 42,
            data: 42,
            dropout: 42,
        }
    }
}

/// A validated run: everything checked that can be checked without weights.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: RunConfig,
    pub config_path: PathBuf,
}

/// The checks of an image classification run: (key, message) of the first problem.
fn image_checks(c: &RunConfig) -> std::result::Result<(), (&'static str, String)> {
    let d = &c.data;
    for (key, given) in [
        ("data.text", !d.text.is_empty()),
        ("data.label", !d.label.is_empty()),
        ("data.text_pair", d.text_pair.is_some()),
        ("data.messages", d.messages.is_some()),
        ("data.prompt", d.prompt.is_some()),
        ("data.format", d.format.is_some()),
        ("data.mail", d.mail),
        ("data.packing", d.packing),
    ] {
        if given {
            return Err((
                key,
                "is for text data; images come from IDX files or class folders".into(),
            ));
        }
    }
    for (file, labels, key) in [
        (Some(&d.train), &d.train_labels, "data.train_labels"),
        (
            d.validation.as_ref(),
            &d.validation_labels,
            "data.validation_labels",
        ),
        (d.test.as_ref(), &d.test_labels, "data.test_labels"),
    ] {
        if file.is_none() && labels.is_some() {
            return Err((key, "names the labels of a set that is not given".into()));
        }
    }
    if c.adapter.is_some() {
        return Err(("adapter", "adapters wrap linear layers of transformers; a CNN trains fully or by stages ([freeze])".into()));
    }
    if c.freeze.embeddings {
        return Err(("freeze.embeddings", "a CNN has no embeddings: freeze stages with `first_layers` or patterns (`features.0-6`)".into()));
    }
    if c.freeze.preset == FreezePreset::LastLayers {
        return Err((
            "freeze.preset",
            "\"last_layers\" is for transformer layers: for a CNN use `first_layers` or patterns"
                .into(),
        ));
    }
    if c.model.max_length != d_max_length() {
        return Err(("model.max_length", "is for text models".into()));
    }
    if c.model.format.is_some() || c.model.base_dtype != BaseDtype::F32 {
        return Err(("model", "`format` and `base_dtype` are for text models (a CNN is read from a .pth file or a model folder, in f32)".into()));
    }
    if c.task.pooling.is_some() {
        return Err(("task.pooling", "a CNN pools by global averaging".into()));
    }
    if c.task.weak != WeakMode::Off {
        return Err((
            "task.weak",
            "weak supervision is for text classification".into(),
        ));
    }
    let img = c.image.clone().unwrap_or_default();
    if !(8..=1024).contains(&img.size) {
        return Err(("image.size", format!("{} is not in [8, 1024]", img.size)));
    }
    if img.crop_padding.is_some_and(|p| p > img.size) {
        return Err((
            "image.crop_padding",
            format!(
                "{} is more than image.size {}",
                img.crop_padding.unwrap_or(0),
                img.size
            ),
        ));
    }
    if let Some(s) = img.std {
        if s.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
            return Err(("image.std", format!("{s:?}: each must be > 0")));
        }
    }
    if !c.train.device.is_cpu() {
        return Err((
            "train.device",
            "image classification trains on the CPU for now".into(),
        ));
    }
    Ok(())
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A split ratio as a user writes it: `0.8`, not `0.8000000000000002`.
fn format_ratio(x: f64) -> String {
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0');
    if s.ends_with('.') {
        format!("{s}0")
    } else {
        s.to_string()
    }
}

/// An error of the file itself: toml quotes the line, but names no key when
/// it has a span. Reading the file's table again as a value meets the same
/// error (`preserve_order`: keys in the file's order, so the same first
/// error) and tracks the dotted key, added on a last line as a `--set`
/// error shows it: "in `train.lr`".
fn file_err(path: &Path, text: &str, e: &toml::de::Error) -> Error {
    let key = toml::from_str::<toml::Table>(text)
        .ok()
        .and_then(|t| toml::Value::Table(t).try_into::<RunConfig>().err())
        .filter(|v| e.span().is_some() && v.span().is_none() && v.message() == e.message())
        .and_then(|v| {
            // Without a span, the value error's text is the message, then "in `KEY`".
            let text = v.to_string();
            let rest = text.strip_prefix(v.message())?.trim();
            rest.strip_prefix("in `")?
                .strip_suffix('`')
                .map(String::from)
        });
    let msg = match key {
        Some(k) => format!("{e}in `{k}`\n"),
        None => e.to_string(),
    };
    cfg_err(path, msg)
}

/// Apply `key.path=value` overrides (`train.lr=3e-5`) to a parsed TOML table.
/// The value is read as TOML (numbers, booleans, arrays), else as a string.
pub fn apply_override(root: &mut toml::Table, assignment: &str, path: &Path) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| cfg_err(path, format!("--set `{assignment}`: expected KEY=VALUE")))?;
    let value: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap(),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| cfg_err(path, format!("--set `{key}`: `{p}` is not a table")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Plan {
    /// Read, override, deserialize (unknown keys rejected) and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_str(&text, path, overrides)
    }

    pub fn from_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        // Deserialize the file itself first: its errors carry line and column.
        let _: RunConfig = toml::from_str(text).map_err(|e| file_err(path, text, &e))?;
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| cfg_err(path, e.to_string()))?;
        // Deserialize after each override, so an error names the `--set` that caused it.
        for o in overrides {
            apply_override(&mut table, o, path)?;
            let _: RunConfig = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| cfg_err(path, format!("--set `{o}`: {e}")))?;
        }
        let mut config: RunConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| cfg_err(path, e.to_string()))?;
        // Rule files are relative to the config file; the run folder's
        // config.toml records where they are, so a resumed run finds them.
        if let Some(w) = &mut config.weak {
            let base = path.parent().unwrap_or(Path::new("."));
            let anchor = |p: &mut String| {
                if !p.starts_with("asset:") && Path::new(p.as_str()).is_relative() {
                    *p = base.join(&*p).display().to_string();
                }
            };
            w.rules.iter_mut().for_each(anchor);
            if let Some(sa) = &mut w.spamassassin {
                anchor(&mut sa.rules);
            }
        }
        let plan = Plan {
            config,
            config_path: path.to_path_buf(),
        };
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<()> {
        let p = &self.config_path;
        let c = &self.config;
        let err = |key: &str, msg: String| Err(cfg_err(p, format!("`{key}`: {msg}")));
        let sources = [
            c.model.asset.is_some(),
            c.model.path.is_some(),
            c.model.hub.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return err("model", "give exactly one of `asset`, `path`, `hub`".into());
        }
        if c.model.max_length < 2 {
            return err(
                "model.max_length",
                format!("{} is too small", c.model.max_length),
            );
        }
        for (key, v) in [
            ("model.hidden_dropout_prob", c.model.hidden_dropout_prob),
            (
                "model.attention_probs_dropout_prob",
                c.model.attention_probs_dropout_prob,
            ),
        ] {
            if let Some(d) = v {
                if !(0.0..1.0).contains(&d) {
                    return err(key, format!("{d} is not in [0, 1)"));
                }
            }
        }
        if let (Some(want), Some(held)) = (c.model.format, c.model.held_format()) {
            if want != held {
                let source = match (&c.model.asset, &c.model.path, &c.model.hub) {
                    (Some(a), _, _) => format!("asset `{a}`"),
                    (None, Some(p), _) => format!("`model.path` = {:?}", p.display().to_string()),
                    (None, None, h) => format!("hub model `{}`", h.as_deref().unwrap_or_default()),
                };
                return err(
                    "model.format",
                    format!("\"{want}\" does not match {source}, {}", held.what()),
                );
            }
        }
        if !c.train.device.is_cpu() {
            if c.task.kind != TaskType::Sft {
                return err(
                    "train.device",
                    "a GPU trains decoder SFT runs (task.type = \"sft\"); classification runs train on the CPU".into(),
                );
            }
            if c.model.base_dtype == BaseDtype::Quantized {
                return err(
                    "model.base_dtype",
                    "\"quantized\" is a CPU path: on a GPU use \"bf16\" or \"f32\"".into(),
                );
            }
        }
        if c.model.base_dtype == BaseDtype::Bf16 && c.train.device.is_cpu() {
            return err(
                "model.base_dtype",
                "\"bf16\" is for GPU runs (train.device = \"cuda\"); on the CPU use \"f32\" or \"quantized\"".into(),
            );
        }
        if c.model.base_dtype == BaseDtype::Quantized {
            if c.task.kind == TaskType::Dpo && c.adapter.is_none() {
                return err(
                    "model.base_dtype",
                    "DPO's reference cannot be built: full fine-tuning of a \"quantized\" base would train weights kept in GGUF blocks, and the frozen reference copy needs them as loaded. Use \"f32\" for full fine-tuning, or add an [adapter] (the reference is then the base with adapters off)".into(),
                );
            }
            if c.model.format() != SourceFormat::Gguf {
                return err(
                    "model.base_dtype",
                    "\"quantized\" needs a GGUF model (a `.gguf` path or a GGUF asset); safetensors load as \"f32\"".into(),
                );
            }
            if !matches!(c.task.kind, TaskType::Sft | TaskType::Dpo) {
                return err(
                    "model.base_dtype",
                    "\"quantized\" is for decoder LM runs (task.type = \"sft\" or \"dpo\")".into(),
                );
            }
            if c.adapter.is_none() {
                return err(
                    "model.base_dtype",
                    "\"quantized\" keeps the base frozen: add an [adapter] (full fine-tuning needs \"f32\")".into(),
                );
            }
            if c.adapter.as_ref().is_some_and(|a| a.uses_dora()) {
                return err(
                    "model.base_dtype",
                    "DoRA needs the base weight's row norms: use \"f32\" with adapter.use_dora"
                        .into(),
                );
            }
        }
        if let Some(d) = c.task.dropout {
            if !(0.0..1.0).contains(&d) {
                return err("task.dropout", format!("{d} is not in [0, 1)"));
            }
        }
        if let Some(s) = c.data.split {
            if !s.iter().all(|r| r.is_finite() && *r >= 0.0)
                || (s.iter().sum::<f64>() - 1.0).abs() > 1e-6
            {
                return err(
                    "data.split",
                    format!("{s:?}: ratios must be finite, >= 0 and sum to 1"),
                );
            }
        }
        // A part given as a file is not also cut from `train`: those rows
        // would be read, then dropped (neither trained on nor evaluated).
        if let Some(s) = c.data.split {
            let files = [
                (1, "validation", &c.data.validation),
                (2, "test", &c.data.test),
            ];
            let mut fixed = s;
            for (i, _, file) in &files {
                if file.is_some() {
                    fixed[0] += fixed[*i];
                    fixed[*i] = 0.0;
                }
            }
            if let Some((i, part, Some(file))) =
                files.iter().find(|(i, _, f)| f.is_some() && s[*i] > 0.0)
            {
                let show = |r: &[f64; 3]| {
                    let r: Vec<String> = r.iter().map(|x| format_ratio(*x)).collect();
                    format!("[{}]", r.join(", "))
                };
                return err(
                    "data.split",
                    format!(
                        "{} keeps {} of `data.train` for {part}, but `data.{part}` = \"{file}\" gives the {part} rows: \
                         the split's {part} rows would be dropped. Write `split = {}` (the {part} ratio 0) \
                         or leave `data.{part}` out",
                        show(&s),
                        format_ratio(s[*i]),
                        show(&fixed)
                    ),
                );
            }
        }
        if c.data.split.is_none() && c.data.validation.is_none() {
            return err(
                "data",
                "give `validation` (a file) or `split` (ratios of train)".into(),
            );
        }
        match (c.freeze.preset, c.freeze.last_layers) {
            (preset @ (FreezePreset::Full | FreezePreset::HeadOnly), Some(n)) => {
                return err(
                    "freeze.last_layers",
                    format!(
                        "{n} is only for preset = \"last_layers\" (preset is \"{}\")",
                        preset.as_str()
                    ),
                );
            }
            (FreezePreset::LastLayers, None) => {
                return err(
                    "freeze.last_layers",
                    "preset \"last_layers\" needs last_layers = N".into(),
                );
            }
            _ => {}
        }
        if let Some(ad) = &c.adapter {
            // The message begins "adapter: ...".
            ad.validate().map_err(|e| cfg_err(p, e.to_string()))?;
            if c.freeze.preset != FreezePreset::Full
                || !c.freeze.frozen.is_empty()
                || !c.freeze.trainable.is_empty()
            {
                return err("freeze", "an adapter freezes the whole base: leave [freeze] out (use adapter.modules_to_save)".into());
            }
        }
        let t = &c.train;
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return err("train.lr", format!("{} must be > 0", t.lr));
        }
        if t.batch_size == 0 {
            return err("train.batch_size", "must be > 0".into());
        }
        if t.grad_accum == 0 {
            return err("train.grad_accum", "must be > 0".into());
        }
        if t.epochs == 0 && t.max_steps.is_none() {
            return err("train.epochs", "must be > 0".into());
        }
        if t.warmup_steps.is_some() && t.warmup_ratio != 0.0 {
            return err(
                "train.warmup_steps",
                format!(
                    "conflicts with `train.warmup_ratio` = {}: give one of them",
                    t.warmup_ratio
                ),
            );
        }
        if !(0.0..=1.0).contains(&t.warmup_ratio) {
            return err(
                "train.warmup_ratio",
                format!("{} is not in [0, 1]", t.warmup_ratio),
            );
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return err(
                "train.max_grad_norm",
                format!("{} must be >= 0 (0 = off)", t.max_grad_norm),
            );
        }
        for (key, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return err(key, format!("{b} is not in [0, 1)"));
            }
        }
        if !(t.eps > 0.0 && t.eps.is_finite()) {
            return err("train.eps", format!("{} must be > 0", t.eps));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return err(
                "train.weight_decay",
                format!("{} must be >= 0", t.weight_decay),
            );
        }
        match c.task.kind {
            TaskType::Sft | TaskType::Ppo => {
                let d = &c.data;
                let chat = d.messages.is_some();
                let pc = d.prompt.is_some() || d.completion.is_some();
                if chat == pc {
                    return err(
                        "data",
                        "SFT needs `messages` (chat rows) or `prompt` + `completion`".into(),
                    );
                }
                if d.chosen.is_some() || d.rejected.is_some() || d.truncation_mode.is_some() {
                    return err(
                        "data",
                        "`chosen`, `rejected` and `truncation_mode` are for preference pairs (task.type = \"reward\" or \"dpo\")".into(),
                    );
                }
                if pc && (d.prompt.is_none() || d.completion.is_none()) {
                    return err("data", "give both `prompt` and `completion`".into());
                }
                if d.format.is_some_and(|f| f != Format::Jsonl) {
                    return err(
                        "data.format",
                        "SFT reads JSONL rows (\"jsonl\"); \"csv\" and \"tsv\" are for classification and regression".into(),
                    );
                }
                if c.freeze.preset != FreezePreset::Full
                    || !c.freeze.frozen.is_empty()
                    || !c.freeze.trainable.is_empty()
                {
                    return err("freeze", "SFT trains the whole model or an [adapter]; partial freezing of decoders is not supported yet".into());
                }
            }
            TaskType::Reward | TaskType::Dpo => {
                let d = &c.data;
                let what = if c.task.kind == TaskType::Reward {
                    "a reward model"
                } else {
                    "DPO"
                };
                for (key, given) in [
                    ("data.label", !d.label.is_empty()),
                    ("data.text", !d.text.is_empty()),
                    ("data.text_pair", d.text_pair.is_some()),
                    ("data.messages", d.messages.is_some()),
                    ("data.response", d.response.is_some()),
                    ("data.completion", d.completion.is_some()),
                ] {
                    if given {
                        return err(
                            key,
                            format!("{what} learns from preference pairs (`prompt`, `chosen`, `rejected` fields), not labels or single answers: leave `{key}` out (set `data.prompt`, `data.chosen`, `data.rejected` where the fields have other names)"),
                        );
                    }
                }
                if d.packing {
                    return err("data.packing", format!("{what} does not pack pairs"));
                }
                if d.format.is_some_and(|f| f != Format::Jsonl) {
                    return err(
                        "data.format",
                        "preference pairs are JSONL rows (\"jsonl\")".into(),
                    );
                }
                if c.task.kind == TaskType::Dpo
                    && (c.freeze.preset != FreezePreset::Full
                        || !c.freeze.frozen.is_empty()
                        || !c.freeze.trainable.is_empty())
                {
                    return err("freeze", "DPO trains the whole model or an [adapter]; partial freezing of decoders is not supported yet".into());
                }
            }
            TaskType::ImageClassification => {
                image_checks(c).map_err(|(key, msg)| cfg_err(p, format!("`{key}`: {msg}")))?
            }
            _ => {
                for (key, v) in [("data.text", &c.data.text), ("data.label", &c.data.label)] {
                    if v.is_empty() {
                        return err(key, "is required for classification and regression".into());
                    }
                }
                if c.data.chosen.is_some()
                    || c.data.rejected.is_some()
                    || c.data.truncation_mode.is_some()
                {
                    return err(
                        "data",
                        "`chosen`, `rejected` and `truncation_mode` are for preference pairs (task.type = \"reward\" or \"dpo\")".into(),
                    );
                }
                if c.data.packing || c.data.messages.is_some() || c.data.prompt.is_some() {
                    return err(
                        "data",
                        "`messages`, `prompt` and `packing` are for task.type = \"sft\"".into(),
                    );
                }
            }
        }
        match (c.task.kind, &c.dpo, &c.reward) {
            (TaskType::Dpo, Some(dpo), _) => {
                if !(dpo.beta > 0.0 && dpo.beta.is_finite()) {
                    return err("dpo.beta", format!("{} must be > 0", dpo.beta));
                }
                if !(0.0..=0.5).contains(&dpo.label_smoothing) {
                    return err(
                        "dpo.label_smoothing",
                        format!("{} is not in [0, 0.5]", dpo.label_smoothing),
                    );
                }
                if dpo.label_smoothing > 0.0 && dpo.loss_type != DpoLossType::Sigmoid {
                    return err(
                        "dpo.label_smoothing",
                        "is for loss_type = \"sigmoid\" (TRL's cDPO)".into(),
                    );
                }
            }
            (TaskType::Reward, _, Some(r)) => {
                if let Some(x) = r.center_rewards_coefficient {
                    if !(x >= 0.0 && x.is_finite()) {
                        return err(
                            "reward.center_rewards_coefficient",
                            format!("{x} must be >= 0"),
                        );
                    }
                }
            }
            (k, Some(_), _) if k != TaskType::Dpo => {
                return err("dpo", "the [dpo] section is for task.type = \"dpo\"".into())
            }
            (k, _, Some(_)) if k != TaskType::Reward => {
                return err(
                    "reward",
                    "the [reward] section is for task.type = \"reward\"".into(),
                )
            }
            _ => {}
        }
        match (c.task.kind, &c.ppo) {
            (TaskType::Ppo, ppo) => {
                let d = PpoSection::default();
                let ppo = ppo.as_ref().unwrap_or(&d);
                ppo_checks(ppo).map_err(|(key, msg)| cfg_err(p, format!("`ppo.{key}`: {msg}")))?;
                if t.max_steps.is_some() {
                    return err(
                        "train.max_steps",
                        "PPO counts its work in rollouts: set `ppo.total_episodes` (prompts in all) or `train.epochs`".into(),
                    );
                }
                if !c.train.device.is_cpu() {
                    return err("train.device", "PPO runs on the CPU for now".into());
                }
            }
            (_, Some(_)) => {
                return err("ppo", "the [ppo] section is for task.type = \"ppo\"".into())
            }
            _ => {}
        }
        match (c.task.weak, &c.weak) {
            (WeakMode::Off, _) => {}
            (_, None) => {
                return err(
                    "task.weak",
                    "needs a [weak] section with the rules (`rules`, `rule` or `spamassassin`)"
                        .into(),
                )
            }
            (_, Some(_)) if c.task.kind != TaskType::Classification => {
                return err(
                    "task.weak",
                    "weak supervision trains a classifier: task.type = \"classification\"".into(),
                )
            }
            (_, Some(w)) => {
                weak_checks(w).map_err(|(key, msg)| cfg_err(p, format!("`weak.{key}`: {msg}")))?
            }
        }
        if c.task.kind != TaskType::ImageClassification {
            let d = &c.data;
            for (key, given) in [
                ("image", c.image.is_some()),
                ("data.train_labels", d.train_labels.is_some()),
                ("data.validation_labels", d.validation_labels.is_some()),
                ("data.test_labels", d.test_labels.is_some()),
                ("data.label_names", d.label_names.is_some()),
                (
                    "freeze.batch_norm",
                    c.freeze.batch_norm != FrozenBatchNorm::Eval,
                ),
            ] {
                if given {
                    return err(key, "is for task.type = \"image_classification\"".into());
                }
            }
        }
        if c.weak.is_some() && c.task.kind != TaskType::Classification {
            return err(
                "weak",
                "the [weak] section is for task.type = \"classification\"".into(),
            );
        }
        if let Some(es) = &t.early_stopping {
            let ok: &[&str] = match c.task.kind {
                TaskType::Classification | TaskType::ImageClassification => {
                    &["loss", "accuracy", "macro_f1"]
                }
                TaskType::Regression => &["loss", "mse", "pearson"],
                TaskType::Sft => &["loss", "perplexity"],
                TaskType::Reward => &["loss", "accuracy", "margin"],
                TaskType::Dpo => &["loss", "rewards/accuracies", "rewards/margins"],
                TaskType::Ppo => &["reward", "exact_match"],
            };
            if !ok.contains(&es.metric.as_str()) {
                return err(
                    "train.early_stopping.metric",
                    format!("`{}` is not one of {ok:?}", es.metric),
                );
            }
            if es.patience == 0 {
                return err("train.early_stopping.patience", "must be > 0".into());
            }
        }
        if let Some(n) = t.threads {
            if n == 0 {
                return err("train.threads", "must be > 0".into());
            }
        }
        for (key, v) in [
            ("train.eval_every", t.eval_every),
            ("train.log_every", Some(t.log_every)),
            ("train.max_steps", t.max_steps),
            ("train.eval_batch_size", t.eval_batch_size),
        ] {
            if v == Some(0) {
                return err(key, "must be > 0".into());
            }
        }
        if t.save_every == Some(0) {
            return err("train.save_every", "must be > 0".into());
        }
        if t.save_total_limit == 0 {
            return err(
                "train.save_total_limit",
                "must be > 0 (a run keeps at least its last checkpoint)".into(),
            );
        }
        Ok(())
    }

    /// The resolved config as TOML (saved in the run folder).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(&self.config).map_err(|e| Error::msg(e.to_string()))
    }

    /// The metric that picks the best checkpoint.
    pub fn selection_metric(&self) -> String {
        match &self.config.train.early_stopping {
            Some(es) => es.metric.clone(),
            None => match self.config.task.kind {
                TaskType::Classification | TaskType::ImageClassification => "accuracy".into(),
                TaskType::Reward => "accuracy".into(),
                TaskType::Regression | TaskType::Sft | TaskType::Dpo => "loss".into(),
                TaskType::Ppo => "reward".into(),
            },
        }
    }
}

/// A setting's name as the config writes it ("exact_match").
fn snake<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// The `[weak]` values that cannot work: the key and why.
fn weak_checks(w: &WeakSection) -> std::result::Result<(), (&'static str, String)> {
    if w.rules.is_empty() && w.rule.is_empty() && w.spamassassin.is_none() {
        return Err((
            "rules",
            "no rule: give rule files, `[[weak.rule]]` tables or `[weak.spamassassin]`".into(),
        ));
    }
    if w.teacher_update == 0 {
        return Err(("teacher_update", "must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&w.threshold) {
        return Err(("threshold", format!("{} is not in [0, 1)", w.threshold)));
    }
    for (key, v) in [("margin", w.margin), ("lambda", w.lambda), ("mu", w.mu)] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err((key, format!("{v} must be >= 0")));
        }
    }
    if let Some(lr) = w.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(("lr", format!("{lr} must be > 0")));
        }
    }
    Ok(())
}

/// The `[ppo]` values that cannot work: the key and why.
fn ppo_checks(p: &PpoSection) -> std::result::Result<(), (&'static str, String)> {
    let pos = |key: &'static str, v: f64| {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err((key, format!("{v} must be > 0")))
        }
    };
    match p.reward {
        PpoReward::Model if p.reward_model.is_none() => {
            return Err(("reward_model", "reward = \"model\" needs the folder of a reward-model run (`afinar train` with task.type = \"reward\")".into()))
        }
        PpoReward::Regex => match &p.reward_regex {
            None => return Err(("reward_regex", "reward = \"regex\" needs the pattern".into())),
            Some(r) => {
                regex::Regex::new(r).map_err(|e| ("reward_regex", format!("{r:?} is not a regex: {e}")))?;
            }
        },
        PpoReward::Length if p.target_length.unwrap_or(0) == 0 => {
            return Err(("target_length", "reward = \"length\" needs target_length > 0 (tokens)".into()))
        }
        _ => {}
    }
    for (key, given, kind) in [
        ("reward_model", p.reward_model.is_some(), PpoReward::Model),
        ("reward_regex", p.reward_regex.is_some(), PpoReward::Regex),
        (
            "target_length",
            p.target_length.is_some(),
            PpoReward::Length,
        ),
    ] {
        if given && p.reward != kind {
            return Err((
                key,
                format!(
                    "is for reward = \"{}\" (reward is \"{}\")",
                    snake(&kind),
                    snake(&p.reward)
                ),
            ));
        }
    }
    if p.value_init == Some(ValueInit::RewardModel) && p.reward != PpoReward::Model {
        return Err((
            "value_init",
            "\"reward_model\" needs reward = \"model\"".into(),
        ));
    }
    for (key, v) in [
        ("num_ppo_epochs", p.num_ppo_epochs),
        ("num_mini_batches", p.num_mini_batches),
        ("response_length", p.response_length),
    ] {
        if v == 0 {
            return Err((key, "must be > 0".into()));
        }
    }
    if p.total_episodes == Some(0) {
        return Err(("total_episodes", "must be > 0".into()));
    }
    pos("temperature", p.temperature as f64)?;
    if let Some(tp) = p.top_p {
        if !(tp > 0.0 && tp <= 1.0) {
            return Err(("top_p", format!("{tp} is not in (0, 1]")));
        }
    }
    if p.top_k == Some(0) {
        return Err(("top_k", "must be > 0".into()));
    }
    if !(p.kl_coef >= 0.0 && p.kl_coef.is_finite()) {
        return Err(("kl_coef", format!("{} must be >= 0", p.kl_coef)));
    }
    pos("target", p.target)?;
    pos("horizon", p.horizon)?;
    pos("cliprange", p.cliprange)?;
    pos("cliprange_value", p.cliprange_value)?;
    if !(p.vf_coef >= 0.0 && p.vf_coef.is_finite()) {
        return Err(("vf_coef", format!("{} must be >= 0", p.vf_coef)));
    }
    for (key, v) in [("gamma", p.gamma), ("lam", p.lam)] {
        if !(0.0..=1.0).contains(&v) {
            return Err((key, format!("{v} is not in [0, 1]")));
        }
    }
    if let Some(m) = p.missing_eos_penalty {
        if !m.is_finite() {
            return Err(("missing_eos_penalty", format!("{m} is not finite")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
path = "m"
[data]
train = "t.jsonl"
text = "text"
label = "label"
split = [0.8, 0.1, 0.1]
[train]
lr = 1e-4
"#;

    #[test]
    fn good_config_and_overrides() {
        let p = Plan::from_str(
            GOOD,
            Path::new("x.toml"),
            &["train.lr=3e-5".into(), "freeze.preset=head_only".into()],
        )
        .unwrap();
        assert_eq!(p.config.train.lr, 3e-5);
        assert_eq!(p.config.freeze.preset, FreezePreset::HeadOnly);
        assert_eq!(p.config.seeds.init, 42);
    }

    #[test]
    fn unknown_key_names_key_file_and_line() {
        let bad = GOOD.replace("lr = 1e-4", "lr = 1e-4\nlearning_rate = 3");
        let e = Plan::from_str(&bad, Path::new("runs/x.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runs/x.toml") && e.contains("learning_rate") && e.contains("line 11"),
            "{e}"
        );
        let e = Plan::from_str(GOOD, Path::new("x.toml"), &["train.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("lrr"), "{e}");
    }

    /// A file error names the key of the error the file shows, also when
    /// another key has an error with the same text: the table is read in
    /// the file's order (toml's `preserve_order`), as the file is.
    #[test]
    fn a_file_error_names_its_own_key() {
        let text = format!(
            "[train]\nlr = 1e-4\nepochs = \"two\"\n{}",
            GOOD.replace("[train]\nlr = 1e-4\n", "")
        )
        .replace("path = \"m\"", "path = \"m\"\nmax_length = \"two\"");
        let e = Plan::from_str(&text, Path::new("x.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("in `train.epochs`") && !e.contains("max_length"),
            "{e}"
        );
    }

    /// `rank_pattern` keeps the file's order (PEFT takes the first match),
    /// also through the table `--set` edits.
    #[test]
    fn rank_pattern_keeps_the_file_order() {
        let text = SFT.replace(
            "target_modules = [\"q_proj\"]",
            "target_modules = [\"q_proj\"]\nrank_pattern = { \"q_proj\" = 2, \"layers.0.q_proj\" = 4 }",
        );
        let p = Plan::from_str(&text, Path::new("x.toml"), &["train.lr=1e-3".into()]).unwrap();
        let Some(crate::adapters::AdapterConfig::Lora(l)) = &p.config.adapter else {
            panic!("a lora adapter")
        };
        let keys: Vec<&str> = l.rank_pattern.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["q_proj", "layers.0.q_proj"]);
    }

    #[test]
    fn base_dtype_quantized_needs_a_gguf_adapter_run() {
        let sft = &SFT.replace(
            "path = \"m\"",
            "path = \"m.gguf\"\nbase_dtype = \"quantized\"",
        );
        let p = Plan::from_str(sft, Path::new("x.toml"), &[]).unwrap();
        assert_eq!(p.config.model.base_dtype, BaseDtype::Quantized);
        let asset = sft.replace("path = \"m.gguf\"", "asset = \"smollm2-135m-instruct\"");
        Plan::from_str(&asset, Path::new("x.toml"), &[]).unwrap();
        let f32 =
            Plan::from_str(sft, Path::new("x.toml"), &["model.base_dtype=f32".into()]).unwrap();
        assert_eq!(f32.config.model.base_dtype, BaseDtype::F32);
        for (set, want) in [
            ("model.path=m", "needs a GGUF model"),
            ("adapter.use_dora=true", "DoRA"),
            ("model.base_dtype=q4", "base_dtype"),
        ] {
            let e = Plan::from_str(sft, Path::new("x.toml"), &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("base_dtype") && e.contains(want), "{set}: {e}");
        }
        let no_adapter = &sft[..sft.find("[adapter]").unwrap()].to_string();
        let e = Plan::from_str(
            &format!("{no_adapter}[train]\nlr = 1e-4\n"),
            Path::new("x.toml"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`model.base_dtype`") && e.contains("[adapter]"),
            "{e}"
        );
    }

    #[test]
    fn train_device_and_bf16_base_are_checked() {
        let sft = SFT;
        let p = Plan::from_str(sft, Path::new("x.toml"), &[]).unwrap();
        assert_eq!(p.config.train.device, DeviceSpec::Cpu);
        assert!(!p.config.train.gradient_checkpointing);
        let gpu = Plan::from_str(
            sft,
            Path::new("x.toml"),
            &[
                "train.device=cuda:1".into(),
                "model.base_dtype=bf16".into(),
                "train.gradient_checkpointing=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(gpu.config.model.base_dtype, BaseDtype::Bf16);
        assert_eq!(gpu.config.train.device, DeviceSpec::Cuda(1));
        assert!(gpu.config.train.gradient_checkpointing);
        for (sets, key, want) in [
            (
                vec!["train.device=gpu"],
                "in `train.device`",
                "not a device",
            ),
            (
                vec!["model.base_dtype=bf16"],
                "`model.base_dtype`",
                "GPU runs",
            ),
            (
                vec![
                    "train.device=cuda",
                    "model.path=m.gguf",
                    "model.base_dtype=quantized",
                ],
                "`model.base_dtype`",
                "CPU path",
            ),
            (
                vec!["task.type=classification", "train.device=cuda"],
                "`train.device`",
                "decoder SFT",
            ),
        ] {
            let sets: Vec<String> = sets.into_iter().map(String::from).collect();
            let e = Plan::from_str(sft, Path::new("x.toml"), &sets)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(want), "{sets:?}: {e}");
        }
        // Without the cuda feature, asking for a GPU is an error naming the feature.
        if !cfg!(feature = "cuda") {
            let e = crate::device(DeviceSpec::Cuda(0)).unwrap_err().to_string();
            assert!(e.contains("cuda feature") && e.contains("cuda:0"), "{e}");
        }
        assert!(crate::device(DeviceSpec::Cpu).unwrap().is_cpu());
        for (s, want) in [
            ("cpu", Some(DeviceSpec::Cpu)),
            ("cuda", Some(DeviceSpec::Cuda(0))),
            ("cuda:3", Some(DeviceSpec::Cuda(3))),
            ("tpu", None),
            ("cuda:", None),
            ("cuda:+1", None),
            ("cuda:x", None),
            ("CPU", None),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().ok(), want, "{s}");
        }
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (from, to, key) in [
            ("lr = 1e-4", "lr = -1.0", "train.lr"),
            (
                "split = [0.8, 0.1, 0.1]",
                "split = [0.8, 0.1, 0.2]",
                "data.split",
            ),
            ("path = \"m\"", "path = \"m\"\nasset = \"a\"", "model"),
        ] {
            let e = Plan::from_str(&GOOD.replace(from, to), Path::new("x.toml"), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = Plan::from_str(
            GOOD,
            Path::new("x.toml"),
            &["freeze.preset=last_layers".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("freeze.last_layers"), "{e}");
    }

    /// A decoder SFT run with a LoRA adapter (parsed only: `m` need not exist).
    const SFT: &str = r#"
[model]
path = "m"
[task]
type = "sft"
[data]
train = "t.jsonl"
messages = "input"
split = [0.8, 0.1, 0.1]
[adapter]
type = "lora"
target_modules = ["q_proj"]
[train]
lr = 1e-4
"#;

    /// Every typed mode: a wrong value fails at `Plan::from_str` naming the
    /// key, the file and its line, and the valid values; given by `--set`,
    /// naming the `--set` and the key.
    #[test]
    fn a_wrong_mode_names_key_file_line_and_valid_values() {
        let prompt = SFT.replace(
            "type = \"lora\"\ntarget_modules = [\"q_proj\"]",
            "type = \"prompt_tuning\"\nnum_virtual_tokens = 4",
        );
        // (base config, the line the key goes after, key, bad value, valid values)
        let cases: [(&str, &str, &str, &str, &[&str]); 7] = [
            (
                GOOD,
                "[train]",
                "freeze.preset",
                "bottom_half",
                &["`full`", "`head_only`", "`last_layers`"],
            ),
            (
                SFT,
                "messages = \"input\"",
                "data.overflow",
                "wrap",
                &["`truncate`", "`error`", "`skip`"],
            ),
            (
                GOOD,
                "label = \"label\"",
                "data.format",
                "parquet",
                &["`jsonl`", "`csv`", "`tsv`"],
            ),
            (
                SFT,
                "lr = 1e-4",
                "train.device",
                "gpu",
                &[r#""cpu", "cuda" or "cuda:N""#],
            ),
            (
                GOOD,
                "path = \"m\"",
                "model.format",
                "onnx",
                &["`safetensors`", "`gguf`"],
            ),
            (
                SFT,
                "target_modules = [\"q_proj\"]",
                "adapter.init_lora_weights",
                "pissa",
                &["`kaiming`", "`gaussian`"],
            ),
            (
                &prompt,
                "num_virtual_tokens = 4",
                "adapter.prompt_tuning_init",
                "vocab",
                &["`random`", "`sample_vocab`", "`text`"],
            ),
        ];
        let file = Path::new("runs/x.toml");
        for (base, after, key, bad, valid) in cases {
            let (section, name) = key.split_once('.').unwrap();
            // Another name, and a value of another type.
            for value in [format!("\"{bad}\""), "3".into()] {
                let line = format!("{name} = {value}");
                let text = if after == "[train]" {
                    // A section of its own, before [train].
                    base.replace("[train]", &format!("[{section}]\n{line}\n[train]"))
                } else {
                    base.replace(after, &format!("{after}\n{line}"))
                };
                let n = text.lines().position(|l| l == line).unwrap() + 1;
                let e = Plan::from_str(&text, file, &[]).unwrap_err().to_string();
                for want in [
                    "runs/x.toml",
                    &format!("line {n}"),
                    &line,
                    &format!("in `{key}`"),
                ]
                .into_iter()
                .chain(valid.iter().copied())
                {
                    assert!(e.contains(want), "{key} in the file: no {want:?} in\n{e}");
                }
                // The same value by `--set` on the config without it.
                let set = format!("{key}={value}");
                let e = Plan::from_str(base, file, &[set.clone()])
                    .unwrap_err()
                    .to_string();
                for want in [
                    "runs/x.toml",
                    &format!("--set `{set}`"),
                    &format!("in `{key}`"),
                ]
                .into_iter()
                .chain(valid.iter().copied())
                {
                    assert!(e.contains(want), "--set {set}: no {want:?} in\n{e}");
                }
            }
        }
    }

    /// The modes that were enums already fail the same way on a value of
    /// another type (serde's own enums name no valid value then).
    #[test]
    fn every_mode_names_its_values_on_a_wrong_type() {
        for (set, valid) in [
            (
                "task.type=1",
                "one of `classification`, `regression`, `sft`",
            ),
            ("task.pooling=true", "`cls`"),
            ("train.schedule=[1]", "`linear`"),
            ("train.on_non_finite={a = 1}", "`stop` or `skip`"),
            ("model.base_dtype=16", "one of `f32`, `quantized`, `bf16`"),
            ("adapter.type=2", "one of `lora`, `ia3`, `prompt_tuning`"),
            ("adapter.init_lora_weights=true", "`kaiming` or `gaussian`"),
        ] {
            let key = set.split('=').next().unwrap();
            let e = Plan::from_str(SFT, Path::new("x.toml"), &[set.into()])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("invalid type")
                    && e.contains(valid)
                    && e.contains(&format!("in `{key}`")),
                "{set}: {e}"
            );
        }
    }

    #[test]
    fn typed_modes_read_as_written() {
        let p = Plan::from_str(
            GOOD,
            Path::new("x.toml"),
            &[
                "data.format=json".into(),
                "freeze.preset=last_layers".into(),
                "freeze.last_layers=2".into(),
            ],
        )
        .unwrap();
        assert_eq!(p.config.data.format, Some(Format::Jsonl));
        assert_eq!(p.config.freeze.preset, FreezePreset::LastLayers);
        for (f, want) in [
            ("csv", Format::Csv),
            ("tsv", Format::Tsv),
            ("jsonl", Format::Jsonl),
        ] {
            let p =
                Plan::from_str(GOOD, Path::new("x.toml"), &[format!("data.format={f}")]).unwrap();
            assert_eq!(p.config.data.format, Some(want));
        }
        let p = Plan::from_str(SFT, Path::new("x.toml"), &[]).unwrap();
        assert_eq!(p.config.data.overflow, None);
        for (o, want) in [
            ("truncate", Overflow::Truncate),
            ("skip", Overflow::Skip),
            ("error", Overflow::Error),
        ] {
            let p =
                Plan::from_str(SFT, Path::new("x.toml"), &[format!("data.overflow={o}")]).unwrap();
            assert_eq!(p.config.data.overflow, Some(want));
        }
        Plan::from_str(SFT, Path::new("x.toml"), &["data.format=json".into()]).unwrap();
        let e = Plan::from_str(SFT, Path::new("x.toml"), &["data.format=csv".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`data.format`: SFT reads JSONL rows"), "{e}");
        // `last_layers` without its preset names both.
        let e = Plan::from_str(
            GOOD,
            Path::new("x.toml"),
            &[
                "freeze.preset=head_only".into(),
                "freeze.last_layers=2".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`freeze.last_layers`: 2 is only for preset = \"last_layers\" (preset is \"head_only\")"),
            "{e}"
        );
    }

    /// `model.format` must agree with what the source holds; it decides
    /// whether `base_dtype = "quantized"` has a GGUF model to quantise.
    #[test]
    fn model_format_agrees_with_the_source() {
        let d = tempfile::tempdir().unwrap();
        let folder = d.path().join("m");
        std::fs::create_dir(&folder).unwrap();
        // A GGUF file without the extension: told by its magic.
        let gguf = d.path().join("weights");
        std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
        let q = |s: &Path| format!("{:?}", s.display().to_string());
        let with = |path: &str| SFT.replace("path = \"m\"", &format!("path = {path}"));
        let load = |text: &str, sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Plan::from_str(text, Path::new("x.toml"), &sets).map_err(|e| e.to_string())
        };
        // Given or not, a folder is safetensors and the magic makes GGUF.
        let p = load(&with(&q(&folder)), &["model.format=safetensors"]).unwrap();
        assert_eq!(p.config.model.format(), SourceFormat::Safetensors);
        let p = load(&with(&q(&gguf)), &[]).unwrap();
        assert_eq!(p.config.model.format, None);
        assert_eq!(p.config.model.format(), SourceFormat::Gguf);
        load(&with(&q(&gguf)), &["model.base_dtype=quantized"]).unwrap();
        // A name that is not there yet: its extension, else what `format` says.
        assert_eq!(
            load(&with("\"x.gguf\""), &[])
                .unwrap()
                .config
                .model
                .format(),
            SourceFormat::Gguf
        );
        load(&SFT, &["model.format=gguf", "model.base_dtype=quantized"]).unwrap();
        let e = load(&SFT, &["model.base_dtype=quantized"]).unwrap_err();
        assert!(e.contains("needs a GGUF model"), "{e}");
        // Disagreement names both.
        for (text, sets, source, held) in [
            (
                with(&q(&folder)),
                ["model.format=gguf"],
                q(&folder),
                "a safetensors model folder",
            ),
            (
                with(&q(&gguf)),
                ["model.format=safetensors"],
                q(&gguf),
                "a GGUF file",
            ),
            (
                with("\"x.gguf\""),
                ["model.format=safetensors"],
                "\"x.gguf\"".into(),
                "a GGUF file",
            ),
        ] {
            let e = load(&text, &sets).unwrap_err();
            let want = format!(
                "`model.format`: \"{}\" does not match `model.path` = {source}, {held}",
                sets[0].rsplit('=').next().unwrap()
            );
            assert!(e.contains(&want), "{want}\n{e}");
        }
        let asset = SFT.replace("path = \"m\"", "asset = \"smollm2-135m-instruct\"");
        let e = load(&asset, &["model.format=safetensors"]).unwrap_err();
        assert!(
            e.contains("does not match asset `smollm2-135m-instruct`, a GGUF file"),
            "{e}"
        );
        let hub = SFT.replace("path = \"m\"", "hub = \"org/name\"");
        let e = load(&hub, &["model.format=gguf"]).unwrap_err();
        assert!(
            e.contains("does not match hub model `org/name`, a safetensors model folder"),
            "{e}"
        );
    }

    /// The run folder's `config.toml` (what `--resume` reads) loads back to
    /// the same config, every typed mode included.
    #[test]
    fn the_saved_config_round_trips() {
        let prompt = SFT.replace(
            "type = \"lora\"\ntarget_modules = [\"q_proj\"]",
            "type = \"prompt_tuning\"\nnum_virtual_tokens = 4",
        );
        for (text, sets) in [
            (
                GOOD,
                &[
                    "freeze.preset=last_layers",
                    "freeze.last_layers=2",
                    "data.format=json",
                    "model.format=safetensors",
                ][..],
            ),
            (GOOD, &["freeze.preset=head_only", "data.format=tsv"]),
            (
                SFT,
                &[
                    "data.overflow=skip",
                    "train.device=cuda",
                    "model.base_dtype=bf16",
                    "adapter.init_lora_weights=gaussian",
                ],
            ),
            (
                SFT,
                &[
                    "train.device=cuda:2",
                    "model.base_dtype=bf16",
                    "data.overflow=error",
                ],
            ),
            (&prompt, &["adapter.prompt_tuning_init=sample_vocab"]),
        ] {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let p = Plan::from_str(text, Path::new("x.toml"), &sets).unwrap();
            let saved = p.to_toml().unwrap();
            let again = Plan::from_str(&saved, Path::new("run/config.toml"), &[])
                .unwrap_or_else(|e| panic!("{sets:?}: {e}\n{saved}"));
            assert_eq!(again.to_toml().unwrap(), saved);
            let (a, b) = (&p.config, &again.config);
            assert_eq!(a.freeze.preset, b.freeze.preset);
            assert_eq!(a.freeze.last_layers, b.freeze.last_layers);
            assert_eq!(a.data.format, b.data.format);
            assert_eq!(a.data.overflow, b.data.overflow);
            assert_eq!(a.train.device, b.train.device);
            assert_eq!(a.model.format, b.model.format);
            assert_eq!(a.adapter, b.adapter);
        }
        let p = Plan::from_str(
            SFT,
            Path::new("x.toml"),
            &["train.device=cuda".into(), "model.base_dtype=bf16".into()],
        )
        .unwrap();
        let saved = p.to_toml().unwrap();
        assert!(saved.contains("device = \"cuda:0\""), "{saved}");
    }
}
