//! Activations with hand-written backward: the exact (erf) GELU of BERT's
//! `hidden_act = "gelu"` (Hendrycks & Gimpel 2016,
//! <https://arxiv.org/abs/1606.08415>), GPT-2's tanh approximation
//! (`gelu_new`: transformers' `activations.py` `NewGELUActivation`) and
//! SwiGLU's `silu(gate) * up` (Shazeer 2020, <https://arxiv.org/abs/2002.05202>;
//! transformers' `LlamaMLP` in `models/llama/modeling_llama.py`).
//!
//! All three are elementwise; the CPU kernels use [`fast_exp`] and a
//! polynomial erf rather than libm (erff was a tenth of a training step).
//!
//! [`fast_exp`]: crate::nn::kernels::fast_exp

use super::custom_op::{
    apply, cerr, output, tensor, with_f32, with_f32s, with_last_dim, CResult, Fwd, Grads, Input, Op,
};
use super::kernels::{self, map_elems, map_grad, Mat};
use candle_core::Tensor;

// ------------------------------------------------------------------ GELU (erf, tanh)

/// An elementwise activation: `f` forward, `dy * df(x)` backward. Generic
/// over the functions (not `fn` pointers) so that each activation gets its
/// own loops with `f` and `df` inlined.
struct Elementwise<F, D> {
    name: &'static str,
    /// Its input and gradient as errors name them.
    names: [&'static str; 2],
    f: F,
    df: D,
}

impl<F, D> Op<1> for Elementwise<F, D>
where
    F: Fn(f32) -> f32 + Send + Sync + 'static,
    D: Fn(f32) -> f32 + Send + Sync + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, [x]: [Input; 1]) -> Fwd {
        let xv = x.f32s(self.names[0])?;
        output(map_elems(xv, &self.f), x.shape())
    }
    fn bwd(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        let dx = with_f32s([x, grad], self.names, |[xv, g]| {
            tensor(map_grad(xv, g, &self.df), x.shape())
        })?;
        Ok([Some(dx)])
    }
}

/// Exact (erf) GELU, as BERT's `hidden_act = "gelu"`.
pub fn gelu(x: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::gelu(x, 1);
    }
    let op = Elementwise {
        name: "afinar-gelu",
        names: ["gelu input", "gelu grad"],
        f: cpu::gelu,
        df: cpu::gelu_grad,
    };
    apply(op, [x])
}

/// ReLU6, `min(max(x, 0), 6)` (MobileNetV2's activation, `torch.nn.ReLU6`);
/// the gradient passes where `0 < x < 6`, as torch's `hardtanh_backward`.
/// (The MobileNetV2 blocks use it fused into batch norm, `nn::batch_norm`.)
pub fn relu6(x: &Tensor) -> CResult<Tensor> {
    let op = Elementwise {
        name: "afinar-relu6",
        names: ["relu6 input", "relu6 grad"],
        f: |v: f32| v.clamp(0.0, 6.0),
        df: |v: f32| if v > 0.0 && v < 6.0 { 1.0 } else { 0.0 },
    };
    apply(op, [x])
}

/// GPT-2's `gelu_new` (= `gelu_pytorch_tanh`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::gelu(x, 0);
    }
    let op = Elementwise {
        name: "afinar-gelu-tanh",
        names: ["gelu_tanh input", "gelu_tanh grad"],
        f: cpu::gelu_tanh,
        df: cpu::gelu_tanh_grad,
    };
    apply(op, [x])
}

// ------------------------------------------------------------------ SwiGLU

struct SiluMulOp;

