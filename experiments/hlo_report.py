"""The executed-work table of any compiled train step's HLO text (train/aot_work.py):
FLOPs by class, HBM traffic and collectives per chip per step, against a config's useful
FLOPs.
For programs compiled elsewhere (scripts/maxtext_anchor.sh runs it on MaxText's step).

  python -m experiments.hlo_report --hlo=step.after_optimizations.txt \
      --config=configs/deepseek_v3_671b.py --topology=v5p:8x8x8 [--live_rows=N]

--config gives the model and the batch (its useful FLOPs per chip); --live_rows the rows
a routed grouped-matmul kernel holds (default: its whole grid, an upper bound: the
program's buffers are not ours to size). Classes come from op_names: the grouped-matmul
kernels, /moe/ and attention scopes; another codebase's names may put some products in
"other".
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "The config of the same model "
                                          "and batch (useful FLOPs).", lock_config=True)
_HLO = flags.DEFINE_string("hlo", None, "Optimised HLO text of one train step.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "The slice it was compiled for.")
_LIVE = flags.DEFINE_float("live_rows", None, "Live rows of a routed grouped-matmul buffer.")
_OUT = flags.DEFINE_string("out", None, "Write the numbers as JSON.")
flags.mark_flags_as_required(["config", "hlo", "topology"])


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.model.config import model_config_from
  from deepseek_jax.train import aot_text, aot_work, tpu
  cfg = _CONFIG.value
  try:
    kind, _ = tpu.parse_topology(_TOPOLOGY.value)
    n_chips = len(tpu.topology_devices(_TOPOLOGY.value))
    with open(_HLO.value) as fh:
      text = fh.read()
  except tpu.TopologyError as e:
    sys.exit(f"experiments.hlo_report: {e}")
  except OSError as e:
    sys.exit(f"experiments.hlo_report: cannot read {e.filename}: {e.strerror}")
  r = aot_work.work_report(text, cfg, model_config_from(cfg.model), tpu.CHIPS[kind],
                           n_chips, _LIVE.value)
  print("\n".join(aot_text.format_work(r)))
  if _OUT.value:
    with open(_OUT.value, "w") as fh:
      json.dump(r, fh, indent=1)

if __name__ == "__main__":
  launch.run(main)
