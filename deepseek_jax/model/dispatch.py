"""Routed-expert computation: the dispatch paths that take tokens to their experts and
back, shared by the MoE layer (moe.py) and expert parallelism (padded_exchange.py,
ragged_exchange.py).

Every path takes x [X, D], the chosen experts idx [X, K] (E: no expert, e.g. padding),
their gates [X, K] and the stacked expert weights, and returns (y [X, D], dropped):

  experts_reference  every expert on every token, weighted by its gate (0 if not
                     picked). Slow and obviously correct; the tests' reference.
  experts_capacity   assignments sorted by expert into a [E, C, D] buffer; one batched
                     einsum; assignments past an expert's C slots are dropped and counted.
  experts_dropless   assignments sorted by expert into blocks of `b` rows, each block
                     padded within its expert; a loop over the live blocks runs each
                     through its expert's weights in place (swiglu_blocks). Never drops;
                     at most (A/b + E) blocks for A = tokens*K assignments.
  experts_ragged     assignments sorted by expert into one buffer of M rows (M = A unless
                     capped); three grouped matmuls (jax.lax.ragged_dot) read each
                     expert's weights once. Assignments past row M are dropped and counted.

Rows move by gathers (whose gradient is a scatter-add), never by scattering activations.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from absl import logging
from jax.ad_checkpoint import checkpoint_name

from deepseek_jax.model.config import ModelConfig


def swiglu_experts(x, w_gate, w_up, w_down, spec):
  """Batched SwiGLU: `spec` is the einsum prefix of the expert-batched dims ('E' or 'n')."""
  a = spec
  h = nn.silu(jnp.einsum(f"{a}cD,{a}DF->{a}cF", x, w_gate))
  h = h * jnp.einsum(f"{a}cD,{a}DF->{a}cF", x, w_up)
  return jnp.einsum(f"{a}cF,{a}FD->{a}cD", h, w_down)


# Block-looped SwiGLU ----------------------------------------------------------------
# The dropless path's expert computation, block by block: block i of the sorted buffer
# runs through expert e_n[i]'s weights, indexed in place. The batched form above needs
# the weights gathered per block ([n, D, F] copies, 3 per layer, and their scatter-add
# and transposes in the backward) and computes every block up to the static bound; the
# loop reads each weight in place, stops after the live blocks (n_live, traced) and
# accumulates weight gradients in place. XLA cannot differentiate a loop with a traced
# trip count, so the backward is written out (custom_vjp); swiglu_experts on gathered
# weights is its reference in the tests.

def _silu_parts(g):
  """(silu(g), sigmoid(g) in float32)."""
  sig = jax.nn.sigmoid(g.astype(jnp.float32))
  return g * sig.astype(g.dtype), sig


def zeros_like_all(shape, dtype, *like):
  """Zeros of `shape` that vary over every manual mesh axis any of `like` varies over:
  inside shard_map (expert parallelism) a loop carry must keep one such type, and the
  loop's results mix per-shard tokens with per-shard weights."""
  zero = sum(jnp.zeros_like(a, dtype, shape=()) for a in like)
  return jnp.broadcast_to(zero, shape)


def varying_axes(a) -> frozenset:
  return jax.typeof(a).manual_axis_type.varying


def sum_to_type(grad, primal):
  """A weight gradient with the weight's dtype and manual-axis type: inside shard_map,
  summed over the axes the tokens vary over but the weight does not (what JAX's own
  transpose of the weight's implicit broadcast does)."""
  extra = varying_axes(grad) - varying_axes(primal)
  if extra:
    grad = jax.lax.psum(grad, tuple(sorted(extra)))
  return grad.astype(primal.dtype)


def _block(a, i):
  return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


