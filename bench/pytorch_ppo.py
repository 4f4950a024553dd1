"""PyTorch side of bench/ppo.py: TRL 1.12's PPO trainer (its last release with PPO), its two phases
timed on SmolLM2-135M with PEFT LoRA r=8 on q_proj/v_proj in the policy and in the value model (an
`AutoModelForSequenceClassification` of the same weights, num_labels 1), f32, SDPA attention:

  --phase rollout: TRL's `batch_generation` of --response-length tokens for the batch's prompts
      (left-padded, do_sample, temperature 0.7, top_k 0, top_p 1.0, min_new_tokens = max_new_tokens:
      every response has the full length, as afinar's side with no end-of-sequence id), then the
      reference's log-probabilities (TRL's `forward` of the policy with the adapter disabled,
      logits / temperature, `selective_log_softmax`) and the values (the value model at every
      response position), all under no_grad;
  --phase update: one optimizer step on a micro-batch of --micro rollouts (the batch's prompts and
      fixed responses): TRL's `forward` of `PolicyAndValueWrapper`, the clipped policy and value
      losses as in PPOTrainer.train(), backward, the global grad norm (clip at 1.0), AdamW(fused).

Prints one JSON line (median_s, steps, tokens, peak/base RSS). --make-batch writes the batch both
sides read: the chat-template prompt ids of the first --prompts-n rows of the evals-sft training
files, fixed response ids, and fixed old log-probabilities, values, advantages and returns.

    PYTHONPATH=.venv/trl-1.12 python bench/pytorch_ppo.py --model DIR --batch-file B.json --phase rollout
"""

import argparse
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def rss_mb(key="VmRSS:"):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def make_batch(model, data_dir, n, resp_len, out):
    import glob

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for f in sorted(glob.glob(f"{data_dir}/*.jsonl")):
        for line in open(f):
            rows.append(json.loads(line))
            if len(rows) >= n:
                break
        if len(rows) >= n:
            break
    texts = [tok.apply_chat_template(r["input"], add_generation_prompt=True, tokenize=False) for r in rows]
    queries = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    g = torch.Generator().manual_seed(0)
    specials = set(tok.all_special_ids)
    resp = torch.randint(100, tok.vocab_size, (n, resp_len), generator=g)
    assert not any(int(x) in specials for x in resp.flatten())
    b = {
        "queries": queries,
        "responses": resp.tolist(),
        "logprobs": (-2.0 + 0.1 * torch.randn(n, resp_len, generator=g)).tolist(),
        "values": (0.1 * torch.randn(n, resp_len, generator=g)).tolist(),
        "advantages": torch.randn(n, resp_len, generator=g).tolist(),
        "returns": torch.randn(n, resp_len, generator=g).tolist(),
        "pad_token_id": tok.pad_token_id,
    }
    json.dump(b, open(out, "w"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-file")
    ap.add_argument("--make-batch")
    ap.add_argument("--data", help="a folder of evals-sft JSONL files (--make-batch)")
    ap.add_argument("--prompts-n", type=int, default=16)
    ap.add_argument("--response-length", type=int, default=48)
    ap.add_argument("--phase", choices=["rollout", "update"], default="rollout")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.make_batch:
        make_batch(a.model, a.data, a.prompts_n, a.response_length, a.make_batch)
        return

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig
    from trl.experimental.ppo.ppo_trainer import (
        PolicyAndValueWrapper,
        batch_generation,
        forward,
        masked_mean,
        selective_log_softmax,
    )

    torch.set_num_threads(a.threads)
    base_rss = rss_mb()
    b = json.load(open(a.batch_file))
    pad = b["pad_token_id"]
    T = 0.7
    lora = lambda task: LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                   task_type=task)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                                                 attn_implementation="sdpa"), lora("CAUSAL_LM"))
    vm = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32,
                                                            attn_implementation="sdpa")
    vm.config.pad_token_id = pad
    value = get_peft_model(vm, lora("SEQ_CLS"))
    model = PolicyAndValueWrapper(policy, value)
    # the unwrapped value model, as TRL reads it in the rollout
    critic = value.base_model.model
    n, R = len(b["queries"]), a.response_length
    ctx = max(len(q) for q in b["queries"])
    queries = torch.full((n, ctx), pad, dtype=torch.long)
    for i, q in enumerate(b["queries"]):
        queries[i, ctx - len(q):] = torch.tensor(q)
    responses = torch.tensor(b["responses"])[:, :R]
    times, tokens = [], 0
    if a.phase == "rollout":
        gen = GenerationConfig(max_new_tokens=R, min_new_tokens=R, temperature=T + 1e-7, top_k=0, top_p=1.0,
                               do_sample=True, pad_token_id=pad)
        model.eval()
        for s in range(a.steps + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                qr, _ = batch_generation(policy, queries, n, pad, gen)
                resp = qr[:, ctx:]
                with policy.disable_adapter():
                    out = forward(policy, qr, pad)
                ref = selective_log_softmax(out.logits[:, ctx - 1:-1] / (T + 1e-7), resp)
                hv = forward(critic.model, qr, pad).hidden_states[-1]
                v = critic.score(hv)[:, ctx - 1:-1].squeeze(-1)
            dt = time.perf_counter() - t0
            tokens = int(resp.numel())
            assert ref.shape == v.shape == (n, R)
            if s > 0:
                times.append(dt)
            else:
                print(f"first rollout (warm-up) {dt:.3f} s", file=sys.stderr)
    else:
        model.train()
        m = a.micro
        # the micro-batch's own padding (as afinar's side)
        ctx = max(len(q) for q in b["queries"][:m])
        queries = torch.full((m, ctx), pad, dtype=torch.long)
        for i, q in enumerate(b["queries"][:m]):
            queries[i, ctx - len(q):] = torch.tensor(q)
        qr = torch.cat([queries, responses[:m]], 1)
        f = lambda k: torch.tensor(b[k])[:m, :R]
        old, v_old, adv, ret = f("logprobs"), f("values"), f("advantages"), f("returns")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        mask = torch.ones(m, R, dtype=torch.bool)
        for s in range(a.steps + 1):
            t0 = time.perf_counter()
            output, vpred_temp = forward(model, qr, pad)
            logits = output.logits[:, ctx - 1:-1] / (T + 1e-7)
            new = selective_log_softmax(logits, responses[:m])
            vpred = vpred_temp[:, ctx - 1:-1].squeeze(-1)
            vclip = torch.clamp(vpred, v_old - 0.2, v_old + 0.2)
            vf = 0.5 * masked_mean(torch.max((vpred - ret) ** 2, (vclip - ret) ** 2), mask)
            ratio = torch.exp(new - old)
            pg = masked_mean(torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)), mask)
            loss = pg + 0.1 * vf
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            dt = time.perf_counter() - t0
            tokens = int(qr.numel())
            if s > 0:
                times.append(dt)
            else:
                print(f"first update (warm-up) {dt:.3f} s, loss {loss.item():.4f}", file=sys.stderr)
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": "trl", "phase": a.phase, "median_s": med, "steps": times, "tokens": tokens,
                      "tokens_per_s": tokens / med, "peak_rss_mb": rss_mb("VmHWM:"), "base_rss_mb": base_rss,
                      "threads": a.threads}))


if __name__ == "__main__":
    main()
