//! afinar's own layers: differentiable end to end on the training path, with
//! hand-written backward where candle's stock ops have none or waste work.

pub mod kernels;
pub mod ops;

pub use ops::{attention, cross_entropy, dropout, embedding, gelu, layer_norm, linear};

use std::cell::Cell;

/// Seeds for the dropout sites of one forward pass. Each call of `next`
/// gives a fresh seed; the same (seed, step) replays the same masks, so the
/// dropout seed is independent of the init and data-order seeds.
pub struct DropoutRng {
    base: u64,
    counter: Cell<u64>,
}

impl DropoutRng {
    pub fn new(seed: u64, step: u64) -> Self {
        DropoutRng {
            base: kernels::splitmix64(seed ^ kernels::splitmix64(step.wrapping_add(0x5eed))),
            counter: Cell::new(0),
        }
    }
    pub fn next(&self) -> u64 {
        let c = self.counter.get();
        self.counter.set(c + 1);
        kernels::splitmix64(self.base ^ kernels::splitmix64(c))
    }
}
