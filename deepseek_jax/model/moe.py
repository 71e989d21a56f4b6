"""DeepSeekMoE (V3 eqs 12-16): shared experts + fine-grained routed experts.

  h' = u + sum_shared FFN_s(u) + sum_routed g_i FFN_i(u)

Routing: affinities s = sigmoid(u . e_i) (or softmax); the balancing bias b only changes
WHICH experts are picked (top-K of s + b inside the topk_group best groups); the gates use
the unbiased s, normalised over the picked experts, times routed_scaling_factor.

The layer returns (output, MoEStats): the balancing code never reaches into the module.

The routed experts run through one of dispatch.py's paths (cfg.moe_dispatch:
reference, capacity, dropless or ragged), all equal up to float error when nothing is
dropped. On a mesh that only splits the batch, the dropless ones run per batch shard
(moe_meshes.per_batch_shard), each shard sorting its own tokens.
Under a mesh whose "expert" axis is > 1 (jax.set_mesh) they instead run expert-parallel
(expert_parallel.py: all-to-all inside shard_map); the router, the shared experts and the
statistics stay here, data-parallel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from deepseek_jax.model import dispatch, expert_parallel, moe_meshes
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.layers import SwiGLU, param
from deepseek_jax.model.partitioning import EXPERT, TOKENS


@struct.dataclass
class MoEStats:
  """Routing statistics of one MoE layer (stacked over layers by the model: leading L).

  load_E        tokens sent to each expert by the real (biased) routing; valid tokens only.
  load_BE       the same per sequence (evaluation sums it per data shard, with no
                collective).
  aux_count_BE  per sequence, tokens sent to each expert by PLAIN top-k of the unbiased
                scores (no bias) over all experts, the group limit ignored too (V3
                eq. 18): the routing map f_i of the balance losses.
  aux_prob_BE   per sequence, sum over tokens of the normalised unbiased scores
                s_i / sum_j s_j: the P_i of the balance losses (carries gradient).
  aux_score_BE  per sequence, sum over tokens of the raw affinities s_i (the classic
                auxiliary loss's P_i; carries gradient).
  n_tokens_B    valid tokens per sequence.
  dropped       routed assignments dropped for lack of capacity (0 unless a capacity:
                "capacity" dispatch, or ep_capacity_factor under expert parallelism).
  shards_per_token      mean over valid tokens of the distinct expert-axis shards its
                        experts live on (1 without expert parallelism): the all-to-all
                        fan-out that node-limited routing bounds by topk_group.
  max_shards_per_token  its maximum over tokens.
  quantile_target_E     cfg.quantile_stats only: Quantile Balancing's bias for this
                        batch (quantile_bias_target), centred.
  Under expert parallelism (expert_parallel.py) every count is summed over all shards.
  """
  load_E: jax.Array
  aux_count_BE: jax.Array
  aux_prob_BE: jax.Array
  aux_score_BE: jax.Array
  n_tokens_B: jax.Array
  dropped: jax.Array
  shards_per_token: jax.Array | None = None
  max_shards_per_token: jax.Array | None = None
  quantile_target_E: jax.Array | None = None
  load_BE: jax.Array | None = None


# Routing ---------------------------------------------------------------------

def affinities(logits_XE, cfg: ModelConfig):
  logits_XE = logits_XE.astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    return jax.nn.sigmoid(logits_XE)
  return jax.nn.softmax(logits_XE, axis=-1)


def biased_choice(scores_XE, bias_E, cfg: ModelConfig):
  """The selection scores: s + b (bias_mode "add") or s * b ("mul"); None: plain s."""
  if bias_E is None:
    return scores_XE
  bias_E = bias_E.astype(jnp.float32)
  return scores_XE * bias_E if cfg.bias_mode == "mul" else scores_XE + bias_E


def select_experts(scores_XE, bias_E, cfg: ModelConfig):
  """Indices [X, K] of the top-K experts of the biased scores (biased_choice), within
  the topk_group groups whose top-2 sums of biased scores are highest; dropped groups
  are masked with -inf. bias_E None: plain top-K of the unbiased scores."""
  choice_XE = biased_choice(scores_XE, bias_E, cfg)
  X, E = choice_XE.shape
  if cfg.n_group > 1:
    grouped_XGe = choice_XE.reshape(X, cfg.n_group, E // cfg.n_group)
    group_score_XG = jax.lax.top_k(grouped_XGe, 2)[0].sum(-1)
    _, keep_XG = jax.lax.top_k(group_score_XG, cfg.topk_group)
    keep_mask_XG = jax.nn.one_hot(keep_XG, cfg.n_group, dtype=jnp.bool_).any(1)
    keep_mask_XE = jnp.repeat(keep_mask_XG, E // cfg.n_group, axis=1)
    choice_XE = jnp.where(keep_mask_XE, choice_XE, -jnp.inf)
  _, idx_XK = jax.lax.top_k(choice_XE, cfg.top_k)
  return idx_XK


def gate_values(scores_XE, idx_XK, cfg: ModelConfig):
  """Gates from the UNBIASED scores of the picked experts (eq. 13 and V3's normalisation)."""
  gates_XK = jnp.take_along_axis(scores_XE, idx_XK, axis=-1)
  if cfg.norm_topk_prob:
    gates_XK = gates_XK / (gates_XK.sum(-1, keepdims=True) + 1e-20)
  return gates_XK * cfg.routed_scaling_factor


def shards_visited(idx_XK, n_experts: int, n_shards: int):
  """Distinct shards each token's experts live on [X] int32, shard z holding experts
  [z E/Z, (z+1) E/Z) for Z shards (expert_parallel.py's layout); padding (expert E)
  visits none."""
  shard_XK = idx_XK // (n_experts // n_shards)
  hit_XZ = jax.nn.one_hot(shard_XK, n_shards + 1, dtype=jnp.int32).max(axis=1)
  return hit_XZ[:, :n_shards].sum(-1)


def quantile_bias_target(scores_XE, bias_E, valid_X, top_k: int):
  """Quantile Balancing (Su, kexue.fm 11619; Megatron PR #5349), in V3's convention of
  selection by s + b: the bias at which each expert would be picked by its share
  q = floor(n K / E) of this batch's n valid tokens, the other experts' biases fixed.

    alpha_t  = the (K+1)-th largest s_tj + b_j of token t (the score an expert must
               beat to enter token t's top-K)
    r_tj     = alpha_t - s_tj (the bias expert j needs to be picked by token t)
    target_j = the (q+1)-th smallest r_tj over valid tokens, then centred (mean 0).

  Megatron's rule with b = -beta (it selects by logits - beta); routing here is not
  group-limited in the threshold (the ablation model has one group).
  """
  X, E = scores_XE.shape
  choice_XE = scores_XE + bias_E.astype(jnp.float32)
  alpha_X = jax.lax.top_k(choice_XE, min(top_k + 1, E))[0][:, -1]
  r_XE = jnp.where(valid_X[:, None], alpha_X[:, None] - scores_XE, jnp.inf)
  q = jnp.floor(jnp.sum(valid_X) * top_k / E).astype(jnp.int32)
  q = jnp.clip(q, 0, X - 1)
  target_E = jnp.sort(r_XE, axis=0)[q]
  target_E = jnp.where(jnp.isfinite(target_E), target_E, 0.0)
  return target_E - jnp.mean(target_E)


def route(scores_XE, bias_E, cfg: ModelConfig):
  idx_XK = select_experts(scores_XE, bias_E, cfg)
  return idx_XK, gate_values(scores_XE, idx_XK, cfg)


def _by_token(fn, tokens: tuple, shared: tuple = ()):
  """fn(*tokens, *shared) of each token alone; per batch shard on a data-parallel mesh
  (moe_meshes.per_token), where GSPMD would gather all tokens for the top-k."""
  mesh = moe_meshes.data_parallel_mesh()
  if mesh is None:
    return fn(*tokens, *shared)
  return moe_meshes.per_token(fn, mesh, tokens, shared)


# The layer --------------------------------------------------------------------

class MoE(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, bias_E, valid_BT=None):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    B, T, D = x_BTD.shape
    E, F = cfg.n_routed_experts, cfg.moe_ffn_dim
    if valid_BT is None:
      valid_BT = jnp.ones((B, T), bool)
    # The router stays float32 whatever the compute dtype (as HF and MaxText).
    w_router = self.param("w_router", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("embed", "expert")), (D, E), jnp.float32)
    w_gate = param(self, "w_gate", (E, D, F), ("expert", "embed", "mlp"), cfg)
    w_up = param(self, "w_up", (E, D, F), ("expert", "embed", "mlp"), cfg)
    w_down = param(self, "w_down", (E, F, D), ("expert", "mlp", "embed"), cfg)

    x_XD = x_BTD.reshape(B * T, D).astype(dt)
    valid_X = valid_BT.reshape(B * T)
    scores_XE = affinities(x_XD.astype(jnp.float32) @ w_router, cfg)
    # The bias is balancing state, not a parameter: no gradient flows into it.
    idx_XK, gates_XK = _by_token(functools.partial(route, cfg=cfg), (scores_XE,),
                                 (jax.lax.stop_gradient(bias_E),))
    gates_XK = jnp.where(valid_X[:, None], gates_XK, 0.0)
    idx_XK = jnp.where(valid_X[:, None], idx_XK, E)  # sentinel: padding goes nowhere

    ws = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
    mesh = moe_meshes.expert_mesh()
    load_E, n_shards = None, 1
    if mesh is not None:
      n_shards = mesh.shape[EXPERT]
      y_BTD, load_E, dropped = expert_parallel.routed_experts(
          x_XD.reshape(B, T, D), idx_XK.reshape(B, T, -1), gates_XK.reshape(B, T, -1),
          *ws, cfg, mesh)
      y_XD = y_BTD.reshape(B * T, D)
    elif cfg.moe_dispatch == "reference":
      y_XD, dropped = dispatch.experts_reference(x_XD, idx_XK, gates_XK, *ws)
    elif cfg.moe_dispatch == "capacity":
      y_XD, dropped = dispatch.experts_capacity(x_XD, idx_XK, gates_XK, *ws,
                                                dispatch.capacity(B * T, cfg))
    elif cfg.moe_dispatch in ("ragged", "dropless") and (
        local := _local_dropless(cfg, B * T)) is not None:
      experts_fn, shard_mesh = local
      if shard_mesh is None:
        y_XD, dropped = experts_fn(x_XD, idx_XK, gates_XK, *ws)
      else:
        y_XD, dropped = moe_meshes.per_batch_shard(experts_fn, x_XD, idx_XK, gates_XK, *ws,
                                                   shard_mesh)
    elif dispatch.dense_is_cheaper(B * T, E, D, F, jnp.dtype(dt).itemsize):  # decoding
      y_XD, dropped = dispatch.experts_dense(x_XD, idx_XK, gates_XK, *ws)
    else:
      raise ValueError(f"moe_dispatch={cfg.moe_dispatch!r}")
    y_BTD = y_XD.reshape(B, T, D)
    if cfg.n_shared_experts:
      # n_s shared experts of width F are one SwiGLU of width n_s * F (HF stores them so).
      y_BTD = y_BTD + SwiGLU(cfg, cfg.n_shared_experts * F, name="shared")(x_BTD)
    return y_BTD, routing_stats(scores_XE, idx_XK, valid_X, (B, T), cfg, dropped,
                                load_E=load_E, n_shards=n_shards,
                                bias_E=jax.lax.stop_gradient(bias_E))


def _local_dropless(cfg: ModelConfig, n_tokens: int):
  """(experts_fn, mesh) of a dropless dispatch without expert parallelism, or None where
  the dense product is cheaper (decoding a few tokens). mesh: run per batch shard
  (moe_meshes.per_batch_shard) there; None: over all tokens at once."""
  mesh = moe_meshes.data_parallel_mesh()
  if cfg.moe_dispatch == "ragged":
    if cfg.grouped_matmul == "megablox":   # a Pallas kernel runs inside a shard_map
      mesh = moe_meshes.kernel_mesh()
    return functools.partial(dispatch.experts_ragged, impl=cfg.grouped_matmul), mesh
  E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
  if dispatch.dense_is_cheaper(n_tokens, E, D, F, jnp.dtype(cfg.jnp_dtype).itemsize):
    return None
  shard_tokens = n_tokens // (1 if mesh is None else _batch_shards(mesh, n_tokens))
  block = cfg.moe_block_size or dispatch.dropless_block_size(shard_tokens * cfg.top_k, E)
  return functools.partial(dispatch.experts_dropless, block=block), mesh


def _batch_shards(mesh, n_tokens: int) -> int:
  n = math.prod(mesh.shape[a] for a in TOKENS if a in mesh.axis_names)
  return n if n_tokens % n == 0 else 1


def routing_stats(scores_XE, idx_XK, valid_X, shape_BT, cfg: ModelConfig, dropped,
                  load_E=None, n_shards: int = 1, bias_E=None):
  """MoEStats of one layer; load_E when the dispatch already counted it (globally)."""
  B, T = shape_BT
  E = cfg.n_routed_experts
  valid = valid_X.astype(jnp.float32)
  if load_E is None:
    load_E = jnp.zeros((E + 1,), jnp.float32).at[idx_XK.reshape(-1)].add(1.0)[:E]
  shards_X = shards_visited(idx_XK, E, n_shards).astype(jnp.float32)
  map_cfg = cfg.replace(n_group=1, topk_group=1, route_limit_by_shard=False)
  plain_XK = _by_token(lambda s: select_experts(s, None, map_cfg), (scores_XE,))
  plain_XE = jax.nn.one_hot(plain_XK, E, dtype=jnp.float32).sum(1) * valid[:, None]
  prob_XE = scores_XE / scores_XE.sum(-1, keepdims=True) * valid[:, None]
  return MoEStats(
      load_E=load_E,
      load_BE=jax.nn.one_hot(idx_XK, E, dtype=jnp.float32).sum(1).reshape(B, T, E).sum(1),
      aux_count_BE=plain_XE.reshape(B, T, E).sum(1),
      aux_prob_BE=prob_XE.reshape(B, T, E).sum(1),
      aux_score_BE=(scores_XE * valid[:, None]).reshape(B, T, E).sum(1),
      n_tokens_B=valid.reshape(B, T).sum(1),
      dropped=dropped,
      shards_per_token=shards_X.sum() / jnp.maximum(valid.sum(), 1.0),
      max_shards_per_token=shards_X.max(),
      quantile_target_E=(quantile_bias_target(jax.lax.stop_gradient(scores_XE), bias_E,
                                              valid_X, cfg.top_k)
                         if cfg.quantile_stats and bias_E is not None else None))
