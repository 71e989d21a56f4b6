"""Train any config; rerun with the same workdir to resume.

  python -m experiments.train --config=configs/smoke.py --workdir=/tmp/smoke
  python -m experiments.train --config=configs/small.py:strategy=aux --workdir=DIR \
      --config.total_steps=1000 --config.mesh.data=2
Multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or
--distributed for jax.distributed.initialize()'s auto-detection (TPU pods, SLURM).
"""

import os
import sys

from absl import app, flags
from absl import logging
from ml_collections import config_flags

from experiments import launch

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_PEAK = flags.DEFINE_float("peak_flops", None, "Declared peak FLOP/s for MFU "
                           "(default: measured float32 matmul peak).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  launch.init_distributed()
  from deepseek_jax.train import loop as trainer  # after jax.distributed is up
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value, peak_flops=_PEAK.value)
  except trainer.ConfigError as e:
    # The input cannot start a run (nothing was built or saved): the line alone, status 2.
    logging.error("%s", e)
    sys.exit(launch.USAGE_EXIT)
  except trainer.RUN_ERRORS as e:
    # A run stopped for a reason it states (a failed checkpoint write, a busy or foreign
    # workdir, a diverged run): the one line, no traceback; the exit status is 1.
    logging.error("%s: %s", type(e).__name__, e)
    if isinstance(e, trainer.CheckpointNotSaved):
      # orbax's failed write tasks would print their errors again (dozens of lines)
      # while the interpreter shuts down: leave now, with the message above as the last
      # line. The metrics log is closed and the workdir lock goes with the process.
      logging.flush()
      sys.stderr.flush()
      os._exit(1)
    sys.exit(1)


if __name__ == "__main__":
  launch.run(main)
