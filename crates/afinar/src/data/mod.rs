//! Data: sources (JSONL, CSV), field paths, labels, seeded splits, batches.