impl Op<2> for SiluMulOp {
    fn name(&self) -> &'static str {
        "afinar-silu-mul"
    }
    fn cpu_fwd(&self, [gi, ui]: [Input; 2]) -> Fwd {
        if gi.dims() != ui.dims() {
            return Err(cerr(format!(
                "silu_mul: gate {:?} and up {:?} differ",
                gi.dims(),
                ui.dims()
            )));
        }
        let (g, u) = (gi.f32s("silu_mul gate")?, ui.f32s("silu_mul up")?);
        output(cpu::silu_mul_fwd(g, u), gi.shape())
    }
    fn bwd(&self, [gate, up]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        let names = ["silu_mul gate", "silu_mul up", "silu_mul grad"];
        with_f32s([gate, up, grad], names, |[gv, uv, dy]| {
            let mut dg = want_g.then(|| vec![0f32; gv.len()]);
            let mut du = want_u.then(|| vec![0f32; gv.len()]);
            cpu::silu_mul_bwd(gv, uv, dy, dg.as_deref_mut(), du.as_deref_mut());
            Ok([
                dg.map(|v| tensor(v, gate.shape())).transpose()?,
                du.map(|v| tensor(v, up.shape())).transpose()?,
            ])
        })
    }
}

/// SwiGLU's `silu(gate) * up` (Llama's MLP before `down_proj`); same shapes.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return cuda::silu_mul(gate, up);
    }
    apply(SiluMulOp, [gate, up])
}

// ------------------------------------------------------------------ GELU + frozen dense

/// `gelu(f) @ w^T + b` with `w` `[out, F]` and `b` frozen, as one op:
/// the `[.., F]` activation is never a tensor of the graph (not kept for
/// backward, no gradient of its own to accumulate); backward is
/// `df = (dy w) * gelu'(f)`.
struct GeluDenseOp {
    w: Tensor,
    b: Option<Tensor>,
}

impl Op<1> for GeluDenseOp {
    fn name(&self) -> &'static str {
        "afinar-gelu-dense"
    }
    fn cpu_fwd(&self, [fi]: [Input; 1]) -> Fwd {
        let (out_f, in_f) = self.w.dims2()?;
        if fi.dims().last() != Some(&in_f) {
            return Err(cerr(format!(
                "gelu_dense: input {:?} does not fit the dense weight [{out_f}, {in_f}]",
                fi.dims()
            )));
        }
        let f = fi.f32s("gelu_dense input")?;
        let h = map_elems(f, cpu::gelu);
        let b = self.b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        let y = with_f32(&self.w, "dense weight", |w| {
            let par = kernels::parallelism();
            Ok(super::linear::cpu::x_wt(
                &h,
                w,
                out_f,
                in_f,
                b.as_deref(),
                par,
            ))
        })?;
        output(y, with_last_dim(fi.dims(), out_f, "gelu_dense")?)
    }
    fn bwd(&self, [f]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        let (out_f, in_f) = self.w.dims2()?;
        let names = ["gelu_dense input", "gelu_dense grad", "dense weight"];
        let df = with_f32s([f, grad, &self.w], names, |[fv, dy, w]| {
            let dh = super::linear::cpu::g_w(dy, w, out_f, in_f, kernels::parallelism());
            tensor(map_grad(fv, &dh, cpu::gelu_grad), f.shape())
        })?;
        Ok([Some(df)])
    }
}

/// `linear(gelu(f), w, b)` for a frozen `w` `[out, F]` and frozen `b`
/// (BERT's `output.dense` when it neither trains nor has an adapter), on
/// the CPU, without keeping the `[.., F]` activation for backward. Other
/// devices compose the ops.
pub fn gelu_dense(f: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    if !f.device().is_cpu() {
        let h = gelu(f)?;
        let bw = b.map(|b| super::Weight::frozen(b.clone()));
        return super::linear::linear(&h, &super::Weight::frozen(w.clone()), bw.as_ref());
    }
    let op = GeluDenseOp {
        w: w.detach(),
        b: b.map(|b| b.detach()),
    };
    apply(op, [f])
}

// ------------------------------------------------------------------ SwiGLU + frozen down projection + residual

