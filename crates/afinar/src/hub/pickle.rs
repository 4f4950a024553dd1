//! PyTorch pickle checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`,
//! `*.ckpt`) are refused, never read: unpickling runs whatever the file
//! tells it to (`GLOBAL` + `REDUCE` call any importable function), so afinar
//! has no pickle reader at all. This module only recognises such a file, so
//! that the error says what it is and how to convert it, instead of a
//! confusing "not safetensors" further down.
//!
//! Recognised by content, first: a zip archive (`torch.save` since 1.6) or a
//! pickle stream (`PROTO` opcode 0x80 with protocol 2..=5, the legacy
//! format); then by extension, for any file that does not look like
//! safetensors (whose byte 8 opens the JSON header with `{`) or GGUF.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Extensions PyTorch checkpoints use.
pub const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

/// What kind of PyTorch file `path` is, if it is one: "zip", "pickle", or
/// "extension" (a `.bin`/`.pt`/`.pth`/... file that is not safetensors).
/// Reads at most 16 bytes; a file that cannot be read is not judged here.
pub fn pytorch_kind(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 16];
    let n = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        })
        .ok()?;
    let head = &head[..n];
    let safetensors_like = head.get(8) == Some(&b'{');
    if head.starts_with(b"GGUF") {
        return None;
    }
    if head.starts_with(b"PK\x03\x04") {
        return Some("zip");
    }
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) && !safetensors_like {
        return Some("pickle");
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if ext.is_some_and(|e| PICKLE_EXTENSIONS.contains(&e.as_str())) && !safetensors_like {
        return Some("extension");
    }
    None
}

/// The error for a PyTorch pickle checkpoint at `path`.
pub fn refusal(path: &Path) -> Error {
    Error::file(
        path,
        "a PyTorch pickle checkpoint: afinar does not read pickle files as text models, because \
         loading one can run arbitrary code; convert it to safetensors where you trust it \
         (transformers: `save_pretrained(out, safe_serialization=True)`) and give the folder \
         with model.safetensors (image models, task.type = \"image_classification\", read \
         .pth state dicts weights-only)",
    )
}

/// `Err(refusal)` when `path` is a PyTorch pickle checkpoint.
pub fn refuse(path: &Path) -> Result<()> {
    match pytorch_kind(path) {
        Some(_) => Err(refusal(path)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_are_recognised_and_safetensors_are_not() {
        let d = tempfile::tempdir().unwrap();
        let w = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        // torch.save since 1.6: a zip archive, whatever the name.
        assert_eq!(
            pytorch_kind(&w("a.safetensors", b"PK\x03\x04archive/data.pkl")),
            Some("zip")
        );
        // Legacy torch.save / pickle protocol 2: PROTO 2, then os.system("...").
        let evil = b"\x80\x02cos\nsystem\n(S'touch pwned'\ntR.";
        assert_eq!(pytorch_kind(&w("weights", evil)), Some("pickle"));
        // Protocol 0 has no PROTO opcode: the extension tells.
        assert_eq!(
            pytorch_kind(&w("model.pth", b"cos\nsystem\n(S'x'\ntR.")),
            Some("extension")
        );
        assert_eq!(
            pytorch_kind(&w("pytorch_model.BIN", b"whatever")),
            Some("extension")
        );
        // A safetensors file is never taken for a pickle, whatever its name
        // (its length prefix may start with 0x80).
        let mut st = 0x0280u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"__metadata__\":{}}");
        assert_eq!(pytorch_kind(&w("renamed.bin", &st)), None);
        assert_eq!(pytorch_kind(&w("x.safetensors", &st)), None);
        assert_eq!(pytorch_kind(&d.path().join("absent.pth")), None);
        let err = refuse(&d.path().join("model.pth")).unwrap_err().to_string();
        assert!(
            err.contains("model.pth")
                && err.contains("pickle")
                && err.contains("arbitrary code")
                && err.contains("safetensors"),
            "{err}"
        );
    }
}
