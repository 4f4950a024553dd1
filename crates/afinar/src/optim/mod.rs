//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), learning-rate
//! schedules (transformers' `get_*_schedule_with_warmup`), global-norm
//! clipping. The update is one fused in-place pass per tensor; frozen
//! parameters have no optimizer state at all.

use crate::nn::Weight;
use crate::{Error, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// Which parameters get weight decay: not biases, not LayerNorm weights
/// (the usual transformers rule).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias")
        || name.contains("LayerNorm.")
        || name.contains("layer_norm")
        || name.contains(".ln_"))
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    w: Weight,
    decay: bool,
    m: Vec<f32>,
    v: Vec<f32>,
    /// m and v of a parameter on a GPU (f32, on its device; made at the first step).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dev_state: Option<(candle_core::Tensor, candle_core::Tensor)>,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub cfg: AdamWConfig,
    pub step: u64,
}

#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    wd: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
}

/// One fused AdamW update of a parameter, in place: p, m and v are read and
/// written once each, the gradient read once.
struct Update<'a> {
    g: &'a [f32],
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    h: Hyper,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "afinar-adamw"
    }
    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(p) = s1 else {
            return Err(candle_core::Error::Msg("adamw: f32 parameters only".into()));
        };
        let Some((pa, pb)) = l1.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(
                "adamw: contiguous parameters only".into(),
            ));
        };
        let p = &mut p[pa..pb];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let h = self.h;
        const CH: usize = 1 << 14;
        p.par_chunks_mut(CH)
            .zip(self.g.par_chunks(CH))
            .zip(m.par_chunks_mut(CH).zip(v.par_chunks_mut(CH)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = g[i] * h.grad_scale;
                    m[i] = h.b1 * m[i] + (1.0 - h.b1) * gi;
                    v[i] = h.b2 * v[i] + (1.0 - h.b2) * gi * gi;
                    let pi = p[i] * (1.0 - h.lr * h.wd);
                    p[i] = pi - h.lr / h.bc1 * m[i] / (v[i].sqrt() / h.bc2_sqrt + h.eps);
                }
            });
        Ok(())
    }
}

