"""Issue 17's accuracy table from the raw run outputs in a folder
(bench/raw/issue17-runs-2026-12-05/): per config the trainable share, best
validation accuracy (step), test accuracy and macro-F1 of the best-on-validation
weights, wall time and peak RSS (from `/usr/bin/time -v`), and the PyTorch
reference runs (scripts/reference/train_fmnist.py) where present.

    python3 bench/cnn_table.py bench/raw/issue17-runs-2026-12-05 > bench/raw/issue17-runs-2026-12-05/table.md
"""
import json, re, sys
from pathlib import Path

d = Path(sys.argv[1])
rows = [("head", "head only (`preset = \"head_only\"`)"),
        ("stages", "features.0-6 frozen (`frozen = [\"features.0-6\"]`)"),
        ("full", "full fine-tuning")]
print("| config | trainable | best validation accuracy (step) | test accuracy | test macro-F1 | wall | peak RSS |")
print("|---|---|---|---|---|---|---|")
for v, what in rows:
    f = d / f"{v}-results.json"
    if not f.exists():
        continue
    r = json.loads(f.read_text())
    err = (d / f"{v}.stderr").read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    rss = f"{int(rss.group(1)) / 1024:.0f} MB" if rss else "-"
    share = 100 * r["trainable_params"] / r["total_params"]
    bv = r["best_validation"]
    print(f"| `configs/mobilenet-fmnist-{v}.toml`: {what} | {r['trainable_params']:,} ({share:.2f}%) | "
          f"{bv['accuracy']:.4f} ({r['best_step']}) | {r['test']['accuracy']:.4f} | {r['test']['macro_f1']:.4f} | "
          f"{r['wall_s']:.0f} s | {rss} |")
for v, _ in rows:
    f = d / f"pytorch-{v}-results.json"
    if f.exists():
        r = json.loads(f.read_text())
        print(f"| PyTorch + torchvision, the same recipe (`scripts/reference/train_fmnist.py configs/mobilenet-fmnist-{v}.toml`) | | "
              f"{r['best_validation_accuracy']:.4f} ({r['best_step']}) | {r['test_accuracy']:.4f} | | {r['wall_s']:.0f} s | |")
