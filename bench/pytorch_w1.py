"""Workload W1, PyTorch side: a MiniLM-L6 (all-MiniLM-L6-v2) classifier training step on CPU.

BertForSequenceClassification(num_labels=2) with the real all-MiniLM-L6-v2 weights from the folder
`afinar fetch all-minilm-l6-v2` prints (--model, required: bench/w1.py passes the same folder to both
sides; random weights from its config.json with --random), f32, batch 16 x seq 128 of
random token ids (torch.Generator seeded 0, ids in [1000, vocab)), every position attended,
token_type_ids 0, attention "eager" by default (--attn sdpa to compare).
One step:
  full   forward + backward + the global grad norm + AdamW step (fused=True, PyTorch's fastest CPU
         path; lr 5e-5, wd 0.01 except biases/LayerNorm), all weights
  last2  the same with everything frozen except encoder layers 4, 5 + pooler + classifier
  infer  forward only, eval mode, under torch.no_grad()
  lora   PEFT LoRA r=8, alpha 16, dropout 0.1 on query, value (+ the classifier, PEFT's SEQ_CLS default)
full/last2 run in train mode (dropout 0.1 as in config.json). 2 warm-up steps, then --steps timed
steps. Prints ONE JSON line:
  {"impl":"pytorch","mode":...,"median_s":...,"steps":[...],"peak_rss_mb":...,"base_rss_mb":...,...}
peak_rss_mb = resource.getrusage(RUSAGE_SELF).ru_maxrss / 1024 (whole process, incl. loading);
base_rss_mb = the RSS once torch, transformers and PEFT are imported, before the model loads (the
runtime's own cost, which bench/w1.py subtracts for the net figure).

Command (from the repository root):
    . .venv/bin/activate && python bench/pytorch_w1.py --mode full|last2|infer --steps N --threads 2
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification



def rss_mb():
    """The resident set now (VmRSS), MB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["full", "last2", "infer", "lora", "full-ckpt", "lora-ckpt"],
                    default="full")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--model", required=True, help="the all-minilm-l6-v2 folder (`afinar fetch all-minilm-l6-v2`)")
    ap.add_argument("--random", action="store_true", help="random weights from config.json")
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = ap.parse_args()
    ckpt = args.mode.endswith("-ckpt")
    args.mode = args.mode.removesuffix("-ckpt")

    import peft  # noqa: F401  (imported before the baseline RSS in every mode)
    base_rss = rss_mb()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    if args.random:
        cfg = BertConfig.from_pretrained(args.model, num_labels=2)
        cfg._attn_implementation = args.attn
        model = BertForSequenceClassification(cfg)
    else:
        model = BertForSequenceClassification.from_pretrained(
            args.model, num_labels=2, attn_implementation=args.attn)
    cfg = model.config

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    types = torch.zeros_like(ids)
    labels = torch.randint(0, 2, (args.batch,), generator=g)

    if args.mode == "last2":
        keep = ("bert.encoder.layer.4.", "bert.encoder.layer.5.", "bert.pooler.", "classifier.")
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(keep))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "value"]))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = None
    if args.mode != "infer":
        nd = lambda n: n.endswith(".bias") or "LayerNorm" in n  # noqa: E731
        opt = torch.optim.AdamW([{"params": [p for n, p in params if not nd(n)], "weight_decay": 0.01},
                                 {"params": [p for n, p in params if nd(n)], "weight_decay": 0.0}],
                                lr=5e-5, betas=(0.9, 0.999), eps=1e-8, fused=True)
        model.train()
    else:
        model.eval()

    def step():
        if opt is None:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            return
        loss = model(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
        loss.backward()
        # The global gradient norm (afinar's step computes it too: clipping and logging need it).
        torch.nn.utils.get_total_norm([p.grad for _, p in params if p.grad is not None])
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "impl": "pytorch", "mode": args.mode + ("-ckpt" if ckpt else ""), "median_s": round(statistics.median(times), 4),
        "steps": [round(t, 4) for t in times],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "base_rss_mb": round(base_rss, 1), "optimizer": "AdamW(fused=True)" if opt else None,
        "threads": args.threads, "batch": args.batch, "seq": args.seq, "attn": args.attn,
        "weights": "random" if args.random else "real",
        "trainable_params": sum(p.numel() for _, p in params),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
