"""Sequence classification on decoder models: golden fixtures for afinar's heads-on-any-body parity tests.

Tiny cases (the llama-tiny / gpt2-tiny configs of golden_decoders.py, eval mode, every dropout 0,
eager attention, f32; torch.manual_seed(0) then transformers' init with initializer_range 0.1, then
golden_decoders.perturb: norm weights 1 + 0.1 N(0,1), biases 0.05 N(0,1)). Each writes
tests/fixtures/<case>/:
  config.json, model.safetensors   a complete HF folder (save_pretrained: transformers' own keys,
                                   `model.*` / `transformer.*` and `score.weight` [num_labels, H])
  tokenizer.json, tokenizer_config.json   copied from tests/fixtures/llama-tiny or gpt2-tiny
  golden.safetensors   input_ids [3, T] int64 (row 0 full, row 1 right-padded from 9, row 2 from 5,
                       with pad id 0; real ids are randint(3, 160) so never the pad id),
                       attention_mask [3, T] int64, labels [3] (int64, or f32 for regression),
                       logits [3, num_labels] f32, loss [1] (transformers' loss from
                       model(input_ids, attention_mask, labels=labels)),
                       grad.<param name> for every parameter after loss.backward()
  golden.json          versions, config, the pooling rule and the index it picked per row, shapes

  llama-tiny-seqcls   LlamaForSequenceClassification, num_labels 3 (neg/neu/pos), pad_token_id 0,
                      problem_type single_label_classification (cross-entropy, mean)
  llama-tiny-seqreg   the same with num_labels 1, problem_type regression (MSE), float labels
  gpt2-tiny-seqcls    GPT2ForSequenceClassification, gpt2-tiny config + pad_token_id 0, num_labels 3
                      (Conv1D weights stored [in, out])

PEFT case, tests/fixtures/peft/lora-llama-seqcls/ (as golden_peft.py writes its cases, reusing its
helpers): PEFT's own LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
target_modules=["q_proj", "v_proj"]) on tests/fixtures/llama-tiny-seqcls (loaded from that relative
path, which is what adapter_config.json records), adapter parameters perturbed as golden_peft.py
does (lora_A/B = 0.1 N(0,1), the `score` modules_to_save copy += 0.1 N(0,1)); adapter_config.json and
adapter_model.safetensors from save_pretrained (model-card README.md deleted); golden.safetensors:
the 3-row batch, base.score.weight, logits (adapter on), base_logits (disable_adapter()),
merged_logits (merge_and_unload()), merged.<module>.weight of every wrapped Linear and
merged.score.weight. Checked here: PeftModel.from_pretrained reload, merge, and an independent
re-implementation (W x + s B A x, score from the file).

Real model, tests/fixtures/smollm2/seqcls_reference.{safetensors,json}: SmolLM2-135M-Instruct from
its Q4_1 GGUF (transformers' GGUF loader, dequantised to f32) as AutoModelForSequenceClassification
with num_labels 2; score.weight = 0.02 N(0,1) from torch.Generator seeded 0 (saved as score.weight
[2, 576]); the first 4 user texts of the sarcasm data tokenised by the GGUF's tokenizer with a plain
call and padded right with the pad id; input_ids [4, T], attention_mask [4, T] int64, logits [4, 2].

Pooling (transformers 5.23 modeling_layers.GenericForSequenceClassification, which Llama uses, and
GPT2ForSequenceClassification, the same code): the logits of the RIGHTMOST position whose input id
!= config.pad_token_id, i.e. argmax over t of t * (input_ids[b, t] != pad); the attention mask is not
looked at. A row of pad ids only pools position 0.

PYTHONHASHSEED: as golden_peft.py, the script re-executes itself with PYTHONHASHSEED=0 (PEFT writes
target_modules as list(set)), so the fixtures are byte-for-byte reproducible. One CPU thread.

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/golden_seqcls.py [--cases a,b] \
        [--gguf ~/.cache/afinar/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf] \
        [--sarcasm ~/.cache/afinar/data/sarcasm/samples.jsonl]
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":  # before anything builds a set of strings
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"})

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from golden_decoders import perturb as perturb_base
from golden_peft import dumps, peft_case, safetensors_header
from peft import LoraConfig, PeftModel
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, GPT2Config,
                          GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification)

ROOT = Path(__file__).resolve().parents[2]
FIX = Path("tests/fixtures")  # relative: the PEFT base path is written into adapter_config.json
T, V, PAD = 12, 160, 0
PAD_FROM = (None, 9, 5)  # row -> first padded position
DEFAULT_GGUF = Path("/root/.cache/afinar/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_SARCASM = Path("/root/.cache/afinar/data/sarcasm/samples.jsonl")
SCORE_SEED = 0
POOLING_RULE = ("rightmost token != pad_token_id: index = argmax_t(t * (input_ids[b, t] != "
                "pad_token_id)) (modeling_layers.GenericForSequenceClassification / "
                "GPT2ForSequenceClassification.forward); attention_mask is not used for it; "
                "an all-pad row gives index 0; no pad_token_id: index -1, and batch > 1 raises")
LABELS3 = {0: "neg", 1: "neu", 2: "pos"}

LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
             bos_token_id=1, eos_token_id=2, pad_token_id=PAD, attn_implementation="eager",
             num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
             tie_word_embeddings=False)
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=None,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, layer_norm_epsilon=1e-5, initializer_range=0.1,
            bos_token_id=1, eos_token_id=2, pad_token_id=PAD, attn_implementation="eager")

TINY_CASES = {
    "llama-tiny-seqcls": dict(
        cls=LlamaForSequenceClassification, config=LlamaConfig, args=LLAMA, tokenizer="llama-tiny",
        labels=dict(num_labels=3, id2label=LABELS3, label2id={v: k for k, v in LABELS3.items()},
                    problem_type="single_label_classification"),
        targets=torch.tensor([2, 0, 1])),
    "llama-tiny-seqreg": dict(
        cls=LlamaForSequenceClassification, config=LlamaConfig, args=LLAMA, tokenizer="llama-tiny",
        labels=dict(num_labels=1, problem_type="regression"),
        targets=torch.tensor([0.5, -1.25, 2.0])),
    "gpt2-tiny-seqcls": dict(
        cls=GPT2ForSequenceClassification, config=GPT2Config, args=GPT2, tokenizer="gpt2-tiny",
        labels=dict(num_labels=3, id2label=LABELS3, label2id={v: k for k, v in LABELS3.items()},
                    problem_type="single_label_classification"),
        targets=torch.tensor([2, 0, 1])),
}
ALL_CASES = [*TINY_CASES, "lora-llama-seqcls", "smollm2"]


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "safetensors": safetensors.__version__,
            "tokenizers": tokenizers.__version__}


def tensor_shapes(tensors):
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()}


def pooled_index(ids, pad):
    """The rule transformers applies (see POOLING_RULE), written out again."""
    t = torch.arange(ids.shape[-1])
    return (t * (ids != pad)).argmax(-1)


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (len(PAD_FROM), T), generator=g)
    mask = torch.ones_like(ids)
    for row, start in enumerate(PAD_FROM):
        if start is not None:
            ids[row, start:] = PAD
            mask[row, start:] = 0
    return ids, mask


def clean(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        f.unlink()


# --- tiny decoder classifiers ------------------------------------------------------------------

def run_tiny(case, spec):
    out_dir = FIX / case
    clean(out_dir)
    torch.manual_seed(0)
    cfg = spec["config"](**spec["args"], **spec["labels"])
    model = spec["cls"](cfg)
    perturb_base(model)
    model.eval()
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIX / spec["tokenizer"] / f, out_dir / f)

    ids, mask = batch()
    labels = spec["targets"]
    res = model(input_ids=ids, attention_mask=mask, labels=labels)
    res.loss.backward()
    idx = pooled_index(ids, PAD)
    assert idx.tolist() == [T - 1, PAD_FROM[1] - 1, PAD_FROM[2] - 1], idx

    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "logits": res.logits.detach().contiguous(),
               "loss": res.loss.detach().reshape(1)}
    params = [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{case}: no gradient for {name}"
        tensors["grad." + name] = p.grad.detach().contiguous()
    safetensors.torch.save_file(tensors, out_dir / "golden.safetensors", metadata={"format": "pt"})

    # The folder must load on its own and give the same numbers.
    re_model = AutoModelForSequenceClassification.from_pretrained(
        out_dir, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        re_res = re_model(input_ids=ids, attention_mask=mask, labels=labels)
    reload_diff = (re_res.logits - res.logits).abs().max().item()
    assert type(re_model) is type(model) and reload_diff == 0.0, reload_diff
    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    assert tok.pad_token_id == PAD, tok.pad_token_id

    # Same body as the causal-LM fixture of golden_decoders.py? (same seed, same init order)
    lm = safetensors.torch.load_file(FIX / spec["tokenizer"] / "model.safetensors")
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
    same_body = set(body) <= set(lm) and all(torch.equal(v, lm[k]) for k, v in body.items())

    meta = {
        "produced_by": "scripts/reference/golden_seqcls.py",
        "case": case,
        "versions": versions(),
        "class": type(model).__name__,
        "attn_implementation": "eager",
        "config": {k: getattr(cfg, k) for k in ("num_labels", "problem_type", "pad_token_id",
                                                 "bos_token_id", "eos_token_id")}
                  | {"id2label": cfg.id2label, "label2id": cfg.label2id},
        "config_from": f"the {spec['tokenizer']} config of scripts/reference/golden_decoders.py "
                       "+ pad_token_id 0 and the labels above",
        "weights": "torch.manual_seed(0); transformers init (initializer_range 0.1); then "
                   "golden_decoders.perturb (torch.Generator seeded 1: norm weights 1 + 0.1 N, "
                   "biases 0.05 N)",
        "body_equals_causal_lm_fixture": (f"tests/fixtures/{spec['tokenizer']}/model.safetensors"
                                          if same_body else False),
        "tokenizer_from": f"tests/fixtures/{spec['tokenizer']} (tokenizer.json, "
                          "tokenizer_config.json); <pad> is id 0",
        "inputs": "input_ids randint(3, 160) from torch.Generator seeded 2, shape [3, 12]; row 1 "
                  "right-padded from position 9, row 2 from position 5 (id 0, mask 0)",
        "labels": labels.tolist(),
        "pooling_rule": POOLING_RULE,
        "pooled_index": idx.tolist(),
        "loss_rule": ("cross-entropy over pooled logits [B, num_labels], mean over the batch"
                      if cfg.problem_type == "single_label_classification" else
                      "MSELoss(pooled_logits.squeeze(), labels.squeeze()), mean over the batch"),
        "loss": res.loss.item(),
        "logits": res.logits.detach().tolist(),
        "checks": {"reload_from_folder_logits_max_abs": reload_diff},
        "parameters": params,
        "golden_tensors": tensor_shapes(tensors),
    }
    (out_dir / "golden.json").write_text(dumps(meta) + "\n")
    print(f"{case}: loss {res.loss.item():.6f}, pooled {idx.tolist()}, same body as "
          f"{spec['tokenizer']}: {same_body}, sizes "
          f"{ {f.name: f.stat().st_size for f in sorted(out_dir.iterdir())} }")


# --- PEFT LoRA on the Llama classifier ------------------------------------------------------------

PEFT_CASE = "lora-llama-seqcls"
PEFT_BASE = FIX / "llama-tiny-seqcls"
PEFT_ARGS = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                 target_modules=["q_proj", "v_proj"])


def load_llama_base():
    return LlamaForSequenceClassification.from_pretrained(
        PEFT_BASE, local_files_only=True, attn_implementation="eager").eval()


def manual_logits(adapter_dir, inputs):
    """The adapted forward rebuilt from adapter_config.json + adapter_model.safetensors alone."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    model = load_llama_base()
    pre, used = "base_model.model.", set()
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        k = pre + name
        if k + ".lora_A.weight" in sd:
            W, A, B = mod.weight.detach(), sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"]
            s = cfg["lora_alpha"] / cfg["r"]
            assert mod.bias is None
            mod.forward = lambda x, W=W, A=A, B=B, s=s: x @ W.T + s * (x @ A.T @ B.T)
            used |= {k + ".lora_A.weight", k + ".lora_B.weight"}
        elif k + ".weight" in sd:  # modules_to_save copy (score, no bias)
            with torch.no_grad():
                mod.weight.copy_(sd[k + ".weight"])
            used.add(k + ".weight")
    assert used == set(sd), sorted(set(sd) - used)
    with torch.no_grad():
        return model(**inputs).logits


