#!/usr/bin/env bash
# The anchor beside our 671B compile (issue 33): MaxText's deepseek3-671b compiled for the
# same v5p slice at V3's per-chip batch, read with the same tools (memory analysis, the
# executed-work table of experiments.hlo_report). MaxText gets its own virtual environment
# (Python 3.12, its generated TPU requirements; .maxtext_venv, git-ignored).
#
#   scripts/maxtext_anchor.sh MAXTEXT_DIR [SLICE_CHIPS] [extra MaxText key=value ...]
#
# MAXTEXT_DIR: a MaxText checkout (git clone https://github.com/AI-Hypercomputer/maxtext).
# Default slice 512 chips (v5p:8x8x8 in our notation): 30 sequences of 4,096 a chip, run as
# per_device_batch_size=10 x gradient_accumulation_steps=3 (more key=value arguments
# override; docs/pod.md, "The anchor: MaxText" has what it gave). Exit status 1 with the
# compiler's line when MaxText's step does not fit. Writes maxtext_anchor_out/{step.hlo,memory.json,
# report.json} and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${1:?usage: scripts/maxtext_anchor.sh MAXTEXT_DIR [CHIPS] [key=value ...]}
CHIPS=${2:-512}
shift $(( $# >= 2 ? 2 : 1 ))
declare -A TOPO=([512]=v5p:8x8x8 [1024]=v5p:8x8x16 [2048]=v5p:8x16x16)
OUT=${OUT:-maxtext_anchor_out}
PY312=${PY312:-python3.12}
if [ ! -x .maxtext_venv/bin/python ]; then
  "$PY312" -m venv .maxtext_venv
  .maxtext_venv/bin/pip install -q --upgrade pip
  .maxtext_venv/bin/pip install -q -r \
    "$MT/src/dependencies/requirements/generated_requirements/tpu-requirements.txt"
  .maxtext_venv/bin/pip install -q --no-deps -e "$MT"
fi
# MaxText's own v5p recipe for this model (benchmarks/maxtext_v5p_model_configs.py:
# megablox, custom remat with two activations offloaded to host, the scheduler flags its
# host offload needs, flash attention named: compiled on a CPU host "autoselected" would
# not pick it).
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-} --xla_tpu_enable_all_experimental_scheduler_features=true --xla_tpu_enable_scheduler_memory_pressure_tracking=true --xla_tpu_host_transfer_overlap_limit=24 --xla_tpu_aggressive_opt_barrier_removal=ENABLED --xla_lhs_prioritize_async_depth_over_stall=ENABLED --xla_tpu_enable_ag_backward_pipelining=true --xla_should_allow_loop_variant_parameter_in_chain=ENABLED --xla_should_add_loop_invariant_op_in_chain=ENABLED --xla_max_concurrent_host_send_recv=100 --xla_tpu_scheduler_percent_shared_memory_limit=100 --xla_latency_hiding_scheduler_rerun=2 --xla_tpu_scoped_vmem_limit_kib=81920"
per_chip=$(( 15360 / CHIPS ))
accum=$(( per_chip % 10 == 0 ? per_chip / 10 : 1 ))
JAX_PLATFORMS=cpu .maxtext_venv/bin/python scripts/maxtext_anchor.py "$OUT" \
  model_name=deepseek3-671b max_target_length=4096 \
  per_device_batch_size=$(( per_chip / accum )) gradient_accumulation_steps=$accum \
  n_routing_groups=8 topk_routing_group=4 \
  compile_topology=v5p-$CHIPS compile_topology_num_slices=1 \
  megablox=True sparse_matmul=True use_custom_sort_vjp=True remat_policy=custom \
  decoder_layer_input=offload out_proj=offload dtype=bfloat16 weight_dtype=float32 \
  attention=flash run_name=anchor base_output_directory=/tmp/maxtext_anchor "$@"
python -c "import json; m = json.load(open('$OUT/memory.json')); print('MaxText per chip: ' + ', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in m.items() if k not in ('compile_s', 'args')) + f', compile {m[\"compile_s\"]:.0f} s')"
JAX_PLATFORMS=cpu python -m experiments.hlo_report --hlo="$OUT/step.hlo" \
  --config=configs/deepseek_v3_671b.py --topology=${TOPO[$CHIPS]} --out="$OUT/report.json"
