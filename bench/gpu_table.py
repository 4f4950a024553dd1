"""The GPU table of bench/gpu.sh: per batch size, the median step of afinar and
PyTorch + PEFT over their interleaved runs, tokens/s, the ratio and the MFU.

MFU counts the model FLOPs of a LoRA step on a frozen base: forward 2N per
token, backward 2N (input gradients only; the frozen weights get none), N the
matmul parameters including the LM head, plus attention's score and value
products (forward 4 T C per token and layer, backward twice that), against
the card's dense bf16 peak (989 TFLOP/s for H100 / H200 SXM).
"""

import json
import statistics
import sys

N_MATMUL = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536) + 49152 * 576
LAYERS, C = 30, 576
PEAK = 989e12


def flops_per_token(seq):
    return 4 * N_MATMUL + 3 * 4 * seq * C * LAYERS


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
    gpu = open(sys.argv[2]).read().strip() if len(sys.argv) > 2 else "?"
    print(f"GPU: {gpu}\n")
    print("| batch x seq | afinar step (ms) | afinar tok/s | PyTorch+PEFT step (ms) | PyTorch tok/s | "
          "time ratio afinar/PyTorch | afinar MFU | PyTorch MFU | GPU memory in use at the end, nvidia-smi, afinar / PyTorch (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for b in sorted({r["batch"] for r in rows}):
        res = {}
        for impl in ["afinar", "pytorch"]:
            rs = [r for r in rows if r["batch"] == b and r["impl"] == impl]
            if not rs:
                continue
            med = statistics.median([s for r in rs for s in r["steps"]])
            mem = max(r.get("gpu_used_mb_at_end") or 0 for r in rs)
            res[impl] = (med, mem, rs[0]["seq"])
        if len(res) < 2:
            print(f"| {b} | missing: {sorted(set(['afinar', 'pytorch']) - set(res))} |")
            continue
        (a, am, t), (p, pm, _) = res["afinar"], res["pytorch"]
        tok = b * t
        fl = flops_per_token(t) * tok
        print(f"| {b} x {t} | {a * 1e3:.1f} | {tok / a:.0f} | {p * 1e3:.1f} | {tok / p:.0f} | {a / p:.2f}x | "
              f"{fl / a / PEAK * 100:.1f}% | {fl / p / PEAK * 100:.1f}% | {am:.0f} / {pm:.0f} |")


if __name__ == "__main__":
    main()
