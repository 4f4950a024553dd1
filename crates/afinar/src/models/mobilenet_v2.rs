//! MobileNetV2 (Sandler et al. 2018, <https://arxiv.org/abs/1801.04381>) as
//! torchvision builds it (`torchvision/models/mobilenetv2.py`, v0.20), under
//! torchvision's module names, so a `state_dict` loads as it is:
//!
//! ```text
//! features.0            Conv 3x3 s2 + BN + ReLU6             (.0 conv, .1 bn)
//! features.1 .. 17      inverted residual blocks: [1x1 expand + BN + ReLU6]
//!                       (conv.0), 3x3 depthwise + BN + ReLU6, 1x1 project + BN;
//!                       the block without expansion (features.1) has no 1x1
//!                       expand, so its keys are one lower
//! features.18           Conv 1x1 to last_channel + BN + ReLU6
//! classifier.0 / .1     Dropout(0.2), Linear(last_channel, num_classes)
//! ```
//!
//! Channels and expansions are read from the weights' shapes (any
//! `width_mult`); strides are torchvision's table. Activations are channels
//! last (`[B, H, W, C]`, `nn::conv2d`); the input is `[B, H, W, 3]`.
//! `forward` returns the logits `[B, num_classes]`; with `drop` (training)
//! batch norm takes batch statistics, except in the layers built with
//! frozen statistics (a frozen stage).

use crate::nn::conv_stack::Unit;
use crate::nn::{self, BatchNorm, Conv2dCfg, DropoutRng, Linear, RunningStats, Weight};
use crate::params::ParamStore;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// torchvision's `inverted_residual_setting`: expansion t, channels c
/// (at width 1), repeats n, first stride s.
pub const SETTING: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// The number of `features.N` stages (stem, 17 blocks, last conv).
pub const STAGES: usize = 19;

/// The strides of blocks `features.1` .. `features.17`.
pub fn block_strides() -> Vec<usize> {
    SETTING
        .iter()
        .flat_map(|&(_, _, n, s)| (0..n).map(move |i| if i == 0 { s } else { 1 }))
        .collect()
}

/// The `config.json` afinar writes beside a MobileNetV2's weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MobileNetV2Config {
    /// Always "mobilenet_v2".
    pub model_type: String,
    pub num_classes: usize,
    /// The stem's channels / 32 (informational: shapes come from the weights).
    pub width_mult: f64,
    /// `classifier.0`'s probability.
    #[serde(default = "d_dropout")]
    pub dropout: f32,
    #[serde(default = "d_eps")]
    pub bn_eps: f64,
    #[serde(default = "d_momentum")]
    pub bn_momentum: f64,
}
fn d_dropout() -> f32 {
    0.2
}
fn d_eps() -> f64 {
    1e-5
}
fn d_momentum() -> f64 {
    0.1
}

/// A convolution, its batch norm and whether ReLU6 follows.
pub struct ConvBn {
    pub conv: Weight,
    pub cfg: Conv2dCfg,
    pub bn: BatchNorm,
    pub relu6: bool,
}

impl ConvBn {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = nn::conv2d(x, &self.conv, self.cfg)?; // [B, H', W', C_out]
        self.bn.forward(&y, train, self.relu6)
    }
}

/// One inverted residual block.
pub struct Block {
    pub expand: Option<ConvBn>,
    pub depthwise: ConvBn,
    pub project: ConvBn,
    pub residual: bool,
}

impl Block {
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        if let Some(e) = &self.expand {
            h = e.forward(&h, train)?;
        }
        h = self.depthwise.forward(&h, train)?;
        h = self.project.forward(&h, train)?;
        Ok(if self.residual { (x + h)? } else { h })
    }
}

/// How the model's batch-norm layers take their statistics in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrozenBn {
    /// A layer whose weight is frozen keeps its running statistics (eval mode).
    #[default]
    Eval,
    /// Every layer takes batch statistics in training (`freeze.batch_norm = "train"`).
    Train,
}

pub struct MobileNetV2 {
    pub cfg: MobileNetV2Config,
    pub stem: ConvBn,
    pub blocks: Vec<Block>,
    pub last: ConvBn,
    pub classifier: Linear,
    /// The features as one fused stack (`nn::conv_stack`), what `forward` runs.
    units: Arc<Vec<Unit>>,
}

impl ConvBn {
    fn unit(&self) -> Unit {
        Unit::ConvBn {
            conv: self.conv.clone(),
            cfg: self.cfg,
            bn: self.bn.clone(),
            relu6: self.relu6,
        }
    }
}

