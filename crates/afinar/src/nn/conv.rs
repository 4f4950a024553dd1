//! 2-D convolution over channels-last images, with a hand-written backward.
//!
//! Activations are `[B, H, W, C]` (NHWC): a 1x1 convolution is then one
//! gemm over all `B * H * W` pixels, and a depthwise one vectorises over
//! the channels of each pixel. Weights keep torch's layout
//! `[C_out, C_in / groups, kh, kw]` (`torch.nn.Conv2d`,
//! <https://pytorch.org/docs/2.5/generated/torch.nn.Conv2d.html>), so a
//! checkpoint's tensors are used as they are. Square stride and zero
//! padding, any groups: three kernels by shape —
//!
//! - pointwise (1x1, stride 1, no padding, one group): `Y = X W^T`;
//! - depthwise (groups = C_in = C_out): direct loops over the taps;
//! - anything else: im2col per group (columns ordered `(c_in, ki, kj)`,
//!   torch's weight order) and a gemm; backward the transposed gemms and
//!   col2im.
//!
//! A trainable weight accumulates its gradient into its buffer; a frozen
//! one costs nothing, and an input that needs no gradient (the images)
//! gets none computed. f32, CPU.

use super::custom_op::{apply, cerr, first_only, needs_grad, output, tensor, with_f32s};
use super::custom_op::{CResult, Fwd, Grads, Input, Op};
use super::kernels::{self, Mat};
use super::Weight;
use candle_core::Tensor;

/// Stride, zero padding (both the same on each side and axis) and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dCfg {
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl Default for Conv2dCfg {
    fn default() -> Self {
        Conv2dCfg {
            stride: 1,
            padding: 0,
            groups: 1,
        }
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
    pub ho: usize,
    pub wo: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pointwise,
    Depthwise,
    General,
}

impl Geom {
    /// Check an input `[B, H, W, C_in]` against a weight
    /// `[C_out, C_in / groups, kh, kw]`.
    pub(crate) fn new(x: &[usize], wt: &[usize], cfg: Conv2dCfg) -> CResult<Geom> {
        let [b, h, w, cin] = *x else {
            return Err(cerr(format!(
                "conv2d: input must be [B, H, W, C] (channels last), found {x:?}"
            )));
        };
        let [cout, cin_g, kh, kw] = *wt else {
            return Err(cerr(format!(
                "conv2d: weight must be [C_out, C_in/groups, kh, kw], found {wt:?}"
            )));
        };
        let g = cfg.groups;
        if g == 0 || cfg.stride == 0 {
            return Err(cerr(format!(
                "conv2d: groups {g} and stride {} must be at least 1",
                cfg.stride
            )));
        }
        if cin % g != 0 || cout % g != 0 || cin / g != cin_g {
            return Err(cerr(format!(
                "conv2d: input has {cin} channels, weight {wt:?} with groups {g}: expected \
                 C_in/groups = {} and C_out divisible by {g}",
                cin / g.max(1)
            )));
        }
        let (hp, wp) = (h + 2 * cfg.padding, w + 2 * cfg.padding);
        if hp < kh || wp < kw || kh == 0 || kw == 0 {
            return Err(cerr(format!(
                "conv2d: kernel {kh}x{kw} larger than the padded input {hp}x{wp}"
            )));
        }
        Ok(Geom {
            b,
            h,
            w,
            cin,
            cout,
            kh,
            kw,
            stride: cfg.stride,
            pad: cfg.padding,
            groups: g,
            ho: (hp - kh) / cfg.stride + 1,
            wo: (wp - kw) / cfg.stride + 1,
        })
    }

    fn kind(&self) -> Kind {
        if self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0 && self.groups == 1 {
            Kind::Pointwise
        } else if self.groups == self.cin && self.groups == self.cout {
            Kind::Depthwise
        } else {
            Kind::General
        }
    }

    /// Output pixels (rows of the im2col matrix).
    fn m(&self) -> usize {
        self.b * self.ho * self.wo
    }

    /// Columns of one group's im2col matrix.
    fn k(&self) -> usize {
        self.cin / self.groups * self.kh * self.kw
    }

    pub(crate) fn out_dims(&self) -> [usize; 4] {
        [self.b, self.ho, self.wo, self.cout]
    }
}

struct Conv2dOp {
    cfg: Conv2dCfg,
    w: Weight,
}

impl Op<2> for Conv2dOp {
    fn name(&self) -> &'static str {
        "afinar-conv2d"
    }
    fn cpu_fwd(&self, [xi, wi]: [Input; 2]) -> Fwd {
        let g = Geom::new(xi.dims(), wi.dims(), self.cfg)?;
        let x = xi.f32s("conv2d input")?;
        let w = wi.f32s("conv2d weight")?;
        output(cpu::forward(&g, x, w), g.out_dims().as_slice())
    }
    fn bwd(&self, [x, w]: [&Tensor; 2], _res: &Tensor, grad: &Tensor) -> Grads<2> {
        let g = Geom::new(x.dims(), w.dims(), self.cfg)?;
        let want_x = needs_grad(x);
        let names = ["conv2d input", "conv2d weight", "conv2d grad"];
        let dx = with_f32s([x, w, grad], names, |[xv, wv, dy]| {
            if let Some(buf) = &self.w.grad {
                cpu::weight_grad(&g, xv, dy, buf);
            }
            if !want_x {
                return Ok(None);
            }
            Ok(Some(tensor(cpu::input_grad(&g, wv, dy), x.shape())?))
        })?;
        Ok(first_only(dx))
    }
}

