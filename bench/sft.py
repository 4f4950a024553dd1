"""Benchmark a LoRA SFT step of SmolLM2-135M side by side: afinar vs PyTorch +
PEFT on the same f32 weights (the Q4_1 GGUF dequantised once by afinar into an
HF folder both load), LoRA r=8 on q_proj/v_proj, batch 2 x seq 512, f32, 2
threads; step = forward + backward + AdamW. Interleaved processes; median step
time, tokens/s and peak RSS; ratio afinar / PyTorch.

    cargo build --release -p afinar --example sft_step -p afinar-cli
    target/release/afinar export $(target/release/afinar fetch smollm2-135m-instruct | tail -1) --merged /tmp/smollm2-f32
    . .venv/bin/activate && python bench/sft.py --model /tmp/smollm2-f32 [--rounds 2 --steps 3] [--append bench/RESULTS.md]

Not a test: nothing here asserts a time.
"""

import argparse
import datetime
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w1 import ROOT, cpu_name, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--append")
    a = ap.parse_args()
    common = ["--model", a.model, "--batch", str(a.batch), "--seq", str(a.seq),
              "--steps", str(a.steps), "--threads", str(a.threads)]
    cmds = {"afinar": [str(ROOT / "target/release/examples/sft_step")] + common,
            "pytorch": [sys.executable, str(ROOT / "bench/pytorch_sft.py")] + common}
    res = {k: [] for k in cmds}
    for r in range(a.rounds):
        order = list(cmds) if r % 2 == 0 else list(reversed(list(cmds)))
        for impl in order:
            out = run(cmds[impl])
            res[impl].append(out)
            print(f"round {r} {impl:8s} median {out['median_s']:.3f} s  {out['tokens_per_s']:.0f} tok/s  "
                  f"rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    af = statistics.median([s for o in res["afinar"] for s in o["steps"]])
    pt = statistics.median([s for o in res["pytorch"] for s in o["steps"]])
    ra = max(o["peak_rss_mb"] for o in res["afinar"])
    rp = max(o["peak_rss_mb"] for o in res["pytorch"])
    tok = a.batch * a.seq
    table = "\n".join([
        f"### SmolLM2-135M LoRA SFT step, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, batch {a.batch} x seq {a.seq}, {a.rounds} interleaved rounds x {a.steps} steps",
        "",
        "| | afinar | PyTorch + PEFT | ratio |",
        "|---|---|---|---|",
        f"| step (s) | {af:.2f} | {pt:.2f} | {af / pt:.2f}x |",
        f"| tokens/s | {tok / af:.0f} | {tok / pt:.0f} | {pt / af:.2f}x |",
        f"| peak RSS (MB) | {ra:.0f} | {rp:.0f} | {ra / rp:.2f}x |",
    ]) + "\n"
    print(table)
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
