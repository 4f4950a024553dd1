"""Reward-model and DPO losses from TRL itself: golden fixtures for afinar's preference tests.

Writes tests/fixtures/preference/<case>.safetensors and <case>.json, one case per model and loss:

  dpo-<model>-<loss>   model in llama-tiny, gpt2-tiny; loss in sigmoid, hinge, ipo (beta 0.1).
      TRL's DPOTrainer (DPOConfig: precompute_ref_log_probs=True, max_length=64, every dropout off)
      on the first 4 pairs of tests/fixtures/pairs-tiny/text.jsonl (TRL's standard format: prompt +
      completion strings, eos appended by TRL). The policy is the tiny checkpoint trained whole; the
      reference (`ref_model`) is the same checkpoint with every weight w replaced by
      w + 0.02 N(0, 1) (torch.Generator seeded 1), so the reference differs from the policy at step 0
      and every loss type has a non-trivial value and gradient. Stored: the collated batch
      (input_ids, attention_mask, completion_mask [2B, T], chosen rows first), the reference's
      log-probabilities TRL precomputed (ref_chosen_logps, ref_rejected_logps [B]), TRL's
      compute_loss value (loss), its logged metrics (rewards/*, logps/*, in the JSON), and
      grad.<name> for every parameter after loss.backward() (transformers' names).
  reward-<model>       llama-tiny-seqreg (LlamaForSequenceClassification, num_labels 1, pad id 0) and
      bert-tiny (BertForSequenceClassification num_labels 1, classifier drawn by transformers' init
      after torch.manual_seed(0) and stored as head.classifier.{weight,bias}): TRL's RewardTrainer
      compute_loss with center_rewards_coefficient 0.01 on 4 pairs. The decoder reads TRL's own
      tokenization (prompt + completion + eos, as TRL's collator pads it); the BERT cross-encoder
      reads (prompt, completion) as a text pair from its tokenizer (afinar's encoder input; TRL
      passes model inputs through unchanged). Stored: input_ids, attention_mask (token_type_ids
      for BERT) [2B, T], rewards (chosen then rejected logits), loss, grad.<name>.

Command (from the repository root; one CPU thread, deterministic):
    . .venv/bin/activate && python scripts/reference/golden_preference.py
Pinned: scripts/reference/requirements.txt (trl==1.16.0, transformers==5.23.0, torch==2.15.0).
"""

import copy
import importlib.metadata
import json
import pathlib
import tempfile
import warnings

import safetensors.torch
import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

warnings.filterwarnings("ignore")
ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures"
OUT = FIX / "preference"


def versions():
    return {p: importlib.metadata.version(p) for p in ["torch", "transformers", "trl", "datasets"]}


def pairs(n=4):
    rows = [json.loads(l) for l in open(FIX / "pairs-tiny" / "text.jsonl")]
    return rows[:n]


def lm_tokenizer(case):
    tok = PreTrainedTokenizerFast.from_pretrained(FIX / case)
    return tok


def grads(model, prefix=""):
    return {f"grad.{prefix}{n}": p.grad.detach().clone().contiguous()
            for n, p in model.named_parameters() if p.grad is not None}


def dpo_case(model_case, loss_type, tmp):
    torch.manual_seed(0)
    tok = lm_tokenizer(model_case)
    policy = AutoModelForCausalLM.from_pretrained(FIX / model_case, attn_implementation="eager")
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    rows = pairs()
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(
        output_dir=str(tmp), beta=0.1, loss_type=[loss_type], max_length=64,
        precompute_ref_log_probs=True, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        report_to=[], use_cpu=True, disable_dropout=True, logging_steps=1, bf16=False,
    )
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    dl = tr.get_train_dataloader()  # computes the reference log-probs (precompute)
    policy.train()
    examples = [tr.train_dataset[i] for i in range(len(rows))]
    batch = tr.data_collator(examples)
    policy.zero_grad()
    loss = tr.compute_loss(policy, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items() if v}
    out = {
        "input_ids": batch["input_ids"].to(torch.int64),
        "attention_mask": batch["attention_mask"].to(torch.int64),
        "completion_mask": batch["completion_mask"].to(torch.int64),
        "ref_chosen_logps": batch["ref_chosen_logps"].float(),
        "ref_rejected_logps": batch["ref_rejected_logps"].float(),
        "loss": loss.detach().reshape(1),
        **grads(policy),
    }
    del dl
    return out, {"metrics": metrics, "beta": 0.1, "loss_type": loss_type, "model": model_case,
                 "pairs": rows}


def reward_case(model_case, tmp):
    rows = pairs()
    if model_case == "bert-tiny":
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(FIX / "bert-tiny")
        model = AutoModelForSequenceClassification.from_pretrained(
            FIX / "bert-tiny", num_labels=1, attn_implementation="eager")
        texts = [(r["prompt"], r[k]) for k in ("chosen", "rejected") for r in rows]
        enc = tok([a for a, _ in texts], [b for _, b in texts], padding=True, return_tensors="pt")
        batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        extra = {"head.classifier.weight": model.classifier.weight.detach().clone(),
                 "head.classifier.bias": model.classifier.bias.detach().clone()}
    else:
        tok = lm_tokenizer("llama-tiny")
        model = AutoModelForSequenceClassification.from_pretrained(
            FIX / model_case, attn_implementation="eager")
        extra = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    # BERT's tokenizer has no eos token; TRL's own tokenization (unused for it) wants one.
    eos = "[SEP]" if model_case == "bert-tiny" else None
    args = RewardConfig(output_dir=str(tmp), center_rewards_coefficient=0.01, max_length=64,
                        per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                        eos_token=eos)
    tr = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    if model_case != "bert-tiny":
        examples = [tr.train_dataset[i] for i in range(len(rows))]
        batch = tr.data_collator(examples)
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    model.train()
    model.zero_grad()
    loss = tr.compute_loss(model, dict(batch))
    loss.backward()
    with torch.no_grad():
        rewards = model(**batch).logits.squeeze(-1)
    out = {k: v.to(torch.int64) for k, v in batch.items()}
    out |= {"rewards": rewards.float(), "loss": loss.detach().reshape(1), **grads(model), **extra}
    return out, {"model": model_case, "center_rewards_coefficient": 0.01, "pairs": rows}


def save(name, tensors, meta):
    OUT.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                                OUT / f"{name}.safetensors", metadata={"format": "pt"})
    meta = {"versions": versions(), **meta,
            "shapes": {k: list(v.shape) for k, v in tensors.items() if not k.startswith("grad.")}}
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(name, "loss", float(tensors["loss"][0]))


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    with tempfile.TemporaryDirectory() as tmp:
        for model_case in ["llama-tiny", "gpt2-tiny"]:
            for loss_type in ["sigmoid", "hinge", "ipo"]:
                t, m = dpo_case(model_case, loss_type, tmp)
                save(f"dpo-{model_case}-{loss_type}", t, m)
        for model_case in ["llama-tiny-seqreg", "bert-tiny"]:
            t, m = reward_case(model_case, tmp)
            save(f"reward-{model_case}", t, m)


if __name__ == "__main__":
    main()
