//! The raw f32 pieces that every op's CPU kernel builds on: matmul through
//! the `gemm` crate with arbitrary strides (so transposes cost nothing),
//! column sums (the bias gradient), e^x without a libm call, sums and dot
//! products over eight lanes, the rayon task sizes, elementwise loops, and
//! the pointer through which parallel tasks write disjoint parts of one
//! buffer.
//!
//! Plain slices in, slices out; each op file (`linear.rs`, `norm.rs`,
//! `attention/` ...) keeps its own kernels, built on these, in its `cpu`
//! module. f32 only, CPU only.

use crate::simd;
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows per rayon task for the row-wise kernels.
pub(crate) const ROW_CHUNK: usize = 64;
/// Elements per rayon task for the element-wise kernels.
pub(crate) const ELEM_CHUNK: usize = 8192;

/// A strided read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> Mat<'a> {
    /// Row-major contiguous `rows x cols`.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols);
        Mat {
            data,
            rows,
            cols,
            rs: cols as isize,
            cs: 1,
        }
    }
    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// How many threads the gemm calls may use: rayon's pool size.
pub fn parallelism() -> Parallelism {
    let n = rayon::current_num_threads();
    if n > 1 {
        Parallelism::Rayon(n)
    } else {
        Parallelism::None
    }
}

/// `dst[m x n] (row stride dst_rs) = (acc ? dst : 0) + alpha * a[m x k] @ b[k x n]`.
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    acc: bool,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul inner dims");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the views' extents were checked by construction / the assert
    // above; gemm reads `a`, `b` and writes `dst` within those extents.
    unsafe { gemm_into(dst.as_mut_ptr(), dst_rs, a, b, alpha, acc, par) }
}

/// The one gemm call: `dst[m x n]` (row stride `dst_rs`) = (`read_dst` ?
/// dst : nothing read) + `alpha * a @ b`.
///
/// # Safety
/// `dst` must be valid for writes (and for reads when `read_dst`) of the
/// `m x n` block at row stride `dst_rs`; `k > 0`.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    alpha: f32,
    read_dst: bool,
    par: Parallelism,
) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_rs as isize,
        read_dst,
        a.data.as_ptr(),
        a.cs,
        a.rs,
        b.data.as_ptr(),
        b.cs,
        b.rs,
        1.0,
        alpha,
        false,
        false,
        false,
        par,
    )
}

/// `alpha * a[m x k] @ b[k x n]` into a new row-major `m x n` vector,
/// optionally on top of `init` (each row starts as `init`, the bias of a
/// linear layer). The vector is never zero-filled first: gemm writes every
/// element without reading it (a tenth of an inference step was memset).
pub fn matmul_new(a: Mat, b: Mat, alpha: f32, init: Option<&[f32]>, par: Parallelism) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul inner dims");
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    if let Some(row) = init {
        assert_eq!(row.len(), n, "matmul_new: initial row");
        for _ in 0..m {
            out.extend_from_slice(row);
        }
    }
    if k == 0 || m == 0 || n == 0 {
        out.resize(m * n, 0.0);
        return out;
    }
    // SAFETY: the destination is the vector's m * n capacity (row stride
    // n). With `read_dst = false` gemm writes every element and reads none,
    // so the length may cover it once gemm returns; with `init` the elements
    // were written above and gemm adds to them.
    unsafe {
        gemm_into(out.as_mut_ptr(), n, a, b, alpha, init.is_some(), par);
        out.set_len(m * n);
    }
    out
}

/// Column sums of a row-major `rows x cols` matrix (the bias gradient).
pub fn col_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let rows = x.len() / cols;
    let chunk = 256;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cols];
            simd::run(
                #[inline(always)]
                || {
                    for r in c * chunk..((c + 1) * chunk).min(rows) {
                        for (a, v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                            *a += v;
                        }
                    }
                },
            );
            acc
        })
        .collect();
    let mut out = vec![0f32; cols];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// e^x in f32 without a libm call, branch-free so rows vectorise:
/// Cody–Waite range reduction to r in [-ln2/2, ln2/2], a degree-6 Taylor
/// polynomial (relative error < 2e-7 over the clamped range), and 2^n built
/// in the exponent bits. Inputs are clamped to [-87, 88]: the result stays
/// finite, and tiny for the clamped negatives.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa
    // bits (no `round`/`as` conversions, which block vectorisation).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// Independent accumulators of the lane sums below: one AVX-512 register,
/// two AVX2 ones. The order of additions is the same at every SIMD level
/// (`simd`), so every level gives the same bits.
pub(crate) const LANES: usize = 16;

/// Sum with [`LANES`] independent accumulators: the compiler may not
/// reorder a float sum, so a plain loop runs one add at a time.
#[inline(always)]
pub(crate) fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    reduce_lanes(acc) + rest
}

