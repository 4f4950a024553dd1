"""Tiny random decoder checkpoints and their golden numbers, for afinar's parity tests.

Produces, for each case below, tests/fixtures/<case>/:
  config.json          the transformers config (LlamaConfig / GPT2Config)
  model.safetensors    the weights with transformers' own key names
  golden.safetensors   input_ids [2, T] (row 1 right-padded), attention_mask [2, T],
                       labels [2, T] (-100 at padding and at a few positions: the loss ignores them),
                       logits [2, T, V] (eval mode, f32, eager attention),
                       loss (transformers' causal-LM loss: labels shifted left inside),
                       grad.<param name> for every parameter after loss.backward()
  golden.json          what produced it (versions, shapes, seeds)

Cases:
  llama-tiny       LlamaForCausalLM: vocab 160, hidden 64, 2 layers, 4 heads / 2 KV heads (GQA),
                   intermediate 96, rope_theta 10000, rms_norm_eps 1e-5, untied lm_head
  llama-tiny-tied  the same shape with tie_word_embeddings = true, rope_theta 1e5, 2 heads / 1 KV head
                   (head_dim 32), as SmolLM2 ties them
  gpt2-tiny        GPT2LMHeadModel: vocab 160, n_embd 32, 2 layers, 4 heads, n_positions 64
                   (Conv1D weights stored [in, out], tied lm_head)

Weights: torch.manual_seed(0) then transformers' init with initializer_range 0.1; norm weights
1 + 0.1 N(0,1) and biases 0.05 N(0,1), so a swapped or missing tensor shows.

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/golden_decoders.py
"""

import json
from pathlib import Path

import safetensors
import tokenizers
import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
T = 12
V = 160


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name and name.endswith("weight") or "ln_f.weight" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, 3] = -100  # an ignored target in the middle (a prompt token)
    return ids, mask, labels


def run(case, model):
    out = FIX / case
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.config.save_pretrained(out)
    # Tied weights are stored once, as transformers saves them.
    model.save_pretrained(out, safe_serialization=True)
    ids, mask, labels = inputs()
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    res.loss.backward()
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "logits": res.logits.detach().contiguous(),
        "loss": res.loss.detach().reshape(1),
    }
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors["grad." + name] = p.grad.detach().contiguous()
    save_file(tensors, out / "golden.safetensors", metadata={"format": "pt"})
    meta = {
        "produced_by": "scripts/reference/golden_decoders.py",
        "case": case,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "class": type(model).__name__,
        "attn_implementation": "eager",
        "inputs": "input_ids randint(3, 160) seed 2, row 1 right-padded from position 9 (id 0, mask 0)",
        "labels": "input_ids with -100 at padding and at [0, 3]; the loss shifts them left",
        "loss": float(res.loss),
        "parameters": [n for n, _ in model.named_parameters()],
    }
    (out / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(case, "loss", float(res.loss))


def main():
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="eager")
    cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      tie_word_embeddings=False, **common)
    m = LlamaForCausalLM(cfg)
    perturb(m)
    run("llama-tiny", m)

    torch.manual_seed(0)
    cfg = LlamaConfig(num_attention_heads=2, num_key_value_heads=1, rope_theta=100000.0,
                      tie_word_embeddings=True, **common)
    m = LlamaForCausalLM(cfg)
    perturb(m)
    run("llama-tiny-tied", m)

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=None,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
                     attn_implementation="eager")
    m = GPT2LMHeadModel(cfg)
    perturb(m)
    run("gpt2-tiny", m)


if __name__ == "__main__":
    main()