def run_peft():
    out_dir = FIX / "peft" / PEFT_CASE
    clean(out_dir)
    g = safetensors.torch.load_file(PEFT_BASE / "golden.safetensors")
    inputs = {k: g[k] for k in ("input_ids", "attention_mask")}

    base = load_llama_base()
    base_score = base.score.weight.detach().clone()
    cfg = LoraConfig(**PEFT_ARGS)
    c = peft_case(base, cfg, inputs, out_dir)
    assert torch.allclose(c.plain_logits, g["logits"], atol=1e-6)
    pm, perturbed, wrapped, mts, trainable = c.pm, c.perturbed, c.wrapped, c.mts, c.trainable
    logits, base_logits, card_written = c.logits, c.base_logits, c.card_written
    header = safetensors_header(out_dir / "adapter_model.safetensors")
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())

    with torch.no_grad():
        re_pm = PeftModel.from_pretrained(load_llama_base(), out_dir).eval()
        reload_logits = re_pm(**inputs).logits
    reload_diff = (reload_logits - logits).abs().max().item()
    assert reload_diff <= 1e-6, reload_diff
    man = manual_logits(out_dir, inputs)
    manual_diff = (man - logits).abs().max().item()
    assert manual_diff <= 1e-5, manual_diff

    merged_model, merged_logits, merged_diff = c.merged(inputs)

    out = dict(inputs)
    out["base.score.weight"] = base_score
    out.update(logits=logits, base_logits=base_logits, merged_logits=merged_logits)
    msd = merged_model.state_dict()
    for row in wrapped:
        out[f"merged.{row['module']}.weight"] = msd[f"{row['module']}.weight"]
    out["merged.score.weight"] = msd["score.weight"]
    out = {k: v.detach().contiguous() for k, v in out.items()}
    safetensors.torch.save_file(out, out_dir / "golden.safetensors", metadata={"format": "pt"})

    meta = {
        "produced_by": "scripts/reference/golden_seqcls.py",
        "case": PEFT_CASE,
        "notes": ("no modules_to_save given: task_type SEQ_CLS makes it [\"classifier\", \"score\"]; "
                  "LlamaForSequenceClassification has `score` (no bias), so score is wrapped in a "
                  "ModulesToSaveWrapper and saved as base_model.model.score.weight [3, 64]; "
                  "q_proj/v_proj have no bias; merge_and_unload leaves the modules_to_save copy "
                  "as score.weight"),
        "versions": versions(),
        "base_model": f"{PEFT_BASE} (LlamaForSequenceClassification, num_labels 3, score.weight "
                      "in the folder)",
        "base_classifier": "the folder's score.weight, also as base.score.weight in "
                           "golden.safetensors",
        "eval": "eval mode, attention dropout 0.0, eager attention, f32",
        "peft_config_args": {"class": "LoraConfig", **PEFT_ARGS},
        **c.saved_meta(adapter_config, header),
        "perturbation": "torch.manual_seed(0); in named_parameters order: lora_A/B = "
                        "0.1*randn_like; modules_to_save copy += 0.1*randn_like",
        "texts": f"the 3-row batch of {PEFT_BASE}/golden.safetensors",
        "pooling_rule": POOLING_RULE,
        "golden_tensors": tensor_shapes(out),
        "checks": {"reload_vs_logits_max_abs": reload_diff,
                   "manual_formulas_vs_logits_max_abs": manual_diff,
                   "merged_vs_logits_max_abs": merged_diff,
                   "adapter_vs_base_logits_max_abs": (logits - base_logits).abs().max().item()},
    }
    (out_dir / "golden.json").write_text(dumps(meta) + "\n")
    print(f"{PEFT_CASE}: {len(wrapped)} wrapped, modules_to_save {adapter_config['modules_to_save']}, "
          f"reload {reload_diff:.1e}, formulas {manual_diff:.1e}, merged {merged_diff:.1e}, sizes "
          f"{ {f.name: f.stat().st_size for f in sorted(out_dir.iterdir())} }")


