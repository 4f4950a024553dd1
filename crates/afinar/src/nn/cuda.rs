//! The CUDA path of afinar's ops (feature `cuda`). The public wrappers in
//! `ops.rs` / `llm_ops.rs` check shapes, then send a tensor that lives on a
//! CUDA device here.
//!
//! Every op is forward + hand-written backward, like on the CPU, and a frozen
//! weight never gets a gradient gemm. Row-wise and elementwise work runs in
//! afinar's own kernels (`cuda_kernels.cu`: RMSNorm, LayerNorm, RoPE, SiLU-gate,
//! GELU, dropout, the attention softmax with its causal / padding / segment
//! mask, cross-entropy over the vocabulary, AdamW); matrix products go to
//! cuBLAS through candle's matmul. Activations may be f32 or bf16 (arithmetic
//! in f32 inside the kernels); trainable weights stay f32 (master weights) and
//! are cast to the activation dtype for the product; gradients accumulate in
//! f32.
//!
//! How an op joins candle's graph: the forward is computed outside the graph
//! (on detached inputs), then [`attach`] records one node whose forward hands
//! over that result and whose backward is the op's own. Attention is cuBLAS
//! batched GEMMs around the fused masked softmax (probabilities kept for
//! backward), not a flash kernel.

use super::ops::{cerr, CResult};
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

fn sfx(dt: DType, what: &str) -> CResult<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(cerr(format!(
            "{what}: CUDA kernels take f32 or bf16, found {other:?}"
        ))),
    }
}

