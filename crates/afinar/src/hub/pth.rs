//! PyTorch `.pth` / `.pt` state dicts, read as `torch.load(weights_only=True)`
//! promises: the pickle is interpreted as data by a small machine that knows
//! the opcodes a state dict uses, and only an allowlist of globals resolves
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`, the typed storage classes, `torch.Size`); any other
//! global is refused by name, and nothing is ever executed or imported.
//!
//! Both containers of `torch.save` (pickle protocol 2):
//! - the zip format (since PyTorch 1.6): `<name>/data.pkl` whose persistent
//!   ids name storages kept as `<name>/data/<key>`;
//! - the legacy format: five pickles in a row (magic number, protocol
//!   version 1001, system info, the object, the storage keys in order), then
//!   for each key its element count (little-endian i64) and its bytes.
//!
//! Every length comes from the file and is checked against what is left of
//! it before anything is allocated. The result is a name -> tensor list in
//! the file's order, materialised contiguous (views follow their strides).

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Element types of the storages afinar reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PthDType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDType {
    fn from_storage(name: &str) -> Option<PthDType> {
        Some(match name {
            "FloatStorage" => PthDType::F32,
            "DoubleStorage" => PthDType::F64,
            "HalfStorage" => PthDType::F16,
            "BFloat16Storage" => PthDType::BF16,
            "LongStorage" => PthDType::I64,
            "IntStorage" => PthDType::I32,
            "ShortStorage" => PthDType::I16,
            "CharStorage" => PthDType::I8,
            "ByteStorage" => PthDType::U8,
            "BoolStorage" => PthDType::Bool,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            PthDType::F64 | PthDType::I64 => 8,
            PthDType::F32 | PthDType::I32 => 4,
            PthDType::F16 | PthDType::BF16 | PthDType::I16 => 2,
            PthDType::I8 | PthDType::U8 | PthDType::Bool => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            PthDType::F32 => "F32",
            PthDType::F64 => "F64",
            PthDType::F16 => "F16",
            PthDType::BF16 => "BF16",
            PthDType::I64 => "I64",
            PthDType::I32 => "I32",
            PthDType::I16 => "I16",
            PthDType::I8 => "I8",
            PthDType::U8 => "U8",
            PthDType::Bool => "BOOL",
        }
    }
}

/// One tensor of a state dict, contiguous, as f64 values (exact for every
/// float type and for integers below 2^53: BN's `num_batches_tracked`).
#[derive(Debug, Clone, PartialEq)]
pub struct PthTensor {
    pub dtype: PthDType,
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl PthTensor {
    pub fn to_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// A global the allowlist resolves.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(PthDType),
    TorchSize,
}

#[derive(Debug, Clone, PartialEq)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (the legacy format's magic number).
    Big(i128),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Global(Global),
    /// A storage reference: key, element type, element count.
    Storage(String, PthDType, usize),
    Tensor {
        storage: String,
        dtype: PthDType,
        offset: usize,
        shape: Vec<usize>,
        stride: Vec<usize>,
    },
    Mark,
}

fn resolve(module: &str, name: &str) -> std::result::Result<Global, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "Size") => Global::TorchSize,
        ("torch", s) if PthDType::from_storage(s).is_some() => {
            Global::Storage(PthDType::from_storage(s).expect("checked"))
        }
        _ => {
            return Err(format!(
                "global `{module}.{name}` is not allowed: a weights-only load resolves only OrderedDict, torch's tensor rebuild functions, storage types and torch.Size (this file is not a plain state dict)"
            ))
        }
    })
}

/// The pickle machine over one pickle of `data` starting at `*pos`.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    memo: HashMap<u32, V>,
    /// Values built so far (see [`MAX_BUILT`]).
    built: usize,
}

const MAX_STACK: usize = 1 << 20;
/// Values the machine may build in all (a state dict of 1,000 tensors
/// builds about 20,000): copies made by DUP / GET / TUPLE count, so a
/// pickle that doubles a value again and again stops here, not in OOM.
const MAX_BUILT: usize = 1 << 22;

/// The size of a value, in nodes (strings and bytes by 16-byte pieces),
/// counted up to `cap`.
fn weight(v: &V, cap: usize) -> usize {
    let mut w = 1;
    match v {
        V::Str(s) => w += s.len() / 16,
        V::Bytes(b) => w += b.len() / 16,
        V::Tuple(xs) | V::List(xs) => {
            for x in xs {
                if w > cap {
                    break;
                }
                w += weight(x, cap);
            }
        }
        V::Dict(kv) => {
            for (k, x) in kv {
                if w > cap {
                    break;
                }
                w += weight(k, cap) + weight(x, cap);
            }
        }
        V::Tensor { shape, .. } => w += shape.len(),
        _ => {}
    }
    w
}
const MAX_MEMO: usize = 1 << 22;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.data.len() - self.pos < n {
            return Err(format!(
                "the pickle ends early: {n} bytes wanted at byte {}, {} left",
                self.pos,
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> std::result::Result<u64, String> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }
    fn line(&mut self) -> std::result::Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL without its newline")?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| "a GLOBAL name that is not UTF-8")?;
        self.pos += end + 1;
        Ok(s)
    }
    fn pop(&mut self) -> std::result::Result<V, String> {
        self.stack
            .pop()
            .ok_or_else(|| "the pickle pops an empty stack".to_string())
    }
    fn pop_mark(&mut self) -> std::result::Result<Vec<V>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == V::Mark)
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn push(&mut self, v: V) -> std::result::Result<(), String> {
        if self.stack.len() >= MAX_STACK {
            return Err("the pickle's stack grows past 1M items".into());
        }
        self.built += weight(&v, MAX_BUILT);
        if self.built > MAX_BUILT {
            return Err(
                "the pickle builds more than 4M values (copies of copies): not a state dict".into(),
            );
        }
        self.stack.push(v);
        Ok(())
    }
    fn put(&mut self, k: u32) -> std::result::Result<(), String> {
        if self.memo.len() >= MAX_MEMO {
            return Err("the pickle's memo grows past 4M items".into());
        }
        let top = self.stack.last().ok_or("PUT on an empty stack")?.clone();
        self.memo.insert(k, top);
        Ok(())
    }
    fn string(&mut self, n: usize) -> std::result::Result<V, String> {
        let b = self.take(n)?;
        Ok(V::Str(
            String::from_utf8(b.to_vec()).map_err(|_| "a string that is not UTF-8")?,
        ))
    }

    /// Run the object's pickle: the object and the storages its persistent
    /// ids name (key -> element type, element count).
    #[allow(clippy::type_complexity)]
    fn run_object(
        &mut self,
    ) -> std::result::Result<(V, HashMap<String, (PthDType, usize)>), String> {
        let mut refs = HashMap::new();
        let obj = self.run(&mut |pid| {
            let v = storage_pid(pid)?;
            if let V::Storage(k, dt, n) = &v {
                refs.insert(k.clone(), (*dt, *n));
            }
            Ok(v)
        })?;
        Ok((obj, refs))
    }

    /// Run to STOP; the value left on the stack.
    fn run(
        &mut self,
        persistent: &mut dyn FnMut(V) -> std::result::Result<V, String>,
    ) -> std::result::Result<V, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("pickle protocol {p} (at most 5)"));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => return self.pop(),
                b'(' => self.push(V::Mark)?,
                b'}' => self.push(V::Dict(Vec::new()))?,
                b']' => self.push(V::List(Vec::new()))?,
                b')' => self.push(V::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(V::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("TUPLE with too few items".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(V::Tuple(items))?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.put(k)?
                }
                b'r' => {
                    let k = self.le(4)? as u32;
                    self.put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.put(k)?
                }
                b'h' | b'j' => {
                    let k = if op == b'h' { self.u8()? as u32 } else { self.le(4)? as u32 };
                    let v = self.memo.get(&k).cloned().ok_or_else(|| format!("memo entry {k} is not set"))?;
                    self.push(v)?
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32 as i64;
                    self.push(V::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(V::Int(v))?
                }
                b'M' => {
                    let v = self.le(2)? as i64;
                    self.push(V::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 16 {
                        return Err(format!("a {n}-byte integer (at most 16 here)"));
                    }
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    self.push(match i64::try_from(v) {
                        Ok(i) => V::Int(i),
                        Err(_) => V::Big(v),
                    })?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(V::Float(v))?
                }
                b'X' => {
                    let n = self.le(4)? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = self.le(8)?;
                    let n = usize::try_from(n).map_err(|_| "a string longer than memory")?;
                    let v = self.string(n)?;
                    self.push(v)?
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(V::Bytes(b))?
                }
                b'B' | b'C' => {
                    let n = if op == b'B' { self.le(4)? as usize } else { self.u8()? as usize };
                    let b = self.take(n)?.to_vec();
                    self.push(V::Bytes(b))?
                }
                b'N' => self.push(V::None)?,
                0x88 => self.push(V::Bool(true))?,
                0x89 => self.push(V::Bool(false))?,
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    let g = resolve(&module, &name)?;
                    self.push(V::Global(g))?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (V::Str(m), V::Str(n)) => {
                            let g = resolve(&m, &n)?;
                            self.push(V::Global(g))?
                        }
                        _ => return Err("STACK_GLOBAL without two strings".into()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.push(v)?
                }
                b'b' => {
                    // The state of an OrderedDict (its `_metadata`): not needed.
                    let _state = self.pop()?;
                    match self.stack.last() {
                        Some(V::Dict(_)) => {}
                        _ => return Err("BUILD on something that is not a dict".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent(pid)?;
                    self.push(v)?
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    match self.stack.last_mut() {
                        Some(V::Dict(d)) => {
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => return Err("SETITEM on something that is not a dict".into()),
                    }
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    match self.stack.last_mut() {
                        Some(V::List(l)) => l.extend(items),
                        _ => return Err("APPEND on something that is not a list".into()),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.stack.last().ok_or("DUP on an empty stack")?.clone();
                    self.push(top)?
                }
                other => {
                    return Err(format!(
                        "opcode 0x{other:02x} at byte {at} is not allowed in a weights-only load (it builds objects other than a state dict's)"
                    ))
                }
            }
        }
    }
}

fn ints(v: &V, what: &str) -> std::result::Result<Vec<usize>, String> {
    match v {
        V::Tuple(xs) | V::List(xs) => xs
            .iter()
            .map(|x| match x {
                V::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!("{what}: not a tuple of non-negative integers")),
            })
            .collect(),
        _ => Err(format!("{what}: not a tuple")),
    }
}

/// What an allowlisted callable gives for `args`.
fn reduce(f: V, args: V) -> std::result::Result<V, String> {
    let V::Tuple(a) = args else {
        return Err("REDUCE's arguments are not a tuple".into());
    };
    match f {
        V::Global(Global::OrderedDict) => Ok(V::Dict(Vec::new())),
        V::Global(Global::TorchSize) => match a.first() {
            Some(v @ (V::Tuple(_) | V::List(_))) => Ok(V::Tuple(
                ints(v, "torch.Size")?
                    .into_iter()
                    .map(|x| V::Int(x as i64))
                    .collect(),
            )),
            _ => Ok(V::Tuple(Vec::new())),
        },
        V::Global(Global::RebuildTensorV2) => {
            if a.len() < 4 {
                return Err("_rebuild_tensor_v2 with fewer than 4 arguments".into());
            }
            let V::Storage(key, dtype, numel) = &a[0] else {
                return Err("_rebuild_tensor_v2 without a storage".into());
            };
            let offset = match &a[1] {
                V::Int(o) if *o >= 0 => *o as usize,
                _ => return Err("_rebuild_tensor_v2: a bad storage offset".into()),
            };
            let shape = ints(&a[2], "tensor size")?;
            let stride = ints(&a[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            // No more elements than the storage holds (an expanded,
            // stride-0 view would materialise beyond it), and the last
            // element any index reaches must be in the storage.
            let n = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
            if n.is_none_or(|n| n > (*numel).max(1)) {
                return Err(format!(
                    "tensor of size {shape:?} has more elements than its storage `{key}` ({numel})"
                ));
            }
            let empty = shape.iter().any(|&s| s == 0);
            if !empty {
                let mut last = offset as u128;
                for (&s, &st) in shape.iter().zip(&stride) {
                    last += (s as u128 - 1) * st as u128;
                }
                if last >= *numel as u128 {
                    return Err(format!(
                        "tensor of size {shape:?}, stride {stride:?}, offset {offset} reaches past its storage `{key}` of {numel} elements"
                    ));
                }
            }
            Ok(V::Tensor {
                storage: key.clone(),
                dtype: *dtype,
                offset,
                shape,
                stride,
            })
        }
        V::Global(Global::RebuildParameter) => match a.into_iter().next() {
            Some(t @ V::Tensor { .. }) => Ok(t),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        V::Global(Global::Storage(_)) => Err("a storage type called directly".into()),
        _ => Err("REDUCE on something that is not an allowed callable".into()),
    }
}

/// The storage reference of a persistent id: ('storage', type, key,
/// location, numel[, view_metadata]).
fn storage_pid(pid: V) -> std::result::Result<V, String> {
    let V::Tuple(t) = pid else {
        return Err("a persistent id that is not a tuple".into());
    };
    match t.as_slice() {
        [V::Str(kind), V::Global(Global::Storage(dt)), V::Str(key), _loc, V::Int(n), ..]
            if kind == "storage" && *n >= 0 =>
        {
            Ok(V::Storage(key.clone(), *dt, *n as usize))
        }
        _ => Err("a persistent id that is not ('storage', type, key, location, size)".into()),
    }
}

/// The state dict's `(name, tensor ref)` pairs, in order.
fn state_dict(v: V) -> std::result::Result<Vec<(String, V)>, String> {
    let V::Dict(items) = v else {
        return Err("the pickled object is not a dict of tensors (not a state dict)".into());
    };
    items
        .into_iter()
        .map(|(k, t)| match (k, t) {
            (V::Str(k), t @ V::Tensor { .. }) => Ok((k, t)),
            (V::Str(k), _) => Err(format!(
                "entry `{k}` is not a tensor (not a plain state dict)"
            )),
            _ => Err("a key that is not a string (not a state dict)".into()),
        })
        .collect()
}

fn materialise(
    t: &V,
    storages: &HashMap<String, (PthDType, &[u8])>,
) -> std::result::Result<PthTensor, String> {
    let V::Tensor {
        storage,
        dtype,
        offset,
        shape,
        stride,
    } = t
    else {
        unreachable!("state_dict keeps tensors only")
    };
    let (sdt, bytes) = storages
        .get(storage)
        .ok_or_else(|| format!("storage `{storage}` is not in the file"))?;
    if sdt != dtype {
        return Err(format!(
            "storage `{storage}` is {sdt:?}, the tensor {dtype:?}"
        ));
    }
    let size = dtype.size();
    let n: usize = shape.iter().product();
    let mut values = Vec::with_capacity(n.min(bytes.len() / size.max(1) + 1));
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let e = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        let b = bytes
            .get(e * size..(e + 1) * size)
            .ok_or_else(|| format!("storage `{storage}` is shorter than its tensor reaches"))?;
        values.push(match dtype {
            PthDType::F32 => f32::from_le_bytes(b.try_into().expect("4")) as f64,
            PthDType::F64 => f64::from_le_bytes(b.try_into().expect("8")),
            PthDType::F16 => half::f16::from_le_bytes(b.try_into().expect("2")).to_f64(),
            PthDType::BF16 => half::bf16::from_le_bytes(b.try_into().expect("2")).to_f64(),
            PthDType::I64 => i64::from_le_bytes(b.try_into().expect("8")) as f64,
            PthDType::I32 => i32::from_le_bytes(b.try_into().expect("4")) as f64,
            PthDType::I16 => i16::from_le_bytes(b.try_into().expect("2")) as f64,
            PthDType::I8 => b[0] as i8 as f64,
            PthDType::U8 | PthDType::Bool => b[0] as f64,
        });
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(PthTensor {
        dtype: *dtype,
        shape: shape.clone(),
        values,
    })
}

/// Read a `.pth` / `.pt` state dict (zip or legacy) from bytes; `name`
/// labels errors.
pub fn from_bytes(name: &Path, data: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    let err = |m: String| Error::file(name, m);
    if data.starts_with(b"PK\x03\x04") {
        return from_zip(name, data);
    }
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        built: 0,
    };
    let mut no_pid = |_: V| -> std::result::Result<V, String> {
        Err("a persistent id outside the object pickle".into())
    };
    let magic = m.run(&mut no_pid).map_err(&err)?;
    if magic != V::Big(0x1950a86a20f9469cfc6c) {
        return Err(err(
            "not a PyTorch file: the legacy format starts with its magic number".into(),
        ));
    }
    let proto = m.run(&mut no_pid).map_err(&err)?;
    if proto != V::Int(1001) {
        return Err(err(format!(
            "legacy protocol version {proto:?}, expected 1001"
        )));
    }
    m.memo.clear();
    let info = m.run(&mut no_pid).map_err(&err)?;
    if let V::Dict(items) = &info {
        if items
            .iter()
            .any(|(k, v)| *k == V::Str("little_endian".into()) && *v == V::Bool(false))
        {
            return Err(err("a big-endian file: not supported".into()));
        }
    }
    m.memo.clear();
    let (obj, refs) = m.run_object().map_err(&err)?;
    m.memo.clear();
    let keys = m.run(&mut no_pid).map_err(&err)?;
    let V::List(keys) = keys else {
        return Err(err("the storage key list is not a list".into()));
    };
    let mut storages: HashMap<String, (PthDType, &[u8])> = HashMap::new();
    let mut pos = m.pos;
    for k in keys {
        let V::Str(k) = k else {
            return Err(err("a storage key that is not a string".into()));
        };
        let (dt, numel) = *refs
            .get(&k)
            .ok_or_else(|| err(format!("storage `{k}` is listed but never used")))?;
        let head = data
            .get(pos..pos + 8)
            .ok_or_else(|| err(format!("storage `{k}`: the file ends before its size")))?;
        let n = i64::from_le_bytes(head.try_into().expect("8"));
        if n < 0 || n as u64 != numel as u64 {
            return Err(err(format!(
                "storage `{k}` holds {n} elements, its references say {numel}"
            )));
        }
        pos += 8;
        let len = (n as u128) * dt.size() as u128;
        if len > (data.len() - pos) as u128 {
            return Err(err(format!(
                "storage `{k}`: {len} bytes, the file has {} left",
                data.len() - pos
            )));
        }
        let len = len as usize;
        storages.insert(k, (dt, &data[pos..pos + len]));
        pos += len;
    }
    tensors(name, obj, &storages)
}

fn from_zip(name: &Path, data: &[u8]) -> Result<Vec<(String, PthTensor)>> {
    use std::io::Read;
    let err = |m: String| Error::file(name, m);
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(data))
        .map_err(|e| err(format!("not a readable zip: {e}")))?;
    let names: Vec<String> = (0..z.len())
        .filter_map(|i| {
            z.by_index(i)
                .ok()
                .and_then(|e| e.name().ok().map(|n| n.to_string()))
        })
        .collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| err("a zip without `<name>/data.pkl`: not a torch.save file".into()))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let read = |z: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, n: &str| -> Result<Vec<u8>> {
        let mut e = z.by_name(n).map_err(|e| err(format!("entry `{n}`: {e}")))?;
        if e.size() > data.len() as u64 * 1024 {
            return Err(err(format!("entry `{n}` claims {} bytes", e.size())));
        }
        let mut b = Vec::new();
        e.read_to_end(&mut b)
            .map_err(|e| err(format!("entry `{n}`: {e}")))?;
        Ok(b)
    };
    if let Ok(bo) = read(&mut z, &format!("{prefix}byteorder")) {
        if bo != b"little" {
            return Err(err("a big-endian file: not supported".into()));
        }
    }
    let pickle = read(&mut z, &pkl)?;
    let mut m = Machine {
        data: &pickle,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        built: 0,
    };
    let (obj, refs) = m.run_object().map_err(&err)?;
    let mut raw: HashMap<String, (PthDType, Vec<u8>)> = HashMap::new();
    for (k, (dt, numel)) in &refs {
        let b = read(&mut z, &format!("{prefix}data/{k}"))?;
        if (b.len() as u128) < *numel as u128 * dt.size() as u128 {
            return Err(err(format!(
                "storage `{k}`: {} bytes, {numel} elements of {} bytes wanted",
                b.len(),
                dt.size()
            )));
        }
        raw.insert(k.clone(), (*dt, b));
    }
    let storages: HashMap<String, (PthDType, &[u8])> = raw
        .iter()
        .map(|(k, (dt, b))| (k.clone(), (*dt, b.as_slice())))
        .collect();
    tensors(name, obj, &storages)
}

/// The state dict `obj` with every tensor read from `storages`.
fn tensors(
    name: &Path,
    obj: V,
    storages: &HashMap<String, (PthDType, &[u8])>,
) -> Result<Vec<(String, PthTensor)>> {
    let sd = state_dict(obj).map_err(|e| Error::file(name, e))?;
    sd.into_iter()
        .map(|(k, t)| {
            let t = materialise(&t, storages)
                .map_err(|e| Error::file(name, format!("tensor `{k}`: {e}")))?;
            Ok((k, t))
        })
        .collect()
}

/// Read a `.pth` / `.pt` state dict file.
pub fn read(path: &Path) -> Result<Vec<(String, PthTensor)>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(path, &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_running_pickles_are_refused_by_name() {
        // Legacy torch.save / pickle protocol 2: PROTO 2, then os.system("...").
        let evil = b"\x80\x02cos\nsystem\n(S'touch pwned'\ntR.";
        let e = from_bytes(Path::new("evil.pth"), evil)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("evil.pth") && e.contains("global `os.system` is not allowed"),
            "{e}"
        );
        // builtins.eval through STACK_GLOBAL.
        let evil = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x011\x85R.";
        let e = from_bytes(Path::new("e.pt"), evil).unwrap_err().to_string();
        assert!(e.contains("global `builtins.eval` is not allowed"), "{e}");
        // NEWOBJ / INST-style opcodes are not interpreted.
        let e = from_bytes(Path::new("e.pt"), b"\x80\x02)\x81.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("opcode 0x81"), "{e}");
        // DUP + TUPLE3 again and again triples a value each time: stopped by
        // the build budget, not by running out of memory (found by the fuzzer).
        let mut bomb = b"\x80\x02]".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"22\x87");
        }
        bomb.push(b'.');
        let e = from_bytes(Path::new("b.pt"), &bomb)
            .unwrap_err()
            .to_string();
        assert!(e.contains("builds more than 4M values"), "{e}");
        // Truncated: named, no panic.
        let e = from_bytes(Path::new("t.pt"), b"\x80\x02X\xff\xff\xff\x7f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ends early"), "{e}");
    }

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pth")
    }

    fn golden() -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixtures().join("tiny.json")).unwrap()).unwrap()
    }

    /// Both containers give what `torch.load(weights_only=True)` gives
    /// (scripts/reference/golden_pth.py): views by their strides and
    /// offsets, f16 / bf16 / f64 / i64, a Parameter.
    #[test]
    fn zip_and_legacy_files_match_torch() {
        let g = golden();
        for f in ["tiny-zip.pth", "tiny-legacy.pth"] {
            let sd = read(&fixtures().join(f)).unwrap();
            let names: Vec<&str> = sd.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                names,
                [
                    "conv.weight",
                    "dense.weight",
                    "dense.weight_t",
                    "dense.row2",
                    "half",
                    "bfloat",
                    "double",
                    "bn.num_batches_tracked"
                ],
                "{f}"
            );
            for (k, t) in &sd {
                let want = &g[k];
                let shape: Vec<usize> = want["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                assert_eq!(t.shape, shape, "{f} {k}");
                let vals: Vec<f64> = want["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                assert_eq!(t.values, vals, "{f} {k}");
            }
            let dt = |k: &str| sd.iter().find(|(n, _)| n == k).unwrap().1.dtype;
            assert_eq!(
                (
                    dt("half"),
                    dt("bfloat"),
                    dt("double"),
                    dt("bn.num_batches_tracked")
                ),
                (PthDType::F16, PthDType::BF16, PthDType::F64, PthDType::I64)
            );
        }
    }

    /// Cut or corrupted fixtures: an error naming the file, never a panic.
    #[test]
    fn damaged_files_are_errors() {
        for f in ["tiny-zip.pth", "tiny-legacy.pth"] {
            let b = std::fs::read(fixtures().join(f)).unwrap();
            for cut in [1, 10, b.len() / 3, b.len() / 2, b.len() - 3] {
                let e = from_bytes(Path::new(f), &b[..cut]).unwrap_err().to_string();
                assert!(e.contains(f), "{e}");
            }
        }
    }

    /// torchvision's MobileNetV2 (legacy format), when fetched.
    #[test]
    fn the_real_mobilenet_v2_file() {
        let Some(p) = crate::hub::assets::testing::real_asset("mobilenet-v2") else {
            return;
        };
        let sd = read(&p).unwrap();
        let get = |n: &str| {
            &sd.iter()
                .find(|(k, _)| k == n)
                .unwrap_or_else(|| panic!("{n}"))
                .1
        };
        assert_eq!(get("features.0.0.weight").shape, [32, 3, 3, 3]);
        assert_eq!(get("classifier.1.weight").shape, [1000, 1280]);
        assert_eq!(get("features.1.conv.0.0.weight").shape, [32, 1, 3, 3]); // depthwise
        assert_eq!(get("features.0.1.num_batches_tracked").dtype, PthDType::I64);
        let n: usize = sd
            .iter()
            .filter(|(_, t)| t.dtype == PthDType::F32)
            .map(|(_, t)| t.values.len())
            .sum();
        // torchvision's count: 3,504,872 parameters, plus BN running stats.
        assert!(n > 3_504_872, "{n}");
        assert!(get("features.0.1.running_var")
            .values
            .iter()
            .all(|&v| v > 0.0));
        // Against torch.load (tests/fixtures/pth/tiny.json, "mobilenet").
        let g = golden();
        assert_eq!(sd.len() as u64, g["mobilenet_count"].as_u64().unwrap());
        for (k, want) in g["mobilenet"].as_object().unwrap() {
            let t = get(k);
            let sum: f64 = t.values.iter().sum();
            let ws = want["sum"].as_f64().unwrap();
            assert!(
                (sum - ws).abs() <= 1e-9 * ws.abs().max(1.0),
                "{k}: {sum} vs {ws}"
            );
            let first: Vec<f64> = want["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(t.values[..4], first[..], "{k}");
        }
    }
}
