#!/usr/bin/env bash
# QEP benchmarks on the GPU machine (see benchmarks/gpu_env.sh for how the model gets there).
#   bash benchmarks/gpu_qep.sh table   RTN / RTN+QEP / GPTQ / GPTQ+QEP at W4 g64, W3 g64, W2 g64, W4 pc:
#                                      one `lowbit bench` per setting, the four run side by side on the
#                                      GPU (their times are concurrent); then GPTQ and GPTQ+QEP at W3 g64
#                                      alone, one after the other, for QEP's extra time
#   bash benchmarks/gpu_qep.sh sweep   alpha sweep and damping at W3 g64, QEP with the clipping search,
#                                      and `lowbit analyze propagation` (side by side)
# Results: $OUT/*.json (bench.json of each run), copied to benchmarks/results/qep/ by hand.
set -uo pipefail
source benchmarks/gpu_env.sh
mode=${1:-table}
B="python3 -m lowbit bench smollm2 --device cuda --quiet"
run() {  # name, extra args...
  local name=$1; shift
  $B --out-dir /tmp/qep/$name "$@" > /tmp/qep-$name.log 2>&1
  cp /tmp/qep/$name/bench.json $OUT/$name.json 2>/dev/null
  echo "== $name"; tail -12 /tmp/qep-$name.log
}
mkdir -p /tmp/qep
if [ "$mode" = table ]; then
  run w4g64 --recipes rtn-w4-g64,qep-rtn-w4-g64,gptq-w4-g64,qep-gptq-w4-g64 &
  run w3g64 --no-fp --recipes rtn-w3-g64,qep-rtn-w3-g64,gptq-w3-g64,qep-gptq-w3-g64 &
  run w2g64 --no-fp --recipes rtn-w2-g64,qep-rtn-w2-g64,gptq-w2-g64,qep-gptq-w2-g64 &
  run w4pc --no-fp --recipes rtn-w4-pc,qep-rtn-w4-pc,gptq-w4-pc,qep-gptq-w4-pc &
  wait
  run time-w3 --no-fp --recipes gptq-w3-g64,qep-gptq-w3-g64,rtn-w3-g64,qep-rtn-w3-g64
else
  run alpha --no-fp --recipes qep-gptq-w3-g64-a0.25-l1,qep-gptq-w3-g64-a0.5-l1,qep-gptq-w3-g64-a0.75-l1,qep-gptq-w3-g64-a1-l1 &
  run damp --no-fp --recipes qep-gptq-w3-g64-a0.5-l0.01,qep-gptq-w3-g64-a1-l0.01,qep-gptq-w3-g64-a0.5-l0.1 &
  run clip --no-fp --recipes qep-gptq-w3-g64-clip,qep-gptq-w2-g64-clip-static,qep-gptq-w4-g64-clip &
  (python3 -m lowbit analyze propagation smollm2 --recipe gptq-w3-g64 --device cuda --eval --quiet \
     --out-dir /tmp/qep/prop > /tmp/qep-prop.log 2>&1; cp /tmp/qep/prop/propagation.* $OUT/; echo "== prop"; cat /tmp/qep-prop.log) &
  wait
fi
