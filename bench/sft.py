"""Benchmark a LoRA SFT step of SmolLM2-135M side by side: afinar vs PyTorch +
PEFT on the same f32 weights (the Q4_1 GGUF dequantised once by afinar into an
HF folder both load), LoRA r=8 on q_proj/v_proj, batch 2 x seq 512, f32, 2
threads; step = forward + backward + AdamW. Interleaved processes; median step
time, tokens/s and peak RSS; ratio afinar / PyTorch.

    cargo build --release -p afinar-cli -p afinar --example sft_step --example fma_peak
    . .venv/bin/activate && python bench/sft.py [--rounds 2 --steps 3] [--raw bench/raw/sft-DATE.json] [--append bench/RESULTS.md]

Without --model it fetches smollm2-135m-instruct (`afinar fetch`) and exports it once to an f32 HF
folder in the afinar cache (`afinar export ... --merged`), which both sides then read. Both sides
compute the global grad norm; PyTorch runs AdamW(fused=True). Reports the median step, the ratio and
its range over rounds, the share of the measured FMA peak (examples/fma_peak.rs) each side reaches
counting the model's matmul flops, and peak RSS whole-process and net of each side's start-up.
Not a test: nothing here asserts a time.
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
from w1 import ROOT, afinar_bin, cpu, cpu_name, fetched, fma_peak, ratio_range, run  # noqa: E402


def cache_dir():
    """afinar's cache folder, as `hub::assets::cache_dir` finds it."""
    if os.environ.get("AFINAR_CACHE"):
        return Path(os.environ["AFINAR_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "afinar"
    return Path.home() / ".cache" / "afinar"


def f32_smollm2():
    """SmolLM2-135M-Instruct as an f32 HF folder both sides load: the fetched GGUF, exported once."""
    out = cache_dir() / "bench" / "smollm2-135m-instruct-f32"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([afinar_bin("afinar"), "export", fetched("smollm2-135m-instruct"), "--merged", str(out)],
                       cwd=ROOT, check=True)
    return str(out)


def sft_flops(model_dir, batch, seq):
    """Model flops of one LoRA SFT step (frozen base: forward + input-gradient backward = 2 forwards;
    matmuls only: the projections, causal attention (half the T x T scores) and the LM head)."""
    c = json.load(open(Path(model_dir) / "config.json"))
    h, i, layers, heads = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * (h // heads)
    n = batch * seq
    proj = 2 * n * (2 * h * h + 2 * h * kv + 3 * h * i)
    attn = 2 * 2 * batch * heads * (h // heads) * seq * seq / 2
    head = 2 * n * h * c["vocab_size"]
    return 2 * (layers * (proj + attn) + head)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an f32 HF folder of SmolLM2-135M (default: exported from `afinar fetch`)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--raw", help="write every measurement here (JSON)")
    ap.add_argument("--append")
    ap.add_argument("--afinar-sft", help="another build of examples/sft_step (default target/release/examples/sft_step)")
    a = ap.parse_args()
    model = a.model or f32_smollm2()
    common = ["--model", model, "--batch", str(a.batch), "--seq", str(a.seq),
              "--steps", str(a.steps), "--threads", str(a.threads)]
    cmds = {"afinar": [a.afinar_sft or afinar_bin("examples/sft_step")] + common,
            "pytorch": [sys.executable, str(ROOT / "bench/pytorch_sft.py")] + common}
    peak_before, peak = fma_peak(a.threads)
    res = {k: [] for k in cmds}
    for r in range(a.rounds):
        order = list(cmds) if r % 2 == 0 else list(reversed(list(cmds)))
        for impl in order:
            out = run(cmds[impl])
            res[impl].append(out)
            print(f"round {r} {impl:8s} median {out['median_s']:.3f} s  {out['tokens_per_s']:.0f} tok/s  "
                  f"rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    peak_after, peak2 = fma_peak(a.threads)
    peak = max(peak, peak2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    af = statistics.median([s for o in res["afinar"] for s in o["steps"]])
    pt = statistics.median([s for o in res["pytorch"] for s in o["steps"]])
    lo, hi = ratio_range(res["afinar"], res["pytorch"])
    ra = max(o["peak_rss_mb"] for o in res["afinar"])
    rp = max(o["peak_rss_mb"] for o in res["pytorch"])
    na = ra - min(o.get("base_rss_mb", 0.0) for o in res["afinar"])
    np_ = rp - min(o.get("base_rss_mb", 0.0) for o in res["pytorch"])
    gf = sft_flops(model, a.batch, a.seq) / 1e9
    tok = a.batch * a.seq
    simd = res["afinar"][0].get("simd", "?")
    table = "\n".join([
        f"### SmolLM2-135M LoRA SFT step, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, batch {a.batch} x seq {a.seq}, {a.rounds} interleaved rounds x {a.steps} steps; "
        f"AdamW(fused=True), grad norm on both sides; afinar kernels at {simd}; measured FMA peak {peak:.0f} GFLOP/s",
        "",
        "| | afinar | PyTorch + PEFT | ratio |",
        "|---|---|---|---|",
        f"| step (s) | {af:.2f} | {pt:.2f} | {af / pt:.2f}x (rounds {lo:.2f}-{hi:.2f}x) |",
        f"| tokens/s | {tok / af:.0f} | {tok / pt:.0f} | {pt / af:.2f}x |",
        f"| % of FMA peak ({gf:.0f} GFLOP/step) | {100 * gf / af / peak:.0f}% | {100 * gf / pt / peak:.0f}% | |",
        f"| peak RSS (MB) | {ra:.0f} | {rp:.0f} | {ra / rp:.2f}x |",
        f"| peak RSS net of start-up (MB) | {na:.0f} | {np_:.0f} | {na / np_:.2f}x |",
    ]) + "\n"
    print(table)
    if a.raw:
        raw = {"bench": "sft", "date": str(datetime.date.today()), "commit": commit, "cpu": cpu()[0], "simd_flags": cpu()[1],
               "threads": a.threads, "batch": a.batch, "seq": a.seq, "model": model, "gflop_per_step": gf,
               "afinar_simd_env": os.environ.get("AFINAR_SIMD"), "fma_peak": [peak_before, peak_after],
               "summary": {"afinar_s": af, "pytorch_s": pt, "ratio": af / pt, "ratio_range": [lo, hi],
                           "afinar_rss_mb": ra, "pytorch_rss_mb": rp, "afinar_net_mb": na, "pytorch_net_mb": np_},
               "runs": res}
        Path(a.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(a.raw).write_text(json.dumps(raw, indent=1) + "\n")
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
