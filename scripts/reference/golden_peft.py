"""Golden PEFT adapters (LoRA, rsLoRA + patterns, DoRA, IA3) on BERT, written by PEFT itself.

For each case writes tests/fixtures/peft/<case>/:
  adapter_config.json, adapter_model.safetensors   exactly as PeftModel.save_pretrained writes them
                                                   (its model-card README.md is deleted: not needed)
  golden.safetensors   inputs and logits (below)
  golden.json          versions, the saved keys/shapes/dtypes, the safetensors header metadata, the
                       adapter_config.json content, the wrapped modules (r, alpha, scaling), checks

Base models (eval mode, every dropout 0.0, eager attention, f32 on CPU):
  tiny cases  tests/fixtures/bert-tiny as BertForSequenceClassification(num_labels=2), classifier.*
              taken from tests/fixtures/bert-tiny/golden.safetensors; the same 3-row batch as there.
  lora-minilm the real all-MiniLM-L6-v2 (folder: --minilm, default /root/.cache/afinar/models/
              all-minilm-l6-v2) with a seeded classifier (as golden_bert.py: weight 0.2*N(0,1),
              bias 0.1*N(0,1), torch.Generator seeded 1); 2 short sentences, right-padded.

After get_peft_model every adapter parameter is perturbed (PEFT's init is the identity: lora_B = 0,
ia3 = 1), with torch.manual_seed(0), one torch.randn_like per parameter in named_parameters order:
  lora_A / lora_B            <- 0.1 * N(0,1)
  lora_magnitude_vector      <- init * (1 + 0.1 * N(0,1))   (init = row norms of W, made with B = 0)
  ia3_l                      <- 1 + 0.1 * N(0,1)
  modules_to_save copy       <- copy + 0.1 * N(0,1)         (classifier; the base one is kept)

Tensors in golden.safetensors (float32 unless said):
  input_ids, attention_mask, token_type_ids   int64 [B, T]
  base.classifier.weight [2, H], base.classifier.bias [2]   the base model's classifier
  logits [B, 2]          PeftModel in eval mode
  base_logits [B, 2]     the same PeftModel under `with model.disable_adapter():`
  merged_logits [B, 2]   the model returned by merge_and_unload()
  merged.<name>          (tiny cases) after merge_and_unload: weight, bias of every wrapped Linear
                         and classifier.weight / classifier.bias, transformers names

Each case is also checked here: reloading the folder with PeftModel.from_pretrained gives the same
logits, and an independent re-implementation of the forward formulas documented in
tests/fixtures/peft/README.md (from the saved files + base weights only) matches PEFT's logits.

PYTHONHASHSEED: PEFT keeps target_modules / feedforward_modules as Python sets and writes them with
list(set), so their order in adapter_config.json depends on the hash seed. The script re-executes
itself with PYTHONHASHSEED=0 so that the fixtures are byte-for-byte reproducible.

Command (from the repository root):
    . .venv/bin/activate && python scripts/reference/golden_peft.py [--minilm DIR] [--cases a,b]
"""

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0":  # before anything builds a set of strings
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"})

import peft
import safetensors
import safetensors.torch
import tokenizers
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
TINY = Path("tests/fixtures/bert-tiny")  # relative: it is written into adapter_config.json
OUT = Path("tests/fixtures/peft")
DEFAULT_MINILM = Path("/root/.cache/afinar/models/all-minilm-l6-v2")
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SENTENCES = ["A wonderful little film.", "I did not enjoy this at all."]
PERTURB_SEED, MINILM_HEAD_SEED = 0, 1

