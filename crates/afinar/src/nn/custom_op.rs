//! What every op's candle `CustomOp` shares: the error and result types, the
//! contiguous f32 / u32 slice behind a CPU storage, and a fresh CPU tensor
//! for a gradient. candle 0.11 hands a custom op its inputs as storages and
//! layouts; these turn them into the slices the kernels take.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Shape, Storage, Tensor};

pub(crate) type CResult<T> = candle_core::Result<T>;

pub(crate) fn cerr(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// The contiguous f32 slice behind a custom op's input.
pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        other => {
            return Err(cerr(format!(
                "{what}: expected f32, found {:?}",
                other.dtype()
            )))
        }
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(cerr(format!("{what}: input must be contiguous"))),
    }
}

/// The contiguous u32 slice behind a custom op's index input.
pub(crate) fn u32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        return Err(cerr(format!("{what}: expected u32, found {:?}", s.dtype())));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| cerr(format!("{what}: input must be contiguous")))?;
    Ok(&v[a..b])
}

/// Run `f` on the f32 data of a tensor (made contiguous first if needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> CResult<R>,
) -> CResult<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => f(f32s(s, l, what)?),
        _ => Err(cerr(format!("{what}: only the CPU backend has this op"))),
    }
}

pub(crate) fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> CResult<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `x.track_op()`: does this tensor need a gradient at all?
pub(crate) fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// The last dimension of an op's input (an error for a scalar).
pub(crate) fn last_dim(dims: &[usize], what: &str) -> CResult<usize> {
    dims.last()
        .copied()
        .ok_or_else(|| cerr(format!("{what}: scalar input")))
}
