"""A character-level tokenizer with a ChatML template for the tiny random
decoders (tests/fixtures/{llama-tiny,llama-tiny-tied,gpt2-tiny}), so SFT and
generation run end to end on them in the test suite, plus a tiny SFT data set.

Vocabulary (99 of the models' 160 ids): 0 <pad>, 1 <|im_start|> (bos),
2 <|im_end|> (eos, as the configs' eos_token_id = 2), 3 <unk>, then "\\n" and
the printable ASCII characters 32..126. A BPE model with no merges: every
character is one token, offsets are exact.

tests/fixtures/sft-tiny/train.jsonl: 60 rows in OpenAI-evals format
({"input": [system, user], "ideal": ...}): "Reverse: abc" -> "cba" on random
3-letter strings (a task a tiny model can start to learn in a few steps).

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/make_tiny_lm_tokenizer.py
"""

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build():
    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials[:3]])
    tok.decoder = decoders.Fuse()
    return tok


def main():
    tok = build()
    cfg = {
        "chat_template": TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for case in ["llama-tiny", "llama-tiny-tied", "gpt2-tiny"]:
        out = FIX / case
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        w = "".join(rng.choice("abcdefgh") for _ in range(3))
        rows.append({"input": [{"role": "system", "content": "Reverse the string."},
                               {"role": "user", "content": w}], "ideal": w[::-1]})
    (FIX / "sft-tiny").mkdir(exist_ok=True)
    (FIX / "sft-tiny" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = tok.encode("<|im_start|>user\nabc<|im_end|>\n")
    print(enc.tokens, enc.ids)


if __name__ == "__main__":
    main()
