//! Models by Hugging Face hub id (`org/name`), downloaded by a small client of
//! afinar's own on `ureq` into the cache layout that Python's `huggingface_hub`
//! and the `hf-hub` crate share, so a cache made by one is read by the others:
//!
//! ```text
//! <cache>/models--org--name/blobs/<etag>                   the bytes, named by content
//!                          /snapshots/<commit>/<file>      -> ../../blobs/<etag> (relative symlink)
//!                          /refs/<revision>                the commit sha the revision named
//! ```
//!
//! The returned snapshot folder opens with `Checkpoint::open`.
//!
//! Follows `huggingface_hub.snapshot_download` restricted to what afinar reads:
//! `config.json`, the tokenizer files, and `model.safetensors` or
//! `model.safetensors.index.json` with its shards. PyTorch `.bin` weights are
//! not fetched (nothing here unpickles them).
//!
//! HTTP as `huggingface_hub/file_download.py` speaks it: `GET
//! {endpoint}/{repo}/resolve/{revision}/{file}` without following redirects.
//! A relative redirect (a renamed repo) is followed on the hub; the hub's last
//! answer carries `x-repo-commit` and the etag (`x-linked-etag` for LFS files,
//! else `etag`); an absolute redirect (the CDN an LFS file lives on) is followed
//! for the body only, and the token goes to the endpoint's host only.
//!
//! The server's headers name paths in the cache, so they are checked before
//! anything is written: the commit must be 40 lowercase hex characters, the
//! etag (quotes and `W/` removed) letters and digits only. A body is written
//! to `blobs/<etag>.incomplete.<pid>`, checked against `Content-Length` and,
//! when the etag is a sha256 (LFS files), against its sha256, fsynced and
//! renamed; a failed check leaves nothing behind.
//!
//! Offline first: when the cache already holds a complete snapshot for the
//! revision, no request is made; a moving revision such as `main` is therefore
//! not re-checked once cached (pass a commit sha to pin one).

use super::checkpoint::{is_plain_relative, INDEX_FILE, SINGLE_FILE};
use super::config::CONFIG_FILE;
use super::tokenizer::{COMPANION_FILES, TOKENIZER_FILE};
use crate::event::Event;
use crate::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

const COMMIT_HEADER: &str = "x-repo-commit";
/// Redirects followed per request (the hub's relative ones, then the CDN's).
const MAX_REDIRECTS: usize = 5;
/// Tries at a consistent snapshot when the revision moves during a download.
const MAX_ROUNDS: usize = 3;

/// How to reach the hub.
#[derive(Debug, Clone)]
pub struct HfOptions {
    /// Base URL, `HF_ENDPOINT` or <https://huggingface.co>.
    pub endpoint: String,
    /// Bearer token for gated or private repos (`HF_TOKEN`); none by default.
    /// Sent to the endpoint's host only, never to a redirect target elsewhere.
    pub token: Option<String>,
    /// Report each downloaded file's progress as `Event::Progress` (the
    /// caller decides whether and how to draw it).
    pub progress: bool,
}

impl HfOptions {
    /// Endpoint from `HF_ENDPOINT`, token from `HF_TOKEN`; progress events on.
    pub fn from_env() -> Self {
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
            progress: true,
        }
    }
}

/// The hub cache under afinar's cache root.
pub fn default_hub_cache(afinar_cache: &Path) -> PathBuf {
    afinar_cache.join("hf")
}

/// Download (or find in `hub_cache`) the files of model `repo_id` at `revision`
/// (default `main`) and return the snapshot folder. Options from the environment;
/// download progress goes to `on`.
pub fn download_model(
    repo_id: &str,
    revision: Option<&str>,
    hub_cache: &Path,
    on: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    download_model_with(repo_id, revision, hub_cache, &HfOptions::from_env(), on)
}

/// A commit sha as the cache names snapshot folders: 40 lowercase hex characters.
fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An etag as a blob name: quotes and a weak `W/` prefix removed (as
/// `huggingface_hub`'s `_normalize_etag`), then letters and digits only
/// (a sha256 for LFS files, a git sha1 for the others).
fn blob_name(etag: &str) -> Option<String> {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e).trim_matches('"');
    (!e.is_empty() && e.len() <= 128 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| e.to_string())
}

/// A sha256 etag (LFS files): 64 hex characters.
fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Percent-encoding as Python's `urllib.parse.quote` (unreserved characters
/// kept; `/` kept too when `keep_slash`).
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://host[:port]` of a URL (the whole string when it has no path).
fn origin(url: &str) -> &str {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find(['/', '?', '#']) {
        Some(i) => &url[..start + i],
        None => url,
    }
}

/// A `Location` header without a host: `huggingface_hub` follows these on the hub.
fn is_relative(location: &str) -> bool {
    !location.contains("://") && !location.starts_with("//")
}

/// `location` resolved against the URL that answered with it.
fn resolve(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with("//") {
        let scheme = base.split_once("://").map_or("https", |(s, _)| s);
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let path = base.split(['?', '#']).next().unwrap_or(base);
        let dir = match path.rfind('/') {
            Some(i) if i >= origin(base).len() => &path[..=i],
            _ => return format!("{path}/{location}"),
        };
        format!("{dir}{location}")
    }
}

