"""The sharding vocabulary the model is written in: mesh axis names, the logical axis
names given to every weight (layers.py `param`, attention.py, moe.py), and the one table
mapping logical axes to mesh axes.

Mesh axes:
  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params sharded along "embed" (ZeRO-3 style, together
          with the expert axis for the weights that are not routed experts)
  expert  routed experts sharded; the batch is split along it too, so non-expert
          compute stays data-parallel on those devices (as in DeepSpeed-MoE and MaxText).
          When it is > 1, tokens reach their experts by all-to-all inside shard_map
          (expert_parallel.py).
  context every sequence split along its length (context parallelism, for the long-
          context stages): the weights are data-parallel over it like over fsdp, and
          attention all-gathers the compressed latent of the other shards
          (context_parallel.py); everything else sees its shards as more tokens.
  tensor  heads / FFN width / vocab sharded (Megatron style)

The model only names axes; building a mesh and placing arrays on it is the trainer's
(train/sharding.py).
"""

from __future__ import annotations

import math

import jax
from absl import logging
from jax.sharding import Mesh, PartitionSpec as PS

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH = ("data", "fsdp", "expert")
CONTEXT = "context"
EXPERT = "expert"
TENSOR = "tensor"
# The axes that split tokens: a [B, T] array flattened to [X] is split over the batch
# axes (major) and the context axis (minor), the order of MESH_AXES, so the reshape moves
# no data.
TOKENS = BATCH + (CONTEXT,)

# logical axis -> mesh axis (or None: replicated). The only sharding table.
RULES = (
    ("batch", BATCH),
    ("length", CONTEXT),
    ("vocab", "tensor"),
    # FSDP: every weight's model dim is split over fsdp AND expert AND context (both are
    # data parallelism for everything but the routed experts, so they share their
    # storage); an expert weight, whose E takes "expert", keeps fsdp and context.
    ("embed", ("fsdp", "expert", CONTEXT)),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    # MLA's latent dims: the up-projections [Q|R, N, H] would otherwise be split only by
    # heads over "tensor"; FSDP shards them too (the down-projections [D, Q|R] already
    # take fsdp x expert on D, so their latent dim stays whole).
    ("q_lora", ("fsdp", "expert", CONTEXT)),
    ("kv_lora", ("fsdp", "expert", CONTEXT)),
    ("head_dim", None),
    ("norm", None),
    ("mtp_concat", None),
    ("layers", None),          # the leading dim of scanned (stacked) block parameters
)



def logical_to_spec(axes, shape, mesh: Mesh) -> PS:
  """PartitionSpec of one array; a dim the mesh axis does not divide is replicated."""
  rules = dict(RULES)
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axes = rules.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    # A mesh axis shards one dim only: an expert weight [E, D, F] takes "expert" for E,
    # so its "embed" dim keeps just "fsdp".
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    mesh_axes = tuple(a for a in mesh_axes
                      if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    if not mesh_axes:
      spec.append(None)
      continue
    fits = _largest_dividing(mesh_axes, dim, mesh)
    if not fits:
      logging.log_first_n(logging.WARNING, "replicating dim %d of logical axis %r: not "
                          "divisible by mesh axes %s", 20, dim, name, mesh_axes)
      spec.append(None)
      continue
    if fits != mesh_axes:
      logging.log_first_n(logging.INFO, "dim %d of logical axis %r: not divisible by mesh "
                          "axes %s, sharded over %s", 5, dim, name, mesh_axes, fits)
    used.update(fits)
    spec.append(fits if len(fits) > 1 else fits[0])
  return PS(*spec)


def _largest_dividing(mesh_axes, dim, mesh):
  """The subset of mesh_axes (in order) with the largest size that divides dim: e.g. a
  1536-wide q-latent on fsdp=16 x expert=64 takes expert alone rather than nothing."""
  best, best_size = (), 1
  for mask in range(1, 2 ** len(mesh_axes)):
    subset = tuple(a for i, a in enumerate(mesh_axes) if mask >> i & 1)
    size = math.prod(mesh.shape[a] for a in subset)
    if dim % size == 0 and (size > best_size or (size == best_size and len(subset) > len(best))):
      best, best_size = subset, size
  return best


def constrain(x, axes):
  """x pinned to the sharding of its logical `axes` under the context mesh (jax.set_mesh),
  as activations between layers need: without it, GSPMD may follow a weight's sharding
  into the activations (e.g. the whole batch with d_model split over fsdp). A no-op
  outside a mesh or on one device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names):
    return x   # (inside a whole-mesh shard_map every value is already per-device)
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


# The logical axes whose mesh axes (fsdp, expert, context) only store a weight: under
# context parallelism a weight is all-gathered over them where it is used (`gathered`).
STORAGE_AXES = ("embed", "q_lora", "kv_lora")


def gathered(w, axes):
  """Weight w (logical `axes`) pinned to its compute sharding: whole along the storage
  axes, still split along heads / mlp / vocab / experts. Applied under context
  parallelism (layers.param): left to itself, the SPMD partitioner kept the 671B's LM
  head split along d_model and all-gathered the activations of all 512 chips instead
  (a 252 GiB [256, 8192, 64640] logits buffer at 32K)."""
  return constrain(w, tuple(None if a in STORAGE_AXES else a for a in axes))


def axis_size(name: str) -> int:
  """The size of mesh axis `name` in the context mesh (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or name not in mesh.axis_names else mesh.shape[name]