/// `r + (silu(gate) * up) @ w^T` with `w` `[out, F]` frozen, as one op: the
/// `[.., F]` product and the projection are never tensors of the graph, so
/// they are not kept from forward to backward (a layer of SmolLM2 at 1,024
/// tokens keeps 8.7 MB less); backward recomputes nothing the frozen weight
/// does not need (`dh = dy w`, then SiLU's backward).
struct SwigluDownOp {
    w: Tensor,
}

impl Op<3> for SwigluDownOp {
    fn name(&self) -> &'static str {
        "afinar-swiglu-down-residual"
    }
    fn cpu_fwd(&self, [gi, ui, ri]: [Input; 3]) -> Fwd {
        let (out_f, in_f) = self.w.dims2()?;
        let ok = gi.dims() == ui.dims()
            && gi.dims().last() == Some(&in_f)
            && ri.dims().last() == Some(&out_f)
            && ri.dims()[..ri.dims().len() - 1] == gi.dims()[..gi.dims().len() - 1];
        if !ok {
            return Err(cerr(format!(
                "swiglu_down: gate {:?}, up {:?}, residual {:?} do not fit down_proj [{out_f}, {in_f}]",
                gi.dims(),
                ui.dims(),
                ri.dims()
            )));
        }
        let (g, u, r) = (
            gi.f32s("mlp gate")?,
            ui.f32s("mlp up")?,
            ri.f32s("mlp residual")?,
        );
        let h = cpu::silu_mul_fwd(g, u);
        let mut y = r.to_vec();
        let n = g.len() / in_f;
        with_f32(&self.w, "down_proj weight", |w| {
            kernels::matmul(
                &mut y,
                out_f,
                Mat::rm(&h, n, in_f),
                Mat::rm(w, out_f, in_f).t(),
                1.0,
                true,
                kernels::parallelism(),
            );
            Ok(())
        })?;
        output(y, ri.shape())
    }
    fn bwd(&self, [gate, up, res]: [&Tensor; 3], _res: &Tensor, grad: &Tensor) -> Grads<3> {
        let (out_f, in_f) = self.w.dims2()?;
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        let names = ["mlp gate", "mlp up", "mlp grad", "down_proj weight"];
        let (dg, du) = with_f32s([gate, up, grad, &self.w], names, |[gv, uv, dy, w]| {
            if !want_g && !want_u {
                return Ok((None, None));
            }
            let n = dy.len() / out_f;
            // dh = dy w, then SiLU-gate's backward.
            let dh = kernels::matmul_new(
                Mat::rm(dy, n, out_f),
                Mat::rm(w, out_f, in_f),
                1.0,
                None,
                kernels::parallelism(),
            );
            let mut dg = want_g.then(|| vec![0f32; gv.len()]);
            let mut du = want_u.then(|| vec![0f32; gv.len()]);
            cpu::silu_mul_bwd(gv, uv, &dh, dg.as_deref_mut(), du.as_deref_mut());
            Ok((
                dg.map(|v| tensor(v, gate.shape())).transpose()?,
                du.map(|v| tensor(v, up.shape())).transpose()?,
            ))
        })?;
        // The residual's gradient is the output's.
        let dr = res.track_op().then(|| grad.clone());
        Ok([dg, du, dr])
    }
}

/// `residual + (silu(gate) * up) @ w^T` for a frozen `w` `[out, F]` (Llama's
/// MLP with its residual: `down_proj` frozen and without adapter, as in
/// LoRA on the attention projections), on the CPU; the same as
/// `residual + linear(silu_mul(gate, up), w)`, without keeping the `[.., F]`
/// product or the projection for backward. Other devices compose the ops.
pub fn swiglu_down_residual(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    residual: &Tensor,
) -> CResult<Tensor> {
    if !gate.device().is_cpu() {
        let h = silu_mul(gate, up)?;
        let y = super::linear::linear(&h, &super::Weight::frozen(w.clone()), None)?;
        return residual + y;
    }
    apply(SwigluDownOp { w: w.detach() }, [gate, up, residual])
}

