#!/usr/bin/env bash
# On the GPU machine, after `source benchmarks/gpu_env.sh` (model + corpora staged):
#   bash benchmarks/vq_protocol.sh
# Full protocol (128 calibration windows, 64 eval windows) for the vector-quantization recipes next
# to the best scalar 2-bit recipe and FP. Prints the table (recipe, bits/weight, sotu-modern, moby,
# [EXTRA], quant seconds); JSON lines in $OUT/vq.jsonl. EXTRA=path/to/shakespeare.txt (or a folder
# of .txt) adds a third corpus. RECIPES=comma list narrows the run (names in benchmarks/vq_protocol.py).
set -uo pipefail
OUT=${OUT:-benchmarks/results/vq}; mkdir -p "$OUT"
ARGS=(--device cuda --out "$OUT/vq.jsonl")
[ -n "${RECIPES:-}" ] && ARGS+=(--recipes "$RECIPES")
[ -n "${EXTRA:-}" ] && ARGS+=(--extra "$EXTRA")
timeout ${VTIME:-570} python3 benchmarks/vq_protocol.py "${ARGS[@]}" 2> "$OUT/vq.err" | tee "$OUT/vq.txt"
tail -3 "$OUT/vq.err"
