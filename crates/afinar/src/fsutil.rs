//! Atomic file writes: write to a temporary name beside the target, fsync,
//! rename. A reader never sees a half-written file.

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

/// Write `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Write through a closure to a temporary file, fsync it and rename it onto `path`.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    let tmp = tmp_name(path);
    let res = (|| -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        {
            let mut w = std::io::BufWriter::new(&file);
            fill(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync a folder, so that the names created or renamed in it survive a
/// crash of the machine (not only of the process).
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(d)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(d, e))
}

/// fsync every file under `dir` and the folders themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        let ty = e.file_type().map_err(|e| Error::io(&p, e))?;
        if ty.is_dir() {
            sync_tree(&p)?;
        } else if ty.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
    }
    sync_dir(dir)
}

/// Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; the syscall reads them only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Assemble a folder beside `dir` (`.<name>.tmp.<pid>`), fsync what it
/// holds, and swap it in whole: a reader (or a process killed at any
/// moment) sees the old folder or the new one, never a mix and never
/// neither. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`; where
/// that is missing, the old folder is renamed aside first (a kill between
/// the two renames leaves `.<name>.old.<pid>`).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        if exchange(&tmp, dir).is_ok() {
            // `tmp` now holds the old folder.
            sync_dir(parent)?;
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(());
        }
        let old = parent.join(format!(".{name}.old.{}", std::process::id()));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        sync_dir(parent)?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent)
}

/// Remove what a killed writer left in `dir`: `*.tmp.<pid>` files and
/// `.<name>.tmp.<pid>` / `.<name>.old.<pid>` folders of processes that no
/// longer run. Returns the names removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// The pid in a temporary name this module makes (`x.tmp.<pid>`,
/// `.x.tmp.<pid>`, `.x.old.<pid>`, `.x.tmp.<pid>.png`).
fn temp_owner(name: &str) -> Option<u32> {
    let name = name.strip_suffix(".png").unwrap_or(name);
    let (head, pid) = name.rsplit_once('.')?;
    let pid: u32 = pid.parse().ok()?;
    (head.ends_with(".tmp") || (name.starts_with('.') && head.ends_with(".old"))).then_some(pid)
}

/// Atomically write a value as pretty JSON.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::file(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_swap_is_whole_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("model");
        write_dir_atomic(&dir, |t| write_atomic(&t.join("a"), b"1")).unwrap();
        write_dir_atomic(&dir, |t| write_atomic(&t.join("b"), b"2")).unwrap();
        // The second folder replaced the first whole: no `a`, no leftovers.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["b"]);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // A failing fill keeps the old folder as it was.
        let e = write_dir_atomic(&dir, |t| {
            write_atomic(&t.join("c"), b"3")?;
            Err(Error::msg("boom"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let d = tempfile::tempdir().unwrap();
        // pid 4194304 is above Linux's pid_max: no such process.
        let dead = 4_194_304u32;
        let me = std::process::id();
        for n in [
            format!("metrics.png.tmp.{dead}"),
            format!(".model.tmp.{dead}"),
            format!(".model.old.{dead}"),
            format!(".metrics.tmp.{dead}.png"),
            format!("results.json.tmp.{me}"),
            "keep.tmp".to_string(),
            "model".to_string(),
        ] {
            if n.starts_with(".model") {
                std::fs::create_dir(d.path().join(&n)).unwrap();
            } else {
                std::fs::write(d.path().join(&n), b"x").unwrap();
            }
        }
        let removed = remove_stale_temporaries(d.path()).unwrap();
        assert_eq!(removed.len(), 4, "{removed:?}");
        let mut left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["keep.tmp", "model", &format!("results.json.tmp.{me}")]
        );
    }
    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_json(&p, &serde_json::json!({"x": 1})).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        // A failing writer leaves neither the target nor a temp file.
        let q = dir.path().join("b.bin");
        let err = write_atomic_with(&q, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert!(!q.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
