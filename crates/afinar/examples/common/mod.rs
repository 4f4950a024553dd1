//! What the benchmark examples share: argument lookup and RSS.

pub fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// A `kB` line of `/proc/self/status` (`VmHWM`, `VmRSS`), in MB (0 if absent).
fn status_mb(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The peak resident set so far (VmHWM), MB.
#[allow(dead_code)]
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM")
}

/// The resident set now (VmRSS), MB: read at start-up, the process's own
/// cost before any model loads.
#[allow(dead_code)]
pub fn rss_mb() -> f64 {
    status_mb("VmRSS")
}
