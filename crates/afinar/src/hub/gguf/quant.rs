//! ggml's tensor types and the block formats afinar reads and writes:
//! F32, F16, BF16 and the 32-element blocks Q8_0, Q4_0 and Q4_1.
//!
//! Layouts follow ggml (`ggml/src/ggml-common.h`, `ggml-quants.c`, pinned at
//! <https://github.com/ggml-org/llama.cpp/tree/b4600/ggml/src>), all little-endian:
//!
//! | type | bytes / 32 values | block                          | value                 |
//! |------|-------------------|--------------------------------|-----------------------|
//! | Q8_0 | 34                | f16 d, 32 x i8 q               | q * d                 |
//! | Q4_0 | 18                | f16 d, 16 bytes of nibbles     | (q - 8) * d           |
//! | Q4_1 | 20                | f16 d, f16 m, 16 bytes nibbles | q * d + m             |
//!
//! Nibble order: byte j's low nibble is element j, its high nibble element
//! j + 16 (not 2j, 2j + 1). Quantisation is the reference (non-SIMD) rounding
//! of ggml: Q4_0 maps the value of largest magnitude to q = 0 (d = max / -8),
//! Q4_1 spans [min, max] with d = (max - min) / 15, Q8_0 uses d = amax / 127
//! with round-half-away-from-zero.
//!
//! A [`QTensor`] is a 2-D matrix in Hugging Face order (`[rows, cols]`, a row
//! is `cols` contiguous values = whole blocks), kept quantised — memory-mapped
//! from a GGUF file or owned — and dequantised a tile at a time by its users.

use crate::{Error, Result};
use half::{bf16, f16};
use std::sync::Arc;

/// A ggml tensor type, by the id stored in GGUF tensor infos.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    /// An id this table does not know.
    Unknown(u32),
}

/// The types afinar can dequantise (and the order error messages list them in).
pub const SUPPORTED_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
];

/// "F32, F16, BF16, Q8_0, Q4_0, Q4_1".
pub fn supported_types_list() -> String {
    SUPPORTED_TYPES
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Q4_0, Q4_1, Q8_0 (and the other legacy quants) pack 32 values per block.
pub const QK: usize = 32;

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            other => Unknown(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2_K => 10,
            Q3_K => 11,
            Q4_K => 12,
            Q5_K => 13,
            Q6_K => 14,
            Q8_K => 15,
            IQ2_XXS => 16,
            IQ2_XS => 17,
            IQ3_XXS => 18,
            IQ1_S => 19,
            IQ4_NL => 20,
            IQ3_S => 21,
            IQ2_S => 22,
            IQ4_XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1_M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            Unknown(id) => id,
        }
    }

    /// (values per block, bytes per block), where this table knows it. Used to
    /// bounds-check every tensor of a file, including those afinar cannot decode.
    pub fn layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            F64 | I64 => (1, 8),
            I32 => (1, 4),
            I16 => (1, 2),
            I8 => (1, 1),
            Q4_0 => (QK, 18),
            Q4_1 => (QK, 20),
            Q5_0 => (QK, 22),
            Q5_1 => (QK, 24),
            Q8_0 => (QK, 34),
            Q8_1 => (QK, 36),
            IQ4_NL => (QK, 18),
            MXFP4 => (QK, 17),
            Q2_K => (256, 84),
            Q3_K => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ4_XS => (256, 136),
            TQ1_0 => (256, 54),
            TQ2_0 => (256, 66),
            _ => return None,
        })
    }

    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }

    /// Values per block (1 for plain floats); None where unknown.
    pub fn block_size(self) -> Option<usize> {
        self.layout().map(|l| l.0)
    }

    /// Bytes for `n` values (`n` a multiple of the block size), where known.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (bs, ts) = self.layout()?;
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(ts)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "unknown type id {id}"),
            t => write!(f, "{t:?}"),
        }
    }
}

// ---------------------------------------------------------------- blocks

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantise whole blocks: `bytes` holds exactly the blocks of `out.len()` values.
/// `ty` must be supported. Compiled for each SIMD level (`simd`).
fn dequantize_span(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    crate::simd::run(
        #[inline(always)]
        || dequantize_span_at_level(ty, bytes, out),
    )
}

#[inline(always)]
fn dequantize_span_at_level(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = (q as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let q = b[2 + j];
                    lo[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                    hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let q = b[4 + j];
                    lo[j] = (q & 0x0f) as f32 * d + m;
                    hi[j] = (q >> 4) as f32 * d + m;
                }
            }
        }
        other => unreachable!("dequantize_span: {other} is not supported"),
    }
}

