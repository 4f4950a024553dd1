//! The CUDA plumbing that every op's CUDA entry shares (feature `cuda`):
//! device pointers, fresh buffers, kernel launches from afinar's PTX
//! (`cuda_kernels.cu`, compiled by `build.rs`), host vectors uploaded once
//! per forward pass, per-op timing (`AFINAR_CUDA_PROFILE`), and joining
//! candle's graph. Each op's own launch code lives in its op file, in a
//! `cuda` module (`linear.rs`, `norm.rs`, `attention/` ...); what stays here
//! besides the plumbing is the optimizer's fused AdamW and sum of squares
//! (used by `optim`).
//!
//! Every op is forward + hand-written backward, like on the CPU, and a frozen
//! weight never gets a gradient gemm. Row-wise and elementwise work runs in
//! afinar's own kernels (RMSNorm, LayerNorm, RoPE, SiLU-gate, GELU, dropout,
//! the attention softmax with its causal / padding / segment mask,
//! cross-entropy over the vocabulary, AdamW); matrix products go to cuBLAS
//! through candle's matmul. Activations may be f32 or bf16 (arithmetic in f32
//! inside the kernels); trainable weights stay f32 (master weights) and are
//! cast to the activation dtype for the product; gradients accumulate in f32.
//!
//! How an op joins candle's graph: the forward is computed outside the graph
//! (on detached inputs), then [`attach`] records one node whose forward hands
//! over that result and whose backward is the op's own.

use super::custom_op::{cerr, CResult};
use super::Weight;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/afinar_kernels.ptx"));

// ------------------------------------------------------------------ plumbing

/// The CUDA device a tensor lives on.
pub fn cuda_dev(t: &Tensor) -> CResult<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(cerr(format!(
            "expected a CUDA tensor, found one on {other:?}"
        ))),
    }
}

pub(super) fn sfx(dt: DType, what: &str) -> CResult<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(cerr(format!(
            "{what}: CUDA kernels take f32 or bf16, found {other:?}"
        ))),
    }
}

/// The device address of a contiguous tensor's first element.
pub(super) fn ptr(t: &Tensor) -> CResult<u64> {
    let (st, l) = t.storage_and_layout();
    if !l.is_contiguous() {
        return Err(cerr("cuda op: input must be contiguous"));
    }
    let Storage::Cuda(cs) = &*st else {
        return Err(cerr(format!(
            "cuda op: tensor is on {:?}, not a CUDA device",
            t.device()
        )));
    };
    let stream = cs.device.cuda_stream();
    let (p, size) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::BF16(s) => (s.device_ptr(&stream).0, 2),
        CudaStorageSlice::U32(s) => (s.device_ptr(&stream).0, 4),
        CudaStorageSlice::I64(s) => (s.device_ptr(&stream).0, 8),
        _ => return Err(cerr(format!("cuda op: unsupported dtype {:?}", t.dtype()))),
    };
    Ok(p + (l.start_offset() * size) as u64)
}

