#!/usr/bin/env bash
# Builds afinar with the `cuda` feature on a machine without a GPU (see ../shared/GPU.md, docs/cuda.md).
#
# - nvcc 13.0 comes from PyPI wheels (a newer nvcc makes PTX that the 13.0 driver refuses);
# - candle-core is patched (outside the repo, at build time) so that cudarc loads the CUDA
#   libraries at run time instead of linking them: the binary then needs libcudart.so.13 only;
#   and so that its autograd skips the zeros + add of every first gradient
#   (scripts/patch_candle_backprop.py).
#
# Usage: scripts/build-cuda.sh [--gpu-bundle] -> target/cuda/release/afinar + target/cuda/afinar-cuda.gz
#        (--gpu-bundle: also .gpu/{sft_step,cuda_parity,afinar}.gz for bench/gpu.sh)
# Env:   AFINAR_CUDA_TC  toolchain folder (default ~/.cache/afinar/cuda-tc)
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${AFINAR_CUDA_TC:-$HOME/.cache/afinar/cuda-tc}
CU=$TC/root/nvidia/cu13
if [ ! -x "$CU/bin/nvcc" ]; then
  mkdir -p "$TC/whl"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$TC/whl" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
  for f in "$TC"/whl/*.whl; do unzip -q -o "$f" -d "$TC/root"; done
  chmod +x "$CU"/bin/* "$CU"/bin/crt/* "$CU"/nvvm/bin/* 2>/dev/null || true
fi
mkdir -p "$TC/lnk"
ln -sf "$CU/lib/libcudart.so.13" "$TC/lnk/libcudart.so"

# candle-core with cudarc's dynamic loading (two feature names differ from the registry crate).
REG=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 2>/dev/null | head -1 || true)
if [ -z "$REG" ]; then cargo fetch >/dev/null; REG=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 | head -1); fi
PATCHED=$TC/candle-core-0.11.1
if [ ! -f "$PATCHED/Cargo.toml" ]; then
  rm -rf "$PATCHED"; cp -r "$REG" "$PATCHED"
  sed -i 's/"cuda-version-from-build-system",/"cuda-13000",/; s/"dynamic-linking",/"dynamic-loading",/' "$PATCHED/Cargo.toml"
fi
grep -q '"dynamic-loading"' "$PATCHED/Cargo.toml"
# ... and its autograd stores a tensor's first gradient instead of adding it to zeros.
python3 scripts/patch_candle_backprop.py "$PATCHED"

export CUDA_HOME=$CU CUDA_PATH=$CU PATH=$CU/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# Own target dir (different flags would rebuild the CPU tree each time); x86-64-v3 (AVX2/FMA),
# not target-cpu=native: the binary runs on the GPU machine's CPU.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
export RUSTFLAGS="-C target-cpu=x86-64-v3 -L native=$TC/lnk"
PATCH="patch.crates-io.candle-core.path=\"$PATCHED\""
# The patched resolution rewrites Cargo.lock: keep the GPU build's lock apart
# and put the committed one back afterwards.
cp Cargo.lock "$TC/Cargo.lock.cpu"
[ -f "$TC/Cargo.lock.cuda" ] && cp "$TC/Cargo.lock.cuda" Cargo.lock
trap 'cp Cargo.lock "$TC/Cargo.lock.cuda"; cp "$TC/Cargo.lock.cpu" Cargo.lock' EXIT
cargo build --release -p afinar-cli --features cuda --config "$PATCH"
strip -o "$CARGO_TARGET_DIR/afinar-cuda" "$CARGO_TARGET_DIR/release/afinar"
gzip -f -k "$CARGO_TARGET_DIR/afinar-cuda"
ls -la "$CARGO_TARGET_DIR/afinar-cuda.gz"

# --gpu-bundle: also the GPU benchmark and the CPU/CUDA parity tests, stripped
# and gzipped into .gpu/ (what bench/gpu.sh runs on the lent GPU machine).
if [ "${1:-}" = "--gpu-bundle" ]; then
  cargo build --release -p afinar --features cuda --example sft_step --config "$PATCH"
  TEST=$(cargo test --release -p afinar --features cuda --test cuda_parity --no-run \
    --message-format=json --config "$PATCH" |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])')
  mkdir -p .gpu
  rm -f .gpu/*.gz
  for pair in "$CARGO_TARGET_DIR/release/examples/sft_step:sft_step" "$TEST:cuda_parity" \
    "$CARGO_TARGET_DIR/release/afinar:afinar"; do
    src=${pair%%:*} name=${pair##*:}
    strip -o ".gpu/$name" "$src" && gzip -f ".gpu/$name"
  done
  ls -la .gpu
fi