/// A 2-D convolution of `x` `[B, H, W, C_in]` by `w` `[C_out, C_in/groups,
/// kh, kw]` (no bias), giving `[B, H_out, W_out, C_out]`.
pub fn conv2d(x: &Tensor, w: &Weight, cfg: Conv2dCfg) -> CResult<Tensor> {
    Geom::new(x.dims(), w.t.dims(), cfg)?;
    apply(Conv2dOp { cfg, w: w.clone() }, [x, &w.t])
}

/// The CPU kernels (f32, rayon over images or pixel rows).
pub(crate) mod cpu {
    use super::{kernels, Geom, Kind, Mat};
    use crate::nn::GradBuf;
    use crate::simd;
    use rayon::prelude::*;

    /// The input pixel a tap reads, or None in the padding.
    #[inline(always)]
    fn src(o: usize, k: usize, stride: usize, pad: usize, len: usize) -> Option<usize> {
        let i = (o * stride + k).checked_sub(pad)?;
        (i < len).then_some(i)
    }

    pub(crate) fn forward(g: &Geom, x: &[f32], w: &[f32]) -> Vec<f32> {
        forward_affine(g, x, w, None, false)
    }

    /// The convolution plus a per-channel `bias`, then ReLU6 if `relu6`:
    /// a batch norm on running statistics folded into the weights (the
    /// scale) and the bias (the shift) costs no pass of its own. The bias
    /// is where the sums start; the clamp runs on each part of the output
    /// while it is in cache (depthwise) or in one pass after the gemm.
    pub(crate) fn forward_affine(
        g: &Geom,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        relu6: bool,
    ) -> Vec<f32> {
        let par = kernels::parallelism();
        let mut y = match g.kind() {
            Kind::Pointwise => kernels::matmul_new(
                Mat::rm(x, g.m(), g.cin),
                Mat::rm(w, g.cout, g.cin).t(),
                1.0,
                bias,
                par,
            ),
            Kind::Depthwise => return dw_forward(g, x, w, bias, relu6),
            Kind::General => {
                let (k, cg) = (g.k(), g.cout / g.groups);
                let mut y = match bias {
                    Some(b) => b.iter().copied().cycle().take(g.m() * g.cout).collect(),
                    None => vec![0f32; g.m() * g.cout],
                };
                for gi in 0..g.groups {
                    let col = im2col(g, x, gi);
                    let wg = Mat::rm(&w[gi * cg * k..(gi + 1) * cg * k], cg, k).t();
                    kernels::matmul(
                        &mut y[gi * cg..],
                        g.cout,
                        Mat::rm(&col, g.m(), k),
                        wg,
                        1.0,
                        bias.is_some(),
                        par,
                    );
                }
                y
            }
        };
        if relu6 {
            y.par_chunks_mut(kernels::ELEM_CHUNK).for_each(|c| {
                simd::run(
                    #[inline(always)]
                    || c.iter_mut().for_each(|v| *v = v.max(0.0).min(6.0)),
                )
            });
        }
        y
    }

