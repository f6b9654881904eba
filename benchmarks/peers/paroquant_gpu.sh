#!/usr/bin/env bash
# The reference ParoQuant optimiser (PyPI paroquant 0.1.16) on the GPU machine, under lowbit's protocol:
# benchmarks/peers/paroquant_peer.py --device cuda, settings w4g64, w3g64, w2g64 (asymmetric INT, the
# rotation group = the quantization group = 64, as the reference ties them).
#
# Run from the repository root on the GPU machine, after the model is assembled
# (`source benchmarks/gpu_env.sh`, which also puts gguf in /tmp/site):
#
#     bash benchmarks/peers/paroquant_gpu.sh
#
# It expects (nothing is fetched: the machine has no registry and no network)
#   $LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   the model (sha256 checked)
#   $LOWBIT_HOME/text/sotu/*.txt, $LOWBIT_HOME/text/moby-dick/*.txt   the corpora
#   $WHEELS/paroquant-0.1.16-py3-none-any.whl   (64 KB, pure Python; `fetch_gpu_wheels.sh paroquant`)
# and writes $OUT/paroquant.json (settings, PPL, seconds, versions; written after every setting, so a
# run cut short still leaves what it finished) and $OUT/paroquant.log (the full output).
#
# Nothing else is carried: the optimisation path imports torch, transformers, tqdm (on the image)
# and, at module level only, `datasets` (not on the image: paroquant_peer.py stubs it; it is only
# used by paroquant's own data loaders, which are not called). autoawq, simple_parsing, wandb,
# ninja-the-wheel are not needed (the CLI module that imports simple_parsing/wandb is not used).
# The rotation kernel: KERNEL=auto JIT-builds paroquant's rotation.cu with the image's nvcc and
# ninja (cached in ~/.cache/paroquant while the machine stays warm; parity vs the torch op is
# recorded) and falls back to the torch op if the build fails; KERNEL=torch skips the build.
#
# The reference's pair selection is a pure-Python loop (~3 min for the 60 (width, seed) keys of
# SmolLM2 at g64); compute it once on any machine and carry the file:
#     PYTHONPATH=<site with paroquant>:src python benchmarks/peers/paroquant_peer.py --device cpu \
#         --settings w4g64,w3g64,w2g64 --workers 1 --rotation-cache .carry/paro/rotations-g64.pt \
#         --precompute-only --out /tmp/pre.json
# then pass EXTRA_ARGS="--rotation-cache .carry/paro/rotations-g64.pt" here.
#
# Knobs (environment): LOWBIT_HOME (/tmp/lb), OUT (./out/paroquant), SETTINGS (w4g64,w3g64,w2g64),
# EPOCHS ("10 10": stage 1, stage 2; the reference's experiments/optimize/4bit.sh; newer scripts use
# "5 5"), KERNEL (auto | cuda | torch), ANGLE_GRAD (reference | autograd), DEADLINE (seconds for the
# python run, 300: a setting that would not fit is skipped and says so), SITE (/tmp/site),
# WHEELS (.carry/peers), PYTHON (python3), DEVICE (cuda; cpu only to test this script), EXTRA_ARGS
# (passed to paroquant_peer.py, e.g. the smoke-test options --n-calib 12 --n-val 4 --batch-size 4
# --seq-len 64 --n-eval 2 --max-layers 2).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

export LOWBIT_HOME=${LOWBIT_HOME:-/tmp/lb}
OUT=${OUT:-$PWD/out/paroquant}
SETTINGS=${SETTINGS:-w4g64,w3g64,w2g64}
EPOCHS=${EPOCHS:-10 10}
KERNEL=${KERNEL:-auto}
ANGLE_GRAD=${ANGLE_GRAD:-reference}
DEADLINE=${DEADLINE:-300}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.carry/peers}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
EXTRA_ARGS=${EXTRA_ARGS:-}
MODEL=$LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
t_start=$(date +%s)

say() { echo "[paroquant_gpu $(( $(date +%s) - t_start ))s] $*"; }
die() { say "ERROR: $*"; exit 1; }

mkdir -p "$OUT" || die "cannot create $OUT"

