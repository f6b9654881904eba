#!/usr/bin/env bash
# Peer quantizers on the GPU machine, under lowbit's shared protocol: llm-compressor GPTQ (`gptq`)
# and onecomp QEP + GPTQ (`qep`), settings w4g64, w3g64, w2g64, w4pc, fp32 model on cuda.
#
# Run from the repository root on the GPU machine (python3 there holds torch/transformers):
#
#     bash benchmarks/peers/gpu_peers.sh
#
# It expects (nothing is fetched: the machine has no registry and no network)
#   $LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   the model (sha256 checked)
#   $LOWBIT_HOME/text/sotu/*.txt, $LOWBIT_HOME/text/moby-dick/*.txt   the corpora
#   .carry/peers/*.whl          the wheels of benchmarks/peers/gpu-wheels.txt (fetch_gpu_wheels.sh)
# and writes $OUT/peers.json, $OUT/peers.md and $OUT/peers.log (the full output).
#
# Steps: install the carried wheels into $PEERSITE (pip --no-index --no-deps --target; skipped when
# already done for the same wheels); check every import and print where each module comes from;
# run benchmarks/peers/run_peers.py --device cuda, one fresh subprocess per (tool, setting), with a
# per-run timeout and a deadline for the whole sweep. $PEERSITE goes AFTER the system
# site-packages (run_peers.py appends $PEERS_SITE to sys.path; PYTHONPATH would put it first), so
# the machine's torch / transformers / numpy are always the ones used; lowbit's protocol modules
# are imported from src/ by run_peers.py itself.
#
# Results accumulate in $RESULTS_DIR (default $LOWBIT_HOME/peers-results, kept while the machine
# stays warm) and are copied to $OUT at the end. If the deadline cuts the sweep short, running the
# same command again (same warm machine) finishes the remaining pairs (--resume) and $OUT then
# holds all of them.
#
# Knobs (environment): LOWBIT_HOME (/tmp/lb), OUT (./out/gpu-peers when unset), TOOLS (gptq,qep),
# SETTINGS (w4g64,w3g64,w2g64,w4pc), DEADLINE (seconds for all runs, 420), RUN_TIMEOUT (seconds
# per run, 240), PEERSITE (/tmp/peersite), PYTHON (python3), DEVICE (cuda), THREADS (nproc, <=16),
# EXTRA_ARGS (passed to run_peers.py, e.g. the smoke-test options).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

export LOWBIT_HOME=${LOWBIT_HOME:-/tmp/lb}
OUT=${OUT:-$PWD/out/gpu-peers}
TOOLS=${TOOLS:-gptq,qep}
SETTINGS=${SETTINGS:-w4g64,w3g64,w2g64,w4pc}
DEADLINE=${DEADLINE:-420}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}
PEERSITE=${PEERSITE:-/tmp/peersite}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RESULTS_DIR=${RESULTS_DIR:-$LOWBIT_HOME/peers-results}
EXTRA_ARGS=${EXTRA_ARGS:-}
nproc_=$(nproc 2>/dev/null || echo 2)
THREADS=${THREADS:-$(( nproc_ < 16 ? nproc_ : 16 ))}
MODEL=$LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEELS=.carry/peers
t_start=$(date +%s)

say() { echo "[gpu_peers $(( $(date +%s) - t_start ))s] $*"; }
die() { say "ERROR: $*"; exit 1; }

mkdir -p "$OUT" "$RESULTS_DIR" || die "cannot create $OUT / $RESULTS_DIR"
copy_out() {
    for f in peers.json peers.md; do
        [ -f "$RESULTS_DIR/$f" ] && cp "$RESULTS_DIR/$f" "$OUT/$f"
    done
}
trap copy_out EXIT

# ---- 1. inputs ---------------------------------------------------------------------------
say "python: $(command -v "$PYTHON") ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
[ -f "$MODEL" ] || die "model not found: $MODEL (assemble the GGUF there first)"
sha=$(sha256sum "$MODEL" | cut -d' ' -f1)
[ "$sha" = "$MODEL_SHA256" ] || die "sha256 of $MODEL is $sha, expected $MODEL_SHA256 (incomplete join?)"
say "model ok: $MODEL"
for d in sotu moby-dick; do
    ls "$LOWBIT_HOME/text/$d/"*.txt >/dev/null 2>&1 || die "no text files under $LOWBIT_HOME/text/$d"