CASES = {
    "lora-tiny": dict(
        base="tiny", method="lora",
        notes=('task_type SEQ_CLS appends ["classifier", "score"] to the given '
               'modules_to_save, so adapter_config.json holds ["classifier", "classifier", '
               '"score"]'),
        config=dict(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                    target_modules=["query", "value"], modules_to_save=["classifier"])),
    "lora-tiny-rslora-patterns": dict(
        base="tiny", method="lora",
        notes=('layers_pattern is null, so PEFT takes the layer index from the first '
               "'<segment>.<digits>.' after at least one segment (regex "
               '.*?\\.[^.]*\\.(?P<idx>\\d+)\\.): bert.encoder.layer.1.* -> 1; bert.pooler.dense '
               "has no index and is NOT wrapped although 'dense' matches it; layer 0 gets "
               'nothing. rank_pattern/alpha_pattern keys are regexes matched as (.*\\.)?(KEY)$ '
               'on the module path; rsLoRA scaling alpha/sqrt(r) uses the per-module r and '
               'alpha: value r=2 -> 8/sqrt(2), key alpha=16 -> 16/sqrt(4) = 8, others '
               '8/sqrt(4) = 4. No modules_to_save given: SEQ_CLS makes it ["classifier", '
               '"score"]'),
        config=dict(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=True,
                    target_modules=["query", "key", "value", "dense"], rank_pattern={"value": 2},
                    alpha_pattern={"key": 16}, layers_to_transform=[1])),
    "dora-tiny": dict(
        base="tiny", method="lora",
        notes=('magnitude saved as <module>.lora_magnitude_vector (no .weight, no adapter '
               'name), shape [out_features]; classifier saved because of task_type SEQ_CLS'),
        config=dict(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                    target_modules=["query", "value"])),
    "ia3-tiny": dict(
        base="tiny", method="ia3",
        notes=("target 'output.dense' matches both attention.output.dense and output.dense "
               '(suffix after a dot), and feedforward_modules uses a plain endswith, so BOTH '
               'are feedforward (ia3_l [1, in]); key/value are not (ia3_l [out, 1])'),
        config=dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                    feedforward_modules=["output.dense"])),
    "lora-minilm": dict(
        base="minilm", method="lora",
        notes=('real weights; base_model_name_or_path set to the hub id through '
               'model.name_or_path'),
        config=dict(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                    target_modules=["query", "value"], modules_to_save=["classifier"])),
    "dora-minilm": dict(
        base="minilm", method="lora",
        notes="real weights, DoRA r=8 on query/value",
        config=dict(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True,
                    target_modules=["query", "value"])),
    "ia3-minilm": dict(
        base="minilm", method="ia3",
        notes="real weights, IA3 on key/value/output.dense (both output.dense are feed-forward)",
        config=dict(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                    feedforward_modules=["output.dense"])),
}

DROPOUT0 = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)


# --- base models and inputs ------------------------------------------------------------------

def tiny_inputs():
    g = safetensors.torch.load_file(TINY / "golden.safetensors")
    inputs = {k: g[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    head = {"weight": g["classifier.weight"], "bias": g["classifier.bias"]}
    return inputs, head, json.loads((TINY / "golden.json").read_text())["tokens"]


def minilm_inputs(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=128)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]", direction="right")  # longest
    encs = tok.encode_batch(MINILM_SENTENCES)
    inputs = {"input_ids": torch.tensor([e.ids for e in encs], dtype=torch.int64),
              "attention_mask": torch.tensor([e.attention_mask for e in encs], dtype=torch.int64),
              "token_type_ids": torch.tensor([e.type_ids for e in encs], dtype=torch.int64)}
    g = torch.Generator().manual_seed(MINILM_HEAD_SEED)
    w = 0.2 * torch.randn((2, 384), generator=g)
    b = 0.1 * torch.randn((2,), generator=g)
    return inputs, {"weight": w, "bias": b}, [e.tokens for e in encs]


def load_base(model_dir, head, name_or_path=None):
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attn_implementation="eager", **DROPOUT0)
    with torch.no_grad():
        model.classifier.weight.copy_(head["weight"])
        model.classifier.bias.copy_(head["bias"])
    if name_or_path is not None:
        model.name_or_path = name_or_path  # what PEFT writes as base_model_name_or_path
    return model.eval()


# --- perturbation ------------------------------------------------------------------------------

def perturb(model):
    torch.manual_seed(PERTURB_SEED)
    done = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif ".ia3_l." in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif ".modules_to_save." in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                continue
            done.append(name)
    return done


