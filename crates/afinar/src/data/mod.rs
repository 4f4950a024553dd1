//! Data: sources (JSONL, CSV/TSV), field paths, labels, seeded splits, batches.
//!
//! The path from a file to a batch:
//! [`read_examples`] (file + [`DataSpec`] of [`FieldPath`]s -> [`RawExample`]s,
//! each remembering its line) -> [`LabelMap`] (labels -> ids, fixed by the
//! training set) -> [`seeded_split`] when there is one file for all splits ->
//! tokeniser (elsewhere) -> [`EpochOrder`] + [`Batch::collate`] -> tensors.

mod batch;
mod field;
mod labels;
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
pub use split::{seeded_split, splitmix64, Split};
