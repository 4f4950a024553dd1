"""One PPO step from TRL's last PPO trainer: the golden fixture of afinar's PPO tests.

TRL removed its PPO trainer in 2026 (PR #7020); the last release that has it is trl 1.12.0
(`trl/experimental/ppo/ppo_trainer.py`). Its update is inline in `PPOTrainer.train()`, so this
script runs the steps of that method in order on fixed rollouts, with TRL's own helpers
(`forward`, `PolicyAndValueWrapper`, `masked_mean`, `masked_whiten`, `selective_log_softmax`,
`first_true_indices`):

  - policy: tests/fixtures/llama-tiny (LlamaForCausalLM, trained whole); value model:
    tests/fixtures/llama-tiny-seqreg (LlamaForSequenceClassification, num_labels 1), wrapped as
    TRL wraps them (`PolicyAndValueWrapper`); dropout is 0 in both.
  - rollouts: 4 queries of 3..7 tokens, left-padded with the pad id 0 to 7 (TRL's layout), and
    responses of 6 tokens that fill the response length (rows 0 and 2 end with eos 2): TRL places
    the score one past the end-of-sequence token when a response is shorter than the response
    length, afinar on its last token; with full-length responses both put it on the last token.
    Old log-probabilities = the policy's own (TRL's forward, logits / (temperature + 1e-7)) plus
    uniform noise in [-0.4, 0.4]; reference log-probabilities = those plus noise in [-0.3, 0.3];
    values = the value model's plus noise in [-0.5, 0.5]; scores fixed. The noise makes some
    ratios and values leave their clip ranges.
  - steps 4-6 of train(): k1 KL penalty (kl_coef 0.05), score added at `actual_end`, GAE
    (gamma 1, lam 0.95), returns, whitened advantages; then one micro-batch (rows 2, 0, 3) of
    the PPO epoch loop: the clipped policy loss (cliprange 0.2), the clipped value loss
    (cliprange_value 0.2), loss = pg_loss + vf_coef (0.1) * vf_loss, backward.

Writes tests/fixtures/ppo/golden.safetensors (query_responses, logprobs, ref_logprobs, values,
scores, advantages, returns, and grad.<name> for every parameter: the policy's transformers
names, the value model's under `value_model.`) and golden.json (settings, loss, pg_loss,
vf_loss, clip fractions, versions).

Command (from the repository root; one CPU thread):
    .venv/bin/pip install --no-deps --target .venv/trl-1.12 trl==1.12.0
    PYTHONPATH=.venv/trl-1.12 TRL_EXPERIMENTAL_SILENCE=1 .venv/bin/python scripts/reference/golden_ppo.py
"""

import importlib.metadata
import json
import pathlib
import warnings

import safetensors.torch
import torch
import trl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl.experimental.ppo.ppo_trainer import (
    PolicyAndValueWrapper,
    first_true_indices,
    forward,
    masked_mean,
    masked_whiten,
    selective_log_softmax,
)

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "ppo"

TEMPERATURE, KL_COEF, GAMMA, LAM = 0.7, 0.05, 1.0, 0.95
CLIPRANGE, CLIPRANGE_VALUE, VF_COEF = 0.2, 0.2, 0.1
PAD, EOS = 0, 2


