set -x
/work/before/afinar train /work/main/configs/minilm-sarcasm-full.toml --set train.max_steps=40 --set train.eval_every=20 --out /work/cmp/before > before.log 2>&1
/work/runs-bin/afinar-767fc997 train /work/main/configs/minilm-sarcasm-full.toml --set train.max_steps=40 --set train.eval_every=20 --out /work/cmp/after > after.log 2>&1
echo done > done