/// A header value for an error message: control characters escaped, the rest as sent.
fn shown(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// A file of the snapshot of `commit`.
struct Got {
    commit: String,
    path: PathBuf,
}

struct Fetcher<'a> {
    /// For every host but loopback: honours the proxy variables.
    agent: ureq::Agent,
    /// For loopback hosts (a local mirror): never through a proxy.
    direct: ureq::Agent,
    repo_id: &'a str,
    revision: &'a str,
    endpoint: &'a str,
    token: Option<&'a str>,
    progress: bool,
    /// `<cache>/models--org--name`
    repo_dir: PathBuf,
}

impl Fetcher<'_> {
    /// An answer that is neither the file nor a redirect to it.
    fn unexpected(&self, file: &str, resp: &ureq::Response, url: &str) -> Error {
        self.err(
            file,
            format!(
                "unexpected answer {} {} from {url}",
                resp.status(),
                resp.status_text()
            ),
        )
    }

    fn err(&self, file: &str, msg: impl std::fmt::Display) -> Error {
        Error::msg(format!(
            "hub model {}@{}: {file}: {msg}",
            self.repo_id, self.revision
        ))
    }

    fn file_url(&self, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            quote(self.repo_id, true),
            quote(self.revision, false),
            quote(file, true)
        )
    }

    /// One request, no redirect followed. `None` for 404; the error says what
    /// to do for 401/403 and an unreachable host.
    fn call(&self, file: &str, url: &str) -> Result<Option<ureq::Response>> {
        let agent = if is_loopback(url) {
            &self.direct
        } else {
            &self.agent
        };
        let mut req = agent
            .get(url)
            // The etag names the bytes as stored: no compression in between.
            .set("Accept-Encoding", "identity");
        if let Some(token) = self.token {
            if origin(url).eq_ignore_ascii_case(origin(self.endpoint)) {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
        }
        match req.call() {
            Ok(r) => Ok(Some(r)),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e @ ureq::Error::Status(401 | 403, _)) => Err(self.err(
                file,
                format!("access denied ({e}): a gated or private repo needs a token in HF_TOKEN"),
            )),
            Err(e @ ureq::Error::Status(..)) => Err(self.err(file, e)),
            Err(ureq::Error::Transport(t)) => {
                let host = if url.starts_with(self.endpoint) {
                    self.endpoint
                } else {
                    origin(url)
                };
                Err(self.err(
                    file,
                    format!("cannot reach {host} ({t}); set HF_ENDPOINT for a mirror, or fetch the model on a machine with access"),
                ))
            }
        }
    }

    /// `file` into the cache (its blob downloaded unless already there) and
    /// the snapshot of the commit the hub names; `None` when the hub answers 404.
    fn fetch(&self, file: &str, on: &mut dyn FnMut(Event)) -> Result<Option<Got>> {
        if !is_plain_relative(file) {
            return Err(self.err(file, "refusing a file name outside the snapshot"));
        }
        let mut url = self.file_url(file);
        let mut hops = 0;
        let resp = loop {
            let Some(resp) = self.call(file, &url)? else {
                return Ok(None);
            };
            match resp.header("location") {
                Some(loc) if is_redirect(resp.status()) && is_relative(loc) => {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(self.err(file, format!("more than {MAX_REDIRECTS} redirects")));
                    }
                    url = resolve(&url, loc);
                }
                _ => break resp,
            }
        };
        if resp.status() != 200
            && !(is_redirect(resp.status()) && resp.header("location").is_some())
        {
            return Err(self.unexpected(file, &resp, &url));
        }
        let commit = resp
            .header(COMMIT_HEADER)
            .ok_or_else(|| {
                self.err(
                    file,
                    format!("the hub's answer has no `{COMMIT_HEADER}` header"),
                )
            })?
            .trim()
            .to_string();
        if !is_commit(&commit) {
            return Err(self.err(
                file,
                format!(
                    "refusing `{COMMIT_HEADER}: {}` from the hub: a commit sha is 40 lowercase hex characters (it names the snapshot folder in the cache)",
                    shown(&commit)
                ),
            ));
        }
        let (etag_header, etag) = ["x-linked-etag", "etag"]
            .into_iter()
            .find_map(|h| resp.header(h).map(|v| (h, v.to_string())))
            .ok_or_else(|| self.err(file, "the hub's answer has no `etag` header"))?;
        let Some(etag) = blob_name(&etag) else {
            return Err(self.err(
                file,
                format!(
                    "refusing `{etag_header}: {}` from the hub: an etag must be letters and digits only (a sha256 or git sha1; it names the blob in the cache)",
                    shown(&etag)
                ),
            ));
        };
        let blob = self.repo_dir.join("blobs").join(&etag);
        if !blob.is_file() {
            let body = match resp.header("location") {
                Some(loc) if is_redirect(resp.status()) => {
                    let loc = resolve(&url, loc);
                    self.follow(file, loc)?
                }
                _ => resp,
            };
            self.download(file, body, &blob, &etag, on)?;
        }
        let path = self.repo_dir.join("snapshots").join(&commit).join(file);
        self.link(file, &etag, &path)?;
        Ok(Some(Got { commit, path }))
    }

    /// The body behind a redirect (the CDN of an LFS file), following its own redirects.
    fn follow(&self, file: &str, mut url: String) -> Result<ureq::Response> {
        for _ in 0..MAX_REDIRECTS {
            let resp = self
                .call(file, &url)?
                .ok_or_else(|| self.err(file, format!("404 from the redirect target {url}")))?;
            match resp.header("location") {
                Some(loc) if is_redirect(resp.status()) => url = resolve(&url, loc),
                _ if resp.status() == 200 => return Ok(resp),
                _ => return Err(self.unexpected(file, &resp, &url)),
            }
        }
        Err(self.err(file, format!("more than {MAX_REDIRECTS} redirects")))
    }

    /// Stream `resp`'s body to `blobs/<etag>.incomplete.<pid>`, check its size
    /// and (for a sha256 etag) its sha256, fsync and rename it onto `blob`.
    fn download(
        &self,
        file: &str,
        resp: ureq::Response,
        blob: &Path,
        etag: &str,
        on: &mut dyn FnMut(Event),
    ) -> Result<()> {
        use sha2::{Digest, Sha256};
        let blobs = blob.parent().expect("blob in blobs/");
        std::fs::create_dir_all(blobs).map_err(|e| Error::io(blobs, e))?;
        let tmp = blobs.join(format!("{etag}.incomplete.{}", std::process::id()));
        let expected: Option<u64> = resp
            .header("content-length")
            .and_then(|v| v.trim().parse().ok());
        let res = (|| -> Result<()> {
            let out = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &out);
            let mut reader = resp.into_reader();
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n: u64 = 0;
            let mut progress = Progress::new(self.progress, file, expected, on);
            loop {
                let k = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        progress.done();
                        return Err(
                            self.err(file, format!("download cut off after {n} bytes: {e}"))
                        );
                    }
                };
                hasher.update(&buf[..k]);
                w.write_all(&buf[..k]).map_err(|e| Error::io(&tmp, e))?;
                n += k as u64;
                progress.update(n);
            }
            progress.done();
            w.flush().map_err(|e| Error::io(&tmp, e))?;
            drop(w);
            out.sync_all().map_err(|e| Error::io(&tmp, e))?;
            if let Some(len) = expected.filter(|&len| len != n) {
                return Err(self.err(
                    file,
                    format!("got {n} bytes but Content-Length said {len}; nothing was kept"),
                ));
            }
            if is_sha256(etag) {
                let digest: String = hasher
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                if !digest.eq_ignore_ascii_case(etag) {
                    return Err(self.err(
                        file,
                        format!("the downloaded bytes have sha256 {digest}, not the {etag} the hub's etag names; nothing was kept"),
                    ));
                }
            }
            std::fs::rename(&tmp, blob).map_err(|e| Error::io(blob, e))?;
            crate::fsutil::sync_dir(blobs)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// `snapshots/<commit>/<file>` -> `../../blobs/<etag>` (one more `..` per
    /// subfolder of `file`), as `huggingface_hub` links them on Linux.
    fn link(&self, file: &str, etag: &str, pointer: &Path) -> Result<()> {
        let dir = pointer.parent().expect("pointer in a snapshot");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if pointer.symlink_metadata().is_ok() {
            if pointer.exists() {
                return Ok(()); // same commit, same file: same bytes
            }
            // A dangling link (its blob was deleted): make it again.
            std::fs::remove_file(pointer).map_err(|e| Error::io(pointer, e))?;
        }
        #[cfg(unix)]
        {
            let depth = Path::new(file).components().count();
            let target = format!("{}blobs/{etag}", "../".repeat(depth + 1));
            match std::os::unix::fs::symlink(&target, pointer) {
                Ok(()) => Ok(()),
                // Another process linked it first.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && pointer.exists() => {
                    Ok(())
                }
                Err(e) => Err(Error::io(pointer, e)),
            }
        }
        #[cfg(not(unix))]
        {
            // As huggingface_hub without symlink support: a copy in the snapshot.
            let _ = file;
            let blob = self.repo_dir.join("blobs").join(etag);
            std::fs::copy(&blob, pointer)
                .map(|_| ())
                .map_err(|e| Error::io(pointer, e))
        }
    }

    fn required(&self, file: &str, what: &str, on: &mut dyn FnMut(Event)) -> Result<Got> {
        self.fetch(file, on)?
            .ok_or_else(|| self.err(file, format!("not found (404): {what}")))
    }

    /// Every file afinar reads, each in the snapshot of the commit the hub
    /// named when it was asked. Weights last.
    fn fetch_all(&self, on: &mut dyn FnMut(Event)) -> Result<Vec<Got>> {
        let mut got = vec![self.required(
            CONFIG_FILE,
            "no such repo or revision, or the repo has no config.json",
            on,
        )?];
        for name in std::iter::once(&TOKENIZER_FILE).chain(COMPANION_FILES) {
            got.extend(self.fetch(name, on)?);
        }
        match self.fetch(SINGLE_FILE, on)? {
            Some(g) => got.push(g),
            None => {
                let index = self.fetch(INDEX_FILE, on)?.ok_or_else(|| {
                    self.err(SINGLE_FILE, format!("the repo has neither {SINGLE_FILE} nor {INDEX_FILE} (PyTorch .bin weights are not supported)"))
                })?;
                let shards = shard_names(&index.path)?;
                got.push(index);
                for shard in shards {
                    got.push(self.required(&shard, &format!("shard named in {INDEX_FILE}"), on)?);
                }
            }
        }
        Ok(got)
    }
}

