//! Batches of token ids and the order examples are visited in each epoch.
//!
//! Collation pads on the right to the longest row of the batch (dynamic
//! padding, as transformers' `DataCollatorWithPadding`), so a batch of short
//! texts costs short tensors. The epoch order is a pure function of
//! `(n, seed, epoch)`: a resumed run regenerates the same order and skips the
//! batches it has already seen, with no RNG state to save.

use super::split::splitmix64;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rand::{seq::SliceRandom, SeedableRng};

/// A right-padded batch of token ids, row-major `[batch, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    pub batch: usize,
    /// Length of the longest row.
    pub seq_len: usize,
    /// Unpadded length of each row.
    pub lengths: Vec<usize>,
}

/// A [`Batch`] on a device, shaped `[B, T]`.
#[derive(Debug, Clone)]
pub struct BatchTensors {
    /// u32 `[B, T]`
    pub input_ids: Tensor,
    /// u32 `[B, T]`
    pub token_type_ids: Tensor,
    /// f32 `[B, T]`, 1.0 for real tokens and 0.0 for padding.
    pub attention_mask: Tensor,
}

impl Batch {
    /// Pad `rows` (token ids) and `type_ids` to the longest row with `pad_id`
    /// (type ids pad with 0). `type_ids` is either empty (all zeros) or has
    /// one slice per row, each as long as its row.
    pub fn collate(rows: &[&[u32]], type_ids: &[&[u32]], pad_id: u32) -> Result<Batch> {
        if rows.is_empty() {
            return Err(Error::Data("cannot collate an empty batch".into()));
        }
        if !type_ids.is_empty() {
            if type_ids.len() != rows.len() {
                return Err(Error::Data(format!(
                    "collate: {} rows of token ids but {} rows of type ids",
                    rows.len(),
                    type_ids.len()
                )));
            }
            if let Some(i) = (0..rows.len()).find(|&i| rows[i].len() != type_ids[i].len()) {
                return Err(Error::Data(format!(
                    "collate: row {i} has {} token ids but {} type ids",
                    rows[i].len(),
                    type_ids[i].len()
                )));
            }
        }
        let batch = rows.len();
        let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut input_ids = vec![pad_id; batch * seq_len];
        let mut types = vec![0u32; batch * seq_len];
        let mut attention_mask = vec![0u8; batch * seq_len];
        for (b, row) in rows.iter().enumerate() {
            let start = b * seq_len;
            input_ids[start..start + row.len()].copy_from_slice(row);
            attention_mask[start..start + row.len()].fill(1);
            if let Some(t) = type_ids.get(b) {
                types[start..start + t.len()].copy_from_slice(t);
            }
        }
        Ok(Batch {
            input_ids,
            type_ids: types,
            attention_mask,
            batch,
            seq_len,
            lengths: rows.iter().map(|r| r.len()).collect(),
        })
    }

    /// Number of real (non-padding) tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    pub fn to_tensors(&self, device: &Device) -> Result<BatchTensors> {
        let shape = (self.batch, self.seq_len);
        let mask: Vec<f32> = self.attention_mask.iter().map(|&m| m as f32).collect();
        Ok(BatchTensors {
            input_ids: Tensor::from_slice(&self.input_ids, shape, device)?,
            token_type_ids: Tensor::from_slice(&self.type_ids, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
        })
    }
}

/// The visiting order of `n` examples in one epoch: a Fisher–Yates shuffle
/// driven by ChaCha8 seeded from `seed ^ splitmix64(epoch)`, so every epoch
/// has its own order and every run with the same seed the same orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochOrder {
    pub epoch: u64,
    pub indices: Vec<usize>,
}

impl EpochOrder {
    pub fn new(n: usize, seed: u64, epoch: u64) -> Self {
        // Mixing the epoch through splitmix64 (not `seed + epoch`) keeps
        // seed s/epoch 1 from sharing a stream with seed s+1/epoch 0.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ splitmix64(epoch));
        let mut indices: Vec<usize> = (0..n).collect();
        indices.shuffle(&mut rng);
        Self { epoch, indices }
    }

