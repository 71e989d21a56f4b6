"""Expert parallelism: routed experts sharded over the mesh's "expert" axis, tokens sent
to them by all-to-all inside `jax.shard_map`.

Shape letters beyond layers.py's alphabet: Z expert-axis shards, U (token, shard) pairs,
W received rows (Z * C), J expert slots of a row (min(K, E/Z)).

Layout. Tokens are split over every batch axis (partitioning.BATCH: data, fsdp, expert);
expert e lives on expert-axis shard e // E_l (E_l = E / Z experts per shard), replicated
over the other axes. The router and the shared experts stay outside, data-parallel under
GSPMD; only the routed experts run here. Per shard, X tokens:

  1. dispatch   a token goes ONCE to each shard holding any of its experts (as V3 and
                DeepEP do: node-limited routing then bounds the bytes, not just the
                fan-out). The first C (token, shard) pairs per destination, in token
                order, fill a send buffer [Z, C, D]; with each row travel the local
                expert ids (E_l: none) and gates of that token there, [Z, C, J].
                Pairs past C are dropped and their assignments counted.
  2. all_to_all over "expert": block z of dim 0 goes to shard z.
  3. compute    the W = Z * C received rows through the local experts (J assignments a
                row, gate-weighted sum) with dispatch.py's block-grouped dropless path,
                or its grouped-matmul path for moe_dispatch "ragged", whose W * J
                assignment rows are capped as below; what is cut is counted too.
  4. all_to_all back; y_x = sum over the shards x went to of their partial sums.

Capacity C per destination shard (in tokens): C = ceil(f * X * fanout / Z), fanout the
most shards a token can reach (min(K, Z), or topk_group when groups sit on shards), with
f = cfg.ep_capacity_factor whenever it is set, else capacity_factor for moe_dispatch
"capacity"; otherwise dropless, C = X: static shapes cannot be ragged
(`ragged_all_to_all` would be, but XLA:CPU does not implement it). Dropless buffers grow
as W = Z * X rows a shard, so at pod scale ep_capacity_factor sizes them by tokens x K
instead: C as above, and the ragged local buffer ceil(f * X * K) rows (the mean a shard
receives is X * K).

Node-limited routing (V3 2.1.2, M = topk_group nodes): with contiguous expert sharding,
routing group g (E/G experts) lives on shard g * Z / G whenever G is a multiple of Z, so
group-limited routing already keeps each token on at most topk_group shards.
`cfg.route_limit_by_shard` turns that into a guarantee: a mesh that would split groups
across shards is an error. Routing itself never depends on the mesh, so one config gives
one model on any mesh.

The mesh is the one in context (`jax.set_mesh`, see train/sharding.with_mesh): the MoE layer
takes this path whenever that mesh has an "expert" axis of size > 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model import dispatch
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import BATCH

EXPERT = "expert"
TENSOR = "tensor"


def expert_mesh():
  """The context mesh if it shards experts (an "expert" axis > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT not in mesh.axis_names or mesh.shape[EXPERT] == 1:
    return None
  return mesh


def max_fanout(cfg: ModelConfig, n_shards: int) -> int:
  """The most expert-axis shards one token's experts can live on."""
  fanout = min(cfg.top_k, n_shards)
  if cfg.n_group % n_shards == 0:  # each group on one shard: node-limited
    fanout = min(fanout, cfg.topk_group)
  return fanout


def shard_capacity(n_tokens: int, cfg: ModelConfig, n_shards: int) -> int:
  """Send-buffer rows per destination shard for one shard's n_tokens tokens."""
  if cfg.ep_capacity_factor is not None:
    factor = cfg.ep_capacity_factor
  elif cfg.moe_dispatch == "capacity":
    factor = cfg.capacity_factor
  else:
    return n_tokens
  c = math.ceil(factor * n_tokens * max_fanout(cfg, n_shards) / n_shards)
  return max(1, min(c, n_tokens))


def local_rows(n_tokens: int, cfg: ModelConfig, n_assignments: int) -> int | None:
  """Rows of the ragged local buffer on a shard whose senders hold n_tokens tokens each:
  ceil(f * n_tokens * K), at most the n_assignments = W * J received; None: all."""
  if cfg.ep_capacity_factor is None:
    return None
  return min(math.ceil(cfg.ep_capacity_factor * n_tokens * cfg.top_k), n_assignments)


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


def plan_dispatch(idx_XK, gates_XK, n_experts: int, n_shards: int, cap: int):
  """Where each (token, destination shard) pair goes, and what travels with it.

  Returns row_XZ (send-buffer row z * cap + slot, or Z * cap: not sent), ids_XZJ and
  gates_XZJ (the token's local expert ids, E_l where none, and gates on shard z; J =
  min(K, E_l) slots) and dropped_XZ (assignments lost because shard z was full)."""
  X, K = idx_XK.shape
  Z, E_l = n_shards, n_experts // n_shards
  shard_XK = idx_XK // E_l                           # padding sentinel E -> Z
  on_XZK = shard_XK[:, None, :] == jnp.arange(Z)[None, :, None]
  n_XZ = on_XZK.sum(-1)
  dest_U = jnp.where(n_XZ > 0, jnp.arange(Z)[None, :], Z).reshape(-1)
  # Earlier tokens win a destination's slots (pairs are token-major).
  rank_U, _ = dispatch.rank_in_expert(dest_U, Z)
  kept_U = (dest_U < Z) & (rank_U < cap)
  row_XZ = jnp.where(kept_U, dest_U * cap + rank_U, Z * cap).reshape(X, Z)
  dropped_XZ = jnp.where(kept_U.reshape(X, Z), 0, n_XZ)
  # At most min(K, E_l) of a token's experts share a shard: keep those slots, in J order.
  J = min(K, E_l)
  first_XZJ = jnp.argsort(~on_XZK, axis=-1, stable=True)[..., :J]
  on_XZJ = jnp.take_along_axis(on_XZK, first_XZJ, -1)
  local_XZK = jnp.broadcast_to((idx_XK % E_l)[:, None, :], (X, Z, K))
  gates_XZK = jnp.broadcast_to(gates_XK[:, None, :], (X, Z, K))
  ids_XZJ = jnp.where(on_XZJ, jnp.take_along_axis(local_XZK, first_XZJ, -1), E_l)
  gates_XZJ = jnp.where(on_XZJ, jnp.take_along_axis(gates_XZK, first_XZJ, -1), 0.0)
  return row_XZ, ids_XZJ, gates_XZJ, dropped_XZ


def _to_rows(values_U, row_U, n_rows: int, fill):
  """Buffer of n_rows: row r holds the values of the pair placed at r, else `fill`.
  A gather (its gradient a scatter-add), as dispatch.gather_rows."""
  U = row_U.shape[0]
  src = jnp.full((n_rows,), U, jnp.int32).at[row_U].set(jnp.arange(U, dtype=jnp.int32),
                                                        mode="drop")
  rows = dispatch.take_rows(values_U, jnp.minimum(src, U - 1))
  valid = (src < U).reshape((n_rows,) + (1,) * (values_U.ndim - 1))
  return jnp.where(valid, rows, jnp.asarray(fill, values_U.dtype))


def _local_experts(x_WD, ids_WJ, gates_WJ, w_gate, w_up, w_down, cfg: ModelConfig,
                   n_tokens: int):
  """Gate-weighted sum of each received row's local experts (id E_l: no expert), and the
  assignments dropped here (only the capped ragged buffer drops)."""
  ws = (w_gate, w_up, w_down)
  if cfg.moe_dispatch == "reference":
    return dispatch.experts_reference(x_WD, ids_WJ, gates_WJ, *ws)
  if cfg.moe_dispatch == "ragged":
    return dispatch.experts_ragged(x_WD, ids_WJ, gates_WJ, *ws,
                                   local_rows(n_tokens, cfg, ids_WJ.size),
                                   impl=cfg.grouped_matmul)
  E_l = w_gate.shape[0]
  block = cfg.moe_block_size or dispatch.dropless_block_size(ids_WJ.size, E_l)
  return dispatch.experts_dropless(x_WD, ids_WJ, gates_WJ, *ws, block)


def routed_experts(x_BTD, idx_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD,
                   cfg: ModelConfig, mesh, traffic: bool = False):
  """The expert-parallel routed-expert sum. Returns (y_BTD, load_E, dropped), the last
  two summed over every shard (global, as the balancing bias update needs); with
  traffic=True also a dict of all-to-all bytes summed over shards (see the benchmark)."""
  check_mesh(cfg, mesh, x_BTD.shape[0])
  E, Z = cfg.n_routed_experts, mesh.shape[EXPERT]
  # Tokens are split over every batch axis; under a "tensor" axis (which shards heads
  # and FFN widths, not tokens) the sequence is split over it too, so the tensor shards
  # route different tokens instead of repeating the same work. Counts are summed over
  # every axis that splits tokens.
  seq_axis = (TENSOR if TENSOR in mesh.axis_names and mesh.shape[TENSOR] > 1
              and x_BTD.shape[1] % mesh.shape[TENSOR] == 0 else None)
  token_axes = BATCH + ((seq_axis,) if seq_axis else ())

  def per_shard(x_BTD, idx_BTK, gates_BTK, w_gate, w_up, w_down):
    B, T, D = x_BTD.shape
    X, K = B * T, idx_BTK.shape[-1]
    C = shard_capacity(X, cfg, Z)
    x_XD, idx_XK = x_BTD.reshape(X, D), idx_BTK.reshape(X, K)
    row_XZ, ids_XZJ, gates_XZJ, dropped_XZ = plan_dispatch(
        idx_XK, gates_BTK.reshape(X, K), E, Z, C)
    row_U = row_XZ.reshape(-1)
    J = ids_XZJ.shape[-1]
    send_ZCD = dispatch.gather_rows(x_XD, row_U, Z * C, Z).reshape(Z, C, D)
    send_ids_ZCJ = _to_rows(ids_XZJ.reshape(-1, J), row_U, Z * C, E // Z).reshape(Z, C, J)
    send_gates_ZCJ = _to_rows(gates_XZJ.reshape(-1, J), row_U, Z * C, 0.0).reshape(Z, C, J)
    # Block z of dim 0 goes to shard z; what arrives is stacked by source shard.
    a2a = lambda v: jax.lax.all_to_all(v, EXPERT, 0, 0)
    recv_ZCD, recv_ids_ZCJ, recv_gates_ZCJ = a2a(send_ZCD), a2a(send_ids_ZCJ), a2a(
        send_gates_ZCJ)
    out_WD, local_dropped = _local_experts(
        recv_ZCD.reshape(Z * C, D), recv_ids_ZCJ.reshape(Z * C, J),
        recv_gates_ZCJ.reshape(Z * C, J), w_gate, w_up, w_down, cfg, X)
    back_ZCD = a2a(out_WD.reshape(Z, C, D))
    # Each token's partial sums from the shards it went to: at most `fanout` of them, so
    # gather [X, fanout] rows (the sent ones sort first; row Z*C, not sent, gives 0)
    # rather than one per (token, shard) pair, Z / fanout times more at Z = 64.
    F = max_fanout(cfg, Z)
    rows_XF = jnp.sort(row_XZ, axis=-1)[:, :F]
    y_XD = dispatch.combine(back_ZCD.reshape(Z * C, D), rows_XF.reshape(-1),
                            jnp.ones((X, F), jnp.float32))
    load_E = jnp.zeros((E + 1,), jnp.float32).at[idx_XK.reshape(-1)].add(1.0)[:E]
    # Refused by a full destination here, or cut from this shard's local buffer.
    dropped = jnp.sum(dropped_XZ).astype(jnp.float32) + local_dropped
    out = (y_XD.reshape(B, T, D), jax.lax.psum(load_E, token_axes),
           jax.lax.psum(dropped, token_axes))
    if not traffic:
      return out
    me = jax.lax.axis_index(EXPERT)
    leaving_Z = (jnp.arange(Z) != me).astype(jnp.float32)
    sent_Z = jnp.zeros((Z + 1,), jnp.float32).at[row_U // C].add(1.0)[:Z]
    counts = {
        # occupied token rows that leave the shard, dispatch direction
        "payload_rows": jnp.sum(sent_Z * leaving_Z),
        # every buffer byte that leaves the shard, dispatch + combine
        "wire_bytes": jnp.float32((Z - 1) * C * (
            2 * D * send_ZCD.dtype.itemsize + J * (4 + send_gates_ZCJ.dtype.itemsize))),
    }
    return out + (jax.tree.map(lambda v: jax.lax.psum(v, token_axes), counts),)

  tokens = PS(BATCH, seq_axis, None)
  experts = PS(EXPERT, None, None)
  out_specs = (tokens, PS(), PS()) + (({"payload_rows": PS(), "wire_bytes": PS()},)
                                      if traffic else ())
  fn = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(tokens, tokens, tokens, experts, experts, experts),
                     out_specs=out_specs)
  return fn(x_BTD, idx_BTK, gates_BTK, w_gate_EDF, w_up_EDF, w_down_EFD)
