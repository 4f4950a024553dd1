"""Check that a decoder folder written by afinar (`<run>/model`, or an export)
loads in transformers and continues a chat prompt greedily.

    . .venv/bin/activate && python scripts/reference/check_lm_export.py MODEL_DIR "What is the capital of France?"

Prints the greedy answer (transformers' AutoModelForCausalLM + AutoTokenizer,
the chat template from tokenizer_config.json) and the first 5 logits of the last
prompt position, to compare with `afinar generate MODEL_DIR --chat --prompt ...`.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    path, question = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
    print("prompt tokens:", ids.shape[1])
    print("last-position logits[:5]:", [round(float(x), 4) for x in logits[:5]])
    print("answer:", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
