//! Differentiable fused ops for decoder-only language models, as candle
//! custom ops with hand-written backward (the kernels are in
//! `llm_kernels.rs`): RMSNorm, rotary embeddings, SwiGLU, tanh-GELU, causal
//! grouped-query attention with padding and packed-sequence segments, and
//! the LM head fused with cross-entropy (no `[N, V]` logits kept).
//!
//! Semantics follow Hugging Face transformers: `models/llama/modeling_llama.py`
//! (`LlamaRMSNorm`, `LlamaRotaryEmbedding` + `apply_rotary_pos_emb`,
//! `LlamaMLP`, `eager_attention_forward` with `repeat_kv`) and
//! `models/gpt2/modeling_gpt2.py` (`gelu_new`, tied `lm_head`), with the loss
//! of `loss_utils.ForCausalLMLoss` minus the shift: targets here are already
//! aligned with their rows (the caller shifts labels by one).
//!
//! As in `ops.rs`: a `Weight`'s gradient is written in place into its
//! `GradBuf` (never returned to candle) and a frozen weight costs nothing.

pub use super::llm_kernels::RopeTable;
use super::llm_kernels::{self as lk, CausalShape, Visibility};
use super::ops::with_f32;
use super::ops::{cerr, f32s, tensor, CResult};
use super::Weight;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use std::sync::Arc;

fn last_dim(dims: &[usize], what: &str) -> CResult<usize> {
    dims.last()
        .copied()
        .ok_or_else(|| cerr(format!("{what}: scalar input")))
}

// ------------------------------------------------------------------ RMSNorm

struct RmsNormOp {
    eps: f32,
    w: Weight,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "afinar-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, "rms_norm input")?;
        let w = f32s(s2, l2, "rms_norm weight")?;
        let d = w.len();
        if last_dim(l1.dims(), "rms_norm")? != d {
            return Err(cerr(format!(
                "rms_norm: input {:?} but weight [{d}]",
                l1.dims()
            )));
        }
        let mut y = vec![0f32; x.len()];
        lk::rms_norm_fwd(x, w, self.eps, d, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let want_dx = x.track_op();
        let want_w = self.w.grad.is_some();
        if !want_dx && !want_w {
            return Ok((None, None));
        }
        with_f32(x, "rms_norm input", |xv| {
            with_f32(w, "rms_norm weight", |wv| {
                with_f32(grad, "rms_norm grad", |dy| {
                    let mut dx = want_dx.then(|| vec![0f32; xv.len()]);
                    let dw = lk::rms_norm_bwd(xv, wv, dy, self.eps, d, dx.as_deref_mut(), want_w);
                    if let Some(buf) = &self.w.grad {
                        buf.add(&dw);
                    }
                    Ok((dx.map(|v| tensor(v, x.shape())).transpose()?, None))
                })
            })
        })
    }
}

/// `LlamaRMSNorm` over the last dimension: `x / sqrt(mean(x^2) + eps) * w`,
/// x `[.., C]`, weight `[C]`. A trainable weight accumulates its gradient
/// (summed over rows) into its buffer.
pub fn rms_norm(x: &Tensor, weight: &Weight, eps: f64) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::rms_norm(x, weight, eps as f32);
    }
    x.contiguous()?.apply_op2_arc(
        &weight.t.contiguous()?,
        Arc::new(Box::new(RmsNormOp {
            eps: eps as f32,
            w: weight.clone(),
        })),
    )
}

// ------------------------------------------------------------------ RoPE

struct RopeOp {
    table: Arc<RopeTable>,
    positions: Arc<Vec<u32>>,
    heads: usize,
}

impl RopeOp {
    fn check(&self, dims: &[usize]) -> CResult<()> {
        let d = self.table.head_dim();
        let [b, t, c] = dims else {
            return Err(cerr(format!(
                "rope: x must be [B, T, heads * D], found {dims:?}"
            )));
        };
        if *c != self.heads * d {
            return Err(cerr(format!(
                "rope: width {c} is not {} heads x head_dim {d}",
                self.heads
            )));
        }
        if self.positions.len() != b * t {
            return Err(cerr(format!(
                "rope: {} positions for [B={b}, T={t}]",
                self.positions.len()
            )));
        }
        if let Some(p) = lk::rope_check_positions(&self.table, &self.positions) {
            return Err(cerr(format!(
                "rope: position {p} >= max_pos {} of the rope table",
                self.table.max_pos()
            )));
        }
        Ok(())
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "afinar-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        self.check(l.dims())?;
        let x = f32s(s, l, "rope input")?;
        let mut y = vec![0f32; x.len()];
        lk::rope_apply(x, &self.table, &self.positions, self.heads, false, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        // A rotation's transpose is its inverse: rotate the gradient back.
        with_f32(grad, "rope grad", |g| {
            let mut dx = vec![0f32; g.len()];
            lk::rope_apply(g, &self.table, &self.positions, self.heads, true, &mut dx);
            Ok(Some(tensor(dx, x.shape())?))
        })
    }
}

/// Rotary position embedding in transformers' `rotate_half` layout, applied
/// to every head of x `[B, T, heads * D]` (D = the table's head_dim);
/// `positions[b * T + t]` is the position id of each token (packing restarts
/// them per example). A position >= the table's `max_pos` is an error.
pub fn rope(
    x: &Tensor,
    table: &Arc<RopeTable>,
    positions: &Arc<Vec<u32>>,
    heads: usize,
) -> CResult<Tensor> {
    let op = RopeOp {
        table: table.clone(),
        positions: positions.clone(),
        heads,
    };
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        op.check(x.dims())?;
        return super::cuda::rope(x, table, positions, heads);
    }
    x.contiguous()?.apply_op1_arc(Arc::new(Box::new(op)))
}

