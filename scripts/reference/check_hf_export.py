"""Check a checkpoint exported by afinar against transformers.

Loads MODEL_DIR with AutoModelForSequenceClassification.from_pretrained and
AutoTokenizer.from_pretrained (local folder only), reads PREDICTIONS.jsonl written by afinar, one
row a line: {"text": ..., "text_pair": optional, "logits": [...], "input_ids": optional}, recomputes
the logits with transformers in eval mode (one row at a time, so no padding is involved; rows with
"input_ids" use those ids directly, others are tokenised with truncation to --max-length, default
the tokenizer's model_max_length), prints the max abs difference and how many argmax disagree,
and exits 1 if the max abs difference exceeds --tol (default 1e-4), or if the checkpoint lacks a
weight the model needs (transformers would initialise it randomly: e.g. a missing score.weight).

Encoders (BERT-like: the config has type_vocab_size) get token_type_ids (a row's own, else zeros).
Decoder classifiers (LlamaForSequenceClassification, GPT2ForSequenceClassification, ...) get no
token_type_ids (GPT-2 would add wte[token_type_ids] to its embeddings); transformers pools the
rightmost position whose id != config.pad_token_id (the attention mask is not used for it), so a row
that ENDS in the pad id (e.g. SmolLM2, where pad = eos = <|im_end|>) pools an earlier token: such
rows are counted and printed as a note, since afinar must pool the same position to agree.

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/check_hf_export.py MODEL_DIR PREDICTIONS.jsonl \
        [--tol 1e-4] [--max-length N] [--threads N]
"""

import argparse
import json
import sys

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("predictions")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        args.model_dir, local_files_only=True, attn_implementation="eager",
        output_loading_info=True)
    model.eval()
    cfg = model.config
    max_len = args.max_length or min(tok.model_max_length, cfg.max_position_embeddings)
    uses_token_types = getattr(cfg, "type_vocab_size", None) is not None
    pad = getattr(cfg, "pad_token_id", None)
    problems = []
    if info["missing_keys"]:
        problems.append(f"weights missing from the checkpoint (transformers initialised them "
                        f"randomly): {sorted(info['missing_keys'])}")
    if info["unexpected_keys"]:
        print(f"note: tensors in the checkpoint that {type(model).__name__} does not use: "
              f"{sorted(info['unexpected_keys'])}")

    worst, worst_line, n, flips, early_pool = 0.0, 0, 0, 0, []
    with open(args.predictions) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "input_ids" in row:
                ids = torch.tensor([row["input_ids"]], dtype=torch.long)
                batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if uses_token_types:
                    batch["token_type_ids"] = torch.tensor(
                        [row.get("token_type_ids", [0] * ids.shape[1])], dtype=torch.long)
            else:
                batch = tok(row["text"], row.get("text_pair"), truncation=True,
                            max_length=max_len, padding=False, return_tensors="pt")
                if not uses_token_types:
                    batch.pop("token_type_ids", None)
            if not uses_token_types and pad is not None and batch["input_ids"][0, -1] == pad:
                early_pool.append(lineno)
            with torch.no_grad():
                logits = model(**batch).logits[0]
            theirs = torch.tensor(row["logits"], dtype=torch.float32).reshape(logits.shape)
            d = (logits - theirs).abs().max().item()
            if d > worst:
                worst, worst_line = d, lineno
            flips += int(logits.argmax() != theirs.argmax()) if logits.numel() > 1 else 0
            n += 1
    if early_pool:
        print(f"note: {len(early_pool)} rows end in the pad id {pad}, so transformers pools the "
              f"last token != {pad} instead of the last token (lines {early_pool[:10]})")
    for p in problems:
        print(f"problem: {p}")
    ok = n > 0 and worst <= args.tol and not problems
    print(f"{n} rows, max abs diff {worst:.3e} (line {worst_line}), argmax disagreements {flips}, "
          f"tol {args.tol:g}: {'OK' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
