"""The rules a ModelConfig must satisfy, checked once when it is built: a broken rule
raises a ValueError naming the field, the rule and the value (config.py holds the fields
and what they mean)."""

from __future__ import annotations

_SCORE_FUNCS = ("sigmoid", "softmax")
_EP_OVERFLOW = ("rounds", "drop")
_EP_EXCHANGES = ("padded", "ragged")
# The routed experts' values remat_save_experts can keep (dispatch.experts_ragged and
# ragged_exchange.ragged_round name them).
SAVEABLE_EXPERT_NAMES = ("moe_gate", "moe_up", "moe_recv")
_DISPATCHES = ("dropless", "capacity", "ragged", "reference")
_ATTENTION_IMPLS = ("plain", "blockwise", "blockwise_latent", "cudnn", "tokamax")
_GROUPED_MATMULS = ("xla", "tokamax", "megablox")
# jax.checkpoint policies by name (layers.remat_policy): what a rematerialised block keeps.
REMAT_POLICIES = ("nothing", "dots", "dots_no_batch", "everything")
_BIAS_MODES = ("add", "mul")
_DTYPES = ("float32", "bfloat16", "float16")


def validate(c) -> None:
  """Raises ValueError naming the first broken rule of ModelConfig c."""
  _check_sizes(c)
  _check_routing(c)
  _check_dispatch(c)
  _check_layers(c)


def _bad(c, field: str, rule: str):
  raise ValueError(f"ModelConfig.{field}: {rule} (got {getattr(c, field)!r})")


