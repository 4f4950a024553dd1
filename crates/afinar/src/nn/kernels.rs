//! Raw f32 kernels on contiguous slices: matmul through the `gemm` crate with
//! arbitrary strides (so transposes cost nothing), row-wise LayerNorm, GELU,
//! attention per (batch, head), counter-based dropout masks.
//!
//! Everything here is plain slices in, slices out; `ops.rs` wraps these as
//! candle custom ops with hand-written backward. f32 only, CPU only.

use gemm::Parallelism;
use rayon::prelude::*;

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
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
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
}

// ---------------------------------------------------------------- GELU (erf)

/// erf(z) for z >= 0 and exp(-z^2), by Abramowitz & Stegun 7.1.26
/// (|error| <= 1.5e-7): one exp shared with GELU's derivative, where libm's
/// erff was a tenth of a training step.
#[inline]
fn erf_pos_and_gauss(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let g = fast_exp(-z * z);
    (1.0 - poly * g, g)
}

/// Φ(x) (the standard normal CDF) and φ(x) (its density).
#[inline]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let (e, g) = erf_pos_and_gauss(z);
    let erf = if x < 0.0 { -e } else { e };
    (0.5 * (1.0 + erf), g * 0.398_942_3)
}

/// Exact GELU: x Φ(x) (`hidden_act = "gelu"`, not the tanh approximation).
#[inline]
pub fn gelu(x: f32) -> f32 {
    x * normal_cdf_pdf(x).0
}

#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    // d/dx [x Φ(x)] = Φ(x) + x φ(x)
    let (cdf, pdf) = normal_cdf_pdf(x);
    cdf + x * pdf
}

// ---------------------------------------------------------------- LayerNorm

const LN_CHUNK: usize = 64;

/// y = (x - mean) / sqrt(var + eps) * gamma + beta, per row of width `d`.
pub fn layer_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, d: usize, y: &mut [f32]) {
    y.par_chunks_mut(d * LN_CHUNK)
        .zip(x.par_chunks(d * LN_CHUNK))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let (mean, rstd) = row_stats(xr, eps);
                for j in 0..d {
                    yr[j] = (xr[j] - mean) * rstd * gamma[j] + beta[j];
                }
            }
        });
}

#[inline]
fn row_stats(xr: &[f32], eps: f32) -> (f32, f32) {
    let d = xr.len() as f32;
    let mean = sum_lanes(xr) / d;
    let mut acc = [0f32; 8];
    let chunks = xr.chunks_exact(8);
    let mut var: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += (c[i] - mean) * (c[i] - mean);
        }
    }
    var = (var + acc.iter().sum::<f32>()) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Backward of LayerNorm, recomputing the row statistics from `x`.
/// Writes dx (if given); returns (dgamma, dbeta) summed over rows.
pub fn layer_norm_bwd(
    x: &[f32],
    gamma: &[f32],
    dy: &[f32],
    eps: f32,
    d: usize,
    mut dx: Option<&mut [f32]>,
    want_params: bool,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / d;
    let chunks = rows.div_ceil(LN_CHUNK);
    // Per-chunk partial sums of dgamma/dbeta, reduced after: no locks.
    let work = |c: usize, dxc: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
        let mut dg = if want_params {
            vec![0f32; d]
        } else {
            Vec::new()
        };
        let mut db = if want_params {
            vec![0f32; d]
        } else {
            Vec::new()
        };
        let r0 = c * LN_CHUNK;
        let r1 = (r0 + LN_CHUNK).min(rows);
        let mut dxc = dxc;
        for r in r0..r1 {
            let xr = &x[r * d..(r + 1) * d];
            let dyr = &dy[r * d..(r + 1) * d];
            let (mean, rstd) = row_stats(xr, eps);
            let mut sum_g = 0f32;
            let mut sum_gx = 0f32;
            for j in 0..d {
                let xhat = (xr[j] - mean) * rstd;
                let g = dyr[j] * gamma[j];
                sum_g += g;
                sum_gx += g * xhat;
                if want_params {
                    dg[j] += dyr[j] * xhat;
                    db[j] += dyr[j];
                }
            }
            if let Some(dxc) = dxc.as_deref_mut() {
                let dxr = &mut dxc[(r - r0) * d..(r - r0 + 1) * d];
                let inv_d = 1.0 / d as f32;
                for j in 0..d {
                    let xhat = (xr[j] - mean) * rstd;
                    let g = dyr[j] * gamma[j];
                    dxr[j] = rstd * (g - inv_d * sum_g - xhat * inv_d * sum_gx);
                }
            }
        }
        (dg, db)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = match dx.as_deref_mut() {
        Some(dx) => dx
            .par_chunks_mut(d * LN_CHUNK)
            .enumerate()
            .map(|(c, dxc)| work(c, Some(dxc)))
            .collect(),
        None => (0..chunks).into_par_iter().map(|c| work(c, None)).collect(),
    };
    let mut dg = vec![0f32; if want_params { d } else { 0 }];
    let mut db = vec![0f32; if want_params { d } else { 0 }];
    if want_params {
        for (g, b) in partials {
            for j in 0..d {
                dg[j] += g[j];
                db[j] += b[j];
            }
        }
    }
    (dg, db)
}