done
if [ ! -f "$LOWBIT_HOME/text/.complete" ]; then
    # lowbit.assets.text_root() wants the marker that `lowbit fetch` leaves after extracting
    touch "$LOWBIT_HOME/text/.complete" && say "wrote the marker $LOWBIT_HOME/text/.complete"
fi
say "texts ok: $(ls "$LOWBIT_HOME/text/sotu" | wc -l) sotu files, $(ls "$LOWBIT_HOME/text/moby-dick" | wc -l) moby-dick files"

# ---- 2. carried wheels -------------------------------------------------------------------
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # a later call on the same warm machine need not carry the wheels again
    [ -f "$PEERSITE/.peers-stamp" ] || die "no wheels in $WHEELS (run benchmarks/peers/fetch_gpu_wheels.sh here and carry .carry/peers)"
    say "no wheels carried this time; using those installed earlier in $PEERSITE"
    stamp=$(cat "$PEERSITE/.peers-stamp")
else
    stamp=$( (cat benchmarks/peers/gpu-wheels.txt; ls -l "$WHEELS"/*.whl) | sha256sum | cut -c1-16)
fi
if [ -f "$PEERSITE/.peers-stamp" ] && [ "$(cat "$PEERSITE/.peers-stamp")" = "$stamp" ]; then
    say "carried wheels already installed in $PEERSITE"
else
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $PEERSITE (pip picks the ones for this python)"
    # --ignore-requires-python: one refused wheel would stop the whole install; the import check
    # below tells whether each package really works on this python.
    "$PYTHON" -m pip install -q --no-index --no-deps --ignore-requires-python --no-compile --no-cache-dir \
        --upgrade --disable-pip-version-check --find-links "$WHEELS" --target "$PEERSITE" \
        -r benchmarks/peers/gpu-wheels.txt || die "pip install of the carried wheels failed (see above)"
    echo "$stamp" > "$PEERSITE/.peers-stamp"
fi
export PEERS_SITE=$PEERSITE

# ---- 3. imports --------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
say "import check (torch etc. must come from the system, the peers from $PEERSITE):"
if ! "$PYTHON" benchmarks/peers/run_peers.py --check --tools "$TOOLS" --device "$DEVICE"; then
    say "WARNING: some imports failed (listed above): the runs that need them will fail and say why"
fi
# version conflicts between the carried packages and the system's (informational; expected
# entries: auto-round, lm-eval, ortools, primefac, gemlite, hqq, which are not carried on purpose)
conflicts=$(PYTHONPATH=$PEERSITE "$PYTHON" -m pip check 2>/dev/null \
    | grep -iE "^(llmcompressor|compressed-tensors|datasets|pydantic|onecomp|gguf|accelerate|multiprocess|dill)" \
    | grep -viE "auto-round|lm-eval|ortools|primefac|gemlite|hqq|which is not installed.*(torchvision|vllm)")
if [ -n "$conflicts" ]; then
    say "pip check (carried packages vs. this machine's versions; may still work):"
    echo "$conflicts" | sed 's/^/    /'
fi

# ---- 4. runs -----------------------------------------------------------------------------
say "running tools=$TOOLS settings=$SETTINGS device=$DEVICE threads=$THREADS, per-run timeout ${RUN_TIMEOUT}s, deadline ${DEADLINE}s"
# shellcheck disable=SC2086
"$PYTHON" benchmarks/peers/run_peers.py --device "$DEVICE" --tools "$TOOLS" --settings "$SETTINGS" \
    --threads "$THREADS" --timeout "$RUN_TIMEOUT" --deadline "$DEADLINE" --resume \
    --out "$RESULTS_DIR/peers.json" --md "$RESULTS_DIR/peers.md" $EXTRA_ARGS 2>&1 \
    | tee "$OUT/peers.log" \
    | grep --line-buffered -E '^(===|-->|total |not run|Traceback)|Error|FAILED'
rc=${PIPESTATUS[0]}
copy_out
say "run_peers.py exited with $rc; results in $OUT/peers.json and $OUT/peers.md, full log $OUT/peers.log"
[ -f "$OUT/peers.md" ] && grep '^|' "$OUT/peers.md"
exit "$rc"
