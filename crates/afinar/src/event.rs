//! What the library tells its caller while it works: progress, notes and
//! warnings, as values. The library never prints; the CLI draws progress
//! bars and writes these lines to stderr, a test collects them.

use std::collections::BTreeMap;

/// What the loop tells its caller (the CLI draws a progress bar from it).
#[derive(Debug, Clone)]
pub enum Event {
    /// A note for the user (the CLI prints it on its own line).
    Info(String),
    /// Something the user should look at; the run goes on.
    Warning(String),
    /// A transfer advanced: `done` of `total` bytes (`None`: size unknown)
    /// of `what` (a file). Sent when the shown amount changes (a whole
    /// percent, or a whole MB without a size), so a line can be redrawn in
    /// place; the last one of each transfer has `finished: true`, also when
    /// the transfer failed, so that line can be ended.
    Progress {
        what: String,
        done: u64,
        total: Option<u64>,
        finished: bool,
    },
    Start {
        total_steps: usize,
        /// Steps already done (a resumed run).
        step: usize,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        tokens_per_s: f64,
    },
    Eval {
        step: usize,
        split: String,
        metrics: BTreeMap<String, f64>,
        best: bool,
    },
}
