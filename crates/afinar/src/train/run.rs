//! The run folder: what a training run writes and what `eval` / `predict`
//! read back.
//!
//! ```text
//! runs/<name>/
//!   config.toml      the resolved run config
//!   metrics.jsonl    one line per logged step and per evaluation
//!   metrics.png      loss and eval curves
//!   model/           best-on-validation weights as an HF checkpoint
//!                    (config.json with BertForSequenceClassification,
//!                    id2label; model.safetensors; tokenizer files)
//!   results.json     the final report (test metrics of model/)
//! ```
//! Every file is written to a temporary name and renamed; a checkpoint
//! folder is assembled beside its final name and swapped in whole.

use super::TrainReport;
use crate::config::Plan;
use crate::{fsutil, Error, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A run folder being written: its lock, `config.toml`, `metrics.jsonl`
/// and, at the end, `results.json`. What a method saves as its model
/// (`model/`, `adapter/`) it writes itself, through `export`.
pub struct RunWriter {
    dir: PathBuf,
    metrics: Mutex<std::fs::File>,
    /// Held while this process writes the folder (removed on drop).
    _lock: RunLock,
}

/// The lock file of a run folder: `.afinar.lock`, holding the writer's pid.
pub const LOCK_FILE: &str = ".afinar.lock";

/// One process writes a run folder at a time. The lock file is created
/// atomically (`create_new`); a lock left by a process that no longer runs
/// (killed with SIGKILL, a crashed machine) is taken over.
struct RunLock {
    path: PathBuf,
}

impl RunLock {
    fn take(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let me = std::process::id();
                    let start = start_time(me).unwrap_or_default();
                    writeln!(f, "{me} {start}").map_err(|e| Error::io(&path, e))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // "<pid> <start time>": a pid alone could be reused by
                    // another process after the writer died (a reboot).
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let mut it = holder.split_whitespace();
                    let pid = it.next().and_then(|p| p.parse::<u32>().ok());
                    let started = it.next().and_then(|s| s.parse::<u64>().ok());
                    let alive = pid.is_some_and(|p| match (start_time(p), started) {
                        (Some(now), Some(then)) => now == then,
                        (Some(_), None) => true,
                        (None, _) => Path::new(&format!("/proc/{p}")).exists(),
                    });
                    if alive {
                        return Err(Error::file(
                            dir,
                            format!(
                                "run folder is in use by process {} (lock file {LOCK_FILE}): choose another --out, or wait for that run to end",
                                pid.unwrap_or(0)
                            ),
                        ));
                    }
                    // Stale: its writer is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::file(
            dir,
            format!("could not take the lock file {LOCK_FILE}: another process keeps taking it"),
        ))
    }
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`, in clock
/// ticks since boot); None where there is no such process or no /proc.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl RunWriter {
    /// Open the run folder `dir` for `plan`: take its lock, write
    /// `config.toml`, start `metrics.jsonl`. `resume`: the folder holds the
    /// run being continued; its log is kept (the loop cuts it back to its
    /// checkpoint) and what a killed writer left half-done is removed.
    pub fn create(dir: &Path, plan: &Plan, resume: bool) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let lock = RunLock::take(dir)?;
        // Temporaries of a writer that was killed (this process holds the
        // lock, so their owner is gone).
        fsutil::remove_stale_temporaries(dir)?;
        let mpath = dir.join("metrics.jsonl");
        let metrics = if resume {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&mpath)
                .map_err(|e| Error::io(&mpath, e))?
        } else {
            fsutil::write_atomic(&dir.join("config.toml"), plan.to_toml()?.as_bytes())?;
            // Truncate: a folder may hold the log of a run that failed (a run
            // that finished is refused by the caller); its lines must not
            // prefix this run's.
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&mpath)
                .map_err(|e| Error::io(&mpath, e))?
        };
        Ok(RunWriter {
            dir: dir.to_path_buf(),
            metrics: Mutex::new(metrics),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn append(&self, v: serde_json::Value) -> Result<()> {
        let mut f = self.metrics.lock().unwrap();
        // One write per line: a kill leaves whole lines (and a resume cuts
        // the log back to its checkpoint anyway).
        let line = format!("{v}\n");
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))
    }

    /// The log's length, made durable (recorded in a checkpoint).
    pub fn metrics_len(&self) -> Result<u64> {
        let f = self.metrics.lock().unwrap();
        let p = self.dir.join("metrics.jsonl");
        f.sync_data().map_err(|e| Error::io(&p, e))?;
        Ok(f.metadata().map_err(|e| Error::io(&p, e))?.len())
    }

    /// Cut the log back to `len` bytes: the lines of steps a resume replays.
    pub fn truncate_metrics(&self, len: u64) -> Result<()> {
        let f = self.metrics.lock().unwrap();
        let p = self.dir.join("metrics.jsonl");
        let have = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        if have < len {
            return Err(Error::file(
                &p,
                format!("holds {have} bytes but the checkpoint recorded {len}: the log was cut or replaced"),
            ));
        }
        f.set_len(len).map_err(|e| Error::io(&p, e))
    }

    pub fn log_skipped(&self, s: &super::checkpoint::Skipped) -> Result<()> {
        self.append(serde_json::json!({
            "step": s.step, "skipped": s.reason, "rows": s.rows,
        }))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn log_step(
        &self,
        step: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_s: f64,
        elapsed_s: f64,
    ) -> Result<()> {
        self.append(serde_json::json!({
            "step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "elapsed_s": elapsed_s,
        }))
    }

    pub fn log_eval(&self, step: usize, split: &str, m: &BTreeMap<String, f64>) -> Result<()> {
        let mut v = serde_json::json!({ "step": step, "split": split });
        for (k, x) in m {
            let key = if k == "loss" {
                "eval_loss".to_string()
            } else {
                k.clone()
            };
            v[key] = serde_json::json!(x);
        }
        self.append(v)
    }

    /// The plot, then `results.json` last: its presence marks the run
    /// finished (a kill before it leaves a run that `--resume` finishes).
    pub fn finish(&self, report: &TrainReport) -> Result<()> {
        let text = std::fs::read_to_string(self.dir.join("metrics.jsonl"))
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))?;
        let records: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let plotted = crate::plot::plot_run(&records, &self.dir.join("metrics.png"));
        fsutil::write_json(&self.dir.join("results.json"), report)?;
        plotted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_stale_when_its_process_is_gone_or_its_pid_reused() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join(LOCK_FILE);
        let me = std::process::id();
        let start = start_time(me).expect("/proc");
        // Held by this very process: refused, naming the pid.
        std::fs::write(&lock, format!("{me} {start}\n")).unwrap();
        let e = RunLock::take(d.path()).err().unwrap().to_string();
        assert!(e.contains(&format!("in use by process {me}")), "{e}");
        // The same pid with another start time: a new process reusing the
        // pid of a dead writer. Taken over.
        std::fs::write(&lock, format!("{me} {}\n", start + 1)).unwrap();
        let l = RunLock::take(d.path()).unwrap();
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(text, format!("{me} {start}\n"));
        drop(l);
        assert!(!lock.exists(), "removed on drop");
    }
}