// ---------------------------------------------------------------- dropout

/// A counter-based uniform in [0, 1): the mask of element `i` under `seed`
/// is a pure function, so backward regenerates it instead of storing it.
#[inline]
pub fn uniform(seed: u64, i: u64) -> f32 {
    // Element i of the SplitMix64 stream seeded at `seed`: one mix per element.
    let z = splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// out[i] = keep(i) ? x[i] / (1 - p) : 0.
pub fn dropout(x: &[f32], p: f32, seed: u64, out: &mut [f32]) {
    let scale = 1.0 / (1.0 - p);
    out.par_chunks_mut(4096).enumerate().for_each(|(c, oc)| {
        let base = c * 4096;
        for (j, o) in oc.iter_mut().enumerate() {
            let i = base + j;
            *o = if uniform(seed, i as u64) >= p {
                x[i] * scale
            } else {
                0.0
            };
        }
    });
}

// ---------------------------------------------------------------- attention

/// Shapes of one multi-head attention call: q, k, v and the output are
/// `[b, t, h * d]` row-major (heads side by side, as a linear layer makes
/// them); `key_mask[b * t + j]` is 0.0 for a key to ignore.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
}

impl AttnShape {
    pub fn c(&self) -> usize {
        self.h * self.d
    }
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

/// Softmax(q k^T * scale + mask) per row of `s` (t x t), in place; masked
/// keys get probability exactly 0 (a row with no visible key becomes 0).
/// `mask` is 1.0 / 0.0 per key: multiplying by it keeps the loop branch-free.
fn masked_softmax_rows(s: &mut [f32], t: usize, mask: &[f32]) {
    for row in s.chunks_mut(t) {
        let mut max = f32::NEG_INFINITY;
        for j in 0..t {
            if mask[j] != 0.0 && row[j] > max {
                max = row[j];
            }
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        for (v, m) in row.iter_mut().zip(mask) {
            *v = fast_exp(*v - max) * m;
        }
        let inv = 1.0 / sum_lanes(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Sum with 8 independent accumulators: the compiler may not reorder a float
/// sum, so a plain loop runs one add at a time.
#[inline]
fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

fn head_view(x: &[f32], sh: AttnShape, bi: usize, hi: usize) -> Mat<'_> {
    let c = sh.c();
    let off = bi * sh.t * c + hi * sh.d;
    Mat {
        data: &x[off..],
        rows: sh.t,
        cols: sh.d,
        rs: c as isize,
        cs: 1,
    }
}

/// The backward's second use of a dropout mask, without hashing again:
/// `dp[j] *= 1/(1-p)` where `pd[j]` (the dropped probabilities) was kept,
/// else 0. Where the probability itself is 0 the mask does not matter (its
/// dS term is P * (..) = 0), and where it is not, `pd[j] != 0` exactly when
/// the element was kept.
pub(crate) fn reuse_dropout_mask(dp: &mut [f32], pd: &[f32], p: f32) {
    let scale = 1.0 / (1.0 - p);
    for (d, &k) in dp.iter_mut().zip(pd) {
        *d = if k != 0.0 { *d * scale } else { 0.0 };
    }
}

fn apply_dropout_rows(p_mat: &mut [f32], p: f32, seed: u64, base: u64) {
    let scale = 1.0 / (1.0 - p);
    for (j, v) in p_mat.iter_mut().enumerate() {
        *v = if uniform(seed, base + j as u64) >= p {
            *v * scale
        } else {
            0.0
        };
    }
}

/// Forward multi-head attention (BERT: bidirectional with key padding).
/// `dropout` = Some((p, seed)) drops attention probabilities.
pub fn attention_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[f32],
    sh: AttnShape,
    scale: f32,
    dropout: Option<(f32, u64)>,
    out: &mut [f32],
) {
    let (t, c, d) = (sh.t, sh.c(), sh.d);
    // Each (batch, head) task writes its own column block of `out`; the
    // blocks are disjoint so the raw pointer is shared safely.
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_len = out.len();
    (0..sh.b * sh.h).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |s, bh| {
            let (bi, hi) = (bh / sh.h, bh % sh.h);
            let qm = head_view(q, sh, bi, hi);
            let km = head_view(k, sh, bi, hi);
            let vm = head_view(v, sh, bi, hi);
            matmul(s, t, qm, km.t(), scale, false, Parallelism::None);
            masked_softmax_rows(s, t, &key_mask[bi * t..(bi + 1) * t]);
            if let Some((p, seed)) = dropout {
                apply_dropout_rows(s, p, seed, (bh * t * t) as u64);
            }
            // SAFETY: see above; the view starts at this head's block.
            let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
            let off = bi * t * c + hi * d;
            matmul(
                &mut o[off..],
                c,
                Mat::rm(s, t, t),
                vm,
                1.0,
                false,
                Parallelism::None,
            );
        },
    );
}

/// Backward of `attention_fwd`, recomputing the probabilities (nothing
/// T x T is kept between forward and backward).
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[f32],
    sh: AttnShape,
    scale: f32,
    dropout: Option<(f32, u64)>,
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (t, c, d) = (sh.t, sh.c(), sh.d);
    let ptrs = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let len = dq.len();
    (0..sh.b * sh.h).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t * t]),
        |(p, pd, dp), bh| {
            let (bi, hi) = (bh / sh.h, bh % sh.h);
            let qm = head_view(q, sh, bi, hi);
            let km = head_view(k, sh, bi, hi);
            let vm = head_view(v, sh, bi, hi);
            let dom = head_view(dout, sh, bi, hi);
            let mask = &key_mask[bi * t..(bi + 1) * t];
            matmul(p, t, qm, km.t(), scale, false, Parallelism::None);
            masked_softmax_rows(p, t, mask);
            // pd = dropped probabilities (what multiplied V in forward).
            pd.copy_from_slice(p);
            if let Some((pr, seed)) = dropout {
                apply_dropout_rows(pd, pr, seed, (bh * t * t) as u64);
            }
            let off = bi * t * c + hi * d;
            // SAFETY: disjoint column blocks per (batch, head), as in forward.
            let (dqs, dks, dvs) = unsafe {
                (
                    std::slice::from_raw_parts_mut(ptrs.0.get(), len),
                    std::slice::from_raw_parts_mut(ptrs.1.get(), len),
                    std::slice::from_raw_parts_mut(ptrs.2.get(), len),
                )
            };
            // dV = Pd^T dO
            matmul(
                &mut dvs[off..],
                c,
                Mat::rm(pd, t, t).t(),
                dom,
                1.0,
                false,
                Parallelism::None,
            );
            // dPd = dO V^T
            matmul(dp, t, dom, vm.t(), 1.0, false, Parallelism::None);
            if let Some((pr, _)) = dropout {
                // d(P) = d(Pd) * mask / (1 - p)
                reuse_dropout_mask(dp, pd, pr);
            }
            // dS = P * (dP - rowsum(dP * P)), times the score scale.
            for i in 0..t {
                let pr = &p[i * t..(i + 1) * t];
                let dr = &mut dp[i * t..(i + 1) * t];
                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                for j in 0..t {
                    dr[j] = pr[j] * (dr[j] - dot) * scale;
                }
            }
            // dQ = dS K ; dK = dS^T Q
            matmul(
                &mut dqs[off..],
                c,
                Mat::rm(dp, t, t),
                km,
                1.0,
                false,
                Parallelism::None,
            );
            matmul(
                &mut dks[off..],
                c,
                Mat::rm(dp, t, t).t(),
                qm,
                1.0,
                false,
                Parallelism::None,
            );
        },
    );
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from parallel tasks (see callers).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Column sums of a row-major `rows x cols` matrix (the bias gradient).
pub fn col_sums(x: &[f32], cols: usize) -> Vec<f32> {
    let rows = x.len() / cols;
    let chunk = 256;
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![0f32; cols];
            for r in c * chunk..((c + 1) * chunk).min(rows) {
                for (a, v) in acc.iter_mut().zip(&x[r * cols..(r + 1) * cols]) {
                    *a += v;
                }
            }
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

    #[test]
    fn fast_gelu_matches_libm_erf() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 * 1e-3;
            let exact = 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            worst = worst.max((gelu(x) - exact).abs() / (1.0 + x.abs()));
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_grad_matches_finite_difference() {
        for &x in &[-3.0f32, -1.0, -0.1, 0.0, 0.3, 1.7, 4.0] {
            let h = 1e-3;
            let fd = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            assert!(
                (fd - gelu_grad(x)).abs() < 1e-3,
                "x={x} fd={fd} an={}",
                gelu_grad(x)
            );
        }
    }

    #[test]
    fn dropout_keeps_about_one_minus_p() {
        let x = vec![1f32; 100_000];
        let mut y = vec![0f32; x.len()];
        dropout(&x, 0.1, 7, &mut y);
        let kept = y.iter().filter(|v| **v != 0.0).count() as f32 / x.len() as f32;
        assert!((kept - 0.9).abs() < 0.01, "kept {kept}");
        assert!(y.iter().all(|v| *v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
        let mut y2 = vec![0f32; x.len()];
        dropout(&x, 0.1, 7, &mut y2);
        assert_eq!(y, y2, "same seed, same mask");
    }
}
