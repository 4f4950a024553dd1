"""A SmolLM2-135M-shaped Llama with random weights (safetensors, f32) for speed
runs where the real checkpoint cannot travel (the GPU machine has no network
and the working tree that travels is capped at 64 MiB). Step time does not
depend on the weights' values. The tokenizer files come from the tiny test
fixture: the benchmarks feed token ids directly.

    python bench/make_random_lm.py OUT_DIR
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def main():
    out = Path(sys.argv[1])
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(ROOT / "tests/fixtures/llama-tiny" / f, out / f)
    print(out)


if __name__ == "__main__":
    main()
