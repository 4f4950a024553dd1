//! A small GGUF (version 3, little-endian) writer: metadata and tensors of the
//! types in [`super::quant::SUPPORTED_TYPES`], each tensor's data aligned to
//! `general.alignment` (default 32). Written atomically: to a temporary name,
//! fsynced, renamed (`crate::fsutil`), so a reader never sees half a file.
//!
//! Layout as read by [`super::Gguf::open`]; see the module header there.

use super::quant::{self, GgmlType, QTensor};
use super::{GgufValue, GgufValueType, DEFAULT_ALIGNMENT, MAGIC};
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

struct PendingTensor {
    name: String,
    ty: GgmlType,
    /// ggml order (ne[0] fastest).
    ne: Vec<u64>,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes one GGUF file.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a metadata entry (keys are unique; arrays must hold their declared type).
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> Result<&mut Self> {
        let key = key.into();
        if self.metadata.iter().any(|(k, _)| *k == key) {
            return Err(Error::msg(format!(
                "GGUF writer: metadata key `{key}` added twice"
            )));
        }
        check_value(&key, &value)?;
        if key == "general.alignment" {
            match value {
                GgufValue::U32(a) if a.is_power_of_two() => {}
                _ => {
                    return Err(Error::msg(format!(
                        "GGUF writer: general.alignment must be a u32 power of two, found {value:?}"
                    )))
                }
            }
        }
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Add a tensor of Hugging Face shape `shape` from f32 values, encoded as `ty`.
    pub fn add_f32(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[usize],
        values: &[f32],
    ) -> Result<&mut Self> {
        let name = name.into();
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::Tensor {
                name,
                msg: format!("{} values for shape {shape:?}", values.len()),
            });
        }
        if ty
            .block_size()
            .is_some_and(|bs| shape.last().copied().unwrap_or(1) % bs != 0)
        {
            return Err(Error::Tensor {
                name,
                msg: format!("last dimension of {shape:?} is not whole {ty} blocks"),
            });
        }
        let data = quant::quantize(ty, values).map_err(|e| Error::Tensor {
            name: name.clone(),
            msg: e.to_string(),
        })?;
        self.add_raw(name, ty, shape, data)
    }

    /// Add a [`QTensor`] as it is (no requantisation); `shape` (Hugging Face
    /// order) defaults to its `[rows, cols]`, or `[cols]` for one row.
    pub fn add_qtensor(
        &mut self,
        name: impl Into<String>,
        q: &QTensor,
        shape: Option<&[usize]>,
    ) -> Result<&mut Self> {
        let default = if q.rows() == 1 {
            vec![q.cols()]
        } else {
            q.shape().to_vec()
        };
        let shape = shape.map(<[usize]>::to_vec).unwrap_or(default);
        self.add_raw(name, q.ty(), &shape, q.bytes().to_vec())
    }

    /// Add already-encoded bytes of any type whose block layout is known.
    pub fn add_raw(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[usize],
        data: Vec<u8>,
    ) -> Result<&mut Self> {
        let name = name.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::Tensor {
                name,
                msg: "added twice to the GGUF writer".into(),
            });
        }
        if shape.is_empty() || shape.len() > super::MAX_DIMS {
            return Err(Error::Tensor {
                name,
                msg: format!(
                    "GGUF tensors have 1 to {} dimensions, not {shape:?}",
                    super::MAX_DIMS
                ),
            });
        }
        let want = ty.layout().and_then(|(bs, _)| {
            (shape.last().copied().unwrap_or(1) % bs == 0)
                .then(|| ty.bytes_for(shape.iter().product()))
                .flatten()
        });
        if want != Some(data.len()) {
            return Err(Error::Tensor {
                name,
                msg: format!(
                    "{ty} {shape:?} needs {} bytes, got {}",
                    want.map_or("whole blocks and a known layout".into(), |w| w.to_string()),
                    data.len()
                ),
            });
        }
        self.tensors.push(PendingTensor {
            name,
            ty,
            ne: shape.iter().rev().map(|&d| d as u64).collect(),
            data,
        });
        Ok(self)
    }

    fn alignment(&self) -> usize {
        self.metadata
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", GgufValue::U32(a)) => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Stream the file into `w`.
    pub fn write_to(&self, w: &mut impl Write) -> std::io::Result<()> {
        let align = self.alignment();
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut head, k);
            head.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut head, v);
        }
        let padded = |n: usize| n.div_ceil(align) * align;
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += padded(t.data.len()) as u64;
        }
        // Zero padding up to the data region, and after each tensor.
        head.resize(padded(head.len()), 0);
        w.write_all(&head)?;
        let zeros = vec![0u8; align];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            w.write_all(&zeros[..padded(t.data.len()) - t.data.len()])?;
        }
        Ok(())
    }

    /// The whole file in memory (tests, small files).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_to(&mut v).expect("writing to a Vec");
        v
    }

    /// Write atomically to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::fsutil::write_atomic_with(path.as_ref(), |w| self.write_to(w))
    }
}

fn check_value(key: &str, v: &GgufValue) -> Result<()> {
    if let GgufValue::Array(t, items) = v {
        for (i, item) in items.iter().enumerate() {
            if item.value_type() != *t {
                return Err(Error::msg(format!(
                    "GGUF writer: metadata `{key}` is an array of {t:?} but element {i} is {:?}",
                    item.value_type()
                )));
            }
            check_value(key, item)?;
        }
    }
    Ok(())
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn put_value(buf: &mut Vec<u8>, v: &GgufValue) {
    use GgufValue as V;
    match v {
        V::U8(x) => buf.push(*x),
        V::I8(x) => buf.push(*x as u8),
        V::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => buf.push(*x as u8),
        V::String(s) => put_string(buf, s),
        V::Array(t, items) => {
            buf.extend_from_slice(&(*t as u32).to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                put_value(buf, it);
            }
        }
    }
}

/// `GgufValue::Array` of strings.
pub fn str_array<S: AsRef<str>>(items: &[S]) -> GgufValue {
    GgufValue::Array(
        GgufValueType::String,
        items
            .iter()
            .map(|s| GgufValue::String(s.as_ref().to_string()))
            .collect(),
    )
}
