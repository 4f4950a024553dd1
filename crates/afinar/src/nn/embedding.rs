//! Embedding lookup with hand-written backward, as torch's `nn.Embedding`
//! (`padding_idx` included): rows of a `[V, H]` table for token ids; a
//! trainable table's gradient is scattered into its buffer, never onto the
//! padding row; a frozen table costs nothing. On a GPU with bf16 autocast
//! ([`crate::nn::set_autocast_bf16`]) the rows come out in bf16 and the
//! table's gradient in f32.

use super::custom_op::{apply, cerr, output, with_f32, CResult, Fwd, Grads, Input, Op};
use super::Weight;
use crate::simd;
use candle_core::{DType, Tensor};

struct EmbeddingOp {
    padding_idx: Option<u32>,
    w: Weight,
}

impl Op<2> for EmbeddingOp {
    fn name(&self) -> &'static str {
        "afinar-embedding"
    }
    fn cpu_fwd(&self, [wi, idi]: [Input; 2]) -> Fwd {
        let w = wi.f32s("embedding weight")?;
        let ids = idi.u32s("embedding ids")?;
        let [v, h] = wi.dims() else {
            return Err(cerr("embedding weight must be 2-d"));
        };
        let mut out = vec![0f32; ids.len() * h];
        for (o, &id) in out.chunks_mut(*h).zip(ids) {
            if id as usize >= *v {
                return Err(cerr(format!(
                    "token id {id} is out of range for a vocabulary of {v}"
                )));
            }
            o.copy_from_slice(&w[id as usize * h..(id as usize + 1) * h]);
        }
        let mut shape = idi.dims().to_vec();
        shape.push(*h);
        output(out, shape)
    }
    fn bwd(&self, [w, ids]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let Some(buf) = &self.w.grad else {
            return Ok([None, None]);
        };
        let (v, h) = w.dims2()?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        with_f32(grad, "embedding grad", |g| {
            buf.accumulate(v * h, true, |dw, _| {
                simd::run(
                    #[inline(always)]
                    || {
                        for (row, &id) in g.chunks(h).zip(&ids) {
                            // As torch's `padding_idx`: the padding row never learns.
                            if Some(id) == self.padding_idx {
                                continue;
                            }
                            for (d, x) in dw[id as usize * h..(id as usize + 1) * h]
                                .iter_mut()
                                .zip(row)
                            {
                                *d += x;
                            }
                        }
                    },
                )
            });
            Ok([None, None])
        })
    }
}

/// Rows of `weight` `[V, H]` for `ids` (any shape, u32) -> `[..ids, H]`.
/// The gradient skips `padding_idx`, as `nn.Embedding(padding_idx=...)`.
pub fn embedding(weight: &Weight, ids: &Tensor, padding_idx: Option<u32>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if weight.t.device().is_cuda() {
        return cuda::embedding(weight, ids, padding_idx);
    }
    let op = EmbeddingOp {
        padding_idx,
        w: weight.clone(),
    };
    apply(op, [&weight.t, &ids.to_dtype(DType::U32)?])
}

/// The CUDA entry: candle's `index_select` forward, `index_add` backward.
#[cfg(feature = "cuda")]
mod cuda {
    use crate::nn::cuda::{add_grad, attach};
    use crate::nn::custom_op::CResult;
    use crate::nn::Weight;
    use candle_core::{DType, Tensor};

    /// Rows of `w` by id; a trainable table gets the scattered gradient, none
    /// for the `padding_idx` row (torch's `padding_idx`).
    pub(super) fn embedding(w: &Weight, ids: &Tensor, padding_idx: Option<u32>) -> CResult<Tensor> {
        let dev = w.t.device().clone();
        let ids = ids.to_device(&dev)?.to_dtype(DType::U32)?.contiguous()?;
        let y = w.t.detach().index_select(&ids, 0)?;
        let bf16 = crate::nn::autocast_bf16() && y.dtype() == DType::F32;
        if w.grad.is_none() {
            return if bf16 { y.to_dtype(DType::BF16) } else { Ok(y) };
        }
        let wg = w.clone();
        let y = attach("afinar-cuda-embedding", &[&w.t], y, move |g| {
            let dw = Tensor::zeros(wg.t.shape(), DType::F32, &dev)?.index_add(
                &ids,
                &g.to_dtype(DType::F32)?.reshape((ids.elem_count(), ()))?,
                0,
            )?;
            let dw = match padding_idx {
                Some(p) if (p as usize) < wg.t.dim(0)? => {
                    let rows = wg.t.dim(0)?;
                    let mut keep = vec![1f32; rows];
                    keep[p as usize] = 0.0;
                    dw.broadcast_mul(&Tensor::from_vec(keep, (rows, 1), &dev)?)?
                }
                _ => dw,
            };
            add_grad(&wg, &dw)?;
            Ok(vec![None])
        })?;
        // The cast is a graph node: its gradient comes back in f32.
        if bf16 {
            y.to_dtype(DType::BF16)
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check_grads, randn};
    use candle_core::Device;

    #[test]
    fn embedding_grads_match_finite_differences() {
        let x = randn(&[4, 6], 4);
        let ids = Tensor::new(&[1u32, 3, 0, 1], &Device::Cpu).unwrap();
        check_grads(&[x], &|w| embedding(&w[0], &ids, None).unwrap(), 2e-2);
    }

    /// The padding row is looked up (forward) but gets no gradient, as
    /// torch's `padding_idx`; the other rows looked up get theirs.
    #[test]
    fn the_padding_row_gets_no_gradient() {
        let w = crate::nn::Weight::trainable(&randn(&[4, 6], 4)).unwrap();
        let ids = Tensor::new(&[1u32, 2, 0, 2], &Device::Cpu).unwrap();
        let y = embedding(&w, &ids, Some(2)).unwrap();
        let r = randn(y.dims(), 5);
        let _ = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = w.grad_tensor().unwrap().unwrap().to_vec2::<f32>().unwrap();
        assert!(g[2].iter().all(|v| *v == 0.0), "padding row: {:?}", g[2]);
        for row in [0, 1] {
            assert!(g[row].iter().any(|v| *v != 0.0), "row {row}: {:?}", g[row]);
        }
        assert!(g[3].iter().all(|v| *v == 0.0), "row 3 is not looked up");
    }
}