/// The sum of the lanes of an accumulator, in a fixed tree order.
#[inline(always)]
pub(crate) fn reduce_lanes(acc: [f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for i in 0..LANES / 2 {
        h[i] = acc[i] + acc[i + LANES / 2];
    }
    let mut q = [0f32; LANES / 4];
    for i in 0..LANES / 4 {
        q[i] = h[i] + h[i + LANES / 4];
    }
    (q[0] + q[2]) + (q[1] + q[3])
}

/// The largest element (`-inf` for none), over [`LANES`] lanes: a plain
/// `fold(f32::max)` runs one compare at a time. NaNs are skipped, as
/// `f32::max` skips them.
#[inline(always)]
pub(crate) fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

/// Dot product with [`LANES`] independent accumulators.
#[inline(always)]
pub(crate) fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    reduce_lanes(acc) + rest
}

/// A new vector of `n` floats written by `fill`, which gets them
/// uninitialised: no zero fill first (calloc's memset of recycled memory
/// was a fifteenth of an inference step).
///
/// # Safety
/// `fill` must write every element.
pub(crate) unsafe fn new_filled(n: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: the caller's `fill` wrote all `n` elements.
    out.set_len(n);
    out
}

/// A new vector shaped as `x` (rows of width `d`), row by row: `f(row of
/// x, row of out)`, rows in parallel chunks of [`ROW_CHUNK`], each chunk's
/// loop at the process's SIMD level (pass an `#[inline(always)]` closure).
///
/// # Safety
/// `f` must write every element of the row it is given.
pub(crate) unsafe fn map_rows(
    x: &[f32],
    d: usize,
    f: impl Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: the row chunks of `out` and `x` pair up and cover `out`; `f`
    // writes every element of each row (the caller's promise).
    new_filled(x.len(), |out| {
        out.par_chunks_mut(d * ROW_CHUNK)
            .zip(x.par_chunks(d * ROW_CHUNK))
            .for_each(|(oc, xc)| {
                simd::run(
                    #[inline(always)]
                    || {
                        for (orow, xrow) in oc.chunks_mut(d).zip(xc.chunks(d)) {
                            f(xrow, orow);
                        }
                    },
                )
            })
    })
}

/// `f(x[i])` for every element, in parallel chunks of [`ELEM_CHUNK`].
pub(crate) fn map_elems(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    // SAFETY: the chunks of `out` and `x` pair up and cover all of `out`.
    unsafe {
        new_filled(x.len(), |out| {
            out.par_chunks_mut(ELEM_CHUNK)
                .zip(x.par_chunks(ELEM_CHUNK))
                .for_each(|(o, x)| {
                    simd::run(
                        #[inline(always)]
                        || {
                            for i in 0..o.len() {
                                o[i] = MaybeUninit::new(f(x[i]));
                            }
                        },
                    )
                })
        })
    }
}

/// `dy[i] * df(x[i])` for every element: the backward of an elementwise
/// function whose derivative is `df`.
pub(crate) fn map_grad(x: &[f32], dy: &[f32], df: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    assert_eq!(x.len(), dy.len(), "map_grad: x and dy differ");
    // SAFETY: as in `map_elems`.
    unsafe {
        new_filled(x.len(), |out| {
            out.par_chunks_mut(ELEM_CHUNK)
                .zip(x.par_chunks(ELEM_CHUNK).zip(dy.par_chunks(ELEM_CHUNK)))
                .for_each(|(o, (x, dy))| {
                    simd::run(
                        #[inline(always)]
                        || {
                            for i in 0..o.len() {
                                o[i] = MaybeUninit::new(dy[i] * df(x[i]));
                            }
                        },
                    )
                })
        })
    }
}

/// A raw pointer shared by parallel tasks that write disjoint parts of one
/// buffer (see each caller for why the parts are disjoint).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(*mut f32, usize);
// SAFETY: only used for disjoint writes from parallel tasks.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    pub(crate) fn new(s: &mut [f32]) -> Self {
        SyncPtr(s.as_mut_ptr(), s.len())
    }
    /// SAFETY: the caller writes only the part of the buffer it owns.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    c[i * n + j] += a[i * k + l] * b[l * n + j];
                }
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_with_transposes() {
        let (m, k, n) = (7, 5, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // [n, k]
        let mut b = vec![0f32; k * n];
        for i in 0..n {
            for j in 0..k {
                b[j * n + i] = bt[i * k + j];
            }
        }
        let want = naive_mm(&a, &b, m, k, n);
        let mut got = vec![0f32; m * n];
        matmul(
            &mut got,
            n,
            Mat::rm(&a, m, k),
            Mat::rm(&bt, n, k).t(),
            1.0,
            false,
            parallelism(),
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5);
        }
        // accumulate
        matmul(
            &mut got,
            n,
            Mat::rm(&a, m, k),
            Mat::rm(&b, k, n),
            1.0,
            true,
            Parallelism::None,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 2.0 * w).abs() < 1e-4);
        }
    }

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f32;
        // Below -80 results approach the subnormal range (< 1e-35), where f32
        // itself has no relative precision; softmax never needs it.
        for i in -80_000..88_000 {
            let x = i as f32 * 1e-3;
            let rel = (fast_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(fast_exp(-1e30) < 1e-37 && fast_exp(1e30).is_finite());
    }
}
