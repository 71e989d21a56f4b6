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
                one round's memory. The round count is the longest queue anywhere over
                C (a pmax, so every shard runs the same collectives); a balanced
                routing needs one. With "drop", pairs past C are dropped and counted.

Two exchanges (cfg.ep_exchange). "padded" is steps 1-5 above. "ragged" (the 671B
config's) moves one row per assignment and only the live ones: each shard sorts its
assignments by destination, the [Z, Z] send counts are all-gathered over the expert
axis, and jax.lax.ragged_all_to_all (ragged_a2a.py; a padded stand-in on XLA:CPU) writes
them into a receive buffer of ceil(f X K) rows (f = ep_capacity_factor; a shard receives
X K at balanced routing), where the grouped matmul (dispatch.experts_ragged) runs over
exactly those rows, sorted by expert; the results go back the same way into a buffer
laid out as the send buffer, and each token sums its K rows with its gates. A round is a
window of every destination's receive stream (sources in order), so a second round
runs only when some destination's TOTAL exceeds its buffer, however long one source's
queue is. Round 0 runs outside any loop (remat_save_experts can keep its products); the
overflow rounds run in a loop named OVERFLOW_SCOPE, counted by the compile report at
the rounds a routing needs. Without the per-(token, shard) de-duplication: at V3's
layout (8 groups of 32 experts over 8 shards each, 4 groups kept) a token's 8 experts,
drawn uniformly, live on 7.36 distinct shards on average (a simulation of 20,000
tokens), so it would save about 8% of the wire bytes at the cost of the padded path's
J-slot bookkeeping.

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

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model import dispatch, ragged_a2a
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import BATCH, CONTEXT, TOKENS

EXPERT = "expert"
TENSOR = "tensor"
# The scope of the overflow-rounds loops of the ragged exchange (train/hlo.py and
# hlo_work.py count them at the extra rounds a routing needs: none at balanced routing).
OVERFLOW_SCOPE = "overflow_rounds"


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


def _typed_like(w, x):
  """w made to vary over the manual axes x varies over (the implicit broadcast JAX
  inserts when the two meet), so that a weight gradient can be summed over rounds before
  the one psum over the token axes (dispatch.sum_to_type)."""
  extra = dispatch.varying_axes(x) - dispatch.varying_axes(w)
  return jax.lax.pcast(w, tuple(sorted(extra)), to="varying") if extra else w


def summed_rounds(round_fn, first: int = 0, scope: str | None = None):
  """f(diff, static, n_rounds) = sum_{first <= r < n_rounds} round_fn(r, *diff, *static),
  n_rounds traced (the same on every shard). diff: float arrays, the first one varying
  over the token axes, its shape and dtype the result's; static: integer arrays. XLA
  cannot differentiate a loop with a traced trip count, so the backward is written out:
  a second loop that recomputes each round's forward and pulls the cotangent back
  through it (jax.vjp), accumulating every diff gradient in float32 (weight gradients
  summed over the token axes once, at the end); memory stays one round's, the price one
  more forward of the rounds. scope: a name for both loops (jax.named_scope; the compile
  report finds the overflow rounds by it)."""

  def loop(body, init, n):
    if scope is None:
      return jax.lax.fori_loop(first, n, body, init)
    with jax.named_scope(scope):
      return jax.lax.fori_loop(first, n, body, init)

  def typed(diff):
    return (diff[0],) + tuple(_typed_like(d, diff[0]) for d in diff[1:])

  @jax.custom_vjp
  def summed(diff, static, n_rounds):
    return fwd(diff, static, n_rounds)[0]

  def fwd(diff, static, n_rounds):
    ds = typed(diff)
    x = ds[0]
    body = lambda r, y: y + round_fn(r, *ds, *static).astype(y.dtype)
    y = loop(body, dispatch.zeros_like_all(x.shape, x.dtype, *ds), n_rounds)
    return y, (diff, static, n_rounds)

  def bwd(res, dy):
    diff, static, n_rounds = res
    primals = typed(diff)

    def body(r, acc):
      _, pull = jax.vjp(lambda *p: round_fn(r, *p, *static), *primals)
      return tuple(a + d.astype(a.dtype) for a, d in zip(acc, pull(dy)))

    init = tuple(dispatch.zeros_like_all(p.shape, jnp.float32, p) for p in primals)
    acc = loop(body, init, n_rounds)
    grads = (acc[0].astype(diff[0].dtype),) + tuple(
        dispatch.sum_to_type(g, d) for g, d in zip(acc[1:], diff[1:]))
    return grads, tuple(None for _ in static), None

  summed.defvjp(fwd, bwd)
  return summed


def sends_overflow(cfg: ModelConfig) -> bool:
  """Whether what does not fit a buffer is sent later (dropless) rather than dropped:
  ep_overflow="rounds", except for the capacity baseline, which always drops."""
  return cfg.ep_overflow == "rounds" and cfg.moe_dispatch != "capacity"


def uses_rounds(cfg: ModelConfig, n_tokens: int, n_shards: int) -> bool:
  """Whether a shard of n_tokens tokens sends in rounds: only when overflow is sent and
  its buffers are smaller than C = n_tokens (else one round holds any routing)."""
  return sends_overflow(cfg) and shard_capacity(n_tokens, cfg, n_shards) < n_tokens


def receive_rows(n_tokens: int, cfg: ModelConfig, n_shards: int) -> int:
  """Rows of the ragged exchange's receive buffer on a shard whose senders route
  n_tokens tokens each: ceil(f * n_tokens * K) (a shard receives n_tokens * K at balanced
  routing), padded to the grouped matmul's row tiles."""
  rows = math.ceil(cfg.ep_capacity_factor * n_tokens * cfg.top_k)
  return dispatch.grouped_rows(rows, cfg.grouped_matmul, cfg.n_routed_experts // n_shards)


def ragged_round(r, x_send_AD, w_gate, w_up, w_down, counts_SD, ids_send_A, *,
                 cfg: ModelConfig, cap: int):
  """Round r of the ragged exchange, inside shard_map: this round's rows (the plan of
  ragged_a2a.exchange_plan) go out by ragged_all_to_all into a [cap, D] receive buffer,
  through the local experts (sorted by expert, grouped matmul over the received rows)
  and back into a buffer laid out as the send buffer [A, D] (rows of other rounds 0)."""
  A, D = x_send_AD.shape
  E_l = w_gate.shape[0]
  me = jax.lax.axis_index(EXPERT)
  out_plan, back_plan = ragged_a2a.exchange_plan(counts_SD, me, cap, r)
  a2a = functools.partial(ragged_a2a.ragged_all_to_all, axis_name=EXPERT,
                          max_rows=min(cap, A))
  recv_RD = a2a(x_send_AD, jnp.zeros((cap, D), x_send_AD.dtype), *out_plan)
  recv_RD = checkpoint_name(recv_RD, "moe_recv")
  ids_R = a2a(ids_send_A, jnp.full((cap,), E_l, ids_send_A.dtype), *out_plan)
  out_RD, _ = dispatch.experts_ragged(recv_RD, ids_R[:, None],
                                      jnp.ones((cap, 1), jnp.float32), w_gate, w_up, w_down,
                                      impl=cfg.grouped_matmul)
  return a2a(out_RD, jnp.zeros((A, D), out_RD.dtype), *back_plan)


def ragged_experts(x_XD, idx_XK, gates_XK, w_gate, w_up, w_down, cfg: ModelConfig,
                   token_axes):
  """The ragged exchange on one shard (inside shard_map): one row per assignment, sorted
  by destination; the [Z, Z] send counts all-gathered over the expert axis; round 0
  outside any loop (its residuals are ordinary: remat_save_experts can keep them), the
  rounds a destination's overflow needs in a loop named OVERFLOW_SCOPE. Returns y_XD."""
  X, D = x_XD.shape
  K = idx_XK.shape[1]
  E, Z, E_l = cfg.n_routed_experts, jax.lax.axis_size(EXPERT), w_gate.shape[0]
  cap = receive_rows(X, cfg, Z)
  e_A = idx_XK.reshape(-1)
  dest_A = jnp.where(e_A < E, e_A // E_l, Z)       # padding (expert E) goes nowhere
  order_A = jnp.argsort(dest_A, stable=True)       # send order: by destination
  pos_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(X * K, dtype=order_A.dtype))
  counts_Z = jnp.zeros((Z + 1,), jnp.int32).at[dest_A].add(1)[:Z]
  counts_SD = jax.lax.all_gather(counts_Z, EXPERT)                 # [source, destination]
  x_send_AD = dispatch.take_rows(x_XD, order_A // K)
  ids_send_A = jnp.where(e_A < E, e_A % E_l, E_l).astype(jnp.int32)[order_A]
  round_fn = functools.partial(ragged_round, cfg=cfg, cap=cap)
  # Every shard runs as many rounds as the fullest destination anywhere needs.
  n_rounds = jax.lax.pmax(ragged_a2a.rounds_needed(counts_SD, cap), token_axes)
  static = (counts_SD, ids_send_A)
  back_AD = round_fn(0, x_send_AD, w_gate, w_up, w_down, *static)
  back_AD = back_AD + summed_rounds(round_fn, first=1, scope=OVERFLOW_SCOPE)(
      (x_send_AD, w_gate, w_up, w_down), static, n_rounds)
  return dispatch.combine(back_AD, pos_A, gates_XK)


def kernel_mesh():
  """The context mesh when it has more than one device (else None): a Pallas kernel
  (megablox) cannot be partitioned by GSPMD and must run inside a shard_map there."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def data_parallel_mesh():
  """The context mesh when it splits tokens over several devices and nothing else (no
  expert or tensor axis > 1), else None. A dropless dispatch written over all of a
  layer's tokens (its sort, its grouped buffer) is then run per batch shard: under
  GSPMD alone the sort is global, so every device all-gathers the batch's tokens and
  runs every expert on all of them."""
  mesh = kernel_mesh()
  if mesh is None or any(mesh.shape[a] > 1 for a in mesh.axis_names if a not in TOKENS):
    return None
  return mesh


def _token_axes(mesh, n_tokens: int) -> tuple:
  """The mesh's token axes (batch and context) of size > 1 when they divide n_tokens,
  else () (one shard)."""
  axes = tuple(a for a in TOKENS if a in mesh.axis_names and mesh.shape[a] > 1)
  return axes if n_tokens % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def per_token(fn, mesh, tokens: tuple, shared: tuple = ()):
  """fn(*tokens, *shared) for a function of each token alone (routing), run per batch
  shard: `tokens` and fn's outputs split along their first axis over the batch axes,
  `shared` whole on every shard. GSPMD would otherwise all-gather the tokens of ops it
  does not partition along the batch (top_k on XLA:CPU)."""
  axes = _token_axes(mesh, tokens[0].shape[0])
  spec = PS(axes or None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(tokens) + (PS(),) * len(shared),
                       out_specs=spec, check_vma=False)(*tokens, *shared)


def per_batch_shard(experts_fn, x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD,
                    mesh):
  """experts_fn(x, idx, gates, w_gate, w_up, w_down) -> (y, dropped), a routed-expert sum
  without expert parallelism, run on a mesh of several devices: each batch shard sorts
  and multiplies its own tokens (the weights whole on every shard, as GSPMD gathers them
  for any data-parallel layer); the drops summed. A token's output does not depend on
  the other tokens of a dropless dispatch, so this equals the one-device sum."""
  axes = _token_axes(mesh, x_XD.shape[0])

  def per_shard(x, idx, gates, wg, wu, wd):
    y, dropped = experts_fn(x, idx, gates, wg, wu, wd)
    return y, jax.lax.psum(dropped, axes) if axes else dropped

  tokens = PS(axes or None, None)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(tokens,) * 3 + (PS(),) * 3,
                       out_specs=(tokens, PS()), check_vma=False)(
                           x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD)


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
  E, Z = cfg.n_routed_experts, mesh.shape[EXPERT]
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
    if cfg.ep_exchange == "ragged":
      y_XD = ragged_experts(x_XD, idx_XK, gates_BTK.reshape(X, K), w_gate, w_up, w_down,
                            cfg, token_axes)
      return (y_XD.reshape(B, T, D), jax.lax.psum(load_E, token_axes),
              jnp.zeros((), jnp.float32))
    C = shard_capacity(X, cfg, Z)
    rank_XZ, ids_XZJ, gates_XZJ, n_XZ = queue_pairs(idx_XK, gates_BTK.reshape(X, K), E, Z)
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
      dropped = jnp.zeros((), jnp.float32)
    else:
      y_XD, local_dropped = one_round(0, *args)
      # Refused by a full destination here, or cut from this shard's local buffer.
      dropped = jnp.sum(jnp.where(rank_XZ >= C, n_XZ, 0)).astype(jnp.float32) + local_dropped
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
