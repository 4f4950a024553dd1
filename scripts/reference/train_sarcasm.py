"""Reference fine-tuning run (PyTorch + transformers) of an afinar TOML config.

Runs the same recipe as `afinar train CONFIG.toml` with BertForSequenceClassification and a plain
PyTorch loop, and writes a results JSON to compare afinar's run against: test accuracy of the final
model and of the best-on-validation checkpoint, best validation accuracy, wall time, rows, steps.

Command (from the repository root):
    . .venv/bin/activate
    python scripts/reference/train_sarcasm.py configs/minilm-sarcasm-full.toml \
        [--data PATH] [--model DIR] [--threads N] [--limit N] --out results.json
  quick check:  ... --limit 600 --threads 1 --out /tmp/ref_quick.json
  full run:     nohup python scripts/reference/train_sarcasm.py configs/minilm-sarcasm-full.toml \
                    --threads 1 --out bench/reference-sarcasm-full.json > /tmp/ref_full.log 2>&1 &

What it honours from the TOML (the afinar contract, configs/minilm-sarcasm-full.toml):
  model.asset | model.path (or --model), model.max_length (truncation; batches pad to the longest)
  task.type "classification" | "regression", task.pooling "cls" only ("mean" has no transformers
      class), task.dropout -> config.classifier_dropout (the encoder keeps config.json's dropout)
  data.train (path or asset:NAME, or --data), data.text / data.label field paths
      (dot-separated segments, `[N]` indexes, negative N from the end: `input[-1].content`),
      data.split + data.split_seed -> afinar_split.split_indices (rows in file order; --limit N
      keeps the first N rows of the file before splitting)
  freeze.preset "full" | "head_only" (pooler + classifier) | "last_layers" (freeze.last_layers = N:
      the last N encoder layers + pooler + classifier)
  train.epochs, batch_size, lr, weight_decay (none on biases and LayerNorm), schedule
      linear|cosine|constant with warmup = ceil(warmup_ratio * total_steps) (as transformers'
      Trainer), max_grad_norm (clip over trainable params; 0 = off), grad_accum (mean over the
      micro-batches of one step), eval_every (optimizer steps), early_stopping {metric, patience}
      (patience = evaluations without improvement)
  seeds.init (torch.manual_seed before the head is created), seeds.data (torch.Generator behind a
      torch.randperm of the training rows every epoch; last partial batch kept), seeds.dropout
      (torch.manual_seed just before the loop)
Labels: classification maps the sorted unique labels of the training split to 0..K-1 (afinar's
  rule: numeric order if every label parses as a number, else lexicographic).
Assets: asset:NAME / model.asset are looked up in afinar's cache (models/NAME, data/NAME/samples.jsonl)
  and then in the repository's .cache/afinar (NAME, NAME-dev, NAME.jsonl, NAME-dev.jsonl).
Metrics: accuracy and macro-F1 (classification), MSE (regression).
"""

import argparse
import copy
import csv
import json
import math
import os
import platform
import re
import sys
import time
import tomllib
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from transformers import (BertForSequenceClassification, get_constant_schedule_with_warmup,
                          get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from afinar_split import split_indices  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def cache_roots():
    """afinar's cache ($AFINAR_CACHE, else $XDG_CACHE_HOME/afinar, else ~/.cache/afinar), then the
    repository's .cache/afinar (where the dev copies live)."""
    env = os.environ
    if env.get("AFINAR_CACHE"):
        first = Path(env["AFINAR_CACHE"])
    elif env.get("XDG_CACHE_HOME"):
        first = Path(env["XDG_CACHE_HOME"]) / "afinar"
    else:
        first = Path.home() / ".cache" / "afinar"
    return [first, ROOT / ".cache" / "afinar"]


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# config, assets, data


def resolve_model(cfg_model, override):
    if override:
        return Path(override)
    if "path" in cfg_model:
        return Path(cfg_model["path"])
    if "asset" in cfg_model:
        name = cfg_model["asset"]
        tried = [c / sub for c in cache_roots() for sub in (f"models/{name}", name, f"{name}-dev")]
        for cand in tried:
            if (cand / "config.json").exists():
                return cand
        raise SystemExit(f"model asset {name!r} not found; tried {[str(t) for t in tried]}")
    raise SystemExit("model: need `path` or `asset` (hub ids are not fetched here; use --model)")


def resolve_data(spec, override):
    if override:
        return Path(override)
    if spec.startswith("asset:"):
        name = spec[len("asset:"):]
        tried = [c / sub for c in cache_roots()
                 for sub in (f"data/{name}/samples.jsonl", f"{name}.jsonl", f"{name}-dev.jsonl")]
        for cand in tried:
            if cand.exists():
                return cand
        raise SystemExit(f"data asset {name!r} not found; tried {[str(t) for t in tried]}")
    return Path(spec)


def label_string(v):
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)