/// The features as conv-stack units: the stem, each block (its residual
/// marked), the last convolution.
fn units_of(stem: &ConvBn, blocks: &[Block], last: &ConvBn) -> Vec<Unit> {
    let mut u = vec![stem.unit()];
    for b in blocks {
        if b.residual {
            u.push(Unit::Save);
        }
        if let Some(e) = &b.expand {
            u.push(e.unit());
        }
        u.push(b.depthwise.unit());
        u.push(b.project.unit());
        if b.residual {
            u.push(Unit::Add);
        }
    }
    u.push(last.unit());
    u
}

impl MobileNetV2 {
    /// The model over `store` (torchvision names, no prefix).
    pub fn load(store: &ParamStore, cfg: &MobileNetV2Config, bn_mode: FrozenBn) -> Result<Self> {
        let conv_bn = |conv: &str, bn: &str, cfg_c: Conv2dCfg, relu6: bool| -> Result<ConvBn> {
            let shape = store
                .dims(&format!("{conv}.weight"))
                .ok_or_else(|| Error::Tensor {
                    name: format!("{conv}.weight"),
                    msg: format!("missing from {}", store.source),
                })?;
            let w = store.get(&format!("{conv}.weight"), &shape)?;
            let c = shape[0];
            let bn = batch_norm(store, bn, c, cfg, bn_mode)?;
            let groups = if cfg_c.groups == 0 { c } else { cfg_c.groups };
            Ok(ConvBn {
                conv: w,
                cfg: Conv2dCfg { groups, ..cfg_c },
                bn,
                relu6,
            })
        };
        let full = |stride, padding| Conv2dCfg {
            stride,
            padding,
            groups: 1,
        };
        // groups 0: as many groups as channels (depthwise).
        let dw = |stride| Conv2dCfg {
            stride,
            padding: 1,
            groups: 0,
        };
        let stem = conv_bn("features.0.0", "features.0.1", full(2, 1), true)?;
        let mut blocks = Vec::new();
        let mut cin = stem.conv.t.dims()[0];
        for (i, stride) in block_strides().into_iter().enumerate() {
            let p = format!("features.{}.conv", i + 1);
            let expanded = store.contains(&format!("{p}.3.weight"));
            let (expand, d, proj, pbn) = if expanded {
                let e = conv_bn(&format!("{p}.0.0"), &format!("{p}.0.1"), full(1, 0), true)?;
                (Some(e), 1, format!("{p}.2"), format!("{p}.3"))
            } else {
                (None, 0, format!("{p}.1"), format!("{p}.2"))
            };
            let depthwise = conv_bn(
                &format!("{p}.{d}.0"),
                &format!("{p}.{d}.1"),
                dw(stride),
                true,
            )?;
            let project = conv_bn(&proj, &pbn, full(1, 0), false)?;
            let hidden = expand.as_ref().map_or(cin, |e| e.conv.t.dims()[0]);
            let wd = depthwise.conv.t.dims();
            let e_in = expand.as_ref().map_or(cin, |e| e.conv.t.dims()[1]);
            if wd[0] != hidden || wd[1] != 1 || project.conv.t.dims()[1] != hidden || e_in != cin {
                return Err(Error::Tensor {
                    name: format!("{p}.{d}.0.weight"),
                    msg: format!(
                        "block features.{} does not chain: input {cin} channels, expand {:?}, \
                         depthwise {:?}, project {:?} in {}",
                        i + 1,
                        expand.as_ref().map(|e| e.conv.t.dims().to_vec()),
                        wd,
                        project.conv.t.dims(),
                        store.source
                    ),
                });
            }
            let cout = project.conv.t.dims()[0];
            blocks.push(Block {
                expand,
                depthwise,
                project,
                residual: stride == 1 && cin == cout,
            });
            cin = cout;
        }
        let last = conv_bn("features.18.0", "features.18.1", full(1, 0), true)?;
        if last.conv.t.dims()[1] != cin {
            return Err(Error::Tensor {
                name: "features.18.0.weight".into(),
                msg: format!(
                    "expected {cin} input channels, found {:?} in {}",
                    last.conv.t.dims(),
                    store.source
                ),
            });
        }
        let last_c = last.conv.t.dims()[0];
        let classifier = crate::params::Path::root(store, "classifier.1").linear(
            last_c,
            cfg.num_classes,
            true,
        )?;
        let units = Arc::new(units_of(&stem, &blocks, &last));
        Ok(MobileNetV2 {
            cfg: cfg.clone(),
            stem,
            blocks,
            last,
            classifier,
            units,
        })
    }

