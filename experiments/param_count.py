"""Total and activated parameters of a config's model, without allocating it.

  python -m experiments.param_count --config=configs/deepseek_v3_671b.py
"""

from ml_collections import config_flags

from experiments import launch

from deepseek_jax.model.config import model_config_from
from deepseek_jax.model.param_count import count_params, format_counts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)


def main(argv):
  del argv
  print(format_counts(count_params(model_config_from(_CONFIG.value.model))))


if __name__ == "__main__":
  launch.run(main)
