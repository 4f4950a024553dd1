//! `afinar inspect`: a table of any checkpoint afinar reads — a safetensors
//! file, folder or shard index ([`super::checkpoint::inspect`]), a GGUF
//! file, or a PyTorch `.pth` / `.pt` state dict read weights-only
//! ([`super::pth`]; a pickle that is more than a state dict is refused,
//! naming what it asks for).

use super::checkpoint::group_digits;
use super::gguf::{Gguf, MAGIC};
use crate::Result;
use std::io::Read;
use std::path::Path;

/// Whether `path` is a file that starts with the GGUF magic or ends in `.gguf`.
pub fn is_gguf_file(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    path.extension().is_some_and(|e| e == "gguf") || has_gguf_magic(path)
}

/// Whether the file at `path` starts with `GGUF`.
pub fn has_gguf_magic(path: &Path) -> bool {
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == MAGIC)
}

/// The table `afinar inspect PATH` prints.
pub fn describe(path: &Path) -> Result<String> {
    if path.is_file() {
        if super::pickle::pytorch_kind(path).is_some() {
            return describe_pth(path);
        }
        if is_gguf_file(path) {
            return describe_gguf(path);
        }
    }
    super::checkpoint::inspect(path)
}

/// One row per tensor of a `.pth` state dict (name, dtype, shape, elements).
fn describe_pth(path: &Path) -> Result<String> {
    use std::fmt::Write;
    let sd = super::pth::read(path)?;
    let rows: Vec<(String, String, String, usize)> = sd
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.dtype.name().to_string(),
                format!("{:?}", t.shape),
                t.values.len(),
            )
        })
        .collect();
    let mut out = super::checkpoint::tensor_table(&rows, "dtype");
    let total: u128 = rows.iter().map(|r| r.3 as u128).sum();
    let _ = writeln!(
        out,
        "\n{} tensors, {} elements in PyTorch state dict {} (read weights-only)",
        rows.len(),
        group_digits(total),
        path.display()
    );
    Ok(out)
}

/// One row per tensor (name, ggml type, shape in Hugging Face order,
/// parameters), then totals and the architecture. Types afinar cannot
/// dequantise are listed like any other: only loading them is refused.
fn describe_gguf(path: &Path) -> Result<String> {
    Ok(gguf_table(&Gguf::open(path)?))
}

/// [`describe`]'s table of an open GGUF file.
pub fn gguf_table(g: &Gguf) -> String {
    use std::fmt::Write;
    let path = g.path();
    // name, type, shape, parameters
    type Row = (String, String, String, usize);
    let rows: Vec<Row> = g
        .tensor_infos()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.ty.to_string(),
                format!("{:?}", t.shape()),
                t.numel(),
            )
        })
        .collect();
    let mut out = super::checkpoint::tensor_table(&rows, "type");
    // u128: the element counts of tensors whose type has no known layout
    // are not bounded by the file's length (each fits i64, their sum may not).
    let total: u128 = rows.iter().map(|r| r.3 as u128).sum();
    let _ = writeln!(
        out,
        "\n{} tensors, {} parameters in GGUF v{} file {}",
        rows.len(),
        group_digits(total),
        g.version(),
        path.display()
    );
    let arch = g.architecture().unwrap_or("(no general.architecture)");
    let _ = writeln!(out, "  architecture: {arch}");
    let _ = writeln!(out, "  metadata entries: {}", g.metadata().len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::gguf::{GgmlType, GgufValue, GgufWriter};

    #[test]
    fn gguf_tables_and_pickle_refusals() {
        let d = tempfile::tempdir().unwrap();
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", GgufValue::String("llama".into()))
            .unwrap();
        w.add_f32("token_embd.weight", GgmlType::F32, &[3, 32], &[0.5; 96])
            .unwrap();
        w.add_f32("blk.0.ffn_up.weight", GgmlType::Q8_0, &[2, 32], &[0.25; 64])
            .unwrap();
        let p = d.path().join("m.gguf");
        w.write(&p).unwrap();
        let t = describe(&p).unwrap();
        assert!(
            t.contains("token_embd.weight") && t.contains("[3, 32]"),
            "{t}"
        );
        assert!(
            t.contains("Q8_0") && t.contains("2 tensors, 160 parameters"),
            "{t}"
        );
        assert!(t.contains("architecture: llama"), "{t}");
        // The magic, not the name, makes a GGUF file.
        let q = d.path().join("renamed.bin");
        std::fs::copy(&p, &q).unwrap();
        assert!(describe(&q).unwrap().contains("GGUF v3"));

        let pth = d.path().join("model.pth");
        std::fs::write(&pth, b"\x80\x02cos\nsystem\n(S'touch pwned'\ntR.").unwrap();
        let err = describe(&pth).unwrap_err().to_string();
        assert!(
            err.contains("model.pth") && err.contains("global `os.system` is not allowed"),
            "{err}"
        );
        // A real state dict (torch.save's zip format) is listed.
        let fx =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/pth/tiny-zip.pth");
        let t = describe(&fx).unwrap();
        assert!(
            t.contains("dense.weight_t")
                && t.contains("[6, 4]")
                && t.contains("8 tensors, 121 elements"),
            "{t}"
        );
    }
}
