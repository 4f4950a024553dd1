"""Golden numbers for BertForSequenceClassification on the tiny random checkpoint.

Reads tests/fixtures/bert-tiny/ (made by make_tiny_bert.py) and writes
tests/fixtures/bert-tiny/golden.safetensors and tests/fixtures/bert-tiny/golden.json.

All dropout probabilities are 0.0 (hidden, attention, classifier), attention is "eager", f32 on CPU.
One fixed batch of 3 rows, tokenised with the fixture's tokenizer.json, right-padded with id 0:
  row 0: single text, row 1: the longest single text (has WordPiece continuations),
  row 2: a text pair (token_type_ids 1 on the second segment and its final [SEP]).

Tensors in golden.safetensors (float32 unless said; scalars have shape [1]):
  input_ids, attention_mask, token_type_ids, labels   int64, [3, T] / [3]
  classifier.weight [2, 32], classifier.bias [2]        the new head (seeded), load these
  hidden.0                embedding output (after embeddings LayerNorm), [3, T, 32]
  hidden.N (N = 1..L)     output of encoder layer N-1 (transformers' hidden_states[N]), [3, T, 32]
  hidden.last             last_hidden_state (== hidden.L), [3, T, 32]
  pooled                  BertPooler output tanh(W h[:,0] + b), [3, 32]
  logits [3, 2], loss [1] mean cross-entropy
  grad.<name>             d loss / d param for EVERY parameter, transformers names
                          (bert.embeddings.word_embeddings.weight, ..., classifier.weight).
                          Note: nn.Embedding(padding_idx=0) gives row 0 of the word-embedding
                          gradient exactly zero even though [PAD] tokens are looked up.
  adamw.loss.K (K=0,1,2)  full-batch loss before AdamW step K+1
  after3.<name>           every parameter after 3 torch.optim.AdamW steps (see golden.json)
  frozen.loss [1], frozen.grad.<name>   only bert.encoder.layer.1.*, bert.pooler.*, classifier.*
                          trainable (requires_grad False on the rest); same batch and weights
  reg.labels [3] f32, reg.classifier.weight [1, 32], reg.classifier.bias [1],
  reg.logits [3, 1], reg.loss [1] (MSE of logits.squeeze() vs labels),
  reg.grad.classifier.weight [1, 32], reg.grad.classifier.bias [1]

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/golden_bert.py
"""

import copy
import json
from pathlib import Path

import safetensors.torch
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "bert-tiny"

TEXTS = [
    ("the movie was really good", None),
    ("i think the food was awful , we will never eat there again", None),
    ("the show was great", "we liked it"),
]
LABELS = [1, 0, 1]
REG_LABELS = [0.5, -1.0, 2.0]
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
HEAD_SEED, REG_HEAD_SEED = 1, 2
TRAINABLE_FROZEN = ("bert.encoder.layer.1.", "bert.pooler.", "classifier.")


def encode_batch(tok):
    encs = [tok.encode(a, b) if b is not None else tok.encode(a) for a, b in TEXTS]
    t = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), t, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        types[i, :n] = torch.tensor(e.type_ids)
    return ids, mask, types, [e.tokens for e in encs]


def load_model(num_labels, head_seed, **kw):
    model = BertForSequenceClassification.from_pretrained(
        FIX, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, attn_implementation="eager", **kw)
    g = torch.Generator().manual_seed(head_seed)
    with torch.no_grad():
        w = model.classifier.weight
        w.copy_(0.2 * torch.randn(w.shape, generator=g))
        b = model.classifier.bias
        b.copy_(0.1 * torch.randn(b.shape, generator=g))
    model.train()  # dropout is 0 anyway; train mode is what a training step uses
    return model


def no_decay(name):
    """transformers' Trainer rule: no weight decay on biases and LayerNorm parameters."""
    return name.endswith(".bias") or "LayerNorm" in name


