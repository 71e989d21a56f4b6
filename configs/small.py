"""The ablation model: 4 layers (1 dense + 3 MoE), 1 shared + 16 routed experts, top-4,
group-limited routing, MTP depth 1, BPE vocab 2048 on the embedded stdlib corpus.

  python -m experiments.train --config=configs/small.py --workdir=/tmp/small
  python -m experiments.train --config=configs/small.py:strategy=aux --workdir=/tmp/small_aux

The `:strategy=NAME` argument selects a load-balancing strategy (balancing.py).
"""

from configs import common
from deepseek_jax import config as model_config

STRATEGIES = {
    "none": {},
    "aux": {"aux_alpha": 1e-3},
    "seq_aux": {"seq_aux_alpha": 1e-3},
    "batch_aux": {"batch_aux_alpha": 1e-3},
    "bias": {"bias_rate": 1e-3},
    "bias_magnitude": {"bias_rate": 1e-3, "bias_rule": "magnitude"},
    "bias_seq_aux": {"bias_rate": 1e-3, "seq_aux_alpha": 1e-4},
}


def apply_strategy(c, name: str):
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
  for k, v in STRATEGIES[name].items():
    c.balance[k] = v
  return c


def get_config(arg=None):
  args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
  c = common.base_config(model_config.small())
  c.total_steps = 400
  c.log_every = 10
  c.eval_every = 100
  c.eval_batches = 16
  c.checkpoint_every = 100
  c.batch_size = 16
  c.seq_len = 256
  c.optimizer.peak_lr = 2e-3
  c.optimizer.warmup_steps = 40
  c.balance.bias_freeze_frac = 1.0
  apply_strategy(c, args.get("strategy", "bias"))
  return c
