#!/usr/bin/env bash
# The GPU runs the open issues still wait for, in one call of at most DEADLINE seconds (default 540), most
# needed first. Run from the repository root on the GPU machine, carrying .carry/peers (the ParoQuant and
# AutoAWQ wheels: benchmarks/peers/export_loaders_gpu.sh says how to fetch them) and nothing else: with
# .carry/a the call passes the 64 MiB limit. No model is needed.
#
#     DEADLINE=540 bash benchmarks/gpu_pending.sh            # outputs under $OUT
#
# 1. on an H200 (> 100 GB): the 405 B block, `scale_7b.py --part shapes --shapes 405b --gpu-memory 130` (19).
# 2. the ParoQuant exports read by the reference package's own loader (export_loaders_gpu.sh, issue 17).
# 3. with the time left: three blocks of the 24 B shape (`--shapes 24b:3`, issue 19).
# Done on the H100 (2026-12-08 00:45): steps 2 and 3 (BENCHMARKS.md), and `LOWBIT_HALF_GRAM=0|1 python -m lowbit
# quantize smollm2 --recipe qep-gptq-w4-g128 --device cuda --dtype bf16`. Only step 1 still waits (an H200).
# Still separate (need the model staged, benchmarks/gpu_env.sh): `RECIPES=vq-km-d8-k8-bft2-e2e256-g256-emb2e-5,
# budget1.1-km6-km8-e8p-ft-e2e256-g256,vq-km-d8-k8-bft2-e2e1024-g512 bash benchmarks/vq_protocol.sh` (issue 20's
# 1-bit follow-ups; one recipe per call: the first ran past 290 s on the H100 on 2026-12-08 and was cut).
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-$PWD/out/pending}
mkdir -p "$OUT"
left() { echo $((DEADLINE - (SECONDS - T0) - 5)); }
export PYTHONPATH=$PWD/src:$PWD/tests/kernels${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
# step 1's limit: what is left but 120 s for step 2; never 0 or less (`timeout 0` would not limit it at all)
t2=$(($(left) - 120))
if [ "$t2" -lt 60 ]; then
  echo "step 1 skipped: ${t2} s left for it (raise DEADLINE)"
elif [ "$mem" -gt 100000 ]; then
  mkdir -p "$OUT/s405"
  OUT=$OUT/s405 timeout "$t2" python benchmarks/scale_7b.py --part shapes --shapes 405b --gpu-memory 130 \
    > "$OUT/shapes-405b.log" 2>&1
  echo "405b rc $? at $((SECONDS - T0)) s"; tail -2 "$OUT/shapes-405b.log"
else
  echo "step 1 skipped: the 405 B block needs an H200 (this GPU has ${mem} MiB)"
fi
if [ "$(left)" -gt 40 ]; then
  OUT=$OUT/paro MAKE=1 timeout "$(left)" bash benchmarks/peers/export_loaders_gpu.sh > "$OUT/paro-ref.log" 2>&1
  echo "paro rc $? at $((SECONDS - T0)) s"; tail -8 "$OUT/paro-ref.log"
fi
if [ "$(left)" -gt 90 ]; then
  mkdir -p "$OUT/s24"
  OUT=$OUT/s24 timeout "$(left)" python benchmarks/scale_7b.py --part shapes --shapes 24b:3 > "$OUT/shapes-24b.log" 2>&1
  echo "24b rc $? at $((SECONDS - T0)) s"; tail -2 "$OUT/shapes-24b.log"
fi