/// One file's download as `Event::Progress`: an event when the whole
/// percent (the whole MB, without a `Content-Length`) changes, and a last
/// one with `finished` once the body is read or the read failed.
struct Progress<'a> {
    on: bool,
    file: &'a str,
    total: Option<u64>,
    done: u64,
    shown: Option<u64>,
    sink: &'a mut dyn FnMut(Event),
}

impl<'a> Progress<'a> {
    fn new(on: bool, file: &'a str, total: Option<u64>, sink: &'a mut dyn FnMut(Event)) -> Self {
        Self {
            on,
            file,
            total,
            done: 0,
            shown: None,
            sink,
        }
    }

    fn send(&mut self, finished: bool) {
        (self.sink)(Event::Progress {
            what: self.file.to_string(),
            done: self.done,
            total: self.total,
            finished,
        });
    }

    fn update(&mut self, n: u64) {
        if !self.on {
            return;
        }
        self.done = n;
        let key = match self.total {
            Some(t) if t > 0 => n.saturating_mul(100) / t,
            _ => n / 1_000_000,
        };
        if self.shown != Some(key) {
            self.shown = Some(key);
            self.send(false);
        }
    }

    fn done(&mut self) {
        if self.on && self.shown.is_some() {
            self.send(true);
            self.shown = None;
        }
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
        if !is_plain_relative(s) {
            return Err(Error::file(
                index_path,
                format!("refusing shard name `{s}`: shards must be files inside the snapshot (no `..`, no absolute path)"),
            ));
        }
    }
    Ok(shards)
}

