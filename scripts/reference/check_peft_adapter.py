"""Check a PEFT adapter folder (e.g. one written by afinar) with the real Hugging Face PEFT.

Loads BASE_MODEL as a sequence classifier (AutoModelForSequenceClassification: eval mode, eager
attention, f32, local files only), attaches ADAPTER_DIR with PeftModel.from_pretrained, runs the
batch stored in INPUTS_AND_LOGITS.safetensors (input_ids, attention_mask, optional token_type_ids,
int64 [B, T]) and compares with its `logits` tensor [B, num_labels]. Prints the max abs difference;
exits 1 if it exceeds --tol (default 1e-4), and also when the adapter file does not load cleanly.

BASE_MODEL is either
  - an HF folder: a BERT-like encoder (e.g. tests/fixtures/bert-tiny, BertModel keys: becomes
    BertForSequenceClassification) or a decoder (LlamaForSequenceClassification,
    GPT2ForSequenceClassification, ... e.g. tests/fixtures/llama-tiny-seqcls; a causal-LM folder
    works too, its lm_head is dropped and `score` initialised); a head in the folder with another
    num_labels is re-initialised (ignore_mismatched_sizes);
  - a .gguf file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): loaded with transformers' GGUF support,
    from_pretrained(its folder, gguf_file=its name), dequantised to f32; `score` is initialised.
token_type_ids are passed only to models with a type vocabulary (config.type_vocab_size: BERT);
GPT-2 would add wte[token_type_ids]. Decoders pool the rightmost token != config.pad_token_id, and
transformers refuses a batch > 1 without one: --pad-token-id sets it (else the base's own is used,
e.g. 2 from the SmolLM2 GGUF, 0 in llama-tiny-seqcls).

Why the extra checks: PEFT's loader silently ignores keys of adapter_model.safetensors that match no
adapter parameter, and only warns about missing ones (those keep PEFT's init, i.e. lora_B = 0). So
this script also compares the keys PEFT would save for the loaded model with the file's keys, and
each loaded tensor with the file's tensor, and fails on any difference.

num_labels: the first dimension of the saved modules_to_save head
(`base_model.model.classifier.weight` or `...score.weight`), else --num-labels (default 2).
Base head: the base usually has no trained head (BertModel keys only, or a GGUF), so transformers
initialises it randomly; that does not matter when the adapter saves the head (modules_to_save,
which PEFT adds for task_type SEQ_CLS). If the inputs file holds `base.classifier.weight` / `.bias`
or `base.score.weight` (decoder heads have no bias) they are copied into the base first, and then an
optional `base_logits` tensor is compared too (the PeftModel under disable_adapter()).

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/check_peft_adapter.py BASE_MODEL ADAPTER_DIR \
        INPUTS_AND_LOGITS.safetensors [--tol 1e-4] [--num-labels N] [--pad-token-id N] [--threads N]
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import safetensors.torch
import torch
import transformers
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

HEAD_NAMES = ("classifier", "score")


def load_base(path, num_labels):
    """An HF folder or a .gguf file as a sequence classifier with num_labels outputs."""
    kw = dict(num_labels=num_labels, attn_implementation="eager", torch_dtype=torch.float32,
              local_files_only=True)
    if path.suffix == ".gguf":
        return AutoModelForSequenceClassification.from_pretrained(
            path.parent, gguf_file=path.name, **kw).eval()
    return AutoModelForSequenceClassification.from_pretrained(
        path, ignore_mismatched_sizes=True, **kw).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base_model", type=Path, help="an HF folder or a .gguf file")
    ap.add_argument("adapter_dir", type=Path)
    ap.add_argument("inputs", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--num-labels", type=int, default=None)
    ap.add_argument("--pad-token-id", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    problems = []
    cfg = json.loads((args.adapter_dir / "adapter_config.json").read_text())
    saved = safetensors.torch.load_file(args.adapter_dir / "adapter_model.safetensors")
    data = safetensors.torch.load_file(args.inputs)

    num_labels = args.num_labels
    for h in HEAD_NAMES:
        w = saved.get(f"base_model.model.{h}.weight")
        if w is not None:
            if num_labels is not None and num_labels != w.shape[0]:
                problems.append(f"--num-labels {num_labels} but the saved {h}.weight has "
                                f"shape {list(w.shape)}")
            num_labels = w.shape[0]
            break
    num_labels = num_labels or 2

    base = load_base(args.base_model, num_labels)
    if args.pad_token_id is not None:
        base.config.pad_token_id = args.pad_token_id
    have_base_head = False
    for h in HEAD_NAMES:
        if f"base.{h}.weight" not in data:
            continue
        head = getattr(base, h, None)
        if head is None:
            problems.append(f"the inputs file has base.{h}.weight but {type(base).__name__} has "
                            f"no `{h}`")
            break
        with torch.no_grad():
            head.weight.copy_(data[f"base.{h}.weight"])
            if f"base.{h}.bias" in data:
                head.bias.copy_(data[f"base.{h}.bias"])
        have_base_head = True
        break
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
        except Exception as e:  # e.g. a shape that disagrees with r in adapter_config.json
            print(f"problem: PeftModel.from_pretrained failed: {type(e).__name__}: {e}")
            print("FAIL")
            sys.exit(1)
    for w in caught:
        if "missing adapter keys" in str(w.message):
            problems.append(str(w.message))

    # What PEFT would save for the loaded model must be what the file holds.
    reloaded = get_peft_model_state_dict(model)
    missing = sorted(set(reloaded) - set(saved))
    unexpected = sorted(set(saved) - set(reloaded))
    if missing:
        problems.append(f"keys PEFT expects but the file lacks: {missing}")
    model_keys = set(model.state_dict())
    ignored = [k for k in unexpected if k not in model_keys]
    aliased = [k for k in unexpected if k in model_keys]
    if ignored:
        problems.append(f"keys in the file that PEFT ignored: {ignored}")
    if aliased:  # loaded (unknown keys pass through unchanged) but not the form PEFT writes
        problems.append("keys in the file that PEFT loaded as raw model keys, not its saved form: "
                        f"{aliased}")
    for k in sorted(set(saved) & set(reloaded)):
        a, b = saved[k], reloaded[k]
        if a.shape != b.shape:
            problems.append(f"{k}: file shape {list(a.shape)}, loaded {list(b.shape)}")
        elif not torch.equal(a.to(b.dtype), b.cpu()):
            problems.append(f"{k}: loaded tensor differs from the file")

    names = ["input_ids", "attention_mask"]
    if getattr(base.config, "type_vocab_size", None) is not None:
        names.append("token_type_ids")
    inputs = {k: data[k].to(torch.int64) for k in names if k in data}
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            base_logits = None
            if have_base_head and "base_logits" in data:
                with model.disable_adapter():
                    base_logits = model(**inputs).logits
    except ValueError as e:  # a decoder without pad_token_id and a batch > 1
        print(f"problem: the forward pass failed: {e} (--pad-token-id sets one)")
        print("FAIL")
        sys.exit(1)
    ref = data["logits"].to(torch.float32)
    if ref.shape != logits.shape:
        problems.append(f"logits shape: file {list(ref.shape)}, PEFT {list(logits.shape)}")
        diff = float("inf")
    else:
        diff = (logits - ref).abs().max().item()
    flips = int((logits.argmax(-1) != ref.argmax(-1)).sum()) if ref.shape == logits.shape else -1
    print(f"{cfg.get('peft_type')} adapter, {len(saved)} tensors, base {type(base).__name__}, "
          f"batch {list(inputs['input_ids'].shape)}, num_labels {num_labels}, "
          f"pad_token_id {base.config.pad_token_id}")
    print(f"logits: max abs diff {diff:.3e}, argmax disagreements {flips}, tol {args.tol:g}")
    ok = diff <= args.tol
    if base_logits is not None:
        bdiff = (base_logits - data["base_logits"]).abs().max().item()
        print(f"base_logits (adapter disabled): max abs diff {bdiff:.3e}")
        ok = ok and bdiff <= args.tol
    for p in problems:
        print(f"problem: {p}")
    ok = ok and not problems
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
