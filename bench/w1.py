"""Benchmark W1 side by side: afinar vs PyTorch + transformers, interleaved.

W1 = MiniLM-L6 shape (all-MiniLM-L6-v2 weights), batch 16 x seq 128, f32,
2 threads; a step = forward + backward + AdamW (`full`: everything trains;
`last2`: the last two layers + head; `infer`: forward only; `lora`: LoRA
r=8 on query/value + head, afinar vs PyTorch + PEFT). Each
(implementation, mode) runs in its own process, in rounds that alternate the
two implementations, so load on the machine hits both alike. Reports the
median step time and peak RSS, and the ratio afinar / PyTorch.

    cargo build --release -p afinar-cli -p afinar --example w1 --example fma_peak
    target/release/afinar fetch all-minilm-l6-v2
    . .venv/bin/activate && python bench/w1.py --rounds 3 --steps 5 \
        [--raw bench/raw/w1-DATE.json] [--append bench/RESULTS.md]

Both sides read the same folder: the one `afinar fetch all-minilm-l6-v2` prints (or --model).
PyTorch uses its default SDPA attention (pass --attn eager to change) and AdamW(fused=True); both
sides compute the global grad norm every step. Reported per mode: the median step over every step
of every round, the ratio afinar / PyTorch and its range over the rounds (each round's medians);
the share of this machine's measured FMA peak (examples/fma_peak.rs, same threads) each side
reaches, counting the model's matmul flops; peak RSS whole-process, net of each side's start-up
(runtime + imports, `base_rss_mb`) and, for the training modes, net of the same side's inference
peak. --raw writes every measurement (JSON). Not a test: nothing here asserts a time.
"""

import argparse
import os
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads([l for l in out.splitlines() if l.startswith("{")][-1])


def cpu():
    """The CPU's model name and the SIMD flags that decide speed (a ratio on one does not hold on
    another)."""
    name, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile") if f in flags]
    return name, simd


def cpu_name():
    """The CPU as a table names it: model and SIMD flags."""
    name, simd = cpu()
    return f"{name} ({', '.join(simd) or 'no AVX'})"


def afinar_bin(name):
    """A built afinar binary (`target/release/...`), or exit saying how to build it."""
    p = ROOT / "target/release" / name
    if not p.exists():
        sys.exit(f"{p} is missing: cargo build --release -p afinar-cli -p afinar --example w1 --example sft_step --example fma_peak")
    return str(p)


