#!/bin/bash
# The measured PPO runs of issue 15, one after another (2 threads each).
cd /work/main
B=/work/bin/afinar-ppo1
R=/work/runs15
$B train configs/smollm2-evals-ppo.toml --out $R/ppo-em > $R/ppo-em.log 2>&1; echo "ppo-em rc=$?" >> $R/done.txt
$B train configs/smollm2-evals-ppo.toml --out $R/ppo-rm --set ppo.reward=model --set ppo.reward_model=/work/runs14/rm-lora-evals > $R/ppo-rm.log 2>&1; echo "ppo-rm rc=$?" >> $R/done.txt
$B train $R/ppo-after-sft.toml --out $R/ppo-em-after-sft > $R/ppo-em-after-sft.log 2>&1; echo "ppo-em-after-sft rc=$?" >> $R/done.txt
