"""The ragged exchange of expert parallelism (cfg.ep_exchange "ragged", the 671B
config's): one row per assignment, and only the live ones, moved by ragged_all_to_all.

Each shard sorts its assignments by destination, the [Z, Z] send counts are all-gathered
over the expert axis, and jax.lax.ragged_all_to_all (ragged_a2a.py; a padded stand-in on
XLA:CPU) writes them into a receive buffer of ceil(f X K) rows (f = ep_capacity_factor;
a shard receives X K at balanced routing), where the grouped matmul
(dispatch.experts_ragged) runs over exactly those rows, sorted by expert; the results go
back the same way into a buffer laid out as the send buffer, and each token sums its K
rows with its gates. A round is a window of every destination's receive stream (sources
in order), so a second round runs only when some destination's TOTAL exceeds its
buffer, however long one source's queue is. Round 0 runs outside any loop
(remat_save_experts can keep its products); the overflow rounds run in a loop named
OVERFLOW_SCOPE (rounds.py), counted by the compile report at the rounds a routing
needs. Without the padded exchange's per-(token, shard) de-duplication: at V3's layout
(8 groups of 32 experts over 8 shards each, 4 groups kept) a token's 8 experts, drawn
uniformly, live on 7.36 distinct shards on average (a simulation of 20,000 tokens), so
it would save about 8% of the wire bytes at the cost of the padded path's J-slot
bookkeeping.

Shape letters beyond layers.py's alphabet: Z expert-axis shards, A a shard's
assignments (X * K, its send buffer's rows), R received rows; counts_SD is indexed by
[source shard, destination shard].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model import dispatch, ragged_a2a
from deepseek_jax.model.config import ModelConfig
from deepseek_jax.model.partitioning import EXPERT
from deepseek_jax.model.rounds import summed_rounds

# The scope of the overflow-rounds loops of the ragged exchange (train/hlo.py and
# hlo_work.py count them at the extra rounds a routing needs: none at balanced routing).
OVERFLOW_SCOPE = "overflow_rounds"


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
