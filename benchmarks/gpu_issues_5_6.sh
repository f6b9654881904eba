#!/usr/bin/env bash
# The recipe grids of issues 5 (global rotations) and 6 (extreme low bit) on the GPU machine, through
# benchmarks/gpu_grid.sh (one lowbit bench per recipe, side by side; detached so that they outlive a
# device call). After `source benchmarks/gpu_env.sh`:
#   bash benchmarks/gpu_issues_5_6.sh start A|B|C      start a wave detached
#   WAIT=s bash benchmarks/gpu_issues_5_6.sh collect A|B|C
# A: issue 6 (QQA, 1-bit, budgets); B: issue 5 weight-only; C: issue 5 W4A8 / W4A4.
# Results: $OUT/grid-<wave>.json -> benchmarks/results/extreme/grid-A.json, rotations/grid-{B,C}.json.
A="qqa-w2-g64 qep-qqa-w2-g64 qep-qqa-w2-g64-clip-static onebit-svid onebit onebit-qqa qep-onebit qep-onebit-qqa qep-onebit-qqa-ft3 budget1.5-qep-gptq-w2-g64-clip-static budget2.0-qep-gptq-w2-g64-clip-static budget2.5-qep-gptq-w2-g64-clip-static"
B=""; for s in w4-g64 w3-g64 w2-g64 w4-pc; do B="$B had-gptq-$s spin100-gptq-$s had-qep-gptq-$s spin100-qep-gptq-$s"; done
B="$B had-qep-gptq-w3-g64-clip had-qep-gptq-w2-g64-clip-static"
C=""; for a in w4a8-g64 w4a4-g64; do C="$C gptq-$a had-gptq-$a spin100-gptq-$a qep-gptq-$a had-qep-gptq-$a spin100-qep-gptq-$a"; done
mode=$1 wave=$2
case $wave in A) R=$A ;; B) R=$B ;; C) R=$C ;; *) echo "wave A, B or C"; exit 2 ;; esac
RECIPES=$R TAG=grid-$wave DEADLINE=${DEADLINE:-1500} bash "$(dirname "$0")/gpu_grid.sh" "$mode"
