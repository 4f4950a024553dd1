//! afinar's own layers: differentiable end to end on the training path, with
//! hand-written backward where candle's stock ops have none or waste work.

pub mod kernels;
pub mod ops;

pub use ops::{attention, cross_entropy, dropout, gelu, layer_norm, linear};
