#!/usr/bin/env bash
# A grid of recipes on the GPU machine, one `lowbit bench` process per recipe, all side by side
# (their quantization times are therefore concurrent). Sourced environment: benchmarks/gpu_env.sh.
#
#   RECIPES="a b ..." TAG=name bash benchmarks/gpu_grid.sh run      run them, wait (at most $DEADLINE s
#                                                                    each), write $OUT/$TAG.json
#   RECIPES="a b ..." TAG=name bash benchmarks/gpu_grid.sh start    the same, detached (returns at once;
#                                                                    it outlives the device call)
#   TAG=name WAIT=300 bash benchmarks/gpu_grid.sh collect           wait for a detached grid (at most
#                                                                    $WAIT s), then write $OUT/$TAG.json
# Each process runs in its own session so that a deadline kills it and the workers it spawned, and
# nothing else (other grids may share the GPU). Knobs: DEADLINE (400), BS (16), EXTRA (more bench args).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
source benchmarks/gpu_env.sh > /tmp/gpu_env.log 2>&1
export OMP_NUM_THREADS=1
mode=${1:-run}
TAG=${TAG:?set TAG}
W=/tmp/grid/$TAG
OUT=${OUT:-$PWD/out}

summarize() {
  python3 - "$W" "$OUT/$TAG.json" "${RECIPES:-$(cat $W/recipes 2>/dev/null)}" <<'PY'
import datetime, glob, json, os, sys, torch
w, out, recipes = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for f in sorted(glob.glob(f"{w}/*/bench.json")):
    d = json.load(open(f))
    rows += d["rows"] if isinstance(d, dict) else d
meta = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": f"RECIPES='{recipes}' BS={os.environ.get('BS', 16)} bash benchmarks/gpu_grid.sh run "
                   "(after benchmarks/gpu_env.sh): one lowbit bench --device cuda per recipe, side by side"}
json.dump({"rows": rows, "meta": meta}, open(out, "w"), indent=1)
for r in rows:
    print(r.get("label"), {k: round(v, 2) for k, v in r.get("ppl", {}).items()}, round(r.get("quant_seconds", 0), 1),
          r.get("bits_per_weight"))
PY
  for f in $W/*.log; do grep -q -i "error\|Traceback" "$f" && { echo "== $f"; tail -4 "$f"; }; done
}

run_all() {
  mkdir -p "$W"; echo "$RECIPES" > $W/recipes; rm -f $W/done
  pids=()
  for r in $RECIPES; do
    name=$(basename "$r" .json)
    setsid timeout --kill-after=5 "${DEADLINE:-400}" python3 -m lowbit bench smollm2 --device cuda --quiet --no-fp \
      --batch-size "${BS:-16}" --recipes "$r" --out-dir "$W/$name" ${EXTRA:-} > "$W/$name.log" 2>&1 &
    pids+=($!)
  done
  wait
  for p in "${pids[@]}"; do kill -9 -- "-$p" 2>/dev/null; done   # spawned workers of a timed-out run
  touch $W/done
}

case $mode in
  run) run_all; summarize ;;
  start) mkdir -p "$W"; setsid nohup bash "$0" _detached > "$W/grid.log" 2>&1 < /dev/null & echo "started grid $TAG" ;;
  _detached) run_all ;;
  collect)
    for _ in $(seq "${WAIT:-300}"); do [ -f "$W/done" ] && break; sleep 1; done
    [ -f "$W/done" ] || echo "grid $TAG not finished after ${WAIT:-300} s; writing what is there"
    summarize ;;
  *) echo "usage: RECIPES=... TAG=... $0 run|start|collect"; exit 2 ;;
esac
