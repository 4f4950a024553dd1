"""Benchmark a MobileNetV2 training step side by side: afinar vs PyTorch +
torchvision on the same ImageNet weights (the fetched .pth), a new 10-class
head, batch B of S x S images, f32, 2 threads; step = forward + cross-entropy +
backward + global grad norm + AdamW. `full` trains everything (batch
statistics), `head` only classifier.1 (the features frozen, eval-mode batch
norm). Interleaved processes; median step time, images/s and peak RSS; ratio
afinar / PyTorch.

    cargo build --release -p afinar-cli -p afinar --example mobilenet_step
    target/release/afinar fetch mobilenet-v2
    .venv/bin/python bench/mobilenet.py [--rounds 3 --steps 5 --batch 32 --size 96] [--raw bench/raw/mobilenet-DATE.json] [--append bench/RESULTS.md]

PyTorch runs torchvision's model as users do (NCHW, mkldnn convolutions), AdamW(fused=True).
Peak RSS is whole-process (PyTorch's includes ~700 MB of imports) and net of each side's
start-up RSS. Not a test: nothing here asserts a time.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w1 import ROOT, afinar_bin, cpu, cpu_name, fetched, ratio_range, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="the MobileNetV2 .pth (default: the fetched mobilenet-v2 asset)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--modes", default="full,head")
    ap.add_argument("--raw", help="write every measurement here (JSON)")
    ap.add_argument("--append")
    a = ap.parse_args()
    model = a.model or fetched("mobilenet-v2")
    common = ["--model", model, "--batch", str(a.batch), "--size", str(a.size),
              "--steps", str(a.steps), "--threads", str(a.threads)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows, raw_modes = [], {}
    for mode in a.modes.split(","):
        cmds = {"afinar": [afinar_bin("examples/mobilenet_step")] + common + ["--mode", mode],
                "pytorch": [sys.executable, str(ROOT / "bench/pytorch_mobilenet.py")] + common + ["--mode", mode]}
        res = {k: [] for k in cmds}
        for r in range(a.rounds):
            order = list(cmds) if r % 2 == 0 else list(reversed(list(cmds)))
            for impl in order:
                out = run(cmds[impl])
                res[impl].append(out)
                print(f"{mode} round {r} {impl:8s} median {out['median_s']:.3f} s  {out['images_per_s']:.0f} img/s  "
                      f"rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
        af = statistics.median([s for o in res["afinar"] for s in o["steps"]])
        pt = statistics.median([s for o in res["pytorch"] for s in o["steps"]])
        lo, hi = ratio_range(res["afinar"], res["pytorch"])
        ra = max(o["peak_rss_mb"] for o in res["afinar"])
        rp = max(o["peak_rss_mb"] for o in res["pytorch"])
        na = ra - min(o.get("base_rss_mb", 0.0) for o in res["afinar"])
        np_ = rp - min(o.get("base_rss_mb", 0.0) for o in res["pytorch"])
        rows.append((mode, af, pt, lo, hi, ra, rp, na, np_))
        raw_modes[mode] = {"summary": {"afinar_s": af, "pytorch_s": pt, "ratio": af / pt, "ratio_range": [lo, hi],
                                       "afinar_rss_mb": ra, "pytorch_rss_mb": rp, "afinar_net_mb": na,
                                       "pytorch_net_mb": np_}, "runs": res}
    simd = raw_modes[rows[0][0]]["runs"]["afinar"][0].get("simd", "?")
    tv = raw_modes[rows[0][0]]["runs"]["pytorch"][0]
    lines = [
        f"### MobileNetV2 training step, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, batch {a.batch} x {a.size}x{a.size}, {a.rounds} interleaved rounds x {a.steps} steps; "
        f"AdamW(fused=True), grad norm on both sides; torch {tv.get('torch')}, torchvision {tv.get('torchvision')}; afinar kernels at {simd}",
        "",
        "| mode | afinar step (s) | PyTorch step (s) | time ratio | images/s afinar / PyTorch | peak RSS afinar / PyTorch (MB) | ratio | net of start-up (MB) | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, af, pt, lo, hi, ra, rp, na, np_ in rows:
        lines.append(f"| {mode} | {af:.3f} | {pt:.3f} | {af / pt:.2f}x (rounds {lo:.2f}-{hi:.2f}x) | "
                     f"{a.batch / af:.0f} / {a.batch / pt:.0f} | {ra:.0f} / {rp:.0f} | {ra / rp:.2f}x | "
                     f"{na:.0f} / {np_:.0f} | {na / np_:.2f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    if a.raw:
        raw = {"bench": "mobilenet", "date": str(datetime.date.today()), "commit": commit, "cpu": cpu()[0],
               "simd_flags": cpu()[1], "threads": a.threads, "batch": a.batch, "size": a.size, "model": model,
               "afinar_simd_env": os.environ.get("AFINAR_SIMD"), "modes": raw_modes}
        Path(a.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(a.raw).write_text(json.dumps(raw, indent=1) + "\n")
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