    /// dW, accumulated into `buf` (torch's layout).
    pub(crate) fn weight_grad(g: &Geom, x: &[f32], dy: &[f32], buf: &GradBuf) {
        let m = g.m();
        match g.kind() {
            Kind::Pointwise => buf.add(&rows_product(Mat::rm(dy, m, g.cout), Mat::rm(x, m, g.cin))),
            Kind::Depthwise => buf.add(&dw_weight_grad(g, x, dy)),
            Kind::General => {
                let (k, cg) = (g.k(), g.cout / g.groups);
                let mut dw = Vec::with_capacity(g.cout * k);
                for gi in 0..g.groups {
                    let col = im2col(g, x, gi);
                    let dyg = group_view(dy, m, g.cout, gi * cg, cg);
                    dw.extend(rows_product(dyg, Mat::rm(&col, m, k)));
                }
                buf.add(&dw);
            }
        }
    }

    /// `a^T b` for `a` `[m, p]` and `b` `[m, q]` with many rows and a small
    /// result (a weight gradient: the rows are every pixel of the batch).
    /// gemm splits its work over the result's blocks, which for a `[p, q]`
    /// of a few thousand elements leaves one thread alone with the whole
    /// sum; here the rows are cut into one range per thread instead, and
    /// the partial products added.
    fn rows_product(a: Mat, b: Mat) -> Vec<f32> {
        let (m, p, q) = (a.rows, a.cols, b.cols);
        let threads = rayon::current_num_threads().max(1);
        let chunks = if m >= 1024 * threads { threads } else { 1 };
        let part = m.div_ceil(chunks);
        fn rows(v: Mat<'_>, r0: usize, r1: usize) -> Mat<'_> {
            Mat {
                data: &v.data[r0 * v.rs as usize..],
                rows: r1 - r0,
                ..v
            }
        }
        let mut parts: Vec<Vec<f32>> = (0..chunks)
            .into_par_iter()
            .map(|c| {
                let (r0, r1) = (c * part, ((c + 1) * part).min(m));
                let par = if chunks == 1 {
                    kernels::parallelism()
                } else {
                    gemm::Parallelism::None
                };
                kernels::matmul_new(rows(a, r0, r1).t(), rows(b, r0, r1), 1.0, None, par)
            })
            .collect();
        let mut out = parts.swap_remove(0);
        for pt in parts {
            for (o, v) in out.iter_mut().zip(pt) {
                *o += v;
            }
        }
        debug_assert_eq!(out.len(), p * q);
        out
    }

    /// dX.
    pub(crate) fn input_grad(g: &Geom, w: &[f32], dy: &[f32]) -> Vec<f32> {
        let par = kernels::parallelism();
        let m = g.m();
        match g.kind() {
            Kind::Pointwise => kernels::matmul_new(
                Mat::rm(dy, m, g.cout),
                Mat::rm(w, g.cout, g.cin),
                1.0,
                None,
                par,
            ),
            Kind::Depthwise => dw_input_grad(g, w, dy),
            Kind::General => {
                let (k, cg) = (g.k(), g.cout / g.groups);
                let mut dx = vec![0f32; g.b * g.h * g.w * g.cin];
                for gi in 0..g.groups {
                    let dyg = group_view(dy, m, g.cout, gi * cg, cg);
                    let wg = Mat::rm(&w[gi * cg * k..(gi + 1) * cg * k], cg, k);
                    let dcol = kernels::matmul_new(dyg, wg, 1.0, None, par);
                    col2im(g, &dcol, gi, &mut dx);
                }
                dx
            }
        }
    }

    /// Columns `c0 .. c0 + n` of a row-major `rows x cols` matrix.
    fn group_view(d: &[f32], rows: usize, cols: usize, c0: usize, n: usize) -> Mat<'_> {
        Mat {
            data: &d[c0..],
            rows,
            cols: n,
            rs: cols as isize,
            cs: 1,
        }
    }