// ------------------------------------------------------------------ SwiGLU

struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "afinar-silu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            return Err(cerr(format!(
                "silu_mul: gate {:?} and up {:?} differ",
                l1.dims(),
                l2.dims()
            )));
        }
        let (g, u) = (f32s(s1, l1, "silu_mul gate")?, f32s(s2, l2, "silu_mul up")?);
        let mut y = vec![0f32; g.len()];
        lk::silu_mul_fwd(g, u, &mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (want_g, want_u) = (gate.track_op(), up.track_op());
        with_f32(gate, "silu_mul gate", |gv| {
            with_f32(up, "silu_mul up", |uv| {
                with_f32(grad, "silu_mul grad", |dy| {
                    let mut dg = want_g.then(|| vec![0f32; gv.len()]);
                    let mut du = want_u.then(|| vec![0f32; gv.len()]);
                    lk::silu_mul_bwd(gv, uv, dy, dg.as_deref_mut(), du.as_deref_mut());
                    Ok((
                        dg.map(|v| tensor(v, gate.shape())).transpose()?,
                        du.map(|v| tensor(v, up.shape())).transpose()?,
                    ))
                })
            })
        })
    }
}

/// SwiGLU's `silu(gate) * up` (Llama's MLP before `down_proj`); same shapes.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() {
        return super::cuda::silu_mul(gate, up);
    }
    gate.contiguous()?
        .apply_op2_arc(&up.contiguous()?, Arc::new(Box::new(SiluMulOp)))
}

// ------------------------------------------------------------------ GELU (tanh)

struct GeluTanhOp;

impl CustomOp1 for GeluTanhOp {
    fn name(&self) -> &'static str {
        "afinar-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = f32s(s, l, "gelu_tanh")?;
        let mut y = vec![0f32; x.len()];
        lk::gelu_tanh_fwd(x, &mut y);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        with_f32(x, "gelu_tanh input", |xv| {
            with_f32(grad, "gelu_tanh grad", |g| {
                let mut dx = vec![0f32; xv.len()];
                lk::gelu_tanh_bwd(xv, g, &mut dx);
                Ok(Some(tensor(dx, x.shape())?))
            })
        })
    }
}

/// GPT-2's `gelu_new` (= `gelu_pytorch_tanh`):
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: &Tensor) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return super::cuda::gelu(x, 0);
    }
    x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(GeluTanhOp)))
}

// ------------------------------------------------------------------ causal attention

struct CausalAttentionOp {
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
    dropout: Option<(f32, u64)>,
}

impl CausalAttentionOp {
    fn shape(&self, q: &[usize], k: &[usize], v: &[usize]) -> CResult<CausalShape> {
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let [b, t, c] = q else {
            return Err(cerr(format!(
                "causal_attention: q must be [B, T, heads * D], found {q:?}"
            )));
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(cerr(format!(
                "causal_attention: {heads} query heads are not a multiple of {kv_heads} kv heads"
            )));
        }
        if c % heads != 0 {
            return Err(cerr(format!(
                "causal_attention: q width {c} is not divisible by {heads} heads"
            )));
        }
        let d = c / heads;
        let kv = [*b, *t, kv_heads * d];
        if k != kv || v != kv {
            return Err(cerr(format!(
                "causal_attention: q {q:?} with {heads} heads (D={d}) needs k and v {kv:?} for {kv_heads} kv heads, found k {k:?}, v {v:?}"
            )));
        }
        if self.key_mask.len() != b * t {
            return Err(cerr(format!(
                "causal_attention: key_mask has {} entries for [B={b}, T={t}]",
                self.key_mask.len()
            )));
        }
        if let Some(s) = &self.segments {
            if s.len() != b * t {
                return Err(cerr(format!(
                    "causal_attention: segments has {} entries for [B={b}, T={t}]",
                    s.len()
                )));
            }
        }
        Ok(CausalShape {
            b: *b,
            t: *t,
            heads,
            kv_heads,
            d,
        })
    }
    fn vis(&self) -> Visibility<'_> {
        Visibility {
            key_mask: &self.key_mask,
            segments: self.segments.as_ref().map(|s| s.as_slice()),
        }
    }
}

impl CustomOp3 for CausalAttentionOp {
    fn name(&self) -> &'static str {
        "afinar-causal-attention"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let sh = self.shape(l1.dims(), l2.dims(), l3.dims())?;
        let (q, k, v) = (f32s(s1, l1, "q")?, f32s(s2, l2, "k")?, f32s(s3, l3, "v")?);
        let mut out = vec![0f32; q.len()];
        let scale = 1.0 / (sh.d as f32).sqrt();
        lk::causal_attention_fwd(q, k, v, self.vis(), sh, scale, self.dropout, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sh = self.shape(q.dims(), k.dims(), v.dims())?;
        let scale = 1.0 / (sh.d as f32).sqrt();
        with_f32(q, "q", |qv| {
            with_f32(k, "k", |kv| {
                with_f32(v, "v", |vv| {
                    with_f32(grad, "causal_attention grad", |g| {
                        let n = qv.len();
                        let mut dq = vec![0f32; n];
                        // Per query head, summed into kv heads below.
                        let mut dkh = vec![0f32; n];
                        let mut dvh = vec![0f32; n];
                        lk::causal_attention_bwd(
                            qv,
                            kv,
                            vv,
                            self.vis(),
                            sh,
                            scale,
                            self.dropout,
                            g,
                            &mut dq,
                            &mut dkh,
                            &mut dvh,
                        );
                        let (dk, dv) = if sh.kv_heads == sh.heads {
                            (dkh, dvh)
                        } else {
                            let mut dk = vec![0f32; kv.len()];
                            let mut dv = vec![0f32; kv.len()];
                            lk::reduce_kv_heads(&dkh, sh, &mut dk);
                            lk::reduce_kv_heads(&dvh, sh, &mut dv);
                            (dk, dv)
                        };
                        Ok((
                            Some(tensor(dq, q.shape())?),
                            Some(tensor(dk, k.shape())?),
                            Some(tensor(dv, v.shape())?),
                        ))
                    })
                })
            })
        })
    }
}