/// The CPU kernels: scalar functions and their derivatives (the loops of
/// the GELUs are `kernels::map_elems` / `map_grad`), and SwiGLU's loops.
mod cpu {
    use crate::nn::kernels::{fast_exp, new_filled, ELEM_CHUNK};
    use crate::simd;
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    // ------------------------------------------------------------ GELU (erf)

    /// erf(z) for z >= 0 and exp(-z^2), by Abramowitz & Stegun 7.1.26
    /// (|error| <= 1.5e-7): one exp shared with GELU's derivative, where libm's
    /// erff was a tenth of a training step.
    #[inline(always)]
    fn erf_pos_and_gauss(z: f32) -> (f32, f32) {
        const P: f32 = 0.327_591_1;
        const A: [f32; 5] = [
            0.254_829_6,
            -0.284_496_74,
            1.421_413_7,
            -1.453_152_1,
            1.061_405_4,
        ];
        let t = 1.0 / (1.0 + P * z);
        let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
        let g = fast_exp(-z * z);
        (1.0 - poly * g, g)
    }

    /// Φ(x) (the standard normal CDF) and φ(x) (its density).
    #[inline(always)]
    fn normal_cdf_pdf(x: f32) -> (f32, f32) {
        let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let (e, g) = erf_pos_and_gauss(z);
        let erf = if x < 0.0 { -e } else { e };
        (0.5 * (1.0 + erf), g * 0.398_942_3)
    }

    /// Exact GELU: x Φ(x) (`hidden_act = "gelu"`, not the tanh approximation).
    #[inline(always)]
    pub fn gelu(x: f32) -> f32 {
        x * normal_cdf_pdf(x).0
    }

    #[inline(always)]
    pub fn gelu_grad(x: f32) -> f32 {
        // d/dx [x Φ(x)] = Φ(x) + x φ(x)
        let (cdf, pdf) = normal_cdf_pdf(x);
        cdf + x * pdf
    }

    // ------------------------------------------------------------ GELU (tanh)

    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const GELU_C: f32 = 0.044_715;

    /// tanh(u) = 1 - 2 / (1 + e^{2u}); exact at the saturated ends because
    /// fast_exp clamps instead of overflowing.
    #[inline(always)]
    fn tanh_fast(u: f32) -> f32 {
        1.0 - 2.0 / (1.0 + fast_exp(2.0 * u))
    }

    /// GPT-2's `gelu_new`: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    #[inline(always)]
    pub fn gelu_tanh(x: f32) -> f32 {
        let t = tanh_fast(SQRT_2_OVER_PI * (x + GELU_C * x * x * x));
        0.5 * x * (1.0 + t)
    }

