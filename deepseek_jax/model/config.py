"""The model configuration: one frozen, validated dataclass and its named presets.

Field names follow the DeepSeek-V3 report and the Hugging Face config where they exist
(see SPEC.md section 7 for the mapping); every field is validated once, when built, by
config_checks.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from deepseek_jax.model import config_checks

# Removed fields, at the one value the model still computes: a saved run's config may
# hold them (from_dict drops them; resuming and --reuse ignore them). aux_group_limited
# (issue 37): True took the balance losses' f_i from the group-limited top-K, this
# code's misreading of V3 eq. 18 until issue 13, no baseline of the report's.
RETIRED_FIELDS = {"aux_group_limited": False}


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
  # MoEStats also carry Quantile Balancing's per-expert bias target (balancing.py rule
  # "quantile"): one sort of the [tokens, E] selection scores per routed layer.
  quantile_stats: bool = False
  # Routed-expert dispatch (moe.py). V3 drops no token, and neither do the default
  # "dropless" (tokens sorted by expert into fixed-size blocks, a loop over the live
  # blocks: fast on XLA:CPU; for a handful of tokens, as in decoding, every expert runs
  # densely instead) nor "ragged" (rows sorted by expert, one grouped matmul
  # jax.lax.ragged_dot per projection: reads each expert's weights once; the TPU/GPU
  # path and the 671B config's, slow on XLA:CPU). "capacity" is a BASELINE kept for
  # comparison, not V3's: GShard/Switch-style token dropping (a capacity-padded einsum,
  # assignments past capacity dropped and counted). "reference" runs every expert on
  # every token (slow, obviously correct: the tests' yardstick).
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
  # parallelism: "rounds" (the default, V3's) sends them in further rounds of the same
  # all-to-all until every pair is sent (dropless; memory bounded by one round's
  # buffers, rounds = the worst destination's queue / C, agreed by every shard); "drop"
  # drops and counts them, a token-dropping BASELINE kept for comparison.
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
  # What a rematerialised block saves for its backward (config_checks.REMAT_POLICIES): "nothing"
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
    config_checks.validate(self)

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
    d = dict(d)
    for name, value in RETIRED_FIELDS.items():
      if name in d and d.pop(name) != value:
        raise ValueError(f"ModelConfig.{name} was removed; only {name}={value!r}, what "
                         "the model still computes, can be read from a saved config")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
    return cls(**d)


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