/// The device address of a contiguous tensor's first element.
fn ptr(t: &Tensor) -> CResult<u64> {
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
fn empty_st(n: usize, dt: DType, dev: &CudaDevice) -> CResult<CudaStorage> {
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
fn sptr(st: &CudaStorage) -> u64 {
    let stream = st.device.cuda_stream();
    match &st.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        _ => 0,
    }
}

/// A fresh (uninitialised) tensor; every kernel that fills one writes all of it.
fn empty(shape: impl Into<Shape>, dt: DType, dev: &CudaDevice) -> CResult<Tensor> {
    let shape = shape.into();
    let st = empty_st(shape.elem_count(), dt, dev)?;
    Ok(Tensor::from_storage(
        Storage::Cuda(st),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// [B, X, Y, D] -> [B, Y, X, D] (tokens-first <-> heads-first) into `out`.
fn swap12_into(x: &Tensor, dims: (usize, usize, usize, usize), out: u64) -> CResult<()> {
    let dev = cuda_dev(x)?;
    let s = sfx(x.dtype(), "swap12")?;
    let x = x.contiguous()?;
    let (b, xn, yn, d) = dims;
    if x.elem_count() != b * xn * yn * d {
        return Err(cerr(format!("swap12: {:?} is not {dims:?}", x.dims())));
    }
    launch(
        &dev,
        &format!("swap12_{s}"),
        (blocks(x.elem_count()), 1),
        256,
        &[
            A::P(ptr(&x)?),
            A::P(out),
            A::L(b as i64),
            A::I(xn as i32),
            A::I(yn as i32),
            A::I(d as i32),
        ],
    )
}

fn swap12(x: &Tensor, dims: (usize, usize, usize, usize)) -> CResult<Tensor> {
    let (b, xn, yn, d) = dims;
    let out = empty((b, yn, xn, d), x.dtype(), &cuda_dev(x)?)?;
    swap12_into(x, dims, ptr(&out)?)?;
    Ok(out)
}

/// Kernel arguments.
#[derive(Clone, Copy)]
enum A {
    P(u64),
    I(i32),
    L(i64),
    F(f32),
    U(u64),
}

fn launch(dev: &CudaDevice, name: &str, grid: (u32, u32), block: u32, args: &[A]) -> CResult<()> {
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
fn blocks(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 8192) as u32
}

/// `t` in dtype `dt`, outside the graph.
fn cast(t: &Tensor, dt: DType) -> CResult<Tensor> {
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

fn upload<T: candle_core::WithDType + Send + Sync>(
    v: &Arc<Vec<T>>,
    dev: &CudaDevice,
) -> CResult<Tensor> {
    upload_with(v, dev, |v| {
        Tensor::from_slice(v.as_slice(), v.len(), &Device::Cuda(dev.clone()))
    })
}

fn upload_with<T: Send + Sync + 'static>(
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
fn add_grad(w: &Weight, g: &Tensor) -> CResult<()> {
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

struct Timer {
    key: (&'static str, &'static str),
    dev: CudaDevice,
    t0: std::time::Instant,
}

impl Timer {
    fn start(name: &'static str, phase: &'static str, dev: &CudaDevice) -> Option<Timer> {
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
fn attach_storage(
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
fn attach(
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

// ------------------------------------------------------------------ linear

/// `x @ w^T + b` with cuBLAS; dW only for a trainable weight.
pub fn linear(x: &Tensor, w: &Weight, b: Option<&Weight>) -> CResult<Tensor> {
    let _t = Timer::start("afinar-cuda-linear", "forward", &cuda_dev(x)?);
    let dt = x.dtype();
    let (out_f, in_f) = w.t.dims2()?;
    let n = x.elem_count() / in_f.max(1);
    let x2 = x.detach().reshape((n, in_f))?;
    let wc = cast(&w.t, dt)?;
    let mut y = x2.matmul(&wc.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(&cast(&b.t, dt)?)?;
    }
    let mut shape = x.dims().to_vec();
    *shape
        .last_mut()
        .ok_or_else(|| cerr("linear: scalar input"))? = out_f;
    let y = y.reshape(shape)?;
    let want_dx = x.track_op();
    let xshape = x.shape().clone();
    let (w, b) = (w.clone(), b.cloned());
    let mut args = vec![x, &w.t];
    let bt = b.as_ref().map(|b| b.t.clone());
    if let Some(bt) = &bt {
        args.push(bt);
    }
    let (wg, bg) = (w.clone(), b.clone());
    attach("afinar-cuda-linear", &args, y, move |g| {
        let g2 = g.reshape((n, out_f))?;
        if wg.grad.is_some() {
            add_grad(&wg, &g2.t()?.matmul(&x2)?)?;
        }
        if let Some(bw) = &bg {
            if bw.grad.is_some() {
                add_grad(bw, &g2.to_dtype(DType::F32)?.sum(0)?)?;
            }
        }
        let dx = if want_dx {
            Some(g2.matmul(&wc)?.reshape(xshape.clone())?)
        } else {
            None
        };
        Ok(vec![dx])
    })
}

/// A LoRA-wrapped frozen linear as one graph node:
/// y = x W^T + b + s * (drop(x) A^T) B^T. Backward: dB = s g^T h,
/// dA = (s g B)^T drop(x), dx = g W + drop(s g B A) (h = drop(x) A^T). One
/// node instead of five (two linears, the scale, the sum) saves candle's
/// per-node gradient bookkeeping; the products are the same.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    x: &Tensor,
    w: &Weight,
    bias: Option<&Weight>,
    a: &Weight,
    bw: &Weight,
    scale: f64,
    dropout: Option<(f32, u64)>,
) -> CResult<Tensor> {
    let dev = cuda_dev(x)?;
    let _t = Timer::start("afinar-cuda-lora-linear", "forward", &dev);
    let dt = x.dtype();
    let (out_f, in_f) = w.t.dims2()?;
    let n = x.elem_count() / in_f.max(1);
    let x2 = x.detach().reshape((n, in_f))?.contiguous()?;
    let xd2 = match dropout {
        Some((p, seed)) => dropout_apply(&x2, p, seed)?,
        None => x2.clone(),
    };
    let (wc, ac, bc) = (cast(&w.t, dt)?, cast(&a.t, dt)?, cast(&bw.t, dt)?);
    let h = xd2.matmul(&ac.t()?)?; // [n, r]
    let mut y = x2.matmul(&wc.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&cast(&b.t, dt)?)?;
    }
    let y = (y + h.matmul(&bc.t()?)?.affine(scale, 0.0)?)?;
    let mut shape = x.dims().to_vec();
    *shape
        .last_mut()
        .ok_or_else(|| cerr("lora_linear: scalar input"))? = out_f;
    let y = y.reshape(shape)?;
    let want_dx = x.track_op();
    let xshape = x.shape().clone();
    let (ag, bg) = (a.clone(), bw.clone());
    attach("afinar-cuda-lora-linear", &[x, &a.t, &bw.t], y, move |g| {
        let g2 = g.reshape((n, out_f))?;
        let gs = g2.affine(scale, 0.0)?;
        if bg.grad.is_some() {
            add_grad(&bg, &gs.t()?.matmul(&h)?)?;
        }
        let gh = gs.matmul(&bc)?; // [n, r]
        if ag.grad.is_some() {
            add_grad(&ag, &gh.t()?.matmul(&xd2)?)?;
        }
        if !want_dx {
            return Ok(vec![None]);
        }
        let dl = gh.matmul(&ac)?;
        let dl = match dropout {
            Some((p, seed)) => dropout_apply(&dl, p, seed)?,
            None => dl,
        };
        Ok(vec![Some((g2.matmul(&wc)? + dl)?.reshape(xshape.clone())?)])
    })
}

// ------------------------------------------------------------------ norms

pub fn rms_norm(x: &Tensor, w: &Weight, eps: f32) -> CResult<Tensor> {
    let dev = cuda_dev(x)?;
    let _t = Timer::start("afinar-cuda-rms-norm", "forward", &dev);
    let x = x.contiguous()?;
    let dt = x.dtype();
    let s = sfx(dt, "rms_norm")?;
    let d = *x
        .dims()
        .last()
        .ok_or_else(|| cerr("rms_norm: scalar input"))?;
    let rows = x.elem_count() / d;
    let wc = cast(&w.t, dt)?;
    let y = empty_st(x.elem_count(), dt, &dev)?;
    let rstd = empty(rows, DType::F32, &dev)?;
    let xd = x.detach();
    launch(
        &dev,
        &format!("rms_fwd_{s}"),
        (rows as u32, 1),
        256,
        &[
            A::P(ptr(&xd)?),
            A::P(ptr(&wc)?),
            A::P(sptr(&y)),
            A::P(ptr(&rstd)?),
            A::I(d as i32),
            A::F(eps),
        ],
    )?;
    let want_dx = x.track_op();
    let wg = w.clone();
    let shape = x.shape().clone();
    attach_storage("afinar-cuda-rms-norm", &[&x, &w.t], y, shape, move |g| {
        let g = g.contiguous()?;
        if wg.grad.is_some() {
            // dw = sum over rows of dy * x * rstd
            let xh = xd
                .to_dtype(DType::F32)?
                .reshape((rows, d))?
                .broadcast_mul(&rstd.reshape((rows, 1))?)?;
            let dw = (g.to_dtype(DType::F32)?.reshape((rows, d))? * xh)?.sum(0)?;
            add_grad(&wg, &dw)?;
        }
        if !want_dx {
            return Ok(vec![None]);
        }
        let dx = empty(xd.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("rms_bwd_{s}"),
            (rows as u32, 1),
            256,
            &[
                A::P(ptr(&xd)?),
                A::P(ptr(&wc)?),
                A::P(ptr(&g)?),
                A::P(ptr(&rstd)?),
                A::P(ptr(&dx)?),
                A::I(d as i32),
            ],
        )?;
        Ok(vec![Some(dx)])
    })
}

pub fn layer_norm(x: &Tensor, w: &Weight, b: &Weight, eps: f32) -> CResult<Tensor> {
    let dev = cuda_dev(x)?;
    let _t = Timer::start("afinar-cuda-layer-norm", "forward", &dev);
    let x = x.contiguous()?;
    let dt = x.dtype();
    let s = sfx(dt, "layer_norm")?;
    let d = *x
        .dims()
        .last()
        .ok_or_else(|| cerr("layer_norm: scalar input"))?;
    let rows = x.elem_count() / d;
    let (wc, bc) = (cast(&w.t, dt)?, cast(&b.t, dt)?);
    let y = empty(x.shape(), dt, &dev)?;
    let mean = empty(rows, DType::F32, &dev)?;
    let rstd = empty(rows, DType::F32, &dev)?;
    let xd = x.detach();
    launch(
        &dev,
        &format!("ln_fwd_{s}"),
        (rows as u32, 1),
        256,
        &[
            A::P(ptr(&xd)?),
            A::P(ptr(&wc)?),
            A::P(ptr(&bc)?),
            A::P(ptr(&y)?),
            A::P(ptr(&mean)?),
            A::P(ptr(&rstd)?),
            A::I(d as i32),
            A::F(eps),
        ],
    )?;
    let want_dx = x.track_op();
    let (wg, bg) = (w.clone(), b.clone());
    attach("afinar-cuda-layer-norm", &[&x, &w.t, &b.t], y, move |g| {
        let g = g.contiguous()?;
        if wg.grad.is_some() || bg.grad.is_some() {
            let g32 = g.to_dtype(DType::F32)?.reshape((rows, d))?;
            if bg.grad.is_some() {
                add_grad(&bg, &g32.sum(0)?)?;
            }
            if wg.grad.is_some() {
                let xh = xd
                    .to_dtype(DType::F32)?
                    .reshape((rows, d))?
                    .broadcast_sub(&mean.reshape((rows, 1))?)?
                    .broadcast_mul(&rstd.reshape((rows, 1))?)?;
                add_grad(&wg, &(g32 * xh)?.sum(0)?)?;
            }
        }
        if !want_dx {
            return Ok(vec![None]);
        }
        let dx = empty(xd.shape(), dt, &dev)?;
        launch(
            &dev,
            &format!("ln_bwd_{s}"),
            (rows as u32, 1),
            256,
            &[
                A::P(ptr(&xd)?),
                A::P(ptr(&wc)?),
                A::P(ptr(&g)?),
                A::P(ptr(&mean)?),
                A::P(ptr(&rstd)?),
                A::P(ptr(&dx)?),
                A::I(d as i32),
            ],
        )?;
        Ok(vec![Some(dx)])
    })
}

// ------------------------------------------------------------------ RoPE

fn rope_apply(
    x: &Tensor,
    tables: &(Tensor, Tensor),
    pos: &Tensor,
    heads: usize,
    hd: usize,
    sgn: f32,
) -> CResult<Tensor> {
    let dev = cuda_dev(x)?;
    let dt = x.dtype();
    let s = sfx(dt, "rope")?;
    let x = x.contiguous()?;
    let rows = x.elem_count() / (heads * hd);
    let y = empty(x.shape(), dt, &dev)?;
    launch(
        &dev,
        &format!("rope_{s}"),
        (blocks(rows * heads * hd / 2), 1),
        256,
        &[
            A::P(ptr(&x)?),
            A::P(ptr(&y)?),
            A::P(ptr(&tables.0)?),
            A::P(ptr(&tables.1)?),
            A::P(ptr(pos)?),
            A::L(rows as i64),
            A::I(heads as i32),
            A::I(hd as i32),
            A::F(sgn),
        ],
    )?;
    Ok(y)
}

pub fn rope(
    x: &Tensor,
    table: &Arc<super::RopeTable>,
    positions: &Arc<Vec<u32>>,
    heads: usize,
) -> CResult<Tensor> {
    let dev = cuda_dev(x)?;
    let _t = Timer::start("afinar-cuda-rope", "forward", &dev);
    let hd = table.head_dim();
    // cos then sin, uploaded once per table.
    let both = upload_with(table, &dev, |t| {
        let (c, sn) = t.tables();
        let v: Vec<f32> = c.iter().chain(sn).copied().collect();
        Tensor::from_vec(v, 2 * c.len(), &Device::Cuda(dev.clone()))
    })?;
    let half = both.elem_count() / 2;
    let (cos, sin) = (both.narrow(0, 0, half)?, both.narrow(0, half, half)?);
    let tables = (cos, sin);
    let pos = upload(positions, &dev)?;
    let xd = x.detach();
    let y = rope_apply(&xd, &tables, &pos, heads, hd, 1.0)?;
    attach("afinar-cuda-rope", &[x], y, move |g| {
        Ok(vec![Some(rope_apply(g, &tables, &pos, heads, hd, -1.0)?)])
    })
}

// ------------------------------------------------------------------ activations

pub fn silu_mul(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
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
pub fn gelu(x: &Tensor, kind: i32) -> CResult<Tensor> {
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

/// The CPU's counter-based mask (same seed: same dropped elements).
fn dropout_apply(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
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

pub fn dropout(x: &Tensor, p: f32, seed: u64) -> CResult<Tensor> {
    let _t = Timer::start("afinar-cuda-dropout", "forward", &cuda_dev(x)?);
    let y = dropout_apply(&x.detach(), p, seed)?;
    attach("afinar-cuda-dropout", &[x], y, move |g| {
        Ok(vec![Some(dropout_apply(g, p, seed)?)])
    })
}

// ------------------------------------------------------------------ attention

/// What an attention call needs besides q, k, v.
pub struct AttnArgs<'a> {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub causal: bool,
    pub key_mask: &'a Arc<Vec<f32>>,
    pub segments: Option<&'a Arc<Vec<u32>>>,
    pub dropout: Option<(f32, u64)>,
}

/// Multi-head attention, q `[B, T, H*D]`, k/v `[B, T, KV*D]`. The G = H / KV
/// query heads of a kv head are stacked as rows, so K and V are never copied
/// per query head: S = Q_g K^T `[B, KV, G*T, T]` (cuBLAS), P = masked
/// softmax(S / sqrt(D)) (one kernel), O = P V (cuBLAS). Backward: dP = dO V^T,
/// dV = P^T dO and dK = dS^T Q_g (the sum over a group's query heads happens
/// inside the GEMM), dS = the softmax backward (one kernel), dQ = dS K.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, a: AttnArgs) -> CResult<Tensor> {
    let dev = cuda_dev(q)?;
    let _t = Timer::start("afinar-cuda-attention", "forward", &dev);
    let dt = q.dtype();
    let s = sfx(dt, "attention")?;
    let AttnArgs {
        b,
        t,
        heads,
        kv_heads,
        d,
        causal,
        ..
    } = a;
    let g = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // [B, T, H, D] -> [B, H, T, D] = [B, KV, G*T, D]
    let qg = swap12(&q.detach(), (b, t, heads, d))?.reshape((b, kv_heads, g * t, d))?;
    let heads_first = |x: &Tensor| swap12(&x.detach(), (b, t, kv_heads, d));
    let (kh, vh) = (heads_first(k)?, heads_first(v)?); // [B, KV, T, D]
    let scores = qg.matmul(&kh.t()?)?; // [B, KV, G*T, T]
    let km = upload(a.key_mask, &dev)?;
    let seg = a.segments.map(|s| upload(s, &dev)).transpose()?;
    let p = empty(scores.shape(), dt, &dev)?;
    launch(
        &dev,
        &format!("attn_softmax_{s}"),
        ((g * t).div_ceil(4) as u32, (b * kv_heads) as u32),
        128,
        &[
            A::P(ptr(&scores)?),
            A::P(ptr(&p)?),
            A::P(ptr(&km)?),
            A::P(match &seg {
                Some(s) => ptr(s)?,
                None => 0,
            }),
            A::I(kv_heads as i32),
            A::I(t as i32),
            A::I((g * t) as i32),
            A::F(scale),
            A::I(causal as i32),
        ],
    )?;
    drop(scores);
    let dropout = a.dropout;
    // The CPU's dropout index of probability (h, i, j) is (h*T + i)*T + j:
    // the flat index of this layout too.
    let pd = match dropout {
        Some((pr, seed)) => dropout_apply(&p, pr, seed)?,
        None => p.clone(),
    };
    let o = pd.matmul(&vh)?; // [B, KV, G*T, D] = [B, H, T, D]
    let out = empty_st(b * t * heads * d, dt, &dev)?;
    swap12_into(&o, (b, heads, t, d), sptr(&out))?;
    drop(o);
    let shape = Shape::from((b, t, heads * d));
    attach_storage("afinar-cuda-attention", &[q, k, v], out, shape, move |go| {
        let go = swap12(go, (b, t, heads, d))?.reshape((b, kv_heads, g * t, d))?;
        let dpd = go.matmul(&vh.t()?)?; // [B, KV, G*T, T]
        let dvh = pd.t()?.matmul(&go)?; // [B, KV, T, D]
        let dp = match dropout {
            Some((pr, seed)) => dropout_apply(&dpd, pr, seed)?,
            None => dpd,
        };
        let ds = empty(dp.shape(), dt, &dev)?;
        let rows = b * heads * t;
        launch(
            &dev,
            &format!("softmax_bwd_{s}"),
            (rows.div_ceil(4) as u32, 1),
            128,
            &[
                A::P(ptr(&p)?),
                A::P(ptr(&dp)?),
                A::P(ptr(&ds)?),
                A::L(rows as i64),
                A::I(t as i32),
                A::F(scale),
            ],
        )?;
        let dqg = ds.matmul(&kh)?; // [B, KV, G*T, D]
        let dkh = ds.t()?.matmul(&qg)?; // [B, KV, T, D]
        let tokens_first = |x: Tensor, n: usize| -> CResult<Tensor> {
            swap12(&x, (b, n, t, d))?.reshape((b, t, n * d))
        };
        Ok(vec![
            Some(tokens_first(dqg, heads)?),
            Some(tokens_first(dkh, kv_heads)?),
            Some(tokens_first(dvh, kv_heads)?),
        ])
    })
}

// ------------------------------------------------------------------ embedding

/// Rows of `w` by id; a trainable table gets the scattered gradient, none
/// for the `padding_idx` row (torch's `padding_idx`).
pub fn embedding(w: &Weight, ids: &Tensor, padding_idx: Option<u32>) -> CResult<Tensor> {
    let dev = w.t.device().clone();
    let ids = ids.to_device(&dev)?.to_dtype(DType::U32)?.contiguous()?;
    let y = w.t.detach().index_select(&ids, 0)?;
    let bf16 = super::autocast_bf16() && y.dtype() == DType::F32;
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

// ------------------------------------------------------------------ LM cross-entropy

/// Mean cross-entropy of the LM head over the `valid` rows of `h` `[N, C]`,
/// in chunks of rows whose logits take at most 256 MiB; backward recomputes
/// each chunk's logits (never all `[N, V]` at once).
pub fn lm_cross_entropy(
    h: &Tensor,
    w: &Weight,
    targets: &Arc<Vec<i64>>,
    valid: &[usize],
) -> CResult<Tensor> {
    let dev = cuda_dev(h)?;
    let _t = Timer::start("afinar-cuda-lm-cross-entropy", "forward", &dev);
    let cdev = Device::Cuda(dev.clone());
    let dt = h.dtype();
    let s = sfx(dt, "lm_cross_entropy")?;
    let (n, c) = h.dims2()?;
    let (v, _) = w.t.dims2()?;
    let wc = cast(&w.t, dt)?;
    let hd = h.detach();
    let nv = valid.len();
    let chunk = ((256usize << 20) / (v * dt.size_in_bytes())).clamp(1, nv.max(1));
    let mut chunks = Vec::new();
    let mut total = Tensor::zeros((), DType::F32, &cdev)?;
    for rows in valid.chunks(chunk) {
        let m = rows.len();
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), m, &cdev)?;
        let tg = Tensor::from_vec(
            rows.iter().map(|&r| targets[r]).collect::<Vec<_>>(),
            m,
            &cdev,
        )?;
        let logits = hd.index_select(&idx, 0)?.matmul(&wc.t()?)?;
        let lse = empty(m, DType::F32, &dev)?;
        let loss = empty(m, DType::F32, &dev)?;
        launch(
            &dev,
            &format!("ce_fwd_{s}"),
            (m as u32, 1),
            1024,
            &[
                A::P(ptr(&logits)?),
                A::P(ptr(&tg)?),
                A::P(ptr(&lse)?),
                A::P(ptr(&loss)?),
                A::I(v as i32),
            ],
        )?;
        total = (total + loss.sum_all()?)?;
        chunks.push((idx, tg, lse));
    }
    let loss = if nv == 0 { total } else { (total / nv as f64)? };
    let want_h = h.track_op();
    let wg = w.clone();
    attach("afinar-cuda-lm-cross-entropy", &[h, &w.t], loss, move |g| {
        if nv == 0 || (!want_h && wg.grad.is_none()) {
            return Ok(vec![None]);
        }
        let gs = g.to_dtype(DType::F32)?.to_vec0::<f32>()? / nv as f32;
        let mut dh = want_h
            .then(|| Tensor::zeros((n, c), dt, &cdev))
            .transpose()?;
        for (idx, tg, lse) in &chunks {
            let m = idx.elem_count();
            let hc = hd.index_select(idx, 0)?;
            let dl = hc.matmul(&wc.t()?)?; // logits, then their gradient in place
            launch(
                &dev,
                &format!("ce_bwd_{s}"),
                (m as u32, 1),
                1024,
                &[
                    A::P(ptr(&dl)?),
                    A::P(ptr(lse)?),
                    A::P(ptr(tg)?),
                    A::I(v as i32),
                    A::F(gs),
                ],
            )?;
            if let Some(dh) = dh.as_mut() {
                let dhc = dl.matmul(&wc)?;
                *dh = if m == n {
                    dhc
                } else {
                    dh.index_add(idx, &dhc, 0)?
                };
            }
            if wg.grad.is_some() {
                add_grad(&wg, &dl.t()?.matmul(&hc)?)?;
            }
        }
        Ok(vec![dh])
    })
}

/// Logits `[.., V]` of hidden `[.., C]` (generation, evaluation).
pub fn lm_logits(h: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let dt = h.dtype();
    h.broadcast_matmul(&cast(w, dt)?.t()?)?.to_dtype(DType::F32)
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
