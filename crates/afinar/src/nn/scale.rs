//! `y * (v / div)` over the last dimension, with hand-written backward:
//! IA3's learned vectors (Liu et al. 2022, <https://arxiv.org/abs/2205.05638>)
//! and DoRA's magnitude over the detached weight norm (Liu et al. 2024,
//! <https://arxiv.org/abs/2402.09353>). `v`'s gradient goes to its buffer;
//! `div` is a constant. CPU only: on a GPU it is an error, said plainly.

use super::custom_op::{
    apply, cerr, first_only, last_dim, needs_grad, output, tensor, with_f32, with_f32s, CResult,
    Fwd, Grads, Input, Op,
};
use super::Weight;
use crate::simd;
use candle_core::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// `y * (v / div)` along the last dimension: IA3's learned vectors and
/// DoRA's magnitude over the (detached) weight norm. `v`'s gradient goes to
/// its buffer; `div` is a constant (no gradient).
struct ScaleLastOp {
    v: Weight,
    div: Option<Arc<Vec<f32>>>,
}

impl ScaleLastOp {
    fn factors(&self, v: &[f32]) -> Vec<f32> {
        match &self.div {
            Some(d) => v.iter().zip(d.iter()).map(|(a, b)| a / b).collect(),
            None => v.to_vec(),
        }
    }
}

impl Op<2> for ScaleLastOp {
    fn name(&self) -> &'static str {
        "afinar-scale-last"
    }
    fn cpu_fwd(&self, [yi, vi]: [Input; 2]) -> Fwd {
        let y = yi.f32s("scale input")?;
        let v = vi.f32s("scale vector")?;
        let d = last_dim(yi.dims(), "scale")?;
        if v.len() != d {
            return Err(cerr(format!(
                "scale: vector of {} for rows of {d}",
                v.len()
            )));
        }
        let mut out = vec![0f32; y.len()];
        scale_rows(y, &self.factors(v), &mut out);
        output(out, yi.shape())
    }
    fn bwd(&self, [y, v]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let d = v.elem_count();
        let names = ["scale vector", "scale grad"];
        let dy = with_f32s([v, grad], names, |[vv, g]| {
            if let Some(buf) = &self.v.grad {
                with_f32(y, "scale input", |yv| {
                    // d v_j = sum_rows(g * y)_j / div_j
                    let mut dv = vec![0f32; d];
                    for (gr, yr) in g.chunks(d).zip(yv.chunks(d)) {
                        for j in 0..d {
                            dv[j] += gr[j] * yr[j];
                        }
                    }
                    if let Some(div) = &self.div {
                        for (x, q) in dv.iter_mut().zip(div.iter()) {
                            *x /= q;
                        }
                    }
                    buf.add(&dv);
                    Ok(())
                })?;
            }
            if !needs_grad(y) {
                return Ok(None);
            }
            let mut dy = vec![0f32; g.len()];
            scale_rows(g, &self.factors(vv), &mut dy);
            Ok(Some(tensor(dy, y.shape())?))
        })?;
        Ok(first_only(dy))
    }
}

/// `out[r, j] = x[r, j] * f[j]` over rows of `f.len()`: the forward, and the
/// input gradient by the same factors.
fn scale_rows(x: &[f32], f: &[f32], out: &mut [f32]) {
    let d = f.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, r)| {
            simd::run(
                #[inline(always)]
                || {
                    for j in 0..d {
                        o[j] = r[j] * f[j];
                    }
                },
            )
        });
}

/// `y * (v / div)` over the last dimension; `v` (`[d]` elements, any shape)
/// may be trainable, `div` is a constant.
pub fn scale_last(y: &Tensor, v: &Weight, div: Option<Arc<Vec<f32>>>) -> CResult<Tensor> {
    if !y.device().is_cpu() {
        return Err(cerr(
            "IA3 / DoRA scaling has no GPU kernel yet: train IA3 and DoRA on the CPU",
        ));
    }
    let op = ScaleLastOp { v: v.clone(), div };
    apply(op, [y, &v.t])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, randn};

    #[test]
    fn scale_last_grads_match_finite_differences() {
        let x = randn(&[4, 6], 4);
        let v = (randn(&[6], 8) + 1.5).unwrap();
        check_grads(
            &[x.clone(), v.clone()],
            &|w| scale_last(&w[0].t, &w[1], None).unwrap(),
            2e-2,
        );
        let div = Arc::new(vec![0.5f32, 2.0, 1.0, 3.0, 0.7, 1.1]);
        check_grads(
            &[x, v],
            &move |w| scale_last(&w[0].t, &w[1], Some(div.clone())).unwrap(),
            2e-2,
        );
    }
}