    /// Group `gi`'s im2col matrix `[B*Ho*Wo, C_in/groups * kh * kw]`,
    /// columns in torch's weight order `(c_in, ki, kj)`.
    fn im2col(g: &Geom, x: &[f32], gi: usize) -> Vec<f32> {
        let (k, cg) = (g.k(), g.cin / g.groups);
        let mut col = vec![0f32; g.m() * k];
        col.par_chunks_mut(k * g.wo)
            .enumerate()
            .for_each(|(row, out)| {
                let (b, oh) = (row / g.ho, row % g.ho);
                for ow in 0..g.wo {
                    let o = &mut out[ow * k..(ow + 1) * k];
                    for ki in 0..g.kh {
                        let Some(ih) = src(oh, ki, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kj in 0..g.kw {
                            let Some(iw) = src(ow, kj, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            let p = ((b * g.h + ih) * g.w + iw) * g.cin + gi * cg;
                            for ci in 0..cg {
                                o[(ci * g.kh + ki) * g.kw + kj] = x[p + ci];
                            }
                        }
                    }
                }
            });
        col
    }

    /// Add group `gi`'s column gradient back onto the input pixels.
    fn col2im(g: &Geom, dcol: &[f32], gi: usize, dx: &mut [f32]) {
        let (k, cg) = (g.k(), g.cin / g.groups);
        let img = g.h * g.w * g.cin;
        // One task per image: images own disjoint parts of dx.
        dx.par_chunks_mut(img).enumerate().for_each(|(b, d)| {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let r = &dcol[((b * g.ho + oh) * g.wo + ow) * k..][..k];
                    for ki in 0..g.kh {
                        let Some(ih) = src(oh, ki, g.stride, g.pad, g.h) else {
                            continue;
                        };
                        for kj in 0..g.kw {
                            let Some(iw) = src(ow, kj, g.stride, g.pad, g.w) else {
                                continue;
                            };
                            let p = (ih * g.w + iw) * g.cin + gi * cg;
                            for ci in 0..cg {
                                d[p + ci] += r[(ci * g.kh + ki) * g.kw + kj];
                            }
                        }
                    }
                }
            }
        });
    }

    /// A depthwise weight `[C, 1, kh, kw]` as `[kh * kw, C]` (channels
    /// contiguous, as the pixels are).
    fn taps_major(g: &Geom, w: &[f32]) -> Vec<f32> {
        let (c, t) = (g.cin, g.kh * g.kw);
        let mut wt = vec![0f32; c * t];
        for ci in 0..c {
            for tap in 0..t {
                wt[tap * c + ci] = w[ci * t + tap];
            }
        }
        wt
    }

    #[inline(always)]
    fn fma_into(acc: &mut [f32], a: &[f32], b: &[f32]) {
        for ((o, x), w) in acc.iter_mut().zip(a).zip(b) {
            *o += x * w;
        }
    }

    fn dw_forward(g: &Geom, x: &[f32], w: &[f32], bias: Option<&[f32]>, relu6: bool) -> Vec<f32> {
        let c = g.cin;
        let wt = taps_major(g, w);
        let mut y = vec![0f32; g.m() * c];
        // One task per output row (b, oh).
        y.par_chunks_mut(g.wo * c)
            .enumerate()
            .for_each(|(row, out)| {
                let (b, oh) = (row / g.ho, row % g.ho);
                simd::run(
                    #[inline(always)]
                    || {
                        if let Some(bias) = bias {
                            for px in out.chunks_exact_mut(c) {
                                px.copy_from_slice(bias);
                            }
                        }
                        for ki in 0..g.kh {
                            let Some(ih) = src(oh, ki, g.stride, g.pad, g.h) else {
                                continue;
                            };
                            let xrow = &x[(b * g.h + ih) * g.w * c..][..g.w * c];
                            for kj in 0..g.kw {
                                let wk = &wt[(ki * g.kw + kj) * c..][..c];
                                for ow in 0..g.wo {
                                    if let Some(iw) = src(ow, kj, g.stride, g.pad, g.w) {
                                        fma_into(
                                            &mut out[ow * c..(ow + 1) * c],
                                            &xrow[iw * c..(iw + 1) * c],
                                            wk,
                                        );
                                    }
                                }
                            }
                        }
                        if relu6 {
                            out.iter_mut().for_each(|v| *v = v.max(0.0).min(6.0));
                        }
                    },
                );
            });
        y
    }

