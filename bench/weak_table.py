#!/usr/bin/env python3
"""Issue 16's table from the run folders bench/weak.sh wrote:
per dataset, test accuracy and macro-F1 (mean, sample std, min-max over
seeds) of the rules' vote, stage 1, stage 2 (COSINE) and full supervision,
and the wall time of each stage.

    python3 bench/weak_table.py OUT
"""
import json, os, re, statistics, sys

out = sys.argv[1]


def load(p):
    with open(p) as f:
        return json.load(f)


def stat(xs):
    if not xs:
        return "-"
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.4f} ± {sd:.4f} ({min(xs):.4f}-{max(xs):.4f})"


def secs(xs):
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.0f} s ({min(xs):.0f}-{max(xs):.0f})"


print(f"machine: {open(os.path.join(out, 'machine.txt')).read().strip()}\n")
for ds in ["tweets", "spam"]:
    an = os.path.join(out, f"{ds}-analysis", "analysis.json")
    if not os.path.exists(an):
        continue
    a = load(an)
    test = [s for s in a["splits"] if s["split"] == "test"][0]["vote"]
    train = [s for s in a["splits"] if s["split"] == "train"][0]["vote"]
    seeds = sorted({int(m.group(1)) for f in os.listdir(out)
                    for m in [re.match(rf"{ds}-cosine-s(\d+)$", f)] if m})
    rows = {"stage 1": [], "stage 2 (COSINE)": [], "full supervision": []}
    f1 = {k: [] for k in rows}
    wall = {"stage 1": [], "stage 2": [], "full supervision": []}
    steps = {"stage 1": [], "stage 2": [], "full supervision": []}
    for s in seeds:
        c = os.path.join(out, f"{ds}-cosine-s{s}")
        f = os.path.join(out, f"{ds}-off-s{s}")
        if os.path.exists(os.path.join(c, "results.json")):
            r1 = load(os.path.join(c, "stage1", "results.json"))
            r2 = load(os.path.join(c, "results.json"))
            rows["stage 1"].append(r1["test"]["accuracy"])
            f1["stage 1"].append(r1["test"]["macro_f1"])
            rows["stage 2 (COSINE)"].append(r2["test"]["accuracy"])
            f1["stage 2 (COSINE)"].append(r2["test"]["macro_f1"])
            wall["stage 1"].append(r1["wall_s"])
            wall["stage 2"].append(r2["wall_s"] - r1["wall_s"])
            steps["stage 1"].append(r1["steps"])
            steps["stage 2"].append(r2["steps"])
        if os.path.exists(os.path.join(f, "results.json")):
            rf = load(os.path.join(f, "results.json"))
            rows["full supervision"].append(rf["test"]["accuracy"])
            f1["full supervision"].append(rf["test"]["macro_f1"])
            wall["full supervision"].append(rf["wall_s"])
            steps["full supervision"].append(rf["steps"])
    print(f"## {ds}: {a['rules']} rules, label model {a['label_model']}, seeds {seeds}\n")
    print(f"rules on train: {100*train['rule_coverage']:.1f}% of rows voted on, "
          f"{100*train['label_coverage']:.1f}% labelled by the label model\n")
    print("| method | test accuracy | test macro-F1 |")
    print("|---|---|---|")
    print(f"| rules' vote, labelled rows only ({100*test['label_coverage']:.1f}% of test) | "
          f"{test['accuracy_covered']:.4f} | - |")
    print(f"| rules' vote, abstain = wrong | {test['accuracy_abstain_wrong']:.4f} | - |")
    print(f"| rules' vote, abstain = `{test['fallback']}` (validation's most common) | "
          f"{test['accuracy_abstain_fallback']:.4f} | {test['macro_f1_abstain_fallback']:.4f} |")
    for k in rows:
        print(f"| {k} | {stat(rows[k])} | {stat(f1[k])} |")
    print("\n| stage | wall time, mean (min-max) | optimizer steps |")
    print("|---|---|---|")
    for k in wall:
        print(f"| {k} | {secs(wall[k])} | {steps[k]} |")
    print()
