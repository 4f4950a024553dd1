"""Benchmark PPO's two phases on SmolLM2-135M side by side: afinar vs TRL 1.12's PPO trainer (its
last release with PPO) + PEFT, on the same f32 weights (the Q4_1 GGUF dequantised once by afinar
into an HF folder both load, as bench/sft.py), LoRA r=8 on q_proj/v_proj in the policy and in the
value model, f32, 2 threads:

  rollout: --prompts-n prompts (the first rows of the evals-sft training files, chat template)
           answered with --response-length sampled tokens each (temperature 0.7, full length), plus
           the reference's log-probabilities (adapter off) and the values: rollout tokens/s;
  update:  one optimizer step on --micro of those prompts with fixed responses: PPO's loss
           (policy + value forward), backward, grad norm, AdamW.

Both sides read one batch file (bench/pytorch_ppo.py --make-batch). Interleaved processes; median
time per phase, ratio afinar / TRL per round; peak RSS.

    cargo build --release -p afinar-cli -p afinar --example ppo_step
    .venv/bin/pip install --no-deps --target .venv/trl-1.12 trl==1.12.0
    . .venv/bin/activate && python bench/ppo.py [--rounds 2 --steps 3] [--raw bench/raw/ppo-DATE.json] [--append bench/RESULTS.md]

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
from sft import f32_smollm2  # noqa: E402
from w1 import ROOT, afinar_bin, cpu, cpu_name, fetched, ratio_range, run, write_out  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an f32 HF folder of SmolLM2-135M (default: exported from `afinar fetch`)")
    ap.add_argument("--prompts-n", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw")
    ap.add_argument("--append")
    a = ap.parse_args()
    model = a.model or f32_smollm2()
    data = Path(fetched("evals-sft")) / "train"
    batch = Path(a.raw or "/tmp/ppo-batch").with_suffix(".batch.json")
    subprocess.run([sys.executable, str(ROOT / "bench/pytorch_ppo.py"), "--model", model, "--make-batch", str(batch),
                    "--data", str(data), "--prompts-n", str(a.prompts_n), "--response-length",
                    str(a.response_length)], check=True)
    b = json.load(open(batch))
    trl_path = str(ROOT / ".venv" / "trl-1.12")
    if not Path(trl_path).is_dir():
        sys.exit(f"{trl_path} is missing: .venv/bin/pip install --no-deps --target .venv/trl-1.12 trl==1.12.0")
    os.environ["PYTHONPATH"] = trl_path
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    res = {}
    for phase in ["rollout", "update"]:
        common = ["--model", model, "--batch-file", str(batch), "--phase", phase, "--steps", str(a.steps),
                  "--threads", str(a.threads), "--response-length", str(a.response_length), "--micro", str(a.micro)]
        cmds = {"afinar": [afinar_bin("examples/ppo_step")] + common,
                "trl": [sys.executable, str(ROOT / "bench/pytorch_ppo.py")] + common}
        res[phase] = {k: [] for k in cmds}
        for r in range(a.rounds):
            order = list(cmds) if r % 2 == 0 else list(reversed(list(cmds)))
            for impl in order:
                out = run(cmds[impl])
                res[phase][impl].append(out)
                print(f"{phase} round {r} {impl:7s} median {out['median_s']:.3f} s  rss {out['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    rows, summary = [], {}
    for phase in ["rollout", "update"]:
        ra, rt = res[phase]["afinar"], res[phase]["trl"]
        af = statistics.median([s for o in ra for s in o["steps"]])
        tr = statistics.median([s for o in rt for s in o["steps"]])
        lo, hi = ratio_range(ra, rt)
        tok = ra[0]["tokens"]
        pa, pt = max(o["peak_rss_mb"] for o in ra), max(o["peak_rss_mb"] for o in rt)
        summary[phase] = {"afinar_s": af, "trl_s": tr, "ratio": af / tr, "ratio_range": [lo, hi],
                          "tokens": tok, "afinar_rss_mb": pa, "trl_rss_mb": pt}
        what = (f"rollout: {a.prompts_n} prompts x {a.response_length} new tokens" if phase == "rollout"
                else f"update step: {a.micro} rollouts, {tok} tokens")
        rows.append(f"| {what} | {af:.2f} s ({tok / af:.0f} tok/s) | {tr:.2f} s ({tok / tr:.0f} tok/s) | "
                    f"{af / tr:.2f}x (rounds {lo:.2f}-{hi:.2f}x) | {pa:.0f} / {pt:.0f} |")
    lens = sorted(len(q) for q in b["queries"])
    table = "\n".join([
        f"### SmolLM2-135M LoRA PPO vs TRL 1.12 PPOTrainer, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, prompts of {lens[0]}-{lens[-1]} tokens, LoRA r=8 q/v on policy and "
        f"value model, {a.rounds} interleaved rounds x {a.steps} steps; afinar kernels at "
        f"{res['rollout']['afinar'][0].get('simd', '?')}",
        "",
        "| phase | afinar | TRL + PEFT | time ratio | peak RSS MB afinar / TRL |",
        "|---|---|---|---|---|",
        *rows,
    ]) + "\n"
    print(table)
    raw = {"bench": "ppo", "date": str(datetime.date.today()), "commit": commit, "cpu": cpu()[0],
           "simd_flags": cpu()[1], "threads": a.threads, "model": model, "summary": summary, "runs": res}
    write_out(a.raw, raw, a.append, table)


if __name__ == "__main__":
    main()