/// A fresh (uninitialised) buffer of `n` elements; every kernel that fills
/// one writes all of it.
pub(super) fn empty_st(n: usize, dt: DType, dev: &CudaDevice) -> CResult<CudaStorage> {
    let n = n.max(1);
    // SAFETY: every caller launches a kernel that writes each element before any read.
    let slice = unsafe {
        match dt {
            DType::F32 => CudaStorageSlice::F32(dev.alloc::<f32>(n)?),
            DType::BF16 => CudaStorageSlice::BF16(dev.alloc::<half::bf16>(n)?),
            other => return Err(cerr(format!("cuda op: cannot allocate {other:?}"))),
        }
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// The device address of a buffer from [`empty_st`].
pub(super) fn sptr(st: &CudaStorage) -> u64 {
    let stream = st.device.cuda_stream();
    match &st.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        _ => 0,
    }
}

/// A fresh (uninitialised) tensor; every kernel that fills one writes all of it.
pub(super) fn empty(shape: impl Into<Shape>, dt: DType, dev: &CudaDevice) -> CResult<Tensor> {
    let shape = shape.into();
    let st = empty_st(shape.elem_count(), dt, dev)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(st),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// Kernel arguments.
#[derive(Clone, Copy)]
pub(super) enum A {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    U(u64),
}

pub(super) fn launch(
    dev: &CudaDevice,
    name: &str,
    grid: (u32, u32),
    block: u32,
    args: &[A],
) -> CResult<()> {
    let f = dev.get_or_load_custom_func(name, "afinar", PTX)?;
    let mut b = f.builder();
    for a in args {
        match a {
            A::P(v) | A::U(v) => b.arg(v),
            A::I(v) => b.arg(v),
            A::L(v) => b.arg(v),
            A::F(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: (grid.0.max(1), grid.1.max(1), 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument lists match the kernels' signatures in cuda_kernels.cu.
    unsafe { b.launch(cfg) }.map_err(|e| cerr(format!("cuda kernel {name}: {e}")))?;
    Ok(())
}

/// Blocks for a grid-stride loop over `n` elements (256 threads each).
pub(super) fn blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
}

/// `t` in dtype `dt`, outside the graph.
pub(super) fn cast(t: &Tensor, dt: DType) -> CResult<Tensor> {
    let t = t.detach();
    if t.dtype() == dt {
        t.contiguous()
    } else {
        t.to_dtype(dt)?.contiguous()
    }
}

thread_local! {
    /// Host vectors already uploaded (positions, key masks, segments, rope
    /// tables): a forward pass uses the same ones in every layer. Keyed by
    /// the Arc's address; the Arc is kept so the address stays unique.
    static UPLOADS: RefCell<Vec<(usize, Arc<dyn std::any::Any + Send + Sync>, Tensor)>> =
        const { RefCell::new(Vec::new()) };
}

pub(super) fn upload<T: candle_core::WithDType + Send + Sync>(
    v: &Arc<Vec<T>>,
    dev: &CudaDevice,
) -> CResult<Tensor> {
    upload_with(v, dev, |v| {
        Tensor::from_slice(v.as_slice(), v.len(), &Device::Cuda(dev.clone()))
    })
}

pub(super) fn upload_with<T: Send + Sync + 'static>(
    v: &Arc<T>,
    dev: &CudaDevice,
    make: impl FnOnce(&T) -> CResult<Tensor>,
) -> CResult<Tensor> {
    let key = Arc::as_ptr(v) as *const u8 as usize;
    if let Some(t) = UPLOADS.with(|u| {
        u.borrow()
            .iter()
            .find(|(k, _, t)| *k == key && t.device().same_device(&Device::Cuda(dev.clone())))
            .map(|e| e.2.clone())
    }) {
        return Ok(t);
    }
    let t = make(v)?;
    UPLOADS.with(|u| {
        let mut u = u.borrow_mut();
        if u.len() >= 32 {
            u.remove(0);
        }
        u.push((key, v.clone(), t.clone()));
    });
    Ok(t)
}

/// Add a gradient (any dtype, on the device) into a weight's buffer.
pub(super) fn add_grad(w: &Weight, g: &Tensor) -> CResult<()> {
    if let Some(buf) = &w.grad {
        buf.add_tensor(&g.reshape(w.t.shape())?)?;
    }
    Ok(())
}

// ------------------------------------------------------------------ profiling

/// With AFINAR_CUDA_PROFILE set: every op synchronizes before and after and
/// its time is summed by name ([`profile_report`]). Off: no cost.
fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("AFINAR_CUDA_PROFILE").is_some())
}

type ProfMap = std::collections::BTreeMap<(&'static str, &'static str), (f64, usize)>;
static PROF: std::sync::Mutex<ProfMap> = std::sync::Mutex::new(ProfMap::new());

pub(super) struct Timer {
    key: (&'static str, &'static str),
    dev: CudaDevice,
    t0: std::time::Instant,
}

impl Timer {
    pub(super) fn start(
        name: &'static str,
        phase: &'static str,
        dev: &CudaDevice,
    ) -> Option<Timer> {
        if !profiling() {
            return None;
        }
        let _ = Device::Cuda(dev.clone()).synchronize();
        Some(Timer {
            key: (name, phase),
            dev: dev.clone(),
            t0: std::time::Instant::now(),
        })
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let _ = Device::Cuda(self.dev.clone()).synchronize();
        let mut m = PROF.lock().unwrap();
        let e = m.entry(self.key).or_insert((0.0, 0));
        e.0 += self.t0.elapsed().as_secs_f64();
        e.1 += 1;
    }
}

/// The per-op times gathered with AFINAR_CUDA_PROFILE (and clears them).
pub fn profile_report() -> String {
    let mut m = PROF.lock().unwrap();
    let mut rows: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
    rows.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap());
    let total: f64 = rows.iter().map(|r| r.1 .0).sum();
    let mut out = format!("{:<34} {:>10} {:>8}\n", "op (synchronized)", "ms", "calls");
    for ((n, ph), (t, c)) in rows {
        out += &format!("{:<34} {:>10.2} {:>8}\n", format!("{n} {ph}"), t * 1e3, c);
    }
    out += &format!(
        "{:<34} {:>10.2}\n",
        "total in afinar's CUDA ops",
        total * 1e3
    );
    m.clear();
    out
}

/// [`super::graph::attach_storage`] with the backward timed under `name`.
pub(super) fn attach_storage(
    name: &'static str,
    args: &[&Tensor],
    st: CudaStorage,
    shape: Shape,
    bwd: impl Fn(&Tensor) -> CResult<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> CResult<Tensor> {
    let dev = st.device.clone();
    super::graph::attach_storage(name, args, st, shape, move |g| {
        let _t = Timer::start(name, "backward", &dev);
        bwd(g)
    })
}

/// [`super::graph::attach`] with the backward timed under `name`.
pub(super) fn attach(
    name: &'static str,
    args: &[&Tensor],
    y: Tensor,
    bwd: impl Fn(&Tensor) -> CResult<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> CResult<Tensor> {
    let dev = cuda_dev(&y)?;
    super::graph::attach(name, args, y, move |g| {
        let _t = Timer::start(name, "backward", &dev);
        bwd(g)
    })
}

// ------------------------------------------------------------------ optimizer

/// AdamW's hyper-parameters for one tensor (same meaning as on the CPU).
#[derive(Clone, Copy)]
pub struct AdamHyper {
    pub lr: f32,
    pub wd: f32,
    pub b1: f32,
    pub b2: f32,
    pub eps: f32,
    pub bc1: f32,
    pub bc2_sqrt: f32,
    pub grad_scale: f32,
}

/// One fused AdamW update of the f32 parameter `p` in place (m, v: f32 state).
pub fn adamw(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: AdamHyper) -> CResult<()> {
    let dev = cuda_dev(p)?;
    let _t = Timer::start("afinar-cuda-adamw", "forward", &dev);
    let n = p.elem_count();
    for (t, what) in [(p, "parameter"), (g, "gradient"), (m, "m"), (v, "v")] {
        if t.dtype() != DType::F32 || t.elem_count() != n {
            return Err(cerr(format!(
                "adamw: {what} must be f32 with {n} elements, found {:?} with {}",
                t.dtype(),
                t.elem_count()
            )));
        }
    }
    launch(
        &dev,
        "adamw_f32",
        (blocks(n), 1),
        256,
        &[
            A::P(ptr(p)?),
            A::P(ptr(g)?),
            A::P(ptr(m)?),
            A::P(ptr(v)?),
            A::L(n as i64),
            A::F(h.lr),
            A::F(h.wd),
            A::F(h.b1),
            A::F(h.b2),
            A::F(h.eps),
            A::F(h.bc1),
            A::F(h.bc2_sqrt),
            A::F(h.grad_scale),
        ],
    )
}

/// Sum of squares of each f32 tensor, read back with one copy.
pub fn sum_squares(ts: &[Tensor]) -> CResult<Vec<f32>> {
    let Some(first) = ts.first() else {
        return Ok(vec![]);
    };
    let dev = cuda_dev(first)?;
    let out = Tensor::zeros(ts.len(), DType::F32, &Device::Cuda(dev.clone()))?;
    for (i, t) in ts.iter().enumerate() {
        let t = t.contiguous()?;
        let n = t.elem_count();
        launch(
            &dev,
            "sumsq_f32",
            (blocks(n).min(1024), 1),
            256,
            &[
                A::P(ptr(&t)?),
                A::L(n as i64),
                A::P(ptr(&out)?),
                A::I(i as i32),
            ],
        )?;
    }
    out.to_vec1::<f32>()
}
