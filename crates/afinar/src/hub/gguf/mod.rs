//! GGUF files (llama.cpp's single-file checkpoints), version 2 and 3,
//! little-endian, read over a memory map and validated before any tensor is used.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/v0.9.4/docs/gguf.md>. In order:
//! magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; the metadata
//! (key: u64-length string, u32 value type, value; arrays are a u32 element
//! type, a u64 length and the elements); the tensor infos (name, u32 n_dims,
//! n_dims x u64 `ne`, u32 ggml type, u64 offset); padding to
//! `general.alignment` (default 32); the data region, where each tensor's
//! offset is relative to the region's start and a multiple of the alignment.
//!
//! Dimensions are ggml's: `ne[0]` is the fastest-varying axis, so a GGUF
//! `[ne0 = in, ne1 = out]` weight is the Hugging Face `[out, in]` matrix; every
//! shape this module returns is in Hugging Face order (reversed).
//!
//! - `quant`: ggml types, the Q8_0 / Q4_0 / Q4_1 block formats, [`QTensor`].
//! - `llama`: GGUF -> HF tensor names, config.json, the Q/K row un-permutation.
//! - `tokenizer`: the BPE tokenizer and chat template stored in the metadata.
//! - `writer`: a small GGUF writer (F32, F16, BF16, Q8_0, Q4_0, Q4_1 tensors).
//!
//! Limits: big-endian files and GGUF v1 are refused; only the types in
//! [`quant::SUPPORTED_TYPES`] can be dequantised (every type is listed and
//! bounds-checked where its block layout is known).

pub mod llama;
pub mod quant;
pub mod tokenizer;
pub mod writer;

pub use llama::{
    gguf_name, hf_name, llama_config_from_gguf, llama_qtensor, llama_tensor_f32, permute_qk,
    permute_qk_q, unpermute_qk, unpermute_qk_q,
};
pub use quant::{GgmlType, QData, QTensor};
pub use tokenizer::{tokenizer_from_gguf, GgufTokenizer};
pub use writer::GgufWriter;

use super::FileBytes;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `GGUF` as the first four bytes.
pub const MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;

/// What went wrong reading a GGUF file, and where.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file: starts with {found:02x?}, expected \"GGUF\" (47 47 55 46)")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error(
        "{path}: GGUF version {version}{note} is not supported (supported: 2, 3, little-endian)"
    )]
    UnsupportedVersion {
        path: PathBuf,
        version: u32,
        note: &'static str,
    },
    #[error("{path}: truncated: {what} needs bytes {start}..{end} but the file has {len} bytes")]
    Truncated {
        path: PathBuf,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: tensor {tensor} has type {ty}, supported: {supported}")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        ty: GgmlType,
        supported: String,
    },
    #[error("{path}: general.architecture is `{found}`, supported: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },
    #[error("{path}: metadata `{key}`: {msg}")]
    Metadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

impl From<GgufError> for crate::Error {
    fn from(e: GgufError) -> Self {
        crate::Error::Msg(e.to_string())
    }
}

pub type GgufResult<T> = std::result::Result<T, GgufError>;

// ---------------------------------------------------------------- values

/// The metadata value types; a type's GGUF id is its position
/// (`as u32`, and [`GgufValueType::from_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// Every type, in the order of their GGUF ids.
    const ALL: [GgufValueType; 13] = {
        use GgufValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
    };

    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.get(id as usize).copied()
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// The element type (kept for empty arrays and for writing) and the items.
    Array(GgufValueType, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValue as V;
        use GgufValueType as T;
        match self {
            V::U8(_) => T::U8,
            V::I8(_) => T::I8,
            V::U16(_) => T::U16,
            V::I16(_) => T::I16,
            V::U32(_) => T::U32,
            V::I32(_) => T::I32,
            V::F32(_) => T::F32,
            V::Bool(_) => T::Bool,
            V::String(_) => T::String,
            V::Array(..) => T::Array,
            V::U64(_) => T::U64,
            V::I64(_) => T::I64,
            V::F64(_) => T::F64,
        }
    }

    /// Any integer, as i128 (so every GGUF integer fits).
    pub fn as_int(&self) -> Option<i128> {
        use GgufValue as V;
        Some(match *self {
            V::U8(v) => v as i128,
            V::I8(v) => v as i128,
            V::U16(v) => v as i128,
            V::I16(v) => v as i128,
            V::U32(v) => v as i128,
            V::I32(v) => v as i128,
            V::U64(v) => v as i128,
            V::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// Floats, and integers as floats.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, items) => Some(items),
            _ => None,
        }
    }

    /// A short description for error messages: the type, and the value unless long.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(t, items) => format!("an array of {} {t:?}", items.len()),
            GgufValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            v => format!("{:?}", v),
        }
    }
}

