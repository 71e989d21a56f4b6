"""The model configuration: one frozen, validated dataclass and its named presets.

Field names follow the DeepSeek-V3 report and the Hugging Face config where they exist
(see SPEC.md section 7 for the mapping); every size is validated once, when built.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

_SCORE_FUNCS = ("sigmoid", "softmax")
_EP_OVERFLOW = ("rounds", "drop")
_EP_EXCHANGES = ("padded", "ragged")
# The routed experts' values remat_save_experts can keep (dispatch.experts_ragged and
# expert_parallel.ragged_round name them).
SAVEABLE_EXPERT_NAMES = ("moe_gate", "moe_up", "moe_recv")
_DISPATCHES = ("dropless", "capacity", "ragged", "reference")
_ATTENTION_IMPLS = ("plain", "blockwise", "blockwise_latent", "cudnn", "tokamax")
_GROUPED_MATMULS = ("xla", "tokamax", "megablox")
# jax.checkpoint policies by name (layers.remat_policy): what a rematerialised block keeps.
REMAT_POLICIES = ("nothing", "dots", "dots_no_batch", "everything")
_BIAS_MODES = ("add", "mul")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every knob of a DeepSeek-V3-style model. Sizes use the shape letters of layers.py."""

  vocab_size: int = 256                 # V
  d_model: int = 64                     # D
  n_layers: int = 2
  n_heads: int = 4                      # N
  q_lora_rank: int | None = 32          # Q; None: one plain query projection
  kv_lora_rank: int = 16                # R
  qk_nope_head_dim: int = 16            # H
  qk_rope_head_dim: int = 8             # P
  v_head_dim: int = 16                  # O
  ffn_dim: int = 128                    # F of the dense layers
  moe_ffn_dim: int = 32                 # F of each expert (shared and routed)
  first_k_dense: int = 1                # the first layers use a dense FFN
  n_shared_experts: int = 1
  n_routed_experts: int = 8             # E
  top_k: int = 2                        # K
  n_group: int = 1                      # G
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  score_func: str = "sigmoid"
  norm_topk_prob: bool = True
  # How the balancing bias b (transformer.py's "balance" collection) steers expert selection:
  # "add" picks the top-K of s_i + b_i with b initialised to 0 (V3, LFB); "mul" picks
  # the top-K of s_i * b_i with b initialised to 1 (LFB's multiplicative variant).
  # Gates always use the unbiased s_i.
  bias_mode: str = "add"
  # The routing map f_i of the balance losses (MoEStats.aux_count_BE): plain top-K of the
  # unbiased scores over ALL routed experts (False; V3 eq. 18 as written, Megatron), or
  # top-K inside the topk_group best groups, the model's own routing minus the bias
  # (True; this codebase's reading before the fix). Same when n_group == 1.
  aux_group_limited: bool = False
  # MoEStats also carry Quantile Balancing's per-expert bias target (balancing.py rule
  # "quantile"): one sort of the [tokens, E] selection scores per routed layer.
  quantile_stats: bool = False
  # Routed-expert dispatch (moe.py): "dropless" (tokens sorted by expert into
  # fixed-size blocks, a loop over the live blocks: never drops, fast on XLA:CPU; for
  # a handful of tokens, as in decoding, every expert runs densely instead),
  # "capacity" (capacity-padded einsum, drops past capacity and counts them), "ragged"
  # (rows sorted by expert, one grouped matmul jax.lax.ragged_dot per projection: reads
  # each expert's weights once; the TPU/GPU path, slow on XLA:CPU) or "reference"
  # (every expert on every token; slow, obviously correct).
  moe_dispatch: str = "dropless"
  # "capacity" only: slots per expert = ceil(capacity_factor * tokens * K / E).
  capacity_factor: float = 1.25
  # "dropless" only: rows per block; None picks one from tokens and experts.
  moe_block_size: int | None = None
  # Expert parallelism (expert_parallel.py, on whenever the mesh's expert axis is > 1):
  # "capacity" gives each shard's send buffer ceil(capacity_factor * tokens * fanout / Z)
  # token rows per destination shard (Z shards, fanout the most shards a token reaches),
  # drops counted; the other dispatches never drop. route_limit_by_shard=True demands
  # that the mesh keep each routing group on one shard (n_group a multiple of
  # mesh.expert), so each token visits at most topk_group shards (V3's node limit M).
  route_limit_by_shard: bool = False
  # Expert-parallel buffers at scale: None keeps the rule above (dropless, C = tokens,
  # unless moe_dispatch == "capacity"). A number f sizes every buffer by tokens x K /
  # shards instead, whatever the local dispatch: C = ceil(f * tokens * fanout / Z) send
  # rows per destination shard, and with moe_dispatch "ragged" ceil(f * tokens * K)
  # local expert rows on the receiving shard; what does not fit is dropped and counted
  # when ep_overflow == "drop".
  ep_capacity_factor: float | None = None
  # What happens to (token, shard) pairs past a destination's C rows under expert
  # parallelism: "rounds" sends them in further rounds of the same all-to-all until every
  # pair is sent (dropless, as V3; memory bounded by one round's buffers, rounds = the
  # worst destination's queue / C, agreed by every shard); "drop" drops and counts them.
  # moe_dispatch "capacity" always drops (it is the capacity baseline).
  ep_overflow: str = "rounds"
  # How tokens travel under expert parallelism (expert_parallel.py). "padded": one row per
  # (token, destination shard) in [Z, C] all_to_all buffers (C from ep_capacity_factor),
  # the local experts over every received row's expert slots; the readable path, and the
  # capacity baselines'. "ragged": one row per assignment moved by ragged_all_to_all into
  # a receive buffer of ceil(f * tokens * K) rows (f = ep_capacity_factor, required),
  # rounds only when a destination's total exceeds it, the grouped matmul over those rows
  # (moe_dispatch "ragged"; dropless: ep_overflow "rounds").
  ep_exchange: str = "padded"
  # Under remat, also save these named values of the routed experts (comma-separated;
  # "" saves none): "moe_gate", "moe_up" (the gate and up products: the backward then
  # recomputes no routed matmul of the first round) and "moe_recv" (the rows the
  # expert-parallel exchange received: no exchange is run again either). Overflow
  # rounds recompute theirs. Costs their memory in every layer (docs/pod.md, "Saving the
  # routed products").
  remat_save_experts: str = ""
  # The grouped matmul of moe_dispatch "ragged": "xla" (jax.lax.ragged_dot; XLA:GPU in
  # jaxlib 0.10 rewrites it into a dense product over every expert) or "tokamax"
  # (tokamax.ragged_dot: a grouped-GEMM kernel, Mosaic GPU on Hopper, Triton elsewhere,
  # its XLA fallback on CPU). Needs `pip install -e ".[cuda]"` (or tokamax) for "tokamax".
  # "megablox" (jax's Pallas grouped matmul for TPU: gmm, and tgmm for the weight
  # gradient, both over the tiles that hold rows; XLA's TPU lowering of ragged_dot
  # computes the weight gradient as a masked product over every group, E times the work;
  # docs/pod.md, "Pod efficiency"; jax.lax.ragged_dot off TPU).
  grouped_matmul: str = "xla"
  rope_theta: float = 10000.0
  # YaRN (V3 4.3). rope_factor 1.0 switches it off.
  rope_factor: float = 1.0
  rope_original_max_len: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  rms_eps: float = 1e-6
  mtp_depth: int = 0                    # D of the MTP section (number of modules)
  # What MTP module 1 reads as h_0: the main model's last hidden state before its final
  # norm (False; the V3 report's eq. 21 reading, each module passing on its un-normed
  # output) or after it (True: what HF transformers and vLLM feed the released MTP
  # weights, each module then passing on its normed output as HF's MtpModel does; vLLM
  # passes the un-normed output on, which differs only from depth 2, and V3 releases
  # depth 1). Checkpoint import sets True. See docs/design.md, "MTP".
  mtp_feed_normed: bool = False
  init_std: float = 0.006
  tie_embeddings: bool = False
  dtype: str = "float32"                # compute dtype
  param_dtype: str = "float32"
  remat: bool = False                   # rematerialise each block in the backward pass
  # What a rematerialised block saves for its backward (REMAT_POLICIES): "nothing"
  # (only the block's input; recompute everything), "dots" (every matmul output),
  # "dots_no_batch" (matmuls without batch dims: the weight products, not attention's),
  # "everything" (no recompute; remat then only changes scheduling).
  remat_policy: str = "nothing"
  # Stack the dense and the MoE blocks and run each stack with one flax scan (the
  # parameters get a leading layer dim): compile time and program size independent of
  # depth. Inference and HF interop convert (transformer.unstack_layers).
  scan_layers: bool = False
  # Training attention: "plain" materialises the [B, N, T, S] scores; "blockwise" is an
  # online-softmax over key blocks inside rematerialised query blocks of
  # attention_block tokens (no score tensor beyond [B, N, block, block]);
  # "blockwise_latent" the same with K and V up-projected per key block from the latent
  # (never the whole sequence's K and V: the 128K stage's choice). For GPUs
  # (fused_attention.py): "cudnn" is jax.nn.dot_product_attention's cuDNN flash
  # attention (bfloat16/float16 compute; V padded to the qk head dim), "tokamax"
  # tokamax's (a Mosaic GPU flash kernel on Hopper; other value head dims natively).
  attention_impl: str = "plain"
  attention_block: int = 512

  def __post_init__(self):
    _validate(self)

  # Derived sizes -------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.first_k_dense

  @property
  def n_routed_layers(self) -> int:
    """Layers with a router (and a balancing-bias row): main MoE layers, then MTP blocks."""
    return self.n_moe_layers + (self.mtp_depth if self.mtp_is_moe else 0)

  @property
  def mtp_is_moe(self) -> bool:
    # V3's MTP block is a MoE block like the last main layer; a model with no MoE
    # layer at all gets dense MTP blocks.
    return self.n_moe_layers > 0

  def is_moe_layer(self, layer: int) -> bool:
    return layer >= self.first_k_dense

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def yarn(self) -> bool:
    return self.rope_factor > 1.0

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**dict(d))


