#!/usr/bin/env bash
# lowbit's ParoQuant exports read by the ParoQuant reference package's own transformers loader (z-lab
# paroquant 0.1.16: its HfQuantizer, the JIT-built CUDA rotation op, AutoAWQ's GEMM), which needs CUDA.
# GPTQModel's loaders run on the CPU and are checked there (export_loaders.py check; README "Export loaders").
#
# Run from the repository root on the GPU machine (no network there):
#
#     bash benchmarks/peers/export_loaders_gpu.sh
#
# Carried (64 KB + 115 KB), made on a connected machine:
#     pip download --no-deps paroquant==0.1.16 -d .carry/peers
#     pip wheel --no-deps autoawq==0.2.9 -w .carry/peers      # the sdist is pure Python; its kernels are not needed
# On the image: torch with CUDA, transformers, accelerate, safetensors, tokenizers, nvcc and ninja (the rotation
# op is JIT-built into ~/.cache/paroquant). `datasets`, which autoawq imports at package level, is stubbed.
#
# Steps: install the two wheels with --no-deps into $SITE (nothing else there, so the image's packages win);
# `export_loaders.py make` (lowbit from src: tiny random Llamas, pairwise W4 g128, their ParoQuant exports, a
# negated-angle control, lowbit's fp32 logits; CPU, seconds) unless MAKE=0 and $OUT already holds them;
# `export_loaders.py check-reference` (fp16 on CUDA). Writes $OUT/check_reference.json; exit 1 when the export
# disagrees beyond 2e-2 relative, the control agrees, or the loader fails (its error is in the JSON).
#
# Knobs: WHEELS (.carry/peers), SITE (/tmp/paroref), OUT (./out/export-loaders), PYTHON (python3), MAKE (1).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
WHEELS=${WHEELS:-.carry/peers}
SITE=${SITE:-/tmp/paroref}
OUT=${OUT:-$PWD/out/export-loaders}
PYTHON=${PYTHON:-python3}
MAKE=${MAKE:-1}
wheels=("$WHEELS/paroquant-0.1.16-py3-none-any.whl" "$WHEELS/autoawq-0.2.9-py3-none-any.whl")
for w in "${wheels[@]}"; do
    [ -f "$w" ] || { echo "missing $w (see the header)"; exit 1; }
done
"$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" || exit 1
if [ "$MAKE" = 1 ]; then
    PYTHONPATH=src "$PYTHON" benchmarks/peers/export_loaders.py make "$OUT" || exit 1
fi
"$PYTHON" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device: the reference loader cannot run"; exit 1; }
command -v nvcc >/dev/null || echo "warning: nvcc not on PATH; the rotation op's JIT build will fail"
PYTHONPATH="src:$SITE" "$PYTHON" benchmarks/peers/export_loaders.py check-reference "$OUT"