def sort_labels(values):
    """afinar's rule (data/labels.rs): unique label strings; numeric order when every one parses
    as a finite number (ties by text), else lexicographic (byte) order."""
    uniq = sorted(set(values))
    try:
        nums = [float(u.strip()) for u in uniq]
        if all(math.isfinite(x) for x in nums):
            return [u for _, u in sorted(zip(nums, uniq))]
    except ValueError:
        pass
    return uniq


_SEG = re.compile(r"^([^\[\]]*)((?:\[-?\d+\])*)$")


def parse_path(path):
    """`input[-1].content` -> ["input", -1, "content"]."""
    out = []
    for seg in path.split("."):
        m = _SEG.match(seg)
        if not m or (not m.group(1) and not m.group(2)):
            raise SystemExit(f"bad field path {path!r} at segment {seg!r}")
        if m.group(1):
            out.append(m.group(1))
        out.extend(int(x) for x in re.findall(r"\[(-?\d+)\]", m.group(2)))
    return out


def get_field(row, path, parsed, lineno):
    cur = row
    for p in parsed:
        try:
            cur = cur[p]
        except (KeyError, IndexError, TypeError):
            raise SystemExit(f"row {lineno}: field path {path!r} fails at {p!r}") from None
    return cur


def load_rows(path, limit):
    rows = []
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(row)
                if limit and len(rows) >= limit:
                    break
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())[: limit or None]
    else:
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                    if limit and len(rows) >= limit:
                        break
    return rows


# ---------------------------------------------------------------------------------------------
# batching


def collate(enc, idx):
    """Right-pad to the longest row of the batch with id 0."""
    t = max(len(enc[i]) for i in idx)
    ids = torch.zeros(len(idx), t, dtype=torch.long)
    mask = torch.zeros(len(idx), t, dtype=torch.long)
    for r, i in enumerate(idx):
        ids[r, : len(enc[i])] = torch.tensor(enc[i])
        mask[r, : len(enc[i])] = 1
    return ids, mask, torch.zeros_like(ids)


def evaluate(model, enc, labels, idx, batch_size, regression, num_labels):
    """Accuracy + macro-F1 (or MSE). Rows go by length so padding stays small."""
    if not idx:
        return {}
    was_training = model.training
    model.eval()
    order = sorted(idx, key=lambda i: len(enc[i]))
    preds, golds = [], []
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            b = order[s: s + batch_size]
            ids, mask, types = collate(enc, b)
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            preds.extend(logits.squeeze(-1).tolist() if regression else logits.argmax(-1).tolist())
            golds.extend(labels[i] for i in b)
    model.train(was_training)
    if regression:
        return {"mse": sum((p - g) ** 2 for p, g in zip(preds, golds)) / len(golds)}
    acc = sum(p == g for p, g in zip(preds, golds)) / len(golds)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / num_labels}


# ---------------------------------------------------------------------------------------------


def trainable_by_preset(name, preset, n_layers, last_layers):
    head = name.startswith(("classifier.", "bert.pooler."))
    if preset == "full":
        return True
    if preset == "head_only":
        return head
    if preset == "last_layers":
        m = re.match(r"bert\.encoder\.layer\.(\d+)\.", name)
        return head or (m is not None and int(m.group(1)) >= n_layers - last_layers)
    raise SystemExit(f"freeze.preset {preset!r}: expected full | head_only | last_layers")


