"""TRL side of bench/dpo.py: one DPO step of TRL's DPOTrainer (1.16) with PEFT LoRA r=8 on
q_proj/v_proj, sigmoid loss, beta 0.1, f32, SDPA attention, on the batch in --batch-file (TRL's own
collator made it: bench/dpo.py). The step is TRL's compute_loss (policy forward, the reference =
the base with the adapter disabled, under no_grad) + backward + global grad norm +
AdamW(fused=True). Prints one JSON line; base_rss_mb is the RSS once torch, transformers, PEFT and
TRL are imported, before the model loads.

    python bench/pytorch_dpo.py --model DIR --batch-file B.json [--steps 3 --threads 2]
    python bench/pytorch_dpo.py --model DIR --make-batch B.json --pairs pairs.jsonl --pairs-n 4
"""

import argparse
import json
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def trainer_for(model, tok, rows, tmp):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir=tmp, beta=0.1, loss_type=["sigmoid"], max_length=1024,
                     per_device_train_batch_size=len(rows), report_to=[], use_cpu=True, bf16=False,
                     disable_dropout=True)
    return DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-file", help="the batch to time (JSON: input_ids, completion_mask rows)")
    ap.add_argument("--make-batch", help="write TRL's collated batch of the first --pairs-n pairs here")
    ap.add_argument("--pairs")
    ap.add_argument("--pairs-n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    base_rss = rss_mb()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base_rss = rss_mb()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as tmp:
        if a.make_batch:
            rows = [json.loads(l) for l in open(a.pairs)][: a.pairs_n]
            tr = trainer_for(model, tok, rows, tmp)
            b = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
            out = {"input_ids": [], "completion_mask": []}
            for ids, m, c in zip(b["input_ids"], b["attention_mask"], b["completion_mask"]):
                n = int(m.sum())
                out["input_ids"].append(ids[:n].tolist())
                out["completion_mask"].append(c[:n].tolist())
            json.dump(out, open(a.make_batch, "w"))
            return
        v = json.load(open(a.batch_file))
        n = len(v["input_ids"]) // 2
        # A trainer for its compute_loss; its dataset is not used.
        dummy = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * n
        tr = trainer_for(model, tok, dummy, tmp)
        t = max(len(r) for r in v["input_ids"])
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batch = {
            "input_ids": torch.tensor([r + [pad] * (t - len(r)) for r in v["input_ids"]]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in v["input_ids"]]),
            "completion_mask": torch.tensor([m + [0] * (t - len(m)) for m in v["completion_mask"]]),
        }
        tokens = sum(len(r) for r in v["input_ids"])
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=True)
        times = []
        for s in range(a.steps + 1):
            t0 = time.perf_counter()
            loss = tr.compute_loss(model, dict(batch))
            loss.backward()
            torch.nn.utils.get_total_norm([p.grad for p in trainable])
            opt.step()
            opt.zero_grad(set_to_none=True)
            if s == 0:
                print(f"first step (warm-up) {time.perf_counter() - t0:.3f} s, loss {loss.item():.4f}",
                      file=sys.stderr)
            else:
                times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": "trl", "median_s": med, "steps": times, "tokens_per_s": tokens / med,
                      "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss, "threads": a.threads,
                      "pairs": n, "tokens": tokens}))


if __name__ == "__main__":
    main()
