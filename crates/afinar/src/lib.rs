//! afinar: fine-tuning pretrained models in Rust.
//!
//! The library holds everything but argv and the terminal, in layers that
//! only import from below (`docs/design.md`; `tests/layering.rs` checks):
//! files and sources (`hub`), data (`data`), differentiable layers with
//! hand-written backward (`nn`), the parameter store and selector
//! (`params`), the optimiser (`optim`), adapters (`adapters`), model bodies
//! (`models`), task heads (`heads`), generation (`generate`), run configs
//! (`config`), one way out (`export`), the explicit training loop
//! (`train`), finished runs (`runs`) and the methods (`methods`).

pub mod error;
pub mod event;
/// The tensor substrate, for callers of the library.
pub use candle_core;
pub mod export;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod generate;
pub mod mem_guard;

pub use error::{Error, Result};
pub mod adapters;
pub mod config;
pub mod data;
pub mod heads;
pub mod hub;
pub mod methods;
pub mod metrics;
pub mod models;
pub mod modes;
pub mod nn;
pub mod optim;
pub mod params;
pub mod plot;
pub mod runs;
pub mod simd;
#[cfg(test)]
pub(crate) mod testutil;
pub mod train;
pub mod weak;

/// Training allocates the same large activation buffers every step. mimalloc
/// (the allocator of afinar's binaries) by default gives freed memory back
/// to the OS after 10 ms, and the next step page-faults it in again (zeroed
/// by the kernel): 5-10% of a CPU step (W1 LoRA: 37,000 faults per step).
/// `purge_delay = -1` keeps it mapped; peak memory is unchanged (the same
/// buffers are reused). An explicit `MIMALLOC_PURGE_DELAY` wins. Call first
/// thing in `main`; without mimalloc as the global allocator it does nothing.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // mi_option_purge_delay: index 15 of mimalloc's mi_option_t (v2 and v3).
        // SAFETY: called at start-up, before other threads exist.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) }
    }
}

/// The compute device named by `train.device`: "cpu", "cuda" or "cuda:N".
pub fn device(spec: config::DeviceSpec) -> Result<candle_core::Device> {
    let ordinal = match spec {
        config::DeviceSpec::Cpu => return Ok(candle_core::Device::Cpu),
        config::DeviceSpec::Cuda(n) => n,
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::msg(format!(
            "device \"{spec}\": this afinar was built without the cuda feature (scripts/build-cuda.sh builds one with it)"
        )));
    }
    candle_core::Device::new_cuda(ordinal)
        .map_err(|e| Error::msg(format!("device \"{spec}\": no usable CUDA device ({e})")))
}

/// Set up the CPU threads once per process: afinar's kernels run on rayon's
/// global pool with `n` threads (default: all cores). candle's own worker
/// pool spin-waits on a barrier between ops, which on few cores steals time
/// from the pool doing the real work; afinar keeps candle's remaining
/// elementwise ops on the calling thread (`CANDLE_NUM_THREADS=1`), unless
/// the user set that variable.
pub fn init_threads(n: Option<usize>) -> usize {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let n = n.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    rayon::current_num_threads()
}