# --- what PEFT did -------------------------------------------------------------------------------

def wrapped_modules(pm):
    rows = []
    for name, mod in pm.base_model.model.named_modules():
        if not isinstance(mod, BaseTunerLayer):
            continue
        base = mod.get_base_layer()
        row = {"module": name, "peft_class": f"{type(mod).__module__}.{type(mod).__name__}",
               "in_features": base.in_features, "out_features": base.out_features,
               "base_has_bias": base.bias is not None}
        if hasattr(mod, "lora_A"):
            row.update(r=mod.r["default"], lora_alpha=mod.lora_alpha["default"],
                       use_rslora=mod.use_rslora["default"], use_dora=mod.use_dora["default"],
                       scaling=mod.scaling["default"])
        if hasattr(mod, "ia3_l"):
            row.update(is_feedforward=mod.is_feedforward,
                       ia3_l_shape=list(mod.ia3_l["default"].shape))
        rows.append(row)
    return rows


def safetensors_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode()
    header = json.loads(text)
    keys = list(header)
    meta = header.pop("__metadata__", None)
    by_offset = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {"__metadata__": meta, "header_bytes": n, "file_bytes": len(raw),
            "metadata_first_in_header": keys[0] == "__metadata__",
            "header_keys_sorted": keys[1:] == sorted(keys[1:]),
            "data_in_key_order": [k for k, _ in by_offset] == keys[1:],
            "header_padding": f"{len(text) - len(text.rstrip(' '))} trailing spaces (n % 8 == 0)",
            "tensors": [{"key": k, "dtype": v["dtype"], "shape": v["shape"],
                         "data_offsets": v["data_offsets"]} for k, v in by_offset]}


def dumps(obj):
    """json.dumps(indent=1) with short number lists (shapes, offsets) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


# --- independent re-implementation of the documented formulas ------------------------------------

class PeftCase:
    """What `peft_case` made: the PEFT model and what the fixture records about it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def saved_meta(self, adapter_config, header):
        """What PEFT saved and wrapped, as golden.json records it (its keys, in order)."""
        return {
            "adapter_config": adapter_config,
            "adapter_config_json": "json.dumps(asdict(config), indent=2, sort_keys=True), no "
                                   "trailing newline; sets written as lists in set-iteration order",
            "adapter_model_safetensors": header,
            "peft_also_writes": "README.md (model card), deleted here" if self.card_written else None,
            "wrapped_modules": self.wrapped,
            "modules_to_save_wrappers": self.mts,
            "trainable_parameters": self.trainable,
            "perturbed_parameters": self.perturbed,
        }

    def merged(self, inputs):
        """`merge_and_unload`: the merged model, its logits and their max abs difference to the
        adapter's (at most 1e-5)."""
        merged_model = self.pm.merge_and_unload().eval()
        with torch.no_grad():
            merged_logits = merged_model(**inputs).logits
        merged_diff = (merged_logits - self.logits).abs().max().item()
        assert merged_diff <= 1e-5, merged_diff
        return merged_model, merged_logits, merged_diff


def peft_case(base, cfg, inputs, out_dir):
    """`base` wrapped by PEFT with `cfg`, its adapter weights perturbed (so that the adapter is not
    the identity), saved with `save_pretrained` into `out_dir` (the model card removed): the
    logits with the adapter on and off (off must equal `base`), the wrapped modules, the
    modules_to_save wrappers and the trainable parameters."""
    with torch.no_grad():
        plain_logits = base(**inputs).logits
    pm = get_peft_model(base, cfg)
    perturbed = perturb(pm)
    pm.eval()
    wrapped = wrapped_modules(pm)
    mts = sorted(n for n, m in pm.base_model.model.named_modules()
                 if type(m).__name__ == "ModulesToSaveWrapper")
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():
        logits = pm(**inputs).logits
        with pm.disable_adapter():
            base_logits = pm(**inputs).logits
    assert torch.equal(base_logits, plain_logits), "disable_adapter != base model"
    assert (logits - base_logits).abs().max() > 1e-3, "adapter is (nearly) the identity"
    pm.save_pretrained(out_dir)
    card = out_dir / "README.md"
    card_written = card.exists()
    if card_written:
        card.unlink()
    return PeftCase(pm=pm, perturbed=perturbed, wrapped=wrapped, mts=mts, trainable=trainable,
                    plain_logits=plain_logits, logits=logits, base_logits=base_logits,
                    card_written=card_written)


