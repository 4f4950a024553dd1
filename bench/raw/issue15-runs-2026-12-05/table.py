"""The issue 15 numbers from the run folders beside this script: test before/after per run.

    python3 bench/raw/issue15-runs-2026-12-05/table.py ppo-em ppo-rm ppo-em-after-sft
"""
import json, sys
from pathlib import Path
HERE = Path(__file__).resolve().parent  # the run folders copied beside this script
runs = sys.argv[1:]
keys = ["reward", "exact_match", "kl", "kl_k3", "response_length", "eos_share"]
held = ["directions", "last_word_nth", "swap-words"]
for name in runs:
    lines = [json.loads(l) for l in open(HERE / name / "metrics.jsonl")]
    res = json.load(open(HERE / name / "results.json"))
    tb = [l for l in lines if l.get("split") == "test_before"][0]
    te = [l for l in lines if l.get("split") == "test"][-1]
    tr = [l for l in lines if l.get("split") == "train"]
    val = [(l["step"], round(l["reward"], 3), round(l.get("exact_match", float("nan")), 3)) for l in lines if l.get("split") == "validation"]
    print(f"== {name}: wall {res['wall_s']:.0f} s, best step {res['best_step']}, validation {val}")
    for split, m in [("before", tb), ("after", te)]:
        row = [f"{m.get(k, float('nan')):.3f}" for k in keys]
        hrow = [" / ".join(f"{m.get(f'heldout_{h}_{k}', float('nan')):.3f}" for h in held) for k in ["reward", "exact_match", "kl"]]
        print(f"  {split:6s} test " + " ".join(f"{k}={v}" for k, v in zip(keys, row)) + " | held-out reward " + hrow[0] + " | EM " + hrow[1] + " | kl " + hrow[2])
    if tr:
        f, l = tr[0], tr[-1]
        print("  train first/last: " + ", ".join(f"{k} {f[k]:.3f}->{l[k]:.3f}" for k in ["score", "kl", "entropy", "response_length", "eos_share", "value_loss", "clipfrac", "approx_kl"]))
        print("  rollout tok/s (median over batches): %.1f; update s per batch (median): %.1f" % (sorted(t["rollout_tokens_per_s"] for t in tr)[len(tr)//2], sorted(t["update_s"] for t in tr)[len(tr)//2]))