/// Q8_0 blocks of `x` (its length a multiple of 32).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK),
        "quantize_q8_0: {} values",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// Q4_0 blocks of `x` (its length a multiple of 32).
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK),
        "quantize_q4_0: {} values",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / QK * 18);
    for b in x.chunks_exact(QK) {
        // The signed value of largest magnitude becomes q = 0 exactly.
        let mut max = 0f32;
        for &v in b {
            if v.abs() > max.abs() {
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(b[j]) | (q(b[j + 16]) << 4));
        }
    }
    out
}

/// Q4_1 blocks of `x` (its length a multiple of 32).
pub fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    assert!(
        x.len().is_multiple_of(QK),
        "quantize_q4_1: {} values",
        x.len()
    );
    let mut out = Vec::with_capacity(x.len() / QK * 20);
    for b in x.chunks_exact(QK) {
        let min = b.iter().copied().fold(f32::INFINITY, f32::min);
        let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
        let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(b[j]) | (q(b[j + 16]) << 4));
        }
    }
    out
}

/// `x` encoded as `ty` (one of [`SUPPORTED_TYPES`]).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    Ok(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        GgmlType::BF16 => x
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 if !x.len().is_multiple_of(QK) => {
            return Err(Error::msg(format!(
                "cannot quantise {} values as {ty}: not a multiple of the block size {QK}",
                x.len()
            )))
        }
        GgmlType::Q8_0 => quantize_q8_0(x),
        GgmlType::Q4_0 => quantize_q4_0(x),
        GgmlType::Q4_1 => quantize_q4_1(x),
        other => {
            return Err(Error::msg(format!(
                "cannot quantise as {other}; supported: {}",
                supported_types_list()
            )))
        }
    })
}

// ---------------------------------------------------------------- QTensor

/// Where a quantised tensor's bytes live.
#[derive(Clone)]
pub enum QData {
    Owned(Vec<u8>),
    /// A byte range of a (memory-mapped) file, kept alive by the `Arc`.
    Mapped {
        map: Arc<crate::hub::FileBytes>,
        start: usize,
        len: usize,
    },
}

impl QData {
    pub fn bytes(&self) -> &[u8] {
        match self {
            QData::Owned(v) => v,
            QData::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

/// A quantised (or plain float) matrix in Hugging Face order: `shape = [rows,
/// cols]`, row-major, each row whole blocks. A 1-D tensor is one row.
#[derive(Clone)]
pub struct QTensor {
    ty: GgmlType,
    shape: [usize; 2],
    row_bytes: usize,
    data: QData,
}

impl std::fmt::Debug for QTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QTensor")
            .field("ty", &self.ty)
            .field("shape", &self.shape)
            .field("bytes", &self.data.bytes().len())
            .finish()
    }
}

impl QTensor {
    /// Check the type, the row length against the block size and the byte count.
    pub fn new(ty: GgmlType, shape: [usize; 2], data: QData) -> Result<Self> {
        let [rows, cols] = shape;
        if !ty.is_supported() {
            return Err(Error::msg(format!(
                "tensor type {ty} is not supported; supported: {}",
                supported_types_list()
            )));
        }
        let row_bytes = ty.bytes_for(cols).ok_or_else(|| {
            Error::msg(format!(
                "a {ty} row of {cols} values is not whole blocks of {}",
                ty.block_size().unwrap_or(1)
            ))
        })?;
        let want = rows.checked_mul(row_bytes);
        let have = data.bytes().len();
        if want != Some(have) {
            return Err(Error::msg(format!(
                "{ty} tensor [{rows}, {cols}] needs {} bytes, found {have}",
                want.map_or("too many".to_string(), |w| w.to_string())
            )));
        }
        Ok(QTensor {
            ty,
            shape,
            row_bytes,
            data,
        })
    }