    #[inline(always)]
    pub fn gelu_tanh_grad(x: f32) -> f32 {
        let x2 = x * x;
        let t = tanh_fast(SQRT_2_OVER_PI * x * (1.0 + GELU_C * x2));
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x2)
    }

    // ------------------------------------------------------------ SwiGLU

    #[inline(always)]
    fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + fast_exp(-x))
    }

    /// `LlamaMLP`'s `act_fn(gate_proj(x)) * up_proj(x)` with SiLU: out = silu(g) * u.
    pub fn silu_mul_fwd(g: &[f32], u: &[f32]) -> Vec<f32> {
        // SAFETY: the chunks of `out`, `g` and `u` pair up and cover `out`.
        unsafe {
            new_filled(g.len().min(u.len()), |out| {
                out.par_chunks_mut(ELEM_CHUNK)
                    .zip(g.par_chunks(ELEM_CHUNK).zip(u.par_chunks(ELEM_CHUNK)))
                    .for_each(|(o, (g, u))| {
                        simd::run(
                            #[inline(always)]
                            || {
                                for i in 0..o.len() {
                                    o[i] = MaybeUninit::new(g[i] * sigmoid(g[i]) * u[i]);
                                }
                            },
                        )
                    })
            })
        }
    }

    /// dg = dy u s (1 + g (1 - s)), du = dy g s with s = sigmoid(g).
    pub fn silu_mul_bwd(
        g: &[f32],
        u: &[f32],
        dy: &[f32],
        dg: Option<&mut [f32]>,
        du: Option<&mut [f32]>,
    ) {
        if let Some(dg) = dg {
            dg.par_chunks_mut(ELEM_CHUNK)
                .enumerate()
                .for_each(|(c, o)| {
                    let b = c * ELEM_CHUNK;
                    let (g, u, dy) = (&g[b..b + o.len()], &u[b..b + o.len()], &dy[b..b + o.len()]);
                    simd::run(
                        #[inline(always)]
                        || {
                            for i in 0..o.len() {
                                let s = sigmoid(g[i]);
                                o[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                            }
                        },
                    )
                });
        }
        if let Some(du) = du {
            du.par_chunks_mut(ELEM_CHUNK)
                .enumerate()
                .for_each(|(c, o)| {
                    let b = c * ELEM_CHUNK;
                    let (g, dy) = (&g[b..b + o.len()], &dy[b..b + o.len()]);
                    simd::run(
                        #[inline(always)]
                        || {
                            for i in 0..o.len() {
                                o[i] = dy[i] * g[i] * sigmoid(g[i]);
                            }
                        },
                    )
                });
        }
    }
}

/// The CUDA entries (kernels `silu_mul_*` and `gelu_*` in `cuda_kernels.cu`).
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{
        attach, attach_storage, blocks, cuda_dev, empty, empty_st, launch, ptr, sfx, sptr, Timer, A,
    };
    use crate::nn::custom_op::{cerr, CResult};
    use candle_core::Tensor;

    pub(super) fn silu_mul(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
        let dev = cuda_dev(gate)?;
        let _t = Timer::start("afinar-cuda-silu-mul", "forward", &dev);
        let dt = gate.dtype();
        let s = sfx(dt, "silu_mul")?;
        let (g, u) = (gate.detach().contiguous()?, up.detach().contiguous()?);
        if g.shape() != u.shape() || u.dtype() != dt {
            return Err(cerr(format!(
                "silu_mul: gate {:?} {:?} and up {:?} {:?} differ",
                g.dims(),
                dt,
                u.dims(),
                u.dtype()
            )));
        }
        let n = g.elem_count();
        let y = empty_st(n, dt, &dev)?;
        launch(
            &dev,
            &format!("silu_mul_fwd_{s}"),
            (blocks(n), 1),
            256,
            &[
                A::P(ptr(&g)?),
                A::P(ptr(&u)?),
                A::P(sptr(&y)),
                A::L(n as i64),
            ],
        )?;
        let shape = g.shape().clone();
        attach_storage("afinar-cuda-silu-mul", &[gate, up], y, shape, move |dy| {
            let dy = dy.contiguous()?;
            let dg = empty(g.shape(), dt, &dev)?;
            let du = empty(g.shape(), dt, &dev)?;
            launch(
                &dev,
                &format!("silu_mul_bwd_{s}"),
                (blocks(n), 1),
                256,
                &[
                    A::P(ptr(&g)?),
                    A::P(ptr(&u)?),
                    A::P(ptr(&dy)?),
                    A::P(ptr(&dg)?),
                    A::P(ptr(&du)?),
                    A::L(n as i64),
                ],
            )?;
            Ok(vec![Some(dg), Some(du)])
        })
    }

    /// kind 0: tanh GELU (GPT-2), 1: exact erf GELU (BERT).
    pub(super) fn gelu(x: &Tensor, kind: i32) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let _t = Timer::start("afinar-cuda-gelu", "forward", &dev);
        let dt = x.dtype();
        let s = sfx(dt, "gelu")?;
        let xd = x.detach().contiguous()?;
        let n = xd.elem_count();
        let y = empty(xd.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("gelu_fwd_{s}"),
            (blocks(n), 1),
            256,
            &[A::P(ptr(&xd)?), A::P(ptr(&y)?), A::L(n as i64), A::I(kind)],
        )?;
        attach("afinar-cuda-gelu", &[x], y, move |dy| {
            let dy = dy.contiguous()?;
            let dx = empty(xd.shape(), dt, &dev)?;
            launch(
                &dev,
                &format!("gelu_bwd_{s}"),
                (blocks(n), 1),
                256,
                &[
                    A::P(ptr(&xd)?),
                    A::P(ptr(&dy)?),
                    A::P(ptr(&dx)?),
                    A::L(n as i64),
                    A::I(kind),
                ],
            )?;
            Ok(vec![Some(dx)])
        })
    }
}

