//! Helpers for the library's unit tests (compiled only with `cfg(test)`):
//! seeded inputs and tensor comparisons, one copy each.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

/// `n` values uniform in [-1, 1), seeded.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen::<f32>() * 2.0 - 1.0).collect()
}

/// max |a - b| over every element.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