def main():
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(FIX / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids, mask, types, tokens = encode_batch(tok)
    labels = torch.tensor(LABELS, dtype=torch.int64)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}
    scal = {}

    # --- forward + backward -------------------------------------------------------------
    base = load_model(2, HEAD_SEED)
    init_state = copy.deepcopy(base.state_dict())
    model = base
    out["classifier.weight"] = model.classifier.weight.detach().clone()
    out["classifier.bias"] = model.classifier.bias.detach().clone()
    res = model(**inputs, labels=labels, output_hidden_states=True)
    hs = res.hidden_states
    n_layers = model.config.num_hidden_layers
    assert len(hs) == n_layers + 1
    for n, h in enumerate(hs):
        out[f"hidden.{n}"] = h.detach()
    base_out = model.bert(**inputs)
    assert torch.equal(base_out.last_hidden_state, hs[-1])
    out["hidden.last"] = base_out.last_hidden_state.detach()
    out["pooled"] = base_out.pooler_output.detach()
    out["logits"] = res.logits.detach()
    ce = torch.nn.functional.cross_entropy(res.logits, labels)
    assert torch.allclose(ce, res.loss)
    out["loss"] = res.loss.detach().reshape(1)
    scal["loss"] = res.loss.item()
    res.loss.backward()
    names = [n for n, _ in model.named_parameters()]
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        out[f"grad.{n}"] = p.grad.detach().clone()
    assert out["grad.bert.embeddings.word_embeddings.weight"][0].abs().max() == 0

    # --- 3 AdamW steps ------------------------------------------------------------------
    model = load_model(2, HEAD_SEED)
    model.load_state_dict(init_state)
    decay = [p for n, p in model.named_parameters() if not no_decay(n)]
    nodecay = [p for n, p in model.named_parameters() if no_decay(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD},
                             {"params": nodecay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, eps=EPS, foreach=False)
    scal["adamw.loss"] = []
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        out[f"adamw.loss.{k}"] = loss.detach().reshape(1)
        scal["adamw.loss"].append(loss.item())
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        out[f"after3.{n}"] = p.detach().clone()

    # --- frozen: only layer 1, pooler, classifier train ---------------------------------
    model = load_model(2, HEAD_SEED)
    model.load_state_dict(init_state)
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(TRAINABLE_FROZEN))
        if p.requires_grad:
            trainable.append(n)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    out["frozen.loss"] = loss.detach().reshape(1)
    scal["frozen.loss"] = loss.item()
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[f"frozen.grad.{n}"] = p.grad.detach().clone()
        else:
            assert p.grad is None, n

    # --- regression head ----------------------------------------------------------------
    model = load_model(1, REG_HEAD_SEED, problem_type="regression")
    reg_labels = torch.tensor(REG_LABELS, dtype=torch.float32)
    out["reg.labels"] = reg_labels
    out["reg.classifier.weight"] = model.classifier.weight.detach().clone()
    out["reg.classifier.bias"] = model.classifier.bias.detach().clone()
    res = model(**inputs, labels=reg_labels)
    assert torch.allclose(res.loss, torch.mean((res.logits.squeeze(-1) - reg_labels) ** 2))
    res.loss.backward()
    out["reg.logits"] = res.logits.detach()
    out["reg.loss"] = res.loss.detach().reshape(1)
    scal["reg.loss"] = res.loss.item()
    out["reg.grad.classifier.weight"] = model.classifier.weight.grad.detach().clone()
    out["reg.grad.classifier.bias"] = model.classifier.bias.grad.detach().clone()

    out = {k: v.contiguous() for k, v in out.items()}
    safetensors.torch.save_file(out, FIX / "golden.safetensors", metadata={"format": "pt"})
    meta = {
        "produced_by": "scripts/reference/golden_bert.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "model": "tests/fixtures/bert-tiny (BertModel) + classifier.* from golden.safetensors",
        "class": "BertForSequenceClassification",
        "attn_implementation": "eager",
        "dropout": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                    "classifier_dropout": 0.0},
        "dtypes": {"input_ids": "int64", "attention_mask": "int64", "token_type_ids": "int64",
                   "labels": "int64", "reg.labels": "float32", "everything else": "float32"},
        "scalars_shape": [1],
        "texts": [{"text": a, "text_pair": b} for a, b in TEXTS],
        "tokens": tokens,
        "labels": LABELS,
        "padding": "right, id 0, attention_mask 0, token_type_ids 0; hidden states at padded "
                   "positions are stored too (they attend only to unmasked keys)",
        "hidden": f"hidden.0 = embeddings output; hidden.N (1..{n_layers}) = output of "
                  f"encoder.layer.{{N-1}}; hidden.last = hidden.{n_layers}",
        "loss": "mean cross-entropy over the 3 rows",
        "adamw": {"impl": "torch.optim.AdamW(foreach=False)", "lr": LR, "betas": list(BETAS),
                  "eps": EPS, "weight_decay": WD, "steps": 3, "schedule": "none",
                  "max_grad_norm": None, "batch": "the full batch of 3 every step",
                  "no_decay_rule": "name ends with .bias or contains LayerNorm",
                  "no_decay": [n for n in names if no_decay(n)],
                  "update": "p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; "
                            "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)"},
        "frozen_trainable_prefixes": list(TRAINABLE_FROZEN),
        "frozen_trainable": trainable,
        "regression": {"num_labels": 1, "problem_type": "regression", "labels": REG_LABELS,
                       "loss": "MSE(logits.squeeze(), labels), mean"},
        "head_init": "classifier.weight = 0.2*N(0,1), classifier.bias = 0.1*N(0,1) from "
                     "torch.Generator seeded 1 (regression: 2); saved in golden.safetensors",
        "parameter_names": names,
        "scalars": scal,
    }
    (FIX / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (FIX / "golden.safetensors").stat().st_size
    print(f"wrote {FIX / 'golden.safetensors'} ({len(out)} tensors, {size / 1024:.1f} KiB)")
    print(json.dumps(scal))


if __name__ == "__main__":
    main()
