//! Safetensors checkpoints: one `model.safetensors`, or a
//! `model.safetensors.index.json` plus its shards, memory-mapped and checked
//! before any tensor is read.
//!
//! Format: <https://github.com/huggingface/safetensors/blob/v0.6.2/README.md#format>
//! (8-byte little-endian header length N, N bytes of JSON, then the data region;
//! each tensor's `data_offsets` are relative to the start of the data region).
//! The header is parsed here rather than by `safetensors::SafeTensors` so that
//! every error can name the file, the tensor and the sizes involved.
//!
//! Limits: tensors are read on the CPU; `load_f32` converts float dtypes only.

use super::FileBytes;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file names Hugging Face uses for an unsharded / sharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// What the header says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The safetensors dtype name, e.g. `F32`, `BF16`, `I64`.
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The file holding the tensor (a shard, for sharded checkpoints).
    pub file: PathBuf,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Shard {
    path: PathBuf,
    mmap: FileBytes,
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    shard: usize,
    /// Absolute byte range inside the shard file (header already skipped).
    start: usize,
    end: usize,
}

/// A validated, memory-mapped safetensors checkpoint.
pub struct Checkpoint {
    path: PathBuf,
    shards: Vec<Shard>,
    tensors: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field(
                "shards",
                &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>(),
            )
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

#[derive(serde::Deserialize)]
struct Index {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    weight_map: BTreeMap<String, String>,
}

fn parse_dtype(s: &str) -> Option<Dtype> {
    // safetensors' own serde names are the spec's names (`F32`, `BF16`, `F8_E4M3` ...).
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

fn dtype_name(d: Dtype) -> String {
    match serde_json::to_value(d) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{d:?}"),
    }
}

/// Read and validate one safetensors file: header length, JSON, dtypes,
/// shapes against byte lengths, offsets inside the data region and not overlapping.
type ShardContents = (Shard, Vec<(String, Entry)>, BTreeMap<String, String>);

fn open_shard(path: &Path) -> Result<ShardContents> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bytes = FileBytes::map(&file).map_err(|e| Error::io(path, e))?;
    parse_shard(path, bytes)
}

/// [`open_shard`] on bytes already read; `path` only names them in errors.
fn parse_shard(path: &Path, mmap: FileBytes) -> Result<ShardContents> {
    let file_len = mmap.len();
    if file_len < 8 {
        return Err(Error::file(
            path,
            format!(
                "not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
            ),
        ));
    }
    let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
    let header_end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
        Error::file(
            path,
            format!(
                "truncated or not safetensors: header length says {n} bytes but the file has only {} after the length prefix ({file_len} bytes in all)",
                file_len - 8
            ),
        )
    })?;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&mmap[8..header_end])
        .map_err(|e| {
            Error::file(
                path,
                format!("corrupt safetensors header (JSON, {n} bytes): {e}"),
            )
        })?;
    let data_len = file_len - header_end;

    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                Error::file(
                    path,
                    format!("header `__metadata__` must map strings to strings: {e}"),
                )
            })?;
            continue;
        }
        let h: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| Error::file(path, format!("tensor `{name}`: bad header entry: {e}")))?;
        let dtype = parse_dtype(&h.dtype).ok_or_else(|| {
            Error::file(
                path,
                format!("tensor `{name}`: unknown dtype `{}`", h.dtype),
            )
        })?;
        let [begin, end] = h.data_offsets;
        if begin > end {
            return Err(Error::file(
                path,
                format!("tensor `{name}`: data_offsets [{begin}, {end}] are reversed"),
            ));
        }
        let bits = h
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|numel| numel.checked_mul(dtype.bitsize()));
        let expected = match bits {
            Some(b) if b % 8 == 0 => b / 8,
            _ => {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor `{name}`: shape {:?} of {} does not fill whole bytes",
                        h.shape, h.dtype
                    ),
                ))
            }
        };
        if end - begin != expected {
            return Err(Error::file(
                path,
                format!(
                    "tensor `{name}`: {} {:?} needs {expected} bytes but data_offsets [{begin}, {end}] hold {}",
                    h.dtype,
                    h.shape,
                    end - begin
                ),
            ));
        }
        if end > data_len {
            return Err(Error::file(
                path,
                format!(
                    "truncated: tensor `{name}` ends at byte {end} of the data region, which holds only {data_len} bytes (file is {file_len} bytes, needs at least {})",
                    header_end + end
                ),
            ));
        }
        entries.push((
            name,
            Entry {
                dtype,
                shape: h.shape,
                shard: 0,
                start: header_end + begin,
                end: header_end + end,
            },
        ));
    }
    // Overlapping tensors mean a corrupt header (the spec forbids them); holes are tolerated.
    let mut by_offset: Vec<&(String, Entry)> = entries.iter().collect();
    by_offset.sort_by_key(|(_, e)| (e.start, e.end));
    for w in by_offset.windows(2) {
        let ((a, ea), (b, eb)) = (w[0], w[1]);
        if eb.start < ea.end {
            return Err(Error::file(
                path,
                format!("corrupt header: tensors `{a}` and `{b}` overlap"),
            ));
        }
    }
    Ok((
        Shard {
            path: path.to_path_buf(),
            mmap,
        },
        entries,
        metadata,
    ))
}

