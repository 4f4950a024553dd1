//! Task heads trained from scratch on a pretrained body: sequence
//! classification and regression, as transformers'
//! `BertForSequenceClassification` (pooler = dense + tanh on [CLS], dropout,
//! linear), plus mean pooling (an afinar option with no transformers class).

use crate::adapters::{self, AdapterConfig};
use crate::models::bert::{mean_pool, Bert, BertConfig, Linear};
use crate::nn::{self, DropoutRng};
use crate::params::{normal_init, ParamStore, Path};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Classification,
    Regression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// transformers' BertPooler: tanh(dense([CLS])).
    Cls,
    /// Mean over real tokens (sentence-transformers style).
    Mean,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadConfig {
    pub task: TaskKind,
    pub pooling: Pooling,
    /// Number of outputs: classes, or 1 for regression.
    pub num_labels: usize,
    pub dropout: f32,
}

/// Token ids and masks of one padded batch, ready for the model.
pub struct Inputs {
    pub input_ids: Tensor,      // [B, T] u32
    pub token_type_ids: Tensor, // [B, T] u32
    pub mask: Arc<Vec<f32>>,    // [B * T], 1 = token
    pub mask_tensor: Tensor,    // [B, T] f32
}

impl Inputs {
    pub fn new(ids: Vec<u32>, types: Vec<u32>, mask: Vec<f32>, b: usize, t: usize) -> Result<Self> {
        let dev = Device::Cpu;
        Ok(Inputs {
            input_ids: Tensor::from_vec(ids, (b, t), &dev)?,
            token_type_ids: Tensor::from_vec(types, (b, t), &dev)?,
            mask_tensor: Tensor::from_vec(mask.clone(), (b, t), &dev)?,
            mask: Arc::new(mask),
        })
    }
}

/// A BERT body with a sequence-level head. Parameter names are
/// `BertForSequenceClassification`'s: `bert.*`, `classifier.*`.
pub struct SequenceModel {
    pub bert: Bert,
    pooler: Option<Linear>,
    classifier: Linear,
    pub head: HeadConfig,
}

/// Parameter-name patterns of the head (always trainable when new).
pub const HEAD_PATTERNS: &[&str] = &["bert.pooler.*", "classifier.*"];

impl SequenceModel {
    /// Build on the parameters in `store`; head weights missing from it are
    /// initialised as transformers does (N(0, initializer_range), zero bias)
    /// from `init_seed`.
    pub fn build(
        store: &mut ParamStore,
        cfg: &BertConfig,
        head: &HeadConfig,
        init_seed: u64,
    ) -> Result<Self> {
        Self::build_with_adapter(store, cfg, head, init_seed, None)
    }

    /// [`build`](Self::build), then wrap the linear modules `adapter`
    /// targets: the whole base freezes; the adapter weights and
    /// `modules_to_save` (PEFT adds the classifier for sequence
    /// classification) train.
    pub fn build_with_adapter(
        store: &mut ParamStore,
        cfg: &BertConfig,
        head: &HeadConfig,
        init_seed: u64,
        adapter: Option<&AdapterConfig>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(init_seed);
        let std = cfg.initializer_range;
        if head.pooling == Pooling::Mean {
            // Mean pooling reads no pooler: the checkpoint's pooler weights
            // are dropped, neither counted as trainable nor saved.
            store.remove("bert.pooler.dense.weight");
            store.remove("bert.pooler.dense.bias");
        }
        if head.pooling == Pooling::Cls {
            store.get_or_init("bert.pooler.dense.weight", &[h, h], || {
                normal_init(&[h, h], std, &mut rng)
            })?;
            store.get_or_init("bert.pooler.dense.bias", &[h], || {
                Ok(Tensor::zeros(h, DType::F32, &Device::Cpu)?)
            })?;
        }
        let n = head.num_labels;
        store.get_or_init("classifier.weight", &[n, h], || {
            normal_init(&[n, h], std, &mut rng)
        })?;
        store.get_or_init("classifier.bias", &[n], || {
            Ok(Tensor::zeros(n, DType::F32, &Device::Cpu)?)
        })?;

        if let Some(ad) = adapter {
            store.freeze_all();
            let mut ad = ad.clone();
            for m in ["classifier", "score"] {
                if !ad.modules_to_save.iter().any(|x| x == m) {
                    ad.modules_to_save.push(m.to_string());
                }
            }
            let linears = adapters::linear_modules(store);
            for (path, _, _) in &linears {
                if ad
                    .modules_to_save
                    .iter()
                    .any(|m| adapters::matches_key(path, m))
                {
                    store.make_trainable(&format!("{path}.weight"))?;
                    store.make_trainable(&format!("{path}.bias"))?;
                }
            }
            ad.apply(store, &linears, &["classifier"], &mut rng)?;
        }
        let root = Path::root(store, "");
        let bert = Bert::load(&root.pp("bert"), cfg)?;
        let pooler = match head.pooling {
            Pooling::Cls => Some(Linear::load(
                &root.pp("bert").pp("pooler").pp("dense"),
                h,
                h,
            )?),
            Pooling::Mean => None,
        };
        let classifier = Linear::load(&root.pp("classifier"), h, n)?;
        Ok(SequenceModel {
            bert,
            pooler,
            classifier,
            head: head.clone(),
        })
    }

    /// The pooled sentence vector `[B, H]` (before head dropout).
    pub fn pooled(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        let hidden = self
            .bert
            .forward(&x.input_ids, &x.token_type_ids, &x.mask, dropout)?; // [B, T, H]
        match &self.pooler {
            Some(p) => {
                let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?; // [B, H]
                Ok(p.forward_t(&cls, dropout)?.tanh()?)
            }
            None => mean_pool(&hidden, &x.mask_tensor),
        }
    }

    /// Logits `[B, num_labels]` (regression: `[B, 1]`).
    pub fn forward(&self, x: &Inputs, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        let pooled = self.pooled(x, dropout)?;
        let pooled = match dropout {
            Some(r) if self.head.dropout > 0.0 => {
                nn::dropout(&pooled, self.head.dropout, r.next())?
            }
            _ => pooled,
        };
        self.classifier.forward_t(&pooled, dropout)
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
            _ => Err(Error::msg("targets do not match the task kind")),
        }
    }
}

/// Training targets of a batch.
#[derive(Debug, Clone)]
pub enum Targets {
    Classes(Vec<u32>),
    Values(Vec<f32>),
}
