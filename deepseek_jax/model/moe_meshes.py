"""The meshes the MoE layer's routed experts run on, and the shard_map wrappers of its
paths without expert parallelism: a function of each token alone (routing) and a
dropless dispatch run per batch shard.

The mesh is the one in context (`jax.set_mesh`, see train/sharding.with_mesh): with an
"expert" axis of size > 1 (`expert_mesh`) the layer runs expert-parallel
(expert_parallel.py); on a mesh that only splits tokens (`data_parallel_mesh`) each
batch shard sorts and multiplies its own tokens; a Pallas kernel on any mesh of
several devices (`kernel_mesh`) runs inside a shard_map.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model.partitioning import EXPERT, TOKENS


def expert_mesh():
  """The context mesh if it shards experts (an "expert" axis > 1), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT not in mesh.axis_names or mesh.shape[EXPERT] == 1:
    return None
  return mesh


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
