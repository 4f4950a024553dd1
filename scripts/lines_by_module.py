"""Lines of Rust per top-level module of crates/afinar/src at two git revisions.

    python3 scripts/lines_by_module.py BEFORE AFTER      # e.g. d6ed6aef HEAD

Counts every line of every .rs file (code, comments, unit tests), per module
(`src/hub/gguf/llama.rs` counts for `hub`, `src/params.rs` for `params`).
"""

import subprocess
import sys
from collections import Counter


def lines(rev):
    files = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "crates/afinar/src"],
        capture_output=True, text=True, check=True).stdout.split()
    per = Counter()
    for f in files:
        if not f.endswith(".rs"):
            continue
        text = subprocess.run(["git", "show", f"{rev}:{f}"], capture_output=True, text=True,
                              check=True).stdout
        rel = f[len("crates/afinar/src/"):]
        module = rel.split("/")[0].removesuffix(".rs")
        per[module] += text.count("\n")
    return per


def main():
    a, b = sys.argv[1], sys.argv[2]
    la, lb = lines(a), lines(b)
    print(f"| module | lines at {a} | lines at {b} |")
    print("|---|---|---|")
    for m in sorted(set(la) | set(lb)):
        print(f"| {m} | {la.get(m, '—')} | {lb.get(m, '—')} |")
    print(f"| **total** | {sum(la.values())} | {sum(lb.values())} |")


if __name__ == "__main__":
    main()