def fetched(asset):
    """The folder of a fetched asset: the last line `afinar fetch ASSET` prints."""
    out = subprocess.run([afinar_bin("afinar"), "fetch", asset], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"afinar fetch {asset} failed:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


def fma_peak(threads):
    """This machine's FMA throughput (GFLOP/s) with `threads` threads, at the widest width it has
    (AVX2's when AFINAR_SIMD=avx2 stands in for an AVX2-only machine)."""
    out = run([afinar_bin("examples/fma_peak"), "--threads", str(threads), "--secs", "2"])
    if os.environ.get("AFINAR_SIMD", "").lower() == "avx2":
        return out, out["avx2_gflops"]
    return out, out["avx512_gflops"] or out["avx2_gflops"]


def bert_flops(model_dir, batch, seq):
    """Matmul flops of one forward of BERT (the layers; the pooler and classifier are negligible):
    (total, per layer)."""
    cfg = json.load(open(Path(model_dir) / "config.json"))
    h, i, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n = batch * seq
    layer = 2 * n * (4 * h * h + 2 * h * i) + 2 * 2 * batch * seq * seq * h
    return n_layers * layer, layer


def w1_flops(mode, model_dir, batch, seq):
    """Model flops of one step (matmuls only, the usual MFU accounting: a backward is twice its
    forward where weights train, once where only input gradients flow; recomputation not counted)."""
    f, layer = bert_flops(model_dir, batch, seq)
    return {"infer": f, "full": 3 * f, "lora": 2 * f, "last2": f + 4 * layer}[mode]


def write_out(raw_path, raw, append, table):
    """The raw measurements to --raw (JSON), the table appended to --append."""
    if raw_path:
        Path(raw_path).parent.mkdir(parents=True, exist_ok=True)
        Path(raw_path).write_text(json.dumps(raw, indent=1) + "\n")
    if append:
        with open(ROOT / append, "a") as f:
            f.write("\n" + table)


def ratio_range(a_runs, p_runs):
    """min and max over rounds of (afinar round median / PyTorch round median)."""
    rs = [statistics.median(a["steps"]) / statistics.median(p["steps"]) for a, p in zip(a_runs, p_runs)]
    return min(rs), max(rs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="full,lora,infer")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--model", help="the all-minilm-l6-v2 folder (default: `afinar fetch all-minilm-l6-v2`)")
    ap.add_argument("--raw", help="write every measurement here (JSON)")
    ap.add_argument("--append", help="append the table to this markdown file")
    ap.add_argument("--afinar-w1", help="another build of examples/w1 (default target/release/examples/w1)")
    a = ap.parse_args()
    modes = a.modes.split(",")
    model = a.model or fetched("all-minilm-l6-v2")
    afinar = [a.afinar_w1 or afinar_bin("examples/w1"), "--model", model]
    torch = [sys.executable, str(ROOT / "bench/pytorch_w1.py"), "--attn", a.attn, "--model", model]
    peak_before, peak = fma_peak(a.threads)
    res = {(impl, m): [] for impl in ("afinar", "pytorch") for m in modes}
    for r in range(a.rounds):
        for m in modes:
            order = [("afinar", afinar), ("pytorch", torch)]
            if r % 2:
                order.reverse()
            for impl, base in order:
                out = run(base + ["--mode", m, "--steps", str(a.steps), "--threads", str(a.threads)])
                res[(impl, m)].append(out)
                print(f"round {r} {impl:8s} {m:6s} median {out['median_s']:.3f} s  rss {out['peak_rss_mb']:.0f} MB", file=sys.stderr)
    peak_after, peak2 = fma_peak(a.threads)
    peak = max(peak, peak2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    simd = res[("afinar", modes[0])][0].get("simd", "?")
    lines = [
        f"### W1, {datetime.date.today()}, commit {commit}",
        f"{cpu_name()}, {a.threads} threads, {a.rounds} interleaved rounds x {a.steps} steps, PyTorch attention {a.attn}, "
        f"AdamW(fused=True), grad norm on both sides; afinar kernels at {simd}{' (AFINAR_SIMD=' + os.environ['AFINAR_SIMD'] + ')' if os.environ.get('AFINAR_SIMD') else ''}"
        f"{'; PyTorch ATEN_CPU_CAPABILITY=' + os.environ['ATEN_CPU_CAPABILITY'] + ', ONEDNN_MAX_CPU_ISA=' + os.environ.get('ONEDNN_MAX_CPU_ISA', '-') + ', MKL_ENABLE_INSTRUCTIONS=' + os.environ.get('MKL_ENABLE_INSTRUCTIONS', '-') if os.environ.get('ATEN_CPU_CAPABILITY') else ''}; "
        f"measured FMA peak {peak:.0f} GFLOP/s ({a.threads} threads)",
        "",
        "| mode | afinar step (s) | PyTorch step (s) | time ratio | ratio range (rounds) | GFLOP/step | afinar % of FMA peak | PyTorch % of FMA peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for m in modes:
        af = statistics.median([s for o in res[("afinar", m)] for s in o["steps"]])
        pt = statistics.median([s for o in res[("pytorch", m)] for s in o["steps"]])
        lo, hi = ratio_range(res[("afinar", m)], res[("pytorch", m)])
        gf = w1_flops(m, model, 16, 128) / 1e9
        summary[m] = {"afinar_s": af, "pytorch_s": pt, "ratio": af / pt, "ratio_range": [lo, hi], "gflop": gf,
                      "afinar_peak_share": gf / af / peak, "pytorch_peak_share": gf / pt / peak}
        lines.append(f"| {m} | {af:.3f} | {pt:.3f} | {af / pt:.2f}x | {lo:.2f}-{hi:.2f}x | {gf:.1f} | "
                     f"{100 * gf / af / peak:.0f}% | {100 * gf / pt / peak:.0f}% |")
    lines += ["", "| mode | afinar peak RSS (MB) | PyTorch peak RSS (MB) | ratio | afinar net of start-up | PyTorch net of start-up | ratio | afinar net of inference | PyTorch net of inference | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    peak_of = lambda impl, m: max(o["peak_rss_mb"] for o in res[(impl, m)])  # noqa: E731
    base_of = lambda impl, m: min(o.get("base_rss_mb", 0.0) for o in res[(impl, m)])  # noqa: E731
    for m in modes:
        ra, rp = peak_of("afinar", m), peak_of("pytorch", m)
        na, np_ = ra - base_of("afinar", m), rp - base_of("pytorch", m)
        row = f"| {m} | {ra:.0f} | {rp:.0f} | {ra / rp:.2f}x | {na:.0f} | {np_:.0f} | {na / np_:.2f}x |"
        summary[m].update({"afinar_rss_mb": ra, "pytorch_rss_mb": rp, "afinar_net_mb": na, "pytorch_net_mb": np_})
        if m != "infer" and "infer" in modes:
            ia, ip = ra - peak_of("afinar", "infer"), rp - peak_of("pytorch", "infer")
            row += f" {ia:.0f} | {ip:.0f} | {ia / ip:.2f}x |"
            summary[m].update({"afinar_net_of_infer_mb": ia, "pytorch_net_of_infer_mb": ip})
        else:
            row += " - | - | - |"
        lines.append(row)
    table = "\n".join(lines) + "\n"
    print(table)
    if a.raw:
        raw = {"bench": "w1", "date": str(datetime.date.today()), "commit": commit, "cpu": cpu()[0], "simd_flags": cpu()[1],
               "threads": a.threads, "rounds": a.rounds, "steps": a.steps, "model": model, "attn": a.attn,
               "afinar_simd_env": os.environ.get("AFINAR_SIMD"),
               "pytorch_isa_env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}, "fma_peak": [peak_before, peak_after],
               "afinar_w1": afinar[0], "summary": summary, "runs": {f"{i}/{m}": v for (i, m), v in res.items()}}
        Path(a.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(a.raw).write_text(json.dumps(raw, indent=1) + "\n")
    if a.append:
        with open(ROOT / a.append, "a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
