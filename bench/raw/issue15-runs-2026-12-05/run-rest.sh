#!/bin/bash
# After run 1 (ppo-em) finished: the PPO bench on a quiet CPU, then the other measured runs.
cd /work/main
B=/work/bin/afinar-ppo1
R=/work/runs15
while pgrep -f "afinar-ppo1 train configs/smollm2-evals-ppo.toml --out /work/runs15/ppo-em" > /dev/null; do sleep 5; done
echo "ppo-em ended $(date)" >> $R/done.txt
. .venv/bin/activate
python bench/ppo.py --rounds 2 --steps 3 --raw bench/raw/ppo-2026-12-05.json > $R/bench-ppo.md 2> $R/bench-ppo.log; echo "bench rc=$? $(date)" >> $R/done.txt
deactivate
$B train configs/smollm2-evals-ppo.toml --out $R/ppo-rm --set ppo.reward=model --set ppo.reward_model=/work/runs14/rm-lora-evals > $R/ppo-rm.log 2>&1; echo "ppo-rm rc=$? $(date)" >> $R/done.txt
$B train $R/ppo-after-sft.toml --out $R/ppo-em-after-sft > $R/ppo-em-after-sft.log 2>&1; echo "ppo-em-after-sft rc=$? $(date)" >> $R/done.txt