    /// Logits `[B, num_classes]` of images `[B, H, W, 3]` (normalised).
    /// `drop`: training (dropout before the classifier, batch statistics).
    pub fn forward(&self, x: &Tensor, drop: Option<&DropoutRng>) -> Result<Tensor> {
        let feats = self.features(x, drop.is_some())?; // [B, h, w, last]
        let pooled = nn::global_avg_pool(&feats)?; // [B, last]
        let pooled = match drop {
            Some(d) => nn::dropout(&pooled, self.cfg.dropout, d.next())?,
            None => pooled,
        };
        self.classifier.forward(&pooled)
    }

    /// `features(x)`: the last feature map `[B, h, w, last_channel]`, as
    /// one fused node of the graph (`nn::conv_stack`).
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        nn::conv_stack::run(&self.units, x, train)
    }

    /// The same through one graph node per op (`nn::conv2d`,
    /// `nn::batch_norm`): the reference the fused path is tested against.
    pub fn features_per_op(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = self.stem.forward(x, train)?;
        for b in &self.blocks {
            h = b.forward(&h, train)?;
        }
        self.last.forward(&h, train)
    }

    /// Every batch-norm layer, in order.
    pub fn batch_norms(&self) -> Vec<&BatchNorm> {
        let mut v = vec![&self.stem.bn];
        for b in &self.blocks {
            if let Some(e) = &b.expand {
                v.push(&e.bn);
            }
            v.push(&b.depthwise.bn);
            v.push(&b.project.bn);
        }
        v.push(&self.last.bn);
        v
    }
}

/// The batch norm `name` over `c` channels from `store`: weight and bias
/// (parameters), running mean / var and count (buffers).
fn batch_norm(
    store: &ParamStore,
    name: &str,
    c: usize,
    cfg: &MobileNetV2Config,
    mode: FrozenBn,
) -> Result<BatchNorm> {
    let weight = store.get(&format!("{name}.weight"), &[c])?;
    let bias = store.get(&format!("{name}.bias"), &[c])?;
    let stats = RunningStats {
        mean: store.buffer(&format!("{name}.running_mean"), &[c])?,
        var: store.buffer(&format!("{name}.running_var"), &[c])?,
        count: store.buffer(&format!("{name}.num_batches_tracked"), &[])?,
    };
    let batch_stats = match mode {
        FrozenBn::Train => true,
        FrozenBn::Eval => weight.is_trainable() || bias.is_trainable(),
    };
    Ok(BatchNorm {
        weight,
        bias,
        stats,
        eps: cfg.bn_eps,
        momentum: cfg.bn_momentum,
        batch_stats,
    })
}

/// Whether a tensor name is a batch-norm buffer (not a parameter).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// Whether a state dict (by its names) is torchvision's MobileNetV2.
pub fn looks_like(names: &[&str]) -> bool {
    names.contains(&"features.0.0.weight") && names.contains(&"features.18.0.weight")
}

/// The config of a state dict's shapes (`dims` of a name) with
/// `num_classes` outputs.
pub fn config_of(
    dims: &dyn Fn(&str) -> Option<Vec<usize>>,
    num_classes: usize,
    source: &str,
) -> Result<MobileNetV2Config> {
    let stem = dims("features.0.0.weight").ok_or_else(|| Error::Tensor {
        name: "features.0.0.weight".into(),
        msg: format!("missing from {source}: not a torchvision MobileNetV2 state dict"),
    })?;
    if stem.len() != 4 || stem[1] != 3 || stem[2] != 3 || stem[3] != 3 {
        return Err(Error::Tensor {
            name: "features.0.0.weight".into(),
            msg: format!("expected [C, 3, 3, 3] (the RGB stem), found {stem:?} in {source}"),
        });
    }
    Ok(MobileNetV2Config {
        model_type: "mobilenet_v2".into(),
        num_classes,
        width_mult: stem[0] as f64 / 32.0,
        dropout: d_dropout(),
        bn_eps: d_eps(),
        bn_momentum: d_momentum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_strides() {
        assert_eq!(
            block_strides(),
            vec![1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
        );
        assert_eq!(block_strides().len() + 2, STAGES);
    }
}
