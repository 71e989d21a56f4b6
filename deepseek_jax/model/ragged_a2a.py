"""Ragged all-to-all: the collective that moves exactly the live rows of an expert-parallel
exchange, a stand-in with its semantics for XLA:CPU, and the round plan that bounds the
receive buffer.

`jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
recv_sizes, axis_name=...)`, one slice per peer (Z = the axis size): this shard sends
operand[input_offsets[j] : + send_sizes[j]] to peer j, where it is written at
output_offsets[j] of j's `output`; it receives recv_sizes[j] rows from peer j; rows of
`output` nobody writes keep their value. XLA:CPU does not implement it (the TPU and GPU
compilers do), so `ragged_all_to_all` below runs the primitive where the program is built
for a TPU or GPU and `padded_all_to_all` elsewhere: the same semantics from a padded
all_to_all of [Z, max_rows] blocks (max_rows: a static bound on one slice), so the CPU
tests run the pod's exchange with only this primitive swapped.

The round plan (`exchange_plan`). Every source shard s sends counts[s, d] rows to each
destination d, in destination order (its send buffer is sorted by destination). A
destination's receive stream orders its rows by source, then by the source's order;
round r takes stream places [r cap, (r + 1) cap), so a round never writes more than cap
rows on any shard, and a routing needs max_d ceil(sum_s counts[s, d] / cap) rounds: more
than one only when some destination's TOTAL exceeds its buffer. Everything follows from
the [Z, Z] counts (an all_gather of each shard's [Z] row): no other exchange of sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def exchange_plan(counts_SD, me, cap: int, r):
  """Round r of an exchange whose source s sends counts_SD[s, d] rows to d (the same
  [Z, Z] matrix on every shard), for shard `me`. Returns (dispatch, back): the four
  ragged_all_to_all vectors (input_offsets, send_sizes, output_offsets, recv_sizes) of
  sending this round's rows out, and of sending their results back to where they came
  from (into a buffer laid out as the send buffer)."""
  counts_SD = counts_SD.astype(jnp.int32)
  stream_start_SD = jnp.cumsum(counts_SD, axis=0) - counts_SD   # s's first place in d
  send_start_SD = jnp.cumsum(counts_SD, axis=1) - counts_SD     # d's first row in s's buffer
  lo_SD = jnp.clip(r * cap - stream_start_SD, 0, counts_SD)
  hi_SD = jnp.clip((r + 1) * cap - stream_start_SD, 0, counts_SD)
  size_SD = hi_SD - lo_SD
  # Offsets of empty slices are set to 0 (never read, kept in range).
  recv_at_SD = jnp.where(size_SD > 0, stream_start_SD + lo_SD - r * cap, 0)
  send_at_SD = jnp.where(size_SD > 0, send_start_SD + lo_SD, 0)
  dispatch = (send_at_SD[me], size_SD[me], recv_at_SD[me], size_SD[:, me])
  back = (recv_at_SD[:, me], size_SD[:, me], send_at_SD[:, me], size_SD[me])
  return dispatch, back


def rounds_needed(counts_SD, cap: int):
  """Rounds of `cap` received rows per destination that move every row."""
  total_D = jnp.sum(counts_SD, axis=0)
  return jnp.max((total_D + cap - 1) // cap)


def padded_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                      recv_sizes, *, axis_name, max_rows: int):
  """ragged_all_to_all's semantics from one all_to_all of [Z, max_rows] blocks (each
  slice padded to max_rows, its static bound) and a scatter into `output`. Gathers,
  all_to_all and an indexed set: differentiable as they are."""
  Z = input_offsets.shape[0]
  n = operand.shape[0]
  i_M = jnp.arange(max_rows)
  take = jnp.clip(input_offsets[:, None] + i_M[None, :], 0, n - 1)        # [Z, M]
  blocks = jnp.take(operand, take.reshape(-1), axis=0).reshape((Z, max_rows)
                                                                 + operand.shape[1:])
  sent = (i_M[None, :] < send_sizes[:, None]).reshape((Z, max_rows)
                                                      + (1,) * (operand.ndim - 1))
  blocks = jnp.where(sent, blocks, jnp.zeros((), operand.dtype))
  got = jax.lax.all_to_all(blocks, axis_name, 0, 0)                       # by source
  at_Z = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where mine go
  rows = jnp.where(i_M[None, :] < recv_sizes[:, None], at_Z[:, None] + i_M[None, :],
                   output.shape[0])                                       # past the end
  return output.at[rows.reshape(-1)].set(got.reshape((Z * max_rows,) + output.shape[1:]),
                                         mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                      recv_sizes, *, axis_name, max_rows: int):
  """jax.lax.ragged_all_to_all where the program is built for a TPU or GPU, else
  padded_all_to_all (max_rows: the largest slice; the stand-in's padding)."""
  from deepseek_jax.model.layers import target_platform
  args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
  if target_platform() in ("tpu", "gpu"):
    return jax.lax.ragged_all_to_all(*args, axis_name=axis_name)
  return padded_all_to_all(*args, axis_name=axis_name, max_rows=max_rows)
