"""The sharding vocabulary the model is written in: mesh axis names, the logical axis
names given to every weight (layers.py `param`, attention.py, moe.py), and the one table
mapping logical axes to mesh axes.

Mesh axes:
  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params sharded along "embed" (ZeRO-3 style)
  expert  routed experts sharded; the batch is split along it too, so non-expert
          compute stays data-parallel on those devices (as in DeepSpeed-MoE and MaxText).
          When it is > 1, tokens reach their experts by all-to-all inside shard_map
          (expert_parallel.py).
  tensor  heads / FFN width / vocab sharded (Megatron style)

The model only names axes; building a mesh and placing arrays on it is the trainer's
(train/sharding.py).
"""

from __future__ import annotations

import math

import jax
from absl import logging
from jax.sharding import Mesh, PartitionSpec as PS

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or None: replicated). The only sharding table.
RULES = (
    ("batch", BATCH),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("q_lora", None),
    ("kv_lora", None),
    ("head_dim", None),
    ("norm", None),
    ("mtp_concat", None),
    ("layers", None),          # the leading dim of scanned (stacked) block parameters
)



def logical_to_spec(axes, shape, mesh: Mesh) -> PS:
  """PartitionSpec of one array; a dim the mesh axis does not divide is replicated."""
  rules = dict(RULES)
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if dim % size:
      logging.log_first_n(logging.WARNING, "replicating dim %d of logical axis %r: "
                          "not divisible by mesh axes %s (%d)", 20, dim, name, mesh_axes, size)
      spec.append(None)
    else:
      spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
  return PS(*spec)


def constrain(x, axes):
  """x pinned to the sharding of its logical `axes` under the context mesh (jax.set_mesh),
  as activations between layers need: without it, GSPMD may follow a weight's sharding
  into the activations (e.g. the whole batch with d_model split over fsdp). A no-op
  outside a mesh or on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
