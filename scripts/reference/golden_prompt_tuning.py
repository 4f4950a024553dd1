"""Prompt tuning with the real PEFT, both ways, on the tiny random Llama.

1. Make a PEFT prompt-tuning adapter and its golden logits:
   tests/fixtures/peft/prompt-tiny/{adapter_config.json, adapter_model.safetensors,
   golden.safetensors, golden.json}. PromptTuningConfig(task_type=CAUSAL_LM,
   num_virtual_tokens=4, prompt_tuning_init=RANDOM) on tests/fixtures/llama-tiny,
   the prompt then set to 0.5 N(0,1) (seed 3) so it is not PEFT's init; golden logits are
   PEFT's for input_ids/attention_mask of llama-tiny's golden file, with the
   virtual positions dropped ([B, T, V]).

       . .venv/bin/activate && python scripts/reference/golden_prompt_tuning.py

2. Check an adapter afinar wrote: load it with PeftModel.from_pretrained on the
   same base and compare with afinar's logits saved by the Rust test
   (`AFINAR_PT_OUT=dir cargo test --release -p afinar --test decoder_parity prompt`):

       python scripts/reference/golden_prompt_tuning.py --check DIR
"""

import argparse
import json
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
BASE = FIX / "llama-tiny"
OUT = FIX / "peft" / "prompt-tiny"


def inputs():
    g = load_file(BASE / "golden.safetensors")
    return g["input_ids"], g["attention_mask"]


def logits_of(model, n_virtual):
    ids, mask = inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out[:, n_virtual:].contiguous()


def make():
    base = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager").eval()
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                             prompt_tuning_init=PromptTuningInit.RANDOM)
    model = get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(3)
    emb = model.prompt_encoder["default"].embedding
    with torch.no_grad():
        emb.weight.copy_(0.5 * torch.randn(emb.weight.shape, generator=g))
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    cfg_json = json.loads((OUT / "adapter_config.json").read_text())
    cfg_json["base_model_name_or_path"] = "tests/fixtures/llama-tiny"
    (OUT / "adapter_config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    save_file({"logits": logits_of(model, 4)}, OUT / "golden.safetensors", metadata={"format": "pt"})
    (OUT / "golden.json").write_text(json.dumps({
        "produced_by": "scripts/reference/golden_prompt_tuning.py",
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "base": "tests/fixtures/llama-tiny (eager attention, f32, eval)",
        "inputs": "input_ids / attention_mask of tests/fixtures/llama-tiny/golden.safetensors",
        "logits": "PEFT PeftModelForCausalLM logits with the 4 virtual positions dropped",
    }, indent=1) + "\n")
    print("wrote", OUT)


def check(d):
    d = Path(d)
    base = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, d / "adapter").eval()
    n = model.peft_config["default"].num_virtual_tokens
    want = load_file(d / "afinar_logits.safetensors")["logits"]
    got = logits_of(model, n)
    diff = (got - want).abs().max().item()
    print(f"PEFT vs afinar logits, max abs diff {diff:.3e}")
    assert diff < 1e-4, diff


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check")
    a = ap.parse_args()
    check(a.check) if a.check else make()
