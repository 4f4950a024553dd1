//! What every op's candle `CustomOp` shares: the error and result types,
//! [`Op`] (candle's `CustomOp1` / `CustomOp2` / `CustomOp3` written once for
//! every arity), the contiguous f32 / u32 slice behind a CPU storage, and a
//! fresh CPU tensor for a gradient. candle 0.11 hands a custom op its inputs
//! as storages and layouts; these turn them into the slices the kernels take.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Device, Layout, Shape, Storage, Tensor,
};
use std::sync::Arc;

pub(crate) type CResult<T> = candle_core::Result<T>;

/// What an op's CPU forward returns: the result's storage and shape.
pub(crate) type Fwd = CResult<(CpuStorage, Shape)>;

/// What an op's backward returns: one gradient per input (None where the
/// input needs none, or where its gradient went into a weight's buffer).
pub(crate) type Grads<const N: usize> = CResult<[Option<Tensor>; N]>;

pub(crate) fn cerr(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// An op of `N` tensor inputs, with a CPU forward and a hand-written
/// backward. candle's `CustomOp1`, `CustomOp2` and `CustomOp3` differ only
/// in how many (storage, layout) and tensor arguments their methods list;
/// an op implements this once instead, with its inputs as arrays, and
/// [`apply`] runs it as a node of candle's graph.
pub(crate) trait Op<const N: usize>: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// The result of the inputs `xs` on the CPU.
    fn cpu_fwd(&self, xs: [Input; N]) -> Fwd;

    /// The result on a CUDA device. afinar's CUDA ops compute outside the
    /// graph and join it through [`graph`](super::graph)'s node, the one op
    /// that has this; any other is an error, as candle's default.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _xs: [CudaInput; N]) -> CResult<(candle_core::CudaStorage, Shape)> {
        Err(candle_core::Error::Cuda(
            format!("no cuda implementation for {}", self.name()).into(),
        ))
    }

    /// The gradients of the inputs `xs`, given the result `res` and its
    /// gradient `grad`.
    fn bwd(&self, xs: [&Tensor; N], res: &Tensor, grad: &Tensor) -> Grads<N>;
}

/// One input of a CPU forward: candle's storage and its layout.
#[derive(Clone, Copy)]
pub(crate) struct Input<'a> {
    s: &'a CpuStorage,
    l: &'a Layout,
}

impl<'a> Input<'a> {
    /// The contiguous f32 data (`what` names the input in errors).
    pub(crate) fn f32s(self, what: &str) -> CResult<&'a [f32]> {
        f32s(self.s, self.l, what)
    }

    /// The contiguous u32 data of an index input.
    pub(crate) fn u32s(self, what: &str) -> CResult<&'a [u32]> {
        let CpuStorage::U32(v) = self.s else {
            return Err(cerr(format!(
                "{what}: expected u32, found {:?}",
                self.s.dtype()
            )));
        };
        Ok(&v[contiguous_range(self.l, what)?])
    }

    pub(crate) fn dims(self) -> &'a [usize] {
        self.l.dims()
    }

    pub(crate) fn shape(self) -> &'a Shape {
        self.l.shape()
    }
}

/// One input of a CUDA forward.
#[cfg(feature = "cuda")]
pub(crate) type CudaInput<'a> = (&'a candle_core::CudaStorage, &'a Layout);

/// A CPU forward's f32 result.
pub(crate) fn output(y: Vec<f32>, shape: impl Into<Shape>) -> Fwd {
    Ok((CpuStorage::F32(y), shape.into()))
}

/// `[dx, None, ..]`: the gradient of an op's first input alone (the others
/// need none, or are weights whose gradients went into their buffers).
pub(crate) fn first_only<const N: usize>(dx: Option<Tensor>) -> [Option<Tensor>; N] {
    let mut g = std::array::from_fn(|_| None);
    g[0] = dx;
    g
}

/// `dims` with the last one replaced by `n` (an error for a scalar): the
/// result shape of a product over the last dimension.
pub(crate) fn with_last_dim(dims: &[usize], n: usize, what: &str) -> CResult<Shape> {
    let mut dims = dims.to_vec();
    *dims
        .last_mut()
        .ok_or_else(|| cerr(format!("{what}: scalar input")))? = n;
    Ok(Shape::from(dims))
}

/// An [`Op`] as candle sees it.
struct Node<T>(T);