    /// Quantise row-major `x` (`rows * cols` values) as `ty`.
    pub fn from_f32(ty: GgmlType, shape: [usize; 2], x: &[f32]) -> Result<Self> {
        if x.len() != shape[0] * shape[1] {
            return Err(Error::msg(format!(
                "QTensor::from_f32: {} values for shape {shape:?}",
                x.len()
            )));
        }
        Self::new(ty, shape, QData::Owned(quantize(ty, x)?))
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn shape(&self) -> [usize; 2] {
        self.shape
    }
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn cols(&self) -> usize {
        self.shape[1]
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }
    pub fn data(&self) -> &QData {
        &self.data
    }
    /// The encoded bytes of row `i`.
    pub fn row(&self, i: usize) -> &[u8] {
        &self.bytes()[i * self.row_bytes..(i + 1) * self.row_bytes]
    }

    /// Rows `row0 .. row0 + nrows` as f32 into `out` (`nrows * cols` values).
    /// Panics when the range is outside the tensor or `out` has the wrong length.
    pub fn dequantize_rows(&self, row0: usize, nrows: usize, out: &mut [f32]) {
        assert!(
            row0 + nrows <= self.rows() && out.len() == nrows * self.cols(),
            "dequantize_rows({row0}, {nrows}) of {:?} into {} values",
            self.shape,
            out.len()
        );
        let b = &self.bytes()[row0 * self.row_bytes..(row0 + nrows) * self.row_bytes];
        dequantize_span(self.ty, b, out);
    }

    /// Columns `col0 .. col0 + ncols` of every row, as a row-major
    /// `[rows, ncols]` f32 matrix into `out`. Both must be multiples of the
    /// block size (whole blocks are decoded, never split).
    pub fn dequantize_cols(&self, col0: usize, ncols: usize, out: &mut [f32]) {
        let bs = self.ty.block_size().unwrap_or(1);
        assert!(
            col0.is_multiple_of(bs)
                && ncols.is_multiple_of(bs)
                && col0 + ncols <= self.cols()
                && out.len() == self.rows() * ncols,
            "dequantize_cols({col0}, {ncols}) of {} {:?} into {} values",
            self.ty,
            self.shape,
            out.len()
        );
        let ts = self.ty.layout().map_or(4, |l| l.1);
        let (b0, b1) = (col0 / bs * ts, (col0 + ncols) / bs * ts);
        for (r, o) in out.chunks_exact_mut(ncols.max(1)).enumerate() {
            dequantize_span(self.ty, &self.row(r)[b0..b1], o);
        }
    }

    /// The whole matrix as row-major f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows() * self.cols()];
        // Large tensors (a 49152 x 576 embedding) dequantise in parallel by rows.
        use rayon::prelude::*;
        // Saturating: an empty tensor may have a huge row length.
        let chunk = self.cols().max(1).saturating_mul(256);
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| {
            let r0 = i * 256;
            self.dequantize_rows(r0, o.len() / self.cols().max(1), o);
        });
        out
    }

    /// The rows reordered: new row `i` is old row `perm[i]`. Rows are whole
    /// blocks, so a quantised tensor moves without requantising.
    pub fn permute_rows(&self, perm: &[usize]) -> Result<QTensor> {
        check_perm(perm, self.rows())?;
        let mut out = Vec::with_capacity(self.bytes().len());
        for &p in perm {
            out.extend_from_slice(self.row(p));
        }
        QTensor::new(self.ty, self.shape, QData::Owned(out))
    }
}

