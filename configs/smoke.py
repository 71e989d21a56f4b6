"""A tiny model that trains in well under a minute on one CPU core (bytes tokenizer).

  python -m experiments.train --config=configs/smoke.py --workdir=/tmp/smoke
"""

from configs import common
from deepseek_jax.model.config import ModelConfig


def get_config(arg=None):
  del arg
  model = ModelConfig(
      vocab_size=257, d_model=64, n_layers=2, n_heads=2, q_lora_rank=32, kv_lora_rank=16,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_dim=128, moe_ffn_dim=32,
      first_k_dense=1, n_shared_experts=1, n_routed_experts=8, top_k=2, n_group=2,
      topk_group=1, routed_scaling_factor=1.0, mtp_depth=1, init_std=0.02)
  c = common.base_config(model)
  c.total_steps = 40
  c.log_every = 5
  c.eval_every = 20
  c.eval_batches = 2
  c.checkpoint_every = 20
  c.batch_size = 8
  c.seq_len = 64
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = 5
  c.balance.bias_rate = 1e-3
  c.data.tokenizer = "bytes"
  return c
