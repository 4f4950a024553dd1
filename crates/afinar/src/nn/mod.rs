//! afinar's own layers and differentiable ops: differentiable end to end on
//! the training path, with hand-written backward where candle's stock ops
//! have none or waste work (candle 0.11's fused `layer_norm`,
//! `softmax_last_dim`, `sdpa`... record no backward, and its matmul backward
//! computes the gradient of a frozen weight anyway).
//!
//! One file per op family, each holding the op's candle `CustomOp` (forward
//! and backward), its raw f32 CPU kernels (a `cpu` module, where they are
//! more than a gemm), its CUDA entry (a `cuda` module, feature `cuda`: the
//! Rust side that launches the kernels of `cuda_kernels.cu`) and its
//! finite-difference gradient tests: `linear.rs` (with the `Linear` layer
//! and `LinearAdapter`), `qlinear.rs` (a quantised frozen base), `norm.rs`
//! (with the `LayerNorm` / `RmsNorm` layers), `batch_norm.rs` (with the
//! `BatchNorm` layer, ReLU6 fused, and global average pooling), `conv.rs`
//! (2-D convolution, channels last), `activation.rs`, `attention/`,
//! `rope.rs`, `embedding.rs`, `loss.rs`, `dropout.rs` (with `DropoutRng`)
//! and `scale.rs`. What they share is in one place each: `kernels.rs` (gemm,
//! lane sums, e^x, the parallel-write pointer), `custom_op.rs` (storages as
//! slices, errors), `cuda.rs` (launches, buffers, uploads, profiling),
//! `graph.rs` (joining candle's graph, checkpointing) and, for the tests,
//! `testing.rs`.
//!
//! A [`Weight`]'s gradient is written in place into its [`GradBuf`] (never
//! returned to candle) and a frozen weight costs nothing.

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod conv;
pub mod conv_stack;
#[cfg(feature = "cuda")]
pub mod cuda;
mod custom_op;
pub mod dropout;
pub mod embedding;
pub mod graph;
pub mod kernels;
pub mod linear;
pub mod loss;
pub mod norm;
pub mod qlinear;
pub mod rope;
pub mod scale;
#[cfg(test)]
pub(crate) mod testing;

pub use activation::{gelu, gelu_dense, gelu_tanh, relu6, silu_mul, swiglu_down_residual};
pub use attention::{attention, attention_with_cache, causal_attention, CacheShape};
pub use batch_norm::{batch_norm, global_avg_pool, BatchNorm, RunningStats};
pub use conv::{conv2d, Conv2dCfg};
pub use dropout::{dropout, DropoutRng};
pub use embedding::embedding;
pub use graph::{checkpoint, LayerFn};
pub use linear::{linear, lora_linear, maybe_dropout, Base, Linear, LinearAdapter};
pub use loss::{cross_entropy, lm_cross_entropy, lm_logits, lm_token_nll};
pub use norm::{layer_norm, rms_norm, LayerNorm, RmsNorm};
pub use rope::{rope, RopeTable};
pub use scale::scale_last;

use std::sync::atomic::{AtomicBool, Ordering};

static AUTOCAST_BF16: AtomicBool = AtomicBool::new(false);

/// bf16 compute on a GPU (torch.autocast's role): embedding lookups hand bf16
/// activations to the rest of the model; f32 trainable weights are cast to
/// bf16 inside each product and their gradients come back in f32.
/// [`crate::params::ParamStore::to_device`] turns it on for a bf16 base.
pub fn set_autocast_bf16(on: bool) {
    AUTOCAST_BF16.store(on, Ordering::Relaxed);
}

pub fn autocast_bf16() -> bool {
    AUTOCAST_BF16.load(Ordering::Relaxed)
}

use candle_core::Tensor;
use std::sync::{Arc, Mutex};

/// The gradient of one trainable parameter, accumulated in place by the
/// backward of afinar's ops. candle's autograd would allocate a fresh
/// gradient per use, then a zero tensor and a sum to accumulate it (three
/// passes over every weight, every step); here the first write of a step
/// overwrites (gemm with beta = 0) and later ones add — micro-batch
/// accumulation is free. The optimizer reads it and marks it fresh again.
#[derive(Debug, Default)]
pub struct GradBuf {
    state: Mutex<GradState>,
}

#[derive(Debug, Default)]
struct GradState {
    data: Vec<f32>,
    written: bool,
    /// The gradient of a parameter that lives on a GPU (f32, on its device).
    dev: Option<Tensor>,
}

