//! What the benchmark examples share: argument lookup and peak RSS.

pub fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

pub fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Training allocates the same large activation buffers every step. mimalloc
/// by default gives freed memory back to the OS after 10 ms, and the next
/// step page-faults it in again (zeroed by the kernel): 5-10% of a CPU step
/// (W1 LoRA: 37,000 faults per step). `purge_delay = -1` keeps it mapped;
/// peak memory is unchanged (the same buffers are reused). An explicit
/// `MIMALLOC_PURGE_DELAY` wins. Call first thing in `main`.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // mi_option_purge_delay: index 15 of mimalloc's mi_option_t (v2 and v3).
        // SAFETY: called at start-up, before other threads exist.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) }
    }
}
