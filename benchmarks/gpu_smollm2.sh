#!/usr/bin/env bash
# On the GPU machine (after `source benchmarks/gpu_env.sh`): the real SmolLM2 through the packed path.
# Quantizes with RECIPE (default best) on CUDA, then the protocol PPL of the packed checkpoint (Triton
# kernels) against its dequantized float twin (fp32 and bf16), then `lowbit speed` (batch 1/4/16, next to
# the float model). Results under $OUT (or benchmarks/results/packed).
set -uo pipefail
OUT=${OUT:-benchmarks/results/packed}; RECIPE=${RECIPE:-best}; CK=${CK:-/tmp/ck-smollm2}
mkdir -p "$OUT"
LB=(python3 -c "from lowbit.cli import app; app()")
[ -d "$CK" ] || timeout ${QTIME:-200} "${LB[@]}" quantize smollm2 --recipe "$RECIPE" --device cuda --no-eval --quiet --out "$CK" > "$OUT/smollm2-quantize.log" 2>&1
tail -3 "$OUT/smollm2-quantize.log"
timeout ${PTIME:-150} python3 - "$CK" > "$OUT/smollm2-ppl.json" 2> "$OUT/smollm2-ppl.err" <<'PY'
import json, sys, time, torch
from lowbit import checkpoint
from lowbit.jobs import Protocol, evaluate
from lowbit.kernels import quant as Q
r = {}
for name, deq, dt in (("packed-fp32", False, torch.float32), ("dequantized-fp32", True, torch.float32),
                      ("packed-bf16", False, torch.bfloat16), ("dequantized-bf16", True, torch.bfloat16)):
    m, tok = checkpoint.load(sys.argv[1], device="cuda", dtype=dt, with_tokenizer=True, dequantize=deq)
    Q.reset_path_counts()
    t0 = time.perf_counter()
    r[name] = evaluate(m, tok, Protocol(), progress=False)
    r[name + "-seconds"] = time.perf_counter() - t0
    r[name + "-paths"] = dict(Q.path_counts)
    del m
print(json.dumps(r))
PY
cat "$OUT/smollm2-ppl.json"; tail -2 "$OUT/smollm2-ppl.err"
timeout ${STIME:-150} "${LB[@]}" speed "$CK" --device cuda --out "$OUT/smollm2-speed.json" 2>&1 | tail -12