/// candle's `CustomOp1/2/3` for [`Node`], one per arity: each hands its
/// arguments over to [`Op`] as arrays (`$s`, `$l`: storage and layout of
/// each input; `$x`: the input tensors, `$d` their gradients).
macro_rules! node_impl {
    ($trait:ident, $n:literal, $grads:ty, $($s:ident $l:ident $x:ident $d:ident),+) => {
        impl<T: Op<$n>> $trait for Node<T> {
            fn name(&self) -> &'static str {
                self.0.name()
            }
            fn cpu_fwd(&self, $($s: &CpuStorage, $l: &Layout),+) -> Fwd {
                self.0.cpu_fwd([$(Input { s: $s, l: $l }),+])
            }
            #[cfg(feature = "cuda")]
            fn cuda_fwd(
                &self,
                $($s: &candle_core::CudaStorage, $l: &Layout),+
            ) -> CResult<(candle_core::CudaStorage, Shape)> {
                self.0.cuda_fwd([$(($s, $l)),+])
            }
            #[allow(unused_parens)]
            fn bwd(&self, $($x: &Tensor,)+ res: &Tensor, grad: &Tensor) -> CResult<$grads> {
                let [$($d),+] = self.0.bwd([$($x),+], res, grad)?;
                Ok(($($d),+))
            }
        }
    };
}

node_impl!(CustomOp1, 1, Option<Tensor>, s l x dx);
node_impl!(CustomOp2, 2, (Option<Tensor>, Option<Tensor>), s1 l1 x1 d1, s2 l2 x2 d2);
node_impl!(
    CustomOp3,
    3,
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    s1 l1 x1 d1,
    s2 l2 x2 d2,
    s3 l3 x3 d3
);

/// An [`Op`] as one node of candle's graph over its inputs as they are
/// (candle's `apply_op{1,2,3}_arc`, by the number of inputs).
pub(crate) trait Apply<const N: usize> {
    fn apply_to(self, xs: [&Tensor; N]) -> CResult<Tensor>;
}

impl<T: Op<1>> Apply<1> for T {
    fn apply_to(self, [x]: [&Tensor; 1]) -> CResult<Tensor> {
        x.apply_op1_arc(Arc::new(Box::new(Node(self))))
    }
}

impl<T: Op<2>> Apply<2> for T {
    fn apply_to(self, [x1, x2]: [&Tensor; 2]) -> CResult<Tensor> {
        x1.apply_op2_arc(x2, Arc::new(Box::new(Node(self))))
    }
}

impl<T: Op<3>> Apply<3> for T {
    fn apply_to(self, [x1, x2, x3]: [&Tensor; 3]) -> CResult<Tensor> {
        x1.apply_op3_arc(x2, x3, Arc::new(Box::new(Node(self))))
    }
}

/// `op` as a node of candle's graph over `xs` made contiguous: the CPU
/// kernels read plain slices. A contiguous tensor goes in as it is (no copy,
/// no extra node).
pub(crate) fn apply<const N: usize>(op: impl Apply<N>, xs: [&Tensor; N]) -> CResult<Tensor> {
    let xs = xs
        .iter()
        .map(|x| x.contiguous())
        .collect::<CResult<Vec<_>>>()?;
    op.apply_to(std::array::from_fn(|i| &xs[i]))
}

/// The range of a contiguous layout's elements in its storage.
fn contiguous_range(l: &Layout, what: &str) -> CResult<std::ops::Range<usize>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| cerr(format!("{what}: input must be contiguous")))?;
    Ok(a..b)
}

/// The contiguous f32 slice behind a custom op's input.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> CResult<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(cerr(format!("{what}: expected f32, found {:?}", s.dtype())));
    };
    Ok(&v[contiguous_range(l, what)?])
}

/// Run `f` on the f32 data of a tensor (made contiguous first if needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> CResult<R>,
) -> CResult<R> {
    with_f32s([t], [what], |[x]| f(x))
}

/// Run `f` on the f32 data of several tensors at once (each made contiguous
/// first if needed; `what` names them in errors).
pub(crate) fn with_f32s<const N: usize, R>(
    ts: [&Tensor; N],
    what: [&str; N],
    f: impl FnOnce([&[f32]; N]) -> CResult<R>,
) -> CResult<R> {
    let ts = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<CResult<Vec<_>>>()?;
    let held: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut xs = Vec::with_capacity(N);
    for ((st, l), what) in held.iter().zip(what) {
        match &**st {
            Storage::Cpu(s) => xs.push(f32s(s, l, what)?),
            _ => return Err(cerr(format!("{what}: only the CPU backend has this op"))),
        }
    }
    f(std::array::from_fn(|i| xs[i]))
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
