"""Context parallelism: attention over sequences split along the mesh's "context" axis.

Every layer but attention treats a context shard's positions as more tokens (they are
split like the batch: partitioning.TOKENS). Attention needs every earlier key, and MLA
makes that cheap: a key and value are functions of the token's latent (c_kv, R values)
and its shared rope key (k_R, P values), so each shard all-gathers those R + P = 576
values a token (V3) from the other shards, instead of the N (H + P + O) = 40,960 of
per-head K and V, and up-projects them locally. The gather's gradient is a
reduce-scatter (the transpose of all_gather). Causality and documents use global token
indices.

Layout: the zig-zag order (Megatron's and ring attention's load balance). Each sequence
is cut into 2n chunks of c = T / 2n positions and shard i holds chunks i and 2n-1-i, so
under a causal mask every shard attends over the same number of (query, key) pairs;
in order, shard i would hold [i t, (i + 1) t) and the last shard would do 2n - 1 times
the first one's work. The model moves its inputs into this layout at the embedding and
its hidden states back before the head (`to_zigzag` / `from_zigzag`: two
collective-permutes of half a shard each); the layers between see it as token order,
and attention masks with the global index each position carries (`zigzag_index`).

`gather_latent_attention` runs `core` per device in a shard_map over the whole mesh:
queries split over the batch axes, "context" and (heads) "tensor"; the latent gathered
over "context"; the up-projection weights split over "tensor" by heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model.partitioning import BATCH, CONTEXT, axis_size


def context_size() -> int:
  """Shards of the context mesh's "context" axis (1: no context parallelism)."""
  return axis_size(CONTEXT)


def zigzag_index(T: int, n: int) -> np.ndarray:
  """[T] int32: the sequence index held at each place of the zig-zag layout over n
  shards (shard i's T / n places are chunk i, then chunk 2n-1-i, of T / 2n each)."""
  if T % (2 * n):
    raise ValueError(f"the zig-zag layout needs a length divisible by 2 x context = "
                     f"{2 * n}; got {T}")
  c = T // (2 * n)
  chunks = [j for i in range(n) for j in (i, 2 * n - 1 - i)]
  return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks]).astype(np.int32)


def shard_live_tiles(T: int, n: int, block: int, zigzag: bool = True) -> list[int]:
  """Per context shard, the (query block, key block) tiles blockwise attention runs
  under the causal mask (attention.blockwise_attention's skip rule: a tile is live when
  its largest query index reaches its smallest key index), for the zig-zag layout or
  contiguous shards. The work the layout balances, counted as the kernel does."""
  order = zigzag_index(T, n) if zigzag else np.arange(T)
  t = T // n
  bt, bs = min(block, t), min(block, T)
  k_min = np.asarray([order[j:j + bs].min() for j in range(0, T, bs)])
  counts = []
  for i in range(n):
    mine = order[i * t:(i + 1) * t]
    q_max = np.asarray([mine[j:j + bt].max() for j in range(0, t, bt)])
    counts.append(int((q_max[:, None] >= k_min[None, :]).sum()))
  return counts


def _batch_spec(mesh, B: int):
  """The batch axes (of those > 1) that split a leading dim of B, or None."""
  batch = tuple(a for a in BATCH if a in mesh.axis_names and mesh.shape[a] > 1)
  batch = batch if B % math.prod(mesh.shape[a] for a in batch) == 0 else ()
  return batch or None