def main():
    assert trl.__version__ == "1.12.0", trl.__version__
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(15)
    policy = AutoModelForCausalLM.from_pretrained(FIX / "llama-tiny", dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        FIX / "llama-tiny-seqreg", dtype=torch.float32
    )
    assert value_model.config.num_labels == 1
    model = PolicyAndValueWrapper(policy, value_model)
    model.train()

    # ---- fixed rollouts: left-padded queries, full-length responses
    qlens, ctx, resp_len = [3, 7, 5, 4], 7, 6
    queries = torch.full((4, ctx), PAD, dtype=torch.long)
    for i, n in enumerate(qlens):
        queries[i, ctx - n :] = torch.randint(3, 160, (n,), generator=gen)
    responses = torch.randint(3, 160, (4, resp_len), generator=gen)
    responses[0, -1] = EOS
    responses[2, -1] = EOS
    query_responses = torch.cat([queries, responses], 1)
    with torch.no_grad():
        out, vfull = forward(model, query_responses, PAD)
        logits = out.logits[:, ctx - 1 : -1] / (TEMPERATURE + 1e-7)
        own = selective_log_softmax(logits, responses)
        # TRL reads the value as value_model.score(hidden_states[-1]) of the backbone.
        own_values = vfull[:, ctx - 1 : -1].squeeze(-1)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(4, resp_len, generator=gen)
        logprobs = own + u(-0.4, 0.4)
        ref_logprobs = logprobs + u(-0.3, 0.3)
        values = own_values + u(-0.5, 0.5)
        scores = torch.tensor([1.0, -0.5, 0.3, 2.0])

        # ---- train(): response processing, rewards, advantages (steps 3-6)
        sequence_lengths = first_true_indices(responses == PAD) - 1
        response_idxs = torch.arange(resp_len).repeat(4, 1)
        padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
        sequence_lengths_p1 = sequence_lengths + 1
        padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
        assert not padding_mask.any() and not padding_mask_p1.any()
        logr = ref_logprobs - logprobs
        kl = -logr
        non_score_reward = -KL_COEF * kl
        rewards = non_score_reward.clone()
        actual_start = torch.arange(4)
        actual_end = torch.where(sequence_lengths_p1 < resp_len, sequence_lengths_p1, sequence_lengths)
        rewards[actual_start, actual_end] += scores
        lastgaelam, advantages_reversed = 0, []
        for t in reversed(range(resp_len)):
            nextvalues = values[:, t + 1] if t < resp_len - 1 else 0.0
            delta = rewards[:, t] + GAMMA * nextvalues - values[:, t]
            lastgaelam = delta + GAMMA * LAM * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values
        advantages = masked_whiten(advantages, ~padding_mask)
        advantages = torch.masked_fill(advantages, padding_mask, 0)

    # ---- one micro-batch of the PPO epoch loop
    mb = [2, 0, 3]
    output, vpred_temp = forward(model, query_responses[mb], PAD)
    logits = output.logits[:, ctx - 1 : -1]
    logits /= TEMPERATURE + 1e-7
    new_logprobs = selective_log_softmax(logits, responses[mb])
    vpred = vpred_temp[:, ctx - 1 : -1].squeeze(-1)
    vpredclipped = torch.clamp(vpred, values[mb] - CLIPRANGE_VALUE, values[mb] + CLIPRANGE_VALUE)
    vf_losses1 = torch.square(vpred - returns[mb])
    vf_losses2 = torch.square(vpredclipped - returns[mb])
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask_p1[mb])
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1[mb])
    logprobs_diff = new_logprobs - logprobs[mb]
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages[mb] * ratio
    pg_losses2 = -advantages[mb] * torch.clamp(ratio, 1.0 - CLIPRANGE, 1.0 + CLIPRANGE)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask[mb])
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask[mb])
    loss = pg_loss + VF_COEF * vf_loss
    loss.backward()

    tensors = {
        "query_responses": query_responses,
        "logprobs": logprobs,
        "ref_logprobs": ref_logprobs,
        "values": values,
        "scores": scores,
        "advantages": advantages,
        "returns": returns,
    }
    for name, p in policy.named_parameters():
        tensors[f"grad.{name}"] = p.grad.detach().clone()
    for name, p in value_model.named_parameters():
        tensors[f"grad.value_model.{name}"] = p.grad.detach().clone()
    OUT.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "golden.safetensors")
    meta = {
        "context_length": ctx,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "temperature": TEMPERATURE,
        "kl_coef": KL_COEF,
        "gamma": GAMMA,
        "lam": LAM,
        "cliprange": CLIPRANGE,
        "cliprange_value": CLIPRANGE_VALUE,
        "vf_coef": VF_COEF,
        "micro_batch": mb,
        "loss": loss.item(),
        "pg_loss": pg_loss.item(),
        "vf_loss": vf_loss.item(),
        "pg_clipfrac": pg_clipfrac.item(),
        "vf_clipfrac": vf_clipfrac.item(),
        "versions": {p: importlib.metadata.version(p) for p in ["torch", "transformers"]} | {"trl": trl.__version__},
    }
    (OUT / "golden.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ["loss", "pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac"]}))


if __name__ == "__main__":
    main()