    fn dw_input_grad(g: &Geom, w: &[f32], dy: &[f32]) -> Vec<f32> {
        let c = g.cin;
        let wt = taps_major(g, w);
        let mut dx = vec![0f32; g.b * g.h * g.w * c];
        let img = g.h * g.w * c;
        dx.par_chunks_mut(img).enumerate().for_each(|(b, d)| {
            simd::run(
                #[inline(always)]
                || {
                    for oh in 0..g.ho {
                        let dyrow = &dy[(b * g.ho + oh) * g.wo * c..][..g.wo * c];
                        for ki in 0..g.kh {
                            let Some(ih) = src(oh, ki, g.stride, g.pad, g.h) else {
                                continue;
                            };
                            for kj in 0..g.kw {
                                let wk = &wt[(ki * g.kw + kj) * c..][..c];
                                for ow in 0..g.wo {
                                    if let Some(iw) = src(ow, kj, g.stride, g.pad, g.w) {
                                        let p = (ih * g.w + iw) * c;
                                        fma_into(
                                            &mut d[p..p + c],
                                            &dyrow[ow * c..(ow + 1) * c],
                                            wk,
                                        );
                                    }
                                }
                            }
                        }
                    }
                },
            );
        });
        dx
    }

    /// dW of a depthwise convolution in torch's layout `[C, 1, kh, kw]`.
    fn dw_weight_grad(g: &Geom, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let (c, t) = (g.cin, g.kh * g.kw);
        let parts: Vec<Vec<f32>> = (0..g.b)
            .into_par_iter()
            .map(|b| {
                let mut acc = vec![0f32; t * c];
                simd::run(
                    #[inline(always)]
                    || {
                        for oh in 0..g.ho {
                            let dyrow = &dy[(b * g.ho + oh) * g.wo * c..][..g.wo * c];
                            for ki in 0..g.kh {
                                let Some(ih) = src(oh, ki, g.stride, g.pad, g.h) else {
                                    continue;
                                };
                                let xrow = &x[(b * g.h + ih) * g.w * c..][..g.w * c];
                                for kj in 0..g.kw {
                                    let a = &mut acc[(ki * g.kw + kj) * c..][..c];
                                    for ow in 0..g.wo {
                                        if let Some(iw) = src(ow, kj, g.stride, g.pad, g.w) {
                                            fma_into(
                                                a,
                                                &dyrow[ow * c..(ow + 1) * c],
                                                &xrow[iw * c..(iw + 1) * c],
                                            );
                                        }
                                    }
                                }
                            }
                        }
                    },
                );
                acc
            })
            .collect();
        let mut sum = vec![0f32; t * c];
        for p in parts {
            for (s, v) in sum.iter_mut().zip(p) {
                *s += v;
            }
        }
        let mut out = vec![0f32; c * t];
        for ci in 0..c {
            for tap in 0..t {
                out[ci * t + tap] = sum[tap * c + ci];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{check, randn};

    /// Every term of the definition: `f(output, input, weight)` indices
    /// (NHWC input and output, torch weight layout), padding skipped.
    fn taps(g: &Geom, mut f: impl FnMut(usize, usize, usize)) {
        let (cg_in, cg_out) = (g.cin / g.groups, g.cout / g.groups);
        for b in 0..g.b {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    for co in 0..g.cout {
                        let out = ((b * g.ho + oh) * g.wo + ow) * g.cout + co;
                        for ci in 0..cg_in {
                            for ki in 0..g.kh {
                                for kj in 0..g.kw {
                                    let ih = (oh * g.stride + ki) as isize - g.pad as isize;
                                    let iw = (ow * g.stride + kj) as isize - g.pad as isize;
                                    if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize
                                    {
                                        continue;
                                    }
                                    let px = (b * g.h + ih as usize) * g.w + iw as usize;
                                    let inp = px * g.cin + co / cg_out * cg_in + ci;
                                    let wt = ((co * cg_in + ci) * g.kh + ki) * g.kw + kj;
                                    f(out, inp, wt);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The direct definition in f64.
    fn reference(x: &[f64], w: &[f64], g: &Geom) -> Vec<f64> {
        let mut y = vec![0f64; g.m() * g.cout];
        taps(g, |o, i, k| y[o] += x[i] * w[k]);
        y
    }

    fn case(x: [usize; 4], w: [usize; 4], cfg: Conv2dCfg) {
        let g = Geom::new(&x, &w, cfg).unwrap();
        let xt = randn(&x, 1);
        let wt = randn(&w, 2);
        check(
            &[xt, wt],
            &|a| conv2d(&a[0].t, &a[1], cfg).unwrap(),
            &|a| reference(&a[0], &a[1], &g),
            3,
        );
    }

    #[test]
    fn pointwise_matches_the_definition() {
        case([2, 3, 4, 5], [6, 5, 1, 1], Conv2dCfg::default());
    }

    #[test]
    fn depthwise_matches_the_definition_with_stride_and_padding() {
        let cfg = |stride| Conv2dCfg {
            stride,
            padding: 1,
            groups: 4,
        };
        case([2, 5, 6, 4], [4, 1, 3, 3], cfg(1));
        case([2, 5, 6, 4], [4, 1, 3, 3], cfg(2));
    }

    /// Enough pixels that a weight gradient is summed in one row range per
    /// thread (`rows_product`), pointwise and through im2col: every element
    /// of dW against the f64 sum over pixels.
    #[test]
    fn weight_gradients_split_over_rows() {
        let check_big = |x: [usize; 4], w: [usize; 4], cfg: Conv2dCfg| {
            let g = Geom::new(&x, &w, cfg).unwrap();
            assert!(g.m() >= 1024 * rayon::current_num_threads().max(2));
            let (xt, wt) = (randn(&x, 3), Weight::trainable(&randn(&w, 4)).unwrap());
            let y = conv2d(&xt, &wt, cfg).unwrap();
            let r = randn(y.dims(), 5);
            (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let got = crate::nn::testing::flat(&wt.grad_tensor().unwrap().unwrap());
            let (xv, rv) = (crate::nn::testing::f64s(&xt), crate::nn::testing::f64s(&r));
            let mut want = vec![0f64; got.len()];
            taps(&g, |o, i, k| want[k] += rv[o] * xv[i]);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "dW[{i}]: {a} vs {b}"
                );
            }
        };
        check_big([1, 48, 48, 3], [4, 3, 1, 1], Conv2dCfg::default());
        let stem = Conv2dCfg {
            stride: 2,
            padding: 1,
            groups: 1,
        };
        check_big([2, 64, 64, 3], [4, 3, 3, 3], stem);
    }

    #[test]
    fn larger_images_match_the_definition() {
        let cfg = |stride, groups| Conv2dCfg {
            stride,
            padding: 1,
            groups,
        };
        case([2, 17, 16, 6], [6, 1, 3, 3], cfg(2, 6));
        case([2, 16, 16, 6], [6, 1, 3, 3], cfg(1, 6));
        case([2, 16, 15, 3], [4, 3, 3, 3], cfg(2, 1));
    }

    #[test]
    fn general_convolutions_match_the_definition() {
        // MobileNetV2's stem: 3x3, stride 2, padding 1, 3 -> 8 channels.
        case(
            [2, 7, 6, 3],
            [8, 3, 3, 3],
            Conv2dCfg {
                stride: 2,
                padding: 1,
                groups: 1,
            },
        );
        // Grouped, neither pointwise nor depthwise.
        case(
            [1, 5, 5, 4],
            [6, 2, 3, 2],
            Conv2dCfg {
                stride: 1,
                padding: 2,
                groups: 2,
            },
        );
        // 1x1 with stride 2 goes through im2col.
        case(
            [1, 5, 5, 3],
            [2, 3, 1, 1],
            Conv2dCfg {
                stride: 2,
                padding: 0,
                groups: 1,
            },
        );
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused_by_name() {
        let x = randn(&[1, 4, 4, 3], 1);
        let w = Weight::frozen(randn(&[4, 2, 3, 3], 2));
        let e = conv2d(&x, &w, Conv2dCfg::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("input has 3 channels"), "{e}");
        let x = randn(&[1, 3, 4, 4], 1);
        let w = Weight::frozen(randn(&[4, 4, 5, 5], 2));
        let e = conv2d(&x, &w, Conv2dCfg::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernel 5x5 larger"), "{e}");
    }
}