# --- SmolLM2-135M-Instruct (real weights, GGUF) ------------------------------------------------------

def run_smollm2(gguf_path, sarcasm):
    folder, name = str(gguf_path.parent), gguf_path.name
    out_dir = FIX / "smollm2"
    texts = []
    with open(sarcasm) as f:
        for line in f:
            texts.append(json.loads(line)["input"][-1]["content"])
            if len(texts) == 4:
                break

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, gguf_file=name, num_labels=2, torch_dtype=torch.float32,
        attn_implementation="eager").eval()
    cfg = model.config
    pad = cfg.pad_token_id
    assert pad is not None, "the GGUF config has no pad_token_id"
    assert tok.pad_token_id == pad, (tok.pad_token_id, pad)
    g = torch.Generator().manual_seed(SCORE_SEED)
    score = 0.02 * torch.randn(model.score.weight.shape, generator=g)
    with torch.no_grad():
        model.score.weight.copy_(score)

    plain = [tok(t)["input_ids"] for t in texts]
    bare = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert tok.padding_side == "right"
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    for row, p in enumerate(plain):
        assert ids[row, :len(p)].tolist() == p and (ids[row, len(p):] == pad).all()
        assert pad not in p, "a real token equals the pad id: the pooling rule would skip it"
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        one_by_one = torch.cat([model(input_ids=torch.tensor([p])).logits for p in plain])
    rows_diff = (one_by_one - logits).abs().max().item()
    assert rows_diff <= 1e-4, rows_diff
    idx = pooled_index(ids, pad)
    assert idx.tolist() == [len(p) - 1 for p in plain]

    tensors = {"score.weight": score, "input_ids": ids, "attention_mask": mask,
               "logits": logits.contiguous()}
    safetensors.torch.save_file(tensors, out_dir / "seqcls_reference.safetensors",
                                metadata={"format": "pt"})
    meta = {
        "produced_by": "scripts/reference/golden_seqcls.py",
        "source": f"{name} (transformers' GGUF loader, dequantised to f32)",
        "gguf_sha256": hashlib.sha256(gguf_path.read_bytes()).hexdigest(),
        "versions": versions() | {"gguf": importlib.metadata.version("gguf")},
        "load": f"AutoModelForSequenceClassification.from_pretrained(folder, gguf_file={name!r}, "
                "num_labels=2, torch_dtype=torch.float32, attn_implementation='eager'), eval mode",
        "class": type(model).__name__,
        "score_weight": f"0.02 * torch.randn([2, {cfg.hidden_size}], generator=torch.Generator()"
                        f".manual_seed({SCORE_SEED})), saved as score.weight (no bias)",
        "pad_token_id": pad,
        "pad_token": tok.pad_token,
        "pad_token_source": "the GGUF (tokenizer.ggml.padding_token_id), read into both the config "
                            "and the tokenizer; it is the eos token <|im_end|>, so a row ending in "
                            "<|im_end|> would pool an earlier token",
        "bos_token_id": cfg.bos_token_id, "bos_token": tok.bos_token,
        "eos_token_id": cfg.eos_token_id, "eos_token": tok.eos_token,
        "tokenization": "tok(texts, padding=True): a plain call; right padding with pad_token_id, "
                        "attention_mask 0 there",
        "special_tokens_added_by_plain_call": ("none (equal to add_special_tokens=False; no BOS, "
                                               "no EOS)" if plain == bare else
                                               "the plain call differs from add_special_tokens="
                                               "False: see ids"),
        "texts": texts,
        "data": "first 4 rows of the sarcasm samples.jsonl, row['input'][-1]['content']",
        "ids": plain,
        "pooling_rule": POOLING_RULE,
        "pooled_index": idx.tolist(),
        "logits": logits.tolist(),
        "checks": {"batched_vs_one_row_at_a_time_logits_max_abs": rows_diff},
        "golden_tensors": tensor_shapes(tensors),
    }
    (out_dir / "seqcls_reference.json").write_text(dumps(meta) + "\n")
    print(f"smollm2: pad {pad}, pooled {idx.tolist()}, logits {logits.tolist()}, batched vs rows "
          f"{rows_diff:.1e}, {(out_dir / 'seqcls_reference.safetensors').stat().st_size} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(ALL_CASES))
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--sarcasm", type=Path, default=DEFAULT_SARCASM)
    args = ap.parse_args()
    gguf_path, sarcasm = args.gguf.expanduser().resolve(), args.sarcasm.expanduser().resolve()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for case in args.cases.split(","):
        if case in TINY_CASES:
            run_tiny(case, TINY_CASES[case])
        elif case == PEFT_CASE:
            run_peft()
        elif case == "smollm2":
            run_smollm2(gguf_path, sarcasm)
        else:
            sys.exit(f"unknown case {case!r}; cases: {', '.join(ALL_CASES)}")


if __name__ == "__main__":
    main()
