"""Routed-expert computation: the dispatch paths that take tokens to their experts and
back, shared by the MoE layer (moe.py) and expert parallelism (expert_parallel.py).

Every path takes x [X, D], the chosen experts idx [X, K] (E: no expert, e.g. padding),
their gates [X, K] and the stacked expert weights, and returns (y [X, D], dropped):

  experts_reference  every expert on every token, weighted by its gate (0 if not
                     picked). Slow and obviously correct; the tests' reference.
  experts_capacity   assignments sorted by expert into a [E, C, D] buffer; one batched
                     einsum; assignments past an expert's C slots are dropped and counted.
  experts_dropless   assignments sorted by expert into blocks of `b` rows, each block
                     padded within its expert; one gathered weight per block. Never
                     drops; at most (A/b + E) blocks of work for A = tokens*K assignments.
  experts_ragged     assignments sorted by expert into one buffer of R rows (R = A unless
                     capped); three grouped matmuls (jax.lax.ragged_dot) read each
                     expert's weights once. Assignments past row R are dropped and counted.

Rows move by gathers (whose gradient is a scatter-add), never by scattering activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from deepseek_jax.model.config import ModelConfig


def swiglu_experts(x, w_gate, w_up, w_down, spec):
  """Batched SwiGLU: `spec` is the einsum prefix of the expert-batched dims ('E' or 'n')."""
  a = spec
  h = nn.silu(jnp.einsum(f"{a}cD,{a}DF->{a}cF", x, w_gate))
  h = h * jnp.einsum(f"{a}cD,{a}DF->{a}cF", x, w_up)
  return jnp.einsum(f"{a}cF,{a}FD->{a}cD", h, w_down)


def experts_reference(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Slow and obviously correct: run every expert on every token, weight by its gate."""
  y_XD = jnp.zeros_like(x_XD)
  for e in range(w_gate_EDF.shape[0]):
    h_XD = (nn.silu(x_XD @ w_gate_EDF[e]) * (x_XD @ w_up_EDF[e])) @ w_down_EFD[e]
    weight_X = jnp.sum(jnp.where(idx_XK == e, gates_XK, 0.0), axis=-1)
    y_XD = y_XD + weight_X[:, None].astype(x_XD.dtype) * h_XD
  return y_XD, jnp.zeros((), jnp.float32)


def rank_in_expert(e_A, n_experts):
  """For each assignment, how many earlier assignments (in token order) chose its expert;
  and the per-expert counts. Sort-based: O(A log A), independent of the expert count."""
  A = e_A.shape[0]
  order_A = jnp.argsort(e_A, stable=True)
  counts_E = jnp.zeros((n_experts + 1,), jnp.int32).at[e_A].add(1)
  group_start = jnp.cumsum(counts_E) - counts_E
  rank_sorted = jnp.arange(A) - group_start[e_A[order_A]]
  rank_A = jnp.zeros((A,), jnp.int32).at[order_A].set(rank_sorted)
  return rank_A, counts_E[:n_experts]


def take_rows(x_ND, idx_M):
  """x[idx] for indices known to be in [0, N): a plain row gather. (A zero row padded on
  for out-of-range indices fused into the gather as a per-element pad and made it ~50x
  slower on XLA:CPU; callers clamp and mask instead.)"""
  return jnp.asarray(x_ND).at[idx_M].get(mode="promise_in_bounds")


def gather_rows(x_XD, row_A, n_rows, K):
  """Buffer of n_rows rows; row r holds the token of the assignment placed at r (or 0).

  Gathers (whose gradient is a scatter-add) rather than scattering activations."""
  A = row_A.shape[0]
  src = jnp.full((n_rows,), A, jnp.int32).at[row_A].set(jnp.arange(A, dtype=jnp.int32),
                                                        mode="drop")
  rows = take_rows(x_XD, jnp.minimum(src, A - 1) // K)
  return jnp.where((src < A)[:, None], rows, jnp.zeros((), x_XD.dtype))


def combine(out_RD, row_A, gates_XK):
  """y_X = sum_k gate_k * out[row of assignment (x, k)]; rows out of range give 0."""
  X, K = gates_XK.shape
  R = out_RD.shape[0]
  y_XKD = take_rows(out_RD, jnp.minimum(row_A, R - 1)).reshape(X, K, -1)
  gates_XK = jnp.where((row_A < R).reshape(X, K), gates_XK, 0.0)
  return jnp.einsum("XKD,XK->XD", y_XKD, gates_XK.astype(y_XKD.dtype))


def capacity(n_tokens: int, cfg: ModelConfig) -> int:
  c = math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_routed_experts)
  return max(1, min(c, n_tokens))


