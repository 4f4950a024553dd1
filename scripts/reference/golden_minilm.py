"""Golden BertModel outputs of the real all-MiniLM-L6-v2 for 3 fixed sentences.

Reads the model from the afinar cache (default .cache/afinar/all-minilm-l6-v2-dev, or the folder
given as the first argument) and writes tests/fixtures/minilm/golden.safetensors (+ golden.json).
The fixture holds only inputs and outputs; the Rust test loads the real weights from the cache.

Tokenised with the model's own tokenizer.json (its fixed padding to 128 is switched off; batch
padded to the longest row, right, id 0; truncation 128). BertModel, eval mode, eager attention, f32.

Tensors (golden.safetensors):
  input_ids, attention_mask, token_type_ids   int64, [3, T]
  hidden.last   last_hidden_state, float32 [3, T, 384] (padded positions included)
  pooled        pooler_output, float32 [3, 384]

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/golden_minilm.py [MODEL_DIR]
"""

import hashlib
import json
import sys
from pathlib import Path

import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer
from transformers import BertModel

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / ".cache" / "afinar" / "all-minilm-l6-v2-dev"
OUT = ROOT / "tests" / "fixtures" / "minilm"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Scientists unveil a doomsday clock of hair loss!",
    "Fine-tuning small encoders on a laptop is surprisingly practical, isn't it?",
]


def main():
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", direction="right")  # longest
    encs = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encs], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)
    types = torch.tensor([e.type_ids for e in encs], dtype=torch.int64)

    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
           "hidden.last": res.last_hidden_state.contiguous(), "pooled": res.pooler_output.contiguous()}
    OUT.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(out, OUT / "golden.safetensors", metadata={"format": "pt"})
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    meta = {
        "produced_by": "scripts/reference/golden_minilm.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "model": "all-MiniLM-L6-v2 (BertModel), weights from the afinar cache",
        "model_safetensors_sha256": sha,
        "attn_implementation": "eager",
        "mode": "eval (no dropout)",
        "sentences": SENTENCES,
        "tokens": [e.tokens for e in encs],
        "dtypes": {"input_ids": "int64", "attention_mask": "int64", "token_type_ids": "int64",
                   "hidden.last": "float32", "pooled": "float32"},
        "padding": "longest in batch, right, id 0; truncation 128",
    }
    (OUT / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT / "golden.safetensors").stat().st_size
    print(f"wrote {OUT / 'golden.safetensors'} {tuple(ids.shape)} ({size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