pub(crate) fn check_perm(perm: &[usize], n: usize) -> Result<()> {
    let mut seen = vec![false; n];
    if perm.len() != n
        || !perm
            .iter()
            .all(|&p| p < n && !std::mem::replace(&mut seen[p], true))
    {
        return Err(Error::msg(format!(
            "row permutation of length {} is not a permutation of 0..{n}",
            perm.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (rng.gen::<f32>() - 0.5) * 2.0 * scale)
            .collect()
    }

    fn roundtrip(ty: GgmlType, x: &[f32]) -> Vec<f32> {
        let q = QTensor::from_f32(ty, [x.len() / 64, 64], x).unwrap();
        q.to_f32_vec()
    }

    #[test]
    fn gguf_quant_roundtrip_within_format_error() {
        let x = randn(64 * 40, 1, 3.0);
        for ty in SUPPORTED_TYPES {
            let y = roundtrip(*ty, &x);
            for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let (min, max) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
                // Half a quantisation step (a whole one at Q4_0's clamped end),
                // plus the f16 rounding of the block's scale and offset.
                let tol = match ty {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => amax * 1e-3,
                    GgmlType::BF16 => amax * 8e-3,
                    GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * 1e-3,
                    GgmlType::Q4_0 => amax / 8.0 + amax * 1e-3,
                    GgmlType::Q4_1 => (max - min) / 15.0 * 0.5 + (max.abs() + min.abs()) * 1e-3,
                    _ => unreachable!(),
                };
                for (a, b2) in xb.iter().zip(yb) {
                    assert!(
                        (a - b2).abs() <= tol,
                        "{ty} block {b}: {a} vs {b2} (tol {tol})"
                    );
                }
            }
        }
        // All-zero blocks stay zero (d = 0 must not give NaN).
        for ty in SUPPORTED_TYPES {
            assert_eq!(roundtrip(*ty, &[0.0; 64]), vec![0.0; 64], "{ty}");
        }
    }

    /// Hand-built blocks: the byte layout and nibble order of ggml.
    #[test]
    fn gguf_quant_known_bytes() {
        // Q8_0: d = 0.5 (f16 0x3800), q = 0, 1, -1, 2, -2 ...
        let mut b = vec![0x00, 0x38];
        // The last value, 127, makes d = amax / 127 = 0.5 exactly when quantising back.
        let qs: Vec<i8> = (0..32)
            .map(|i| match i {
                31 => 127,
                i if i % 2 == 0 => i / 2,
                i => -(i / 2) - 1,
            })
            .collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let q = QTensor::new(GgmlType::Q8_0, [1, 32], QData::Owned(b.clone())).unwrap();
        let want: Vec<f32> = qs.iter().map(|&q| q as f32 * 0.5).collect();
        assert_eq!(q.to_f32_vec(), want);
        // Quantising those values gives the same bytes back.
        assert_eq!(quantize_q8_0(&want), b);

        // Q4_0: d = 2.0 (f16 0x4000); byte j = low nibble j, high nibble 15 - j.
        let mut b = vec![0x00, 0x40];
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let q = QTensor::new(GgmlType::Q4_0, [1, 32], QData::Owned(b)).unwrap();
        let v = q.to_f32_vec();
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 2.0, "element {j}");
            assert_eq!(
                v[j + 16],
                ((15 - j) as f32 - 8.0) * 2.0,
                "element {}",
                j + 16
            );
        }
        // ggml's rounding: the largest magnitude (-16 here) maps to q = 0.
        let x: Vec<f32> = (0..32).map(|i| if i == 5 { -16.0 } else { 0.0 }).collect();
        let bytes = quantize_q4_0(&x);
        assert_eq!(&bytes[..2], &f16::from_f32(2.0).to_bits().to_le_bytes());
        assert_eq!(bytes[2 + 5] & 0x0f, 0);
        assert_eq!(bytes[2], 0x88); // zeros are q = 8 in both nibbles

        // Q4_1: d = 0.25 (0x3400), m = -1.0 (0xbc00); byte j = nibbles (j, 1).
        let mut b = vec![0x00, 0x34, 0x00, 0xbc];
        b.extend((0..16u8).map(|j| j | (1 << 4)));
        let q = QTensor::new(GgmlType::Q4_1, [1, 32], QData::Owned(b.clone())).unwrap();
        let v = q.to_f32_vec();
        for j in 0..16 {
            assert_eq!(v[j], j as f32 * 0.25 - 1.0);
            assert_eq!(v[j + 16], 0.25 - 1.0);
        }
        // On the grid of min -1 and max 2.75: quantising gives the same bytes back.
        assert_eq!(quantize_q4_1(&v), b);

        // F16 / BF16 / F32 are plain little-endian values.
        let q = QTensor::new(
            GgmlType::F16,
            [1, 2],
            QData::Owned(vec![0x00, 0x3c, 0x00, 0xc0]),
        )
        .unwrap();
        assert_eq!(q.to_f32_vec(), vec![1.0, -2.0]);
        let q = QTensor::new(
            GgmlType::BF16,
            [1, 2],
            QData::Owned(vec![0x80, 0x3f, 0x40, 0xc0]),
        )
        .unwrap();
        assert_eq!(q.to_f32_vec(), vec![1.0, -3.0]);
    }

    #[test]
    fn gguf_quant_rows_cols_and_checks() {
        let x = randn(6 * 96, 2, 1.0);
        let q = QTensor::from_f32(GgmlType::Q4_1, [6, 96], &x).unwrap();
        let full = q.to_f32_vec();
        let mut rows = vec![0f32; 2 * 96];
        q.dequantize_rows(3, 2, &mut rows);
        assert_eq!(rows, full[3 * 96..5 * 96]);
        let mut cols = vec![0f32; 6 * 32];
        q.dequantize_cols(32, 32, &mut cols);
        for r in 0..6 {
            assert_eq!(cols[r * 32..(r + 1) * 32], full[r * 96 + 32..r * 96 + 64]);
        }
        let p = q.permute_rows(&[5, 4, 3, 2, 1, 0]).unwrap();
        assert_eq!(p.row(0), q.row(5));
        assert!(q.permute_rows(&[0, 0, 1, 2, 3, 4]).is_err());
        // Rows must be whole blocks; byte counts must match.
        let err = QTensor::from_f32(GgmlType::Q8_0, [1, 40], &[0.0; 40]).unwrap_err();
        assert!(err.to_string().contains("block"), "{err}");
        let err = QTensor::new(GgmlType::Q8_0, [2, 32], QData::Owned(vec![0; 34])).unwrap_err();
        assert!(err.to_string().contains("68 bytes"), "{err}");
        let err = QTensor::new(GgmlType::Q5_K, [1, 256], QData::Owned(vec![0; 176])).unwrap_err();
        assert!(
            err.to_string().contains("Q5_K") && err.to_string().contains("Q4_1"),
            "{err}"
        );
        assert_eq!(GgmlType::from_id(13), GgmlType::Q5_K);
        assert_eq!(GgmlType::from_id(3).id(), 3);
        assert_eq!(GgmlType::from_id(99).to_string(), "unknown type id 99");
    }
}
