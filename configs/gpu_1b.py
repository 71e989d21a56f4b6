"""LFB's 1B-class MoE (SPEC.md section 4) sized for one NVIDIA GPU (an H200, 141 GB).

  python -m experiments.train --config=configs/gpu_1b.py --workdir=runs/gpu_1b
  python -m experiments.train --config=configs/gpu_1b.py:attention=tokamax,experts=xla ...

LFB's 1B model: d 1024, 9 MoE layers of 2 shared + 64 routed experts, top-6, sigmoid
gate, no group limit. Here with one dense layer first (V3's layout), MLA at V3's head
dims (qk 128 + 64 rope, v 128: cuDNN's unequal-head-dim case), expert width 512: 1.05B
parameters, 0.23B activated per token (experiments.param_count). bfloat16 compute over
float32 master weights and AdamW state; V3's packing without cross-document masks, so
the fused kernels run their causal-only fast path.

Arguments (comma-separated key=value after the colon):
  attention  cudnn (default; jax's cuDNN flash attention) | tokamax | plain | blockwise
  experts    tokamax (default; tokamax's grouped GEMM) | xla (jax.lax.ragged_dot, dense
             over experts on XLA:GPU 0.10) | dropless (the block loop, the CPU path)
  strategy   a name of deepseek_jax/balancing.py STRATEGIES (default bias)
"""

from configs import common, small
from deepseek_jax.model.config import ModelConfig

EXPERTS = {
    "tokamax": dict(moe_dispatch="ragged", grouped_matmul="tokamax"),
    "xla": dict(moe_dispatch="ragged", grouped_matmul="xla"),
    "dropless": dict(moe_dispatch="dropless"),
}


def model_config(attention: str = "cudnn", experts: str = "tokamax") -> ModelConfig:
  if experts not in EXPERTS:
    raise ValueError(f"unknown experts={experts!r}; known: {sorted(EXPERTS)}")
  return ModelConfig(
      vocab_size=32768, d_model=1024, n_layers=10, n_heads=8, q_lora_rank=None,
      kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
      ffn_dim=4096, moe_ffn_dim=512, first_k_dense=1, n_shared_experts=2,
      n_routed_experts=64, top_k=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
      score_func="sigmoid", mtp_depth=0, init_std=0.006, dtype="bfloat16",
      param_dtype="float32", attention_impl=attention, **EXPERTS[experts])


def get_config(arg=None):
  args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
  unknown = set(args) - {"attention", "experts", "strategy"}
  if unknown:
    raise ValueError(f"unknown argument(s) {sorted(unknown)} for configs/gpu_1b.py; known: "
                     "attention, experts, strategy")
  c = common.base_config(model_config(args.get("attention", "cudnn"),
                                      args.get("experts", "tokamax")))
  c.batch_size = 16
  c.seq_len = 2048
  c.total_steps = 20000
  c.log_every = 20
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.optimizer.peak_lr = 4.2e-4       # V3's small MoE ablations' order of magnitude
  c.optimizer.warmup_steps = 500
  c.data.doc_attention_mask = False  # V3: documents packed without cross-sample masks
  return small.apply_strategy(c, args.get("strategy", "bias"))