@jax.custom_vjp
def swiglu_blocks(x_nbD, expert_n, n_live, w_gate_EDF, w_up_EDF, w_down_EFD):
  """y[i] = SwiGLU of x[i] with expert expert_n[i]'s weights for blocks i < n_live, 0
  after: swiglu_experts(x, w_gate[expert_n], ...) without gathering the weights."""
  return _swiglu_blocks_fwd(x_nbD, expert_n, n_live, w_gate_EDF, w_up_EDF, w_down_EFD)[0]


def _swiglu_blocks_fwd(x_nbD, expert_n, n_live, w_gate_EDF, w_up_EDF, w_down_EFD):
  n, b, D = x_nbD.shape
  F = w_gate_EDF.shape[-1]

  def body(i, carry):
    y_nbD, g_nbF, u_nbF = carry
    e = expert_n[i]
    x_bD = _block(x_nbD, i)
    g_bF = x_bD @ _block(w_gate_EDF, e)
    u_bF = x_bD @ _block(w_up_EDF, e)
    y_bD = (_silu_parts(g_bF)[0] * u_bF) @ _block(w_down_EFD, e)
    put = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, i, 0)
    return put(y_nbD, y_bD), put(g_nbF, g_bF), put(u_nbF, u_bF)

  zeros = lambda *shape: zeros_like_all(shape, x_nbD.dtype, x_nbD, w_gate_EDF)
  y_nbD, g_nbF, u_nbF = jax.lax.fori_loop(0, n_live, body,
                                          (zeros(n, b, D), zeros(n, b, F), zeros(n, b, F)))
  return y_nbD, (x_nbD, expert_n, n_live, w_gate_EDF, w_up_EDF, w_down_EFD, g_nbF, u_nbF)