def _check_sizes(c) -> None:
  """Every size and scale: positive, within the model, the expert groups consistent."""
  for f in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_dim",
            "moe_ffn_dim", "n_routed_experts", "top_k", "n_group", "topk_group",
            "rope_original_max_len"):
    if not isinstance(getattr(c, f), int) or getattr(c, f) <= 0:
      _bad(c, f, "must be a positive integer")
  for f in ("first_k_dense", "n_shared_experts", "mtp_depth"):
    if not isinstance(getattr(c, f), int) or getattr(c, f) < 0:
      _bad(c, f, "must be a non-negative integer")
  for f in ("rope_theta", "rms_eps", "init_std", "routed_scaling_factor", "beta_fast",
            "beta_slow"):
    if not getattr(c, f) > 0:
      _bad(c, f, "must be positive")
  if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
    _bad(c, "q_lora_rank", "must be a positive integer or None (plain query projection)")
  if c.qk_rope_head_dim % 2:
    _bad(c, "qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
  if c.first_k_dense > c.n_layers:
    _bad(c, "first_k_dense", f"cannot exceed n_layers={c.n_layers}")
  if c.top_k > c.n_routed_experts:
    _bad(c, "top_k", f"cannot exceed n_routed_experts={c.n_routed_experts}")
  if c.n_routed_experts % c.n_group:
    _bad(c, "n_group", f"must divide n_routed_experts={c.n_routed_experts}")
  if c.topk_group > c.n_group:
    _bad(c, "topk_group", f"cannot exceed n_group={c.n_group}")
  per_group = c.n_routed_experts // c.n_group
  if c.topk_group * per_group < c.top_k:
    _bad(c, "topk_group", f"keeps {c.topk_group} group(s) x {per_group} expert(s) = "
         f"{c.topk_group * per_group}, fewer than top_k={c.top_k}")
  if c.n_group > 1 and per_group < 2:
    _bad(c, "n_group", "group scores sum each group's top-2 affinities, so every group "
         "needs at least 2 experts")


def _check_routing(c) -> None:
  """The router's choices and the statistics the balancing reads from it."""
  if c.score_func not in _SCORE_FUNCS:
    _bad(c, "score_func", f"must be one of {_SCORE_FUNCS}")
  if c.bias_mode not in _BIAS_MODES:
    _bad(c, "bias_mode", f"must be one of {_BIAS_MODES}")
  if not isinstance(c.quantile_stats, bool):
    _bad(c, "quantile_stats", "must be True or False")
  if c.quantile_stats and c.bias_mode != "add":
    _bad(c, "quantile_stats", "Quantile Balancing sets an additive bias: needs bias_mode='add'")
  if c.quantile_stats and c.topk_group < c.n_group:
    _bad(c, "quantile_stats", f"Quantile Balancing's thresholds are those of plain top-K "
         f"routing, but topk_group={c.topk_group} < n_group={c.n_group} limits each token "
         "to its best groups, so they would balance a routing the model does not do: set "
         "topk_group = n_group (or n_group = 1) to use it")
  if not isinstance(c.route_limit_by_shard, bool):
    _bad(c, "route_limit_by_shard", "must be True or False")
  if c.route_limit_by_shard and c.n_group == 1:
    _bad(c, "route_limit_by_shard", "needs n_group > 1: the routing groups are what is "
         "mapped onto expert-axis shards")


def _check_dispatch(c) -> None:
  """How the routed experts run: the dispatch, its buffers, the expert-parallel
  exchange, the grouped matmul and what remat saves of them."""
  if c.moe_dispatch not in _DISPATCHES:
    _bad(c, "moe_dispatch", f"must be one of {_DISPATCHES}")
  if not c.capacity_factor > 0:
    _bad(c, "capacity_factor", "must be positive")
  if c.ep_capacity_factor is not None and not c.ep_capacity_factor > 0:
    _bad(c, "ep_capacity_factor", "must be positive or None (the dispatch's own rule)")
  if c.ep_overflow not in _EP_OVERFLOW:
    _bad(c, "ep_overflow", f"must be one of {_EP_OVERFLOW}")
  if c.ep_exchange not in _EP_EXCHANGES:
    _bad(c, "ep_exchange", f"must be one of {_EP_EXCHANGES}")
  if c.ep_exchange == "ragged" and (c.ep_capacity_factor is None
                                    or c.moe_dispatch != "ragged"
                                    or c.ep_overflow != "rounds"):
    _bad(c, "ep_exchange", "'ragged' sizes its receive buffer by ep_capacity_factor (set "
         "one, e.g. 1.25), runs the grouped matmul of moe_dispatch='ragged' and sends what "
         "does not fit in further rounds (ep_overflow='rounds')")
  names = [n for n in str(c.remat_save_experts).split(",") if n]
  if not isinstance(c.remat_save_experts, str) or set(names) - set(SAVEABLE_EXPERT_NAMES):
    _bad(c, "remat_save_experts", f"must be comma-separated names from "
         f"{SAVEABLE_EXPERT_NAMES} (or empty)")
  if c.moe_block_size is not None and (not isinstance(c.moe_block_size, int)
                                       or c.moe_block_size <= 0):
    _bad(c, "moe_block_size", "must be a positive integer or None (automatic)")
  if c.grouped_matmul not in _GROUPED_MATMULS:
    _bad(c, "grouped_matmul", f"must be one of {_GROUPED_MATMULS}")
  if c.grouped_matmul != "xla" and c.moe_dispatch != "ragged":
    _bad(c, "grouped_matmul", f"{c.grouped_matmul!r} is the grouped matmul of "
         f"moe_dispatch='ragged', not of {c.moe_dispatch!r}: set moe_dispatch='ragged'")


def _check_layers(c) -> None:
  """RoPE, attention, remat, layer scan and dtypes."""
  if c.rope_factor < 1.0:
    _bad(c, "rope_factor", "must be >= 1 (1 switches YaRN off)")
  if c.remat_policy not in REMAT_POLICIES:
    _bad(c, "remat_policy", f"must be one of {REMAT_POLICIES}")
  if c.attention_impl not in _ATTENTION_IMPLS:
    _bad(c, "attention_impl", f"must be one of {_ATTENTION_IMPLS}")
  if c.attention_impl == "cudnn" and c.dtype not in ("bfloat16", "float16"):
    _bad(c, "attention_impl", f"'cudnn' runs in bfloat16 or float16 only, not dtype="
         f"{c.dtype!r}: set dtype='bfloat16' (parameters can stay float32)")
  if not isinstance(c.attention_block, int) or c.attention_block <= 0:
    _bad(c, "attention_block", "must be a positive integer")
  if not isinstance(c.scan_layers, bool):
    _bad(c, "scan_layers", "must be True or False")
  for f in ("dtype", "param_dtype"):
    if getattr(c, f) not in _DTYPES:
      _bad(c, f, f"must be one of {_DTYPES}")
