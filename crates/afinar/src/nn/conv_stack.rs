//! A stack of convolution + batch norm (+ ReLU6) units with residual
//! connections, run as ONE node of candle's graph: forward keeps what its
//! own backward needs (each unit's input, convolution output and batch-norm
//! output), backward walks the units in reverse with the kernels of
//! `conv.rs` and `batch_norm.rs`, writing every trainable weight's gradient
//! into its buffer.
//!
//! Why not one candle node per op: candle 0.11's backward gives every op's
//! input gradient a fresh zero tensor and an add (`GradStore::or_insert`),
//! three extra passes over each activation; for a CNN of ~150 ops over
//! large activations that was a third of the step. Here a gradient flows
//! from unit to unit as one buffer, and the units before the first trainable
//! one keep nothing and are never back-propagated (a frozen early stage
//! costs a forward only).
//!
//! Numbers are those of the per-op path (`nn::conv2d`, `nn::batch_norm`):
//! the same kernels; `models/mobilenet_v2.rs`'s tests compare the two.

use super::batch_norm::{cpu as bn, update_running, BatchNorm};
use super::conv::{cpu as conv, Conv2dCfg, Geom};
use super::graph::attach;
use super::Weight;
use crate::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// One step of the stack.
#[derive(Clone)]
pub enum Unit {
    /// `bn(conv(x))`, then ReLU6 if `relu6`.
    ConvBn {
        conv: Weight,
        cfg: Conv2dCfg,
        bn: BatchNorm,
        relu6: bool,
    },
    /// Remember the current activation (a residual block starts).
    Save,
    /// Add the last remembered activation (the block ends).
    Add,
}

impl Unit {
    fn trains(&self) -> bool {
        match self {
            Unit::ConvBn { conv, bn, .. } => {
                conv.is_trainable() || bn.weight.is_trainable() || bn.bias.is_trainable()
            }
            _ => false,
        }
    }
    fn anchor(&self) -> Option<&Tensor> {
        match self {
            Unit::ConvBn { conv, bn, .. } => [conv, &bn.weight, &bn.bias]
                .into_iter()
                .find(|w| w.is_trainable())
                .map(|w| &w.t),
            _ => None,
        }
    }
}

/// What backward needs of one convolution unit.
struct Rec {
    unit: usize,
    geom: Geom,
    w: Vec<f32>,
    gamma: Vec<f32>,
    /// The convolution's input, output, and the unit's output.
    x: Arc<Vec<f32>>,
    z: Vec<f32>,
    y: Arc<Vec<f32>>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    batch: bool,
}

enum Tape {
    Conv(Rec),
    Save,
    Add,
}

