"""Train any config; rerun with the same workdir to resume.

  python -m experiments.train --config=configs/smoke.py --workdir=/tmp/smoke
  python -m experiments.train --config=configs/small.py:strategy=aux --workdir=DIR \
      --config.total_steps=1000 --config.mesh.data=2
Multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or
--distributed for jax.distributed.initialize()'s auto-detection (TPU pods, SLURM).
"""

from absl import app, flags
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
  trainer.train(_CONFIG.value, _WORKDIR.value, peak_flops=_PEAK.value)


if __name__ == "__main__":
  launch.run(main)