/// Which files make up the checkpoint at `path`.
enum Layout {
    Single(PathBuf),
    Index(PathBuf),
}

/// A relative path of plain names only (no `..`, `.`, root or drive prefix).
pub(crate) fn is_plain_relative(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn layout(path: &Path) -> Result<Layout> {
    if path.is_file() {
        super::pickle::refuse(path)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        return Ok(if name.ends_with(".index.json") {
            Layout::Index(path.into())
        } else {
            Layout::Single(path.into())
        });
    }
    if !path.is_dir() {
        return Err(Error::file(path, "no such checkpoint file or folder"));
    }
    let single = path.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(Layout::Single(single));
    }
    let index = path.join(INDEX_FILE);
    if index.is_file() {
        return Ok(Layout::Index(index));
    }
    // Not the standard names: accept a folder with exactly one index, or exactly one file.
    let mut names: Vec<String> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .collect();
    names.sort();
    let indexes: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .collect();
    let files: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    match (indexes.as_slice(), files.as_slice()) {
        ([one], _) => Ok(Layout::Index(path.join(one))),
        ([], [one]) => Ok(Layout::Single(path.join(one))),
        _ => {
            let hint = if names
                .iter()
                .any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
            {
                " (found PyTorch pickle weights, which afinar never loads since unpickling can run arbitrary code: convert them to safetensors)"
            } else {
                ""
            };
            Err(Error::file(
                path,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder{hint}; files: {names:?}"),
            ))
        }
    }
}

