"""Check a sequence-classification run of afinar (any family) against transformers and PEFT.

RUN is an afinar run folder; PREDICTIONS.jsonl is what `afinar predict RUN --file ROWS --output
PREDICTIONS.jsonl` wrote for it (one row a line: text, logits). Two checks, each by the script that
does it alone:

1. RUN/model with transformers (`check_hf_export.py RUN/model PREDICTIONS.jsonl`): the folder loads
   with AutoModelForSequenceClassification (e.g. LlamaForSequenceClassification) and gives
   afinar's logits.
2. For an adapter run, RUN/adapter with PEFT (`check_peft_adapter.py BASE RUN/adapter INPUTS`): the
   base named in RUN/adapter/afinar_head.json (an HF folder or a .gguf file) with
   PeftModel.from_pretrained gives afinar's logits. INPUTS is written here from PREDICTIONS.jsonl:
   the texts tokenised by RUN/model's tokenizer (as afinar tokenised them: truncation to the run's
   max_length), right-padded with the model's pad_token_id, and afinar's logits.

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/check_seqcls_run.py RUN PREDICTIONS.jsonl [--tol 1e-4]
Exits 1 if either check fails.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoTokenizer

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    model = a.run / "model"
    cfg = json.loads((model / "config.json").read_text())
    max_length = cfg.get("afinar", {}).get("max_length")
    common = ["--tol", str(a.tol), "--threads", str(a.threads)]
    print(f"== transformers: {model} ({cfg['architectures'][0]})", flush=True)
    ok = subprocess.run(
        [sys.executable, str(HERE / "check_hf_export.py"), str(model), str(a.predictions)]
        + (["--max-length", str(max_length)] if max_length else []) + common
    ).returncode == 0

    adapter = a.run / "adapter"
    if (adapter / "adapter_config.json").is_file():
        note = json.loads((adapter / "afinar_head.json").read_text())
        base = Path(note["base_model_dir"])
        rows = [json.loads(l) for l in a.predictions.read_text().splitlines() if l.strip()]
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        pad = cfg.get("pad_token_id", tok.pad_token_id)
        ids = [tok(r["text"], truncation=bool(max_length), max_length=max_length)["input_ids"] for r in rows]
        t = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [pad] * (t - len(i)) for i in ids], dtype=torch.int64)
        mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i in ids], dtype=torch.int64)
        logits = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)
        with tempfile.TemporaryDirectory() as d:
            inputs = Path(d) / "inputs.safetensors"
            safetensors.torch.save_file(
                {"input_ids": input_ids, "attention_mask": mask, "logits": logits}, str(inputs))
            print(f"== PEFT: {adapter} on {base}", flush=True)
            ok &= subprocess.run(
                [sys.executable, str(HERE / "check_peft_adapter.py"), str(base), str(adapter),
                 str(inputs), "--pad-token-id", str(pad)] + common
            ).returncode == 0
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
