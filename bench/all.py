"""The whole benchmark, one command: W1 (full fine-tuning, LoRA, inference;
bench/w1.py) and the SmolLM2-135M LoRA SFT step at seq 512 (bench/sft.py),
afinar vs PyTorch in interleaved processes on the same machine, each table
appended to bench/RESULTS.md with date, machine and commit.

    cargo build --release -p afinar --examples -p afinar-cli
    . .venv/bin/activate && python bench/all.py [--quick]

The SmolLM2 weights both sides read are the pinned GGUF dequantised once by
`afinar export <gguf> --merged` into a cache folder (made on first use).
Not a test: nothing here asserts a time.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    ap.add_argument("--append", default="bench/RESULTS.md")
    a = ap.parse_args()
    afinar = str(ROOT / "target/release/afinar")
    gguf = subprocess.run([afinar, "fetch", "smollm2-135m-instruct"], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    f32 = Path.home() / ".cache" / "afinar" / "bench" / "smollm2-f32"
    if not (f32 / "model.safetensors").is_file():
        subprocess.run([afinar, "export", gguf, "--merged", str(f32)], check=True)
    rounds, steps = ("2", "3") if a.quick else ("3", "5")
    py = sys.executable
    subprocess.run([py, str(ROOT / "bench/w1.py"), "--rounds", rounds, "--steps", steps,
                    "--modes", "full,lora,infer", "--append", a.append], check=True, cwd=ROOT)
    subprocess.run([py, str(ROOT / "bench/sft.py"), "--model", str(f32), "--rounds", "2",
                    "--steps", "3", "--seq", "512", "--append", a.append], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