/// A snapshot already complete in the cache: config and every weight file.
/// The revision is looked up in `refs/` (a commit sha needs no ref, as in
/// `huggingface_hub`).
fn cached_snapshot(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    let commit = match std::fs::read_to_string(repo_dir.join("refs").join(revision)) {
        Ok(s) => s.trim().to_string(),
        Err(_) if is_commit(revision) => revision.to_string(),
        Err(_) => return None,
    };
    if !is_commit(&commit) {
        return None;
    }
    let dir = repo_dir.join("snapshots").join(commit);
    if !dir.join(CONFIG_FILE).is_file() {
        return None;
    }
    if !dir.join(SINGLE_FILE).is_file() {
        for shard in shard_names(&dir.join(INDEX_FILE)).ok()? {
            if !dir.join(shard).is_file() {
                return None;
            }
        }
    }
    Some(dir)
}

/// `download_model` with explicit options.
pub fn download_model_with(
    repo_id: &str,
    revision: Option<&str>,
    hub_cache: &Path,
    opts: &HfOptions,
    on: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    download(
        repo_id,
        revision,
        hub_cache,
        opts,
        // As hf-hub did: HTTPS_PROXY / HTTP_PROXY / ALL_PROXY are honoured.
        agent_builder().try_proxy_from_env(true),
        on,
    )
}

/// What every request shares: no redirect followed by ureq, a read timeout,
/// afinar's user agent.
fn agent_builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("afinar/", env!("CARGO_PKG_VERSION")))
}

