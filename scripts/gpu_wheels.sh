#!/usr/bin/env bash
# Fetch into .whl/ (git-ignored) the wheels scripts/gpu_bench.sh installs on a GPU machine
# that reaches no registry: what its image (python 3.12, jax 0.11, flax, optax, orbax,
# chex, torch, transformers, jaxtyping) lacks. Run where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps "${plat[@]}" -d .whl \
  ml-collections tensorboardX tokamax==0.0.12 qwix einshape typeguard==2.13.3 \
  immutabledict pydantic pydantic-core annotated-types typing-inspection typing-extensions
ls -l .whl