def no_decay(name):
    return name.endswith(".bias") or "LayerNorm" in name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--data")
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="keep the first N rows of the file")
    ap.add_argument("--out", required=True)
    ap.add_argument("--log-every", type=int, default=20)
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    mcfg, task, dcfg = cfg.get("model", {}), cfg.get("task", {}), cfg["data"]
    fcfg, tcfg, seeds = cfg.get("freeze", {}), cfg.get("train", {}), cfg.get("seeds", {})
    regression = task.get("type", "classification") == "regression"
    if task.get("pooling", "cls") != "cls":
        raise SystemExit("task.pooling: only \"cls\" has a transformers class (BertPooler)")

    model_dir = resolve_model(mcfg, args.model)
    data_path = resolve_data(dcfg["train"], args.data)
    max_length = int(mcfg.get("max_length", 512))
    log(f"model {model_dir}\ndata {data_path}\nthreads {args.threads}")

    # --- data ---
    rows = load_rows(data_path, args.limit)
    tp, lp = parse_path(dcfg["text"]), parse_path(dcfg["label"])
    texts = [str(get_field(r, dcfg["text"], tp, i + 1)) for i, r in enumerate(rows)]
    raw_labels = [get_field(r, dcfg["label"], lp, i + 1) for i, r in enumerate(rows)]
    ratios = dcfg.get("split", [0.8, 0.1, 0.1])
    tr_idx, va_idx, te_idx = split_indices(len(rows), int(dcfg.get("split_seed", 0)), ratios)
    if regression:
        labels = [float(x) for x in raw_labels]
        label_names, num_labels = None, 1
    else:
        str_labels = [label_string(x) for x in raw_labels]
        label_names = sort_labels(str_labels[i] for i in tr_idx)
        lmap = {v: k for k, v in enumerate(label_names)}
        unknown = {str_labels[i] for i in va_idx + te_idx} - lmap.keys()
        if unknown:
            raise SystemExit(f"labels {sorted(unknown)} appear in val/test but not in train")
        labels = [lmap[x] for x in str_labels]
        num_labels = len(label_names)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    enc = [e.ids for e in tok.encode_batch(texts)]
    log(f"rows {len(rows)}: train {len(tr_idx)} val {len(va_idx)} test {len(te_idx)}; "
        f"labels {label_names}; mean tokens {sum(map(len, enc)) / len(enc):.1f}")

    # --- model ---
    torch.manual_seed(int(seeds.get("init", 0)))
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=num_labels, classifier_dropout=float(task.get("dropout", 0.1)),
        problem_type="regression" if regression else "single_label_classification",
        attn_implementation="eager")
    n_layers = model.config.num_hidden_layers
    preset = fcfg.get("preset", "full")
    for n, p in model.named_parameters():
        p.requires_grad_(trainable_by_preset(n, preset, n_layers, int(fcfg.get("last_layers", 0))))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    n_tr = sum(p.numel() for _, p in params)
    log(f"trainable params: {n_tr:,} || all params: {n_all:,} || trainable%: {100 * n_tr / n_all:.4f}")

    # --- optimiser, schedule ---
    epochs, bs = int(tcfg.get("epochs", 1)), int(tcfg.get("batch_size", 32))
    accum = int(tcfg.get("grad_accum", 1))
    lr, wd = float(tcfg.get("lr", 5e-5)), float(tcfg.get("weight_decay", 0.0))
    max_norm = float(tcfg.get("max_grad_norm", 0.0) or 0.0)
    eval_every = int(tcfg.get("eval_every", 0) or 0)
    es = tcfg.get("early_stopping") or {}
    es_metric = "mse" if regression else {"f1": "macro_f1"}.get(es.get("metric", "accuracy"),
                                                                 es.get("metric", "accuracy"))
    patience = int(es.get("patience", 0) or 0)
    n_batches = math.ceil(len(tr_idx) / bs)
    steps_per_epoch = math.ceil(n_batches / accum)
    total_steps = epochs * steps_per_epoch
    warmup = math.ceil(float(tcfg.get("warmup_ratio", 0.0)) * total_steps)
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params if not no_decay(n)], "weight_decay": wd},
         {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = tcfg.get("schedule", "linear")
    if schedule == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total_steps)
    elif schedule == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total_steps)
    elif schedule == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    else:
        raise SystemExit(f"train.schedule {schedule!r}: expected linear | cosine | constant")
    log(f"epochs {epochs} batch {bs} accum {accum} steps {total_steps} warmup {warmup} "
        f"lr {lr} wd {wd} schedule {schedule} clip {max_norm}")

    # --- loop ---
    gen = torch.Generator().manual_seed(int(seeds.get("data", 0)))
    torch.manual_seed(int(seeds.get("dropout", 0)))
    ebs = bs * 2
    history, best, best_step, best_state, bad_evals = [], None, 0, None, 0
    better = (lambda a, b: a < b) if es_metric == "mse" else (lambda a, b: a > b)
    step, train_s, stopped_early = 0, 0.0, False
    loss_window = []
    model.train()

    def do_eval():
        nonlocal best, best_step, best_state, bad_evals
        t0 = time.time()
        m = evaluate(model, enc, labels, va_idx, ebs, regression, num_labels)
        m["step"] = step
        m["eval_s"] = round(time.time() - t0, 2)
        history.append(m)
        if best is None or better(m[es_metric], best):
            best, best_step, bad_evals = m[es_metric], step, 0
            best_state = {n: p.detach().clone() for n, p in params}
        else:
            bad_evals += 1
        log(f"eval step {step}: {json.dumps({k: round(v, 4) for k, v in m.items()})}")

    t_loop = time.time()
    for epoch in range(epochs):
        perm = torch.randperm(len(tr_idx), generator=gen).tolist()
        batches = [[tr_idx[j] for j in perm[s: s + bs]] for s in range(0, len(perm), bs)]
        for g0 in range(0, len(batches), accum):
            group = batches[g0: g0 + accum]
            t0 = time.time()
            step_loss = 0.0
            for b in group:
                ids, mask, types = collate(enc, b)
                lab = torch.tensor([labels[i] for i in b],
                                   dtype=torch.float32 if regression else torch.long)
                loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                             labels=lab).loss / len(group)
                loss.backward()
                step_loss += loss.item()
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], max_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            train_s += time.time() - t0
            loss_window.append(step_loss)
            if step % args.log_every == 0 or step == 1:
                log(f"epoch {epoch} step {step}/{total_steps} loss "
                    f"{sum(loss_window) / len(loss_window):.4f} lr {sched.get_last_lr()[0]:.3e} "
                    f"{train_s / step:.2f}s/step elapsed {time.time() - t_loop:.0f}s")
                loss_window = []
            if eval_every and step % eval_every == 0:
                do_eval()
                if patience and bad_evals >= patience:
                    stopped_early = True
                    break
        if stopped_early:
            log(f"early stopping at step {step} ({patience} evaluations without improvement)")
            break
    if not history or history[-1]["step"] != step:
        do_eval()
    final_val = history[-1]

    t0 = time.time()
    test_final = evaluate(model, enc, labels, te_idx, ebs, regression, num_labels)
    with torch.no_grad():
        for n, p in params:
            p.copy_(best_state[n])
    test_best = evaluate(model, enc, labels, te_idx, ebs, regression, num_labels)
    test_s = time.time() - t0
    wall = time.time() - t_start

    key = "mse" if regression else "accuracy"
    results = {
        "impl": "pytorch+transformers",
        "config": args.config,
        "model": str(model_dir), "data": str(data_path), "limit": args.limit or None,
        "rows": len(rows), "train_rows": len(tr_idx), "val_rows": len(va_idx),
        "test_rows": len(te_idx), "labels": label_names,
        f"test_{key}": test_final.get(key),
        "test_macro_f1": test_final.get("macro_f1"),
        f"best_val_{key}": (min if regression else max)(h[key] for h in history),
        "best_by": es_metric, "best_step": best_step,
        f"best_test_{key}": test_best.get(key),
        "best_test_macro_f1": test_best.get("macro_f1"),
        f"final_val_{key}": final_val.get(key), "final_val_macro_f1": final_val.get("macro_f1"),
        "steps": step, "total_steps_planned": total_steps, "stopped_early": stopped_early,
        "warmup_steps": warmup,
        "wall_s": round(wall, 1), "train_s": round(train_s, 1),
        "eval_s": round(sum(h["eval_s"] for h in history) + test_s, 1),
        "s_per_step": round(train_s / max(step, 1), 3),
        "threads": args.threads,
        "trainable_params": n_tr, "all_params": n_all,
        "val_history": history,
        "train": tcfg, "freeze": fcfg, "seeds": seeds, "task": task,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.rename(out)
    log(json.dumps({k: results[k] for k in ("train_rows", "steps", f"test_{key}",
                                             f"best_val_{key}", f"best_test_{key}", "wall_s")}))


if __name__ == "__main__":
    main()