/// Causal grouped-query attention, scale 1/sqrt(D): q `[B, T, heads * D]`,
/// k and v `[B, T, kv_heads * D]` (query head h reads kv head
/// `h / (heads / kv_heads)`). Query i sees key j iff j <= i,
/// `key_mask[b * T + j] != 0` and, with `segments` (packed examples), the two
/// tokens' segment ids are equal. A query with no visible key outputs 0.
/// Returns `[B, T, heads * D]`; the backward recomputes the probabilities.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
) -> CResult<Tensor> {
    causal_attention_dropout(q, k, v, heads, kv_heads, key_mask, segments, None)
}

/// [`causal_attention`] with dropout on the attention probabilities
/// (`Some((p, seed))`, GPT-2's `attn_pdrop`; the mask is regenerated from
/// the seed in backward, never stored). `None` or `p = 0` is no dropout.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    key_mask: Arc<Vec<f32>>,
    segments: Option<Arc<Vec<u32>>>,
    dropout: Option<(f32, u64)>,
) -> CResult<Tensor> {
    if let Some((p, _)) = dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(cerr(format!(
                "attention dropout probability {p} must be in [0, 1)"
            )));
        }
    }
    let dropout = dropout.filter(|(p, _)| *p > 0.0);
    let op = CausalAttentionOp {
        heads,
        kv_heads,
        key_mask,
        segments,
        dropout,
    };
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let sh = op.shape(q.dims(), k.dims(), v.dims())?;
        let args = super::cuda::AttnArgs {
            b: sh.b,
            t: sh.t,
            heads,
            kv_heads,
            d: sh.d,
            causal: true,
            key_mask: &op.key_mask,
            segments: op.segments.as_ref(),
            dropout,
        };
        return super::cuda::attention(q, k, v, args);
    }
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

// ------------------------------------------------------------------ LM head + cross-entropy

struct LmCrossEntropyOp {
    w: Weight,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
}

impl LmCrossEntropyOp {
    fn dims(&self, h: &[usize], w: &[usize]) -> CResult<(usize, usize, usize)> {
        let ([n, c], [v, cw]) = (h, w) else {
            return Err(cerr(format!(
                "lm_cross_entropy: hidden must be [N, C] and weight [V, C], found {h:?} and {w:?}"
            )));
        };
        if c != cw {
            return Err(cerr(format!(
                "lm_cross_entropy: hidden {h:?} but weight {w:?} (widths differ)"
            )));
        }
        if self.targets.len() != *n {
            return Err(cerr(format!(
                "lm_cross_entropy: {n} rows of hidden, {} targets",
                self.targets.len()
            )));
        }
        Ok((*n, *c, *v))
    }
}

impl CustomOp2 for LmCrossEntropyOp {
    fn name(&self) -> &'static str {
        "afinar-lm-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (_, c, v) = self.dims(l1.dims(), l2.dims())?;
        let h = f32s(s1, l1, "lm_cross_entropy hidden")?;
        let w = f32s(s2, l2, "lm_cross_entropy weight")?;
        let valid = lk::lm_valid_rows(&self.targets, v).map_err(cerr)?;
        let loss = if valid.is_empty() {
            0.0
        } else {
            lk::lm_ce_fwd(h, w, &self.targets, &valid, c, v, self.chunk_rows) / valid.len() as f64
        };
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }
    fn bwd(
        &self,
        hidden: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (_, c, v) = self.dims(hidden.dims(), w.dims())?;
        let want_h = hidden.track_op();
        if !want_h && self.w.grad.is_none() {
            return Ok((None, None));
        }
        let valid = lk::lm_valid_rows(&self.targets, v).map_err(cerr)?;
        let g = grad.to_dtype(candle_core::DType::F32)?.to_vec0::<f32>()?;
        let g = if valid.is_empty() {
            0.0
        } else {
            g / valid.len() as f32
        };
        with_f32(hidden, "lm_cross_entropy hidden", |hv| {
            with_f32(w, "lm_cross_entropy weight", |wv| {
                let mut dh = want_h.then(|| vec![0f32; hv.len()]);
                let targets = &self.targets[..];
                match &self.w.grad {
                    // zero_first: with no valid row nothing is written, and
                    // the gradient is zero rather than stale.
                    Some(buf) => buf.accumulate(v * c, valid.is_empty(), |dw, overwrite| {
                        lk::lm_ce_bwd(
                            hv,
                            wv,
                            targets,
                            &valid,
                            c,
                            v,
                            self.chunk_rows,
                            g,
                            dh.as_deref_mut(),
                            Some((dw, overwrite)),
                        )
                    }),
                    None => lk::lm_ce_bwd(
                        hv,
                        wv,
                        targets,
                        &valid,
                        c,
                        v,
                        self.chunk_rows,
                        g,
                        dh.as_deref_mut(),
                        None,
                    ),
                }
                Ok((dh.map(|d| tensor(d, hidden.shape())).transpose()?, None))
            })
        })
    }
}