    /// The permutation in chunks of `batch_size`; the last, partial chunk is kept.
    pub fn batches(&self, batch_size: usize) -> Result<std::slice::Chunks<'_, usize>> {
        if batch_size == 0 {
            return Err(Error::Data("batch size must be at least 1".into()));
        }
        Ok(self.indices.chunks(batch_size))
    }

    /// Number of batches of `batch_size` in the epoch, counting a partial last one.
    pub fn num_batches(&self, batch_size: usize) -> usize {
        self.indices.len().div_ceil(batch_size.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_right_to_longest() {
        let rows: [&[u32]; 3] = [&[101, 7, 102], &[101, 102], &[101, 5, 6, 102]];
        let types: [&[u32]; 3] = [&[0, 0, 1], &[0, 1], &[0, 0, 1, 1]];
        let b = Batch::collate(&rows, &types, 0).unwrap();
        assert_eq!((b.batch, b.seq_len), (3, 4));
        assert_eq!(
            b.input_ids,
            vec![101, 7, 102, 0, 101, 102, 0, 0, 101, 5, 6, 102]
        );
        assert_eq!(b.type_ids, vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1, 1]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1]);
        assert_eq!(b.lengths, vec![3, 2, 4]);
        assert_eq!(b.num_tokens(), 9);

        // No type ids: zeros; another pad id.
        let b = Batch::collate(&rows[..2], &[], 9).unwrap();
        assert_eq!(b.input_ids, vec![101, 7, 102, 101, 102, 9]);
        assert_eq!(b.type_ids, vec![0; 6]);
    }

    #[test]
    fn collate_rejects_mismatches() {
        let rows: [&[u32]; 2] = [&[1, 2], &[3]];
        assert!(Batch::collate(&rows, &[&[0, 0]], 0).is_err());
        let msg = Batch::collate(&rows, &[&[0, 0], &[0, 0]], 0)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("row 1 has 1 token ids but 2 type ids"),
            "{msg}"
        );
        assert!(Batch::collate(&[], &[], 0).is_err());
    }

    #[test]
    fn to_tensors_shapes_and_mask() {
        let rows: [&[u32]; 2] = [&[5, 6, 7], &[8]];
        let t = Batch::collate(&rows, &[], 0)
            .unwrap()
            .to_tensors(&Device::Cpu)
            .unwrap();
        assert_eq!(t.input_ids.dims(), &[2, 3]);
        assert_eq!(t.input_ids.dtype(), candle_core::DType::U32);
        assert_eq!(t.token_type_ids.dtype(), candle_core::DType::U32);
        assert_eq!(t.attention_mask.dtype(), candle_core::DType::F32);
        assert_eq!(
            t.attention_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0], vec![1.0, 0.0, 0.0]]
        );
        assert_eq!(
            t.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0]]
        );
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        let a = EpochOrder::new(100, 7, 0);
        let mut sorted = a.indices.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a.indices, sorted, "not shuffled");
        assert_eq!(a, EpochOrder::new(100, 7, 0));
        assert_ne!(a.indices, EpochOrder::new(100, 7, 1).indices);
        assert_ne!(a.indices, EpochOrder::new(100, 8, 0).indices);

        // Pinned: a resumed run must regenerate the order it was trained
        // with, so a rand/rand_chacha upgrade that changes it must be noticed.
        assert_eq!(&a.indices[..8], &[34, 13, 69, 30, 86, 59, 16, 18]);
        let sizes: Vec<usize> = a.batches(32).unwrap().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![32, 32, 32, 4]);
        assert_eq!(a.num_batches(32), 4);
        assert!(a.batches(0).is_err());
        assert!(EpochOrder::new(0, 1, 0)
            .batches(4)
            .unwrap()
            .next()
            .is_none());
    }
}
