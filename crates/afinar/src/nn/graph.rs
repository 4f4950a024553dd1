//! Joining candle's graph with a result computed outside it, and activation
//! checkpointing built on that.
//!
//! [`attach`] records one node whose forward hands over a tensor computed
//! from detached inputs and whose backward is a closure: the CUDA ops use it
//! (forward with cuBLAS and afinar's kernels, backward their own), and so
//! does [`checkpoint`] (forward without keeping the layer's graph, backward
//! recomputes the layer and back-propagates through it).

#[cfg(feature = "cuda")]
use super::custom_op::CudaInput;
use super::custom_op::{cerr, Apply, CResult, Fwd, Grads, Input, Op};
use super::DropoutRng;
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::Shape;
use candle_core::{Storage, Tensor, Var};
use std::sync::{Arc, Mutex};

type BwdFn = Box<dyn Fn(&Tensor) -> CResult<Vec<Option<Tensor>>> + Send + Sync>;

/// A graph node whose forward hands over a result computed outside the
/// graph and whose backward is `bwd(grad)` (one entry per input).
struct Attach {
    name: &'static str,
    y: Mutex<Option<Tensor>>,
    /// A result written by afinar's own kernel into a fresh buffer: handed
    /// over as is (no copy).
    #[cfg(feature = "cuda")]
    st: Mutex<Option<(candle_core::CudaStorage, Shape)>>,
    bwd: BwdFn,
}

impl Attach {
    /// The precomputed result, contiguous from offset 0 (it is handed over once).
    fn take(&self) -> CResult<Tensor> {
        let y = self
            .y
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| cerr(format!("{}: forward ran twice", self.name)))?;
        if y.is_contiguous() && y.layout().start_offset() == 0 {
            Ok(y)
        } else {
            y.copy()
        }
    }
    fn cpu(&self) -> Fwd {
        let y = self.take()?;
        let (st, l) = y.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => Ok((s.try_clone(l)?, y.shape().clone())),
            _ => Err(cerr(format!("{}: result is not on the CPU", self.name))),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> CResult<(candle_core::CudaStorage, Shape)> {
        if let Some(out) = self.st.lock().unwrap().take() {
            return Ok(out);
        }
        let y = self.take()?;
        let (st, l) = y.storage_and_layout();
        match &*st {
            Storage::Cuda(s) => Ok((s.try_clone(l)?, y.shape().clone())),
            _ => Err(cerr(format!(
                "{}: result is not on a CUDA device",
                self.name
            ))),
        }
    }
}

/// One impl for every number of graph inputs: the inputs themselves are
/// never read (the result was computed before), only the backward counts
/// them.
impl<const N: usize> Op<N> for Attach {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: [Input; N]) -> Fwd {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: [CudaInput; N]) -> CResult<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, _: [&Tensor; N], _res: &Tensor, g: &Tensor) -> Grads<N> {
        let mut grads = (self.bwd)(g)?.into_iter();
        Ok(std::array::from_fn(|_| grads.next().flatten()))
    }
}

/// `y` (computed from `args` outside the graph) as a node of the graph with
/// backward `bwd`. Without any input that needs a gradient, `y` as is.
pub fn attach(
    name: &'static str,
    args: &[&Tensor],
    y: Tensor,
    bwd: impl Fn(&Tensor) -> CResult<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> CResult<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(y);
    }
    let op = Attach {
        name,
        y: Mutex::new(Some(y)),
        #[cfg(feature = "cuda")]
        st: Mutex::new(None),
        bwd: Box::new(bwd),
    };
    apply(name, args, op)
}

/// The node over `args` as they are (not made contiguous: nothing reads them).
fn apply(name: &'static str, args: &[&Tensor], op: Attach) -> CResult<Tensor> {
    match *args {
        [a] => op.apply_to([a]),
        [a, b] => op.apply_to([a, b]),
        [a, b, c] => op.apply_to([a, b, c]),
        _ => Err(cerr(format!(
            "{name}: 1 to 3 graph inputs, got {}",
            args.len()
        ))),
    }
}

/// [`attach`] for a result in a fresh CUDA buffer (written by afinar's own
/// kernel): the node takes the buffer itself, no copy.
#[cfg(feature = "cuda")]
pub fn attach_storage(
    name: &'static str,
    args: &[&Tensor],
    st: candle_core::CudaStorage,
    shape: Shape,
    bwd: impl Fn(&Tensor) -> CResult<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> CResult<Tensor> {
    if !args.iter().any(|a| a.track_op()) {
        return Ok(Tensor::from_storage(
            Storage::Cuda(st),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        ));
    }
    let op = Attach {
        name,
        y: Mutex::new(None),
        st: Mutex::new(Some((st, shape))),
        bwd: Box::new(bwd),
    };
    apply(name, args, op)
}

/// A layer as checkpointing runs it: input, and the dropout seeds of this pass.
pub type LayerFn = Arc<dyn Fn(&Tensor, Option<&DropoutRng>) -> crate::Result<Tensor> + Send + Sync>;

/// Activation checkpointing (`torch.utils.checkpoint`): `f(x)` runs now and
/// only its output is kept; backward runs `f` again on the saved input, with
/// the same dropout masks, and back-propagates through that recomputation
/// (trainable weights inside accumulate their gradients as usual). One
/// layer's activations live at a time instead of every layer's, for one
/// extra forward. `anchor` is a trainable tensor used inside `f`, which
/// keeps the node in the graph when `x` itself needs no gradient (adapters
/// on a frozen embedding).
pub fn checkpoint(
    x: &Tensor,
    anchor: Option<&Tensor>,
    rng: Option<&DropoutRng>,
    f: LayerFn,
) -> crate::Result<Tensor> {
    let seeds = rng.map(|r| r.state());
    let y = f(&x.detach(), rng)?.detach();
    let xd = x.detach();
    let mut args = vec![x];
    args.extend(anchor);
    let y = attach("afinar-checkpoint", &args, y, move |g| {
        let xv = Var::from_tensor(&xd)?;
        let r = seeds.map(DropoutRng::from_state);
        let y = f(xv.as_tensor(), r.as_ref()).map_err(cerr)?;
        let grads = (y * g.detach())?.sum_all()?.backward()?;
        Ok(vec![grads.get(xv.as_tensor()).cloned()])
    })?;
    Ok(y)
}