def pattern_value(pattern, key, default):
    """peft.utils.other.get_pattern_key: the first p (dict order) with re.match(rf"(.*\\.)?({p})$", key)."""
    for p, v in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def lora_forward(W, b, A, B, s):
    return lambda x: x @ W.T + b + s * (x @ A.T @ B.T)


def dora_forward(W, b, A, B, s, m):
    n = torch.linalg.norm(W + s * (B @ A), dim=1)  # [out], L2 over in (detached in PEFT)
    return lambda x: (m / n) * (x @ W.T + s * (x @ A.T @ B.T)) + b  # bias outside the scale


def ia3_forward(W, b, l):
    if l.shape[0] == 1:  # feedforward: [1, in], scales the input
        return lambda x: (x * l.flatten()) @ W.T + b
    return lambda x: (x @ W.T + b) * l.flatten()  # [out, 1], scales the output, bias included


def manual_logits(model_dir, head, adapter_dir, inputs):
    """Rebuild the adapted forward from adapter_config.json + adapter_model.safetensors alone."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = safetensors.torch.load_file(adapter_dir / "adapter_model.safetensors")
    model = load_base(model_dir, head)
    pre = "base_model.model."
    used = set()
    scalings = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        k = pre + name
        W, b = mod.weight.detach(), mod.bias.detach()
        if k + ".lora_A.weight" in sd:
            A, B = sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"]  # [r, in], [out, r]
            r = A.shape[0]
            assert r == pattern_value(cfg["rank_pattern"], name, cfg["r"]), name
            alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
            s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            scalings[name] = s
            used |= {k + ".lora_A.weight", k + ".lora_B.weight"}
            if cfg["use_dora"]:
                m = sd[k + ".lora_magnitude_vector"]  # [out]
                used.add(k + ".lora_magnitude_vector")
                mod.forward = dora_forward(W, b, A, B, s, m)
            else:
                mod.forward = lora_forward(W, b, A, B, s)
        elif k + ".ia3_l" in sd:
            l = sd[k + ".ia3_l"]
            used.add(k + ".ia3_l")
            mod.forward = ia3_forward(W, b, l)
        elif k + ".weight" in sd:  # modules_to_save copy
            with torch.no_grad():
                mod.weight.copy_(sd[k + ".weight"])
                mod.bias.copy_(sd[k + ".bias"])
            used |= {k + ".weight", k + ".bias"}
    assert used == set(sd), sorted(set(sd) - used)
    with torch.no_grad():
        return model(**inputs).logits, scalings


# --- one case ------------------------------------------------------------------------------------

def run_case(case, spec, minilm_dir):
    if spec["base"] == "tiny":
        model_dir, name_or_path = TINY, None
        inputs, head, tokens = tiny_inputs()
    else:
        model_dir, name_or_path = minilm_dir, MINILM_HUB_ID
        inputs, head, tokens = minilm_inputs(minilm_dir)
    out_dir = OUT / case
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        f.unlink()

    base = load_base(model_dir, head, name_or_path)
    cfg_cls = LoraConfig if spec["method"] == "lora" else IA3Config
    c = peft_case(base, cfg_cls(**spec["config"]), inputs, out_dir)
    pm, perturbed, wrapped, mts, trainable = c.pm, c.perturbed, c.wrapped, c.mts, c.trainable
    logits, base_logits, card_written = c.logits, c.base_logits, c.card_written
    adapter_file = out_dir / "adapter_model.safetensors"
    header = safetensors_header(adapter_file)
    adapter_config_text = (out_dir / "adapter_config.json").read_text()
    adapter_config = json.loads(adapter_config_text)

    # reload with the real loader from the files alone
    with torch.no_grad():
        re_pm = PeftModel.from_pretrained(load_base(model_dir, head), out_dir).eval()
        reload_logits = re_pm(**inputs).logits
    reload_diff = (reload_logits - logits).abs().max().item()
    assert reload_diff <= 1e-6, reload_diff

    # the documented formulas, implemented independently
    man_logits, man_scalings = manual_logits(model_dir, head, out_dir, inputs)
    manual_diff = (man_logits - logits).abs().max().item()
    assert manual_diff <= 1e-5, manual_diff
    for row in wrapped:
        if "scaling" in row:
            assert math.isclose(man_scalings[row["module"]], row["scaling"]), row

    merged_model, merged_logits, merged_diff = c.merged(inputs)

    out = dict(inputs)
    out["base.classifier.weight"] = head["weight"]
    out["base.classifier.bias"] = head["bias"]
    out.update(logits=logits, base_logits=base_logits, merged_logits=merged_logits)
    if spec["base"] == "tiny":
        msd = merged_model.state_dict()
        for row in wrapped:
            for p in ("weight", "bias"):
                out[f"merged.{row['module']}.{p}"] = msd[f"{row['module']}.{p}"]
        out["merged.classifier.weight"] = msd["classifier.weight"]
        out["merged.classifier.bias"] = msd["classifier.bias"]
    out = {k: v.detach().contiguous() for k, v in out.items()}
    safetensors.torch.save_file(out, out_dir / "golden.safetensors", metadata={"format": "pt"})

    meta = {
        "produced_by": "scripts/reference/golden_peft.py",
        "case": case,
        "notes": spec["notes"],
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "safetensors": safetensors.__version__,
                     "tokenizers": tokenizers.__version__},
        "base_model": (f"{TINY} (BertModel keys) as BertForSequenceClassification(num_labels=2), "
                       "classifier.* from tests/fixtures/bert-tiny/golden.safetensors"
                       if spec["base"] == "tiny" else
                       "all-MiniLM-L6-v2 as BertForSequenceClassification(num_labels=2), classifier "
                       "0.2*N(0,1) / 0.1*N(0,1) from torch.Generator seeded 1"),
        "base_classifier": "base.classifier.weight / base.classifier.bias in golden.safetensors",
        "eval": "eval mode, hidden/attention/classifier dropout 0.0, eager attention, f32",
        "peft_config_args": {"class": cfg_cls.__name__, **spec["config"]},
        **c.saved_meta(adapter_config, header),
        "perturbation": f"torch.manual_seed({PERTURB_SEED}); in named_parameters order: lora_A/B = "
                        "0.1*randn_like; lora_magnitude_vector *= 1 + 0.1*randn_like; ia3_l = "
                        "1 + 0.1*randn_like; modules_to_save copy += 0.1*randn_like",
        "tokens": tokens,
        "texts": MINILM_SENTENCES if spec["base"] == "minilm" else
                 "the 3-row batch of tests/fixtures/bert-tiny/golden.json",
        "golden_tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                           for k, v in out.items()},
        "checks": {"reload_vs_logits_max_abs": reload_diff,
                   "manual_formulas_vs_logits_max_abs": manual_diff,
                   "merged_vs_logits_max_abs": merged_diff,
                   "adapter_vs_base_logits_max_abs": (logits - base_logits).abs().max().item()},
    }
    if spec["base"] == "minilm":
        meta["model_safetensors_sha256"] = hashlib.sha256(
            (model_dir / "model.safetensors").read_bytes()).hexdigest()
    (out_dir / "golden.json").write_text(dumps(meta) + "\n")
    sizes = {f.name: f.stat().st_size for f in sorted(out_dir.iterdir())}
    print(f"{case}: {len(wrapped)} wrapped, {len(header['tensors'])} saved tensors, "
          f"reload {reload_diff:.1e}, formulas {manual_diff:.1e}, merged {merged_diff:.1e}, "
          f"sizes {sizes}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minilm", type=Path, default=DEFAULT_MINILM)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for case in args.cases.split(","):
        run_case(case, CASES[case], args.minilm.resolve())


if __name__ == "__main__":
    main()
