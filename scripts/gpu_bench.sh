#!/usr/bin/env bash
# The GPU benchmark of issue 22 in one go on one NVIDIA GPU (an H200: about 4 minutes,
# the parts past 7 minutes are skipped): writes $OUT/gpu_bench.json (default
# ./gpu_bench_out), a profile of the default train step under $OUT/profile, the log.
#
# Runs under the GPU machine's own jax/flax/optax/orbax/torch/transformers (no registry
# reachable there); what that image lacks travels as wheels in .whl/, fetched on a
# machine with pip by scripts/gpu_wheels.sh. On a GPU box of your own:
#   pip install -e ".[cuda,parity]" && scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-gpu_bench_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX takes memory as it needs it (not 60% up front): torch runs in the same process.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT_DIR/log"
"$PY" -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT_DIR/log"
"$PY" -m experiments.gpu_bench --out="$OUT_DIR/gpu_bench.json" \
  --profile_dir="$OUT_DIR/profile" "$@" 2>&1 | tee -a "$OUT_DIR/log"
rc=$?
# The newest trace beside the module text, two folders down (what the device tool brings back).
trace=$(ls -t "$OUT_DIR"/profile/plugins/profile/*/*.trace.json.gz 2>/dev/null | head -1)
[ -n "$trace" ] && cp "$trace" "$OUT_DIR/profile/trace.json.gz"
exit $rc