impl GradBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write into the buffer of `n` elements: `f(buf, overwrite)` must
    /// overwrite every element it touches when `overwrite`, else add. An
    /// `f` that only touches some elements asks for a zeroed buffer.
    pub fn accumulate(&self, n: usize, zero_first: bool, f: impl FnOnce(&mut [f32], bool)) {
        let mut s = self.state.lock().unwrap();
        if s.data.len() != n {
            s.data = vec![0.0; n];
        } else if !s.written && zero_first {
            s.data.fill(0.0);
        }
        let overwrite = !s.written && !zero_first;
        f(&mut s.data, overwrite);
        s.written = true;
    }

    /// Add the product `alpha a @ b` (this buffer's `[a.rows, b.cols]`) into
    /// the buffer: on the first write of a step the gemm writes it (beta =
    /// 0), no zeroing pass first.
    pub(crate) fn add_product(
        &self,
        a: kernels::Mat,
        b: kernels::Mat,
        alpha: f32,
        par: gemm::Parallelism,
    ) {
        let (rows, cols) = (a.rows, b.cols);
        self.accumulate(rows * cols, false, |d, overwrite| {
            kernels::matmul(d, cols, a, b, alpha, !overwrite, par)
        })
    }

    /// Add `src` (same length) into the buffer.
    pub fn add(&self, src: &[f32]) {
        self.accumulate(src.len(), false, |d, overwrite| {
            if overwrite {
                d.copy_from_slice(src);
            } else {
                for (a, b) in d.iter_mut().zip(src) {
                    *a += b;
                }
            }
        })
    }

    /// Add a gradient tensor: on the CPU through [`add`](Self::add); on a GPU
    /// it stays there (cast to f32, summed with what this step already holds).
    pub fn add_tensor(&self, g: &Tensor) -> candle_core::Result<()> {
        let g = g.detach().to_dtype(candle_core::DType::F32)?;
        if g.device().is_cpu() {
            self.add(&g.flatten_all()?.to_vec1::<f32>()?);
            return Ok(());
        }
        let mut s = self.state.lock().unwrap();
        let sum = match (&s.dev, s.written) {
            (Some(d), true) => (d + &g)?,
            _ => g,
        };
        s.dev = Some(sum);
        s.written = true;
        Ok(())
    }

    /// The gradient held on a GPU, if one was written since the last `clear`.
    pub fn device_grad(&self) -> Option<Tensor> {
        let s = self.state.lock().unwrap();
        if s.written {
            s.dev.clone()
        } else {
            None
        }
    }

    /// The gradient, if anything was written since the last `clear`.
    pub fn read<R>(&self, f: impl FnOnce(Option<&[f32]>) -> R) -> R {
        let s = self.state.lock().unwrap();
        f(if s.written { Some(&s.data) } else { None })
    }

    /// Mutable access to a written gradient (for in-place optimizer use).
    pub fn with_written_mut<R>(&self, f: impl FnOnce(Option<&mut [f32]>) -> R) -> R {
        let mut s = self.state.lock().unwrap();
        let w = s.written;
        f(if w { Some(&mut s.data) } else { None })
    }

    /// Start a new accumulation (after the optimizer step).
    pub fn clear(&self) {
        let mut s = self.state.lock().unwrap();
        s.written = false;
        s.dev = None;
    }
}

/// A parameter as the ops see it: its value, and where its gradient goes
/// when it trains (`grad = None`: frozen, no gradient is ever computed).
#[derive(Clone, Debug)]
pub struct Weight {
    pub t: Tensor,
    pub grad: Option<Arc<GradBuf>>,
}

impl Weight {
    /// A frozen parameter.
    pub fn frozen(t: Tensor) -> Self {
        Weight { t, grad: None }
    }

    /// A trainable parameter: a candle `Var` (so the graph is recorded
    /// through it) with a gradient buffer.
    pub fn trainable(t: &Tensor) -> candle_core::Result<Self> {
        let var = candle_core::Var::from_tensor(t)?;
        Ok(Weight {
            t: var.as_tensor().clone(),
            grad: Some(Arc::new(GradBuf::new())),
        })
    }

    pub fn is_trainable(&self) -> bool {
        self.grad.is_some()
    }

    /// The accumulated gradient as a tensor (None if none was written).
    pub fn grad_tensor(&self) -> candle_core::Result<Option<Tensor>> {
        match &self.grad {
            None => Ok(None),
            Some(g) if !self.t.device().is_cpu() => Ok(g.device_grad()),
            Some(g) => g.read(|d| {
                d.map(|d| Tensor::from_slice(d, self.t.shape(), &candle_core::Device::Cpu))
                    .transpose()
            }),
        }
    }
}
