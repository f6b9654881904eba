#!/usr/bin/env bash
# Global-rotation benchmarks on the GPU machine (see benchmarks/gpu_env.sh for how the model gets there).
#   bash benchmarks/gpu_rotations.sh table   GPTQ / Hadamard+GPTQ / learned(100 steps)+GPTQ, each without and
#                                            with QEP, at W4 g64, W3 g64, W2 g64, W4 per channel (weight only),
#                                            and W4A8 / W4A4 (g64, per-token asymmetric activations)
#   bash benchmarks/gpu_rotations.sh kernel  FWHT kernel tests on the GPU
# Results: $OUT/*.json (bench.json of each run), $OUT/outliers.*; copy to benchmarks/results/rotations/ by hand.
set -uo pipefail
source benchmarks/gpu_env.sh
mode=${1:-table}
B="python3 -m lowbit bench smollm2 --device cuda --quiet"
run() {  # name, extra args...
  local name=$1; shift
  $B --out-dir /tmp/rot/$name "$@" > /tmp/rot-$name.log 2>&1
  cp /tmp/rot/$name/bench.json $OUT/$name.json 2>/dev/null
  echo "== $name"; tail -12 /tmp/rot-$name.log
}
set6() {  # the six recipes of one weight / activation setting, e.g. set6 w4 g64
  local w=$1 g=$2
  echo "gptq-$w-$g,had-gptq-$w-$g,spin100-gptq-$w-$g,qep-gptq-$w-$g,had-qep-gptq-$w-$g,spin100-qep-gptq-$w-$g"
}
mkdir -p /tmp/rot
if [ "$mode" = table ]; then
  run w4g64 --recipes "$(set6 w4 g64)" &
  run w3g64 --no-fp --recipes "$(set6 w3 g64)" &
  run w2g64 --no-fp --recipes "$(set6 w2 g64)" &
  wait
  run w4pc --no-fp --recipes "$(set6 w4 pc)" &
  run w4a8 --no-fp --recipes "$(set6 w4a8 g64)" &
  run w4a4 --no-fp --recipes "$(set6 w4a4 g64)" &
  wait
  python3 -m lowbit analyze outliers smollm2 --n-calib 8 --seq-len 512 --out-dir $OUT --quiet
else
  python3 -m pytest -q tests/kernels/test_fwht.py tests/test_rotation.py
fi