impl Checkpoint {
    /// Open a checkpoint: a folder holding `model.safetensors` or
    /// `model.safetensors.index.json` + shards, a `.safetensors` file, or an index file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match layout(path)? {
            Layout::Single(file) => {
                let (shard, entries, metadata) = open_shard(&file)?;
                Ok(Self {
                    path: file,
                    shards: vec![shard],
                    tensors: entries.into_iter().collect(),
                    metadata,
                })
            }
            Layout::Index(index_path) => Self::open_index(&index_path),
        }
    }

    /// A single safetensors file already in memory, validated as [`Checkpoint::open`]
    /// validates a file; `name` stands for the file in errors and [`Checkpoint::path`].
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        let path = name.into();
        let (shard, entries, metadata) = parse_shard(&path, FileBytes::Owned(bytes))?;
        Ok(Self {
            path,
            shards: vec![shard],
            tensors: entries.into_iter().collect(),
            metadata,
        })
    }

    fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: Index = serde_json::from_str(&text)
            .map_err(|e| Error::file(index_path, format!("bad index: {e}")))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        // Shard order: first appearance in the (sorted) weight map, deduplicated.
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let mut shards = Vec::new();
        let mut shard_tensors: Vec<BTreeMap<String, Entry>> = Vec::new();
        let mut metadata = BTreeMap::new();
        for shard_name in &shard_names {
            // The index is data: a shard must be a file inside the model
            // folder, never `../x` or an absolute path.
            if !is_plain_relative(shard_name) {
                return Err(Error::file(
                    index_path,
                    format!(
                        "refusing shard `{shard_name}` in the weight map: shards must be files inside {} (no `..`, no absolute path)",
                        dir.display()
                    ),
                ));
            }
            let shard_path = dir.join(shard_name);
            if !shard_path.is_file() {
                let example = index
                    .weight_map
                    .iter()
                    .find(|(_, s)| s == shard_name)
                    .map(|(t, _)| t.as_str());
                return Err(Error::file(
                    index_path,
                    format!(
                        "shard `{shard_name}` (holding `{}` among others) is missing: expected at {}",
                        example.unwrap_or("?"),
                        shard_path.display()
                    ),
                ));
            }
            let (shard, entries, meta) = open_shard(&shard_path)?;
            for (k, v) in meta {
                metadata.entry(k).or_insert(v);
            }
            shards.push(shard);
            shard_tensors.push(entries.into_iter().collect());
        }
        if let Some(serde_json::Value::Object(m)) = &index.metadata {
            for (k, v) in m {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                metadata.entry(format!("index.{k}")).or_insert(v);
            }
        }
        // The weight map is the authority on which shard holds what.
        let mut tensors = BTreeMap::new();
        for (name, shard_name) in &index.weight_map {
            let i = shard_names
                .iter()
                .position(|s| *s == shard_name)
                .expect("shard listed");
            let mut entry = shard_tensors[i].remove(name).ok_or_else(|| {
                Error::file(
                    &shards[i].path,
                    format!(
                        "tensor `{name}` is listed in {} for this shard but is not in its header",
                        index_path.display()
                    ),
                )
            })?;
            entry.shard = i;
            tensors.insert(name.clone(), entry);
        }
        Ok(Self {
            path: index_path.to_path_buf(),
            shards,
            tensors,
            metadata,
        })
    }

    /// The file opened: the `.safetensors` file or the index.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data files, one per shard.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|e| TensorInfo {
            dtype: dtype_name(e.dtype),
            shape: e.shape.clone(),
            file: self.shards[e.shard].path.clone(),
        })
    }

    /// Total number of elements over all tensors (integer buffers such as
    /// `position_ids` included).
    pub fn num_params(&self) -> usize {
        self.tensors
            .values()
            .map(|e| e.shape.iter().product::<usize>())
            .sum()
    }

    /// `__metadata__` of the files (first shard wins on clashes) plus the index's
    /// `metadata`, its keys prefixed with `index.`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            name: name.to_string(),
            msg: format!("not in checkpoint {}", self.path.display()),
        })
    }

    /// The tensor's raw little-endian bytes, straight from the map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.shards[e.shard].mmap[e.start..e.end])
    }

    fn err(&self, name: &str, e: &Entry, msg: impl std::fmt::Display) -> Error {
        Error::file(
            &self.shards[e.shard].path,
            format!("tensor `{name}`: {msg}"),
        )
    }

    /// Load a float tensor as F32 on the CPU (F16, BF16 and F64 are converted).
    /// Integer and boolean tensors are an error: use [`Checkpoint::load`].
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let b = self.bytes(name)?;
        // Byte-wise decoding: the data region has no alignment guarantee.
        let v: Vec<f32> = match e.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            Dtype::F8_E4M3 => {
                return Ok(
                    Tensor::from_raw_buffer(b, DType::F8E4M3, &e.shape, &Device::Cpu)?
                        .to_dtype(DType::F32)?,
                )
            }
            other => {
                return Err(self.err(
                    name,
                    e,
                    format!(
                        "dtype {} is not a float type; load it with `load` to keep its dtype",
                        dtype_name(other)
                    ),
                ))
            }
        };
        Ok(Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu)?)
    }

    /// `load_f32`, checking the shape: a mismatch is `Error::Shape` naming the tensor.
    pub fn load_f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: e.shape.clone(),
            });
        }
        self.load_f32(name)
    }

    /// Load a tensor on the CPU keeping its dtype (BOOL becomes U8). Dtypes candle
    /// lacks (I8, U16, U64, F8_E5M2) are an error naming the tensor.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let dt = match e.dtype {
            Dtype::BOOL | Dtype::U8 => DType::U8,
            Dtype::U32 => DType::U32,
            Dtype::I16 => DType::I16,
            Dtype::I32 => DType::I32,
            Dtype::I64 => DType::I64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F8_E4M3 => DType::F8E4M3,
            Dtype::F8_E8M0 => DType::F8E8M0,
            Dtype::F4 => DType::F4,
            Dtype::F6_E2M3 => DType::F6E2M3,
            Dtype::F6_E3M2 => DType::F6E3M2,
            other => {
                return Err(self.err(
                    name,
                    e,
                    format!("dtype {} has no candle equivalent", dtype_name(other)),
                ))
            }
        };
        Ok(Tensor::from_raw_buffer(
            self.bytes(name)?,
            dt,
            &e.shape,
            &Device::Cpu,
        )?)
    }
}

