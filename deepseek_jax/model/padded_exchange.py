"""The padded exchange of expert parallelism (cfg.ep_exchange "padded"): one row per
(token, destination shard) in [Z, C] all_to_all buffers, its capacity C, the queues that
fill them, one round of the exchange and the rounds that send the overflow.

Shape letters beyond layers.py's alphabet: Z expert-axis shards, U (token, shard) pairs,
W received rows (Z * C), J expert slots of a row (min(K, E/Z)). Per shard, X tokens:

  1. dispatch   a token goes ONCE to each shard holding any of its experts (as V3 and
                DeepEP do: node-limited routing then bounds the bytes, not just the
                fan-out). Each destination's (token, shard) pairs queue in token order;
                C of them fill that destination's block of a send buffer [Z, C, D];
                with each row travel the local expert ids (E_l: none) and gates of that
                token there, [Z, C, J].
  2. all_to_all over "expert": block z of dim 0 goes to shard z.
  3. compute    the W = Z * C received rows through the local experts (J assignments a
                row, gate-weighted sum) with dispatch.py's block-grouped dropless path,
                or its grouped-matmul path for moe_dispatch "ragged".
  4. all_to_all back; y_x = sum over the shards x went to of their partial sums.
  5. rounds     with ep_overflow="rounds" (the default) steps 1-4 repeat for queue
                places [C, 2C), [2C, 3C), ... until every pair is sent: dropless, with
                one round's memory (rounds.py). The round count is the longest queue
                anywhere over C (a pmax, so every shard runs the same collectives); a
                balanced routing needs one. With "drop", pairs past C are dropped and
                counted.

Capacity C per destination shard (in tokens): C = ceil(f * X * fanout / Z), fanout the
most shards a token can reach (min(K, Z), or topk_group when groups sit on shards), with
f = cfg.ep_capacity_factor whenever it is set, else capacity_factor for moe_dispatch
"capacity" (which always drops: it is the capacity baseline); otherwise C = X, one round
that holds any routing (static shapes cannot be ragged: `ragged_all_to_all` could be,
but XLA:CPU does not implement it, and its receive buffer must still hold the worst
case, Z times the mean). Those buffers grow as W = Z * X rows a shard, so at pod scale
ep_capacity_factor sizes them by tokens x K instead, and the rounds carry the excess.
Under "drop" the ragged local buffer is capped too, at ceil(f * X * K) rows (the mean a
shard receives is X * K); in rounds it holds a round's W * J assignments.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from deepseek_jax.model import dispatch
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import EXPERT
from deepseek_jax.model.rounds import summed_rounds


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


def sends_overflow(cfg: ModelConfig) -> bool:
  """Whether what does not fit a buffer is sent later (dropless) rather than dropped:
  ep_overflow="rounds", except for the capacity baseline, which always drops."""
  return cfg.ep_overflow == "rounds" and cfg.moe_dispatch != "capacity"


def uses_rounds(cfg: ModelConfig, n_tokens: int, n_shards: int) -> bool:
  """Whether a shard of n_tokens tokens sends in rounds: only when overflow is sent and
  its buffers are smaller than C = n_tokens (else one round holds any routing)."""
  return sends_overflow(cfg) and shard_capacity(n_tokens, cfg, n_shards) < n_tokens


def queue_pairs(idx_XK, gates_XK, n_experts: int, n_shards: int):
  """Each (token, destination shard) pair's place in its destination's queue, and what
  travels with it.

  Returns rank_XZ (pairs before it bound for shard z, in token order: earlier tokens go
  first; -1 where the token has no expert on z), ids_XZJ and gates_XZJ (the token's local
  expert ids, E_l where none, and gates on shard z; J = min(K, E_l) slots) and n_XZ (the
  token's assignments on shard z)."""
  X, K = idx_XK.shape
  Z, E_l = n_shards, n_experts // n_shards
  shard_XK = idx_XK // E_l                           # padding sentinel E -> Z
  on_XZK = shard_XK[:, None, :] == jnp.arange(Z)[None, :, None]
  n_XZ = on_XZK.sum(-1)
  dest_U = jnp.where(n_XZ > 0, jnp.arange(Z)[None, :], Z).reshape(-1)
  rank_U, _ = dispatch.rank_in_expert(dest_U, Z)     # pairs are token-major
  rank_XZ = jnp.where(dest_U < Z, rank_U, -1).reshape(X, Z)
  # At most min(K, E_l) of a token's experts share a shard: keep those slots, in J order.
  J = min(K, E_l)
  first_XZJ = jnp.argsort(~on_XZK, axis=-1, stable=True)[..., :J]
  on_XZJ = jnp.take_along_axis(on_XZK, first_XZJ, -1)
  local_XZK = jnp.broadcast_to((idx_XK % E_l)[:, None, :], (X, Z, K))
  gates_XZK = jnp.broadcast_to(gates_XK[:, None, :], (X, Z, K))
  ids_XZJ = jnp.where(on_XZJ, jnp.take_along_axis(local_XZK, first_XZJ, -1), E_l)
  gates_XZJ = jnp.where(on_XZJ, jnp.take_along_axis(gates_XZK, first_XZJ, -1), 0.0)
  return rank_XZ, ids_XZJ, gates_XZJ, n_XZ


def round_rows(rank_XZ, cap: int, r=0):
  """Send-buffer rows of round r: the pairs at queue places [r * cap, (r + 1) * cap) of
  each destination z go to rows z * cap + place % cap; others to row Z * cap (not sent)."""
  Z = rank_XZ.shape[1]
  sent_XZ = (rank_XZ >= 0) & (rank_XZ // cap == r)
  return jnp.where(sent_XZ, jnp.arange(Z)[None, :] * cap + rank_XZ % cap, Z * cap)


def rounds_needed(rank_XZ, cap: int):
  """Rounds of `cap` rows per destination that send every pair of this shard."""
  longest = jnp.max(rank_XZ, initial=-1) + 1         # the longest queue
  return (longest + cap - 1) // cap


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
                   n_rows: int | None):
  """Gate-weighted sum of each received row's local experts (id E_l: no expert), and the
  assignments dropped here (only the ragged buffer capped at n_rows drops)."""
  ws = (w_gate, w_up, w_down)
  if cfg.moe_dispatch == "reference":
    return dispatch.experts_reference(x_WD, ids_WJ, gates_WJ, *ws)
  if cfg.moe_dispatch == "ragged":
    return dispatch.experts_ragged(x_WD, ids_WJ, gates_WJ, *ws, n_rows,
                                   impl=cfg.grouped_matmul)
  E_l = w_gate.shape[0]
  block = cfg.moe_block_size or dispatch.dropless_block_size(ids_WJ.size, E_l)
  return dispatch.experts_dropless(x_WD, ids_WJ, gates_WJ, *ws, block)


def exchange(r, x_XD, gates_XZJ, w_gate, w_up, w_down, rank_XZ, ids_XZJ, *,
             cfg: ModelConfig, cap: int, fanout: int, local_cap: int | None):
  """One round, inside shard_map: the pairs at queue places [r * cap, (r + 1) * cap) of
  every destination go out in [Z, cap] buffers, through the local experts there, and
  back. Returns (y_XD: each token's sum over the shards it reached this round, the
  assignments the local buffer dropped)."""
  X, D = x_XD.shape
  Z, J = rank_XZ.shape[1], ids_XZJ.shape[-1]
  E_l = w_gate.shape[0]
  row_XZ = round_rows(rank_XZ, cap, r)
  row_U = row_XZ.reshape(-1)
  send_ZCD = dispatch.gather_rows(x_XD, row_U, Z * cap, Z).reshape(Z, cap, D)
  send_ids_ZCJ = _to_rows(ids_XZJ.reshape(-1, J), row_U, Z * cap, E_l).reshape(Z, cap, J)
  send_gates_ZCJ = _to_rows(gates_XZJ.reshape(-1, J), row_U, Z * cap, 0.0).reshape(Z, cap, J)
  # Block z of dim 0 goes to shard z; what arrives is stacked by source shard.
  a2a = lambda v: jax.lax.all_to_all(v, EXPERT, 0, 0)
  recv_ZCD, recv_ids_ZCJ, recv_gates_ZCJ = a2a(send_ZCD), a2a(send_ids_ZCJ), a2a(
      send_gates_ZCJ)
  out_WD, local_dropped = _local_experts(
      recv_ZCD.reshape(Z * cap, D), recv_ids_ZCJ.reshape(Z * cap, J),
      recv_gates_ZCJ.reshape(Z * cap, J), w_gate, w_up, w_down, cfg, local_cap)
  back_ZCD = a2a(out_WD.reshape(Z, cap, D))
  # Each token's partial sums from the shards it went to: at most `fanout` of them, so
  # gather [X, fanout] rows (the sent ones sort first; row Z*cap, not sent, gives 0)
  # rather than one per (token, shard) pair, Z / fanout times more at Z = 64.
  rows_XF = jnp.sort(row_XZ, axis=-1)[:, :fanout]
  y_XD = dispatch.combine(back_ZCD.reshape(Z * cap, D), rows_XF.reshape(-1),
                          jnp.ones((X, fanout), jnp.float32))
  return y_XD, local_dropped


def padded_experts(x_XD, idx_XK, gates_XK, w_gate, w_up, w_down, cfg: ModelConfig,
                   token_axes):
  """The padded exchange on one shard (inside shard_map): in rounds until every pair is
  sent (uses_rounds), else one round that drops what does not fit. Returns (y_XD, the
  assignments dropped on this shard)."""
  X = x_XD.shape[0]
  E, Z = cfg.n_routed_experts, jax.lax.axis_size(EXPERT)
  C = shard_capacity(X, cfg, Z)
  rank_XZ, ids_XZJ, gates_XZJ, n_XZ = queue_pairs(idx_XK, gates_XK, E, Z)
  J = ids_XZJ.shape[-1]
  rounds = uses_rounds(cfg, X, Z)
  one_round = functools.partial(
      exchange, cfg=cfg, cap=C, fanout=max_fanout(cfg, Z),
      local_cap=None if sends_overflow(cfg) else local_rows(X, cfg, Z * C * J))
  args = (x_XD, gates_XZJ, w_gate, w_up, w_down, rank_XZ, ids_XZJ)
  if rounds:
    # Every shard runs as many rounds as the longest queue anywhere needs.
    n_rounds = jax.lax.pmax(rounds_needed(rank_XZ, C), token_axes)
    y_XD = summed_rounds(lambda *a: one_round(*a)[0])(args[:5], args[5:], n_rounds)
    return y_XD, jnp.zeros((), jnp.float32)
  y_XD, local_dropped = one_round(0, *args)
  # Refused by a full destination here, or cut from this shard's local buffer.
  dropped = jnp.sum(jnp.where(rank_XZ >= C, n_XZ, 0)).astype(jnp.float32) + local_dropped
  return y_XD, dropped
