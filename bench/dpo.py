"""Benchmark a DPO step of SmolLM2-135M side by side: afinar vs TRL's DPOTrainer (1.16) + PEFT, on the
same f32 weights (the Q4_1 GGUF dequantised once by afinar into an HF folder both load, as bench/sft.py),
LoRA r=8 on q_proj/v_proj, sigmoid loss, beta 0.1, the reference = the base with the adapter off,
f32, 2 threads. The batch: the first --pairs-n pairs of a pairs file (default pairs/evals-sft.jsonl,
`afinar pairs generate`), collated once by TRL's own collator and read by both sides, so the tokens
are the same. Step = reference forward + policy forward + backward + grad norm + AdamW.
Interleaved processes; median step time, tokens/s and peak RSS; ratio afinar / TRL.

    cargo build --release -p afinar-cli -p afinar --example dpo_step
    . .venv/bin/activate && python bench/dpo.py [--pairs F --pairs-n 4 --rounds 2 --steps 3] [--raw bench/raw/dpo-DATE.json] [--append bench/RESULTS.md]

Not a test: nothing here asserts a time.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import f32_smollm2  # noqa: E402
from w1 import ROOT, afinar_bin, cpu, cpu_name, ratio_range, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an f32 HF folder of SmolLM2-135M (default: exported from `afinar fetch`)")
    ap.add_argument("--pairs", default=str(ROOT / "pairs" / "evals-sft.jsonl"))
    ap.add_argument("--pairs-n", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw")
    ap.add_argument("--append")
    a = ap.parse_args()
    model = a.model or f32_smollm2()
    batch = Path(a.raw or "/tmp/dpo-batch").with_suffix(".batch.json")
    subprocess.run([sys.executable, str(ROOT / "bench/pytorch_dpo.py"), "--model", model, "--make-batch",
                    str(batch), "--pairs", a.pairs, "--pairs-n", str(a.pairs_n)], check=True)
    b = json.load(open(batch))
    tokens = sum(len(r) for r in b["input_ids"])
    common = ["--model", model, "--batch-file", str(batch), "--steps", str(a.steps), "--threads", str(a.threads)]
    cmds = {"afinar": [afinar_bin("examples/dpo_step")] + common,
            "trl": [sys.executable, str(ROOT / "bench/pytorch_dpo.py")] + common}
    res = {k: [] for k in cmds}
    for r in range(a.rounds):
        order = list(cmds) if r % 2 == 0 else list(reversed(list(cmds)))
        for impl in order:
            out = run(cmds[impl])
            res[impl].append(out)
            print(f"round {r} {impl:7s} median {out['median_s']:.3f} s  rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    af = statistics.median([s for o in res["afinar"] for s in o["steps"]])
    tr = statistics.median([s for o in res["trl"] for s in o["steps"]])
    lo, hi = ratio_range(res["afinar"], res["trl"])
    ra = max(o["peak_rss_mb"] for o in res["afinar"])
    rt = max(o["peak_rss_mb"] for o in res["trl"])
    na = ra - min(o["base_rss_mb"] for o in res["afinar"])
    nt = rt - min(o["base_rss_mb"] for o in res["trl"])
    lens = sorted(len(r) for r in b["input_ids"])
    table = "\n".join([
        f"### SmolLM2-135M LoRA DPO step vs TRL DPOTrainer, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, {a.pairs_n} pairs ({2 * a.pairs_n} sequences of {lens[0]}-{lens[-1]} tokens, "
        f"{tokens} in all) from {Path(a.pairs).name}, {a.rounds} interleaved rounds x {a.steps} steps; AdamW(fused=True), "
        f"grad norm on both sides; afinar kernels at {res['afinar'][0].get('simd', '?')}",
        "",
        "| | afinar | TRL + PEFT | ratio |",
        "|---|---|---|---|",
        f"| step (s) | {af:.3f} | {tr:.3f} | {af / tr:.2f}x (rounds {lo:.2f}-{hi:.2f}x) |",
        f"| tokens/s | {tokens / af:.0f} | {tokens / tr:.0f} | {tr / af:.2f}x |",
        f"| peak RSS (MB) | {ra:.0f} | {rt:.0f} | {ra / rt:.2f}x |",
        f"| peak RSS net of start-up (MB) | {na:.0f} | {nt:.0f} | {na / nt:.2f}x |",
    ]) + "\n"
    print(table)
    if a.raw:
        raw = {"bench": "dpo", "date": str(datetime.date.today()), "commit": commit, "cpu": cpu()[0],
               "simd_flags": cpu()[1], "threads": a.threads, "pairs": a.pairs, "pairs_n": a.pairs_n,
               "tokens": tokens, "model": model,
               "summary": {"afinar_s": af, "trl_s": tr, "ratio": af / tr, "ratio_range": [lo, hi],
                           "afinar_rss_mb": ra, "trl_rss_mb": rt, "afinar_net_mb": na, "trl_net_mb": nt},
               "runs": res}
        Path(a.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(a.raw).write_text(json.dumps(raw, indent=1) + "\n")
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
