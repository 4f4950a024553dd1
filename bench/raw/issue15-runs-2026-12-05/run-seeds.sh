#!/bin/bash
# Second seeds of two measured runs (binary of the final commit).
cd /work/main
B=/work/bin/afinar-ppo4
R=/work/runs15
$B train $R/ppo-after-sft.toml --out $R/ppo-em-after-sft-s2 --set seeds.init=11 --set seeds.data=12 > $R/ppo-em-after-sft-s2.log 2>&1; echo "ppo-em-after-sft-s2 rc=$? $(date)" >> $R/done.txt
$B train configs/smollm2-evals-ppo.toml --out $R/ppo-em-s2 --set seeds.init=11 --set seeds.data=12 > $R/ppo-em-s2.log 2>&1; echo "ppo-em-s2 rc=$? $(date)" >> $R/done.txt