#[cfg(test)]
mod gelu_dense_tests {
    use super::*;
    use crate::nn::testing::{check, check_grads, flat, max_abs_diff, randn};
    use crate::nn::Weight;

    #[test]
    fn relu6_clamps_and_passes_the_gradient_inside() {
        // Values spread over [-8, 8): both clamps and the linear part, none
        // within the finite-difference step of a kink.
        let x = (randn(&[4, 50], 3) * 8.0).unwrap();
        let kink = |v: f64| v.abs() < 1e-3 || (v - 6.0).abs() < 1e-3;
        assert!(!crate::nn::testing::f64s(&x).into_iter().any(kink));
        check(
            &[x],
            &|a| relu6(&a[0].t).unwrap(),
            &|a| a[0].iter().map(|v| v.clamp(0.0, 6.0)).collect(),
            1,
        );
    }

    /// The fused op against gelu then linear: the same output and input
    /// gradient, with and without bias; and finite differences.
    #[test]
    fn gelu_dense_matches_the_composed_ops() {
        let (b, t, f, c) = (2, 5, 24, 7);
        let x = randn(&[b, t, f], 1);
        let (w, bias) = (randn(&[c, f], 2), randn(&[c], 3));
        let r = randn(&[b, t, c], 4);
        for bias in [None, Some(&bias)] {
            let run = |fused: bool| {
                let xw = Weight::trainable(&x).unwrap();
                let y = if fused {
                    gelu_dense(&xw.t, &w, bias).unwrap()
                } else {
                    let bw = bias.map(|b| Weight::frozen(b.clone()));
                    crate::nn::linear(
                        &gelu(&xw.t).unwrap(),
                        &Weight::frozen(w.clone()),
                        bw.as_ref(),
                    )
                    .unwrap()
                };
                let g = (y.clone() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (flat(&y), flat(g.get(&xw.t).unwrap()))
            };
            let (want, gw) = run(false);
            let (got, gg) = run(true);
            assert!(max_abs_diff(&want, &got) < 1e-5);
            assert!(max_abs_diff(&gw, &gg) < 1e-5);
        }
        let (wc, bc) = (w.clone(), bias.clone());
        check_grads(
            &[x.clone()],
            &move |v| gelu_dense(&v[0].t, &wc, Some(&bc)).unwrap(),
            2e-2,
        );
        let bad = gelu_dense(&x, &randn(&[c, f + 1], 6), None);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("does not fit the dense weight"));
    }
}

#[cfg(test)]
mod swiglu_down_tests {
    use super::*;
    use crate::nn::testing::{check_grads, flat, max_abs_diff, randn};
    use crate::nn::Weight;

