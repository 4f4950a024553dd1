set -x
/work/before/afinar train /work/main/configs/minilm-sarcasm-full.toml --set train.max_steps=40 --set train.eval_every=20 --out /work/cmp/before > before.log 2>&1
/work/runs-bin/afinar-767fc997 train /work/main/configs/minilm-sarcasm-full.toml --set train.max_steps=40 --set train.eval_every=20 --out /work/cmp/after > after.log 2>&1
echo done > done
# LoRA (lora_dropout 0.1), before vs the final code, 20 steps:
#   BIN train configs/minilm-sarcasm-lora.toml --set train.max_steps=20 --set train.eval_every=10 --out lb|la