def _relayout(x_BT, to_zigzag: bool):
  """x [B, T, ...] moved between sequence order and the zig-zag layout along dim 1.

  Each shard holds two chunks of c places, one of even chunk number and one of odd.
  Even chunks move in one collective-permute, odd ones in another (each a permutation
  of the shards). In order, shard i holds chunks 2i, 2i+1 and chunk j belongs to zig-zag
  shard min(j, 2n-1-j); in zig-zag, shard d holds chunks d, 2n-1-d and chunk j belongs
  to in-order shard j // 2."""
  mesh = jax.sharding.get_abstract_mesh()
  n = mesh.shape[CONTEXT]
  owner = ((lambda j: min(j, 2 * n - 1 - j)) if to_zigzag else (lambda j: j // 2))
  held = ((lambda i: (2 * i, 2 * i + 1)) if to_zigzag else (lambda d: (d, 2 * n - 1 - d)))
  even = [(i, owner(next(j for j in held(i) if j % 2 == 0))) for i in range(n)]
  odd = [(i, owner(next(j for j in held(i) if j % 2 == 1))) for i in range(n)]

  def per_shard(x):
    c = x.shape[1] // 2
    odd_me = jax.lax.axis_index(CONTEXT) % 2 == 1
    lo, hi = x[:, :c], x[:, c:]
    if to_zigzag:   # in order, a shard's first chunk (2i) is the even one
      got_even = jax.lax.ppermute(lo, CONTEXT, even)
      got_odd = jax.lax.ppermute(hi, CONTEXT, odd)
      # zig-zag shard d's first chunk is chunk d: odd when d is
      return jnp.where(odd_me, jnp.concatenate([got_odd, got_even], axis=1),
                       jnp.concatenate([got_even, got_odd], axis=1))
    # zig-zag shard d's first chunk (d) is odd when d is
    got_even = jax.lax.ppermute(jnp.where(odd_me, hi, lo), CONTEXT, even)
    got_odd = jax.lax.ppermute(jnp.where(odd_me, lo, hi), CONTEXT, odd)
    return jnp.concatenate([got_even, got_odd], axis=1)

  spec = PS(_batch_spec(mesh, x_BT.shape[0]), CONTEXT)
  return jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)(x_BT)


def to_zigzag(x_BT):
  """x [B, T, ...] in sequence order -> the zig-zag layout (see the module docstring)."""
  return _relayout(x_BT, to_zigzag=True)


def from_zigzag(x_BT):
  """The inverse of to_zigzag."""
  return _relayout(x_BT, to_zigzag=False)


def _all_gather(x_BtC, platform: str):
  """x gathered along dim 1 over "context". XLA:CPU's all-gather of bfloat16 fails to
  compile when its gradient is taken (AllReducePromotion: "Invalid binary instruction
  opcode copy"), so on CPU it travels as float32 there."""
  dtype = x_BtC.dtype
  if platform == "cpu" and dtype == jnp.bfloat16:
    x_BtC = x_BtC.astype(jnp.float32)
  return jax.lax.all_gather(x_BtC, CONTEXT, axis=1, tiled=True).astype(dtype)


def gather_latent_attention(core, q_nope_BTNH, q_rope_BTNP, c_kv_BTR, k_rope_BTP,
                            w_uk_RNH, w_uv_RNO, segment_ids_BT=None, *, platform: str):
  """core(q_nope, q_rope, c_kv_BSR, k_rope_BSP, w_uk, w_uv, q_idx_BT, k_idx_BS, q_seg_BT,
  k_seg_BS) -> o [B,T,N,O], run per shard with this shard's queries and every shard's
  latents (S = the whole sequence). The inputs are in the zig-zag layout (the indices
  core gets are the global sequence indices). Returns o [B,T,N,O] split like the
  queries."""
  mesh = jax.sharding.get_abstract_mesh()
  B, T, N, _ = q_nope_BTNH.shape
  n = mesh.shape[CONTEXT]
  heads = "tensor" if "tensor" in mesh.axis_names and N % mesh.shape["tensor"] == 0 else None
  b = _batch_spec(mesh, B)
  R = c_kv_BTR.shape[-1]
  order_T = zigzag_index(T, n)
  # One collective for both: the latent and the rope key travel as one [B, t, R + P].
  latent_BTC = jnp.concatenate([c_kv_BTR, k_rope_BTP.astype(c_kv_BTR.dtype)], axis=-1)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((B, T), jnp.int32)

  def per_shard(q_nope, q_rope, latent_btC, seg_bt, w_uk, w_uv):
    t = latent_btC.shape[1]
    latent_bSC = _all_gather(latent_btC, platform)
    seg_bS = _all_gather(seg_bt, platform)
    k_idx_bS = jnp.broadcast_to(jnp.asarray(order_T), seg_bS.shape)
    mine_t = jax.lax.dynamic_slice_in_dim(jnp.asarray(order_T),
                                          jax.lax.axis_index(CONTEXT) * t, t)
    q_idx_bt = jnp.broadcast_to(mine_t, seg_bt.shape)
    # Rematerialised: the backward re-expands K and V of the whole sequence rather than
    # keeping them ([b, S, N, K] per layer) from the forward.
    return jax.checkpoint(core)(q_nope, q_rope, latent_bSC[..., :R], latent_bSC[..., R:],
                                w_uk, w_uv, q_idx_bt, k_idx_bS, seg_bt, seg_bS)

  q_spec, tok_spec, w_spec = PS(b, CONTEXT, heads, None), PS(b, CONTEXT), PS(None, heads, None)
  fn = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(q_spec, q_spec, PS(b, CONTEXT, None), tok_spec, w_spec, w_spec),
                     out_specs=q_spec, check_vma=False)
  return fn(q_nope_BTNH, q_rope_BTNP, latent_BTC, segment_ids_BT, w_uk_RNH, w_uv_RNO)
