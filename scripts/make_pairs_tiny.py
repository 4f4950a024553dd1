"""tests/fixtures/pairs-tiny/: preference pairs from tests/fixtures/sft-tiny for
the reward / DPO tests on the tiny random checkpoints. chat.jsonl: the SFT
chat as prompt, chosen = the ideal answer, rejected = a wrong one (the
string not reversed, or with a letter dropped when that is the answer too).
text.jsonl: the same pairs in TRL's standard (string) format.

    python3 scripts/make_pairs_tiny.py
"""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"
rows = [json.loads(l) for l in open(root / "sft-tiny" / "train.jsonl")]
out = root / "pairs-tiny"
out.mkdir(exist_ok=True)
with open(out / "chat.jsonl", "w") as chat, open(out / "text.jsonl", "w") as text:
    for r in rows:
        msgs = r["input"]
        ideal = r["ideal"] if isinstance(r["ideal"], str) else r["ideal"][0]
        user = msgs[-1]["content"]
        wrong = user if user != ideal else ideal[:-1]
        chat.write(json.dumps({
            "prompt": msgs,
            "chosen": [{"role": "assistant", "content": ideal}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }) + "\n")
        text.write(json.dumps({
            "prompt": f"{msgs[0]['content']} {user} ->",
            "chosen": f" {ideal}",
            "rejected": f" {wrong}",
        }) + "\n")