/// The LM head and the loss fused: mean over rows with `targets[i] != -100`
/// of `-log_softmax(hidden[i] @ weight^T)[targets[i]]`, hidden `[N, C]`,
/// weight `[V, C]` (the tied embedding or `lm_head`), a scalar (0 when every
/// target is ignored, with zero gradients). Targets are aligned with rows:
/// shift labels before calling. Logits exist only `chunk_rows` (non-ignored)
/// rows at a time, in forward and again in backward; a trainable weight's
/// gradient accumulates into its buffer.
pub fn lm_cross_entropy(
    hidden: &Tensor,
    weight: &Weight,
    targets: Arc<Vec<i64>>,
    chunk_rows: usize,
) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        let op = LmCrossEntropyOp {
            w: weight.clone(),
            targets: targets.clone(),
            chunk_rows,
        };
        let (_, _, v) = op.dims(hidden.dims(), weight.t.dims())?;
        let valid = lk::lm_valid_rows(&targets, v).map_err(cerr)?;
        return super::cuda::lm_cross_entropy(hidden, weight, &targets, &valid);
    }
    hidden.contiguous()?.apply_op2_arc(
        &weight.t.contiguous()?,
        Arc::new(Box::new(LmCrossEntropyOp {
            w: weight.clone(),
            targets,
            chunk_rows: chunk_rows.max(1),
        })),
    )
}

