"""The mesh and the shardings of the train state and batch, from the logical axes of
model/partitioning.py (its RULES table is the only sharding table). Steps run under
with_mesh, so an MoE layer finds the mesh and goes expert-parallel when mesh.expert > 1.

Axis types are Auto (GSPMD propagation), chosen deliberately over jax.make_mesh's new
Explicit default: linen modules, optax and orbax restore all work on plain jnp code
under Auto with shardings only at the jit boundary, while Explicit would make every
einsum with an ambiguous output sharding an error. See docs/design.md, "Mesh and
sharding".
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as PS
import flax.linen as nn

from deepseek_jax.model.partitioning import BATCH, CONTEXT, MESH_AXES, logical_to_spec


def mesh_shape(mesh_cfg, n_devices: int, embed_dim: int | None = None) -> dict[str, int]:
  """Sizes of the mesh axes from config; one axis may be -1 (takes what is left). A
  config without `context` (written before that axis existed) has context = 1.

  fsdp = -1 with data = 1 and the model's embed_dim given: fsdp shards every weight's
  d_model dim together with "expert", so it takes the largest part of what is left that
  divides embed_dim / expert, and data takes the rest (whole replicas). On a slice whose
  chip count has a factor 3 (384 or 1,536 v5p chips) that factor divides no dim of
  V3's d_model (7,168) or experts: it becomes data parallelism instead of an fsdp axis
  that would replicate every weight it cannot split."""
  sizes = {a: int(mesh_cfg.get(a, 1) if a == CONTEXT else mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(free) > 1:
    raise ValueError(f"mesh: sizes must be positive, with at most one -1; got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ValueError(f"mesh: {sizes} cannot fill {n_devices} devices "
                       f"({n_devices} is not a multiple of {fixed})")
    left = n_devices // fixed
    sizes[free[0]] = left
    if free == ["fsdp"] and sizes["data"] == 1 and embed_dim:
      per = embed_dim // math.gcd(embed_dim, sizes["expert"])
      fsdp = max(d for d in range(1, left + 1) if left % d == 0 and per % d == 0)
      if fsdp != left:
        logging.info("mesh: fsdp=%d (the part of %d that divides d_model=%d over "
                     "expert=%d), data=%d replicas", fsdp, left, embed_dim,
                     sizes["expert"], left // fsdp)
      sizes["fsdp"], sizes["data"] = fsdp, left // fsdp
  if math.prod(sizes.values()) != n_devices:
    raise ValueError(
        f"mesh: {'*'.join(MESH_AXES)} = {'*'.join(str(sizes[a]) for a in MESH_AXES)} = "
        f"{math.prod(sizes.values())}, but there are {n_devices} devices "
        f"({jax.process_count()} process(es)); set --config.mesh.* so the product matches")
  return sizes


def make_mesh(mesh_cfg, devices=None, embed_dim: int | None = None) -> Mesh:
  """The mesh of mesh_cfg over `devices` (default all); embed_dim: the model's d_model,
  which a free fsdp axis must divide (mesh_shape)."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices), embed_dim)
  shape = tuple(sizes[a] for a in MESH_AXES)
  # On a TPU torus each mesh axis should be a product of whole physical axes (the
  # contiguous rings collectives like); where the sizes cannot be (fsdp=4 x expert=64 x
  # tensor=2 on 8x8x8) a physical axis is split rather than refusing the mesh.
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (NotImplementedError, ValueError):
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def param_shardings(boxed_abstract, mesh: Mesh):
  """NamedShardings for a tree of boxed (nn.LogicallyPartitioned) abstract values."""
  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh))
    return NamedSharding(mesh, PS())
  return jax.tree.map(one, boxed_abstract,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batch arrays [B, T+1] (inputs and their shifted targets): B over the batch axes.
  T+1 does not split over "context"; the model splits its [B, T] inputs itself."""
  return NamedSharding(mesh, PS(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS())


def with_mesh(mesh: Mesh, fn):
  """fn called inside jax.set_mesh(mesh): while a jitted step traces, the MoE layer finds
  the mesh with jax.sharding.get_abstract_mesh() and, when its expert axis is > 1, runs
  the routed experts expert-parallel (expert_parallel.py)."""
  @functools.wraps(fn)
  def call(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  def lower(*args, **kwargs):   # ahead-of-time, as jax.jit's .lower
    with jax.set_mesh(mesh):
      return fn.lower(*args, **kwargs)

  call.lower = lower
  return call


def batch_divisor(mesh: Mesh) -> int:
  """The global batch must be a multiple of this (the devices it is split over)."""
  return int(np.prod([mesh.shape[a] for a in BATCH]))
