"""DeepSeek-V3 671B (37B activated) as released: the layout for a pod, not run here.

  python -m experiments.param_count --config=configs/deepseek_v3_671b.py
  python -m experiments.train --config=configs/deepseek_v3_671b.py --workdir=gs://... \
      --config.mesh.data=16 --config.mesh.expert=64   # e.g. 1024 chips
"""

from configs import common
from deepseek_jax.model import config as model_config


def get_config(arg=None):
  del arg
  c = common.base_config(model_config.deepseek_v3_671b())
  c.batch_size = 15360
  c.seq_len = 4096
  c.total_steps = 14_800_000_000_000 // (15360 * 4096)
  c.mtp_lambda = 0.3
  c.mtp_lambda_late = 0.1
  c.mtp_lambda_switch_step = 10_000_000_000_000 // (15360 * 4096)   # after 10T tokens
  c.optimizer.warmup_steps = 2000
  c.balance.bias_rate = 0.001
  c.balance.bias_freeze_frac = 0.97
  c.balance.seq_aux_alpha = 0.0001
  c.mesh.data = 16
  c.mesh.expert = 64
  return c
