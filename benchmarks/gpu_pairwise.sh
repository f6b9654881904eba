#!/usr/bin/env bash
# Pairwise rotation (issue 4) on the GPU machine (see benchmarks/gpu_env.sh for how the model gets there).
#   bash benchmarks/gpu_pairwise.sh kernel     GPU tests of the kernel / transforms / block-wise fit, then
#                                              benchmarks/kernel_pairwise.py on an idle GPU
#   RECIPES="a b ..." bash benchmarks/gpu_pairwise.sh quality
#                                              benchmarks/gpu_grid.sh run: one `lowbit bench` per recipe,
#                                              side by side (times concurrent), stopped at $DEADLINE seconds;
#                                              rows merged into $OUT/pairwise-$TAG.json
#   bash benchmarks/gpu_pairwise.sh time       pair-rtn-w3-g64 alone (the GPU quantization time)
set -uo pipefail
source benchmarks/gpu_env.sh
export OMP_NUM_THREADS=1
mode=${1:-quality}
if [ "$mode" = kernel ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/transforms tests/test_blockwise.py 2>&1 | tail -15 | tee $OUT/pytest-gpu.txt
  timeout ${KDEADLINE:-240} python3 benchmarks/kernel_pairwise.py --out $OUT/pairwise_kernel.json 2>&1 | tail -40
elif [ "$mode" = quality ] || [ "$mode" = time ]; then
  [ "$mode" = time ] && RECIPES=pair-rtn-w3-g64 && TAG=time
  RECIPES=$RECIPES TAG=pairwise-${TAG:-quality} BS=${BS:-8} bash benchmarks/gpu_grid.sh run
fi
