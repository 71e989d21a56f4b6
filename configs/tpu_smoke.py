"""A 2-layer model shaped like V3 (q-LoRA MLA, 1 dense + 1 MoE layer with expert groups,
MTP depth 1, bf16 compute over fp32 weights) with the 671B config's code paths (scanned
layers, remat, blockwise attention, grouped-matmul experts, EP capacity) on a data x
fsdp x expert mesh: the TPU compile path in seconds, and the model the compile tests use.

  python -m experiments.compile --config=configs/tpu_smoke.py --topology=v5p:2x2x1
  python -m experiments.train --config=configs/tpu_smoke.py --workdir=/tmp/tpu_smoke \
      --cpu_devices=4

Variant "guard" (`--config=configs/tpu_smoke.py:guard --topology=v5p:2x2x2`): the same
model on fsdp x expert x tensor = 2 x 2 x 2 with a 65,536-token vocabulary and 1,024-token
sequences, one sequence per batch shard per microbatch as the 671B config runs, so that
the [tokens, V] f32 logits dominate a chip's memory as they do in the 671B step:
tests/train/test_aot.py holds its compiled step to a per-chip budget computed from those
sizes (a 2-D logits product costs the 671B its pod fit: docs/history.md, "the pod fit
lost and restored").
"""

from configs import common
from deepseek_jax.model.config import ModelConfig


def get_config(arg=None):
  model = ModelConfig(
      vocab_size=512, d_model=128, n_layers=2, n_heads=4, q_lora_rank=64, kv_lora_rank=32,
      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, ffn_dim=256,
      moe_ffn_dim=64, first_k_dense=1, n_shared_experts=1, n_routed_experts=8, top_k=2,
      n_group=4, topk_group=2, routed_scaling_factor=2.5, mtp_depth=1,
      dtype="bfloat16", param_dtype="float32",
      # the 671B config's code paths (configs/deepseek_v3_671b.py)
      scan_layers=True, remat=True, remat_policy="nothing", attention_impl="blockwise",
      attention_block=32, moe_dispatch="ragged", grouped_matmul="megablox",
      ep_exchange="ragged", ep_capacity_factor=1.25)
  c = common.base_config(model)
  c.total_steps = 20
  c.batch_size, c.seq_len = 8, 64
  c.balance.bias_rate = 1e-3
  c.data.tokenizer = "bytes"
  c.model.vocab_size = 257
  c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 2, 2
  if arg == "guard":
    c.model.vocab_size = 65536
    c.model.moe_ffn_dim = 128                  # Mosaic's lane width: megablox's tiles
    c.model.attention_block = 128
    c.model.remat_policy = "dots_no_batch"     # the 671B config's policy
    c.batch_size, c.seq_len, c.microbatches = 8, 1024, -1
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, -1, 2, 2
  elif arg:
    raise ValueError(f"tpu_smoke: unknown variant {arg!r} (known: guard)")
  return c