/// `1234567` -> `"1,234,567"`.
pub(crate) fn group_digits(n: impl std::fmt::Display) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A table of tensors: name, type (headed `type_header`), shape and
/// parameter count, columns as wide as their widest cell.
pub(crate) fn tensor_table(rows: &[(String, String, String, usize)], type_header: &str) -> String {
    use std::fmt::Write;
    let width = |f: &dyn Fn(&(String, String, String, usize)) -> usize, head: &str| {
        rows.iter().map(f).max().unwrap_or(0).max(head.len())
    };
    let wn = width(&|r| r.0.len(), "name");
    let wt = width(&|r| r.1.len(), type_header);
    let ws = width(&|r| r.2.len(), "shape");
    let wp = width(&|r| group_digits(r.3).len(), "params");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<wn$}  {:<wt$}  {:<ws$}  {:>wp$}",
        "name", type_header, "shape", "params"
    );
    for (n, t, s, p) in rows {
        let _ = writeln!(
            out,
            "{n:<wn$}  {t:<wt$}  {s:<ws$}  {:>wp$}",
            group_digits(*p)
        );
    }
    out
}

/// A human-readable table of the checkpoint at `path`: one row per tensor
/// (name, dtype, shape, parameters) and totals, for `afinar inspect`.
pub fn inspect(path: impl AsRef<Path>) -> Result<String> {
    Ok(Checkpoint::open(path)?.table())
}

impl Checkpoint {
    /// The table [`inspect`] prints.
    pub fn table(&self) -> String {
        table(self)
    }
}

fn table(ck: &Checkpoint) -> String {
    use std::fmt::Write;
    let rows: Vec<(String, String, String, usize)> = ck
        .tensors
        .iter()
        .map(|(n, e)| {
            (
                n.clone(),
                dtype_name(e.dtype),
                format!("{:?}", e.shape),
                e.shape.iter().product(),
            )
        })
        .collect();
    let mut out = tensor_table(&rows, "dtype");
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut bytes = 0usize;
    for e in ck.tensors.values() {
        let c = by_dtype.entry(dtype_name(e.dtype)).or_default();
        c.0 += 1;
        c.1 += e.shape.iter().product::<usize>();
        bytes += e.end - e.start;
    }
    let _ = writeln!(
        out,
        "\n{} tensors, {} parameters, {} bytes of data in {} file(s)",
        rows.len(),
        group_digits(ck.num_params()),
        group_digits(bytes),
        ck.shards.len()
    );
    for (d, (n, p)) in &by_dtype {
        let _ = writeln!(out, "  {d}: {n} tensors, {} parameters", group_digits(*p));
    }
    for s in &ck.shards {
        let _ = writeln!(out, "  file: {}", s.path.display());
    }
    for (k, v) in &ck.metadata {
        let _ = writeln!(out, "  metadata {k} = {v}");
    }
    out
}

