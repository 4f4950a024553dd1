//! Models by Hugging Face hub id (`org/name`), downloaded with the `hf-hub`
//! crate's blocking client into its usual cache layout
//! (`<cache>/models--org--name/{blobs,refs,snapshots/<commit>}`), so the
//! returned snapshot folder opens with `Checkpoint::open`.
//!
//! Follows `huggingface_hub.snapshot_download` restricted to what afinar reads:
//! `config.json`, the tokenizer files, and `model.safetensors` or
//! `model.safetensors.index.json` with its shards. PyTorch `.bin` weights are
//! not fetched (nothing here unpickles them).
//!
//! Offline first: when the cache already holds a complete snapshot for the
//! revision, no request is made; a moving revision such as `main` is therefore
//! not re-checked once cached (pass a commit sha to pin one).

use super::checkpoint::{INDEX_FILE, SINGLE_FILE};
use super::config::CONFIG_FILE;
use super::tokenizer::{COMPANION_FILES, TOKENIZER_FILE};
use crate::{Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HfOptions {
    /// Base URL, `HF_ENDPOINT` or <https://huggingface.co>.
    pub endpoint: String,
    /// Bearer token for gated or private repos (`HF_TOKEN`); none by default.
    pub token: Option<String>,
    /// Draw hf-hub's progress bars on stderr.
    pub progress: bool,
}

impl HfOptions {
    /// Endpoint from `HF_ENDPOINT`, token from `HF_TOKEN`; progress bars when stderr is a terminal.
    pub fn from_env() -> Self {
        use std::io::IsTerminal;
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|s| !s.trim().is_empty());
        Self {
            endpoint: endpoint
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token: std::env::var("HF_TOKEN")
                .ok()
                .filter(|s| !s.trim().is_empty()),
            progress: std::io::stderr().is_terminal(),
        }
    }
}

/// The hf-hub cache under afinar's cache root.
pub fn default_hub_cache(afinar_cache: &Path) -> PathBuf {
    afinar_cache.join("hf")
}

/// Download (or find in `hub_cache`) the files of model `repo_id` at `revision`
/// (default `main`) and return the snapshot folder. Options from the environment.
pub fn download_model(repo_id: &str, revision: Option<&str>, hub_cache: &Path) -> Result<PathBuf> {
    download_model_with(repo_id, revision, hub_cache, &HfOptions::from_env())
}

fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    }
}

struct Fetcher<'a> {
    api: ApiRepo,
    repo_id: &'a str,
    revision: &'a str,
    endpoint: &'a str,
}

impl Fetcher<'_> {
    fn err(&self, file: &str, msg: impl std::fmt::Display) -> Error {
        Error::msg(format!(
            "hub model {}@{}: {file}: {msg}",
            self.repo_id, self.revision
        ))
    }

    /// The local path of `file` (from the cache when there), or `None` when the hub answers 404.
    fn optional(&self, file: &str) -> Result<Option<PathBuf>> {
        self.answer(file, self.api.get(file))
    }

    /// Like `optional`, but always asks the hub, so the file lands in the current commit's snapshot.
    fn fresh(&self, file: &str) -> Result<Option<PathBuf>> {
        self.answer(file, self.api.download(file))
    }

    fn answer(
        &self,
        file: &str,
        got: std::result::Result<PathBuf, ApiError>,
    ) -> Result<Option<PathBuf>> {
        match got {
            Ok(p) => Ok(Some(p)),
            Err(e) => match status_of(&e) {
                Some(404) => Ok(None),
                Some(401) | Some(403) => Err(self.err(
                    file,
                    format!("access denied ({e}): a gated or private repo needs a token in HF_TOKEN"),
                )),
                Some(_) => Err(self.err(file, e)),
                None if matches!(e, ApiError::RequestError(_)) => Err(self.err(
                    file,
                    format!("cannot reach {} ({e}); set HF_ENDPOINT for a mirror, or fetch the model on a machine with access", self.endpoint),
                )),
                None => Err(self.err(file, e)),
            },
        }
    }

    fn required(&self, file: &str, what: &str) -> Result<PathBuf> {
        self.optional(file)?
            .ok_or_else(|| self.err(file, format!("not found (404): {what}")))
    }
}

fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| Error::file(index_path, format!("bad index: {e}")))?;
    let mut shards: Vec<String> = index.weight_map.into_values().collect();
    shards.sort();
    shards.dedup();
    for s in &shards {
        // The index comes from the network: keep shard names inside the snapshot.
        if !crate::hub::checkpoint::is_plain_relative(s) {
            return Err(Error::file(
                index_path,
                format!("refusing shard name `{s}`: shards must be files inside the snapshot (no `..`, no absolute path)"),
            ));
        }
    }
    Ok(shards)
}

/// A snapshot already complete in the cache: config and every weight file.
fn cached_snapshot(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let local = cache.repo(repo.clone());
    let config = local.get(CONFIG_FILE)?;
    if local.get(SINGLE_FILE).is_none() {
        let index = local.get(INDEX_FILE)?;
        for shard in shard_names(&index).ok()? {
            local.get(&shard)?;
        }
    }
    config.parent().map(Path::to_path_buf)
}

/// `download_model` with explicit options.
pub fn download_model_with(
    repo_id: &str,
    revision: Option<&str>,
    hub_cache: &Path,
    opts: &HfOptions,
) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    if repo_id.trim().is_empty() || repo_id.starts_with('/') || repo_id.contains("..") {
        return Err(Error::msg(format!(
            "`{repo_id}` is not a hub model id (expected `org/name`)"
        )));
    }
    // hf-hub writes `refs/<revision>` in the cache: keep it there.
    if !crate::hub::checkpoint::is_plain_relative(revision) {
        return Err(Error::msg(format!(
            "`{revision}` is not a revision (a branch, tag or commit sha; no `..`, no absolute path)"
        )));
    }
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(hub_cache.to_path_buf());
    if let Some(dir) = cached_snapshot(&cache, &repo) {
        return Ok(dir);
    }
    std::fs::create_dir_all(hub_cache).map_err(|e| Error::io(hub_cache, e))?;
    // from_cache, not new(): `new` looks up a home folder and panics without one;
    // the token comes from the options only, never from a token file in the cache.
    let api = ApiBuilder::from_cache(cache)
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| Error::msg(format!("hub client: {e}")))?;
    let f = Fetcher {
        api: api.repo(repo),
        repo_id,
        revision,
        endpoint: &opts.endpoint,
    };

    let mut got: Vec<(String, PathBuf)> = Vec::new();
    let config = f.required(
        CONFIG_FILE,
        "no such repo or revision, or the repo has no config.json",
    )?;
    got.push((CONFIG_FILE.to_string(), config));
    for name in std::iter::once(&TOKENIZER_FILE).chain(COMPANION_FILES) {
        if let Some(p) = f.optional(name)? {
            got.push((name.to_string(), p));
        }
    }
    // Weights last: their presence marks a complete snapshot for `cached_snapshot`.
    match f.optional(SINGLE_FILE)? {
        Some(p) => got.push((SINGLE_FILE.to_string(), p)),
        None => {
            let index = f.optional(INDEX_FILE)?.ok_or_else(|| {
                f.err(SINGLE_FILE, format!("the repo has neither {SINGLE_FILE} nor {INDEX_FILE} (PyTorch .bin weights are not supported)"))
            })?;
            let shards = shard_names(&index)?;
            got.push((INDEX_FILE.to_string(), index));
            for shard in shards {
                let p = f.required(&shard, &format!("shard named in {INDEX_FILE}"))?;
                got.push((shard, p));
            }
        }
    }
    // Files found in the cache belong to the commit of an earlier, interrupted run; when
    // the revision has moved since, fetch them again into the snapshot of the newest file.
    let snapshot = got
        .last()
        .and_then(|(_, p)| p.parent())
        .expect("weights fetched")
        .to_path_buf();
    for (name, p) in &got {
        if p.parent() != Some(snapshot.as_path()) {
            f.fresh(name)?;
        }
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::checkpoint::Checkpoint;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// What the fake hub serves; the test may change it between calls.
    struct Hub {
        files: HashMap<String, Vec<u8>>,
        commit: String,
        log: Vec<String>,
    }

    /// A minimal hub on 127.0.0.1: `GET /{repo}/resolve/{rev}/{file}` with `Range` support
    /// and the headers hf-hub 0.4 reads (`x-repo-commit`, `etag`, `Content-Range`); 404
    /// otherwise. Returns the endpoint.
    fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Hub>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(Mutex::new(Hub {
            files,
            commit: COMMIT.to_string(),
            log: Vec::new(),
        }));
        let hub2 = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = handle(stream, &hub2);
            }
        });
        (endpoint, hub)
    }

    fn handle(mut stream: TcpStream, hub: &Mutex<Hub>) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut range = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut hub = hub.lock().unwrap();
        hub.log.push(format!(
            "{method} {path} {}",
            range.clone().unwrap_or_default()
        ));
        let commit = hub.commit.clone();
        let key = path.trim_start_matches('/');
        let Some(body) = hub.files.get(key) else {
            let msg = b"Entry not found";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                msg.len()
            )?;
            return stream.write_all(msg);
        };
        let etag = crate::hub::assets::sha256_hex(body);
        let size = body.len();
        let (status, slice, extra) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                let start: usize = a.parse().unwrap();
                let end: usize = if b.is_empty() {
                    size - 1
                } else {
                    b.parse::<usize>().unwrap().min(size - 1)
                };
                (
                    "206 Partial Content",
                    &body[start..=end],
                    format!("Content-Range: bytes {start}-{end}/{size}\r\n"),
                )
            }
            None => ("200 OK", &body[..], String::new()),
        };
        write!(
            stream,
            "HTTP/1.1 {status}\r\nx-repo-commit: {commit}\r\netag: \"{etag}\"\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            slice.len()
        )?;
        if method != "HEAD" {
            stream.write_all(slice)?;
        }
        stream.flush()
    }

    fn st_bytes(tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let data: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    v.len(),
                )
            })
            .collect();
        let views = data.iter().map(|(n, b, len)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                    .unwrap(),
            )
        });
        safetensors::serialize(views, None).unwrap()
    }

    fn proxy_set() -> bool {
        // ureq 2 sends every request to a proxy from these variables (it ignores NO_PROXY).
        [
            "ALL_PROXY",
            "all_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
        ]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
    }

    fn opts(endpoint: &str) -> HfOptions {
        HfOptions {
            endpoint: endpoint.to_string(),
            token: None,
            progress: false,
        }
    }

    #[test]
    fn downloads_single_and_sharded_models_from_a_local_hub() {
        if proxy_set() {
            eprintln!("skipped: a proxy variable is set and ureq would route 127.0.0.1 through it");
            return;
        }
        let mut files = HashMap::new();
        let config = br#"{"model_type": "bert", "hidden_size": 4}"#.to_vec();
        let single = st_bytes(&[("w", vec![1., 2., 3.])]);
        files.insert("org/tiny/resolve/main/config.json".into(), config.clone());
        files.insert(
            "org/tiny/resolve/main/tokenizer.json".into(),
            b"{}".to_vec(),
        );
        files.insert(
            "org/tiny/resolve/main/vocab.txt".into(),
            b"[PAD]\n[UNK]\n".to_vec(),
        );
        files.insert("org/tiny/resolve/main/model.safetensors".into(), single);
        // Sharded: no model.safetensors, an index and two shards.
        let index = serde_json::json!({"weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }});
        files.insert(
            "org/sharded/resolve/main/config.json".into(),
            config.clone(),
        );
        files.insert(
            "org/sharded/resolve/main/model.safetensors.index.json".into(),
            index.to_string().into_bytes(),
        );
        files.insert(
            "org/sharded/resolve/main/model-00001-of-00002.safetensors".into(),
            st_bytes(&[("a", vec![1.; 5])]),
        );
        files.insert(
            "org/sharded/resolve/main/model-00002-of-00002.safetensors".into(),
            st_bytes(&[("b", vec![2.; 7])]),
        );
        // Config but no weights.
        files.insert("org/empty/resolve/main/config.json".into(), config.clone());
        let (endpoint, hub) = serve(files);
        let cache = tempfile::tempdir().unwrap();
        let o = opts(&endpoint);

        let dir = download_model_with("org/tiny", None, cache.path(), &o).unwrap();
        assert!(
            dir.ends_with(format!("models--org--tiny/snapshots/{COMMIT}")),
            "{}",
            dir.display()
        );
        assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), config);
        assert!(dir.join("tokenizer.json").is_file() && dir.join("vocab.txt").is_file());
        assert!(!dir.join("tokenizer_config.json").exists()); // 404 → skipped
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(
            ck.load_f32("w").unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 2., 3.]
        );
        let requests = hub.lock().unwrap().log.len();
        assert!(hub
            .lock()
            .unwrap()
            .log
            .iter()
            .any(|l| l.contains("/org/tiny/resolve/main/special_tokens_map.json")));

        // Cached: no request at all the second time.
        let again = download_model_with("org/tiny", None, cache.path(), &o).unwrap();
        assert_eq!(again, dir);
        assert_eq!(hub.lock().unwrap().log.len(), requests);

        let dir = download_model_with("org/sharded", Some("main"), cache.path(), &o).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.names(), vec!["a", "b"]);
        assert_eq!(ck.num_params(), 12);

        let err = download_model_with("org/missing", None, cache.path(), &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/missing@main") && err.contains("config.json") && err.contains("404"),
            "{err}"
        );
        let err = download_model_with("org/empty", None, cache.path(), &o)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/empty") && err.contains("neither model.safetensors"),
            "{err}"
        );
        let err = download_model_with("../x", None, cache.path(), &o)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a hub model id"), "{err}");

        // An interrupted run left config.json of commit A in the cache; the repo has since
        // moved to commit B and gained its weights: everything must end up in B's snapshot.
        let new_config = br#"{"model_type": "bert", "hidden_size": 8}"#.to_vec();
        {
            let mut h = hub.lock().unwrap();
            h.commit = "b".repeat(40);
            h.files.insert(
                "org/empty/resolve/main/config.json".into(),
                new_config.clone(),
            );
            h.files.insert(
                "org/empty/resolve/main/model.safetensors".into(),
                st_bytes(&[("w", vec![0.5; 2])]),
            );
        }
        let dir = download_model_with("org/empty", None, cache.path(), &o).unwrap();
        assert!(
            dir.ends_with(format!("snapshots/{}", "b".repeat(40))),
            "{}",
            dir.display()
        );
        assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), new_config);
        assert_eq!(Checkpoint::open(&dir).unwrap().names(), vec!["w"]);
    }

    /// Shard names come from the downloaded index: one that would leave
    /// the snapshot folder (or reach another repo's URL) is refused, and so
    /// is a revision that would put the cache's ref file elsewhere. No
    /// request is made for either.
    #[test]
    fn shard_names_and_revisions_outside_the_cache_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let index = d.path().join(INDEX_FILE);
        for bad in [
            "../../evil.safetensors",
            "/tmp/evil.safetensors",
            "a/../../evil.safetensors",
            "..\\evil.safetensors",
        ] {
            let j = serde_json::json!({"weight_map": {"w": "model-1.safetensors", "v": bad}});
            std::fs::write(&index, j.to_string()).unwrap();
            let err = shard_names(&index).unwrap_err().to_string();
            assert!(
                err.contains("refusing shard name")
                    && err.contains(bad)
                    && err.contains(INDEX_FILE),
                "{bad}: {err}"
            );
        }
        let j = serde_json::json!({"weight_map": {"w": "model-1.safetensors"}});
        std::fs::write(&index, j.to_string()).unwrap();
        assert_eq!(shard_names(&index).unwrap(), vec!["model-1.safetensors"]);

        // A closed port: were a request made, the error would be "cannot reach".
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let o = opts(&format!("http://127.0.0.1:{port}"));
        for rev in ["../../../outside", "/abs"] {
            let err = download_model_with("org/x", Some(rev), d.path(), &o)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("is not a revision") && err.contains(rev),
                "{err}"
            );
        }
        assert!(!d.path().join("outside").exists());
    }

    #[test]
    fn unreachable_endpoint_is_a_clear_error() {
        if proxy_set() {
            eprintln!("skipped: proxy variable set");
            return;
        }
        // A port that was just free: nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = tempfile::tempdir().unwrap();
        let err = download_model_with(
            "org/x",
            None,
            cache.path(),
            &opts(&format!("http://127.0.0.1:{port}")),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot reach") && err.contains("HF_ENDPOINT"),
            "{err}"
        );
    }
}
