//! Data: sources (JSONL, CSV/TSV), field paths, labels, seeded splits, batches.
//!
//! The path from a file to a batch:
//! [`read_examples`] (file + [`DataSpec`] of [`FieldPath`]s -> [`RawExample`]s,
//! each remembering its line) -> [`LabelMap`] (labels -> ids, fixed by the
//! training set) -> [`seeded_split`] when there is one file for all splits ->
//! tokeniser (elsewhere) -> [`EpochOrder`] + [`Batch::collate`] -> tensors.

mod batch;
mod field;
pub mod image;
mod labels;
pub mod preference;
pub mod sft;
mod source;
mod split;

pub use batch::{Batch, BatchTensors, EpochOrder};
pub use field::{FieldPath, Segment};
pub use labels::LabelMap;
pub use source::{
    examples_from_records, read_examples, read_records, records_from_reader, DataSpec, Format,
    LabelValue, RawExample, Record, Records,
};
pub use split::{sample_rows, seeded_split, splitmix64, Split};

use crate::{Error, Result};
use std::path::PathBuf;

/// A data file named in a run config: a path, or `asset:NAME` for a fetched
/// data asset.
pub fn resolve_file(spec: &str) -> Result<PathBuf> {
    match spec.strip_prefix("asset:") {
        Some(name) => crate::hub::assets::resolve_asset_path(name),
        None => {
            let p = PathBuf::from(spec);
            if !p.is_file() {
                return Err(Error::file(&p, "data file does not exist"));
            }
            Ok(p)
        }
    }
}

/// Data files named in a run config: a file, a folder (every `.jsonl` in
/// it, sorted), or `asset:NAME[/sub/path]`.
pub fn resolve_files(spec: &str) -> Result<Vec<PathBuf>> {
    let p = match spec.strip_prefix("asset:") {
        Some(rest) => {
            let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let root = crate::hub::assets::resolve_asset_path(name)?;
            if sub.is_empty() {
                root
            } else {
                root.join(sub)
            }
        }
        None => PathBuf::from(spec),
    };
    if p.is_file() {
        return Ok(vec![p]);
    }
    if !p.is_dir() {
        return Err(Error::file(&p, "data file or folder does not exist"));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&p)
        .map_err(|e| Error::io(&p, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(&p, "no .jsonl files in the data folder"));
    }
    Ok(files)
}