// ---------------------------------------------------------------- tensor infos

/// What the file says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: `ne[0]` (the fastest axis) first.
    pub ne: Vec<u64>,
    /// Relative to the data region.
    pub offset: u64,
    /// Bytes of data, where the type's block layout is known.
    pub nbytes: Option<u64>,
}

impl GgufTensorInfo {
    /// The shape in Hugging Face order (`ne` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
    /// As a matrix: `[rows, cols]` with `cols = ne[0]` and the other axes folded into rows.
    pub fn matrix_shape(&self) -> [usize; 2] {
        let cols = self.ne.first().copied().unwrap_or(1) as usize;
        let rows = self.ne.iter().skip(1).product::<u64>() as usize;
        [rows, cols]
    }
}

// ---------------------------------------------------------------- reading

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

/// Strings and arrays nest at most this deep (the spec allows arrays of arrays).
const MAX_NESTING: usize = 8;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> GgufResult<&'a [u8]> {
        let start = self.pos as u64;
        let end = start.saturating_add(n);
        if end > self.buf.len() as u64 {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what(),
                start,
                end,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> GgufResult<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> GgufResult<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> GgufResult<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> GgufResult<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| GgufError::Invalid {
            path: self.path.to_path_buf(),
            msg: format!("{}: string is not UTF-8: {e}", what()),
        })
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> GgufResult<GgufValue> {
        use GgufValue as V;
        let t = GgufValueType::from_id(ty).ok_or_else(|| GgufError::Invalid {
            path: self.path.to_path_buf(),
            msg: format!("{}: unknown value type {ty}", what()),
        })?;
        Ok(match t {
            GgufValueType::U8 => V::U8(self.array::<1>(what)?[0]),
            GgufValueType::I8 => V::I8(self.array::<1>(what)?[0] as i8),
            GgufValueType::U16 => V::U16(u16::from_le_bytes(self.array(what)?)),
            GgufValueType::I16 => V::I16(i16::from_le_bytes(self.array(what)?)),
            GgufValueType::U32 => V::U32(self.u32(what)?),
            GgufValueType::I32 => V::I32(i32::from_le_bytes(self.array(what)?)),
            GgufValueType::F32 => V::F32(f32::from_le_bytes(self.array(what)?)),
            GgufValueType::U64 => V::U64(self.u64(what)?),
            GgufValueType::I64 => V::I64(i64::from_le_bytes(self.array(what)?)),
            GgufValueType::F64 => V::F64(f64::from_le_bytes(self.array(what)?)),
            GgufValueType::Bool => match self.array::<1>(what)?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => {
                    return Err(GgufError::Invalid {
                        path: self.path.to_path_buf(),
                        msg: format!("{}: bool byte is {b}, expected 0 or 1", what()),
                    })
                }
            },
            GgufValueType::String => V::String(self.string(what)?),
            GgufValueType::Array => {
                if depth >= MAX_NESTING {
                    return Err(GgufError::Invalid {
                        path: self.path.to_path_buf(),
                        msg: format!("{}: arrays nested deeper than {MAX_NESTING}", what()),
                    });
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                let elem = GgufValueType::from_id(et).ok_or_else(|| GgufError::Invalid {
                    path: self.path.to_path_buf(),
                    msg: format!("{}: unknown array element type {et}", what()),
                })?;
                // Every element takes at least one byte: a corrupt length cannot
                // make us allocate more than the file holds.
                let mut items = Vec::with_capacity(n.min(self.remaining()) as usize);
                for i in 0..n {
                    let w = || format!("{} element {i}", what());
                    items.push(self.value(et, depth + 1, &w)?);
                }
                V::Array(elem, items)
            }
        })
    }
}

