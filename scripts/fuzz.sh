#!/usr/bin/env bash
# Fuzz afinar's file parsers with cargo fuzz (libFuzzer); see docs/fuzzing.md.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     (default: all targets, 60 s each)
#
# Runs on stable Rust: the targets are built without a sanitizer
# (`--sanitizer none`; ASan needs nightly), in release with debug assertions
# and overflow checks on, so a panic, an overflow, an abort, a hang
# (`-timeout`), an allocation over 256 MiB (afinar::fuzz_targets::CappedAlloc)
# or a chat template render holding over 256 MiB (afinar::mem_guard)
# is a crash. Installs cargo-fuzz when it is missing. One target at a time.
#
# Environment:
#   FUZZ_ARGS         extra libFuzzer flags, e.g. "-jobs=1 -workers=1"
#   FUZZ_CORPUS_OUT   where new inputs go (default: fuzz/corpus/TARGET, the
#                     committed corpus; minimise it afterwards with
#                     `cargo fuzz cmin -s none TARGET`). The committed corpus
#                     is always read.
#   FUZZ_QUIET=1      libFuzzer's output to a log; print its last status line
#                     and statistics, or its tail when the target fails (CI).
# A crash leaves the input in fuzz/artifacts/TARGET/ and stops the script
# with a non-zero exit; copy it to fuzz/regressions/TARGET/ once fixed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
what=${1:-all}
secs=${2:-60}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# The same flags for build and run, or `run` rebuilds.
build_flags=(--sanitizer none --codegen-units 16)

max_len() {
    case $1 in
        safetensors_header | gguf) echo 65536 ;;
        jsonl | csv) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

if [ "$what" = all ]; then
    mapfile -t targets < <(cargo fuzz list)
else
    targets=("$what")
fi

cargo fuzz build "${build_flags[@]}"
for t in "${targets[@]}"; do
    out=${FUZZ_CORPUS_OUT:+$FUZZ_CORPUS_OUT/$t}
    dirs=(corpus/"$t")
    if [ -n "$out" ]; then
        mkdir -p "$out"
        dirs=("$out" corpus/"$t")
    fi
    echo "== fuzz $t for ${secs}s"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
    run=(cargo fuzz run "${build_flags[@]}" "$t" "${dirs[@]}" --
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048
        -max_len="$(max_len "$t")" -print_final_stats=1 ${FUZZ_ARGS:-})
    if [ "${FUZZ_QUIET:-0}" = 1 ]; then
        log=$(mktemp)
        if ! "${run[@]}" >"$log" 2>&1; then
            tail -n 60 "$log"
            echo "fuzz target $t failed; the input is in fuzz/artifacts/$t/" >&2
            rm -f "$log"
            exit 1
        fi
        grep -E '^#[0-9]+ +DONE|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
        rm -f "$log"
    else
        "${run[@]}"
    fi
done
