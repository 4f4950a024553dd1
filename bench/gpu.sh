#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (docs/cuda.md): CPU/CUDA
# parity tests, then the LoRA SFT step of a SmolLM2-135M-shaped Llama, afinar vs
# PyTorch + PEFT on the same card, interleaved. Binaries come built and gzipped
# in .gpu/ (scripts/build-cuda.sh --gpu-bundle); results land in $OUT.
#
#   bench/gpu.sh [BATCHES...]        (default: 8 32)
set -uo pipefail
OUT=${OUT:-/tmp/afinar-gpu}
mkdir -p "$OUT"
SP=/opt/torch/.venv/lib/python3.12/site-packages
LIBS=$(ls -d "$SP"/nvidia/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}$SP/torch/lib:${LD_LIBRARY_PATH:-}"
export AFINAR_FIXTURES=$PWD/tests/fixtures
BIN=/tmp/afinar-bin
mkdir -p $BIN
for f in .gpu/*.gz; do
  b=$(basename "$f" .gz)
  gunzip -c "$f" >"$BIN/$b" && chmod +x "$BIN/$b"
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "${1:-}" = profile ]; then
  shift
  python3 bench/make_random_lm.py /tmp/smol >/dev/null 2>&1 || { echo "make_random_lm failed"; exit 1; }
  for B in ${*:-32}; do
    echo "== profile, batch $B x 512"
    AFINAR_CUDA_PROFILE=1 "$BIN/sft_step" --model /tmp/smol --device cuda --dtype bf16 --batch "$B" --seq 512 --steps 3 2>&1 | tee -a "$OUT/profile.log"
    python3 bench/pytorch_sft.py --model /tmp/smol --device cuda --dtype bf16 --batch "$B" --seq 512 --steps 3 --profile 2>&1 | grep -v Loading | tee -a "$OUT/profile.log"
  done
  exit 0
fi

if [ "${1:-}" = cli ]; then
  # The CLI end to end on the GPU: LoRA SFT of the tiny Llama fixture, bf16 base,
  # activation checkpointing, evaluation with generation; then the same run on the CPU.
  for dev in cuda cpu; do
    dt=$([ $dev = cuda ] && echo bf16 || echo f32)
    cat >/tmp/sft-$dev.toml <<TOML
[model]
path = "$PWD/tests/fixtures/llama-tiny"
max_length = 64
base_dtype = "$dt"
[task]
type = "sft"
[data]
train = "$PWD/tests/fixtures/sft-tiny/train.jsonl"
messages = "input"
response = "ideal"
split = [0.7, 0.15, 0.15]
generate_eval_rows = 3
[adapter]
type = "lora"
r = 8
target_modules = ["q_proj", "v_proj"]
[train]
epochs = 3
batch_size = 8
lr = 1e-2
eval_every = 5
device = "$dev"
gradient_checkpointing = true
TOML
    echo "== afinar train on $dev"
    RUST_BACKTRACE=0 timeout 120 "$BIN/afinar" train /tmp/sft-$dev.toml --out /tmp/run-$dev 2>&1 | tail -14 | tee -a "$OUT/cli.log"
    ls /tmp/run-$dev | tee -a "$OUT/cli.log"
    tail -2 /tmp/run-$dev/metrics.jsonl | tee -a "$OUT/cli.log"
  done
  exit 0
fi

echo "== parity (CPU vs CUDA, and the decoder fixtures on CUDA)"
timeout 180 "$BIN/cuda_parity" --test-threads=1 --nocapture 2>&1 | tee "$OUT/parity.log" | tail -40

echo "== LoRA SFT step, SmolLM2-135M shape, seq 512, bf16"
python3 bench/make_random_lm.py /tmp/smol >/dev/null 2>&1 || { echo "make_random_lm failed"; exit 1; }
BATCHES=${*:-8 32}
: >"$OUT/bench.jsonl"
for B in $BATCHES; do
  for r in 0 1; do
    A=(timeout 120 "$BIN/sft_step" --model /tmp/smol --device cuda --dtype bf16 --batch "$B" --seq 512 --steps 10)
    P=(timeout 120 python3 bench/pytorch_sft.py --model /tmp/smol --device cuda --dtype bf16 --batch "$B" --seq 512 --steps 10)
    if [ $r = 0 ]; then "${A[@]}" >>"$OUT/bench.jsonl"; "${P[@]}" >>"$OUT/bench.jsonl";
    else "${P[@]}" >>"$OUT/bench.jsonl"; "${A[@]}" >>"$OUT/bench.jsonl"; fi
  done
done
python3 bench/gpu_table.py "$OUT/bench.jsonl" "$OUT/gpu.txt" | tee "$OUT/table.md"
