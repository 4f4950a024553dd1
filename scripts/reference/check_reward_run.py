"""Check a reward-model run of afinar against transformers and PEFT: the same scores.

RUN is an afinar reward run (task.type = "reward"); ROWS.jsonl holds (prompt, completion) rows, each
a string or chat messages; SCORES.jsonl is what `afinar score RUN --file ROWS.jsonl --output
SCORES.jsonl` wrote (one {"line", "reward"} a row). The rows are tokenised here as afinar does:
a decoder reads the chat template rendered over prompt + completion turns (no special tokens added),
or text prompt tokens + completion tokens + eos; an encoder (BERT) reads (prompt, completion) as a
text pair, chat turns joined by newlines. Then:

1. RUN/model with AutoModelForSequenceClassification (num_labels 1): its logits are afinar's rewards.
2. For an adapter run, the base named in RUN/adapter/adapter_config.json with PEFT's
   PeftModel.from_pretrained(RUN/adapter) (task SEQ_CLS, the score head in modules_to_save): the same.

    . .venv/bin/activate && python scripts/reference/check_reward_run.py RUN ROWS.jsonl SCORES.jsonl [--tol 1e-4]
Exits 1 if a check fails.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def flat(x):
    return x if isinstance(x, str) else "\n".join(m["content"] for m in x)


def encode(tok, cfg, prompt, completion):
    if cfg.model_type == "bert":
        e = tok(flat(prompt), flat(completion), truncation="longest_first", max_length=cfg.max_position_embeddings)
        return e["input_ids"], e["token_type_ids"]
    if isinstance(prompt, str):
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + \
            tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    else:
        text = tok.apply_chat_template(prompt + completion, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids, [0] * len(ids)


def scores(model, tok, rows):
    out = []
    for r in rows:
        ids, types = encode(tok, model.config, r["prompt"], r["completion"])
        kw = {"input_ids": torch.tensor([ids])}
        if model.config.model_type == "bert":
            kw["token_type_ids"] = torch.tensor([types])
        with torch.no_grad():
            out.append(float(model(**kw).logits[0, 0]))
    return torch.tensor(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("rows")
    ap.add_argument("scores")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    run = Path(a.run)
    rows = [json.loads(l) for l in open(a.rows)]
    want = torch.tensor([json.loads(l)["reward"] for l in open(a.scores)])
    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run / "model", attn_implementation="eager").eval()
    assert model.config.num_labels == 1, model.config.num_labels
    ok = True
    got = scores(model, tok, rows)
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1.0))
    print(f"model/ ({type(model).__name__}, num_labels 1): max rel err {err:.2e} over {len(rows)} rows")
    ok &= err <= a.tol
    if (run / "adapter" / "adapter_config.json").exists():
        from peft import PeftModel
        cfg = json.load(open(run / "adapter" / "adapter_config.json"))
        base_path = cfg["base_model_name_or_path"]
        gguf = base_path.endswith(".gguf")
        base = AutoModelForSequenceClassification.from_pretrained(
            str(Path(base_path).parent) if gguf else base_path, num_labels=1, attn_implementation="eager",
            **({"gguf_file": Path(base_path).name} if gguf else {}))
        if base.config.pad_token_id is None:
            base.config.pad_token_id = model.config.pad_token_id
        peft = PeftModel.from_pretrained(base, run / "adapter").eval()
        got = scores(peft, tok, rows)
        err = float((got - want).abs().max() / want.abs().max().clamp(min=1.0))
        print(f"adapter/ (PEFT {cfg['peft_type']}, task {cfg['task_type']}): max rel err {err:.2e}")
        ok &= err <= a.tol
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