def _validate(c: ModelConfig) -> None:
  def bad(field, rule):
    raise ValueError(f"ModelConfig.{field}: {rule} (got {getattr(c, field)!r})")

  for f in ("vocab_size", "d_model", "n_layers", "n_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "ffn_dim",
            "moe_ffn_dim", "n_routed_experts", "top_k", "n_group", "topk_group",
            "rope_original_max_len"):
    if not isinstance(getattr(c, f), int) or getattr(c, f) <= 0:
      bad(f, "must be a positive integer")
  for f in ("first_k_dense", "n_shared_experts", "mtp_depth"):
    if not isinstance(getattr(c, f), int) or getattr(c, f) < 0:
      bad(f, "must be a non-negative integer")
  for f in ("rope_theta", "rms_eps", "init_std", "routed_scaling_factor", "beta_fast",
            "beta_slow"):
    if not getattr(c, f) > 0:
      bad(f, "must be positive")
  if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
    bad("q_lora_rank", "must be a positive integer or None (plain query projection)")
  if c.qk_rope_head_dim % 2:
    bad("qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
  if c.first_k_dense > c.n_layers:
    bad("first_k_dense", f"cannot exceed n_layers={c.n_layers}")
  if c.top_k > c.n_routed_experts:
    bad("top_k", f"cannot exceed n_routed_experts={c.n_routed_experts}")
  if c.n_routed_experts % c.n_group:
    bad("n_group", f"must divide n_routed_experts={c.n_routed_experts}")
  if c.topk_group > c.n_group:
    bad("topk_group", f"cannot exceed n_group={c.n_group}")
  per_group = c.n_routed_experts // c.n_group
  if c.topk_group * per_group < c.top_k:
    bad("topk_group", f"keeps {c.topk_group} group(s) x {per_group} expert(s) = "
        f"{c.topk_group * per_group}, fewer than top_k={c.top_k}")
  if c.n_group > 1 and per_group < 2:
    bad("n_group", "group scores sum each group's top-2 affinities, so every group "
        "needs at least 2 experts")
  if c.score_func not in _SCORE_FUNCS:
    bad("score_func", f"must be one of {_SCORE_FUNCS}")
  if c.bias_mode not in _BIAS_MODES:
    bad("bias_mode", f"must be one of {_BIAS_MODES}")
  if c.moe_dispatch not in _DISPATCHES:
    bad("moe_dispatch", f"must be one of {_DISPATCHES}")
  if not c.capacity_factor > 0:
    bad("capacity_factor", "must be positive")
  if c.ep_capacity_factor is not None and not c.ep_capacity_factor > 0:
    bad("ep_capacity_factor", "must be positive or None (the dispatch's own rule)")
  if c.ep_overflow not in _EP_OVERFLOW:
    bad("ep_overflow", f"must be one of {_EP_OVERFLOW}")
  if c.ep_exchange not in _EP_EXCHANGES:
    bad("ep_exchange", f"must be one of {_EP_EXCHANGES}")
  if c.ep_exchange == "ragged" and (c.ep_capacity_factor is None
                                    or c.moe_dispatch != "ragged"
                                    or c.ep_overflow != "rounds"):
    bad("ep_exchange", "'ragged' sizes its receive buffer by ep_capacity_factor (set "
        "one, e.g. 1.25), runs the grouped matmul of moe_dispatch='ragged' and sends what "
        "does not fit in further rounds (ep_overflow='rounds')")
  names = [n for n in str(c.remat_save_experts).split(",") if n]
  if not isinstance(c.remat_save_experts, str) or set(names) - set(SAVEABLE_EXPERT_NAMES):
    bad("remat_save_experts", f"must be comma-separated names from "
        f"{SAVEABLE_EXPERT_NAMES} (or empty)")
  if c.moe_block_size is not None and (not isinstance(c.moe_block_size, int)
                                       or c.moe_block_size <= 0):
    bad("moe_block_size", "must be a positive integer or None (automatic)")
  for f in ("aux_group_limited", "quantile_stats"):
    if not isinstance(getattr(c, f), bool):
      bad(f, "must be True or False")
  if c.quantile_stats and c.bias_mode != "add":
    bad("quantile_stats", "Quantile Balancing sets an additive bias: needs bias_mode='add'")
  if c.quantile_stats and c.topk_group < c.n_group:
    bad("quantile_stats", f"Quantile Balancing's thresholds are those of plain top-K "
        f"routing, but topk_group={c.topk_group} < n_group={c.n_group} limits each token "
        "to its best groups, so they would balance a routing the model does not do: set "
        "topk_group = n_group (or n_group = 1) to use it")
  if not isinstance(c.route_limit_by_shard, bool):
    bad("route_limit_by_shard", "must be True or False")
  if c.route_limit_by_shard and c.n_group == 1:
    bad("route_limit_by_shard", "needs n_group > 1: the routing groups are what is mapped "
        "onto expert-axis shards")
  if c.rope_factor < 1.0:
    bad("rope_factor", "must be >= 1 (1 switches YaRN off)")
  if c.remat_policy not in REMAT_POLICIES:
    bad("remat_policy", f"must be one of {REMAT_POLICIES}")
  if c.attention_impl not in _ATTENTION_IMPLS:
    bad("attention_impl", f"must be one of {_ATTENTION_IMPLS}")
  if c.attention_impl == "cudnn" and c.dtype not in ("bfloat16", "float16"):
    bad("attention_impl", f"'cudnn' runs in bfloat16 or float16 only, not dtype="
        f"{c.dtype!r}: set dtype='bfloat16' (parameters can stay float32)")
  if c.grouped_matmul not in _GROUPED_MATMULS:
    bad("grouped_matmul", f"must be one of {_GROUPED_MATMULS}")
  if c.grouped_matmul != "xla" and c.moe_dispatch != "ragged":
    bad("grouped_matmul", f"{c.grouped_matmul!r} is the grouped matmul of "
        f"moe_dispatch='ragged', not of {c.moe_dispatch!r}: set moe_dispatch='ragged'")
  if not isinstance(c.attention_block, int) or c.attention_block <= 0:
    bad("attention_block", "must be a positive integer")
  if not isinstance(c.scan_layers, bool):
    bad("scan_layers", "must be True or False")
  for f in ("dtype", "param_dtype"):
    if getattr(c, f) not in _DTYPES:
      bad(f, f"must be one of {_DTYPES}")


def yarn_mscale(factor: float, mscale: float) -> float:
  """YaRN's attention temperature term 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
  return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


# Presets ---------------------------------------------------------------------

def deepseek_v3_671b() -> ModelConfig:
  """The released DeepSeek-V3 layout (report Sec. 4.2, HF config.json)."""
  return ModelConfig(
      vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
      ffn_dim=18432, moe_ffn_dim=2048, first_k_dense=3, n_shared_experts=1,
      n_routed_experts=256, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
      score_func="sigmoid", norm_topk_prob=True, rope_theta=10000.0, rope_factor=40.0,
      rope_original_max_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
      mscale_all_dim=1.0, rms_eps=1e-6, mtp_depth=1, init_std=0.006,
      dtype="bfloat16", param_dtype="float32")


def deepseek_v2_lite() -> ModelConfig:
  """V2-Lite as released (SPEC 6, HF config.json): no query compression, 2 shared + 64
  routed, top-6, softmax; YaRN factor 40 over a 4K original context with mscale =
  mscale_all_dim = 0.707 (its attention factor on cos/sin is then 1)."""
  return ModelConfig(
      vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, q_lora_rank=None,
      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
      ffn_dim=10944, moe_ffn_dim=1408, first_k_dense=1, n_shared_experts=2,
      n_routed_experts=64, top_k=6, n_group=1, topk_group=1, routed_scaling_factor=1.0,
      score_func="softmax", norm_topk_prob=False, rope_theta=10000.0, rope_factor=40.0,
      rope_original_max_len=4096, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
      mscale_all_dim=0.707, rms_eps=1e-6, mtp_depth=0, init_std=0.006)


def tiny() -> ModelConfig:
  """A few-thousand-parameter model for unit tests: every feature on."""
  return ModelConfig(
      vocab_size=97, d_model=32, n_layers=3, n_heads=2, q_lora_rank=24, kv_lora_rank=16,
      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, ffn_dim=64, moe_ffn_dim=16,
      first_k_dense=1, n_shared_experts=1, n_routed_experts=8, top_k=3, n_group=4,
      topk_group=2, routed_scaling_factor=2.5, mtp_depth=2, init_std=0.05)


def tiny_yarn() -> ModelConfig:
  """tiny() with no query compression and YaRN rope, the other branches of MLA."""
  return tiny().replace(q_lora_rank=None, rope_factor=4.0, rope_original_max_len=16,
                        mscale=0.7, mscale_all_dim=0.9, score_func="softmax",
                        norm_topk_prob=False)


def small() -> ModelConfig:
  """A small model with groups and MTP (the decode benchmark's drafter model): 1 shared +
  16 routed, top-4 in 4 groups. The balancing ablation's model is configs/small.py's."""
  return ModelConfig(
      vocab_size=2048, d_model=128, n_layers=4, n_heads=4, q_lora_rank=64,
      kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      ffn_dim=384, moe_ffn_dim=64, first_k_dense=1, n_shared_experts=1,
      n_routed_experts=16, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0,
      mtp_depth=1, init_std=0.02)


PRESETS = {
    "deepseek_v3_671b": deepseek_v3_671b,
    "deepseek_v2_lite": deepseek_v2_lite,
    "tiny": tiny,
    "tiny_yarn": tiny_yarn,
    "small": small,
}


def preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]().replace(**overrides)


def model_config_from(cd) -> ModelConfig:
  """A ModelConfig from a ConfigDict / mapping (e.g. `config.model` of a configs/ file)."""
  d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  return ModelConfig.from_dict(d)
