"""W1 with two afinar builds side by side: step time and peak RSS of `before` and `after`, interleaved.

W1 = MiniLM-L6 shape (all-MiniLM-L6-v2 weights), batch 16 x seq 128, f32, 2 threads; a step is
forward + backward + AdamW (`full`: everything trains; `lora`: LoRA r=8 on query/value + head;
`infer`: forward only). Each (build, mode) runs in its own process, in rounds that alternate the
order of the two builds (A B, then B A, ...), so load on a shared machine hits both alike. Reports
the median step over every step of every round, the peak RSS, and after / before.

Build the two binaries of `crates/afinar/examples/w1.rs` first, e.g.:

    git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release -p afinar --example w1)
    cargo build --release -p afinar --example w1
    python3 bench/w1_ab.py --before /tmp/before/target/release/examples/w1 \
        --after target/release/examples/w1 --rounds 6 --steps 5 \
        [--raw bench/raw/w1_ab-DATE.json] [--append bench/RESULTS.md]

Needs only Python 3 (no PyTorch). Not a test: nothing here asserts a time.
"""

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from w1 import ROOT, cpu, cpu_name, run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="full,lora,infer")
    ap.add_argument("--raw", help="write every measurement here (JSON)")
    ap.add_argument("--append", help="append the table to this markdown file")
    a = ap.parse_args()
    modes = a.modes.split(",")
    builds = {"before": a.before, "after": a.after}
    res = {(b, m): [] for b in builds for m in modes}
    for r in range(a.rounds):
        for m in modes:
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for b in order:
                out = run([builds[b], "--mode", m, "--steps", str(a.steps), "--threads", str(a.threads)])
                res[(b, m)].append(out)
                print(f"round {r} {b:6s} {m:5s} median {out['median_s']:.3f} s  rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    name, simd = cpu()
    lines = [
        f"### W1 before / after, {datetime.date.today()}",
        f"{cpu_name()}, {a.threads} threads, {a.rounds} interleaved rounds x {a.steps} steps;",
        f"before = `{a.before}`, after = `{a.after}`",
        "",
        "| mode | before step (s) | after step (s) | time after/before | step range before | step range after | before peak RSS (MB) | after peak RSS (MB) | RSS after/before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for m in modes:
        steps = {b: [s for o in res[(b, m)] for s in o["steps"]] for b in builds}
        med = {b: statistics.median(steps[b]) for b in builds}
        rss = {b: max(o["peak_rss_mb"] for o in res[(b, m)]) for b in builds}
        summary[m] = {"median_s": med, "peak_rss_mb": rss, "time_ratio": med["after"] / med["before"], "rss_ratio": rss["after"] / rss["before"]}
        lines.append(
            f"| {m} | {med['before']:.3f} | {med['after']:.3f} | {med['after'] / med['before']:.3f}x "
            f"| {min(steps['before']):.3f}-{max(steps['before']):.3f} | {min(steps['after']):.3f}-{max(steps['after']):.3f} "
            f"| {rss['before']:.0f} | {rss['after']:.0f} | {rss['after'] / rss['before']:.3f}x |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    if a.raw:
        raw = {
            "cpu": name, "simd": simd, "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
            "builds": builds, "summary": summary,
            "runs": [{"build": b, "mode": m, **o} for (b, m), outs in res.items() for o in outs],
        }
        Path(ROOT / a.raw).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / a.raw).write_text(json.dumps(raw, indent=1) + "\n")
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