/// Plain logits `hidden @ weight^T`: hidden `[.., C]`, weight `[V, C]` ->
/// `[.., V]`. Inference only: the result records no gradient.
pub fn lm_logits(hidden: &Tensor, weight: &Tensor) -> CResult<Tensor> {
    let (v, c) = weight.dims2()?;
    let hc = last_dim(hidden.dims(), "lm_logits")?;
    if hc != c {
        return Err(cerr(format!(
            "lm_logits: hidden {:?} but weight [{v}, {c}]",
            hidden.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda() {
        return super::cuda::lm_logits(hidden, weight);
    }
    let out = with_f32(hidden, "lm_logits hidden", |h| {
        with_f32(weight, "lm_logits weight", |w| {
            let n = h.len() / c;
            let mut out = vec![0f32; n * v];
            super::kernels::matmul(
                &mut out,
                v,
                super::kernels::Mat::rm(h, n, c),
                super::kernels::Mat::rm(w, v, c).t(),
                1.0,
                false,
                super::kernels::parallelism(),
            );
            Ok(out)
        })
    })?;
    let mut shape = hidden.dims().to_vec();
    *shape.last_mut().unwrap() = v;
    tensor(out, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::kernels;
    use candle_core::{DType, Device, Var};

    fn rand_vec(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (kernels::uniform(seed, i as u64) - 0.5) * 2.0 * amp)
            .collect()
    }

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec(rand_vec(n, seed, 1.0), shape, &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        flat(t).into_iter().map(|v| v as f64).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    type Reference<'a> = &'a dyn Fn(&[Vec<f64>]) -> Vec<f64>;

    /// The op's forward against an f64 reference, then the op's hand backward
    /// of `sum(out * r)` against central differences of the f64 reference
    /// (h = 1e-6, so the differences are exact to ~1e-9 and the tolerance
    /// measures the f32 backward alone). Arguments reach `op` as trainable
    /// [`Weight`]s: tensor arguments use `.t` (gradient through candle),
    /// weight arguments accumulate into their buffers. `stride` samples the
    /// checked elements of big arguments.
    fn check(
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
        let loss =
            |a: &[Vec<f64>]| -> f64 { reference(a).iter().zip(&rv).map(|(o, r)| o * r).sum() };
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

    // ---------------------------------------------------------- f64 references

    fn rms_norm_ref(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
        let d = w.len();
        let mut y = vec![0.0; x.len()];
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for j in 0..d {
                yr[j] = xr[j] * r * w[j];
            }
        }
        y
    }

    fn rope_ref(x: &[f64], pos: &[u32], heads: usize, d: usize, theta: f64) -> Vec<f64> {
        let half = d / 2;
        let mut y = vec![0.0; x.len()];
        for (row, &p) in pos.iter().enumerate() {
            for h in 0..heads {
                let o = row * heads * d + h * d;
                for i in 0..half {
                    let a = p as f64 * theta.powf(-2.0 * i as f64 / d as f64);
                    let (x1, x2) = (x[o + i], x[o + i + half]);
                    y[o + i] = x1 * a.cos() - x2 * a.sin();
                    y[o + i + half] = x2 * a.cos() + x1 * a.sin();
                }
            }
        }
        y
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

    struct AttnCase {
        b: usize,
        t: usize,
        heads: usize,
        kv: usize,
        d: usize,
        mask: Vec<f32>,
        segments: Option<Vec<u32>>,
        dropout: Option<(f32, u64)>,
    }

    /// Naive causal GQA attention in f64, straight from the definition.
    fn attention_ref(c: &AttnCase, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
        let (b, t, heads, kv, d) = (c.b, c.t, c.heads, c.kv, c.d);
        let group = heads / kv;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0.0; b * t * heads * d];
        for bi in 0..b {
            for h in 0..heads {
                let kh = h / group;
                for i in 0..t {
                    let qo = (bi * t + i) * heads * d + h * d;
                    let visible = |j: usize| {
                        j <= i
                            && c.mask[bi * t + j] != 0.0
                            && c.segments
                                .as_ref()
                                .is_none_or(|s| s[bi * t + j] == s[bi * t + i])
                    };
                    let scores: Vec<Option<f64>> = (0..t)
                        .map(|j| {
                            visible(j).then(|| {
                                let ko = (bi * t + j) * kv * d + kh * d;
                                (0..d).map(|e| q[qo + e] * k[ko + e]).sum::<f64>() * scale
                            })
                        })
                        .collect();
                    let max = scores
                        .iter()
                        .flatten()
                        .cloned()
                        .fold(f64::NEG_INFINITY, f64::max);
                    if max == f64::NEG_INFINITY {
                        continue;
                    }
                    let z: f64 = scores.iter().flatten().map(|s| (s - max).exp()).sum();
                    for (j, s) in scores.iter().enumerate() {
                        let Some(s) = s else { continue };
                        let mut p = (s - max).exp() / z;
                        if let Some((pr, seed)) = c.dropout {
                            let idx = (((bi * heads + h) * t + i) * t + j) as u64;
                            p = if kernels::uniform(seed, idx) >= pr {
                                p / (1.0 - pr as f64)
                            } else {
                                0.0
                            };
                        }
                        let vo = (bi * t + j) * kv * d + kh * d;
                        for e in 0..d {
                            out[qo + e] += p * v[vo + e];
                        }
                    }
                }
            }
        }
        out
    }

    fn lm_ce_ref(h: &[f64], w: &[f64], targets: &[i64], c: usize) -> f64 {
        let v = w.len() / c;
        let (mut total, mut n) = (0.0, 0usize);
        for (row, &y) in h.chunks(c).zip(targets) {
            if y == -100 {
                continue;
            }
            let logits: Vec<f64> = (0..v)
                .map(|o| (0..c).map(|e| row[e] * w[o * c + e]).sum())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            total += lse - logits[y as usize];
            n += 1;
        }
        if n == 0 {
            0.0
        } else {
            total / n as f64
        }
    }

    // ---------------------------------------------------------- RMSNorm

    #[test]
    fn llm_rms_norm_matches_reference_and_grads() {
        let x = (randn(&[2, 3, 8], 1) * 3.0).unwrap();
        let w = (randn(&[8], 2) + 1.0).unwrap();
        let eps = 1e-6;
        check(
            &[x, w],
            &|a| rms_norm(&a[0].t, &a[1], eps).unwrap(),
            &|a| rms_norm_ref(&a[0], &a[1], eps),
            1,
        );
        // A row wider than one 8-lane block plus a remainder.
        let x = randn(&[3, 21], 3);
        let w = (randn(&[21], 4) + 1.0).unwrap();
        check(
            &[x, w],
            &|a| rms_norm(&a[0].t, &a[1], 1e-5).unwrap(),
            &|a| rms_norm_ref(&a[0], &a[1], 1e-5),
            1,
        );
    }

    #[test]
    fn llm_rms_norm_weight_grad_accumulates_and_frozen_has_none() {
        let x = Var::from_tensor(&randn(&[4, 8], 5)).unwrap();
        let w0 = (randn(&[8], 6) + 1.0).unwrap();
        // Frozen: x gets a gradient, the weight none (no buffer, nothing in candle's map).
        let frozen = Weight::frozen(w0.clone());
        let y = rms_norm(x.as_tensor(), &frozen, 1e-6).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&frozen.t).is_none());
        assert!(frozen.grad_tensor().unwrap().is_none());
        // Trainable: two backward passes add up in the buffer.
        let w = Weight::trainable(&w0).unwrap();
        let run = || {
            let y = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
            let grads = (y * randn(&[4, 8], 7))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                grads.get(&w.t).is_none(),
                "dw goes to the buffer, not to candle"
            );
            flat(&w.grad_tensor().unwrap().unwrap())
        };
        let once = run();
        let twice = run();
        let doubled: Vec<f32> = once.iter().map(|v| 2.0 * v).collect();
        assert!(max_abs_diff(&twice, &doubled) < 1e-5);
        // Only the weight trains (x is a constant): same dw, no dx work.
        w.grad.as_ref().unwrap().clear();
        let y = rms_norm(&x.as_tensor().detach(), &w, 1e-6).unwrap();
        let _ = (y * randn(&[4, 8], 7))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(&flat(&w.grad_tensor().unwrap().unwrap()), &once) < 1e-6);
        // A weight of the wrong width is an error naming both shapes.
        let bad = Weight::frozen(randn(&[7], 1));
        let e = rms_norm(x.as_tensor(), &bad, 1e-6).unwrap_err().to_string();
        assert!(e.contains("[4, 8]") && e.contains("[7]"), "{e}");
    }

    // ---------------------------------------------------------- RoPE

    #[test]
    fn llm_rope_matches_reference_and_grads() {
        let (b, t, d, theta) = (2, 5, 8, 10_000.0);
        let table = Arc::new(RopeTable::new(d, theta, 16));
        let pos = Arc::new(vec![7u32, 0, 3, 3, 15, 1, 2, 9, 4, 0]);
        for heads in [4, 2] {
            let x = randn(&[b, t, heads * d], 10 + heads as u64);
            let (tb, p) = (table.clone(), pos.clone());
            check(
                &[x],
                &move |a| rope(&a[0].t, &tb, &p, heads).unwrap(),
                &|a| rope_ref(&a[0], &pos, heads, d, theta),
                1,
            );
        }
        // Another theta (Llama 3's 500000) and head_dim.
        let table = Arc::new(RopeTable::new(16, 500_000.0, 64));
        let pos = Arc::new((0..6u32).map(|i| i * 11).collect::<Vec<_>>());
        let x = randn(&[1, 6, 3 * 16], 12);
        let (tb, p) = (table.clone(), pos.clone());
        check(
            &[x],
            &move |a| rope(&a[0].t, &tb, &p, 3).unwrap(),
            &|a| rope_ref(&a[0], &pos, 3, 16, 500_000.0),
            1,
        );
    }

    #[test]
    fn llm_rope_inverse_norm_relative_position_and_errors() {
        let (d, heads) = (8, 2);
        let table = RopeTable::new(d, 10_000.0, 32);
        let x = rand_vec(3 * heads * d, 20, 1.0);
        let pos = [5u32, 17, 31];
        let mut y = vec![0f32; x.len()];
        let mut back = vec![0f32; x.len()];
        lk::rope_apply(&x, &table, &pos, heads, false, &mut y);
        lk::rope_apply(&y, &table, &pos, heads, true, &mut back);
        assert!(max_abs_diff(&x, &back) < 1e-6, "inverse rotation");
        for (xh, yh) in x.chunks(d).zip(y.chunks(d)) {
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(xh) - n(yh)).abs() < 1e-5, "rotation keeps the norm");
        }
        // <rope(q, m), rope(k, n)> depends on m - n only.
        let (q, k) = (rand_vec(d, 21, 1.0), rand_vec(d, 22, 1.0));
        let score = |m: u32, n: u32| {
            let (mut a, mut b) = (vec![0f32; d], vec![0f32; d]);
            lk::rope_apply(&q, &table, &[m], 1, false, &mut a);
            lk::rope_apply(&k, &table, &[n], 1, false, &mut b);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(9, 4) - score(25, 20)).abs() < 1e-5);
        assert!((score(3, 3) - q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()).abs() < 1e-5);
        // The tables are theta^(-2i/D) angles.
        let (cos, sin) = table.row(3);
        let a = 3.0 * 10_000f64.powf(-2.0 / 8.0);
        assert!((cos[1] as f64 - a.cos()).abs() < 1e-7 && (sin[1] as f64 - a.sin()).abs() < 1e-7);
        // A position past the table names both.
        let t = Arc::new(table);
        let xs = randn(&[1, 2, heads * d], 23);
        let e = rope(&xs, &t, &Arc::new(vec![3, 32]), heads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 32") && e.contains("max_pos 32"), "{e}");
        let e = rope(&xs, &t, &Arc::new(vec![3]), heads)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 positions"), "{e}");
    }

    #[test]
    fn llm_rope_llama3_scaling_bands() {
        // Llama 3.1: factor 8, low 1, high 4, original context 8192.
        let (d, theta) = (128, 500_000.0);
        let plain = RopeTable::new(d, theta, 2);
        let scaled = RopeTable::llama3(d, theta, 2, 8.0, 1.0, 4.0, 8192);
        let angle = |t: &RopeTable, i: usize| {
            let (c, s) = t.row(1);
            (s[i] as f64).atan2(c[i] as f64)
        };
        // Short wavelengths (high frequencies) are kept ...
        assert!((angle(&plain, 0) - angle(&scaled, 0)).abs() < 1e-6);
        // ... long ones (wavelength > 8192) are slowed down by the factor.
        let last = d / 2 - 1;
        assert!((angle(&plain, last) / 8.0 - angle(&scaled, last)).abs() < 1e-9);
        // In between: bounded by both.
        for i in 0..d / 2 {
            let (p, s) = (angle(&plain, i), angle(&scaled, i));
            assert!(s <= p + 1e-7 && s >= p / 8.0 - 1e-9, "band {i}: {s} vs {p}");
        }
    }

    // ---------------------------------------------------------- SwiGLU, tanh-GELU

    #[test]
    fn llm_silu_mul_and_gelu_tanh_grads() {
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

    // ---------------------------------------------------------- causal attention

    fn attention_case_check(c: AttnCase, stride: usize) {
        let q = randn(&[c.b, c.t, c.heads * c.d], 40);
        let k = randn(&[c.b, c.t, c.kv * c.d], 41);
        let v = randn(&[c.b, c.t, c.kv * c.d], 42);
        let mask = Arc::new(c.mask.clone());
        let seg = c.segments.clone().map(Arc::new);
        let (heads, kv, dropout) = (c.heads, c.kv, c.dropout);
        check(
            &[q, k, v],
            &move |a| {
                causal_attention_dropout(
                    &a[0].t,
                    &a[1].t,
                    &a[2].t,
                    heads,
                    kv,
                    mask.clone(),
                    seg.clone(),
                    dropout,
                )
                .unwrap()
            },
            &|a| attention_ref(&c, &a[0], &a[1], &a[2]),
            stride,
        );
    }

    #[test]
    fn llm_causal_attention_grads_gqa_mask_segments_dropout() {
        let (b, t, d) = (2, 5, 8);
        // Batch 0: its first key is padding (query 0 sees nothing: output 0);
        // batch 1: right padding.
        let mut mask = vec![1f32; b * t];
        mask[0] = 0.0;
        mask[t + 3] = 0.0;
        mask[t + 4] = 0.0;
        let segments = vec![0u32, 0, 1, 1, 1, 0, 0, 0, 1, 1];
        let ones = vec![1f32; b * t];
        // Plain multi-head.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 4,
                d,
                mask: ones.clone(),
                segments: None,
                dropout: None,
            },
            1,
        );
        // GQA with padding.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 2,
                d,
                mask: mask.clone(),
                segments: None,
                dropout: None,
            },
            1,
        );
        // Multi-query with padding and packed segments.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 1,
                d,
                mask: mask.clone(),
                segments: Some(segments.clone()),
                dropout: None,
            },
            1,
        );
        // Attention dropout (GPT-2), GQA, segments.
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 4,
                kv: 2,
                d,
                mask,
                segments: Some(segments),
                dropout: Some((0.3, 17)),
            },
            1,
        );
    }

    #[test]
    fn llm_causal_attention_grads_across_row_blocks() {
        // T over the 64-row block size: several blocks, keys shared across them.
        let (b, t) = (1, 70);
        let mut mask = vec![1f32; b * t];
        mask[66] = 0.0;
        let segments: Vec<u32> = (0..t as u32).map(|i| u32::from(i >= 40)).collect();
        attention_case_check(
            AttnCase {
                b,
                t,
                heads: 2,
                kv: 1,
                d: 4,
                mask,
                segments: Some(segments),
                dropout: Some((0.1, 3)),
            },
            13,
        );
    }

    #[test]
    fn llm_causal_attention_packed_row_equals_separate_examples() {
        // One packed row of two examples (3 and 4 tokens), rope positions
        // restarting at the second, versus each example run alone.
        let (heads, kv, d) = (4, 2, 8);
        let lens = [3usize, 4];
        let t: usize = lens.iter().sum();
        let table = Arc::new(RopeTable::new(d, 10_000.0, 16));
        let q = randn(&[1, t, heads * d], 50);
        let k = randn(&[1, t, kv * d], 51);
        let v = randn(&[1, t, kv * d], 52);
        let packed_pos = Arc::new(vec![0u32, 1, 2, 0, 1, 2, 3]);
        let segments = Arc::new(vec![0u32, 0, 0, 1, 1, 1, 1]);
        let packed = causal_attention(
            &rope(&q, &table, &packed_pos, heads).unwrap(),
            &rope(&k, &table, &packed_pos, kv).unwrap(),
            &v,
            heads,
            kv,
            Arc::new(vec![1.0; t]),
            Some(segments),
        )
        .unwrap();
        let mut start = 0;
        for len in lens {
            let pos = Arc::new((0..len as u32).collect::<Vec<_>>());
            let part = |x: &Tensor| x.narrow(1, start, len).unwrap();
            let alone = causal_attention(
                &rope(&part(&q), &table, &pos, heads).unwrap(),
                &rope(&part(&k), &table, &pos, kv).unwrap(),
                &part(&v),
                heads,
                kv,
                Arc::new(vec![1.0; len]),
                None,
            )
            .unwrap();
            let diff = max_abs_diff(&flat(&part(&packed)), &flat(&alone));
            assert!(diff < 1e-6, "example at {start}: diff {diff}");
            start += len;
        }
    }

    #[test]
    fn llm_causal_attention_shape_errors() {
        let q = randn(&[1, 3, 8], 1);
        let kv = randn(&[1, 3, 4], 2);
        let m = Arc::new(vec![1f32; 3]);
        let e = causal_attention(&q, &kv, &kv, 3, 2, m.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("3 query heads") && e.contains("2 kv heads"),
            "{e}"
        );
        let e = causal_attention(&q, &kv, &kv, 4, 1, m.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 3, 2]") && e.contains("[1, 3, 4]"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, Arc::new(vec![1.0; 2]), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key_mask has 2"), "{e}");
        let e = causal_attention(&q, &kv, &kv, 4, 2, m, Some(Arc::new(vec![0; 4])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("segments has 4"), "{e}");
    }

    #[test]
    fn llm_attention_with_cache_equals_causal_attention_last_rows() {
        let (b, t, heads, kv, d) = (2, 6, 4, 2, 8);
        let q = randn(&[b, t, heads * d], 60);
        let k = randn(&[b, t, kv * d], 61);
        let v = randn(&[b, t, kv * d], 62);
        let mut mask = vec![1f32; b * t];
        // Batch 1 left-padded by two tokens (batched generation).
        mask[t] = 0.0;
        mask[t + 1] = 0.0;
        let (kf, vf) = (flat(&k), flat(&v));
        for (key_mask, masked) in [(vec![1f32; b * t], false), (mask, true)] {
            let full =
                causal_attention(&q, &k, &v, heads, kv, Arc::new(key_mask.clone()), None).unwrap();
            for t_new in [1, 2, t] {
                let qn = flat(&q.narrow(1, t - t_new, t_new).unwrap());
                let mut out = vec![0f32; qn.len()];
                if masked {
                    lk::attention_with_cache_masked(
                        &qn,
                        &kf,
                        &vf,
                        Some(&key_mask),
                        b,
                        t_new,
                        t,
                        heads,
                        kv,
                        d,
                        &mut out,
                    );
                } else {
                    lk::attention_with_cache(&qn, &kf, &vf, b, t_new, t, heads, kv, d, &mut out);
                }
                let want = flat(&full.narrow(1, t - t_new, t_new).unwrap());
                let diff = max_abs_diff(&out, &want);
                assert!(diff < 1e-6, "t_new {t_new}, masked {masked}: diff {diff}");
            }
        }
    }

    // ---------------------------------------------------------- LM head + cross-entropy

    /// The unfused loss with candle's own ops (autograd included): logits,
    /// log-softmax, the target's entry, mean over non-ignored rows.
    fn unfused_lm_loss(h: &Tensor, w: &Tensor, targets: &[i64]) -> Tensor {
        let logits = h.matmul(&w.t().unwrap()).unwrap(); // [N, V]
        let max = logits.max_keepdim(1).unwrap().detach();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let lse = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        let logp = shifted.broadcast_sub(&lse).unwrap();
        let v = w.dim(0).unwrap();
        let mut onehot = vec![0f32; targets.len() * v];
        for (i, &y) in targets.iter().enumerate() {
            if y != -100 {
                onehot[i * v + y as usize] = 1.0;
            }
        }
        let n_valid = targets.iter().filter(|&&y| y != -100).count().max(1);
        let onehot = Tensor::from_vec(onehot, (targets.len(), v), &Device::Cpu).unwrap();
        ((logp * onehot).unwrap().sum_all().unwrap() * (-1.0 / n_valid as f64)).unwrap()
    }

    #[test]
    fn llm_lm_cross_entropy_equals_unfused_loss_and_grads() {
        let (n, c, v) = (7, 6, 11);
        let h0 = (randn(&[n, c], 70) * 2.0).unwrap();
        let w0 = randn(&[v, c], 71);
        let targets = vec![3i64, -100, 0, 10, -100, 5, 5];
        // Reference: candle autograd through the unfused ops.
        let (hv, wv) = (
            Var::from_tensor(&h0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let want = unfused_lm_loss(hv.as_tensor(), wv.as_tensor(), &targets);
        let grads = want.backward().unwrap();
        let (want_dh, want_dw) = (
            flat(grads.get(hv.as_tensor()).unwrap()),
            flat(grads.get(wv.as_tensor()).unwrap()),
        );
        let want = want.to_vec0::<f32>().unwrap();
        // chunk_rows: one row, not dividing the 5 valid rows, exactly, more than N.
        for chunk in [1, 2, 3, 5, 100] {
            let h = Var::from_tensor(&h0).unwrap();
            let w = Weight::trainable(&w0).unwrap();
            let loss =
                lm_cross_entropy(h.as_tensor(), &w, Arc::new(targets.clone()), chunk).unwrap();
            let got = loss.to_vec0::<f32>().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "chunk {chunk}: loss {got} vs {want}"
            );
            let grads = loss.backward().unwrap();
            let dh = flat(grads.get(h.as_tensor()).unwrap());
            let dw = flat(&w.grad_tensor().unwrap().unwrap());
            assert!(max_abs_diff(&dh, &want_dh) < 1e-6, "chunk {chunk}: dhidden");
            assert!(max_abs_diff(&dw, &want_dw) < 1e-6, "chunk {chunk}: dweight");
            // Ignored rows get exactly zero gradient.
            assert!(dh[c..2 * c]
                .iter()
                .chain(&dh[4 * c..5 * c])
                .all(|x| *x == 0.0));
        }
        // And against finite differences of an f64 reference.
        let t = Arc::new(targets.clone());
        let tr = targets.clone();
        check(
            &[h0, w0],
            &move |a| {
                lm_cross_entropy(&a[0].t, &a[1], t.clone(), 3)
                    .unwrap()
                    .reshape(1)
                    .unwrap()
            },
            &|a| vec![lm_ce_ref(&a[0], &a[1], &tr, c)],
            1,
        );
    }

    #[test]
    fn llm_lm_cross_entropy_ignored_frozen_accumulating_and_errors() {
        let (n, c, v) = (4, 5, 9);
        let h0 = randn(&[n, c], 80);
        let w0 = randn(&[v, c], 81);
        // Every target ignored: loss 0, zero gradients (written, not stale).
        let h = Var::from_tensor(&h0).unwrap();
        let w = Weight::trainable(&w0).unwrap();
        w.grad.as_ref().unwrap().add(&vec![5.0; v * c]);
        w.grad.as_ref().unwrap().clear();
        let loss = lm_cross_entropy(h.as_tensor(), &w, Arc::new(vec![-100; n]), 2).unwrap();
        assert_eq!(loss.to_vec0::<f32>().unwrap(), 0.0);
        let grads = loss.backward().unwrap();
        assert!(flat(grads.get(h.as_tensor()).unwrap())
            .iter()
            .all(|x| *x == 0.0));
        assert!(flat(&w.grad_tensor().unwrap().unwrap())
            .iter()
            .all(|x| *x == 0.0));
        // Frozen weight: dhidden only, no buffer.
        let targets = Arc::new(vec![1i64, 8, -100, 0]);
        let frozen = Weight::frozen(w0.clone());
        let loss = lm_cross_entropy(h.as_tensor(), &frozen, targets.clone(), 3).unwrap();
        let grads = loss.backward().unwrap();
        let dh_frozen = flat(grads.get(h.as_tensor()).unwrap());
        assert!(grads.get(&frozen.t).is_none() && frozen.grad.is_none());
        // Trainable weight, constant hidden: dW only; twice accumulates.
        let w = Weight::trainable(&w0).unwrap();
        let run = || {
            let loss = lm_cross_entropy(&h0, &w, targets.clone(), 3).unwrap();
            let _ = loss.backward().unwrap();
            flat(&w.grad_tensor().unwrap().unwrap())
        };
        let once = run();
        let twice = run();
        let doubled: Vec<f32> = once.iter().map(|x| 2.0 * x).collect();
        assert!(max_abs_diff(&twice, &doubled) < 1e-6);
        // The frozen case's dhidden equals the unfused one.
        let hv = Var::from_tensor(&h0).unwrap();
        let want = unfused_lm_loss(hv.as_tensor(), &w0, &targets);
        let want_dh = flat(want.backward().unwrap().get(hv.as_tensor()).unwrap());
        assert!(max_abs_diff(&dh_frozen, &want_dh) < 1e-6);
        // Errors: a target outside the vocabulary, a length mismatch.
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0, 9, 0, 0]), 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("target 9") && e.contains("vocabulary of 9"),
            "{e}"
        );
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0, -1, 0, 0]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target -1"), "{e}");
        let e = lm_cross_entropy(&h0, &frozen, Arc::new(vec![0; 3]), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 rows") && e.contains("3 targets"), "{e}");
    }

    #[test]
    fn llm_lm_logits_matches_matmul() {
        let h = randn(&[2, 3, 5], 90);
        let w = randn(&[7, 5], 91);
        let got = lm_logits(&h, &w).unwrap();
        assert_eq!(got.dims(), &[2, 3, 7]);
        let want = h.reshape((6, 5)).unwrap().matmul(&w.t().unwrap()).unwrap();
        assert!(max_abs_diff(&flat(&got), &flat(&want)) < 1e-6);
        assert_eq!(got.dtype(), DType::F32);
    }
}
