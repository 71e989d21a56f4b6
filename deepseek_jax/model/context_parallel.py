"""Context parallelism: attention over sequences split along the mesh's "context" axis.

Every layer but attention treats a context shard's positions as more tokens (they are
split like the batch: partitioning.TOKENS). Attention needs every earlier key, and MLA
makes that cheap: a key and value are functions of the token's latent (c_kv, R values)
and its shared rope key (k_R, P values), so each shard all-gathers those R + P = 576
values a token (V3) from the other shards, instead of the N (H + P + O) = 40,960 of
per-head K and V, and up-projects them locally. The gather's gradient is a
reduce-scatter (the transpose of all_gather). Causality and documents use global token
indices: shard c holds positions [c t, (c + 1) t) of each row.

`gather_latent_attention` runs `core` per device in a shard_map over the whole mesh:
queries split over the batch axes, "context" and (heads) "tensor"; the latent gathered
over "context"; the up-projection weights split over "tensor" by heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as PS

from deepseek_jax.model.partitioning import BATCH, CONTEXT, axis_size


def context_size() -> int:
  """Shards of the context mesh's "context" axis (1: no context parallelism)."""
  return axis_size(CONTEXT)


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
  latents (S = the whole sequence). Returns o [B,T,N,O] split like the queries."""
  mesh = jax.sharding.get_abstract_mesh()
  B, T, N, _ = q_nope_BTNH.shape
  n = mesh.shape[CONTEXT]
  batch = tuple(a for a in BATCH if a in mesh.axis_names and mesh.shape[a] > 1)
  batch = batch if B % math.prod(mesh.shape[a] for a in batch) == 0 else ()
  heads = "tensor" if "tensor" in mesh.axis_names and N % mesh.shape["tensor"] == 0 else None
  b = batch or None
  R = c_kv_BTR.shape[-1]
  # One collective for both: the latent and the rope key travel as one [B, t, R + P].
  latent_BTC = jnp.concatenate([c_kv_BTR, k_rope_BTP.astype(c_kv_BTR.dtype)], axis=-1)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((B, T), jnp.int32)

  def per_shard(q_nope, q_rope, latent_btC, seg_bt, w_uk, w_uv):
    t = latent_btC.shape[1]
    latent_bSC = _all_gather(latent_btC, platform)
    seg_bS = _all_gather(seg_bt, platform)
    k_idx_bS = jnp.broadcast_to(jnp.arange(t * n, dtype=jnp.int32), seg_bS.shape)
    start = jax.lax.axis_index(CONTEXT) * t
    q_idx_bt = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), seg_bt.shape)
    # Rematerialised: the backward re-expands K and V of the whole sequence rather than
    # keeping them ([b, S, N, K] per layer) from the forward.
    return jax.checkpoint(core)(q_nope, q_rope, latent_bSC[..., :R], latent_bSC[..., R:],
                                w_uk, w_uv, q_idx_bt, k_idx_bS, seg_bt, seg_bS)

  q_spec, tok_spec, w_spec = PS(b, CONTEXT, heads, None), PS(b, CONTEXT), PS(None, heads, None)
  fn = jax.shard_map(per_shard, mesh=mesh,
                     in_specs=(q_spec, q_spec, PS(b, CONTEXT, None), tok_spec, w_spec, w_spec),
                     out_specs=q_spec, check_vma=False)
  return fn(q_nope_BTNH, q_rope_BTNP, latent_BTC, segment_ids_BT, w_uk_RNH, w_uv_RNO)