# ---- 1. inputs ---------------------------------------------------------------------------
[ -f "$MODEL" ] || die "model not found: $MODEL (assemble it first: source benchmarks/gpu_env.sh)"
sha=$(sha256sum "$MODEL" | cut -d' ' -f1)
[ "$sha" = "$MODEL_SHA256" ] || die "sha256 of $MODEL is $sha, expected $MODEL_SHA256 (incomplete join?)"
for d in sotu moby-dick; do
    ls "$LOWBIT_HOME/text/$d/"*.txt >/dev/null 2>&1 || die "no text files under $LOWBIT_HOME/text/$d"
done
[ -f "$LOWBIT_HOME/text/.complete" ] || touch "$LOWBIT_HOME/text/.complete"  # lowbit.assets wants the marker
say "model and texts ok"

# ---- 2. the paroquant wheel --------------------------------------------------------------
wheel=$(ls "$WHEELS"/paroquant-0.1.16-*.whl 2>/dev/null | head -1)
if [ -n "$wheel" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$SITE" "$wheel" || die "pip install of $wheel failed"
    say "installed $(basename "$wheel") into $SITE"
elif [ -d "$SITE/paroquant" ]; then
    say "no paroquant wheel carried this time; using the one installed earlier in $SITE"
else
    die "no paroquant wheel in $WHEELS (run benchmarks/peers/fetch_gpu_wheels.sh paroquant here and carry it)"
fi
# /tmp/site first (as gpu_env.sh does: it only holds gguf and paroquant), then lowbit's src/
case ":${PYTHONPATH:-}:" in *":$SITE:"*) ;; *) export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} ;; esac
case ":$PYTHONPATH:" in *":$PWD/src:"*) ;; *) export PYTHONPATH=$PYTHONPATH:$PWD/src ;; esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
# the JIT build of paroquant's rotation kernel: Hopper only, all cores; CUDA_HOME from the toolkit
# folder (torch would take dirname(dirname(which nvcc)), wrong where nvcc is a wrapper in /usr/local/bin)
if [ -z "${CUDA_HOME:-}" ]; then
    for d in /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; break; fi
    done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}
say "python $("$PYTHON" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())' 2>&1)"
say "paroquant from $("$PYTHON" -c 'import paroquant, os; print(os.path.dirname(paroquant.__file__))' 2>&1); nvcc: $(command -v nvcc || echo none) (CUDA_HOME=${CUDA_HOME:-unset}); ninja: $(command -v ninja || echo none)"

# ---- 3. run ------------------------------------------------------------------------------
say "running settings=$SETTINGS epochs=($EPOCHS) kernel=$KERNEL angle_grad=$ANGLE_GRAD deadline ${DEADLINE}s"
# shellcheck disable=SC2086
timeout --signal=TERM --kill-after=10 $(( DEADLINE + 45 )) \
    "$PYTHON" benchmarks/peers/paroquant_peer.py --device "$DEVICE" --settings "$SETTINGS" --epochs $EPOCHS \
    --kernel "$KERNEL" --angle-grad "$ANGLE_GRAD" --deadline "$DEADLINE" --out "$OUT/paroquant.json" $EXTRA_ARGS 2>&1 \
    | tee "$OUT/paroquant.log" \
    | grep --line-buffered -vE "UserWarning|^\s*(with torch|scaler =)|Best val loss"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && say "the python run hit the hard timeout ($(( DEADLINE + 45 ))s); $OUT/paroquant.json holds what finished"
mkdir -p "$LOWBIT_HOME/paroquant-results" && cp "$OUT/paroquant.json" "$LOWBIT_HOME/paroquant-results/" 2>/dev/null
say "paroquant_peer.py exited with $rc; results in $OUT/paroquant.json, full log $OUT/paroquant.log"
"$PYTHON" - "$OUT/paroquant.json" <<'EOF' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
print(f"kernel={d.get('kernel')} epochs={d['recipe']['epochs']} fp={d.get('fp') and d['fp']['ppl']} error={d.get('error')}")
for s, r in d.get("runs", {}).items():
    print(f"  {s}: " + (r.get("error") or r.get("skipped") or f"ppl={r.get('ppl')} quant={r.get('quant_seconds')}s"))
EOF
exit "$rc"
