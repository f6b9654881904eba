#!/usr/bin/env bash
# On the GPU machine (second call): join the model halves carried in .carry/a (earlier call,
# copied to /tmp/lb-stage) and .carry/b, then run the tests and the protocol bench on CUDA.
set -uo pipefail
export LOWBIT_HOME=/tmp/lb PYTHONUNBUFFERED=1
mkdir -p $LOWBIT_HOME/models/smollm2 /tmp/site
cat /tmp/lb-stage/part_aa .carry/b/part_ab .carry/b/part_ac > $LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
tar xf /tmp/lb-stage/text.tar -C $LOWBIT_HOME
sha256sum $LOWBIT_HOME/models/smollm2/*.gguf
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
python3 -m pytest -q -x tests 2>&1 | tee $OUT/pytest.log | tail -15
python3 -m lowbit bench smollm2 --device cuda --quiet --out-dir $OUT/bench --recipes "${RECIPES:-rtn-w4-g64,gptq-w4-g64,best,rtn-w3-g64,gptq-w3-g64,rtn-w2-g64,gptq-w2-g64,rtn-w4-pc,gptq-w4-pc}" 2>&1 | tail -20
