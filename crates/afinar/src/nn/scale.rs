//! `y * (v / div)` over the last dimension, with hand-written backward:
//! IA3's learned vectors (Liu et al. 2022, <https://arxiv.org/abs/2205.05638>)
//! and DoRA's magnitude over the detached weight norm (Liu et al. 2024,
//! <https://arxiv.org/abs/2402.09353>). `v`'s gradient goes to its buffer;
//! `div` is a constant. CPU only: on a GPU it is an error, said plainly.

use super::custom_op::{cerr, f32s, needs_grad, tensor, with_f32, CResult};
use super::Weight;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
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

impl CustomOp2 for ScaleLastOp {
    fn name(&self) -> &'static str {
        "afinar-scale-last"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let y = f32s(s1, l1, "scale input")?;
        let v = f32s(s2, l2, "scale vector")?;
        let d = *l1
            .dims()
            .last()
            .ok_or_else(|| cerr("scale: scalar input"))?;
        if v.len() != d {
            return Err(cerr(format!(
                "scale: vector of {} for rows of {d}",
                v.len()
            )));
        }
        let f = self.factors(v);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d))
            .for_each(|(o, r)| {
                for j in 0..d {
                    o[j] = r[j] * f[j];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        y: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = v.elem_count();
        with_f32(v, "scale vector", |vv| {
            let f = self.factors(vv);
            with_f32(grad, "scale grad", |g| {
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
                    return Ok((None, None));
                }
                let mut dy = vec![0f32; g.len()];
                dy.par_chunks_mut(d)
                    .zip(g.par_chunks(d))
                    .for_each(|(o, r)| {
                        for j in 0..d {
                            o[j] = r[j] * f[j];
                        }
                    });
                Ok((Some(tensor(dy, y.shape())?), None))
            })
        })
    }
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
    y.contiguous()?
        .apply_op2_arc(&v.t.contiguous()?, Arc::new(Box::new(op)))
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
