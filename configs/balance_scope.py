"""The balance-scope experiment's model and data: where loads are counted, on domains.

  python -m experiments.train --config=configs/balance_scope.py:strategy=bias,scope=micro,composition=single_domain --workdir=DIR

Arguments (comma-separated key=value after the colon):
  strategy     bias | batch_aux | seq_aux | quantile | ... (deepseek_jax/balancing.py
               STRATEGIES)
  scope        micro | global: balance.count_scope, where the batch-level losses count
               f_i and the bias counts loads (seq_aux counts per sequence whatever this
               says: its cells are labelled "sequence")
  composition  mixed | single_domain: data.composition (one domain per micro-batch)
  steps        training steps (default 300)

The sign-rule bias moves at u = 1e-2 a step (u / 4 after each micro-batch under micro
scope: the same largest move a step). Data: the embedded domains (code, prose, structured text cut from the Python install,
data/domains.py) in bytes, equal weights. 4 micro-batches of 4 sequences a step, so that
micro scope counts one micro-batch (one domain under single_domain) at a time. Model:
2 routed layers of 16 experts, top-2, sigmoid gate, on a dense first layer: small enough
that 42 runs fit an hour on 2 cores.
"""

from configs import common, small
from deepseek_jax.model.config import ModelConfig

SCOPES = ("micro", "global")
STEPS = 300
BIAS_RATE = 1e-2


def get_config(arg=None):
  args = dict(kv.split("=", 1) for kv in arg.split(",")) if arg else {}
  unknown = sorted(set(args) - {"strategy", "scope", "composition", "steps"})
  if unknown:
    raise ValueError(f"configs/balance_scope.py: unknown argument(s) {unknown}; known: "
                     "strategy, scope, composition, steps")
  model = ModelConfig(
      vocab_size=257, d_model=64, n_layers=3, n_heads=2, q_lora_rank=None,
      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
      ffn_dim=192, moe_ffn_dim=32, first_k_dense=1, n_shared_experts=1,
      n_routed_experts=16, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=1.0,
      score_func="sigmoid", mtp_depth=0, init_std=0.02)
  c = common.base_config(model)
  c.batch_size, c.seq_len, c.microbatches = 16, 128, 4
  c.total_steps = int(args.get("steps", STEPS))
  c.log_every = 10
  c.eval_every = c.total_steps
  c.eval_batches = 8
  c.final_eval_batches = 8     # the per-domain evaluation is the experiment's own
  c.checkpoint_every = c.total_steps
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = max(c.total_steps // 20, 1)
  c.optimizer.decay_start_frac = 0.5
  c.data.source, c.data.tokenizer = "domains", "bytes"
  c.data.domain_bytes = 4 << 20
  c.data.val_fraction = 0.1     # ~400 KB of validation text a domain
  c.data.composition = args.get("composition", "mixed")
  scope = args.get("scope", "global")
  if scope not in SCOPES:
    raise ValueError(f"configs/balance_scope.py: scope must be one of {SCOPES}; got "
                     f"{scope!r}")
  c.balance.count_scope = scope
  small.apply_strategy(c, args.get("strategy", "bias"))
  if c.balance.bias_rule in ("sign", "magnitude") and c.balance.bias_rate:
    # Runs of a few hundred steps: u = 1e-2 a step (LFB's 1e-3 moves a bias by at most
    # 0.3 in 300 steps). Micro scope updates after each of the M micro-batches, so it
    # takes u / M a time: the same largest move a step as global scope, so that the
    # scopes differ in what they count, not in how fast the bias may move.
    c.balance.bias_rate = BIAS_RATE / (c.microbatches if scope == "micro" else 1)
  return c
