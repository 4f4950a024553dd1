//! Inverted dropout (Srivastava et al. 2014,
//! <https://jmlr.org/papers/v15/srivastava14a.html>; scaled as torch's
//! `nn.Dropout`: a kept element is divided by 1 - p) with a counter-based
//! mask: whether element `i` is kept under `seed` is a pure function
//! ([`uniform`]), so backward regenerates the mask instead of storing it,
//! attention dropout draws from the same stream, and the CUDA kernel
//! (`dropout_*` in `cuda_kernels.cu`) drops the same elements as the CPU.
//! [`DropoutRng`] gives each dropout site of a forward pass its seed.
//!
//! The stream is SplitMix64 ([`crate::data::splitmix64`], its one copy in
//! the crate: `data` sits below `nn` and needed it first, for the seeded
//! split).

use super::custom_op::{apply, cerr, output, tensor, with_f32, CResult, Fwd, Grads, Input, Op};
use crate::data::splitmix64;
use crate::simd;
use candle_core::Tensor;
use std::cell::Cell;

/// Seeds for the dropout sites of one forward pass. Each call of `next`
/// gives a fresh seed; the same (seed, step) replays the same masks, so the
/// dropout seed is independent of the init and data-order seeds.
pub struct DropoutRng {
    base: u64,
    counter: Cell<u64>,
}

impl DropoutRng {
    pub fn new(seed: u64, step: u64) -> Self {
        DropoutRng {
            base: splitmix64(seed ^ splitmix64(step.wrapping_add(0x5eed))),
            counter: Cell::new(0),
        }
    }
    /// (base, counter): enough to replay the same seeds ([`Self::from_state`]).
    pub fn state(&self) -> (u64, u64) {
        (self.base, self.counter.get())
    }
    pub fn from_state((base, counter): (u64, u64)) -> Self {
        DropoutRng {
            base,
            counter: Cell::new(counter),
        }
    }
    pub fn next(&self) -> u64 {
        let c = self.counter.get();
        self.counter.set(c + 1);
        splitmix64(self.base ^ splitmix64(c))
    }
}

/// A counter-based uniform in [0, 1): the mask of element `i` under `seed`
/// is a pure function, so backward regenerates it instead of storing it.
#[inline(always)]
pub fn uniform(seed: u64, i: u64) -> f32 {
    // Element i of the SplitMix64 stream seeded at `seed`: one mix per element.
    let z = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// `v` dropped as element `i` of the stream under `seed`: `v * scale` (=
/// `v / (1 - p)`) if kept, else 0.
#[inline(always)]
fn drop_one(v: f32, p: f32, scale: f32, seed: u64, i: u64) -> f32 {
    if uniform(seed, i) >= p {
        v * scale
    } else {
        0.0
    }
}

/// Inverted dropout in place, `xs[j]` being element `first + j` of the
/// stream (the attention kernels drop their probabilities by blocks).
pub(crate) fn drop_in_place(xs: &mut [f32], p: f32, seed: u64, first: u64) {
    let scale = 1.0 / (1.0 - p);
    simd::run(
        #[inline(always)]
        || {
            for (j, v) in xs.iter_mut().enumerate() {
                *v = drop_one(*v, p, scale, seed, first + j as u64);
            }
        },
    )
}

/// The backward's second use of a dropout mask, without hashing again:
/// `dp[j] *= 1/(1-p)` where `pd[j]` (the dropped probabilities) was kept,
/// else 0. Where the probability itself is 0 the mask does not matter (its
/// dS term is P * (..) = 0), and where it is not, `pd[j] != 0` exactly when
/// the element was kept.
pub(crate) fn reuse_dropout_mask(dp: &mut [f32], pd: &[f32], p: f32) {
    let scale = 1.0 / (1.0 - p);
    simd::run(
        #[inline(always)]
        || {
            for (d, &k) in dp.iter_mut().zip(pd) {
                *d = if k != 0.0 { *d * scale } else { 0.0 };
            }
        },
    )
}

// ------------------------------------------------------------------ the op

struct DropoutOp {
    p: f32,
    seed: u64,
}

impl Op<1> for DropoutOp {
    fn name(&self) -> &'static str {
        "afinar-dropout"
    }
    fn cpu_fwd(&self, [x]: [Input; 1]) -> Fwd {
        let xv = x.f32s("dropout")?;
        let mut y = vec![0f32; xv.len()];
        cpu::apply_mask(xv, self.p, self.seed, &mut y);
        output(y, x.shape())
    }
    fn bwd(&self, [x]: [&Tensor; 1], _res: &Tensor, grad: &Tensor) -> Grads<1> {
        with_f32(grad, "dropout grad", |g| {
            let mut dx = vec![0f32; g.len()];
            cpu::apply_mask(g, self.p, self.seed, &mut dx);
            Ok([Some(tensor(dx, x.shape())?)])
        })
    }
}

