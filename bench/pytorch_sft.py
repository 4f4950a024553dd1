"""PyTorch + PEFT side of bench/sft.py: one LoRA SFT step of a decoder LM
(LoRA r=8 on q_proj/v_proj, batch B x seq T, loss on every token, f32, SDPA
attention), the same ids as crates/afinar/examples/sft_step.rs; the step computes the global grad
norm (as afinar's does) and runs AdamW(fused=True), PyTorch's fastest path. Prints one JSON line;
base_rss_mb is the RSS once torch, transformers and PEFT are imported, before the model loads.

On a GPU: --device cuda --dtype bf16 loads the model in bf16 (PEFT keeps the
LoRA weights in f32) and runs the step under torch.autocast(bfloat16), which
is what TRL's SFTTrainer does with bf16=True.
"""

import argparse
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def rss_mb():
    """The resident set now (VmRSS), MB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--profile", action="store_true", help="print the GPU kernel times of one more step")
    a = ap.parse_args()
    base_rss = rss_mb()
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=True)
    vocab = model.config.vocab_size
    x, ids = 12345, []
    for _ in range(a.batch * a.seq):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        ids.append((x >> 33) % vocab)
    ids = torch.tensor(ids).reshape(a.batch, a.seq).to(a.device)
    cuda = a.device.startswith("cuda")
    times = []
    for s in range(a.steps + 1):
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in trainable])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if s == 0:
            print(f"first step (warm-up) {time.perf_counter() - t0:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
        if s >= 1:
            times.append(time.perf_counter() - t0)
    if a.profile and cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        ev = prof.key_averages()
        total = sum(e.self_device_time_total for e in ev) / 1e3
        print(f"PyTorch one step: GPU kernel time {total:.1f} ms", file=sys.stderr)
        print(ev.table(sort_by="self_device_time_total", row_limit=15), file=sys.stderr)
    med = sorted(times)[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "pytorch", "median_s": med, "steps": times,
                      "tokens_per_s": a.batch * a.seq / med, "peak_rss_mb": rss, "base_rss_mb": base_rss,
                      "threads": a.threads, "batch": a.batch, "seq": a.seq, "device": a.device,
                      "dtype": a.dtype,
                      "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
                      "gpu_used_mb_at_end": gpu_used_mb() if cuda else 0.0}))


def gpu_used_mb():
    """Device memory in use now (nvidia-smi), as sft_step.rs reports it."""
    import subprocess
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.strip()
    return float(out.splitlines()[0]) if out else 0.0


if __name__ == "__main__":
    main()
