"""DeepSeek-V2-Lite (15.7B, 2.4B activated) on a slice researchers can get: 16 v5p chips.

  python -m experiments.compile --config=configs/deepseek_v2_lite.py --topology=v5p:2x2x4
  python -m experiments.train --config=configs/deepseek_v2_lite.py --workdir=DIR --distributed
V2-Lite's pre-training batch (V2 report: 4,608 sequences of 4K) in microbatches of one
sequence per chip; fsdp = -1 takes what the slice gives beside 8 expert shards (8 routed
experts per chip). Plain RoPE for pre-training, as V3's config (YaRN is the released
model's long-context setting, kept by the preset for HF import).
"""

from configs import common
from deepseek_jax.model import config as model_config


def get_config(arg=None):
  del arg
  model = model_config.deepseek_v2_lite().replace(
      rope_factor=1.0, scan_layers=True, remat=True, remat_policy="nothing",
      attention_impl="blockwise", attention_block=512, moe_dispatch="ragged",
      ep_capacity_factor=1.25, dtype="bfloat16", param_dtype="float32")
  c = common.base_config(model)
  c.batch_size = 4608
  c.seq_len = 4096
  c.microbatches = -1
  c.total_steps = 5_700_000_000_000 // (4608 * 4096)   # V2-Lite: 5.7T tokens
  c.optimizer.peak_lr = 4.2e-4
  c.optimizer.warmup_steps = 2000
  c.balance.bias_rate = 0.001
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.expert = 8
  return c
