//! Where a model comes from, resolved in one place for every family: a
//! pinned asset fetched by `afinar fetch`, a local folder or GGUF file, or
//! a hub repository downloaded into the cache on first use.

use crate::{Error, Result};
use std::path::PathBuf;

/// A model source, as `[model]` of a run config names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A pinned asset (`afinar fetch`): a folder or a `.gguf` file.
    Asset(String),
    /// A local HF folder or `.gguf` file.
    Path(PathBuf),
    /// A hub repository `org/name`, at `revision` (default: main).
    Hub {
        id: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// The folder or file to load. A path must exist; an asset must be
    /// fetched; a hub model is downloaded (sha256-checked) when not cached.
    pub fn resolve(&self, on: &mut dyn FnMut(crate::event::Event)) -> Result<PathBuf> {
        match self {
            ModelSource::Asset(a) => crate::hub::assets::resolve_asset_path(a),
            ModelSource::Path(p) => {
                if !p.exists() {
                    return Err(Error::file(
                        p,
                        "model folder does not exist (config `model.path`)",
                    ));
                }
                Ok(p.clone())
            }
            ModelSource::Hub { id, revision } => {
                let cache = crate::hub::assets::cache_dir()?;
                crate::hub::hf::download_model(
                    id,
                    revision.as_deref(),
                    &crate::hub::hf::default_hub_cache(&cache),
                    on,
                )
            }
        }
    }
}