/// Write tensors as a safetensors file with `{"format": "pt"}` metadata
/// (what transformers and PEFT expect), atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: impl Iterator<Item = (String, candle_core::Tensor)>,
) -> Result<()> {
    let tensors: Vec<(String, candle_core::Tensor)> = tensors
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
            .map_err(|e| Error::file(path, e.to_string()))?;
    crate::fsutil::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn write_st(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn two_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        vec![
            (
                "b.weight",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[1., 2., 3., 4., 5., 6.]),
            ),
            ("a.bias", Dtype::F32, vec![3], f32_bytes(&[-1., 0., 1.])),
            (
                "ids",
                Dtype::I64,
                vec![2],
                [7i64, 9].iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        ]
    }

    #[test]
    fn single_file_folder_and_file() {
        let dir = tempfile::tempdir().unwrap();
        write_st(&dir.path().join(SINGLE_FILE), &two_tensors());
        for p in [dir.path().to_path_buf(), dir.path().join(SINGLE_FILE)] {
            let ck = Checkpoint::open(&p).unwrap();
            assert_eq!(ck.names(), vec!["a.bias", "b.weight", "ids"]);
            assert_eq!(ck.num_params(), 6 + 3 + 2);
            let info = ck.info("b.weight").unwrap();
            assert_eq!(
                (info.dtype.as_str(), info.shape.as_slice()),
                ("F32", &[2usize, 3][..])
            );
            assert_eq!(info.file, dir.path().join(SINGLE_FILE));
            let t = ck.load_f32("b.weight").unwrap();
            assert_eq!(t.dims(), &[2, 3]);
            assert_eq!(
                t.to_vec2::<f32>().unwrap(),
                vec![vec![1., 2., 3.], vec![4., 5., 6.]]
            );
            assert_eq!(ck.metadata().get("format").map(String::as_str), Some("pt"));
            // Integers: load_f32 refuses, load keeps the dtype.
            let err = ck.load_f32("ids").unwrap_err().to_string();
            assert!(
                err.contains("ids") && err.contains("I64") && err.contains("model.safetensors"),
                "{err}"
            );
            assert_eq!(
                ck.load("ids").unwrap().to_vec1::<i64>().unwrap(),
                vec![7, 9]
            );
            let err = ck.load_f32("nope").unwrap_err().to_string();
            assert!(err.contains("nope"), "{err}");
            let err = ck.load_f32_shaped("a.bias", &[4]).unwrap_err().to_string();
            assert!(
                err.contains("a.bias") && err.contains("[4]") && err.contains("[3]"),
                "{err}"
            );
        }
        let table = inspect(dir.path()).unwrap();
        assert!(
            table.contains("b.weight") && table.contains("[2, 3]"),
            "{table}"
        );
        assert!(table.contains("3 tensors, 11 parameters"), "{table}");
    }

    #[test]
    fn sharded_with_index() {
        let dir = tempfile::tempdir().unwrap();
        let t = two_tensors();
        write_st(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &t[..1],
        );
        write_st(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &t[1..],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 52},
            "weight_map": {
                "b.weight": "model-00001-of-00002.safetensors",
                "a.bias": "model-00002-of-00002.safetensors",
                "ids": "model-00002-of-00002.safetensors",
            }
        });
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.names(), vec!["a.bias", "b.weight", "ids"]);
        assert_eq!(ck.files().len(), 2);
        assert_eq!(
            ck.info("a.bias").unwrap().file,
            dir.path().join("model-00002-of-00002.safetensors")
        );
        assert_eq!(
            ck.load_f32("a.bias").unwrap().to_vec1::<f32>().unwrap(),
            vec![-1., 0., 1.]
        );
        assert_eq!(ck.load_f32("b.weight").unwrap().dims(), &[2, 3]);
        assert_eq!(
            ck.metadata().get("index.total_size").map(String::as_str),
            Some("52")
        );

        // A shard named in the index but absent.
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model-00002-of-00002.safetensors") && err.contains("missing"),
            "{err}"
        );
        assert!(err.contains(INDEX_FILE), "{err}");

        // A tensor the index places in a shard whose header lacks it.
        write_st(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &t[1..2],
        );
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("`ids`") && err.contains("not in its header"),
            "{err}"
        );
    }

    /// A weight map naming a shard outside the model folder is refused
    /// before anything is opened, even when that file exists.
    #[test]
    fn index_shards_outside_the_folder_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        std::fs::create_dir(&dir).unwrap();
        let outside = root.path().join("outside.safetensors");
        write_st(&outside, &two_tensors());
        for shard in [
            "../outside.safetensors".to_string(),
            outside.display().to_string(),
            "sub/../../outside.safetensors".to_string(),
            "..\\outside.safetensors".to_string(),
        ] {
            let index = serde_json::json!({"weight_map": {"a.bias": shard}});
            std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
            let err = Checkpoint::open(&dir).unwrap_err().to_string();
            assert!(
                err.contains(INDEX_FILE)
                    && err.contains("refusing shard")
                    && err.contains(&shard)
                    && err.contains("no `..`"),
                "{shard}: {err}"
            );
            let err = inspect(&dir).unwrap_err().to_string();
            assert!(err.contains("refusing shard"), "{err}");
        }
        // A plain name in a subfolder of the model folder is fine.
        std::fs::create_dir(dir.join("sub")).unwrap();
        write_st(&dir.join("sub/s.safetensors"), &two_tensors());
        let index = serde_json::json!({"weight_map": {"a.bias": "sub/s.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        assert_eq!(Checkpoint::open(&dir).unwrap().names(), vec!["a.bias"]);
        assert!(!is_plain_relative("") && !is_plain_relative("./x") && is_plain_relative("a/b"));
    }

    #[test]
    fn truncated_file_names_file_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write_st(&p, &two_tensors());
        let full = std::fs::read(&p).unwrap();
        std::fs::write(&p, &full[..full.len() - 5]).unwrap();
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("m.safetensors") && err.contains("truncated"),
            "{err}"
        );
        assert!(
            err.contains(&format!("file is {} bytes", full.len() - 5)),
            "{err}"
        );
        assert!(err.contains(&format!("at least {}", full.len())), "{err}");

        // Cut inside the header: the length prefix promises more than there is.
        std::fs::write(&p, &full[..20]).unwrap();
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("truncated") && err.contains("20 bytes in all"),
            "{err}"
        );

        std::fs::write(&p, b"abc").unwrap();
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(err.contains("3 bytes"), "{err}");
    }

    #[test]
    fn corrupt_header_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        let write_raw = |header: &str, data_len: usize| {
            let mut b = (header.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(header.as_bytes());
            b.extend(std::iter::repeat_n(0u8, data_len));
            std::fs::write(&p, b).unwrap();
        };
        for (header, needles) in [
            (
                "{\"x\": {\"dtype\": \"F32\", \"shape\": [2], ",
                &["bad.safetensors", "corrupt safetensors header"][..],
            ),
            // Shape and byte length disagree.
            (
                r#"{"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
                &["`x`", "needs 12 bytes"],
            ),
            // Unknown dtype.
            (
                r#"{"x": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}"#,
                &["`x`", "F17"],
            ),
        ] {
            write_raw(header, 8);
            let err = Checkpoint::open(&p).unwrap_err().to_string();
            assert!(needles.iter().all(|n| err.contains(n)), "{err}");
        }

        // Overlap.
        write_raw(
            r#"{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
            8,
        );
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");

        // Missing field.
        write_raw(r#"{"x": {"dtype": "F32", "shape": [2]}}"#, 8);
        let err = Checkpoint::open(&p).unwrap_err().to_string();
        assert!(err.contains("`x`") && err.contains("data_offsets"), "{err}");
    }

    #[test]
    fn half_floats_convert_to_f32() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [1.5f32, -2.25, 0.0, 1024.0, 3.140625];
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals
            .iter()
            .flat_map(|x| (*x as f64).to_le_bytes())
            .collect();
        // An odd-length leading tensor makes the later ones unaligned in the data region.
        let p = dir.path().join("h.safetensors");
        write_st(
            &p,
            &[
                ("a_u8", Dtype::U8, vec![3], vec![1, 2, 3]),
                ("bf", Dtype::BF16, vec![5], bf),
                ("f16", Dtype::F16, vec![5], f16),
                ("f64", Dtype::F64, vec![5], f64b),
                ("flag", Dtype::BOOL, vec![1], vec![1]),
            ],
        );
        let ck = Checkpoint::open(&p).unwrap();
        for n in ["bf", "f16", "f64"] {
            let t = ck.load_f32(n).unwrap();
            assert_eq!(t.dtype(), DType::F32);
            assert_eq!(t.to_vec1::<f32>().unwrap(), vals.to_vec(), "{n}");
        }
        assert_eq!(ck.load("bf").unwrap().dtype(), DType::BF16);
        assert_eq!(
            ck.load("a_u8").unwrap().to_vec1::<u8>().unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(ck.load("flag").unwrap().dtype(), DType::U8);
        assert!(ck.load_f32("a_u8").is_err());
    }

    #[test]
    fn folder_without_weights_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("pytorch_model.bin") && err.contains("convert"),
            "{err}"
        );
    }

    /// The real MiniLM checkpoint (the fetched asset; skipped when absent,
    /// failing under CI).
    #[test]
    fn real_minilm_checkpoint_when_present() {
        let Some(dir) = crate::hub::assets::testing::real_asset("all-minilm-l6-v2") else {
            return;
        };
        let ck = Checkpoint::open(&dir).unwrap();
        // 22,713,216 weights plus the 512 I64 `position_ids` buffer.
        assert_eq!(ck.num_params(), 22_713_728);
        let w = ck.load_f32("embeddings.word_embeddings.weight").unwrap();
        assert_eq!(w.dims(), &[30522, 384]);
        let table = inspect(&dir).unwrap();
        assert!(
            table.contains("104 tensors, 22,713,728 parameters"),
            "{table}"
        );
        eprintln!(
            "{}",
            table
                .lines()
                .take(4)
                .chain(
                    table
                        .lines()
                        .rev()
                        .take(6)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                )
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
