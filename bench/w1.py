"""Benchmark W1 side by side: afinar vs PyTorch + transformers, interleaved.

W1 = MiniLM-L6 shape (all-MiniLM-L6-v2 weights), batch 16 x seq 128, f32,
2 threads; a step = forward + backward + AdamW (`full`: everything trains;
`last2`: the last two layers + head; `infer`: forward only; `lora`: LoRA
r=8 on query/value + head, afinar vs PyTorch + PEFT). Each
(implementation, mode) runs in its own process, in rounds that alternate the
two implementations, so load on the machine hits both alike. Reports the
median step time and peak RSS, and the ratio afinar / PyTorch.

    cargo build --release -p afinar --example w1
    . .venv/bin/activate && python bench/w1.py --rounds 3 --steps 5 [--append bench/RESULTS.md]

PyTorch uses its default SDPA attention (pass --attn eager to change).
Not a test: nothing here asserts a time.
"""

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def cpu():
    """The CPU's model name and the SIMD flags that decide speed (a ratio on one does not hold on
    another)."""
    name, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in flags]
    return name, simd


def cpu_name():
    """The CPU as a table names it: model and SIMD flags."""
    name, simd = cpu()
    return f"{name} ({', '.join(simd) or 'no AVX'})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="full,last2,infer,lora")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--append", help="append the table to this markdown file")
    a = ap.parse_args()
    modes = a.modes.split(",")
    afinar = [str(ROOT / "target/release/examples/w1")]
    torch = [sys.executable, str(ROOT / "bench/pytorch_w1.py"), "--attn", a.attn]
    res = {(impl, m): [] for impl in ("afinar", "pytorch") for m in modes}
    for r in range(a.rounds):
        for m in modes:
            order = [("afinar", afinar), ("pytorch", torch)]
            if r % 2:
                order.reverse()
            for impl, base in order:
                out = run(base + ["--mode", m, "--steps", str(a.steps), "--threads", str(a.threads)])
                res[(impl, m)].append(out)
                print(f"round {r} {impl:8s} {m:6s} median {out['median_s']:.3f} s  rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"### W1, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, {a.rounds} interleaved rounds x {a.steps} steps, PyTorch attention {a.attn}",
        "",
        "| mode | afinar step (s) | PyTorch step (s) | time ratio | afinar peak RSS (MB) | PyTorch peak RSS (MB) | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        af = statistics.median([s for o in res[("afinar", m)] for s in o["steps"]])
        pt = statistics.median([s for o in res[("pytorch", m)] for s in o["steps"]])
        ra = max(o["peak_rss_mb"] for o in res[("afinar", m)])
        rp = max(o["peak_rss_mb"] for o in res[("pytorch", m)])
        lines.append(f"| {m} | {af:.3f} | {pt:.3f} | {af / pt:.2f}x | {ra:.0f} | {rp:.0f} | {ra / rp:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
