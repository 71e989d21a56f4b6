"""Expert parallelism: routed experts sharded over the mesh's "expert" axis, tokens sent
to them by all-to-all inside `jax.shard_map`. This file is the layer's entry
(`routed_experts`): the mesh checked, tokens and experts laid out, one of two exchanges
run per shard.

Layout. Tokens are split over every batch axis (partitioning.BATCH: data, fsdp, expert);
expert e lives on expert-axis shard e // E_l (E_l = E / Z experts per shard, Z shards),
replicated over the other axes. The router and the shared experts stay outside,
data-parallel under GSPMD; only the routed experts run here.

Two exchanges (cfg.ep_exchange). "padded" (padded_exchange.py): one row per (token,
destination shard) in [Z, C] all_to_all buffers, the readable path and the capacity
baselines'. "ragged" (ragged_exchange.py, the 671B config's): one row per assignment,
only the live ones, moved by ragged_all_to_all. Both are dropless by default: what does
not fit a round's buffers goes in further rounds (rounds.py).

Node-limited routing (V3 2.1.2, M = topk_group nodes): with contiguous expert sharding,
routing group g (E/G experts) lives on shard g * Z / G whenever G is a multiple of Z, so
group-limited routing already keeps each token on at most topk_group shards.
`cfg.route_limit_by_shard` turns that into a guarantee: a mesh that would split groups
across shards is an error. Routing itself never depends on the mesh, so one config gives
one model on any mesh.

The mesh is the one in context (`jax.set_mesh`, see train/sharding.with_mesh): the MoE
layer takes this path whenever that mesh has an "expert" axis of size > 1
(moe_meshes.expert_mesh).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.padded_exchange import padded_experts
from deepseek_jax.model.partitioning import BATCH, CONTEXT, EXPERT, TENSOR
from deepseek_jax.model.ragged_exchange import ragged_experts


def check_mesh(cfg: ModelConfig, mesh, batch: int) -> None:
  Z = mesh.shape[EXPERT]
  if cfg.n_routed_experts % Z:
    raise ValueError(f"expert parallelism: n_routed_experts={cfg.n_routed_experts} must be "
                     f"a multiple of mesh.expert={Z}")
  n_batch = math.prod(mesh.shape[a] for a in BATCH)
  if batch % n_batch:
    raise ValueError(f"expert parallelism: the MoE batch ({batch} sequences) must split "
                     f"over the {n_batch} batch shards of the mesh {BATCH}")
  if cfg.route_limit_by_shard and cfg.n_group % Z:
    raise ValueError(
        f"route_limit_by_shard: n_group={cfg.n_group} must be a multiple of mesh.expert={Z} "
        f"so that each routing group lives on one shard (each token then visits at most "
        f"topk_group={cfg.topk_group} shards)")


def sequence_axes(mesh, seq_len: int) -> tuple:
  """The mesh axes that split a sequence of seq_len in the expert-parallel layer:
  "context" (when > 1; it splits every sequence already), then "tensor" when the rest
  divides."""
  axes, left = (), seq_len
  for a in (CONTEXT, TENSOR):
    if a in mesh.axis_names and mesh.shape[a] > 1 and left % mesh.shape[a] == 0:
      axes, left = axes + (a,), left // mesh.shape[a]
  return axes


def routed_experts(x_BTD, idx_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD,
                   cfg: ModelConfig, mesh):
  """The expert-parallel routed-expert sum. Returns (y_BTD, load_E, dropped), the last
  two summed over every shard (global, as the balancing bias update needs). What it
  sends (rows, bytes, rounds): bench/expert_traffic.py."""
  check_mesh(cfg, mesh, x_BTD.shape[0])
  E = cfg.n_routed_experts
  # Tokens are split over every batch axis and the sequence over "context"; under a
  # "tensor" axis (which shards heads and FFN widths, not tokens) the sequence is split
  # over it too, so the tensor shards route different tokens instead of repeating the
  # same work. Counts are summed over every axis that splits tokens.
  seq_axes = sequence_axes(mesh, x_BTD.shape[1])
  token_axes = BATCH + seq_axes

  def per_shard(x_BTD, idx_BTK, gates_BTK, w_gate, w_up, w_down):
    B, T, D = x_BTD.shape
    X, K = B * T, idx_BTK.shape[-1]
    x_XD, idx_XK = x_BTD.reshape(X, D), idx_BTK.reshape(X, K)
    load_E = jnp.zeros((E + 1,), jnp.float32).at[idx_XK.reshape(-1)].add(1.0)[:E]
    gates_XK = gates_BTK.reshape(X, K)
    ws = (w_gate, w_up, w_down)
    if cfg.ep_exchange == "ragged":
      y_XD = ragged_experts(x_XD, idx_XK, gates_XK, *ws, cfg, token_axes)
      return (y_XD.reshape(B, T, D), jax.lax.psum(load_E, token_axes),
              jnp.zeros((), jnp.float32))
    y_XD, dropped = padded_experts(x_XD, idx_XK, gates_XK, *ws, cfg, token_axes)
    return (y_XD.reshape(B, T, D), jax.lax.psum(load_E, token_axes),
            jax.lax.psum(dropped, token_axes))

  tokens = PS(BATCH, seq_axes or None, None)
  experts = PS(EXPERT, None, None)
  out_specs = (tokens, PS(), PS())
  # megablox's Pallas calls declare outputs without manual-axis types, which shard_map's
  # type check refuses: the check is off for them (as MaxText runs megablox). Without
  # it, shard_map's transpose sums a replicated weight's gradient over the token axes
  # itself (and dispatch.sum_to_type sees no extra axes to sum over).
  fn = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(tokens, tokens, tokens, experts, experts, experts),
                     out_specs=out_specs, check_vma=cfg.grouped_matmul != "megablox")
  return fn(x_BTD, idx_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