fn vec_of(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// Run `units` on `x` `[B, H, W, C]`. `train`: batch norm takes batch
/// statistics (and updates the running ones) in the units whose layer
/// says so, and the result joins the graph when some unit trains; an
/// evaluation (`train` false) keeps nothing for a backward.
pub fn run(units: &Arc<Vec<Unit>>, x: &Tensor, train: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let first = if train {
        units.iter().position(|u| u.trains())
    } else {
        None
    };
    let mut h: Arc<Vec<f32>> = Arc::new(vec_of(&x.contiguous()?)?);
    let mut shape = dims.clone();
    let mut skips: Vec<Arc<Vec<f32>>> = Vec::new();
    let mut tape: Vec<Tape> = Vec::new();
    for (i, u) in units.iter().enumerate() {
        let keep = first.is_some_and(|f| i >= f);
        match u {
            Unit::Save => {
                skips.push(h.clone());
                if keep {
                    tape.push(Tape::Save);
                }
            }
            Unit::Add => {
                let s = skips
                    .pop()
                    .ok_or_else(|| crate::Error::msg("conv stack: Add without Save"))?;
                let sum: Vec<f32> = h.par_iter().zip(s.par_iter()).map(|(a, b)| a + b).collect();
                h = Arc::new(sum);
                if keep {
                    tape.push(Tape::Add);
                }
            }
            Unit::ConvBn {
                conv: cw,
                cfg,
                bn: layer,
                relu6,
            } => {
                let w = vec_of(&cw.t)?;
                let geom = Geom::new(&shape, cw.t.dims(), *cfg)?;
                let c = geom.cout;
                let gamma = vec_of(&layer.weight.t)?;
                let beta = vec_of(&layer.bias.t)?;
                let batch = train && layer.batch_stats;
                if !batch && first.is_none() {
                    // No backward at all (an evaluation, or a frozen body
                    // under a training head), running statistics: batch norm
                    // folded into the convolution (scale into the weights,
                    // shift as its bias), as inference engines do. Not in a
                    // stack that back-propagates: there the other rounding
                    // would reach the batch-statistics layers after it.
                    let mean = vec_of(layer.stats.mean.as_tensor())?;
                    let var = vec_of(layer.stats.var.as_tensor())?;
                    let eps = layer.eps as f32;
                    let scale: Vec<f32> =
                        (0..c).map(|i| gamma[i] / (var[i] + eps).sqrt()).collect();
                    let shift: Vec<f32> = (0..c).map(|i| beta[i] - mean[i] * scale[i]).collect();
                    let per = w.len() / c;
                    let wf: Vec<f32> = w
                        .chunks(per)
                        .zip(&scale)
                        .flat_map(|(row, s)| row.iter().map(move |v| v * s))
                        .collect();
                    h = Arc::new(conv::forward_affine(&geom, &h, &wf, Some(&shift), *relu6));
                    shape = geom.out_dims().to_vec();
                    continue;
                }
                let z = conv::forward(&geom, &h, &w);
                let (mean, var) = if batch {
                    let (m, v) = bn::moments(&z, c);
                    update_running(&layer.stats, &m, &v, z.len() / c, layer.momentum)?;
                    (m, v)
                } else {
                    (
                        vec_of(layer.stats.mean.as_tensor())?,
                        vec_of(layer.stats.var.as_tensor())?,
                    )
                };
                let eps = layer.eps as f32;
                let invstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
                let y = Arc::new(bn::normalise(&z, &mean, &invstd, &gamma, &beta, *relu6));
                shape = geom.out_dims().to_vec();
                if keep {
                    tape.push(Tape::Conv(Rec {
                        unit: i,
                        geom,
                        w,
                        gamma,
                        x: h.clone(),
                        z,
                        y: y.clone(),
                        mean,
                        invstd,
                        batch,
                    }));
                }
                h = y;
            }
        }
    }
    let out = Tensor::from_vec(
        Arc::try_unwrap(h).unwrap_or_else(|a| (*a).clone()),
        shape.as_slice(),
        &Device::Cpu,
    )?;
    let Some(f) = first else {
        return Ok(out);
    };
    let anchor = units[f]
        .anchor()
        .cloned()
        .expect("a training unit has a trainable tensor");
    let units = units.clone();
    let tape = std::sync::Mutex::new(Some(tape));
    let y = attach("afinar-conv-stack", &[x, &anchor], out, move |g| {
        let tape = tape
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| super::custom_op::cerr("conv stack: backward ran twice"))?;
        backward(&units, tape, vec_of(&g.contiguous()?)?)?;
        Ok(vec![None, None])
    })?;
    Ok(y)
}

/// Back-propagate `dy` through the recorded units (last first); gradients
/// of trainable weights go into their buffers.
fn backward(units: &[Unit], tape: Vec<Tape>, dy: Vec<f32>) -> candle_core::Result<()> {
    let mut g = dy;
    let mut skip_grads: Vec<Vec<f32>> = Vec::new();
    let n = tape.len();
    for (k, t) in tape.into_iter().rev().enumerate() {
        let last = k + 1 == n; // the first recorded unit: its input needs no gradient
        match t {
            Tape::Add => skip_grads.push(g.clone()),
            Tape::Save => {
                if let Some(s) = skip_grads.pop() {
                    g.par_iter_mut()
                        .zip(s.par_iter())
                        .for_each(|(a, b)| *a += b);
                }
            }
            Tape::Conv(r) => {
                let Unit::ConvBn {
                    conv: cw,
                    bn: layer,
                    relu6,
                    ..
                } = &units[r.unit]
                else {
                    unreachable!("recorded from a ConvBn unit");
                };
                let c = r.geom.cout;
                let mask = relu6.then_some(r.y.as_slice());
                let want_params = layer.weight.grad.is_some() || layer.bias.grad.is_some();
                let need_dx = !last || cw.grad.is_some();
                let sums = (r.batch && need_dx || want_params)
                    .then(|| bn::grad_sums(&r.z, &g, mask, &r.mean, &r.invstd, c));
                if let Some((sdy, sdyx)) = &sums {
                    if let Some(buf) = &layer.weight.grad {
                        buf.add(&sdyx.iter().map(|&v| v as f32).collect::<Vec<_>>());
                    }
                    if let Some(buf) = &layer.bias.grad {
                        buf.add(&sdy.iter().map(|&v| v as f32).collect::<Vec<_>>());
                    }
                }
                if !need_dx {
                    continue;
                }
                let used = bn::Stats {
                    mean: &r.mean,
                    invstd: &r.invstd,
                };
                let batch_sums = if r.batch {
                    sums.as_ref().map(|(a, b)| (a, b))
                } else {
                    None
                };
                let dz = bn::input_grad(&r.z, &g, mask, &r.gamma, used, batch_sums);
                if let Some(buf) = &cw.grad {
                    conv::weight_grad(&r.geom, &r.x, &dz, buf);
                }
                if !last {
                    g = conv::input_grad(&r.geom, &r.w, &dz);
                }
            }
        }
    }
    Ok(())
}
