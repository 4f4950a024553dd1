//! What the library's integration tests share: the rule for tests that need
//! a real asset (the library's unit tests have theirs in
//! `hub::assets::testing`, the CLI's tests in `afinar-cli/tests/common`).

#![allow(dead_code)]

use std::path::PathBuf;

/// The fetched asset `name`. When it is not in the cache: `None` after a
/// note on stderr (the test skips), except under CI (`CI` set, non-empty),
/// where the test fails naming the asset and how to fetch it.
pub fn real_asset(name: &str) -> Option<PathBuf> {
    let e = match afinar::hub::assets::resolve_asset_path(name) {
        Ok(p) => return Some(p),
        Err(e) => e,
    };
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{e}\n(CI is set: a missing real asset fails the test; `afinar fetch` fetches them all)");
    }
    eprintln!("skipped: {e}");
    None
}
