#!/usr/bin/env bash
# Download the wheels of gpu-wheels.txt into .carry/peers (gitignored) for the GPU machine, which
# has no package registry. Binary wheels (pydantic-core; multiprocess is per Python version) are
# fetched for CPython 3.12 (the GPU image's python3) and 3.11 (this machine, for the local
# carried-install check; onecomp declares Requires-Python >=3.12, hence --ignore-requires-python
# there). Run from anywhere; needs PyPI.
#
#     bash benchmarks/peers/fetch_gpu_wheels.sh              # gpu-wheels.txt + paroquant + autoawq
#     bash benchmarks/peers/fetch_gpu_wheels.sh paroquant    # only paroquant (for paroquant_gpu.sh)
#
# paroquant 0.1.16 (the ParoQuant reference, for paroquant_gpu.sh) is one pure-Python wheel of 64 KB,
# fetched with --no-deps: its optimisation path needs only torch, transformers and tqdm, which the
# GPU image has (`datasets`, imported but unused there, is stubbed by paroquant_peer.py; the CUDA
# rotation kernel is JIT-built with the image's nvcc and ninja, or replaced by a torch op).
# DEST overrides the folder (default .carry/peers).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${DEST:-.carry/peers}
mkdir -p "$dest"
paroquant_req="paroquant==0.1.16"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest" "$paroquant_req"
if [ "${1:-all}" = paroquant ]; then
    ls -l "$dest"/paroquant-*.whl
    exit 0
fi
reqs=$(grep -v '^\s*#' benchmarks/peers/gpu-wheels.txt | grep -v '^\s*$')
for py in 3.12 3.11; do
    extra=""
    [ "$py" = 3.12 ] || extra="--ignore-requires-python"
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps $extra --only-binary=:all: --python-version "$py" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dest" $reqs
done
# AutoAWQ (its GEMM, for the ParoQuant reference loader: export_loaders_gpu.sh) ships an sdist only; it is pure
# Python, so a wheel built here with --no-deps installs there without its compiled kernels
python3 -m pip wheel -q --no-deps -w "$dest" autoawq==0.2.9
ls -l "$dest"/*.whl
du -ch "$dest"/*.whl | tail -1
