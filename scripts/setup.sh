#!/usr/bin/env bash
# Create .venv, install lowbit with a CPU build of torch and the locked, tested versions of every
# other dependency (constraints.txt), fetch the default model and corpora.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # runtime + test dependencies
# LOWBIT_TORCH=2.x.y picks another torch (default 2.13.0, the CPU build); LOWBIT_VENV another venv folder.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
PY=${PYTHON:-python3}
VENV=${LOWBIT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# Pin the CPU build first: an unpinned torch would pull gigabytes of CUDA wheels.
"${pip[@]}" "torch==${LOWBIT_TORCH:-2.13.0}"
"${pip[@]}" -c constraints.txt -e ".${extra}"
"$VENV/bin/lowbit" fetch
