#!/usr/bin/env bash
# Pairwise rotation (issue 4) on the GPU machine (see benchmarks/gpu_env.sh for how the model gets there).
#   bash benchmarks/gpu_pairwise.sh kernel     GPU tests of the kernel / transforms / block-wise fit, then
#                                              benchmarks/kernel_pairwise.py on an idle GPU
#   RECIPES="a b ..." bash benchmarks/gpu_pairwise.sh quality
#                                              one `lowbit bench` per recipe, all side by side on the GPU
#                                              (their times are concurrent), stopped at $DEADLINE seconds;
#                                              rows merged into $OUT/pairwise-$TAG.json
#   bash benchmarks/gpu_pairwise.sh time       pair-rtn-w3-g64 alone (the GPU quantization time)
set -uo pipefail
source benchmarks/gpu_env.sh
export OMP_NUM_THREADS=1
mode=${1:-quality}
mkdir -p /tmp/pq
if [ "$mode" = kernel ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/transforms tests/test_blockwise.py 2>&1 | tail -15 | tee $OUT/pytest-gpu.txt
  timeout ${KDEADLINE:-240} python3 benchmarks/kernel_pairwise.py --out $OUT/pairwise_kernel.json 2>&1 | tail -40
elif [ "$mode" = quality ] || [ "$mode" = time ]; then
  [ "$mode" = time ] && RECIPES=pair-rtn-w3-g64 && TAG=time
  for r in $RECIPES; do
    name=$(basename "$r" .json)
    timeout ${DEADLINE:-400} python3 -m lowbit bench smollm2 --device cuda --quiet --no-fp --batch-size ${BS:-8} --recipes "$r" \
      --out-dir /tmp/pq/$name > /tmp/pq/$name.log 2>&1 &
  done
  wait
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9  # spawned workers outlive a timeout
  python3 - "$OUT/${PREFIX:-pairwise}-${TAG:-quality}.json" <<'PY'
import datetime, glob, json, os, sys, torch
rows = []
for f in sorted(glob.glob("/tmp/pq/*/bench.json")):
    d = json.load(open(f))
    rows += d["rows"] if isinstance(d, dict) else d
meta = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": f"RECIPES='{os.environ.get('RECIPES', '')}' BS={os.environ.get('BS', 8)} bash benchmarks/gpu_pairwise.sh "
                   "quality (after benchmarks/gpu_env.sh): one lowbit bench --device cuda per recipe, side by side"}
json.dump({"rows": rows, "meta": meta}, open(sys.argv[1], "w"), indent=1)
for r in rows:
    print(r.get("label") or r.get("recipe", {}).get("name"), r.get("ppl"), round(r.get("quant_seconds", 0), 1))
PY
  for f in /tmp/pq/*.log; do grep -l -i "error\|Traceback" $f >/dev/null && { echo "== $f"; tail -5 $f; }; done
fi
