#!/usr/bin/env bash
# The E8P decode kernel on the GPU machine, in one call of at most DEADLINE seconds (default 560): its tests
# for real, then kernel and end-to-end timings next to the E8-ball kernel, scalar W2 and bf16. No model needed.
#
#     DEADLINE=560 bash benchmarks/gpu_e8p.sh            # outputs under $OUT
#
# 1. tests/kernels/test_vq_linear.py -k gpu: the E8P and E8 GEMV / dequant paths against float64 on the 8B
#    shapes, the dispatcher inside a CUDA graph.
# 2. benchmarks/kernel_vq.py --quick --sections validate,decode: us per call, weights cycled past L2.
# 3. benchmarks/decode_e2e.py --variants bf16,w2,vq-e8,vq-e8p --batches 1 --profile: tokens/s of the 8B shape.
# 4. with the time left: the E8P GEMV tiles swept on the 8B shapes (kernel_vq.py --sections sweep).
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-$PWD/out/e8p}
mkdir -p "$OUT"
left() { echo $((DEADLINE - (SECONDS - T0) - 5)); }
export PYTHONPATH=$PWD/src:$PWD/tests/kernels${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_vq_linear.py -k gpu -rA \
  > "$OUT/pytest-vq-gpu.txt" 2>&1
echo "vq gpu tests rc $? at $((SECONDS - T0)) s"; tail -4 "$OUT/pytest-vq-gpu.txt"
t=$(( $(left) / 2 ))
timeout "$t" python benchmarks/kernel_vq.py --quick --sections validate,decode --out "$OUT/kernel-vq.json" \
  > "$OUT/kernel-vq.log" 2>&1
echo "kernel_vq rc $? at $((SECONDS - T0)) s"; grep -E "^validate|^\| " "$OUT/kernel-vq.log" | tail -24
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" python benchmarks/decode_e2e.py --variants bf16,w2,vq-e8,vq-e8p --batches 1 --profile \
    --out "$OUT/e2e-e8p.json" > "$OUT/e2e-e8p.log" 2>&1
  echo "e2e rc $? at $((SECONDS - T0)) s"; grep -E "^\| " "$OUT/e2e-e8p.log" | head -8
fi
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" python benchmarks/kernel_vq.py --quick --sections sweep --out "$OUT/kernel-e8p-sweep.json" \
    > "$OUT/kernel-e8p-sweep.log" 2>&1
  echo "sweep rc $? at $((SECONDS - T0)) s"; grep -E "^sweep" "$OUT/kernel-e8p-sweep.log"
fi
