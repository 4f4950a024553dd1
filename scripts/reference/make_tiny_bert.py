"""Make the tiny random BERT checkpoint used by afinar's unit tests.

Produces tests/fixtures/bert-tiny/:
  config.json          BertConfig (vocab = len(vocab.txt), hidden 32, 2 layers, 4 heads,
                       intermediate 64, max_position 64, type_vocab 2, gelu, eps 1e-12)
  model.safetensors    BertModel weights, keys exactly as transformers names them for
                       BertModel (`embeddings.word_embeddings.weight`,
                       `encoder.layer.0.attention.self.query.weight`, `pooler.dense.weight`, ...)
  tokenizer.json       WordPiece tokenizer built with `tokenizers` (BertNormalizer lowercase,
                       BertPreTokenizer, WordPiece "##", TemplateProcessing
                       `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B:1 [SEP]:1`); no padding, no truncation
  vocab.txt            the same vocabulary, one token a line ([PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4)
  train.jsonl          60 rows {"text": ..., "label": "pos"|"neg"}; rule: a row is "pos" iff it
                       contains "good" or "great" (and "neg" rows contain "bad" or "awful")
  train.csv            the same rows, columns text,label

Weights: torch.manual_seed(0), transformers' own init with initializer_range 0.1 (so attention is
not uniform), then LayerNorm weights 1 + 0.1*N(0,1), LayerNorm and Linear biases 0.05*N(0,1), so
that a swapped weight/bias or a missing bias shows in the numbers. The word-embedding row of
[PAD] (id 0) stays zero, as transformers initialises it (nn.Embedding padding_idx=0).

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/make_tiny_bert.py
"""

import csv
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "bert-tiny"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCT = list(".,!?'-:")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
WORDS = """
the an and or but not this that it is was were be very really so too quite
we you they he she me us my our your their all at of in on to for with from
movie film book food show song game play story plot ending actor music place
good great bad awful boring fun nice okay fine loved hated liked like did do
will come back again never watch read eat time day night
""".split()
SUFFIXES = ["##ed", "##ing", "##ly", "##er"]  # "##s", "##y" come with the letters


def build_vocab():
    vocab = SPECIALS + PUNCT + [str(d) for d in range(10)] + LETTERS + ["##" + c for c in LETTERS]
    vocab += WORDS + SUFFIXES  # "a" and "i" are already words as letters
    assert len(vocab) == len(set(vocab)), "duplicate vocabulary entry"
    return vocab


def build_tokenizer(vocab):
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIALS)
    return tok


def build_rows():
    rng = random.Random(7)
    subjects = ["the movie", "the film", "this book", "the food", "the show", "that song",
                "the game", "the play", "the story", "the plot", "the ending", "the music"]
    pos = ["good", "great"]
    neg = ["bad", "awful"]
    fillers = ["it was", "i think it is", "we liked it and", "they said it was", "it is really",
               "my day was", "our night was"]
    rows = []
    for i in range(60):
        label = "pos" if i % 2 == 0 else "neg"
        adj = rng.choice(pos if label == "pos" else neg)
        adv = rng.choice(["", "very ", "really ", "so ", "quite "])
        form = rng.randrange(3)
        subj = rng.choice(subjects)
        if form == 0:
            text = f"{subj} was {adv}{adj}"
        elif form == 1:
            text = f"{rng.choice(fillers)} {adv}{adj} , {subj}"
        else:
            text = f"{subj} : {adv}{adj} ! we will watch it again" if label == "pos" else \
                   f"{subj} : {adv}{adj} . never again"
        rows.append({"text": text, "label": label})
    return rows


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab()
    (OUT / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    tok = build_tokenizer(vocab)
    tok.save(str(OUT / "tokenizer.json"))

    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, hidden_act="gelu",
        layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
        initializer_range=0.1, pad_token_id=0,
    )
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    model = BertModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
        assert model.embeddings.word_embeddings.weight[0].abs().max() == 0
    model.save_pretrained(OUT, safe_serialization=True)

    rows = build_rows()
    # Every word of every row must be in the vocabulary as a whole word.
    for r in rows:
        enc = tok.encode(r["text"])
        assert vocab.index("[UNK]") not in enc.ids, r
    with open(OUT / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(OUT / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)

    mine = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "train.jsonl", "train.csv")
    total = sum((OUT / f).stat().st_size for f in mine)
    print(f"wrote {OUT} (vocab {len(vocab)}, {total / 1024:.1f} KiB in all)")


if __name__ == "__main__":
    main()
