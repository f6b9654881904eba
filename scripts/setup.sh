#!/usr/bin/env bash
# Create .venv, install lowbit with a CPU build of torch, fetch the default model and corpora.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# Pin the CPU build first: an unpinned torch would pull gigabytes of CUDA wheels.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${LOWBIT_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
.venv/bin/lowbit fetch