    /// The fused op against the composed one: the same output and the same
    /// gradients of gate, up and the residual; and finite differences.
    #[test]
    fn swiglu_down_residual_matches_the_composed_ops() {
        let (b, t, f, c) = (2, 5, 24, 7);
        let vals = [
            randn(&[b, t, f], 1),
            randn(&[b, t, f], 2),
            randn(&[b, t, c], 3),
        ];
        let w = randn(&[c, f], 4);
        let r = randn(&[b, t, c], 5);
        let run = |fused: bool| {
            let ws: Vec<Weight> = vals.iter().map(|v| Weight::trainable(v).unwrap()).collect();
            let y = if fused {
                swiglu_down_residual(&ws[0].t, &ws[1].t, &w, &ws[2].t).unwrap()
            } else {
                let h = silu_mul(&ws[0].t, &ws[1].t).unwrap();
                let p = crate::nn::linear(&h, &Weight::frozen(w.clone()), None).unwrap();
                (&ws[2].t + p).unwrap()
            };
            let g = (y.clone() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads: Vec<Vec<f32>> = ws.iter().map(|x| flat(g.get(&x.t).unwrap())).collect();
            (flat(&y), grads)
        };
        let (want, gw) = run(false);
        let (got, gg) = run(true);
        assert!(max_abs_diff(&want, &got) < 1e-5);
        for (i, (a, b)) in gw.iter().zip(&gg).enumerate() {
            assert!(max_abs_diff(a, b) < 1e-5, "gradient of input {i}");
        }
        let wc = w.clone();
        check_grads(
            &vals,
            &move |x| swiglu_down_residual(&x[0].t, &x[1].t, &wc, &x[2].t).unwrap(),
            2e-2,
        );
        // Shapes that do not fit down_proj are an error naming them.
        let bad = swiglu_down_residual(&vals[0], &vals[1], &randn(&[c, f + 1], 6), &vals[2]);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("do not fit down_proj"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, check_grads, f64s, randn};
    use candle_core::Device;

    #[test]
    fn fast_gelu_matches_libm_erf() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 * 1e-3;
            let exact = 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            worst = worst.max((cpu::gelu(x) - exact).abs() / (1.0 + x.abs()));
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_grad_matches_finite_difference() {
        for &x in &[-3.0f32, -1.0, -0.1, 0.0, 0.3, 1.7, 4.0] {
            let h = 1e-3;
            let fd = (cpu::gelu(x + h) - cpu::gelu(x - h)) / (2.0 * h);
            assert!(
                (fd - cpu::gelu_grad(x)).abs() < 1e-3,
                "x={x} fd={fd} an={}",
                cpu::gelu_grad(x)
            );
        }
    }

    #[test]
    fn gelu_grads_match_finite_differences() {
        let x = randn(&[4, 6], 4);
        check_grads(&[x], &|w| gelu(&w[0].t).unwrap(), 2e-2);
    }

    fn silu_mul_ref(g: &[f64], u: &[f64]) -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect()
    }

    fn gelu_tanh_ref(x: &[f64]) -> Vec<f64> {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        x.iter()
            .map(|x| 0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh()))
            .collect()
    }

    #[test]
    fn silu_mul_and_gelu_tanh_grads() {
        let g = (randn(&[3, 7], 30) * 4.0).unwrap();
        let u = (randn(&[3, 7], 31) * 2.0).unwrap();
        check(
            &[g.clone(), u],
            &|a| silu_mul(&a[0].t, &a[1].t).unwrap(),
            &|a| silu_mul_ref(&a[0], &a[1]),
            1,
        );
        check(
            &[g],
            &|a| gelu_tanh(&a[0].t).unwrap(),
            &|a| gelu_tanh_ref(&a[0]),
            1,
        );
        // Saturated ends stay finite and exact.
        let x = Tensor::new(
            &[-100f32, -20.0, -1e-4, 0.0, 1e-4, 20.0, 100.0],
            &Device::Cpu,
        )
        .unwrap();
        let got = f64s(&gelu_tanh(&x).unwrap());
        let want = gelu_tanh_ref(&f64s(&x));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let got = f64s(&silu_mul(&x, &x.ones_like().unwrap()).unwrap());
        let want = silu_mul_ref(&f64s(&x), &[1.0; 7]);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{g} vs {w}");
        }
        let e = silu_mul(&randn(&[2, 3], 1), &randn(&[3, 2], 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
    }
}
