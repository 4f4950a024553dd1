"""PyTorch + PEFT side of bench/sft.py: one LoRA SFT step of a decoder LM
(LoRA r=8 on q_proj/v_proj, batch B x seq T, loss on every token, f32, SDPA
attention), the same ids as crates/afinar/examples/sft_step.rs. Prints one JSON line.
"""

import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    x, ids = 12345, []
    for _ in range(a.batch * a.seq):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        ids.append((x >> 33) % vocab)
    ids = torch.tensor(ids).reshape(a.batch, a.seq)
    times = []
    for s in range(a.steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= 1:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "pytorch", "median_s": med, "steps": times,
                      "tokens_per_s": a.batch * a.seq / med, "peak_rss_mb": rss,
                      "threads": a.threads, "batch": a.batch, "seq": a.seq}))


if __name__ == "__main__":
    main()
