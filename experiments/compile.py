"""Compile a config's train step for a TPU topology on this host, and say whether it fits.

  pip install -e ".[tpu]"
  python -m experiments.compile --config=configs/deepseek_v3_671b.py --topology=v5p:8x16x16
  python -m experiments.compile --config=configs/deepseek_v2_lite.py --topology=v5p:2x2x4 \
      --config.model.n_layers=4 --out=report.json

Prints the per-chip memory, the collectives and a roofline estimate (deepseek_jax/train/
aot.py), writes them as JSON with --out, and exits with status 1 when the program does
not fit the chips' HBM. No TPU is needed: libtpu compiles for the topology's abstract
devices.
"""

import json
import os
import sys

# A TPU program is compiled here, never run: keep jax on the CPU backend (with libtpu
# installed a plain import would try to open a TPU first).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import launch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:8x16x16, v5p:2x2x1, "
                                "v6e:16x16, v5e:16x16, v4:8x8x8.")
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  del argv
  launch.quiet_console()
  from deepseek_jax.train import aot
  try:
    r = aot.report(_CONFIG.value, _TOPOLOGY.value)
  except (aot.TopologyError, ValueError) as e:
    sys.exit(f"experiments.compile: {e}")
  print(aot.format_report(r))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(r, f, indent=1)
  if not r["fits_hbm"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
