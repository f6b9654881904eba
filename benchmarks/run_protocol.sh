#!/usr/bin/env bash
# Regenerates the lowbit rows of BENCHMARKS.md (shared protocol, SmolLM2-135M, CPU fp32).
# Usage: bash benchmarks/run_protocol.sh [out_dir]   (about an hour on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/protocol}
.venv/bin/lowbit bench smollm2 --threads 2 --out-dir "$out" --recipes \
  rtn-w4-g64,gptq-w4-g64,best,rtn-w3-g64,gptq-w3-g64,rtn-w2-g64,gptq-w2-g64,rtn-w4-pc,gptq-w4-pc