/// Inverted dropout with a mask drawn from `seed` (same seed, same mask).
/// `p = 0` is the identity; `p` must be in [0, 1).
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Err(cerr(format!("dropout probability {p} must be < 1")));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return cuda::dropout(x, p, seed);
    }
    apply(DropoutOp { p, seed }, [x])
}

/// The CPU kernel.
pub(crate) mod cpu {
    use super::drop_one;
    use crate::simd;
    use rayon::prelude::*;

    /// out[i] = keep(i) ? x[i] / (1 - p) : 0.
    pub fn apply_mask(x: &[f32], p: f32, seed: u64, out: &mut [f32]) {
        masked(x, p, seed, out, |o, v| *o = v);
    }

    /// [`apply_mask`] added into `out` (a gradient that has other terms).
    pub fn apply_mask_add(x: &[f32], p: f32, seed: u64, out: &mut [f32]) {
        masked(x, p, seed, out, |o, v| *o += v);
    }

    /// Element i of `x` dropped as stream element i, given to `put` with
    /// element i of `out`.
    fn masked(x: &[f32], p: f32, seed: u64, out: &mut [f32], put: impl Fn(&mut f32, f32) + Sync) {
        let scale = 1.0 / (1.0 - p);
        out.par_chunks_mut(4096).enumerate().for_each(|(c, oc)| {
            let base = c * 4096;
            simd::run(
                #[inline(always)]
                || {
                    for (j, o) in oc.iter_mut().enumerate() {
                        let i = base + j;
                        put(o, drop_one(x[i], p, scale, seed, i as u64));
                    }
                },
            )
        });
    }
}

/// The CUDA entry (the kernel is `dropout_*` in `cuda_kernels.cu`).
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use crate::nn::cuda::{attach, blocks, cuda_dev, empty, launch, ptr, sfx, Timer, A};
    use crate::nn::custom_op::CResult;
    use candle_core::Tensor;

    /// The CPU's counter-based mask (same seed: same dropped elements).
    pub(crate) fn apply(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
        let dev = cuda_dev(x)?;
        let dt = x.dtype();
        let s = sfx(dt, "dropout")?;
        let x = x.contiguous()?;
        let n = x.elem_count();
        let y = empty(x.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("dropout_{s}"),
            (blocks(n), 1),
            256,
            &[
                A::P(ptr(&x)?),
                A::P(ptr(&y)?),
                A::L(n as i64),
                A::F(p),
                A::U(seed),
            ],
        )?;
        Ok(y)
    }

    pub(super) fn dropout(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
        let _t = Timer::start("afinar-cuda-dropout", "forward", &cuda_dev(x)?);
        let y = apply(&x.detach(), p, seed)?;
        attach("afinar-cuda-dropout", &[x], y, move |g| {
            Ok(vec![Some(apply(g, p, seed)?)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, randn};

    #[test]
    fn dropout_keeps_about_one_minus_p() {
        let x = vec![1f32; 100_000];
        let mut y = vec![0f32; x.len()];
        cpu::apply_mask(&x, 0.1, 7, &mut y);
        let kept = y.iter().filter(|v| **v != 0.0).count() as f32 / x.len() as f32;
        assert!((kept - 0.9).abs() < 0.01, "kept {kept}");
        assert!(y.iter().all(|v| *v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let mut y2 = vec![0f32; x.len()];
        cpu::apply_mask(&x, 0.1, 7, &mut y2);
        assert_eq!(y, y2, "same seed, same mask");
    }

    #[test]
    fn dropout_grads_match_finite_differences() {
        let x = randn(&[4, 6], 4);
        check_grads(&[x], &|w| dropout(&w[0].t, 0.3, 11).unwrap(), 2e-2);
    }
}
