//! Task heads trained from scratch on a pretrained body of any family:
//! sequence classification and regression as transformers'
//! `*ForSequenceClassification` ([`SequenceModel`]), and the language-model
//! head of the decoders ([`lm::CausalLm`]).
//!
//! Pooling follows each transformers class:
//! - BERT (`BertForSequenceClassification`): the pooler, `tanh(dense([CLS]))`,
//!   then dropout and `classifier` (with bias);
//! - decoders (`LlamaForSequenceClassification`,
//!   `GPT2ForSequenceClassification`): the hidden state of the last token
//!   that is not the pad token, then `score` (no bias, no dropout);
//! - mean pooling over real tokens: an afinar option (sentence-transformers
//!   style) with no transformers class.

pub mod lm;

pub use lm::CausalLm;

use crate::models::{Body, Family, Inputs, ModelConfig};
use crate::nn::{self, DropoutRng, Linear};
use crate::params::{normal_init, ParamStore, Path};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Classification,
    Regression,
    /// One score per sequence with no loss of its own: a reward model's
    /// (trained by its objective, e.g. Bradley-Terry on preference pairs)
    /// or a value head's. transformers' class is the same
    /// `*ForSequenceClassification` with `num_labels = 1`.
    Scalar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// transformers' BertPooler: tanh(dense([CLS])). BERT only.
    Cls,
    /// Mean over real tokens (sentence-transformers style).
    Mean,
    /// The last token that is not the pad token (transformers' decoder
    /// `*ForSequenceClassification`). Decoders only.
    Last,
}

impl Pooling {
    /// What the family's transformers class does.
    pub fn default_for(family: Family) -> Self {
        match family {
            Family::Bert => Pooling::Cls,
            Family::Llama | Family::Gpt2 => Pooling::Last,
        }
    }

    /// Refuse a pooling the family cannot do (the message begins with the value).
    pub fn check(self, family: Family) -> std::result::Result<(), String> {
        match (self, family) {
            (Pooling::Cls, f) if f.is_decoder() => Err(
                "\"cls\" reads BERT's pooler over the first token; a decoder's sequence head pools \"last\" (or \"mean\")".into(),
            ),
            (Pooling::Last, Family::Bert) => Err(
                "\"last\" is the decoders' pooling; BERT pools \"cls\" (or \"mean\")".into(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadConfig {
    pub task: TaskKind,
    pub pooling: Pooling,
    /// Number of outputs: classes, or 1 for regression.
    pub num_labels: usize,
    pub dropout: f32,
}

/// The head's module names in the family's transformers class.
pub struct HeadNames {
    /// BERT's pooler (`Pooling::Cls` only).
    pub pooler: Option<&'static str>,
    /// The output layer: `classifier` (BERT) or `score` (decoders).
    pub out: &'static str,
    /// Whether the output layer has a bias (decoders' `score` has none).
    pub out_bias: bool,
}

pub fn head_names(family: Family) -> HeadNames {
    match family {
        Family::Bert => HeadNames {
            pooler: Some("bert.pooler.dense"),
            out: "classifier",
            out_bias: true,
        },
        Family::Llama | Family::Gpt2 => HeadNames {
            pooler: None,
            out: "score",
            out_bias: false,
        },
    }
}

/// Parameter patterns of a family's sequence head (a new head always trains).
pub fn head_patterns(family: Family) -> &'static [&'static str] {
    match family {
        Family::Bert => &["bert.pooler.*", "classifier.*"],
        Family::Llama | Family::Gpt2 => &["score.*"],
    }
}

/// A body with a sequence-level head. Parameter names are those of the
/// family's `*ForSequenceClassification`.
pub struct SequenceModel {
    pub body: Body,
    pooler: Option<Linear>,
    out: Linear,
    pub head: HeadConfig,
    /// The pad id that `Pooling::Last` skips (transformers' `pad_token_id`).
    pub pad_id: u32,
}

impl SequenceModel {
    /// Put the head's weights into `store` where the checkpoint has none,
    /// initialised as transformers does (N(0, initializer_range), zero
    /// bias), drawn from `rng` (seeded from `seeds.init`). Mean pooling
    /// drops BERT's pooler weights: they are neither trained nor saved.
    pub fn init_head(
        store: &mut ParamStore,
        cfg: &ModelConfig,
        head: &HeadConfig,
        rng: &mut impl rand::Rng,
    ) -> Result<()> {
        let names = head_names(cfg.family());
        head.pooling
            .check(cfg.family())
            .map_err(|e| Error::msg(format!("pooling {e}")))?;
        let h = cfg.hidden_size();
        let std = cfg.initializer_range();
        if let Some(pooler) = names.pooler {
            if head.pooling == Pooling::Cls {
                store.get_or_init(&format!("{pooler}.weight"), &[h, h], || {
                    normal_init(&[h, h], std, rng)
                })?;
                store.get_or_init(&format!("{pooler}.bias"), &[h], || {
                    Ok(Tensor::zeros(h, DType::F32, &Device::Cpu)?)
                })?;
            } else {
                store.remove(&format!("{pooler}.weight"));
                store.remove(&format!("{pooler}.bias"));
            }
        }
        let n = head.num_labels;
        store.get_or_init(&format!("{}.weight", names.out), &[n, h], || {
            normal_init(&[n, h], std, rng)
        })?;
        if names.out_bias {
            store.get_or_init(&format!("{}.bias", names.out), &[n], || {
                Ok(Tensor::zeros(n, DType::F32, &Device::Cpu)?)
            })?;
        }
        Ok(())
    }

    /// Build body and head from the store (after [`Self::init_head`] and
    /// any adapter). `pad_id`: the id `Pooling::Last` skips.
    pub fn build(
        store: &ParamStore,
        cfg: &ModelConfig,
        head: &HeadConfig,
        pad_id: u32,
    ) -> Result<Self> {
        let names = head_names(cfg.family());
        head.pooling
            .check(cfg.family())
            .map_err(|e| Error::msg(format!("pooling {e}")))?;
        let h = cfg.hidden_size();
        let root = Path::root(store, "");
        let body = Body::load(&root, cfg)?;
        let pooler = match (names.pooler, head.pooling) {
            (Some(p), Pooling::Cls) => Some(Path::root(store, p).linear(h, h, true)?),
            _ => None,
        };
        let out = root
            .pp(names.out)
            .linear(h, head.num_labels, names.out_bias)?;
        Ok(SequenceModel {
            body,
            pooler,
            out,
            head: head.clone(),
            pad_id,
        })
    }

    /// The model as a run assembles it: the new head's weights drawn from
    /// `init_seed` ([`Self::init_head`]), then the adapter attached as PEFT
    /// does for SEQ_CLS (the base frozen, the head in `modules_to_save`;
    /// its weights drawn from the same stream), then built.
    pub fn new(
        store: &mut ParamStore,
        cfg: &ModelConfig,
        head: &HeadConfig,
        init_seed: u64,
        adapter: Option<&crate::adapters::AdapterConfig>,
        pad_id: u32,
    ) -> Result<Self> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(init_seed);
        Self::init_head(store, cfg, head, &mut rng)?;
        if let Some(ad) = adapter {
            crate::adapters::attach(store, ad, crate::adapters::PeftTask::SeqCls, &mut rng)?;
        }
        Self::build(store, cfg, head, pad_id)
    }

    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.body.set_gradient_checkpointing(on)
    }

    /// The pooled sequence vector `[B, C]` (before head dropout).
    pub fn pooled(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        match self.head.pooling {
            Pooling::Cls => {
                let p = self
                    .pooler
                    .as_ref()
                    .ok_or_else(|| Error::msg("pooling \"cls\" without a pooler"))?;
                // Only the first position is read: the body may skip the
                // rest of its last layer ([`Body::forward_first`]).
                let hidden = match self.body.forward_first(x, dropout)? {
                    Some(h) => h,                           // [B, 1, C]
                    None => self.body.forward(x, dropout)?, // [B, T, C]
                };
                let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?; // [B, C]
                Ok(p.forward_t(&cls, dropout)?.tanh()?)
            }
            Pooling::Mean => mean_pool(&self.body.forward(x, dropout)?, &x.mask_tensor()?),
            Pooling::Last => {
                let hidden = self.body.forward(x, dropout)?; // [B, T, C]
                let rows = last_tokens(&x.ids, self.pad_id)?;
                let (b, t, c) = hidden.dims3()?;
                let flat: Vec<u32> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, &j)| (i * t + j) as u32)
                    .collect();
                let idx = Tensor::from_vec(flat, b, hidden.device())?;
                Ok(hidden.reshape((b * t, c))?.index_select(&idx, 0)?) // [B, C]
            }
        }
    }

