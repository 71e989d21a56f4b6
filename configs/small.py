"""The balancing-ablation model (LFB-shaped, scaled down to a laptop), one strategy a run.

  python -m experiments.train --config=configs/small.py --workdir=/tmp/small
  python -m experiments.train --config=configs/small.py:strategy=aux,size=medium --workdir=DIR

Arguments (comma-separated key=value after the colon):
  strategy  a name of deepseek_jax/balancing.py STRATEGIES (default bias)
  size      tiny (tests), small (default; the main job of README.md, "Quickstart"), medium
  rate      overrides the bias update rate u (the --sweep=rate and pareto runs)
  alpha     overrides the alpha of the strategy's own loss: aux_alpha for aux,
            seq_aux_alpha for seq_aux, batch_aux_alpha for batch_aux (the --sweep=pareto
            runs)
  gate      sigmoid (default; V3's and LFB's 1B gate) or softmax (V2's)
"""

from configs import common
from deepseek_jax import balancing
from deepseek_jax.model.config import ModelConfig

# LFB's 1B model: 9 MoE layers, 2 shared + 64 routed top-6, sigmoid gate, no group limit.
# size small has LFB's expert layout (2 shared + 64 routed, top-6) with experts of width
# 32 (d_model / 4): measured as fast per step as 1 shared + 16 routed top-4 of width 64,
# which width 64 at 64 experts is not (1.35x slower; docs/results.md, "The miniature's
# expert layout").
SIZES = {
    "tiny": dict(model=dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2,
                            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=8, v_head_dim=8, ffn_dim=64, moe_ffn_dim=16,
                            n_routed_experts=8, top_k=2),
                 batch_size=8, seq_len=64, total_steps=30),
    "small": dict(model=dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4,
                             q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                             qk_rope_head_dim=16, v_head_dim=32, ffn_dim=384, moe_ffn_dim=32,
                             n_shared_experts=2, n_routed_experts=64, top_k=6),
                  batch_size=16, seq_len=128, total_steps=400),
    "medium": dict(model=dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=8,
                              q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                              qk_rope_head_dim=16, v_head_dim=32, ffn_dim=768,
                              moe_ffn_dim=96, n_routed_experts=32, top_k=6),
                   batch_size=32, seq_len=512, total_steps=2000),
}


def get_config(arg=None):
  args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
  size = args.get("size", "small")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; known: {sorted(SIZES)}")
  s = SIZES[size]
  model = ModelConfig(**{**dict(first_k_dense=1, n_shared_experts=1, n_group=1,
                                topk_group=1, routed_scaling_factor=1.0,
                                score_func="sigmoid", mtp_depth=0, init_std=0.02),
                         **s["model"]})
  c = common.base_config(model)
  c.batch_size = s["batch_size"]
  c.seq_len = s["seq_len"]
  c.total_steps = s["total_steps"]
  c.log_every = 10
  c.eval_every = max(c.total_steps // 6, 1)
  c.eval_batches = 8
  c.final_eval_batches = -1      # MaxVio_global over the WHOLE validation set
  c.checkpoint_every = c.total_steps
  c.optimizer.peak_lr = 2e-3
  c.optimizer.warmup_steps = max(c.total_steps // 20, 1)
  c.optimizer.decay_start_frac = 0.5
  apply_strategy(c, args.get("strategy", "bias"))
  if "rate" in args:
    c.balance.bias_rate = float(args["rate"])
  if "alpha" in args:
    loss = ALPHA_OF.get(args.get("strategy", "bias"))
    if loss is None:
      raise ValueError(f"alpha= applies to the strategies {sorted(ALPHA_OF)}; got "
                       f"strategy={args.get('strategy', 'bias')}")
    common.set_path(c, loss, float(args["alpha"]))
  gate = args.get("gate", "sigmoid")
  if gate not in GATES:
    raise ValueError(f"unknown gate {gate!r}; known: {GATES}")
  c.model.score_func = gate
  return c


# The loss whose alpha `alpha=` sets, per strategy (one knob each: the Pareto families).
ALPHA_OF = {"aux": "balance.aux_alpha",
            "seq_aux": "balance.seq_aux_alpha", "batch_aux": "balance.batch_aux_alpha"}
GATES = ("sigmoid", "softmax")


def apply_strategy(c, name: str):
  """The strategy's settings (deepseek_jax/balancing.py STRATEGIES) on config c."""
  for k, v in balancing.strategy(name).settings.items():
    common.set_path(c, k, v)
  return c