/// A validated, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Arc<FileBytes>,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Map and validate: header, metadata, tensor infos, alignment, and that
    /// every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> GgufResult<Self> {
        let path = path.as_ref();
        let io = |e| GgufError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let map = FileBytes::map(&file).map_err(io)?;
        Self::parse(path, Arc::new(map))
    }

    /// A GGUF file already in memory, validated as [`Gguf::open`] validates a
    /// file; `name` stands for the file in errors and [`Gguf::path`].
    pub fn from_bytes(name: impl AsRef<Path>, bytes: Vec<u8>) -> GgufResult<Self> {
        Self::parse(name.as_ref(), Arc::new(FileBytes::Owned(bytes)))
    }

    fn parse(path: &Path, map: Arc<FileBytes>) -> GgufResult<Self> {
        let buf: &[u8] = &map;
        let mut c = Cursor { buf, pos: 0, path };
        let header = || "the header".to_string();
        let magic = c.take(4, &header)?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&header)?;
        if version != 2 && version != 3 {
            let note = if matches!(version.swap_bytes(), 2 | 3) {
                " (a big-endian file)"
            } else {
                ""
            };
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
                note,
            });
        }
        let n_tensors = c.u64(&header)?;
        let n_kv = c.u64(&header)?;
        let invalid = |msg: String| GgufError::Invalid {
            path: path.to_path_buf(),
            msg,
        };

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let what = || format!("metadata entry {i} of {n_kv}");
            let key = c.string(&what)?;
            let what = || format!("metadata entry {i} of {n_kv} (`{key}`)");
            let ty = c.u32(&what)?;
            let value = c.value(ty, 0, &what)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(invalid(format!("metadata key `{key}` appears twice")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_int() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() && a <= 1 << 30 => a as usize,
                _ => {
                    return Err(GgufError::Metadata {
                        path: path.to_path_buf(),
                        key: "general.alignment".into(),
                        msg: format!("must be a power of two, found {}", v.describe()),
                    })
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors.min(c.remaining()) as usize);
        let mut index = HashMap::new();
        for i in 0..n_tensors {
            let what = || format!("tensor info {i} of {n_tensors}");
            let name = c.string(&what)?;
            let what = || format!("tensor info {i} of {n_tensors} (`{name}`)");
            let n_dims = c.u32(&what)? as usize;
            // ggml writes at least one dimension (`ggml_n_dims` >= 1), as afinar's writer does.
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(invalid(format!(
                    "tensor `{name}` has {n_dims} dimensions, GGUF tensors have 1 to {MAX_DIMS}"
                )));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                ne.push(c.u64(&what)?);
            }
            let ty = GgmlType::from_id(c.u32(&what)?);
            let offset = c.u64(&what)?;
            // ggml's dimensions are i64. Each, and their product with a zero
            // dimension counted as 1 (an empty tensor's other dimensions still
            // size its strides and `[rows, cols]`), must fit.
            let numel = ne
                .iter()
                .try_fold(1i64, |a, &d| {
                    i64::try_from(d.max(1)).ok().and_then(|d| a.checked_mul(d))
                })
                .map(|_| ne.iter().product::<u64>());
            let nbytes = match (numel, ty.layout()) {
                (None, _) => {
                    return Err(invalid(format!(
                        "tensor `{name}`: dimensions {ne:?} overflow"
                    )))
                }
                (Some(n), Some((bs, ts))) => {
                    let row = ne[0]; // n_dims >= 1
                    if row % bs as u64 != 0 {
                        return Err(invalid(format!(
                            "tensor `{name}`: {ty} rows of {row} values are not whole blocks of {bs}"
                        )));
                    }
                    Some(
                        (n / bs as u64).checked_mul(ts as u64).ok_or_else(|| {
                            invalid(format!("tensor `{name}`: byte size overflows"))
                        })?,
                    )
                }
                (Some(_), None) => None,
            };
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(invalid(format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo {
                name,
                ty,
                ne,
                offset,
                nbytes,
            });
        }

        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let len = buf.len() as u64;
        for t in &tensors {
            if t.offset % alignment as u64 != 0 {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    msg: format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                });
            }
            let start = (data_offset as u64).saturating_add(t.offset);
            let end = start.saturating_add(t.nbytes.unwrap_or(0));
            if end > len || start > len {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!("tensor `{}` ({} {:?}) data", t.name, t.ty, t.shape()),
                    start,
                    end,
                    len,
                });
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            map,
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Where the data region starts in the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, msg: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    fn require(&self, key: &str) -> GgufResult<&GgufValue> {
        self.get(key).ok_or_else(|| self.meta_err(key, "missing"))
    }

    fn int_in<T: TryFrom<i128>>(&self, key: &str, v: &GgufValue, want: &str) -> GgufResult<T> {
        v.as_int()
            .and_then(|i| T::try_from(i).ok())
            .ok_or_else(|| self.meta_err(key, format!("expected {want}, found {}", v.describe())))
    }

    /// An integer metadata value that fits in u32 (any integer type is accepted).
    pub fn get_u32(&self, key: &str) -> GgufResult<u32> {
        self.int_in(key, self.require(key)?, "an integer in u32 range")
    }
    pub fn get_u64(&self, key: &str) -> GgufResult<u64> {
        self.int_in(key, self.require(key)?, "a non-negative integer")
    }
    /// A float (f32 or f64) or integer metadata value, as f32.
    pub fn get_f32(&self, key: &str) -> GgufResult<f32> {
        let v = self.require(key)?;
        v.as_f64()
            .map(|f| f as f32)
            .ok_or_else(|| self.meta_err(key, format!("expected a number, found {}", v.describe())))
    }
    pub fn get_bool(&self, key: &str) -> GgufResult<bool> {
        let v = self.require(key)?;
        v.as_bool()
            .ok_or_else(|| self.meta_err(key, format!("expected a bool, found {}", v.describe())))
    }
    pub fn get_str(&self, key: &str) -> GgufResult<&str> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.meta_err(key, format!("expected a string, found {}", v.describe())))
    }
    pub fn get_array(&self, key: &str) -> GgufResult<&[GgufValue]> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.meta_err(key, format!("expected an array, found {}", v.describe())))
    }
    pub fn get_str_array(&self, key: &str) -> GgufResult<Vec<&str>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().ok_or_else(|| {
                    self.meta_err(
                        key,
                        format!("element {i}: expected a string, found {}", v.describe()),
                    )
                })
            })
            .collect()
    }
    /// An array of integers (each fitting i64).
    pub fn get_int_array(&self, key: &str) -> GgufResult<Vec<i64>> {
        self.get_array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| self.int_in(key, v, &format!("element {i} an integer")))
            .collect()
    }

    /// `Ok(None)` when absent, an error when present with the wrong type.
    pub fn opt_u32(&self, key: &str) -> GgufResult<Option<u32>> {
        self.get(key).map(|_| self.get_u32(key)).transpose()
    }
    pub fn opt_f32(&self, key: &str) -> GgufResult<Option<f32>> {
        self.get(key).map(|_| self.get_f32(key)).transpose()
    }
    pub fn opt_bool(&self, key: &str) -> GgufResult<Option<bool>> {
        self.get(key).map(|_| self.get_bool(key)).transpose()
    }
    pub fn opt_str(&self, key: &str) -> GgufResult<Option<&str>> {
        self.get(key).map(|_| self.get_str(key)).transpose()
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> GgufResult<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn info_or_err(&self, name: &str) -> GgufResult<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg: format!("not in the file ({} tensors)", self.tensors.len()),
        })
    }

    fn unsupported(&self, t: &GgufTensorInfo) -> GgufError {
        GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            ty: t.ty,
            supported: quant::supported_types_list(),
        }
    }

    /// The tensor's raw bytes (known layouts only).
    pub fn tensor_bytes(&self, name: &str) -> GgufResult<&[u8]> {
        let t = self.info_or_err(name)?;
        let n = t.nbytes.ok_or_else(|| self.unsupported(t))? as usize;
        let start = self.data_offset + t.offset as usize;
        Ok(&self.map[start..start + n])
    }

    /// The tensor as a [`QTensor`] `[rows, cols]` (cols = `ne[0]`, the other
    /// axes folded into rows), its bytes still in the memory map.
    pub fn qtensor(&self, name: &str) -> GgufResult<QTensor> {
        let t = self.info_or_err(name)?;
        if !t.ty.is_supported() {
            return Err(self.unsupported(t));
        }
        let len = t.nbytes.expect("supported types have a layout") as usize;
        let data = QData::Mapped {
            map: self.map.clone(),
            start: self.data_offset + t.offset as usize,
            len,
        };
        QTensor::new(t.ty, t.matrix_shape(), data).map_err(|e| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg: e.to_string(),
        })
    }

    /// The tensor dequantised to f32, in Hugging Face shape (GGUF dims reversed).
    pub fn tensor_f32(&self, name: &str) -> GgufResult<Tensor> {
        let q = self.qtensor(name)?;
        let shape = self.info_or_err(name)?.shape();
        Tensor::from_vec(q.to_f32_vec(), shape, &Device::Cpu).map_err(|e| GgufError::Tensor {
            path: self.path.clone(),
            tensor: name.to_string(),
            msg: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests;
