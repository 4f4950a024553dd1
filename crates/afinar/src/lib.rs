//! afinar: fine-tuning pretrained models in Rust.
//!
//! The library holds everything but argv and the terminal: checkpoint
//! loading (`hub`), differentiable layers with hand-written backward (`nn`),
//! model families (`models`), task heads (`heads`), the parameter selector
//! (`params`), data (`data`), the optimiser (`optim`), the explicit training
//! loop (`train`) and export (`export`).

pub mod error;
pub mod fsutil;

pub use error::{Error, Result};
pub mod config;
pub mod data;
pub mod heads;
pub mod hub;
pub mod metrics;
pub mod models;
pub mod nn;
pub mod optim;
pub mod params;
pub mod plot;
pub mod train;
