//! AdamW (decoupled weight decay, as `torch.optim.AdamW`), learning-rate
//! schedules (transformers' `get_*_schedule_with_warmup`), global-norm
//! clipping. The update is one fused in-place pass per tensor; frozen
//! parameters have no optimizer state at all.

use crate::nn::Weight;
use crate::simd;
use crate::{Error, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The modules afinar's models build as `nn::LayerNorm` (BERT's `LayerNorm`,
/// GPT-2's `ln_1`, `ln_2`, `ln_f`): what transformers' Trainer finds by type
/// (`isinstance(module, nn.LayerNorm)`); afinar has only the names. A model
/// family that loads a LayerNorm under another name adds it here (a test
/// reads `models/*.rs` and says so).
const LAYER_NORM_MODULES: &[&str] = &["LayerNorm", "ln_1", "ln_2", "ln_f"];

/// Which parameters get weight decay, as transformers' `Trainer` decides
/// (`get_decay_parameter_names`, trainer.py at huggingface/transformers
/// 000945a9): none for a parameter of a LayerNorm module (by type there, by
/// [`LAYER_NORM_MODULES`] here), nor for a name that, lowercased, contains
/// `bias`, `layernorm` or `rmsnorm`, has a segment `norm`, or a segment
/// ending in `_norm` (the patterns `bias`, `layernorm`, `rmsnorm`,
/// `(?:^|\.)norm(?:$|\.)`, `_norm(?:$|\.)`). So: no decay for any bias and any
/// norm weight of every family (BERT `LayerNorm`, Llama's RMSNorms
/// `input_layernorm`, `post_attention_layernorm`, `model.norm`, GPT-2's
/// `ln_*`). Everything else decays, adapter weights included: with PEFT
/// under the Trainer, `lora_A`/`lora_B`, `lora_magnitude_vector`, `ia3_l`
/// and the prompt embeddings match no pattern and get the decay.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let by_pattern = ["bias", "layernorm", "rmsnorm"]
        .iter()
        .any(|p| lower.contains(p))
        || lower
            .split('.')
            .any(|seg| seg == "norm" || seg.ends_with("_norm"));
    let in_layer_norm = name.split('.').any(|seg| LAYER_NORM_MODULES.contains(&seg));
    !(by_pattern || in_layer_norm)
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
                simd::run(
                    #[inline(always)]
                    || {
                        for i in 0..p.len() {
                            let gi = g[i] * h.grad_scale;
                            m[i] = h.b1 * m[i] + (1.0 - h.b1) * gi;
                            v[i] = h.b2 * v[i] + (1.0 - h.b2) * gi * gi;
                            let pi = p[i] * (1.0 - h.lr * h.wd);
                            p[i] = pi - h.lr / h.bc1 * m[i] / (v[i].sqrt() / h.bc2_sqrt + h.eps);
                        }
                    },
                )
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
        .map(|c| {
            // Eight f64 lanes (one AVX-512 register), reduced in a fixed order.
            simd::run(
                #[inline(always)]
                || {
                    let mut acc = [0f64; 8];
                    let ch = c.chunks_exact(8);
                    let rest: f64 = ch
                        .remainder()
                        .iter()
                        .map(|x| (*x as f64) * (*x as f64))
                        .sum();
                    for x in ch {
                        for i in 0..8 {
                            acc[i] += (x[i] as f64) * (x[i] as f64);
                        }
                    }
                    ((acc[0] + acc[4]) + (acc[2] + acc[6]))
                        + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
                        + rest
                },
            )
        })
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
    }

    /// The parameter names of a tiny fixture checkpoint.
    fn fixture_names(model: &str) -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures")
            .join(model);
        crate::hub::checkpoint::Checkpoint::open(&dir)
            .unwrap()
            .names()
    }

    /// Every name of `names` (and the same under PEFT's `base_model.model.`)
    /// decays unless it is in `no_decay`; each of `no_decay` is one of them.
    #[track_caller]
    fn check_family(names: &[String], no_decay: &[&str]) {
        for n in no_decay {
            assert!(names.iter().any(|x| x == n), "{n} is not a parameter");
        }
        for n in names {
            let want = !no_decay.contains(&n.as_str());
            assert_eq!(decays(n), want, "{n}");
            assert_eq!(decays(&format!("base_model.model.{n}")), want, "{n}");
        }
    }

    /// The Trainer's split into decay / no decay, family by family, on the
    /// fixtures' real names. The lists were worked out by hand from the
    /// Trainer's rule: biases, nn.LayerNorm modules, names with `layernorm`.
    #[test]
    fn decay_follows_the_trainer_for_every_family() {
        // BERT (classification names carry `bert.`; the head is `classifier`).
        let mut bert = fixture_names("bert-tiny");
        bert.extend(bert.clone().iter().map(|n| format!("bert.{n}")));
        bert.extend(["classifier.weight".into(), "classifier.bias".into()]);
        let no_decay: Vec<String> = bert
            .iter()
            .filter(|n| n.ends_with(".bias") || n.contains(".LayerNorm."))
            .cloned()
            .collect();
        // Embeddings LayerNorm 2; per layer two LayerNorms (4) and six biases;
        // the pooler's bias: 23, twice (with `bert.`), and the classifier's bias.
        assert_eq!(no_decay.len(), 2 * (2 + 2 * (4 + 6) + 1) + 1);
        check_family(
            &bert,
            &no_decay.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        );

        // Llama: the RMSNorms are not nn.LayerNorm; their names match
        // `layernorm` and `(^|.)norm(.|$)`. No bias anywhere.
        check_family(
            &fixture_names("llama-tiny"),
            &[
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
                "model.norm.weight",
            ],
        );

        // GPT-2: ln_1, ln_2, ln_f are nn.LayerNorm (caught by type in the
        // Trainer, no pattern matches them), plus every Conv1D bias.
        let mut no_decay = vec!["transformer.ln_f.weight", "transformer.ln_f.bias"];
        let per_layer = [
            "ln_1.weight",
            "ln_1.bias",
            "ln_2.weight",
            "ln_2.bias",
            "attn.c_attn.bias",
            "attn.c_proj.bias",
            "mlp.c_fc.bias",
            "mlp.c_proj.bias",
        ];
        let owned: Vec<String> = (0..2)
            .flat_map(|l| {
                per_layer
                    .iter()
                    .map(move |p| format!("transformer.h.{l}.{p}"))
            })
            .collect();
        no_decay.extend(owned.iter().map(|s| s.as_str()));
        check_family(&fixture_names("gpt2-tiny"), &no_decay);
        assert!(decays("transformer.wte.weight") && decays("transformer.h.1.attn.c_attn.weight"));

        // Adapters: with PEFT under the Trainer they match no pattern, so
        // they decay; a saved head's bias does not.
        for n in [
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            "model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            "transformer.h.0.attn.c_attn.lora_A.weight",
            "bert.encoder.layer.0.attention.self.query.lora_B.weight",
            "model.layers.1.mlp.down_proj.ia3_l",
            "bert.encoder.layer.1.output.dense.ia3_l",
            "prompt_embeddings",
        ] {
            assert!(decays(n), "{n}");
            assert!(decays(&format!("base_model.model.{n}")), "{n}");
        }
        assert!(!decays("classifier.modules_to_save.default.bias"));
        // Other norm names of the Trainer's patterns.
        for n in [
            "model.layers.0.self_attn.q_norm.weight",
            "encoder.final_layer_norm.weight",
            "norm.weight",
            "h.0.RMSNorm.weight",
        ] {
            assert!(!decays(n), "{n}");
        }
        // A segment that merely contains `norm` is not a norm.
        assert!(decays("model.normalizer_proj.weight"));
    }

    /// Every module a model in `src/models/` loads as a LayerNorm
    /// (`p.pp("NAME").layer_norm(..)`) is in `LAYER_NORM_MODULES` (the
    /// Trainer's by-type rule).
    #[test]
    fn every_layer_norm_module_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/models");
        let mut found = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap();
            for (i, _) in src.match_indices(".layer_norm(") {
                let line_start = src[..i].rfind('\n').map_or(0, |n| n + 1);
                let call = &src[line_start..i];
                let name = call
                    .rsplit("pp(\"")
                    .next()
                    .and_then(|r| r.split('"').next())
                    .expect("a pp(\"NAME\")");
                assert!(
                    LAYER_NORM_MODULES.contains(&name),
                    "{}: LayerNorm `{name}` is not in optim::LAYER_NORM_MODULES: {call}",
                    path.display()
                );
                found += 1;
            }
        }
        assert!(found >= 6, "{found}");
    }
}