    /// Logits `[B, num_labels]` (regression: `[B, 1]`).
    pub fn forward(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        Ok(self.forward_features(x, dropout)?.1)
    }

    /// The pooled features `[B, H]` (before the head's dropout) and the
    /// head's outputs `[B, num_labels]`: what COSINE's contrastive term reads.
    pub fn forward_features(
        &self,
        x: &Inputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<(Tensor, Tensor)> {
        let pooled = self.pooled(x, dropout)?;
        let dropped = match dropout {
            Some(r) if self.head.dropout > 0.0 => {
                nn::dropout(&pooled, self.head.dropout, r.next())?
            }
            _ => pooled.clone(),
        };
        let out = self.out.forward_t(&dropped, dropout)?;
        Ok((pooled, out))
    }

    /// One score per sequence `[B]` (a scalar head; any head's first output).
    pub fn scores(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        Ok(self.forward(x, dropout)?.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// Mean cross-entropy (classification) or MSE (regression).
    pub fn loss(&self, logits: &Tensor, targets: &Targets) -> Result<Tensor> {
        match (self.head.task, targets) {
            (TaskKind::Classification, Targets::Classes(ids)) => {
                let t = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(nn::cross_entropy(logits, &t)?)
            }
            (TaskKind::Regression, Targets::Values(v)) => {
                let t = Tensor::from_slice(v, (v.len(), 1), &Device::Cpu)?;
                Ok((logits - t)?.sqr()?.mean_all()?)
            }
            (TaskKind::Scalar, _) => Err(Error::msg(
                "a scalar head has no loss of its own: its objective (reward model, value) gives it",
            )),
            _ => Err(Error::msg("targets do not match the task kind")),
        }
    }
}

/// Per row of `ids` `[B, T]`, the index of the rightmost token that is not
/// `pad_id` (0 for a row of padding only), as transformers picks the token
/// a decoder's sequence head reads: by id, not by attention mask.
pub fn last_tokens(ids: &Tensor, pad_id: u32) -> Result<Vec<usize>> {
    Ok(ids
        .to_vec2::<u32>()?
        .iter()
        .map(|row| row.iter().rposition(|&id| id != pad_id).unwrap_or(0))
        .collect())
}

/// Mean over real tokens: `[B, T, H]` x mask `[B, T]` -> `[B, H]`.
pub fn mean_pool(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(D::Minus1)?; // [B, T, 1]
    let summed = x.broadcast_mul(&m)?.sum(1)?; // [B, H]
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // [B, 1]
    Ok(summed.broadcast_div(&count)?)
}

/// Training targets of a batch.
#[derive(Debug, Clone)]
pub enum Targets {
    Classes(Vec<u32>),
    Values(Vec<f32>),
}