def experts_capacity(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD, C):
  """Capacity-padded dispatch: earlier tokens win a full expert's slots; returns drops."""
  X, K = idx_XK.shape
  E = w_gate_EDF.shape[0]
  e_A = idx_XK.reshape(-1)
  rank_A, _ = rank_in_expert(e_A, E)
  kept_A = (e_A < E) & (rank_A < C)
  row_A = jnp.where(kept_A, e_A * C + rank_A, E * C)
  buf_ECD = gather_rows(x_XD, row_A, E * C, K).reshape(E, C, -1)
  out_ECD = swiglu_experts(buf_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, "E")
  dropped = jnp.sum((e_A < E) & ~kept_A).astype(jnp.float32)
  return combine(out_ECD.reshape(E * C, -1), row_A, gates_XK), dropped


def dropless_block_size(n_assignments: int, n_experts: int) -> int:
  """Rows per block. The static bound n = A/b + E blocks costs n weight gathers (each
  3 D F values, and a scatter-add in the backward) plus n * b padded rows of compute:
  cost(b) ~ (A/b + E)(g + b), g = one gathered weight value's cost in row-FLOPs.
  Minimised at b = sqrt(g A / E); g ~ 40 measured on XLA:CPU (BUILD_NOTES.md: E=8 best
  at 128, E=256 at 32, 2048 tokens top-2), rounded to a power of two in [8, 256]."""
  b = math.sqrt(40.0 * max(n_assignments, 1) / n_experts)
  return int(min(256, max(8, 2 ** round(math.log2(b)))))


def experts_dropless(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD, block):
  """Block-grouped dispatch: each expert's assignments fill whole blocks of `block` rows."""
  X, K = idx_XK.shape
  E = w_gate_EDF.shape[0]
  A = X * K
  n_blocks = -(-A // block) + E  # sum_e ceil(n_e / b) <= A / b + E
  e_A = idx_XK.reshape(-1)
  rank_A, counts_E = rank_in_expert(e_A, E)
  blocks_E = -(-counts_E // block)
  block_end_E = jnp.cumsum(blocks_E)
  first_row_E = (block_end_E - blocks_E) * block
  row_A = jnp.where(e_A < E, first_row_E[jnp.minimum(e_A, E - 1)] + rank_A, n_blocks * block)
  block_expert_n = jnp.minimum(
      jnp.searchsorted(block_end_E, jnp.arange(n_blocks), side="right"), E - 1)
  buf_nbD = gather_rows(x_XD, row_A, n_blocks * block, K).reshape(n_blocks, block, -1)
  out_nbD = swiglu_experts(buf_nbD, w_gate_EDF[block_expert_n], w_up_EDF[block_expert_n],
                            w_down_EFD[block_expert_n], "n")
  return (combine(out_nbD.reshape(n_blocks * block, -1), row_A, gates_XK),
          jnp.zeros((), jnp.float32))


def experts_ragged(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD, n_rows=None):
  """Grouped-matmul dispatch: assignments in expert order, one ragged_dot per weight.

  n_rows (static) caps the sorted buffer at R rows; None: R = A = X*K, never drops.
  Past the cap the END of the expert order is dropped: the highest expert ids lose
  first, and the expert straddling row R loses its latest tokens. One global cap cannot
  give every expert its earliest tokens; this rule is deterministic and counted.

  XLA:CPU has no grouped matmul: jax lowers ragged_dot there as a dense [E, R, D]
  masked product (E times the work), so on CPU this path is for testing."""
  X, K = idx_XK.shape
  E = w_gate_EDF.shape[0]
  A = X * K
  R = A if n_rows is None else min(n_rows, A)
  e_A = idx_XK.reshape(-1)
  order_A = jnp.argsort(e_A, stable=True)  # sorted position -> assignment; sentinel E last
  pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  counts_E = jnp.zeros((E + 1,), jnp.int32).at[e_A].add(1)[:E]
  n_real = jnp.sum(counts_E)
  n_kept = jnp.minimum(n_real, R)
  # Rows [start_e, start_e + size_e) hold expert e; sizes sum to n_kept <= R.
  start_E = jnp.cumsum(counts_E) - counts_E
  size_E = jnp.clip(R - start_E, 0, counts_E).astype(jnp.int32)
  live_R = jnp.arange(R) < n_kept
  row_A = jnp.where(pos_A < n_kept, pos_A, R)  # R: dropped or no expert
  buf_RD = take_rows(x_XD, order_A[:R] // K)
  buf_RD = jnp.where(live_R[:, None], buf_RD, jnp.zeros((), x_XD.dtype))
  dot = lambda a, w: jax.lax.ragged_dot(a, w, size_E)
  h_RF = nn.silu(dot(buf_RD, w_gate_EDF)) * dot(buf_RD, w_up_EDF)
  # ragged_dot leaves rows past sum(size_E) out of every group: jax's CPU lowering gives
  # them 0, a TPU/GPU kernel need not write them at all. Masking here (and the buffer
  # above) keeps whatever they hold out of y and, via `where`'s select, out of dx.
  out_RD = jnp.where(live_R[:, None], dot(h_RF, w_down_EFD), jnp.zeros((), x_XD.dtype))
  dropped = (n_real - n_kept).astype(jnp.float32)
  return combine(out_RD, row_A, gates_XK), dropped