impl AdamW {
    /// State for each trainable `(name, weight)`; weight decay per [`decays`].
    pub fn new(params: Vec<(String, Weight)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, w)| {
                // A parameter on a GPU keeps its state there.
                let n = if w.t.device().is_cpu() {
                    w.t.elem_count()
                } else {
                    0
                };
                Slot {
                    decay: decays(&name),
                    name,
                    w,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    dev_state: None,
                }
            })
            .collect();
        Ok(AdamW {
            slots,
            cfg,
            step: 0,
        })
    }

    pub fn num_params(&self) -> usize {
        self.slots.iter().map(|s| s.w.t.elem_count()).sum()
    }

    /// The global L2 norm of the accumulated gradients (missing ones count as 0).
    pub fn grad_norm(&self) -> Result<f64> {
        let mut total = 0f64;
        let on_gpu: Vec<candle_core::Tensor> = self
            .slots
            .iter()
            .filter_map(|s| s.w.grad.as_ref().and_then(|b| b.device_grad()))
            .collect();
        if !on_gpu.is_empty() {
            total += gpu_sum_squares(&on_gpu)?;
        }
        for s in &self.slots {
            if !s.w.t.device().is_cpu() {
                continue;
            }
            if let Some(buf) = &s.w.grad {
                total += buf.read(|d| d.map_or(0.0, sum_squares));
            }
        }
        Ok(total.sqrt())
    }

    /// Drop the accumulated gradients without an update (a skipped batch).
    pub fn zero_grad(&self) {
        for s in &self.slots {
            if let Some(buf) = &s.w.grad {
                buf.clear();
            }
        }
    }

    /// The moment estimates of every parameter, as f32 CPU tensors shaped
    /// like the parameter: `(name, exp_avg, exp_avg_sq)` (torch's names).
    pub fn state(&self) -> Result<Vec<(String, candle_core::Tensor, candle_core::Tensor)>> {
        let cpu = candle_core::Device::Cpu;
        self.slots
            .iter()
            .map(|s| {
                let shape = s.w.t.shape();
                let (m, v) = match &s.dev_state {
                    Some((m, v)) => (m.to_device(&cpu)?, v.to_device(&cpu)?),
                    None if s.w.t.device().is_cpu() => (
                        candle_core::Tensor::from_slice(&s.m, shape, &cpu)?,
                        candle_core::Tensor::from_slice(&s.v, shape, &cpu)?,
                    ),
                    // On a GPU, before the first step: zeros.
                    None => {
                        let z = candle_core::Tensor::zeros(shape, candle_core::DType::F32, &cpu)?;
                        (z.clone(), z)
                    }
                };
                Ok((s.name.clone(), m, v))
            })
            .collect()
    }

    /// Restore what [`AdamW::state`] returned and the step count. Every
    /// trainable parameter must be there, with its shape.
    pub fn load_state(
        &mut self,
        step: u64,
        state: &std::collections::HashMap<String, (candle_core::Tensor, candle_core::Tensor)>,
    ) -> Result<()> {
        for s in &mut self.slots {
            let (m, v) = state.get(&s.name).ok_or_else(|| Error::Tensor {
                name: s.name.clone(),
                msg: "has no optimizer state in the checkpoint".into(),
            })?;
            for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                if t.dims() != s.w.t.dims() || t.dtype() != candle_core::DType::F32 {
                    return Err(Error::Tensor {
                        name: format!("{}.{what}", s.name),
                        msg: format!(
                            "optimizer state is {:?} {:?}, the parameter is {:?} f32",
                            t.dtype(),
                            t.dims(),
                            s.w.t.dims()
                        ),
                    });
                }
            }
            if s.w.t.device().is_cpu() {
                s.m = m.flatten_all()?.to_vec1::<f32>()?;
                s.v = v.flatten_all()?.to_vec1::<f32>()?;
            } else {
                let dev = s.w.t.device();
                s.dev_state = Some((m.to_device(dev)?, v.to_device(dev)?));
            }
        }
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr`, gradients multiplied by
    /// `grad_scale` first (clipping folds in here); then the gradient
    /// buffers start a new accumulation.
    pub fn step(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.slots {
            let Some(buf) = s.w.grad.clone() else {
                continue;
            };
            let h = Hyper {
                lr: lr as f32,
                wd: if s.decay { c.weight_decay as f32 } else { 0.0 },
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                eps: c.eps as f32,
                bc1: bc1 as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                grad_scale: grad_scale as f32,
            };
            if !s.w.t.device().is_cpu() {
                if let Some(g) = buf.device_grad() {
                    gpu_update(s, &g, h)?;
                }
                buf.clear();
                continue;
            }
            let (m, v, t) = (&mut s.m, &mut s.v, &s.w.t);
            let res = buf.read(|g| -> Result<()> {
                // No gradient this step (the parameter was not used): no update,
                // as torch skips parameters whose .grad is None.
                let Some(g) = g else { return Ok(()) };
                let up = Update {
                    g,
                    m: RefCell::new(m),
                    v: RefCell::new(v),
                    h,
                };
                t.inplace_op1(&up).map_err(|e| Error::Tensor {
                    name: s.name.clone(),
                    msg: e.to_string(),
                })
            });
            res?;
            buf.clear();
        }
        Ok(())
    }
}

/// Σ x² in f64 over fixed chunks added in order: the same bits whatever
/// the thread count or rayon's scheduling (a `par_iter().sum()` splits
/// where work is stolen, so its last bits vary from run to run, and with
/// clipping on they would reach the weights: resume could not be exact).
fn sum_squares(d: &[f32]) -> f64 {
    const CH: usize = 1 << 14;
    let parts: Vec<f64> = d
        .par_chunks(CH)
        .map(|c| c.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
        .collect();
    parts.iter().sum()
}

#[cfg(feature = "cuda")]
fn gpu_sum_squares(gs: &[candle_core::Tensor]) -> Result<f64> {
    let v = crate::nn::cuda::sum_squares(gs)?;
    Ok(v.iter().map(|x| *x as f64).sum())
}

#[cfg(not(feature = "cuda"))]
fn gpu_sum_squares(gs: &[candle_core::Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in gs {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(total)
}

/// The fused update of a parameter that lives on a GPU.
#[cfg(feature = "cuda")]
fn gpu_update(s: &mut Slot, g: &candle_core::Tensor, h: Hyper) -> Result<()> {
    if s.dev_state.is_none() {
        let z =
            || candle_core::Tensor::zeros(s.w.t.shape(), candle_core::DType::F32, s.w.t.device());
        s.dev_state = Some((z()?, z()?));
    }
    let (m, v) = s.dev_state.as_ref().unwrap();
    let hy = crate::nn::cuda::AdamHyper {
        lr: h.lr,
        wd: h.wd,
        b1: h.b1,
        b2: h.b2,
        eps: h.eps,
        bc1: h.bc1,
        bc2_sqrt: h.bc2_sqrt,
        grad_scale: h.grad_scale,
    };
    crate::nn::cuda::adamw(&s.w.t, g, m, v, hy).map_err(|e| Error::Tensor {
        name: s.name.clone(),
        msg: e.to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_update(s: &mut Slot, _g: &candle_core::Tensor, _h: Hyper) -> Result<()> {
    Err(Error::Tensor {
        name: s.name.clone(),
        msg: "is on a GPU but afinar was built without the cuda feature".into(),
    })
}

/// Learning-rate schedules with linear warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Linear,
    Cosine,
    Constant,
}

/// The learning rate at (0-based) `step` of `total` with `warmup` steps,
/// as transformers' schedules compute it.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers_formulas() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 10, 110), 0.0);
        assert!((lr_at(Schedule::Linear, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Constant, 2.0, 100, 10, 110) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computed_step() {
        let w = Weight::trainable(
            &candle_core::Tensor::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap(),
        )
        .unwrap();
        w.grad.as_ref().unwrap().add(&[3.0, 3.0]);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w.weight".into(), w.clone())], cfg).unwrap();
        opt.step(0.1, 1.0).unwrap();
        let var = &w.t;
        // step 1: m̂ = g, v̂ = g², update = lr * g / (|g| + eps) = 0.1 (sign g), decay p *= 1 - lr*wd
        let got = var.to_vec1::<f32>().unwrap();
        assert!(w.grad_tensor().unwrap().is_none(), "step clears the buffer");
        let want = [1.0 * (1.0 - 0.05) - 0.1, -2.0 * (1.0 - 0.05) - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert!(!decays("bert.encoder.layer.0.output.LayerNorm.weight"));
        assert!(!decays("classifier.bias"));
        assert!(decays("classifier.weight"));
    }
}