/// A URL whose host is this machine (`localhost`, `127.x.x.x`, `[::1]`).
/// ureq 2 sends every request to the proxy of `HTTPS_PROXY` & co. (it reads
/// no `NO_PROXY`), where a proxy cannot reach the caller's own loopback: these
/// go direct, as Go's `http.ProxyFromEnvironment` does for localhost.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The download with `proxied` as the agent for non-loopback hosts.
fn download(
    repo_id: &str,
    revision: Option<&str>,
    hub_cache: &Path,
    opts: &HfOptions,
    proxied: ureq::AgentBuilder,
    on: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    let revision = revision.unwrap_or("main");
    if repo_id.trim().is_empty() || repo_id.starts_with('/') || repo_id.contains("..") {
        return Err(Error::msg(format!(
            "`{repo_id}` is not a hub model id (expected `org/name`)"
        )));
    }
    // The cache keeps `refs/<revision>`: keep it there.
    if !is_plain_relative(revision) {
        return Err(Error::msg(format!(
            "`{revision}` is not a revision (a branch, tag or commit sha; no `..`, no absolute path)"
        )));
    }
    let repo_dir = hub_cache.join(format!("models--{}", repo_id.replace('/', "--")));
    if let Some(dir) = cached_snapshot(&repo_dir, revision) {
        return Ok(dir);
    }
    let endpoint = opts.endpoint.trim_end_matches('/');
    let f = Fetcher {
        agent: proxied.build(),
        direct: agent_builder().build(),
        repo_id,
        revision,
        endpoint,
        token: opts.token.as_deref(),
        progress: opts.progress,
        repo_dir,
    };
    // Each file lands in the snapshot of the commit the hub named for it. When
    // the revision moves mid-download (or an earlier run stopped before it
    // moved), ask again: blobs already there are not downloaded twice.
    for _ in 0..MAX_ROUNDS {
        let got = f.fetch_all(on)?;
        let commit = &got.last().expect("weights fetched").commit;
        if got.iter().all(|g| &g.commit == commit) {
            if revision != commit {
                crate::fsutil::write_atomic(
                    &f.repo_dir.join("refs").join(revision),
                    commit.as_bytes(),
                )?;
            }
            return Ok(f.repo_dir.join("snapshots").join(commit));
        }
    }
    Err(Error::msg(format!(
        "hub model {repo_id}@{revision}: the revision kept moving during the download; try again, or pin a commit sha"
    )))
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
        /// The raw etag header value instead of `"<sha256 of the body>"`.
        etag: Option<String>,
        /// Answer `*.safetensors` as the real hub answers LFS files: a 302 to
        /// the CDN (a second listener) with `x-linked-etag`.
        lfs: bool,
        /// Claim 10 more bytes in `Content-Length` than are sent.
        short: bool,
        /// The CDN flips the last byte of what it serves.
        tamper: bool,
        /// The raw `x-linked-etag` of LFS answers instead of `etag`'s.
        linked_etag: Option<String>,
        /// The CDN's base URL.
        cdn: String,
        /// `METHOD PATH RANGE[ auth]`, one per request, hub and CDN.
        log: Vec<String>,
    }

    /// A minimal hub on 127.0.0.1: `GET /{repo}/resolve/{rev}/{file}` with
    /// `Range` support and the headers the real hub sends (`x-repo-commit`,
    /// `etag`, `Content-Range`; for LFS files a 302 with `x-linked-etag`); 404
    /// otherwise. A second listener is the CDN: `GET /cdn/{key}` answers the
    /// body alone. Returns the endpoint.
    fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<Mutex<Hub>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(Mutex::new(Hub {
            files,
            commit: COMMIT.to_string(),
            etag: None,
            lfs: false,
            short: false,
            tamper: false,
            linked_etag: None,
            cdn: format!("http://{}", cdn.local_addr().unwrap()),
            log: Vec::new(),
        }));
        for l in [listener, cdn] {
            let hub2 = hub.clone();
            std::thread::spawn(move || {
                for stream in l.incoming().flatten() {
                    let _ = handle(stream, &hub2);
                }
            });
        }
        (endpoint, hub)
    }

    fn handle(mut stream: TcpStream, hub: &Mutex<Hub>) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut range = None;
        let mut auth = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
                auth |= k.eq_ignore_ascii_case("authorization");
            }
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut hub = hub.lock().unwrap();
        hub.log.push(format!(
            "{method} {path} {}{}",
            range.clone().unwrap_or_default(),
            if auth { " auth" } else { "" }
        ));
        let commit = hub.commit.clone();
        let (key, from_cdn) = match path.strip_prefix("/cdn/") {
            Some(k) => (k, true),
            None => (path.trim_start_matches('/'), false),
        };
        let Some(body) = hub.files.get(key).cloned() else {
            let msg = b"Entry not found";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                msg.len()
            )?;
            return stream.write_all(msg);
        };
        let etag = hub
            .etag
            .clone()
            .unwrap_or_else(|| format!("\"{}\"", crate::hub::assets::sha256_hex(&body)));
        let mut body = body;
        if from_cdn && hub.tamper {
            *body.last_mut().unwrap() ^= 1;
        }
        let size = body.len();
        if hub.lfs && !from_cdn && key.ends_with(".safetensors") {
            let linked = hub.linked_etag.clone().unwrap_or(etag);
            // The pointer file's git sha1 in `etag`, the content's sha256 in `x-linked-etag`.
            write!(
                stream,
                "HTTP/1.1 302 Found\r\nx-repo-commit: {commit}\r\nx-linked-etag: {linked}\r\netag: \"{}\"\r\nx-linked-size: {size}\r\nLocation: {}/cdn/{key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "e".repeat(40),
                hub.cdn
            )?;
            return stream.flush();
        }
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
        let hub_headers = if from_cdn {
            String::new()
        } else {
            format!("x-repo-commit: {commit}\r\netag: {etag}\r\n")
        };
        write!(
            stream,
            "HTTP/1.1 {status}\r\n{hub_headers}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            slice.len() + if hub.short { 10 } else { 0 }
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

    /// Options pointing at a loopback port nothing listens on.
    fn closed_port_opts() -> HfOptions {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        opts(&format!("http://127.0.0.1:{port}"))
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

        let dir = download_model_with("org/tiny", None, cache.path(), &o, &mut |_| {}).unwrap();
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
        let again = download_model_with("org/tiny", None, cache.path(), &o, &mut |_| {}).unwrap();
        assert_eq!(again, dir);
        assert_eq!(hub.lock().unwrap().log.len(), requests);

        let dir = download_model_with("org/sharded", Some("main"), cache.path(), &o, &mut |_| {})
            .unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        assert_eq!(ck.names(), vec!["a", "b"]);
        assert_eq!(ck.num_params(), 12);

        let err = download_model_with("org/missing", None, cache.path(), &o, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/missing@main") && err.contains("config.json") && err.contains("404"),
            "{err}"
        );
        let err = download_model_with("org/empty", None, cache.path(), &o, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/empty") && err.contains("neither model.safetensors"),
            "{err}"
        );
        let err = download_model_with("../x", None, cache.path(), &o, &mut |_| {})
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
        let dir = download_model_with("org/empty", None, cache.path(), &o, &mut |_| {}).unwrap();
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
        let o = closed_port_opts();
        for rev in ["../../../outside", "/abs"] {
            let err = download_model_with("org/x", Some(rev), d.path(), &o, &mut |_| {})
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
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cannot reach") && err.contains("HF_ENDPOINT"),
            "{err}"
        );
    }

    /// Every path under `dir`, links not followed.
    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&p));
            }
        }
        out
    }

    fn tiny_files() -> HashMap<String, Vec<u8>> {
        let mut files = HashMap::new();
        files.insert(
            "org/tiny/resolve/main/config.json".into(),
            br#"{"model_type": "bert", "hidden_size": 4}"#.to_vec(),
        );
        files.insert(
            "org/tiny/resolve/main/model.safetensors".into(),
            st_bytes(&[("w", vec![1., 2., 3.])]),
        );
        files
    }

    /// The real hub answers an LFS file with a 302 to its CDN: the commit and
    /// the content's sha256 (`x-linked-etag`) come from the hub, the body from
    /// the CDN, and the token goes to the hub only. The cache has the layout
    /// huggingface_hub makes, and a second call reads it without a request.
    #[test]
    #[cfg(unix)]
    fn lfs_weights_come_from_the_cdn_without_the_token() {
        let files = tiny_files();
        let weights = files["org/tiny/resolve/main/model.safetensors"].clone();
        let sha = crate::hub::assets::sha256_hex(&weights);
        let (endpoint, hub) = serve(files);
        hub.lock().unwrap().lfs = true;
        let cache = tempfile::tempdir().unwrap();
        let mut o = opts(&endpoint);
        o.token = Some("hf_secret".into());
        let dir = download_model_with("org/tiny", None, cache.path(), &o, &mut |_| {}).unwrap();
        let repo = cache.path().join("models--org--tiny");
        assert_eq!(dir, repo.join("snapshots").join(COMMIT));
        assert_eq!(
            Checkpoint::open(&dir)
                .unwrap()
                .load_f32("w")
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1., 2., 3.]
        );
        // Relative symlinks into blobs/, named by the sha256, not the pointer's etag.
        assert_eq!(
            std::fs::read_link(dir.join(SINGLE_FILE)).unwrap(),
            Path::new(&format!("../../blobs/{sha}"))
        );
        assert_eq!(
            std::fs::read(repo.join("blobs").join(&sha)).unwrap(),
            weights
        );
        assert!(std::fs::read_link(dir.join(CONFIG_FILE))
            .unwrap()
            .starts_with("../../blobs"));
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            COMMIT
        );
        let log = hub.lock().unwrap().log.clone();
        let (cdn, to_hub): (Vec<_>, Vec<_>) = log.iter().partition(|l| l.contains(" /cdn/"));
        assert_eq!(cdn.len(), 1, "{log:?}");
        assert!(!cdn[0].ends_with(" auth"), "token sent to the CDN: {log:?}");
        assert!(to_hub.iter().all(|l| l.ends_with(" auth")), "{log:?}");

        // Cached: `cached_snapshot` finds it, by branch or by commit, with no request.
        assert_eq!(cached_snapshot(&repo, "main"), Some(dir.clone()));
        assert_eq!(cached_snapshot(&repo, COMMIT), Some(dir.clone()));
        for rev in [None, Some(COMMIT)] {
            assert_eq!(
                download_model_with("org/tiny", rev, cache.path(), &o, &mut |_| {}).unwrap(),
                dir
            );
        }
        assert_eq!(hub.lock().unwrap().log.len(), log.len());
    }

    /// A cache laid out by huggingface_hub (or hf-hub) is used as it is.
    #[test]
    #[cfg(unix)]
    fn reads_a_cache_made_by_huggingface_hub() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--shared");
        let snap = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        for (name, bytes) in [
            (CONFIG_FILE, br#"{"model_type": "bert"}"#.to_vec()),
            (SINGLE_FILE, st_bytes(&[("w", vec![4.])])),
        ] {
            let sha = crate::hub::assets::sha256_hex(&bytes);
            std::fs::write(repo.join("blobs").join(&sha), bytes).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{sha}"), snap.join(name)).unwrap();
        }
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
        // A closed port: a request would fail.
        let o = closed_port_opts();
        let dir = download_model_with("org/shared", None, cache.path(), &o, &mut |_| {}).unwrap();
        assert_eq!(dir, snap);
        assert_eq!(Checkpoint::open(&dir).unwrap().names(), vec!["w"]);
    }

    /// `x-repo-commit` names the snapshot folder and the etag the blob: a
    /// hostile endpoint sending `../..` in either is refused before anything
    /// is written, and nothing appears outside the cache folder.
    #[test]
    fn headers_naming_paths_outside_the_cache_are_refused() {
        assert!(is_commit(COMMIT));
        assert!(!is_commit(&COMMIT.to_uppercase()) && !is_commit("abc"));
        assert_eq!(blob_name("W/\"abc123\"").as_deref(), Some("abc123"));
        assert_eq!(blob_name("\"../../x\""), None);
        assert_eq!(blob_name("\"\""), None);

        let (endpoint, hub) = serve(tiny_files());
        let root = tempfile::tempdir().unwrap();
        let cache = root.path().join("cache");
        let o = opts(&endpoint);
        type Setup = fn(&mut Hub);
        let cases: [(Setup, &[&str]); 5] = [
            (
                |h| h.commit = "../../evil".into(),
                &["x-repo-commit", "../../evil", "40 lowercase hex"],
            ),
            (
                |h| h.commit = "/tmp/evil".into(),
                &["x-repo-commit", "/tmp/evil"],
            ),
            (
                |h| h.commit = COMMIT.to_uppercase(),
                &["x-repo-commit", "0123456789ABCDEF"],
            ),
            (
                |h| h.etag = Some("\"../../x\"".into()),
                &["`etag: \"../../x\"`", "letters and digits"],
            ),
            (
                |h| {
                    // config.json passes; the weights' x-linked-etag does not.
                    h.lfs = true;
                    h.linked_etag = Some("../../../x".into());
                },
                &["model.safetensors", "`x-linked-etag: ../../../x`"],
            ),
        ];
        for (setup, needles) in cases {
            {
                let mut h = hub.lock().unwrap();
                h.commit = COMMIT.into();
                (h.etag, h.linked_etag, h.lfs) = (None, None, false);
                setup(&mut h);
            }
            let err = download_model_with("org/tiny", None, &cache, &o, &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("hub model org/tiny@main") && needles.iter().all(|n| err.contains(n)),
                "{needles:?}: {err}"
            );
            for p in walk(root.path()) {
                assert!(
                    p.starts_with(&cache),
                    "written outside the cache: {}",
                    p.display()
                );
                let name = p.file_name().unwrap().to_string_lossy();
                assert!(!name.contains("evil") && name != "x", "{}", p.display());
            }
        }
        // Only the config of the last case (its etag was fine) was stored.
        let blobs: Vec<_> = walk(&cache)
            .into_iter()
            .filter(|p| p.symlink_metadata().unwrap().is_file())
            .collect();
        assert_eq!(blobs.len(), 1, "{blobs:?}");
    }

    /// A body that is not what its sha256 etag names (from the hub, or from
    /// the CDN of an LFS file), or shorter than its `Content-Length`, is
    /// refused and leaves no blob (nor its temporary).
    #[test]
    fn a_body_that_does_not_match_its_etag_or_length_is_refused() {
        let files = tiny_files();
        let weights_sha =
            crate::hub::assets::sha256_hex(&files["org/tiny/resolve/main/model.safetensors"]);
        let (endpoint, hub) = serve(files);
        let cache = tempfile::tempdir().unwrap();
        let o = opts(&endpoint);
        let wrong = crate::hub::assets::sha256_hex(b"something else");
        let blobs = cache.path().join("models--org--tiny/blobs");
        type Setup = fn(&mut Hub, &str);
        let cases: [(Setup, &[&str]); 3] = [
            (
                |h, wrong| h.etag = Some(format!("\"{wrong}\"")),
                &["config.json", "sha256", "nothing was kept"],
            ),
            (
                |h, _| {
                    h.lfs = true;
                    h.tamper = true;
                },
                &["model.safetensors", "sha256", "nothing was kept"],
            ),
            // config.json is stored by now: the weights are cut short.
            (|h, _| h.short = true, &["model.safetensors", "bytes"]),
        ];
        for (setup, needles) in cases {
            {
                let mut h = hub.lock().unwrap();
                (h.etag, h.lfs, h.tamper, h.short) = (None, false, false, false);
                setup(&mut h, &wrong);
            }
            let err = download_model_with("org/tiny", None, cache.path(), &o, &mut |_| {})
                .unwrap_err()
                .to_string();
            assert!(
                needles.iter().all(|n| err.contains(n)),
                "{needles:?}: {err}"
            );
            for p in walk(&blobs) {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                assert!(
                    !name.contains(".incomplete.") && name != wrong && name != weights_sha,
                    "left behind: {name}"
                );
            }
        }
        assert!(walk(cache.path()).iter().all(|p| !p.ends_with("refs/main")));
        // An honest hub again: the download completes.
        {
            let mut h = hub.lock().unwrap();
            (h.etag, h.lfs, h.tamper, h.short) = (None, true, false, false);
        }
        let dir = download_model_with("org/tiny", None, cache.path(), &o, &mut |_| {}).unwrap();
        assert_eq!(Checkpoint::open(&dir).unwrap().names(), vec!["w"]);
        assert!(blobs.join(&weights_sha).is_file());
    }

    /// Redirect targets and the host the token may go to.
    #[test]
    fn urls_and_origins() {
        let u = "https://huggingface.co/org/m/resolve/main/config.json";
        assert_eq!(origin(u), "https://huggingface.co");
        assert_eq!(origin("http://127.0.0.1:9"), "http://127.0.0.1:9");
        assert!(is_relative("/new/m/resolve/main/config.json") && !is_relative("https://cdn/x"));
        assert!(!is_relative("//cdn.example/x"));
        assert_eq!(
            resolve(u, "/new/m/resolve/main/config.json"),
            "https://huggingface.co/new/m/resolve/main/config.json"
        );
        assert_eq!(
            resolve(u, "//cdn.example/x?a=1"),
            "https://cdn.example/x?a=1"
        );
        assert_eq!(resolve(u, "https://cdn.example/x"), "https://cdn.example/x");
        assert_eq!(
            resolve(u, "other.json"),
            "https://huggingface.co/org/m/resolve/main/other.json"
        );
        assert_eq!(quote("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(quote("sub dir/a.json", true), "sub%20dir/a.json");
        assert_eq!(shown("a\r\nb"), "a\\r\\nb");
    }

    /// A proxy cannot reach this machine's loopback: a local hub is asked
    /// directly whatever proxy the agent has (here one where nothing
    /// listens), so these tests do not depend on `HTTPS_PROXY` & co.
    #[test]
    fn loopback_hosts_are_reached_without_the_proxy() {
        let (endpoint, hub) = serve(tiny_files());
        let dead = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let proxy = ureq::Proxy::new(format!("http://127.0.0.1:{dead}")).unwrap();
        let cache = tempfile::tempdir().unwrap();
        let dir = download(
            "org/tiny",
            None,
            cache.path(),
            &opts(&endpoint),
            agent_builder().proxy(proxy),
            &mut |_| {},
        )
        .unwrap();
        assert!(dir.join("model.safetensors").is_file());
        assert!(!hub.lock().unwrap().log.is_empty());

        for (url, local) in [
            ("http://127.0.0.1:8080/org/m", true),
            ("http://127.1.2.3/x", true),
            ("http://localhost:5000", true),
            ("http://LOCALHOST/x?y", true),
            ("http://[::1]:9/x", true),
            ("http://user:pw@localhost:1/x", true),
            (
                "https://huggingface.co/org/m/resolve/main/config.json",
                false,
            ),
            ("https://cdn-lfs.hf.co/x", false),
            ("http://10.0.0.1:80/x", false),
            ("http://localhost.example.com/x", false),
            ("http://[2001:db8::1]:80/x", false),
        ] {
            assert_eq!(is_loopback(url), local, "{url}");
        }
    }

    /// Download progress is reported as events, never printed: one per
    /// whole percent at most, the last one `finished` with every byte.
    #[test]
    fn download_progress_is_reported_as_events() {
        let mut files = tiny_files();
        let weights = st_bytes(&[("w", vec![0.5; 100_000])]);
        files.insert(
            "org/tiny/resolve/main/model.safetensors".into(),
            weights.clone(),
        );
        let (endpoint, _hub) = serve(files);
        let cache = tempfile::tempdir().unwrap();
        let mut events = Vec::new();
        let o = HfOptions {
            progress: true,
            ..opts(&endpoint)
        };
        download_model_with("org/tiny", None, cache.path(), &o, &mut |e| events.push(e)).unwrap();
        let mut seen: Vec<(u64, bool)> = Vec::new();
        for e in &events {
            match e {
                Event::Progress {
                    what,
                    done,
                    total,
                    finished,
                } if what == "model.safetensors" => {
                    assert_eq!(*total, Some(weights.len() as u64));
                    seen.push((*done, *finished));
                }
                Event::Progress { what, .. } => assert_eq!(what, "config.json"),
                other => panic!("unexpected event {other:?}"),
            }
        }
        let n = weights.len() as u64;
        assert_eq!(seen.last(), Some(&(n, true)), "{seen:?}");
        assert!(seen[..seen.len() - 1].iter().all(|(_, f)| !f), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
        assert!(seen.len() > 2 && seen.len() <= 102, "{} events", seen.len());

        // Progress off: no event.
        let cache = tempfile::tempdir().unwrap();
        let mut n_events = 0;
        download_model_with(
            "org/tiny",
            None,
            cache.path(),
            &opts(&endpoint),
            &mut |_| n_events += 1,
        )
        .unwrap();
        assert_eq!(n_events, 0);
    }
}
