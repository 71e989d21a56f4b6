"""int8 weight-only quantisation for serving: matmul weights stored as int8 with a float
scale per output channel, dequantised inside the step (compute stays in bfloat16).

A weight W with contraction ("input") axes I and output axes O is stored as
q = round(W / s) in [-127, 127] with s = max_I |W| / 127, one scale per output channel
(kept with size-1 input axes, so q * s broadcasts back to W's shape). Rounding to the
nearest integer bounds the error per channel: |W - q s| <= s / 2.

Which axes a weight contracts (the model's `linear` multiplies the first n_in dims):
  expert weights  [E, in, out]   the expert dim is a batch dim: scales per (E, out)
  W_O             [N, O, D]      contracts heads and head dims (MLA.output, n_in = 2)
  the embedding   [V, D]         a lookup, not a product: one scale per row
  every other     [in, ...out]   the first dim
Norm scales, biases and other 1-D vectors stay in the float dtype, and so does the MoE
router (a few M values for V3 whose rounding would move expert choices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
import flax.linen as nn

KEEP_FLOAT = ("w_router",)


@struct.dataclass
class Int8Weight:
  q: jax.Array        # int8, the weight's shape
  scale: jax.Array    # float32, the weight's shape with its contraction axes of size 1


def contraction_axes(name: str, logical_axes: tuple, ndim: int) -> tuple[int, ...] | None:
  """The axes a weight named `name` contracts over, or None to keep it in float."""
  if ndim < 2 or name in KEEP_FLOAT:
    return None
  if logical_axes and logical_axes[0] == "expert" and ndim == 3:
    return (1,)
  if name == "w_o":
    return (0, 1)
  if name == "embed":
    return (1,)
  return (0,)


def quantize(w, axes: tuple[int, ...]) -> Int8Weight:
  """w -> Int8Weight with per-output-channel scales (max |w| over `axes` / 127)."""
  w32 = w.astype(jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return Int8Weight(q=q, scale=scale)


def dequantize(w: Int8Weight, dtype) -> jax.Array:
  return (w.q.astype(jnp.float32) * w.scale).astype(dtype)


def _is_leaf(x):
  return isinstance(x, (nn.LogicallyPartitioned, Int8Weight))


def _name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


def quantize_params(boxed_params):
  """A tree of boxed (nn.LogicallyPartitioned) params -> the same tree with every matmul
  weight an Int8Weight (unboxed). Works on arrays and on ShapeDtypeStructs (eval_shape)."""
  def one(path, x):
    value = x.value if isinstance(x, nn.LogicallyPartitioned) else x
    names = tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else ()
    axes = contraction_axes(_name(path), names, value.ndim)
    return value if axes is None else quantize(value, axes)
  return jax.tree_util.tree_map_with_path(one, boxed_params, is_leaf=_is_leaf)


def dequantize_params(params, dtype):
  """Every Int8Weight of the tree back to a `dtype` array; the rest as it is."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if isinstance(x, Int8Weight) else x,
                      params, is_leaf=lambda x: isinstance(x, Int8Weight))


def scale_shape(shape, axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(1 if i in axes else d for i, d in enumerate(shape))


def scale_spec(spec, axes: tuple[int, ...], ndim: int):
  """The PartitionSpec of a weight's scales: the weight's, contraction axes unsplit."""
  parts = list(spec) + [None] * (ndim - len(spec))
  return type(spec)(*[None if i in axes else p for i, p in enumerate(parts)])
