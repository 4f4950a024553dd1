//! What the op tests share: seeded inputs and the two finite-difference
//! checks of a hand-written backward. [`check_grads`] compares it with
//! central differences of the op itself in f32 (h = 1e-2); [`check`]
//! compares the op's forward with an f64 reference and its backward with
//! central differences of that reference (h = 1e-6).

use super::dropout::uniform;
use super::Weight;
use candle_core::{Device, Tensor};

/// `n` values uniform in [-amp, amp) from `seed` (the dropout stream).
pub(crate) fn rand_vec(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (uniform(seed, i as u64) - 0.5) * 2.0 * amp)
        .collect()
}

/// A CPU tensor of values uniform in [-1, 1) from `seed`.
pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(rand_vec(n, seed, 1.0), shape, &Device::Cpu).unwrap()
}

pub(crate) fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub(crate) fn f64s(t: &Tensor) -> Vec<f64> {
    flat(t).into_iter().map(|v| v as f64).collect()
}

/// max |a - b| over two equally long slices.
pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub(crate) type Reference<'a> = &'a dyn Fn(&[Vec<f64>]) -> Vec<f64>;

/// The op's forward against an f64 reference, then the op's hand backward
/// of `sum(out * r)` against central differences of the f64 reference
/// (h = 1e-6, so the differences are exact to ~1e-9 and the tolerance
/// measures the f32 backward alone). Arguments reach `op` as trainable
/// [`Weight`]s: tensor arguments use `.t` (gradient through candle),
/// weight arguments accumulate into their buffers. `stride` samples the
/// checked elements of big arguments.
pub(crate) fn check(
    args: &[Tensor],
    op: &dyn Fn(&[Weight]) -> Tensor,
    reference: Reference,
    stride: usize,
) {
    const FWD_TOL: f64 = 2e-5;
    const GRAD_TOL: f64 = 1e-4;
    let ws: Vec<Weight> = args.iter().map(|a| Weight::trainable(a).unwrap()).collect();
    let base: Vec<Vec<f64>> = args.iter().map(f64s).collect();
    let out = op(&ws);
    let want = reference(&base);
    let got = f64s(&out);
    assert_eq!(got.len(), want.len(), "output size");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= FWD_TOL * (1.0 + w.abs()),
            "forward elem {i}: op {g} vs reference {w}"
        );
    }
    let r = randn(out.dims(), 99);
    let rv = f64s(&r);
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = |a: &[Vec<f64>]| -> f64 { reference(a).iter().zip(&rv).map(|(o, r)| o * r).sum() };
    for (ai, w) in ws.iter().enumerate() {
        let g = match grads.get(&w.t) {
            Some(g) => flat(g),
            None => flat(&w.grad_tensor().unwrap().expect("gradient present")),
        };
        let h = 1e-6;
        let mut a = base.clone();
        for i in (0..g.len()).step_by(stride) {
            let x0 = a[ai][i];
            a[ai][i] = x0 + h;
            let up = loss(&a);
            a[ai][i] = x0 - h;
            let down = loss(&a);
            a[ai][i] = x0;
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - g[i] as f64).abs() <= GRAD_TOL * (1.0 + fd.abs()),
                "arg {ai} elem {i}: finite difference {fd} vs hand backward {}",
                g[i]
            );
        }
    }
}

/// Checks d(sum(f(x) * r))/dx of every argument against central
/// differences. Arguments are handed to `f` as trainable [`Weight`]s: ops
/// that take plain tensors use `.t` (their gradient comes back through
/// candle), ops that take weights accumulate into the buffers.
pub(crate) fn check_grads(vals: &[Tensor], f: &dyn Fn(&[Weight]) -> Tensor, tol: f32) {
    let ws: Vec<Weight> = vals.iter().map(|v| Weight::trainable(v).unwrap()).collect();
    let out = f(&ws);
    let r = randn(out.dims(), 99);
    let loss = (out * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    for (vi, w) in ws.iter().enumerate() {
        let g = match grads.get(&w.t) {
            Some(g) => g.clone(),
            None => w.grad_tensor().unwrap().expect("gradient present"),
        };
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base = vals[vi].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-2f32;
        for i in (0..base.len()).step_by((base.len() / 7).max(1)) {
            let eval = |delta: f32| -> f32 {
                let mut p = base.clone();
                p[i] += delta;
                let mut args: Vec<Weight> =
                    vals.iter().map(|v| Weight::frozen(v.clone())).collect();
                args[vi] =
                    Weight::frozen(Tensor::from_vec(p, vals[vi].shape(), &Device::Cpu).unwrap());
                (f(&args) * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_vec0::<f32>()
                    .unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= tol * (1.0 + fd.abs()),
                "arg {vi} elem {i}: fd {fd} vs analytic {}",
                g[i]
            );
        }
    }
}
