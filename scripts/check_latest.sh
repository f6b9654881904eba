#!/usr/bin/env bash
# Drift check: install the NEWEST versions pyproject.toml allows (not constraints.txt) into a separate
# venv and run the test suite there, so that a new release of transformers, safetensors, triton, ...
# that breaks lowbit is found before users find it. torch stays the CPU build (LOWBIT_TORCH, default
# 2.13.0): the newest torch on PyPI is a CUDA build of several GB.
#   bash scripts/check_latest.sh [pytest args]
# Prints the versions it tested and exits with pytest's status.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOWBIT_LATEST_VENV:-.venv-latest}
PY=${PYTHON:-python3}
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==${LOWBIT_TORCH:-2.13.0}"
pin=$(mktemp); echo "torch==${LOWBIT_TORCH:-2.13.0}" > "$pin"  # the eager upgrade must not swap torch
"${pip[@]}" -c "$pin" --upgrade --upgrade-strategy eager -e ".[dev]"
rm -f "$pin"
"$VENV/bin/lowbit" fetch >/dev/null
echo "== newest allowed versions =="
"$VENV/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|accelerate|safetensors|gguf|numpy|triton|typer|datasets|huggingface.hub|tokenizers|compressed.tensors)==' || true
"$VENV/bin/python" -m pytest -q "$@"