def _swiglu_blocks_bwd(res, dy_nbD):
  x_nbD, expert_n, n_live, w_gate_EDF, w_up_EDF, w_down_EFD, g_nbF, u_nbF = res
  f32 = jnp.float32

  def body(i, carry):
    dx_nbD, dwg, dwu, dwd = carry
    e = expert_n[i]
    x_bD, g_bF, u_bF, dy_bD = (_block(a, i) for a in (x_nbD, g_nbF, u_nbF, dy_nbD))
    wg, wu, wd = (_block(w, e) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    s_bF, sig_bF = _silu_parts(g_bF)
    dh_bF = dy_bD @ wd.T
    du_bF = dh_bF * s_bF
    # d silu(g) / dg = sig (1 + g (1 - sig))
    dg_bF = ((dh_bF * u_bF).astype(f32) * sig_bF
             * (1 + g_bF.astype(f32) * (1 - sig_bF))).astype(g_bF.dtype)
    dx_bD = dg_bF @ wg.T + du_bF @ wu.T
    # Weight gradients accumulate in float32, in place, in expert e's slot.
    acc = lambda a, v: jax.lax.dynamic_update_index_in_dim(
        a, _block(a, e) + v.astype(f32), e, 0)
    return (jax.lax.dynamic_update_index_in_dim(dx_nbD, dx_bD, i, 0),
            acc(dwg, x_bD.T @ dg_bF), acc(dwu, x_bD.T @ du_bF),
            acc(dwd, (s_bF * u_bF).T @ dy_bD))

  zeros = lambda a, dtype: zeros_like_all(a.shape, dtype, x_nbD, dy_nbD, w_gate_EDF)
  init = (zeros(x_nbD, x_nbD.dtype), zeros(w_gate_EDF, f32), zeros(w_up_EDF, f32),
          zeros(w_down_EFD, f32))
  dx_nbD, dwg, dwu, dwd = jax.lax.fori_loop(0, n_live, body, init)
  return (dx_nbD, None, None) + tuple(
      sum_to_type(dw, w) for dw, w in ((dwg, w_gate_EDF), (dwu, w_up_EDF), (dwd, w_down_EFD)))


swiglu_blocks.defvjp(_swiglu_blocks_fwd, _swiglu_blocks_bwd)


def experts_reference(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Slow and obviously correct: run every expert on every token, weight by its gate."""
  y_XD = jnp.zeros_like(x_XD)
  for e in range(w_gate_EDF.shape[0]):
    h_XD = (nn.silu(x_XD @ w_gate_EDF[e]) * (x_XD @ w_up_EDF[e])) @ w_down_EFD[e]
    weight_X = jnp.sum(jnp.where(idx_XK == e, gates_XK, 0.0), axis=-1)
    y_XD = y_XD + weight_X[:, None].astype(x_XD.dtype) * h_XD
  return y_XD, jnp.zeros((), jnp.float32)


# experts_dense replaces the dropless path for a handful of tokens (a decode step, a
# speculative round) when ALL routed weights are small: then the sort, the block
# bookkeeping and the loop cost more than running every expert, while reading every
# expert's weights (instead of K of them) costs little. Measured on XLA:CPU
# (docs/history.md, "reach XLA's ceiling", item 4): the bench's drafter (8 experts of
# 64 x 32, 196 KiB) decodes faster dense; config.small (16 experts of 128 x 64, 1.5 MiB)
# slower (each dense projection ~60 us of weight reads per layer).
DENSE_MAX_TOKENS = 8
DENSE_MAX_WEIGHT_BYTES = 2 ** 18


def dense_is_cheaper(n_tokens: int, n_experts: int, d_model: int, width: int,
                     itemsize: int) -> bool:
  """Whether experts_dense (all E experts on all tokens) is the cheaper dropless path."""
  weight_bytes = 3 * n_experts * d_model * width * itemsize
  return n_tokens <= DENSE_MAX_TOKENS and weight_bytes <= DENSE_MAX_WEIGHT_BYTES


def experts_dense(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD):
  """Every expert on every token in three batched products, combined by each token's
  gates ([X, E], 0 where not picked): experts_reference's arithmetic without its loop.
  Never drops. E/K times the routed FLOPs and weight reads (dense_is_cheaper)."""
  E = w_gate_EDF.shape[0]
  weight_XE = jnp.sum(jax.nn.one_hot(idx_XK, E, dtype=jnp.float32)
                      * gates_XK[..., None].astype(jnp.float32), axis=1)
  # Expert-major batched products ([E, X, .] x [E, ., .]): the layouts the weights are
  # stored in, so that no weight is transposed per call.
  x_EXD = jnp.broadcast_to(x_XD, (E,) + x_XD.shape)
  y_EXD = swiglu_experts(x_EXD, w_gate_EDF, w_up_EDF, w_down_EFD, "E")
  y_XD = jnp.einsum("EXD,XE->XD", y_EXD, weight_XE.astype(y_EXD.dtype))
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


def take_rows(x, idx):
  """x[idx] for indices known to be in [0, len(x)): a plain row gather. (A zero row padded on
  for out-of-range indices fused into the gather as a per-element pad and made it ~50x
  slower on XLA:CPU; callers clamp and mask instead.)"""
  return jnp.asarray(x).at[idx].get(mode="promise_in_bounds")


def gather_rows(x_XD, row_A, n_rows, K):
  """Buffer of n_rows rows; row r holds the token of the assignment placed at r (or 0).

  Gathers (whose gradient is a scatter-add) rather than scattering activations."""
  A = row_A.shape[0]
  src = jnp.full((n_rows,), A, jnp.int32).at[row_A].set(jnp.arange(A, dtype=jnp.int32),
                                                        mode="drop")
  rows = take_rows(x_XD, jnp.minimum(src, A - 1) // K)
  return jnp.where((src < A)[:, None], rows, jnp.zeros((), x_XD.dtype))


def combine(out_MD, row_A, gates_XK):
  """y_X = sum_k gate_k * out[row of assignment (x, k)]; rows out of range give 0."""
  X, K = gates_XK.shape
  M = out_MD.shape[0]
  y_XKD = take_rows(out_MD, jnp.minimum(row_A, M - 1)).reshape(X, K, -1)
  gates_XK = jnp.where((row_A < M).reshape(X, K), gates_XK, 0.0)
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
  """Rows per block. About A/b + E blocks run, each costing a fixed overhead (a loop
  iteration that reads 3 D F weight values) plus b rows of compute, padding included:
  cost(b) ~ (A/b + E)(g + b), minimised at b = sqrt(g A / E); g ~ 40 row-equivalents
  fits XLA:CPU (2048 tokens top-2, fwd+bwd: E=8 best at b 128-256, E=256 at 16-32;
  docs/history.md, "reach XLA's ceiling", item 3), rounded to a power of two in [8, 256]."""
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
  # Only the first block_end_E[-1] blocks hold assignments; the loop stops there.
  out_nbD = swiglu_blocks(buf_nbD, block_expert_n.astype(jnp.int32), block_end_E[-1],
                          w_gate_EDF, w_up_EDF, w_down_EFD)
  return (combine(out_nbD.reshape(n_blocks * block, -1), row_A, gates_XK),
          jnp.zeros((), jnp.float32))


def megablox_row_tile(m: int, groups: int) -> int:
  """megablox's tm for m rows in `groups` groups: a group runs whole row tiles (one more
  where it starts or ends inside one), so the largest of 512, 256, 128 that a group's
  share m / groups fills; m rounded up to 16 when m itself is smaller."""
  if m < 128:
    return -(-m // 16) * 16
  return next((t for t in (512, 256) if t <= m / groups and m % t == 0), 128)


def megablox_tiling(m: int, k: int, n: int, groups: int) -> tuple[int, int, int]:
  """megablox's (tm, tk, tn) (the caller pads m to a multiple of tm: grouped_rows); k and
  n in one tile size (its VJP reuses the tiling with k and n swapped), the largest of
  1024 .. 128 that divides both, else 128 (Mosaic's lane width: a tile past a small
  dim's end is computed all the same)."""
  t = next((t for t in (1024, 512, 256, 128) if k % t == 0 and n % t == 0), 128)
  return megablox_row_tile(m, groups), t, t


def grouped_rows(n_rows: int, impl: str, groups: int) -> int:
  """A grouped-matmul buffer's row count for `impl`: megablox takes whole row tiles."""
  if impl != "megablox":
    return n_rows
  if n_rows < 128:
    return -(-n_rows // 16) * 16
  tm = next((t for t in (512, 256) if t <= n_rows / groups), 128)
  return -(-n_rows // tm) * tm


_logged_megablox_fallback = []


def grouped_matmul(x_MD, w_EDF, size_E, impl: str = "xla", interpret: bool = False):
  """[M, D] x [E, D, F] -> [M, F]: rows [start_e, start_e + size_e) times expert e's
  weights; rows past sum(size_E) are left out of every group (0 here or undefined,
  by implementation: callers mask them). "xla": jax.lax.ragged_dot; "tokamax":
  tokamax.ragged_dot (a grouped-GEMM kernel on GPU, its XLA path on CPU; imported only
  when used); "megablox": jax's Pallas kernels for TPU (gmm; its VJP's tgmm computes
  the weight gradient over the tiles that hold rows), jax.lax.ragged_dot on other
  backends unless interpret=True (the kernels in Pallas' interpreter: the tests)."""
  if impl == "xla":
    return jax.lax.ragged_dot(x_MD, w_EDF, size_E)
  if impl == "tokamax":
    from deepseek_jax.model.fused_attention import import_tokamax
    return import_tokamax().ragged_dot(x_MD, w_EDF, size_E)
  if impl == "megablox":
    from deepseek_jax.model.layers import target_platform
    if target_platform() != "tpu" and not interpret:
      if not _logged_megablox_fallback:
        _logged_megablox_fallback.append(True)
        logging.info("grouped_matmul='megablox' off TPU: jax.lax.ragged_dot instead "
                     "(same result, no Pallas kernel)")
      return jax.lax.ragged_dot(x_MD, w_EDF, size_E)
    from jax.experimental.pallas.ops.tpu import megablox
    E, D, F = w_EDF.shape
    tiling = megablox_tiling(x_MD.shape[0], D, F, E)
    return megablox.gmm(x_MD, w_EDF, size_E.astype(jnp.int32), x_MD.dtype, tiling,
                        interpret=interpret)
  raise ValueError(f"unknown grouped matmul {impl!r}; known: 'xla', 'tokamax', 'megablox'")


def experts_ragged(x_XD, idx_XK, gates_XK, w_gate_EDF, w_up_EDF, w_down_EFD, n_rows=None,
                   impl: str = "xla"):
  """Grouped-matmul dispatch: assignments in expert order, one grouped matmul per weight
  (`grouped_matmul` with `impl`).

  n_rows (static) caps the sorted buffer at n_cap rows; None: n_cap = A = X*K, never drops.
  Past the cap the END of the expert order is dropped: the highest expert ids lose
  first, and the expert straddling row n_cap loses its latest tokens. One global cap cannot
  give every expert its earliest tokens; this rule is deterministic and counted.

  XLA:CPU has no grouped matmul: jax lowers ragged_dot there as a dense [E, M, D]
  masked product (E times the work), so on CPU this path is for testing."""
  X, K = idx_XK.shape
  E = w_gate_EDF.shape[0]
  A = X * K
  n_cap = A if n_rows is None else min(n_rows, A)
  e_A = idx_XK.reshape(-1)
  order_A = jnp.argsort(e_A, stable=True)  # sorted position -> assignment; sentinel E last
  pos_A = jnp.zeros((A,), jnp.int32).at[order_A].set(jnp.arange(A, dtype=jnp.int32))
  counts_E = jnp.zeros((E + 1,), jnp.int32).at[e_A].add(1)[:E]
  n_real = jnp.sum(counts_E)
  n_kept = jnp.minimum(n_real, n_cap)
  # Rows [start_e, start_e + size_e) hold expert e; sizes sum to n_kept <= n_cap. The
  # buffer is M rows (n_cap, padded to what the kernel tiles (grouped_rows): the padding is dead.
  start_E = jnp.cumsum(counts_E) - counts_E
  size_E = jnp.clip(n_cap - start_E, 0, counts_E).astype(jnp.int32)
  M = grouped_rows(n_cap, impl, E)
  live_M = jnp.arange(M) < n_kept
  row_A = jnp.where(pos_A < n_kept, pos_A, M)  # M: dropped or no expert
  src_M = jnp.concatenate([order_A[:n_cap],
                           jnp.full((M - n_cap,), A - 1, order_A.dtype)])
  buf_MD = take_rows(x_XD, src_M // K)
  buf_MD = jnp.where(live_M[:, None], buf_MD, jnp.zeros((), x_XD.dtype))
  dot = lambda a, w: grouped_matmul(a, w, size_E, impl)
  # Named for remat_save_experts: saved, the backward needs no routed matmul again.
  g_MF = checkpoint_name(dot(buf_MD, w_gate_EDF), "moe_gate")
  u_MF = checkpoint_name(dot(buf_MD, w_up_EDF), "moe_up")
  h_MF = nn.silu(g_MF) * u_MF
  # ragged_dot leaves rows past sum(size_E) out of every group: jax's CPU lowering gives
  # them 0, a TPU/GPU kernel need not write them at all. Masking here (and the buffer
  # above) keeps whatever they hold out of y and, via `where`'s select, out of dx.
  out_MD = jnp.where(live_M[:, None], dot(h_MF, w_down_EFD), jnp.zeros((), x_XD.dtype))
  dropped = (n_real - n_kept).astype(jnp.float32)
  return combine(out_MD, row_A, gates_XK), dropped
