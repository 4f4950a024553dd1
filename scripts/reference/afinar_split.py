"""afinar's deterministic train / validation / test split, in Python.

Used by train_sarcasm.py so the reference run sees exactly the rows afinar sees, and, when run as
a script, writes tests/fixtures/split_golden.json (n=1000, seed=42, ratios 0.8/0.1/0.1: n_train,
n_val, n_test and the first 20 indices of each part) for the Rust implementation to match.

The rule (row index i is 0-based, in file order; all arithmetic on u64, wrapping):
    key(i) = splitmix64(seed ^ splitmix64(i))
    order  = row indices sorted by (key(i), i) ascending
    n_train = floor(n * r_train); n_val = floor(n * r_val); test = the rest
    train = order[:n_train]; val = order[n_train:n_train+n_val]; test = order[n_train+n_val:]
floor(n * r) is computed in IEEE f64 (Rust: `(n as f64 * r).floor() as usize`).

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/afinar_split.py
"""

import json
import math
from pathlib import Path

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def split_key(seed: int, i: int) -> int:
    return splitmix64((seed & MASK64) ^ splitmix64(i))


def split_indices(n: int, seed: int, ratios) -> tuple[list[int], list[int], list[int]]:
    """Return (train, val, test) row indices for n rows; ratios = (r_train, r_val[, r_test])."""
    r_train, r_val = float(ratios[0]), float(ratios[1])
    order = sorted(range(n), key=lambda i: (split_key(seed, i), i))
    n_train = math.floor(n * r_train)
    n_val = math.floor(n * r_val)
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def main():
    n, seed, ratios = 1000, 42, (0.8, 0.1, 0.1)
    train, val, test = split_indices(n, seed, ratios)
    golden = {
        "produced_by": "scripts/reference/afinar_split.py",
        "n": n, "seed": seed, "ratios": list(ratios),
        "n_train": len(train), "n_val": len(val), "n_test": len(test),
        "train_first20": train[:20], "val_first20": val[:20], "test_first20": test[:20],
        "splitmix64": {str(x): splitmix64(x) for x in (0, 1, 42)},
        "key_first5": [split_key(seed, i) for i in range(5)],
    }
    out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "split_golden.json"
    out.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {out}: train {train[:5]}... val {val[:5]}... test {test[:5]}...")


if __name__ == "__main__":
    main()
